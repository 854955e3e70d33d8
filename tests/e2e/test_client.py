"""The browser client (entitysync.js) in real headless Chromium against real servers.

Each test loads a blank page of ``tests.server_app`` that loads the client
from the extension, then drives it with injected scripts that record every
state change, push, gone and error in ``window.log``.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.browsers import Browsers
from tests.support.servers import Server
from tests.support.waiting import wait_for

HARNESS = """
window.log = [];
window.es = new EntitySync(arguments[0], arguments[1]);
es.on("state", (state) => log.push({state}));
window.sub = (entity, id) => es.subscribe(entity, id, {
  onPush: (row) => log.push({push: entity + "/" + id, row}),
  onGone: () => log.push({gone: entity + "/" + id}),
  onError: (error) => log.push({error: entity + "/" + id, code: error.code}),
});
"""


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    """A server for this module alone, so its connection count is ours to read."""
    server = Server("gunicorn", {})
    yield server
    server.stop()


@pytest.fixture
def page(server: Server, browsers: Browsers) -> Any:
    wait_for(lambda: server.stats()["connections"] == 0, message="the previous test's pages to disconnect")
    driver = browsers.get(0)
    driver.get(server.http + "/_t/page")
    return driver


def start(driver: Any, url: str | None = None, **options: Any) -> None:
    driver.execute_script(HARNESS, url, options)
    log_until(driver, lambda e: e.get("state") == "open")


def log(driver: Any) -> list[dict[str, Any]]:
    return driver.execute_script("return log")  # type: ignore[no-any-return]


def log_until(driver: Any, predicate: Any, timeout: float = 10.0) -> dict[str, Any]:
    """Wait for a log entry matching ``predicate``, and return it."""
    found = wait_for(lambda: [e for e in log(driver) if predicate(e)], timeout=timeout,
                     message="a matching entry in the page's log")
    return found[0]  # type: ignore[no-any-return]


def pushes(driver: Any, key: str) -> list[Any]:
    return [e["row"] for e in log(driver) if e.get("push") == key]


def test_the_default_url_is_the_path_the_script_came_from(page: Any, server: Server, uid: str) -> None:
    start(page)
    assert page.execute_script("return es.url") == f"ws://127.0.0.1:{server.port}/ws/entity-sync/"
    assert page.execute_script("return es.state") == "open"
    server.set("items", uid, "first")
    page.execute_script("sub('items', arguments[0])", uid)
    log_until(page, lambda e: e.get("row") == {"id": uid, "value": "first"})
    server.set("items", uid, "second")
    log_until(page, lambda e: e.get("row") == {"id": uid, "value": "second"})
    server.post(f"/_t/delete/items/{uid}")
    log_until(page, lambda e: e.get("gone") == f"items/{uid}")


def test_a_set_goes_whole_to_onRows_and_row_by_row_to_onPush_without_it(page: Any, server: Server,
                                                                        uid: str) -> None:
    start(page)
    server.set_quietly("lists", uid, ["a", "b"])
    server.set_quietly("lists", f"{uid}-p", ["c", "d"])
    page.execute_script("""
        es.subscribe("lists", arguments[0], {onRows: (rows) => log.push({rows: rows.map((r) => r.member)})});
        sub("lists", arguments[0] + "-p");""", uid)
    log_until(page, lambda e: e.get("rows") == ["a", "b"])
    wait_for(lambda: [r["member"] for r in pushes(page, f"lists/{uid}-p")] == ["c", "d"],
             message="each row of the set at onPush")
    server.set("lists", uid, ["b"])  # "a" left the set: onRows gets the set without it
    log_until(page, lambda e: e.get("rows") == ["b"])
    server.set("lists", uid, [])
    log_until(page, lambda e: e.get("rows") == [])
    assert [e["rows"] for e in log(page) if "rows" in e] == [["a", "b"], ["b"], []]


def test_the_es_module_form_exports_the_same_client(page: Any, server: Server, uid: str) -> None:
    server.set("items", uid, "from a module")
    url, row = page.execute_async_script("""
        const done = arguments[arguments.length - 1];
        import("/ws/entity-sync/client.mjs").then(({EntitySync, default: Default}) => {
          if (EntitySync !== Default) return done(["exports differ", null]);
          const es = new EntitySync();
          es.subscribe("items", arguments[0], {onPush: (row) => { es.close(); done([es.url, row]); }});
        });""", uid)
    assert url == f"ws://127.0.0.1:{server.port}/ws/entity-sync/"
    assert row == {"id": uid, "value": "from a module"}


def test_unsubscribe_stops_pushes_once_the_last_subscription_goes(page: Any, server: Server, uid: str) -> None:
    start(page)
    server.set("items", uid, 0)
    page.execute_script("window.one = sub('items', arguments[0]); window.two = sub('items', arguments[0])", uid)
    wait_for(lambda: len(pushes(page, f"items/{uid}")) >= 2, message="a push for each subscription")
    page.execute_script("one.unsubscribe()")
    server.set("items", uid, 1)
    log_until(page, lambda e: e.get("row") == {"id": uid, "value": 1})
    page.execute_script("two.unsubscribe()")
    wait_for(lambda: server.stats()["subscriptions"] == 0, message="the server to drop the subscription")
    server.set("items", uid, 2)
    # A change made after it on another key arrives; the unsubscribed key's never does.
    page.execute_script("sub('items', arguments[0])", uid + "x")
    server.set("items", uid + "x", "later")
    log_until(page, lambda e: e.get("row") == {"id": uid + "x", "value": "later"})
    assert {"id": uid, "value": 2} not in pushes(page, f"items/{uid}")


def test_the_secret_is_sent_and_set_secret_retries_what_it_forbade(page: Any, server: Server, uid: str) -> None:
    start(page, None, secret="user-1")
    page.execute_script("sub('whoami', arguments[0]); sub('private', arguments[0])", uid)
    assert log_until(page, lambda e: e.get("push") == f"whoami/{uid}")["row"]["secret"] == "user-1"
    assert log_until(page, lambda e: e.get("error") == f"private/{uid}")["code"] == "forbidden"
    page.execute_script("es.setSecret('admin-1')")
    assert log_until(page, lambda e: e.get("push") == f"private/{uid}")["row"] == {"id": uid, "for": "admin-1"}
    log_until(page, lambda e: e.get("row", {}).get("secret") == "admin-1")


def test_close_disconnects_for_good(page: Any, server: Server) -> None:
    start(page)
    wait_for(lambda: server.stats()["connections"] == 1, message="the page's connection")
    page.execute_script("es.close()")
    assert page.execute_script("return es.state") == "closed"
    wait_for(lambda: server.stats()["connections"] == 0, message="the server to see the close")
    assert [e["state"] for e in log(page) if "state" in e][-1] == "closed"


def test_a_quiet_connection_is_kept_by_ping_and_pong(page: Any, server: Server) -> None:
    page.execute_script("""
        window.sent = [];
        const send = WebSocket.prototype.send;
        WebSocket.prototype.send = function (data) { sent.push(JSON.parse(data)); return send.call(this, data); };""")
    start(page, None, heartbeat=200, timeout=3000)
    wait_for(lambda: page.execute_script("return sent.filter(f => f.action === 'ping').length") >= 3,
             message="three heartbeats on a quiet connection")
    assert page.execute_script("return sent") == [{"action": "ping"}] * len(page.execute_script("return sent"))
    # Each ping was answered in time: the connection was never taken for dead.
    assert [e["state"] for e in log(page) if "state" in e] == ["open"]
    assert page.execute_script("return es.state") == "open"


def test_a_dead_connection_is_detected_and_replaced(browsers: Browsers, uid: str) -> None:
    """A paused server keeps its TCP connections open but answers nothing."""
    server = Server("flask", {})
    try:
        page = browsers.get(0)
        page.get(server.http + "/_t/page")
        start(page, None, secret="s1", heartbeat=300, timeout=500, minDelay=100, maxDelay=400)
        page.execute_script("sub('whoami', arguments[0])", uid)
        log_until(page, lambda e: e.get("push") == f"whoami/{uid}")
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            log_until(page, lambda e: e.get("state") == "closed", timeout=5)
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        # It reconnects and sends the secret and the subscription again.
        server.set("whoami", uid, "after")
        log_until(page, lambda e: e.get("row") == {"id": uid, "secret": "s1", "value": "after"})
        assert page.execute_script("return es.state") == "open"
    finally:
        server.stop()


def test_after_a_reconnect_it_sends_the_versions_it_holds_and_gets_only_what_changed(
    page: Any, server: Server, uid: str
) -> None:
    same, changed = f"same{uid}", f"changed{uid}"
    server.set_quietly("items", same, "kept")
    server.set_quietly("items", changed, "old")
    start(page, None, minDelay=50, maxDelay=100)
    page.execute_script("sub('items', arguments[0]); sub('items', arguments[1])", same, changed)
    log_until(page, lambda e: e.get("row") == {"id": changed, "value": "old"})
    assert page.execute_script("return es._keys.get('items/' + arguments[0]).v", same)  # it keeps the version
    page.execute_script("es._ws.close()")  # the connection drops; it reconnects on its own
    log_until(page, lambda e: e.get("state") == "closed")
    server.set("items", changed, "new")  # while it is away
    log_until(page, lambda e: e.get("row") == {"id": changed, "value": "new"})
    # Resubscriptions are answered in order: the unchanged row would have come first, and did not.
    assert pushes(page, f"items/{same}") == [{"id": same, "value": "kept"}]
    # The change's notification may reach the server after the resubscription and push "new" once more.
    old_row, *new_rows = pushes(page, f"items/{changed}")
    assert old_row == {"id": changed, "value": "old"} and new_rows[:1] == [{"id": changed, "value": "new"}]
    assert all(row == {"id": changed, "value": "new"} for row in new_rows)


def test_after_a_restart_close_it_waits_a_random_part_of_restart_delay(browsers: Browsers, uid: str) -> None:
    server = Server("flask", {"ENTITYSYNC_DRAIN_SECONDS": 0})
    try:
        page = browsers.get(0)
        page.get(server.http + "/_t/page")
        start(page, None, minDelay=100, maxDelay=200, restartDelay=2000)
        wait_for(lambda: server.stats()["connections"] == 1, message="the page's connection")
        page.execute_script("""
          Math.random = () => 0.75;  // the random part this client draws: 1.5 s of 2 s
          window.stamps = [];
          es.on("state", (state) => stamps.push([state, performance.now()]));
        """)
        server.post("/_t/drain")  # every websocket closed with 1012, and new ones refused with it
        wait_for(lambda: len(page.execute_script("return stamps")) >= 2, message="a reconnect attempt")
        (closed, at_close), (connecting, at_retry) = page.execute_script("return stamps")[:2]
        assert (closed, connecting) == ("closed", "connecting")
        assert 1400 <= at_retry - at_close < 4000  # not the 50-100 ms of its ordinary backoff
    finally:
        server.stop()
