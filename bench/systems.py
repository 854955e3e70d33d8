"""The servers under test: which app each runs, how a client talks to it, which entity it uses.

A :class:`System` names one configuration of one of the three apps in
:mod:`bench.apps`; the scenarios pick from the constants below, so every
scenario compares the same three servers the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: For each app: its gunicorn app spec, its websocket path and the client dialect it speaks.
APPS: dict[str, tuple[str, str, str]] = {
    "entitysync": ("bench.apps:entitysync_app()", "/ws/entity-sync/", "ws"),
    "socketio": ("bench.apps:socketio_app()", "/socket.io/?EIO=4&transport=websocket", "socketio"),
    "raw": ("bench.apps:raw_app()", "/ws", "ws"),
}


@dataclass(frozen=True)
class System:
    """A server under test: one of :data:`APPS`, the entity its scenarios use, its environment."""

    name: str
    kind: str
    entity: str
    env: dict[str, str] = field(default_factory=dict)

    @property
    def app(self) -> str:
        """The gunicorn app spec (``module:factory()``)."""
        return APPS[self.kind][0]

    @property
    def path(self) -> str:
        """The websocket path clients connect to."""
        return APPS[self.kind][1]

    @property
    def dialect(self) -> str:
        """What the client speaks: ``ws`` (entitysync_sync's frames) or ``socketio``."""
        return APPS[self.kind][2]


ES_SHARED = System("entitysync shared", "entitysync", "shared")
ES_PER_USER = System("entitysync per-user", "entitysync", "items")
SOCKETIO = System("flask-socketio", "socketio", "shared")
SOCKETIO_PER_USER = System("flask-socketio per-sid", "socketio", "items")
RAW = System("raw sendall loop", "raw", "shared")
RAW_PER_USER = System("raw per-socket", "raw", "items")
ES_BATCH = System("entitysync batch", "entitysync", "batchitems")

ES_COMPRESSION_OFF = System("entitysync compression=off", "entitysync", "items")
ES_COMPRESSION_ON = System("entitysync compression=on", "entitysync", "items",
                           {"FLASK_ENTITYSYNC_COMPRESSION": "true"})
#: The raw app's shared entity: one text to every socket, compressed per socket where deflate was negotiated.
RAW_DEFLATE = System("flask-sock peer", "raw", "shared")
