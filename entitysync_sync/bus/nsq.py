"""The NSQ bus, ``nsq://host:4150``, on gnsq.

Every server subscribes to one topic per entity (``ENTITYSYNC_TOPIC_PREFIX``
+ entity name) on a channel of its own, ``<server id>#ephemeral``, so every
server receives every notification and nsqd forgets the channel when the
server goes away. Bodies are ``{"entity":"items","id":"100"}``, the bytes
the Go entity-sync publishes, so Go and Python servers can share topics.

URL forms::

    nsq://127.0.0.1:4150                      one nsqd
    nsq://h1:4150,h2:4150                     several; publish to any, receive from all
    nsq://127.0.0.1:4150?lookupd=http://h:4161
                                              publish to the local nsqd, discover the
                                              nsqd that carry each topic through nsqlookupd
    nsq://?lookupd=http://h1:4161&lookupd=http://h2:4161
                                              discover both sides through nsqlookupd

Options in the query: ``max_in_flight`` (per topic, default 2500, nsqd's
default ``--max-rdy-count``), ``max_backoff`` (seconds between reconnects,
default 2), ``lookupd_poll_interval`` (seconds, default 15),
``lookupd_retry_interval`` (seconds between lookupd queries while a topic's
consumer has found no nsqd yet, default 1), ``channel`` (the channel name
before ``#ephemeral``; default a unique id of this process), ``ready_timeout``
and ``stall_timeout`` (seconds, default 10 each; see :meth:`NsqBus._supervise`),
``output_buffer_size`` (bytes nsqd may buffer for this server's consumers;
default -1, none), ``output_buffer_timeout`` (milliseconds nsqd may hold
them when buffering; default 25) and ``heartbeat_interval`` (whole seconds
between nsqd's heartbeats, default 1, nsqd's least; a connection that misses
two is replaced). Both go to nsqd in IDENTIFY; a value nsqd
refuses fails each connection, with nsqd's reason in the log.

gnsq is gevent-only: in a process that is not monkey-patched (the threaded
dev server) the bus runs on a thread of its own with its own gevent hub.
"""

from __future__ import annotations

import logging
import os
import random
import re
import socket
import time
import urllib.request
import uuid
from functools import partial
from typing import Any, Iterable
from urllib.parse import parse_qs, urlsplit

from ..exceptions import ConfigError
from ..keys import MAX_TOPIC_LENGTH
from .buffered import BufferedBus

log = logging.getLogger("entitysync_sync")

_CHANNEL_PATTERN = re.compile(r"[.a-zA-Z0-9_-]+")
_EPHEMERAL = "#ephemeral"
#: Bodies per MPUB; well under nsqd's default --max-body-size of 5 MB.
MPUB_BATCH = 1000
#: Seconds to wait for nsqd to acknowledge a PUB or MPUB.
PUBLISH_TIMEOUT = 3.0
#: Default seconds between nsqd's heartbeats on our connections (nsqd's default is 30, its
#: least 1). A connection that misses two (a read waits ``2 * interval + 1`` seconds) is
#: replaced, so a partition is noticed within 3 s and healing finds fresh connections.
HEARTBEAT = 1
#: Default longest pause, in seconds, between two reconnection or publishing attempts.
MAX_BACKOFF = 2.0
#: Default seconds a subscribed connection may stay at RDY 0 before the supervisor repairs it.
READY_TIMEOUT = 10.0
#: Default seconds a consumer may receive nothing while its own published messages wait for it.
STALL_TIMEOUT = 10.0
#: Default seconds between lookupd queries while a topic's consumer has found no nsqd yet.
LOOKUPD_RETRY_INTERVAL = 1.0
#: Default bytes nsqd buffers for this server's consumers before writing them (nsqd's
#: ``output_buffer_size``): -1, no buffer, so nsqd writes every message as it sends it
#: and keeps no flush timer for the connection. nsqd's own default (16 KiB, flushed
#: every 250 ms) holds a lone notification for up to 250 ms.
OUTPUT_BUFFER_SIZE = -1
#: Default milliseconds nsqd may hold buffered messages (nsqd's ``output_buffer_timeout``),
#: when ``output_buffer_size`` turns buffering on: 25, the least nsqd accepts unless started
#: with a lower ``--min-output-buffer-timeout``.
OUTPUT_BUFFER_TIMEOUT = 25


