"""The websocket endpoint: the route's loop, the origin check and the browser client's files.

:func:`endpoint_blueprint` builds the blueprint that
:meth:`EntitySync.init_app <entitysync_sync.EntitySync.init_app>` registers:
the websocket route at ``ENTITYSYNC_PATH``, and the
browser client at that path plus ``client.js`` and ``client.mjs``, with its
TypeScript declarations at ``client.d.ts``. A client
frame goes from here to :meth:`Connection.receive
<entitysync_sync.connection.Connection.receive>`; frames to the client are
written by the connection through :mod:`entitysync_sync.transport`.
"""

from __future__ import annotations

import logging
import threading
from functools import lru_cache, partial
from hashlib import sha256
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

from flask import Blueprint, Flask, abort, current_app, request
from flask_sock import Sock
from werkzeug.wrappers import Response

from . import protocol as p
from .concurrency import gevent_active
from .connection import Connection
from .runtime import EXTENSION_NAME, Runtime
from .settings import Settings
from .transport import FrameTooBig, WebSocketTransport

log = logging.getLogger("entitysync_sync")


def endpoint_blueprint(settings: Settings) -> Blueprint:
    """The websocket route and the client files, configured by ``settings``."""
    blueprint = Blueprint(BLUEPRINT, __name__)
    blueprint.before_request(partial(_check_origin, settings.allowed_origins))
    if not settings.compression:
        blueprint.before_request(_refuse_compression)
    Sock().route(settings.path, bp=blueprint)(serve)
    blueprint.add_url_rule(settings.path + "client.js", "client_js", _client_script)
    blueprint.add_url_rule(settings.path + "client.mjs", "client_mjs", _client_module)
    blueprint.add_url_rule(settings.path + "client.d.ts", "client_d_ts", _client_types)
    return blueprint


BLUEPRINT = "entitysync"


class _ServerOption:
    """One of the app's ``SOCK_SERVER_OPTIONS`` that differs for this extension's route.

    flask-sock builds every websocket route's simple-websocket server with the
    app's ``SOCK_SERVER_OPTIONS``, inside the request. For this extension's
    route the server must not start its reader thread (the handler reads the
    socket itself: one greenlet per connection); the app's own flask-sock
    routes keep what the app chose, or simple-websocket's default.
    """

    def __init__(self, ours: Any, theirs: Any, default: Callable[[], Any]) -> None:
        self.ours, self.theirs, self.default = ours, theirs, default

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if request.blueprint == BLUEPRINT:
            return self.ours(*args, **kwargs)
        return (self.theirs or self.default())(*args, **kwargs)


def install_server_options(app: Flask) -> None:
    """Make flask-sock build this extension's websocket servers without a reader thread.

    The app's ``SOCK_SERVER_OPTIONS`` is updated in place; set any options
    of the app's own before ``init_app``, or update the dict in place after it.
    """
    options = app.config.setdefault("SOCK_SERVER_OPTIONS", {})
    defaults = {"thread_class": lambda: threading.Thread, "event_class": lambda: threading.Event}
    for name, ours in WebSocketTransport.SERVER_OPTIONS.items():
        theirs = options.get(name)
        if isinstance(theirs, _ServerOption):
            theirs = theirs.theirs
        options[name] = _ServerOption(ours, theirs, defaults[name])


def serve(ws: Any) -> None:
    """The websocket route: one connection, from its upgrade to the end of its stream.

    flask-sock answers the handshake (with simple-websocket), but the frames
    are read here, in the request's own greenlet or thread, by
    :class:`~entitysync_sync.transport.WebSocketTransport`: one greenlet per
    connection under gevent.
    """
    runtime: Runtime = current_app.extensions[EXTENSION_NAME]
    try:
        transport = WebSocketTransport.adopt(ws, runtime.tasks, runtime.settings.max_message_bytes,
                                             runtime.settings.send_timeout)
    except RuntimeError:
        log.exception("the websocket cannot be served")
        return
    try:
        _converse(runtime, transport)
    except Exception:
        # Logged here so that it never escapes into the server's own error
        # handling, which would write an HTTP response onto the websocket.
        log.exception("the websocket handler failed")
    finally:
        try:
            transport.finish()
        except Exception:
            log.debug("ending the websocket stream failed", exc_info=True)


