"""Shared fixtures: real server processes on 127.0.0.1 and real websocket clients.

Servers run in their own processes, under ``gunicorn -k gevent`` (production)
or the threaded ``flask run`` (development), each on an ephemeral port that
the test reads from the server's own log. Nothing here sleeps to
synchronise: every wait polls with a deadline.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import websocket

pytest_plugins = ["tests.brokers"]  # the broker and cluster fixtures of the bus tests

ROOT = Path(__file__).resolve().parent.parent
WS_PATH = "/ws/entity-sync/"
SERVER_KINDS = ("gunicorn", "flask")


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02,
             message: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message}; last value {last!r}")


def _gunicorn_flags() -> list[str]:
    help_text = subprocess.run(
        [sys.executable, "-m", "gunicorn", "--help"], capture_output=True, text=True, check=True
    ).stdout
    return ["--no-control-socket"] if "--no-control-socket" in help_text else []


class Server:
    """One server process running ``tests.server_app`` with the given config."""

    def __init__(self, kind: str, config: dict[str, Any], app: str = "tests.server_app:create_app()",
                 ready_path: str = "/_t/stats", extra_args: tuple[str, ...] = (),
                 extra_env: dict[str, str] | None = None, port: int = 0):
        self.kind = kind
        self.ready_path = ready_path
        self.config = config
        self.log_path = Path(tempfile.mkstemp(prefix=f"entitysync-{kind}-", suffix=".log")[1])
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        env["PYTHONUNBUFFERED"] = "1"
        for key, value in config.items():
            env[f"FLASK_{key}"] = json.dumps(value)
        env.update(extra_env or {})
        if kind == "gunicorn":
            cmd = [sys.executable, "-m", "gunicorn", "-k", "gevent", "-w", "1",
                   "-b", f"127.0.0.1:{port}", "--graceful-timeout", "2", *_gunicorn_flags(), *extra_args, app]
            pattern = r"Listening at: http://127\.0\.0\.1:(\d+)"
        elif kind == "flask":
            cmd = [sys.executable, "-m", "flask", "--app", app.removesuffix("()"), "run",
                   "--host", "127.0.0.1", "--port", str(port), "--with-threads", "--no-reload"]
            pattern = r"Running on http://127\.0\.0\.1:(\d+)"
        else:  # pragma: no cover
            raise ValueError(kind)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

        def port() -> int | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"{kind} server exited early:\n{self.log()}")
            found = re.search(pattern, self.log())
            return int(found.group(1)) if found else None

        self.port = wait_for(port, timeout=30, message=f"{kind} server to listen")
        self.http = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}{WS_PATH}"
        wait_for(self._ready, timeout=30, message=f"{kind} server to answer")

    def _ready(self) -> bool:
        try:
            urllib.request.urlopen(self.http + self.ready_path, timeout=10).close()
        except OSError:
            return False
        return True

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def post(self, path: str, body: Any = None) -> Any:
        data = json.dumps(body if body is not None else {}).encode()
        req = urllib.request.Request(self.http + path, data=data, method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.http + path, timeout=10) as resp:
            return json.loads(resp.read())

    def set(self, entity: str, id: str, value: Any) -> None:
        """Change a row inside the server and notify its key."""
        self.post(f"/_t/set/{entity}/{id}", {"value": value})

    def stats(self) -> dict[str, int]:
        return self.get("/_t/stats")  # type: ignore[no-any-return]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:  # pragma: no cover
                self.proc.kill()
                self.proc.wait()
        self._log.close()


class Client:
    """A real websocket client (websocket-client) with JSON helpers."""

    def __init__(self, url: str, token: str | None = None, **options: Any) -> None:
        # The token travels as a cookie, as a browser's session would: a query
        # string would put it in the server's access log.
        if token is not None:
            options["cookie"] = f"token={token}"
        self.ws = websocket.create_connection(url, timeout=10, **options)

    def send(self, obj: Any) -> None:
        self.ws.send(obj if isinstance(obj, str) else json.dumps(obj))

    def subscribe(self, entity: str, id: Any, ref: Any = None) -> None:
        frame: dict[str, Any] = {"action": "subscribe", "body": {"entity": entity, "id": id}}
        if ref is not None:
            frame["ref"] = ref
        self.send(frame)

    def unsubscribe(self, entity: str, id: Any, ref: Any = None) -> None:
        frame: dict[str, Any] = {"action": "unsubscribe", "body": {"entity": entity, "id": id}}
        if ref is not None:
            frame["ref"] = ref
        self.send(frame)

    def recv(self, timeout: float = 10.0) -> Any:
        self.ws.settimeout(timeout)
        return json.loads(self.ws.recv())

    def expect(self, predicate: Callable[[Any], bool], timeout: float = 10.0) -> Any:
        """Read frames until one matches ``predicate``; fail on timeout."""
        deadline = time.monotonic() + timeout
        seen = []
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no matching frame within {timeout}s; saw {seen!r}")
            try:
                frame = self.recv(remaining)
            except websocket.WebSocketTimeoutException:
                continue
            seen.append(frame)
            if predicate(frame):
                return frame

    def expect_push(self, entity: str, id: str, predicate: Callable[[Any], bool] = lambda b: True,
                    timeout: float = 10.0) -> Any:
        """The next push of the key whose payload matches: its ``"body"``, or its ``"rows"`` for a set."""
        def payload(frame: Any) -> Any:
            return frame["rows"] if "rows" in frame else frame["body"]

        return payload(self.expect(lambda f: f.get("action") == "push"
                                   and f["key"] == {"entity": entity, "id": id}
                                   and predicate(payload(f)), timeout))

    def assert_silent(self, within: float = 0.5) -> None:
        """Assert that no frame arrives within ``within`` seconds."""
        self.ws.settimeout(within)
        try:
            frame = self.ws.recv()
        except websocket.WebSocketTimeoutException:
            return
        raise AssertionError(f"unexpected frame {frame!r}")

    def close_code(self, timeout: float = 10.0) -> int | None:
        """Read until the server closes; its close code, or None if the TCP
        connection ended without a close frame."""
        self.ws.settimeout(timeout)
        while True:
            try:
                opcode, data = self.ws.recv_data(control_frame=True)
            except (websocket.WebSocketConnectionClosedException, ConnectionError):
                return None
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                return int.from_bytes(data[:2], "big") if len(data) >= 2 else None

    def close(self) -> None:
        self.ws.close()


class ServerPool:
    """Starts each (kind, config) server once per test session."""

    def __init__(self) -> None:
        self.servers: dict[tuple[str, str], Server] = {}

    def get(self, kind: str, **config: Any) -> Server:
        ident = (kind, json.dumps(config, sort_keys=True))
        server = self.servers.get(ident)
        if server is None or server.proc.poll() is not None:
            server = self.servers[ident] = Server(kind, config)
        return server

    def close(self) -> None:
        for server in self.servers.values():
            server.stop()


@pytest.fixture(scope="session")
def servers() -> Iterator[ServerPool]:
    pool = ServerPool()
    yield pool
    pool.close()


@pytest.fixture(params=SERVER_KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def server(servers: ServerPool, kind: str) -> Server:
    """The default-configured server, under gunicorn -k gevent and under flask run."""
    return servers.get(kind)


@pytest.fixture
def clients() -> Iterator[Callable[..., Client]]:
    """Open clients with ``clients(url, token=...)``; all are closed after the test."""
    opened: list[Client] = []

    def connect(url: str, token: str | None = None, **options: Any) -> Client:
        client = Client(url, token, **options)
        opened.append(client)
        return client

    yield connect
    for client in opened:
        try:
            client.close()
        except Exception:
            pass


@pytest.fixture
def uid(request: pytest.FixtureRequest) -> str:
    """A short id unique to this test, so tests sharing a server never share keys."""
    return re.sub(r"[^A-Za-z0-9]", "", request.node.name)[-40:] + str(time.monotonic_ns())[-6:]


def pytest_report_header(config: pytest.Config) -> list[str]:
    from tests.nsqd import describe_backend

    return [f"nsq bus tests: {describe_backend()}"]
