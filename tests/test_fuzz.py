"""Fuzzing: the decoder as a property, and a live server under 10,000 hostile frames."""

from __future__ import annotations

import json
import random
import threading
from typing import Any

import pytest
import websocket
from hypothesis import given, settings
from hypothesis import strategies as st

from entitysync_sync import EntityKey
from entitysync_sync import protocol as p
from entitysync_sync.exceptions import ProtocolError
from entitysync_sync.keys import NotifiedKey
from tests.support.clients import Client
from tests.support.servers import ServerPool
from tests.support.waiting import wait_for

MESSAGES = (p.Subscribe, p.Unsubscribe, p.SetSecret, p.PassThrough)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=80),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20,
)
frames = st.fixed_dictionaries(
    {},
    optional={
        "action": st.sampled_from(["subscribe", "unsubscribe", "secret", "push", ""]) | json_values,
        "body": st.fixed_dictionaries({}, optional={"entity": json_values | st.text(max_size=70),
                                                    "id": json_values | st.text(max_size=300)}) | json_values,
        "ref": json_values,
    },
)


def _check(data: str | bytes) -> None:
    try:
        msg = p.decode_client_frame(data)
    except ProtocolError as exc:
        assert exc.code in {p.BAD_JSON, p.BAD_MESSAGE, p.UNKNOWN_ACTION}
        assert len(exc.message) < 400  # hostile input is never echoed at length
        return
    assert isinstance(msg, MESSAGES)
    if isinstance(msg, (p.Subscribe, p.Unsubscribe)):
        assert EntityKey(msg.key.entity, msg.key.id) == msg.key  # a valid key


@settings(max_examples=500, deadline=None)
@given(frames)
def test_any_json_frame_decodes_or_raises_a_protocol_error(frame: dict[str, Any]) -> None:
    _check(json.dumps(frame))


@settings(max_examples=1500, deadline=None)
@given(st.text(max_size=200) | st.binary(max_size=200))
def test_any_text_or_bytes_decodes_or_raises_a_protocol_error(data: str | bytes) -> None:
    _check(data)


@settings(max_examples=500, deadline=None)
@given(st.text(min_size=1, max_size=80).filter(str.isprintable))
def test_any_valid_id_is_encoded_in_a_key_exactly_as_the_json_encoder_would(id: str) -> None:
    text = p.encode_key(EntityKey("items", id))
    assert text == json.dumps({"entity": "items", "id": id}, ensure_ascii=False, separators=(",", ":"))


@settings(max_examples=500, deadline=None)
@given(st.text(min_size=1, max_size=40).filter(str.isprintable),
       st.none() | st.floats(allow_nan=False, allow_infinity=False), st.binary(max_size=24))
def test_a_key_channel_body_is_read_as_the_json_parse_reads_it(id: str, sent: float | None, tail: bytes) -> None:
    """The fast reading of a key channel's bodies: a publisher's own body, and that body's head
    followed by any bytes, read exactly as :func:`decode_bus_body` reads them."""
    key = EntityKey("items", id)
    body = p.encode_bus_body(key if sent is None else NotifiedKey.stamp(key, sent))
    for candidate in (body, body[:-1] + tail, p.encode_key(key).encode()[:-1] + b',"t":' + tail):
        try:
            want: Any = p.decode_bus_body(candidate)
        except ProtocolError:
            with pytest.raises(ProtocolError):
                p.decode_key_body(candidate, key)
            continue
        got = p.decode_key_body(candidate, key)
        assert (type(got), got, getattr(got, "notified_at", None)) == \
            (type(want), want, getattr(want, "notified_at", None))


