"""Every close the server decides reaches the client, and nothing follows it, under load.

Each client here reads the raw stream (:mod:`tests.support.rawws`), so a close frame
destroyed by a reset, a close code replaced by flask-sock's own 1000, or an
HTTP response written onto the websocket by the development server fails the
test. A second process spins on a CPU meanwhile, as a busy machine would.
"""

from __future__ import annotations

import itertools
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

import pytest

from tests.support.rawws import RawClient
from tests.support.servers import WS_PATH, Server, ServerPool
from tests.support.waiting import wait_for

FLOOD = {"ENTITYSYNC_RATE_LIMIT": 20, "ENTITYSYNC_RATE_BURST": 10, "ENTITYSYNC_PING_INTERVAL": 0.5}
SLOW = {"ENTITYSYNC_OUTBOX_LIMIT": 2000, "ENTITYSYNC_RATE_LIMIT": 100000, "ENTITYSYNC_RATE_BURST": 100000}
ROW = 100_000  # characters of a "big" row: a slow reader takes a while over each
SUBSCRIBE_X = '{"action":"subscribe","body":{"entity":"items","id":"x"}}'
ERRORS = ("ERROR", "Error on request", "Exception on", "ConcurrentObjectUseError", "handler failed")


@pytest.fixture
def busy_cpu() -> Iterator[None]:
    """Another process spinning on a CPU for the length of the test."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        spinner.kill()
        spinner.wait()


def connect(server: Server, **options: object) -> RawClient:
    return RawClient("127.0.0.1", server.port, WS_PATH, **options)  # type: ignore[arg-type]


def keep_sending(client: RawClient, frame: str, pause: float = 0.0, limit: int = 20_000) -> threading.Thread:
    """Send ``frame`` over and over until the server's close frame arrives (or the stream breaks)."""
    stop = threading.Event()

    def run() -> None:
        for _ in range(limit):
            if client.saw_close or client.closed.is_set():
                return
            try:
                client.send_text(frame)
            except OSError:
                return
            if pause:
                stop.wait(pause)  # paces the sender; nothing waits on it

    sender = threading.Thread(target=run, daemon=True)
    sender.start()
    return sender


def flood(server: Server) -> int | None:
    client = connect(server)
    keep_sending(client, SUBSCRIBE_X)
    return client.close_code()


def oversize(server: Server) -> int | None:
    client = connect(server)
    client.send_text("x" * 5000)  # over ENTITYSYNC_MAX_MESSAGE_BYTES (4096)
    return client.close_code()


def identify_fails(server: Server) -> int | None:
    return connect(server, cookie="token=explode").close_code()


def never_pongs(server: Server) -> int | None:
    return connect(server, answer_pings=False).close_code()


def slow_reader(server: Server, n: int) -> int | None:
    """A client that reads, slowly, while it asks for more than it reads: its outbox overflows."""
    client = connect(server, read_size=4096, read_delay=0.005)
    row = f"{ROW}-slow{n}"
    client.send_json({"action": "subscribe", "body": {"entity": "big", "id": row}})
    keep_sending(client, '{"action":"subscribe","body":{"entity":"items","id":"x"},"ref":1}', pause=0.001)

    def change_the_row() -> None:
        for value in range(200):
            if client.closed.is_set():
                return
            server.set("big", row, value)

    threading.Thread(target=change_the_row, daemon=True).start()
    return client.close_code(timeout=30)


def run_all(jobs: list[Callable[[], int | None]]) -> list[int | None]:
    with ThreadPoolExecutor(max_workers=10) as pool:
        return list(pool.map(lambda job: job(), jobs))


def assert_no_errors_logged(server: Server) -> None:
    """No error but the app's own: the test app's identify raises on purpose, and that is logged."""
    log = server.log()
    found = [line for line in log.splitlines() if any(word in line for word in ERRORS)]
    assert not found, "\n".join(found[:20])
    assert log.count("Traceback") == log.count("identify raised; closing the connection"), log[-3000:]


def test_every_decided_close_reaches_the_client_under_load(servers: ServerPool, kind: str,
                                                           busy_cpu: None) -> None:
    flooded = servers.get(kind, **FLOOD)
    slowed = servers.get(kind, **SLOW)
    jobs: list[tuple[str, int, Callable[[], int | None]]] = []
    jobs += [("flood", 1008, lambda: flood(flooded))] * 30
    jobs += [("slow reader", 1008, lambda n=n: slow_reader(slowed, n)) for n in range(10)]  # type: ignore[misc]
    jobs += [("oversize", 1009, lambda: oversize(flooded))] * 5
    jobs += [("identify fails", 1011, lambda: identify_fails(flooded))] * 5
    jobs += [("never pongs", 1008, lambda: never_pongs(flooded))] * 5
    # Interleave the kinds of close, so that different close paths race each other.
    jobs = [job for pair in itertools.zip_longest(jobs[::2], jobs[1::2]) for job in pair if job is not None]
    codes = run_all([run for _, _, run in jobs])
    got = [(name, code) for (name, _, _), code in zip(jobs, codes, strict=True)]
    assert got == [(name, code) for name, code, _ in jobs]
    assert len(codes) >= 50
    wait_for(lambda: flooded.stats()["connections"] == 0 and slowed.stats()["connections"] == 0,
             timeout=20, message="every connection to be gone")
    for server in (flooded, slowed):
        assert_no_errors_logged(server)
    log = flooded.log() + slowed.log()
    assert "rate limit exceeded" in log and "outbox limit exceeded" in log and "ping" in log


def test_the_stream_ends_after_a_close_the_client_never_answers(servers: ServerPool, kind: str) -> None:
    """A close decided away from the handler's reads (here by the heartbeat) still ends the stream.

    The client reads but never answers pings nor the close frame. The handler is
    waiting on the socket meanwhile; under gevent nothing polls, so only the
    transport's linger after the close frame ends that wait, and the stream.
    """
    server = servers.get(kind, ENTITYSYNC_PING_INTERVAL=0.5, ENTITYSYNC_SEND_TIMEOUT=1)
    client = connect(server, answer_pings=False, answer_close=False)
    started = time.monotonic()
    frames = client.wait_closed(timeout=20)
    assert client.saw_close and frames[-1].close_code == 1008
    # Two ping intervals, the linger (2 s) and, for threads, a poll (1 s), with room for a busy machine.
    assert time.monotonic() - started < 10
    wait_for(lambda: server.stats()["connections"] == 0, message="the connection to be gone")
    assert_no_errors_logged(server)


def test_a_shutdown_close_reaches_idle_and_sending_clients(kind: str, busy_cpu: None, uid: str) -> None:
    server = Server(kind, {"ENTITYSYNC_RATE_LIMIT": 100000, "ENTITYSYNC_RATE_BURST": 100000,
                           "ENTITYSYNC_DRAIN_SECONDS": 1},
                    extra_args=("--graceful-timeout", "30") if kind == "gunicorn" else ())
    try:
        idle = [connect(server) for _ in range(10)]
        for client in idle:
            client.send_json({"action": "subscribe", "body": {"entity": "items", "id": uid}})
        chatty = [connect(server) for _ in range(10)]
        for client in chatty:
            keep_sending(client, SUBSCRIBE_X, pause=0.002)
        wait_for(lambda: server.stats()["connections"] == 20, message="every client to connect")
        if kind == "gunicorn":
            server.proc.send_signal(signal.SIGTERM)
        else:
            server.post("/_t/drain")
        codes = run_all([client.close_code for client in idle + chatty])
        assert codes == [1012] * 20
        assert_no_errors_logged(server)
    finally:
        server.stop()
