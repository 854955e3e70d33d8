"""The demo app: items in SQLite, kept live in every open tab by entitysync_sync.

Run it with ``flask --app example_flask run`` and open http://127.0.0.1:5000/
in two tabs: editing an item in one updates the other at once. It shows

* a page listing items and a form to edit one, kept live with the browser
  client that the extension serves at ``/ws/entity-sync/client.js``;
* a multi-row push: each item is pushed together with its owner's row;
* live lists (:mod:`example_flask.lists`, SQLAlchemy): add, delete and move
  tasks between two lists, or mark a whole list done with one bulk
  ``UPDATE``; ``es.watch`` notifies after each commit, and each list is
  pushed as one frame holding all its tasks;
* authorization: ``identify`` gives each websocket the signed-in user from
  the session, ``authorize`` and the fetch let each user see only the items
  they may see (their own, the public ones; ``admin`` sees all);
* a mutator that changes item 1 every second: in the server with
  ``FLASK_EXAMPLE_MUTATE=true``, or as its own process with
  ``flask --app example_flask mutate`` when the servers share a networked bus.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from typing import Any

import click
from flask import Flask, abort, current_app, redirect, render_template, request, session, url_for

from entitysync_sync import EntityKey, EntitySync

from . import lists

es = EntitySync()
lists.register(es)

USERS = [("alice", "Alice Archer"), ("bob", "Bob Baker"), ("admin", "Ada Admin")]
ITEMS = [
    # id, name, value, owner, private
    (1, "apples", "3", "alice", 0),
    (2, "pears", "5", "bob", 0),
    (3, "plums", "8", "alice", 1),
    (4, "figs", "2", "bob", 1),
]


def create_app(config: dict[str, Any] | None = None) -> Flask:
    """Build the demo app; ``config`` overrides settings (for tests)."""
    app = Flask(__name__, instance_relative_config=True)
    app.config["DATABASE"] = os.path.join(app.instance_path, "items.sqlite")
    app.config["SECRET_KEY"] = "demo only: set FLASK_SECRET_KEY for anything else"
    app.config["EXAMPLE_MUTATE"] = False
    app.config.from_prefixed_env()
    app.config.update(config or {})
    os.makedirs(app.instance_path, exist_ok=True)
    init_db(app.config["DATABASE"])
    es.init_app(app)
    lists.init_app(app)

    @app.get("/")
    def index() -> str:
        user = session.get("user")
        with db() as conn:
            items = [dict(row) for row in conn.execute("SELECT * FROM items ORDER BY id")]
            users = {row["id"]: row["name"] for row in conn.execute("SELECT id, name FROM users")}
        visible = [item for item in items if may_see(user, item)]
        return render_template("index.html", items=visible, users=users, user=user,
                               mutating=app.config["EXAMPLE_MUTATE"], lists=lists.lists())

    @app.post("/login")
    def login() -> Any:
        user = request.form.get("user") or None
        if user is not None and user not in dict(USERS):
            abort(400, "no such user")
        session["user"] = user
        return redirect(url_for("index"))

    @app.post("/items/<int:item_id>")
    def update_item(item_id: int) -> Any:
        """Change an item from a form or a JSON body; every field is optional."""
        data = request.get_json(silent=True) or request.form
        changes = {name: data[name] for name in ("name", "value", "owner") if data.get(name) is not None}
        if "private" in data:
            changes["private"] = int(str(data["private"]).lower() in ("1", "true", "on"))
        if "owner" in changes and changes["owner"] not in dict(USERS):
            abort(400, "no such owner")
        with db() as conn:
            item = conn.execute("SELECT * FROM items WHERE id = ?", (item_id,)).fetchone()
            if item is None:
                abort(404)
            if not may_see(session.get("user"), dict(item)):
                abort(403)
            if changes:
                assignments = ", ".join(f"{name} = ?" for name in changes)
                conn.execute(f"UPDATE items SET {assignments} WHERE id = ?", (*changes.values(), item_id))
        es.notify("items", item_id)  # after the commit: every subscriber gets the new rows
        return {"ok": True} if request.is_json else redirect(url_for("index"))

    @app.post("/items/<int:item_id>/delete")
    def delete_item(item_id: int) -> Any:
        with db() as conn:
            item = conn.execute("SELECT * FROM items WHERE id = ?", (item_id,)).fetchone()
            if item is not None and not may_see(session.get("user"), dict(item)):
                abort(403)
            conn.execute("DELETE FROM items WHERE id = ?", (item_id,))
        es.notify("items", item_id)  # its subscribers get "gone"
        return {"ok": True} if request.is_json else redirect(url_for("index"))

    @app.post("/reset")
    def reset() -> Any:
        """Put the demo rows back, as they were at the start."""
        init_db(app.config["DATABASE"], reset=True)
        es.notify_many(("items", item[0]) for item in ITEMS)
        lists.reset()  # its commit notifies the lists
        return {"ok": True} if request.is_json else redirect(url_for("index"))

    @app.cli.command("mutate")
    @click.option("--item", default=1, show_default=True, help="The id of the item to change.")
    @click.option("--interval", default=1.0, show_default=True, help="Seconds between changes.")
    def mutate_command(item: int, interval: float) -> None:
        """Change an item every second, as a process of its own (needs a networked bus)."""
        if app.config["ENTITYSYNC_BUS_URL"].startswith("memory:"):
            click.echo("ENTITYSYNC_BUS_URL is memory://, which reaches no other process: no server will "
                       "see these changes. Set FLASK_ENTITYSYNC_BUS_URL (e.g. redis://127.0.0.1:6379/0), "
                       "or run the server with FLASK_EXAMPLE_MUTATE=true instead.", err=True)
        click.echo(f"changing item {item} every {interval}s; Ctrl-C stops")
        mutate(app, item, interval)

    if app.config["EXAMPLE_MUTATE"]:
        started = threading.Event()

        @app.before_request
        def start_mutator() -> None:
            # Started on the first request, in the serving process (never before a fork).
            if not started.is_set():
                started.set()
                threading.Thread(target=mutate, args=(app, 1, 1.0), name="mutator", daemon=True).start()

    return app


@contextmanager
def db() -> Iterator[sqlite3.Connection]:
    """A connection to the app's database that commits (or rolls back) and closes."""
    conn = sqlite3.connect(current_app.config["DATABASE"])
    conn.row_factory = sqlite3.Row
    try:
        with conn:
            yield conn
    finally:
        conn.close()


