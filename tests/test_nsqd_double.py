"""The NSQ protocol, as nsqd 1.3.0 speaks it, checked through gnsq and raw sockets.

These run against the protocol double by default and against a real nsqd when
``NSQD_BIN`` names one; they assert what the protocol spec and nsqd's source say,
so a difference between the two is a bug in the double. Assertions that hold only
for the double's documented deviations are marked ``if not nsqd.is_real``.

pytest does not monkey-patch here: gnsq runs on gevent's own sockets in this
thread's hub, so waits that must let gnsq's greenlets run use ``gevent.sleep``.
"""

from __future__ import annotations

import http.client
import json
import socket
import struct
import time
from collections.abc import Callable, Iterator
from typing import Any

import gevent
import gnsq
import pytest

from tests.support.nsqd import Nsqd, NsqdHTTPError
from tests.support.waiting import wait_for


def poll(predicate: Callable[[], Any], timeout: float = 10.0, message: str = "condition") -> Any:
    """:func:`wait_for`, yielding to gevent so gnsq's greenlets keep running."""
    return wait_for(predicate, timeout, message=message, sleep=gevent.sleep)


# --------------------------------------------------------------------------- a raw protocol client


class Raw:
    """A bare TCP client of protocol V2 (stdlib socket) for error paths and exact timings."""

    def __init__(self, nsqd: Nsqd, magic: bytes = b"  V2") -> None:
        host, port = nsqd.tcp_address.split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.sock.sendall(magic)
        self.buf = b""

    def send(self, line: str, body: bytes | None = None) -> None:
        data = line.encode() + b"\n"
        if body is not None:
            data += struct.pack(">i", len(body)) + body
        self.sock.sendall(data)

    def identify(self, **fields: Any) -> tuple[int, bytes]:
        self.send("IDENTIFY", json.dumps(fields).encode())
        return self.read()

    def sub(self, topic: str, channel: str) -> tuple[int, bytes]:
        self.send(f"SUB {topic} {channel}")
        return self.read()

    def _fill(self, timeout: float) -> bool:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return False
        if not data:
            raise EOFError
        self.buf += data
        return True

    def read(self, timeout: float = 10.0, skip_heartbeats: bool = True) -> tuple[int, bytes]:
        """The next frame as (frame type, data)."""
        deadline = time.monotonic() + timeout
        while True:
            while len(self.buf) < 4 or len(self.buf) < 4 + struct.unpack(">i", self.buf[:4])[0]:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._fill(remaining):
                    raise TimeoutError(f"no frame within {timeout}s")
            size = struct.unpack(">i", self.buf[:4])[0]
            kind, data = struct.unpack(">i", self.buf[4:8])[0], self.buf[8:4 + size]
            self.buf = self.buf[4 + size:]
            if skip_heartbeats and kind == 0 and data == b"_heartbeat_":
                continue
            return kind, data

    def message(self, timeout: float = 10.0) -> tuple[int, int, bytes, bytes]:
        """The next message frame as (timestamp ns, attempts, id, body)."""
        kind, data = self.read(timeout)
        assert kind == 2, (kind, data)
        timestamp, attempts = struct.unpack(">qH", data[:10])
        return timestamp, attempts, data[10:26], data[26:]

    def error(self, timeout: float = 10.0) -> bytes:
        kind, data = self.read(timeout)
        assert kind == 1, (kind, data)
        return data

    def assert_silent(self, within: float) -> None:
        try:
            frame = self.read(within)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected frame {frame!r}")

    def assert_closed(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                self._fill(deadline - time.monotonic())
        except (EOFError, ConnectionResetError):
            return
        raise AssertionError("connection still open")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw(nsqd: Nsqd) -> Iterator[Callable[..., Raw]]:
    opened: list[Raw] = []

    def connect(**kwargs: Any) -> Raw:
        conn = Raw(nsqd, **kwargs)
        opened.append(conn)
        return conn

    yield connect
    for conn in opened:
        conn.close()


def subscribed(raw: Callable[..., Raw], topic: str, channel: str, **identify: Any) -> Raw:
    conn = raw()
    if identify:
        assert conn.identify(**identify) == (0, b"OK")
    assert conn.sub(topic, channel) == (0, b"OK")
    return conn


# --------------------------------------------------------------------------- gnsq helpers


class Inbox:
    """Messages a gnsq Consumer received (finished automatically when the handler returns)."""

    def __init__(self) -> None:
        self.messages: list[gnsq.Message] = []

    def __call__(self, consumer: gnsq.Consumer, message: gnsq.Message) -> None:
        self.messages.append(message)

    @property
    def bodies(self) -> list[bytes]:
        return [m.body for m in self.messages]

    def wait(self, count: int, timeout: float = 10.0) -> list[bytes]:
        poll(lambda: len(self.messages) >= count, timeout, f"{count} messages (have {self.bodies})")
        return self.bodies


@pytest.fixture
def consumers(nsqd: Nsqd) -> Iterator[Callable[..., tuple[gnsq.Consumer, Inbox]]]:
    started: list[gnsq.Consumer] = []

    def start(topic: str, channel: str, **kwargs: Any) -> tuple[gnsq.Consumer, Inbox]:
        inbox = Inbox()
        consumer = gnsq.Consumer(topic, channel, nsqd.tcp_address, message_handler=inbox, **kwargs)
        consumer.start(block=False)
        started.append(consumer)
        return consumer, inbox

    yield start
    for consumer in started:
        consumer.close()
        consumer.join(timeout=5)


@pytest.fixture
def producer(nsqd: Nsqd) -> Iterator[gnsq.Producer]:
    prod = gnsq.Producer(nsqd.tcp_address, max_backoff_duration=1)
    prod.start()
    yield prod
    prod.close()
    prod.join(timeout=5)


def channel_stats(nsqd: Nsqd, topic: str, channel: str) -> dict[str, Any]:
    found = poll(lambda: nsqd.channel_stats(topic, channel), message=f"channel {topic}/{channel} in /stats")
    return found  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- publish and consume


def test_publish_consume_round_trip_with_gnsq(nsqd: Nsqd, producer: gnsq.Producer, consumers: Any) -> None:
    _, inbox = consumers("round", "c1")
    poll(lambda: nsqd.channel_stats("round", "c1"), message="the consumer's channel")
    before = time.time_ns()
    with gevent.Timeout(10):
        assert producer.publish("round", b"hello \x00 world") == b"OK"
    assert inbox.wait(1) == [b"hello \x00 world"]
    msg = inbox.messages[0]
    assert msg.attempts == 1
    assert len(msg.id) == 16 and msg.id.isalnum()
    assert before - 5e9 < msg.timestamp < time.time_ns() + 5e9
    stats = poll(lambda: (c := nsqd.channel_stats("round", "c1")) and c["in_flight_count"] == 0 and c,
                 message="the message to be finished")
    assert stats["message_count"] == 1 and stats["depth"] == 0 and stats["client_count"] == 1
    assert nsqd.topic_stats("round")["message_count"] == 1  # type: ignore[index]


def test_mpub_over_tcp_and_http(nsqd: Nsqd, producer: gnsq.Producer, consumers: Any) -> None:
    _, inbox = consumers("many", "c", max_in_flight=20)
    poll(lambda: nsqd.channel_stats("many", "c"), message="the consumer's channel")
    with gevent.Timeout(10):
        assert producer.multipublish("many", [b"t1", b"t2", b"t3"]) == b"OK"
    nsqd.mpub("many", [b"h1", b"h2"])
    nsqd.mpub("many", [b"b1\nwith newline", b"b2"], binary=True)
    assert sorted(inbox.wait(7)) == sorted([b"t1", b"t2", b"t3", b"h1", b"h2", b"b1\nwith newline", b"b2"])
    assert len({m.id for m in inbox.messages}) == 7


def post_expecting_continue(nsqd: Nsqd, target: str, body: bytes) -> tuple[int, Any, bytes]:
    """POST with ``Expect: 100-continue``: the body goes only if the server asks for it."""
    host, port = nsqd.http_address.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.putrequest("POST", target)
        conn.putheader("Content-Length", str(len(body)))
        conn.putheader("Expect", "100-continue")
        conn.endheaders()
        assert conn.sock is not None
        conn.sock.settimeout(10)
        if conn.sock.recv(12, socket.MSG_PEEK).startswith(b"HTTP/1.1 100"):
            interim = b""
            while not interim.endswith(b"\r\n\r\n"):  # the interim answer's head, then the body
                interim += conn.sock.recv(1)
            conn.send(body)
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


def test_http_publish_errors(nsqd: Nsqd) -> None:
    for call, status, code in [
        (lambda: nsqd.request("POST", "/pub", {"topic": "t"}, b""), 400, "MSG_EMPTY"),
        (lambda: nsqd.request("POST", "/pub", {}, b"x"), 400, "MISSING_ARG_TOPIC"),
        (lambda: nsqd.request("POST", "/pub", {"topic": "bad topic"}, b"x"), 400, "INVALID_TOPIC"),
        (lambda: nsqd.request("POST", "/pub", {"topic": "t" * 65}, b"x"), 400, "INVALID_TOPIC"),
        (lambda: nsqd.request("POST", "/mpub", {"topic": "t", "binary": "true"}, b"\0\0\0\0"), 413, "BAD_BODY"),
        (lambda: nsqd.request("GET", "/pub"), 405, "METHOD_NOT_ALLOWED"),
    ]:
        with pytest.raises(NsqdHTTPError) as err:
            call()
        assert (err.value.status, err.value.message) == (status, code)
    # nsqd refuses a body over its limit by its Content-Length, before reading it, and closes
    # the connection: a client that writes the whole body first may find it reset.
    for path, limit, code in [("/pub", 1024 * 1024, "MSG_TOO_BIG"), ("/mpub", 5 * 1024 * 1024, "BODY_TOO_BIG")]:
        status, headers, body = post_expecting_continue(nsqd, f"{path}?topic=t", b"x" * (limit + 1))
        assert (status, json.loads(body)["message"]) == (413, code)
        assert headers.get("Connection", "").lower() == "close"
    nsqd.pub("t" * 64, b"a 64-character name is the longest allowed")
    nsqd.pub("t#ephemeral", b"so is an #ephemeral suffix")
    assert nsqd.topic_stats("t" * 64)["message_count"] == 1  # type: ignore[index]


# --------------------------------------------------------------------------- flow control and acknowledgement


def test_rdy_caps_messages_in_flight(nsqd: Nsqd, raw: Any) -> None:
    conn = subscribed(raw, "flow", "c")
    nsqd.mpub("flow", [b"m1", b"m2", b"m3", b"m4", b"m5"])
    conn.send("RDY 2")
    first = [conn.message(), conn.message()]
    conn.assert_silent(0.5)
    assert nsqd.channel_stats("flow", "c")["in_flight_count"] == 2  # type: ignore[index]
    conn.send(f"FIN {first[0][2].decode()}")
    third = conn.message()
    conn.assert_silent(0.3)
    conn.send("RDY 0")
    for msg in (first[1], third):
        conn.send(f"FIN {msg[2].decode()}")
    conn.assert_silent(0.3)
    assert nsqd.channel_stats("flow", "c")["depth"] == 2  # type: ignore[index]
    assert [m[3] for m in (*first, third)] == [b"m1", b"m2", b"m3"]


def test_a_connection_gets_nothing_until_it_sends_rdy(nsqd: Nsqd, raw: Any) -> None:
    conn = subscribed(raw, "held", "c")
    nsqd.mpub("held", [b"h1", b"h2", b"h3"])
    conn.assert_silent(0.5)
    stats = nsqd.channel_stats("held", "c")
    assert stats is not None and (stats["depth"], stats["in_flight_count"]) == (3, 0)
    assert [c["ready_count"] for c in stats["clients"]] == [0]  # every connection starts at RDY 0
    conn.send("RDY")  # no count means 1
    first = conn.message()
    conn.assert_silent(0.3)
    stats = nsqd.channel_stats("held", "c")
    assert stats is not None and (stats["depth"], stats["in_flight_count"]) == (2, 1)
    assert [c["ready_count"] for c in stats["clients"]] == [1]
    conn.send("RDY 5")
    assert [first[3], conn.message()[3], conn.message()[3]] == [b"h1", b"h2", b"h3"]


def test_lowering_rdy_below_in_flight_waits_for_finishes(nsqd: Nsqd, raw: Any) -> None:
    conn = subscribed(raw, "lower", "c")
    nsqd.mpub("lower", [b"l1", b"l2", b"l3", b"l4"])
    conn.send("RDY 3")
    held = [conn.message() for _ in range(3)]
    conn.send("RDY 1")
    conn.send(f"FIN {held[0][2].decode()}")
    conn.assert_silent(0.3)  # two in flight, RDY 1: nothing more
    conn.send(f"FIN {held[1][2].decode()}")
    conn.assert_silent(0.3)  # one in flight, RDY 1: still nothing
    conn.send(f"FIN {held[2][2].decode()}")
    assert conn.message()[3] == b"l4"


def test_a_channel_sends_only_to_its_ready_connections(nsqd: Nsqd, raw: Any) -> None:
    idle = subscribed(raw, "share", "c")
    ready = subscribed(raw, "share", "c")
    ready.send("RDY 10")
    nsqd.mpub("share", [b"s1", b"s2", b"s3"])
    assert sorted(ready.message()[3] for _ in range(3)) == [b"s1", b"s2", b"s3"]
    idle.assert_silent(0.3)
    clients = nsqd.channel_stats("share", "c")["clients"]  # type: ignore[index]
    assert sorted((c["ready_count"], c["in_flight_count"]) for c in clients) == [(0, 0), (10, 3)]


def test_fin_req_touch_and_their_non_fatal_errors(nsqd: Nsqd, raw: Any) -> None:
    conn = subscribed(raw, "ack", "c")
    nsqd.pub("ack", b"work")
    conn.send("RDY 1")
    _, attempts, msg_id, body = conn.message()
    assert (attempts, body) == (1, b"work")
    conn.send(f"REQ {msg_id.decode()} 0")
    _, attempts, again, _ = conn.message()
    assert (again, attempts) == (msg_id, 2)
    started = time.monotonic()
    conn.send(f"REQ {msg_id.decode()} 3000")
    # nsqd handles a connection's commands and HTTP requests concurrently: poll for the REQ.
    poll(lambda: (c := nsqd.channel_stats("ack", "c")) and c["deferred_count"] == 1,
         message="the message to be deferred")
    # A deferred message comes due on a queue scan; nsqd only scans a new channel after its
    # next scan refresh, every 5 s.
    _, attempts, again, _ = conn.message(timeout=15)
    assert (again, attempts) == (msg_id, 3)
    assert time.monotonic() - started >= 2.9
    conn.send(f"TOUCH {msg_id.decode()}")
    conn.send(f"FIN {msg_id.decode()}")
    conn.assert_silent(0.3)  # TOUCH and FIN succeed silently
    for verb, code in [("FIN", b"E_FIN_FAILED"), ("REQ", b"E_REQ_FAILED"), ("TOUCH", b"E_TOUCH_FAILED")]:
        conn.send(f"{verb} {msg_id.decode()}" + (" 0" if verb == "REQ" else ""))
        assert conn.error().startswith(code + b" ")
    nsqd.pub("ack", b"the connection survived")
    assert conn.message()[3] == b"the connection survived"
    stats = nsqd.channel_stats("ack", "c")
    assert stats is not None and stats["requeue_count"] == 2 and stats["timeout_count"] == 0


def test_unfinished_message_is_requeued_after_msg_timeout(nsqd: Nsqd, raw: Any) -> None:
    conn = subscribed(raw, "slow", "c", msg_timeout=1000)
    nsqd.pub("slow", b"too slow")
    conn.send("RDY 1")
    _, attempts, msg_id, _ = conn.message()
    delivered = time.monotonic()
    assert attempts == 1
    # nsqd only scans a new channel for timed-out messages after its next scan refresh (every 5 s).
    _, attempts, again, body = conn.message(timeout=15)
    assert (again, attempts, body) == (msg_id, 2, b"too slow")
    assert time.monotonic() - delivered >= 0.9
    assert nsqd.channel_stats("slow", "c")["timeout_count"] == 1  # type: ignore[index]


def test_touch_keeps_a_message_in_flight(nsqd: Nsqd, raw: Any) -> None:
    conn = subscribed(raw, "touchy", "c", msg_timeout=1000)
    nsqd.pub("touchy", b"long job")
    conn.send("RDY 1")
    msg_id = conn.message()[2].decode()
    for _ in range(4):  # 1.6 s of work against a 1 s timeout
        conn.assert_silent(0.4)
        conn.send(f"TOUCH {msg_id}")
    conn.send(f"FIN {msg_id}")
    conn.assert_silent(0.3)
    stats = nsqd.channel_stats("touchy", "c")
    assert stats is not None and stats["timeout_count"] == 0 and stats["in_flight_count"] == 0


# --------------------------------------------------------------------------- output buffering


def in_flight(nsqd: Nsqd, topic: str, channel: str, count: int) -> None:
    """Wait until nsqd has sent ``count`` messages of the channel (into the client's buffer, at least)."""
    poll(lambda: (c := nsqd.channel_stats(topic, channel)) and c["in_flight_count"] == count,
         message=f"{count} message(s) in flight on {topic}/{channel}")


def test_a_message_waits_in_the_output_buffer_until_the_client_is_not_ready(nsqd: Nsqd, raw: Any) -> None:
    # With RDY to spare, nsqd holds message frames in the client's output buffer until
    # its output_buffer_timeout ticks (30 s here), the buffer fills, another frame is
    # written, or the client is no longer ready for more.
    conn = subscribed(raw, "buffered", "c", output_buffer_timeout=30000)
    conn.send("RDY 5")
    nsqd.pub("buffered", b"held")
    in_flight(nsqd, "buffered", "c", 1)
    conn.assert_silent(0.5)
    conn.send("RDY 1")  # in flight now equals RDY: not ready, so nsqd writes its buffer
    assert conn.message()[3] == b"held"


def test_any_other_frame_writes_the_buffered_messages_before_it(nsqd: Nsqd, raw: Any) -> None:
    conn = subscribed(raw, "flushed", "c", output_buffer_timeout=30000)
    conn.send("RDY 5")
    nsqd.pub("flushed", b"first")
    in_flight(nsqd, "flushed", "c", 1)
    conn.send("PUB elsewhere", b"x")  # its OK is written after the buffered message
    assert conn.message()[3] == b"first"
    assert conn.read() == (0, b"OK")


def test_an_output_buffer_size_of_minus_one_writes_every_message_at_once(nsqd: Nsqd, raw: Any) -> None:
    # -1 turns the buffer off, and with it the 30 s timer asked for here.
    conn = subscribed(raw, "unbuffered", "c", output_buffer_timeout=30000, output_buffer_size=-1)
    conn.send("RDY 5")
    nsqd.pub("unbuffered", b"at once")
    assert conn.message(timeout=10)[3] == b"at once"


# --------------------------------------------------------------------------- heartbeats


def test_heartbeats_answered_with_nop_keep_the_connection(nsqd: Nsqd) -> None:
    conn = gnsq.NsqdTCPClient(*nsqd.tcp_address.split(":"), heartbeat_interval=1)
    beats: list[float] = []
    conn.on_response.connect(lambda _, response: beats.append(time.monotonic()) if response == b"_heartbeat_"
                             else None, weak=False)
    conn.connect()
    negotiated = conn.identify()
    assert negotiated is not None and negotiated["max_rdy_count"] == 2500
    conn.subscribe("beat", "c")
    listener = gevent.spawn(conn.listen)
    try:
        poll(lambda: len(beats) >= 3, timeout=6, message="three heartbeats")
        assert conn.is_connected  # three intervals: the NOPs gnsq sent kept it alive
        assert 0.7 < beats[2] - beats[1] < 1.5
    finally:
        conn.close_stream()
        listener.join(timeout=5)


def test_missed_heartbeats_disconnect(nsqd: Nsqd, raw: Any) -> None:
    conn = raw()
    assert conn.identify(heartbeat_interval=1000) == (0, b"OK")
    identified = time.monotonic()
    assert conn.read(timeout=3, skip_heartbeats=False) == (0, b"_heartbeat_")
    conn.assert_closed(timeout=5)
    assert 1.5 < time.monotonic() - identified < 4


# --------------------------------------------------------------------------- IDENTIFY and errors


def test_identify_feature_negotiation(nsqd: Nsqd, raw: Any) -> None:
    assert raw().identify(client_id="plain") == (0, b"OK")
    kind, data = raw().identify(feature_negotiation=True, tls_v1=True, heartbeat_interval=2000, msg_timeout=5000,
                                output_buffer_timeout=100, user_agent="test/1")
    answer = json.loads(data)
    assert kind == 0 and set(answer) == {
        "max_rdy_count", "version", "max_msg_timeout", "msg_timeout", "tls_v1", "deflate", "deflate_level",
        "max_deflate_level", "snappy", "sample_rate", "auth_required", "output_buffer_size", "output_buffer_timeout"}
    assert answer["tls_v1"] is False  # no --tls-cert: no upgrade
    assert (answer["max_rdy_count"], answer["max_msg_timeout"], answer["msg_timeout"]) == (2500, 900000, 5000)
    assert answer["output_buffer_timeout"] == 100 and answer["output_buffer_size"] == 16384
    assert answer["auth_required"] is False
    assert answer["version"].startswith("1.")
    if not nsqd.is_real:  # the double refuses compression, so a client never upgrades the stream
        _, data = raw().identify(feature_negotiation=True, deflate=True, snappy=True)
        assert json.loads(data)["deflate"] is False and json.loads(data)["snappy"] is False


@pytest.mark.parametrize(("steps", "code"), [
    ([("IDENTIFY", {"heartbeat_interval": 500})], b"E_BAD_BODY IDENTIFY heartbeat interval (500) is invalid"),
    ([("IDENTIFY", {"msg_timeout": 999})], b"E_BAD_BODY IDENTIFY msg timeout (999) is invalid"),
    ([("RAW", b"IDENTIFY\n\x00\x00\x00\x01{")], b"E_BAD_BODY"),
    ([("SUB t c", None), ("IDENTIFY", {})], b"E_INVALID cannot IDENTIFY in current state"),
    ([("SUB bad!topic c", None)], b"E_BAD_TOPIC"),
    ([("SUB t " + "c" * 65, None)], b"E_BAD_CHANNEL"),
    ([("SUB t c#ephemeral#ephemeral", None)], b"E_BAD_CHANNEL"),
    ([("SUB t", None)], b"E_INVALID"),
    ([("SUB t c", None), ("SUB t c", None)], b"E_INVALID"),
    ([("RDY 1", None)], b"E_INVALID cannot RDY in current state"),
    ([("SUB t c", None), ("RDY 2501", None)], b"E_INVALID RDY count 2501 out of range 0-2500"),
    ([("SUB t c", None), ("FIN short", None)], b"E_INVALID"),
    ([("BOGUS", None)], b"E_INVALID invalid command BOGUS"),
    ([("PUB bad/topic", None)], b"E_BAD_TOPIC"),
    ([("RAW", b"PUB t\n\x00\x00\x00\x00")], b"E_BAD_MESSAGE PUB invalid message body size 0"),
    ([("RAW", b"PUB t\n\x00\x10\x00\x01")], b"E_BAD_MESSAGE PUB message too big 1048577 > 1048576"),
    ([("RAW", b"MPUB t\n\x00\x00\x00\x04\x00\x00\x00\x00")], b"E_BAD_BODY MPUB invalid message count 0"),
    ([("RAW", b"MPUB t\n\x00\x00\x00\x08\x00\x00\x00\x01\x00\x00\x00\x00")], b"E_BAD_MESSAGE"),
    ([("RAW", b"AUTH\n\x00\x00\x00\x06secret")], b"E_AUTH_DISABLED"),
])
def test_fatal_errors_close_the_connection(raw: Any, steps: list[tuple[str, Any]], code: bytes) -> None:
    conn = raw()
    for line, body in steps[:-1]:
        conn.send(line, body)
        assert conn.read() == (0, b"OK")
    line, body = steps[-1]
    if line == "RAW":
        conn.sock.sendall(body)
    elif line == "IDENTIFY":
        conn.send(line, json.dumps(body).encode())
    else:
        conn.send(line)
    assert conn.error().startswith(code)
    conn.assert_closed()


def test_bad_magic_is_refused(raw: Any) -> None:
    conn = raw(magic=b"  V1")
    assert conn.error() == b"E_BAD_PROTOCOL"
    conn.assert_closed()


def test_cls_stops_delivery(nsqd: Nsqd, raw: Any) -> None:
    conn = subscribed(raw, "closing", "c")
    conn.send("CLS")
    assert conn.read() == (0, b"CLOSE_WAIT")
    nsqd.pub("closing", b"not for a closing client")
    conn.send("RDY 5")  # ignored after CLS
    conn.assert_silent(0.5)
    assert nsqd.channel_stats("closing", "c")["depth"] == 1  # type: ignore[index]


# --------------------------------------------------------------------------- topics and channels


def test_topic_holds_messages_until_its_first_channel(nsqd: Nsqd, consumers: Any) -> None:
    nsqd.mpub("early", [b"e1", b"e2", b"e3"])
    topic = nsqd.topic_stats("early")
    assert topic is not None and topic["depth"] == 3 and topic["channels"] == []
    _, inbox = consumers("early", "late-comer", max_in_flight=10)
    assert sorted(inbox.wait(3)) == [b"e1", b"e2", b"e3"]
    assert nsqd.topic_stats("early")["depth"] == 0  # type: ignore[index]


def test_every_channel_gets_every_message_and_a_channel_shares_them(nsqd: Nsqd, consumers: Any) -> None:
    _, a = consumers("fan", "a", max_in_flight=10)
    _, b1 = consumers("fan", "b", max_in_flight=10)
    _, b2 = consumers("fan", "b", max_in_flight=10)
    poll(lambda: (c := nsqd.channel_stats("fan", "b")) and c["client_count"] == 2 and nsqd.channel_stats("fan", "a"),
         message="both channels and all three consumers")
    bodies = [f"m{i}".encode() for i in range(20)]
    nsqd.mpub("fan", bodies)
    assert sorted(a.wait(20)) == sorted(bodies)
    poll(lambda: len(b1.messages) + len(b2.messages) >= 20, message="channel b to get every message")
    assert sorted(b1.bodies + b2.bodies) == sorted(bodies)
    assert {m.id for m in a.messages} == {m.id for m in b1.messages + b2.messages}  # one ID across channels


def test_ephemeral_channel_vanishes_with_its_last_client(nsqd: Nsqd, consumers: Any) -> None:
    eph, _ = consumers("eph", "watch#ephemeral")
    durable, _ = consumers("eph", "keep")
    poll(lambda: nsqd.channel_stats("eph", "watch#ephemeral") and nsqd.channel_stats("eph", "keep"),
         message="both channels")
    eph.close()
    durable.close()
    poll(lambda: nsqd.channel_stats("eph", "watch#ephemeral") is None, message="the ephemeral channel to go")
    assert nsqd.channel_stats("eph", "keep") is not None
    nsqd.pub("eph", b"only the durable channel queues this")
    assert nsqd.channel_stats("eph", "keep")["depth"] == 1  # type: ignore[index]


# --------------------------------------------------------------------------- going down and coming back


def test_restart_on_the_same_ports_keeps_durable_messages(nsqd: Nsqd, consumers: Any) -> None:
    consumer, inbox = consumers("durable", "c", max_backoff_duration=1)
    assert channel_stats(nsqd, "durable", "c")
    nsqd.pub("durable", b"before")
    assert inbox.wait(1) == [b"before"]
    consumer.close()
    poll(lambda: nsqd.channel_stats("durable", "c")["client_count"] == 0,  # type: ignore[index]
         message="the consumer to leave")
    nsqd.mpub("durable", [b"queued-1", b"queued-2"])
    addresses = (nsqd.tcp_address, nsqd.http_address)
    nsqd.stop()
    nsqd.start()
    assert (nsqd.tcp_address, nsqd.http_address) == addresses
    assert poll(lambda: (c := nsqd.channel_stats("durable", "c")) and c["depth"] == 2, message="saved messages")
    _, inbox = consumers("durable", "c", max_in_flight=5)
    assert sorted(inbox.wait(2)) == [b"queued-1", b"queued-2"]


def test_gnsq_reconnects_after_a_restart(nsqd: Nsqd, consumers: Any) -> None:
    producer = gnsq.Producer(nsqd.tcp_address, max_backoff_duration=1)
    producer.start()
    _, inbox = consumers("again", "c", max_backoff_duration=1)
    try:
        assert channel_stats(nsqd, "again", "c")
        with gevent.Timeout(10):
            producer.publish("again", b"one")
        assert inbox.wait(1) == [b"one"]
        # Handled is not yet finished: a message still in flight when nsqd stops is kept and
        # delivered again after the restart (at least once), so the restart waits for the FIN.
        poll(lambda: nsqd.channel_stats("again", "c")["in_flight_count"] == 0,  # type: ignore[index]
             message="the FIN of the first message")
        nsqd.stop()
        nsqd.start()

        def publish() -> bool:
            # A publish racing the outage fails rather than waits; the caller retries.
            try:
                with gevent.Timeout(2):
                    return bool(producer.publish("again", b"two", timeout=1) == b"OK")
            except (gnsq.errors.NSQException, gevent.Timeout):
                return False

        poll(publish, timeout=15, message="the producer to reconnect")
        assert inbox.wait(2, timeout=15) == [b"one", b"two"]
    finally:
        producer.close()


def test_kill_loses_queued_messages_but_not_the_channel(nsqd: Nsqd, consumers: Any) -> None:
    consumer, _ = consumers("crash", "c")
    assert channel_stats(nsqd, "crash", "c")
    consumer.close()
    nsqd.mpub("crash", [b"lost-1", b"lost-2"])
    assert channel_stats(nsqd, "crash", "c")["depth"] == 2
    nsqd.kill()
    nsqd.start()
    stats = poll(lambda: nsqd.channel_stats("crash", "c"), message="the channel after the crash")
    assert stats["depth"] == 0 and stats["message_count"] == 0
