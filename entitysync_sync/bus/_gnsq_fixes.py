"""Workarounds for gnsq 1.0.2's consumer, each with the bug it covers.

:class:`Consumer` is a ``gnsq.Consumer`` that keeps one rule gnsq does not:
a connection's ``ready_count`` is the RDY count nsqd was actually sent on that
connection, never more. Every fix below serves it:

1. ``NsqdTCPClient.ready()`` sets ``ready_count`` *before* it sends. When the
   send fails, gnsq believes nsqd has a RDY count it never got, and since its
   redistribution skips a connection whose count already equals the wanted
   one, it never sends it again: the connection stays at RDY 0 on nsqd, which
   holds every message for it, forever. Here the count is recorded only after
   the send succeeded; a failed send leaves it at what nsqd last got.
2. ``Consumer.connect_to_nsqd()`` puts a new connection in the consumer's set
   (state INIT) before ``connect()`` has made its stream and before it has
   sent SUB. A RDY redistribution in that window (gnsq's RDY poll runs every
   5 s, the same as the default reconnect backoff, so it often lands there)
   sends on a connection without a stream (``AttributeError``), or RDY before
   SUB, which nsqd answers with a fatal ``E_INVALID``. Here RDY goes only to
   connections that have subscribed.
3. nsqd starts every connection at RDY 0, so a connection's count is reset to
   0 when it succeeds, whatever was recorded before.
4. Any exception other than ``NSQSocketError`` raised while sending RDY ends
   gnsq's RDY greenlet (gnsq pull request 32), after which the consumer never
   sends RDY again. Here such an error is logged at WARNING and the
   redistribution goes on with the next connection.
5. gnsq logs warnings with ``Logger.warn``, deprecated since Python 3.3, which
   raises a ``DeprecationWarning`` on every call. :class:`Consumer` and
   :class:`Producer` wrap whatever logger they are given in an adapter whose
   ``warn`` is ``warning``.

It also records, per connection, when it subscribed and when nsqd
acknowledged the SUB, which the bus's supervisor uses to tell a consumer that
is settled from one that is still connecting.

Import this module only once gnsq is known to be installed.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import gnsq
import gnsq.protocol
import gnsq.states

log = logging.getLogger("entitysync_sync")

#: The response nsqd sends to SUB (and to nothing else a consumer sends).
_SUB_OK = b"OK"


def subscribed_at(conn: Any) -> float | None:
    """When ``conn`` sent SUB (``time.monotonic()``), or None while it is still connecting."""
    return getattr(conn, "es_subscribed_at", None)


def sub_acknowledged_at(conn: Any) -> float | None:
    """When nsqd acknowledged ``conn``'s SUB, or None if it has not yet."""
    return getattr(conn, "es_sub_acknowledged_at", None)


def ready_since(conn: Any) -> float | None:
    """When ``conn``'s RDY count last changed (or it subscribed), or None before that."""
    return getattr(conn, "es_ready_since", None)


class _Logger(logging.LoggerAdapter):  # type: ignore[type-arg]
    """A logger whose ``warn`` is ``warning`` (fix 5)."""

    def warn(self, msg: object, *args: Any, **kwargs: Any) -> None:
        self.warning(msg, *args, **kwargs)


class _ModernLogging:
    """Wraps every logger gnsq (or a caller) assigns to ``self.logger`` in a :class:`_Logger` (fix 5)."""

    _es_logger: _Logger

    @property
    def logger(self) -> _Logger:
        return self._es_logger

    @logger.setter
    def logger(self, logger: logging.Logger | _Logger) -> None:
        self._es_logger = logger if isinstance(logger, _Logger) else _Logger(logger, {})


class Producer(_ModernLogging, gnsq.Producer):  # type: ignore[misc]
    """A ``gnsq.Producer`` that logs without deprecation warnings (fix 5)."""


class Consumer(_ModernLogging, gnsq.Consumer):  # type: ignore[misc]
    """A ``gnsq.Consumer`` whose RDY counts are only ever those nsqd was sent."""

    def handle_connection_success(self, conn: Any) -> None:
        now = time.monotonic()
        conn.ready_count = 0  # fix 3: nsqd starts every connection at RDY 0
        conn.es_subscribed_at = now
        conn.es_ready_since = now
        conn.es_sub_acknowledged_at = None
        super().handle_connection_success(conn)

    def handle_response(self, conn: Any, response: bytes) -> None:
        # IDENTIFY's answer is read before the connection succeeds; the first
        # OK after that answers SUB.
        if response == _SUB_OK and subscribed_at(conn) is not None and sub_acknowledged_at(conn) is None:
            conn.es_sub_acknowledged_at = time.monotonic()
        super().handle_response(conn, response)

    def subscribed_connections(self) -> list[Any]:
        """The connections that are connected and have sent SUB."""
        return [conn for conn in list(self._connections)
                if conn.is_connected and subscribed_at(conn) is not None]

    def _redistribute_ready_state(self) -> None:
        # gnsq's RDY poll and redistribution event call this; it must never raise (fix 4).
        try:
            self.send_ready_state()
        except Exception as exc:
            log.warning("NSQ RDY redistribution for %s failed (%r); gnsq retries within 5s", self.topic, exc)

    def send_ready_state(self, resend: bool = False) -> None:
        """Send each subscribed connection the RDY count gnsq wants for it.

        A connection already at that count is skipped unless ``resend``: then
        every subscribed connection is sent its count again (nsqd ignores a
        RDY that changes nothing).
        """
        if not self.is_running:
            return
        if len(self._connections) > self.max_in_flight:
            wanted = self._get_unsaturated_ready_state()
        else:
            wanted = self._get_saturated_ready_state()
        for conn, count in wanted.items():
            if subscribed_at(conn) is None or not conn.is_connected:
                continue  # fix 2: no stream yet, or no SUB yet; it gets RDY when it succeeds
            if conn.ready_count == count and not resend:
                continue
            self.send_ready(conn, count)

    def send_ready(self, conn: Any, count: int) -> bool:
        """Send ``RDY count`` on ``conn``; record it only if the send succeeded (fix 1)."""
        try:
            conn.send(gnsq.protocol.ready(count))
        except Exception as exc:
            # gnsq closes the stream on a failed send; the connection is then
            # replaced and starts again at RDY 0.
            log.warning("NSQ RDY %d to %s for %s failed (%r)", count, conn, self.topic, exc)
            return False
        if conn.ready_count != count:
            conn.es_ready_since = time.monotonic()
        conn.ready_count = count
        return True

    def in_backoff(self, conn: Any) -> bool:
        """Whether gnsq holds ``conn`` at RDY 0 on purpose (message backoff)."""
        return bool(self._connections.get(conn) == gnsq.states.BACKOFF)

    @property
    def saturated(self) -> bool:
        """Whether every connection may have RDY > 0 at once (not more connections than max_in_flight)."""
        return bool(len(self._connections) <= self.max_in_flight)