def may_see(user: str | None, item: dict[str, Any]) -> bool:
    """Everyone sees public items; owners see their own; ``admin`` sees all."""
    return user == "admin" or not item["private"] or item["owner"] == user


@es.identify
def identify() -> str | None:
    """The websocket's secret: the user signed in to this browser's session."""
    return session.get("user")


@es.authorize
def authorize(key: EntityKey, user: str | None) -> bool:
    """Checked on every subscribe. A missing item is allowed: its subscriber gets "gone"."""
    if key.entity == "lists":
        return True  # every user sees the lists
    with db() as conn:
        item = conn.execute("SELECT * FROM items WHERE id = ?", (key.id,)).fetchone()
    return item is None or may_see(user, dict(item))


@es.entity("items")
def fetch_item(key: EntityKey, user: str | None) -> list[dict[str, Any]] | None:
    """An item and its owner, two rows in one push; None (sent as "gone") when
    the item does not exist or this user may not see it (any more)."""
    with db() as conn:
        item = conn.execute("SELECT * FROM items WHERE id = ?", (key.id,)).fetchone()
        if item is None or not may_see(user, dict(item)):
            return None
        owner = conn.execute("SELECT id, name FROM users WHERE id = ?", (item["owner"],)).fetchone()
    return [
        {"type": "item", **dict(item), "private": bool(item["private"])},
        {"type": "user", **dict(owner)},
    ]


def mutate(app: Flask, item_id: int, interval: float) -> None:
    """Set ``item_id``'s value to the time of day every ``interval`` seconds, and notify."""
    while True:
        with app.app_context(), db() as conn:
            conn.execute("UPDATE items SET value = ? WHERE id = ?", (time.strftime("%H:%M:%S"), item_id))
        es.notify("items", item_id)
        time.sleep(interval)


def init_db(path: str, reset: bool = False) -> None:
    """Create the tables and the demo rows; ``reset`` puts the rows back as they were."""
    with closing(sqlite3.connect(path)) as conn, conn:
        columns = {row[1] for row in conn.execute("PRAGMA table_info(items)")}
        if columns and "owner" not in columns:
            conn.execute("DROP TABLE items")  # left by an older version of this demo
        conn.execute("CREATE TABLE IF NOT EXISTS users (id TEXT PRIMARY KEY, name TEXT NOT NULL)")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS items (id INTEGER PRIMARY KEY, name TEXT NOT NULL, value TEXT NOT NULL,"
            " owner TEXT NOT NULL REFERENCES users (id), private INTEGER NOT NULL DEFAULT 0)"
        )
        conn.executemany("INSERT OR IGNORE INTO users (id, name) VALUES (?, ?)", USERS)
        if reset:
            conn.execute("DELETE FROM items")
        if conn.execute("SELECT COUNT(*) FROM items").fetchone()[0] == 0:
            conn.executemany("INSERT INTO items (id, name, value, owner, private) VALUES (?, ?, ?, ?, ?)", ITEMS)