def _import_gnsq() -> Any:
    try:
        import gnsq
        import gnsq.states
    except ImportError:
        raise ConfigError(
            "ENTITYSYNC_BUS_URL names an NSQ bus but gnsq is not installed: "
            "pip install 'entitysync_sync[nsq]'"
        ) from None
    return gnsq


def default_channel() -> str:
    """A channel name unique to this process: host, pid and a random suffix."""
    host = re.sub(r"[^.a-zA-Z0-9_-]", "-", socket.gethostname())[:24]
    return f"es-{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _number(query: dict[str, list[str]], name: str, default: float, cast: type = float) -> Any:
    values = query.get(name)
    if not values:
        return default
    try:
        value = cast(values[-1])
    except ValueError:
        value = None
    if value is None or value <= 0:
        raise ConfigError(f"ENTITYSYNC_BUS_URL option {name}={values[-1]!r} must be a positive number")
    return value


def _buffer_setting(query: dict[str, list[str]], name: str, default: int) -> int:
    values = query.get(name)
    if not values:
        return default
    try:
        value = int(values[-1])
    except ValueError:
        value = 0
    if value != -1 and value <= 0:
        raise ConfigError(f"ENTITYSYNC_BUS_URL option {name}={values[-1]!r} must be a positive "
                          "whole number, or -1 to turn it off")
    return value


def parse_nsq_url(url: str) -> dict[str, Any]:
    """Split an ``nsq://`` URL into :class:`NsqBus` arguments (see the module docs)."""
    parts = urlsplit(url)
    nsqd = []
    for address in filter(None, parts.netloc.split(",")):
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"ENTITYSYNC_BUS_URL: nsqd address {address!r} must be host:port")
        nsqd.append(f"{host}:{int(port)}")
    query = parse_qs(parts.query)
    known = {"lookupd", "max_in_flight", "max_backoff", "lookupd_poll_interval", "lookupd_retry_interval", "channel",
             "ready_timeout", "stall_timeout", "output_buffer_timeout", "output_buffer_size", "heartbeat_interval"}
    unknown = sorted(set(query) - known)
    if unknown:
        raise ConfigError(f"ENTITYSYNC_BUS_URL: unknown nsq:// option(s) {', '.join(unknown)}; "
                          f"known: {', '.join(sorted(known))}")
    lookupd = query.get("lookupd", [])
    for address in lookupd:
        if urlsplit(address).scheme not in ("http", "https"):
            raise ConfigError(f"ENTITYSYNC_BUS_URL: lookupd {address!r} must be an http:// URL")
    if not nsqd and not lookupd:
        raise ConfigError("ENTITYSYNC_BUS_URL: name an nsqd (nsq://host:4150) or a lookupd "
                          "(nsq://?lookupd=http://host:4161)")
    return {
        "nsqd": nsqd,
        "lookupd": lookupd,
        "max_in_flight": _number(query, "max_in_flight", 2500, int),
        "max_backoff": _number(query, "max_backoff", MAX_BACKOFF),
        "lookupd_poll_interval": _number(query, "lookupd_poll_interval", 15.0),
        "lookupd_retry_interval": _number(query, "lookupd_retry_interval", LOOKUPD_RETRY_INTERVAL),
        "ready_timeout": _number(query, "ready_timeout", READY_TIMEOUT),
        "stall_timeout": _number(query, "stall_timeout", STALL_TIMEOUT),
        "channel": query.get("channel", [None])[-1],
        "output_buffer_timeout": _buffer_setting(query, "output_buffer_timeout", OUTPUT_BUFFER_TIMEOUT),
        "output_buffer_size": _buffer_setting(query, "output_buffer_size", OUTPUT_BUFFER_SIZE),
        "heartbeat_interval": _number(query, "heartbeat_interval", HEARTBEAT, int),
    }


