"""Brokers for the bus tests: the real Redis, nsqd (real or the protocol double), and PostgreSQL.

The fixtures every bus test uses (``broker``, ``own_broker``, ``cluster``)
are in ``conftest.py``.

Tests that stop a broker get one of their own on a free port, never the
shared Redis on 6379. Under CI (``CI=true``) or with
``ENTITYSYNC_TEST_REQUIRE_REDIS=1``, a Redis that cannot be reached fails the
tests instead of skipping them; likewise PostgreSQL (127.0.0.1:5432, database
``test``, or ``ENTITYSYNC_TEST_PG_URL``) with ``ENTITYSYNC_TEST_REQUIRE_POSTGRES=1``.
The PostgreSQL tests work in a schema of their own, dropped afterwards.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit, urlunsplit

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


PG_URL = os.environ.get("ENTITYSYNC_TEST_PG_URL", "postgresql://root@127.0.0.1:5432/test")


class PgBroker:
    """The machine's PostgreSQL, reached as a test's own client (psycopg, or the psql binary)."""

    kind = "postgres"

    def __init__(self, url: str = PG_URL) -> None:
        try:
            import psycopg
        except ImportError:
            missing("postgres", "psycopg is not installed (pip install -e '.[test]')")
        self.psycopg = psycopg
        self._url = url
        self.port = urlsplit(url).port or 5432
        try:
            self.execute("SELECT 1")
        except (psycopg.Error, OSError) as exc:
            missing("postgres", f"cannot connect to {url}: {exc}")

    def url(self, port: int | None = None) -> str:
        """The bus URL, optionally through another port (a :class:`~tests.tcpproxy.TcpProxy`)."""
        if port is None:
            return self._url
        parts = urlsplit(self._url)
        netloc = parts.netloc.rpartition("@")
        host = (parts.hostname or "127.0.0.1") + f":{port}"
        return urlunsplit((parts.scheme, netloc[0] + netloc[1] + host, parts.path, parts.query, ""))

    def describe(self) -> str:
        return f"PostgreSQL at {self._url}"

    def execute(self, query: Any, params: Any = None, quiet: bool = False) -> list[Any]:
        """Run ``query`` in a transaction of its own; ``quiet`` disables triggers (no notification)."""
        with self.psycopg.connect(self._url) as conn:
            if quiet:
                conn.execute("SET LOCAL session_replication_role = replica")
            cursor = conn.execute(query, params)
            return cursor.fetchall() if cursor.description else []

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Any]:
        """A connection in a transaction, committed at the end of the block unless it raises."""
        with self.psycopg.connect(self._url) as conn:
            yield conn

    def psql(self, command: str) -> str:
        """Run ``command`` with the psql binary, as a person at a terminal would."""
        binary = shutil.which("psql")
        if binary is None:
            missing("postgres", "psql is not on PATH")
        result = subprocess.run([binary, self._url, "-v", "ON_ERROR_STOP=1", "-Atc", command],
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        return result.stdout

    def publish_raw(self, topic: str, body: bytes) -> None:
        """NOTIFY ``body`` on channel ``topic`` as any other program would."""
        self.execute("SELECT pg_notify(%s, %s)", (topic, body.decode()))

    def terminate_listener(self, pid: int) -> int:
        """``pg_terminate_backend`` the LISTEN connection of server process ``pid``; how many ended."""
        rows = self.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
                            (f"entitysync listen {pid}",))
        return sum(1 for (ended,) in rows if ended)

    def close(self) -> None:
        pass


class PgSchema:
    """A schema of the tests' own with a table ``items (id text, value text)`` that notifies
    entity ``items`` on channel ``prefix + items`` through :func:`~entitysync_sync.postgres.trigger_sql`."""

    def __init__(self, pg: PgBroker) -> None:
        from psycopg import sql

        from entitysync_sync.postgres import trigger_sql

        self.pg = pg
        self.name = "es_" + secrets.token_hex(6)
        self.prefix = self.name + "_"
        self.table = f"{self.name}.items"
        schema = sql.Identifier(self.name)
        pg.execute(sql.SQL("CREATE SCHEMA {}").format(schema))
        pg.execute(sql.SQL("CREATE TABLE {}.items (id text PRIMARY KEY, value text)").format(schema))
        pg.execute(trigger_sql("items", self.table, topic_prefix=self.prefix))

    def write(self, id: str, value: Any, quiet: bool = False) -> None:
        """Insert or update a row like any other writer (``quiet``: without the trigger)."""
        import json

        self.pg.execute(f"INSERT INTO {self.table} VALUES (%s, %s) "
                        "ON CONFLICT (id) DO UPDATE SET value = EXCLUDED.value", (id, json.dumps(value)), quiet=quiet)

    def server_env(self) -> dict[str, str]:
        """What makes ``tests.server_app`` fetch ``items`` from this schema's table."""
        return {"ENTITYSYNC_TEST_PG_URL": self.pg.url(), "ENTITYSYNC_TEST_PG_TABLE": self.table}

    def close(self) -> None:
        from psycopg import sql

        self.pg.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(self.name)))


def make_broker(kind: str, own: bool = False) -> Any:
    if kind == "redis":
        return RedisBroker(own=own)
    if kind == "nsq":
        return NsqBroker(own=own)
    if kind == "postgres":
        return PgBroker()
    raise ValueError(kind)


BROKERS = ("redis", "nsq")
