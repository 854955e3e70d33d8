"""Websocket frames encoded once, to be written to many sockets.

A shared fetch sends the same server frames to every subscriber, so each
frame's websocket bytes are built once here (RFC 6455, unmasked, as a server
sends them) and written as they are by every connection that does not
compress. This is a codec: it knows nothing of sockets.
"""

from __future__ import annotations

import struct

from .keys import EntityKey

_TEXT = 0x81  # FIN + opcode 1: one whole text frame


def encode_text_frame(text: str) -> bytes:
    """``text`` as one unmasked websocket text frame (RFC 6455), as a server sends it."""
    payload = text.encode()
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", _TEXT, n)
    elif n < 1 << 16:
        header = struct.pack("!BBH", _TEXT, 126, n)
    else:
        header = struct.pack("!BBQ", _TEXT, 127, n)
    return header + payload


class EncodedFrame:
    """One server frame as text and as the websocket frame bytes that carry it.

    ``len()`` is the text's length, so it counts against a connection's
    outbox limit exactly as the text would. A connection that negotiated
    permessage-deflate writes ``text`` through its compressor instead.
    """

    __slots__ = ("text", "wire")

    def __init__(self, text: str, wire: bytes) -> None:
        self.text = text
        self.wire = wire

    @classmethod
    def of(cls, text: str) -> EncodedFrame:
        return cls(text, encode_text_frame(text))

    def __len__(self) -> int:
        return len(self.text)


#: An empty frame queued to finish a frame whose first bytes were written without waiting.
FLUSH = EncodedFrame("", b"")


class SharedFrames:
    """The frames of one shared fetch of ``key``, identical for every subscriber.

    Read-only by convention: one object goes to many connections. A plain
    class with slots rather than a frozen dataclass, as one is built for
    every distinct result of a cohort's refresh.
    """

    __slots__ = ("error", "frames", "key", "personal", "size", "version")

    def __init__(self, key: EntityKey, frames: tuple[EncodedFrame, ...], size: int,
                 error: Exception | None = None, version: str | None = None, personal: bool = False) -> None:
        self.key = key
        self.frames = frames
        self.size = size
        #: Why the fetch failed, if it did; the frames then hold a fetch_failed error.
        self.error = error
        #: The result's version (see :func:`~entitysync_sync.protocol.result_version`), in envelope mode.
        self.version = version
        #: Fetched with one secret (a cohort's), not for everyone.
        self.personal = personal

    def __repr__(self) -> str:
        return f"<SharedFrames {self.key} frames={len(self.frames)} size={self.size} version={self.version}>"
