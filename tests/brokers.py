"""Brokers for the bus tests: the real Redis, and nsqd (real or the protocol double).

Also the fixtures every bus test uses (``broker``, ``own_broker``, ``cluster``),
registered for all tests by ``conftest.py``, and helpers to seed rows and wait
for pushes.

Tests that stop a broker get one of their own on a free port, never the
shared Redis on 6379. Under CI (``CI=true``) or with
``ENTITYSYNC_TEST_REQUIRE_REDIS=1``, a Redis that cannot be reached fails the
tests instead of skipping them.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from tests.conftest import Client, Server, wait_for

SHARED_REDIS = ("127.0.0.1", 6379)


def required(what: str) -> bool:
    """Whether a missing ``what`` ("redis") fails rather than skips."""
    return os.environ.get("CI") == "true" or os.environ.get(f"ENTITYSYNC_TEST_REQUIRE_{what.upper()}") == "1"


def missing(what: str, why: str) -> None:
    message = f"{what} is not available: {why}"
    if required(what):
        pytest.fail(message + " (required under CI)")
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_ping(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisBroker:
    """The shared Redis, or (``own=True``) a redis-server of this test's own that it may stop."""

    kind = "redis"

    def __init__(self, own: bool = False) -> None:
        self.own = own
        self.proc: subprocess.Popen[bytes] | None = None
        if own:
            binary = shutil.which("redis-server")
            if binary is None:
                missing("redis", "redis-server is not on PATH")
            self.binary = binary
            self.port = free_port()
            self.dir = Path(tempfile.mkdtemp(prefix="entitysync-redis-"))
            self.start()
        else:
            self.port = SHARED_REDIS[1]
            if not redis_ping(*SHARED_REDIS):
                missing("redis", f"nothing answers PING on {SHARED_REDIS[0]}:{SHARED_REDIS[1]}")

    def url(self, port: int | None = None) -> str:
        """The bus URL, optionally through another port (a :class:`~tests.tcpproxy.TcpProxy`)."""
        return f"redis://127.0.0.1:{port or self.port}/0"

    def describe(self) -> str:
        return f"redis-server on port {self.port}" + (" (own)" if self.own else " (shared)")

    def start(self) -> None:
        assert self.own and self.proc is None
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        wait_for(lambda: redis_ping("127.0.0.1", self.port), message=f"redis-server on {self.port}")

    def stop(self) -> None:
        assert self.own
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None
        wait_for(lambda: not redis_ping("127.0.0.1", self.port), message="redis-server to stop")

    def publish_raw(self, topic: str, body: bytes) -> None:
        """PUBLISH ``body`` on ``topic`` as any other program would."""
        import redis

        client = redis.Redis(port=self.port)
        try:
            client.publish(topic, body)
        finally:
            client.close()

    def close(self) -> None:
        if self.own:
            if self.proc is not None:
                self.stop()
            shutil.rmtree(self.dir, ignore_errors=True)


class NsqBroker:
    """An nsqd of the test's own: a real one when ``NSQD_BIN`` names it, else the protocol double.

    nsqd cannot be installed on the machines these tests were written on, so
    by default this is ``tests/support/nsqd_double/``; see :mod:`tests.nsqd`.
    """

    kind = "nsq"

    def __init__(self, own: bool = False) -> None:
        from tests.nsqd import Nsqd

        self.nsqd = Nsqd()
        self.nsqd.start()
        self.port = self.nsqd.tcp_port

    def url(self, port: int | None = None) -> str:
        return f"nsq://127.0.0.1:{port or self.nsqd.tcp_port}"

    def describe(self) -> str:
        return self.nsqd.describe()

    def start(self) -> None:
        self.nsqd.start()  # on the same ports

    def stop(self) -> None:
        self.nsqd.stop()

    def publish_raw(self, topic: str, body: bytes) -> None:
        """PUB ``body`` on ``topic`` through nsqd's HTTP API, as any other program would."""
        self.nsqd.pub(topic, body)

    def close(self) -> None:
        self.nsqd.close()


def make_broker(kind: str, own: bool = False) -> Any:
    if kind == "redis":
        return RedisBroker(own=own)
    if kind == "nsq":
        return NsqBroker(own=own)
    raise ValueError(kind)


# -- fixtures (registered by conftest) and helpers of the bus tests ------------------

BROKERS = ("redis", "nsq")


@pytest.fixture(params=BROKERS)
def broker_kind(request: pytest.FixtureRequest) -> str:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def broker(broker_kind: str) -> Iterator[Any]:
    """The shared broker of this kind (never stopped by a test)."""
    b = make_broker(broker_kind)
    yield b
    b.close()


@pytest.fixture
def own_broker(broker_kind: str) -> Iterator[Any]:
    """A broker of this test's own, which the test may stop and start."""
    b = make_broker(broker_kind, own=True)
    yield b
    b.close()


@pytest.fixture
def cluster(uid: str) -> Iterator[Callable[..., Server]]:
    """Start servers with ``cluster(kind, broker, prefix=...)``; they share one database."""
    db = Path(tempfile.mkdtemp(prefix="entitysync-db-")) / "rows.sqlite3"
    started: list[Server] = []

    def start(kind: str, broker: Any, prefix: str | None = None, url: str | None = None,
              extra_args: tuple[str, ...] = (), **config: Any) -> Server:
        config = {"ENTITYSYNC_BUS_URL": url or broker.url(),
                  "ENTITYSYNC_TOPIC_PREFIX": uid + "_" if prefix is None else prefix, **config}
        server = Server(kind, config, extra_args=extra_args, extra_env={"ENTITYSYNC_TEST_DB": str(db)})
        started.append(server)
        wait_for(lambda: server.get("/_t/bus-ready")["ready"], timeout=30, message="the bus subscriptions")
        return server

    yield start
    for server in started:
        server.stop()


def seed(server: Server, id: str, value: Any) -> None:
    """Write a row without notifying, so no stray push follows a test's first one."""
    server.post(f"/_t/set-quietly/items/{id}", {"value": value})


def until_pushed(client: Client, entity: str, id: str, value: Any, timeout: float = 15.0) -> None:
    client.expect_push(entity, id, lambda body: body.get("value") == value, timeout=timeout)


def converge(client: Client, expected: dict[str, Any], timeout: float = 30.0) -> None:
    """Read pushes until the latest value of every ``items`` id equals ``expected``."""
    latest: dict[str, Any] = {}

    def done(frame: Any) -> bool:
        if frame.get("action") == "push" and frame["key"]["entity"] == "items":
            latest[frame["key"]["id"]] = frame["body"].get("value")
        return all(latest.get(id) == value for id, value in expected.items())

    if expected:
        try:
            client.expect(done, timeout=timeout)
        except AssertionError:
            raise AssertionError(f"client did not converge: latest {latest!r}, expected {expected!r}") from None


def subscribed(client: Client, server: Server, entity: str, id: str, value: Any) -> Client:
    client.subscribe(entity, id)
    until_pushed(client, entity, id, value)
    return client
