"""The websocket protocol against real servers: gunicorn -k gevent and flask run."""

from __future__ import annotations

import json
import socket

import pytest

from entitysync_sync import protocol as p
from tests.support.clients import DeflateClient
from tests.support.servers import WS_PATH, Server, ServerPool
from tests.support.waiting import wait_for

GONE = p.result_version(None)


def is_push(entity: str, id: str):
    return lambda f: f.get("action") == "push" and f["key"] == {"entity": entity, "id": id}


def test_subscribe_acks_then_pushes_the_current_state(server: Server, clients, uid: str) -> None:
    server.set("items", uid, "first")
    client = clients(server.ws_url)
    client.subscribe("items", uid, ref="r1")
    assert client.recv() == {"action": "ack", "ref": "r1"}
    push = client.recv()
    assert push == {"action": "push", "key": {"entity": "items", "id": uid}, "v": push["v"],
                    "body": {"id": uid, "value": "first"}}
    assert isinstance(push["v"], str) and 0 < len(push["v"]) <= 64


def test_ping_is_answered_by_pong_and_the_old_heartbeat_probe_still_acks(server: Server, clients) -> None:
    client = clients(server.ws_url)
    client.send({"action": "ping", "ref": "hb1"})
    assert client.recv() == {"action": "pong", "ref": "hb1"}
    client.send({"action": "ping"})
    assert client.recv() == {"action": "pong", "ref": None}
    # Clients of earlier versions probe with an acked unsubscribe of a key nobody holds.
    client.send({"action": "unsubscribe", "body": {"entity": "entitysync.heartbeat", "id": "0"}, "ref": "heartbeat"})
    assert client.recv() == {"action": "ack", "ref": "heartbeat"}


def test_integer_ids_and_numeric_refs_work(server: Server, clients, uid: str) -> None:
    server.set("items", "7" + uid[-6:], 1)
    client = clients(server.ws_url)
    client.subscribe("items", int("7" + uid[-6:]), ref=42)
    assert client.recv() == {"action": "ack", "ref": 42}
    assert client.recv()["key"] == {"entity": "items", "id": "7" + uid[-6:]}


def test_notify_reaches_every_subscriber_of_the_key(server: Server, clients, uid: str) -> None:
    subscribers = [clients(server.ws_url) for _ in range(3)]
    for client in subscribers:
        client.subscribe("items", uid)
        client.expect(lambda f: f["action"] == "gone")  # the row does not exist yet
    server.set("items", uid, "new")
    for client in subscribers:
        assert client.expect_push("items", uid) == {"id": uid, "value": "new"}


def test_several_subscriptions_per_client_route_by_key(server: Server, clients, uid: str) -> None:
    client = clients(server.ws_url)
    ids = [f"{uid}-{n}" for n in range(3)]
    for id in ids:
        server.set_quietly("items", id, "v0")
        client.subscribe("items", id)
        client.expect_push("items", id)
    server.set("items", "not-subscribed-" + uid, "x")
    for n, id in enumerate(ids):
        server.set("items", id, f"v{n + 1}")
        assert client.expect_push("items", id) == {"id": id, "value": f"v{n + 1}"}
    client.assert_silent()


def test_multi_row_fetch_sends_the_whole_set_in_one_push(server: Server, clients, uid: str) -> None:
    client = clients(server.ws_url)
    server.set_quietly("multi", uid, "m")
    client.subscribe("multi", uid)
    frame = client.expect(is_push("multi", uid))
    assert "body" not in frame
    assert [row["part"] for row in frame["rows"]] == [0, 1, 2]  # a generator's rows, in its order
    client.subscribe("pair", uid)
    assert [row["n"] for row in client.expect(is_push("pair", uid))["rows"]] == [1, 2]
    client.assert_silent()


def test_rows_use_the_app_json_provider_and_preencoded_rows_go_verbatim(
    server: Server, clients, uid: str
) -> None:
    client = clients(server.ws_url)
    client.subscribe("typed", uid)
    assert client.expect_push("typed", uid) == {
        "id": uid, "when": "Fri, 02 Jan 2026 03:04:05 GMT", "price": "12.50",
        "uid": "00000000-0000-0000-0000-000000000007"}
    client.subscribe("encoded", uid)
    assert client.expect_push("encoded", uid) == [{"pre": "bytes"}, {"pre": "str"}]


def test_deleted_row_sends_gone(server: Server, clients, uid: str) -> None:
    server.set_quietly("items", uid, "here")
    client = clients(server.ws_url)
    client.subscribe("items", uid)
    client.expect_push("items", uid)
    server.post(f"/_t/delete/items/{uid}")
    assert client.recv() == {"action": "gone", "key": {"entity": "items", "id": uid}, "v": GONE}


