"""Live lists: a fetch that returns a set is one frame, and entity-wide refreshes.

Real servers (gunicorn -k gevent and flask run) and real websocket clients:
a list key is pushed as one frame holding the whole set, so members that
leave it are gone from the next frame; shared and per-user sets, raw mode,
coalescing and the outbox limit behave as for single rows; ``es.notify_entity``,
``Publisher.notify_entity`` refresh every subscribed key of an entity, on
every server of a cluster, and a burst of them coalesces.
"""

from __future__ import annotations

import socket
from typing import Any, Callable

from entitysync_sync import Publisher
from entitysync_sync.protocol import result_version
from tests.support.clients import Client
from tests.support.servers import Server, ServerPool
from tests.support.waiting import wait_for

BIG = 2_000_000  # characters in the ten rows of a "biglist" set


def members(rows: list[dict[str, Any]]) -> list[Any]:
    return [row["member"] for row in rows]


def quietly(server: Server, entity: str, id: str, value: Any) -> None:
    server.set_quietly(entity, id, value)


def test_a_list_is_one_frame_holding_the_whole_set(server: Server, clients, uid: str) -> None:
    client = clients(server.ws_url)
    quietly(server, "lists", uid, ["a", "b", "c"])
    client.subscribe("lists", uid)
    frame = client.expect(lambda f: f.get("action") == "push")
    assert frame == {"action": "push", "key": {"entity": "lists", "id": uid}, "v": frame["v"],
                     "rows": [{"list": uid, "member": m} for m in ("a", "b", "c")]}
    server.set("lists", uid, ["c", "a"])  # "b" left the list, and the order changed
    assert members(client.expect_push("lists", uid)) == ["c", "a"]
    server.set("lists", uid, [])
    assert client.expect_push("lists", uid) == []  # an empty set, not gone
    server.post(f"/_t/delete/lists/{uid}")
    assert client.expect(lambda f: f.get("action") in ("push", "gone")) == {
        "action": "gone", "key": {"entity": "lists", "id": uid}, "v": result_version(None)}
    client.assert_silent()


def test_a_shared_set_reaches_every_subscriber_in_one_frame(server: Server, clients, uid: str) -> None:
    subs = [clients(server.ws_url) for _ in range(3)]
    quietly(server, "sharedlists", uid, ["a", "b"])
    for client in subs:
        client.subscribe("sharedlists", uid)
        assert members(client.expect_push("sharedlists", uid)) == ["a", "b"]
    before = server.get(f"/_t/fetches/sharedlists/{uid}")["count"]
    server.set("sharedlists", uid, ["b"])
    for client in subs:
        assert members(client.expect_push("sharedlists", uid)) == ["b"]
    assert server.get(f"/_t/fetches/sharedlists/{uid}")["count"] == before + 1  # one fetch for all
    server.set("sharedlists", uid, [])
    for client in subs:
        assert client.expect_push("sharedlists", uid) == []
        client.assert_silent(within=0.2)


def test_raw_mode_sends_each_member_alone_and_nothing_for_an_empty_set(
    servers: ServerPool, clients, kind: str, uid: str
) -> None:
    server = servers.get(kind, ENTITYSYNC_ENVELOPE=False)
    quietly(server, "lists", uid, ["a", "b"])
    client = clients(server.ws_url)
    client.subscribe("lists", uid)
    assert [client.recv(), client.recv()] == [{"list": uid, "member": "a"}, {"list": uid, "member": "b"}]
    server.set("lists", uid, [])
    client.assert_silent()
    server.set("lists", uid, ["z"])
    assert client.recv() == {"list": uid, "member": "z"}


def test_notifications_of_a_set_coalesce_and_the_last_set_is_current(
    server: Server, clients, uid: str
) -> None:
    client = clients(server.ws_url)
    quietly(server, "slowlists", uid, ["start"])
    client.subscribe("slowlists", uid)
    client.expect_push("slowlists", uid, lambda rows: members(rows) == ["start"])
    last = server.post(f"/_t/burst/slowlists/{uid}?n=200")["last"]
    assert members(client.expect_push("slowlists", uid, lambda rows: members(rows) == [last], timeout=15)) == [last]
    client.assert_silent(within=1.0)
    fetches = server.get(f"/_t/fetches/slowlists/{uid}")["count"]
    assert 2 <= fetches <= 4, fetches  # 1 on subscribe, at most one running and one pending during the burst


