"""A websocket client on a bare socket, for tests that must see every byte the server writes.

Client libraries hide what matters in a close race: bytes after the close
frame, an HTTP response written onto the stream, a reset that destroyed the
close frame. :class:`RawClient` records the raw stream, and :func:`parse_stream`
checks it frame by frame.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


class StreamError(AssertionError):
    """The server wrote something onto the stream that is not a valid websocket frame sequence."""


@dataclass
class Frame:
    opcode: int
    payload: bytes

    @property
    def close_code(self) -> int | None:
        if self.opcode != OP_CLOSE or len(self.payload) < 2:
            return None
        return int(struct.unpack("!H", self.payload[:2])[0])


def encode_frame(opcode: int, payload: bytes) -> bytes:
    """A masked client frame."""
    head = bytes([0x80 | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def parse_frames(data: bytes) -> tuple[list[Frame], bytes]:
    """Parse complete server frames from ``data``; returns them and the unparsed rest.

    Raises :class:`StreamError` for anything a server must never send on a
    connection without extensions: reserved bits, unknown opcodes, a mask.
    """
    frames: list[Frame] = []
    pos = 0
    while len(data) - pos >= 2:
        b0, b1 = data[pos], data[pos + 1]
        if b0 & 0x70:
            raise StreamError(f"reserved bits set at byte {pos}: {data[pos:pos + 40]!r}")
        opcode = b0 & 0x0F
        if opcode not in (OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG):
            raise StreamError(f"unknown opcode {opcode} at byte {pos}: {data[pos:pos + 40]!r}")
        if b1 & 0x80:
            raise StreamError(f"a masked server frame at byte {pos}")
        n, head = b1 & 0x7F, 2
        if n == 126:
            if len(data) - pos < 4:
                break
            n, head = struct.unpack("!H", data[pos + 2:pos + 4])[0], 4
        elif n == 127:
            if len(data) - pos < 10:
                break
            n, head = struct.unpack("!Q", data[pos + 2:pos + 10])[0], 10
        if len(data) - pos < head + n:
            break
        frames.append(Frame(opcode, data[pos + head:pos + head + n]))
        pos += head + n
    return frames, data[pos:]


def parse_stream(data: bytes) -> list[Frame]:
    """Every frame of a whole stream, which must end exactly with a close frame.

    Raises :class:`StreamError` if a byte follows the close frame, the stream
    ends inside a frame, or it ends without a close frame.
    """
    frames, rest = parse_frames(data)
    closes = [n for n, frame in enumerate(frames) if frame.opcode == OP_CLOSE]
    if not closes:
        raise StreamError(f"the stream ended without a close frame ({len(data)} bytes, rest {rest[:40]!r})")
    if closes[0] != len(frames) - 1 or rest:
        raise StreamError(f"bytes follow the close frame: {len(frames) - 1 - closes[0]} frames, rest {rest[:60]!r}")
    return frames


@dataclass
class RawClient:
    """A websocket client that keeps every byte the server sends after the handshake.

    ``answer_pings`` False makes a client that never answers pings; ``answer_close``
    False one that never answers the server's close frame.
    ``read_delay`` slows its reading down (seconds between reads of ``read_size`` bytes).
    """

    url_host: str
    port: int
    path: str
    cookie: str | None = None
    answer_pings: bool = True
    answer_close: bool = True
    read_size: int = 65536
    read_delay: float = 0.0
    received: bytearray = field(default_factory=bytearray)
    error: BaseException | None = None
    saw_close = False

    def __post_init__(self) -> None:
        self.sock = socket.create_connection((self.url_host, self.port), timeout=15)
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [f"GET {self.path} HTTP/1.1", f"Host: {self.url_host}:{self.port}", "Upgrade: websocket",
                 "Connection: Upgrade", f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13"]
        if self.cookie:
            lines.append(f"Cookie: {self.cookie}")
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise AssertionError(f"the server closed during the handshake: {head!r}")
            head += chunk
        status, _, rest = head.partition(b"\r\n\r\n")
        if not status.startswith(b"HTTP/1.1 101"):
            raise AssertionError(f"handshake refused: {status!r}")
        self.received += rest
        self._send_lock = threading.Lock()
        self.closed = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def send_text(self, text: str) -> None:
        self._send(encode_frame(OP_TEXT, text.encode()))

    def send_json(self, obj: Any) -> None:
        self.send_text(json.dumps(obj))

    def send_bytes(self, raw: bytes) -> None:
        with self._send_lock:
            self.sock.sendall(raw)

    def _send(self, frame: bytes) -> None:
        with self._send_lock:
            if self.saw_close:
                raise ConnectionError("the server closed; a client sends nothing after its close reply")
            self.sock.sendall(frame)

    def _read(self) -> None:
        """Read until the server ends the stream, answering pings and the close as a client does."""
        parsed = 0
        rest = b""
        try:
            while True:
                chunk = self.sock.recv(self.read_size)
                if not chunk:
                    return
                self.received += chunk
                frames, rest = parse_frames(rest + chunk)
                parsed += len(frames)
                for frame in frames:
                    if frame.opcode == OP_PING and self.answer_pings and not self.saw_close:
                        self._send(encode_frame(OP_PONG, frame.payload))
                    elif frame.opcode == OP_CLOSE:
                        with self._send_lock:
                            if not self.saw_close:
                                self.saw_close = True
                                if not self.answer_close:
                                    continue
                                try:
                                    self.sock.sendall(encode_frame(OP_CLOSE, frame.payload[:2]))
                                except OSError:
                                    pass
                if self.read_delay:
                    time.sleep(self.read_delay)  # a slow reader, not synchronisation
        except StreamError:
            return  # parse_stream reports it on the whole stream
        except OSError as exc:
            self.error = exc
        finally:
            self.closed.set()

    def wait_closed(self, timeout: float = 20.0) -> list[Frame]:
        """Wait for the end of the stream and return its frames; checks the stream's shape."""
        if not self.closed.wait(timeout):
            raise AssertionError(f"the server did not end the stream within {timeout}s")
        try:
            self.sock.close()
        except OSError:
            pass
        if self.error is not None and not self.saw_close:
            raise AssertionError(f"the stream broke before a close frame: {self.error!r}")
        return parse_stream(bytes(self.received))

    def close_code(self, timeout: float = 20.0) -> int | None:
        return self.wait_closed(timeout)[-1].close_code
