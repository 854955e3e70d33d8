"""Test helpers for apps that use entitysync_sync: a live server and a websocket client.

A Flask app's own tests run the app on an ephemeral port of 127.0.0.1 in a
background thread, connect real websocket clients, change rows (through the
app's test client or over HTTP) and assert what the clients receive::

    from entitysync_sync.testing import LiveServer

    def test_saving_an_item_pushes_it(app):
        with LiveServer(app) as live:
            client = live.client(cookies={"session": "..."})
            client.subscribe("items", 1)
            assert client.expect_push("items", 1)["name"] == "apples"   # pushed on subscribe
            app.test_client().post("/items/1", data={"name": "pears"})
            assert client.expect_push("items", 1)["name"] == "pears"
            app.test_client().delete("/items/1")
            client.expect_gone("items", 1)
            client.assert_silent()

The server is werkzeug's threaded server, like ``flask run``; the bus is the
app's own (``memory://`` by default), so a notify made anywhere in the test
process reaches the live server's clients. With pytest, the fixtures in
:mod:`entitysync_sync.pytest_plugin` do the same with less code.

Every wait has a deadline: ``expect_*`` fail with the frames they saw once it
passes, and :meth:`WebSocketClient.assert_silent` waits its whole window.
The client needs websocket-client: ``pip install 'entitysync_sync[testing]'``.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any, Callable, Mapping

from flask import Flask
from werkzeug.serving import BaseWSGIServer, make_server

from .exceptions import ConfigError
from .keys import EntityKey, IdLike

Frame = dict[str, Any]


def _websocket() -> Any:
    try:
        import websocket
    except ImportError:
        raise ConfigError(
            "entitysync_sync.testing's client needs websocket-client: "
            "pip install 'entitysync_sync[testing]'"
        ) from None
    return websocket


def _key(entity: str, id: IdLike) -> dict[str, str]:
    key = EntityKey(entity, id)
    return {"entity": key.entity, "id": key.id}


class WebSocketClient:
    """A real websocket client speaking entitysync's protocol, with assertions.

    :param url: the ``ws://`` URL of the endpoint (:attr:`LiveServer.ws_url`).
    :param cookies: cookies for the handshake, e.g. the session cookie that
        ``@es.identify`` reads.
    :param headers: extra handshake headers.
    :param timeout: the default deadline, in seconds, of every ``expect_*``.
    """

    def __init__(self, url: str, *, cookies: Mapping[str, str] | None = None,
                 headers: Mapping[str, str] | None = None, timeout: float = 5.0) -> None:
        websocket = _websocket()
        self._websocket = websocket
        self.timeout = timeout
        options: dict[str, Any] = {"timeout": timeout}
        if cookies:
            options["cookie"] = "; ".join(f"{name}={value}" for name, value in cookies.items())
        if headers:
            options["header"] = [f"{name}: {value}" for name, value in headers.items()]
        self.ws = websocket.create_connection(url, **options)
        #: Every frame received so far, in order.
        self.received: list[Frame] = []

    # -- sending ---------------------------------------------------------------

    def send(self, frame: Any) -> None:
        """Send a frame: a JSON-serialisable object, or a ``str`` as it is."""
        self.ws.send(frame if isinstance(frame, str) else json.dumps(frame))

    def subscribe(self, entity: str, id: IdLike, ref: str | int | None = None) -> None:
        """Subscribe to ``(entity, id)``."""
        self.send(self._frame("subscribe", _key(entity, id), ref))

    def unsubscribe(self, entity: str, id: IdLike, ref: str | int | None = None) -> None:
        """Unsubscribe from ``(entity, id)``."""
        self.send(self._frame("unsubscribe", _key(entity, id), ref))

    def set_secret(self, secret: str | None, ref: str | int | None = None) -> None:
        """Replace the connection's secret (``None`` clears it)."""
        self.send(self._frame("secret", secret, ref))

    @staticmethod
    def _frame(action: str, body: Any, ref: str | int | None) -> Frame:
        frame: Frame = {"action": action, "body": body}
        if ref is not None:
            frame["ref"] = ref
        return frame

    # -- receiving -------------------------------------------------------------

    def recv(self, timeout: float | None = None) -> Frame:
        """The next frame, decoded; raises ``AssertionError`` if none arrives in time."""
        self.ws.settimeout(self.timeout if timeout is None else max(timeout, 0.001))
        try:
            text = self.ws.recv()
        except self._websocket.WebSocketTimeoutException:
            raise AssertionError(f"no frame within {timeout}s") from None
        frame: Frame = json.loads(text)
        self.received.append(frame)
        return frame

    def expect(self, predicate: Callable[[Frame], bool], timeout: float | None = None,
               what: str = "a matching frame") -> Frame:
        """Read frames until one matches ``predicate`` and return it; fail after ``timeout``."""
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        seen: list[Frame] = []
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"expected {what} within {limit}s; received {seen!r}")
            try:
                frame = self.recv(remaining)
            except AssertionError:
                continue
            seen.append(frame)
            if predicate(frame):
                return frame

    def _about(self, entity: str, id: IdLike, actions: tuple[str, ...], what: str,
               timeout: float | None) -> Frame:
        key = _key(entity, id)

        def match(frame: Frame) -> bool:
            if frame.get("key") != key:
                return False
            if frame.get("action") in actions:
                return True
            if frame.get("action") in ("push", "gone", "error"):
                raise AssertionError(f"expected {what} of {key['entity']}/{key['id']}, got {frame!r}")
            return False

        return self.expect(match, timeout, f"{what} of {key['entity']}/{key['id']}")

    def expect_push(self, entity: str, id: IdLike, timeout: float | None = None) -> Any:
        """Wait for a push of ``(entity, id)`` and return its row (its ``"body"``),
        or its list of rows (``"rows"``) when the fetch returned a set.

        Frames about other keys (and acks) are skipped; a ``gone`` or an
        error about this key fails at once.
        """
        frame = self._about(entity, id, ("push",), "a push", timeout)
        return frame["rows"] if "rows" in frame else frame["body"]

    def expect_gone(self, entity: str, id: IdLike, timeout: float | None = None) -> None:
        """Wait for ``gone`` of ``(entity, id)``; a push or an error about it fails at once."""
        self._about(entity, id, ("gone",), "gone", timeout)

    def expect_error(self, code: str, timeout: float | None = None) -> Frame:
        """Wait for an error frame with ``code`` (``forbidden``, ``unknown_entity``...) and return it."""
        return self.expect(lambda f: f.get("action") == "error" and f["error"]["code"] == code,
                           timeout, f"an error {code!r}")

    def assert_silent(self, within: float = 0.3) -> None:
        """Fail if any frame arrives within ``within`` seconds (this waits the whole window)."""
        self.ws.settimeout(within)
        try:
            text = self.ws.recv()
        except self._websocket.WebSocketTimeoutException:
            return
        raise AssertionError(f"expected no frame within {within}s, got {text!r}")

    def close(self) -> None:
        """Close the connection; idempotent."""
        self.ws.close()

    def __enter__(self) -> WebSocketClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LiveServer:
    """Runs a Flask app on an ephemeral port of ``host`` in a background thread.

    Use it as a context manager, or call :meth:`start` and :meth:`stop`.
    Clients made with :meth:`client` are closed by :meth:`stop`. The app's
    EntitySync is left open, so one app can serve several tests in turn.
    """

    def __init__(self, app: Flask, host: str = "127.0.0.1", port: int = 0) -> None:
        if "entitysync" not in app.extensions:
            raise ConfigError("LiveServer needs an app with EntitySync registered: call init_app(app)")
        self.app = app
        self.host = host
        self._port = port
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None
        self._clients: list[WebSocketClient] = []

    @property
    def port(self) -> int:
        """The port the server listens on (known once started)."""
        if self._server is None:
            raise RuntimeError("the LiveServer is not started")
        return int(self._server.server_port)

    @property
    def url(self) -> str:
        """``http://host:port``, for HTTP requests to the app."""
        return f"http://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        """The ``ws://`` URL of the app's entitysync endpoint (``ENTITYSYNC_PATH``)."""
        return f"ws://{self.host}:{self.port}{self.app.config['ENTITYSYNC_PATH']}"

    def start(self) -> LiveServer:
        """Listen and serve in a daemon thread; returns at once, ready for connections."""
        if self._server is not None:
            raise RuntimeError("the LiveServer is already started")
        self._server = make_server(self.host, self._port, self.app, threaded=True)
        self._thread = threading.Thread(target=self._server.serve_forever, name="entitysync-live-server",
                                         daemon=True)
        self._thread.start()
        return self

    def client(self, *, cookies: Mapping[str, str] | None = None, headers: Mapping[str, str] | None = None,
               timeout: float = 5.0) -> WebSocketClient:
        """Connect a :class:`WebSocketClient` to the app's endpoint."""
        client = WebSocketClient(self.ws_url, cookies=cookies, headers=headers, timeout=timeout)
        self._clients.append(client)
        return client

    def stop(self) -> None:
        """Close the clients made here and stop serving; idempotent."""
        for client in self._clients:
            try:
                client.close()
            except Exception:  # pragma: no cover - a client broken by its test
                pass
        self._clients.clear()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    def __enter__(self) -> LiveServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
