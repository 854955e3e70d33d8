"""The bus interface: what the rest of the package asks of any bus.

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
from typing import Iterable, Protocol, Sequence

from ..exceptions import ConfigError
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

    def publish_entities(self, entities: Sequence[str]) -> None:
        """Ask every server of the cluster to refresh every subscribed key of ``entities``.

        Must return at once, like :meth:`publish`. Every bus made from a URL
        implements it (:class:`~entitysync_sync.bus.BufferedBus`); a bus of
        your own that does not raises :class:`~entitysync_sync.ConfigError`.
        """
        raise ConfigError(f"{type(self).__name__} cannot publish entity-wide refreshes: "
                          "implement publish_entities(entities)")

    @abc.abstractmethod
    def close(self) -> None:
        """Stop receiving and release connections; idempotent."""

    def stats(self) -> dict[str, int]:
        """Counters and gauges of this bus (names are stable; see :doc:`/observability`)."""
        return {}

    def describe(self) -> str:
        """Where this bus connects, for logs; never includes credentials."""
        return type(self).__name__

    @property
    def key_interest(self) -> KeyInterest | None:
        """What the hub tells which keys its clients hold, for a bus that routes by key;
        None (the default) for a bus that receives every key of its entities."""
        return None


class KeyInterest(Protocol):
    """Which keys a server's clients hold, as a bus with key routing is told it.

    The runtime hands it to the hub, which calls :meth:`watch` when a key gains
    its first local subscriber and :meth:`unwatch` when it loses its last,
    under its lock: both must only record the change and return at once.
    """

    def watch(self, key: EntityKey) -> None:
        """Receive notifications of ``key`` from now on (once the broker confirms)."""

    def unwatch(self, key: EntityKey) -> None:
        """Notifications of ``key`` are no longer needed here."""
