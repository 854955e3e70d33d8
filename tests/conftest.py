"""Fixtures shared by all tests: real server processes on 127.0.0.1, real websocket
clients, and the brokers and server clusters of the bus tests.

The helpers these fixtures hand out live in :mod:`tests.support`.
"""

from __future__ import annotations

import re
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from tests.support.brokers import BROKERS, PgBroker, PgSchema, make_broker
from tests.support.clients import Client
from tests.support.nsqd import Nsqd, describe_backend
from tests.support.redis_cluster import RedisClusterNodes
from tests.support.servers import SERVER_KINDS, Server, ServerPool, stop_all
from tests.support.waiting import wait_for


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
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected (server side, client side) pair of real sockets, for the transport's tests."""
    server_side, client_side = socket.socketpair()
    client_side.settimeout(10)
    yield server_side, client_side
    server_side.close()
    client_side.close()


@pytest.fixture
def uid(request: pytest.FixtureRequest) -> str:
    """A short id unique to this test, so tests sharing a server never share keys."""
    return re.sub(r"[^A-Za-z0-9]", "", request.node.name)[-40:] + str(time.monotonic_ns())[-6:]


# -- the bus tests: brokers, and clusters of servers on one broker -----------------

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
              extra_args: tuple[str, ...] = (), env: dict[str, str] | None = None, **config: Any) -> Server:
        config = {"ENTITYSYNC_BUS_URL": url or broker.url(),
                  "ENTITYSYNC_TOPIC_PREFIX": uid + "_" if prefix is None else prefix, **config}
        server = Server(kind, config, extra_args=extra_args,
                        extra_env={"ENTITYSYNC_TEST_DB": str(db), **(env or {})})
        started.append(server)
        wait_for(lambda: server.get("/_t/bus-ready")["ready"], timeout=30, message="the bus subscriptions")
        return server

    yield start
    stop_all(started, quick=True)


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterNodes]:
    """A Redis Cluster of the tests' own: three masters with a replica each, on free ports.

    Tests may restart nodes and fail shards over, but leave it healthy (three masters serving
    every slot) for the next; it is torn down at the end of the session.
    """
    nodes = RedisClusterNodes()
    try:
        yield nodes
    finally:
        nodes.close()


@pytest.fixture
def nsqd() -> Iterator[Nsqd]:
    """A started nsqd (real or double) on fresh ports, stopped after the test."""
    server = Nsqd()
    server.start()
    try:
        yield server
    finally:
        server.close()


def pytest_report_header(config: pytest.Config) -> list[str]:
    return [f"nsq bus tests: {describe_backend()}"]


@pytest.fixture(scope="module")
def pg_schema() -> Iterator[PgSchema]:
    """A schema of this module's own in the machine's PostgreSQL, with a notifying ``items`` table."""
    schema = PgSchema(PgBroker())
    yield schema
    schema.close()


@pytest.fixture(scope="module")
def pg_cluster(pg_schema: PgSchema) -> Iterator[dict[str, Server]]:
    """Two ``gunicorn -k gevent`` servers and a threaded ``flask run`` on the ``postgresql://`` bus,
    fetching ``items`` from :func:`pg_schema`'s table, shared by a module's tests."""
    config = {"ENTITYSYNC_BUS_URL": pg_schema.pg.url(), "ENTITYSYNC_TOPIC_PREFIX": pg_schema.prefix}
    servers: dict[str, Server] = {}
    try:
        for name, kind in (("gunicorn-a", "gunicorn"), ("gunicorn-b", "gunicorn"), ("flask", "flask")):
            server = servers[name] = Server(kind, config, extra_env=pg_schema.server_env())
            wait_for(lambda server=server: server.get("/_t/bus-ready")["ready"], timeout=30,
                     message="the bus subscriptions")
        yield servers
    finally:
        stop_all(servers.values(), quick=True)
