"""The Flask extension: registration, configuration, the websocket route, notify."""

from __future__ import annotations

import atexit
import logging
import os
import signal
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache, partial
from hashlib import sha256
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar
from urllib.parse import urlsplit

from flask import Blueprint, Flask, abort, current_app, has_app_context, request
from flask_sock import Sock
from simple_websocket import ConnectionClosed
from werkzeug.wrappers import Response

from . import _runtime
from . import protocol as p
from .bus import Bus, MemoryBus, bus_from_url
from .cli import cli
from .connection import Connection, ConnectionLimits
from .exceptions import ConfigError, FetchTimeoutError, UnknownEntityError
from .hub import Hub
from .keys import EntityKey, IdLike, NotifiedKey, as_key, validate_entity
from .metrics import MeteredSink, Metrics, collect
from .settings import Settings, load_settings
from .shared import Fanout
from .transport import WebSocketTransport

log = logging.getLogger("entitysync_sync")

F = TypeVar("F", bound=Callable[..., Any])
FetchFn = Callable[[EntityKey, Any], Any]
KeyLike = EntityKey | tuple[str, IdLike]

EXTENSION_NAME = "entitysync"


@dataclass(frozen=True)
class _Entity:
    name: str
    fetch: FetchFn
    shared: bool = False


