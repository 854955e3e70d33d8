"""A minimal app on the embedded default: in-process bus, items in a SQLite file.

Run it with ``flask --app example_flask run`` and open http://127.0.0.1:5000/
in two tabs: saving an item in one updates the other at once.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Any

from flask import Flask, abort, redirect, render_template_string, request, url_for

from entitysync_sync import EntityKey, EntitySync

es = EntitySync()

PAGE = """<!doctype html>
<title>entitysync_sync example</title>
<style>body{font:16px system-ui;margin:2em}td,th{padding:.3em .8em;text-align:left}</style>
<h1>Items</h1>
<p>Connection: <b id="state">connecting</b>. Save an item here and watch another tab.</p>
<table>
  <tr><th>id</th><th>name</th><th>value (live)</th><th></th></tr>
  {% for item in items %}
  <tr>
    <td>{{ item.id }}</td>
    <td id="name-{{ item.id }}">{{ item.name }}</td>
    <td id="value-{{ item.id }}">{{ item.value }}</td>
    <td><form method="post" action="{{ url_for('update_item', item_id=item.id) }}">
      <input name="value" value="{{ item.value }}"> <button>Save</button></form></td>
  </tr>
  {% endfor %}
</table>
<script>
const ids = {{ items | map(attribute="id") | list | tojson }};
const url = location.origin.replace(/^http/, "ws") + {{ ws_path | tojson }};
const ws = new WebSocket(url);
const state = document.getElementById("state");
ws.onopen = () => {
  state.textContent = "open";
  for (const id of ids) {
    ws.send(JSON.stringify({action: "subscribe", body: {entity: "items", id: String(id)}}));
  }
};
ws.onclose = () => { state.textContent = "closed"; };
ws.onmessage = (event) => {
  const frame = JSON.parse(event.data);
  if (frame.action === "push") {
    document.getElementById("name-" + frame.body.id).textContent = frame.body.name;
    document.getElementById("value-" + frame.body.id).textContent = frame.body.value;
  } else if (frame.action === "gone") {
    document.getElementById("value-" + frame.key.id).textContent = "(deleted)";
  }
};
</script>
"""


def create_app(config: dict[str, Any] | None = None) -> Flask:
    """Build the example app; ``config`` overrides settings (for tests)."""
    app = Flask(__name__, instance_relative_config=True)
    app.config["DATABASE"] = os.path.join(app.instance_path, "items.sqlite")
    app.config.from_prefixed_env()
    app.config.update(config or {})
    os.makedirs(app.instance_path, exist_ok=True)
    init_db(app.config["DATABASE"])
    es.init_app(app)

    def db() -> sqlite3.Connection:
        conn = sqlite3.connect(app.config["DATABASE"])
        conn.row_factory = sqlite3.Row
        return conn

    @app.get("/")
    def index() -> str:
        with db() as conn:
            items = [dict(row) for row in conn.execute("SELECT id, name, value FROM items ORDER BY id")]
        return render_template_string(PAGE, items=items, ws_path=app.config["ENTITYSYNC_PATH"])

    @app.post("/items/<int:item_id>")
    def update_item(item_id: int) -> Any:
        value = request.form.get("value") or (request.get_json(silent=True) or {}).get("value")
        if value is None:
            abort(400, "send a value")
        with db() as conn:
            if conn.execute("UPDATE items SET value = ? WHERE id = ?", (value, item_id)).rowcount == 0:
                abort(404)
        es.notify("items", item_id)  # after the commit: every subscriber gets the new row
        if request.form:
            return redirect(url_for("index"))
        return {"ok": True}

    return app


@es.entity("items")
def fetch_item(key: EntityKey, secret: Any) -> dict[str, Any] | None:
    """One item row, or None (sent as "gone") when it does not exist."""
    from flask import current_app

    conn = sqlite3.connect(current_app.config["DATABASE"])
    try:
        row = conn.execute("SELECT id, name, value FROM items WHERE id = ?", (key.id,)).fetchone()
    finally:
        conn.close()
    if row is None:
        return None
    return {"id": row[0], "name": row[1], "value": row[2]}


def init_db(path: str) -> None:
    """Create the items table with three rows, once."""
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS items (id INTEGER PRIMARY KEY, name TEXT, value TEXT)")
        if conn.execute("SELECT COUNT(*) FROM items").fetchone()[0] == 0:
            conn.executemany(
                "INSERT INTO items (id, name, value) VALUES (?, ?, ?)",
                [(1, "apples", "3"), (2, "pears", "5"), (3, "plums", "8")],
            )
