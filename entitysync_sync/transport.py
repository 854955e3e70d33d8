"""The socket side of a connection: the websocket's one reader and its serialised writers.

The upgrade is accepted by flask-sock's route, through simple-websocket,
which reads the handshake from the WSGI environ and answers it on the
socket. Its per-connection reader thread is never started
(:attr:`WebSocketTransport.SERVER_OPTIONS`): the websocket
handler's own greenlet or thread reads the socket (:meth:`WebSocketTransport.receive`),
so a connection costs one greenlet under ``gunicorn -k gevent`` instead of
two, and the handshake's objects are released once it is done. Frames are
then parsed and written with wsproto's connection, which simple-websocket
hands over.

Several greenlets or threads write to one socket (the connection's worker,
the shared fan-out, the heartbeat, the reader answering pings), so every
write is a whole ``sendall`` under one lock, and frames are never
interleaved. Under gevent, the shared fan-out writes pre-encoded frames to an
idle socket without taking the lock at all (:meth:`WebSocketTransport.try_send_frame`):
a write that never waits cannot be interrupted by another greenlet.

This module is the only one that knows simple-websocket and wsproto; the
websocket handler (:mod:`entitysync_sync.endpoint`) reaches them only
through this class. :data:`SIMPLE_WEBSOCKET_RANGE` names the versions whose
behaviour it relies on (``tests/test_transport_contract.py`` checks it).
"""

from __future__ import annotations

import _socket
import logging
import select
import socket
import time
from typing import Any

from simple_websocket import ConnectionClosed
from wsproto.connection import Connection as WsConnection
from wsproto.connection import ConnectionState
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage
from wsproto.utilities import LocalProtocolError

from .concurrency import gevent_active, light_lock
from .frames import EncodedFrame

log = logging.getLogger("entitysync_sync")

#: Least seconds a closed connection waits for the peer's close frame before the
#: socket is shut for reading too.
CLOSE_LINGER = 2.0
#: Seconds a close waits, by default, for a frame being written to finish before
#: giving up on the close frame. The extension passes ENTITYSYNC_SEND_TIMEOUT:
#: a client that reads, however slowly, gets its close frame after the frames
#: before it, as long as each is written within the send timeout.
CLOSE_WAIT = 1.0
#: Bytes read from the socket at once.
RECV_BYTES = 16384
#: The simple-websocket versions this module is written against (``install_requires`` pins the same).
SIMPLE_WEBSOCKET_RANGE = (">=1.0", "<2")


class FrameTooBig(Exception):
    """A client message grew past the limit while it was being read; close with 1009."""


