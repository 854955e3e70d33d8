"""SQLAlchemy: notify after a successful commit, for every changed instance of a watched model.

``es.watch(Item)`` makes every commit that inserted, updated or deleted an
``Item`` notify ``("items", item.id)`` once it has succeeded, through any
SQLAlchemy 2.x session, Flask-SQLAlchemy's included::

    es.watch(Item)                                     # entity = table name, id = primary key
    es.watch(Comment, entity="posts", id=lambda c: c.post_id)
    es.watch(Task, keys=lambda t: [("tasks", t.id), ("project_tasks", t.project_id)],
             entities=["tasks", "project_tasks"])

How: the mapper events ``after_insert``, ``after_update`` and ``after_delete``
(propagated to subclasses) record each written row's keys during the flush,
with the primary key read then, while a deleted instance still has it. On an
update (and a delete) the keys are also computed from the instance's
*previous* values, read from SQLAlchemy's attribute history, so a task moved
from project 1 to project 2 notifies both lists. Keys are kept per
transaction: a released savepoint hands its keys to the enclosing
transaction, a rolled-back one drops them, and only the commit of the
outermost transaction notifies, once per key. A rollback notifies nothing.

Mapper events rather than the session's ``new``/``dirty``/``deleted`` lists,
because they also see rows written by cascades (a child deleted as an
orphan) and skip instances that were only touched.

ORM-enabled ``update()``/``delete()`` statements executed through a session
bypass those events; the session's ``do_orm_execute`` event sees them. Where
the database returns the affected primary keys (``RETURNING``: SQLite 3.35+,
PostgreSQL, MariaDB for DELETE; SQLAlchemy's ``synchronize_session="fetch"``,
which this selects when the statement leaves the default), watches keyed by
primary key notify exactly those keys. Otherwise, and for watches with
callables or ``keys=`` (whose keys the database cannot return, nor their
previous values), the watch's ``entities`` are refreshed whole
(``es.notify_entity``) after the commit; a watch that cannot name its
entities refreshes every registered entity, with a warning. Core
statements on a ``Connection``, ``bulk_*`` methods and ``insert()`` still
notify nothing: call ``es.notify_many`` or ``es.notify_entity`` after those.

A notification that cannot be sent after a commit (no entity registered
under that name, say) is logged, not raised, and so is a ``keys=`` (or
``entity=``/``id=``) callable that fails or returns something other than
keys, as a :class:`~entitysync_sync.exceptions.ConfigError` naming the model:
the commit goes ahead, and raising from ``commit()`` would tell the caller
it had not.

Inside the transaction, on PostgreSQL: when the flush runs on the database
this process listens to (a ``postgresql://`` bus, or
``ENTITYSYNC_PG_LISTEN_URL``), the keys are sent with ``pg_notify`` on the
flush's own connection, after each flush, instead of after the commit.
PostgreSQL delivers them if and only if the transaction commits (a rolled-back
savepoint drops its own), so no crash between commit and publish can lose
them. The database is recognised by its name and its server's start time,
read once per engine (again after the server restarts); until the listener is
connected, keys go after the commit as elsewhere.
"""

from __future__ import annotations

import logging
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Protocol, Sequence

from . import protocol as p
from .exceptions import ConfigError
from .keys import EntityKey, IdLike, KeyLike, validate_entity

log = logging.getLogger("entitysync_sync")

EntitySpec = str | Callable[[Any], str] | None
IdSpec = Callable[[Any], IdLike] | None
KeysSpec = Callable[[Any], Iterable[KeyLike]] | None

#: Separator of the values of a composite primary key in the default id.
COMPOSITE_ID_SEPARATOR = ","


def _import_sqlalchemy() -> Any:
    try:
        import sqlalchemy
        import sqlalchemy.orm
    except ImportError:
        raise ConfigError(
            "es.watch needs SQLAlchemy: pip install 'entitysync_sync[sqlalchemy]'"
        ) from None
    return sqlalchemy


def _id_of(values: Sequence[Any]) -> IdLike:
    if len(values) == 1:
        return values[0]  # type: ignore[no-any-return]
    return COMPOSITE_ID_SEPARATOR.join(str(v) for v in values)


