"""The ``ENTITYSYNC_*`` configuration keys: each defined once, with its default, check and meaning.

:data:`SETTINGS` is the one place a key is defined. :func:`load_settings`
fills in the defaults and checks every value, and the documentation's
configuration page is generated from the same list, so the two never differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, MutableMapping
from urllib.parse import urlsplit

from .exceptions import ConfigError
from .keys import check_topic_prefix

Check = Callable[[Any, str], Any]
"""``check(value, key)`` returns the checked value or raises :class:`ConfigError` naming ``key``.

Its docstring's first line says, for the documentation, what values it accepts.
"""


def _path(value: Any, key: str) -> str:
    """A URL path starting and, by convention, ending with ``/``."""
    if not isinstance(value, str) or not value.startswith("/"):
        raise ConfigError(f"{key} must be a URL path starting with '/', got {value!r}")
    return value


def _bus_url(value: Any, key: str) -> str:
    """A bus URL: ``memory://``, ``redis://...``, ``rediss://...``, ``redis+cluster://...``, ``nsq://...``
    or ``postgresql://...``."""
    if not isinstance(value, str):
        raise ConfigError(f"{key} must be a string such as 'memory://'")
    return value


def _pg_url(value: Any, key: str) -> str | None:
    """``None``, or a ``postgresql://`` (or ``postgres://``) URL."""
    if value is None or value == "":
        return None
    if not isinstance(value, str) or urlsplit(value).scheme not in ("postgresql", "postgres"):
        shown = f"a URL with scheme {urlsplit(value).scheme or '(none)'}" if isinstance(value, str) else repr(value)
        raise ConfigError(f"{key} must be None or a postgresql:// URL, got {shown}")
    try:
        urlsplit(value).port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        raise ConfigError(f"{key} has a port that is not a number") from None
    return value


def _size_or_off(value: Any, key: str) -> int:
    """A number of characters, or ``0`` to turn it off."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{key} must be a number of characters, or 0 to turn it off, got {value!r}")
    return value


def _bool(value: Any, key: str) -> bool:
    """``True`` or ``False``."""
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be True or False, got {value!r}")
    return value


def _positive_int(value: Any, key: str) -> int:
    """A positive integer."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key} must be a positive integer, got {value!r}")
    return value


def _positive_number(value: Any, key: str) -> float:
    """A positive number of seconds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"{key} must be a positive number of seconds, got {value!r}")
    return float(value)


def _seconds_or_off(value: Any, key: str) -> float:
    """A number of seconds, or ``0`` to turn it off."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ConfigError(f"{key} must be a number of seconds, or 0 to turn it off, got {value!r}")
    return float(value)


