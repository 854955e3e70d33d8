"""Counters, gauges and latency histograms of one app in this process.

:meth:`EntitySync.stats() <entitysync_sync.EntitySync.stats>` reads them;
:mod:`entitysync_sync.prometheus` exposes the same figures to Prometheus.
Recording is a few dictionary operations under one lock, so it is cheap
enough for every notification, fetch and push, and safe from any thread or
greenlet.

Notify-to-push latency is measured with :class:`~entitysync_sync.keys.NotifiedKey`:
``notify`` stamps each key with the wall-clock time, the bus carries the
stamp (``"t"`` in the body), and the hub hands the stamped key to every
subscriber's refresh. When that refresh's fetch returns, the time since the
stamp is observed. Refreshes that no notification asked for (on subscribe,
on a secret change, on a resync) carry no stamp and are not sampled. Across
servers the figure includes the difference between their clocks.
"""

from __future__ import annotations

import bisect
import math
import time
from typing import TYPE_CHECKING, Any, Callable, Sequence

from .concurrency import light_lock
from .keys import EntityKey, NotifiedKey

if TYPE_CHECKING:
    from .bus import Bus
    from .hub import Hub

#: Upper bounds, in seconds, of the latency histogram buckets (Prometheus' defaults).
BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)

#: The counters every app has, in the order :meth:`Metrics.snapshot` lists them.
COUNTERS: tuple[str, ...] = (
    "notifications_published",  # keys passed to notify / notify_many in this process
    "notifications_received",   # keys this server received from the bus (its own included)
    "resyncs",                  # resync requests received from the bus (after a reconnect or overflow)
    "fetches",                  # fetch calls
    "fetch_errors",             # fetch calls that raised
    "pushes",                   # push frames produced by fetches, one per fetch that found a row or a set
    "gones",                    # fetches that returned None (a gone frame in the envelope)
)