class _NoReaderThread:
    """simple-websocket's ``thread_class``: the reader thread it asks for, never started.

    ``simple_websocket.Server`` creates its reader as ``thread_class(target=...)``,
    sets its ``name`` and calls ``start()``; this class does nothing there, and
    the websocket handler reads the socket itself.
    """

    __slots__ = ("name",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.name = "entitysync-reader"

    def start(self) -> None:
        """Start nothing: :meth:`WebSocketTransport.receive` reads the socket."""


class _NoEvent:
    """simple-websocket's ``event_class``: its reader's wake-up event, never used here."""

    __slots__ = ()

    def set(self) -> None: ...

    def clear(self) -> None: ...

    def wait(self, timeout: float | None = None) -> bool:
        return False



class WebSocketTransport:
    """One websocket: a single reader, whole-frame serialised writes and a close that never blocks."""

    _deflate: bool | None = None
    _nowait: bool | None = None
    #: The socket's own non-blocking send, under gevent (see :meth:`try_send_frame`).
    _send_nowait: Any = None
    #: Parts of a message being received in fragments.
    _fragments: list[str | bytes] | None = None
    _fragments_size = 0
    #: Messages read from the socket but not yet returned by :meth:`receive`.
    _inbox: list[str | bytes] | None = None
    #: The end of a frame whose start was written without waiting; written before anything else.
    _residue = b""
    #: The timer that stops reading once a close frame has waited ``linger`` for its answer.
    _linger_timer: Any = None

    #: The ``simple_websocket.Server`` options that leave its reader thread unstarted,
    #: so that :meth:`adopt` can take the socket over. flask-sock passes the app's
    #: ``SOCK_SERVER_OPTIONS`` to the server it builds for a route.
    SERVER_OPTIONS: dict[str, Any] = {"thread_class": _NoReaderThread, "event_class": _NoEvent}

    def __init__(self, sock: Any, proto: WsConnection, tasks: Any,
                 max_message_bytes: int | None = None, close_wait: float = CLOSE_WAIT) -> None:
        self._raw = sock
        self._proto = proto
        self._tasks = tasks
        self._max_message = max_message_bytes or 0
        self._close_wait = close_wait
        self._lock = light_lock()
        #: Set while a blocking write holds the lock; a write that cannot wait checks it instead.
        self._busy = False
        #: Whether frames may still be written: no close frame sent, the peer's not read.
        self._open = True
        #: The reader saw the end of the stream, or the peer's close frame.
        self._eof = False
        self._close_sent = False
        #: The code and reason of the first close asked for; the one the client must get.
        self._close_wanted: tuple[int, str] | None = None
        #: Whether the last ping was answered.
        self._pong = True

    @classmethod
    def adopt(cls, ws: Any, tasks: Any, max_message_bytes: int | None = None,
              close_wait: float = CLOSE_WAIT) -> WebSocketTransport:
        """Take over the socket of ``ws``, a ``simple_websocket.Server`` built with
        :attr:`SERVER_OPTIONS` whose handshake is done.

        Only the socket and wsproto's connection are kept: ``ws`` is marked
        closed (so a later ``ws.close()``, as flask-sock makes after the
        route, writes nothing) and its handshake's objects are let go.
        Raises :class:`RuntimeError` if ``ws`` started a reader of its own:
        two readers of one socket would steal each other's frames.
        """
        if not isinstance(getattr(ws, "thread", None), _NoReaderThread):
            raise RuntimeError(
                "the websocket server started its own reader thread: SOCK_SERVER_OPTIONS was "
                "replaced after EntitySync.init_app; update it in place, or set it before init_app")
        proto = ws.ws.connection
        if proto is None or not ws.connected:  # pragma: no cover - Server raises first
            raise ConnectionError("the websocket handshake did not complete")
        ws.connected = False
        sock = ws.sock
        ws.ws = ws.environ = ws.input_buffer = None
        return cls(sock, proto, tasks, max_message_bytes, close_wait)

    @classmethod
    def accept(cls, environ: dict[str, Any], tasks: Any, max_message_bytes: int | None = None,
               close_wait: float = CLOSE_WAIT) -> WebSocketTransport:
        """Answer the websocket handshake of the request ``environ`` and return its transport
        (what flask-sock's route and :meth:`adopt` do together).

        Raises what ``simple_websocket.Server`` raises for a request it cannot upgrade.
        """
        from simple_websocket import Server

        return cls.adopt(Server(environ, **cls.SERVER_OPTIONS), tasks, max_message_bytes, close_wait)

    # -- reading ---------------------------------------------------------------

    def receive(self, timeout: float | None = None) -> str | bytes | None:
        """The next client message; None after ``timeout`` seconds, or once the stream is closed
        (then :attr:`connected` is False). Only the websocket handler calls this.

        Pings are answered and pongs noted on the way. Raises :class:`FrameTooBig`
        when a message grows past ``max_message_bytes`` while it arrives.
        """
        while True:
            inbox = self._inbox
            if inbox:
                return inbox.pop(0)
            if self._eof:
                return None
            if timeout is not None and not self._readable(timeout):
                return None
            try:
                data = self._raw.recv(RECV_BYTES)
            except OSError:
                data = b""
            if not data:
                self._eof = True
                self._open = False
                return None
            self._take(data)

    def _readable(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for input without touching the socket's own timeout,
        which would bound the writers' ``sendall`` too."""
        if gevent_active():
            from gevent.socket import wait_read

            try:
                wait_read(self._raw.fileno(), timeout)
            except TimeoutError:
                return False
            except OSError:
                return True  # the recv that follows reports it
            return True
        if not hasattr(select, "poll"):  # pragma: no cover - Windows
            return bool(select.select([self._raw], [], [], timeout)[0])
        poller = select.poll()
        poller.register(self._raw.fileno(), select.POLLIN)
        return bool(poller.poll(timeout * 1000))

    def _take(self, data: bytes) -> None:
        """Feed ``data`` to the protocol and act on its events."""
        proto = self._proto
        try:
            proto.receive_data(data)
        except LocalProtocolError:  # input after the connection closed
            self._eof = True
            return
        for event in proto.events():
            if isinstance(event, (TextMessage, BytesMessage)):
                self._take_message(event)
            elif isinstance(event, Ping):
                self._write_control(event.response())
            elif isinstance(event, Pong):
                self._pong = True
            elif isinstance(event, CloseConnection):
                # The peer's close, or its answer to ours; a protocol error in
                # its frames also arrives as one (code 1002, 1007 ...).
                if proto.state is not ConnectionState.CLOSED:
                    self._write_control(event.response(), closing=True)
                self._eof = True
                self._open = False
                return

    def _take_message(self, event: TextMessage | BytesMessage) -> None:
        data = event.data
        size = self._fragments_size + len(data)
        if self._max_message and size > self._max_message:
            self._fragments, self._fragments_size = None, 0
            raise FrameTooBig()
        if event.message_finished and self._fragments is None:
            message: str | bytes = data if isinstance(data, str) else bytes(data)
        else:
            if self._fragments is None:
                self._fragments = []
            self._fragments.append(data if isinstance(data, str) else bytes(data))
            self._fragments_size = size
            if not event.message_finished:
                return
            parts, self._fragments, self._fragments_size = self._fragments, None, 0
            message = "".join(parts) if isinstance(data, str) else b"".join(parts)  # type: ignore[arg-type]
        if self._inbox is None:
            self._inbox = []
        self._inbox.append(message)

    @property
    def connected(self) -> bool:
        """Whether the websocket is open: neither side has closed it."""
        return self._open

    # -- writing ---------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        """With the lock held: write what is left of a cut frame, then ``data``."""
        if self._residue:
            residue, self._residue = self._residue, b""
            self._raw.sendall(residue)
        if data:
            self._raw.sendall(data)

    def _write_control(self, event: Any, closing: bool = False) -> None:
        """Answer a ping, or the peer's close, from the reader; nothing follows a close frame."""
        with self._lock:
            self._busy = True
            try:
                if not self._open or self._close_sent:
                    return
                if closing:
                    self._close_sent = True
                    self._open = False
                self._write(self._proto.send(event))
            except (OSError, LocalProtocolError):
                self._open = False
            finally:
                self._busy = False

    def send_text(self, text: str) -> None:
        """Write one text frame (compressed if the client negotiated it)."""
        with self._lock:
            self._busy = True
            try:
                if not self._open:
                    raise ConnectionClosed()
                self._write(self._proto.send(TextMessage(data=text)))
            finally:
                self._busy = False

    def send_frame(self, frame: EncodedFrame) -> None:
        """Write one frame encoded once for many connections, completely.

        Its bytes are written as they are unless this connection compresses,
        which needs its own encoding of the text. An empty frame only
        finishes a frame that :meth:`try_send_frame` started.
        """
        if frame.wire and self._compressing():
            self.send_text(frame.text)
            return
        with self._lock:
            self._busy = True
            try:
                if frame.wire and not self._open:
                    raise ConnectionClosed()
                self._write(frame.wire)
            finally:
                self._busy = False

    def try_send_frame(self, wire: bytes) -> int | None:
        """Write a pre-encoded frame without waiting, if the socket takes it now.

        Returns None when nothing was written (another write is in progress,
        the connection compresses, the socket's buffer is full, or the server
        is not running under gevent), so the caller queues the frame instead.
        Otherwise returns how many bytes are left; they are kept and written
        before any other bytes, by the next write or by ``send_frame(FLUSH)``.

        Under gevent no other greenlet runs between the checks and the
        non-blocking send, so no lock is taken: a blocking writer marks
        itself ``_busy`` while it holds the lock.
        """
        send = self._send_nowait
        if send is None:
            if self._nowait is None:
                self._nowait = self._nowait_possible()
            if not self._nowait:
                return None
            send = self._send_nowait
        if self._busy or self._residue or not self._open:
            return None
        try:
            sent: int = send(wire)
        except BlockingIOError:
            return None
        if sent < len(wire):
            self._residue = wire[sent:]
        return len(wire) - sent

    def _nowait_possible(self) -> bool:
        """Whether writes that cannot wait are possible: a gevent socket, no compression."""
        raw = self._raw
        if not (gevent_active() and type(raw).__module__.startswith("gevent") and not self._compressing()):
            return False
        # gevent's socket wraps a non-blocking one of the standard library's;
        # its own send is a Python method around that one's.
        inner = getattr(raw, "_sock", None)
        if isinstance(inner, _socket.socket) and inner.gettimeout() == 0.0:
            self._send_nowait = inner.send
        else:  # pragma: no cover - another gevent socket: its own send with a zero timeout
            self._send_nowait = lambda data: raw.send(data, 0, 0.0)
        return True

    def _compressing(self) -> bool:
        """Whether this connection negotiated permessage-deflate (or it cannot be told)."""
        compressing = self._deflate
        if compressing is None:
            try:
                compressing = bool(self._proto._proto.extensions)
            except AttributeError:
                compressing = True
            self._deflate = compressing
        return compressing

    def ping(self) -> bool:
        """Send a ping frame; False if the previous ping was never answered.

        Never blocks: while a frame is being written no ping is sent.
        """
        if not self._lock.acquire(blocking=False):
            return True  # a frame is being written; the send timeout watches that
        self._busy = True
        try:
            if not self._open:
                return True  # closing: the handler ends the stream, and no ping may follow a close frame
            if self._residue:
                return True  # a frame is half written; the send timeout watches that
            if not self._pong:
                return False
            self._pong = False
            self._write(self._proto.send(Ping()))
        finally:
            self._busy = False
            self._lock.release()
        return True

    # -- closing ---------------------------------------------------------------

    def close(self, code: int, reason: str) -> None:
        """Send a close frame once no write is in progress; never blocks the caller.

        If a frame is being written (or was left half written by
        :meth:`try_send_frame`), the close frame follows it from a greenlet
        or thread of its own. The websocket handler calls :meth:`finish`
        before it returns, which completes the close and ends the stream.
        """
        if self._close_wanted is None:
            self._close_wanted = (code, reason)
        if self._lock.acquire(blocking=False):
            if not self._residue:
                self._busy = True
                self._close_holding_lock(code, reason)
                return
            self._lock.release()
        self._tasks.spawn(self._close_after_write, code, reason)

    def _close_after_write(self, code: int, reason: str) -> None:
        """Wait up to ``close_wait`` for a write in progress, then send the close frame."""
        if self._lock.acquire(timeout=self._close_wait):
            self._busy = True
            if self._finish_residue(time.monotonic() + self._close_wait):
                self._close_holding_lock(code, reason)
                return
            self._busy = False
            self._lock.release()
        # A writer stuck on a stalled client: no close frame can follow a half
        # written frame. Shutting the socket wakes the writer and the reader.
        self._shutdown(socket.SHUT_RDWR)

    def _finish_residue(self, deadline: float) -> bool:
        """With the lock held: write the end of a half written frame, until ``deadline``."""
        while self._residue:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                sent = self._raw.send(self._residue, 0, remaining)  # gevent's socket
            except BlockingIOError:
                continue
            except OSError:
                return False
            self._residue = self._residue[sent:]
        return True

    def _close_holding_lock(self, code: int, reason: str) -> None:
        try:
            if self._open and not self._residue:
                self._open = False
                self._close_sent = True
                self._write(self._proto.send(CloseConnection(code, reason)))
                self._linger()
        except Exception:
            log.debug("sending a close frame failed", exc_info=True)
        finally:
            self._busy = False
            self._lock.release()

    def _linger(self) -> None:
        """Under gevent: stop the reader if the peer has not answered our close within CLOSE_LINGER.

        The reader waits on the socket without a timeout; once the close frame
        is out, a timer (no greenlet) shuts the socket for reading after the
        linger, which ends that wait. Threads poll instead (see
        :func:`entitysync_sync.endpoint.serve`).
        """
        if self._eof or self._linger_timer is not None or not gevent_active():
            return
        import gevent

        timer = gevent.get_hub().loop.timer(max(CLOSE_LINGER, self._close_wait))
        self._linger_timer = timer
        timer.start(self._stop_reading)

    def _stop_reading(self) -> None:
        self._linger_timer = None
        if not self._eof:
            self._shutdown(socket.SHUT_RD)

    def finish(self, linger: float | None = None) -> None:
        """End the stream; the websocket handler calls this last, before it returns.

        Once this returns no byte can be written to the stream: not a frame of
        ours, not the HTTP response that Werkzeug's development server writes
        after the handler. So the close frame the server decided is the last
        thing the client reads. In order:

        * a close frame still waiting for a write in progress is sent, waiting
          up to ``close_wait`` for that write (the handler may block, its
          caller may not); with no close decided, the close is 1000;
        * input is then read and discarded until the peer's close frame or
          end of stream, within ``linger`` seconds (by default the larger of
          CLOSE_LINGER and ``close_wait``): closing a socket with unread input
          makes the kernel reset the connection, and a reset can destroy the
          close frame before a client that is still sending (a flood, say)
          has read it. The handler is the socket's only reader, so this
          never competes with another (two readers raise gevent's
          ConcurrentObjectUseError);
        * the socket is shut down both ways; the server closes it.
        """
        if linger is None:
            linger = max(CLOSE_LINGER, self._close_wait)
        deadline = time.monotonic() + linger
        if self._open and self._lock.acquire(timeout=self._close_wait):
            self._busy = True
            if not self._close_sent and self._open and self._finish_residue(deadline):
                # A close still waiting for a write, or none at all (1000).
                self._close_holding_lock(*(self._close_wanted or (1000, "")))
            else:
                self._busy = False
                self._lock.release()
        self._open = False
        timer, self._linger_timer = self._linger_timer, None
        if timer is not None:
            timer.close()
        if not self._eof:
            self._discard_input(deadline)
        self._shutdown(socket.SHUT_RDWR)

    def _discard_input(self, deadline: float) -> None:
        """Read until the peer's close frame, end of stream or ``deadline``."""
        proto = self._proto
        if _peer_closed(proto):
            return
        try:
            while (remaining := deadline - time.monotonic()) > 0:
                self._raw.settimeout(remaining)
                data = self._raw.recv(65536)
                if not data:
                    return
                proto.receive_data(data)
                for _event in proto.events():
                    pass
                if _peer_closed(proto):
                    return
        except OSError:
            return
        except Exception:  # a protocol error in what the peer sent after our close
            log.debug("discarding input after a close", exc_info=True)

    def _shutdown(self, how: int) -> None:
        try:
            self._raw.shutdown(how)
        except OSError:
            pass



def _peer_closed(proto: WsConnection) -> bool:
    """Whether wsproto has read the peer's close frame."""
    return proto.state in (ConnectionState.CLOSED, ConnectionState.REMOTE_CLOSING)

