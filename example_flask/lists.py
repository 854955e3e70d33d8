"""The demo's live lists: tasks in two lists, in SQLAlchemy, kept live by es.watch.

Each list is one key, ``lists/<id>``, whose fetch returns the list's tasks:
the browser gets the whole set in one frame and renders it as it is, so
additions, removals and moves need no bookkeeping on the page. Nothing here
calls ``notify``: ``es.watch(Task, keys=..., entities=["lists"])`` notifies
the list a task is in after every commit, and the list it left when it
moves, and the "mark all done" bulk ``UPDATE`` refreshes the lists after
its commit.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Flask, abort, current_app, request
from sqlalchemy import Engine, ForeignKey, String, create_engine, delete, select, update
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from entitysync_sync import EntityKey, EntitySync

LISTS = [(1, "Groceries"), (2, "Chores")]
TASKS = [(1, 1, "milk", False), (2, 1, "bread", False), (3, 2, "laundry", False), (4, 2, "dishes", True)]


class Base(DeclarativeBase):
    pass


class TaskList(Base):
    __tablename__ = "lists"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


class Task(Base):
    __tablename__ = "tasks"
    id: Mapped[int] = mapped_column(primary_key=True)
    list_id: Mapped[int] = mapped_column(ForeignKey("lists.id"))
    title: Mapped[str] = mapped_column(String(100))
    done: Mapped[bool] = mapped_column(default=False)


bp = Blueprint("lists", __name__)


def engine() -> Engine:
    return current_app.extensions["example_lists"]  # type: ignore[no-any-return]


def register(es: EntitySync) -> None:
    """The lists entity and the watch that keeps it live (once, at import)."""

    @es.entity("lists", shared=True)  # every user sees the same lists: one fetch per change
    def fetch_list(key: EntityKey, secret: Any) -> list[dict[str, Any]] | None:
        with Session(engine()) as session:
            if session.get(TaskList, int(key.id)) is None:
                return None
            tasks = session.scalars(select(Task).where(Task.list_id == int(key.id)).order_by(Task.id))
            return [{"id": t.id, "list": t.list_id, "title": t.title, "done": t.done} for t in tasks]

    es.watch(Task, keys=lambda task: [("lists", task.list_id)], entities=["lists"])


def init_app(app: Flask) -> None:
    """Open the lists' database (the app's SQLite file) and add their views."""
    app.extensions["example_lists"] = db = create_engine(f"sqlite:///{app.config['DATABASE']}")
    Base.metadata.create_all(db)
    with Session(db) as session, session.begin():
        if session.get(TaskList, 1) is None:
            seed(session)
    app.register_blueprint(bp)


def seed(session: Session) -> None:
    session.execute(delete(Task))
    session.execute(delete(TaskList))
    session.add_all(TaskList(id=id, name=name) for id, name in LISTS)
    session.add_all(Task(id=id, list_id=list_id, title=title, done=done) for id, list_id, title, done in TASKS)


def lists() -> list[dict[str, Any]]:
    with Session(engine()) as session:
        return [{"id": t.id, "name": t.name} for t in session.scalars(select(TaskList).order_by(TaskList.id))]


def _data() -> Any:
    return request.get_json(silent=True) or request.form


def _list_id(value: Any) -> int:
    try:
        list_id = int(value)
    except (TypeError, ValueError):
        abort(400, "list must be a list id")
    if list_id not in dict(LISTS):
        abort(400, "no such list")
    return list_id


@bp.post("/tasks")
def add_task() -> Any:
    title = str(_data().get("title") or "").strip()[:100]
    if not title:
        abort(400, "a task needs a title")
    with Session(engine()) as session, session.begin():
        session.add(Task(list_id=_list_id(_data().get("list")), title=title))
    return {"ok": True}


@bp.post("/tasks/<int:task_id>/move")
def move_task(task_id: int) -> Any:
    with Session(engine()) as session, session.begin():
        task = session.get(Task, task_id) or abort(404)
        task.list_id = _list_id(_data().get("list"))  # notifies the list it left and the one it joins
    return {"ok": True}


@bp.post("/tasks/<int:task_id>/delete")
def delete_task(task_id: int) -> Any:
    with Session(engine()) as session, session.begin():
        task = session.get(Task, task_id)
        if task is not None:
            session.delete(task)
    return {"ok": True}


@bp.post("/lists/<int:list_id>/done")
def mark_all_done(list_id: int) -> Any:
    """A bulk statement: no instance is loaded, and the lists are still refreshed after the commit."""
    with Session(engine()) as session, session.begin():
        session.execute(update(Task).where(Task.list_id == list_id).values(done=True))
    return {"ok": True}


def reset() -> None:
    """Put the demo lists back, as they were at the start."""
    with Session(engine()) as session, session.begin():
        seed(session)
