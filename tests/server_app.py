"""The app the integration tests run under gunicorn -k gevent and flask run.

Its configuration comes from ``FLASK_ENTITYSYNC_*`` environment variables
(``app.config.from_prefixed_env()``), so each test server can differ. It
keeps its rows in memory and exposes ``/_t/...`` endpoints through which the
tests change rows, notify and read counters from inside the server.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import gc
import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections import Counter
from contextlib import closing
from typing import Any

from flask import Flask, jsonify, request, url_for
from flask_sock import Sock

from entitysync_sync import EntityKey, EntitySync

SLOW_FETCH_SECONDS = 0.3


@dataclasses.dataclass
class TypedRow:
    id: str
    when: datetime.datetime
    price: decimal.Decimal
    uid: uuid.UUID


class SharedRows:
    """Rows in an SQLite file, so that several server processes share one database."""

    def __init__(self, path: str) -> None:
        self.path = path
        with self._db() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("CREATE TABLE IF NOT EXISTS rows (id TEXT PRIMARY KEY, value TEXT)")

    def _db(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=10, isolation_level=None)

    def __contains__(self, id: str) -> bool:
        with closing(self._db()) as db:
            return db.execute("SELECT 1 FROM rows WHERE id = ?", (id,)).fetchone() is not None

    def get(self, id: str) -> Any:
        with closing(self._db()) as db:
            row = db.execute("SELECT value FROM rows WHERE id = ?", (id,)).fetchone()
        return None if row is None else json.loads(row[0])

    def __setitem__(self, id: str, value: Any) -> None:
        with closing(self._db()) as db:
            db.execute("INSERT OR REPLACE INTO rows VALUES (?, ?)", (id, json.dumps(value)))

    def pop(self, id: str, default: Any = None) -> Any:
        with closing(self._db()) as db:
            db.execute("DELETE FROM rows WHERE id = ?", (id,))
        return default


class PgRows:
    """Rows in a PostgreSQL table (``schema.table``, columns ``id`` and ``value``), so that what
    psql writes is what the servers fetch."""

    def __init__(self, url: str, table: str) -> None:
        from psycopg import sql

        self.url = url
        self.table = sql.Identifier(*table.split("."))
        self.sql = sql

    def _one(self, query: str, *params: Any) -> Any:
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            return conn.execute(self.sql.SQL(query).format(self.table), params).fetchone()

    def __contains__(self, id: str) -> bool:
        return self._one("SELECT 1 FROM {} WHERE id = %s", id) is not None

    def get(self, id: str) -> Any:
        row = self._one("SELECT value FROM {} WHERE id = %s", id)
        return None if row is None else json.loads(row[0])

    def __setitem__(self, id: str, value: Any) -> None:
        self._one("INSERT INTO {} VALUES (%s, %s) ON CONFLICT (id) DO UPDATE SET value = EXCLUDED.value "
                  "RETURNING 1", id, json.dumps(value))

    def pop(self, id: str, default: Any = None) -> Any:
        self._one("DELETE FROM {} WHERE id = %s RETURNING 1", id)
        return default


def create_app() -> Flask:
    level = os.environ.get("ENTITYSYNC_TEST_LOG_LEVEL")
    if level:  # e.g. DEBUG, to prove that not even debug logs carry secrets
        logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    app = Flask(__name__)
    app.config.from_prefixed_env()
    sock = Sock(app)

    @sock.route("/_t/echo")
    def echo(ws: Any) -> None:
        # The app's own flask-sock route: simple-websocket's reader thread delivers this.
        ws.send(ws.receive(timeout=10))

    es = EntitySync(app)
    shared = os.environ.get("ENTITYSYNC_TEST_DB")
    pg_table = os.environ.get("ENTITYSYNC_TEST_PG_TABLE")
    rows: Any = SharedRows(shared) if shared else {}
    if pg_table:
        rows = PgRows(os.environ["ENTITYSYNC_TEST_PG_URL"], pg_table)
    fetches: Counter[str] = Counter()
    messages: list[dict[str, Any]] = []
    lock = threading.Lock()

    def count(key: EntityKey) -> None:
        with lock:
            fetches[str(key)] += 1

    def value(key: EntityKey) -> Any:
        return rows.get(key.id)

    @es.entity("items")
    def items(key: EntityKey, secret: Any) -> Any:
        count(key)
        if key.id not in rows:
            return None
        return {"id": key.id, "value": value(key)}

    @es.entity("multi")
    def multi(key: EntityKey, secret: Any) -> Any:
        count(key)
        for part in range(3):
            yield {"id": key.id, "part": part, "value": value(key)}

    @es.entity("pair")
    def pair(key: EntityKey, secret: Any) -> Any:
        return [{"id": key.id, "n": 1}, {"id": key.id, "n": 2}]

    @es.entity("whoami")
    def whoami(key: EntityKey, secret: Any) -> Any:
        count(key)
        return {"id": key.id, "secret": secret, "value": value(key)}

    @es.entity("slowwhoami")
    def slowwhoami(key: EntityKey, secret: Any) -> Any:
        count(key)
        time.sleep(SLOW_FETCH_SECONDS)
        return {"id": key.id, "secret": secret, "value": value(key)}

    batch_calls: dict[str, list[int]] = {}

    @es.entity("batchwho", batch=True)
    def batchwho(key: EntityKey, secrets: list[Any]) -> Any:
        """One row per secret; the stored value "short" or "raise" makes the call misbehave."""
        count(key)
        with lock:
            batch_calls.setdefault(str(key), []).append(len(secrets))
        current = value(key)
        if current == "raise":
            raise RuntimeError("the database is on fire")
        if key.id not in rows:
            return [None] * len(secrets)
        results = [{"id": key.id, "secret": secret, "value": current} for secret in secrets]
        return results[:-1] if current == "short" else results

    @es.entity("hang")
    def hang(key: EntityKey, secret: Any) -> Any:
        count(key)
        if value(key) != "ok":
            time.sleep(3600)  # a database that never answers
        return {"id": key.id, "value": "ok"}

    @es.entity("hangfor")
    def hangfor(key: EntityKey, secret: Any) -> Any:
        """A query that never answers for users whose secret starts with "hang", and only for them."""
        count(key)
        if str(secret).startswith("hang"):
            time.sleep(3600)
        return {"id": key.id, "secret": secret, "value": value(key)}

    @es.entity("where")
    def where(key: EntityKey, secret: Any) -> Any:
        return {"id": key.id, "pid": os.getpid(), "value": value(key)}

    @es.entity("slow")
    def slow(key: EntityKey, secret: Any) -> Any:
        count(key)
        time.sleep(SLOW_FETCH_SECONDS)
        return {"id": key.id, "value": value(key)}

    @es.entity("boom")
    def boom(key: EntityKey, secret: Any) -> Any:
        count(key)
        if value(key) == "ok":
            return {"id": key.id, "value": "ok"}
        raise RuntimeError("the database is on fire")

    @es.entity("big")
    def big(key: EntityKey, secret: Any) -> Any:
        return {"id": key.id, "value": value(key), "blob": "x" * int(key.id.split("-")[0])}

    @es.entity("typed")
    def typed(key: EntityKey, secret: Any) -> Any:
        return TypedRow(
            key.id,
            datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc),
            decimal.Decimal("12.50"),
            uuid.UUID(int=7),
        )

    @es.entity("encoded")
    def encoded(key: EntityKey, secret: Any) -> Any:
        return [b'{"pre":"bytes"}', '{"pre":"str"}']

    @es.entity("private")
    def private(key: EntityKey, secret: Any) -> Any:
        return {"id": key.id, "for": secret}

    @es.entity("shared", shared=True)
    def shared(key: EntityKey, secret: Any) -> Any:
        count(key)
        if key.id not in rows:
            return None
        return {"id": key.id, "value": value(key), "secret": secret}

    @es.entity("sharedslow", shared=True)
    def sharedslow(key: EntityKey, secret: Any) -> Any:
        count(key)
        time.sleep(SLOW_FETCH_SECONDS)
        return {"id": key.id, "value": value(key)}

    @es.entity("sharedbig", shared=True)
    def sharedbig(key: EntityKey, secret: Any) -> Any:
        count(key)
        return [{"id": key.id, "value": value(key), "blob": "x" * int(key.id.split("-")[0])}, {"id": key.id}]

    @es.entity("sharedboom", shared=True)
    def sharedboom(key: EntityKey, secret: Any) -> Any:
        count(key)
        if value(key) == "ok":
            return {"id": key.id, "value": "ok"}
        raise RuntimeError("the database is on fire")

    def as_set(key: EntityKey) -> Any:
        """A list key: its stored value is the list of its members (None: the list does not exist)."""
        members = value(key) if key.id in rows else None
        if members is None:
            return None
        if not isinstance(members, list):  # e.g. the counter of /_t/burst
            members = [members]
        return [{"list": key.id, "member": member} for member in members]

    @es.entity("lists")
    def lists(key: EntityKey, secret: Any) -> Any:
        count(key)
        return as_set(key)

    @es.entity("sharedlists", shared=True)
    def sharedlists(key: EntityKey, secret: Any) -> Any:
        count(key)
        return as_set(key)

    @es.entity("slowlists")
    def slowlists(key: EntityKey, secret: Any) -> Any:
        count(key)
        time.sleep(SLOW_FETCH_SECONDS)
        return as_set(key)

    @es.entity("biglist")
    def biglist(key: EntityKey, secret: Any) -> Any:
        """Ten rows that together hold the number of characters the id starts with."""
        size = int(key.id.split("-")[0]) // 10
        return iter([{"n": n, "value": value(key), "blob": "x" * size} for n in range(10)])

    @es.entity("board", shared=True)
    def board(key: EntityKey, secret: Any) -> Any:
        return {"id": key.id, "value": value(key), "secret": secret}

    @es.authorize
    def authorize(key: EntityKey, secret: Any) -> bool:
        if key.entity in ("private", "board"):
            return bool(secret) and str(secret).startswith("admin")
        return True

    @es.identify
    def identify() -> Any:
        token = request.cookies.get("token")
        if token == "explode":
            raise RuntimeError("the identity service is down")
        return token

    @es.on_message
    def on_message(secret: Any, raw: str) -> None:
        with lock:
            messages.append({"secret": secret, "raw": raw})

    if os.environ.get("ENTITYSYNC_TEST_NOTIFY_AT_START"):
        es.notify("items", "at-start")  # starts the bus in this process, before any fork

    @app.post("/_t/set/<entity>/<id>")
    def set_row(entity: str, id: str) -> Any:
        rows[id] = (request.get_json(silent=True) or {}).get("value")
        es.notify(entity, id)
        return {"ok": True}

    @app.post("/_t/set-quietly/<entity>/<id>")
    def set_row_quietly(entity: str, id: str) -> Any:
        rows[id] = (request.get_json(silent=True) or {}).get("value")
        return {"ok": True}

    @app.get("/_t/slow-notify/<entity>/<id>")
    def slow_notify(entity: str, id: str) -> Any:
        """A request still running when the worker is told to stop: it notifies once draining."""
        app.logger.warning("slow-notify started")
        state = es.runtime()
        deadline = time.monotonic() + 20
        while not state.draining and time.monotonic() < deadline:
            time.sleep(0.01)  # polls, with a deadline, for the shutdown the test starts
        es.notify(entity, id)
        return {"ok": True, "draining": state.draining}

    @app.post("/_t/drain")
    def drain() -> Any:
        """What a shutdown signal does in a gunicorn worker: close every websocket with 1001."""
        es.runtime().drain()
        return {"ok": True}

    @app.post("/_t/close")
    def close() -> Any:
        """Close the extension and report what of its background work is still running."""
        runtime = es.runtime()
        joined = runtime.close()
        return {
            "joined": joined,
            "tasks": len(runtime.tasks),
            "bus_tasks": getattr(runtime.bus, "running", 0),
            "threads": sorted(t.name for t in threading.enumerate() if t.name.startswith("entitysync")),
        }

    @app.post("/_t/delete/<entity>/<id>")
    def delete_row(entity: str, id: str) -> Any:
        rows.pop(id, None)
        es.notify(entity, id)
        return {"ok": True}

    @app.post("/_t/burst/<entity>/<id>")
    def burst(entity: str, id: str) -> Any:
        n = int(request.args.get("n", "100"))
        for i in range(n):
            rows[id] = i
            es.notify(entity, id)
        return {"last": n - 1}

    @app.post("/_t/notify-entity/<entity>")
    def notify_entity(entity: str) -> Any:
        """es.notify_entity, ``n`` times in a row (a burst)."""
        for _ in range(int(request.args.get("n", "1"))):
            es.notify_entity(entity)
        return {"ok": True}

    @app.get("/_t/batch-calls/<entity>/<id>")
    def get_batch_calls(entity: str, id: str) -> Any:
        """How many secrets each call of a batch fetch of the key was given."""
        with lock:
            return jsonify(batch_calls.get(f"{entity}/{id}", []))

    @app.get("/_t/fetches/<entity>/<id>")
    def fetch_count(entity: str, id: str) -> Any:
        return {"count": fetches[f"{entity}/{id}"]}

    @app.get("/_t/bus-ready")
    def bus_ready() -> Any:
        """Start the bus; ready once every entity's subscription is up."""
        runtime = es.runtime()
        runtime.ensure_started()
        return {"ready": all(bus.stats().get("connects", 0) >= len(es.entities) for bus in runtime.receiving_buses())}

    @app.get("/_t/messages")
    def get_messages() -> Any:
        return jsonify(messages)

    @app.get("/_t/page")
    def blank_page() -> Any:
        """A page that loads the browser client, for the browser tests."""
        return f'<!doctype html><title>client</title><script src="{url_for("entitysync.client_js")}"></script>'

    @app.get("/_t/es-stats")
    def es_stats() -> Any:
        return es.stats()

    @app.get("/_t/stats")
    def stats() -> Any:
        from greenlet import greenlet

        hub = es.hub()
        return {
            "pid": os.getpid(),
            "bus": es.bus().stats(),
            "pg_listen": (listener := es.runtime().pg_listener) and listener.stats(),
            "connections": hub.connection_count,
            "subscriptions": hub.subscription_count,
            "keys": hub.key_count,
            "heartbeats": hub.heartbeats,
            "threads": threading.active_count(),
            "greenlets": sum(
                1 for o in gc.get_objects() if isinstance(o, greenlet) and not o.dead
            ),
        }

    return app