def test_a_set_over_the_outbox_limit_reaches_a_reader_and_closes_only_a_stalled_client(
    servers: ServerPool, clients, kind: str, uid: str
) -> None:
    server = servers.get(kind, ENTITYSYNC_SEND_TIMEOUT=1, ENTITYSYNC_OUTBOX_LIMIT=100_000)
    big_id = f"{BIG}-{uid}"
    quietly(server, "biglist", big_id, 0)
    reader = clients(server.ws_url)
    reader.subscribe("biglist", big_id)
    rows = reader.expect_push("biglist", big_id, timeout=20)
    # One set, twenty times the outbox limit, is queued whole and arrives as one frame.
    assert [row["n"] for row in rows] == list(range(10))
    assert sum(len(row["blob"]) for row in rows) == BIG
    stalled = clients(server.ws_url, sockopt=((socket.SOL_SOCKET, socket.SO_RCVBUF, 4096),))
    stalled.subscribe("biglist", big_id)
    watcher = clients(server.ws_url)
    watcher.subscribe("items", uid)
    watcher.expect(lambda f: f.get("action") == "gone")
    wait_for(lambda: server.stats()["connections"] == 3 or None, message="three clients")
    for n in range(1, 4):
        server.set("biglist", big_id, n)
        assert reader.expect_push("biglist", big_id, lambda r, n=n: r[0]["value"] == n, timeout=20)[9]["n"] == 9
    wait_for(lambda: server.stats()["connections"] == 2 or None, timeout=20,
             message="the stalled client to be closed")
    assert "closing a connection with 1008: send timed out" in server.log()
    server.set("items", uid, "after")  # the server carries on
    assert watcher.expect_push("items", uid, lambda b: b["value"] == "after")["value"] == "after"


def test_notify_entity_refreshes_every_subscribed_key_of_that_entity_only(
    server: Server, clients, uid: str
) -> None:
    client = clients(server.ws_url)
    ids = [f"{uid}-1", f"{uid}-2"]
    for id in ids:
        quietly(server, "lists", id, ["old"])
        client.subscribe("lists", id)
        client.expect_push("lists", id)
    quietly(server, "sharedlists", uid, ["old"])
    client.subscribe("sharedlists", uid)
    client.expect_push("sharedlists", uid)
    for id in ids:
        quietly(server, "lists", id, ["new", id])
    quietly(server, "sharedlists", uid, ["new"])
    server.post("/_t/notify-entity/lists")
    got = {}
    for _ in ids:
        frame = client.expect(lambda f: f.get("action") == "push")
        got[frame["key"]["id"]] = members(frame["rows"])
    assert got == {id: ["new", id] for id in ids}
    client.assert_silent()  # once per key, and sharedlists was not asked for
    server.post("/_t/notify-entity/sharedlists")
    assert members(client.expect_push("sharedlists", uid)) == ["new"]
    client.assert_silent()


def test_a_burst_of_entity_refreshes_coalesces(server: Server, clients, uid: str) -> None:
    client = clients(server.ws_url)
    quietly(server, "slowlists", uid, ["a"])
    client.subscribe("slowlists", uid)
    client.expect_push("slowlists", uid)
    quietly(server, "slowlists", uid, ["b"])
    server.post("/_t/notify-entity/slowlists?n=200")
    client.expect_push("slowlists", uid, lambda rows: members(rows) == ["b"], timeout=15)
    client.assert_silent(within=1.0)
    fetches = server.get(f"/_t/fetches/slowlists/{uid}")["count"]
    assert 2 <= fetches <= 4, fetches


def test_entity_refreshes_reach_every_server_from_a_server_and_a_publisher(
    broker: Any, cluster: Callable[..., Server], uid: str
) -> None:
    a = cluster("gunicorn", broker)
    b = cluster("flask", broker)
    quietly(a, "lists", uid, ["v0"])
    on_a = Client(a.ws_url)
    on_b = Client(b.ws_url)
    try:
        for client in (on_a, on_b):
            client.subscribe("lists", uid)
            client.expect_push("lists", uid, lambda rows: members(rows) == ["v0"])
        quietly(a, "lists", uid, ["from-a"])
        a.post("/_t/notify-entity/lists")
        for client in (on_a, on_b):
            client.expect_push("lists", uid, lambda rows: members(rows) == ["from-a"])
        quietly(a, "lists", uid, ["from-a-script"])
        with Publisher(broker.url(), topic_prefix=uid + "_") as publisher:
            publisher.notify_entity("lists")
        for client in (on_a, on_b):
            client.expect_push("lists", uid, lambda rows: members(rows) == ["from-a-script"])
        assert b.get("/_t/stats")["bus"].get("malformed", 0) == 0  # the resync body is a message it reads
    finally:
        on_a.close()
        on_b.close()
