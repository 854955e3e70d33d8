"""Hostile clients and faults, against real server processes.

Origin checks, the per-connection rate limit, heartbeats (including a
half-open connection), fetch timeouts and retries, secrets kept out of the
logs, and shutdown with 1012.
"""

from __future__ import annotations

import json
import signal
import threading
from typing import Any, Callable

import pytest
import websocket

from tests.support.clients import Client
from tests.support.servers import Server, ServerPool
from tests.support.tcpproxy import TcpProxy
from tests.support.waiting import wait_for

# -- origin ------------------------------------------------------------------------

ORIGIN_CONFIG = {"ENTITYSYNC_ALLOWED_ORIGINS": ["https://app.example.com"]}


def handshake_status(server: Server, **options: Any) -> int:
    """The HTTP status of a websocket handshake (101 when it is accepted)."""
    try:
        ws = websocket.create_connection(server.ws_url, timeout=10, **options)
    except websocket.WebSocketBadStatusException as exc:
        return int(exc.status_code)
    ws.close()
    return 101


def test_websocket_upgrades_from_other_origins_get_403(servers: ServerPool, kind: str) -> None:
    server = servers.get(kind, **ORIGIN_CONFIG)
    host = f"127.0.0.1:{server.port}"
    assert handshake_status(server, origin=f"http://{host}") == 101  # same origin
    assert handshake_status(server, origin="https://app.example.com") == 101  # listed
    assert handshake_status(server, suppress_origin=True) == 101  # not a browser
    assert handshake_status(server, origin="https://evil.example.net") == 403
    assert handshake_status(server, origin=f"http://127.0.0.1:{server.port + 1}") == 403  # another port
    assert handshake_status(server, origin="null") == 403  # a sandboxed page or a file
    assert "refused a websocket upgrade from origin 'https://evil.example.net'" in server.log()


def test_only_same_origin_is_allowed_by_default(server: Server) -> None:
    assert handshake_status(server, origin="https://app.example.com") == 403
    assert handshake_status(server, origin=f"http://127.0.0.1:{server.port}") == 101


# -- rate limit --------------------------------------------------------------------


def test_a_flooding_client_is_closed_with_1008_and_others_carry_on(servers: ServerPool, kind: str,
                                                                  clients: Callable[..., Client],
                                                                  uid: str) -> None:
    server = servers.get(kind, ENTITYSYNC_RATE_LIMIT=20, ENTITYSYNC_RATE_BURST=50)
    bystander = clients(server.ws_url)
    bystander.subscribe("items", uid)
    bystander.expect(lambda f: f["action"] == "gone")
    flooder = clients(server.ws_url)
    for n in range(50):  # the burst is allowed
        flooder.send({"action": "unsubscribe", "body": {"entity": "items", "id": "x"}, "ref": n})
    acks = [flooder.expect(lambda f: f["action"] == "ack")["ref"] for _ in range(50)]
    assert acks == list(range(50))
    try:
        for n in range(200):
            flooder.send({"action": "unsubscribe", "body": {"entity": "items", "id": "x"}, "ref": n})
    except (websocket.WebSocketConnectionClosedException, ConnectionError):
        pass  # the server may close before every frame is written
    assert flooder.close_code() == 1008
    server.set("items", uid, "still here")
    assert bystander.expect_push("items", uid) == {"id": uid, "value": "still here"}
    assert "rate limit exceeded" in server.log()


# -- heartbeats --------------------------------------------------------------------

PING_CONFIG = {"ENTITYSYNC_PING_INTERVAL": 0.3}


