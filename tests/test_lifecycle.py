"""Every greenlet or thread the library starts is owned, and joined when the extension closes.

Real servers of both kinds, on the in-process bus and on each broker, with
clients that subscribe and get pushes (so connection workers, fetch
retries, the sweeper and the bus loops have all run); ``es.close()`` then
must leave none of them running.
"""

from __future__ import annotations

from typing import Any, Callable

from tests.support.clients import Client
from tests.support.pushes import seed, subscribed
from tests.support.servers import Server


def exercise_and_close(server: Server, uid: str) -> dict[str, Any]:
    seed(server, uid, "v0")
    clients = [subscribed(Client(server.ws_url), server, "items", uid, "v0") for _ in range(3)]
    for n in range(3):
        server.set("items", uid, n)
    for client in clients:
        client.expect_push("items", uid, lambda body: body["value"] == 2)
    failing = Client(server.ws_url)  # a failing fetch schedules retries
    failing.subscribe("boom", f"{uid}-boom")
    failing.expect(lambda f: f["action"] == "error" and f["error"]["code"] == "fetch_failed")
    clients.append(failing)
    report: dict[str, Any] = server.post("/_t/close")
    for client in clients:
        assert client.close_code() == 1001
    return report


def assert_all_joined(report: dict[str, Any], kind: str) -> None:
    assert report["joined"] is True, report
    assert report["tasks"] == 0, report
    assert report["bus_tasks"] == 0, report
    if kind == "flask":  # threads: greenlets have no names to list
        assert report["threads"] == [], report


def test_close_joins_everything_on_the_memory_bus(kind: str, uid: str) -> None:
    server = Server(kind, {})  # its own: a closed extension serves nobody after this test
    try:
        assert_all_joined(exercise_and_close(server, uid), kind)
    finally:
        server.stop()


def test_close_joins_everything_on_a_broker(broker: Any, cluster: Callable[..., Server], kind: str,
                                            uid: str) -> None:
    server = cluster(kind, broker)
    assert_all_joined(exercise_and_close(server, uid), kind)
