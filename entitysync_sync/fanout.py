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

import threading
from typing import Protocol

from . import protocol as p
from .concurrency import Tasks
from .failures import FetchFailures, failure_message
from .frames import EncodedFrame, SharedFrames
from .hub import Hub
from .keys import EntityKey


class SharedHandlers(Protocol):
    """What the fanout needs from the application (implemented by the extension)."""

    def is_shared(self, entity: str) -> bool:
        """Whether ``entity`` was registered with ``shared=True``."""

    def fetch(self, key: EntityKey, secret: object) -> p.FetchResult:
        """The row or rows of ``key`` as JSON texts, or ``None`` when it does not exist."""


class Fanout:
    """Runs shared fetches, one at a time per key, and hands their frames to the subscribers."""

    def __init__(self, handlers: SharedHandlers, tasks: Tasks, envelope: bool = True,
                 retry_max: float = 0.0) -> None:
        self._handlers = handlers
        self._tasks = tasks
        self._envelope = envelope
        self._failures = FetchFailures(retry_max, tasks)
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
        self._tasks.spawn(self._run, key, hub)

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
        """Whether to push the frames: always after a success, after a failure only the first time.

        A failure is retried with backoff until a fetch succeeds or nobody
        subscribes, so clients converge once the database is back.
        """
        if error is None:
            self._failures.forget(key)
            return True
        return self._failures.failed(key, error, lambda key: self._retry(key, hub))

    def _retry(self, key: EntityKey, hub: Hub) -> None:
        if key not in self._failures:
            return
        if hub.subscribers(key):
            self.request(key, hub)
        else:
            self._failures.forget(key)

    def build(self, key: EntityKey) -> SharedFrames:
        """Fetch ``key`` with ``secret=None`` and encode its frames, once."""
        try:
            result = self._handlers.fetch(key, None)
        except Exception as exc:
            texts = p.encode_fetch_failed(key, failure_message(key, exc), self._envelope)
            error: Exception | None = exc
            version = None
        else:
            version = p.result_version(result) if self._envelope else None
            texts, error = p.encode_result(key, result, self._envelope, version), None
        frames = tuple(EncodedFrame.of(text) for text in texts)
        return SharedFrames(key, frames, sum(map(len, texts)), error, version)