def test_each_subscriber_is_fetched_with_its_own_secret(server: Server, clients, uid: str) -> None:
    alice = clients(server.ws_url, token="alice")
    bob = clients(server.ws_url, token="bob")
    anonymous = clients(server.ws_url)
    for client in (alice, bob, anonymous):
        client.subscribe("whoami", uid)
    assert alice.expect_push("whoami", uid)["secret"] == "alice"
    assert bob.expect_push("whoami", uid)["secret"] == "bob"
    assert anonymous.expect_push("whoami", uid)["secret"] is None
    server.set("whoami", uid, 2)
    assert alice.expect_push("whoami", uid) == {"id": uid, "secret": "alice", "value": 2}
    assert bob.expect_push("whoami", uid) == {"id": uid, "secret": "bob", "value": 2}
    assert anonymous.expect_push("whoami", uid) == {"id": uid, "secret": None, "value": 2}


def test_secret_frame_replaces_the_identified_secret_and_refreshes(
    server: Server, clients, uid: str
) -> None:
    client = clients(server.ws_url, token="from-cookie")
    client.subscribe("whoami", uid)
    assert client.expect_push("whoami", uid)["secret"] == "from-cookie"
    client.send({"action": "secret", "body": "from-frame", "ref": "s"})
    assert client.expect(lambda f: f["action"] == "ack") == {"action": "ack", "ref": "s"}
    assert client.expect_push("whoami", uid)["secret"] == "from-frame"
    server.set("whoami", uid, 3)
    assert client.expect_push("whoami", uid) == {"id": uid, "secret": "from-frame", "value": 3}


def test_authorize_is_checked_on_subscribe_and_when_the_secret_changes(
    server: Server, clients, uid: str
) -> None:
    user = clients(server.ws_url, token="user")
    user.subscribe("private", uid, ref=1)
    assert user.recv() == {"action": "error", "ref": 1, "key": {"entity": "private", "id": uid},
                           "error": {"code": "forbidden", "message": f"not allowed to subscribe to private/{uid}"}}
    admin = clients(server.ws_url, token="admin-1")
    admin.subscribe("private", uid, ref=2)
    assert admin.recv() == {"action": "ack", "ref": 2}
    assert admin.expect_push("private", uid) == {"id": uid, "for": "admin-1"}
    # Logging out: the subscription no longer passes authorize and is dropped.
    admin.send({"action": "secret", "body": "user", "ref": 3})
    error = admin.recv()
    assert error["error"]["code"] == "forbidden" and error["key"] == {"entity": "private", "id": uid}
    assert admin.recv() == {"action": "ack", "ref": 3}
    server.set("private", uid, "changed")
    admin.assert_silent()


def test_frames_without_action_reach_on_message_with_the_secret(server: Server, clients, uid: str) -> None:
    client = clients(server.ws_url, token="t-" + uid)
    raw = json.dumps({"chat": uid})
    client.send(raw)
    found = wait_for(lambda: [m for m in server.get("/_t/messages") if m["raw"] == raw],
                     message="the pass-through frame to reach on_message")
    assert found == [{"secret": "t-" + uid, "raw": raw}]


def test_identify_raising_closes_the_connection_with_1011(server: Server, clients) -> None:
    client = clients(server.ws_url, token="explode")
    assert client.close_code() == 1011
    assert "identify raised; closing the connection" in wait_for(
        lambda: (lambda log: log if "identify raised" in log else None)(server.log()),
        message="the identify failure to be logged")


def test_unsubscribe_stops_pushes(server: Server, clients, uid: str) -> None:
    client = clients(server.ws_url)
    server.set_quietly("items", uid, 1)
    client.subscribe("items", uid)
    client.expect_push("items", uid)
    client.unsubscribe("items", uid, ref="u")
    assert client.recv() == {"action": "ack", "ref": "u"}
    server.set("items", uid, 2)
    client.assert_silent()


@pytest.mark.parametrize(
    ("frame", "code", "ref"),
    [
        ("{not json", "bad_json", None),
        ("[]", "bad_message", None),
        ({"action": "subscribe", "body": {"entity": "items"}, "ref": 5}, "bad_message", 5),
        ({"action": "subscribe", "body": {"entity": "no spaces", "id": "1"}, "ref": 6}, "bad_message", 6),
        ({"action": "subscribe", "body": {"entity": "items", "id": "x" * 257}}, "bad_message", None),
        ({"action": "dance", "ref": "d"}, "unknown_action", "d"),
        ({"action": "subscribe", "body": {"entity": "nope", "id": "1"}, "ref": 7}, "unknown_entity", 7),
    ],
)
def test_bad_frames_get_error_codes_and_the_connection_survives(
    server: Server, clients, uid: str, frame: object, code: str, ref: object
) -> None:
    client = clients(server.ws_url)
    client.send(frame)
    error = client.recv()
    assert error["action"] == "error" and error["error"]["code"] == code and error["ref"] == ref
    assert error["error"]["message"]
    server.set("items", uid, "alive")
    client.subscribe("items", uid)
    assert client.expect_push("items", uid) == {"id": uid, "value": "alive"}