@dataclass(frozen=True)
class _Watch:
    model: type[Any]
    entity: str | Callable[[Any], str] | None
    id: IdSpec
    keys_fn: KeysSpec
    #: What a bulk statement refreshes whole when its keys cannot be known; None: not known.
    entities: tuple[str, ...] | None

    @property
    def by_primary_key(self) -> bool:
        """Whether the keys are (a fixed entity, the primary key), so a database can return them."""
        return isinstance(self.entity, str) and self.id is None and self.keys_fn is None

    def keys(self, instance: Any, mapper: Any) -> list[EntityKey]:
        """The keys ``instance`` (or a stand-in for its previous values) belongs to."""
        if self.keys_fn is not None:
            return _as_keys(self.keys_fn(instance))
        entity = self.entity if isinstance(self.entity, str) else self.entity(instance)  # type: ignore[misc]
        if self.id is not None:
            return [EntityKey(entity, self.id(instance))]
        from sqlalchemy import inspect

        target = instance.instance if isinstance(instance, _Previous) else instance
        identity = inspect(target).identity  # set for persistent and deleted rows
        values = identity if identity is not None else mapper.primary_key_from_instance(target)
        return [EntityKey(entity, _id_of(values))]

    def key_of_primary_key(self, values: Sequence[Any]) -> EntityKey:
        assert isinstance(self.entity, str)
        return EntityKey(self.entity, _id_of(values))


def _as_keys(result: object) -> list[EntityKey]:
    """Check what a ``keys=`` callable returned: an iterable of keys or (entity, id) pairs."""
    if isinstance(result, (str, bytes, EntityKey)) or not isinstance(result, Iterable):
        raise ConfigError(f"keys= must return a list of keys or (entity, id) pairs, got {result!r:.100}")
    keys = []
    for item in result:
        if isinstance(item, EntityKey):
            keys.append(item)
        elif isinstance(item, tuple) and len(item) == 2:
            keys.append(EntityKey(*item))
        else:
            raise ConfigError(f"keys= returned {item!r:.100}, which is neither an EntityKey "
                              "nor an (entity, id) pair")
    return keys


class _Previous:
    """An instance as it was before this flush: changed attributes read their previous values.

    ``keys=`` and the ``entity=``/``id=`` callables are given one to compute
    the keys an updated or deleted row belonged to before the change. It
    answers attribute reads only.
    """

    __slots__ = ("instance", "values")

    def __init__(self, instance: Any, values: dict[str, Any]) -> None:
        self.instance = instance
        self.values = values

    def __getattr__(self, name: str) -> Any:
        values = object.__getattribute__(self, "values")
        if name in values:
            return values[name]
        return getattr(object.__getattribute__(self, "instance"), name)


def _previous_values(instance: Any) -> dict[str, Any]:
    """The previous value of each scalar attribute (column or many-to-one) changed in this flush."""
    from sqlalchemy import inspect

    state = inspect(instance)
    values = {}
    for attr in state.attrs:
        prop = state.mapper.attrs.get(attr.key)
        if prop is None or getattr(prop, "uselist", False):
            continue  # a collection: its items are rows of their own
        history = attr.history
        if history.deleted:
            values[attr.key] = history.deleted[0]
    return values


def _ignore(target: Any, value: Any, oldvalue: Any, initiator: Any) -> None:
    """A ``set`` listener whose only purpose is ``active_history=True``."""


class _Pending:
    """What one transaction will notify when it commits."""

    __slots__ = ("entities", "every_entity", "keys")

    def __init__(self) -> None:
        self.keys: dict[EntityKey, None] = {}
        self.entities: set[str] = set()
        self.every_entity = False

    def merge(self, other: _Pending) -> None:
        self.keys.update(other.keys)
        self.entities |= other.entities
        self.every_entity = self.every_entity or other.every_entity

    def __bool__(self) -> bool:
        return bool(self.keys or self.entities or self.every_entity)