def _hostile_frames(rng: random.Random, uid: str, n: int) -> list[str | bytes]:
    """Valid frames, mutations of them, random JSON, random bytes and oversized frames."""
    valid = [
        json.dumps({"action": "subscribe", "body": {"entity": "items", "id": f"{uid}-{rng.randrange(20)}"},
                    "ref": rng.randrange(1000)}),
        json.dumps({"action": "unsubscribe", "body": {"entity": "items", "id": f"{uid}-{rng.randrange(20)}"}}),
        json.dumps({"action": "secret", "body": "s" * rng.randrange(30)}),
    ]
    out: list[str | bytes] = []
    for i in range(n):
        choice = rng.random()
        base = rng.choice(valid)
        if choice < 0.25:
            out.append(base)
        elif choice < 0.6:  # mutate: flip, insert, delete or truncate
            chars = list(base)
            for _ in range(rng.randrange(1, 6)):
                pos = rng.randrange(len(chars))
                op = rng.randrange(4)
                if op == 0:
                    chars[pos] = chr(rng.randrange(0x20, 0x2FFF))
                elif op == 1:
                    chars.insert(pos, rng.choice('{}[]":,\\0nul\u0000\ud7ff'))
                elif op == 2 and len(chars) > 1:
                    del chars[pos]
                else:
                    chars = chars[:pos + 1]
            out.append("".join(chars))
        elif choice < 0.85:
            value: Any = rng.choice([None, True, 1e308, -1, 2**70, "x" * 50, [], {}, [[[[]]]], {"action": None}])
            frame = {"action": rng.choice(["subscribe", "unsubscribe", "secret", 7, None, ["subscribe"]]),
                     "body": rng.choice([value, {"entity": value, "id": value},
                                         {"entity": "items", "id": value}, {"entity": value, "id": "1"}]),
                     "ref": rng.choice([value, "r", 1])}
            out.append(json.dumps(frame))
        elif choice < 0.97:
            out.append(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))))
        else:
            out.append("[" * 5000 if i % 2 else "x" * 5000)  # over ENTITYSYNC_MAX_MESSAGE_BYTES: closed with 1009
    return out


@pytest.mark.parametrize("kind", ["gunicorn", "flask"])
def test_ten_thousand_hostile_frames_leave_the_server_as_it_was(servers: ServerPool, kind: str, uid: str) -> None:
    server = servers.get(kind, ENTITYSYNC_RATE_LIMIT=0)
    warm = Client(server.ws_url)  # the first connection starts the bus and the sweeper
    warm.subscribe("items", uid)
    warm.expect(lambda f: f["action"] == "gone")
    warm.close()
    wait_for(lambda: server.stats()["connections"] == 0, message="no connections left")
    baseline = server.stats()
    frames = _hostile_frames(random.Random(uid), uid, 10_000)
    closes: list[int | None] = []
    sent = 0
    while sent < len(frames):
        ws = websocket.create_connection(server.ws_url, timeout=10)
        drained = threading.Thread(target=_drain, args=(ws, closes), daemon=True)
        drained.start()
        try:
            while sent < len(frames):
                frame = frames[sent]
                sent += 1
                if isinstance(frame, bytes):
                    ws.send_binary(frame)
                else:
                    ws.send(frame)
                if isinstance(frame, str) and len(frame) > 4096:
                    break  # the server closes this connection; carry on with a new one
        except (websocket.WebSocketConnectionClosedException, ConnectionError):
            pass
        finally:
            ws.close()
            drained.join(10)
    assert sent == len(frames)
    assert 1009 in closes  # the oversized frames were refused
    wait_for(lambda: (s := server.stats())["connections"] == 0 and s["subscriptions"] == 0,
             message="every connection and subscription to be gone")
    wait_for(lambda: (s := server.stats())["greenlets"] <= baseline["greenlets"]
             and s["threads"] <= baseline["threads"], timeout=15,
             message=f"greenlets and threads back to {baseline}")
    fresh = Client(server.ws_url)
    try:
        fresh.subscribe("items", uid)
        fresh.expect(lambda f: f["action"] == "gone")
        server.set("items", uid, "after the storm")
        assert fresh.expect_push("items", uid) == {"id": uid, "value": "after the storm"}
    finally:
        fresh.close()
    assert "Traceback" not in server.log()


def _drain(ws: websocket.WebSocket, closes: list[int | None]) -> None:
    """Read everything the server sends, and record its close code."""
    while True:
        try:
            opcode, data = ws.recv_data(control_frame=True)
        except Exception:
            return
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            closes.append(int.from_bytes(data[:2], "big") if len(data) >= 2 else None)
            return
