"""Fixtures shared by all tests: real server processes on 127.0.0.1 and real websocket clients.

The helpers these fixtures hand out live in :mod:`tests.support`.
"""

from __future__ import annotations

import re
import time
from typing import Any, Callable, Iterator

import pytest

from tests.support.clients import Client
from tests.support.servers import SERVER_KINDS, Server, ServerPool

pytest_plugins = ["tests.brokers"]  # the broker and cluster fixtures of the bus tests


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