def test_a_client_that_answers_no_ping_is_closed_and_forgotten(servers: ServerPool, kind: str, uid: str) -> None:
    server = servers.get(kind, **PING_CONFIG)
    wait_for(lambda: server.stats()["connections"] == 0, message="no connections left from other tests")
    timeouts_before = server.log().count("ping timeout")
    answering = Client(server.ws_url)
    silent = websocket.create_connection(server.ws_url, timeout=10)  # never reads, so never answers
    received: list[Any] = []
    stop = threading.Event()

    def read() -> None:  # websocket-client answers pings while it reads
        while not stop.is_set():
            try:
                received.append(answering.recv(timeout=0.1))
            except websocket.WebSocketTimeoutException:
                pass

    reader = threading.Thread(target=read)
    reader.start()
    try:
        answering.subscribe("items", uid)
        silent.send(json.dumps({"action": "subscribe", "body": {"entity": "items", "id": uid}}))
        # Waiting for one connection alone could end before the server had even registered the
        # silent one (a handshake completes first): wait for its close to be logged.
        wait_for(lambda: server.log().count("ping timeout") > timeouts_before, message="the silent client to be closed")
        wait_for(lambda: server.stats()["connections"] == 1, message="only the answering client left")
        assert server.stats()["subscriptions"] == 1
        rounds = server.stats()["heartbeats"]
        wait_for(lambda: server.stats()["heartbeats"] >= rounds + 3, message="three more rounds of pings")
        assert server.stats()["connections"] == 1
        server.set("items", uid, "alive")
        wait_for(lambda: any(f.get("body") == {"id": uid, "value": "alive"} for f in received),
                 message="a push to the client that answers")
        assert "ping timeout" in server.log()
    finally:
        stop.set()
        reader.join()
        answering.close()
        silent.close()


def test_a_half_open_connection_is_detected_and_cleaned_up(servers: ServerPool, kind: str, uid: str) -> None:
    server = servers.get(kind, **PING_CONFIG)
    wait_for(lambda: server.stats()["connections"] == 0, message="no connections left from other tests")
    proxy = TcpProxy(server.port)
    client = Client(f"ws://127.0.0.1:{proxy.port}/ws/entity-sync/", suppress_origin=True)
    try:
        client.subscribe("items", uid)
        client.expect(lambda f: f["action"] == "gone")
        proxy.freeze()  # the client's host vanishes: no FIN, no RST, no more bytes
        wait_for(lambda: server.stats()["connections"] == 0, message="the half-open connection to be closed")
        assert server.stats()["subscriptions"] == 0
    finally:
        proxy.close()


# -- fetch faults ------------------------------------------------------------------


def test_a_hanging_fetch_times_out_and_the_connection_carries_on(servers: ServerPool, kind: str,
                                                                 clients: Callable[..., Client],
                                                                 uid: str) -> None:
    server = servers.get(kind, ENTITYSYNC_FETCH_TIMEOUT=0.5)
    client = clients(server.ws_url)
    client.subscribe("hang", uid)
    error = client.expect(lambda f: f["action"] == "error")
    assert error["error"] == {"code": "fetch_failed", "message": f"fetching hang/{uid} timed out"}
    server.set("items", uid, "next")
    client.subscribe("items", uid)
    assert client.expect_push("items", uid) == {"id": uid, "value": "next"}
    assert f"fetch of hang/{uid} timed out after 0.5s" in server.log()


def test_after_the_database_comes_back_failed_fetches_are_retried_until_clients_converge(
        server: Server, clients: Callable[..., Client], uid: str) -> None:
    client = clients(server.ws_url)
    client.subscribe("boom", uid)
    client.expect(lambda f: f["action"] == "error" and f["error"]["code"] == "fetch_failed")
    wait_for(lambda: server.get(f"/_t/fetches/boom/{uid}")["count"] >= 3, message="a few retries")
    # The database is back; nothing notifies, the retry alone brings the row.
    server.set_quietly("boom", uid, "ok")
    frame = client.expect(lambda f: f["action"] != "ack", timeout=15)
    assert frame["action"] == "push" and frame["body"] == {"id": uid, "value": "ok"}  # one error frame only
    count = server.get(f"/_t/fetches/boom/{uid}")["count"]
    client.assert_silent(within=1.5)  # no more retries once it succeeded
    assert server.get(f"/_t/fetches/boom/{uid}")["count"] == count


