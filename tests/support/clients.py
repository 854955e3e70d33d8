"""Real websocket clients: websocket-client with JSON helpers, and a wsproto client that compresses."""

from __future__ import annotations

import json
import socket
import time
from typing import Any, Callable

import websocket

from tests.support.servers import Server


class Client:
    """A real websocket client (websocket-client) with JSON helpers."""

    def __init__(self, url: str, token: str | None = None, **options: Any) -> None:
        # The token travels as a cookie, as a browser's session would: a query
        # string would put it in the server's access log.
        if token is not None:
            options["cookie"] = f"token={token}"
        self.ws = websocket.create_connection(url, timeout=10, **options)

    def send(self, obj: Any) -> None:
        self.ws.send(obj if isinstance(obj, str) else json.dumps(obj))

    def subscribe(self, entity: str, id: Any, ref: Any = None) -> None:
        frame: dict[str, Any] = {"action": "subscribe", "body": {"entity": entity, "id": id}}
        if ref is not None:
            frame["ref"] = ref
        self.send(frame)

    def unsubscribe(self, entity: str, id: Any, ref: Any = None) -> None:
        frame: dict[str, Any] = {"action": "unsubscribe", "body": {"entity": entity, "id": id}}
        if ref is not None:
            frame["ref"] = ref
        self.send(frame)

    def recv(self, timeout: float = 10.0) -> Any:
        self.ws.settimeout(timeout)
        return json.loads(self.ws.recv())

    def expect(self, predicate: Callable[[Any], bool], timeout: float = 10.0) -> Any:
        """Read frames until one matches ``predicate``; fail on timeout."""
        deadline = time.monotonic() + timeout
        seen = []
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no matching frame within {timeout}s; saw {seen!r}")
            try:
                frame = self.recv(remaining)
            except websocket.WebSocketTimeoutException:
                continue
            seen.append(frame)
            if predicate(frame):
                return frame

    def expect_push(self, entity: str, id: str, predicate: Callable[[Any], bool] = lambda b: True,
                    timeout: float = 10.0) -> Any:
        """The next push of the key whose payload matches: its ``"body"``, or its ``"rows"`` for a set."""
        def payload(frame: Any) -> Any:
            return frame["rows"] if "rows" in frame else frame["body"]

        return payload(self.expect(lambda f: f.get("action") == "push"
                                   and f["key"] == {"entity": entity, "id": id}
                                   and predicate(payload(f)), timeout))

    def assert_silent(self, within: float = 0.5) -> None:
        """Assert that no frame arrives within ``within`` seconds."""
        self.ws.settimeout(within)
        try:
            frame = self.ws.recv()
        except websocket.WebSocketTimeoutException:
            return
        raise AssertionError(f"unexpected frame {frame!r}")

    def assert_settles(self, allowed: Callable[[Any], bool], within: float = 0.5) -> None:
        """Read until no frame arrives for ``within`` seconds; every frame read must be ``allowed``.

        For a refresh that may legitimately repeat: a notification that lands
        while a fetch runs queues one more fetch, which pushes the same rows.
        """
        self.ws.settimeout(within)
        while True:
            try:
                raw = self.ws.recv()
            except websocket.WebSocketTimeoutException:
                return
            frame = json.loads(raw)
            if not allowed(frame):
                raise AssertionError(f"unexpected frame {frame!r}")

    def close_code(self, timeout: float = 10.0) -> int | None:
        """Read until the server closes; its close code, or None if the TCP
        connection ended without a close frame."""
        self.ws.settimeout(timeout)
        while True:
            try:
                opcode, data = self.ws.recv_data(control_frame=True)
            except (websocket.WebSocketConnectionClosedException, ConnectionError):
                return None
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                return int.from_bytes(data[:2], "big") if len(data) >= 2 else None

    def close(self) -> None:
        self.ws.close()


class DeflateClient:
    """A blocking wsproto client that offers permessage-deflate, as browsers do."""

    def __init__(self, server: Server) -> None:
        from wsproto import ConnectionType, WSConnection
        from wsproto.events import AcceptConnection, Request
        from wsproto.extensions import PerMessageDeflate

        self.sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.sock.sendall(self.ws.send(Request(host="127.0.0.1", target="/ws/entity-sync/",
                                               extensions=[PerMessageDeflate()])))
        self.pending: list[Any] = []
        accepted = self._next(lambda e: isinstance(e, AcceptConnection))
        self.deflate = any(isinstance(ext, PerMessageDeflate) for ext in accepted.extensions)

    def _next(self, match: Any) -> Any:
        while True:
            for i, event in enumerate(self.pending):
                if match(event):
                    return self.pending.pop(i)
            data = self.sock.recv(65536)
            assert data, "the server closed the connection"
            self.ws.receive_data(data)
            self.pending.extend(self.ws.events())

    def send(self, obj: Any) -> None:
        from wsproto.events import TextMessage

        self.sock.sendall(self.ws.send(TextMessage(json.dumps(obj))))

    def recv(self) -> Any:
        from wsproto.events import TextMessage

        parts = []
        while True:
            event = self._next(lambda e: isinstance(e, TextMessage))
            parts.append(event.data)
            if event.message_finished:
                return json.loads("".join(parts))

    def close(self) -> None:
        self.sock.close()
