"""What ``ENTITYSYNC_COMPRESSION`` (permessage-deflate) costs, next to a bare flask-sock peer.

Run from the project root::

    python -m bench.compression [--connections 2000] [--notifies 5]

Three servers run one after another, each as a real ``gunicorn -k gevent -w 1``
process (apps in :mod:`bench.apps`):

1. entitysync_sync with ``ENTITYSYNC_COMPRESSION`` off (the default),
2. entitysync_sync with ``ENTITYSYNC_COMPRESSION`` on,
3. the peer, a bare flask-sock route, which accepts deflate whenever offered.

This process is the client: single-threaded asyncio streams driving
``wsproto``, every connection offering permessage-deflate as a browser does.
For each server it measures

* the worker's RSS growth per connection, once all connections are
  subscribed and have their first frame (baseline taken after one warm-up
  connection has come and gone, so one-off imports and allocations are
  excluded);
* the fan-out of one ``POST /notify/1`` to every connection: the worker's
  CPU time per delivered frame and the wall time from the POST until the
  last client has its frame (median of the notifies, and the CPU total over
  all notifies);
* the bytes on the wire per delivered frame, and whether deflate was
  negotiated.

gunicorn's gevent worker serves at most ``--worker-connections`` sockets at
once (1000 by default) and leaves the rest unanswered in the listen backlog;
the benchmark passes ``connections + 100`` unless told otherwise.

Results are printed as a table and written to ``bench/results/compression.json``.
Nothing sleeps to synchronise: waits are on frames and events, and polls have deadlines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.extensions import PerMessageDeflate

from bench.usage import cpu_seconds, rss_kb

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "compression.json"
HOST = "127.0.0.1"
SUBSCRIBE = json.dumps({"action": "subscribe", "body": {"entity": "items", "id": "1"}})

#: Connections opened concurrently; more at once only risks SYN drops and retransmit stalls.
BATCH = 200
#: Seconds for one connection's TCP connect, handshake, subscribe and first frame.
CONNECT_TIMEOUT = 30.0
#: Seconds for a server to log its port and worker pid, then answer HTTP.
START_TIMEOUT = 30.0
#: Seconds for one notify to reach every client.
FANOUT_TIMEOUT = 60.0
#: Seconds a server may take to exit after SIGTERM before its process group is killed.
STOP_TIMEOUT = 10.0
#: Seconds for one plain HTTP request.
HTTP_TIMEOUT = 30.0
#: Interval between polls of a server's log or readiness; each poll loop also has a deadline.
POLL_INTERVAL = 0.05
#: Log lines worth reporting from a server (gunicorn's level tags, tracebacks).
LOG_PROBLEM = re.compile(r"\[(WARNING|ERROR|CRITICAL)\]|Traceback|Exception|Error:")


@dataclass(frozen=True)
class ServerSpec:
    """One server under test: a gunicorn app spec and its websocket path and environment."""

    name: str
    app: str
    ws_path: str
    env: dict[str, str] = field(default_factory=dict)


SERVERS: tuple[ServerSpec, ...] = (
    ServerSpec("entitysync compression=off", "bench.apps:entitysync_app()", "/ws/entity-sync/"),
    ServerSpec(
        "entitysync compression=on",
        "bench.apps:entitysync_app()",
        "/ws/entity-sync/",
        {"FLASK_ENTITYSYNC_COMPRESSION": "true"},
    ),
    ServerSpec("flask-sock peer", "bench.apps:flasksock_app()", "/ws"),
)


# -- the server process --------------------------------------------------------


class GunicornServer:
    """``gunicorn -k gevent -w 1`` on an ephemeral port, in its own process group.

    The port and the worker's pid are read from gunicorn's log. The process
    group lets :meth:`stop` kill the worker too if the arbiter does not stop
    it in time.
    """

    def __init__(self, spec: ServerSpec, worker_connections: int, log_path: Path) -> None:
        self.spec = spec
        self.log_path = log_path
        env = {key: value for key, value in os.environ.items() if not key.startswith("FLASK_")}
        env.update(spec.env, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
        cmd = [
            sys.executable, "-m", "gunicorn", "-k", "gevent", "-w", "1", "-b", f"{HOST}:0",
            "--no-control-socket", "--worker-connections", str(worker_connections), spec.app,
        ]  # fmt: skip
        self.command = cmd
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        self.port = 0
        self.worker_pid = 0

    def log(self) -> str:
        """Everything the server has logged so far."""
        return self.log_path.read_text(errors="replace")

    async def wait_ready(self, timeout: float) -> None:
        """Wait for the port and worker pid in the log, then for an HTTP answer from the worker."""
        deadline = time.monotonic() + timeout
        while not (self.port and self.worker_pid):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.spec.name}: gunicorn exited early:\n{self.log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.spec.name}: no port or worker pid in the log:\n{self.log()}")
            text = self.log()
            port = re.search(r"Listening at: http://127\.0\.0\.1:(\d+)", text)
            pid = re.search(r"Booting worker with pid: (\d+)", text)
            self.port = int(port.group(1)) if port else 0
            self.worker_pid = int(pid.group(1)) if pid else 0
            await asyncio.sleep(POLL_INTERVAL)
        while True:  # any HTTP status (a 404 for "/") means the worker has loaded the app
            try:
                await http_request(self.port, "GET", "/", timeout=max(0.1, deadline - time.monotonic()))
                return
            except (OSError, asyncio.TimeoutError):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.spec.name}: the worker never answered HTTP") from None
            await asyncio.sleep(POLL_INTERVAL)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM the arbiter; after ``timeout`` seconds SIGKILL its whole process group."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=timeout)
        try:  # the arbiter normally stops its worker; kill the worker if it outlived the arbiter
            if self.worker_pid and os.getpgid(self.worker_pid) == self.proc.pid:
                os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def problems(self) -> list[str]:
        """Warning, error and traceback lines from the server's log."""
        return [line for line in self.log().splitlines() if LOG_PROBLEM.search(line)]


