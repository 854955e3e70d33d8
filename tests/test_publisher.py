"""Publisher: notify from outside the web server, reaching real servers through Redis and NSQ."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from typing import Any, Callable, Iterator

import pytest
from flask import Flask

from entitysync_sync import BusError, ConfigError, EntityKey, EntitySync, InvalidKeyError, Publisher
from entitysync_sync.bus.nsq import NsqBus
from entitysync_sync.testing import LiveServer
from tests.support.brokers import make_broker
from tests.support.clients import Client
from tests.support.ports import free_port
from tests.support.pushes import seed, subscribed, until_pushed
from tests.support.servers import ROOT, Server
from tests.support.tcpproxy import TcpProxy
from tests.support.waiting import wait_for


@pytest.fixture
def publishers() -> Iterator[list[Publisher]]:
    made: list[Publisher] = []
    yield made
    for publisher in made:
        try:
            publisher.close(timeout=1)
        except BusError:
            pass


# -- validation, without a broker -------------------------------------------------


def test_keys_are_validated_but_entities_need_no_registration(publishers: list[Publisher]) -> None:
    publisher = Publisher("redis://127.0.0.1:6379/0", topic_prefix="p_")
    publishers.append(publisher)
    with pytest.raises(InvalidKeyError, match="invalid entity name"):
        publisher.notify("no such!", 1)
    with pytest.raises(InvalidKeyError, match="invalid id"):
        publisher.notify("items", "")
    with pytest.raises(InvalidKeyError):
        publisher.notify_many([("items", 1), ("items", "x" * 300)])
    with pytest.raises(TypeError, match="an id is needed"):
        publisher.notify("items")
    assert publisher.stats().get("published", 0) == 0  # nothing half-published by the failed batches
    with pytest.raises(ConfigError, match="longer than 64"):
        Publisher("redis://127.0.0.1:6379/0", topic_prefix="p" * 60).notify("items", 1)


def test_a_bare_memory_url_is_refused_with_a_fix(publishers: list[Publisher]) -> None:
    with pytest.raises(ConfigError, match=r"reaches nobody.*redis:// or nsq://"):
        Publisher("memory://")
    with pytest.raises(ConfigError, match="unsupported bus"):
        Publisher("kafka://h:9092")


def test_a_named_memory_bus_reaches_apps_of_this_process(publishers: list[Publisher]) -> None:
    app = Flask(__name__)
    app.config["ENTITYSYNC_BUS_URL"] = "memory://publisher-test"
    es = EntitySync(app)
    es.entity("items")(lambda key, secret: {"id": key.id, "at": time.monotonic()})
    with LiveServer(app) as live:
        client = live.client()
        client.subscribe("items", 1)
        first = client.expect_push("items", 1)
        publisher = Publisher("memory://publisher-test")
        publishers.append(publisher)
        publisher.notify(EntityKey("items", 1))
        assert client.expect_push("items", 1)["at"] > first["at"]
    es.close()


def test_a_closed_publisher_refuses_notifications() -> None:
    publisher = Publisher("memory://closed-test")
    publisher.close()
    publisher.close()  # idempotent
    with pytest.raises(ConfigError, match="closed"):
        publisher.notify("items", 1)


# -- an unreachable broker ----------------------------------------------------------


def test_flush_fails_clearly_when_the_broker_is_unreachable_and_never_shows_credentials() -> None:
    port = free_port()  # nothing listens here
    publisher = Publisher(f"redis://user:s3cret-pw@127.0.0.1:{port}/0")
    publisher.notify_many([("items", 1), ("items", 2)])
    started = time.monotonic()
    with pytest.raises(BusError, match=r"2 notification\(s\) not published to Redis at "
                                       rf"redis://127.0.0.1:{port}/0 within 0.5s") as info:
        publisher.flush(timeout=0.5)
    assert 0.5 <= time.monotonic() - started < 5
    assert "s3cret-pw" not in str(info.value) and "s3cret-pw" not in repr(publisher)
    with pytest.raises(BusError):
        publisher.close(timeout=0.2)
    assert publisher.closed


def test_a_publisher_holds_notifications_until_the_broker_is_back(broker: Any, cluster: Callable[..., Server],
                                                                  uid: str, publishers: list[Publisher]) -> None:
    server = cluster("gunicorn", broker)
    seed(server, uid, "v0")
    client = subscribed(Client(server.ws_url), server, "items", uid, "v0")
    proxy = TcpProxy(broker.port)
    try:
        proxy.cut()
        publisher = Publisher(broker.url(proxy.port), topic_prefix=uid + "_")
        publishers.append(publisher)
        seed(server, uid, "while-down")
        publisher.notify("items", uid)
        with pytest.raises(BusError, match="not published"):
            publisher.flush(timeout=0.5)
        client.assert_silent(within=0.3)
        proxy.restore()
        publisher.flush(timeout=30)
        until_pushed(client, "items", uid, "while-down")
        assert publisher.stats()["sent"] == 1 and publisher.stats()["publish_failures"] >= 1
    finally:
        client.close()
        proxy.close()


# -- reaching running servers -------------------------------------------------------


def test_a_publisher_reaches_every_server(broker: Any, cluster: Callable[..., Server],
                                          uid: str) -> None:
    a = cluster("gunicorn", broker)
    b = cluster("flask", broker)
    seed(a, uid, "v0")
    on_a = subscribed(Client(a.ws_url), a, "items", uid, "v0")
    on_b = subscribed(Client(b.ws_url), b, "items", uid, "v0")
    try:
        before = b.get("/_t/es-stats")["notify_to_push_seconds"]["count"]
        seed(a, uid, "from-a-script")
        with Publisher(broker.url(), topic_prefix=uid + "_") as publisher:
            publisher.notify("items", uid)
            if broker.kind == "nsq":
                assert isinstance(publisher._bus, NsqBus) and publisher._bus._consumers == {}
        until_pushed(on_a, "items", uid, "from-a-script")
        until_pushed(on_b, "items", uid, "from-a-script")
        wait_for(lambda: b.get("/_t/es-stats")["notify_to_push_seconds"]["count"] > before,
                 message="the publisher's notify time to be measured on B")
    finally:
        on_a.close()
        on_b.close()


def test_a_publisher_subscribes_to_nothing(cluster: Callable[..., Server], uid: str,
                                           publishers: list[Publisher]) -> None:
    import redis

    broker = make_broker("redis")
    cluster("gunicorn", broker)
    publisher = Publisher(broker.url(), topic_prefix=uid + "_")
    publishers.append(publisher)
    publisher.notify("items", 1)
    publisher.flush()
    client = redis.Redis(port=broker.port)
    try:
        assert dict(client.pubsub_numsub(f"{uid}_items")) == {f"{uid}_items".encode(): 1}  # the server only
    finally:
        client.close()


def test_a_short_lived_script_publishes_before_it_exits(broker: Any, cluster: Callable[..., Server],
                                                        uid: str) -> None:
    server = cluster("flask", broker)
    seed(server, uid, "v0")
    client = subscribed(Client(server.ws_url), server, "items", uid, "v0")
    script = textwrap.dedent(f"""
        from entitysync_sync import Publisher
        with Publisher({broker.url()!r}, topic_prefix={uid + "_"!r}) as publisher:
            publisher.notify_many([("items", {uid!r}), ("other", 1)])
        print("published", publisher.stats()["sent"])
    """)
    try:
        seed(server, uid, "from-cron")
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "published 2"
        until_pushed(client, "items", uid, "from-cron")
    finally:
        client.close()
