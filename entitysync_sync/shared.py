"""Shared fetches: one fetch per notification per server, one encoded frame for every subscriber.

An entity registered with ``@es.entity(name, shared=True)`` declares that its
rows do not depend on the subscriber's secret. When one of its keys is
delivered, the hub hands it to :class:`Fanout` instead of asking each
subscriber to refresh: the fanout fetches once (with ``secret=None``), builds
the server frames once, encodes each as a websocket frame once, and gives the
same :class:`SharedFrames` to every local subscriber. Each connection writes
those bytes through its own serialised writer, so a slow subscriber still
delays only itself.

Coalescing works per key as it does per connection: notifications that
arrive while a key's fetch is pending or running queue exactly one more, so
the last frames every subscriber gets reflect state read after the last
notification.
"""

from __future__ import annotations

import logging
import struct
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from . import _runtime
from . import protocol as p
from .exceptions import FetchTimeoutError
from .keys import EntityKey

if TYPE_CHECKING:
    from .hub import Hub

log = logging.getLogger("entitysync_sync")

_TEXT = 0x81  # FIN + opcode 1: one whole text frame


def encode_text_frame(text: str) -> bytes:
    """``text`` as one unmasked websocket text frame (RFC 6455), as a server sends it."""
    payload = text.encode()
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", _TEXT, n)
    elif n < 1 << 16:
        header = struct.pack("!BBH", _TEXT, 126, n)
    else:
        header = struct.pack("!BBQ", _TEXT, 127, n)
    return header + payload


class EncodedFrame:
    """One server frame as text and as the websocket frame bytes that carry it.

    ``len()`` is the text's length, so it counts against a connection's
    outbox limit exactly as the text would. A connection that negotiated
    permessage-deflate writes ``text`` through its compressor instead.
    """

    __slots__ = ("text", "wire")

    def __init__(self, text: str, wire: bytes) -> None:
        self.text = text
        self.wire = wire

    @classmethod
    def of(cls, text: str) -> EncodedFrame:
        return cls(text, encode_text_frame(text))

    def __len__(self) -> int:
        return len(self.text)


#: An empty frame queued to finish a frame whose first bytes were written without waiting.
FLUSH = EncodedFrame("", b"")


@dataclass(frozen=True)
class SharedFrames:
    """The frames of one shared fetch of ``key``, identical for every subscriber."""

    key: EntityKey
    frames: tuple[EncodedFrame, ...]
    size: int
    #: Why the fetch failed, if it did; the frames then hold a fetch_failed error.
    error: Exception | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None


class SharedHandlers(Protocol):
    """What the fanout needs from the application (implemented by the extension)."""

    def is_shared(self, entity: str) -> bool:
        """Whether ``entity`` was registered with ``shared=True``."""

    def fetch(self, key: EntityKey, secret: object) -> list[str] | None:
        """The rows of ``key`` as JSON texts, or ``None`` when it does not exist."""


class Fanout:
    """Runs shared fetches, one at a time per key, and hands their frames to the subscribers."""

    def __init__(self, handlers: SharedHandlers, envelope: bool = True, retry_max: float = 0.0) -> None:
        self._handlers = handlers
        self._envelope = envelope
        self._retry_max = retry_max
        #: Keys whose last fetch failed → failures in a row.
        self._failures: dict[EntityKey, int] = {}
        self._lock = threading.Lock()
        #: Keys being fetched → whether another notification arrived meanwhile.
        self._running: dict[EntityKey, bool] = {}

    def handles(self, key: EntityKey) -> bool:
        """Whether ``key`` belongs to a shared entity."""
        return self._handlers.is_shared(key.entity)

    def request(self, key: EntityKey, hub: Hub) -> None:
        """Fetch ``key`` once and push it to its subscribers in ``hub``; only queues work."""
        with self._lock:
            if key in self._running:
                self._running[key] = True
                return
            self._running[key] = False
        _runtime.spawn(self._run, key, hub, name="entitysync-fanout")

    @property
    def running(self) -> int:
        """Keys with a shared fetch running or about to run."""
        return len(self._running)

    def _run(self, key: EntityKey, hub: Hub) -> None:
        try:
            while True:
                shared = self.build(key)
                if self._after_fetch(key, hub, shared.error):
                    # Subscribers are read after the fetch, so one that subscribed meanwhile gets it too.
                    for conn in hub.subscribers(key):
                        conn.push_shared(shared)
                with self._lock:
                    if not self._running[key]:
                        del self._running[key]
                        return
                    self._running[key] = False
        except BaseException:
            with self._lock:
                self._running.pop(key, None)
            raise

    def _after_fetch(self, key: EntityKey, hub: Hub, error: Exception | None) -> bool:
        """Track failures and schedule a retry with backoff; whether to push the frames.

        Subscribers hear of the first failure of a run only; the retries go on
        until a fetch succeeds or nobody subscribes, so clients converge once
        the database is back.
        """
        with self._lock:
            if error is None:
                self._failures.pop(key, None)
                return True
            attempt = self._failures[key] = self._failures.get(key, 0) + 1
        if attempt > 1:
            log.debug("shared fetch of %s failed again (attempt %d): %r", key, attempt, error)
        elif isinstance(error, FetchTimeoutError):
            log.warning("fetch of %s %s", key, error)
        else:
            log.error("fetch of %s failed", key, exc_info=error)
        if self._retry_max:
            _runtime.spawn_later(min(self._retry_max, 0.5 * 2 ** (attempt - 1)), self._retry, key, hub)
        return attempt == 1

    def _retry(self, key: EntityKey, hub: Hub) -> None:
        with self._lock:
            failing = key in self._failures
        if failing and hub.subscribers(key):
            self.request(key, hub)
        elif failing:
            with self._lock:
                self._failures.pop(key, None)

    def build(self, key: EntityKey) -> SharedFrames:
        """Fetch ``key`` with ``secret=None`` and encode its frames, once."""
        try:
            rows = self._handlers.fetch(key, None)
        except Exception as exc:
            what = "timed out" if isinstance(exc, FetchTimeoutError) else "failed"
            texts = [p.encode_error(p.FETCH_FAILED, f"fetching {key} {what}", None, key)] if self._envelope else []
            return SharedFrames(key, tuple(EncodedFrame.of(t) for t in texts), sum(map(len, texts)), exc)
        else:
            if not self._envelope:
                texts = rows or []
            elif rows is None:
                texts = [p.encode_gone(key)]
            else:
                texts = [p.encode_push(key, row) for row in rows]
        frames = tuple(EncodedFrame.of(text) for text in texts)
        return SharedFrames(key, frames, sum(map(len, texts)))
