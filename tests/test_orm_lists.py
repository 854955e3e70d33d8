"""es.watch for lists: several keys per row, old and new, and bulk statements.

Against SQLite and the machine's PostgreSQL (127.0.0.1:5432, database
``test``, user ``root``; each run in a schema of its own). Without
PostgreSQL its half is skipped, except under ``CI=true`` or
``ENTITYSYNC_TEST_REQUIRE_POSTGRES=1``, where it fails. A recording bus
shows exactly what each commit published: keys, and entity-wide refreshes.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import pytest
from flask import Flask
from sqlalchemy import ForeignKey, String, create_engine, delete, select, text, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

from entitysync_sync import Bus, BusSink, ConfigError, EntityKey, EntitySync

POSTGRES_URL = os.environ.get("ENTITYSYNC_TEST_POSTGRES_URL", "postgresql+psycopg://root@127.0.0.1:5432/test")


class Base(DeclarativeBase):
    pass


class Project(Base):
    __tablename__ = "es_projects"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    tasks: Mapped[list[Task]] = relationship(back_populates="project")


class Task(Base):
    __tablename__ = "es_tasks"
    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("es_projects.id"))
    title: Mapped[str] = mapped_column(String(50))
    done: Mapped[bool] = mapped_column(default=False)
    project: Mapped[Project] = relationship(back_populates="tasks")


def task_keys(task: Task) -> list[tuple[str, int]]:
    return [("tasks", task.id), ("project_tasks", task.project_id)]


class RecordingBus(Bus):
    """Records every key and every entity-wide refresh published, in order."""

    def __init__(self) -> None:
        self.published: list[str] = []

    def start(self, sink: BusSink, entities: Iterable[str]) -> None:
        pass

    def publish(self, keys: Sequence[EntityKey]) -> None:
        self.published.extend(str(key) for key in keys)

    def publish_entities(self, entities: Sequence[str]) -> None:
        self.published.extend(f"{entity}/*" for entity in entities)

    def close(self) -> None:
        pass

    def take(self) -> list[str]:
        published, self.published = self.published, []
        return sorted(published)


def _require_postgres(reason: str) -> None:
    if os.environ.get("CI") == "true" or os.environ.get("ENTITYSYNC_TEST_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"PostgreSQL is required here: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "sqlite":
        engine = create_engine(f"sqlite:///{tmp_path / 'lists.sqlite'}")
        Base.metadata.create_all(engine)
        yield engine
        engine.dispose()
        return
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _require_postgres("psycopg is not installed: pip install -e '.[test]'")
    server = create_engine(POSTGRES_URL)
    schema = f"es_orm_{uuid.uuid4().hex[:12]}"
    try:
        with server.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    except Exception as exc:
        server.dispose()
        _require_postgres(f"PostgreSQL at {POSTGRES_URL} is unreachable: {exc}")
    engine = server.execution_options(schema_translate_map={None: schema})
    try:
        Base.metadata.create_all(engine)
        yield engine
    finally:
        with server.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        server.dispose()


@pytest.fixture
def bus() -> RecordingBus:
    return RecordingBus()


@pytest.fixture
def es(bus: RecordingBus) -> Iterator[EntitySync]:
    app = Flask(__name__)
    es = EntitySync(app, bus=bus)
    for entity in ("tasks", "project_tasks", "es_projects", "other"):
        es.entity(entity)(lambda key, secret: None)
    es.watch(Project)
    es.watch(Task, keys=task_keys, entities=["tasks", "project_tasks"])
    yield es
    for model in (Project, Task):
        es.unwatch(model)


@pytest.fixture
def session(es: EntitySync, engine: Engine, bus: RecordingBus) -> Iterator[Session]:
    with Session(engine) as s:
        s.add_all([Project(id=1, name="one"), Project(id=2, name="two"), Project(id=3, name="three")])
        s.add_all([Task(id=n, project_id=1 if n <= 3 else 2, title=f"task {n}") for n in range(1, 6)])
        s.commit()
        bus.take()
        yield s


def test_a_task_moved_between_lists_notifies_the_list_it_left_and_the_one_it_joined(
    session: Session, bus: RecordingBus
) -> None:
    task = session.get(Task, 1)
    assert task is not None
    task.project_id = 2
    session.flush()
    assert bus.take() == []  # flushed, not committed
    session.commit()
    assert bus.take() == ["project_tasks/1", "project_tasks/2", "tasks/1"]
    # Moved through the relationship: the foreign key is set during the flush.
    task.project = session.get(Project, 3)  # type: ignore[assignment]
    session.commit()
    assert bus.take() == ["project_tasks/2", "project_tasks/3", "tasks/1"]
    task.title = "renamed"  # a change the keys do not depend on: the same keys, once each
    session.commit()
    assert bus.take() == ["project_tasks/3", "tasks/1"]


def test_inserts_and_deletes_notify_every_key_of_the_row(session: Session, bus: RecordingBus) -> None:
    session.add(Task(id=9, project_id=3, title="new"))
    session.commit()
    assert bus.take() == ["project_tasks/3", "tasks/9"]
    task = session.get(Task, 9)
    task.project_id = 1  # type: ignore[union-attr]
    session.delete(task)
    session.commit()
    assert bus.take() == ["project_tasks/1", "project_tasks/3", "tasks/9"]  # the list it was in, too


def test_a_bulk_update_notifies_exactly_the_rows_it_changed_where_keys_are_primary_keys(
    session: Session, bus: RecordingBus
) -> None:
    result = session.execute(update(Project).where(Project.id >= 2).values(name="renamed"))
    assert result.rowcount == 2  # type: ignore[attr-defined]
    assert bus.take() == []
    session.commit()
    assert bus.take() == ["es_projects/2", "es_projects/3"]
    assert session.scalars(select(Project.name).order_by(Project.id)).all() == ["one", "renamed", "renamed"]


def test_a_bulk_update_of_a_model_watched_with_keys_refreshes_its_entities(
    session: Session, bus: RecordingBus
) -> None:
    # "Mark all done", and a bulk move from one list to another.
    session.execute(update(Task).where(Task.project_id == 1).values(done=True))
    session.execute(update(Task).where(Task.project_id == 2).values(project_id=3))
    session.commit()
    assert bus.take() == ["project_tasks/*", "tasks/*"]  # once each, however many statements
    assert session.scalars(select(Task.id).where(Task.done)).all() == [1, 2, 3]
    assert session.scalars(select(Task.id).where(Task.project_id == 3)).all() == [4, 5]


def test_a_bulk_delete_notifies_the_deleted_rows(session: Session, bus: RecordingBus) -> None:
    session.execute(delete(Task).where(Task.project_id == 2))
    session.execute(delete(Project).where(Project.id == 2))
    session.commit()
    assert bus.take() == ["es_projects/2", "project_tasks/*", "tasks/*"]
    assert session.get(Project, 2) is None


def test_a_bulk_statement_that_matches_nothing_notifies_nothing(session: Session, bus: RecordingBus) -> None:
    session.execute(update(Project).where(Project.id == 99).values(name="x"))
    session.execute(delete(Task).where(Task.id == 99))
    session.commit()
    assert bus.take() == []


def test_a_rolled_back_bulk_statement_notifies_nothing(session: Session, bus: RecordingBus) -> None:
    session.execute(update(Task).values(done=True))
    session.execute(delete(Project).where(Project.id == 3))
    task = session.get(Task, 1)
    task.project_id = 2  # type: ignore[union-attr]
    session.flush()
    session.rollback()
    assert bus.take() == []
    session.add(Task(id=10, project_id=1, title="after"))
    session.commit()
    assert bus.take() == ["project_tasks/1", "tasks/10"]  # nothing of the rolled-back transaction


def test_savepoints_drop_or_keep_bulk_statements_and_moves(session: Session, bus: RecordingBus) -> None:
    with session.begin_nested() as savepoint:
        session.execute(update(Project).where(Project.id == 1).values(name="dropped"))
        session.get(Task, 4).project_id = 3  # type: ignore[union-attr]
        session.flush()
        savepoint.rollback()
    with session.begin_nested():
        session.execute(update(Project).where(Project.id == 2).values(name="kept"))
        session.get(Task, 1).project_id = 3  # type: ignore[union-attr]
    assert bus.take() == []  # releasing a savepoint commits nothing yet
    session.commit()
    assert bus.take() == ["es_projects/2", "project_tasks/1", "project_tasks/3", "tasks/1"]
    assert session.get(Project, 1).name == "one"  # type: ignore[union-attr]


def test_a_keys_function_that_returns_no_keys_is_logged_naming_the_model_and_the_commit_goes_on(
    es: EntitySync, session: Session, bus: RecordingBus, caplog: pytest.LogCaptureFixture
) -> None:
    es.watch(Task, keys=lambda task: "tasks/1")
    es.watch(Task, keys=lambda task: [("tasks", task.id), {"entity": "x"}])
    es.watch(Task, keys=lambda task: [("no such entity!", 1)])
    task = session.get(Task, 2)
    task.title = "changed"  # type: ignore[union-attr]
    with caplog.at_level(logging.ERROR, logger="entitysync_sync"):
        session.commit()  # nothing raises: the row is committed
    assert session.scalars(select(Task.title).where(Task.id == 2)).one() == "changed"
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 3
    for record in errors:
        assert "es.watch(Task)" in record.getMessage()
        assert record.exc_info is not None and record.exc_info[0] is ConfigError
    assert "list of keys" in errors[0].getMessage() and "'entity'" in errors[1].getMessage()
    assert bus.take() == ["project_tasks/1", "tasks/2"]  # the good watch still notified


def test_a_watch_that_cannot_name_its_entities_refreshes_every_entity_after_a_bulk_statement(
    es: EntitySync, session: Session, bus: RecordingBus, caplog: pytest.LogCaptureFixture
) -> None:
    es.unwatch(Task)
    es.watch(Task, keys=task_keys)
    with caplog.at_level(logging.WARNING, logger="entitysync_sync"):
        session.execute(update(Task).values(done=True))
        session.commit()
    assert bus.take() == ["es_projects/*", "other/*", "project_tasks/*", "tasks/*"]
    assert any("Pass entities=[...]" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


def test_a_bulk_statement_that_does_not_fetch_refreshes_the_entity(session: Session, bus: RecordingBus) -> None:
    session.execute(update(Project).where(Project.id == 1).values(name="x")
                    .execution_options(synchronize_session=False))
    session.commit()
    assert bus.take() == ["es_projects/*"]


def test_watch_refuses_what_cannot_work(es: EntitySync) -> None:
    with pytest.raises(ConfigError, match="not both"):
        es.watch(Task, entity="tasks", keys=task_keys)
    with pytest.raises(ConfigError, match="callable"):
        es.watch(Task, keys=["tasks"])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="list of entity names"):
        es.watch(Task, keys=task_keys, entities="tasks")


