"""The Redis bus, ``redis://host:6379/0`` (or ``rediss://``), on redis-py pub/sub.

One pub/sub channel per entity, named ``ENTITYSYNC_TOPIC_PREFIX`` + entity,
carrying the same JSON bodies as the NSQ bus, so
``redis-cli PUBLISH items '{"entity":"items","id":"1"}'`` triggers a push.
Redis pub/sub keeps nothing for a subscriber that is away; the shared
behaviour of :class:`~entitysync_sync.bus.buffered.BufferedBus` makes up for it
by resyncing after every (re)subscription.

With ``?routing=key`` each key also has a channel of its own, entity channel
+ ``:`` + id (``items:100``). Publishers send each key there only, and a
server subscribes to the key channels its clients hold (the hub tells it,
through :class:`~entitysync_sync.bus.base.KeyInterest`), so a server receives
only the notifications it has subscribers for. It still subscribes to the
entity channels, for resync requests and for keys published there by others.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from typing import Any, Container, Iterable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ..backoff import backoff
from ..exceptions import ConfigError
from ..keys import EntityKey
from .base import KeyInterest
from .buffered import BufferedBus

log = logging.getLogger("entitysync_sync")

_PING = "entitysync"

#: The values of ``?routing=``.
ROUTINGS = ("entity", "key")
#: Channels named in one SUBSCRIBE or UNSUBSCRIBE command.
BATCH = 1000
#: Seconds between two rounds of key channel (un)subscriptions, each one batch per command.
KEY_BATCH_INTERVAL = 0.1
#: Default seconds between the reader's PINGs; a connection that answers none for
#: ``2 * interval + 1`` seconds is replaced (3 s by default).
HEALTH_CHECK_INTERVAL = 1.0
#: Default longest pause, in seconds, between two reconnection or publishing attempts.
MAX_BACKOFF = 2.0
#: redis-py options the bus sets unless the URL's query sets them: seconds to connect, and
#: seconds a command (a publish) may wait for Redis's answer before its connection is
#: dropped, so that a broker gone silent (no FIN, no RST) never holds the publisher up
#: for longer than that.
SOCKET_DEFAULTS = {"socket_connect_timeout": 2.0, "socket_timeout": 3.0}


def _import_redis() -> Any:
    try:
        import redis
    except ImportError:
        raise ConfigError(
            "ENTITYSYNC_BUS_URL names a Redis bus but redis-py is not installed: "
            "pip install 'entitysync_sync[redis]'"
        ) from None
    return redis


def redact(url: str) -> str:
    """``url`` without its user name and password, for logs and errors."""
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def split_options(url: str) -> tuple[str, dict[str, str]]:
    """``url`` without this bus's own query options, and those options.

    The rest of the query (``socket_timeout=...``) stays for redis-py.
    """
    parts = urlsplit(url)
    ours: dict[str, str] = {}
    theirs: list[tuple[str, str]] = []
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name in _OPTIONS:
            ours[name] = value
        else:
            theirs.append((name, value))
    return urlunsplit(parts._replace(query=urlencode(theirs))), ours


_OPTIONS = ("routing", "unsubscribe_delay", "health_check_interval", "max_backoff")


class RedisBus(BufferedBus):
    """Notifications through Redis pub/sub.

    :param url: a redis-py URL, ``redis://[user:password@]host:port/db`` or
        ``rediss://`` for TLS; query options such as ``socket_timeout`` are
        passed to redis-py.
    :param health_check_interval: seconds between the reader's PINGs; a
        connection from which nothing (no message, no PONG) can be read for
        two intervals and a second is replaced; ``?health_check_interval=`` in
        the URL.
    :param retry_max: the longest pause, in seconds, between two reconnection
        or publishing attempts; ``?max_backoff=`` in the URL.
    :param routing: ``"entity"`` (every server receives every key of its
        entities) or ``"key"`` (a server receives only the keys its clients
        hold); ``?routing=`` in the URL.
    :param unsubscribe_delay: with key routing, seconds a key channel stays
        subscribed after its last local subscriber left, so a client that
        comes back (a page reload) costs Redis no SUBSCRIBE;
        ``?unsubscribe_delay=`` in the URL.
    """

    kind = "redis"

    def __init__(self, url: str, *, topic_prefix: str = "", buffer_size: int = 10_000,
                 health_check_interval: float = HEALTH_CHECK_INTERVAL, retry_max: float = MAX_BACKOFF,
                 routing: str = "entity", unsubscribe_delay: float = 5.0) -> None:
        super().__init__(topic_prefix=topic_prefix, buffer_size=buffer_size, retry_max=retry_max)
        if routing not in ROUTINGS:
            raise ConfigError(f"ENTITYSYNC_BUS_URL {redact(url)}: routing must be one of "
                              f"{', '.join(ROUTINGS)}, got {routing[:32]!r}")
        if not isinstance(unsubscribe_delay, (int, float)) or not 0 <= unsubscribe_delay <= 3600:
            raise ConfigError(f"ENTITYSYNC_BUS_URL {redact(url)}: unsubscribe_delay must be "
                              "0 to 3600 seconds")
        for name, value in (("health_check_interval", health_check_interval), ("max_backoff", retry_max)):
            if not isinstance(value, (int, float)) or not 0 < value <= 3600:
                raise ConfigError(f"ENTITYSYNC_BUS_URL {redact(url)}: {name} must be more than 0 and "
                                  "at most 3600 seconds")
        redis = _import_redis()
        self._redis = redis
        self._url = url
        self.routing = routing
        self.unsubscribe_delay = float(unsubscribe_delay)
        self.health_check_interval = health_check_interval
        self._client = self._make_client(url)
        self._pending: set[str] = set()
        self._pending_lock = threading.Lock()
        self._read_failures = 0
        self._reader_done = threading.Event()
        # Key routing: the key channels wanted here (channel -> key), those whose last
        # subscriber left (channel -> when to drop it, oldest first), and those that
        # changed since the reader last looked. All under _pending_lock.
        self._wanted: dict[bytes, EntityKey] = {}
        self._leaving: OrderedDict[bytes, float] = OrderedDict()
        self._changed: set[bytes] = set()

    def _make_client(self, url: str) -> Any:
        """The redis-py client that publishes; :class:`ConfigError` if ``url`` is malformed."""
        try:
            # Options in the URL's query take precedence over these (redis-py applies them last).
            return self._redis.Redis.from_url(url, socket_keepalive=True, **SOCKET_DEFAULTS)
        except ValueError as exc:
            raise ConfigError(f"ENTITYSYNC_BUS_URL {redact(url)}: {exc}") from None

    #: The routing of a bus whose URL names none.
    default_routing = "entity"

    @classmethod
    def from_url(cls, url: str, *, topic_prefix: str = "", buffer_size: int = 10_000) -> RedisBus:
        rest, options = split_options(url)
        routing = options.get("routing", cls.default_routing)

        def seconds(name: str, default: float) -> float:
            text = options.get(name)
            if text is None:
                return default
            try:
                return float(text)
            except ValueError:
                raise ConfigError(f"ENTITYSYNC_BUS_URL {redact(url)}: {name} must be a "
                                  f"number of seconds, got {text[:32]!r}") from None

        return cls(rest, topic_prefix=topic_prefix, buffer_size=buffer_size, routing=routing,
                   unsubscribe_delay=seconds("unsubscribe_delay", 5.0),
                   health_check_interval=seconds("health_check_interval", HEALTH_CHECK_INTERVAL),
                   retry_max=seconds("max_backoff", MAX_BACKOFF))

    @classmethod
    def probe(cls, url: str, topics: list[str], timeout: float) -> dict[str, Any]:
        """PING, and ``PUBSUB NUMSUB``: how many server processes subscribe to each topic."""
        redis = _import_redis()
        url = split_options(url)[0]
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        try:
            client.ping()
            counts = dict(client.pubsub_numsub(*topics)) if topics else {}
        except (redis.RedisError, OSError) as exc:
            return {"reachable": False, "detail": f"{redact(url)}: {str(exc)[:200]}"}
        finally:
            client.close()
        subscribers = {(t.decode() if isinstance(t, bytes) else t): int(n) for t, n in counts.items()}
        return {"reachable": True, "detail": "PING answered", "subscribers": subscribers}

    def describe(self) -> str:
        return f"Redis at {redact(self._url)}" + (" (key routing)" if self.routing == "key" else "")

    # -- key routing -----------------------------------------------------------

    @property
    def key_interest(self) -> KeyInterest | None:
        return self if self.routing == "key" else None

    def key_channel(self, key: EntityKey) -> str:
        """The channel of ``key`` under key routing: its entity's channel, ``:``, its id."""
        return f"{self.topic(key.entity)}:{key.id}"

    def watch(self, key: EntityKey) -> None:
        channel = self.key_channel(key).encode()
        with self._pending_lock:
            if self._leaving.pop(channel, None) is None and channel not in self._wanted:
                self._wanted[channel] = key
                self._changed.add(channel)

    def unwatch(self, key: EntityKey) -> None:
        channel = self.key_channel(key).encode()
        with self._pending_lock:
            if channel in self._wanted:
                self._leaving[channel] = time.monotonic() + self.unsubscribe_delay

    def _route(self, key: EntityKey) -> str:
        return self.key_channel(key) if self.routing == "key" else self.topic(key.entity)

    def _key_changes(self, subscribed: Container[bytes]) -> tuple[list[bytes], list[bytes]]:
        """The key channels to subscribe and to unsubscribe now, given those ``subscribed``
        (looked up under the lock)."""
        now = time.monotonic()
        with self._pending_lock:
            while self._leaving:
                channel, when = next(iter(self._leaving.items()))
                if when > now:
                    break
                del self._leaving[channel]
                del self._wanted[channel]
                self._changed.add(channel)
            changed, self._changed = self._changed, set()
            wanted = self._wanted
            add = [c for c in changed if c in wanted and c not in subscribed]
            drop = [c for c in changed if c not in wanted and c in subscribed]
        return add, drop

    def _confirmed_key(self, channel: bytes) -> None:
        """A key channel's SUBSCRIBE is confirmed: refresh the key, in case it changed meanwhile."""
        with self._pending_lock:
            key = self._wanted.get(channel)
        if key is not None and self._sink is not None and not self.closed:
            self.counters["key_subscribes"] += 1
            self._sink.deliver([key])

    def stats(self) -> dict[str, int]:
        stats = super().stats()
        if self.routing == "key":
            stats["key_channels"] = len(self._wanted)
        return stats

    # -- backend hooks ---------------------------------------------------------

    def _open(self, entities: Iterable[str]) -> None:
        assert self._executor is not None
        self._executor.spawn(self._read_loop)

    def _subscribe(self, entity: str) -> None:
        with self._pending_lock:
            self._pending.add(entity)  # the reader subscribes within a second

    def _send(self, batches: dict[str, list[bytes]]) -> None:
        pipe = self._client.pipeline(transaction=False)
        for topic, bodies in batches.items():
            for body in bodies:
                pipe.publish(topic, body)
        pipe.execute()

    def _shutdown(self) -> None:
        # The reader notices ``closed`` within a second and closes its own connection.
        if self._receiving:
            self._reader_done.wait(2.0)
        self._client.close()

    # -- receiving -------------------------------------------------------------

    def _read_loop(self) -> None:
        try:
            self._read_until_closed()
        finally:
            self._reader_done.set()

    def _read_until_closed(self) -> None:
        errors = (self._redis.RedisError, OSError)
        assert self._closing is not None
        while not self.closed:
            pubsub = self._client.pubsub()
            try:
                with self._pending_lock:
                    self._pending.update(self._entities)
                    self._changed.update(self._wanted)
                self._read(pubsub)
            except errors as exc:
                self._read_failures += 1
                if self._read_failures == 1:
                    log.warning("lost the subscription to %s (%s); reconnecting", self.describe(), exc)
                self._closing.wait(backoff(self._read_failures, self.retry_min, self.retry_max,
                                                    jitter=True))
            finally:
                try:
                    pubsub.close()
                except errors:  # pragma: no cover - closing a broken connection
                    pass

    def _read(self, pubsub: Any) -> None:
        waiting: dict[bytes, str] = {}  # channel -> entity, until Redis confirms the subscription
        # A PING every interval, and a connection from which nothing at all (no message, no
        # PONG) can be read for two intervals and a second after a PING is dead: a vanished
        # host leaves a half-open socket that would never raise. Anything read answers, and
        # only a read that finds nothing counts against the connection, so a backlog of
        # messages ahead of the PONG, or this process stalled (by a long pause or a starved
        # CPU, sending no PING meanwhile), is no death.
        ping_interval = self.health_check_interval
        next_ping = time.monotonic()
        unanswered: float | None = None  # when the first PING not followed by anything was sent
        by_key = self.routing == "key"
        subscribed: set[bytes] = set()  # key channels subscribed on this connection
        # With key routing the reader looks for changed keys at most 10 times a second, so a
        # client's subscription reaches Redis within about 0.1 s, batched with its neighbours'.
        poll = KEY_BATCH_INTERVAL if by_key else 1.0
        next_changes = 0.0
        while not self.closed:
            if self._pending:
                with self._pending_lock:
                    entities, self._pending = self._pending, set()
                channels = {self.topic(entity).encode(): entity for entity in entities}
                waiting.update(channels)
                pubsub.subscribe(*channels)
            if by_key and (self._changed or self._leaving) and time.monotonic() >= next_changes:
                next_changes = time.monotonic() + KEY_BATCH_INTERVAL
                add, drop = self._key_changes(subscribed)
                for first in range(0, len(add), BATCH):
                    pubsub.subscribe(*add[first:first + BATCH])
                    self.counters["key_subscribe_commands"] += 1
                for first in range(0, len(drop), BATCH):
                    pubsub.unsubscribe(*drop[first:first + BATCH])
                    self.counters["key_unsubscribe_commands"] += 1
                subscribed.update(add)
                subscribed.difference_update(drop)
            now = time.monotonic()
            if now >= next_ping:
                pubsub.ping(_PING)
                next_ping = now + ping_interval
                if unanswered is None:
                    unanswered = now
            message = pubsub.get_message(timeout=poll)
            if message is None:
                if unanswered is None or time.monotonic() - unanswered <= 2 * ping_interval + 1:
                    continue
                # Past the deadline; but a process that was stalled may have been woken by its
                # timeout before its socket's data: look once more, without waiting.
                message = pubsub.get_message(timeout=0)
                if message is None:
                    raise self._redis.ConnectionError(
                        f"nothing received, not even a PONG, for {time.monotonic() - unanswered:.0f}s after a PING")
            unanswered = None
            kind = message["type"]
            if kind == "message":
                # A key channel names its key (looked up without the lock: one dict lookup is
                # atomic, and a body whose channel is no longer known is simply parsed).
                self._received_on(message["data"], self._wanted.get(message["channel"]) if by_key else None)
            elif kind == "subscribe":
                entity = waiting.pop(message["channel"], None)
                if entity is None:
                    if message["channel"] in subscribed:
                        self._confirmed_key(message["channel"])
                    continue
                if self._read_failures and not waiting:
                    log.info("subscribed to %s again; resyncing", self.describe())
                    self._read_failures = 0
                self._connected(entity)
