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
knows simple-websocket.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any

from simple_websocket import ConnectionClosed

from . import _runtime
from .shared import EncodedFrame

log = logging.getLogger("entitysync_sync")

#: Seconds a closed connection waits for the peer's close frame before the
#: socket is shut for reading too.
CLOSE_LINGER = 2.0
#: Seconds a close waits for a frame being written to finish before giving up on the close frame.
CLOSE_WAIT = 1.0


class _SerialSocket:
    """A socket proxy whose ``send`` is a locked ``sendall``."""

    #: The end of a frame whose start was written without waiting; written before anything else.
    residue = b""

    def __init__(self, sock: Any, lock: threading.RLock) -> None:
        self._sock = sock
        self._lock = lock

    def send(self, data: bytes) -> int:
        with self._lock:
            if self.residue:
                residue, self.residue = self.residue, b""
                self._sock.sendall(residue)
            self._sock.sendall(data)
        return len(data)

    sendall = send

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class WebSocketTransport:
    """Whole-frame, serialised writes and a close that never blocks."""

    _deflate: bool | None = None
    _nowait: bool | None = None

    def __init__(self, ws: Any, max_message_bytes: int | None = None) -> None:
        self._ws = ws
        self._lock = threading.RLock()
        self._raw = ws.sock
        self._close_sent = False
        ws.sock = _SerialSocket(ws.sock, self._lock)
        if max_message_bytes:
            # Read by simple-websocket on each message; larger ones close with 1009.
            ws.max_message_size = max_message_bytes

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
                _runtime.gevent_active()
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
        """Send a close frame once no write is in progress, then shut the socket.

        Never blocks the caller. If a frame is being written, the close frame
        follows it; a writer stuck on a stalled client for CLOSE_WAIT seconds
        gets no close frame: the socket is shut down, which wakes the stuck
        writer and the reader.
        """
        if self._lock.acquire(blocking=False):
            self._close_holding_lock(code, reason)
        else:
            _runtime.spawn(self._close_after_write, code, reason, name="entitysync-close")

    def _close_after_write(self, code: int, reason: str) -> None:
        if self._lock.acquire(timeout=CLOSE_WAIT):
            self._close_holding_lock(code, reason)
        else:
            self._shutdown(socket.SHUT_RDWR)

    def drain(self, seconds: float = CLOSE_LINGER) -> None:
        """After sending a close frame, read and discard until the peer closes, or ``seconds``.

        Closing a socket with unread input makes the kernel reset the
        connection, and a reset can destroy the close frame before the client
        reads it; a client that was still sending (a flood, say) would then
        see no close code. So the handler drains before it returns.
        """
        if not self._close_sent:
            return
        deadline = time.monotonic() + seconds
        try:
            while (remaining := deadline - time.monotonic()) > 0:
                self._raw.settimeout(remaining)
                if not self._raw.recv(65536):
                    return
        except OSError:
            return

    def _close_holding_lock(self, code: int, reason: str) -> None:
        sent = False
        try:
            # A frame cut short by try_send_frame must be finished before a close frame.
            if self._ws.connected and not self._ws.sock.residue:
                self._ws.close(code, reason)
                sent = self._close_sent = True
        except Exception:
            log.debug("sending a close frame failed", exc_info=True)
        finally:
            self._lock.release()
        if sent:
            # Let the peer read the close frame and answer; force it shut later.
            self._shutdown(socket.SHUT_WR)
            _runtime.spawn(self._linger, name="entitysync-close")
        else:
            self._shutdown(socket.SHUT_RDWR)

    def _linger(self) -> None:
        time.sleep(CLOSE_LINGER)
        self._shutdown(socket.SHUT_RDWR)

    def _shutdown(self, how: int) -> None:
        try:
            self._raw.shutdown(how)
        except OSError:
            pass