def test_failed_shared_fetches_are_retried_too(server: Server, clients: Callable[..., Client], uid: str) -> None:
    server.set_quietly("sharedboom", uid, "ok")
    first, second = clients(server.ws_url), clients(server.ws_url)
    for client in (first, second):
        client.subscribe("sharedboom", uid)
        client.expect_push("sharedboom", uid)
    server.set("sharedboom", uid, "broken")  # a notify whose one shared fetch fails
    for client in (first, second):
        client.expect(lambda f: f["action"] == "error" and f["error"]["code"] == "fetch_failed")
    server.set_quietly("sharedboom", uid, "ok")  # the database is back; no notify
    for client in (first, second):
        frame = client.expect(lambda f: f["action"] != "ack", timeout=15)
        assert frame["action"] == "push" and frame["body"] == {"id": uid, "value": "ok"}


# -- secrets -----------------------------------------------------------------------


def test_secrets_appear_in_no_log_line_and_no_error_frame(kind: str, uid: str) -> None:
    identified, granted = f"tok-IDENT-{uid}", f"admin-GRANTED-{uid}"
    server = Server(kind, {"ENTITYSYNC_FETCH_TIMEOUT": 0.5},
                    extra_env={"ENTITYSYNC_TEST_LOG_LEVEL": "DEBUG"})
    frames: list[Any] = []
    try:
        client = Client(server.ws_url, token=identified)
        client.subscribe("private", uid, ref=1)  # forbidden: not an admin
        client.subscribe("boom", uid, ref=2)  # the fetch raises
        client.subscribe("hang", uid, ref=3)  # the fetch times out
        client.send("{not json")
        client.send({"action": "secret", "body": granted, "ref": 4})
        client.send({"action": "secret", "body": 42, "ref": 5})  # a bad secret frame
        client.send({"action": "nope", "body": granted})
        client.subscribe("private", uid, ref=6)  # allowed now; its row carries the secret, by design
        while not any(f.get("action") == "push" and f["key"]["entity"] == "private" for f in frames):
            frames.append(client.recv())
        client.send({"action": "secret", "body": None, "ref": 7})  # forbidden again: dropped
        frames.append(client.expect(lambda f: f.get("ref") == 7))
        client.close()
        wait_for(lambda: server.stats()["connections"] == 0, message="the client to be gone")
    finally:
        server.stop()
    errors = [f for f in frames if f["action"] == "error"]
    assert {e["error"]["code"] for e in errors} >= {"forbidden", "fetch_failed", "bad_json", "bad_message",
                                                     "unknown_action"}
    for frame in errors:
        assert identified not in str(frame) and granted not in str(frame)
    log = server.log()
    assert "DEBUG entitysync_sync" in log  # debug logging was really on
    assert "the database is on fire" in log  # and the failures were logged
    assert identified not in log and granted not in log


# -- shutdown ----------------------------------------------------------------------


def test_sigterm_closes_websockets_with_1012_without_waiting_for_the_graceful_timeout(uid: str) -> None:
    server = Server("gunicorn", {}, extra_args=("--graceful-timeout", "60"))
    try:
        client = Client(server.ws_url)
        client.subscribe("items", uid)
        client.expect(lambda f: f["action"] == "gone")
        server.proc.send_signal(signal.SIGTERM)
        assert client.close_code(timeout=15) == 1012
        server.proc.wait(timeout=15)  # the worker had nothing left to wait for
    finally:
        server.stop()


def test_notify_still_works_while_the_worker_drains(uid: str) -> None:
    """A view that notifies during the graceful shutdown must not fail."""
    server = Server("gunicorn", {}, extra_args=("--graceful-timeout", "60"))
    try:
        client = Client(server.ws_url)
        client.subscribe("items", uid)
        client.expect(lambda f: f["action"] == "gone")
        result: dict[str, Any] = {}
        slow = threading.Thread(target=lambda: result.update(server.get("/_t/slow-notify/items/" + uid)))
        slow.start()
        wait_for(lambda: "slow-notify started" in server.log(), message="the slow request to start")
        server.proc.send_signal(signal.SIGTERM)
        assert client.close_code(timeout=15) == 1012
        slow.join(15)
        assert result == {"ok": True, "draining": True}
    finally:
        server.stop()


@pytest.mark.parametrize("origin", ["http://127.0.0.1", "https://127.0.0.1:1", "ftp://x", "::::"])
def test_malformed_or_foreign_origins_never_crash_the_check(server: Server, origin: str) -> None:
    assert handshake_status(server, origin=origin) == 403
