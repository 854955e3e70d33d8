"""The networked buses in this process: URLs, errors, overflow, supervision, lookupd.

The buses run here exactly as under the threaded dev server (this process is
not monkey-patched): Redis in threads, NSQ on a thread with its own gevent
hub. Brokers are the real Redis and nsqd (or the protocol double, see
``tests/support/nsqd.py``).
"""

from __future__ import annotations

import json
import logging
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterator
from urllib.parse import parse_qs

import pytest

from entitysync_sync import EntityKey
from entitysync_sync.bus import BufferedBus, bus_from_url
from entitysync_sync.bus.nsq import OUTPUT_BUFFER_SIZE, OUTPUT_BUFFER_TIMEOUT, NsqBus, parse_nsq_url
from entitysync_sync.bus.redis import RedisBus, redact
from entitysync_sync.exceptions import ConfigError
from tests.support.brokers import make_broker
from tests.support.sinks import RecordingSink
from tests.support.tcpproxy import TcpProxy
from tests.support.waiting import wait_for


@pytest.fixture
def buses() -> Iterator[list[BufferedBus]]:
    made: list[BufferedBus] = []
    yield made
    for bus in made:
        bus.close()


def started(buses: list[BufferedBus], url: str, prefix: str, entities: list[str],
            **kwargs: Any) -> tuple[Any, RecordingSink]:
    bus = bus_from_url(url, topic_prefix=prefix, **kwargs)
    assert isinstance(bus, BufferedBus)
    buses.append(bus)
    sink = RecordingSink()
    bus.start(sink, entities)
    wait_for(lambda: len(sink.resyncs) >= len(entities), timeout=20, message="the subscriptions")
    return bus, sink


# -- URLs and configuration ------------------------------------------------------


def test_nsq_urls_parse_into_addresses_and_options() -> None:
    assert parse_nsq_url("nsq://h1:4150,h2:4151") == {
        "nsqd": ["h1:4150", "h2:4151"], "lookupd": [], "max_in_flight": 2500,
        "max_backoff": 2.0, "lookupd_poll_interval": 15.0, "lookupd_retry_interval": 1.0, "ready_timeout": 10.0,
        "stall_timeout": 10.0, "heartbeat_interval": 1,
        "channel": None, "output_buffer_timeout": OUTPUT_BUFFER_TIMEOUT, "output_buffer_size": OUTPUT_BUFFER_SIZE}
    parsed = parse_nsq_url("nsq://?lookupd=http://a:4161&lookupd=http://b:4161&max_in_flight=10&channel=web1")
    assert parsed["nsqd"] == [] and parsed["lookupd"] == ["http://a:4161", "http://b:4161"]
    assert parsed["max_in_flight"] == 10 and parsed["channel"] == "web1"
    parsed = parse_nsq_url("nsq://h1:4150?output_buffer_timeout=25&output_buffer_size=-1")
    assert (parsed["output_buffer_timeout"], parsed["output_buffer_size"]) == (25, -1)


