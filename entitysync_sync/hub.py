"""The subscription map of one server: which local connections want which keys.

The hub is the bus's sink. A key received from the bus is looked up here and
handed to the fan-out (a shared entity: one fetch for everyone) or to the
cohorts (a per-user entity: one fetch per distinct secret), or, without
those, each local subscriber is asked to refresh it. All of these only queue
work, so delivering a key costs a dictionary lookup and a queue operation,
however slow the fetches or sockets are.
"""

from __future__ import annotations

import time
from typing import Any, Iterable, Protocol, Sequence

from .concurrency import Tasks, light_lock
from .frames import SharedFrames
from .keys import EntityKey


class Subscriber(Protocol):
    """One local client, as the hub sees it (implemented by :class:`~entitysync_sync.connection.Connection`)."""

    def request_refresh(self, key: EntityKey) -> None:
        """Schedule a fetch and push of ``key``; only queues work."""

    def push_shared(self, shared: SharedFrames, generation: int | None = None) -> None:
        """Send the frames of a shared fetch; only queues work on a busy connection."""

    def cohort_member(self) -> tuple[Any, int] | None:
        """The secret and its generation, for grouping with equal secrets; None once closed."""

    def push_cohort(self, shared: SharedFrames, generation: int) -> None:
        """Send frames fetched with this subscriber's secret of ``generation``, unless it changed since."""

    def cohort_failed(self, key: EntityKey, exc: Exception, generation: int) -> None:
        """A fetch of ``key`` with this subscriber's secret failed (logged already): tell it and retry."""

    def heartbeat(self) -> None:
        """Ping the client, closing it if it never answered the last ping."""

    def check_send_timeout(self, now: float, timeout: float) -> None:
        """Close the client if its current write started over ``timeout`` seconds ago."""

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Close the connection."""


class CohortFetches(Protocol):
    """Where changed keys of per-user entities go, to be fetched once per distinct secret
    (implemented by :class:`~entitysync_sync.cohorts.Cohorts`)."""

    def request(self, key: EntityKey, hub: Hub) -> None:
        """``key`` changed: refresh it for its subscribers in ``hub``; only queues work."""


class SharedFetches(Protocol):
    """Where keys of shared entities go instead of each subscriber's refresh
    (implemented by :class:`~entitysync_sync.fanout.Fanout`)."""

    def handles(self, key: EntityKey) -> bool:
        """Whether ``key`` belongs to a shared entity."""

    def request(self, key: EntityKey, hub: Hub) -> None:
        """``key`` changed: fetch it once and push it to its subscribers in ``hub``; only queues work."""

    def subscribe(self, key: EntityKey, conn: Subscriber, hub: Hub) -> None:
        """Push the current frames of ``key`` to a new subscriber, fetching them only if not cached."""

    def forget(self, key: EntityKey) -> None:
        """``key`` has no local subscriber left: drop what is cached of it."""


class Interest(Protocol):
    """Told which keys this server's clients hold, so a bus can receive only those
    (implemented by a bus with key routing, e.g. :class:`~entitysync_sync.bus.redis.RedisBus`).

    Called under the hub's lock, in the order subscriptions come and go, so
    both methods must only record the change and return at once.
    """

    def watch(self, key: EntityKey) -> None:
        """``key`` gained its first local subscriber."""

    def unwatch(self, key: EntityKey) -> None:
        """``key`` lost its last local subscriber."""


class Hub:
    """Local connections and the key → connections map, safe across threads.

    :param tasks: where the connections run their background work.
    :param fanout: where keys of shared entities go, if any are registered.
    :param cohorts: where keys of per-user entities go; without it each subscriber refreshes alone.
    :param interest: told when a key gains its first local subscriber and
        loses its last, so the bus can receive only the keys held here.
    """

    def __init__(self, tasks: Tasks | None = None, fanout: SharedFetches | None = None,
                 cohorts: CohortFetches | None = None, interest: Interest | None = None) -> None:
        self.tasks = tasks if tasks is not None else Tasks("entitysync-hub")
        self.fanout = fanout
        self.cohorts = cohorts
        self.interest = interest
        self._lock = light_lock()
        self._connections: set[Subscriber] = set()
        self._subscribers: dict[EntityKey, set[Subscriber]] = {}
        #: Rounds of pings sent so far.
        self.heartbeats = 0

    # -- membership ------------------------------------------------------------

    def add(self, conn: Subscriber) -> None:
        """Track a new connection."""
        with self._lock:
            self._connections.add(conn)

    def remove(self, conn: Subscriber, keys: Iterable[EntityKey]) -> None:
        """Forget a closed connection and its subscriptions to ``keys``."""
        with self._lock:
            self._connections.discard(conn)
            left = [key for key in keys if self._discard(conn, key)]
        self._forget(left)

    def subscribe(self, conn: Subscriber, key: EntityKey) -> None:
        """Route future notifications of ``key`` to ``conn``."""
        with self._lock:
            if conn in self._connections:
                conns = self._subscribers.get(key)
                if conns is None:
                    conns = self._subscribers[key] = set()
                    if self.interest is not None:
                        self.interest.watch(key)
                conns.add(conn)

    def unsubscribe(self, conn: Subscriber, key: EntityKey) -> None:
        """Stop routing ``key`` to ``conn``."""
        with self._lock:
            left = self._discard(conn, key)
        if left:
            self._forget((key,))

    def _discard(self, conn: Subscriber, key: EntityKey) -> bool:
        """Drop one subscription; True if it was the key's last."""
        conns = self._subscribers.get(key)
        if conns is not None:
            conns.discard(conn)
            if not conns:
                del self._subscribers[key]
                if self.interest is not None:
                    self.interest.unwatch(key)
                return True
        return False

    def _forget(self, keys: Iterable[EntityKey]) -> None:
        fanout = self.fanout
        if fanout is not None:
            for key in keys:
                fanout.forget(key)

    # -- the bus sink ----------------------------------------------------------

    def deliver(self, keys: Sequence[EntityKey]) -> None:
        """Refresh each key for its local subscribers (through the fan-out or the cohorts)."""
        fanout, cohorts = self.fanout, self.cohorts
        for key in keys:
            if key in self._subscribers:
                if fanout is not None and fanout.handles(key):
                    fanout.request(key, self)
                    continue
                if cohorts is not None:
                    cohorts.request(key, self)
                    continue
            with self._lock:
                conns = tuple(self._subscribers.get(key, ()))
            for conn in conns:
                conn.request_refresh(key)

    def subscribers(self, key: EntityKey) -> tuple[Subscriber, ...]:
        """The local connections subscribed to ``key`` right now."""
        with self._lock:
            return tuple(self._subscribers.get(key, ()))

    def resync(self, entity: str | None = None) -> None:
        """Refresh every key that has a local subscriber, or every such key of ``entity``."""
        with self._lock:
            keys = [key for key in self._subscribers if entity is None or key.entity == entity]
        self.deliver(keys)

    # -- housekeeping ----------------------------------------------------------

    def sweep(self, send_timeout: float) -> None:
        """Close connections whose current write has taken over ``send_timeout`` seconds."""
        now = time.monotonic()
        with self._lock:
            conns = tuple(self._connections)
        for conn in conns:
            conn.check_send_timeout(now, send_timeout)

    def heartbeat(self) -> None:
        """Ping every connection; those that never answered the last ping are closed."""
        with self._lock:
            conns = tuple(self._connections)
            self.heartbeats += 1
        for conn in conns:
            conn.heartbeat()

    def close_all(self, code: int, reason: str, over: float = 0.0) -> None:
        """Close every local connection, e.g. when the worker shuts down.

        With ``over`` (seconds) the closes are spread evenly over that time,
        the first at once, so that their clients do not all reconnect
        elsewhere in the same second; the rest go at once if the hub's tasks
        are closed meanwhile.
        """
        with self._lock:
            conns = tuple(self._connections)
        step = over / len(conns) if conns else 0.0
        start = time.monotonic()
        for i, conn in enumerate(conns):
            delay = start + i * step - time.monotonic()
            if delay > 0.01 and self.tasks.wait(delay):
                step = 0.0
            conn.close(code, reason)

    @property
    def connection_count(self) -> int:
        """Open local connections."""
        return len(self._connections)

    @property
    def subscription_count(self) -> int:
        """(connection, key) subscriptions held here."""
        with self._lock:
            return sum(len(conns) for conns in self._subscribers.values())

    @property
    def key_count(self) -> int:
        """Distinct keys with at least one local subscriber."""
        return len(self._subscribers)