class Watcher:
    """The watched models of one :class:`~entitysync_sync.EntitySync` and its session listeners.

    :param notify_many: how to notify the keys a commit wrote (``es.notify_many``).
    :param notify_entities: how to refresh whole entities after a bulk statement
        (``es.notify_entity``); ``None`` means every registered entity.
    """

    def __init__(self, notify_many: Callable[[list[EntityKey]], None],
                 notify_entities: Callable[[list[str] | None], None],
                 listened_database: Callable[[], ListenedDatabase | None] = lambda: None) -> None:
        self._notify_many = notify_many
        self._notify_entities = notify_entities
        self._lock = threading.Lock()
        self._watches: dict[type[Any], list[_Watch]] = {}
        self._info_key = f"entitysync_sync.pending.{id(self)}"
        self._listening = False
        self._warned: set[type[Any]] = set()
        self._previous_kept: set[Any] = set()
        self._in_transaction = _InTransaction(listened_database, f"entitysync_sync.flushed.{id(self)}")

    def watch(self, model: type[Any], entity: EntitySpec = None, id: IdSpec = None, *,
              keys: KeysSpec = None, entities: Iterable[str] | None = None) -> None:
        """Notify after each commit that wrote an instance of ``model`` (or of a subclass)."""
        sqlalchemy = _import_sqlalchemy()
        try:
            mapper = sqlalchemy.inspect(model)
        except sqlalchemy.exc.NoInspectionAvailable:
            raise ConfigError(f"es.watch({model!r}): not a mapped SQLAlchemy class") from None
        name = model.__name__
        if keys is not None:
            if entity is not None or id is not None:
                raise ConfigError(f"es.watch({name}): pass keys= or entity=/id=, not both")
            if not callable(keys):
                raise ConfigError(f"es.watch({name}): keys must be a callable of the instance")
        elif entity is None:  # the watched model's own table, also for its subclasses' rows
            entity = getattr(getattr(mapper, "local_table", None), "name", None)
            if not isinstance(entity, str):
                raise ConfigError(f"es.watch({name}): no table name; pass entity=")
        if isinstance(entity, str):
            validate_entity(entity)
        elif entity is not None and not callable(entity):
            raise ConfigError("es.watch: entity must be a name, a callable of the instance, or None")
        if id is not None and not callable(id):
            raise ConfigError("es.watch: id must be a callable of the instance, or None")
        if entities is not None:
            if isinstance(entities, str) or not isinstance(entities, Iterable):
                raise ConfigError(f"es.watch({name}): entities must be a list of entity names")
            names: tuple[str, ...] | None = tuple(validate_entity(e) for e in entities)
        else:
            names = (entity,) if isinstance(entity, str) else None
        event = sqlalchemy.event
        with self._lock:
            if not self._listening:
                session = sqlalchemy.orm.Session
                event.listen(session, "after_commit", self._after_commit)
                event.listen(session, "after_soft_rollback", self._after_soft_rollback)
                event.listen(session, "after_transaction_end", self._after_transaction_end)
                event.listen(session, "do_orm_execute", self._orm_execute)
                event.listen(session, "after_flush", self._in_transaction.after_flush)
                self._listening = True
            if model not in self._watches:
                self._watches[model] = []
                event.listen(model, "after_insert", self._inserted, propagate=True)
                event.listen(model, "after_update", self._updated, propagate=True)
                event.listen(model, "after_delete", self._deleted, propagate=True)
            watch = _Watch(model, entity, id, keys, names)
            if not watch.by_primary_key:
                self._keep_previous_values(mapper)
            self._watches[model].append(watch)

    def _keep_previous_values(self, mapper: Any) -> None:
        """Make each column and many-to-one attribute load its previous value when it is set.

        Keys computed by callables may depend on any attribute. SQLAlchemy
        keeps an attribute's previous value only if it was loaded; an
        expired one (after a commit, say) would be overwritten unseen, and a
        task moved from project 1 could not notify project 1's list. With
        ``active_history``, setting it loads the previous value first (one
        SELECT for an expired instance), as SQLAlchemy's versioning recipes do.
        """
        from sqlalchemy import event
        from sqlalchemy.orm import ColumnProperty, RelationshipProperty

        if mapper in self._previous_kept:
            return
        self._previous_kept.add(mapper)
        for prop in mapper.attrs:
            if isinstance(prop, ColumnProperty) or (isinstance(prop, RelationshipProperty) and not prop.uselist):
                event.listen(getattr(mapper.class_, prop.key), "set", _ignore, active_history=True, propagate=True)

    def unwatch(self, model: type[Any]) -> None:
        """Stop notifying for ``model``; a model that is not watched is ignored."""
        sqlalchemy = _import_sqlalchemy()
        with self._lock:
            if self._watches.pop(model, None) is None:
                return
            event = sqlalchemy.event
            event.remove(model, "after_insert", self._inserted)
            event.remove(model, "after_update", self._updated)
            event.remove(model, "after_delete", self._deleted)

    # -- collecting during the flush ------------------------------------------

    def _inserted(self, mapper: Any, connection: Any, instance: Any) -> None:
        self._written(mapper, connection, instance, previous=False)

    def _updated(self, mapper: Any, connection: Any, instance: Any) -> None:
        from sqlalchemy.orm import object_session

        session = object_session(instance)
        # after_update fires for every dirty instance, even one whose values did not change.
        if session is not None and session.is_modified(instance):
            self._written(mapper, connection, instance, previous=True)

    def _deleted(self, mapper: Any, connection: Any, instance: Any) -> None:
        self._written(mapper, connection, instance, previous=True)

    def _written(self, mapper: Any, connection: Any, instance: Any, previous: bool) -> None:
        from sqlalchemy.orm import object_session

        session = object_session(instance)
        if session is None:  # pragma: no cover - the unit of work always has a session
            return
        written: dict[EntityKey, None] = {}
        old = _previous_values(instance) if previous else {}
        for watch in self._watches_of(type(instance)):
            try:
                for target in (instance, _Previous(instance, old)) if old else (instance,):
                    written.update(dict.fromkeys(watch.keys(target, mapper)))
            except Exception as exc:  # reported once per watch and row, never raised into the flush
                self._report(watch, exc)
        pending = self._pending(session, create=True)
        pending.keys.update(dict.fromkeys(self._in_transaction.take(session, connection, list(written))))

    def _report(self, watch: _Watch, exc: Exception) -> None:
        """Log a watch whose keys could not be computed; the flush and the commit go on."""
        what = "keys=" if watch.keys_fn is not None else "entity=/id="
        error = ConfigError(f"es.watch({watch.model.__name__}): {what} failed, so this change "
                            f"notifies nothing for it: {exc}")
        log.error("%s", error, exc_info=error)

    def _watches_of(self, cls: type[Any]) -> list[_Watch]:
        return [watch for model in cls.__mro__ for watch in self._watches.get(model, ())]

    def _pending(self, session: Any, create: bool = False) -> _Pending:
        """What the session's innermost transaction will notify."""
        tx = session.get_nested_transaction() or session.get_transaction()
        frames: dict[Any, _Pending] = session.info.setdefault(self._info_key, {})
        if create:
            return frames.setdefault(tx, _Pending())
        return frames.get(tx, _Pending())

    # -- bulk statements -------------------------------------------------------

    def _orm_execute(self, state: Any) -> Any:
        if not (state.is_update or state.is_delete):
            return None
        mapper = state.bind_mapper
        if mapper is None:
            return None
        classes = {*mapper.class_.__mro__, *(m.class_ for m in mapper.self_and_descendants)}
        watches = [watch for cls in classes for watch in self._watches.get(cls, ())]
        if not watches:
            return None
        executemany = isinstance(state.parameters, (list, tuple))
        if not executemany and state.execution_options.get("synchronize_session", "auto") == "auto":
            # "fetch" reads the affected primary keys with RETURNING where the database has it.
            state.update_execution_options(synchronize_session="fetch")
        result = state.invoke_statement()
        self._bulk(state.session, watches, result, executemany)
        return result

    def _bulk(self, session: Any, watches: list[_Watch], result: Any, executemany: bool) -> None:
        from sqlalchemy.engine import CursorResult

        rowcount = getattr(result, "rowcount", -1) if isinstance(result, CursorResult) else -1
        if rowcount == 0 and not executemany:
            return  # it matched nothing
        rows = result.returned_defaults_rows if isinstance(result, CursorResult) else None
        pending = self._pending(session, create=True)
        for watch in watches:
            if rows is not None and watch.by_primary_key:
                pending.keys.update((watch.key_of_primary_key(tuple(row)), None) for row in rows)
            elif watch.entities is not None:
                pending.entities.update(watch.entities)
            else:
                pending.every_entity = True
                if watch.model not in self._warned:
                    self._warned.add(watch.model)
                    log.warning("es.watch(%s) cannot tell which keys a bulk UPDATE or DELETE changed, nor "
                                "their entities: every registered entity is refreshed. Pass entities=[...] "
                                "to refresh only those.", watch.model.__name__)

    # -- the end of a transaction ---------------------------------------------

    def _after_commit(self, session: Any) -> None:
        frames = session.info.get(self._info_key)
        if not frames:
            return
        tx = session.get_nested_transaction() or session.get_transaction()
        pending = frames.pop(tx, None)
        if not pending:
            return
        if tx.nested:  # a released savepoint: its rows commit with the enclosing transaction
            frames.setdefault(tx.parent, _Pending()).merge(pending)
            return
        if pending.every_entity or pending.entities:
            try:
                self._notify_entities(None if pending.every_entity else sorted(pending.entities))
            except Exception:
                log.exception("refreshing %s after a commit failed",
                              "every entity" if pending.every_entity else ", ".join(sorted(pending.entities)))
        # Keys of entities refreshed whole are covered already.
        keys = [] if pending.every_entity else [k for k in pending.keys if k.entity not in pending.entities]
        if not keys:
            return
        try:
            self._notify_many(keys)
        except Exception:
            log.exception("notifying %d key(s) after a commit failed", len(keys))

    def _after_soft_rollback(self, session: Any, previous_transaction: Any) -> None:
        session.info.pop(self._in_transaction.info_key, None)  # a flush that failed before after_flush
        frames = session.info.get(self._info_key)
        if frames:
            frames.pop(previous_transaction, None)

    def _after_transaction_end(self, session: Any, transaction: Any) -> None:
        # Whatever a committed transaction held was passed on in after_commit; the rest was rolled back.
        frames = session.info.get(self._info_key)
        if frames:
            frames.pop(transaction, None)


