"""The Redis bus, ``redis://host:6379/0`` (or ``rediss://``), on redis-py pub/sub.

One pub/sub channel per entity, named ``ENTITYSYNC_TOPIC_PREFIX`` + entity,
carrying the same JSON bodies as the NSQ bus, so
``redis-cli PUBLISH items '{"entity":"items","id":"1"}'`` triggers a push.
Redis pub/sub keeps nothing for a subscriber that is away; the shared
behaviour of :class:`~entitysync_sync.bus.buffered.BufferedBus` makes up for it
by resyncing after every (re)subscription.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Iterable
from urllib.parse import urlsplit, urlunsplit

from ..backoff import backoff
from ..exceptions import ConfigError
from .buffered import BufferedBus

log = logging.getLogger("entitysync_sync")

_PING = "entitysync"


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


class RedisBus(BufferedBus):
    """Notifications through Redis pub/sub.

    :param url: a redis-py URL, ``redis://[user:password@]host:port/db`` or
        ``rediss://`` for TLS; query options such as ``socket_timeout`` are
        passed to redis-py.
    :param health_check_interval: seconds between the reader's PINGs; a
        connection that answers none for two intervals is replaced.
    """

    kind = "redis"

    def __init__(self, url: str, *, topic_prefix: str = "", buffer_size: int = 10_000,
                 health_check_interval: float = 5.0, retry_max: float = 5.0) -> None:
        super().__init__(topic_prefix=topic_prefix, buffer_size=buffer_size, retry_max=retry_max)
        redis = _import_redis()
        self._redis = redis
        self._url = url
        self.health_check_interval = health_check_interval
        try:
            self._client = redis.Redis.from_url(url, socket_connect_timeout=5, socket_keepalive=True)
        except ValueError as exc:
            raise ConfigError(f"ENTITYSYNC_BUS_URL {redact(url)}: {exc}") from None
        self._pending: set[str] = set()
        self._pending_lock = threading.Lock()
        self._read_failures = 0
        self._reader_done = threading.Event()

    @classmethod
    def from_url(cls, url: str, *, topic_prefix: str = "", buffer_size: int = 10_000) -> RedisBus:
        return cls(url, topic_prefix=topic_prefix, buffer_size=buffer_size)

    @classmethod
    def probe(cls, url: str, topics: list[str], timeout: float) -> dict[str, Any]:
        """PING, and ``PUBSUB NUMSUB``: how many server processes subscribe to each topic."""
        redis = _import_redis()
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
        return f"Redis at {redact(self._url)}"

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
        # A PING every interval, and a connection that answers none of two is dead:
        # a vanished host leaves a half-open socket that would never raise.
        ping_interval = self.health_check_interval
        last_pong = next_ping = time.monotonic()
        while not self.closed:
            if self._pending:
                with self._pending_lock:
                    entities, self._pending = self._pending, set()
                channels = {self.topic(entity).encode(): entity for entity in entities}
                waiting.update(channels)
                pubsub.subscribe(*channels)
            now = time.monotonic()
            if now - last_pong > 2 * ping_interval + 1:
                raise self._redis.ConnectionError(f"no answer to PING for {now - last_pong:.0f}s")
            if now >= next_ping:
                pubsub.ping(_PING)
                next_ping = now + ping_interval
            message = pubsub.get_message(timeout=1.0)
            if message is None:
                continue
            kind = message["type"]
            if kind == "pong":
                last_pong = time.monotonic()
            elif kind == "message":
                self._received(message["data"])
            elif kind == "subscribe":
                entity = waiting.pop(message["channel"], None)
                if entity is None:
                    continue
                if self._read_failures and not waiting:
                    log.info("subscribed to %s again; resyncing", self.describe())
                    self._read_failures = 0
                self._connected(entity)
