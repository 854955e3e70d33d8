"""One websocket client: its secret, its subscriptions and its outgoing queue.

Data flows one way. The websocket handler feeds each client frame to
:meth:`Connection.receive`; the hub calls :meth:`Connection.request_refresh`
when a subscribed key changes. Both only queue work: a single background
worker per busy connection fetches pending keys with this connection's
secret and writes the resulting frames, so a slow fetch or a slow socket
holds up this client alone.

Notifications of a key that arrive while its refresh is pending coalesce into
one refresh; a notification that arrives during a fetch queues another, so
the last frame a client gets for a key always reflects state read after the
last notification. The worker fetches only once the previous frames are
written, so a slow reader receives fewer, fresher frames instead of a
growing backlog.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol, cast

from . import protocol as p
from .concurrency import light_lock
from .exceptions import ProtocolError
from .failures import FetchFailures, failure_message
from .frames import FLUSH, EncodedFrame, SharedFrames
from .hub import Hub
from .keys import EntityKey

log = logging.getLogger("entitysync_sync")


class Transport(Protocol):
    """The socket side of a connection (see :mod:`entitysync_sync.transport`)."""

    def send_text(self, text: str) -> None:
        """Write one text frame completely, or raise ``OSError``/``ConnectionError``."""

    def close(self, code: int, reason: str) -> None:
        """Close without waiting on the peer; wakes anything blocked on the socket."""

    def ping(self) -> bool:
        """Send a ping; False if the previous one was never answered (the peer is gone)."""


class FrameTransport(Transport, Protocol):
    """A transport that can also write frames encoded once for many connections."""

    def send_frame(self, frame: EncodedFrame) -> None:
        """Write one pre-encoded frame completely (or its text, when compressing)."""

    def try_send_frame(self, wire: bytes) -> int | None:
        """Write without waiting: None when nothing was written, else the bytes left to flush."""


class Handlers(Protocol):
    """The application side of a connection (implemented by the extension)."""

    def has_entity(self, entity: str) -> bool:
        """Whether ``entity`` is registered."""

    def authorize(self, key: EntityKey, secret: Any) -> bool:
        """Whether a client holding ``secret`` may subscribe to ``key``."""

    def fetch(self, key: EntityKey, secret: Any) -> p.FetchResult:
        """The row or rows of ``key`` as JSON texts, or ``None`` when it does not exist."""

    def pass_through(self, secret: Any, raw: str) -> bool:
        """Hand a frame without an action to the app; False when no handler is set."""


@dataclass(frozen=True)
class ConnectionLimits:
    """The per-connection settings a :class:`Connection` needs."""

    max_subscriptions: int = 1000
    outbox_limit: int = 1 << 20
    push_on_subscribe: bool = True
    envelope: bool = True
    #: Client frames per second allowed on average (0: no limit) ...
    rate_limit: float = 0.0
    #: ... and at once, after a quiet spell.
    rate_burst: int = 2000
    #: Longest pause, in seconds, between retries of a failed fetch (0: no retries).
    fetch_retry_max: float = 0.0


class Connection:
    """The server's state for one websocket client.

    ``secret`` is the connection's initial secret (from ``@es.identify``); a
    ``secret`` frame replaces it. The secret is handed to fetch and
    authorize and is never logged or shown in ``repr``.
    """

    #: The newest frames of shared fetches per key, waiting for the outbox to empty.
    _shared: dict[EntityKey, SharedFrames] | None = None
    #: Frames waiting to be written, in order; None while there are none (most of the time).
    _outbox: deque[str | EncodedFrame] | None = None

    def __init__(
        self,
        transport: Transport,
        hub: Hub,
        handlers: Handlers,
        limits: ConnectionLimits,
        secret: Any = None,
    ) -> None:
        self._transport = transport
        self._hub = hub
        self._handlers = handlers
        self._limits = limits
        self._secret = secret
        self._generation = 0
        #: The secret and its generation as one value, replaced whole: read without the lock.
        self._member: tuple[Any, int] = (secret, 0)
        self._lock = light_lock()
        self._subscriptions: set[EntityKey] = set()
        self._pending: dict[EntityKey, None] = {}
        #: Versions the client said it holds, each spared once by an equal result.
        self._held: dict[EntityKey, str] = {}
        self._outbox_size = 0
        self._working = False
        self._failures = FetchFailures(limits.fetch_retry_max, hub.tasks)
        self._tokens = float(limits.rate_burst)
        self._tokens_at = time.monotonic()
        #: Set once the connection is closed; it then does nothing more.
        self.closed = False
        #: The close code and reason the server chose, if it closed first.
        self.close_code: int | None = None
        self.close_reason = ""
        #: ``time.monotonic()`` when the frame being written was started, else None.
        self.send_started: float | None = None
        hub.add(self)

    def __repr__(self) -> str:
        return f"<Connection subscriptions={len(self._subscriptions)} closed={self.closed}>"

    @property
    def subscriptions(self) -> frozenset[EntityKey]:
        """The keys this client is subscribed to."""
        with self._lock:
            return frozenset(self._subscriptions)

    # -- frames from the client ------------------------------------------------

    def receive(self, data: str | bytes) -> None:
        """Handle one frame from the client; never raises for bad input."""
        if self.closed:
            return
        if self._limits.rate_limit and not self._take_token():
            self.close(p.CLOSE_POLICY_VIOLATION, "rate limit exceeded")
            return
        try:
            msg = p.decode_client_frame(data)
        except ProtocolError as exc:
            self._error(exc.code, exc.message, exc.ref)
            return
        if isinstance(msg, p.Subscribe):
            self._subscribe(msg.key, msg.ref, msg.version)
        elif isinstance(msg, p.Unsubscribe):
            self._unsubscribe(msg.key, msg.ref)
        elif isinstance(msg, p.SetSecret):
            self._set_secret(msg.secret, msg.ref)
        elif isinstance(msg, p.Ping):
            if self._limits.envelope:
                self._enqueue(p.encode_pong(msg.ref))
        else:
            self._pass_through(msg.raw)

    def _take_token(self) -> bool:
        # A token bucket: rate_burst frames at once, refilled at rate_limit per second.
        now = time.monotonic()
        limits = self._limits
        self._tokens = min(float(limits.rate_burst), self._tokens + (now - self._tokens_at) * limits.rate_limit)
        self._tokens_at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    def _subscribe(self, key: EntityKey, ref: p.Ref, version: str | None = None) -> None:
        if not self._handlers.has_entity(key.entity):
            self._error(p.UNKNOWN_ENTITY, f"no entity {key.entity!r} is registered", ref, key)
            return
        with self._lock:
            known = key in self._subscriptions
            full = len(self._subscriptions) >= self._limits.max_subscriptions
            secret = self._secret
        if not known and full:
            self._error(
                p.TOO_MANY_SUBSCRIPTIONS,
                f"at most {self._limits.max_subscriptions} subscriptions per connection",
                ref,
                key,
            )
            return
        if not self._authorized(key, secret, ref):
            return
        with self._lock:
            if self.closed:
                return
            self._subscriptions.add(key)
            # The version the client holds spares the next push if that push is the same.
            if version is None:
                self._held.pop(key, None)
            else:
                self._held[key] = version
        self._hub.subscribe(self, key)
        self._ack(ref)
        if self._limits.push_on_subscribe:
            self._push_current(key)

    def _authorized(self, key: EntityKey, secret: Any, ref: p.Ref) -> bool:
        try:
            allowed = self._handlers.authorize(key, secret)
        except Exception:
            log.exception("authorize raised for %s", key)
            self._error(p.INTERNAL_ERROR, "authorization failed on the server", ref, key)
            return False
        if not allowed:
            self._error(p.FORBIDDEN, f"not allowed to subscribe to {key}", ref, key)
        return bool(allowed)

    def _unsubscribe(self, key: EntityKey, ref: p.Ref) -> None:
        with self._lock:
            self._subscriptions.discard(key)
            self._pending.pop(key, None)
            self._held.pop(key, None)
            if self._shared:
                self._shared.pop(key, None)
        self._failures.forget(key)
        self._hub.unsubscribe(self, key)
        self._ack(ref)

    def _set_secret(self, secret: str | None, ref: p.Ref) -> None:
        with self._lock:
            self._secret = secret
            self._generation += 1
            self._member = (secret, self._generation)
            keys = list(self._subscriptions)
            # Frames waiting here that were fetched with the old secret go; their keys are fetched again.
            stale = [key for key, shared in (self._shared or {}).items() if shared.personal]
            for key in stale:
                del self._shared[key]  # type: ignore[union-attr]
        # What a client may see depends on its secret: check its subscriptions again.
        kept = []
        for key in keys:
            if self._authorized(key, secret, None):
                kept.append(key)
            else:
                self._unsubscribe(key, None)
        self._ack(ref)
        if self._limits.push_on_subscribe:
            for key in kept:
                self._push_current(key)
        else:
            for key in stale:
                self.request_refresh(key)

    def _pass_through(self, raw: str) -> None:
        with self._lock:
            secret = self._secret
        try:
            handled = self._handlers.pass_through(secret, raw)
        except Exception:
            log.exception("on_message raised")
            self._error(p.INTERNAL_ERROR, "on_message failed on the server")
            return
        if not handled:
            self._error(
                p.BAD_MESSAGE,
                'the frame has no "action" and the server has no on_message handler',
            )

    # -- frames to the client --------------------------------------------------

    def _ack(self, ref: p.Ref) -> None:
        if ref is not None and self._limits.envelope:
            self._enqueue(p.encode_ack(ref))

    def _error(self, code: str, message: str, ref: p.Ref = None, key: EntityKey | None = None) -> None:
        log.debug("client error %s: %s", code, message)
        if self._limits.envelope:
            self._enqueue(p.encode_error(code, message, ref, key))

    def _enqueue(self, frame: str) -> None:
        with self._lock:
            if self.closed:
                return
            overflow = bool(self._outbox) and self._outbox_size + len(frame) > self._limits.outbox_limit
            start = False
            if not overflow:
                self._outbox_for_append().append(frame)
                self._outbox_size += len(frame)
                start, self._working = not self._working, True
        if overflow:
            self.close(p.CLOSE_POLICY_VIOLATION, "outbox limit exceeded")
        elif start:
            self._hub.tasks.spawn(self._work)

    def _push_current(self, key: EntityKey) -> None:
        """Send the current state of ``key``: a shared key's comes from the fan-out's cache or fetch."""
        fanout = self._hub.fanout
        if fanout is not None and fanout.handles(key):
            fanout.subscribe(key, self, self._hub)
        else:
            self.request_refresh(key)

    def request_refresh(self, key: EntityKey) -> None:
        """Schedule a fetch and push of ``key``; coalesces with one already pending."""
        with self._lock:
            if self.closed or key not in self._subscriptions:
                return
            self._pending[key] = None
            if self._working:
                return
            self._working = True
        self._hub.tasks.spawn(self._work)

    def _work(self) -> None:
        while True:
            frame = None
            with self._lock:
                if self.closed:
                    self._working = False
                    return
                if self._outbox:
                    frame = self._outbox[0]
                elif self._shared:
                    # Before refreshes: a refresh taken now reads state newer than these frames.
                    shared = self._shared.pop(next(iter(self._shared)))
                    self._outbox_for_append().extend(shared.frames)
                    self._outbox_size += shared.size
                    continue
                elif self._pending:
                    key = next(iter(self._pending))
                    del self._pending[key]
                    secret, generation = self._secret, self._generation
                else:
                    self._working = False
                    self._outbox = None  # an idle connection keeps no queue
                    return
            if frame is not None:
                if not self._write(frame):
                    return
            else:
                self._refresh(key, secret, generation)

    def _write(self, frame: str | EncodedFrame) -> bool:
        self.send_started = time.monotonic()
        try:
            self._send(frame)
        except Exception as exc:
            self.send_started = None
            log.debug("write failed, closing: %r", exc)
            self.close(p.CLOSE_GOING_AWAY, "write failed")
            with self._lock:
                self._working = False
            return False
        self.send_started = None
        with self._lock:
            if self._outbox:
                self._outbox.popleft()
                self._outbox_size -= len(frame)
        return True

    def _outbox_for_append(self) -> deque[str | EncodedFrame]:
        """With the lock held: the outbox, created on first use."""
        outbox = self._outbox
        if outbox is None:
            outbox = self._outbox = deque()
        return outbox

    def _send(self, frame: str | EncodedFrame) -> None:
        if isinstance(frame, str):
            self._transport.send_text(frame)
        elif hasattr(self._transport, "send_frame"):
            cast(FrameTransport, self._transport).send_frame(frame)
        elif frame.text:
            self._transport.send_text(frame.text)

    def push_shared(self, shared: SharedFrames, generation: int | None = None) -> None:
        """Send the frames of a shared fetch of a subscribed key.

        On an idle connection they are written at once, from the caller's
        greenlet, as far as the socket takes them without waiting; the rest
        goes to this connection's worker. On a busy one they wait, replacing
        older shared frames of the same key, until earlier frames are
        written: a slow reader gets fewer, fresher frames, as with refreshes.

        The write that cannot wait happens under this connection's lock: it
        never blocks, and the lock is taken once per subscriber.
        """
        failed = False
        with self._lock:
            if self.closed or shared.key not in self._subscriptions:
                return
            if generation is not None and generation != self._generation:
                return  # fetched with a secret that is no longer this connection's
            if self._held and shared.version is not None and self._held.pop(shared.key, None) == shared.version:
                return  # the client holds these very rows
            if self._working:
                if self._shared is None:
                    self._shared = {}
                self._shared[shared.key] = shared
                return
            try_send = getattr(self._transport, "try_send_frame", None)
            frames = shared.frames
            try:
                if try_send is not None and len(frames) == 1:  # the common case, inline
                    left = try_send(frames[0].wire)
                    if left == 0:
                        return  # written: the connection stays idle
                    rest = list(frames) if left is None else [FLUSH]
                else:
                    rest = self._write_now(frames)
            except Exception as exc:
                log.debug("write failed, closing: %r", exc)
                failed = True
            else:
                if not rest:
                    return  # all written: the connection stays idle
                self._outbox_for_append().extendleft(reversed(rest))
                self._outbox_size += sum(map(len, rest))
                self._working = True
        if failed:
            self.close(p.CLOSE_GOING_AWAY, "write failed")
            return
        self._hub.tasks.spawn(self._work)

    def cohort_member(self) -> tuple[Any, int] | None:
        """The secret and its generation, for grouping with subscribers holding an equal one."""
        return None if self.closed else self._member

    def push_cohort(self, shared: SharedFrames, generation: int) -> None:
        """Send frames fetched with this connection's secret of ``generation``.

        Dropped if the secret changed since: the secret change refreshes the key itself.
        """
        self._failures.forget(shared.key)
        self.push_shared(shared, generation)

    def cohort_failed(self, key: EntityKey, exc: Exception, generation: int) -> None:
        """A fetch of ``key`` with this connection's secret failed: tell the client once per run, retry."""
        with self._lock:
            if self.closed or generation != self._generation or key not in self._subscriptions:
                return
        if self._failures.failed(key, exc, self._retry, logged=True):
            frames = p.encode_fetch_failed(key, failure_message(key, exc), self._limits.envelope)
            for frame in frames:
                self._enqueue(frame)

    def _write_now(self, frames: tuple[EncodedFrame, ...]) -> list[EncodedFrame]:
        """Write ``frames`` without waiting; the frames still to write (``FLUSH`` first if one was cut).

        Raises what the socket raises.
        """
        try_send = getattr(self._transport, "try_send_frame", None)
        if try_send is None:
            return list(frames)
        for i, frame in enumerate(frames):
            left = try_send(frame.wire)
            if left is None:
                return list(frames[i:])
            if left:
                return [FLUSH, *frames[i + 1 :]]
        return []

    def _refresh(self, key: EntityKey, secret: Any, generation: int) -> None:
        version: str | None = None
        try:
            result = self._handlers.fetch(key, secret)
        except Exception as exc:
            frames = self._fetch_failed(key, exc)
        else:
            self._failures.forget(key)
            if self._limits.envelope:
                version = p.result_version(result)
                frames = p.encode_result(key, result, True, version)
            else:
                frames = p.encode_result(key, result, False)
        with self._lock:
            if self.closed or key not in self._subscriptions or generation != self._generation:
                return  # unsubscribed, or fetched with a secret that is no longer current
            if version is not None and self._held and self._held.pop(key, None) == version:
                return  # the client holds these very rows
            self._outbox_for_append().extend(frames)
            self._outbox_size += sum(map(len, frames))

    def _fetch_failed(self, key: EntityKey, exc: Exception) -> list[str]:
        """Retry later; tell the client of the first failure of a run only."""
        if not self._failures.failed(key, exc, self._retry):
            return []
        return p.encode_fetch_failed(key, failure_message(key, exc), self._limits.envelope)

    def _retry(self, key: EntityKey) -> None:
        if key in self._failures:
            self.request_refresh(key)

    def heartbeat(self) -> None:
        """Ping the client; close the connection if it never answered the last ping."""
        if self.closed:
            return
        try:
            alive = self._transport.ping()
        except Exception:
            alive = False
        if not alive:
            self.close(p.CLOSE_POLICY_VIOLATION, "ping timeout")

    # -- lifecycle -------------------------------------------------------------

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Close the connection and drop its subscriptions; idempotent."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            self.close_code, self.close_reason = code, reason
            subscriptions = list(self._subscriptions)
            self._subscriptions.clear()
            self._pending.clear()
            self._held.clear()
            self._outbox = None
            self._outbox_size = 0
        self._hub.remove(self, subscriptions)
        if code not in (1000, p.CLOSE_GOING_AWAY, p.CLOSE_SERVICE_RESTART):
            log.warning("closing a connection with %d: %s", code, reason)
        try:
            self._transport.close(code, reason)
        except Exception:  # pragma: no cover - the transport swallows its own errors
            log.debug("transport close failed", exc_info=True)

    def check_send_timeout(self, now: float, timeout: float) -> None:
        """Close the connection if one frame has been writing for over ``timeout`` seconds."""
        started = self.send_started
        if started is not None and now - started > timeout:
            self.close(p.CLOSE_POLICY_VIOLATION, "send timed out")
