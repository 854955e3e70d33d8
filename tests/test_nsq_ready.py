"""NSQ consumers are ready again after every reconnect, and a server repairs one that is not.

nsqd sends a consumer nothing until it says ``RDY n`` with n > 0, and it starts
every connection at RDY 0. These tests run the NSQ bus in this process (on a
thread with its own gevent hub) against a real nsqd when ``NSQD_BIN`` names
one, else the protocol double, and read nsqd's own view of each connection from
its ``/stats``.
"""

from __future__ import annotations

import logging
import random
import socket
import threading
import time
from typing import Any, Callable, Iterator

import gnsq
import gnsq.consumer
import gnsq.protocol
import pytest

from entitysync_sync import EntityKey
from entitysync_sync.bus.nsq import NsqBus, parse_nsq_url
from entitysync_sync.exceptions import ConfigError
from tests.support.brokers import NsqBroker
from tests.support.clients import Client
from tests.support.nsqd import Nsqd
from tests.support.pushes import converge, seed
from tests.support.servers import Server
from tests.support.sinks import RecordingSink
from tests.support.waiting import wait_for


@pytest.fixture
def nsqd() -> Iterator[Nsqd]:
    server = Nsqd()
    server.start()
    yield server
    server.close()


@pytest.fixture
def start_bus(nsqd: Nsqd) -> Iterator[Callable[..., tuple[NsqBus, RecordingSink]]]:
    made: list[NsqBus] = []

    def start(prefix: str, **kwargs: Any) -> tuple[NsqBus, RecordingSink]:
        bus = NsqBus([nsqd.tcp_address], topic_prefix=prefix, max_backoff=1.0, **kwargs)
        made.append(bus)
        sink = RecordingSink()
        bus.start(sink, ["items"])
        wait_for(lambda: sink.resyncs, timeout=20, message="the subscription")
        return bus, sink

    yield start
    for bus in made:
        bus.close()


