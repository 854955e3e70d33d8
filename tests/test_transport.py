"""The transport over a real simple-websocket handshake on a socket pair, in threads.

The websocket handler is the socket's only reader. These tests pin down that
a handler waiting in ``receive`` on the threaded development server learns of
an oversized message as soon as its bytes arrive, not after its poll interval.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request, TextMessage

from entitysync_sync.concurrency import Tasks
from entitysync_sync.transport import FrameTooBig, WebSocketTransport

HANDSHAKE = {
    "HTTP_HOST": "127.0.0.1",
    "HTTP_CONNECTION": "Upgrade",
    "HTTP_UPGRADE": "websocket",
    "HTTP_SEC_WEBSOCKET_VERSION": "13",
}


def _environ(client: WSConnection, server_sock: socket.socket) -> dict[str, object]:
    """The WSGI environ of ``client``'s upgrade request: simple-websocket rebuilds the
    request from it, as under a real server."""
    request = client.send(Request(host="127.0.0.1", target="/"))
    key = next(line.split(b":", 1)[1].strip() for line in request.split(b"\r\n")
               if line.lower().startswith(b"sec-websocket-key:"))
    return {**HANDSHAKE, "HTTP_SEC_WEBSOCKET_KEY": key.decode(), "werkzeug.socket": server_sock}


def test_a_handler_waiting_in_receive_learns_of_an_oversized_message_at_once(
        pair: tuple[socket.socket, socket.socket]) -> None:
    server_sock, client_sock = pair
    client = WSConnection(ConnectionType.CLIENT)
    environ = _environ(client, server_sock)
    transport = WebSocketTransport.accept(environ, Tasks(), max_message_bytes=100)
    client.receive_data(client_sock.recv(4096))
    assert any(isinstance(e, AcceptConnection) for e in client.events())

    outcome: list[tuple[str, float]] = []
    waiting_started = threading.Event()

    def handler() -> None:
        waiting_started.set()
        try:
            transport.receive(timeout=60)
            outcome.append(("returned", time.monotonic()))
        except FrameTooBig:
            outcome.append(("too big", time.monotonic()))

    waiting = threading.Thread(target=handler, daemon=True)
    waiting.start()
    assert waiting_started.wait(10)
    sent = time.monotonic()
    client_sock.sendall(client.send(TextMessage(data="x" * 500)))
    waiting.join(20)
    assert outcome, "the handler still waits in receive after an oversized message arrived"
    (what, at), = outcome
    assert what == "too big"
    assert at - sent < 20


def test_a_server_that_started_its_own_reader_is_refused(pair: tuple[socket.socket, socket.socket]) -> None:
    """Two readers of one socket would steal each other's frames, so the transport refuses a
    server built without :attr:`WebSocketTransport.SERVER_OPTIONS` (the app replaced
    ``SOCK_SERVER_OPTIONS`` after ``init_app``), with a message that says what to do."""
    import simple_websocket

    server_sock, client_sock = pair
    client = WSConnection(ConnectionType.CLIENT)
    environ = _environ(client, server_sock)
    ws = simple_websocket.Server(environ)
    try:
        with pytest.raises(RuntimeError, match=r"SOCK_SERVER_OPTIONS was replaced after EntitySync\.init_app"):
            WebSocketTransport.adopt(ws, Tasks())
    finally:
        ws.close()
        client_sock.close()
        ws.thread.join(10)
