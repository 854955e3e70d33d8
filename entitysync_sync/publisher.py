"""Notify from outside the web server: Celery tasks, cron jobs, scripts.

A :class:`Publisher` needs only the bus URL and topic prefix the servers use.
It has no websocket side, registers no entities and subscribes to nothing: it
validates each key (entity name and id), buffers it and publishes it in the
background, exactly as a server's ``notify`` does, so every server of the
cluster refreshes its subscribers of that key.

A long-lived process (a task queue worker) keeps one Publisher and calls
:meth:`Publisher.notify` whenever it changes a row. A short-lived script must
let the buffered keys go out before it exits: :meth:`Publisher.flush`, or the
``with`` block, which flushes and closes.
"""

from __future__ import annotations

import logging
import time
from typing import Iterable
from urllib.parse import urlsplit

from .bus import BufferedBus, bus_class, bus_from_url
from .concurrency import OncePerProcess
from .exceptions import BusError, ConfigError
from .keys import EntityKey, IdLike, KeyLike, as_key, stamp_keys, validate_entity

log = logging.getLogger("entitysync_sync")


class Publisher:
    """Publishes notifications onto a bus from a process that serves no clients.

    ::

        with Publisher("redis://127.0.0.1:6379/0", topic_prefix="shop_") as publisher:
            publisher.notify("items", 100)
        # leaving the block waited until the broker had the notification

    :param url: the bus URL the servers use (``ENTITYSYNC_BUS_URL``):
        ``redis://``, ``rediss://`` or ``nsq://``. ``memory://NAME`` reaches
        the apps of this process that use the same name (useful in tests);
        a bare ``memory://`` would reach nobody and is refused.
    :param topic_prefix: the servers' ``ENTITYSYNC_TOPIC_PREFIX``.
    :param buffer_size: distinct keys held while the broker is unreachable.
    """

    def __init__(self, url: str, *, topic_prefix: str = "", buffer_size: int = 10_000) -> None:
        parts = urlsplit(url) if isinstance(url, str) else None
        if parts is not None and bus_class(url).in_process and not (parts.netloc or parts.path.strip("/")):
            raise ConfigError(
                "a Publisher on memory:// reaches nobody: memory:// is private to one app. "
                "Use the redis:// or nsq:// URL the servers use (or memory://NAME within one process)"
            )
        self._config = (url, topic_prefix, buffer_size)
        self._bus: BufferedBus = self._make_bus()
        self._start = OncePerProcess()
        self._checked: set[str] = set()
        self.closed = False

    def __repr__(self) -> str:
        return f"<Publisher {self._bus.describe()}>"

    def describe(self) -> str:
        """Where notifications go, for messages; never includes credentials."""
        return self._bus.describe()

    def notify(self, key_or_entity: EntityKey | str, id: IdLike | None = None) -> None:
        """Tell every server that a key changed; returns at once.

        Accepts ``notify(EntityKey("items", 1))`` or ``notify("items", 1)``.
        Raises :class:`~entitysync_sync.InvalidKeyError` for a bad entity
        name or id, and :class:`~entitysync_sync.ConfigError` once closed.
        """
        self.notify_many([as_key(key_or_entity, id)])

    def notify_many(self, keys: Iterable[KeyLike]) -> None:
        """:meth:`notify` for several keys (``EntityKey`` or ``(entity, id)`` pairs)."""
        batch = stamp_keys(keys, time.time())
        if not batch:
            return
        if self.closed:
            raise ConfigError("this Publisher is closed")
        for entity in {key.entity for key in batch} - self._checked:
            self._bus.topic(entity)  # raises ConfigError if prefix + entity is too long for a topic
            self._checked.add(entity)
        self._start.run(self._started)
        self._bus.publish(batch)

    def notify_entity(self, *entities: str) -> None:
        """Tell every server that any row of ``entities`` may have changed; returns at once.

        Every server refreshes each key of those entities that it has
        subscribers for. Raises :class:`~entitysync_sync.InvalidKeyError` for
        a bad entity name and :class:`~entitysync_sync.ConfigError` once closed.
        """
        names = sorted({validate_entity(entity) for entity in entities})
        if not names:
            return
        if self.closed:
            raise ConfigError("this Publisher is closed")
        for entity in set(names) - self._checked:
            self._bus.topic(entity)  # raises ConfigError if prefix + entity is too long for a topic
            self._checked.add(entity)
        self._start.run(self._started)
        self._bus.publish_entities(names)

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until every notification so far has reached the broker.

        Raises :class:`~entitysync_sync.BusError` if ``timeout`` seconds pass
        first; the notifications stay buffered and are still retried.
        """
        bus = self._bus
        if not self._start.started:
            return  # nothing was published
        if not bus.flush(timeout):
            reason = f": {bus.last_error}" if bus.last_error else ""
            raise BusError(
                f"{bus.buffered} notification(s) not published to {bus.describe()} "
                f"within {timeout:g}s{reason}"
            )

    def close(self, timeout: float = 10.0) -> None:
        """Flush (waiting up to ``timeout`` seconds), then release the connection.

        Raises :class:`~entitysync_sync.BusError` if notifications could not be
        published; the connection is released either way. Idempotent.
        """
        if self.closed:
            return
        try:
            self.flush(timeout)
        finally:
            self.closed = True
            self._bus.close()

    def stats(self) -> dict[str, int]:
        """The bus's counters: ``published``, ``sent``, ``buffered``, ``publish_failures``..."""
        return self._bus.stats()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:  # do not hide the error that ended the block behind a publishing one
            try:
                self.close()
            except BusError:
                pass

    def _make_bus(self) -> BufferedBus:
        url, topic_prefix, buffer_size = self._config
        return bus_from_url(url, buffer_size=buffer_size, topic_prefix=topic_prefix)

    def _started(self, forked: bool) -> None:
        """Start the bus on first use; again in a forked child (a prefork task worker),
        whose copy lost the parent's publishing thread."""
        if forked:
            log.info("process forked after the Publisher started; starting a fresh bus")
            self._bus = self._make_bus()
        self._bus.start_publishing()