class NsqBus(BufferedBus):
    """Notifications through nsqd, one topic per entity and an ephemeral channel per server.

    :param nsqd: ``host:port`` TCP addresses of nsqd. Publishing uses any of
        them; receiving connects to all.
    :param lookupd: ``http://host:port`` addresses of nsqlookupd, to discover
        the nsqd that carry each topic (and, with no ``nsqd``, where to publish).
    :param max_in_flight: messages each topic's consumer may hold unacknowledged.
    :param max_backoff: longest pause between two reconnection attempts, in seconds.
    :param channel: this server's channel name, without ``#ephemeral``.
    :param lookupd_retry_interval: seconds between lookupd queries while a topic's
        consumer has found no nsqd (lookupd answers 404 until the topic is published to).
    :param output_buffer_size: bytes nsqd may buffer before writing to this server's
        consumers; -1 (the default) for none, so every message is written at once.
    :param output_buffer_timeout: milliseconds nsqd may hold buffered messages.
    :param ready_timeout: seconds a subscribed connection may stay at RDY 0
        (nsqd then sends it nothing) before the supervisor repairs it.
    :param stall_timeout: seconds a consumer may receive nothing after this
        server published to its topic before the supervisor repairs it.
    :param heartbeat_interval: whole seconds between nsqd's heartbeats (1 to 300;
        nsqd accepts no less than 1); a connection that misses two is replaced.
    """

    kind = "nsq"
    needs_gevent = True

    def __init__(self, nsqd: Iterable[str] = (), lookupd: Iterable[str] = (), *,
                 topic_prefix: str = "", buffer_size: int = 10_000, max_in_flight: int = 2500,
                 max_backoff: float = MAX_BACKOFF, lookupd_poll_interval: float = 15.0,
                 lookupd_retry_interval: float = LOOKUPD_RETRY_INTERVAL,
                 channel: str | None = None, supervise_interval: float = 1.0,
                 ready_timeout: float = READY_TIMEOUT, stall_timeout: float = STALL_TIMEOUT,
                 output_buffer_timeout: int = OUTPUT_BUFFER_TIMEOUT,
                 output_buffer_size: int = OUTPUT_BUFFER_SIZE, heartbeat_interval: int = HEARTBEAT) -> None:
        super().__init__(topic_prefix=topic_prefix, buffer_size=buffer_size, retry_max=max_backoff)
        self._gnsq = _import_gnsq()
        self.nsqd = list(nsqd)
        self.lookupd = list(lookupd)
        if not self.nsqd and not self.lookupd:
            raise ConfigError("an NSQ bus needs at least one nsqd or lookupd address")
        self.max_in_flight = max_in_flight
        self.max_backoff = max_backoff
        self.lookupd_poll_interval = lookupd_poll_interval
        self.lookupd_retry_interval = lookupd_retry_interval
        self.supervise_interval = supervise_interval
        for name, value in (("ready_timeout", ready_timeout), ("stall_timeout", stall_timeout)):
            if not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"NSQ bus {name} must be a positive number of seconds, got {value!r}")
        if (not isinstance(heartbeat_interval, int) or isinstance(heartbeat_interval, bool)
                or not 1 <= heartbeat_interval <= 300):
            raise ConfigError("NSQ bus heartbeat_interval must be a whole number of seconds from 1 "
                              f"(nsqd's least) to 300, got {heartbeat_interval!r}")
        self.heartbeat_interval = heartbeat_interval
        self.ready_timeout = float(ready_timeout)
        self.stall_timeout = float(stall_timeout)
        for name, value in (("output_buffer_timeout", output_buffer_timeout),
                            ("output_buffer_size", output_buffer_size)):
            if not isinstance(value, int) or isinstance(value, bool) or (value <= 0 and value != -1):
                raise ConfigError(f"NSQ bus {name} must be a positive whole number or -1, got {value!r}")
        self.output_buffer_timeout = output_buffer_timeout
        self.output_buffer_size = output_buffer_size
        name = channel if channel is not None else default_channel()
        if (_CHANNEL_PATTERN.fullmatch(name) is None
                or len(name) + len(_EPHEMERAL) > MAX_TOPIC_LENGTH):
            raise ConfigError(f"NSQ channel {name!r} must be 1 to {MAX_TOPIC_LENGTH - len(_EPHEMERAL)} "
                              "characters from A-Z, a-z, 0-9, '_', '.' and '-'")
        self.channel = name + _EPHEMERAL
        self._consumers: dict[str, Any] = {}
        self._producer: Any = None
        self._down_since: dict[str, float] = {}
        self._entity_of_topic: dict[str, str] = {}
        #: entity -> when this server published to its topic while its consumer was
        #: settled, and has received nothing on it since.
        self._waiting_since: dict[str, float] = {}
        #: entity -> when its consumer was last repaired, until it receives again.
        self._repaired_at: dict[str, float] = {}

    @classmethod
    def from_url(cls, url: str, *, topic_prefix: str = "", buffer_size: int = 10_000) -> NsqBus:
        """Build the bus an ``nsq://`` URL names."""
        return cls(**parse_nsq_url(url), topic_prefix=topic_prefix, buffer_size=buffer_size)

    @classmethod
    def probe(cls, url: str, topics: list[str], timeout: float) -> dict[str, Any]:
        """Whether every nsqd accepts a TCP connection and every lookupd answers ``/ping``."""
        parsed = parse_nsq_url(url)
        failed: list[str] = []
        for address in parsed["nsqd"]:
            host, _, port = address.rpartition(":")
            try:
                # nsqd speaks first only after the client's magic; a TCP connection is what can be checked.
                with socket.create_connection((host, int(port)), timeout=timeout):
                    pass
            except OSError as exc:
                failed.append(f"nsqd {address}: {exc}")
        for address in parsed["lookupd"]:
            try:
                with urllib.request.urlopen(address.rstrip("/") + "/ping", timeout=timeout) as resp:
                    resp.read()
            except OSError as exc:
                failed.append(f"lookupd {address}: {exc}")
        if failed:
            return {"reachable": False, "detail": "; ".join(failed)[:400]}
        where = len(parsed["nsqd"]) + len(parsed["lookupd"])
        return {"reachable": True, "detail": f"{where} address(es) accept connections"}

    def describe(self) -> str:
        where = ",".join(self.nsqd) or "lookupd " + ",".join(self.lookupd)
        return f"nsqd {where}"

    # -- backend hooks ---------------------------------------------------------

    def _open(self, entities: Iterable[str]) -> None:
        assert self._executor is not None
        for entity in entities:
            self._subscribe(entity)
        self._executor.spawn(self._supervise)

    def _subscribe(self, entity: str) -> None:
        assert self._executor is not None
        if self.closed or entity in self._consumers:
            return
        consumer = _consumer_class()(
            self, entity, self.topic(entity), self.channel,
            nsqd_tcp_addresses=self.nsqd,
            lookupd_http_addresses=self.lookupd,
            message_handler=self._on_message,
            output_buffer_timeout=self.output_buffer_timeout,
            output_buffer_size=self.output_buffer_size,
            max_in_flight=self.max_in_flight,
            max_backoff_duration=self.max_backoff,
            lookupd_poll_interval=self.lookupd_poll_interval,
            max_tries=0,
            # gnsq drops an idle connection's RDY to 1, which would throttle the
            # first burst after a quiet spell to one message per round trip.
            low_ready_idle_timeout=float("inf"),
            **self._connection_options(),
        )
        self._consumers[entity] = consumer
        self._entity_of_topic[consumer.topic] = entity
        # Connecting blocks until nsqd answers or the connect times out; not here.
        self._executor.spawn(consumer.start, False)

    def _on_message(self, consumer: Any, message: Any) -> None:
        # gnsq's per-message path, for a connection that cannot be read in batches.
        self._on_messages(consumer, [message.body])

    def _on_messages(self, consumer: Any, bodies: list[bytes]) -> None:
        # Returning finishes the messages: the hub only queues refreshes, so this is prompt.
        self._waiting_since.pop(consumer.entity, None)
        self._repaired_at.pop(consumer.entity, None)
        try:
            self._received_many(bodies)
        except Exception:
            # Finished anyway (a message left unfinished comes back only after nsqd's
            # msg_timeout); a resync refreshes whatever these keys would have.
            log.exception("handling %d NSQ message(s) of %s failed; resyncing it", len(bodies), consumer.topic)
            self._resync(consumer.entity)

    def _send(self, batches: dict[str, list[bytes]]) -> None:
        import gevent

        producer = self._ensure_producer()
        try:
            for topic, bodies in batches.items():
                started = time.monotonic()
                for start in range(0, len(bodies), MPUB_BATCH):
                    chunk = bodies[start:start + MPUB_BATCH]
                    if len(chunk) == 1:
                        result = producer.publish(topic, chunk[0], block=False, raise_error=False)
                    else:
                        result = producer.multipublish(topic, chunk, block=False, raise_error=False)
                    try:
                        result.get(timeout=PUBLISH_TIMEOUT)
                    except gevent.Timeout:
                        raise TimeoutError(f"nsqd did not answer within {PUBLISH_TIMEOUT}s") from None
                self._published(topic, started, producer)
        except Exception:
            if not self.nsqd:  # discovered through lookupd: discover again next time
                _close_quietly(producer)
                self._producer = None
            raise

    def _shutdown(self) -> None:
        for consumer in list(self._consumers.values()):
            _close_quietly(consumer)
        if self._producer is not None:
            _close_quietly(self._producer)

    def _connection_options(self) -> dict[str, Any]:
        # gnsq notices a silent nsqd only when a read times out (or a connect or a
        # write does): ask for heartbeats every heartbeat_interval seconds and give up
        # after two missed ones.
        interval = self.heartbeat_interval
        return {"heartbeat_interval": interval, "timeout": 2 * interval + 1}

    # -- publishing ------------------------------------------------------------

    def _ensure_producer(self) -> Any:
        if self._producer is None:
            nsqd = self.nsqd or self._discover_nsqd()
            from ._gnsq_fixes import Producer

            self._producer = Producer(nsqd, max_backoff_duration=self.max_backoff, **self._connection_options())
            self._producer.start()
        return self._producer

    def _discover_nsqd(self) -> list[str]:
        """The nsqd that the lookupd know of; publishing with lookupd only goes there."""
        nodes: set[str] = set()
        for address in self.lookupd:
            client = self._gnsq.LookupdClient.from_url(address)
            for node in client.nodes().get("producers", []):
                nodes.add(f"{node['broadcast_address']}:{node['tcp_port']}")
        if not nodes:
            raise ConnectionError("no nsqd is registered with the lookupd")
        return sorted(nodes)

    # -- supervision -----------------------------------------------------------

    def _supervise(self) -> None:
        """Replace or repair any consumer that has stopped receiving.

        Every ``supervise_interval`` seconds each topic's consumer is checked:

        * A consumer whose greenlets died (gnsq's RDY greenlet can end in a
          race after an nsqd crash, gnsq pull request 32), or that has had no
          connection to one of its nsqd for three backoff periods, is closed
          and started afresh; its first connection then resyncs like any
          reconnection.
        * A consumer that is connected but not ready, one of its subscribed
          connections at RDY 0 (so nsqd sends it nothing) for ``ready_timeout``
          seconds, or that has received nothing for ``stall_timeout`` seconds
          although this server published to its topic while it was subscribed
          (so messages wait on its channel), is repaired: every connection is
          sent its RDY count again and the entity is resynced. If it still
          receives nothing and needs repairing again, it is replaced.

        Each replacement or repair is logged at WARNING and counted in the bus
        stats (``consumers_replaced``, ``consumers_repaired``).
        """
        import gevent

        stale_after = 3 * self.max_backoff + 10
        while not self.closed:
            gevent.sleep(self.supervise_interval)
            now = time.monotonic()
            for entity, consumer in list(self._consumers.items()):
                if self.closed:
                    return
                reason = self._unhealthy(entity, consumer, now, stale_after)
                if reason is None:
                    reason = self._not_receiving(entity, consumer, now)
                    if reason is None:
                        continue
                    if entity not in self._repaired_at:
                        self._repair(entity, consumer, reason, now)
                        continue
                    reason += ", and still does after its RDY counts were sent again"
                self._replace(entity, consumer, reason)

    def _replace(self, entity: str, consumer: Any, reason: str) -> None:
        self.counters["consumers_replaced"] += 1
        log.warning("replacing the NSQ consumer of %s: %s", consumer.topic, reason)
        _close_quietly(consumer)
        self._down_since.pop(entity, None)
        self._waiting_since.pop(entity, None)
        self._repaired_at.pop(entity, None)
        del self._consumers[entity]
        self._subscribe(entity)

    def _repair(self, entity: str, consumer: Any, reason: str, now: float) -> None:
        assert self._executor is not None
        self.counters["consumers_repaired"] += 1
        log.warning("the NSQ consumer of %s %s; sending its RDY counts again and resyncing",
                    consumer.topic, reason)
        self._repaired_at[entity] = now
        self._waiting_since.pop(entity, None)
        # Sending may block on a full socket: never in the supervisor's loop.
        self._executor.spawn(partial(consumer.send_ready_state, resend=True))
        self._resync(entity)

    def _unhealthy(self, entity: str, consumer: Any, now: float, stale_after: float) -> str | None:
        if consumer._state == self._gnsq.states.INIT:
            return None  # still starting
        if not consumer.is_running:
            return "it stopped"
        # gnsq's group drops a greenlet once it ends: the RDY loop, plus the lookupd poller.
        if len(consumer._killables) < 1 + bool(consumer.lookupds):
            return "its RDY greenlet died"
        if not self.nsqd:
            return None  # lookupd decides where to connect; gnsq polls it
        connected = {str(conn) for conn, _ in consumer._connections.items() if conn.is_connected}
        if connected >= set(self.nsqd):
            self._down_since.pop(entity, None)
            return None
        since = self._down_since.setdefault(entity, now)
        if now - since > stale_after:
            return f"no connection to {', '.join(sorted(set(self.nsqd) - connected))} for {now - since:.0f}s"
        return None

    def _not_receiving(self, entity: str, consumer: Any, now: float) -> str | None:
        """Why a running, connected consumer receives nothing, or None if it may."""
        from ._gnsq_fixes import ready_since

        if not consumer.is_running or not consumer.saturated:
            return None  # with more nsqd than max_in_flight, gnsq rotates RDY 1 among them
        for conn in consumer.subscribed_connections():
            since = ready_since(conn)
            if (conn.ready_count == 0 and since is not None and not consumer.in_backoff(conn)
                    and now - since > self.ready_timeout):
                return f"is connected to {conn} but not ready (RDY 0 for {now - since:.0f}s)"
        waiting = self._waiting_since.get(entity)
        if waiting is None:
            return None
        settled = self._settled_since(consumer)
        if settled is None or settled > waiting:
            # It reconnected since (and resynced), or is reconnecting now (and will).
            del self._waiting_since[entity]
            return None
        if now - waiting > self.stall_timeout:
            return (f"has received nothing for {now - waiting:.0f}s while messages "
                    f"this server published wait on its channel")
        return None

    def _settled_since(self, consumer: Any, nsqd: Iterable[str] = ()) -> float | None:
        """When nsqd last acknowledged a SUB of ``consumer``, if all its connections
        (to every nsqd in ``nsqd``, at least) are subscribed; else None."""
        from ._gnsq_fixes import sub_acknowledged_at

        connections = list(consumer._connections)
        subscribed = consumer.subscribed_connections()
        if not subscribed or len(subscribed) != len(connections):
            return None
        if not {str(conn) for conn in subscribed} >= set(nsqd):
            return None
        acknowledged = [sub_acknowledged_at(conn) for conn in subscribed]
        if any(at is None for at in acknowledged):
            return None
        return max(at for at in acknowledged if at is not None)

    def _published(self, topic: str, started: float, producer: Any) -> None:
        """Note that nsqd took messages for ``topic`` sent at ``started``: if this server's
        consumer of it was settled before then, they wait on its channel now."""
        entity = self._entity_of_topic.get(topic)
        consumer = self._consumers.get(entity) if entity is not None else None
        if entity is None or consumer is None or entity in self._waiting_since:
            return
        settled = self._settled_since(consumer, producer.nsqd_tcp_addresses)
        if settled is not None and settled < started:
            self._waiting_since[entity] = started


