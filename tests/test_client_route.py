"""The browser client served by the extension, checked in-process with Flask's test client."""

from __future__ import annotations

import gzip
import re
from pathlib import Path

from flask import Flask

from entitysync_sync import EntitySync

STATIC = Path(__file__).resolve().parent.parent / "entitysync_sync" / "static" / "entitysync.js"
TYPES = STATIC.with_name("entitysync.d.ts")


def make_app(**config: object) -> Flask:
    app = Flask(__name__)
    app.config.update(config)
    EntitySync(app)
    return app


def test_client_js_is_served_at_the_websocket_path_as_javascript() -> None:
    resp = make_app().test_client().get("/ws/entity-sync/client.js")
    assert resp.status_code == 200
    assert resp.mimetype == "text/javascript"
    assert resp.get_data() == STATIC.read_bytes()
    assert "var EntitySync = class EntitySync" in resp.get_data(as_text=True)
    assert resp.cache_control.no_cache
    assert resp.headers["ETag"]


def test_client_js_answers_a_conditional_request_with_304() -> None:
    client = make_app().test_client()
    etag = client.get("/ws/entity-sync/client.js").headers["ETag"]
    again = client.get("/ws/entity-sync/client.js", headers={"If-None-Match": etag})
    assert again.status_code == 304
    assert again.get_data() == b""


def test_client_module_exports_the_same_class() -> None:
    client = make_app().test_client()
    script = client.get("/ws/entity-sync/client.js").get_data(as_text=True)
    module = client.get("/ws/entity-sync/client.mjs")
    assert module.mimetype == "text/javascript"
    text = module.get_data(as_text=True)
    assert text.startswith(script)
    assert "export default EntitySync;" in text and "export { EntitySync };" in text
    assert module.headers["ETag"] != client.get("/ws/entity-sync/client.js").headers["ETag"]


def test_typescript_declarations_are_served_beside_the_client() -> None:
    client = make_app().test_client()
    resp = client.get("/ws/entity-sync/client.d.ts")
    assert resp.status_code == 200
    assert resp.headers["Content-Type"] == "application/typescript; charset=utf-8"
    assert resp.get_data() == TYPES.read_bytes()
    assert "export { EntitySyncClient as EntitySync };" in resp.get_data(as_text=True)
    again = client.get("/ws/entity-sync/client.d.ts", headers={"If-None-Match": resp.headers["ETag"]})
    assert again.status_code == 304


def test_the_declarations_name_every_public_method_of_the_client() -> None:
    script, types = STATIC.read_text(), TYPES.read_text()
    methods = {m for m in re.findall(r"^  (?:static )?([a-z]\w*)\(", script, re.M) if not m.startswith("_")}
    assert methods == {"constructor", "subscribe", "setSecret", "on", "close"}
    for method in methods:
        assert re.search(rf"^  {method}(<[^>]*>)?\(", types, re.M), method


def test_client_js_follows_entitysync_path() -> None:
    client = make_app(ENTITYSYNC_PATH="/live/").test_client()
    assert client.get("/live/client.js").status_code == 200
    assert client.get("/live/client.d.ts").status_code == 200
    assert client.get("/ws/entity-sync/client.js").status_code == 404


def test_client_js_stays_small() -> None:
    assert len(gzip.compress(STATIC.read_bytes(), 9)) < 4096
