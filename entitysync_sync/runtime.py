"""The per-app runtime: the bus, the hub, the shared fan-out and the metrics of one app.

:class:`Runtime` is what :class:`~entitysync_sync.EntitySync` keeps for each
app it is registered on (``app.extensions["entitysync"]``, or
``es.runtime(app)``). It starts its background work lazily, once per
process; drains on shutdown; and on :meth:`Runtime.close` stops and joins
every greenlet or thread it started.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
import time
from typing import Any, Sequence

from flask import Flask

from . import protocol as p
from .bus import Bus, bus_from_url
from .cohorts import Cohorts
from .concurrency import OncePerProcess, Tasks
from .connection import ConnectionLimits
from .exceptions import ConfigError
from .fanout import Fanout
from .hub import Hub
from .keys import EntityKey
from .lanes import Lanes
from .metrics import MeteredSink, Metrics, collect
from .registry import AppHandlers, Registry
from .settings import Settings

log = logging.getLogger("entitysync_sync")

#: The key of an app's :class:`Runtime` in ``app.extensions``.
EXTENSION_NAME = "entitysync"

#: Seconds :meth:`Runtime.close` waits for the background work to end.
JOIN_TIMEOUT = 5.0


class Runtime:
    """One app's hub, bus, fan-out, metrics and settings, and everything they run."""

    def __init__(self, registry: Registry, app: Flask, settings: Settings, bus: Bus | None = None) -> None:
        self.registry = registry
        self.app = app
        self.settings = settings
        self.metrics = Metrics()
        self.handlers = AppHandlers(registry, app, settings.fetch_timeout, self.metrics)
        self.limits = ConnectionLimits(
            max_subscriptions=settings.max_subscriptions,
            outbox_limit=settings.outbox_limit,
            push_on_subscribe=settings.push_on_subscribe,
            envelope=settings.envelope,
            rate_limit=settings.rate_limit,
            rate_burst=settings.rate_burst,
            fetch_retry_max=settings.fetch_retry_max,
        )
        self._bus_given = bus is not None
        self.bus = bus if bus is not None else self._make_bus()
        #: A second, receive-only bus on ``ENTITYSYNC_PG_LISTEN_URL``, or None.
        self.pg_listener = self._make_pg_listener()
        self._build()
        self._start = OncePerProcess()
        self.closed = False
        #: Set when the server shuts down: websockets are closed, notify still works.
        self.draining = False
        self._drain_seconds = settings.drain_seconds
        registry.listeners.append(self._entity_added)

    def _build(self) -> None:
        """The parts that hold connections and background work (again in a forked child)."""
        self.tasks = Tasks("entitysync")
        # One queue for every refresh, shared and per-user, so a burst of either waits its turn.
        lanes = Lanes(self.tasks, self.handlers.run)
        self.fanout = Fanout(self.handlers, self.tasks, self.settings.envelope, self.settings.fetch_retry_max,
                             self.settings.shared_cache_size, lanes)
        self.cohorts = Cohorts(self.handlers, self.tasks, self.settings.envelope, self.settings.batch_size, lanes)
        self.hub = Hub(self.tasks, self.fanout, self.cohorts, interest=self.bus.key_interest)

    def _make_bus(self) -> Bus:
        return bus_from_url(self.settings.bus_url, buffer_size=self.settings.publish_buffer,
                            topic_prefix=self.settings.topic_prefix)

    def _make_pg_listener(self) -> Bus | None:
        url = self.settings.pg_listen_url
        if url is None:
            return None
        return bus_from_url(url, buffer_size=self.settings.publish_buffer, topic_prefix=self.settings.topic_prefix)

    def receiving_buses(self) -> list[Bus]:
        """The bus, and the PostgreSQL listener if there is one: every bus this process receives from."""
        return [self.bus] if self.pg_listener is None else [self.bus, self.pg_listener]

    def listened_database(self) -> Any:
        """The PostgreSQL bus this process receives from (the bus, or the listener on
        ``ENTITYSYNC_PG_LISTEN_URL``), for notifications sent inside transactions; or None."""
        for bus in self.receiving_buses():
            if hasattr(bus, "database_identity"):
                return bus
        return None

    # -- start -----------------------------------------------------------------

    def ensure_started(self) -> None:
        """Start the bus and the sweeper on first use, in the serving process (see
        :class:`~entitysync_sync.concurrency.OncePerProcess`)."""
        if self.closed:
            raise ConfigError("this EntitySync was closed; no new connections or notifications")
        self._start.run(self._started)

    def _started(self, forked: bool) -> None:
        if self.closed:
            raise ConfigError("this EntitySync was closed; no new connections or notifications")
        if forked:
            if self._bus_given:
                raise ConfigError(
                    "the bus passed to EntitySync(bus=...) was started before this process "
                    "forked; use ENTITYSYNC_BUS_URL, or do not notify while the app is created"
                )
            log.info("process forked after the bus started; starting a fresh bus")
            self.bus = self._make_bus()
            self.pg_listener = self._make_pg_listener()
            self._build()
        sink = MeteredSink(lambda: self.hub, self.metrics)
        self.bus.start(sink, sorted(self.registry.entities))
        atexit.register(self.bus.close)  # a last attempt to publish what is buffered
        log.info("entitysync started in process %d on %s", os.getpid(), self.bus.describe())
        if self.pg_listener is not None:
            self.pg_listener.start(sink, sorted(self.registry.entities))
            log.info("entitysync also listens to %s", self.pg_listener.describe())
        self.tasks.spawn(self._sweep)
        arbiter = _gunicorn_arbiter()  # a scan of the heap: once per process
        workers = None if arbiter is None else int(arbiter.num_workers)
        if arbiter is not None:
            self._drain_seconds = _within_graceful_timeout(self.settings.drain_seconds, arbiter)
            self._drain_on_shutdown_signals()
        if getattr(self.bus, "in_process", False) and workers is not None and workers > 1:
            log.warning(
                "ENTITYSYNC_BUS_URL is %s but gunicorn runs %d workers: a notify reaches only "
                "the clients of the worker that made it. Use a redis:// or nsq:// bus to "
                "reach every worker and server.", self.settings.bus_url, workers)

    def _entity_added(self, name: str) -> None:
        if self._start.started:
            for bus in self.receiving_buses():
                bus.add_entity(name)

    # -- notify ----------------------------------------------------------------

    def publish(self, keys: Sequence[EntityKey]) -> None:
        """Send ``keys`` (already validated and stamped) to every server; returns at once."""
        self.ensure_started()
        self.bus.publish(keys)
        self.metrics.count("notifications_published", len(keys))

    def publish_entities(self, entities: Sequence[str]) -> None:
        """Ask every server to refresh every subscribed key of ``entities``; returns at once."""
        self.ensure_started()
        self.bus.publish_entities(entities)

    def stats(self) -> dict[str, Any]:
        """The figures of :meth:`EntitySync.stats() <entitysync_sync.EntitySync.stats>`."""
        return {**collect(self.hub, self.bus, self.metrics, self.pg_listener), **self.fanout.stats(),
                **self.cohorts.stats(), "draining": int(self.draining)}

    # -- housekeeping ----------------------------------------------------------

    def _sweep(self) -> None:
        interval = min(1.0, self.settings.send_timeout / 4)
        ping_every = self.settings.ping_interval
        if ping_every:
            interval = min(interval, ping_every)
        next_ping = time.monotonic() + ping_every
        while not self.tasks.wait(interval):
            try:
                self.hub.sweep(self.settings.send_timeout)
                if ping_every and time.monotonic() >= next_ping:
                    next_ping += ping_every
                    self.hub.heartbeat()
            except Exception:  # one bad connection must not end pings and send timeouts for all
                log.exception("the connection sweeper failed; it carries on")

    def _drain_on_shutdown_signals(self) -> None:
        """Close websockets with 1012 as soon as the gunicorn worker is told to stop.

        gunicorn stops accepting and then waits up to ``--graceful-timeout``
        for open requests; a websocket never ends by itself, so without this
        its clients would wait that long and then see the connection drop.
        Closed with 1012 (service restart), spread over
        ``ENTITYSYNC_DRAIN_SECONDS``, they reconnect to a worker that is
        staying, a few at a time.
        """
        for signum in (signal.SIGTERM, signal.SIGQUIT, signal.SIGINT):
            previous = signal.getsignal(signum)

            def handler(num: int, frame: Any, previous: Any = previous) -> None:
                self.tasks.spawn(self.drain)
                if callable(previous):
                    previous(num, frame)

            try:
                signal.signal(signum, handler)
            except ValueError:  # not the main thread: leave shutdown to the server
                log.debug("cannot watch shutdown signals from this thread")
                return

    def drain(self) -> None:
        """Refuse new websockets and close every open one with 1012 (service restart), spread
        over ``ENTITYSYNC_DRAIN_SECONDS``; returns at once. Notify keeps working."""
        if self.draining:
            return
        self.draining = True
        seconds = self._drain_seconds
        log.info("shutting down: closing %d websocket(s) with 1012 over %gs", self.hub.connection_count, seconds)
        self.tasks.spawn(self.hub.close_all, p.CLOSE_SERVICE_RESTART, "server restarting", seconds)

    def close(self, timeout: float = JOIN_TIMEOUT) -> bool:
        """Close every connection with 1001, stop the bus, and stop and join every task.

        Returns True if all background work ended within ``timeout`` seconds.
        """
        self.closed = True
        self.hub.close_all(p.CLOSE_GOING_AWAY, "server shutting down")
        for bus in self.receiving_buses():
            bus.close()
        return self.tasks.close(timeout)



def _gunicorn_arbiter() -> Any:
    """The arbiter of the gunicorn that forked this process, or None outside gunicorn.

    gunicorn keeps no global for it; its arbiter object survives in a forked
    worker's memory, so it is looked up there, only when gunicorn is loaded.
    """
    arbiter = sys.modules.get("gunicorn.arbiter")
    if arbiter is None:
        return None
    import gc

    for obj in gc.get_objects():
        if isinstance(obj, arbiter.Arbiter):
            return obj
    return None


def _within_graceful_timeout(seconds: float, arbiter: Any) -> float:
    """``seconds``, shortened to end a second before gunicorn's ``--graceful-timeout`` kills the worker."""
    graceful = getattr(getattr(arbiter, "cfg", None), "graceful_timeout", None)
    if not isinstance(graceful, (int, float)) or seconds <= graceful - 1:
        return seconds
    limit = max(0.0, float(graceful) - 1)
    log.info("ENTITYSYNC_DRAIN_SECONDS is %g but gunicorn's --graceful-timeout is %g: "
             "websockets will be closed over %gs", seconds, graceful, limit)
    return limit