async def http_request(port: int, method: str, path: str, timeout: float = HTTP_TIMEOUT) -> int:
    """One HTTP/1.1 request with ``Connection: close``; returns the status code.

    Raw asyncio streams keep the client single-threaded.
    """

    async def run() -> int:
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            writer.write(
                f"{method} {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Length: 0\r\n"
                "Connection: close\r\n\r\n".encode()
            )
            await writer.drain()
            status = await reader.readline()
            await reader.read()  # the rest, up to the server's close
            parts = status.split()
            if len(parts) < 2 or not parts[1].isdigit():
                raise ConnectionError(f"bad HTTP status line {status!r}")
            return int(parts[1])
        finally:
            writer.close()

    return await asyncio.wait_for(run(), timeout)


# -- the websocket client ------------------------------------------------------


class FrameCounter:
    """Tells when every connection has received at least ``target`` frames.

    Each connection calls :meth:`on_frame` after each whole message; the
    counter records when the last one got there, which is the fan-out's end.
    """

    def __init__(self) -> None:
        self.total = 0
        self.target = 0
        self.reached = 0
        self.last_at = 0.0
        self.done = asyncio.Event()

    def arm(self, clients: Sequence[WsClient], target: int) -> None:
        """Start waiting for every one of ``clients`` to have ``target`` frames."""
        self.total, self.target, self.last_at = len(clients), target, 0.0
        self.reached = sum(client.frames >= target for client in clients)
        self.done.clear()
        if self.reached >= self.total:
            self.last_at = time.perf_counter()
            self.done.set()

    def on_frame(self, client: WsClient) -> None:
        """Count ``client`` once it reaches the target."""
        if client.frames == self.target:
            self.reached += 1
            if self.reached == self.total:
                self.last_at = time.perf_counter()
                self.done.set()