def _rate(value: Any, key: str) -> float:
    """A number of frames per second, or ``0`` to turn it off."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ConfigError(f"{key} must be a number of frames per second, or 0 to turn it off, got {value!r}")
    return float(value)


def _topic_prefix(value: Any, key: str) -> str:
    """Empty, or up to 64 characters from ``A-Za-z0-9_.-``."""
    return check_topic_prefix(value)


def _origins(value: Any, key: str) -> frozenset[str] | None:
    """``None``, ``"*"``, or a list of origins such as ``["https://app.example.com"]``."""
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple, set, frozenset)) or not all(isinstance(v, str) for v in value):
        raise ConfigError(
            f"{key} must be None (same origin only), '*' or a list of origins such as "
            f"['https://app.example.com'], got {value!r}"
        )
    return frozenset(v.rstrip("/").lower() for v in value)


@dataclass(frozen=True)
class Setting:
    """One configuration key: its default, how its value is checked, and what it means.

    ``doc`` is reStructuredText; the documentation's configuration page shows it as written.
    """

    key: str
    default: Any
    check: Check
    doc: str

    @property
    def field(self) -> str:
        """The :class:`Settings` attribute that holds the checked value."""
        return self.key.removeprefix("ENTITYSYNC_").lower()

    @property
    def accepts(self) -> str:
        """What values the check accepts, in words (the first line of its docstring)."""
        return (self.check.__doc__ or "").strip().splitlines()[0]


#: Every configuration key, in the order the documentation lists them.
SETTINGS: tuple[Setting, ...] = (
    Setting("ENTITYSYNC_PATH", "/ws/entity-sync/", _path, """
        URL of the websocket endpoint. The browser client is served beside it, at
        this path plus ``client.js`` (a plain script), ``client.mjs`` (an ES module)
        and ``client.d.ts`` (its TypeScript declarations)."""),
    Setting("ENTITYSYNC_BUS_URL", "memory://", _bus_url, """
        The bus between servers; see :doc:`/deployment`. ``memory://`` is in-process
        and private to this app (``memory://NAME`` is shared by the apps of one
        process that use the same name) and **reaches only the process it runs in**;
        a warning is logged when gunicorn runs several workers with it.
        ``redis://host:6379/0`` (or ``rediss://``), ``redis+cluster://h1:7000,h2:7001/``
        (a Redis Cluster) and ``nsq://host:4150`` reach
        every worker and server; ``postgresql://user@host:5432/db`` uses the
        database's LISTEN/NOTIFY (see :doc:`/postgresql`). An unsupported scheme
        raises :class:`~entitysync_sync.ConfigError`."""),
    Setting("ENTITYSYNC_PUSH_ON_SUBSCRIBE", True, _bool, """
        Push the current state as soon as a client subscribes (and again after a
        secret change), so clients never wait for the next change."""),
    Setting("ENTITYSYNC_ENVELOPE", True, _bool, """
        Wrap rows in ``push`` and ``gone`` frames and send acks, pongs and error
        frames (see :doc:`/protocol`). ``False`` speaks exactly like the Go
        entity-sync: each row's JSON alone in its frame; no envelope, no acks, no
        error frames, nothing for ``gone``. The browser client needs it on."""),
    Setting("ENTITYSYNC_MAX_SUBSCRIPTIONS", 1000, _positive_int, """
        Subscriptions one connection may hold; more get ``too_many_subscriptions``."""),
    Setting("ENTITYSYNC_MAX_MESSAGE_BYTES", 4096, _positive_int, """
        Largest client frame, in bytes; a larger one closes the connection with 1009."""),
    Setting("ENTITYSYNC_OUTBOX_LIMIT", 1 << 20, _positive_int, """
        Characters of frames one connection may have waiting to be written. The
        frames of one refresh are always queued whole (the next fetch waits until
        they are written); acks and errors that would push the queue past the limit
        mean the client is not reading, and it is closed with 1008."""),
    Setting("ENTITYSYNC_SEND_TIMEOUT", 10.0, _positive_number, """
        Seconds one frame may take to write. A client that stops reading is closed
        with 1008 once a write takes longer."""),
    Setting("ENTITYSYNC_COMPRESSION", False, _bool, """
        Accept permessage-deflate when a client offers it (browsers always do). Off
        by default: deflate costs about 100 KB of memory on every connection; see
        :ref:`compression`."""),
    Setting("ENTITYSYNC_PUBLISH_BUFFER", 10_000, _positive_int, """
        Distinct keys a bus may hold unpublished, e.g. while Redis or nsqd is
        unreachable (and, for ``memory://``, undelivered). Past it, further keys are
        dropped and counted, and once the broker is back every server is asked to
        refresh every subscribed key of the affected entities, so dropped
        notifications cost work, never correctness."""),
    Setting("ENTITYSYNC_TOPIC_PREFIX", "", _topic_prefix, """
        Prefix of every NSQ topic and Redis channel (topic = prefix + entity name),
        so several apps can share one broker. Prefix plus entity name must fit in 64
        characters. Empty keeps the Go entity-sync's topic names."""),
    Setting("ENTITYSYNC_ALLOWED_ORIGINS", None, _origins, """
        Pages of which origins may open the websocket, besides the app's own (same
        host and port as the ``Host`` header): a list such as
        ``["https://app.example.com"]``, or ``"*"`` for any. An upgrade from any
        other ``Origin`` gets HTTP 403; a request without ``Origin`` (not a browser)
        is allowed. See :doc:`/security`."""),
    Setting("ENTITYSYNC_PING_INTERVAL", 25.0, _seconds_or_off, """
        Seconds between the server's websocket pings to every client; a client that
        has not answered the previous ping is closed with 1008 and cleaned up,
        half-open connections included."""),
    Setting("ENTITYSYNC_FETCH_TIMEOUT", 10.0, _seconds_or_off, """
        Seconds a fetch may take. Past it the fetch is abandoned (under gevent it is
        interrupted at its next blocking call; under the threaded dev server it is
        left to finish in its thread) and the subscriber gets ``fetch_failed``
        ("timed out")."""),
    Setting("ENTITYSYNC_FETCH_RETRY_MAX", 30.0, _seconds_or_off, """
        A failed or timed-out fetch is retried after 0.5 s, 1 s, 2 s... up to this
        many seconds apart, until it succeeds or the key is unsubscribed, so clients
        converge once the database is back; the client hears of the first failure
        of a run only. ``0`` turns retries off."""),
    Setting("ENTITYSYNC_RATE_LIMIT", 200.0, _rate, """
        Client frames per second one connection may send on average; a connection
        that goes past it (and its burst) is closed with 1008."""),
    Setting("ENTITYSYNC_RATE_BURST", 2000, _positive_int, """
        Client frames one connection may send at once after a quiet spell, e.g. a
        page subscribing to many rows when it loads."""),
    Setting("ENTITYSYNC_SHARED_CACHE_SIZE", 64 << 20, _size_or_off, """
        Characters of frame text each process keeps of the shared keys its clients
        subscribe to (about twice that in memory: the text and its websocket bytes),
        so a subscribe to a cached key is answered without a fetch. Past it the
        oldest entries are dropped, and those keys are fetched again on the next
        subscribe. ``0`` turns the cache off (overlapping refreshes of one key still
        share one fetch)."""),
    Setting("ENTITYSYNC_BATCH_SIZE", 500, _positive_int, """
        Most secrets one call of a ``batch=True`` fetch is given; more make several
        calls."""),
    Setting("ENTITYSYNC_DRAIN_SECONDS", 10.0, _seconds_or_off, """
        When a gunicorn worker is told to stop, its websockets are closed with 1012
        (service restart) spread over this many seconds, so its clients do not all
        come back in the same second; under gunicorn it is cut to end a second
        before ``--graceful-timeout``. ``0`` closes them all at once."""),
    Setting("ENTITYSYNC_PG_LISTEN_URL", None, _pg_url, """
        A ``postgresql://`` URL whose notifications (from the triggers of
        :func:`entitysync_sync.postgres.trigger_sql`) every server also receives,
        besides a Redis or NSQ bus; see :doc:`/postgresql`. Unset with a
        ``postgresql://`` bus, which listens on its own database already."""),
)

