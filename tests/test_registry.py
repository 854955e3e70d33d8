"""Where a fetch runs and how its rows are encoded, in-process."""

from __future__ import annotations

import json
from typing import Any

from flask import Flask
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
