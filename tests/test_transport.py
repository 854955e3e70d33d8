"""The transport over a real simple-websocket server on a socket pair, in threads.

These tests pin down races between simple-websocket's reader thread and the
websocket handler that the threaded development server can hit, by holding
the reader at the exact point where the race happens.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any, Iterator

import pytest
import simple_websocket
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request, TextMessage

from entitysync_sync.concurrency import Tasks
from entitysync_sync.transport import WebSocketTransport

HANDSHAKE = {
    "HTTP_HOST": "127.0.0.1",
    "HTTP_CONNECTION": "Upgrade",
    "HTTP_UPGRADE": "websocket",
    "HTTP_SEC_WEBSOCKET_VERSION": "13",
}


class HeldAfterWake(threading.Event):
    """An event whose ``set`` holds the setting thread until a waiter has cleared it.

    simple-websocket's reader wakes ``receive`` for an oversized message before
    it marks the websocket closed; holding the reader inside ``set`` lets the
    waiter run in between every time, not only when the scheduler happens to.
    """

    hold = False

    def __init__(self) -> None:
        super().__init__()
        self.cleared = threading.Event()

    def set(self) -> None:
        super().set()
        if self.hold and threading.current_thread().name.startswith("reader"):
            self.hold = False
            self.cleared.wait(10)

    def clear(self) -> None:
        super().clear()
        self.cleared.set()


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    server_sock, client_sock = socket.socketpair()
    yield server_sock, client_sock
    server_sock.close()
    client_sock.close()


def _reader_thread(*args: Any, **kwargs: Any) -> threading.Thread:
    thread = threading.Thread(*args, **kwargs)
    thread.name = "reader"
    return thread


def test_a_handler_waiting_in_receive_wakes_when_an_oversized_message_stops_the_reader(
        pair: tuple[socket.socket, socket.socket]) -> None:
    server_sock, client_sock = pair
    client = WSConnection(ConnectionType.CLIENT)
    request = client.send(Request(host="127.0.0.1", target="/"))
    # simple-websocket rebuilds the request from the WSGI environ, as under a real server.
    key = next(line.split(b":", 1)[1].strip() for line in request.split(b"\r\n")
               if line.lower().startswith(b"sec-websocket-key:"))
    environ = {**HANDSHAKE, "HTTP_SEC_WEBSOCKET_KEY": key.decode(), "werkzeug.socket": server_sock}
    ws = simple_websocket.Server(environ,
                                 thread_class=_reader_thread, event_class=HeldAfterWake)
    client.receive_data(client_sock.recv(4096))
    assert any(isinstance(e, AcceptConnection) for e in client.events())
    transport = WebSocketTransport(ws, Tasks(), max_message_bytes=100)

    returned: list[float] = []

    def handler() -> None:
        transport.receive(timeout=60)
        returned.append(time.monotonic())

    waiting = threading.Thread(target=handler, daemon=True)
    waiting.start()
    ws.event.hold = True
    sent = time.monotonic()
    client_sock.sendall(client.send(TextMessage(data="x" * 500)))
    waiting.join(20)
    assert returned, "the handler still waits in receive after the reader stopped"
    assert returned[0] - sent < 20
    assert not transport.connected
    ws.thread.join(10)
    assert not ws.thread.is_alive()
