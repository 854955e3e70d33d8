"""Shared fetches: one fetch per notification per server, one encoded frame for every subscriber.

An entity registered with ``@es.entity(name, shared=True)`` declares that its
rows do not depend on the subscriber's secret. When one of its keys is
delivered, the hub hands it to :class:`Fanout` instead of asking each
subscriber to refresh: the fanout fetches once (with ``secret=None``), builds
the server frames once, encodes each as a websocket frame once, and gives the
same :class:`SharedFrames` to every local subscriber. Each connection writes
those bytes through its own serialised writer, so a slow subscriber still
delays only itself.

Each key's refresh waits in the queue of :class:`~entitysync_sync.lanes.Lanes`
with the per-user refreshes, and is fetched there through a run shared with
the refreshes before and after it, so a burst of notifications of many keys
costs one task and one application context per lane, not one per key.

Coalescing works per key: a notification that arrives while the key's
refresh waits in the queue is covered by it (the fetch has not read the
database yet), and notifications that arrive while its fetch runs queue
exactly one more, so the last frames every subscriber gets reflect state
read after the last notification. A new subscriber gets the frames cached
since the last notification, or joins the key's refresh in progress (single
flight), so a thousand clients subscribing to one key after a restart cost
one fetch.
"""

from __future__ import annotations

from typing import Protocol

from . import protocol as p
from .concurrency import Tasks, light_lock
from .failures import FetchFailures, failure_message
from .frames import EncodedFrame, SharedFrames
from .hub import Hub, Subscriber
from .keys import EntityKey
from .lanes import FetchRun, Lanes


class SharedHandlers(Protocol):
    """What the fanout needs from the application (implemented by the extension)."""

    def is_shared(self, entity: str) -> bool:
        """Whether ``entity`` was registered with ``shared=True``."""

    def run(self) -> FetchRun:
        """Fetches made one after another by the caller (see :class:`~entitysync_sync.registry.FetchRun`)."""


class _Flight:
    """One key's refresh, queued or fetching: whom its result goes to, and whether another must follow.

    It is the key's job in the lanes' queue (:class:`~entitysync_sync.lanes.Job`): one unit, the fetch.
    """

    __slots__ = ("again", "broadcast", "fanout", "hub", "key", "started")

    def __init__(self, fanout: Fanout, key: EntityKey, hub: Hub, broadcast: bool) -> None:
        self.fanout = fanout
        self.key = key
        self.hub = hub
        #: Whether this fetch follows a change: its result goes to every subscriber.
        self.broadcast = broadcast
        #: Whether the fetch has begun (set under the fanout's lock); before, a change needs no other fetch.
        self.started = False
        #: A change arrived during this fetch: another fetch follows, for every subscriber.
        self.again = False

    def take(self) -> None:
        """The one unit (the fetch itself)."""

    def exhausted(self) -> bool:
        return True

    def waiting(self) -> int:
        return 1  # asked only while queued, before its one unit is taken

    def one_done(self) -> bool:
        return True

    def work(self, run: FetchRun, unit: None) -> None:
        self.fanout._refresh(run, self)

    def finish(self) -> None:
        self.fanout._next(self)

    def abort(self) -> None:
        self.fanout._abort(self.key)