class WsClient:
    """One websocket connection: asyncio streams plus a wsproto client state machine.

    A reader task feeds every received byte to wsproto and handles its
    events; it runs until the server closes or :meth:`close` cancels it.
    """

    def __init__(self, on_frame: Callable[[WsClient], None] | None = None) -> None:
        self.frames = 0
        self.bytes_in = 0
        self.last_text = ""
        self.deflate = False
        self._on_frame = on_frame
        self._ws = WSConnection(ConnectionType.CLIENT)
        self._parts: list[str] = []
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        loop = asyncio.get_running_loop()
        self._accepted: asyncio.Future[None] = loop.create_future()
        self._first_frame: asyncio.Future[None] = loop.create_future()

    async def connect(self, port: int, path: str, first_frame: str) -> None:
        """Open, handshake offering deflate, send ``first_frame`` and wait for the first message."""
        self._reader, self._writer = await asyncio.open_connection(HOST, port)
        self._task = asyncio.create_task(self._read_loop())
        request = Request(host=f"{HOST}:{port}", target=path, extensions=[PerMessageDeflate()])
        self._writer.write(self._ws.send(request))
        await self._accepted
        self.send_text(first_frame)
        await self._first_frame

    def send_text(self, text: str) -> None:
        """Queue one text frame (compressed by wsproto if deflate was negotiated)."""
        assert self._writer is not None
        self._writer.write(self._ws.send(TextMessage(data=text)))

    async def _read_loop(self) -> None:
        assert self._reader is not None
        try:
            while True:  # ends at EOF, on a close frame, or when cancelled by close()
                data = await self._reader.read(65536)
                if not data:
                    self._ws.receive_data(None)
                    self._handle(list(self._ws.events()))
                    break
                self.bytes_in += len(data)
                self._ws.receive_data(data)
                if not self._handle(list(self._ws.events())):
                    break
        except Exception as exc:  # a reset socket or a protocol error ends this connection only
            self._fail(exc)
        finally:
            self._fail(ConnectionError("the connection closed"))

    def _handle(self, events: list[Event]) -> bool:
        """Act on wsproto events; False once the server has closed the connection."""
        assert self._writer is not None
        for event in events:
            if isinstance(event, AcceptConnection):
                self.deflate = any(isinstance(ext, PerMessageDeflate) for ext in event.extensions)
                self._accepted.set_result(None)
            elif isinstance(event, RejectConnection):
                self._fail(ConnectionError(f"handshake rejected with HTTP {event.status_code}"))
                return False
            elif isinstance(event, TextMessage | BytesMessage):
                part = event.data if isinstance(event.data, str) else event.data.decode(errors="replace")
                self._parts.append(part)
                if event.message_finished:
                    self.last_text, self._parts = "".join(self._parts), []
                    self.frames += 1
                    if not self._first_frame.done():
                        self._first_frame.set_result(None)
                    if self._on_frame is not None:
                        self._on_frame(self)
            elif isinstance(event, Ping):
                self._writer.write(self._ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                if self._ws.state is ConnectionState.REMOTE_CLOSING:
                    self._writer.write(self._ws.send(event.response()))
                return False
        return True

    def _fail(self, exc: BaseException) -> None:
        for future in (self._accepted, self._first_frame):
            if not future.done():
                future.set_exception(exc)
                future.exception()  # mark retrieved: a connection failing later is not an error

    async def close(self) -> None:
        """Send a close frame if still open, stop the reader and close the socket."""
        if self._writer is None:
            return
        if self._ws.state is ConnectionState.OPEN:
            try:
                self._writer.write(self._ws.send(CloseConnection(code=1000)))
            except Exception:  # the socket or the state machine is already gone
                pass
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._writer.close()
        try:
            await asyncio.wait_for(self._writer.wait_closed(), 5.0)
        except (OSError, asyncio.TimeoutError):
            pass


async def open_clients(n: int, port: int, path: str, on_frame: Callable[[WsClient], None] | None) -> list[WsClient]:
    """Open ``n`` subscribed connections, ``BATCH`` at a time; raise on the first that fails.

    On failure every connection already opened is closed before raising.
    """
    clients: list[WsClient] = []
    try:
        for start in range(0, n, BATCH):
            batch = [WsClient(on_frame) for _ in range(min(BATCH, n - start))]
            clients.extend(batch)
            results = await asyncio.gather(
                *(asyncio.wait_for(c.connect(port, path, SUBSCRIBE), CONNECT_TIMEOUT) for c in batch),
                return_exceptions=True,
            )
            failed = [(i, r) for i, r in enumerate(results, start) if isinstance(r, BaseException)]
            if failed:
                index, exc = failed[0]
                raise ConnectionError(
                    f"{len(failed)} of connections {start}..{start + len(batch) - 1} failed;"
                    f" connection {index}: {exc!r}"
                )
        return clients
    except BaseException:
        await close_clients(clients)
        raise


async def close_clients(clients: Sequence[WsClient]) -> None:
    """Close every connection, a batch at a time."""
    for start in range(0, len(clients), BATCH):
        await asyncio.gather(*(c.close() for c in clients[start : start + BATCH]), return_exceptions=True)


# -- one server's measurements -------------------------------------------------


async def measure(spec: ServerSpec, n: int, notifies: int, worker_connections: int) -> dict[str, Any]:
    """Start ``spec``'s server, measure it with ``n`` connections and stop it, whatever happens."""
    slug = re.sub(r"[^a-z0-9]+", "-", spec.name.lower()).strip("-")
    server = GunicornServer(spec, worker_connections, RESULTS.parent / f"{slug}.log")
    row: dict[str, Any] = {
        "server": spec.name,
        "app": spec.app,
        "env": spec.env,
        "connections": n,
        "command": " ".join(server.command),
        "log": str(server.log_path),
    }
    clients: list[WsClient] = []
    try:
        await server.wait_ready(START_TIMEOUT)
        pid = server.worker_pid

        warm = WsClient()
        try:
            await asyncio.wait_for(warm.connect(server.port, spec.ws_path, SUBSCRIBE), CONNECT_TIMEOUT)
        finally:
            await warm.close()
        rss_before = rss_kb(pid)

        counter = FrameCounter()
        started = time.perf_counter()
        clients = await open_clients(n, server.port, spec.ws_path, counter.on_frame)
        row["connect_seconds"] = time.perf_counter() - started
        rss_after = rss_kb(pid)
        negotiated = {c.deflate for c in clients}
        row["deflate"] = "yes" if negotiated == {True} else "no" if negotiated == {False} else "mixed"
        row["rss_before_kb"], row["rss_after_kb"] = rss_before, rss_after
        row["kb_per_conn"] = (rss_after - rss_before) / n
        row["first_frame_chars"] = len(clients[0].last_text)

        cpu_total_start = cpu_seconds(pid)
        bytes_start = sum(c.bytes_in for c in clients)
        cpu_us, wall_ms = [], []
        for k in range(1, notifies + 1):
            counter.arm(clients, 1 + k)
            cpu_before = cpu_seconds(pid)
            t0 = time.perf_counter()
            status = await http_request(server.port, "POST", "/notify/1")
            if status != 200:
                raise RuntimeError(f"POST /notify/1 answered HTTP {status}")
            try:
                await asyncio.wait_for(counter.done.wait(), FANOUT_TIMEOUT)
            except asyncio.TimeoutError:
                raise TimeoutError(
                    f"notify {k}: only {counter.reached} of {n} clients got the frame in {FANOUT_TIMEOUT}s"
                ) from None
            cpu_after = cpu_seconds(pid)
            wall_ms.append((counter.last_at - t0) * 1e3)
            cpu_us.append((cpu_after - cpu_before) / n * 1e6)
        cpu_total = cpu_seconds(pid) - cpu_total_start
        row["notify_frame_chars"] = len(clients[0].last_text)
        row["wire_bytes_per_frame"] = (sum(c.bytes_in for c in clients) - bytes_start) / (n * notifies)
        row["cpu_us_per_frame_each"] = cpu_us
        row["wall_ms_each"] = wall_ms
        row["cpu_us_per_frame_median"] = statistics.median(cpu_us)
        row["cpu_us_per_frame_total"] = cpu_total / (n * notifies) * 1e6
        row["wall_ms_median"] = statistics.median(wall_ms)
        row["rss_after_notifies_kb"] = rss_kb(pid)
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        await close_clients(clients)
        server.stop()
        row["log_problems"] = server.problems()
    return row


# -- report --------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    versions = {}
    for dist in ("gevent", "flask-sock", "simple-websocket", "wsproto", "gunicorn", "flask"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "missing"
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": model,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "versions": versions,
    }


def _num(row: dict[str, Any], key: str, fmt: str) -> str:
    value = row.get(key)
    return format(value, fmt) if isinstance(value, int | float) else "-"


def print_report(info: dict[str, Any], rows: list[dict[str, Any]], notifies: int) -> None:
    """The header with the machine, one table row per server, then any errors and log problems."""
    v = info["versions"]
    print(f"machine: {info['nproc']} CPUs, {info['cpu']}, Linux {info['kernel']}")
    print(
        f"python {info['python']}, gevent {v['gevent']}, flask-sock {v['flask-sock']},"
        f" simple-websocket {v['simple-websocket']}, gunicorn {v['gunicorn']}, wsproto {v['wsproto']}"
    )
    print(f"notifies per server: {notifies} (CPU and wall: median; 'CPU tot' = all notifies / (notifies*N))")
    columns: list[tuple[str, int, Callable[[dict[str, Any]], str]]] = [
        ("server", 27, lambda r: str(r["server"])),
        ("deflate", 7, lambda r: str(r.get("deflate", "-"))),
        ("conns", 6, lambda r: str(r["connections"])),
        ("KB/conn", 8, lambda r: _num(r, "kb_per_conn", ".1f")),
        ("CPU us/frame", 12, lambda r: _num(r, "cpu_us_per_frame_median", ".1f")),
        ("CPU tot us/fr", 13, lambda r: _num(r, "cpu_us_per_frame_total", ".1f")),
        ("wall ms last", 12, lambda r: _num(r, "wall_ms_median", ".1f")),
        ("wire B/frame", 12, lambda r: _num(r, "wire_bytes_per_frame", ".0f")),
    ]
    print("  ".join(f"{name:<{width}}" if i == 0 else f"{name:>{width}}"
                    for i, (name, width, _) in enumerate(columns)))  # fmt: skip
    for row in rows:
        print("  ".join(f"{get(row):<{width}}" if i == 0 else f"{get(row):>{width}}"
                        for i, (_, width, get) in enumerate(columns)))  # fmt: skip
    for row in rows:
        if "error" in row:
            print(f"ERROR {row['server']}: {row['error']}")
        for line in row.get("log_problems", [])[:5]:
            print(f"log {row['server']}: {line}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line: ``--connections``, ``--notifies`` and ``--worker-connections``."""
    parser = argparse.ArgumentParser(prog="python -m bench.compression", description=__doc__.split("\n")[0])
    parser.add_argument("--connections", type=int, default=2000, help="websocket clients per server [2000]")
    parser.add_argument("--notifies", type=int, default=5, help="notifies fanned out per server [5]")
    parser.add_argument(
        "--worker-connections",
        type=int,
        default=None,
        help="gunicorn --worker-connections [connections + 100]; gunicorn's own default, 1000,"
        " leaves connections past it unanswered",
    )
    args = parser.parse_args(argv)
    if args.connections < 1 or args.notifies < 1:
        parser.error("--connections and --notifies must be at least 1")
    if args.worker_connections is None:
        args.worker_connections = args.connections + 100
    return args


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Measure each server in turn; one failing does not stop the others."""
    rows = []
    for spec in SERVERS:
        print(f"measuring {spec.name} ...", file=sys.stderr, flush=True)
        rows.append(await measure(spec, args.connections, args.notifies, args.worker_connections))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the table and write the JSON; exit 1 if any server failed."""
    args = parse_args(argv)
    info = machine()
    started = time.monotonic()
    rows = asyncio.run(run(args))
    result = {
        "benchmark": "compression",
        "machine": info,
        "connections": args.connections,
        "notifies": args.notifies,
        "worker_connections": args.worker_connections,
        "seconds": time.monotonic() - started,
        "servers": rows,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print_report(info, rows, args.notifies)
    print(f"results: {RESULTS.relative_to(ROOT)} ({result['seconds']:.0f} s)")
    return 1 if any("error" in row for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
