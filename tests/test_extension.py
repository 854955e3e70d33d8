"""The extension in-process: registration, configuration, notify and its guarantees.

These run in the test process with real threads, the real memory bus and a
real hub; only the socket is replaced (by ``RecordingTransport``), so that a
test can hold a fetch or a write open and observe the ordering exactly.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest
from flask import Flask

from entitysync_sync import (
    ConfigError,
    EntityKey,
    EntitySync,
    InvalidKeyError,
    MemoryBus,
    UnknownEntityError,
)
from entitysync_sync.bus import KeyBuffer, bus_from_url
from entitysync_sync.connection import Connection
from tests.support.sinks import RecordingSink
from tests.support.waiting import wait_for


class RecordingTransport:
    """Stands in for the websocket: records frames; ``gate`` can hold writes."""

    def __init__(self) -> None:
        self.frames: list[Any] = []
        self.gate = threading.Event()
        self.gate.set()
        self.writing = threading.Event()
        self.closed_with: tuple[int, str] | None = None

    def send_text(self, text: str) -> None:
        self.writing.set()
        if not self.gate.wait(10):
            raise OSError("gate never opened")
        self.frames.append(json.loads(text))

    def close(self, code: int, reason: str) -> None:
        self.closed_with = (code, reason)
        self.gate.set()

    def pushes(self) -> list[Any]:
        return [f["body"] for f in self.frames if f["action"] == "push"]


def make_app(**config: Any) -> tuple[Flask, EntitySync]:
    app = Flask(__name__)
    app.config.update(config)
    return app, EntitySync(app)


def connect(app: Flask, secret: Any = None) -> tuple[Connection, RecordingTransport]:
    runtime = app.extensions["entitysync"]
    runtime.ensure_started()
    transport = RecordingTransport()
    return Connection(transport, runtime.hub, runtime.handlers, runtime.limits, secret), transport


def subscribe(conn: Connection, entity: str, id: str) -> None:
    conn.receive(json.dumps({"action": "subscribe", "body": {"entity": entity, "id": id}}))


def test_init_app_registers_once_and_refuses_a_second_time() -> None:
    app = Flask(__name__)
    es = EntitySync()
    es.init_app(app)
    assert app.extensions["entitysync"] is es.runtime(app)
    assert app.config["ENTITYSYNC_PATH"] == "/ws/entity-sync/"
    assert any(r.rule == "/ws/entity-sync/" for r in app.url_map.iter_rules())
    with pytest.raises(ConfigError, match="already registered"):
        es.init_app(app)
    with pytest.raises(ConfigError, match="already registered"):
        EntitySync(app)


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("ENTITYSYNC_MAX_SUBSCRIPTIONS", 0, "positive integer"),
        ("ENTITYSYNC_MAX_SUBSCRIPTIONS", "10", "positive integer"),
        ("ENTITYSYNC_ENVELOPE", "yes", "True or False"),
        ("ENTITYSYNC_SEND_TIMEOUT", -1, "positive number"),
        ("ENTITYSYNC_PATH", "ws", "starting with '/'"),
        ("ENTITYSYNC_BUS_URL", "carrier-pigeon://x", "unsupported bus"),
        ("ENTITYSYNC_BUS_URL", None, "must be a string"),
        ("ENTITYSYNC_TOPIC_PREFIX", "a b", "ENTITYSYNC_TOPIC_PREFIX"),
        ("ENTITYSYNC_ALLOWED_ORIGINS", 7, "ENTITYSYNC_ALLOWED_ORIGINS"),
        ("ENTITYSYNC_ALLOWED_ORIGINS", ["https://a", 3], "ENTITYSYNC_ALLOWED_ORIGINS"),
        ("ENTITYSYNC_PING_INTERVAL", -1, "ENTITYSYNC_PING_INTERVAL"),
        ("ENTITYSYNC_FETCH_TIMEOUT", "10", "ENTITYSYNC_FETCH_TIMEOUT"),
        ("ENTITYSYNC_FETCH_RETRY_MAX", True, "ENTITYSYNC_FETCH_RETRY_MAX"),
        ("ENTITYSYNC_RATE_LIMIT", -5, "frames per second"),
        ("ENTITYSYNC_RATE_BURST", 0, "positive integer"),
        ("ENTITYSYNC_SHARED_CACHE_SIZE", -1, "ENTITYSYNC_SHARED_CACHE_SIZE"),
        ("ENTITYSYNC_SHARED_CACHE_SIZE", 1.5, "number of characters"),
        ("ENTITYSYNC_BATCH_SIZE", 0, "positive integer"),
        ("ENTITYSYNC_DRAIN_SECONDS", -1, "ENTITYSYNC_DRAIN_SECONDS"),
    ],
)
def test_bad_config_raises_config_error_naming_the_key(key: str, value: Any, match: str) -> None:
    app = Flask(__name__)
    app.config[key] = value
    with pytest.raises(ConfigError, match=match):
        EntitySync(app)


def test_bus_url_errors_never_echo_credentials() -> None:
    with pytest.raises(ConfigError) as info:
        bus_from_url("redis2://user:hunter2@host/0")
    assert "hunter2" not in str(info.value)


def test_custom_path_is_routed() -> None:
    app, _ = make_app(ENTITYSYNC_PATH="/live/")
    assert any(r.rule == "/live/" for r in app.url_map.iter_rules())


def test_registration_errors_are_clear() -> None:
    _, es = make_app()

    @es.entity("items")
    def fetch(key: EntityKey, secret: Any) -> Any:
        return None

    with pytest.raises(ConfigError, match="already registered"):
        es.entity("items")(fetch)
    with pytest.raises(InvalidKeyError):
        es.entity("bad name")
    assert es.entities == {"items"}


def test_notify_validates_keys_and_entities() -> None:
    _, es = make_app()
    es.entity("items")(lambda key, secret: None)
    with pytest.raises(UnknownEntityError, match=r"@es\.entity"):
        es.notify("itmes", 1)
    with pytest.raises(InvalidKeyError):
        es.notify("items", "")
    with pytest.raises(TypeError):
        es.notify("items")
    es.notify("items", 1)
    es.notify(EntityKey("items", 1))
    es.notify_many([("items", 1), EntityKey("items", 2)])
    es.notify_many([])


def test_notify_without_init_app_says_what_to_do() -> None:
    es = EntitySync()
    es.entity("items")(lambda key, secret: None)
    with pytest.raises(ConfigError, match="init_app"):
        es.notify("items", 1)


def test_notify_works_from_a_thread_without_app_context() -> None:
    app, es = make_app()
    es.entity("items")(lambda key, secret: {"id": key.id})
    conn, transport = connect(app)
    subscribe(conn, "items", "1")
    wait_for(lambda: transport.pushes(), message="the first push")
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            es.notify("items", "1")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(10)
    assert errors == []
    wait_for(lambda: len(transport.pushes()) == 2, message="the push from the thread's notify")


def test_notify_returns_while_a_fetch_is_running_and_notifies_coalesce() -> None:
    app, es = make_app()
    started, release = threading.Event(), threading.Event()
    state = {"value": 0, "fetches": 0}

    @es.entity("items")
    def fetch(key: EntityKey, secret: Any) -> Any:
        state["fetches"] += 1
        started.set()
        assert release.wait(10)
        return {"value": state["value"]}

    conn, transport = connect(app)
    subscribe(conn, "items", "1")
    assert started.wait(10)
    for n in range(1, 51):  # all while the first fetch is held open
        state["value"] = n
        es.notify("items", "1")
    assert not release.is_set() and state["fetches"] == 1
    release.set()
    wait_for(lambda: transport.pushes() and transport.pushes()[-1] == {"value": 50},
             message="the push of the last value")
    assert state["fetches"] == 2  # the 50 notifies coalesced into one refresh


def test_a_slow_socket_does_not_delay_other_subscribers() -> None:
    app, es = make_app()
    es.entity("items")(lambda key, secret: {"id": key.id, "secret": secret})
    slow, slow_transport = connect(app, "slow")
    fast, fast_transport = connect(app, "fast")
    slow_transport.gate.clear()  # this client's socket accepts nothing
    subscribe(slow, "items", "1")
    subscribe(fast, "items", "1")
    assert slow_transport.writing.wait(10)
    es.notify("items", "1")
    wait_for(lambda: len(fast_transport.pushes()) == 2, message="the fast client's pushes")
    assert slow_transport.frames == []
    slow_transport.gate.set()
    wait_for(lambda: slow_transport.pushes() == [{"id": "1", "secret": "slow"}] * 2,
             message="the slow client to catch up")


def test_unsubscribe_during_a_fetch_drops_its_result() -> None:
    app, es = make_app()
    started, release = threading.Event(), threading.Event()

    @es.entity("items")
    def fetch(key: EntityKey, secret: Any) -> Any:
        started.set()
        release.wait(10)
        return {"id": key.id}

    conn, transport = connect(app)
    conn.receive('{"action":"subscribe","body":{"entity":"items","id":"1"},"ref":1}')
    assert started.wait(10)
    conn.receive('{"action":"unsubscribe","body":{"entity":"items","id":"1"},"ref":2}')
    release.set()
    wait_for(lambda: [f.get("ref") for f in transport.frames] == [1, 2], message="both acks")
    assert transport.pushes() == []
    assert conn.subscriptions == frozenset()


def test_close_drops_every_subscription_from_the_hub() -> None:
    app, es = make_app()
    es.entity("items")(lambda key, secret: None)
    conn, _ = connect(app)
    for n in range(5):
        subscribe(conn, "items", str(n))
    hub = es.hub()
    wait_for(lambda: hub.subscription_count == 5, message="five subscriptions")
    conn.close()
    assert hub.subscription_count == 0 and hub.key_count == 0 and hub.connection_count == 0
    subscribe(conn, "items", "9")  # ignored once closed
    assert hub.subscription_count == 0


def test_hook_errors_become_error_frames_without_the_secret(caplog: pytest.LogCaptureFixture) -> None:
    app, es = make_app()
    es.entity("items")(lambda key, secret: None)

    @es.authorize
    def authorize(key: EntityKey, secret: Any) -> bool:
        raise RuntimeError("auth backend down")

    @es.on_message
    def on_message(secret: Any, raw: str) -> None:
        raise RuntimeError("handler bug")

    conn, transport = connect(app, "top-secret-value")
    conn.receive('{"action":"subscribe","body":{"entity":"items","id":"1"},"ref":1}')
    conn.receive('{"hello":1}')
    wait_for(lambda: len(transport.frames) == 2, message="two error frames")
    assert [f["error"]["code"] for f in transport.frames] == ["internal_error", "internal_error"]
    assert "auth backend down" in caplog.text and "handler bug" in caplog.text
    assert "top-secret-value" not in caplog.text
    assert "top-secret-value" not in json.dumps(transport.frames)


def test_a_frame_without_action_and_no_on_message_gets_bad_message() -> None:
    app, _ = make_app()
    conn, transport = connect(app)
    conn.receive('{"chat":"hello"}')
    wait_for(lambda: transport.frames, message="the error frame")
    assert transport.frames[0]["error"]["code"] == "bad_message"
    assert "on_message" in transport.frames[0]["error"]["message"]


def test_key_buffer_deduplicates_and_flags_overflow() -> None:
    buffer = KeyBuffer(2)
    buffer.add([EntityKey("a", 1), EntityKey("a", 1), EntityKey("a", 2)])
    assert buffer.take() == ([EntityKey("a", 1), EntityKey("a", 2)], set())
    buffer.add([EntityKey("a", n) for n in range(5)] + [EntityKey("b", 1)])
    keys, dropped = buffer.take()
    assert len(keys) == 2 and dropped == {"a", "b"} and buffer.dropped == 4
    assert buffer.take() == ([], set())


def test_key_buffer_puts_back_a_failed_batch_ahead_of_newer_keys() -> None:
    buffer = KeyBuffer(3)
    buffer.add([EntityKey("a", 1), EntityKey("a", 2)])
    keys, dropped = buffer.take()
    buffer.add([EntityKey("a", 3), EntityKey("a", 1), EntityKey("b", 4)])
    buffer.put_back(keys, dropped)
    keys, dropped = buffer.take()
    assert keys == [EntityKey("a", 1), EntityKey("a", 2), EntityKey("a", 3)]
    assert dropped == {"b"} and buffer.dropped == 1


def test_key_buffer_holds_an_entity_refresh_once_and_it_absorbs_that_entitys_keys() -> None:
    buffer = KeyBuffer(2)
    buffer.add([EntityKey("a", 1), EntityKey("b", 1)])
    for _ in range(100):
        buffer.add_entities(["a"])
    buffer.add([EntityKey("a", 2), EntityKey("b", 2), EntityKey("b", 3)])  # a/2 is covered; b/3 overflows
    keys, resync = buffer.take()
    assert keys == [EntityKey("b", 1), EntityKey("b", 2)] and resync == {"a", "b"}
    assert buffer.dropped == 1 and buffer.empty
    buffer.add_entities(["c"])
    keys, resync = buffer.take()
    buffer.add([EntityKey("c", 1)])
    buffer.put_back(keys, resync)  # a failed send: the refresh of c is kept, and still covers c/1
    assert buffer.take() == ([], {"c"})


def test_memory_bus_fans_out_within_a_name_only() -> None:
    a, b, other = MemoryBus("fan"), MemoryBus("fan"), MemoryBus()
    sinks = [RecordingSink() for _ in range(3)]
    for bus, sink in zip((a, b, other), sinks, strict=True):
        bus.start(sink, ["items"])
    try:
        a.publish([EntityKey("items", 1)])
        wait_for(lambda: sinks[0].keys and sinks[1].keys, message="both members to receive")
        assert sinks[0].keys == sinks[1].keys == [EntityKey("items", 1)]
        assert sinks[2].keys == []
    finally:
        for bus in (a, b, other):
            bus.close()


def test_two_apps_share_a_named_memory_bus_but_not_the_default() -> None:
    apps = [make_app(ENTITYSYNC_BUS_URL=url) for url in ("memory://shared", "memory://shared", "memory://")]
    transports = []
    for app, es in apps:
        es.entity("items")(lambda key, secret: {"id": key.id})
        conn, transport = connect(app)
        subscribe(conn, "items", "1")
        transports.append(transport)
    wait_for(lambda: all(len(t.pushes()) == 1 for t in transports), message="the first pushes")
    apps[0][1].notify("items", "1")
    wait_for(lambda: [len(t.pushes()) for t in transports][:2] == [2, 2], message="both shared apps")
    apps[2][1].notify("items", "1")
    wait_for(lambda: len(transports[2].pushes()) == 2, message="the private app's own push")
    assert [len(t.pushes()) for t in transports] == [2, 2, 2]


def test_memory_bus_overflow_resyncs_instead_of_losing_keys() -> None:
    bus = MemoryBus("overflow", buffer_size=3)
    sink = RecordingSink()
    held = threading.Event()
    original = sink.deliver

    def slow_deliver(keys: Any) -> None:
        original(keys)
        held.wait(10)

    sink.deliver = slow_deliver  # type: ignore[method-assign]
    bus.start(sink, ["items"])
    try:
        bus.publish([EntityKey("items", 0)])
        wait_for(lambda: sink.keys, message="the first delivery")
        bus.publish([EntityKey("items", n) for n in range(1, 10)])  # while delivery is held
        held.set()
        wait_for(lambda: sink.resyncs == ["items"], message="a resync after the overflow")
    finally:
        bus.close()


def test_coexists_with_the_apps_own_flask_sock_routes() -> None:
    from flask_sock import Sock

    app = Flask(__name__)
    sock = Sock(app)

    @sock.route("/echo")
    def echo(ws: Any) -> None:  # pragma: no cover - only routed
        ws.send(ws.receive())

    EntitySync(app)
    rules = {r.rule for r in app.url_map.iter_rules()}
    assert {"/echo", "/ws/entity-sync/"} <= rules


def test_close_shuts_every_connection_with_1001() -> None:
    app, es = make_app()
    es.entity("items")(lambda key, secret: None)
    conns = [connect(app) for _ in range(3)]
    for conn, _ in conns:
        subscribe(conn, "items", "1")
    es.close()
    assert all(t.closed_with == (1001, "server shutting down") for _, t in conns)
    assert es.hub().connection_count == 0 and es.hub().subscription_count == 0
    with pytest.raises(ConfigError, match="closed"):
        connect(app)


def test_a_fetch_started_before_a_secret_change_is_discarded() -> None:
    app, es = make_app()
    started, release = threading.Event(), threading.Event()

    @es.entity("whoami")
    def fetch(key: EntityKey, secret: Any) -> Any:
        if secret == "old":
            started.set()
            release.wait(10)
        return {"secret": secret}

    conn, transport = connect(app, "old")
    subscribe(conn, "whoami", "1")
    assert started.wait(10)
    conn.receive('{"action":"secret","body":"new","ref":1}')
    release.set()
    wait_for(lambda: transport.pushes() == [{"secret": "new"}], message="only the new secret's push")
    assert {"action": "ack", "ref": 1} in transport.frames
