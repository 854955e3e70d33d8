"""What every bus shares: buffered publishing, reconnects, resync.

A bus (in-process, Redis, NSQ) differs from its peers only in how it sends a
batch of bodies and how it receives them: a backend is a small subclass of
:class:`BufferedBus` with four hooks (open, subscribe, send, shut down).
Everything users rely on lives here, once:

* ``publish`` never waits on the network. Keys go into a bounded,
  de-duplicating :class:`~entitysync_sync.bus.base.KeyBuffer`; a publisher
  loop sends them in batches, one batch per topic.
* While the broker is unreachable the keys wait, and the loop retries with
  capped exponential backoff and jitter; nothing is sent twice on purpose,
  but a notification only asks for a refresh, so a duplicate is harmless.
* If the buffer overflows, the dropped keys' entities are remembered and a
  :func:`~entitysync_sync.protocol.encode_bus_resync` body is published for
  each once the broker is back: every server refreshes every subscribed key
  of those entities, so dropped notifications cost work, never correctness.
  :meth:`BufferedBus.publish_entities` (``es.notify_entity``) sends the same
  body on request; a burst of them, and the keys of those entities notified
  meanwhile, go out as one per entity.
* Whenever a backend (re)connects its receiving side, the sink resyncs, so
  clients converge even though nothing was received while disconnected.
* Received bodies that are not keys are logged (their first bytes only) and
  counted, and never stop the reader.
"""

from __future__ import annotations

import abc
import logging
import time
from collections import Counter
from typing import Any, ClassVar, Iterable, Sequence

from .. import protocol as p
from ..backoff import backoff
from ..concurrency import Executor, GeventThread, WakeEvent, executor
from ..exceptions import ConfigError, ProtocolError
from ..keys import EntityKey, check_topic_prefix, topic_name
from .base import Bus, BusSink
from .buffer import KeyBuffer

log = logging.getLogger("entitysync_sync")


