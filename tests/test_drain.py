"""Deploys without a stampede: a stopping worker closes its websockets with 1012 a few at a time."""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tests.support.clients import Client
from tests.support.servers import Server
from tests.support.waiting import wait_for

INFO = {"ENTITYSYNC_TEST_LOG_LEVEL": "INFO"}


def closed_at(client: Client) -> tuple[int | None, float]:
    code = client.close_code(timeout=20)
    return code, time.monotonic()


def test_sigterm_spreads_1012_closes_over_the_drain_seconds(uid: str) -> None:
    server = Server("gunicorn", {"ENTITYSYNC_DRAIN_SECONDS": 2}, extra_args=("--graceful-timeout", "20"),
                    extra_env=INFO)
    subs: list[Client] = []
    try:
        for _ in range(10):
            client = Client(server.ws_url)
            client.subscribe("items", uid)
            client.expect(lambda f: f["action"] == "gone")
            subs.append(client)
        with ThreadPoolExecutor(len(subs)) as pool:
            started = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            results = list(pool.map(closed_at, subs))
        assert [code for code, _ in results] == [1012] * 10
        times = sorted(at - started for _, at in results)
        assert times[0] < 1.5  # the first at once
        assert times[-1] - times[0] >= 1.2, times  # the rest spread over about 2 s, not all at once
        assert "closing 10 websocket(s) with 1012 over 2s" in server.log()
        server.proc.wait(timeout=15)  # and the worker then had nothing left to wait for
    finally:
        for client in subs:
            client.close()
        server.stop()


def test_the_drain_ends_before_gunicorns_graceful_timeout(uid: str) -> None:
    server = Server("gunicorn", {"ENTITYSYNC_DRAIN_SECONDS": 30}, extra_args=("--graceful-timeout", "3"),
                    extra_env=INFO)
    try:
        clients = [Client(server.ws_url) for _ in range(3)]
        wait_for(lambda: server.stats()["connections"] == 3, message="three connections")
        server.proc.send_signal(signal.SIGTERM)
        with ThreadPoolExecutor(3) as pool:
            assert list(pool.map(lambda c: c.close_code(timeout=20), clients)) == [1012] * 3
        assert "closing 3 websocket(s) with 1012 over 2s" in server.log()
    finally:
        server.stop()


def test_a_draining_server_refuses_new_websockets_with_1012(kind: str, uid: str) -> None:
    server = Server(kind, {"ENTITYSYNC_DRAIN_SECONDS": 0})
    try:
        client = Client(server.ws_url)
        wait_for(lambda: server.stats()["connections"] == 1, message="the connection")
        assert server.post("/_t/drain") == {"ok": True}
        assert client.close_code() == 1012
        assert Client(server.ws_url).close_code() == 1012
        server.set("items", uid, 1)  # notify still works while draining
    finally:
        server.stop()


def test_a_restart_under_load_where_every_client_converges(clients: Any, uid: str) -> None:
    """Clients of a restarted server come back holding versions; each ends with the current rows."""
    import tempfile
    from pathlib import Path

    db = str(Path(tempfile.mkdtemp(prefix="entitysync-db-")) / "rows.sqlite3")
    env = {"ENTITYSYNC_TEST_DB": db}
    config = {"ENTITYSYNC_DRAIN_SECONDS": 1}
    first = Server("gunicorn", config, extra_env=env, extra_args=("--graceful-timeout", "10"))
    keys = [f"{uid}-{n}" for n in range(10)]
    try:
        for n, key in enumerate(keys):
            first.set_quietly("shared", key, n)
        held: list[tuple[int, dict[str, str]]] = []
        subs = []
        for i in range(40):
            client = clients(first.ws_url)
            mine = {keys[(i + j) % 10]: "" for j in range(5)}
            for key in mine:
                client.subscribe("shared", key)
            for _ in mine:
                frame = client.expect(lambda f: f.get("action") == "push")
                mine[frame["key"]["id"]] = frame["v"]
            held.append((i, mine))
            subs.append(client)
        first.set_quietly("shared", keys[0], "changed while restarting")
        first.proc.send_signal(signal.SIGTERM)
        with ThreadPoolExecutor(8) as pool:
            assert set(pool.map(lambda c: c.close_code(timeout=20), subs)) == {1012}
        first.stop()
        second = Server("gunicorn", config, extra_env=env)
        try:
            fetched_before = sum(second.get(f"/_t/fetches/shared/{key}")["count"] for key in keys)
            back = []
            for _, mine in held:  # everyone comes back at once, each with the versions it holds
                client = clients(second.ws_url)
                for key, v in mine.items():
                    client.send({"action": "subscribe", "body": {"entity": "shared", "id": key, "v": v}})
                back.append((client, mine))
            second.set("shared", keys[1], "changed after")  # and the load goes on
            def converges(client: Any, mine: dict[str, str]) -> None:
                want = {key: None for key in mine}
                if keys[0] in mine:
                    want[keys[0]] = "changed while restarting"
                if keys[1] in mine:
                    want[keys[1]] = "changed after"
                for key, value in want.items():
                    if value is not None:
                        assert client.expect_push("shared", key, lambda b, v=value: b["value"] == v)["value"] == value
                # Nothing else changed: the versions held spared every other push.
                client.assert_settles(lambda f: f.get("action") == "push" and f["key"]["id"] in keys[:2],
                                      within=0.5)

            with ThreadPoolExecutor(len(back)) as pool:  # each client read by one thread; all settle together
                list(pool.map(lambda pair: converges(*pair), back))
            fetches = sum(second.get(f"/_t/fetches/shared/{key}")["count"] for key in keys) - fetched_before
            assert fetches <= 12, fetches  # one per key, plus the notification's refetch
        finally:
            second.stop()
    finally:
        first.stop()
