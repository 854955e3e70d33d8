"""The three server apps the benchmarks run under ``gunicorn -k gevent -w 1``.

The same small app three ways: a ~150-byte row per key, whose ``value``
each notify bumps, and the same HTTP control endpoints:

* ``POST /notify/<entity>/<id>?n=1``: bump the row and notify its key, ``n`` times
  (``n`` > 1 is a burst);
* ``POST /notify-range/<entity>?start=0&count=1000``: bump and notify keys
  ``t<start>`` .. ``t<start+count-1>`` in one call;
* ``GET /fetches/<entity>/<id>``: how many fetches the server has run for a key;
* ``GET /bus-stats``: the bus's counters, with ``fetches`` (fetch calls so far) and
  ``refreshing`` (shared keys whose refresh is queued or fetching) (entitysync_sync only).

Two entities: ``shared`` (the same rows for everyone) and ``items`` (rows
fetched for each subscriber with its secret, the ``user`` query parameter;
here a trivial fetch that only echoes the secret's length).

* ``entitysync_app()``: entitysync_sync, ``@es.entity("shared", shared=True)``,
  ``@es.entity("items")`` and ``@es.entity("batchitems", batch=True)`` (the
  per-user rows, fetched with one call for many secrets); configured from ``FLASK_*`` variables (the bus
  URL, ``FLASK_ENTITYSYNC_COMPRESSION``).
* ``socketio_app()``: Flask-SocketIO 5, ``async_mode="gevent"`` (its websocket
  runs on simple-websocket). A client emits ``subscribe`` with the key; the
  server joins it to a room per key and emits the current row. ``shared``
  notifies are one room emit; ``items`` notifies run the fetch and emit once
  per sid in the room. ``BENCH_SOCKETIO_QUEUE=redis://...`` sets its
  ``message_queue`` so several servers share rooms.
* ``raw_app()``: the floor, a bare flask-sock route that records each
  subscriber's socket per key. A ``shared`` notify encodes the websocket
  frame once and ``sendall``s the same bytes to each socket in a loop; an
  ``items`` notify fetches, JSON-encodes and frames per socket, then
  ``sendall``s. A client that negotiated permessage-deflate (flask-sock
  accepts it whenever offered) cannot share a frame: it is sent the same
  text through simple-websocket, which compresses it for that socket.

Each gunicorn worker imports this module once; module state is per process.
"""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from typing import Any

from flask import Flask, request

from entitysync_sync import EntityKey, EntitySync
from entitysync_sync.frames import encode_text_frame

_values: Counter[str] = Counter()
_fetches: Counter[str] = Counter()


def row(id: str, secret: Any = None) -> dict[str, Any]:
    """The benchmark row: about 150 bytes of JSON, like a small database row."""
    out: dict[str, Any] = {"id": id, "name": "item " + id, "value": _values[id], "pad": "x" * 100}
    if secret is not None:
        out["for"] = len(str(secret))
    return out


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def _controls(app: Flask, notify: Any) -> None:
    """The HTTP endpoints every bench server has; ``notify(entity, ids)`` notifies keys."""

    @app.post("/notify/<entity>/<id>")
    def notify_one(entity: str, id: str) -> dict[str, Any]:
        n = int(request.args.get("n", "1"))
        for _ in range(n):
            _values[id] += 1
            notify(entity, [id])
        return {"last": _values[id]}

    @app.post("/notify-range/<entity>")
    def notify_range(entity: str) -> dict[str, Any]:
        start, count = int(request.args.get("start", "0")), int(request.args.get("count", "1000"))
        ids = [f"t{i}" for i in range(start, start + count)]
        for id in ids:
            _values[id] += 1
        notify(entity, ids)
        return {"notified": len(ids)}

    @app.get("/fetches/<entity>/<id>")
    def fetches(entity: str, id: str) -> dict[str, Any]:
        return {"count": _fetches[f"{entity}/{id}"]}


