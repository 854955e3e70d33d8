"""pytest fixtures for apps that use entitysync_sync.

Enable them in the app's ``conftest.py``, next to an ``app`` fixture that
returns the Flask app (the name pytest-flask uses too)::

    pytest_plugins = ["entitysync_sync.pytest_plugin"]

    @pytest.fixture
    def app():
        return create_app({"TESTING": True})

    def test_a_push(app, entitysync_client):
        client = entitysync_client()
        client.subscribe("items", 1)
        ...

``entitysync_live`` is a started :class:`~entitysync_sync.testing.LiveServer`
of ``app``, stopped after the test; ``entitysync_client(**options)`` connects a
:class:`~entitysync_sync.testing.WebSocketClient` to it. The plugin is not
loaded unless a conftest asks for it.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import pytest
from flask import Flask

from .testing import LiveServer, WebSocketClient


@pytest.fixture
def entitysync_live(app: Flask) -> Iterator[LiveServer]:
    """The ``app`` fixture's app, served on an ephemeral port for this test."""
    with LiveServer(app) as live:
        yield live


@pytest.fixture
def entitysync_client(entitysync_live: LiveServer) -> Callable[..., WebSocketClient]:
    """Connect websocket clients to :func:`entitysync_live`: ``entitysync_client(cookies={...})``."""

    def connect(**options: Any) -> WebSocketClient:
        return entitysync_live.client(**options)

    return connect
