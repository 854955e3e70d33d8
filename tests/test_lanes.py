"""The lanes' queue, shared by the fan-out and the cohorts: coalescing, fairness and its figures.

These drive :class:`~entitysync_sync.fanout.Fanout` and
:class:`~entitysync_sync.cohorts.Cohorts` in-process, on one
:class:`~entitysync_sync.lanes.Lanes`, with a task runner that starts the
lanes only when the test says so: the one thing replaced here is *when*
lanes run, so that a notification can be made to arrive exactly while a
refresh waits in the queue, or exactly while its fetch runs. The real
servers' tests (``test_shared.py``, ``test_cohorts.py``) cover the same
paths under gunicorn and ``flask run``.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import pytest

from entitysync_sync.cohorts import Cohorts
from entitysync_sync.fanout import Fanout
from entitysync_sync.frames import SharedFrames
from entitysync_sync.hub import Hub
from entitysync_sync.keys import EntityKey
from entitysync_sync.lanes import Lanes


class StepTasks:
    """Runs spawned tasks only when :meth:`run` is called, in the order they were spawned."""

    def __init__(self) -> None:
        self.pending: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []

    def spawn(self, fn: Callable[..., Any], *args: Any) -> None:
        self.pending.append((fn, args))

    def spawn_later(self, seconds: float, fn: Callable[..., Any], *args: Any) -> None:
        raise AssertionError("no retries here")

    def run(self) -> int:
        """Run every task spawned so far, and those they spawn; return how many ran."""
        ran = 0
        while self.pending:
            fn, args = self.pending.pop(0)
            fn(*args)
            ran += 1
        return ran


class Database:
    """Rows by key, the fetches made, and a hook run inside each fetch."""

    def __init__(self) -> None:
        self.rows: dict[EntityKey, int] = {}
        self.fetches: list[tuple[EntityKey, Any]] = []
        self.during_fetch: Callable[[EntityKey], None] | None = None

    def fetch(self, key: EntityKey, secret: Any) -> str:
        self.fetches.append((key, secret))
        if self.during_fetch is not None:
            hook, self.during_fetch = self.during_fetch, None
            hook(key)
        return json.dumps({"id": key.id, "value": self.rows.get(key, 0), "for": secret})


class Run:
    """A :class:`~entitysync_sync.lanes.FetchRun` over :class:`Database`."""

    def __init__(self, db: Database, runs: list[Run]) -> None:
        self.db = db
        self.closed = False
        self.made = 0
        runs.append(self)

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.closed = True

    def fetch(self, key: EntityKey, secret: Any) -> str:
        self.made += 1
        return self.db.fetch(key, None if key.entity == "shared" else secret)

    def fetch_batch(self, key: EntityKey, secrets: list[Any]) -> list[Any]:
        return [self.db.fetch(key, secret) for secret in secrets]


class Handlers:
    def __init__(self, db: Database) -> None:
        self.db = db
        self.runs: list[Run] = []

    def is_shared(self, entity: str) -> bool:
        return entity == "shared"

    def is_batch(self, entity: str) -> bool:
        return False

    def run(self) -> Run:
        return Run(self.db, self.runs)


class Subscriber:
    """A local client: records the rows pushed to it."""

    def __init__(self, secret: str) -> None:
        self.secret = secret
        self.rows: list[dict[str, Any]] = []

    def push_shared(self, shared: SharedFrames, generation: int | None = None) -> None:
        assert shared.error is None
        self.rows.append(json.loads(shared.frames[0].text)["body"])

    def push_cohort(self, shared: SharedFrames, generation: int) -> None:
        self.push_shared(shared)

    def cohort_member(self) -> tuple[Any, int]:
        return self.secret, 0

    def cohort_failed(self, key: EntityKey, exc: Exception, generation: int) -> None:
        raise AssertionError(f"fetch of {key} failed: {exc!r}")


class World:
    def __init__(self) -> None:
        self.db = Database()
        self.handlers = Handlers(self.db)
        self.tasks = StepTasks()
        self.lanes = Lanes(self.tasks, self.handlers.run)  # type: ignore[arg-type]
        self.fanout = Fanout(self.handlers, self.tasks, lanes=self.lanes)  # type: ignore[arg-type]
        self.cohorts = Cohorts(self.handlers, self.tasks, lanes=self.lanes)  # type: ignore[arg-type]
        self.hub = Hub(self.tasks, self.fanout, self.cohorts)  # type: ignore[arg-type]

    def subscriber(self, key: EntityKey, secret: str = "ann") -> Subscriber:
        conn = Subscriber(secret)
        self.hub.add(conn)  # type: ignore[arg-type]
        self.hub.subscribe(conn, key)  # type: ignore[arg-type]
        return conn

    def change(self, key: EntityKey, value: int) -> None:
        self.db.rows[key] = value
        self.hub.deliver([key])


@pytest.fixture
def world() -> World:
    return World()


SHARED = EntityKey("shared", "1")
MINE = EntityKey("items", "1")


def test_notifications_that_arrive_while_a_shared_refresh_waits_are_covered_by_it(world: World) -> None:
    conn = world.subscriber(SHARED)
    for value in range(1, 6):
        world.change(SHARED, value)
    assert world.fanout.stats()["shared_refreshing"] == 1
    world.tasks.run()
    assert world.db.fetches == [(SHARED, None)]  # one fetch, made after the last change
    assert [row["value"] for row in conn.rows] == [5]
    assert world.fanout.stats()["shared_refreshing"] == 0


def test_notifications_that_arrive_during_a_shared_fetch_queue_exactly_one_more(world: World) -> None:
    conn = world.subscriber(SHARED)
    world.change(SHARED, 1)

    def meanwhile(key: EntityKey) -> None:  # the fetch has read the database: these it may miss
        world.change(SHARED, 2)
        world.change(SHARED, 3)

    world.db.during_fetch = meanwhile
    world.tasks.run()
    assert world.db.fetches == [(SHARED, None), (SHARED, None)]
    assert conn.rows[-1]["value"] == 3  # the last push reflects the last change


def test_a_change_while_a_new_subscriber_waits_reaches_every_subscriber(world: World) -> None:
    """A refresh queued for a new subscriber alone becomes a refresh for everyone when the key changes."""
    old = world.subscriber(SHARED)
    new = Subscriber("bob")
    world.hub.add(new)  # type: ignore[arg-type]
    world.hub.subscribe(new, SHARED)  # type: ignore[arg-type]
    world.fanout.subscribe(SHARED, new, world.hub)  # type: ignore[arg-type]
    world.change(SHARED, 7)
    world.tasks.run()
    assert len(world.db.fetches) == 1
    assert old.rows == new.rows == [{"id": "1", "value": 7, "for": None}]


def test_shared_and_per_user_refreshes_wait_in_one_queue_in_order_and_share_a_run(world: World) -> None:
    keys = [EntityKey("shared", str(n)) for n in range(3)]
    conns = [world.subscriber(key) for key in keys]
    mine = [world.subscriber(MINE, secret) for secret in ("ann", "bob")]
    world.change(keys[0], 1)
    world.change(MINE, 1)
    world.change(keys[1], 1)
    world.change(keys[2], 1)
    assert world.fanout.stats()["shared_refreshing"] == 3
    assert world.cohorts.stats()["cohort_queue"] == 2  # one fetch per distinct secret; shared ones not counted
    world.tasks.run()
    fetches = world.db.fetches  # in the order changed; the groups of one key in no set order
    assert fetches[0] == (keys[0], None) and fetches[3:] == [(keys[1], None), (keys[2], None)]
    assert sorted(fetches[1:3]) == [(MINE, "ann"), (MINE, "bob")]
    # One lane made every fetch through one run (its spare, queued while work was left, found none).
    assert [run.made for run in world.handlers.runs] == [5, 0]
    assert all(run.closed for run in world.handlers.runs)
    assert [conn.rows for conn in conns] == [[{"id": str(n), "value": 1, "for": None}] for n in range(3)]
    assert [[row["for"] for row in conn.rows] for conn in mine] == [["ann"], ["bob"]]
    assert world.cohorts.stats()["cohort_queue"] == 0 and world.fanout.stats()["shared_refreshing"] == 0


def test_a_lane_killed_during_a_fetch_ends_that_refresh_and_the_key_refreshes_again_later(world: World) -> None:
    conn = world.subscriber(SHARED)
    world.change(SHARED, 1)

    def killed(key: EntityKey) -> None:
        raise KeyboardInterrupt  # what the task sees when the server stops it (GreenletExit, say)

    world.db.during_fetch = killed
    with pytest.raises(KeyboardInterrupt):
        world.tasks.run()
    assert world.fanout.stats()["shared_refreshing"] == 0
    world.tasks.pending.clear()  # the spare lane the killed one queued: the server is stopping
    world.change(SHARED, 2)
    world.tasks.run()
    assert conn.rows == [{"id": "1", "value": 2, "for": None}]
