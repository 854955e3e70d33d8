"""The subscription map of one server: which local connections want which keys.

The hub is the bus's sink. A key received from the bus is looked up here and
each local subscriber is asked to refresh it; that only queues work on the
connection, so delivering a key costs one dictionary lookup plus one queue
operation per subscriber, however slow their fetches or sockets are.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Iterable, Sequence

from .keys import EntityKey

if TYPE_CHECKING:
    from .connection import Connection
    from .shared import Fanout


class Hub:
    """Local connections and the key → connections map, safe across threads."""

    #: Where keys of shared entities go instead of each subscriber's refresh (set by the extension).
    fanout: Fanout | None = None

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._connections: set[Connection] = set()
        self._subscribers: dict[EntityKey, set[Connection]] = {}
        #: Rounds of pings sent so far.
        self.heartbeats = 0

    # -- membership ------------------------------------------------------------

    def add(self, conn: Connection) -> None:
        """Track a new connection."""
        with self._lock:
            self._connections.add(conn)

    def remove(self, conn: Connection, keys: Iterable[EntityKey]) -> None:
        """Forget a closed connection and its subscriptions to ``keys``."""
        with self._lock:
            self._connections.discard(conn)
            for key in keys:
                self._discard(conn, key)

    def subscribe(self, conn: Connection, key: EntityKey) -> None:
        """Route future notifications of ``key`` to ``conn``."""
        with self._lock:
            if conn in self._connections:
                self._subscribers.setdefault(key, set()).add(conn)

    def unsubscribe(self, conn: Connection, key: EntityKey) -> None:
        """Stop routing ``key`` to ``conn``."""
        with self._lock:
            self._discard(conn, key)

    def _discard(self, conn: Connection, key: EntityKey) -> None:
        conns = self._subscribers.get(key)
        if conns is not None:
            conns.discard(conn)
            if not conns:
                del self._subscribers[key]

    # -- the bus sink ----------------------------------------------------------

    def deliver(self, keys: Sequence[EntityKey]) -> None:
        """Ask every local subscriber of each key to refresh it."""
        for key in keys:
            if self.fanout is not None and key in self._subscribers and self.fanout.handles(key):
                self.fanout.request(key, self)
                continue
            with self._lock:
                conns = tuple(self._subscribers.get(key, ()))
            for conn in conns:
                conn.request_refresh(key)

    def subscribers(self, key: EntityKey) -> tuple[Connection, ...]:
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

    def close_all(self, code: int, reason: str) -> None:
        """Close every local connection, e.g. when the worker shuts down."""
        with self._lock:
            conns = tuple(self._connections)
        for conn in conns:
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
