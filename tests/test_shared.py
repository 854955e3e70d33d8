"""Shared fetches (``@es.entity(name, shared=True)``) against real servers."""

from __future__ import annotations

import json
import socket
from typing import Any

from entitysync_sync.protocol import result_version
from tests.support.clients import Client, DeflateClient
from tests.support.servers import Server, ServerPool
from tests.support.waiting import wait_for

BIG = 1_000_000  # characters in the first row of a "sharedbig" push


def _subscribers(server: Server, clients: Any, entity: str, uid: str, n: int) -> list[Client]:
    """``n`` clients, each with a token of its own, subscribed to ``entity``/``uid``."""
    subs = [clients(server.ws_url, token=f"user{i}") for i in range(n)]
    for client in subs:
        client.subscribe(entity, uid)
    return subs


def _texts(subs: list[Client]) -> list[str]:
    """The next frame of every client, as sent."""
    texts = []
    for client in subs:
        client.ws.settimeout(10)
        texts.append(client.ws.recv())
    return texts


def test_one_fetch_per_notification_whatever_the_subscriber_count(
    servers: ServerPool, clients: Any, kind: str, uid: str
) -> None:
    server = servers.get(kind, ENTITYSYNC_PUSH_ON_SUBSCRIBE=False)
    subs = _subscribers(server, clients, "shared", uid, 20)
    wait_for(lambda: server.stats()["subscriptions"] >= 20 or None, message="20 subscriptions")
    for n in range(1, 4):
        server.set("shared", uid, n)
        for client in subs:
            assert client.expect_push("shared", uid, lambda b, n=n: b["value"] == n)["value"] == n
        assert server.get(f"/_t/fetches/shared/{uid}")["count"] == n


def test_every_subscriber_gets_the_same_bytes_fetched_without_a_secret(
    server: Server, clients: Any, uid: str
) -> None:
    server.set_quietly("shared", uid, "v0")
    subs = _subscribers(server, clients, "shared", uid, 5)
    for client in subs:  # push on subscribe: fetched for that subscriber alone, still without its secret
        assert client.expect_push("shared", uid)["secret"] is None
    server.set("shared", uid, "v1")
    texts = _texts(subs)
    assert len(set(texts)) == 1, texts
    assert json.loads(texts[0]) == {
        "action": "push",
        "key": {"entity": "shared", "id": uid},
        "v": json.loads(texts[0])["v"],
        "body": {"id": uid, "value": "v1", "secret": None},
    }
    server.post(f"/_t/delete/shared/{uid}")
    texts = _texts(subs)
    assert set(texts) == {json.dumps({"action": "gone", "key": {"entity": "shared", "id": uid},
                                      "v": result_version(None)},
                                     separators=(",", ":"))}


def test_a_stalled_subscriber_does_not_delay_the_others(
    servers: ServerPool, clients: Any, kind: str, uid: str
) -> None:
    server = servers.get(kind, ENTITYSYNC_SEND_TIMEOUT=1, ENTITYSYNC_OUTBOX_LIMIT=2000)
    big_id = f"{BIG}-{uid}"
    server.set_quietly("sharedbig", big_id, -1)
    healthy = _subscribers(server, clients, "sharedbig", big_id, 3)
    for client in healthy:
        client.expect_push("sharedbig", big_id, lambda rows: rows[0].get("value") == -1)
    # A tiny receive window and no reading: its writer blocks inside the first 1 MB frame.
    stalled = clients(server.ws_url, sockopt=((socket.SOL_SOCKET, socket.SO_RCVBUF, 4096),))
    stalled.subscribe("sharedbig", big_id)
    wait_for(lambda: server.stats()["subscriptions"] == 4 or None, message="the stalled subscription")
    for n in range(5):  # the stall outlasts the 1 s send timeout meanwhile
        server.set("sharedbig", big_id, n)
        for client in healthy:
            rows = client.expect_push("sharedbig", big_id, lambda r, n=n: r[0].get("value") == n, timeout=5)
            assert len(rows[0]["blob"]) == BIG and rows[1] == {"id": big_id}
    wait_for(lambda: server.stats()["connections"] == 3 or None, timeout=15,
             message="the stalled client to be closed")
    assert "closing a connection with 1008: send timed out" in server.log()
    server.set("sharedbig", big_id, "after")
    for client in healthy:
        assert client.expect_push("sharedbig", big_id, lambda r: r[0].get("value") == "after")[0]["id"] == big_id