@pytest.mark.parametrize("url, fragment", [
    ("nsq://", "name an nsqd"),
    ("nsq://h1", "must be host:port"),
    ("nsq://h1:4150?max_in_flight=0", "max_in_flight"),
    ("nsq://h1:4150?max_in_flight=lots", "max_in_flight"),
    ("nsq://h1:4150?bogus=1", "unknown nsq:// option"),
    ("nsq://?lookupd=h:4161", "must be an http:// URL"),
    ("nsq://h1:4150?channel=has%20space", "channel"),
    ("nsq://h1:4150?output_buffer_timeout=0", "output_buffer_timeout"),
    ("nsq://h1:4150?output_buffer_timeout=-2", "output_buffer_timeout"),
    ("nsq://h1:4150?output_buffer_size=16k", "output_buffer_size"),
    ("nsq://h1:4150?heartbeat_interval=0", "heartbeat_interval"),
    ("nsq://h1:4150?heartbeat_interval=1.5", "heartbeat_interval"),
    ("nsq://h1:4150?heartbeat_interval=301", "heartbeat_interval must be a whole number of seconds from 1"),
    ("redis://h:6379/0?health_check_interval=often", "health_check_interval must be a number of seconds"),
    ("redis://h:6379/0?health_check_interval=0", "health_check_interval must be more than 0"),
    ("redis://h:6379/0?max_backoff=-1", "max_backoff must be more than 0"),
    ("kafka://h:9092", "unsupported bus"),
])
def test_bad_bus_urls_raise_config_errors(url: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        bus_from_url(url)


def test_liveness_and_retry_options_reach_the_buses() -> None:
    """The defaults notice a silent broker within 3 s and retry within 2 s; the URL overrides them."""
    redis_bus = bus_from_url("redis://h:6379/0")
    kwargs = redis_bus._client.connection_pool.connection_kwargs
    assert (redis_bus.health_check_interval, redis_bus.retry_max) == (1.0, 2.0)
    assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"]) == (3.0, 2.0)
    redis_bus = bus_from_url("redis://h:6379/0?health_check_interval=5&max_backoff=10&socket_timeout=9")
    kwargs = redis_bus._client.connection_pool.connection_kwargs
    assert (redis_bus.health_check_interval, redis_bus.retry_max, kwargs["socket_timeout"]) == (5.0, 10.0, 9.0)
    nsq_bus = bus_from_url("nsq://h:4150")
    assert nsq_bus._connection_options() == {"heartbeat_interval": 1, "timeout": 3}
    assert nsq_bus.retry_max == 2.0
    nsq_bus = bus_from_url("nsq://h:4150?heartbeat_interval=5&max_backoff=4")
    assert nsq_bus._connection_options() == {"heartbeat_interval": 5, "timeout": 11}
    assert nsq_bus.retry_max == 4.0


def test_errors_and_descriptions_never_show_redis_credentials() -> None:
    url = "redis://user:s3cret-pw@127.0.0.1:1/0"
    assert redact(url) == "redis://127.0.0.1:1/0"
    bus = RedisBus(url)
    assert "s3cret-pw" not in bus.describe()
    with pytest.raises(ConfigError) as info:
        bus_from_url("redis://user:s3cret-pw@127.0.0.1:notaport/0")
    assert "s3cret-pw" not in str(info.value)


@pytest.mark.parametrize("prefix", ["has space", "x" * 65, "ünicode"])
def test_bad_topic_prefixes_are_refused(prefix: str) -> None:
    with pytest.raises(ConfigError, match="ENTITYSYNC_TOPIC_PREFIX"):
        RedisBus("redis://127.0.0.1:6379/0", topic_prefix=prefix)


def test_a_topic_longer_than_nsq_allows_is_refused_when_the_entity_is_added() -> None:
    bus = NsqBus(["127.0.0.1:4150"], topic_prefix="p" * 60)
    with pytest.raises(ConfigError, match="longer than 64"):
        bus.start(RecordingSink(), ["items"])


# -- behaviour against real brokers ----------------------------------------------


def test_an_overflowing_publish_buffer_makes_every_server_resync(broker: Any, buses: list[BufferedBus],
                                                                 uid: str) -> None:
    proxy = TcpProxy(broker.port)
    try:
        cut_off, _ = started(buses, broker.url(proxy.port), uid, ["items"], buffer_size=3)
        other, other_sink = started(buses, broker.url(), uid, ["items"])
        proxy.cut()
        cut_off.publish([EntityKey("items", n) for n in range(10)])
        wait_for(lambda: cut_off.stats()["dropped"] == 7, message="seven keys dropped")
        resyncs = len(other_sink.resyncs)
        proxy.restore()
        wait_for(lambda: len(other_sink.keys) == 3 and len(other_sink.resyncs) > resyncs, timeout=30,
                 message="the three kept keys and a resync of items")
        assert other_sink.keys == [EntityKey("items", n) for n in range(3)]
        assert other_sink.resyncs[-1] == "items"
        assert other.stats()["received"] == 4
    finally:
        proxy.close()


def test_an_entity_added_after_start_is_received(broker: Any, buses: list[BufferedBus], uid: str) -> None:
    a, sink = started(buses, broker.url(), uid, ["items"])
    a.add_entity("late")
    wait_for(lambda: "late" in sink.resyncs, timeout=20, message="the late entity's subscription")
    a.publish([EntityKey("late", 1)])
    wait_for(lambda: sink.keys == [EntityKey("late", 1)], message="the late entity's key")


def test_close_publishes_what_is_buffered(broker: Any, buses: list[BufferedBus], uid: str) -> None:
    _, sink = started(buses, broker.url(), uid, ["items"])
    closing = bus_from_url(broker.url(), topic_prefix=uid)
    closing.start(RecordingSink(), [])
    closing.publish([EntityKey("items", "last")])
    closing.close()
    wait_for(lambda: EntityKey("items", "last") in sink.keys, message="the last notification")


def test_a_consumer_whose_rdy_greenlet_died_is_replaced_and_resyncs(buses: list[BufferedBus], uid: str) -> None:
    broker = make_broker("nsq")
    try:
        bus, sink = started(buses, broker.url(), uid, ["items"])
        assert isinstance(bus, NsqBus)
        consumer = bus._consumers["items"]
        resyncs = len(sink.resyncs)
        # What gnsq's race after an nsqd crash does: its RDY greenlet ends.
        bus._executor.spawn(lambda: consumer._killables.kill(block=False))
        wait_for(lambda: bus.stats().get("consumers_replaced") == 1, message="the consumer to be replaced")
        wait_for(lambda: len(sink.resyncs) > resyncs, message="a resync from the new consumer")
        assert bus._consumers["items"] is not consumer
        bus.publish([EntityKey("items", "after")])
        wait_for(lambda: EntityKey("items", "after") in sink.keys, message="delivery by the new consumer")
    finally:
        broker.close()


class _Lookupd(BaseHTTPRequestHandler):
    """A stand-in for nsqlookupd's HTTP API that knows one nsqd.

    With ``topics`` set, ``/lookup`` answers as nsqlookupd does for a topic no nsqd
    has registered yet, 404 ``TOPIC_NOT_FOUND``, until ``topics`` says it exists."""

    nsqd: tuple[int, int] = (0, 0)
    topics: Callable[[], set[str]] | None = None
    misses: list[str] = []

    def do_GET(self) -> None:
        tcp, http = self.nsqd
        producer = {"broadcast_address": "127.0.0.1", "hostname": "test", "remote_address": "127.0.0.1:1",
                    "tcp_port": tcp, "http_port": http, "version": "1.3.0"}
        path, _, query = self.path.partition("?")
        topic = parse_qs(query).get("topic", [""])[0]
        if path == "/lookup" and self.topics is not None and topic not in self.topics():
            self.misses.append(topic)
            body = b'{"message":"TOPIC_NOT_FOUND"}'
            self.send_response(404)
        elif path in ("/lookup", "/nodes"):
            body = json.dumps({"channels": [], "producers": [producer]}).encode()
            self.send_response(200)
        else:
            body = b'{"message":"NOT_FOUND"}'
            self.send_response(404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_nsq_through_lookupd_discovers_where_to_receive_and_publish(buses: list[BufferedBus], uid: str) -> None:
    """nsqlookupd is not on this machine either: its HTTP API is stood in for by a few lines here."""
    broker = make_broker("nsq")
    handler = type("Lookupd", (_Lookupd,), {"nsqd": (broker.nsqd.tcp_port, broker.nsqd.http_port)})
    lookupd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=lookupd.serve_forever, daemon=True).start()
    try:
        url = f"nsq://?lookupd=http://127.0.0.1:{lookupd.server_port}"
        bus, sink = started(buses, url, uid, ["items"])
        bus.publish([EntityKey("items", 1)])
        wait_for(lambda: sink.keys == [EntityKey("items", 1)], message="a key through the discovered nsqd")
    finally:
        lookupd.shutdown()
        broker.close()


def test_nsq_through_lookupd_finds_a_topic_soon_after_its_first_publish(buses: list[BufferedBus], uid: str) -> None:
    """On a fresh cluster lookupd knows no topic until something is published to it; the
    consumer asks again every lookupd_retry_interval, not every lookupd_poll_interval."""
    broker = make_broker("nsq")

    def topics() -> set[str]:
        return {t["topic_name"] for t in broker.nsqd.stats()["topics"] or ()}

    misses: list[str] = []
    handler = type("Lookupd", (_Lookupd,), {"nsqd": (broker.nsqd.tcp_port, broker.nsqd.http_port),
                                            "topics": staticmethod(topics), "misses": misses})
    lookupd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=lookupd.serve_forever, daemon=True).start()
    try:
        url = f"nsq://?lookupd=http://127.0.0.1:{lookupd.server_port}&lookupd_poll_interval=300"
        bus = bus_from_url(url, topic_prefix=uid)
        assert isinstance(bus, BufferedBus)
        buses.append(bus)
        sink = RecordingSink()
        bus.start(sink, ["items"])
        wait_for(lambda: misses, message="the consumer's first lookup, a 404")
        assert not sink.resyncs  # connected to nothing yet
        bus.publish([EntityKey("items", 1)])  # creates the topic on the nsqd
        # Within a few retries, far inside the 300 s poll interval: the consumer connects
        # and gets the key (held by the topic until a channel exists, and resynced anyway).
        wait_for(lambda: EntityKey("items", 1) in sink.keys, timeout=20,
                 message="the key, once lookupd knows the topic")
    finally:
        lookupd.shutdown()
        broker.close()


