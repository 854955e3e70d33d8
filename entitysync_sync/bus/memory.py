"""The in-process bus, ``memory://``: the embedded default.

It reaches only the process it runs in. ``memory://`` is private to one app;
every :class:`MemoryBus` of a process named alike (``memory://NAME``) shares
one broker, so two apps in one process can talk. Separate processes, such as
several gunicorn workers, cannot: use a networked bus for those.
"""

from __future__ import annotations

import logging
import threading
from typing import Iterable, Sequence

from .. import _runtime
from ..keys import EntityKey
from .base import Bus, BusSink, KeyBuffer

log = logging.getLogger("entitysync_sync")


class _Broker:
    def __init__(self) -> None:
        self.members: list[MemoryBus] = []
        self.lock = threading.Lock()

    def publish(self, keys: Sequence[EntityKey]) -> None:
        with self.lock:
            members = list(self.members)
        for member in members:
            member._receive(keys)


_brokers: dict[str, _Broker] = {}
_brokers_lock = threading.Lock()


def _broker(name: str) -> _Broker:
    with _brokers_lock:
        return _brokers.setdefault(name, _Broker())


class MemoryBus(Bus):
    """In-process fan-out through a named broker.

    ``publish`` puts keys in a bounded buffer (``buffer_size`` distinct keys)
    and returns; a background reader delivers them to the sink. If the
    buffer overflows, the reader resyncs instead, so nothing is lost.
    """

    def __init__(self, name: str | None = None, buffer_size: int = 10_000) -> None:
        self.name = name
        self._broker = _broker(name) if name else _Broker()
        self._buffer = KeyBuffer(buffer_size)
        self._wake = threading.Event()
        self._sink: BusSink | None = None
        self._closed = False

    def start(self, sink: BusSink, entities: Iterable[str]) -> None:
        if self._sink is not None:
            raise RuntimeError("this bus is already started")
        self._sink = sink
        with self._broker.lock:
            self._broker.members.append(self)
        _runtime.spawn(self._read, name="entitysync-memory-bus")

    def publish(self, keys: Sequence[EntityKey]) -> None:
        self._broker.publish(keys)

    def _receive(self, keys: Sequence[EntityKey]) -> None:
        self._buffer.add(keys)
        self._wake.set()

    def _read(self) -> None:
        sink = self._sink
        assert sink is not None
        while not self._closed:
            self._wake.wait()
            self._wake.clear()
            keys, dropped = self._buffer.take()
            try:
                if keys:
                    sink.deliver(keys)
                for entity in sorted(dropped):
                    log.warning("memory bus buffer overflowed (%d keys dropped in all); resyncing %s",
                                self._buffer.dropped, entity)
                    sink.resync(entity)
            except Exception:  # pragma: no cover - the hub does not raise
                log.exception("delivering keys from the memory bus failed")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._broker.lock:
            if self in self._broker.members:
                self._broker.members.remove(self)
        self._wake.set()

    def describe(self) -> str:
        return f"memory://{self.name or ''} (this process only)"

    @property
    def buffered(self) -> int:
        """Keys waiting to be delivered."""
        return len(self._buffer)

    def stats(self) -> dict[str, int]:
        return {"buffered": len(self._buffer), "dropped": self._buffer.dropped}
