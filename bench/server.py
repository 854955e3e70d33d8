"""The server runner: one :class:`System` as a real ``gunicorn -k gevent -w 1`` process.

Every scenario starts its servers here, on an ephemeral port of 127.0.0.1,
each in its own process group with its own log under ``bench/results/``, and
talks to their HTTP control endpoints (``POST /notify/...``,
``GET /fetches/...``, ``GET /bus-stats``) through :meth:`Server.post` and
:meth:`Server.get_json`, over raw asyncio streams so the load client stays
one single-threaded process.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.systems import System

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
HOST = "127.0.0.1"

#: Sockets a worker may hold besides the benchmark's connections (control requests, the warm-up).
HEADROOM = 200
#: Seconds for a server to log its port and worker pid, then answer HTTP.
START_TIMEOUT = 30.0
#: Seconds a server may take to exit after SIGQUIT before its process group is killed.
STOP_TIMEOUT = 10.0
#: Seconds for one plain HTTP request.
HTTP_TIMEOUT = 30.0
#: Interval between polls of a server's log or readiness; each poll loop also has a deadline.
POLL_INTERVAL = 0.05
#: Log lines worth reporting from a server (gunicorn's level tags, tracebacks).
LOG_PROBLEM = re.compile(r"\[(WARNING|ERROR|CRITICAL)\]|Traceback|Exception|Error:")


class Server:
    """One running ``gunicorn -k gevent -w 1`` process serving ``system``.

    gunicorn is told to serve ``connections`` plus :data:`HEADROOM` sockets
    (its gevent worker leaves any past ``--worker-connections`` unanswered).
    The port and the worker's pid are read from gunicorn's log; the worker's
    pid is what :mod:`bench.usage` measures.
    """

    def __init__(self, system: System, connections: int, tag: str = "", env: dict[str, str] | None = None) -> None:
        self.system = system
        slug = re.sub(r"[^a-z0-9]+", "-", (system.name + tag).lower()).strip("-")
        self.log_path = RESULTS_DIR / f"{slug}.log"
        environ = {key: value for key, value in os.environ.items() if not key.startswith("FLASK_")}
        environ.update(system.env, **(env or {}), PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
        self.command = [
            sys.executable, "-m", "gunicorn", "-k", "gevent", "-w", "1", "-b", f"{HOST}:0",
            "--no-control-socket", "--worker-connections", str(connections + HEADROOM), system.app,
        ]  # fmt: skip
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.command, cwd=ROOT, env=environ, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        self.port = 0
        self.worker_pid = 0

    @classmethod
    async def start(cls, system: System, connections: int, tag: str = "",
                    env: dict[str, str] | None = None) -> Server:
        """Start a server and return it once its worker answers HTTP; stop it if it never does."""
        server = cls(system, connections, tag, env)
        try:
            await server._wait_ready(START_TIMEOUT)
        except BaseException:
            server.stop()
            raise
        return server

    def log(self) -> str:
        """Everything the server has logged so far."""
        return self.log_path.read_text(errors="replace")

    async def _wait_ready(self, timeout: float) -> None:
        """Wait for the port and worker pid in the log, then for an HTTP answer from the worker."""
        name = self.system.name
        deadline = time.monotonic() + timeout
        while not (self.port and self.worker_pid):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name}: gunicorn exited early:\n{self.log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name}: no port or worker pid in the log:\n{self.log()}")
            text = self.log()
            port = re.search(r"Listening at: http://127\.0\.0\.1:(\d+)", text)
            pid = re.search(r"Booting worker with pid: (\d+)", text)
            self.port = int(port.group(1)) if port else 0
            self.worker_pid = int(pid.group(1)) if pid else 0
            await asyncio.sleep(POLL_INTERVAL)
        while True:  # any HTTP status (a 404 for "/") means the worker has loaded the app
            try:
                await self._request("GET", "/", timeout=max(0.1, deadline - time.monotonic()))
                return
            except (OSError, asyncio.TimeoutError):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name}: the worker never answered HTTP") from None
            await asyncio.sleep(POLL_INTERVAL)

    async def _request(self, method: str, path: str, timeout: float = HTTP_TIMEOUT) -> tuple[int, bytes]:
        """One HTTP/1.1 request with ``Connection: close``; returns the status code and the body."""

        async def run() -> tuple[int, bytes]:
            reader, writer = await asyncio.open_connection(HOST, self.port)
            try:
                writer.write(f"{method} {path} HTTP/1.1\r\nHost: {HOST}:{self.port}\r\nContent-Length: 0\r\n"
                             "Connection: close\r\n\r\n".encode())
                await writer.drain()
                response = await reader.read()  # up to the server's close
            finally:
                writer.close()
            parts = response.split(b"\r\n", 1)[0].split()
            if len(parts) < 2 or not parts[1].isdigit():
                raise ConnectionError(f"bad HTTP response {response[:64]!r}")
            return int(parts[1]), response.partition(b"\r\n\r\n")[2]

        return await asyncio.wait_for(run(), timeout)

    async def post(self, path: str) -> None:
        """``POST path``; raise unless the server answers 200."""
        status, _ = await self._request("POST", path)
        if status != 200:
            raise RuntimeError(f"POST {path} answered HTTP {status}")

    async def get_json(self, path: str) -> Any:
        """``GET path`` and decode the JSON body; raise unless the server answers 200."""
        status, body = await self._request("GET", path)
        if status != 200:
            raise RuntimeError(f"GET {path} answered HTTP {status}")
        return json.loads(body)

    def stop(self) -> None:
        """Quick shutdown (SIGQUIT: the benchmark's clients are gone, nothing to drain).

        After :data:`STOP_TIMEOUT` seconds the whole process group is killed,
        and so is a worker that outlived its arbiter.
        """
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=STOP_TIMEOUT)
        try:
            if self.worker_pid and os.getpgid(self.worker_pid) == self.proc.pid:
                os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def problems(self) -> list[str]:
        """Warning, error and traceback lines from the server's log."""
        return [line for line in self.log().splitlines() if LOG_PROBLEM.search(line)]
