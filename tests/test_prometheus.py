"""entitysync_sync.prometheus: the figures of es.stats() as Prometheus metrics."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
from flask import Flask
from prometheus_client import CollectorRegistry, generate_latest

from entitysync_sync import EntityKey, EntitySync
from entitysync_sync.prometheus import register
from entitysync_sync.testing import LiveServer


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