def entitysync_app() -> Flask:
    """entitysync_sync with a shared and a per-subscriber entity."""
    app = Flask(__name__)
    app.config.from_prefixed_env()
    es = EntitySync(app)

    @es.entity("shared", shared=True)
    def fetch_shared(key: EntityKey, secret: Any) -> dict[str, Any]:
        _fetches[str(key)] += 1
        return row(key.id)

    @es.entity("items")
    def fetch_item(key: EntityKey, secret: Any) -> dict[str, Any]:
        _fetches[str(key)] += 1
        return row(key.id, secret)

    @es.entity("batchitems", batch=True)
    def fetch_items(key: EntityKey, secrets: list[Any]) -> list[dict[str, Any]]:
        _fetches[str(key)] += 1  # one per call, however many secrets
        return [row(key.id, secret) for secret in secrets]

    @es.identify
    def identify() -> Any:
        return request.args.get("user")

    def notify(entity: str, ids: list[str]) -> None:
        es.notify_many([(entity, id) for id in ids])

    _controls(app, notify)

    @app.get("/bus-stats")
    def bus_stats() -> dict[str, Any]:
        es.runtime().ensure_started()
        stats = es.stats()
        # The bus's counters, plus the work the notifications caused: fetches made so far, and
        # shared keys whose refresh is still queued or fetching.
        return {**es.bus().stats(), "fetches": stats["fetches"], "refreshing": stats["shared_refreshing"]}

    return app


def socketio_app() -> Flask:
    """Flask-SocketIO with a room per key."""
    from flask_socketio import SocketIO, emit, join_room

    app = Flask(__name__)
    queue = os.environ.get("BENCH_SOCKETIO_QUEUE") or None
    socketio = SocketIO(app, async_mode="gevent", message_queue=queue)
    secrets: dict[str, str | None] = {}

    @socketio.on("connect")
    def connect() -> None:
        secrets[request.sid] = request.args.get("user")  # type: ignore[attr-defined]

    @socketio.on("disconnect")
    def disconnect(*args: Any) -> None:
        secrets.pop(request.sid, None)  # type: ignore[attr-defined]

    @socketio.on("subscribe")
    def subscribe(body: dict[str, str]) -> None:
        entity, id = body["entity"], body["id"]
        join_room(f"{entity}/{id}")
        sid = request.sid  # type: ignore[attr-defined]
        _fetches[f"{entity}/{id}"] += 1
        emit("push", {"key": body, "body": row(id, secrets.get(sid) if entity == "items" else None)})

    def notify(entity: str, ids: list[str]) -> None:
        for id in ids:
            room = f"{entity}/{id}"
            key = {"entity": entity, "id": id}
            if entity == "shared":
                _fetches[room] += 1
                socketio.emit("push", {"key": key, "body": row(id)}, to=room)
                continue
            for sid, _eio_sid in list(socketio.server.manager.get_participants("/", room)):
                _fetches[room] += 1
                socketio.emit("push", {"key": key, "body": row(id, secrets.get(sid))}, to=sid)

    _controls(app, notify)
    return app


def raw_app() -> Flask:
    """The raw limit: one pre-encoded frame written with ``sendall`` to each socket (see the module)."""
    from flask_sock import Sock
    from simple_websocket import ConnectionClosed

    app = Flask(__name__)
    sock = Sock(app)
    #: key -> {websocket: (its user, whether it negotiated permessage-deflate)}
    subscribers: defaultdict[str, dict[Any, tuple[str | None, bool]]] = defaultdict(dict)

    @sock.route("/ws")  # type: ignore[untyped-decorator]  # flask-sock has no type hints
    def serve(ws: Any) -> None:
        user = request.args.get("user")
        deflate = "permessage-deflate" in request.headers.get("Sec-WebSocket-Extensions", "")
        keys = []
        try:
            while True:
                body = json.loads(ws.receive())["body"]
                entity, id = body["entity"], str(body["id"])
                keys.append(f"{entity}/{id}")
                subscribers[keys[-1]][ws] = (user, deflate)
                _fetches[keys[-1]] += 1
                ws.send(_dumps({"action": "push", "key": body, "body": row(id, user if entity == "items" else None)}))
        except ConnectionClosed:
            pass
        finally:
            for key in keys:
                subscribers[key].pop(ws, None)

    def send(ws: Any, deflate: bool, text: str, frame: bytes | None = None) -> None:
        try:
            if deflate:
                ws.send(text)
            else:
                ws.sock.sendall(frame or encode_text_frame(text))
        except (OSError, ConnectionClosed):
            pass  # a client that went away; its route forgets it

    def notify(entity: str, ids: list[str]) -> None:
        for id in ids:
            room = f"{entity}/{id}"
            key = {"entity": entity, "id": id}
            clients = list(subscribers.get(room, {}).items())
            if entity == "shared":
                _fetches[room] += 1
                text = _dumps({"action": "push", "key": key, "body": row(id)})
                frame = encode_text_frame(text)
                for ws, (_user, deflate) in clients:
                    send(ws, deflate, text, frame)
                continue
            for ws, (user, deflate) in clients:
                _fetches[room] += 1
                send(ws, deflate, _dumps({"action": "push", "key": key, "body": row(id, user)}))

    _controls(app, notify)
    return app