def test_gnsq_does_not_warn_about_connections_closed_on_purpose(buses: list[BufferedBus], uid: str,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    broker = make_broker("nsq")
    try:
        bus, sink = started(buses, broker.url(), uid, ["items"])
        bus.publish([EntityKey("items", 1)])
        wait_for(lambda: sink.keys, message="a key")
        with caplog.at_level(logging.INFO):
            bus.close()
            wait_for(lambda: not bus._consumers["items"].is_running, message="the consumer to close")
        assert not [r for r in caplog.records if "connection lost" in r.getMessage()]
    finally:
        broker.close()


# -- reading NSQ connections in batches -----------------------------------------


class _FakeConn:
    """What listen_in_batches uses of gnsq's connection: a stream to read, and handlers."""

    tls_v1 = snappy = deflate = False

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.sent: list[bytes] = []
        self.responses: list[bytes] = []
        self.is_connected = True
        self.in_flight = 0
        self.last_message = self.last_response = 0.0
        conn = self

        class Sock:
            def recv(self, size: int) -> bytes:
                return conn.chunks.pop(0) if conn.chunks else b""

        class Stream:
            socket = Sock()

            def consume_buffer(self) -> bytes:
                return b""

        self.stream = Stream()

    def send(self, data: bytes) -> None:
        self.sent.append(data)

    def close_stream(self) -> None:
        self.is_connected = False

    def handle_response(self, data: bytes) -> None:
        self.responses.append(data)

    def handle_error(self, data: bytes) -> None:
        self.responses.append(b"error: " + data)


def _frame(kind: int, data: bytes) -> bytes:
    return struct.pack(">ii", len(data) + 4, kind) + data


def _message(msg_id: bytes, body: bytes) -> bytes:
    return _frame(2, struct.pack(">qH", 0, 1) + msg_id + body)


_IDS = [f"{i:016x}".encode() for i in range(5)]
_STREAM = (_message(_IDS[0], b"a") + _message(_IDS[1], b"b") + _frame(0, b"_heartbeat_")
           + _message(_IDS[2], b"c") + _message(_IDS[3], b"d") + _message(_IDS[4], b"e"))


@pytest.mark.parametrize("cut", [1, 7, 30, 41, 80, len(_STREAM) - 3])
def test_a_connection_is_read_in_batches_whatever_the_read_boundaries(cut: int) -> None:
    import gnsq.errors

    from entitysync_sync.bus._gnsq_batches import can_batch, listen_in_batches

    conn = _FakeConn([_STREAM[:cut], _STREAM[cut:]])  # frames split across two reads
    assert can_batch(conn)
    events: list[tuple[str, Any]] = []
    conn.handle_response = lambda data: events.append(("response", data))  # type: ignore[method-assign]
    with pytest.raises(gnsq.errors.NSQSocketError):  # then the stream ends: the connection is lost
        listen_in_batches(conn, lambda bodies: events.append(("batch", bodies)),
                          lambda: events.append(("finished", None)))
    # Every body once, in order, and the heartbeat between the messages it came between.
    flat = [x for kind, value in events if kind != "finished" for x in (value if kind == "batch" else [value])]
    assert flat == [b"a", b"b", b"_heartbeat_", b"c", b"d", b"e"]
    batches = [value for kind, value in events if kind == "batch"]
    # One write of FINs per batch, each id finished once, in order; then gnsq's bookkeeping.
    assert len(conn.sent) == len(batches) == sum(kind == "finished" for kind, _ in events)
    assert b"".join(conn.sent) == b"".join(b"FIN " + msg_id + b"\n" for msg_id in _IDS)
    assert conn.in_flight == 0 and not conn.is_connected
