"""entitysync_sync.testing and its pytest plugin, as an app's own tests would use them."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest
from flask import Flask

from entitysync_sync import ConfigError
from entitysync_sync.testing import LiveServer, WebSocketClient
from tests.support.live_app import make_app
from tests.support.servers import ROOT


@pytest.fixture
def live() -> Iterator[LiveServer]:
    app, _ = make_app()
    with LiveServer(app) as server:
        yield server


def test_the_readme_flow_push_change_gone_and_silence(live: LiveServer) -> None:
    client = live.client(cookies={"user": "ann"})
    client.subscribe("items", 1)
    assert client.expect_push("items", 1) == {"id": "1", "name": "apples", "for": "ann"}
    live.app.test_client().post("/items/1", json={"name": "pears"})
    assert client.expect_push("items", 1)["name"] == "pears"
    live.app.test_client().delete("/items/1")
    client.expect_gone("items", 1)
    client.assert_silent()
    assert [f["action"] for f in client.received] == ["push", "push", "gone"]


def test_changes_over_http_reach_the_client_too(live: LiveServer) -> None:
    client = live.client()
    client.subscribe("items", 2, ref="r1")
    client.expect(lambda f: f == {"action": "ack", "ref": "r1"}, what="the ack")
    client.expect_gone("items", 2)
    req = urllib.request.Request(f"{live.url}/items/2", data=b'{"name":"plums"}', method="POST",
                                 headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=5).close()
    assert client.expect_push("items", 2)["name"] == "plums"


def test_expect_push_fails_fast_on_gone_and_lists_what_it_saw_on_timeout(live: LiveServer) -> None:
    client = live.client()
    client.subscribe("items", 404)
    with pytest.raises(AssertionError, match=r"expected a push of items/404, got .*gone"):
        client.expect_push("items", 404)
    client.subscribe("items", 1)
    with pytest.raises(AssertionError, match=r"expected gone of items/1, got .*push"):
        client.expect_gone("items", 1)
    with pytest.raises(AssertionError, match=r"within 0.2s; received \[\]"):
        client.expect_push("items", 1, timeout=0.2)


def test_assert_silent_fails_when_a_frame_arrives(live: LiveServer) -> None:
    client = live.client()
    client.subscribe("items", 1)
    with pytest.raises(AssertionError, match="expected no frame"):
        client.assert_silent(within=5)


def test_errors_and_secrets(live: LiveServer) -> None:
    client = live.client()
    client.subscribe("items", "secret-only")
    assert client.expect_error("forbidden")["key"] == {"entity": "items", "id": "secret-only"}
    client.set_secret("admin")
    client.subscribe("items", "secret-only")
    client.expect_gone("items", "secret-only")
    client.subscribe("nope", 1)
    client.expect_error("unknown_entity")


def test_stop_closes_the_clients_and_the_port() -> None:
    app, _ = make_app()
    server = LiveServer(app).start()
    client = server.client()
    url = server.url
    server.stop()
    with pytest.raises(Exception):  # noqa: B017 - closed, whichever way websocket-client says it
        client.recv(timeout=2)
    with pytest.raises(OSError):
        urllib.request.urlopen(url + "/", timeout=2)
    server.stop()  # idempotent


def test_a_live_server_needs_entitysync_on_the_app() -> None:
    with pytest.raises(ConfigError, match="init_app"):
        LiveServer(Flask(__name__))


def test_a_client_can_connect_by_url(live: LiveServer) -> None:
    with WebSocketClient(live.ws_url, timeout=2) as client:
        client.subscribe("items", 1)
        assert client.expect_push("items", 1)["name"] == "apples"


def test_the_pytest_plugin_runs_an_apps_own_tests(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text(textwrap.dedent("""
        import pytest
        from tests.support.live_app import make_app

        pytest_plugins = ["entitysync_sync.pytest_plugin"]

        @pytest.fixture
        def app():
            return make_app()[0]
    """))
    (tmp_path / "test_app.py").write_text(textwrap.dedent("""
        def test_push(app, entitysync_client, entitysync_live):
            client = entitysync_client(cookies={"user": "bo"})
            client.subscribe("items", 1)
            assert client.expect_push("items", 1)["for"] == "bo"
            app.test_client().post("/items/1", json={"name": "figs"})
            assert client.expect_push("items", 1)["name"] == "figs"
            assert entitysync_live.ws_url.endswith("/ws/entity-sync/")

        def test_failing(app, entitysync_client):
            entitysync_client().expect_push("items", 404, timeout=0.5)
    """))
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert "1 failed, 1 passed" in result.stdout, result.stdout + result.stderr
    assert "AssertionError: expected a push of items/404 within 0.5s; received []" in result.stdout
