"""The per-server cache and single flight of shared entities, against real servers."""

from __future__ import annotations

from typing import Any

from tests.support.clients import Client
from tests.support.servers import Server, ServerPool
from tests.support.waiting import wait_for


def fetches(server: Server, entity: str, uid: str) -> int:
    return server.get(f"/_t/fetches/{entity}/{uid}")["count"]  # type: ignore[no-any-return]


def subscribed(server: Server, clients: Any, entity: str, uid: str, value: Any) -> Client:
    client = clients(server.ws_url)
    client.subscribe(entity, uid)
    assert client.expect_push(entity, uid)["value"] == value
    return client


def test_a_subscribe_to_a_cached_key_costs_no_fetch_until_a_change(
    server: Server, clients: Any, uid: str
) -> None:
    server.set_quietly("shared", uid, 1)
    first = subscribed(server, clients, "shared", uid, 1)
    assert fetches(server, "shared", uid) == 1
    hits = server.get("/_t/es-stats")["shared_cache_hits"]
    for _ in range(3):
        subscribed(server, clients, "shared", uid, 1)
    assert fetches(server, "shared", uid) == 1
    stats = server.get("/_t/es-stats")
    assert stats["shared_cache_hits"] >= hits + 3 and stats["shared_cache_keys"] >= 1
    assert stats["shared_cache_size"] > 0
    server.set("shared", uid, 2)  # a change: one fetch for everyone, and the cache holds its frames
    assert first.expect_push("shared", uid)["value"] == 2
    subscribed(server, clients, "shared", uid, 2)
    assert fetches(server, "shared", uid) == 2


def test_the_cache_goes_with_the_last_subscriber_and_on_an_entity_wide_refresh(
    server: Server, clients: Any, uid: str
) -> None:
    server.set_quietly("shared", uid, "a")
    a = subscribed(server, clients, "shared", uid, "a")
    b = subscribed(server, clients, "shared", uid, "a")
    a.unsubscribe("shared", uid)
    b.close()
    wait_for(lambda: server.get("/_t/es-stats")["subscriptions"] == 0 or None, message="no subscriber left")
    # Changed without a notification: only a cache that outlived its subscribers could serve "a" now.
    server.set_quietly("shared", uid, "b")
    c = subscribed(server, clients, "shared", uid, "b")
    server.set_quietly("shared", uid, "c")
    server.post("/_t/notify-entity/shared")  # e.g. after a data migration
    assert c.expect_push("shared", uid)["value"] == "c"
    subscribed(server, clients, "shared", uid, "c")


def test_concurrent_subscribes_share_one_fetch(server: Server, clients: Any, uid: str) -> None:
    server.set_quietly("sharedslow", uid, 0)
    subs = [clients(server.ws_url) for _ in range(20)]
    for client in subs:  # all within the first subscriber's 0.3 s fetch, or after it from the cache
        client.subscribe("sharedslow", uid)
    for client in subs:
        assert client.expect_push("sharedslow", uid)["value"] == 0
    assert fetches(server, "sharedslow", uid) == 1
    server.set("sharedslow", uid, 1)
    late = clients(server.ws_url)
    late.subscribe("sharedslow", uid)  # during the notification's fetch: it joins it
    assert late.expect_push("sharedslow", uid, lambda b: b["value"] == 1)["value"] == 1
    for client in subs:
        assert client.expect_push("sharedslow", uid)["value"] == 1
    assert fetches(server, "sharedslow", uid) == 2


def test_the_cache_is_bounded(servers: ServerPool, clients: Any, kind: str, uid: str) -> None:
    server = servers.get(kind, ENTITYSYNC_SHARED_CACHE_SIZE=300)
    ids = [f"{uid}-{n}" for n in range(5)]  # each push is about 100 characters
    for id in ids:
        server.set_quietly("shared", id, id)
        subscribed(server, clients, "shared", id, id)
    stats = server.get("/_t/es-stats")
    assert 0 < stats["shared_cache_size"] <= 300 and stats["shared_cache_keys"] < 5
    # Evicted or not, every subscriber gets current rows.
    for id in ids:
        subscribed(server, clients, "shared", id, id)


def test_a_cache_of_size_0_is_off(servers: ServerPool, clients: Any, kind: str, uid: str) -> None:
    server = servers.get(kind, ENTITYSYNC_SHARED_CACHE_SIZE=0)
    server.set_quietly("shared", uid, 1)
    subscribed(server, clients, "shared", uid, 1)
    subscribed(server, clients, "shared", uid, 1)
    assert fetches(server, "shared", uid) == 2
    assert server.get("/_t/es-stats")["shared_cache_keys"] == 0
