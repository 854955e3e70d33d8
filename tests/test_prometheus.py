"""entitysync_sync.prometheus: the figures of es.stats() as Prometheus metrics."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
from flask import Flask
from prometheus_client import CollectorRegistry, generate_latest

from entitysync_sync import EntityKey, EntitySync
from entitysync_sync.prometheus import COUNTERS, GAUGES, HISTOGRAMS, register
from entitysync_sync.testing import LiveServer
from tests.support.waiting import wait_for


def test_a_scrape_shows_the_same_figures_as_stats() -> None:
    app = Flask("shop")
    es = EntitySync(app)
    rows: dict[str, Any] = {"1": "a"}

    @es.entity("items")
    def items(key: EntityKey, secret: Any) -> Any:
        return {"id": key.id, "value": rows.get(key.id)} if key.id in rows else None

    registry = CollectorRegistry()
    register(es, registry)
    with LiveServer(app) as live:
        client = live.client()
        client.subscribe("items", 1)
        client.expect_push("items", 1)
        rows["1"] = "b"
        es.notify("items", 1)
        client.expect_push("items", 1)
        client.subscribe("items", 2)
        client.expect_gone("items", 2)
        stats = es.stats()
        text = generate_latest(registry).decode()
        value = registry.get_sample_value
        assert value("entitysync_connections", {"app": "shop"}) == 1
        assert value("entitysync_subscriptions", {"app": "shop"}) == 2
        assert value("entitysync_notifications_published_total", {"app": "shop"}) == 1
        assert value("entitysync_pushes_total", {"app": "shop"}) == stats["pushes"] == 2
        assert value("entitysync_gones_total", {"app": "shop"}) == 1
        assert value("entitysync_fetch_seconds_count", {"app": "shop"}) == stats["fetch_seconds"]["count"] == 3
        assert value("entitysync_notify_to_push_seconds_count", {"app": "shop"}) == 1
        assert value("entitysync_notify_to_push_seconds_bucket", {"app": "shop", "le": "+Inf"}) == 1
        assert value("entitysync_fetch_seconds_sum", {"app": "shop"}) == pytest.approx(stats["fetch_seconds"]["sum"])
        assert "# TYPE entitysync_bus_publish_buffer gauge" in text
        assert "# TYPE entitysync_fetch_errors_total counter" in text
        assert 'entitysync_fetch_seconds_bucket{app="shop",le="0.005"}' in text
    es.close()


def test_the_shared_cache_cohorts_drain_and_bus_figures_are_exported_too() -> None:
    app = Flask("cache")
    es = EntitySync(app)

    @es.entity("shared", shared=True)
    def shared(key: EntityKey, secret: Any) -> Any:
        return {"id": key.id}

    @es.entity("mine")
    def mine(key: EntityKey, secret: Any) -> Any:
        return {"id": key.id, "for": secret}

    registry = CollectorRegistry()
    register(es, registry)
    value = registry.get_sample_value
    with LiveServer(app) as live:
        first, second = live.client(), live.client()
        for client in (first, second):
            client.subscribe("shared", 1)
            client.expect_push("shared", 1)
        first.subscribe("mine", 1)
        first.expect_push("mine", 1)
        es.notify("mine", 1)
        first.expect_push("mine", 1)
        stats = wait_for(lambda: (s := es.stats())["bus"]["received"] == 1 and s, message="the notification")
        assert stats["shared_cache_keys"] == 1 and stats["shared_cache_hits"] == 1 and stats["cohort_rounds"] == 1
        app_ = {"app": "cache"}
        assert value("entitysync_shared_cache_keys", app_) == 1
        assert value("entitysync_shared_cache_size", app_) == stats["shared_cache_size"] > 0
        assert value("entitysync_shared_cache_hits_total", app_) == 1
        assert value("entitysync_cohort_rounds_total", app_) == 1
        assert value("entitysync_cohort_queue", app_) == 0
        assert value("entitysync_draining", app_) == 0
        assert value("entitysync_bus_counter_total", {**app_, "bus": "bus", "name": "received"}) == 1
        assert value("entitysync_bus_counter_total", {**app_, "bus": "bus", "name": "published"}) == 1
        assert value("entitysync_bus_gauge", {**app_, "bus": "bus", "name": "buffered"}) == 0
        es.runtime(app).drain()
        assert value("entitysync_draining", app_) == 1
    es.close()


def test_every_figure_of_stats_has_a_metric() -> None:
    """A figure added to es.stats() must be exported too (nested dicts: by the bus families)."""
    app = Flask("every")
    es = EntitySync(app)

    @es.entity("items")
    def items(key: EntityKey, secret: Any) -> Any:
        return None

    registry = CollectorRegistry()
    register(es, registry)
    with LiveServer(app) as live:
        live.client().subscribe("items", 1)
        stats = es.stats()
        names = {metric.name for metric in registry.collect()}
    es.close()
    figures = {key for key, figure in stats.items() if not isinstance(figure, dict) or "buckets" in figure}
    assert {f"entitysync_{name}" for _, name, _ in (*GAUGES, *COUNTERS, *HISTOGRAMS)} <= names
    exported = {key for key, _, _ in (*GAUGES, *COUNTERS, *HISTOGRAMS)}
    assert figures - exported == set()
    assert {"entitysync_bus_counter", "entitysync_bus_gauge"} <= names


def test_without_prometheus_client_the_error_says_what_to_install() -> None:
    code = (
        "import sys; sys.modules['prometheus_client'] = None; sys.modules['prometheus_client.core'] = None\n"
        "from flask import Flask\n"
        "from entitysync_sync import EntitySync, ConfigError\n"
        "from entitysync_sync.prometheus import register\n"
        "try:\n"
        "    register(EntitySync(Flask('x')))\n"
        "except ConfigError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "pip install 'entitysync_sync[prometheus]'" in done.stdout
