"""Cohorts: when a per-user key changes, one fetch per distinct secret among a server's subscribers."""

from __future__ import annotations

from typing import Any

from tests.support.clients import Client
from tests.support.servers import Server, ServerPool
from tests.support.waiting import wait_for


def fetches(server: Server, entity: str, uid: str) -> int:
    return server.get(f"/_t/fetches/{entity}/{uid}")["count"]  # type: ignore[no-any-return]


def test_subscribers_with_equal_secrets_share_one_fetch_per_change(
    servers: ServerPool, clients: Any, kind: str, uid: str
) -> None:
    server = servers.get(kind, ENTITYSYNC_PUSH_ON_SUBSCRIBE=False)
    tokens = [f"user{n % 4}" for n in range(20)]  # four users with five tabs each
    subs = [clients(server.ws_url, token=token) for token in tokens]
    for client in subs:
        client.subscribe("whoami", uid, ref="s")
        client.expect(lambda f: f.get("ref") == "s")
    for n in (1, 2):
        server.set("whoami", uid, n)
        for client, token in zip(subs, tokens, strict=True):
            assert client.expect_push("whoami", uid) == {"id": uid, "secret": token, "value": n}
        assert fetches(server, "whoami", uid) == 4 * n


def test_a_secret_changed_during_a_cohort_fetch_never_gets_the_old_users_rows(
    server: Server, clients: Any, uid: str
) -> None:
    ann = clients(server.ws_url, token="ann")
    tab = clients(server.ws_url, token="ann")  # ann's second tab, which bob then logs into
    for client in (ann, tab):
        client.subscribe("slowwhoami", uid)
        client.expect_push("slowwhoami", uid)
    before = fetches(server, "slowwhoami", uid)
    server.set("slowwhoami", uid, "new")  # one 0.3 s fetch for ann's cohort
    wait_for(lambda: fetches(server, "slowwhoami", uid) > before, message="the cohort's fetch to start")
    tab.send({"action": "secret", "body": "bob", "ref": "login"})
    tab.expect(lambda f: f.get("ref") == "login")
    row = tab.expect_push("slowwhoami", uid)  # every push after the ack is bob's
    assert row == {"id": uid, "secret": "bob", "value": "new"}
    tab.assert_settles(lambda f: f.get("action") == "push" and f["body"]["secret"] == "bob", within=0.8)
    assert ann.expect_push("slowwhoami", uid) == {"id": uid, "secret": "ann", "value": "new"}
    server.set("slowwhoami", uid, "newer")
    assert tab.expect_push("slowwhoami", uid) == {"id": uid, "secret": "bob", "value": "newer"}
    assert ann.expect_push("slowwhoami", uid, lambda b: b["value"] == "newer")["secret"] == "ann"


def test_a_failed_cohort_fetch_tells_every_member_logs_once_and_recovers(
    servers: ServerPool, clients: Any, kind: str, uid: str
) -> None:
    server = Server(kind, {"ENTITYSYNC_PUSH_ON_SUBSCRIBE": False, "ENTITYSYNC_FETCH_RETRY_MAX": 0.5})
    try:
        subs: list[Client] = [clients(server.ws_url, token="same") for _ in range(5)]
        for client in subs:
            client.subscribe("boom", uid, ref="s")
            client.expect(lambda f: f.get("ref") == "s")
        server.set("boom", uid, "bad")
        for client in subs:
            error = client.expect(lambda f: f.get("action") == "error")
            assert error["error"]["code"] == "fetch_failed" and error["key"] == {"entity": "boom", "id": uid}
        assert server.log().count(f"fetch of boom/{uid} failed") == 1
        assert "same" not in server.log()
        server.set("boom", uid, "ok")
        for client in subs:
            assert client.expect_push("boom", uid) == {"id": uid, "value": "ok"}
    finally:
        server.stop()


def test_a_fetch_that_hangs_for_some_users_times_out_for_them_alone_and_holds_up_no_one(
    servers: ServerPool, clients: Any, kind: str, uid: str
) -> None:
    """The fetches of one refresh run one after another until one waits; the others then go on."""
    server = servers.get(kind, ENTITYSYNC_PUSH_ON_SUBSCRIBE=False, ENTITYSYNC_FETCH_TIMEOUT=3)
    tokens = ["hang-1", "ann", "hang-2", "bob", "hang-3", "cy"]
    subs = {token: clients(server.ws_url, token=token) for token in tokens}
    for client in subs.values():
        client.subscribe("hangfor", uid, ref="s")
        client.expect(lambda f: f.get("ref") == "s")
    server.set("hangfor", uid, 1)
    for token in ("ann", "bob", "cy"):
        assert subs[token].expect_push("hangfor", uid) == {"id": uid, "secret": token, "value": 1}
    for token in ("hang-1", "hang-2", "hang-3"):
        subs[token].assert_silent(within=0.05)  # still fetching: not timed out before the others got theirs
    for token in ("hang-1", "hang-2", "hang-3"):
        error = subs[token].expect(lambda f: f.get("action") == "error")
        assert error["error"] == {"code": "fetch_failed", "message": f"fetching hangfor/{uid} timed out"}
    assert f"fetch of hangfor/{uid} timed out after 3s" in server.log()


def test_every_key_of_a_large_refresh_reaches_every_subscriber_with_its_own_rows(
    servers: ServerPool, clients: Any, kind: str, uid: str
) -> None:
    """Hundreds of keys changed at once: their fetches outlast a lane's time slice, and the
    lanes that take over leave none out."""
    server = servers.get(kind, ENTITYSYNC_PUSH_ON_SUBSCRIBE=False)
    ids = [f"{uid}-{n}" for n in range(150)]
    tokens = ["ann", "bob", "ann"]
    subs = [clients(server.ws_url, token=token) for token in tokens]
    for client in subs:
        for id in ids:
            client.subscribe("whoami", id)
        client.send({"action": "ping", "ref": "subscribed"})  # answered after every subscribe before it
        client.expect(lambda f: f.get("ref") == "subscribed")
    server.post("/_t/notify-entity/whoami")
    for client, token in zip(subs, tokens, strict=True):
        got = {}
        while len(got) < len(ids):
            frame = client.expect(lambda f: f.get("action") == "push")
            got[frame["key"]["id"]] = frame["body"]
        assert got == {id: {"id": id, "secret": token, "value": None} for id in ids}
