"""The socket side of a connection: simple-websocket, made safe to write to.

flask-sock hands the route a ``simple_websocket.Server``. Two of its traits
need fixing before several greenlets or threads write to it:

* its ``send`` calls ``socket.send``, which may write only part of a large
  frame to a slow reader; and
* its reader thread answers pings on the same socket, so its bytes could
  land inside one of ours.

:class:`WebSocketTransport` swaps the server's socket for one whose ``send``
writes everything (``sendall``) under a lock shared by every writer, so
frames are whole and never interleaved. This module is the only one that
knows simple-websocket, and the websocket handler
(:mod:`entitysync_sync.endpoint`) reaches it only through this class.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any, Callable

from simple_websocket import ConnectionClosed

from .concurrency import Tasks, gevent_active
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


class _SerialSocket:
    """A socket proxy whose ``send`` is a locked ``sendall``."""

    #: The end of a frame whose start was written without waiting; written before anything else.
    residue = b""

    def __init__(self, sock: Any, lock: threading.RLock, on_reader_stop: Callable[[], None]) -> None:
        self._sock = sock
        self._lock = lock
        self._on_reader_stop = on_reader_stop

    def send(self, data: bytes) -> int:
        with self._lock:
            if self.residue:
                residue, self.residue = self.residue, b""
                self._sock.sendall(residue)
            self._sock.sendall(data)
        return len(data)

    sendall = send

    def close(self) -> None:
        """Leave the socket open: :meth:`WebSocketTransport.finish` ends it.

        simple-websocket's reader closes its socket as soon as it stops
        reading, which can be while a close frame we sent is unread and the
        peer is still sending; the kernel would then reset the connection.

        The reader calls this last, once it has marked the websocket closed,
        so it is where the handler is woken. simple-websocket wakes a
        ``receive`` before it marks an oversized message's websocket closed,
        and on the threaded server the handler can run in between, see the
        websocket still open and wait out its whole poll interval.
        """
        self._on_reader_stop()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class WebSocketTransport:
    """Whole-frame, serialised writes and a close that never blocks."""

    _deflate: bool | None = None
    _nowait: bool | None = None

    def __init__(self, ws: Any, tasks: Tasks, max_message_bytes: int | None = None,
                 close_wait: float = CLOSE_WAIT) -> None:
        self._ws = ws
        self._tasks = tasks
        self._close_wait = close_wait
        self._lock = threading.RLock()
        self._raw = ws.sock
        self._close_sent = False
        #: The code and reason of the first close asked for; the one the client must get.
        self._close_wanted: tuple[int, str] | None = None
        ws.sock = _SerialSocket(ws.sock, self._lock, ws.event.set)
        if max_message_bytes:
            # Read by simple-websocket on each message; larger ones close with 1009.
            ws.max_message_size = max_message_bytes

    def receive(self, timeout: float | None = None) -> str | bytes | None:
        """The next client frame; None after ``timeout`` seconds, or once the stream is closed
        (then :attr:`connected` is False)."""
        try:
            data: str | bytes | None = self._ws.receive(timeout=timeout)
        except ConnectionClosed:
            return None
        return data

    @property
    def connected(self) -> bool:
        """Whether the websocket is open: neither side has closed it."""
        return bool(self._ws.connected)

    def send_text(self, text: str) -> None:
        """Write one text frame (compressed if the client negotiated it)."""
        with self._lock:
            self._ws.send(text)

    def send_frame(self, frame: EncodedFrame) -> None:
        """Write one frame encoded once for many connections, completely.

        Its bytes are written as they are unless this connection compresses,
        which needs its own encoding of the text. An empty frame only
        finishes a frame that :meth:`try_send_frame` started.
        """
        if not frame.wire:
            with self._lock:
                self._ws.sock.send(b"")
        elif self._compressing():
            self.send_text(frame.text)
        else:
            with self._lock:
                if not self._ws.connected:
                    raise ConnectionClosed(self._ws.close_reason, self._ws.close_message)
                self._ws.sock.send(frame.wire)

    def try_send_frame(self, wire: bytes) -> int | None:
        """Write a pre-encoded frame without waiting, if the socket takes it now.

        Returns None when nothing was written (another write is in progress,
        the connection compresses, the socket's buffer is full, or the server
        is not running under gevent), so the caller queues the frame instead.
        Otherwise returns how many bytes are left; they are kept and written
        before any other bytes, by the next write or by ``send_frame(FLUSH)``.
        """
        nowait = self._nowait
        if nowait is None:
            nowait = self._nowait = (
                gevent_active()
                and type(self._raw).__module__.startswith("gevent")
                and not self._compressing()
            )
        if not nowait:
            return None
        serial = self._ws.sock
        if not self._lock.acquire(blocking=False):
            return None
        try:
            if serial.residue or not self._ws.connected:
                return None
            try:
                sent: int = self._raw.send(wire, 0, 0.0)  # gevent's socket: timeout 0 never waits
            except BlockingIOError:
                return None
            if sent < len(wire):
                serial.residue = wire[sent:]
            return len(wire) - sent
        finally:
            self._lock.release()

    def _compressing(self) -> bool:
        """Whether this connection negotiated permessage-deflate (or it cannot be told)."""
        compressing = self._deflate
        if compressing is None:
            try:
                compressing = bool(self._ws.ws.connection._proto.extensions)
            except AttributeError:
                compressing = True
            self._deflate = compressing
        return compressing

    def ping(self) -> bool:
        """Send a ping frame; False if the previous ping was never answered.

        simple-websocket's reader marks ``pong_received`` when a pong arrives.
        Never blocks: while a frame is being written no ping is sent.
        """
        from wsproto.events import Ping

        ws = self._ws
        if not self._lock.acquire(blocking=False):
            return True  # a frame is being written; the send timeout watches that
        try:
            if not ws.connected:
                return True  # closing: the handler ends the stream, and no ping may follow a close frame
            if ws.sock.residue:
                return True  # a frame is half written; the send timeout watches that
            if not ws.pong_received:
                return False
            ws.pong_received = False
            ws.sock.send(ws.ws.send(Ping()))
        finally:
            self._lock.release()
        return True

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
            if not self._ws.sock.residue:
                self._close_holding_lock(code, reason)
                return
            self._lock.release()
        self._tasks.spawn(self._close_after_write, code, reason)

    def _close_after_write(self, code: int, reason: str) -> None:
        """Wait up to ``close_wait`` for a write in progress, then send the close frame."""
        if self._lock.acquire(timeout=self._close_wait):
            if self._finish_residue(time.monotonic() + self._close_wait):
                self._close_holding_lock(code, reason)
                return
            self._lock.release()
        # A writer stuck on a stalled client: no close frame can follow a half
        # written frame. Shutting the socket wakes the writer and the reader.
        self._shutdown(socket.SHUT_RDWR)

    def _finish_residue(self, deadline: float) -> bool:
        """With the lock held: write the end of a half written frame, until ``deadline``."""
        serial = self._ws.sock
        while serial.residue:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                sent = self._raw.send(serial.residue, 0, remaining)  # gevent's socket
            except BlockingIOError:
                continue
            except OSError:
                return False
            serial.residue = serial.residue[sent:]
        return True

    def _close_holding_lock(self, code: int, reason: str) -> None:
        try:
            if self._ws.connected and not self._ws.sock.residue:
                self._ws.close(code, reason)
                self._close_sent = True
        except Exception:
            log.debug("sending a close frame failed", exc_info=True)
        finally:
            self._lock.release()

    def finish(self, linger: float | None = None) -> None:
        """End the stream; the websocket handler calls this last, before it returns.

        Once this returns no byte can be written to the stream: not a frame of
        ours, not the close (1000) that flask-sock sends after the handler,
        not the HTTP response that Werkzeug's development server writes then.
        So the close frame the server decided is the last thing the client
        reads. In order:

        * a close frame still waiting for a write in progress is sent, waiting
          up to ``close_wait`` for that write (the handler may block, its
          caller may not);
        * simple-websocket's reader is given up to ``linger`` seconds (by
          default the larger of CLOSE_LINGER and ``close_wait``) to read
          the peer's answer and stop; it is the only reader of the socket
          until then (two readers raise gevent's ConcurrentObjectUseError);
        * input is then read and discarded until the peer's close frame or
          end of stream, within the same ``linger``: closing a socket with
          unread input makes the kernel reset the connection, and a reset can
          destroy the close frame before a client that is still sending (a
          flood, say) has read it;
        * the socket is shut down both ways; the server closes it.
        """
        if linger is None:
            linger = max(CLOSE_LINGER, self._close_wait)
        deadline = time.monotonic() + linger
        ws = self._ws
        if ws.connected and self._lock.acquire(timeout=self._close_wait):
            if not self._close_sent and ws.connected and self._finish_residue(deadline):
                # A close still waiting for a write, or none at all (1000).
                self._close_holding_lock(*(self._close_wanted or (1000, "")))
            else:
                self._lock.release()
        ws.connected = False  # flask-sock's own close(1000) after the handler is then a no-op
        reader = getattr(ws, "thread", None)
        if reader is not None and reader is not threading.current_thread():
            reader.join(max(0.0, deadline - time.monotonic()))
            if reader.is_alive():
                self._shutdown(socket.SHUT_RD)  # wakes the reader's recv with end of stream
                reader.join(CLOSE_LINGER)
            else:
                self._discard_input(deadline)
        self._shutdown(socket.SHUT_RDWR)

    def _discard_input(self, deadline: float) -> None:
        """Read until the peer's close frame, end of stream or ``deadline``."""
        proto = self._ws.ws
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


def _peer_closed(proto: Any) -> bool:
    """Whether wsproto has read the peer's close frame."""
    from wsproto.connection import ConnectionState

    return proto.state in (ConnectionState.CLOSED, ConnectionState.REMOTE_CLOSING)
