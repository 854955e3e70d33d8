"""Where a fetch runs and how its rows are encoded, in-process."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from flask import Flask, g
from flask.json.provider import DefaultJSONProvider, JSONProvider

from entitysync_sync import EntityKey
from entitysync_sync import protocol as p
from entitysync_sync.metrics import Metrics
from entitysync_sync.registry import AppHandlers, Registry

ROW = {"name": "apples", "tags": ["red", "green"], "stock": {"crates": 3}}


def handlers(app: Flask) -> AppHandlers:
    registry = Registry()
    registry.add_entity("items", lambda key, secret: ROW)
    return AppHandlers(registry, app, fetch_timeout=0, metrics=Metrics())


def test_rows_are_compact_json_like_the_frame_around_them() -> None:
    row = handlers(Flask(__name__)).fetch(EntityKey("items", 1), None)
    assert row == '{"name":"apples","stock":{"crates":3},"tags":["red","green"]}'
    frame = p.encode_push(EntityKey("items", 1), row)
    assert frame == json.dumps(json.loads(frame), separators=(",", ":"), sort_keys=False)


def test_rows_of_a_set_are_compact_json_like_the_frame_around_them() -> None:
    registry = Registry()
    registry.add_entity("lists", lambda key, secret: [ROW, ROW])
    rows = AppHandlers(registry, Flask(__name__), fetch_timeout=0, metrics=Metrics()).fetch(
        EntityKey("lists", 1), None)
    compact = '{"name":"apples","stock":{"crates":3},"tags":["red","green"]}'
    assert rows == [compact, compact]
    frame = p.encode_push_rows(EntityKey("lists", 1), rows)
    assert frame == json.dumps(json.loads(frame), separators=(",", ":"), sort_keys=False)


def test_a_subclass_of_the_default_provider_keeps_its_settings_and_is_compact() -> None:
    class Unsorted(DefaultJSONProvider):
        sort_keys = False
        ensure_ascii = False

    app = Flask(__name__)
    app.json = Unsorted(app)
    row = {"z": "é", "a": 1}
    registry = Registry()
    registry.add_entity("items", lambda key, secret: row)
    rows = AppHandlers(registry, app, 0, Metrics()).fetch(EntityKey("items", 1), None)
    assert rows == '{"z":"é","a":1}'


def test_another_provider_is_called_as_it_is() -> None:
    class Spaced(JSONProvider):
        def dumps(self, obj: Any, **kwargs: Any) -> str:
            assert not kwargs  # a provider that takes no json.dumps arguments
            return json.dumps(obj, indent=1)

        def loads(self, s: str | bytes, **kwargs: Any) -> Any:
            return json.loads(s)

    app = Flask(__name__)
    app.json = Spaced(app)
    assert handlers(app).fetch(EntityKey("items", 1), None) == json.dumps(ROW, indent=1)


def test_fetches_of_one_run_each_see_a_fresh_g_and_a_teardown_between_them() -> None:
    """The fetches of one refresh share an application context, yet none sees another's."""
    app = Flask(__name__)
    torn_down: list[str] = []
    seen: list[Any] = []

    @app.teardown_appcontext
    def teardown(exc: BaseException | None) -> None:
        torn_down.append(g.get("user", "-"))

    def fetch(key: EntityKey, secret: Any) -> Any:
        seen.append(g.get("user"))
        g.user = secret  # as an app caching the current user on g would
        return {"for": secret}

    registry = Registry()
    registry.add_entity("mine", fetch)
    metrics = Metrics()
    with AppHandlers(registry, app, 0, metrics).run() as run:
        rows = [run.fetch(EntityKey("mine", 1), secret) for secret in ("ann", "bob", "cy")]
    assert rows == ['{"for":"ann"}', '{"for":"bob"}', '{"for":"cy"}']
    assert seen == [None, None, None]
    assert torn_down == ["ann", "bob", "cy"]  # after each fetch, each with its own g
    assert metrics.snapshot()["fetches"] == 3 and metrics.snapshot()["pushes"] == 3


DEADLINES = """
from gevent import monkey; monkey.patch_all()
import time
from entitysync_sync.concurrency import Deadlines
from entitysync_sync.exceptions import FetchTimeoutError

deadlines = Deadlines(0.3, lambda: FetchTimeoutError("late"))
for _ in range(6):  # 0.6 s in all, each call within its 0.3 s
    deadlines.call(time.sleep, 0.1)
started = time.monotonic()
try:
    deadlines.call(time.sleep, 30)  # a query that never answers
except FetchTimeoutError:
    print("interrupted after", time.monotonic() - started)
try:
    deadlines.call(int, "x")  # the call's own error passes through
except ValueError:
    print("own error")
deadlines.call(time.sleep, 0.2)  # the timer works again after
deadlines.close()
print("done")
"""


def test_one_timer_limits_each_of_many_calls_under_gevent() -> None:
    """Under gevent, Deadlines limits each call, not their sum, and interrupts one that hangs.
    (A process of its own: the tests do not run under gevent's monkey patching.)"""
    done = subprocess.run([sys.executable, "-c", DEADLINES], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("interrupted after")
    assert 0.3 <= float(lines[0].split()[-1]) < 5
    assert lines[1:] == ["own error", "done"]