def test_binary_frames_get_bad_message(server: Server, clients) -> None:
    client = clients(server.ws_url)
    client.ws.send_binary(b'{"action":"subscribe"}')
    assert client.recv()["error"]["code"] == "bad_message"


def test_raw_mode_answers_bad_frames_with_silence_and_survives(
    servers: ServerPool, clients, kind: str, uid: str
) -> None:
    server = servers.get(kind, ENTITYSYNC_ENVELOPE=False)
    server.set("items", uid, "still here")
    client = clients(server.ws_url)
    client.send("{bad json")
    client.send({"action": "ping", "ref": 1})
    client.assert_silent()
    client.subscribe("items", uid)
    assert client.recv() == {"id": uid, "value": "still here"}


def test_fetch_failure_is_reported_to_that_subscriber_only(server: Server, clients, kind: str, uid: str) -> None:
    logged_before = server.log().count("GET /ws/entity-sync/")
    victim = clients(server.ws_url, token="secret-token-" + uid)
    bystander = clients(server.ws_url)
    bystander.subscribe("items", uid)
    bystander.expect(lambda f: f["action"] == "gone")
    victim.subscribe("boom", uid)
    assert victim.recv() == {"action": "error", "ref": None, "key": {"entity": "boom", "id": uid},
                             "error": {"code": "fetch_failed", "message": f"fetching boom/{uid} failed"}}
    server.set("items", uid, "fine")
    assert bystander.expect_push("items", uid) == {"id": uid, "value": "fine"}
    server.set("boom", uid, "ok")
    assert victim.expect_push("boom", uid) == {"id": uid, "value": "ok"}
    victim.close()
    bystander.close()
    wait_for(lambda: server.stats()["connections"] == 0 or None, message="both clients to be gone")
    if kind == "flask":  # the dev server logs each request once it has ended
        wait_for(lambda: server.log().count("GET /ws/entity-sync/") >= logged_before + 2 or None,
                 message="the access log lines of both clients")
    log = server.log()
    assert f"fetch of boom/{uid} failed" in log and "the database is on fire" in log
    assert "secret-token-" + uid not in log


def test_too_many_subscriptions(servers: ServerPool, clients, kind: str, uid: str) -> None:
    server = servers.get(kind, ENTITYSYNC_MAX_SUBSCRIPTIONS=2, ENTITYSYNC_PUSH_ON_SUBSCRIBE=False)
    client = clients(server.ws_url)
    client.subscribe("items", uid + "1", ref=1)
    client.subscribe("items", uid + "2", ref=2)
    client.subscribe("items", uid + "1", ref=3)  # already held: does not count twice
    client.subscribe("items", uid + "3", ref=4)
    assert [client.recv() for _ in range(3)] == [{"action": "ack", "ref": n} for n in (1, 2, 3)]
    error = client.recv()
    assert error["error"]["code"] == "too_many_subscriptions" and error["ref"] == 4
    client.unsubscribe("items", uid + "2", ref=5)
    client.subscribe("items", uid + "3", ref=6)
    assert [client.recv() for _ in range(2)] == [{"action": "ack", "ref": 5}, {"action": "ack", "ref": 6}]


def test_without_push_on_subscribe_only_changes_are_pushed(servers: ServerPool, clients, kind: str, uid: str) -> None:
    server = servers.get(kind, ENTITYSYNC_MAX_SUBSCRIPTIONS=2, ENTITYSYNC_PUSH_ON_SUBSCRIBE=False)
    server.set_quietly("items", uid, "before")
    client = clients(server.ws_url)
    client.subscribe("items", uid, ref=1)
    assert client.recv() == {"action": "ack", "ref": 1}
    client.assert_silent()
    server.set("items", uid, "after")
    assert client.expect_push("items", uid) == {"id": uid, "value": "after"}