class Fanout:
    """Runs shared fetches, one at a time per key, caches their frames and hands them to the subscribers.

    The frames of the last fetch of each key stay cached until a
    notification, an entity-wide refresh or a resync of that key, or until
    its last local subscriber leaves, so a subscribe to a cached key is
    answered without a fetch; ``cache_limit`` caps the characters of frame
    text kept (the oldest entries go first). ``lanes`` runs the fetches
    (the runtime's, shared with the cohorts; by default one of its own).
    """

    def __init__(self, handlers: SharedHandlers, tasks: Tasks, envelope: bool = True,
                 retry_max: float = 0.0, cache_limit: int = 64 << 20, lanes: Lanes | None = None) -> None:
        self._handlers = handlers
        self._lanes = lanes if lanes is not None else Lanes(tasks, handlers.run)
        self._envelope = envelope
        self._failures = FetchFailures(retry_max, tasks)
        self._cache_limit = cache_limit
        self._lock = light_lock()
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
                if flight.started:
                    flight.again = True
                else:  # the fetch is still to come: it reads the change, and everyone gets it
                    flight.broadcast = True
                return
            flight = self._running[key] = _Flight(self, key, hub, broadcast=True)
        self._lanes.put(flight)

    def subscribe(self, key: EntityKey, conn: Subscriber, hub: Hub) -> None:
        """Push the current frames of ``key`` to a new subscriber: from the cache, or from the
        key's fetch in progress, or from a fetch started now."""
        flight = None
        with self._lock:
            cached = self._cache.get(key)
            if cached is None:
                self._waiters.setdefault(key, []).append(conn)
                if key not in self._running:
                    flight = self._running[key] = _Flight(self, key, hub, broadcast=False)
            else:
                self._hits += 1
        if cached is not None:
            conn.push_shared(cached)
        elif flight is not None:
            self._lanes.put(flight)

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
        """``shared_cache_keys``, ``shared_cache_size`` (characters), ``shared_cache_hits``
        and ``shared_refreshing`` (shared keys whose refresh is queued or fetching)."""
        with self._lock:
            return {"shared_cache_keys": len(self._cache), "shared_cache_size": self._cache_size,
                    "shared_cache_hits": self._hits, "shared_refreshing": len(self._running)}

    def _refresh(self, run: FetchRun, flight: _Flight) -> None:
        """Fetch the key of ``flight`` (in a lane) and push its frames."""
        key, hub = flight.key, flight.hub
        with self._lock:
            flight.started = True
        shared = self.build(key, run)
        with self._lock:
            waiters = self._waiters.pop(key, [])
            broadcast = flight.broadcast
            # Subscribers are read after the fetch, so one that subscribed meanwhile gets it too;
            # one that subscribes after this read finds the frames cached.
            subscribers = hub.subscribers(key)
            if shared.error is None and not flight.again and subscribers:
                self._uncache(key)
                self._store(shared)
        if broadcast:
            if self._after_fetch(key, hub, shared.error):
                for conn in subscribers:
                    conn.push_shared(shared)
            elif waiters:  # new subscribers hear of a failure the others heard of already
                for conn in waiters:
                    conn.push_shared(shared)
        else:
            self._after_fetch(key, hub, shared.error)
            for conn in waiters:
                conn.push_shared(shared)

    def _next(self, flight: _Flight) -> None:
        """The refresh of ``flight`` is done: queue the key's next one if a change or a subscriber asks for it."""
        key, hub = flight.key, flight.hub
        with self._lock:
            if flight.again:
                flight = self._running[key] = _Flight(self, key, hub, broadcast=True)
            elif self._waiters.get(key):
                flight = self._running[key] = _Flight(self, key, hub, broadcast=False)
            else:
                del self._running[key]
                return
        self._lanes.put(flight)

    def _abort(self, key: EntityKey) -> None:
        """The lane fetching ``key`` was killed (the server is stopping)."""
        with self._lock:
            self._running.pop(key, None)
            self._waiters.pop(key, None)

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

    def build(self, key: EntityKey, run: FetchRun) -> SharedFrames:
        """Fetch ``key`` with ``secret=None`` through ``run`` and encode its frames, once."""
        try:
            result = run.fetch(key, None)
        except Exception as exc:
            texts = p.encode_fetch_failed(key, failure_message(key, exc), self._envelope)
            error: Exception | None = exc
            version = None
        else:
            version = p.result_version(result) if self._envelope else None
            texts, error = p.encode_result(key, result, self._envelope, version), None
        frames = tuple(EncodedFrame.of(text) for text in texts)
        return SharedFrames(key, frames, sum(map(len, texts)), error, version)
