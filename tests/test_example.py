"""example_flask, started the way the README starts it, speaks the seed's protocol."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from entitysync_sync.protocol import result_version
from tests.support.clients import Client
from tests.support.servers import ROOT, Server


@pytest.fixture(params=["flask", "gunicorn"])
def example(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Server]:
    app = "example_flask:create_app()"
    server = Server(request.param, {"DATABASE": str(tmp_path / "items.sqlite")}, app=app, ready_path="/")
    yield server
    server.stop()


def update(server: Server, item: int, value: str) -> None:
    req = urllib.request.Request(f"{server.http}/items/{item}", data=json.dumps({"value": value}).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert json.loads(resp.read()) == {"ok": True}


def test_the_seed_frames_work_unchanged_against_the_example(example: Server, clients) -> None:
    client: Client = clients(example.ws_url)
    client.send('{"action":"secret","body":"my-secret"}')
    client.send('{"action":"subscribe","body":{"entity":"items","id":"1"}}')
    first, owner = client.expect_push("items", "1")  # one push: the item and its owner
    assert first["name"] == "apples"
    assert owner == {"type": "user", "id": "alice", "name": "Alice Archer"}
    update(example, 1, first["value"] + "!")
    assert client.expect_push("items", "1") == [{**first, "value": first["value"] + "!"}, owner]
    client.send('{"action":"unsubscribe","body":{"entity":"items","id":"1"}}')
    client.send('{"action":"subscribe","body":{"entity":"items","id":"999"}}')
    assert client.recv() == {"action": "gone", "key": {"entity": "items", "id": "999"}, "v": result_version(None)}
    update(example, 1, "x")
    client.assert_silent()


def test_the_example_page_renders_the_items(example: Server) -> None:
    with urllib.request.urlopen(example.http + "/", timeout=10) as resp:
        page = resp.read().decode()
    assert "apples" in page and "/ws/entity-sync/client.js" in page
    assert "plums" not in page  # private: only its owner and admin see it


def test_the_mutator_process_refuses_a_bus_that_reaches_no_server(tmp_path: Path) -> None:
    env = dict(os.environ, FLASK_DATABASE=json.dumps(str(tmp_path / "items.sqlite")))
    env.pop("FLASK_ENTITYSYNC_BUS_URL", None)
    done = subprocess.run([sys.executable, "-m", "flask", "--app", "example_flask", "mutate"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "memory:// reaches nobody" in done.stderr and "FLASK_ENTITYSYNC_BUS_URL" in done.stderr


def post(server: Server, path: str, body: dict[str, object] | None = None) -> None:
    req = urllib.request.Request(f"{server.http}{path}", data=json.dumps(body or {}).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert json.loads(resp.read()) == {"ok": True}


def test_the_example_lists_push_whole_sets_after_each_commit_and_bulk_statement(example: Server, clients) -> None:
    client: Client = clients(example.ws_url)
    client.subscribe("lists", 1)
    client.subscribe("lists", 2)
    latest: dict[str, list[str]] = {}

    def until(expected: dict[str, list[str]]) -> None:
        """Read pushes until the latest set of each list is as expected (pushes of two lists may interleave)."""
        def read(frame: dict[str, object]) -> bool:
            if frame.get("action") == "push":
                rows = frame["rows"]
                assert isinstance(rows, list) and isinstance(frame["key"], dict)
                latest[frame["key"]["id"]] = [("done " if r["done"] else "") + r["title"] for r in rows]
            return all(latest.get(id) == titles for id, titles in expected.items())
        client.expect(read)

    until({"1": ["milk", "bread"], "2": ["laundry", "done dishes"]})
    post(example, "/tasks/1/move", {"list": 2})  # one commit, two lists: the one it left, the one it joined
    until({"1": ["bread"], "2": ["milk", "laundry", "done dishes"]})
    post(example, "/lists/2/done")  # a bulk UPDATE: the lists are refreshed after its commit
    until({"1": ["bread"], "2": ["done milk", "done laundry", "done dishes"]})
    post(example, "/tasks/2/delete")
    until({"1": []})  # an empty list, not gone
    client.assert_silent()