def test_raw_mode_sends_the_same_row_bytes_to_everyone(
    servers: ServerPool, clients: Any, kind: str, uid: str
) -> None:
    server = servers.get(kind, ENTITYSYNC_ENVELOPE=False)
    server.set_quietly("shared", uid, "first")
    subs = _subscribers(server, clients, "shared", uid, 3)
    assert [json.loads(text)["value"] for text in _texts(subs)] == ["first"] * 3
    server.set("shared", uid, "second")
    texts = _texts(subs)
    assert len(set(texts)) == 1
    assert json.loads(texts[0]) == {"id": uid, "value": "second", "secret": None}
    fetched = server.get(f"/_t/fetches/shared/{uid}")["count"]
    server.post(f"/_t/delete/shared/{uid}")  # raw mode sends nothing for gone
    wait_for(lambda: server.get(f"/_t/fetches/shared/{uid}")["count"] > fetched or None,
             message="the fetch after the delete")
    for client in subs:
        client.assert_silent(within=0.3)


def test_compressing_and_plain_subscribers_both_get_the_push(
    servers: ServerPool, clients: Any, uid: str
) -> None:
    server = servers.get("gunicorn", ENTITYSYNC_COMPRESSION=True)
    server.set_quietly("shared", uid, "a")
    plain = clients(server.ws_url)  # websocket-client offers no compression
    plain.subscribe("shared", uid)
    plain.expect_push("shared", uid)
    deflating = DeflateClient(server)
    try:
        assert deflating.deflate, "permessage-deflate was not negotiated"
        deflating.send({"action": "subscribe", "body": {"entity": "shared", "id": uid}})
        assert deflating.recv()["body"]["value"] == "a"
        for value in ("z" * 5000, "y"):
            server.set("shared", uid, value)
            assert deflating.recv()["body"] == {"id": uid, "value": value, "secret": None}
            assert plain.expect_push("shared", uid)["value"] == value
    finally:
        deflating.close()


def test_shared_notifications_coalesce_and_the_last_push_is_current(
    server: Server, clients: Any, uid: str
) -> None:
    server.set_quietly("sharedslow", uid, "start")
    subs = _subscribers(server, clients, "sharedslow", uid, 3)
    for client in subs:
        client.expect_push("sharedslow", uid, lambda b: b["value"] == "start")
    last = server.post(f"/_t/burst/sharedslow/{uid}?n=200")["last"]
    for client in subs:
        assert client.expect_push("sharedslow", uid, lambda b: b["value"] == last, timeout=15)["value"] == last
    for client in subs:  # a notification during the fetch may repeat the last value once; nothing else
        client.assert_settles(lambda f: f["action"] == "push" and f["body"]["value"] == last, within=0.5)
    fetches = server.get(f"/_t/fetches/sharedslow/{uid}")["count"]
    # 1 for the three subscribes (they share it, or the cache); then at most one shared
    # fetch running and one pending during the burst.
    assert 2 <= fetches <= 4, fetches


def test_authorize_still_gates_shared_entities(server: Server, clients: Any, uid: str) -> None:
    server.set_quietly("board", uid, 1)
    anonymous = clients(server.ws_url)
    anonymous.subscribe("board", uid, ref="a")
    assert anonymous.expect(lambda f: f["action"] == "error")["error"]["code"] == "forbidden"
    admin = clients(server.ws_url, token="admin-1")
    admin.subscribe("board", uid)
    assert admin.expect_push("board", uid) == {"id": uid, "value": 1, "secret": None}
    admin.send({"action": "secret", "body": "user-2", "ref": "s"})
    assert admin.expect(lambda f: f["action"] == "error")["error"]["code"] == "forbidden"
    admin.expect(lambda f: f["action"] == "ack" and f["ref"] == "s")
    server.set("board", uid, 2)
    admin.assert_silent()
    anonymous.assert_silent()
