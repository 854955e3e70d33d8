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

    An entity-wide refresh (:meth:`add_entities`) is held the same way, as
    an entity to resync: it replaces the keys of that entity already
    waiting, and keys of it added before the buffer is drained are covered
    by it, so a burst of refreshes and notifications of one entity goes out
    as one resync.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("a KeyBuffer needs a capacity of at least 1")
        self.capacity = capacity
        self._keys: dict[EntityKey, None] = {}
        self._dropped_entities: set[str] = set()
        #: Entities whose every key is to be refreshed (add_entities, or put back after a failed send).
        self._requested: set[str] = set()
        self._lock = threading.Lock()
        #: Keys dropped because the buffer was full, since it was made.
        self.dropped = 0

    def add(self, keys: Iterable[EntityKey]) -> None:
        """Append ``keys``, dropping (and counting) those that do not fit."""
        with self._lock:
            self._append(keys)

    def add_entities(self, entities: Iterable[str]) -> None:
        """Ask for every key of ``entities`` to be refreshed; never dropped (one per entity)."""
        with self._lock:
            fresh = set(entities) - self._requested
            if not fresh:
                return
            self._requested |= fresh
            self._keys = {key: None for key in self._keys if key.entity not in fresh}

    def _append(self, keys: Iterable[EntityKey]) -> None:
        for key in keys:
            if key in self._keys or key.entity in self._requested:
                continue  # waiting already, or covered by a refresh of its whole entity
            if len(self._keys) >= self.capacity:
                self._dropped_entities.add(key.entity)
                self.dropped += 1
                continue
            self._keys[key] = None

    def take(self) -> tuple[list[EntityKey], set[str]]:
        """Remove and return everything waiting: keys, and entities to resync."""
        with self._lock:
            keys = list(self._keys)
            resync = self._dropped_entities | self._requested
            self._keys = {}
            self._dropped_entities = set()
            self._requested = set()
            return keys, resync

    def put_back(self, keys: Iterable[EntityKey], resync: Iterable[str] = ()) -> None:
        """Return what :meth:`take` gave, ahead of keys added since, after a failed send."""
        with self._lock:
            newer = self._keys
            self._requested.update(resync)
            self._keys = {key: None for key in keys if key.entity not in self._requested}
            self._append(newer)

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def empty(self) -> bool:
        """Nothing waits: no key, and no dropped entity still to resync."""
        return not self._keys and not self._dropped_entities and not self._requested
