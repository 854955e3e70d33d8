"""Batch fetch (``@es.entity(name, batch=True)``): one call for the distinct secrets of a key's subscribers."""

from __future__ import annotations

from typing import Any

import pytest
from flask import Flask

from entitysync_sync import ConfigError, EntitySync
from tests.support.clients import Client
from tests.support.servers import Server, ServerPool


def subscribe_all(clients: Any, server: Server, tokens: list[str], uid: str) -> list[Client]:
    subs = [clients(server.ws_url, token=token) for token in tokens]
    for client in subs:
        client.subscribe("batchwho", uid, ref="s")
        client.expect(lambda f: f.get("ref") == "s")
    return subs


def test_one_call_per_chunk_of_distinct_secrets_and_each_gets_its_own_row(
    servers: ServerPool, clients: Any, kind: str, uid: str
) -> None:
    server = servers.get(kind, ENTITYSYNC_PUSH_ON_SUBSCRIBE=False, ENTITYSYNC_BATCH_SIZE=4)
    tokens = [f"user{n}" for n in range(10)] + ["user0", "user3"]  # ten distinct secrets
    subs = subscribe_all(clients, server, tokens, uid)
    server.set("batchwho", uid, "v1")
    for client, token in zip(subs, tokens, strict=True):
        assert client.expect_push("batchwho", uid) == {"id": uid, "secret": token, "value": "v1"}
    assert sorted(server.get(f"/_t/batch-calls/batchwho/{uid}")) == [2, 4, 4]
    server.post(f"/_t/delete/batchwho/{uid}")  # None for a secret is gone, as for a plain fetch
    for client in subs:
        assert client.expect(lambda f: f.get("action") in ("push", "gone"))["action"] == "gone"
    assert len(server.get(f"/_t/batch-calls/batchwho/{uid}")) == 6


def test_a_subscribe_fetches_with_a_batch_of_one(server: Server, clients: Any, uid: str) -> None:
    server.set_quietly("batchwho", uid, 1)
    client = clients(server.ws_url, token="ann")
    client.subscribe("batchwho", uid)
    assert client.expect_push("batchwho", uid) == {"id": uid, "secret": "ann", "value": 1}
    assert server.get(f"/_t/batch-calls/batchwho/{uid}") == [1]


@pytest.mark.parametrize("bad", ["short", "raise"])
def test_a_batch_that_fails_or_miscounts_fails_for_everyone_in_it_logged_once_and_retried(
    clients: Any, kind: str, uid: str, bad: str
) -> None:
    server = Server(kind, {"ENTITYSYNC_PUSH_ON_SUBSCRIBE": False, "ENTITYSYNC_BATCH_SIZE": 3,
                           "ENTITYSYNC_FETCH_RETRY_MAX": 0.5})
    try:
        tokens = [f"secret-token-{n}" for n in range(5)]
        subs = subscribe_all(clients, server, tokens, uid)
        server.set("batchwho", uid, bad)
        for client in subs:
            error = client.expect(lambda f: f.get("action") == "error")
            assert error["error"]["code"] == "fetch_failed" and error["key"] == {"entity": "batchwho", "id": uid}
        log = server.log()
        assert log.count(f"fetch of batchwho/{uid} failed") == 1, log
        if bad == "short":
            assert "returned 2 results for 3 secrets" in log or "returned 1 results for 2 secrets" in log
        assert "secret-token" not in log
        # Fixed without a notification: the retries find it.
        server.set_quietly("batchwho", uid, "ok")
        for client, token in zip(subs, tokens, strict=True):
            assert client.expect_push("batchwho", uid, timeout=15) == {"id": uid, "secret": token, "value": "ok"}
    finally:
        server.stop()


def test_a_batch_entity_cannot_be_shared() -> None:
    es = EntitySync(Flask(__name__))
    with pytest.raises(ConfigError, match="shared"):
        es.entity("things", shared=True, batch=True)
