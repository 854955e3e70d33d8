"""es.watch: notify after commit, with plain SQLAlchemy 2.x sessions and Flask-SQLAlchemy.

The in-process tests record what reaches the bus (a recording ``Bus``), so
they can assert exactly which keys a commit notified, and that a flush or a
rollback notified none. The end-to-end tests run ``tests/orm_app.py``
(Flask-SQLAlchemy, SQLite) under gunicorn -k gevent and flask run, and a
real websocket client sees a view's commit as a push and a delete as gone.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import pytest
from flask import Flask
from sqlalchemy import ForeignKey, String, create_engine, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship
from sqlalchemy.pool import StaticPool

from entitysync_sync import Bus, BusSink, ConfigError, EntityKey, EntitySync, InvalidKeyError
from entitysync_sync.protocol import result_version
from tests.support.clients import Client
from tests.support.servers import Server

GONE_1 = {"action": "gone", "key": {"entity": "items", "id": "1"}, "v": result_version(None)}


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "items"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    kind: Mapped[str] = mapped_column(String(20), default="item")
    parts: Mapped[list[Part]] = relationship(cascade="all, delete-orphan")
    __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "item"}


class Gadget(Item):
    __mapper_args__ = {"polymorphic_identity": "gadget"}  # single-table inheritance


class Part(Base):
    __tablename__ = "parts"
    id: Mapped[int] = mapped_column(primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"))


class Tag(Base):
    __tablename__ = "tags"
    item_id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(20), primary_key=True)


class Comment(Base):
    __tablename__ = "comments"
    id: Mapped[int] = mapped_column(primary_key=True)
    post_id: Mapped[int]


class NotAModel:
    pass


class RecordingBus(Bus):
    """Records every key published, in order."""

    def __init__(self) -> None:
        self.published: list[EntityKey] = []

    def start(self, sink: BusSink, entities: Iterable[str]) -> None:
        pass

    def publish(self, keys: Sequence[EntityKey]) -> None:
        self.published.extend(keys)

    def close(self) -> None:
        pass

    def take(self) -> list[str]:
        keys, self.published = self.published, []
        return [str(key) for key in keys]


@pytest.fixture
def bus() -> RecordingBus:
    return RecordingBus()


@pytest.fixture
def es(bus: RecordingBus) -> Iterator[EntitySync]:
    app = Flask(__name__)
    es = EntitySync(app, bus=bus)
    for entity in ("items", "parts", "tags", "posts"):
        es.entity(entity)(lambda key, secret: None)
    es.watch(Item)
    es.watch(Part)
    yield es
    for model in (Item, Part, Tag, Comment):
        es.unwatch(model)


@pytest.fixture
def session(es: EntitySync) -> Iterator[Session]:
    engine = create_engine("sqlite://", connect_args={"check_same_thread": False}, poolclass=StaticPool)
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        yield s


def test_insert_update_delete_each_notify_after_the_commit_only(session: Session, bus: RecordingBus) -> None:
    session.add(Item(id=1, name="a"))
    session.flush()
    assert bus.take() == []  # flushed, not committed
    session.commit()
    assert bus.take() == ["items/1"]
    session.get(Item, 1).name = "b"  # type: ignore[union-attr]
    session.commit()
    assert bus.take() == ["items/1"]
    session.delete(session.get(Item, 1))
    session.commit()
    assert bus.take() == ["items/1"]  # the primary key was read at flush time, before it was gone


def test_a_rollback_notifies_nothing(session: Session, bus: RecordingBus) -> None:
    session.add(Item(id=1, name="a"))
    session.flush()
    session.rollback()
    session.add(Item(id=2, name="b"))
    session.rollback()
    assert bus.take() == []
    session.add(Item(id=3, name="c"))
    session.commit()
    assert bus.take() == ["items/3"]  # nothing from the rolled-back transactions leaked into this one


def test_one_notify_per_instance_per_transaction(session: Session, bus: RecordingBus) -> None:
    item = Item(id=1, name="a")
    session.add_all([item, Item(id=2, name="b")])
    session.flush()
    for name in ("x", "y", "z"):
        item.name = name
        session.flush()
    session.commit()
    assert bus.take() == ["items/1", "items/2"]


def test_an_instance_touched_without_a_change_notifies_nothing(session: Session, bus: RecordingBus) -> None:
    session.add(Item(id=1, name="a"))
    session.commit()
    bus.take()
    item = session.get(Item, 1)
    assert item is not None and item.name == "a"  # loaded, so SQLAlchemy can tell nothing changed
    item.name = "a"
    session.commit()
    assert bus.take() == []


def test_savepoints_rolled_back_drop_their_keys_and_released_ones_keep_them(session: Session,
                                                                            bus: RecordingBus) -> None:
    session.add(Item(id=1, name="outer"))
    savepoint = session.begin_nested()
    session.add(Item(id=2, name="rolled back"))
    session.flush()
    savepoint.rollback()
    with session.begin_nested():
        session.add(Item(id=3, name="released"))
        with session.begin_nested():
            session.add(Item(id=4, name="released, nested twice"))
    assert bus.take() == []  # releasing a savepoint commits nothing yet
    try:
        with session.begin_nested():
            session.add(Item(id=5, name="failed"))
            session.flush()
            raise ValueError("abandon the savepoint")
    except ValueError:
        pass
    session.commit()
    assert sorted(bus.take()) == ["items/1", "items/3", "items/4"]
    assert session.scalars(select(Item.id).order_by(Item.id)).all() == [1, 3, 4]


def test_a_released_savepoint_in_a_rolled_back_transaction_notifies_nothing(session: Session,
                                                                           bus: RecordingBus) -> None:
    with session.begin_nested():
        session.add(Item(id=1, name="a"))
    session.rollback()
    assert bus.take() == []


def test_cascaded_deletes_and_subclasses_are_seen(session: Session, bus: RecordingBus) -> None:
    item = Gadget(id=1, name="g", parts=[Part(id=10), Part(id=11)])
    session.add(item)
    session.commit()
    assert sorted(bus.take()) == ["items/1", "parts/10", "parts/11"]
    item.parts.pop()  # the orphan is deleted by the cascade, inside the flush
    session.commit()
    assert sorted(bus.take()) == ["items/1", "parts/11"]
    session.delete(item)
    session.commit()
    assert sorted(bus.take()) == ["items/1", "parts/10"]


def test_entity_and_id_may_be_callables_and_composite_keys_are_joined(es: EntitySync, session: Session,
                                                                      bus: RecordingBus) -> None:
    es.watch(Comment, entity="posts", id=lambda comment: comment.post_id)
    es.watch(Tag)  # the table name "tags" and its composite primary key
    es.watch(Tag, entity=lambda tag: "items", id=lambda tag: tag.item_id)  # one model, two entities
    session.add_all([Comment(id=1, post_id=42), Tag(item_id=7, name="red")])
    session.commit()
    assert sorted(bus.take()) == ["items/7", "posts/42", "tags/7,red"]


def test_watch_refuses_what_cannot_work(es: EntitySync) -> None:
    with pytest.raises(ConfigError, match="not a mapped SQLAlchemy class"):
        es.watch(NotAModel)
    with pytest.raises(InvalidKeyError):
        es.watch(Comment, entity="no such!")
    with pytest.raises(ConfigError, match="id must be a callable"):
        es.watch(Comment, id="post_id")  # type: ignore[arg-type]


def test_a_notify_that_fails_after_a_commit_is_logged_not_raised(es: EntitySync, session: Session,
                                                                 bus: RecordingBus,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    es.watch(Comment, entity="unregistered")
    session.add(Comment(id=1, post_id=1))
    with caplog.at_level(logging.ERROR, logger="entitysync_sync"):
        session.commit()  # the row is committed; raising here would say otherwise
    assert session.get(Comment, 1) is not None
    assert any("after a commit failed" in r.getMessage() and r.exc_info for r in caplog.records)
    assert bus.take() == []


def test_unwatch_stops_the_notifications(es: EntitySync, session: Session, bus: RecordingBus) -> None:
    es.unwatch(Item)
    session.add(Item(id=1, name="a", parts=[Part(id=1)]))
    session.commit()
    assert bus.take() == ["parts/1"]


def test_flask_sqlalchemy_sessions_notify_after_commit(tmp_path: Path) -> None:
    from flask_sqlalchemy import SQLAlchemy

    class FsaBase(DeclarativeBase):
        pass

    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = f"sqlite:///{tmp_path / 'fsa.sqlite3'}"
    db = SQLAlchemy(app, model_class=FsaBase)

    class Note(db.Model):  # type: ignore[name-defined]
        id: Mapped[int] = mapped_column(primary_key=True)
        text: Mapped[str]

    bus = RecordingBus()
    es = EntitySync(app, bus=bus)
    es.entity("note")(lambda key, secret: None)
    es.watch(Note)
    try:
        with app.app_context():
            db.create_all()
            db.session.add(Note(id=5, text="hi"))
            db.session.commit()
            assert bus.take() == ["note/5"]
            db.session.add(Note(id=6, text="no"))
            db.session.rollback()
            db.session.delete(db.session.get(Note, 5))
            db.session.commit()
            assert bus.take() == ["note/5"]
    finally:
        es.unwatch(Note)


# -- end to end: a view's commit reaches a websocket client of a real server --------


@pytest.fixture(params=["gunicorn", "flask"])
def orm_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Server]:
    server = Server(request.param, {"SQLALCHEMY_DATABASE_URI": f"sqlite:///{tmp_path / 'orm.sqlite3'}"},
                    app="tests.orm_app:create_app()", ready_path="/items")
    yield server
    server.stop()


def test_a_commit_in_a_view_pushes_and_a_delete_sends_gone(orm_server: Server) -> None:
    client = Client(orm_server.ws_url)
    watcher = Client(orm_server.ws_url)
    try:
        client.subscribe("items", 1)
        client.expect(lambda f: f == GONE_1)
        watcher.subscribe("items", 2)
        watcher.expect(lambda f: f.get("action") == "gone")
        orm_server.post("/items/1", {"name": "apples"})
        assert client.expect_push("items", "1") == {"id": 1, "name": "apples"}
        orm_server.post("/items/1", {"name": "pears"})
        assert client.expect_push("items", "1") == {"id": 1, "name": "pears"}
        assert orm_server.post("/items/1/rolled-back", {"name": "never"}) == {"ok": False}
        client.assert_silent(within=0.5)  # nothing was committed, so nothing was notified
        orm_server.post("/items/1/delete")
        client.expect(lambda f: f == GONE_1)
        watcher.assert_silent(within=0.3)  # item 2 never changed
    finally:
        client.close()
        watcher.close()