class EntitySync:
    """Keeps websocket clients in sync with the rows they subscribe to.

    ::

        es = EntitySync(app)

        @es.entity("items")
        def fetch_item(key, secret):
            return db.session.get(Item, key.id)

        es.notify("items", 100)   # after changing item 100, from any view

    Configuration keys, read by :meth:`init_app` (defaults in brackets):

    ``ENTITYSYNC_PATH`` [``"/ws/entity-sync/"``]
        URL of the websocket endpoint. The browser client is served at this
        path plus ``client.js`` (a plain script) and ``client.mjs`` (an ES module).
    ``ENTITYSYNC_BUS_URL`` [``"memory://"``]
        The bus between servers. ``memory://`` reaches only this process.
    ``ENTITYSYNC_PUSH_ON_SUBSCRIBE`` [``True``]
        Push the current state as soon as a client subscribes.
    ``ENTITYSYNC_ENVELOPE`` [``True``]
        Wrap rows in ``push``/``gone`` frames and send acks and errors;
        ``False`` sends each row's JSON alone, as the Go entity-sync did.
    ``ENTITYSYNC_MAX_SUBSCRIPTIONS`` [``1000``]
        Subscriptions one connection may hold.
    ``ENTITYSYNC_MAX_MESSAGE_BYTES`` [``4096``]
        Largest client frame; a larger one closes the connection with 1009.
    ``ENTITYSYNC_OUTBOX_LIMIT`` [``1048576``]
        Characters of frames one connection may have waiting to be written;
        past it the client is too slow and is closed with 1008.
    ``ENTITYSYNC_SEND_TIMEOUT`` [``10.0``]
        Seconds one frame may take to write before the client is closed with 1008.
    ``ENTITYSYNC_COMPRESSION`` [``False``]
        Accept permessage-deflate when a client offers it.
    ``ENTITYSYNC_PUBLISH_BUFFER`` [``10000``]
        Distinct keys the bus may hold unpublished (e.g. while the broker is
        down); past it, keys are dropped and every server resyncs their entities.
    ``ENTITYSYNC_TOPIC_PREFIX`` [``""``]
        Prefix of every NSQ topic or Redis channel, so apps can share a broker.
    ``ENTITYSYNC_ALLOWED_ORIGINS`` [``None``]
        Origins besides the app's own whose pages may open the websocket
        (a list, or ``"*"``); other origins get HTTP 403.
    ``ENTITYSYNC_PING_INTERVAL`` [``25.0``]
        Seconds between pings; a client that missed the last one is closed.
    ``ENTITYSYNC_FETCH_TIMEOUT`` [``10.0``]
        Seconds a fetch may take before it is abandoned as failed.
    ``ENTITYSYNC_FETCH_RETRY_MAX`` [``30.0``]
        Longest pause between retries of a failed fetch (0: no retries).
    ``ENTITYSYNC_RATE_LIMIT`` [``200.0``]
        Client frames per second allowed on average; past it, close 1008.
    ``ENTITYSYNC_RATE_BURST`` [``2000``]
        Client frames allowed at once after a quiet spell.
    """

    def __init__(self, app: Flask | None = None, *, bus: Bus | None = None) -> None:
        self._entities: dict[str, _Entity] = {}
        self._authorize: Callable[[EntityKey, Any], bool] | None = None
        self._identify: Callable[[], Any] | None = None
        self._on_message: Callable[[Any, str], None] | None = None
        self._bus = bus
        self._states: weakref.WeakKeyDictionary[Flask, _State] = weakref.WeakKeyDictionary()
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Register the extension, its websocket route and the browser client on ``app``."""
        if EXTENSION_NAME in app.extensions:
            raise ConfigError(
                "EntitySync is already registered on this app; call init_app once per app"
            )
        if self._bus is not None and self._states:
            raise ConfigError("a bus instance passed to EntitySync serves one app only")
        settings = load_settings(app.config)
        state = _State(self, app, settings, self._bus)
        blueprint = Blueprint("entitysync", __name__)
        blueprint.before_request(partial(_check_origin, settings.allowed_origins))
        if not settings.compression:
            blueprint.before_request(_refuse_compression)
        Sock().route(settings.path, bp=blueprint)(self._serve)
        blueprint.add_url_rule(settings.path + "client.js", "client_js", _client_script)
        blueprint.add_url_rule(settings.path + "client.mjs", "client_mjs", _client_module)
        app.register_blueprint(blueprint)
        app.cli.add_command(cli)
        app.extensions[EXTENSION_NAME] = state
        self._states[app] = state

    # -- registration ----------------------------------------------------------

    def entity(self, name: str, *, shared: bool = False) -> Callable[[F], F]:
        """Register ``fetch(key, secret)`` for the entity ``name``.

        ``fetch`` returns one row, a list or tuple of rows, or an iterator
        (a generator) of rows; or ``None`` when the row does not exist, which
        sends ``gone``. Rows are encoded with ``app.json``; a ``str`` or
        ``bytes`` row is JSON already and is sent as it is. It runs in a fresh
        application context for each call.

        ``shared=True`` declares that the rows do not depend on the
        subscriber: ``fetch`` is then called with ``secret=None``, once per
        notification per server, and every local subscriber gets the same
        frames, encoded once. ``authorize`` still decides who may subscribe.
        """
        validate_entity(name)

        def decorator(fetch: F) -> F:
            if name in self._entities:
                raise ConfigError(f"entity {name!r} is already registered")
            self._entities[name] = _Entity(name, fetch, shared)
            for state in list(self._states.values()):
                state.entity_added(name)
            return fetch

        return decorator

    def authorize(self, fn: F) -> F:
        """Register ``fn(key, secret) -> bool``, checked on every subscribe
        and again for every subscription when the secret changes."""
        self._authorize = fn
        return fn

    def identify(self, fn: F) -> F:
        """Register ``fn() -> secret``, run in the websocket upgrade request's
        context to give each connection its initial secret."""
        self._identify = fn
        return fn

    def on_message(self, fn: F) -> F:
        """Register ``fn(secret, raw)`` for client frames without an ``"action"``."""
        self._on_message = fn
        return fn

    @property
    def entities(self) -> frozenset[str]:
        """Names of the registered entities."""
        return frozenset(self._entities)

    # -- notify ----------------------------------------------------------------

    def notify(self, key_or_entity: EntityKey | str, id: IdLike | None = None) -> None:
        """Tell every server that ``key`` changed; returns at once.

        Accepts ``notify(EntityKey("items", "1"))`` or ``notify("items", 1)``.
        Callable from views, CLI commands and background threads.
        """
        self.notify_many([as_key(key_or_entity, id)])

    def notify_many(self, keys: Iterable[KeyLike]) -> None:
        """:meth:`notify` for several keys (``EntityKey`` or ``(entity, id)`` pairs)."""
        now = time.time()
        batch = [NotifiedKey.stamp(key if isinstance(key, EntityKey) else EntityKey(*key), now)
                 for key in keys]
        for key in batch:
            if key.entity not in self._entities:
                raise UnknownEntityError(
                    f"no entity {key.entity!r} is registered; use @es.entity({key.entity!r})"
                )
        if batch:
            state = self._state()
            state.ensure_started()
            state.bus.publish(batch)
            state.metrics.count("notifications_published", len(batch))

    # -- state -----------------------------------------------------------------

    def _state(self) -> _State:
        if has_app_context():
            state = current_app.extensions.get(EXTENSION_NAME)
            if isinstance(state, _State) and state.ext is self:
                return state
        states = list(self._states.values())
        if len(states) == 1:
            return states[0]
        if not states:
            raise ConfigError(
                "EntitySync is not registered on any app: did you forget to call init_app(app)?"
            )
        raise ConfigError(
            "EntitySync is registered on several apps: call this inside an app context"
        )

    def hub(self, app: Flask | None = None) -> Hub:
        """The subscription map of this process (for stats and tests)."""
        return (self._states[app] if app is not None else self._state()).hub

    def bus(self, app: Flask | None = None) -> Bus:
        """The bus of this process (for stats and tests)."""
        return (self._states[app] if app is not None else self._state()).bus

    def stats(self, app: Flask | None = None) -> dict[str, Any]:
        """Counters and gauges of this process: connections, notifications,
        fetches, pushes, latencies and the bus (see the README's Observability)."""
        state = self._states[app] if app is not None else self._state()
        return collect(state.hub, state.bus, state.metrics)

    def watch(self, model: type[Any], entity: str | Callable[[Any], str] | None = None,
              id: Callable[[Any], IdLike] | None = None) -> type[Any]:
        """Notify after every commit that inserted, updated or deleted a ``model`` instance.

        ``entity`` defaults to the table name and ``id`` to the primary key;
        either may be a callable of the instance. See :mod:`entitysync_sync.orm`.
        """
        from .orm import watcher_for

        watcher_for(self).watch(model, entity, id)
        return model

    def unwatch(self, model: type[Any]) -> None:
        """Stop notifying for ``model`` (for instance between tests)."""
        from .orm import watcher_for

        watcher_for(self).unwatch(model)

    def close(self, app: Flask | None = None) -> None:
        """Close every local connection with 1001 and stop the bus."""
        (self._states[app] if app is not None else self._state()).close()

    # -- the websocket route ---------------------------------------------------

    def _serve(self, ws: Any) -> None:
        state = self._states[current_app._get_current_object()]  # type: ignore[attr-defined]
        transport = WebSocketTransport(ws, state.settings.max_message_bytes, state.settings.send_timeout)
        try:
            self._converse(state, transport, ws)
        except Exception:
            # Logged here so that it never escapes into the server's own error
            # handling, which would write an HTTP response onto the websocket.
            log.exception("the websocket handler failed")
        finally:
            try:
                transport.finish()
            except Exception:
                log.debug("ending the websocket stream failed", exc_info=True)

    def _converse(self, state: _State, transport: WebSocketTransport, ws: Any) -> None:
        if state.closed or state.draining:
            transport.close(p.CLOSE_GOING_AWAY, "server shutting down")
            return
        state.ensure_started()
        secret = None
        if self._identify is not None:
            try:
                secret = self._identify()
            except Exception:
                log.exception("identify raised; closing the connection")
                transport.close(p.CLOSE_INTERNAL_ERROR, "identify failed")
                return
        conn = Connection(transport, state.hub, state, state.limits, secret)
        limit = state.settings.max_message_bytes
        # With real threads simple-websocket can wake its reader before marking
        # itself closed; a periodic timeout lets this loop notice. Greenlets cannot race.
        poll = None if _runtime.gevent_active() else 1.0
        try:
            while not conn.closed:
                data = ws.receive(timeout=poll)
                if data is None:
                    if not ws.connected:
                        break
                elif len(data if isinstance(data, bytes) else data.encode()) > limit:
                    # Normally refused by simple-websocket before it is buffered.
                    conn.close(p.CLOSE_MESSAGE_TOO_BIG, "message too big")
                else:
                    conn.receive(data)
        except ConnectionClosed:
            pass
        except Exception:
            log.exception("the websocket handler failed; closing the connection with 1011")
            conn.close(p.CLOSE_INTERNAL_ERROR, "internal error")
        finally:
            conn.close()


_CLIENT_JS = Path(__file__).with_name("static") / "entitysync.js"
_MODULE_EXPORTS = "\nEntitySync.src = import.meta.url;\nexport { EntitySync };\nexport default EntitySync;\n"


@lru_cache(maxsize=2)
def _client_source(module: bool) -> str:
    source = _CLIENT_JS.read_text(encoding="utf-8")
    return source + _MODULE_EXPORTS if module else source


def _client_response(module: bool) -> Response:
    source = _client_source(module)
    response = current_app.response_class(source, mimetype="text/javascript")
    response.set_etag(sha256(source.encode()).hexdigest()[:32])
    # The URL does not change when the package is upgraded: browsers keep
    # the file but revalidate it, which costs a 304 while it is unchanged.
    response.cache_control.no_cache = True
    return response.make_conditional(request)


def _client_script() -> Response:
    """The browser client as a plain script defining the global ``EntitySync``."""
    return _client_response(module=False)


def _client_module() -> Response:
    """The browser client as an ES module exporting ``EntitySync``."""
    return _client_response(module=True)


def _check_origin(allowed: frozenset[str] | None) -> None:
    """Refuse (HTTP 403) a websocket upgrade from a page of another origin.

    Browsers send ``Origin`` with every websocket handshake and attach the
    site's cookies whatever page opens the socket, so without this check any
    site could open a socket with a visitor's session (cross-site websocket
    hijacking). Same origin means the same host and port as the ``Host``
    header. Requests without ``Origin`` (not from a browser) are allowed.
    """
    if request.headers.get("Upgrade", "").lower() != "websocket":
        return
    origin = request.headers.get("Origin")
    if origin is None or _same_origin(origin, request.host):
        return
    if allowed is not None and ("*" in allowed or origin.rstrip("/").lower() in allowed):
        return
    log.warning("refused a websocket upgrade from origin %r (see ENTITYSYNC_ALLOWED_ORIGINS)", origin[:200])
    abort(403)


_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def _same_origin(origin: str, host: str) -> bool:
    try:
        parts = urlsplit(origin.strip())
        origin_port = parts.port or _DEFAULT_PORTS.get(parts.scheme.lower())
        target = urlsplit("//" + host)
        target_port = target.port
    except ValueError:
        return False
    if not parts.hostname or parts.hostname != target.hostname:
        return False
    # The Host header omits the default port of whichever scheme the client used.
    return (target_port is None and origin_port in (80, 443)) or target_port == origin_port


def _refuse_compression() -> None:
    # Without an offer in the handshake, simple-websocket cannot negotiate permessage-deflate.
    request.environ.pop("HTTP_SEC_WEBSOCKET_EXTENSIONS", None)


class _State:
    """One app's hub, bus and settings; also the connections' ``Handlers``."""

    def __init__(self, ext: EntitySync, app: Flask, settings: Settings, bus: Bus | None) -> None:
        self.ext = ext
        self.app = app
        self.settings = settings
        self._bus_given = bus is not None
        self.bus = bus if bus is not None else self._make_bus()
        self.hub = Hub()
        self.metrics = Metrics()
        self.limits = ConnectionLimits(
            max_subscriptions=settings.max_subscriptions,
            outbox_limit=settings.outbox_limit,
            push_on_subscribe=settings.push_on_subscribe,
            envelope=settings.envelope,
            rate_limit=settings.rate_limit,
            rate_burst=settings.rate_burst,
            fetch_retry_max=settings.fetch_retry_max,
        )
        self.fanout = Fanout(self, settings.envelope, settings.fetch_retry_max)
        self._lock = threading.Lock()
        self._started_in: int | None = None  # the pid that started the bus
        self.closed = False
        #: Set when the server shuts down: websockets are closed, notify still works.
        self.draining = False

    def _make_bus(self) -> Bus:
        return bus_from_url(self.settings.bus_url, buffer_size=self.settings.publish_buffer,
                            topic_prefix=self.settings.topic_prefix)

    def ensure_started(self) -> None:
        """Start the bus and the sweeper on first use, in the serving process.

        Started lazily so that nothing runs in a process that forks workers
        (``gunicorn --preload``). If it was started before a fork anyway (a
        notify while the app was being created), the child's copy has lost the
        parent's threads, so the child starts a fresh bus of its own.
        """
        if self.closed:
            raise ConfigError("this EntitySync was closed; no new connections or notifications")
        pid = os.getpid()
        if self._started_in == pid:
            return
        with self._lock:
            if self._started_in == pid or self.closed:
                return
            if self._started_in is not None:
                if self._bus_given:
                    raise ConfigError(
                        "the bus passed to EntitySync(bus=...) was started before this process "
                        "forked; use ENTITYSYNC_BUS_URL, or do not notify while the app is created"
                    )
                log.info("process forked after the bus started; starting a fresh bus")
                self.bus = self._make_bus()
                self.hub = Hub()
            self.hub.fanout = self.fanout
            self.bus.start(MeteredSink(lambda: self.hub, self.metrics), list(self.ext._entities))
            atexit.register(self.bus.close)  # a last attempt to publish what is buffered
            log.info("entitysync started in process %d on %s", pid, self.bus.describe())
            _runtime.spawn(self._sweep, name="entitysync-sweeper")
            self._started_in = pid
        workers = _runtime.gunicorn_workers()  # a scan of the heap: once per process
        if workers is not None:
            self._drain_on_shutdown_signals()
        if isinstance(self.bus, MemoryBus):
            if workers is not None and workers > 1:
                log.warning(
                    "ENTITYSYNC_BUS_URL is %s but gunicorn runs %d workers: a notify reaches only "
                    "the clients of the worker that made it. Use a redis:// or nsq:// bus to "
                    "reach every worker and server.", self.settings.bus_url, workers)

    def entity_added(self, name: str) -> None:
        if self._started_in is not None:
            self.bus.add_entity(name)

    def _sweep(self) -> None:
        interval = min(1.0, self.settings.send_timeout / 4)
        ping_every = self.settings.ping_interval
        if ping_every:
            interval = min(interval, ping_every)
        next_ping = time.monotonic() + ping_every
        while not self.closed:
            time.sleep(interval)
            try:
                self.hub.sweep(self.settings.send_timeout)
                if ping_every and time.monotonic() >= next_ping:
                    next_ping += ping_every
                    self.hub.heartbeat()
            except Exception:  # one bad connection must not end pings and send timeouts for all
                log.exception("the connection sweeper failed; it carries on")

    def _drain_on_shutdown_signals(self) -> None:
        """Close websockets with 1001 as soon as the gunicorn worker is told to stop.

        gunicorn stops accepting and then waits up to ``--graceful-timeout``
        for open requests; a websocket never ends by itself, so without this
        its clients would wait that long and then see the connection drop.
        Closed with 1001, they reconnect at once, to a worker that is staying.
        """
        for signum in (signal.SIGTERM, signal.SIGQUIT, signal.SIGINT):
            previous = signal.getsignal(signum)

            def handler(num: int, frame: Any, previous: Any = previous) -> None:
                _runtime.spawn(self.drain, name="entitysync-drain")
                if callable(previous):
                    previous(num, frame)

            try:
                signal.signal(signum, handler)
            except ValueError:  # not the main thread: leave shutdown to the server
                log.debug("cannot watch shutdown signals from this thread")
                return

    def drain(self) -> None:
        """Close every websocket with 1001 and refuse new ones; notify keeps working."""
        if self.draining:
            return
        self.draining = True
        log.info("shutting down: closing %d websocket(s) with 1001", self.hub.connection_count)
        self.hub.close_all(p.CLOSE_GOING_AWAY, "server shutting down")

    def close(self) -> None:
        self.closed = True
        self.hub.close_all(p.CLOSE_GOING_AWAY, "server shutting down")
        self.bus.close()

    # -- Handlers --------------------------------------------------------------

    def has_entity(self, entity: str) -> bool:
        return entity in self.ext._entities

    def authorize(self, key: EntityKey, secret: Any) -> bool:
        fn = self.ext._authorize
        if fn is None:
            return True
        with self.app.app_context():
            return bool(fn(key, secret))

    def pass_through(self, secret: Any, raw: str) -> bool:
        fn = self.ext._on_message
        if fn is None:
            return False
        with self.app.app_context():
            fn(secret, raw)
        return True

    def is_shared(self, entity: str) -> bool:
        found = self.ext._entities.get(entity)
        return found is not None and found.shared

    def fetch(self, key: EntityKey, secret: Any) -> list[str] | None:
        started = time.monotonic()
        try:
            rows = _runtime.call_with_timeout(self.settings.fetch_timeout, self._timed_out, self._fetch, key, secret)
        except Exception:
            self.metrics.fetch_failed(started)
            raise
        self.metrics.fetched(key, started, None if rows is None else len(rows))
        return rows

    def _timed_out(self) -> FetchTimeoutError:
        return FetchTimeoutError(f"timed out after {self.settings.fetch_timeout:g}s (ENTITYSYNC_FETCH_TIMEOUT)")

    def _fetch(self, key: EntityKey, secret: Any) -> list[str] | None:
        entity = self.ext._entities[key.entity]
        if entity.shared:
            secret = None  # a shared fetch must not depend on whoever subscribed first
        with self.app.app_context():
            result = entity.fetch(key, secret)
            if result is None:
                return None
            if isinstance(result, (list, tuple)) or (
                not isinstance(result, dict) and isinstance(result, Iterator)
            ):
                return [self._encode(row) for row in result]
            return [self._encode(result)]

    def _encode(self, row: Any) -> str:
        if isinstance(row, str):
            return row
        if isinstance(row, (bytes, bytearray)):
            return bytes(row).decode("utf-8")
        return self.app.json.dumps(row)