#: Every configuration key with its default.
DEFAULTS: dict[str, Any] = {setting.key: setting.default for setting in SETTINGS}


@dataclass(frozen=True)
class Settings:
    """The checked configuration of one app: one attribute per key of :data:`SETTINGS`."""

    path: str
    bus_url: str
    push_on_subscribe: bool
    envelope: bool
    max_subscriptions: int
    max_message_bytes: int
    outbox_limit: int
    send_timeout: float
    compression: bool
    publish_buffer: int
    topic_prefix: str
    allowed_origins: frozenset[str] | None
    ping_interval: float
    fetch_timeout: float
    fetch_retry_max: float
    rate_limit: float
    rate_burst: int
    shared_cache_size: int
    batch_size: int
    drain_seconds: float
    pg_listen_url: str | None = None


def load_settings(config: MutableMapping[str, Any]) -> Settings:
    """Fill in defaults with ``config.setdefault`` and check every value."""
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        config.setdefault(setting.key, setting.default)
        values[setting.field] = setting.check(config[setting.key], setting.key)
    listen, bus = values["pg_listen_url"], values["bus_url"]
    if listen is not None and urlsplit(bus).scheme in ("postgresql", "postgres"):
        if listen != bus:
            raise ConfigError("ENTITYSYNC_PG_LISTEN_URL is for a bus that is not PostgreSQL; the postgresql:// "
                              "bus already listens on its own database (leave it unset)")
        values["pg_listen_url"] = None
    return Settings(**values)
