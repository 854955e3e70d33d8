"""The browser client served by the extension, checked in-process with Flask's test client."""

from __future__ import annotations

import gzip
from pathlib import Path

from flask import Flask

from entitysync_sync import EntitySync

STATIC = Path(__file__).resolve().parent.parent / "entitysync_sync" / "static" / "entitysync.js"


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


def test_client_js_follows_entitysync_path() -> None:
    client = make_app(ENTITYSYNC_PATH="/live/").test_client()
    assert client.get("/live/client.js").status_code == 200
    assert client.get("/ws/entity-sync/client.js").status_code == 404


def test_client_js_stays_small() -> None:
    assert len(gzip.compress(STATIC.read_bytes(), 9)) < 4096
