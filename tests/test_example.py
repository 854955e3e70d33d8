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

from .conftest import ROOT, Client, Server


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
    first = client.expect_push("items", "1")
    assert first["name"] == "apples"
    assert client.expect_push("items", "1") == {"type": "user", "id": "alice", "name": "Alice Archer"}
    update(example, 1, first["value"] + "!")
    assert client.expect_push("items", "1") == {**first, "value": first["value"] + "!"}
    assert client.expect_push("items", "1") == {"type": "user", "id": "alice", "name": "Alice Archer"}
    client.send('{"action":"unsubscribe","body":{"entity":"items","id":"1"}}')
    client.send('{"action":"subscribe","body":{"entity":"items","id":"999"}}')
    assert client.recv() == {"action": "gone", "key": {"entity": "items", "id": "999"}}
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
