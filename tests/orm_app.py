"""A Flask-SQLAlchemy app whose views only commit: es.watch does the notifying.

Run by tests/test_orm.py under gunicorn -k gevent and flask run, configured
with ``FLASK_SQLALCHEMY_DATABASE_URI`` (an SQLite file), and by
tests/test_postgres.py on PostgreSQL (``FLASK_SQLALCHEMY_ENGINE_OPTIONS`` sets
the schema).
"""

from __future__ import annotations

import os
import signal
from typing import Any

from flask import Flask, request
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from entitysync_sync import EntityKey, EntitySync


class Base(DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base)


class Item(db.Model):  # type: ignore[name-defined]
    __tablename__ = "items"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]


def create_app() -> Flask:
    app = Flask(__name__)
    app.config.from_prefixed_env()
    db.init_app(app)
    es = EntitySync(app)
    es.watch(Item)

    @es.entity("items")
    def fetch_item(key: EntityKey, secret: Any) -> Any:
        item = db.session.get(Item, int(key.id))
        return None if item is None else {"id": item.id, "name": item.name}

    with app.app_context():
        db.create_all()

    @app.get("/items")
    def list_items() -> Any:
        return {"ids": list(db.session.scalars(db.select(Item.id)))}

    @app.post("/items/<int:item_id>")
    def save_item(item_id: int) -> Any:
        item = db.session.get(Item, item_id) or Item(id=item_id)
        item.name = request.get_json()["name"]
        db.session.add(item)
        db.session.commit()
        return {"ok": True}

    @app.post("/items/<int:item_id>/rolled-back")
    def change_then_roll_back(item_id: int) -> Any:
        item = db.session.get(Item, item_id)
        assert item is not None
        item.name = request.get_json()["name"]
        db.session.flush()
        db.session.rollback()
        return {"ok": False}

    @app.post("/items/<int:item_id>/commit-then-die")
    def commit_then_die(item_id: int) -> Any:
        """Commit, then die at once, as a worker killed by a deploy between commit and publish."""
        item = db.session.get(Item, item_id) or Item(id=item_id)
        item.name = request.get_json()["name"]
        db.session.add(item)
        db.session.commit()
        os.kill(os.getpid(), signal.SIGKILL)
        return {"ok": True}  # never reached

    @app.get("/_t/bus-ready")
    def bus_ready() -> Any:
        """Start the bus; ready once it listens to the database (for in-transaction notifications)."""
        runtime = es.runtime()
        runtime.ensure_started()
        database = runtime.listened_database()
        return {"ready": database is None or database.database_identity is not None, "bus": runtime.bus.stats()}

    @app.post("/items/<int:item_id>/delete")
    def delete_item(item_id: int) -> Any:
        db.session.delete(db.session.get(Item, item_id))
        db.session.commit()
        return {"ok": True}

    return app
