"""The PostgreSQL bus, ``postgresql://user@host:5432/db`` (or ``postgres://``), on LISTEN/NOTIFY.

One channel per entity, named by :func:`channel_name` (``ENTITYSYNC_TOPIC_PREFIX``
+ entity, shortened with a hash when it does not fit PostgreSQL's 63-byte
identifiers), carrying the same JSON bodies as the other buses, so
``NOTIFY items, '{"entity":"items","id":"1"}'`` (or a trigger, see
:mod:`entitysync_sync.postgres`) triggers a push.

Publishing runs ``pg_notify`` on a connection of its own, in batches.
Receiving holds one connection that LISTENs on every entity's channel and
waits for notifications with psycopg's wait functions, which psycopg (3.1.14
and later) makes cooperative when gevent has patched the process, and which
block only the bus's own thread under the threaded dev server. Like Redis
pub/sub, PostgreSQL keeps nothing for a listener that is away, so every
(re)connection resyncs (see :class:`~entitysync_sync.bus.buffered.BufferedBus`).

psycopg is imported on first use, in the serving process: with gunicorn's
``--preload``, an import in the master, before gevent patched the worker,
would pick psycopg's blocking wait function.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import threading
import time
from importlib import metadata
from typing import Any, Iterable
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

from .. import protocol as p
from ..backoff import backoff
from ..concurrency import gevent_active
from ..exceptions import ConfigError
from ..keys import topic_name
from .buffered import BufferedBus

log = logging.getLogger("entitysync_sync")

#: The longest identifier (channel, function or trigger name) PostgreSQL keeps, in bytes.
MAX_IDENTIFIER_BYTES = 63

#: The largest NOTIFY payload PostgreSQL accepts, in bytes (exclusive).
MAX_PAYLOAD_BYTES = 8000

#: The oldest psycopg with ``Connection.notifies(timeout=)`` and connection-less SQL composition.
MIN_PSYCOPG = (3, 2)

#: Libpq settings the bus applies unless the URL sets them: connect within 5 s, and
#: let the kernel notice a vanished server within about 11 s on an idle connection
#: (keepalives) and 10 s on a busy one (``tcp_user_timeout``).
CONNECTION_DEFAULTS: dict[str, Any] = {
    "connect_timeout": 5,
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "tcp_user_timeout": 10_000,
}

_SEND = "SELECT pg_notify(c, b) FROM unnest(%s::text[], %s::text[]) AS n(c, b)"
_IDENTITY = "SELECT current_database(), pg_postmaster_start_time()::text"


def shorten_identifier(name: str) -> str:
    """``name`` if it has at most 62 bytes, else its first bytes, ``#`` and 16 hex digits of its SHA-256.

    A shortened name has exactly 63 bytes and contains ``#``, which entity names
    and topic prefixes cannot, so it never equals a name that was not shortened;
    two shortened names are equal only if their SHA-256 digests begin alike.
    """
    raw = name.encode()
    if len(raw) < MAX_IDENTIFIER_BYTES:
        return name
    digest = hashlib.sha256(raw).hexdigest()[:16]
    head = raw[: MAX_IDENTIFIER_BYTES - 1 - len(digest)].decode(errors="ignore")  # whole characters only
    return f"{head}#{digest}"


def channel_name(topic_prefix: str, entity: str) -> str:
    """The NOTIFY channel that carries ``entity``'s keys, for servers and triggers alike.

    The topic (``topic_prefix + entity``, checked like every bus's) when it
    fits in 62 bytes, else :func:`shorten_identifier` of it. Raises
    :class:`~entitysync_sync.ConfigError` for a bad prefix or entity name.
    """
    return shorten_identifier(topic_name(topic_prefix, entity))


def redact(url: str) -> str:
    """``url`` without its user name, password and query (which may hold a password)."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


def url_secrets(url: str) -> list[str]:
    """The passwords in ``url`` (user info or ``?password=``), to scrub from messages."""
    parts = urlsplit(url)
    found = []
    if parts.password:
        found += [parts.password, unquote(parts.password)]
    found += [value for name, value in parse_qsl(parts.query) if name == "password" and value]
    return [s for s in found if s]


def check_url(url: str, setting: str = "ENTITYSYNC_BUS_URL") -> None:
    """Raise :class:`ConfigError` (naming ``setting``, never the password) unless ``url`` is a
    ``postgresql://`` or ``postgres://`` URL that libpq could read."""
    if not isinstance(url, str):
        raise ConfigError(f"{setting} must be a postgresql:// URL, got {type(url).__name__}")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError as exc:
        raise ConfigError(f"{setting} {redact(url)}: {exc}") from None
    if parts.scheme not in ("postgresql", "postgres"):
        raise ConfigError(f"{setting} must be a postgresql:// (or postgres://) URL, got {parts.scheme or 'no'} scheme")


def import_psycopg() -> Any:
    """psycopg, or :class:`ConfigError` naming the extra to install."""
    _check_psycopg_installed()
    import psycopg

    if gevent_active():
        from psycopg import waiting

        if waiting.wait is getattr(waiting, "wait_c", None):
            log.warning("psycopg was imported before gevent patched this process (gunicorn --preload?): "
                        "its waits block the worker. Import psycopg after patching, or set "
                        "PSYCOPG_WAIT_FUNC=wait_poll")
    return psycopg


def _check_psycopg_installed() -> None:
    hint = "pip install 'entitysync_sync[postgres]'"
    if importlib.util.find_spec("psycopg") is None:
        raise ConfigError(f"a postgresql:// URL needs psycopg 3, which is not installed: {hint}")
    try:
        version = tuple(int(part) for part in metadata.version("psycopg").split(".")[:2])
    except (metadata.PackageNotFoundError, ValueError):  # pragma: no cover - a source checkout
        return
    if version < MIN_PSYCOPG:
        raise ConfigError(f"a postgresql:// URL needs psycopg {'.'.join(map(str, MIN_PSYCOPG))} or later, "
                          f"found {metadata.version('psycopg')}: {hint}")


class PostgresBus(BufferedBus):
    """Notifications through PostgreSQL's LISTEN/NOTIFY.

    :param url: a libpq URL, ``postgresql://[user[:password]@]host[:port]/db[?param=value]``;
        query parameters (``sslmode``, ``connect_timeout``...) go to libpq.
    :param health_check_interval: seconds of silence after which the listener
        runs ``SELECT 1``, so a server that stopped answering is noticed.
    """

    kind = "postgres"

    def __init__(self, url: str, *, topic_prefix: str = "", buffer_size: int = 10_000,
                 health_check_interval: float = 5.0, retry_max: float = 5.0) -> None:
        super().__init__(topic_prefix=topic_prefix, buffer_size=buffer_size, retry_max=retry_max)
        check_url(url)
        _check_psycopg_installed()
        self._url = url
        self._secrets = url_secrets(url)
        self.health_check_interval = health_check_interval
        self._psycopg: Any = None
        self._publisher: Any = None
        self._pending: set[str] = set()
        self._pending_lock = threading.Lock()
        self._listener_done = threading.Event()
        self._listener_done.set()
        #: What identifies the database the listener is connected to (its name and the
        #: server's start time), or None while it is not listening.
        self.database_identity: tuple[str, str] | None = None

    @classmethod
    def from_url(cls, url: str, *, topic_prefix: str = "", buffer_size: int = 10_000) -> PostgresBus:
        return cls(url, topic_prefix=topic_prefix, buffer_size=buffer_size)

    @classmethod
    def probe(cls, url: str, topics: list[str], timeout: float) -> dict[str, Any]:
        """Connect and read how full the server's notification queue is."""
        check_url(url)
        psycopg = import_psycopg()
        try:
            with psycopg.connect(url, **_defaults(url, "probe", connect_timeout=max(1, round(timeout)))) as conn:
                usage = conn.execute("SELECT pg_notification_queue_usage()").fetchone()[0]
        except (psycopg.Error, OSError) as exc:
            return {"reachable": False, "detail": f"{redact(url)}: {_scrub(str(exc), url_secrets(url))[:200]}"}
        return {"reachable": True, "detail": f"answered; notification queue {usage:.1%} full"}

    def topic(self, entity: str) -> str:
        return channel_name(self.topic_prefix, entity)

    def describe(self) -> str:
        return f"PostgreSQL at {redact(self._url)}"

    # -- backend hooks ---------------------------------------------------------

    def _open(self, entities: Iterable[str]) -> None:
        assert self._executor is not None
        self._psycopg = import_psycopg()
        self._listener_done.clear()
        self._executor.spawn(self._listen_loop)

    def _subscribe(self, entity: str) -> None:
        with self._pending_lock:
            self._pending.add(entity)  # the listener LISTENs within a second

    def _send(self, batches: dict[str, list[bytes]]) -> None:
        if self._psycopg is None:
            self._psycopg = import_psycopg()
        channels: list[str] = []
        bodies: list[str] = []
        for channel, batch in batches.items():
            for body in batch:
                channels.append(channel)
                bodies.append(self._fit(body).decode())
        try:
            if self._publisher is None:
                self._publisher = self._connect("publish")
            self._publisher.execute(_SEND, (channels, bodies))
        except BaseException as exc:
            self._close_publisher()
            if isinstance(exc, self._psycopg.Error):
                raise ConnectionError(self._scrub(exc)) from None
            raise

    def _shutdown(self) -> None:
        # The listener notices ``closed`` within a second and closes its own connection.
        self._listener_done.wait(2.0)
        self._close_publisher()

    # -- connections -----------------------------------------------------------

    def _connect(self, role: str) -> Any:
        conn = self._psycopg.connect(self._url, autocommit=True, **_defaults(self._url, role))
        return conn

    def _close_publisher(self) -> None:
        publisher, self._publisher = self._publisher, None
        if publisher is not None:
            _close_quietly(publisher)

    def _scrub(self, exc: BaseException) -> str:
        return _scrub(str(exc) or type(exc).__name__, self._secrets)

    def _fit(self, body: bytes) -> bytes:
        """``body``, or a resync of its entity if it is too large for NOTIFY (ids are too short
        for that to happen; should it, the subscribers are refreshed rather than forgotten)."""
        if len(body) < MAX_PAYLOAD_BYTES:
            return body
        entity = p.decode_bus_body(body).entity
        log.error("a %d-byte notification of %s is too large for NOTIFY; resyncing the entity", len(body), entity)
        return p.encode_bus_resync(entity)

    # -- receiving -------------------------------------------------------------

    def _listen_loop(self) -> None:
        try:
            self._listen_until_closed()
        finally:
            self.database_identity = None
            self._listener_done.set()

    def _listen_until_closed(self) -> None:
        psycopg = self._psycopg
        assert self._closing is not None
        failures = 0
        while not self.closed:
            conn = None
            try:
                conn = self._connect("listen")
                with self._pending_lock:
                    self._pending.update(self._entities)
                self._listen_pending(conn, resumed=failures > 0)
                failures = 0
                self._read(conn)
            except (psycopg.Error, OSError) as exc:
                self.database_identity = None
                if self.closed:
                    return
                failures += 1
                self.counters["listen_failures"] += 1
                if failures == 1:
                    log.warning("lost the LISTEN connection to %s (%s); reconnecting",
                                self.describe(), self._scrub(exc))
                self._closing.wait(backoff(failures, self.retry_min, self.retry_max, jitter=True))
            finally:
                if conn is not None:
                    _close_quietly(conn)

    def _listen_pending(self, conn: Any, resumed: bool = False) -> None:
        from psycopg import sql

        with self._pending_lock:
            entities, self._pending = self._pending, set()
        for entity in sorted(entities):
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.topic(entity))))
        if self.database_identity is None:
            name, started = conn.execute(_IDENTITY).fetchone()
            self.database_identity = (name, started)
        if resumed:
            log.info("listening on %s again; resyncing", self.describe())
        for entity in sorted(entities):
            self._connected(entity)

    def _read(self, conn: Any) -> None:
        quiet_since = time.monotonic()
        while not self.closed:
            if self._pending:
                self._listen_pending(conn)
            for notify in conn.notifies(timeout=1.0):
                quiet_since = time.monotonic()
                self._received(notify.payload.encode())
            if time.monotonic() - quiet_since >= self.health_check_interval:
                conn.execute("SELECT 1")  # raises on a connection the server has dropped
                quiet_since = time.monotonic()


def _defaults(url: str, role: str, **overrides: Any) -> dict[str, Any]:
    """The libpq settings of ``role``'s connection that ``url`` does not set itself."""
    present = {name for name, _ in parse_qsl(urlsplit(url).query)}
    settings = {**CONNECTION_DEFAULTS, "application_name": f"entitysync {role} {os.getpid()}",
                "client_encoding": "utf8", **overrides}
    return {name: value for name, value in settings.items() if name not in present or name in overrides}


def _scrub(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def _close_quietly(conn: Any) -> None:
    try:
        conn.close()
    except Exception:  # pragma: no cover - closing a broken connection
        pass