class Histogram:
    """A fixed-bucket histogram of durations in seconds; not locked itself."""

    __slots__ = ("counts", "max", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.max = 0.0

    def observe(self, seconds: float) -> None:
        """Record one duration; negative ones (clock skew) count as 0."""
        seconds = max(0.0, seconds)
        self.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.sum += seconds
        self.max = max(self.max, seconds)

    def observe_many(self, values: Sequence[float]) -> None:
        """:meth:`observe` each of ``values``."""
        counts, total, top = self.counts, self.sum, self.max
        for seconds in values:
            if seconds < 0.0:
                seconds = 0.0
            counts[bisect.bisect_left(BUCKETS, seconds)] += 1
            total += seconds
            if seconds > top:
                top = seconds
        self.sum, self.max = total, top

    def snapshot(self) -> dict[str, Any]:
        """``count``, ``sum``, ``max``, ``avg`` and cumulative ``buckets`` (upper bound → count)."""
        count = sum(self.counts)
        cumulative: dict[str, int] = {}
        running = 0
        for bound, n in zip((*BUCKETS, math.inf), self.counts, strict=True):
            running += n
            cumulative["+Inf" if bound == math.inf else repr(bound)] = running
        return {"count": count, "sum": self.sum, "max": self.max,
                "avg": self.sum / count if count else 0.0, "buckets": cumulative}


class Metrics:
    """The counters and latency histograms of one app in this process."""

    def __init__(self) -> None:
        self._lock = light_lock()
        self._counters = dict.fromkeys(COUNTERS, 0)
        self._fetch = Histogram()
        self._notify_to_push = Histogram()

    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to the counter ``name`` (one of :data:`COUNTERS`)."""
        with self._lock:
            self._counters[name] += n

    def fetched(self, key: EntityKey, started: float, pushes: int | None) -> None:
        """Record a fetch of ``key`` that began at ``started`` (``time.monotonic()``)
        and made ``pushes`` push frames (one for a row or a set of rows), or ``None`` for gone."""
        tally = FetchTally()
        tally.fetched(key, started, None if pushes is None else "")
        if pushes is not None:
            tally.pushes = pushes
        tally.record(self)

    def fetch_failed(self, started: float) -> None:
        """Record a fetch that raised."""
        tally = FetchTally()
        tally.failed(started)
        tally.record(self)

    def record(self, tally: FetchTally) -> None:
        """Add what ``tally`` counted, under one lock."""
        with self._lock:
            counters = self._counters
            counters["fetches"] += len(tally.seconds)
            counters["fetch_errors"] += tally.errors
            counters["pushes"] += tally.pushes
            counters["gones"] += tally.gones
            self._fetch.observe_many(tally.seconds)
            self._notify_to_push.observe_many(tally.late)

    def snapshot(self) -> dict[str, Any]:
        """Every counter, plus ``fetch_seconds`` and ``notify_to_push_seconds`` histograms."""
        with self._lock:
            return {**self._counters,
                    "fetch_seconds": self._fetch.snapshot(),
                    "notify_to_push_seconds": self._notify_to_push.snapshot()}


class FetchTally:
    """Fetches counted without a lock, then recorded at once.

    A refresh fetches a key for every distinct secret among its subscribers,
    and many keys change at once: :meth:`Metrics.record` takes the metrics'
    lock once for all the fetches of a run. Each fetch is still one sample of
    ``fetch_seconds`` and, for a key a notification asked for, one of
    ``notify_to_push_seconds``, measured when it returned.
    """

    __slots__ = ("errors", "gones", "late", "monotonic", "pushes", "seconds", "wall")

    def __init__(self) -> None:
        #: The duration of each fetch, failed ones included.
        self.seconds: list[float] = []
        #: For each successful fetch of a notified key, the seconds since its notification.
        self.late: list[float] = []
        self.errors = self.pushes = self.gones = 0
        #: Both clocks read once, to turn every monotonic end time into wall-clock time.
        self.wall = self.monotonic = 0.0

    def fetched(self, key: EntityKey, started: float, result: object) -> None:
        """A fetch of ``key`` that began at ``started`` (``time.monotonic()``) returned ``result`` (None: gone)."""
        now = time.monotonic()
        self.seconds.append(now - started)
        if result is None:
            self.gones += 1
        else:
            self.pushes += 1
        if isinstance(key, NotifiedKey):
            self._late(key, now)

    def fetched_batch(self, key: EntityKey, started: float, results: Sequence[object]) -> None:
        """A batch fetch of ``key`` that began at ``started`` returned ``results``: one fetch
        call, one push or gone per result."""
        now = time.monotonic()
        self.seconds.append(now - started)
        gones = sum(1 for result in results if result is None)
        self.gones += gones
        self.pushes += len(results) - gones
        if isinstance(key, NotifiedKey):
            self._late(key, now)

    def _late(self, key: NotifiedKey, now: float) -> None:
        if not self.wall:
            self.wall, self.monotonic = time.time(), time.monotonic()
        self.late.append(self.wall + (now - self.monotonic) - key.notified_at)

    def failed(self, started: float) -> None:
        """A fetch that began at ``started`` raised."""
        self.seconds.append(time.monotonic() - started)
        self.errors += 1

    def record(self, metrics: Metrics) -> None:
        """Add these fetches to ``metrics``, and start counting afresh."""
        if self.seconds:
            metrics.record(self)
            self.seconds, self.late = [], []
            self.errors = self.pushes = self.gones = 0


class MeteredSink:
    """A bus sink that counts what it receives before handing it to the hub.

    ``hub`` is looked up on each call through ``get_hub`` because a forked
    worker replaces its hub.
    """

    def __init__(self, get_hub: Callable[[], Hub], metrics: Metrics) -> None:
        self._get_hub = get_hub
        self._metrics = metrics

    def deliver(self, keys: Sequence[EntityKey]) -> None:
        """Count ``keys`` and ask the hub to refresh their local subscribers."""
        self._metrics.count("notifications_received", len(keys))
        self._get_hub().deliver(keys)

    def resync(self, entity: str | None = None) -> None:
        """Count a resync and ask the hub to refresh every subscribed key (of ``entity``)."""
        self._metrics.count("resyncs")
        self._get_hub().resync(entity)


def collect(hub: Hub, bus: Bus, metrics: Metrics, pg_listener: Bus | None = None) -> dict[str, Any]:
    """The figures of :meth:`EntitySync.stats() <entitysync_sync.EntitySync.stats>`; ``pg_listen``
    holds those of the listener on ``ENTITYSYNC_PG_LISTEN_URL``, if there is one."""
    bus_stats = bus.stats()
    listener = {} if pg_listener is None else {"pg_listen": pg_listener.stats()}
    return {
        "connections": hub.connection_count,
        "subscriptions": hub.subscription_count,
        "keys": hub.key_count,
        **metrics.snapshot(),
        "bus_reconnects": bus_stats.get("reconnects", 0),
        "bus_publish_buffer": bus_stats.get("buffered", 0),
        "bus_dropped": bus_stats.get("dropped", 0),
        "bus_publish_failures": bus_stats.get("publish_failures", 0),
        "bus": bus_stats,
        **listener,
    }
