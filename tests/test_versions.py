"""Versions: every push and gone carries ``"v"``; a subscribe carrying the version held gets no push."""

from __future__ import annotations

from typing import Any

import pytest

from entitysync_sync.protocol import result_version
from tests.support.clients import Client
from tests.support.servers import Server, ServerPool


def subscribe(client: Client, entity: str, id: str, v: Any = None, ref: Any = None) -> None:
    body: dict[str, Any] = {"entity": entity, "id": id}
    if v is not None:
        body["v"] = v
    frame: dict[str, Any] = {"action": "subscribe", "body": body}
    if ref is not None:
        frame["ref"] = ref
    client.send(frame)


def frame_of(client: Client, entity: str, id: str) -> dict[str, Any]:
    """The next push or gone of the key."""
    return client.expect(lambda f: f.get("action") in ("push", "gone")  # type: ignore[no-any-return]
                         and f["key"] == {"entity": entity, "id": id})


@pytest.mark.parametrize("entity", ["items", "lists", "shared", "whoami"])
def test_the_version_held_spares_the_push_and_a_change_still_arrives(
    server: Server, clients: Any, uid: str, entity: str
) -> None:
    server.set_quietly(entity, uid, ["a"])
    first = clients(server.ws_url, token="ann")
    subscribe(first, entity, uid)
    v1 = frame_of(first, entity, uid)["v"]
    again = clients(server.ws_url, token="ann")
    subscribe(again, entity, uid, v=v1, ref="r1")
    assert again.recv() == {"action": "ack", "ref": "r1"}
    again.assert_silent(within=0.5)  # the rows it holds are current: no push
    server.set(entity, uid, ["b"])
    pushed = frame_of(again, entity, uid)
    assert pushed["action"] == "push" and pushed["v"] != v1
    assert frame_of(first, entity, uid)["v"] == pushed["v"]


def test_a_client_holding_a_stale_version_gets_the_change_made_while_it_was_away(
    server: Server, clients: Any, uid: str
) -> None:
    server.set_quietly("items", uid, "before")
    client = clients(server.ws_url)
    subscribe(client, "items", uid)
    held = frame_of(client, "items", uid)
    client.close()
    server.set("items", uid, "while away")  # nobody subscribes now
    back = clients(server.ws_url)
    subscribe(back, "items", uid, v=held["v"])
    pushed = frame_of(back, "items", uid)
    assert pushed["body"] == {"id": uid, "value": "while away"} and pushed["v"] != held["v"]
    server.post(f"/_t/delete/items/{uid}")
    gone = frame_of(back, "items", uid)
    assert gone == {"action": "gone", "key": {"entity": "items", "id": uid}, "v": result_version(None)}
    back.close()
    # Still gone when it comes back holding gone's version: nothing to send.
    last = clients(server.ws_url)
    subscribe(last, "items", uid, v=gone["v"], ref=2)
    assert last.recv() == {"action": "ack", "ref": 2}
    last.assert_silent(within=0.5)
    subscribe(last, "items", uid, v=held["v"])  # now it claims the old row: it hears of gone
    assert frame_of(last, "items", uid)["action"] == "gone"


def test_the_version_is_the_same_on_every_server_and_per_user(
    servers: ServerPool, clients: Any, kind: str, uid: str
) -> None:
    """Two server processes (each with its own hash seed) give the same rows the same version."""
    one, other = servers.get(kind), servers.get(kind, ENTITYSYNC_RATE_BURST=1999)
    versions = {}
    for server in (one, other):
        server.set_quietly("whoami", uid, 1)
        for token in ("ann", "bob"):
            client = clients(server.ws_url, token=token)
            subscribe(client, "whoami", uid)
            versions[server.port, token] = frame_of(client, "whoami", uid)["v"]
    assert versions[one.port, "ann"] == versions[other.port, "ann"]
    assert versions[one.port, "bob"] == versions[other.port, "bob"]
    assert versions[one.port, "ann"] != versions[one.port, "bob"]  # what each user receives differs
    # A user's version never spares another user's rows.
    bob = clients(other.ws_url, token="bob")
    subscribe(bob, "whoami", uid, v=versions[one.port, "ann"])
    assert frame_of(bob, "whoami", uid)["body"]["secret"] == "bob"


@pytest.mark.parametrize("v", ["", 7, True, ["x"], {"a": 1}, "x" * 65])
def test_a_version_that_is_not_a_short_string_is_refused(server: Server, clients: Any, uid: str, v: Any) -> None:
    client = clients(server.ws_url)
    subscribe(client, "items", uid, v=v, ref="bad")
    error = client.recv()
    assert error["action"] == "error" and error["ref"] == "bad"
    assert error["error"]["code"] == "bad_message" and '"v"' in error["error"]["message"]
    server.set_quietly("items", uid, 1)
    subscribe(client, "items", uid)  # the connection still works
    assert frame_of(client, "items", uid)["body"] == {"id": uid, "value": 1}


def test_raw_mode_frames_carry_no_version(servers: ServerPool, clients: Any, kind: str, uid: str) -> None:
    server = servers.get(kind, ENTITYSYNC_ENVELOPE=False)
    server.set_quietly("items", uid, 1)
    client = clients(server.ws_url)
    subscribe(client, "items", uid, v=result_version('{"id":"x"}'))
    assert client.recv() == {"id": uid, "value": 1}
