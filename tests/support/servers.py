"""Real server processes on 127.0.0.1 running ``tests.server_app``.

Servers run in their own processes, under ``gunicorn -k gevent`` (production)
or the threaded ``flask run`` (development), each on an ephemeral port that
the test reads from the server's own log. Nothing here sleeps to
synchronise: every wait polls with a deadline.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

from tests.support.waiting import wait_for

ROOT = Path(__file__).resolve().parent.parent.parent
WS_PATH = "/ws/entity-sync/"
SERVER_KINDS = ("gunicorn", "flask")


def _gunicorn_flags() -> list[str]:
    help_text = subprocess.run(
        [sys.executable, "-m", "gunicorn", "--help"], capture_output=True, text=True, check=True
    ).stdout
    return ["--no-control-socket"] if "--no-control-socket" in help_text else []


class Server:
    """One server process running ``tests.server_app`` with the given config."""

    def __init__(self, kind: str, config: dict[str, Any], app: str = "tests.server_app:create_app()",
                 ready_path: str = "/_t/stats", extra_args: tuple[str, ...] = (),
                 extra_env: dict[str, str] | None = None, port: int = 0, host: str = "127.0.0.1",
                 wrap: tuple[str, ...] = ()):
        """``host`` is the address to listen on; ``wrap`` prefixes the command (``ip netns exec NS``)."""
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
                   "-b", f"{host}:{port}", "--graceful-timeout", "2", *_gunicorn_flags(), *extra_args, app]
            pattern = rf"Listening at: http://{re.escape(host)}:(\d+)"
        elif kind == "flask":
            cmd = [sys.executable, "-m", "flask", "--app", app.removesuffix("()"), "run",
                   "--host", host, "--port", str(port), "--with-threads", "--no-reload"]
            pattern = rf"Running on http://{re.escape(host)}:(\d+)"
        else:  # pragma: no cover
            raise ValueError(kind)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([*wrap, *cmd], cwd=ROOT, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

        def port() -> int | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"{kind} server exited early:\n{self.log()}")
            found = re.search(pattern, self.log())
            return int(found.group(1)) if found else None

        self.port = wait_for(port, timeout=30, message=f"{kind} server to listen")
        self.http = f"http://{host}:{self.port}"
        self.ws_url = f"ws://{host}:{self.port}{WS_PATH}"
        wait_for(self._ready, timeout=30, message=f"{kind} server to answer")

    def _ready(self) -> bool:
        try:
            urllib.request.urlopen(self.http + self.ready_path, timeout=10).close()
        except OSError:
            return False
        return True

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    @contextmanager
    def stalled(self, seconds: float) -> Iterator[None]:
        """Stop the server's processes (a gunicorn worker too) with SIGSTOP, run the block, and
        resume them once ``seconds`` have passed since the stop.

        It stands for a long garbage-collection pause or a host that gives the
        worker no CPU: the stall's length is what is tested, so it is waited
        out here, not polled for.
        """
        pids = [self.proc.pid, *_descendants(self.proc.pid)]
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        resume_at = time.monotonic() + seconds
        try:
            yield
            time.sleep(max(0.0, resume_at - time.monotonic()))
        finally:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass

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

    def set_quietly(self, entity: str, id: str, value: Any) -> None:
        """Change a row inside the server without notifying its key.

        For rows a test sets up before subscribing: :meth:`set`'s notification
        travels through the bus and may arrive after the subscription, and then
        refreshes the new subscriber a second time (as it must), which a test
        that counts the frames would take for a bug.
        """
        self.post(f"/_t/set-quietly/{entity}/{id}", {"value": value})

    def stats(self) -> dict[str, int]:
        return self.get("/_t/stats")  # type: ignore[no-any-return]

    def _signal(self, quick: bool) -> None:
        """Tell the server to stop (see :meth:`stop`)."""
        if not quick:
            self.proc.terminate()
            return
        for pid in _descendants(self.proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:  # gone meanwhile
                pass
        self.proc.kill()

    def stop(self, quick: bool = False) -> None:
        """Stop the server: gracefully (``SIGTERM``), or ``quick``, killing it and its worker, for
        a server whose test is over: gunicorn's graceful stop waits on its one-second tick and
        then on its graceful timeout, and the graceful paths have tests of their own."""
        if self.proc.poll() is None:
            self._signal(quick)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:  # pragma: no cover
                self.proc.kill()
                self.proc.wait()
        self._log.close()


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
        """Stop every server, at the end of the session."""
        stop_all(self.servers.values(), quick=True)


def stop_all(servers: Iterable[Server], quick: bool = False) -> None:
    """Stop ``servers`` (see :meth:`Server.stop`): all are told at once, as each may take a while."""
    servers = list(servers)
    for server in servers:
        if server.proc.poll() is None:
            server._signal(quick)
    for server in servers:
        server.stop(quick)


def _descendants(pid: int) -> list[int]:
    """Every live process below ``pid``, read from ``/proc``."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue  # gone meanwhile
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found
