"""A bus sink that records what a bus delivers, for tests of the buses themselves."""

from __future__ import annotations

import threading
from typing import Any

from entitysync_sync import EntityKey


class RecordingSink:
    """Records delivered keys and resync requests, from any thread."""

    def __init__(self) -> None:
        self.keys: list[EntityKey] = []
        self.resyncs: list[str | None] = []
        self.lock = threading.Lock()

    def deliver(self, keys: Any) -> None:
        with self.lock:
            self.keys.extend(keys)

    def resync(self, entity: str | None = None) -> None:
        with self.lock:
            self.resyncs.append(entity)
