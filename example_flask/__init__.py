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
  ``flask --app example_flask mutate`` when the servers share a networked bus;
* PostgreSQL: with ``FLASK_ENTITYSYNC_BUS_URL=postgresql:///test`` the rows live
  in that database (schema ``entitysync_demo``) and a trigger notifies every
  write to ``items``, so an ``UPDATE`` typed in psql shows in the open pages.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from typing import Any

import click
from flask import Flask, abort, current_app, redirect, render_template, request, session, url_for

from entitysync_sync import ConfigError, EntityKey, EntitySync, Publisher

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
    app.config["EXAMPLE_PG_SCHEMA"] = "entitysync_demo"
    app.config.from_prefixed_env()
    app.config.update(config or {})
    os.makedirs(app.instance_path, exist_ok=True)
    es.init_app(app)
    if on_postgres(app):
        init_pg(app)
    else:
        init_db(app.config["DATABASE"])
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
        changed(item_id)  # after the commit: every subscriber gets the new rows
        return {"ok": True} if request.is_json else redirect(url_for("index"))

    @app.post("/items/<int:item_id>/delete")
    def delete_item(item_id: int) -> Any:
        with db() as conn:
            item = conn.execute("SELECT * FROM items WHERE id = ?", (item_id,)).fetchone()
            if item is not None and not may_see(session.get("user"), dict(item)):
                abort(403)
            conn.execute("DELETE FROM items WHERE id = ?", (item_id,))
        changed(item_id)  # its subscribers get "gone"
        return {"ok": True} if request.is_json else redirect(url_for("index"))

    @app.post("/reset")
    def reset() -> Any:
        """Put the demo rows back, as they were at the start."""
        if on_postgres(app):
            init_pg(app, reset=True)
        else:
            init_db(app.config["DATABASE"], reset=True)
        changed(*(item[0] for item in ITEMS))
        lists.reset()  # its commit notifies the lists
        return {"ok": True} if request.is_json else redirect(url_for("index"))

    @app.cli.command("mutate")
    @click.option("--item", default=1, show_default=True, help="The id of the item to change.")
    @click.option("--interval", default=1.0, show_default=True, help="Seconds between changes.")
    def mutate_command(item: int, interval: float) -> None:
        """Change an item every second, as a process of its own (needs a networked bus).

        A process that serves no websockets notifies through a Publisher on
        the servers' bus and topic prefix.
        """
        try:
            publisher = Publisher(app.config["ENTITYSYNC_BUS_URL"],
                                  topic_prefix=app.config["ENTITYSYNC_TOPIC_PREFIX"])
        except ConfigError as exc:
            raise click.ClickException(
                f"{exc}. Set FLASK_ENTITYSYNC_BUS_URL (e.g. redis://127.0.0.1:6379/0) for the servers and "
                "this command, or run the server with FLASK_EXAMPLE_MUTATE=true instead.") from None
        click.echo(f"changing item {item} every {interval}s; Ctrl-C stops")
        with publisher:  # leaving it (Ctrl-C) waits until the broker has the last change
            mutate(app, item, interval, publisher.notify)

    if app.config["EXAMPLE_MUTATE"]:
        started = threading.Event()

        @app.before_request
        def start_mutator() -> None:
            # Started on the first request, in the serving process (never before a fork).
            if not started.is_set():
                started.set()
                threading.Thread(target=mutate, args=(app, 1, 1.0, es.notify), name="mutator", daemon=True).start()

    return app


def on_postgres(app: Flask) -> bool:
    """Whether the rows live in PostgreSQL: when the bus is PostgreSQL, they do too."""
    return str(app.config["ENTITYSYNC_BUS_URL"]).startswith(("postgresql:", "postgres:"))


def changed(*item_ids: int) -> None:
    """Notify the subscribers of ``item_ids``; on PostgreSQL the trigger already did."""
    if not on_postgres(current_app):
        es.notify_many(("items", item_id) for item_id in item_ids)


class _Pg:
    """A psycopg connection that takes the same ``?`` placeholders as sqlite3."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def execute(self, query: str, params: Any = ()) -> Any:
        return self.conn.execute(query.replace("?", "%s"), params)


@contextmanager
def db() -> Iterator[Any]:
    """A connection to the app's database that commits (or rolls back) and closes."""
    if on_postgres(current_app):
        import psycopg
        from psycopg.rows import dict_row

        schema = current_app.config["EXAMPLE_PG_SCHEMA"]
        with psycopg.connect(current_app.config["ENTITYSYNC_BUS_URL"], row_factory=dict_row,
                             options=f"-c search_path={schema}") as pg:
            yield _Pg(pg)
        return
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


def mutate(app: Flask, item_id: int, interval: float, notify: Callable[[str, int], None]) -> None:
    """Set ``item_id``'s value to the time of day every ``interval`` seconds, and ``notify``."""
    while True:
        with app.app_context():
            with db() as conn:
                conn.execute("UPDATE items SET value = ? WHERE id = ?", (time.strftime("%H:%M:%S"), item_id))
            if not on_postgres(app):  # on PostgreSQL the trigger notifies
                notify("items", item_id)
        time.sleep(interval)


def init_pg(app: Flask, reset: bool = False) -> None:
    """The tables, the demo rows and the trigger, in the PostgreSQL schema ``EXAMPLE_PG_SCHEMA``."""
    import psycopg
    from psycopg import sql

    from entitysync_sync.postgres import trigger_sql

    schema = app.config["EXAMPLE_PG_SCHEMA"]
    with psycopg.connect(app.config["ENTITYSYNC_BUS_URL"]) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        conn.execute(sql.SQL("SET LOCAL search_path = {}").format(sql.Identifier(schema)))
        conn.execute("CREATE TABLE IF NOT EXISTS users (id text PRIMARY KEY, name text NOT NULL)")
        conn.execute("CREATE TABLE IF NOT EXISTS items (id integer PRIMARY KEY, name text NOT NULL, "
                     "value text NOT NULL, owner text NOT NULL REFERENCES users (id), "
                     "private integer NOT NULL DEFAULT 0)")
        conn.cursor().executemany("INSERT INTO users (id, name) VALUES (%s, %s) ON CONFLICT DO NOTHING", USERS)
        conn.execute(trigger_sql("items", f"{schema}.items", topic_prefix=app.config["ENTITYSYNC_TOPIC_PREFIX"]))
        if reset:
            conn.execute("DELETE FROM items")
        if conn.execute("SELECT count(*) FROM items").fetchone()[0] == 0:
            conn.cursor().executemany("INSERT INTO items (id, name, value, owner, private) "
                                      "VALUES (%s, %s, %s, %s, %s)", ITEMS)


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
