"""Slow clients, stalled clients and connection churn against real servers."""

from __future__ import annotations

import socket

from tests.support.clients import Client
from tests.support.servers import ServerPool
from tests.support.waiting import wait_for

SLOW = {"ENTITYSYNC_SEND_TIMEOUT": 1, "ENTITYSYNC_OUTBOX_LIMIT": 2000}
BIG = 1_000_000  # characters per pushed row of the "big" entity


def stalled_client(clients, url: str) -> Client:
    """A client with a tiny receive window that never reads."""
    return clients(url, sockopt=((socket.SOL_SOCKET, socket.SO_RCVBUF, 4096),))


def test_a_stalled_client_is_closed_and_others_keep_receiving(
    servers: ServerPool, clients, kind: str, uid: str
) -> None:
    server = servers.get(kind, **SLOW)
    healthy = clients(server.ws_url)
    healthy.subscribe("items", uid)
    healthy.expect(lambda f: f["action"] == "gone")
    stalled = stalled_client(clients, server.ws_url)
    big_id = f"{BIG}-{uid}"
    stalled.subscribe("big", big_id)
    wait_for(lambda: server.stats()["connections"] == 2 or None, message="both clients to connect")
    for n in range(8):  # 8 MB at a reader that takes nothing: its writer blocks
        server.set("big", big_id, n)
    for n in range(20):
        server.set("items", uid, n)
        assert healthy.expect_push("items", uid, lambda b, n=n: b["value"] == n, timeout=5)["value"] == n
    wait_for(lambda: server.stats()["connections"] == 1 or None, timeout=15,
             message="the stalled client to be closed")
    assert "closing a connection with 1008: send timed out" in server.log()
    server.set("items", uid, "after")
    assert healthy.expect_push("items", uid, lambda b: b["value"] == "after")["value"] == "after"


def test_a_client_that_floods_without_reading_hits_the_outbox_limit(
    servers: ServerPool, clients, kind: str, uid: str
) -> None:
    server = servers.get(kind, ENTITYSYNC_SEND_TIMEOUT=60, ENTITYSYNC_OUTBOX_LIMIT=2000)
    stalled = stalled_client(clients, server.ws_url)
    big_id = f"{BIG}-{uid}"
    stalled.subscribe("big", big_id)
    wait_for(lambda: server.stats()["subscriptions"] >= 1 or None, message="the subscription")
    for n in range(8):
        server.set("big", big_id, n)

    def flood_until_closed() -> bool:
        try:
            for n in range(200):
                stalled.subscribe("items", uid, ref=n)
        except OSError:
            return True
        return server.stats()["connections"] == 0

    wait_for(flood_until_closed, timeout=30, interval=0.05, message="the flooding client to be closed")
    wait_for(lambda: "closing a connection with 1008: outbox limit exceeded" in server.log() or None,
             message="the close to be logged")


def test_churn_returns_connections_subscriptions_and_tasks_to_baseline(
    servers: ServerPool, clients, kind: str, uid: str
) -> None:
    server = servers.get(kind)
    warm = clients(server.ws_url)
    warm.subscribe("items", "warm-" + uid)
    warm.expect(lambda f: f["action"] == "gone")
    warm.close()
    task = "greenlets" if kind == "gunicorn" else "threads"
    wait_for(lambda: server.stats()["connections"] == 0 or None, message="the warm-up client to go")
    baseline = wait_for(lambda: _settled(server), timeout=15, message="the server to settle")

    keys = [f"{uid}-{n}" for n in range(5)]
    for key in keys:
        server.set("items", key, 0)
    batch = []
    for n in range(30):
        client = clients(server.ws_url, token=f"user-{n}")
        for key in keys[n % 3: n % 3 + 3]:
            client.subscribe("items", key)
        batch.append(client)
    for client in batch[:10]:
        client.expect(lambda f: f["action"] == "push")
    wait_for(lambda: server.stats()["subscriptions"] == 90 or None, message="90 subscriptions")
    for key in keys:
        server.post(f"/_t/burst/items/{key}?n=20")
    for n, client in enumerate(batch):
        if n % 3 == 0:
            client.close()  # a clean close handshake
        elif n % 3 == 1:
            client.ws.sock.shutdown(socket.SHUT_RDWR)  # the peer vanishes
            client.ws.sock.close()
        else:
            client.ws.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            client.ws.sock.close()  # reset
    final = wait_for(
        lambda: (lambda s: s if s["connections"] == 0 and s["subscriptions"] == 0
                 and s[task] <= baseline[task] else None)(server.stats()),
        timeout=20, message=f"connections, subscriptions and {task} back to {baseline}")
    assert final["keys"] == 0


def _settled(server) -> dict[str, int] | None:
    """Stats once two reads in a row agree (background closes have finished)."""
    first = server.stats()
    second = server.stats()
    return second if first == second else None
