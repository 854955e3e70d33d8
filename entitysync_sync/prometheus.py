"""Prometheus metrics: the figures of ``es.stats()``, read when Prometheus scrapes.

::

    from prometheus_client import make_wsgi_app
    from entitysync_sync.prometheus import register

    register(es)                   # into prometheus_client's default REGISTRY
    app.wsgi_app = DispatcherMiddleware(app.wsgi_app, {"/metrics": make_wsgi_app()})

A collector rather than counters updated on every event: nothing is recorded
twice, and a scrape costs one ``es.stats()`` per app. Each process exposes its
own figures with an ``app`` label (the Flask app's name); under several
gunicorn workers, scrape each worker (prometheus_client's multiprocess mode
does not run custom collectors). Needs ``pip install 'entitysync_sync[prometheus]'``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Iterator

from .exceptions import ConfigError
from .metrics import BUCKETS

if TYPE_CHECKING:
    from .extension import EntitySync

try:
    from prometheus_client.core import (
        REGISTRY,
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )
except ImportError:  # pragma: no cover - exercised by the error below
    REGISTRY = None  # type: ignore[assignment]

#: (stats key, metric name without ``entitysync_``, help) of the gauges.
GAUGES = (
    ("connections", "connections", "Open websocket connections in this process."),
    ("subscriptions", "subscriptions", "(connection, key) subscriptions in this process."),
    ("keys", "subscribed_keys", "Distinct keys with at least one subscriber in this process."),
    ("bus_publish_buffer", "bus_publish_buffer", "Keys waiting to be published to the bus."),
    ("shared_cache_keys", "shared_cache_keys", "Shared keys whose frames are cached."),
    ("shared_cache_size", "shared_cache_size", "Characters of frame text held by the shared cache."),
    ("cohort_queue", "cohort_queue", "Per-user fetches (of a group of subscribers or a batch chunk) waiting to run."),
    ("shared_refreshing", "shared_refreshing", "Shared keys whose refresh is queued or fetching."),
    ("draining", "draining", "1 while this worker closes its websockets to shut down, else 0."),
)
#: The counters, named as above; Prometheus adds ``_total``.
COUNTERS = (
    ("notifications_published", "notifications_published", "Keys notified in this process."),
    ("notifications_received", "notifications_received", "Keys this process received from the bus."),
    ("resyncs", "resyncs", "Refreshes of every subscribed key (of one entity) after a reconnect or overflow."),
    ("fetches", "fetches", "Fetch calls."),
    ("fetch_errors", "fetch_errors", "Fetch calls that raised."),
    ("pushes", "pushes", "Push frames produced by fetches, one per row."),
    ("gones", "gones", "Fetches that found no row."),
    ("bus_reconnects", "bus_reconnects", "Reconnections of the bus's receiving side."),
    ("bus_dropped", "bus_dropped", "Keys dropped because the publish buffer was full."),
    ("bus_publish_failures", "bus_publish_failures", "Failed attempts to publish to the broker."),
    ("shared_cache_hits", "shared_cache_hits", "Subscribes to a shared key answered from the cache, without a fetch."),
    ("cohort_rounds", "cohort_rounds", "Refreshes of changed per-user keys for their subscribers (coalesced)."),
)
#: The bus's own figures (``stats()["bus"]``, and ``["pg_listen"]``) that are gauges; the rest are counters.
BUS_GAUGES = frozenset({"buffered", "key_channels"})
HISTOGRAMS = (
    ("fetch_seconds", "fetch_seconds", "Duration of fetch calls."),
    ("notify_to_push_seconds", "notify_to_push_seconds",
     "From notify() to a subscriber's fetched frames being queued (includes clock skew across servers)."),
)


class EntitySyncCollector:
    """A prometheus_client collector of every app ``es`` is registered on in this process."""

    def __init__(self, es: EntitySync) -> None:
        if REGISTRY is None:
            raise ConfigError("Prometheus metrics need prometheus_client: "
                              "pip install 'entitysync_sync[prometheus]'")
        self._es = es

    def collect(self) -> Iterator[Any]:
        """Called by prometheus_client on each scrape."""
        stats = {app.name: self._es.stats(app) for app in self._es.apps}
        for key, name, doc in GAUGES:
            gauge = GaugeMetricFamily(f"entitysync_{name}", doc, labels=["app"])
            for app, figures in stats.items():
                gauge.add_metric([app], figures[key])
            yield gauge
        for key, name, doc in COUNTERS:
            counter = CounterMetricFamily(f"entitysync_{name}", doc, labels=["app"])
            for app, figures in stats.items():
                counter.add_metric([app], figures[key])
            yield counter
        yield from _bus_families(stats)
        for key, name, doc in HISTOGRAMS:
            histogram = HistogramMetricFamily(f"entitysync_{name}", doc, labels=["app"])
            for app, figures in stats.items():
                snapshot = figures[key]
                buckets = [(_bound(b), snapshot["buckets"][_label(b)]) for b in (*BUCKETS, math.inf)]
                histogram.add_metric([app], buckets, snapshot["sum"])
            yield histogram


def _bus_families(stats: dict[str, dict[str, Any]]) -> Iterator[Any]:
    """Every figure of each app's bus, and of its PostgreSQL listener, labelled ``bus`` (where
    it comes from: ``bus`` or ``pg_listen``) and ``name`` (its key in that dict); they differ
    from one bus to another, see :doc:`/observability`."""
    counter = CounterMetricFamily("entitysync_bus_counter", "The bus's own counters, by name.",
                                  labels=["app", "bus", "name"])
    gauge = GaugeMetricFamily("entitysync_bus_gauge", "The bus's own gauges, by name.",
                              labels=["app", "bus", "name"])
    for app, figures in stats.items():
        for source in ("bus", "pg_listen"):
            for name, value in sorted(figures.get(source, {}).items()):
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    family = gauge if name in BUS_GAUGES else counter
                    family.add_metric([app, source, name], value)
    yield counter
    yield gauge


def _label(bound: float) -> str:
    return "+Inf" if bound == math.inf else repr(bound)


def _bound(bound: float) -> str:
    return "+Inf" if bound == math.inf else str(bound)


def register(es: EntitySync, registry: Any = None) -> EntitySyncCollector:
    """Register an :class:`EntitySyncCollector` of ``es`` (default: prometheus_client's REGISTRY)."""
    collector = EntitySyncCollector(es)
    (registry if registry is not None else REGISTRY).register(collector)
    return collector
