"""Brokers for the bus tests: the real Redis, and nsqd (real or the protocol double).

The fixtures every bus test uses (``broker``, ``own_broker``, ``cluster``)
are in ``conftest.py``.

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
from typing import Any

import pytest

from tests.support.ports import free_port
from tests.support.waiting import wait_for

SHARED_REDIS = ("127.0.0.1", 6379)


def required(what: str) -> bool:
    """Whether a missing ``what`` ("redis") fails rather than skips."""
    return os.environ.get("CI") == "true" or os.environ.get(f"ENTITYSYNC_TEST_REQUIRE_{what.upper()}") == "1"


def missing(what: str, why: str) -> None:
    message = f"{what} is not available: {why}"
    if required(what):
        pytest.fail(message + " (required under CI)")
    pytest.skip(message)


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
        """The bus URL, optionally through another port (a :class:`~tests.support.tcpproxy.TcpProxy`)."""
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
    by default this is ``tests/support/nsqd_double/``; see :mod:`tests.support.nsqd`.
    """

    kind = "nsq"

    def __init__(self, own: bool = False) -> None:
        from tests.support.nsqd import Nsqd

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


BROKERS = ("redis", "nsq")
