"""Seeding rows in a test server and waiting for their pushes to reach a client."""

from __future__ import annotations

from typing import Any

from tests.support.clients import Client
from tests.support.servers import Server


def seed(server: Server, id: str, value: Any) -> None:
    """Write a row without notifying, so no stray push follows a test's first one."""
    server.set_quietly("items", id, value)


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