class BufferedBus(Bus):
    """Base of every bus made from a URL; subclasses implement the backend hooks.

    :param topic_prefix: prepended to every entity name to make its topic
        (NSQ) or channel (Redis), so several apps can share one broker.
    :param buffer_size: distinct keys held while the broker is unreachable.
    :param retry_max: the longest pause, in seconds, between two attempts.
    """

    #: Name used in logs and errors, e.g. ``"nsq"``.
    kind = "broker"
    #: Whether the backend must run on a gevent hub (gnsq does).
    needs_gevent = False
    #: Whether the bus reaches only the process it runs in (``memory://``).
    in_process: ClassVar[bool] = False

    def __init__(self, *, topic_prefix: str = "", buffer_size: int = 10_000,
                 retry_min: float = 0.05, retry_max: float = 2.0) -> None:
        self.topic_prefix = check_topic_prefix(topic_prefix)
        self.retry_min = retry_min
        self.retry_max = retry_max
        self._outbox = KeyBuffer(buffer_size)
        self._dropped_reported = 0
        self._entities: set[str] = set()
        self._sink: BusSink | None = None
        self._executor: Executor | None = None
        self._wake: WakeEvent | None = None
        self._stopped: WakeEvent | None = None
        self._closing: WakeEvent | None = None
        self.closed = False
        self.counters: Counter[str] = Counter()
        self._ever_connected: set[tuple[str | None, str | None]] = set()
        self._receiving = True
        self._sending = False
        #: Why the last publish attempt failed, or None after a success (no credentials).
        self.last_error: str | None = None

    # -- the Bus interface -----------------------------------------------------

    def start(self, sink: BusSink, entities: Iterable[str]) -> None:
        if self._sink is not None:
            raise RuntimeError("this bus is already started")
        entities = list(entities)
        for entity in entities:
            self.topic(entity)
        self._sink = sink
        self._entities.update(entities)
        self._executor = executor(f"entitysync-{self.kind}-bus", needs_gevent=self.needs_gevent)
        self._wake = self._executor.event()
        self._stopped = self._executor.event()
        self._closing = self._executor.event()
        self._executor.spawn(self._run)

    def start_publishing(self) -> None:
        """Start the publishing side only, for a process that notifies but serves no clients
        (a script, a task queue worker): it subscribes to nothing and receives nothing."""
        self._receiving = False
        self.start(_NoSink(), [])

    def add_entity(self, entity: str) -> None:
        self.topic(entity)
        if entity in self._entities:
            return
        self._entities.add(entity)
        if self._executor is not None and self._receiving:
            self._executor.spawn(self._subscribe, entity)

    def flush(self, timeout: float) -> bool:
        """Wait until every key published so far has been sent to the broker.

        Returns False if ``timeout`` seconds pass first (the broker is
        unreachable, say); the keys then stay buffered and are retried.
        """
        deadline = time.monotonic() + timeout
        if self._wake is not None:
            self._wake.set()
        while self._sending or not self._outbox.empty:
            if time.monotonic() >= deadline or self._wake is None:
                return False
            time.sleep(0.01)
        return True

    def publish(self, keys: Sequence[EntityKey]) -> None:
        if self.closed:
            raise ConfigError(f"the {self.kind} bus is closed")
        self._outbox.add(keys)
        self.counters["published"] += len(keys)
        if self._wake is not None:
            self._wake.set()

    def publish_entities(self, entities: Sequence[str]) -> None:
        """Ask every server to refresh every subscribed key of ``entities``; returns at once.

        Held in the publish buffer as one resync request per entity, which
        replaces (and absorbs, until it is sent) that entity's keys.
        """
        if self.closed:
            raise ConfigError(f"the {self.kind} bus is closed")
        for entity in entities:
            self.topic(entity)
        self._outbox.add_entities(entities)
        self.counters["resyncs_published"] += len(entities)
        if self._wake is not None:
            self._wake.set()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._wake is None or self._stopped is None or self._closing is None:
            return
        self._closing.set()
        self._wake.set()
        # The publisher makes a last attempt to send what is buffered.
        if not self._on_executor():
            self._stopped.wait(self.retry_max + 1)
            if self._executor is not None:
                self._executor.stop()

    def stats(self) -> dict[str, int]:
        return {
            "buffered": len(self._outbox),
            "dropped": self._outbox.dropped,
            **self.counters,
        }

    def topic(self, entity: str) -> str:
        """The topic (channel) that carries ``entity``'s keys; :class:`ConfigError` if too long."""
        return topic_name(self.topic_prefix, entity)

    @property
    def running(self) -> int:
        """Greenlets or threads of this bus still running (0 once closed and joined)."""
        return self._executor.running if self._executor is not None else 0

    @property
    def buffered(self) -> int:
        """Keys waiting to be published."""
        return len(self._outbox)

    # -- backend hooks ---------------------------------------------------------

    @classmethod
    @abc.abstractmethod
    def from_url(cls, url: str, *, topic_prefix: str = "", buffer_size: int = 10_000) -> BufferedBus:
        """The bus that ``url`` (``ENTITYSYNC_BUS_URL``) names; :class:`ConfigError` if it is malformed."""

    @classmethod
    def probe(cls, url: str, topics: list[str], timeout: float) -> dict[str, Any]:
        """Whether the broker of ``url`` answers, for ``flask entitysync stats``.

        Returns ``reachable`` (True, False, or None where another process
        cannot tell), a ``detail`` message (never with credentials) and,
        where the broker can say, ``subscribers`` per topic.
        """
        return {"reachable": None, "detail": f"{cls.kind} cannot be probed from another process"}

    @abc.abstractmethod
    def _open(self, entities: Iterable[str]) -> None:
        """Begin receiving ``entities``; called once on the executor. Must not block."""

    @abc.abstractmethod
    def _subscribe(self, entity: str) -> None:
        """Also receive ``entity``; called on the executor after :meth:`_open`."""

    @abc.abstractmethod
    def _send(self, batches: dict[str, list[bytes]]) -> None:
        """Publish ``{topic: [body, ...]}``; raise on any failure (the batch is kept)."""

    @abc.abstractmethod
    def _shutdown(self) -> None:
        """Stop receiving and release connections; called once on the executor."""

    def describe(self) -> str:
        """Where this bus connects, for logs; never includes credentials."""
        return self.kind

    def _route(self, key: EntityKey) -> str:
        """The topic (channel) a notification of ``key`` is published on: its entity's,
        unless the backend routes by key."""
        return self.topic(key.entity)

    # -- for backends ----------------------------------------------------------

    def _received(self, body: bytes) -> None:
        """Hand one received body to the sink; log and drop anything that is not a key."""
        self._received_many((body,))

    def _received_on(self, body: bytes, key: EntityKey | None) -> None:
        """Hand one body received on the channel of ``key`` (key routing; ``None`` for a channel
        of no one key) to the sink: like :meth:`_received`, but the publishers' own bodies for
        ``key`` are read without a JSON parse (:func:`~entitysync_sync.protocol.decode_key_body`)."""
        self._received_many((body,), key)

    def _received_many(self, bodies: Sequence[bytes], expected: EntityKey | None = None) -> None:
        """Hand the keys of many received bodies to the sink in one delivery, in order;
        log and drop any body that is not a key. ``expected`` is the key every body should
        name, when the channel they came on tells."""
        sink = self._sink
        if sink is None or self.closed:
            return
        keys: list[EntityKey] = []
        received = 0
        for body in bodies:
            try:
                message = p.decode_bus_body(body) if expected is None else p.decode_key_body(body, expected)
            except ProtocolError as exc:
                self.counters["malformed"] += 1
                log.warning("dropped a malformed %s bus message (%s): %r", self.kind, exc.message, body[:64])
                continue
            received += 1
            if isinstance(message, p.ResyncRequest):
                if keys:
                    sink.deliver(keys)
                    keys = []
                sink.resync(message.entity)
            else:
                keys.append(message)
        self.counters["received"] += received
        if keys:
            sink.deliver(keys)

    def _connected(self, entity: str | None = None, where: str | None = None) -> None:
        """Record a (re)connection of the receiving side and resync what it may have missed.

        ``where`` names the broker connected to, when there are several; a
        second connection for the same entity and broker counts as a reconnect.
        """
        self.counters["connects"] += 1
        if (entity, where) in self._ever_connected:
            self.counters["reconnects"] += 1
        else:
            self._ever_connected.add((entity, where))
        self._resync(entity)

    def _resync(self, entity: str | None = None) -> None:
        """Have the sink refresh every subscribed key (of ``entity``): something may have been missed."""
        if self._sink is not None and not self.closed:
            self._sink.resync(entity)

    # -- the publisher loop ----------------------------------------------------

    def _on_executor(self) -> bool:
        return self._executor is not None and self._executor.running_here()

    def _run(self) -> None:
        assert self._executor is not None and self._wake is not None and self._stopped is not None
        try:
            if self._receiving:
                self._open(sorted(self._entities))
            self._publish_loop()
        except Exception:  # pragma: no cover - a bug, but never a silent one
            log.exception("the %s bus stopped unexpectedly", self.kind)
        finally:
            try:
                self._shutdown()
            except Exception:  # pragma: no cover
                log.exception("closing the %s bus failed", self.kind)
            self._stopped.set()
            if isinstance(self._executor, GeventThread):
                self._executor.stop()

    def _publish_loop(self) -> None:
        assert self._executor is not None and self._wake is not None and self._closing is not None
        failures = 0
        while True:
            if failures:
                self._closing.wait(backoff(failures, self.retry_min, self.retry_max, jitter=True))
            else:
                self._wake.wait()
            self._wake.clear()
            last = self.closed
            self._sending = True  # before take(): flush() must never see an empty buffer and no send
            keys, resync = self._outbox.take()
            if keys or resync:
                try:
                    self._send(self._batches(keys, resync))
                except Exception as exc:
                    self._outbox.put_back(keys, resync)
                    self._sending = False
                    failures += 1
                    self.last_error = _describe_error(exc)
                    self.counters["publish_failures"] += 1
                    if failures == 1:
                        log.warning("publishing to %s failed (%s); holding notifications and retrying",
                                    self.describe(), _describe_error(exc))
                    if last:
                        log.warning("the %s bus closed with %d notifications unpublished",
                                    self.kind, len(self._outbox))
                        return
                    continue
                if failures:
                    log.info("published the notifications held while %s was unreachable", self.describe())
                failures = 0
                self.last_error = None
                self.counters["sent"] += len(keys)
                self.counters["resyncs_sent"] += len(resync)
                if self._outbox.dropped > self._dropped_reported:
                    self._dropped_reported = self._outbox.dropped
                    log.warning("the %s publish buffer overflowed (%d keys dropped in all); "
                                "asked every server to resync %s", self.kind, self._outbox.dropped,
                                ", ".join(sorted(resync)))
            self._sending = False
            if last:
                return

    def _batches(self, keys: Sequence[EntityKey], resync: set[str]) -> dict[str, list[bytes]]:
        batches: dict[str, list[bytes]] = {}
        for key in keys:
            batches.setdefault(self._route(key), []).append(p.encode_bus_body(key))
        for entity in sorted(resync):
            batches.setdefault(self.topic(entity), []).append(p.encode_bus_resync(entity))
        return batches


class _NoSink:
    """The sink of a bus that only publishes."""

    def deliver(self, keys: Sequence[EntityKey]) -> None:
        """Nothing is received."""

    def resync(self, entity: str | None = None) -> None:
        """Nothing is subscribed."""


def _describe_error(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text[:200]