def on_hub(bus: NsqBus, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on the bus's gevent hub and return its result."""
    done = threading.Event()
    result: list[Any] = []

    def run() -> None:
        try:
            result.append(fn())
        finally:
            done.set()

    assert bus._executor is not None
    bus._executor.spawn(run)
    assert done.wait(10), "the bus's hub did not run the call"
    return result[0] if result else None


def clients_of(nsqd: Nsqd, topic: str, channel: str) -> list[dict[str, Any]]:
    stats = nsqd.channel_stats(topic, channel)
    return list(stats["clients"]) if stats else []


def ready_on_nsqd(nsqd: Nsqd, topic: str, channel: str) -> bool:
    """nsqd has exactly one connection on the channel, and it is at RDY > 0."""
    clients = clients_of(nsqd, topic, channel)
    return len(clients) == 1 and clients[0]["ready_count"] > 0


def publish_until_received(bus: NsqBus, sink: RecordingSink, key: EntityKey, timeout: float) -> None:
    bus.publish([key])
    wait_for(lambda: key in sink.keys, timeout=timeout, message=f"{key} to be received")


# -- the race: gnsq's RDY tick inside the reconnect window -------------------------


@pytest.fixture
def rdy_tick_in_connect_window(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every gnsq connection runs its consumer's RDY redistribution after it joins the
    consumer's set (state INIT) and before it has a stream: what gnsq's 5 s RDY poll
    does when it lands inside a reconnect. Returns how often that happened."""
    ticks = [0]

    class TickInWindow(gnsq.consumer.NsqdTCPClient):  # type: ignore[misc]
        consumers: list[gnsq.Consumer] = []

        def connect(self) -> None:
            for consumer in self.consumers:
                if self in consumer._connections and not self.is_connected:
                    ticks[0] += 1
                    consumer._redistribute_ready_state()
            super().connect()

    monkeypatch.setattr(gnsq.consumer, "NsqdTCPClient", TickInWindow)
    return TickInWindow.consumers  # type: ignore[return-value]


def test_a_rdy_tick_inside_the_reconnect_window_leaves_the_consumer_ready(
        nsqd: Nsqd, start_bus: Callable[..., tuple[NsqBus, RecordingSink]], uid: str,
        rdy_tick_in_connect_window: list[Any]) -> None:
    # The supervisor is kept out of it: the consumer itself must get this right.
    bus, sink = start_bus(uid, supervise_interval=3600)
    consumer = bus._consumers["items"]
    rdy_tick_in_connect_window.append(consumer)
    topic = bus.topic("items")
    publish_until_received(bus, sink, EntityKey("items", "before"), timeout=15)
    for restart in range(3):
        resyncs = len(sink.resyncs)
        nsqd.stop()
        nsqd.start()
        wait_for(lambda: len(sink.resyncs) > resyncs, timeout=20, message="the reconnection")  # noqa: B023
        wait_for(lambda: ready_on_nsqd(nsqd, topic, bus.channel), timeout=10,
                 message="nsqd to see the reconnected consumer at RDY > 0")
        publish_until_received(bus, sink, EntityKey("items", f"after-{restart}"), timeout=15)
    assert bus.stats().get("consumers_repaired", 0) == 0


# -- the supervisor: a consumer that receives nothing is noticed and repaired ------


def warnings_about(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and r.name == "entitysync_sync" and text in r.getMessage()]


def lose_rdy_on_nsqd(bus: NsqBus) -> int:
    """Leave nsqd at RDY 0 on the consumer's connection while gnsq believes it is ready,
    the state a lost RDY leaves behind. Returns the count gnsq believes in."""
    consumer = bus._consumers["items"]

    def lose() -> int:
        (conn,) = consumer.subscribed_connections()
        conn.send(gnsq.protocol.ready(0))
        return int(conn.ready_count)

    return int(on_hub(bus, lose))


def test_a_consumer_whose_messages_wait_while_it_receives_nothing_is_repaired(
        nsqd: Nsqd, start_bus: Callable[..., tuple[NsqBus, RecordingSink]], uid: str,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="entitysync_sync")
    bus, sink = start_bus(uid, stall_timeout=2.0, supervise_interval=0.2)
    topic = bus.topic("items")
    publish_until_received(bus, sink, EntityKey("items", "first"), timeout=15)
    assert lose_rdy_on_nsqd(bus) > 0
    wait_for(lambda: not ready_on_nsqd(nsqd, topic, bus.channel), message="nsqd to hold the connection at RDY 0")
    resyncs = len(sink.resyncs)
    held = EntityKey("items", "held")
    bus.publish([held])
    wait_for(lambda: (c := nsqd.channel_stats(topic, bus.channel)) and c["depth"] == 1,
             message="nsqd to hold the message on the channel")
    wait_for(lambda: held in sink.keys, timeout=15, message="the held message after the repair")
    assert bus.stats()["consumers_repaired"] == 1
    assert bus.stats().get("consumers_replaced", 0) == 0
    assert sink.resyncs[resyncs:] == ["items"]
    assert ready_on_nsqd(nsqd, topic, bus.channel)
    (warning,) = warnings_about(caplog, "received nothing")
    assert topic in warning and "sending its RDY counts again and resyncing" in warning


def test_a_consumer_that_stays_stalled_after_a_repair_is_replaced(
        nsqd: Nsqd, start_bus: Callable[..., tuple[NsqBus, RecordingSink]], uid: str,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="entitysync_sync")
    bus, sink = start_bus(uid, stall_timeout=2.0, supervise_interval=0.2)
    publish_until_received(bus, sink, EntityKey("items", "first"), timeout=15)
    consumer = bus._consumers["items"]
    on_hub(bus, lambda: setattr(consumer, "send_ready_state", lambda resend=False: None))  # repairs do nothing
    lose_rdy_on_nsqd(bus)
    # nsqd handles the RDY 0 and the publish on two connections concurrently: publish once it holds.
    wait_for(lambda: not ready_on_nsqd(nsqd, bus.topic("items"), bus.channel),
             message="nsqd to hold the connection at RDY 0")
    bus.publish([EntityKey("items", "held-1")])
    wait_for(lambda: bus.stats().get("consumers_repaired") == 1, timeout=15, message="a repair")
    bus.publish([EntityKey("items", "held-2")])
    wait_for(lambda: bus.stats().get("consumers_replaced") == 1, timeout=15, message="the replacement")
    assert bus._consumers["items"] is not consumer
    wait_for(lambda: ready_on_nsqd(nsqd, bus.topic("items"), bus.channel), message="the new consumer at RDY > 0")
    publish_until_received(bus, sink, EntityKey("items", "after"), timeout=15)
    assert bus.stats()["consumers_repaired"] == 1
    (warning,) = warnings_about(caplog, "replacing the NSQ consumer")
    assert "still does after its RDY counts were sent again" in warning


def test_a_connected_consumer_left_at_rdy_0_is_repaired(
        nsqd: Nsqd, start_bus: Callable[..., tuple[NsqBus, RecordingSink]], uid: str,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="entitysync_sync")
    bus, sink = start_bus(uid, ready_timeout=1.0, supervise_interval=0.2)
    consumer = bus._consumers["items"]
    # gnsq's RDY loop is alive but sends nothing, so the reconnected connection stays at RDY 0.
    on_hub(bus, lambda: setattr(consumer, "_redistribute_ready_state", lambda: None))
    resyncs = len(sink.resyncs)
    nsqd.stop()
    nsqd.start()
    wait_for(lambda: bus.stats().get("consumers_repaired") == 1, timeout=20, message="the repair")
    wait_for(lambda: ready_on_nsqd(nsqd, bus.topic("items"), bus.channel), message="RDY > 0 on nsqd")
    publish_until_received(bus, sink, EntityKey("items", "after"), timeout=15)
    assert bus._consumers["items"] is consumer
    assert sink.resyncs[resyncs:] == ["items", "items"]  # the reconnection's, then the repair's
    (warning,) = warnings_about(caplog, "but not ready (RDY 0")
    assert f"is connected to {nsqd.tcp_address}" in warning


# -- across real servers: nsqd restarted under write load -------------------------


def test_every_client_converges_when_nsqd_restarts_under_write_load(cluster: Callable[..., Server],
                                                                   uid: str) -> None:
    """Two gunicorn servers, 40 clients of 8 keys, four writers through both servers;
    nsqd goes down for 2 s mid-stream while 10 clients drop and come back."""
    broker = NsqBroker()
    try:
        _restart_under_write_load(broker, cluster, uid)
    finally:
        broker.close()


def _restart_under_write_load(broker: NsqBroker, cluster: Callable[..., Server], uid: str) -> None:
    nsqd = broker.nsqd
    rng = random.Random(uid)
    servers = [cluster("gunicorn", broker), cluster("gunicorn", broker)]
    topic = f"{uid}_items"
    ids = [f"{uid}-{n}" for n in range(8)]
    for id in ids:
        seed(servers[0], id, "seed")

    def connect(server: Server) -> Client:
        client = Client(server.ws_url)
        for id in ids:
            client.subscribe("items", id)
        return client

    clients = [connect(servers[n % 2]) for n in range(40)]
    written: dict[str, str] = {}
    writes = [0]
    lock = threading.Lock()
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        # Each writer owns two ids, so the last value written to an id is its value.
        wrng = random.Random(f"{uid}-{n}")
        mine = ids[n::4]
        try:
            while not stop.is_set():
                id = wrng.choice(mine)
                value = f"w{n}-{writes[0]}"
                wrng.choice(servers).set("items", id, value)
                with lock:
                    written[id] = value
                    writes[0] += 1
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def channels_ready() -> bool:
        found = nsqd.topic_stats(topic)
        channels = found["channels"] if found else []
        return len(channels) == 2 and all(
            len(c["clients"]) == 1 and c["clients"][0]["ready_count"] > 0 for c in channels)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: writes[0] >= 40, timeout=30, message="writes before the restart")
        for client in rng.sample(clients, 10):  # vanish without a close frame
            client.ws.sock.shutdown(socket.SHUT_RDWR)
            client.ws.sock.close()
            clients.remove(client)
        broker.stop()
        down_at, count = time.monotonic(), writes[0]
        wait_for(lambda: time.monotonic() - down_at >= 2 and writes[0] >= count + 20, timeout=30,
                 message="2 s of writes while nsqd is down")
        clients.extend(connect(rng.choice(servers)) for _ in range(10))
        broker.start()
        wait_for(channels_ready, timeout=30, message="both servers' consumers back and ready on nsqd")
        count = writes[0]
        wait_for(lambda: writes[0] >= count + 80, timeout=30, message="writes after the restart")
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert not errors, errors
    final = {id: written.get(id, "seed") for id in ids}
    for client in clients:
        converge(client, final)

    def drained() -> bool:
        found = nsqd.topic_stats(topic)
        return bool(found) and all(c["depth"] == 0 and c["in_flight_count"] == 0 for c in found["channels"])

    wait_for(drained, timeout=15, message="both servers' channels drained")
    assert channels_ready()
    for server in servers:
        bus = server.get("/_t/es-stats")["bus"]
        assert bus["reconnects"] >= 1, bus
        # The consumers were ready again on their own: nothing needed repairing.
        assert bus.get("consumers_repaired", 0) == 0 and bus.get("consumers_replaced", 0) == 0, bus
    for client in clients:
        client.close()


def test_the_supervisor_timeouts_are_options_of_the_url() -> None:
    parsed = parse_nsq_url("nsq://h:4150?ready_timeout=3&stall_timeout=4.5")
    assert (parsed["ready_timeout"], parsed["stall_timeout"]) == (3.0, 4.5)
    assert parse_nsq_url("nsq://h:4150")["stall_timeout"] == 10.0
    with pytest.raises(ConfigError, match="stall_timeout"):
        parse_nsq_url("nsq://h:4150?stall_timeout=0")
    with pytest.raises(ConfigError, match="ready_timeout"):
        NsqBus(["h:4150"], ready_timeout=-1)
