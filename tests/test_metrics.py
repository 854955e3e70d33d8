"""es.stats(): counters, gauges and latencies, and the notify time that travels on the bus.

In-process with the real memory bus and real websocket clients
(``entitysync_sync.testing.LiveServer``); across real server processes on
Redis and NSQ for notify-to-push latency and bus reconnects.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Iterator

import pytest
from flask import Flask

from entitysync_sync import EntityKey, EntitySync
from entitysync_sync import protocol as p
from entitysync_sync.keys import NotifiedKey
from entitysync_sync.metrics import BUCKETS, Histogram, Metrics
from entitysync_sync.testing import LiveServer
from tests.support.brokers import make_broker
from tests.support.clients import Client
from tests.support.pushes import seed, subscribed, until_pushed
from tests.support.servers import Server
from tests.support.waiting import wait_for

# -- the notify time on the bus --------------------------------------------------


def test_a_notified_key_carries_its_time_and_equals_the_plain_key() -> None:
    key = NotifiedKey("items", 7, 1767225600.1234)
    assert key == EntityKey("items", "7") and hash(key) == hash(EntityKey("items", "7"))
    assert {key: 1}[EntityKey("items", "7")] == 1
    assert NotifiedKey.stamp(EntityKey("items", "7"), 5.0).notified_at == 5.0
    with pytest.raises(AttributeError):
        key.notified_at = 1.0  # type: ignore[misc]


def test_the_bus_body_adds_t_to_the_go_body_and_reads_it_back() -> None:
    body = p.encode_bus_body(NotifiedKey("items", 7, 1767225600.1234))
    assert body == b'{"entity":"items","id":"7","t":1767225600.123}'
    decoded = p.decode_bus_body(body)
    assert isinstance(decoded, NotifiedKey) and decoded == EntityKey("items", "7")
    assert decoded.notified_at == pytest.approx(1767225600.123)
    # A plain key still encodes as the Go entity-sync's bytes, and a Go body decodes to a plain key.
    assert p.encode_bus_body(EntityKey("items", 7)) == b'{"entity":"items","id":"7"}'
    assert type(p.decode_bus_body(b'{"entity":"items","id":"7"}')) is EntityKey


@pytest.mark.parametrize("t", ['"soon"', "true", "null", "[1]", "1e999"])
def test_a_t_that_is_not_a_finite_number_is_ignored(t: str) -> None:
    decoded = p.decode_bus_body(f'{{"entity":"items","id":"7","t":{t}}}'.encode())
    assert type(decoded) is EntityKey and decoded == EntityKey("items", "7")


# -- the metrics themselves ------------------------------------------------------


def test_histogram_buckets_are_cumulative_and_clamp_negative_durations() -> None:
    h = Histogram()
    for seconds in (0.001, 0.02, 0.02, 3.0, 99.0, -1.0):
        h.observe(seconds)
    snap = h.snapshot()
    assert snap["count"] == 6 and snap["max"] == 99.0
    assert snap["sum"] == pytest.approx(0.001 + 0.04 + 3.0 + 99.0)
    assert snap["buckets"]["0.005"] == 2  # 0.001 and the clamped -1.0
    assert snap["buckets"]["0.025"] == 4
    assert snap["buckets"]["5.0"] == 5
    assert snap["buckets"]["10.0"] == 5 and snap["buckets"]["+Inf"] == 6
    assert list(snap["buckets"]) == [repr(b) for b in BUCKETS] + ["+Inf"]


def test_metrics_are_exact_under_concurrent_recording() -> None:
    metrics = Metrics()
    key = NotifiedKey("items", 1, time.time())

    def record() -> None:
        for _ in range(2000):
            metrics.count("notifications_received")
            metrics.fetched(key, time.monotonic(), 2)

    threads = [threading.Thread(target=record) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    snap = metrics.snapshot()
    assert snap["notifications_received"] == 16000
    assert snap["fetches"] == 16000 and snap["pushes"] == 32000
    assert snap["notify_to_push_seconds"]["count"] == 16000


# -- es.stats() in one process ---------------------------------------------------


@pytest.fixture
def live() -> Iterator[tuple[Flask, EntitySync, LiveServer, dict[str, Any]]]:
    app = Flask(__name__)
    es = EntitySync(app)
    rows: dict[str, Any] = {"1": "one"}

    @es.entity("items")
    def items(key: EntityKey, secret: Any) -> Any:
        return None if key.id not in rows else {"id": key.id, "value": rows[key.id]}

    @es.entity("boom")
    def boom(key: EntityKey, secret: Any) -> Any:
        raise RuntimeError("down")

    @es.entity("pair")
    def pair(key: EntityKey, secret: Any) -> Any:
        return [{"n": 1}, {"n": 2}]

    with LiveServer(app) as server:
        yield app, es, server, rows
    es.close()


def test_stats_count_connections_notifications_fetches_pushes_and_errors(live: Any) -> None:
    _, es, server, rows = live
    assert es.stats()["connections"] == 0
    client = server.client()
    client.subscribe("items", 1)
    client.expect_push("items", 1)
    client.subscribe("items", 2)
    client.expect_gone("items", 2)
    client.subscribe("pair", 1)
    client.expect_push("pair", 1)
    client.subscribe("boom", 1)
    client.expect_error("fetch_failed")
    stats = es.stats()
    assert (stats["connections"], stats["subscriptions"], stats["keys"]) == (1, 4, 4)
    assert stats["fetches"] == 4 and stats["fetch_errors"] == 1
    assert stats["pushes"] == 2 and stats["gones"] == 1  # a set of two rows is one push
    assert stats["fetch_seconds"]["count"] == 4
    assert stats["notifications_published"] == 0
    assert stats["notify_to_push_seconds"]["count"] == 0  # refreshes on subscribe are not sampled

    rows["1"] = "changed"
    es.notify_many([("items", 1), ("items", 2), ("items", 3)])
    # Refreshes of different keys may finish in either order (a spare lane takes the second key
    # while the first is fetched), and expect() passes over frames that do not match: wait for both.
    answers: dict[str, Any] = {}
    while len(answers) < 2:
        frame = client.expect(lambda f: f.get("action") in ("push", "gone") and f["key"]["id"] in ("1", "2"))
        answers[frame["key"]["id"]] = frame
    assert answers["1"]["body"]["value"] == "changed" and answers["2"]["action"] == "gone"
    stats = wait_for(lambda: (s := es.stats())["notify_to_push_seconds"]["count"] == 2 and s,
                     message="two notify-to-push samples")
    assert stats["notifications_published"] == 3 and stats["notifications_received"] == 3
    assert stats["fetches"] == 6 and stats["pushes"] == 3 and stats["gones"] == 2
    assert 0 <= stats["notify_to_push_seconds"]["max"] < 5
    assert stats["bus_publish_buffer"] == 0 and stats["bus_reconnects"] == 0
    client.close()
    wait_for(lambda: es.stats()["connections"] == 0, message="the connection to go")
    assert es.stats()["subscriptions"] == 0


def test_notify_to_push_measures_from_the_notify_call(live: Any) -> None:
    """A notification whose stamp is 2 s old is measured as at least 2 s late."""
    app, es, server, _ = live
    client = server.client()
    client.subscribe("items", 1)
    client.expect_push("items", 1)
    es.bus(app).publish([NotifiedKey("items", 1, time.time() - 2.0)])
    client.expect_push("items", 1)
    snap = wait_for(lambda: (s := es.stats()["notify_to_push_seconds"])["count"] == 1 and s,
                    message="one sample")
    # The stamp crosses the bus as JSON in milliseconds ("t"), so it may round up by half of one.
    assert 2.0 - 0.0005 <= snap["max"] < 7.0
    assert snap["buckets"]["1.0"] == 0 and snap["buckets"]["2.5"] == 1


def test_the_bus_start_is_logged_at_info(caplog: pytest.LogCaptureFixture) -> None:
    app = Flask("other")
    es = EntitySync(app)
    es.entity("items")(lambda key, secret: None)
    with caplog.at_level(logging.INFO, logger="entitysync_sync"):
        es.notify("items", 1)
    assert any(r.levelno == logging.INFO and "memory://" in r.getMessage() for r in caplog.records)
    es.close()


# -- across real servers ---------------------------------------------------------



def test_notify_to_push_is_measured_across_servers(broker: Any, cluster: Callable[..., Server],
                                                   uid: str) -> None:
    a = cluster("gunicorn", broker)
    b = cluster("flask", broker)
    seed(a, uid, "v0")
    client = subscribed(Client(b.ws_url), b, "items", uid, "v0")
    try:
        before = b.get("/_t/es-stats")
        a.set("items", uid, "v1")
        until_pushed(client, "items", uid, "v1")
        after = wait_for(lambda: (s := b.get("/_t/es-stats"))["notify_to_push_seconds"]["count"]
                         > before["notify_to_push_seconds"]["count"] and s, message="a sample on B")
        assert after["notifications_received"] > before["notifications_received"]
        assert after["notifications_published"] == before["notifications_published"]  # A notified, not B
        assert a.get("/_t/es-stats")["notifications_published"] >= 1
        assert 0 <= after["notify_to_push_seconds"]["max"] < 10
    finally:
        client.close()


def test_a_broker_restart_counts_as_a_bus_reconnect(cluster: Callable[..., Server],
                                                    uid: str) -> None:
    broker = make_broker("redis", own=True)
    try:
        a = cluster("gunicorn", broker)
        before = a.get("/_t/es-stats")
        assert before["bus_reconnects"] == 0 and before["resyncs"] >= 1  # one per entity subscribed
        broker.stop()
        broker.start()
        stats = wait_for(lambda: (s := a.get("/_t/es-stats"))["bus_reconnects"] >= 1 and s, timeout=30,
                         message="the reconnect to be counted")
        assert stats["resyncs"] > before["resyncs"]
    finally:
        broker.close()