def test_raw_mode_speaks_like_the_seed(servers: ServerPool, clients, kind: str, uid: str) -> None:
    server = servers.get(kind, ENTITYSYNC_ENVELOPE=False)
    server.set_quietly("whoami", uid, "v1")
    client = clients(server.ws_url)
    # Exactly the seed's three frames.
    client.send('{"action":"secret","body":"my-secret"}')
    client.send(f'{{"action":"subscribe","body":{{"entity":"whoami","id":"{uid}"}}}}')
    assert client.recv() == {"id": uid, "secret": "my-secret", "value": "v1"}
    server.set("whoami", uid, "v2")
    assert client.recv() == {"id": uid, "secret": "my-secret", "value": "v2"}
    client.send({"action": "subscribe", "body": {"entity": "nope", "id": "1"}, "ref": 1})
    client.send(f'{{"action":"unsubscribe","body":{{"entity":"whoami","id":"{uid}"}}}}')
    client.subscribe("multi", uid)
    assert [client.recv()["part"] for _ in range(3)] == [0, 1, 2]  # no error, no ack came first
    server.set("whoami", uid, "v3")
    client.assert_silent()


def test_notifications_coalesce_and_the_last_push_is_current(server: Server, clients, uid: str) -> None:
    client = clients(server.ws_url)
    server.set("slow", uid, "start")
    client.subscribe("slow", uid)
    client.expect_push("slow", uid, lambda b: b["value"] == "start")
    result = server.post(f"/_t/burst/slow/{uid}?n=200")
    last = result["last"]
    assert client.expect_push("slow", uid, lambda b: b["value"] == last, timeout=15)["value"] == last
    # A notification that landed during the fetch queued one more: the same value again, then silence.
    client.assert_settles(lambda f: f["action"] == "push" and f["body"]["value"] == last, within=1.0)
    fetches = server.get(f"/_t/fetches/slow/{uid}")["count"]
    # 1 on subscribe, at most one running and one pending during the burst.
    assert 2 <= fetches <= 4, fetches


def test_oversized_frames_close_with_1009(server: Server, clients) -> None:
    client = clients(server.ws_url)
    client.send({"action": "secret", "body": "x" * 5000})
    assert client.close_code() == 1009
    wait_for(lambda: server.stats()["connections"] == 0 or None, message="the connection to be dropped")


def test_compression_is_refused_by_default(server: Server) -> None:
    headers = _handshake(server, offer_deflate=True)
    assert "sec-websocket-extensions" not in headers
    assert headers["status"] == "101"


def test_compression_is_negotiated_when_enabled(servers: ServerPool, clients, uid: str) -> None:
    server = servers.get("gunicorn", ENTITYSYNC_COMPRESSION=True)
    assert "permessage-deflate" in _handshake(server, offer_deflate=True)["sec-websocket-extensions"]
    server.set("items", uid, "z" * 5000)
    client = DeflateClient(server)  # offers permessage-deflate, as browsers do
    try:
        assert client.deflate, "permessage-deflate was not negotiated"
        client.send({"action": "subscribe", "body": {"entity": "items", "id": uid}})
        assert client.recv()["body"] == {"id": uid, "value": "z" * 5000}
        server.set("items", uid, "y" * 3000)
        assert client.recv()["body"] == {"id": uid, "value": "y" * 3000}
    finally:
        client.close()


def _handshake(server: Server, offer_deflate: bool) -> dict[str, str]:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    try:
        request = (
            "GET /ws/entity-sync/ HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n"
        )
        if offer_deflate:
            request += "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
        sock.sendall((request + "\r\n").encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(4096)
            assert chunk, "the server closed during the handshake"
            data += chunk
    finally:
        sock.close()
    status_line, *lines = data.split(b"\r\n\r\n")[0].decode().split("\r\n")
    headers = {"status": status_line.split()[1]}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return headers


def test_a_bus_started_before_gunicorn_forks_is_restarted_in_the_worker(clients, uid: str) -> None:
    server = Server("gunicorn", {}, extra_args=("--preload",),
                    extra_env={"ENTITYSYNC_TEST_NOTIFY_AT_START": "1"})
    try:
        client = clients(server.ws_url)
        client.subscribe("items", uid)
        client.expect(lambda f: f["action"] == "gone")
        server.set("items", uid, "through the worker's own bus")
        assert client.expect_push("items", uid) == {"id": uid, "value": "through the worker's own bus"}
    finally:
        server.stop()


def test_the_apps_own_flask_sock_routes_keep_their_reader_beside_ours(server: Server, clients, uid: str) -> None:
    """flask-sock builds every route's server with the app's SOCK_SERVER_OPTIONS; only this
    extension's route goes without simple-websocket's reader thread."""
    import websocket

    client = clients(server.ws_url)
    client.subscribe("items", uid)
    client.expect(lambda f: f["action"] == "gone")
    echo = websocket.create_connection(server.ws_url.replace(WS_PATH, "/_t/echo"), timeout=10)
    try:
        echo.send("through the app's own route")
        assert echo.recv() == "through the app's own route"
    finally:
        echo.close()
    server.set("items", uid, "still served")
    assert client.expect_push("items", uid) == {"id": uid, "value": "still served"}