def _converse(runtime: Runtime, transport: WebSocketTransport) -> None:
    if runtime.closed:
        transport.close(p.CLOSE_GOING_AWAY, "server shutting down")
        return
    if runtime.draining:
        transport.close(p.CLOSE_SERVICE_RESTART, "server restarting")
        return
    runtime.ensure_started()
    secret = None
    identify = runtime.registry.identify
    if identify is not None:
        try:
            secret = identify()
        except Exception:
            log.exception("identify raised; closing the connection")
            transport.close(p.CLOSE_INTERNAL_ERROR, "identify failed")
            return
    conn = Connection(transport, runtime.hub, runtime.handlers, runtime.limits, secret)
    if runtime.draining:  # began while this one was being set up: the drain did not see it
        conn.close(p.CLOSE_SERVICE_RESTART, "server restarting")
    limit = runtime.settings.max_message_bytes
    # A close decided by another thread must end this loop within a second:
    # threads poll. Under gevent the transport stops the read itself once
    # the close frame has waited its linger for an answer.
    poll = None if gevent_active() else 1.0
    try:
        while not conn.closed:
            try:
                data = transport.receive(timeout=poll)
            except FrameTooBig:
                conn.close(p.CLOSE_MESSAGE_TOO_BIG, "message too big")
                break
            if data is None:
                if not transport.connected:
                    break
            elif len(data if isinstance(data, bytes) else data.encode()) > limit:
                # Normally refused by the transport before it is buffered.
                conn.close(p.CLOSE_MESSAGE_TOO_BIG, "message too big")
            else:
                conn.receive(data)
    except Exception:
        log.exception("the websocket handler failed; closing the connection with 1011")
        conn.close(p.CLOSE_INTERNAL_ERROR, "internal error")
    finally:
        conn.close()


_STATIC = Path(__file__).with_name("static")
_MODULE_EXPORTS = "\nEntitySync.src = import.meta.url;\nexport { EntitySync };\nexport default EntitySync;\n"


@lru_cache(maxsize=3)
def _client_source(name: str) -> str:
    if name == "client.d.ts":
        return (_STATIC / "entitysync.d.ts").read_text(encoding="utf-8")
    source = (_STATIC / "entitysync.js").read_text(encoding="utf-8")
    return source + _MODULE_EXPORTS if name == "client.mjs" else source


def _client_response(name: str, content_type: str = "text/javascript; charset=utf-8") -> Response:
    source = _client_source(name)
    response = current_app.response_class(source, content_type=content_type)
    response.set_etag(sha256(source.encode()).hexdigest()[:32])
    # The URL does not change when the package is upgraded: browsers keep
    # the file but revalidate it, which costs a 304 while it is unchanged.
    response.cache_control.no_cache = True
    return response.make_conditional(request)


def _client_script() -> Response:
    """The browser client as a plain script defining the global ``EntitySync``."""
    return _client_response("client.js")


def _client_module() -> Response:
    """The browser client as an ES module exporting ``EntitySync``."""
    return _client_response("client.mjs")


def _client_types() -> Response:
    """The browser client's TypeScript declarations."""
    return _client_response("client.d.ts", "application/typescript; charset=utf-8")


def _check_origin(allowed: frozenset[str] | None) -> None:
    """Refuse (HTTP 403) a websocket upgrade from a page of another origin.

    Browsers send ``Origin`` with every websocket handshake and attach the
    site's cookies whatever page opens the socket, so without this check any
    site could open a socket with a visitor's session (cross-site websocket
    hijacking). Same origin means the same host and port as the ``Host``
    header. Requests without ``Origin`` (not from a browser) are allowed.
    """
    if request.headers.get("Upgrade", "").lower() != "websocket":
        return
    origin = request.headers.get("Origin")
    if origin is None or _same_origin(origin, request.host):
        return
    if allowed is not None and ("*" in allowed or origin.rstrip("/").lower() in allowed):
        return
    log.warning("refused a websocket upgrade from origin %r (see ENTITYSYNC_ALLOWED_ORIGINS)", origin[:200])
    abort(403)


_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def _same_origin(origin: str, host: str) -> bool:
    try:
        parts = urlsplit(origin.strip())
        origin_port = parts.port or _DEFAULT_PORTS.get(parts.scheme.lower())
        target = urlsplit("//" + host)
        target_port = target.port
    except ValueError:
        return False
    if not parts.hostname or parts.hostname != target.hostname:
        return False
    # The Host header omits the default port of whichever scheme the client used.
    return (target_port is None and origin_port in (80, 443)) or target_port == origin_port


def _refuse_compression() -> None:
    # Without an offer in the handshake, simple-websocket cannot negotiate permessage-deflate.
    request.environ.pop("HTTP_SEC_WEBSOCKET_EXTENSIONS", None)


