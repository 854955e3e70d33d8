"""A small in-process app for :mod:`entitysync_sync.testing`: items with a per-user secret.

Run by ``LiveServer`` in the tests of the testing module, and by an app's own
tests through the pytest plugin.
"""

from __future__ import annotations

from typing import Any

from flask import Flask, request

from entitysync_sync import EntityKey, EntitySync


def make_app() -> tuple[Flask, dict[str, Any]]:
    app = Flask(__name__)
    es = EntitySync(app)
    rows: dict[str, Any] = {"1": "apples"}

    @es.entity("items")
    def items(key: EntityKey, secret: Any) -> Any:
        return None if key.id not in rows else {"id": key.id, "name": rows[key.id], "for": secret}

    @es.authorize
    def authorize(key: EntityKey, secret: Any) -> bool:
        return key.id != "secret-only" or secret == "admin"

    @es.identify
    def identify() -> Any:
        return request.cookies.get("user")

    @app.post("/items/<id>")
    def save(id: str) -> Any:
        rows[id] = request.get_json()["name"]
        es.notify("items", id)
        return {"ok": True}

    @app.delete("/items/<id>")
    def delete(id: str) -> Any:
        rows.pop(id, None)
        es.notify("items", id)
        return {"ok": True}

    return app, rows
