"""The networked buses across real server processes: Redis and NSQ.

Every test runs once per broker. Servers are real ``gunicorn -k gevent`` and
threaded ``flask run`` processes sharing one SQLite database (the rows), and
the clients are real websocket clients. Redis is the machine's real Redis;
NSQ is a real nsqd when ``NSQD_BIN`` names one, else the protocol double in
``tests/support/nsqd_double/``.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import pytest

from tests.support.brokers import make_broker
from tests.support.clients import Client
from tests.support.pushes import converge, seed, subscribed, until_pushed
from tests.support.servers import Server
from tests.support.tcpproxy import TcpProxy
from tests.support.waiting import wait_for


def test_a_notify_on_one_server_reaches_clients_of_another(broker: Any, cluster: Callable[..., Server],
                                                           uid: str) -> None:
    a = cluster("gunicorn", broker)
    b = cluster("flask", broker)
    seed(a, uid, "v0")
    on_a = subscribed(Client(a.ws_url), a, "items", uid, "v0")
    on_b = subscribed(Client(b.ws_url), b, "items", uid, "v0")
    try:
        b.set("items", uid, "from-b")
        until_pushed(on_a, "items", uid, "from-b")
        until_pushed(on_b, "items", uid, "from-b")
        a.set("items", uid, "from-a")
        until_pushed(on_b, "items", uid, "from-a")
        until_pushed(on_a, "items", uid, "from-a")
    finally:
        on_a.close()
        on_b.close()


def test_the_topic_prefix_isolates_apps_sharing_a_broker(broker: Any, cluster: Callable[..., Server],
                                                         uid: str) -> None:
    a = cluster("gunicorn", broker, prefix=uid + "_one_")
    other = cluster("gunicorn", broker, prefix=uid + "_two_")
    seed(a, uid, "v0")
    seed(other, uid, "v0")
    mine = subscribed(Client(a.ws_url), a, "items", uid, "v0")
    theirs = subscribed(Client(other.ws_url), other, "items", uid, "v0")
    try:
        received = other.stats()["bus"].get("received", 0)
        a.set("items", uid, "v1")
        until_pushed(mine, "items", uid, "v1")
        theirs.assert_silent(within=1.0)  # the rows are shared: a push here would carry v1
        assert other.stats()["bus"].get("received", 0) == received
    finally:
        mine.close()
        theirs.close()


def test_a_foreign_publish_of_the_go_body_reaches_clients(broker: Any, cluster: Callable[..., Server],
                                                          uid: str) -> None:
    a = cluster("gunicorn", broker)
    seed(a, uid, "v0")
    client = subscribed(Client(a.ws_url), a, "items", uid, "v0")
    try:
        seed(a, uid, "written-elsewhere")
        broker.publish_raw(uid + "_items", f'{{"entity":"items","id":"{uid}"}}'.encode())
        until_pushed(client, "items", uid, "written-elsewhere")
    finally:
        client.close()


@pytest.mark.parametrize("kind", ["gunicorn", "flask"])
def test_malformed_bodies_are_logged_and_dropped(broker: Any, cluster: Callable[..., Server], uid: str,
                                                 kind: str) -> None:
    a = cluster(kind, broker)
    seed(a, uid, "v0")
    client = subscribed(Client(a.ws_url), a, "items", uid, "v0")
    garbage = [b"not json", b"[1,2]", b'{"entity":"items"}', b'{"entity":"no such!","id":"1"}',
               b"\xff\xfe\x00", b'{"entity":"items","id":""}', b"{" * 5000]
    try:
        for body in garbage:
            broker.publish_raw(uid + "_items", body)
        seed(a, uid, "after")
        broker.publish_raw(uid + "_items", f'{{"entity":"items","id":"{uid}","extra":[1]}}'.encode())
        until_pushed(client, "items", uid, "after")
        stats = wait_for(lambda: (s := a.stats()["bus"]).get("malformed") == len(garbage) and s,
                         message="every malformed body to be counted")
        assert stats["received"] == 1
        assert a.log().count("dropped a malformed") == len(garbage)
        assert "{" * 100 not in a.log()  # only the first bytes are logged
    finally:
        client.close()


def test_the_broker_restarting_mid_stream_every_client_converges(own_broker: Any,
                                                                 cluster: Callable[..., Server],
                                                                 uid: str) -> None:
    a = cluster("gunicorn", own_broker)
    b = cluster("flask", own_broker)
    ids = [f"{uid}-{n}" for n in range(5)]
    for id in ids:
        seed(a, id, "start")
    clients = [Client(server.ws_url) for server in (a, b, a, b)]
    try:
        for client in clients:
            for id in ids:
                client.subscribe("items", id)
            converge(client, dict.fromkeys(ids, "start"))

        stop = threading.Event()
        written: dict[str, Any] = {}

        writes = [0]

        def writer() -> None:  # keeps changing rows through both servers, whatever the broker does
            while not stop.is_set():
                n = writes[0]
                id = ids[n % len(ids)]
                (a, b)[n % 2].set("items", id, f"w{n}")
                written[id] = f"w{n}"
                writes[0] += 1

        thread = threading.Thread(target=writer)
        thread.start()
        try:
            wait_for(lambda: writes[0] > 20, message="writes while the broker is up")
            own_broker.stop()
            count = writes[0]
            wait_for(lambda: writes[0] > count + 20, message="writes while the broker is down")
        finally:
            stop.set()
            thread.join()
        own_broker.start()  # the last writes were all made while it was down
        for client in clients:
            converge(client, dict(written))
    finally:
        for client in clients:
            client.close()


def test_a_notify_while_the_broker_is_unreachable_is_held_and_flushed(broker: Any,
                                                                      cluster: Callable[..., Server],
                                                                      uid: str) -> None:
    proxy = TcpProxy(broker.port)
    a = cluster("gunicorn", broker, url=broker.url(proxy.port))  # A reaches the broker through the proxy
    b = cluster("gunicorn", broker)
    seed(a, uid, "v0")
    on_b = subscribed(Client(b.ws_url), b, "items", uid, "v0")
    try:
        received = b.stats()["bus"].get("received", 0)
        proxy.cut()
        a.set("items", uid, "while-down")
        wait_for(lambda: (s := a.stats()["bus"]).get("publish_failures", 0) >= 1 and s["buffered"] == 1,
                 message="A to hold the notification")
        on_b.assert_silent(within=0.5)
        assert b.stats()["bus"].get("received", 0) == received
        proxy.restore()
        until_pushed(on_b, "items", uid, "while-down", timeout=30)
        assert b.stats()["bus"].get("received", 0) == received + 1  # B got it from the bus, not from a resync
        wait_for(lambda: a.stats()["bus"]["buffered"] == 0, message="A's buffer to drain")
    finally:
        on_b.close()
        proxy.close()


def test_two_gunicorn_workers_share_notifications_through_redis(cluster: Callable[..., Server],
                                                                uid: str) -> None:
    broker = make_broker("redis")
    server = cluster("gunicorn", broker, extra_args=("-w", "2"))
    server.set_quietly("where", uid, "v0")
    by_pid: dict[int, Client] = {}
    opened = []
    try:
        def connect_until_both_workers() -> bool:
            client = Client(server.ws_url)
            opened.append(client)
            client.subscribe("where", uid)
            pid = client.expect_push("where", uid)["pid"]
            by_pid.setdefault(pid, client)
            return len(by_pid) == 2

        wait_for(connect_until_both_workers, timeout=30, message="clients on both workers")
        for n in range(4):  # each POST is handled by whichever worker accepts it
            server.post(f"/_t/set/where/{uid}", {"value": f"v{n + 1}"})
            for client in by_pid.values():
                client.expect_push("where", uid, lambda body, n=n: body["value"] == f"v{n + 1}")
        assert "gunicorn runs 2 workers" not in server.log()  # that warning is for memory:// only
    finally:
        for client in opened:
            client.close()


def test_memory_bus_warns_when_gunicorn_runs_several_workers(uid: str) -> None:
    server = Server("gunicorn", {"ENTITYSYNC_BUS_URL": "memory://"}, extra_args=("-w", "2"))
    try:
        client = Client(server.ws_url)
        client.subscribe("items", uid)
        client.expect(lambda frame: frame.get("action") == "gone")
        client.close()
        wait_for(lambda: "gunicorn runs 2 workers" in server.log(), message="the warning")
        assert "use a redis:// or nsq:// bus" in server.log().lower()
    finally:
        server.stop()


def test_a_worker_stalled_past_the_ping_deadline_keeps_its_redis_subscription(cluster: Callable[..., Server],
                                                                               uid: str) -> None:
    """A worker stopped for longer than its reader's PING deadline (a long pause, a starved CPU)
    finds the notification and the PONG waiting in its socket: it reads them and goes on, without
    taking its connection for dead, reconnecting and refreshing every key."""
    broker = make_broker("redis")
    url = broker.url() + "?health_check_interval=0.25"  # nothing read for 1.5 s after a PING: dead
    a = cluster("gunicorn", broker, url=url)
    b = cluster("flask", broker, url=url)
    seed(a, uid, "v0")
    client = subscribed(Client(a.ws_url), a, "items", uid, "v0")
    try:
        before = a.stats()["bus"]
        with a.stalled(2.0):  # idle: its PONG came before the stall, and no PING went out during it
            pass
        with a.stalled(2.0):
            b.set("items", uid, "while-stalled")
        until_pushed(client, "items", uid, "while-stalled")
        after = a.stats()["bus"]
        counts = ("connects", "reconnects")
        assert [after.get(name, 0) for name in counts] == [before.get(name, 0) for name in counts]
        assert "lost the subscription" not in a.log()
    finally:
        client.close()
