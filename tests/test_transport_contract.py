"""What the transport relies on in simple-websocket and wsproto, checked on a real socket pair.

The websocket route lets simple-websocket answer the handshake but never
starts the reader thread it asks for: the route reads the socket itself
through wsproto's connection (:mod:`entitysync_sync.transport`). If a new
release of either library changed how it creates that thread, where it keeps
the socket or the protocol connection, or how it records the negotiated
extensions, these tests fail before any server does. The pins in setup.cfg
must match what is installed.
"""

from __future__ import annotations

import base64
import configparser
import os
import socket
import threading
from importlib.metadata import version
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from simple_websocket import Server
from wsproto.connection import Connection, ConnectionState

from entitysync_sync.concurrency import Tasks
from entitysync_sync.transport import SIMPLE_WEBSOCKET_RANGE, WebSocketTransport
from tests.support.rawws import OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, encode_frame, parse_frames

SETUP_CFG = Path(__file__).resolve().parent.parent / "setup.cfg"


def install_requires() -> dict[str, Requirement]:
    parser = configparser.ConfigParser()
    parser.read(SETUP_CFG)
    lines = parser["options"]["install_requires"].strip().splitlines()
    return {req.name: req for req in map(Requirement, filter(None, map(str.strip, lines)))}


def handshake_environ(sock: socket.socket, deflate: bool = False) -> dict[str, Any]:
    """The WSGI environ of a websocket upgrade as gunicorn hands it over."""
    environ: dict[str, Any] = {
        "REQUEST_METHOD": "GET",
        "gunicorn.socket": sock,
        "HTTP_HOST": "127.0.0.1",
        "HTTP_UPGRADE": "websocket",
        "HTTP_CONNECTION": "Upgrade",
        "HTTP_SEC_WEBSOCKET_KEY": base64.b64encode(os.urandom(16)).decode(),
        "HTTP_SEC_WEBSOCKET_VERSION": "13",
    }
    if deflate:
        environ["HTTP_SEC_WEBSOCKET_EXTENSIONS"] = "permessage-deflate"
    return environ


def read_handshake(client: socket.socket) -> bytes:
    """The server's HTTP answer; returns the bytes after it."""
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = client.recv(4096)
        assert chunk, f"the stream ended during the handshake: {head!r}"
        head += chunk
    status, _, rest = head.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 101"), status
    return rest


def read_frames(client: socket.socket, count: int, rest: bytes = b"") -> list[Any]:
    frames: list[Any] = []
    while True:
        parsed, rest = parse_frames(rest)
        frames += parsed
        if len(frames) >= count:
            return frames
        chunk = client.recv(65536)
        assert chunk, f"the stream ended after {frames}"
        rest += chunk


def test_installed_versions_are_the_pinned_ones() -> None:
    requires = install_requires()
    assert requires["simple-websocket"].specifier == SpecifierSet(",".join(SIMPLE_WEBSOCKET_RANGE))
    for name in ("simple-websocket", "wsproto"):
        assert name in requires, f"{name} must be pinned in install_requires: the transport relies on it"
        assert any(spec.operator == "<" for spec in requires[name].specifier), f"{name} needs an upper bound"
        assert requires[name].specifier.contains(version(name)), (name, version(name))


def test_simple_websocket_asks_for_one_reader_thread_and_hands_over_socket_and_protocol(pair: Any) -> None:
    server_side, client_side = pair
    created: list[dict[str, Any]] = []
    started: list[bool] = []

    class Recorder:
        name = "recorder"

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            created.append(kwargs)

        def start(self) -> None:
            started.append(True)

    ws = Server(handshake_environ(server_side), thread_class=Recorder)
    assert len(created) == 1 and callable(created[0].get("target")), created
    assert started == [True]
    assert ws.sock is server_side
    assert ws.connected
    assert isinstance(ws.ws.connection, Connection)
    assert ws.ws.connection.state is ConnectionState.OPEN
    read_handshake(client_side)


def test_the_route_reads_and_writes_without_a_reader_thread(pair: Any) -> None:
    server_side, client_side = pair
    threads = threading.active_count()
    transport = WebSocketTransport.accept(handshake_environ(server_side), Tasks("test"))
    assert threading.active_count() == threads  # no reader started
    rest = read_handshake(client_side)
    assert not transport._compressing()
    # Two messages, one in two fragments, and a ping, in one write.
    client_side.sendall(encode_frame(OP_TEXT, b"one") + encode_frame(OP_PING, b"p") + fragmented_text(b"tw", b"o"))
    assert transport.receive(timeout=5) == "one"
    assert transport.receive(timeout=5) == "two"
    transport.send_text("hi")
    frames = read_frames(client_side, 2, rest)
    assert [(f.opcode, f.payload) for f in frames[:2]] == [(OP_PONG, b"p"), (OP_TEXT, b"hi")]
    assert transport.receive(timeout=0.05) is None and transport.connected
    transport.close(4000, "bye")
    assert not transport.connected
    client_side.sendall(encode_frame(OP_CLOSE, (4000).to_bytes(2, "big")))
    assert transport.receive(timeout=5) is None
    transport.finish(linger=5)
    (close,) = read_frames(client_side, 1)
    assert close.close_code == 4000
    assert client_side.recv(1) == b""  # the stream ended after the close frame


def fragmented_text(first: bytes, second: bytes) -> bytes:
    """A text message in two masked frames: text without FIN, then a FIN continuation."""
    head = encode_frame(OP_TEXT, first)
    tail = encode_frame(0x0, second)
    return bytes([head[0] & 0x7F]) + head[1:] + tail


def test_a_negotiated_deflate_is_seen(pair: Any) -> None:
    server_side, client_side = pair
    transport = WebSocketTransport.accept(handshake_environ(server_side, deflate=True), Tasks("test"))
    rest = read_handshake(client_side)
    assert transport._compressing()
    transport.close(1000, "")
    (close,) = read_frames(client_side, 1, rest)
    assert close.close_code == 1000
