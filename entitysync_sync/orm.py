"""SQLAlchemy: notify after a successful commit, for every changed instance of a watched model.

``es.watch(Item)`` makes every commit that inserted, updated or deleted an
``Item`` notify ``("items", item.id)`` once it has succeeded, through any
SQLAlchemy 2.x session, Flask-SQLAlchemy's included::

    es.watch(Item)                                     # entity = table name, id = primary key
    es.watch(Comment, entity="posts", id=lambda c: c.post_id)

How: the mapper events ``after_insert``, ``after_update`` and ``after_delete``
(propagated to subclasses) record each written row's key during the flush,
with the primary key read then, while a deleted instance still has it. Keys
are kept per transaction: a released savepoint hands its keys to the
enclosing transaction, a rolled-back one drops them, and only the commit of
the outermost transaction notifies, once per key. A rollback notifies nothing.

Mapper events rather than the session's ``new``/``dirty``/``deleted`` lists,
because they also see rows written by cascades (a child deleted as an
orphan) and skip instances that were only touched. Statements that bypass
the unit of work, ``session.execute(update(Item)...)``, ``bulk_*`` or Core,
fire no such events: call ``es.notify_many`` after those.

A notification that cannot be sent after a commit (no entity registered
under that name, say) is logged, not raised: the commit has happened, and
raising from ``commit()`` would tell the caller otherwise.

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
from typing import Any, Callable, Protocol

from . import protocol as p
from .exceptions import ConfigError
from .keys import EntityKey, IdLike, validate_entity

log = logging.getLogger("entitysync_sync")

EntitySpec = str | Callable[[Any], str] | None
IdSpec = Callable[[Any], IdLike] | None

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


@dataclass(frozen=True)
class _Watch:
    entity: str | Callable[[Any], str]
    id: IdSpec

    def key(self, instance: Any, mapper: Any) -> EntityKey:
        if isinstance(self.entity, str):
            entity = self.entity
        else:
            entity = self.entity(instance)
        if self.id is not None:
            return EntityKey(entity, self.id(instance))
        from sqlalchemy import inspect

        identity = inspect(instance).identity  # set for persistent and deleted rows
        values = identity if identity is not None else mapper.primary_key_from_instance(instance)
        if len(values) == 1:
            return EntityKey(entity, values[0])
        return EntityKey(entity, COMPOSITE_ID_SEPARATOR.join(str(v) for v in values))


class Watcher:
    """The watched models of one :class:`~entitysync_sync.EntitySync` and its session listeners.

    :param notify_many: how to notify the keys a commit wrote (``es.notify_many``).
    """

    def __init__(self, notify_many: Callable[[list[EntityKey]], None],
                 listened_database: Callable[[], ListenedDatabase | None] = lambda: None) -> None:
        self._notify_many = notify_many
        self._lock = threading.Lock()
        self._watches: dict[type[Any], list[_Watch]] = {}
        self._info_key = f"entitysync_sync.pending.{id(self)}"
        self._listening = False
        self._in_transaction = _InTransaction(listened_database, f"entitysync_sync.flushed.{id(self)}")

    def watch(self, model: type[Any], entity: EntitySpec = None, id: IdSpec = None) -> None:
        """Notify after each commit that wrote an instance of ``model`` (or of a subclass)."""
        sqlalchemy = _import_sqlalchemy()
        try:
            mapper = sqlalchemy.inspect(model)
        except sqlalchemy.exc.NoInspectionAvailable:
            raise ConfigError(f"es.watch({model!r}): not a mapped SQLAlchemy class") from None
        if entity is None:  # the watched model's own table, also for its subclasses' rows
            entity = getattr(getattr(mapper, "local_table", None), "name", None)
            if not isinstance(entity, str):
                raise ConfigError(f"es.watch({model.__name__}): no table name; pass entity=")
        if isinstance(entity, str):
            validate_entity(entity)
        elif not callable(entity):
            raise ConfigError("es.watch: entity must be a name, a callable of the instance, or None")
        if id is not None and not callable(id):
            raise ConfigError("es.watch: id must be a callable of the instance, or None")
        event = sqlalchemy.event
        with self._lock:
            if not self._listening:
                session = sqlalchemy.orm.Session
                event.listen(session, "after_commit", self._after_commit)
                event.listen(session, "after_soft_rollback", self._after_soft_rollback)
                event.listen(session, "after_transaction_end", self._after_transaction_end)
                event.listen(session, "after_flush", self._in_transaction.after_flush)
                self._listening = True
            if model not in self._watches:
                self._watches[model] = []
                event.listen(model, "after_insert", self._written, propagate=True)
                event.listen(model, "after_update", self._updated, propagate=True)
                event.listen(model, "after_delete", self._written, propagate=True)
            self._watches[model].append(_Watch(entity, id))

    def unwatch(self, model: type[Any]) -> None:
        """Stop notifying for ``model``; a model that is not watched is ignored."""
        sqlalchemy = _import_sqlalchemy()
        with self._lock:
            if self._watches.pop(model, None) is None:
                return
            event = sqlalchemy.event
            event.remove(model, "after_insert", self._written)
            event.remove(model, "after_update", self._updated)
            event.remove(model, "after_delete", self._written)

    # -- collecting during the flush ------------------------------------------

    def _updated(self, mapper: Any, connection: Any, instance: Any) -> None:
        from sqlalchemy.orm import object_session

        session = object_session(instance)
        # after_update fires for every dirty instance, even one whose values did not change.
        if session is not None and session.is_modified(instance):
            self._written(mapper, connection, instance)

    def _written(self, mapper: Any, connection: Any, instance: Any) -> None:
        from sqlalchemy.orm import object_session

        session = object_session(instance)
        if session is None:  # pragma: no cover - the unit of work always has a session
            return
        written = [watch.key(instance, mapper)
                   for model in type(instance).__mro__ for watch in self._watches.get(model, ())]
        keys = self._pending(session, create=True)
        for key in self._in_transaction.take(session, connection, written):
            keys[key] = None

    def _pending(self, session: Any, create: bool = False) -> dict[EntityKey, None]:
        """The keys written in the session's innermost transaction."""
        tx = session.get_nested_transaction() or session.get_transaction()
        frames: dict[Any, dict[EntityKey, None]] = session.info.setdefault(self._info_key, {})
        if create:
            return frames.setdefault(tx, {})
        return frames.get(tx, {})

    # -- the end of a transaction ---------------------------------------------

    def _after_commit(self, session: Any) -> None:
        frames = session.info.get(self._info_key)
        if not frames:
            return
        tx = session.get_nested_transaction() or session.get_transaction()
        keys = frames.pop(tx, None)
        if not keys:
            return
        if tx.nested:  # a released savepoint: its rows commit with the enclosing transaction
            frames.setdefault(tx.parent, {}).update(keys)
            return
        try:
            self._notify_many(list(keys))
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
                listened_database: Callable[[], ListenedDatabase | None] = lambda: None) -> Watcher:
    """The :class:`Watcher` of ``owner`` (an ``EntitySync``), made on first use."""
    with _watchers_lock:
        watcher = _watchers.get(owner)
        if watcher is None:
            watcher = _watchers[owner] = Watcher(notify_many, listened_database)
        return watcher
