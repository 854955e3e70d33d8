"""The bus interface, and the buffering every bus shares.

A bus carries keys from the server where ``notify`` was called to every
server of the cluster. Each server hands its bus a :class:`BusSink` (the
hub): the bus calls :meth:`BusSink.deliver` with the keys it receives and
:meth:`BusSink.resync` whenever it may have missed some, after a
(re)connection or a buffer overflow, so that every locally subscribed key is
refreshed and clients converge to the current state.

A bus knows nothing of Flask or websockets.
"""

from __future__ import annotations

import abc
import threading
from typing import Iterable, Protocol, Sequence

from ..keys import EntityKey


class BusSink(Protocol):
    """What a bus delivers to: implemented by the hub."""

    def deliver(self, keys: Sequence[EntityKey]) -> None:
        """Schedule refreshes of ``keys`` for local subscribers; never blocks on them."""

    def resync(self, entity: str | None = None) -> None:
        """Refresh every key that has local subscribers (of ``entity`` only, if given)."""


class Bus(abc.ABC):
    """A cross-server notification bus.

    Lifecycle: :meth:`start` once, then :meth:`publish` from any thread or
    greenlet, then :meth:`close`. ``publish`` must return at once: it buffers
    and never waits on the network.
    """

    @abc.abstractmethod
    def start(self, sink: BusSink, entities: Iterable[str]) -> None:
        """Begin receiving the keys of ``entities`` and delivering them to ``sink``."""

    def add_entity(self, entity: str) -> None:  # noqa: B027 - optional hook
        """Also receive ``entity``, registered after :meth:`start`."""

    @abc.abstractmethod
    def publish(self, keys: Sequence[EntityKey]) -> None:
        """Send ``keys`` to every server of the cluster, this one included."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop receiving and release connections; idempotent."""

    def stats(self) -> dict[str, int]:
        """Counters and gauges of this bus (names are stable; see the README)."""
        return {}

    def describe(self) -> str:
        """Where this bus connects, for logs; never includes credentials."""
        return type(self).__name__


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