def _consumer_class() -> Any:
    global _Consumer
    if _Consumer is None:
        from ._gnsq_fixes import Consumer as FixedConsumer

        class Consumer(FixedConsumer):
            """A consumer of one entity's topic that resyncs its bus on every connection."""

            def __init__(self, bus: NsqBus, entity: str, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                self.bus = bus
                self.entity = entity

            def handle_connection_success(self, conn: Any) -> None:
                super().handle_connection_success(conn)
                self.bus._connected(self.entity, str(conn))

            def _poll_lookupd(self) -> None:
                # gnsq's poll, every lookupd_poll_interval; but while lookupd knows no nsqd
                # carrying the topic (nobody has published to it yet, so lookupd answers 404)
                # every lookupd_retry_interval, so that the first notification is not missed
                # for a whole interval. Finding one connects, and connecting resyncs.
                import gevent

                try:
                    while True:
                        if self._connections:
                            jitter = 1 + random.random() * self.lookupd_poll_jitter
                            gevent.sleep(self.lookupd_poll_interval * jitter)
                        else:
                            gevent.sleep(self.bus.lookupd_retry_interval)
                        self.query_lookupd()
                except gevent.GreenletExit:
                    pass

            def query_lookupd(self) -> None:
                lookupd = next(self.iterlookupds)
                try:
                    producers = lookupd.lookup(self.topic)["producers"]
                except Exception as error:
                    # A topic nobody has published to yet is a 404: expected, and retried soon.
                    level = logging.DEBUG if "<404>" in str(error) else logging.WARNING
                    self.logger.log(level, "lookup of %s on %s failed (%s)", self.topic, lookupd.address, error)
                    return
                for producer in producers:
                    self.connect_to_nsqd(producer["broadcast_address"], producer["tcp_port"])

            def _listen(self, conn: Any) -> None:
                # gnsq.Consumer._listen, reading in batches (see _gnsq_batches).
                from ._gnsq_batches import can_batch, listen_in_batches

                if not can_batch(conn):
                    super()._listen(conn)
                    return
                try:
                    listen_in_batches(conn, partial(self.bus._on_messages, self),
                                      partial(self._finish_message, conn, backoff=False))
                except self.bus._gnsq.errors.NSQException as error:
                    self.logger.warning("[%s] connection lost (%r)", conn, error)
                self.handle_connection_failure(conn)

        _Consumer = Consumer
    return _Consumer


_Consumer: Any = None


#: gnsq logs "connection lost" when a connection it is closing on purpose ends;
#: a closed consumer or producer logs here instead, which shows errors only.
_CLOSED_LOGGER = logging.getLogger("entitysync_sync.nsq.closed")
_CLOSED_LOGGER.setLevel(logging.ERROR)


def _close_quietly(client: Any) -> None:
    client.logger = _CLOSED_LOGGER
    client.close()
