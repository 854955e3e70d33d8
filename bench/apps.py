"""The server apps :mod:`bench.compression` runs under ``gunicorn -k gevent``.

Both serve the same ~150-byte row, whose ``value`` a ``POST /notify/<id>``
bumps, so the benchmark compares the cost of the websocket layers and not of
the data:

* ``bench.apps:entitysync_app()``: entitysync_sync, configured from
  ``FLASK_*`` environment variables (``FLASK_ENTITYSYNC_COMPRESSION=true``
  turns permessage-deflate on);
* ``bench.apps:flasksock_app()``: the peer, a bare flask-sock route that
  answers every client frame with the row and writes the row to every
  connected client on notify. flask-sock (simple-websocket) accepts
  permessage-deflate whenever a client offers it.

Each gunicorn worker imports this module once, so the module-level state
below is per process, which is all a one-worker benchmark needs.
"""

from __future__ import annotations

from typing import Any

from flask import Flask, current_app
from flask_sock import Sock
from simple_websocket import ConnectionClosed

from entitysync_sync import EntityKey, EntitySync

#: What ``POST /notify/<id>`` bumps, so every notify sends a row that differs from the last.
_counter = 0

#: The peer's connected websockets (``simple_websocket.Server`` objects).
_peer_clients: set[Any] = set()


def _row(id: str) -> dict[str, Any]:
    """The benchmark row: about 150 bytes of JSON, like a small database row."""
    return {"id": id, "name": "item " + id, "value": _counter, "pad": "x" * 100}


def _bump() -> None:
    """Change the row, as a write to the database would before a notify."""
    global _counter
    _counter += 1


def entitysync_app() -> Flask:
    """entitysync_sync with one entity, ``items``, and ``POST /notify/<id>``.

    Clients subscribe with ``{"action":"subscribe","body":{"entity":"items","id":"1"}}``
    on ``/ws/entity-sync/`` and get a ``push`` frame at once and after each notify.
    """
    app = Flask(__name__)
    app.config.from_prefixed_env()
    es = EntitySync(app)

    @es.entity("items")
    def fetch_item(key: EntityKey, secret: Any) -> dict[str, Any]:
        return _row(key.id)

    @app.post("/notify/<id>")
    def notify(id: str) -> dict[str, Any]:
        _bump()
        es.notify("items", id)
        return {"notified": id}

    return app


def flasksock_app() -> Flask:
    """The peer: a bare flask-sock route on ``/ws`` and ``POST /notify/<id>``.

    The route answers every client frame with the row's JSON (like a
    subscribe that pushes at once); notify writes the row's JSON to every
    connected client from the request's own greenlet, as a hand-written
    flask-sock app would.
    """
    app = Flask(__name__)
    sock = Sock(app)

    @sock.route("/ws")  # type: ignore[untyped-decorator]  # flask-sock has no type hints
    def serve(ws: Any) -> None:
        _peer_clients.add(ws)
        try:
            while True:  # ends when the client closes: receive() raises ConnectionClosed
                ws.receive()
                ws.send(current_app.json.dumps(_row("1")))
        except ConnectionClosed:
            pass
        finally:
            _peer_clients.discard(ws)

    @app.post("/notify/<id>")
    def notify(id: str) -> dict[str, Any]:
        _bump()
        text = current_app.json.dumps(_row(id))
        sent = 0
        for ws in list(_peer_clients):
            try:
                ws.send(text)
            except Exception:  # a client that went away: drop it, keep notifying the others
                _peer_clients.discard(ws)
            else:
                sent += 1
        return {"notified": id, "sent": sent}

    return app
