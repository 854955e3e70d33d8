"""Shared fetches: one fetch per notification per server, one encoded frame for every subscriber.

An entity registered with ``@es.entity(name, shared=True)`` declares that its
rows do not depend on the subscriber's secret. When one of its keys is
delivered, the hub hands it to :class:`Fanout` instead of asking each
subscriber to refresh: the fanout fetches once (with ``secret=None``), builds
the server frames once, encodes each as a websocket frame once, and gives the
same :class:`SharedFrames` to every local subscriber. Each connection writes
those bytes through its own serialised writer, so a slow subscriber still
delays only itself.

Coalescing works per key as it does per connection: notifications that
arrive while a key's fetch is pending or running queue exactly one more, so
the last frames every subscriber gets reflect state read after the last
notification. A new subscriber gets the frames cached since the last
notification, or joins the key's fetch in progress (single flight), so a
thousand clients subscribing to one key after a restart cost one fetch.
"""

from __future__ import annotations

import threading
from typing import Protocol

from . import protocol as p
from .concurrency import Tasks
from .failures import FetchFailures, failure_message
from .frames import EncodedFrame, SharedFrames
from .hub import Hub, Subscriber
from .keys import EntityKey


class SharedHandlers(Protocol):
    """What the fanout needs from the application (implemented by the extension)."""

    def is_shared(self, entity: str) -> bool:
        """Whether ``entity`` was registered with ``shared=True``."""

    def fetch(self, key: EntityKey, secret: object) -> p.FetchResult:
        """The row or rows of ``key`` as JSON texts, or ``None`` when it does not exist."""


class _Flight:
    """One key's fetch in progress: whom its result goes to, and whether another must follow."""

    __slots__ = ("again", "broadcast")

    def __init__(self, broadcast: bool) -> None:
        #: Whether this fetch follows a change: its result goes to every subscriber.
        self.broadcast = broadcast
        #: A change arrived during this fetch: another fetch follows, for every subscriber.
        self.again = False


class Fanout:
    """Runs shared fetches, one at a time per key, caches their frames and hands them to the subscribers.

    The frames of the last fetch of each key stay cached until a
    notification, an entity-wide refresh or a resync of that key, or until
    its last local subscriber leaves, so a subscribe to a cached key is
    answered without a fetch; ``cache_limit`` caps the characters of frame
    text kept (the oldest entries go first).
    """

    def __init__(self, handlers: SharedHandlers, tasks: Tasks, envelope: bool = True,
                 retry_max: float = 0.0, cache_limit: int = 64 << 20) -> None:
        self._handlers = handlers
        self._tasks = tasks
        self._envelope = envelope
        self._failures = FetchFailures(retry_max, tasks)
        self._cache_limit = cache_limit
        self._lock = threading.Lock()
        self._running: dict[EntityKey, _Flight] = {}
        #: New subscribers waiting for the result of the key's next (or current) fetch.
        self._waiters: dict[EntityKey, list[Subscriber]] = {}
        self._cache: dict[EntityKey, SharedFrames] = {}
        self._cache_size = 0
        self._hits = 0

    def handles(self, key: EntityKey) -> bool:
        """Whether ``key`` belongs to a shared entity."""
        return self._handlers.is_shared(key.entity)

    def request(self, key: EntityKey, hub: Hub) -> None:
        """``key`` changed: fetch it once and push it to all its subscribers in ``hub``; only queues work."""
        with self._lock:
            self._uncache(key)
            flight = self._running.get(key)
            if flight is not None:
                flight.again = True
                return
            self._running[key] = _Flight(broadcast=True)
        self._tasks.spawn(self._run, key, hub)

    def subscribe(self, key: EntityKey, conn: Subscriber, hub: Hub) -> None:
        """Push the current frames of ``key`` to a new subscriber: from the cache, or from the
        key's fetch in progress, or from a fetch started now."""
        with self._lock:
            cached = self._cache.get(key)
            if cached is None:
                self._waiters.setdefault(key, []).append(conn)
                start = key not in self._running
                if start:
                    self._running[key] = _Flight(broadcast=False)
            else:
                self._hits += 1
        if cached is not None:
            conn.push_shared(cached)
        elif start:
            self._tasks.spawn(self._run, key, hub)

    def forget(self, key: EntityKey) -> None:
        """The last local subscriber of ``key`` left: drop its cached frames."""
        with self._lock:
            self._uncache(key)

    def _uncache(self, key: EntityKey) -> None:
        dropped = self._cache.pop(key, None)
        if dropped is not None:
            self._cache_size -= dropped.size

    def _store(self, shared: SharedFrames) -> None:
        if shared.size > self._cache_limit:
            return
        self._cache[shared.key] = shared
        self._cache_size += shared.size
        while self._cache_size > self._cache_limit:
            self._uncache(next(iter(self._cache)))

    def stats(self) -> dict[str, int]:
        """``shared_cache_keys``, ``shared_cache_size`` (characters) and ``shared_cache_hits``."""
        with self._lock:
            return {"shared_cache_keys": len(self._cache), "shared_cache_size": self._cache_size,
                    "shared_cache_hits": self._hits}

    def _run(self, key: EntityKey, hub: Hub) -> None:
        try:
            while True:
                shared = self.build(key)
                with self._lock:
                    flight = self._running[key]
                    waiters = self._waiters.pop(key, [])
                    # Subscribers are read after the fetch, so one that subscribed meanwhile gets it too.
                    if shared.error is None and not flight.again and hub.subscribers(key):
                        self._uncache(key)
                        self._store(shared)
                if flight.broadcast:
                    if self._after_fetch(key, hub, shared.error):
                        for conn in hub.subscribers(key):
                            conn.push_shared(shared)
                    elif waiters:  # new subscribers hear of a failure the others heard of already
                        for conn in waiters:
                            conn.push_shared(shared)
                else:
                    self._after_fetch(key, hub, shared.error)
                    for conn in waiters:
                        conn.push_shared(shared)
                with self._lock:
                    if flight.again:
                        self._running[key] = _Flight(broadcast=True)
                    elif self._waiters.get(key):
                        self._running[key] = _Flight(broadcast=False)
                    else:
                        del self._running[key]
                        return
        except BaseException:
            with self._lock:
                self._running.pop(key, None)
                self._waiters.pop(key, None)
            raise

    def _after_fetch(self, key: EntityKey, hub: Hub, error: Exception | None) -> bool:
        """Whether to push the frames: always after a success, after a failure only the first time.

        A failure is retried with backoff until a fetch succeeds or nobody
        subscribes, so clients converge once the database is back.
        """
        if error is None:
            self._failures.forget(key)
            return True
        return self._failures.failed(key, error, lambda key: self._retry(key, hub))

    def _retry(self, key: EntityKey, hub: Hub) -> None:
        if key not in self._failures:
            return
        if hub.subscribers(key):
            self.request(key, hub)
        else:
            self._failures.forget(key)

    def build(self, key: EntityKey) -> SharedFrames:
        """Fetch ``key`` with ``secret=None`` and encode its frames, once."""
        try:
            result = self._handlers.fetch(key, None)
        except Exception as exc:
            texts = p.encode_fetch_failed(key, failure_message(key, exc), self._envelope)
            error: Exception | None = exc
            version = None
        else:
            version = p.result_version(result) if self._envelope else None
            texts, error = p.encode_result(key, result, self._envelope, version), None
        frames = tuple(EncodedFrame.of(text) for text in texts)
        return SharedFrames(key, frames, sum(map(len, texts)), error, version)
