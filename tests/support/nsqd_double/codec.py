"""The double's wire codec: frames, message encoding, names and command bodies (no I/O)."""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .model import Message
    from .options import Options

VERSION = "1.3.0"
MAGIC_V2 = b"  V2"
FRAME_RESPONSE, FRAME_ERROR, FRAME_MESSAGE = 0, 1, 2
HEARTBEAT = b"_heartbeat_"
OK = b"OK"
MSG_ID_LENGTH = 16
READ_BUFFER_SIZE = 16 * 1024  # nsqd's bufio reader: a longer command line is a read error

STATE_INIT, STATE_DISCONNECTED, STATE_CONNECTED, STATE_SUBSCRIBED, STATE_CLOSING = range(5)

_NAME_RE = re.compile(r"[.a-zA-Z0-9_-]+(#ephemeral)?")

def is_valid_name(name: str) -> bool:
    """nsqd's topic and channel name rule (internal/protocol/names.go)."""
    return 1 <= len(name) <= 64 and _NAME_RE.fullmatch(name) is not None


def frame(frame_type: int, data: bytes) -> bytes:
    """``[size][frame type][data]``, the size counting the type's four bytes."""
    return struct.pack(">ii", len(data) + 4, frame_type) + data


def encode_message(msg: Message) -> bytes:
    return struct.pack(">qH", msg.timestamp, msg.attempts & 0xFFFF) + msg.id + msg.body


def byte_to_base10(raw: bytes) -> int:
    """nsqd's ByteToBase10: digits only (no sign); the empty string is 0."""
    if raw and not raw.isdigit():
        raise ValueError("failed to convert to Base10")
    return int(raw) if raw else 0


def go_quote(text: str) -> str:
    """Close enough to Go's %q for names in error texts."""
    return json.dumps(text, ensure_ascii=False)


class ClientError(Exception):
    """A protocol error: sent to the client as an error frame; fatal ones close the connection."""

    def __init__(self, code: str, desc: str, fatal: bool = True) -> None:
        super().__init__(f"{code} {desc}")
        self.code = code
        self.fatal = fatal


def fatal(code: str, desc: str) -> ClientError:
    return ClientError(code, desc, fatal=True)



class Closed(Exception):
    """The peer closed the connection before a whole command or body arrived."""


_IDENTIFY_TYPES: dict[str, type] = {
    "client_id": str, "hostname": str, "user_agent": str, "heartbeat_interval": int, "output_buffer_size": int,
    "output_buffer_timeout": int, "feature_negotiation": bool, "tls_v1": bool, "deflate": bool,
    "deflate_level": int, "snappy": bool, "sample_rate": int, "msg_timeout": int,
}


def decode_identify(body: bytes) -> dict[str, Any]:
    """Decode as Go's encoding/json into identifyDataV2 would: typed fields, unknown keys ignored."""
    try:
        data = json.loads(body)
        if not isinstance(data, dict):
            raise ValueError("not an object")
        out: dict[str, Any] = {}
        for key, kind in _IDENTIFY_TYPES.items():
            value = data.get(key)
            if value is None:
                continue
            if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(key)
            if kind is not int and not isinstance(value, kind):
                raise ValueError(key)
            out[key] = value
        return out
    except ValueError as exc:
        raise fatal("E_BAD_BODY", "IDENTIFY failed to decode JSON body") from exc


def read_mpub(read: Callable[[int], bytes], opts: Options) -> list[bytes]:
    """nsqd's readMPUB: ``[count][size][body]...``; every failure is fatal, nothing is queued."""
    try:
        count = struct.unpack(">i", read(4))[0]
    except (OSError, Closed, struct.error) as exc:
        raise fatal("E_BAD_BODY", "MPUB failed to read message count") from exc
    max_messages = (opts.max_body_size - 4) // 5
    if count <= 0 or count > max_messages:
        raise fatal("E_BAD_BODY", f"MPUB invalid message count {count}")
    bodies = []
    for i in range(count):
        try:
            size = struct.unpack(">i", read(4))[0]
        except (OSError, Closed, struct.error) as exc:
            raise fatal("E_BAD_MESSAGE", f"MPUB failed to read message({i}) body size") from exc
        if size <= 0:
            raise fatal("E_BAD_MESSAGE", f"MPUB invalid message({i}) body size {size}")
        if size > opts.max_msg_size:
            raise fatal("E_BAD_MESSAGE", f"MPUB message too big {size} > {opts.max_msg_size}")
        try:
            body = read(size)
        except (OSError, Closed) as exc:
            raise fatal("E_BAD_MESSAGE", "MPUB failed to read message body") from exc
        if len(body) != size:
            raise fatal("E_BAD_MESSAGE", "MPUB failed to read message body")
        bodies.append(body)
    return bodies

