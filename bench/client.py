"""The load client every scenario uses: asyncio protocols and a hand-written frame parser.

One process holds thousands of connections. Server frames are unmasked and
parsed here directly (header, length, payload), so the client spends a few
microseconds per frame and is not what limits the measurements; client
frames are masked with an all-zero key, which RFC 6455 allows a server to
accept like any other key.

Two dialects: the entitysync_sync / raw one (``{"action":"subscribe",...}``
frames, every text frame from the server is a push) and Socket.IO 5 over
Engine.IO 4's websocket transport (``40`` to connect, ``42["subscribe",..]``,
pushes arrive as ``42["push",..]``, pings ``2`` answered with ``3``).

A connection can offer permessage-deflate (RFC 7692) as browsers do; if the
server accepts, compressed messages (RSV1 set) are inflated with one zlib
stream per connection, and the client's own messages are compressed, as a
browser's are (so the server keeps an inflater per connection too). Every
byte received is counted, for bytes on the wire.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import struct
import time
import zlib
from collections.abc import Callable, Sequence
from typing import Any

HOST = "127.0.0.1"
#: Connections opened concurrently.
BATCH = 250
CONNECT_TIMEOUT = 60.0


def client_frame(text: str, deflate: bool = False) -> bytes:
    """A masked text frame with the all-zero mask (so the payload goes as it is).

    With ``deflate`` the message is compressed (RSV1 set) by a compressor
    of its own, which the extension allows a sender to start afresh at any
    message; this keeps no compressor state per connection in the client.
    """
    payload = text.encode()
    first = 0x81
    if deflate:
        compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        payload = (compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH))[:-4]
        first |= 0x40
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", first, 0x80 | n)
    elif n < 1 << 16:
        header = struct.pack("!BBH", first, 0x80 | 126, n)
    else:
        header = struct.pack("!BBQ", first, 0x80 | 127, n)
    return header + b"\0\0\0\0" + payload


class Tracker:
    """Counts pushes and tells when every armed connection has reached its target."""

    def __init__(self) -> None:
        self.pushes = 0
        self.expected = 0
        self.reached = 0
        self.started = 0.0
        self.latencies: list[float] = []
        self.done = asyncio.Event()

    def arm(self, conns: Sequence[Conn], extra: int = 1) -> None:
        """Wait for ``extra`` more pushes on each of ``conns``; latencies from now."""
        self.expected = len(conns)
        self.reached = 0
        self.latencies = []
        self.done.clear()
        for conn in conns:
            conn.target = conn.pushes + extra
        self.started = time.perf_counter()

    def on_push(self, conn: Conn) -> None:
        self.pushes += 1
        if conn.target and conn.pushes >= conn.target:
            conn.target = 0
            self.latencies.append(time.perf_counter() - self.started)
            self.reached += 1
            if self.reached >= self.expected:
                self.done.set()


class Conn(asyncio.Protocol):
    """One websocket client connection that subscribes to ``keys`` once open.

    ``index`` numbers the connection; with ``user`` it connects as user
    ``u<index>`` (the ``user`` query parameter the apps take as the secret).
    """

    def __init__(self, dialect: str, path: str, keys: Sequence[tuple[str, str]], tracker: Tracker,
                 index: int, user: bool = True, deflate: bool = False) -> None:
        self.dialect = dialect
        self.path = path
        self.keys = keys
        self.tracker = tracker
        self.index = index
        self.user = user
        self.offer_deflate = deflate
        #: Whether the server accepted permessage-deflate.
        self.deflate = False
        self._inflater: Any = None
        self.bytes_in = 0
        self.pushes = 0
        self.target = 0
        self.last = b""
        #: Users: with ``users`` set, connection ``i`` is user ``u<i % users>`` (tabs of one user share it).
        self.users = 0
        #: Key id -> the version to send with its subscribe (and a ref, so an ack tells it was handled).
        self.resume: dict[str, str] | None = None
        #: Key id -> the version of its last push, when tracked.
        self.versions: dict[str, str] | None = None
        #: Pushes to wait for before ready, when resuming (the keys whose rows changed).
        self.expect = 0
        self.acks = 0
        #: Bytes of push frames' payloads received, by key id, when tracked.
        self.push_bytes: dict[str, int] | None = None
        self.buf = bytearray()
        self.upgraded = False
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed = asyncio.get_running_loop().create_future()

    # -- asyncio.Protocol --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        key = base64.b64encode(os.urandom(16)).decode()
        target = self.path
        if self.user:
            target += f"{'&' if '?' in target else '?'}user=u{self.index % self.users if self.users else self.index}"
        offer = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n" if self.offer_deflate else ""
        transport.write(
            f"GET {target} HTTP/1.1\r\nHost: {HOST}\r\nUpgrade: websocket\r\n{offer}"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        buf = self.buf
        buf += data
        if not self.upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            if not buf.startswith(b"HTTP/1.1 101"):
                self._fail(ConnectionError(bytes(buf[:64]).decode(errors="replace")))
                return
            headers = bytes(buf[:end]).lower()
            if b"\r\nsec-websocket-extensions:" in headers and b"permessage-deflate" in headers:
                self.deflate = True
                self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            del buf[: end + 4]
            self.upgraded = True
            if self.dialect == "ws":
                self._subscribe()
        pos, n = 0, len(buf)
        while n - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            length, head = b1 & 0x7F, 2
            if length == 126:
                if n - pos < 4:
                    break
                length, head = struct.unpack_from("!H", buf, pos + 2)[0], 4
            elif length == 127:
                if n - pos < 10:
                    break
                length, head = struct.unpack_from("!Q", buf, pos + 2)[0], 10
            if n - pos < head + length:
                break
            opcode = b0 & 0x0F
            payload = bytes(buf[pos + head : pos + head + length])
            pos += head + length
            if opcode == 1:
                if b0 & 0x40 and self._inflater is not None:  # RSV1: a compressed message
                    payload = self._inflater.decompress(payload + b"\x00\x00\xff\xff")
                self._text(payload)
            elif opcode == 9:
                self._send_raw(bytes((0x8A, 0x80 | len(payload))) + b"\0\0\0\0" + payload)
            elif opcode == 8:
                self._fail(ConnectionError("closed by the server"))
        del buf[:pos]

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or ConnectionError("connection lost"))
        if not self.closed.done():
            self.closed.set_result(None)

    # -- the dialects ------------------------------------------------------------

    def _subscribe(self) -> None:
        for entity, id in self.keys:
            body = {"entity": entity, "id": id}
            if self.dialect == "ws" and self.resume is not None:
                if id in self.resume:
                    body["v"] = self.resume[id]
                self.send_text(json.dumps({"action": "subscribe", "body": body, "ref": id}))
            elif self.dialect == "ws":
                self.send_text(json.dumps({"action": "subscribe", "body": body}))
            else:
                self.send_text("42" + json.dumps(["subscribe", body]))

    def _text(self, payload: bytes) -> None:
        if self.dialect == "socketio":
            if payload.startswith(b"42"):
                pass
            elif payload == b"2":
                self.send_text("3")
                return
            elif payload.startswith(b"40"):
                self._subscribe()
                return
            elif payload.startswith(b"0"):
                self.send_text("40")
                return
            else:
                return
        elif payload.startswith(b'{"action":"ack"'):
            self.acks += 1
            self._check_resumed()
            return
        self.pushes += 1
        self.last = payload
        if self.versions is not None or self.push_bytes is not None:
            frame = json.loads(payload[2:])[1] if self.dialect == "socketio" else json.loads(payload)
            id = frame.get("key", {}).get("id")
            if self.versions is not None and "v" in frame:
                self.versions[id] = frame["v"]
            if self.push_bytes is not None:
                self.push_bytes[id] = self.push_bytes.get(id, 0) + len(payload)
        if self.resume is not None:
            self._check_resumed()
        elif not self.ready.done() and self.pushes >= len(self.keys):
            self.ready.set_result(None)
        self.tracker.on_push(self)

    def _check_resumed(self) -> None:
        if not self.ready.done() and self.acks >= len(self.keys) and self.pushes >= self.expect:
            self.ready.set_result(None)

    def value(self) -> Any:
        """The ``value`` of the row in the last push."""
        text = self.last.decode()
        if self.dialect == "socketio":
            return json.loads(text[2:])[1]["body"]["value"]
        return json.loads(text)["body"]["value"]

    # -- writing -----------------------------------------------------------------

    def send_text(self, text: str) -> None:
        """Send one text message, compressed as a browser's would be once deflate is negotiated."""
        self._send_raw(client_frame(text, self.deflate))

    def _send_raw(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _fail(self, exc: BaseException) -> None:
        if not self.ready.done():
            self.ready.set_exception(exc)
            self.ready.exception()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()


async def open_conns(port: int, dialect: str, path: str, keys_for: Callable[[int], Sequence[tuple[str, str]]],
                     tracker: Tracker, start: int, count: int, user: bool = True,
                     deflate: bool = False, users: int = 0) -> list[Conn]:
    """Open connections ``start`` .. ``start+count-1``, each subscribed and holding its first pushes.

    ``BATCH`` connect at once; if any fails, every one opened is closed and the first error raised.
    """
    loop = asyncio.get_running_loop()
    conns: list[Conn] = []

    def make(i: int) -> Conn:
        conn = Conn(dialect, path, keys_for(i), tracker, i, user, deflate)
        conn.users = users
        return conn

    async def one(i: int) -> Conn:
        _, conn = await loop.create_connection(lambda: make(i), HOST, port)
        conns.append(conn)
        await conn.ready
        return conn

    try:
        for first in range(start, start + count, BATCH):
            batch = range(first, min(first + BATCH, start + count))
            results = await asyncio.gather(*(asyncio.wait_for(one(i), CONNECT_TIMEOUT) for i in batch),
                                           return_exceptions=True)
            failed = [r for r in results if isinstance(r, BaseException)]
            if failed:
                raise ConnectionError(f"{len(failed)} of connections {batch.start}..{batch.stop - 1} failed:"
                                      f" {failed[0]!r}")
    except BaseException:
        close_conns(conns)
        raise
    conns.sort(key=lambda c: c.index)
    return conns


def close_conns(conns: Sequence[Conn]) -> None:
    """Abort every connection (no close handshake: the servers see a reset, as with a lost client)."""
    for conn in conns:
        conn.close()
