"""The in-process bus, ``memory://``: the embedded default.

It reaches only the process it runs in. ``memory://`` is private to one app;
every :class:`MemoryBus` of a process named alike (``memory://NAME``) shares
one broker, so two apps in one process can talk. Separate processes, such as
several gunicorn workers, cannot: use a networked bus for those.
"""

from __future__ import annotations

import threading
from typing import Iterable
from urllib.parse import urlsplit

from .buffered import BufferedBus


class _Broker:
    """The members of one name, each receiving what any of them sends."""

    def __init__(self) -> None:
        self.members: list[MemoryBus] = []
        self.lock = threading.Lock()

    def send(self, bodies: list[bytes]) -> None:
        with self.lock:
            members = list(self.members)
        for member in members:
            for body in bodies:
                member._received(body)


_brokers: dict[str, _Broker] = {}
_brokers_lock = threading.Lock()


def _broker(name: str) -> _Broker:
    with _brokers_lock:
        return _brokers.setdefault(name, _Broker())


class MemoryBus(BufferedBus):
    """In-process fan-out through a named broker, on the buffering every bus shares.

    ``publish`` puts keys in a bounded buffer (``buffer_size`` distinct keys)
    and returns; the publisher loop delivers them to every member's sink. If
    the buffer overflows, every member resyncs the dropped keys' entities
    instead, so nothing is lost.
    """

    kind = "memory"
    in_process = True

    def __init__(self, name: str | None = None, buffer_size: int = 10_000, *, topic_prefix: str = "") -> None:
        super().__init__(topic_prefix=topic_prefix, buffer_size=buffer_size)
        self.name = name
        self._broker = _broker(name) if name else _Broker()

    @classmethod
    def from_url(cls, url: str, *, topic_prefix: str = "", buffer_size: int = 10_000) -> MemoryBus:
        """``memory://`` (private to one app) or ``memory://NAME`` (shared within the process)."""
        parts = urlsplit(url)
        return cls(parts.netloc + parts.path.strip("/") or None, buffer_size=buffer_size,
                   topic_prefix=topic_prefix)

    @classmethod
    def probe(cls, url: str, topics: list[str], timeout: float) -> dict[str, object]:
        return {"reachable": None,
                "detail": "memory:// is in-process: another process cannot reach or inspect it"}

    def topic(self, entity: str) -> str:
        # Every member receives every key, whatever its prefix: there is no broker to share.
        return entity

    def describe(self) -> str:
        return f"memory://{self.name or ''} (this process only)"

    # -- backend hooks ---------------------------------------------------------

    def _open(self, entities: Iterable[str]) -> None:
        with self._broker.lock:
            self._broker.members.append(self)

    def _subscribe(self, entity: str) -> None:
        """Every member already receives every entity."""

    def _send(self, batches: dict[str, list[bytes]]) -> None:
        self._broker.send([body for bodies in batches.values() for body in bodies])

    def _shutdown(self) -> None:
        with self._broker.lock:
            if self in self._broker.members:
                self._broker.members.remove(self)
