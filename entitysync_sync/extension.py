"""The Flask extension: registration, configuration and notify.

This is the face of the package. The rest is reached from here:
:mod:`~entitysync_sync.registry` keeps what the decorators register,
:mod:`~entitysync_sync.runtime` runs one app's bus, hub and fan-out, and
:mod:`~entitysync_sync.endpoint` serves the websocket.
"""

from __future__ import annotations

import time
import weakref
from typing import Any, Callable, Iterable, TypeVar

from flask import Flask, current_app, has_app_context

from .bus import Bus
from .cli import cli
from .endpoint import endpoint_blueprint, install_server_options
from .exceptions import ConfigError, UnknownEntityError
from .hub import Hub
from .keys import EntityKey, IdLike, KeyLike, as_key, stamp_keys, validate_entity
from .orm import Watcher, watcher_for
from .registry import Registry
from .runtime import EXTENSION_NAME, Runtime
from .settings import load_settings

F = TypeVar("F", bound=Callable[..., Any])


class EntitySync:
    """Keeps websocket clients in sync with the rows they subscribe to.

    ::

        es = EntitySync(app)

        @es.entity("items")
        def fetch_item(key, secret):
            return db.session.get(Item, key.id)

        es.notify("items", 100)   # after changing item 100, from any view

    :meth:`init_app` reads the ``ENTITYSYNC_*`` keys of ``app.config``
    (``ENTITYSYNC_PATH``, ``ENTITYSYNC_BUS_URL``, the limits...). Each is
    defined once, with its default, its check and its meaning, in
    :data:`entitysync_sync.settings.SETTINGS`; the documentation's
    :doc:`configuration page </configuration>` lists them all. A bad value
    raises :class:`~entitysync_sync.ConfigError` naming the key.

    ``bus`` takes a :class:`~entitysync_sync.Bus` instance instead of
    ``ENTITYSYNC_BUS_URL`` (for one app only).
    """

    def __init__(self, app: Flask | None = None, *, bus: Bus | None = None) -> None:
        self._registry = Registry()
        self._bus = bus
        self._runtimes: weakref.WeakKeyDictionary[Flask, Runtime] = weakref.WeakKeyDictionary()
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Register the extension, its websocket route and the browser client on ``app``."""
        if EXTENSION_NAME in app.extensions:
            raise ConfigError(
                "EntitySync is already registered on this app; call init_app once per app"
            )
        if self._bus is not None and self._runtimes:
            raise ConfigError("a bus instance passed to EntitySync serves one app only")
        settings = load_settings(app.config)
        runtime = Runtime(self._registry, app, settings, self._bus)
        install_server_options(app)
        app.register_blueprint(endpoint_blueprint(settings))
        app.cli.add_command(cli)
        app.extensions[EXTENSION_NAME] = runtime
        self._runtimes[app] = runtime

    # -- registration ----------------------------------------------------------

    def entity(self, name: str, *, shared: bool = False, batch: bool = False) -> Callable[[F], F]:
        """Register ``fetch(key, secret)`` for the entity ``name``.

        ``fetch`` returns one row (sent as the push's ``"body"``); a set of
        rows, as a list, a tuple or an iterator (a generator), sent whole as
        the push's ``"rows"`` in that order, an empty set included; or
        ``None`` when the key does not exist, which sends ``gone``. Rows are
        encoded with ``app.json``; a ``str`` or ``bytes`` row is JSON already
        and is sent as it is. Each call sees a fresh ``g``, and the app's
        ``teardown_appcontext`` functions run after it, as in a fresh
        application context (the fetches of one notification share one).

        ``shared=True`` declares that the rows do not depend on the
        subscriber: ``fetch`` is then called with ``secret=None``, once per
        notification per server, and every local subscriber gets the same
        frames, encoded once. ``authorize`` still decides who may subscribe.

        ``batch=True`` registers ``fetch(key, secrets) -> results`` instead:
        it gets the distinct secrets of the key's subscribers on this server
        (at most ``ENTITYSYNC_BATCH_SIZE`` per call) and returns a sequence
        holding one result per secret, in the same order, each what a plain
        fetch returns. It cannot be ``shared``.
        """
        validate_entity(name)  # an invalid name raises here, at the decorator
        if shared and batch:
            raise ConfigError(f"entity {name!r}: a shared entity is fetched once for everyone; drop batch=True")

        def decorator(fetch: F) -> F:
            self._registry.add_entity(name, fetch, shared, batch)
            return fetch

        return decorator

    def authorize(self, fn: F) -> F:
        """Register ``fn(key, secret) -> bool``, checked on every subscribe
        and again for every subscription when the secret changes."""
        self._registry.authorize = fn
        return fn

    def identify(self, fn: F) -> F:
        """Register ``fn() -> secret``, run in the websocket upgrade request's
        context to give each connection its initial secret."""
        self._registry.identify = fn
        return fn

    def on_message(self, fn: F) -> F:
        """Register ``fn(secret, raw)`` for client frames without an ``"action"``."""
        self._registry.on_message = fn
        return fn

    @property
    def entities(self) -> frozenset[str]:
        """Names of the registered entities."""
        return self._registry.names

    # -- notify ----------------------------------------------------------------

    def notify(self, key_or_entity: EntityKey | str, id: IdLike | None = None) -> None:
        """Tell every server that ``key`` changed; returns at once.

        Accepts ``notify(EntityKey("items", "1"))`` or ``notify("items", 1)``.
        Callable from views, CLI commands and background threads.
        """
        self.notify_many([as_key(key_or_entity, id)])

    def notify_many(self, keys: Iterable[KeyLike]) -> None:
        """:meth:`notify` for several keys (``EntityKey`` or ``(entity, id)`` pairs)."""
        batch = stamp_keys(keys, time.time())
        for key in batch:
            if key.entity not in self._registry.entities:
                raise UnknownEntityError(
                    f"no entity {key.entity!r} is registered; use @es.entity({key.entity!r})"
                )
        if batch:
            self.runtime().publish(batch)

    def notify_entity(self, *entities: str) -> None:
        """Tell every server that any row of ``entities`` may have changed; returns at once.

        Every server refreshes every key of those entities that a local
        client subscribes to, once per key, coalesced with refreshes already
        pending. For after a data migration, an import or a bulk fix. A burst
        of calls (and notifications of those entities' keys meanwhile) goes
        out as one request per entity.
        """
        for entity in entities:
            validate_entity(entity)
            if entity not in self._registry.entities:
                raise UnknownEntityError(f"no entity {entity!r} is registered; use @es.entity({entity!r})")
        if entities:
            self.runtime().publish_entities(sorted(set(entities)))

    def watch(self, model: type[Any], entity: str | Callable[[Any], str] | None = None,
              id: Callable[[Any], IdLike] | None = None, *,
              keys: Callable[[Any], Iterable[KeyLike]] | None = None,
              entities: Iterable[str] | None = None) -> type[Any]:
        """Notify after every commit that inserted, updated or deleted a ``model`` instance.

        ``entity`` defaults to the table name and ``id`` to the primary key;
        either may be a callable of the instance. Or ``keys=fn``: ``fn(instance)``
        returns every key (``EntityKey`` or ``(entity, id)``) the instance
        belongs to, e.g. a task's own key and its project's list; on an update,
        the keys of its previous values are notified too. ``entities`` names the
        entities those keys can be in, refreshed whole after a bulk ``update()``
        or ``delete()`` whose keys cannot be known. See :mod:`entitysync_sync.orm`.
        """
        self._watcher().watch(model, entity, id, keys=keys, entities=entities)
        return model

    def unwatch(self, model: type[Any]) -> None:
        """Stop notifying for ``model`` (for instance between tests)."""
        self._watcher().unwatch(model)

    def _watcher(self) -> Watcher:
        return watcher_for(self, self.notify_many, self._notify_entities, self._listened_database)

    def _notify_entities(self, entities: list[str] | None) -> None:
        """An entity-wide refresh of ``entities``, or of every registered entity (None)."""
        self.notify_entity(*(sorted(self._registry.entities) if entities is None else entities))

    def _listened_database(self) -> Any:
        """The PostgreSQL bus this process receives from, for ``watch``'s in-transaction notifications."""
        try:
            return self.runtime().listened_database()
        except ConfigError:  # not registered on an app (yet): notify_many will say so
            return None

    # -- the runtime of each app -----------------------------------------------

    def runtime(self, app: Flask | None = None) -> Runtime:
        """The :class:`~entitysync_sync.runtime.Runtime` of ``app``, or of the current app
        (or of the only app this extension is registered on)."""
        if app is not None:
            try:
                return self._runtimes[app]
            except KeyError:
                raise ConfigError(
                    "EntitySync is not registered on this app: did you forget to call init_app(app)?"
                ) from None
        if has_app_context():
            runtime = current_app.extensions.get(EXTENSION_NAME)
            if isinstance(runtime, Runtime) and runtime.registry is self._registry:
                return runtime
        runtimes = list(self._runtimes.values())
        if len(runtimes) == 1:
            return runtimes[0]
        if not runtimes:
            raise ConfigError(
                "EntitySync is not registered on any app: did you forget to call init_app(app)?"
            )
        raise ConfigError(
            "EntitySync is registered on several apps: call this inside an app context"
        )

    @property
    def apps(self) -> tuple[Flask, ...]:
        """The apps this extension is registered on (that are still alive)."""
        return tuple(self._runtimes.keys())

    def hub(self, app: Flask | None = None) -> Hub:
        """The subscription map of this process (for stats and tests)."""
        return self.runtime(app).hub

    def bus(self, app: Flask | None = None) -> Bus:
        """The bus of this process (for stats and tests)."""
        return self.runtime(app).bus

    def stats(self, app: Flask | None = None) -> dict[str, Any]:
        """Counters and gauges of this process: connections, notifications,
        fetches, pushes, latencies and the bus (see :doc:`/observability`)."""
        return self.runtime(app).stats()

    def close(self, app: Flask | None = None) -> None:
        """Close every local connection with 1001, stop the bus and join the background work."""
        self.runtime(app).close()