class ListenedDatabase(Protocol):
    """The PostgreSQL bus a server receives from (:class:`~entitysync_sync.bus.postgres.PostgresBus`)."""

    database_identity: tuple[str, str] | None

    def topic(self, entity: str) -> str:
        """The channel of ``entity``."""


_IDENTITY = "SELECT current_database(), pg_postmaster_start_time()::text"
_NOTIFY = "SELECT pg_notify(c, b) FROM unnest(CAST(:c AS text[]), CAST(:b AS text[])) AS n(c, b)"


class _InTransaction:
    """Sends the keys a flush wrote with ``pg_notify`` on the flush's connection, when that
    connection reaches the database the servers listen to."""

    def __init__(self, listened_database: Callable[[], ListenedDatabase | None], info_key: str) -> None:
        self._listened_database = listened_database
        self.info_key = info_key
        # engine -> (its database's identity, the listener's identity it was compared with)
        self._identities: weakref.WeakKeyDictionary[Any, tuple[tuple[Any, ...], tuple[str, str]]] = (
            weakref.WeakKeyDictionary())

    def take(self, session: Any, connection: Any, keys: list[EntityKey]) -> list[EntityKey]:
        """Keep the ``keys`` that can go inside the transaction; return the others."""
        database = self._database(connection) if keys else None
        if database is None:
            return keys
        rest = []
        flushed = session.info.setdefault(self.info_key, {}).setdefault(connection, {})
        for key in keys:
            try:
                flushed[key] = database.topic(key.entity)
            except ConfigError:  # a prefix plus entity too long: after the commit, which logs why
                rest.append(key)
        return rest

    def after_flush(self, session: Any, flush_context: Any) -> None:
        from sqlalchemy import text

        for connection, keys in session.info.pop(self.info_key, {}).items():
            bodies = [p.encode_bus_body(EntityKey(key.entity, key.id)).decode() for key in keys]
            connection.execute(text(_NOTIFY), {"c": list(keys.values()), "b": bodies})

    def _database(self, connection: Any) -> ListenedDatabase | None:
        if connection.dialect.name != "postgresql":
            return None
        database = self._listened_database()
        listening = database.database_identity if database is not None else None
        if listening is None:
            return None
        engine = connection.engine
        known = self._identities.get(engine)
        if known is None or known[1] != listening:
            known = self._identities[engine] = (tuple(connection.exec_driver_sql(_IDENTITY).one()), listening)
        return database if known[0] == listening else None


_watchers: weakref.WeakKeyDictionary[object, Watcher] = weakref.WeakKeyDictionary()
_watchers_lock = threading.Lock()


def watcher_for(owner: object, notify_many: Callable[[list[EntityKey]], None],
                notify_entities: Callable[[list[str] | None], None],
                listened_database: Callable[[], ListenedDatabase | None] = lambda: None) -> Watcher:
    """The :class:`Watcher` of ``owner`` (an ``EntitySync``), made on first use."""
    with _watchers_lock:
        watcher = _watchers.get(owner)
        if watcher is None:
            watcher = _watchers[owner] = Watcher(notify_many, notify_entities, listened_database)
        return watcher
