"""The bounded, de-duplicating buffer of keys that every bus publishes from."""

from __future__ import annotations

import threading
from typing import Iterable

from ..keys import EntityKey


class KeyBuffer:
    """A bounded, de-duplicating, thread-safe buffer of keys.

    Keys are kept in arrival order and a key already waiting is not added
    twice: a notification only asks for a refresh, so duplicates carry no
    information. When ``capacity`` distinct keys are waiting, further keys
    are dropped and their entities remembered; whoever drains the buffer
    must then resync those entities instead of trusting what it holds.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("a KeyBuffer needs a capacity of at least 1")
        self.capacity = capacity
        self._keys: dict[EntityKey, None] = {}
        self._dropped_entities: set[str] = set()
        self._lock = threading.Lock()
        #: Keys dropped because the buffer was full, since it was made.
        self.dropped = 0

    def add(self, keys: Iterable[EntityKey]) -> None:
        """Append ``keys``, dropping (and counting) those that do not fit."""
        with self._lock:
            self._append(keys)

    def _append(self, keys: Iterable[EntityKey]) -> None:
        for key in keys:
            if key in self._keys:
                continue
            if len(self._keys) >= self.capacity:
                self._dropped_entities.add(key.entity)
                self.dropped += 1
                continue
            self._keys[key] = None

    def take(self) -> tuple[list[EntityKey], set[str]]:
        """Remove and return everything waiting, and the entities of keys dropped since."""
        with self._lock:
            keys = list(self._keys)
            dropped = self._dropped_entities
            self._keys = {}
            self._dropped_entities = set()
            return keys, dropped

    def put_back(self, keys: Iterable[EntityKey], dropped: Iterable[str] = ()) -> None:
        """Return what :meth:`take` gave, ahead of keys added since, after a failed send."""
        with self._lock:
            newer = self._keys
            self._keys = dict.fromkeys(keys)
            self._dropped_entities.update(dropped)
            self._append(newer)

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def empty(self) -> bool:
        """Nothing waits: no key, and no dropped entity still to resync."""
        return not self._keys and not self._dropped_entities
