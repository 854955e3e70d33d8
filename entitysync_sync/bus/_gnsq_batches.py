"""Reading a gnsq connection in batches: what one ``recv`` brings, handled at once.

gnsq's own read loop (``NsqdTCPClient.listen``) reads one frame at a time,
sends two blinker signals and builds a message object with three signals of
its own for every message, and writes one ``FIN`` per message. At tens of
thousands of notifications a second that is most of a server's CPU.
:func:`listen_in_batches` replaces that loop on gnsq's own connection object:
it reads what the socket has (up to :data:`READ_SIZE` bytes), cuts every
whole frame out of it, hands the bodies of all its messages to one callback,
and finishes them all with one write. Responses and errors still go through
the connection's ``handle_response`` / ``handle_error`` (and so through the
consumer's handlers), in the order they came; they are rare.

It reads the plain socket, so it serves connections without TLS, Snappy or
deflate, which is all the NSQ bus opens; :func:`can_batch` says whether a
connection is one.

Import this module only once gnsq is known to be installed.
"""

from __future__ import annotations

import errno
import struct
import time
from typing import Any, Callable

import gnsq.errors
import gnsq.protocol

#: Bytes read from nsqd at once: about a thousand notifications.
READ_SIZE = 64 * 1024

_HEADER = struct.Struct(">ii")  # frame size (counting the type), frame type
# A message frame's data: 8-byte timestamp, 2-byte attempts, 16-byte id, then the body.
_ID_START = 8 + 8 + 2
_BODY_START = _ID_START + 16
_FRAME_MESSAGE = gnsq.protocol.FRAME_TYPE_MESSAGE
_FRAME_RESPONSE = gnsq.protocol.FRAME_TYPE_RESPONSE
_FIN = b"FIN "


def can_batch(conn: Any) -> bool:
    """Whether ``conn`` reads a plain socket (no TLS, Snappy or deflate upgrade)."""
    return not (conn.tls_v1 or conn.snappy or conn.deflate)


def listen_in_batches(conn: Any, on_messages: Callable[[list[bytes]], None],
                      on_finished: Callable[[], None]) -> None:
    """Read ``conn`` until it closes, passing the bodies of each read's messages to
    ``on_messages``, then finishing them with one write and calling ``on_finished``
    (where gnsq's consumer moves a new connection from RDY 1 to its full count).

    Raises ``gnsq.errors.NSQSocketError`` when the connection fails or closes,
    as gnsq's own loop does, after closing its stream.
    """
    stream = conn.stream
    buffer = stream.consume_buffer()  # anything read past the IDENTIFY answer
    while conn.is_connected:
        sock = stream.socket
        if sock is None:
            raise gnsq.errors.NSQSocketError(errno.ENOTCONN, "Socket is not connected")
        try:
            packet = sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            continue
        except OSError as exc:
            conn.close_stream()
            raise gnsq.errors.NSQSocketError(*exc.args) from exc
        if not packet:
            conn.close_stream()
            raise gnsq.errors.NSQSocketError(errno.ECONNRESET, "nsqd closed the connection")
        buffer = buffer + packet if buffer else packet
        buffer = _handle_frames(conn, buffer, on_messages, on_finished)


def _handle_frames(conn: Any, buffer: bytes, on_messages: Callable[[list[bytes]], None],
                   on_finished: Callable[[], None]) -> bytes:
    """Handle every whole frame in ``buffer``; return the bytes of an incomplete last one."""
    end = len(buffer)
    pos = 0
    ids: list[bytes] = []
    bodies: list[bytes] = []
    while end - pos >= 8:
        size, kind = _HEADER.unpack_from(buffer, pos)
        stop = pos + 4 + size
        if stop > end:
            break
        if kind == _FRAME_MESSAGE:
            ids.append(buffer[pos + _ID_START:pos + _BODY_START])
            bodies.append(buffer[pos + _BODY_START:stop])
        else:
            if ids:  # keep the order of messages and responses
                _deliver(conn, ids, bodies, on_messages, on_finished)
                ids, bodies = [], []
            data = buffer[pos + 8:stop]
            conn.last_response = time.time()
            if kind == _FRAME_RESPONSE:
                conn.handle_response(data)
            else:
                conn.handle_error(data)
            if not conn.is_connected:
                return b""
        pos = stop
    if ids:
        _deliver(conn, ids, bodies, on_messages, on_finished)
    return buffer[pos:] if pos else buffer


def _deliver(conn: Any, ids: list[bytes], bodies: list[bytes], on_messages: Callable[[list[bytes]], None],
             on_finished: Callable[[], None]) -> None:
    count = len(ids)
    conn.last_message = time.time()
    conn.in_flight += count
    try:
        on_messages(bodies)
    finally:
        # Finished whatever happened: the callback logs its own failures, and a
        # message left unfinished would only come back after nsqd's msg_timeout.
        if conn.is_connected:
            conn.send(b"".join([_FIN + msg_id + b"\n" for msg_id in ids]))
        conn.in_flight -= count
    on_finished()

