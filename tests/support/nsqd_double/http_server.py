"""The double's HTTP API (nsqd's http.go): what clients and tests use."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from .codec import VERSION, ClientError, Closed, is_valid_name, read_mpub
from .model import Message, Topic
from .options import INFO

if TYPE_CHECKING:
    from .daemon import NSQD


class HTTPError(Exception):
    """An error answer; ``close`` when nsqd answers before reading the body and so closes the connection."""

    def __init__(self, status: int, message: str, close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.close = close


_STATUS = {200: "200 OK", 400: "400 Bad Request", 404: "404 Not Found", 405: "405 Method Not Allowed",
           413: "413 Request Entity Too Large", 500: "500 Internal Server Error", 503: "503 Service Unavailable"}
_BOOL_PARAMS = {"true": True, "1": True, "false": False, "0": False}


class HTTPApp:
    """nsqd's HTTP API (http.go) for what clients and tests use; errors as ``{"message": CODE}``."""

    def __init__(self, nsqd: NSQD) -> None:
        self.nsqd = nsqd
        self.routes: dict[str, tuple[str, Callable[[dict[str, list[str]], dict[str, Any], int], Any]]] = {
            "/ping": ("GET", self.ping), "/info": ("GET", self.info), "/stats": ("GET", self.stats),
            "/pub": ("POST", self.pub), "/mpub": ("POST", self.mpub),
            "/topic/create": ("POST", self.topic_create), "/topic/delete": ("POST", self.topic_delete),
            "/topic/empty": ("POST", self.topic_empty), "/topic/pause": ("POST", self.topic_pause),
            "/topic/unpause": ("POST", self.topic_pause), "/channel/create": ("POST", self.channel_create),
            "/channel/delete": ("POST", self.channel_delete), "/channel/empty": ("POST", self.channel_empty),
            "/channel/pause": ("POST", self.channel_pause), "/channel/unpause": ("POST", self.channel_pause),
        }

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        path = environ.get("PATH_INFO", "")
        method = environ.get("REQUEST_METHOD", "GET")
        headers = [("X-NSQ-Content-Type", "nsq; version=1.0")]
        route = self.routes.get(path)
        close = False
        try:
            if route is None:
                raise HTTPError(404, "NOT_FOUND")
            if route[0] != method:
                raise HTTPError(405, "METHOD_NOT_ALLOWED")
            params = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
            length = int(environ.get("CONTENT_LENGTH") or 0)
            data = route[1](params, environ, length)
            status = 200
        except HTTPError as err:
            status, data, close = err.status, {"message": err.message}, err.close
        self.nsqd.log(INFO, f"{status} {method} {path} ({environ.get('REMOTE_ADDR', '')})")
        if path == "/ping" and status == 200:
            body, ctype = data.encode(), "text/plain; charset=utf-8"
        elif isinstance(data, str):
            body, ctype = data.encode(), "text/plain; charset=utf-8"
        elif isinstance(data, bytes):
            body, ctype = data, "text/plain; charset=utf-8"
        elif data is None:
            body, ctype = b"", "text/plain; charset=utf-8"
        else:
            body, ctype = json.dumps(data, separators=(",", ":")).encode(), "application/json; charset=utf-8"
        headers += [("Content-Type", ctype), ("Content-Length", str(len(body)))]
        if close:
            # Go's server leaves an unread body unread and closes the connection.
            headers.append(("Connection", "close"))
        start_response(_STATUS.get(status, f"{status} Error"), headers)
        return [body]

    # Helpers.

    def _topic_from_query(self, params: dict[str, list[str]], create: bool = True) -> Topic:
        if "topic" not in params:
            raise HTTPError(400, "MISSING_ARG_TOPIC")
        name = params["topic"][0]
        if not is_valid_name(name):
            raise HTTPError(400, "INVALID_TOPIC")
        if create:
            return self.nsqd.get_topic(name)
        topic = self.nsqd.topics.get(name)
        if topic is None:
            raise HTTPError(404, "TOPIC_NOT_FOUND")
        return topic

    def _topic_channel(self, params: dict[str, list[str]]) -> tuple[Topic, str]:
        if "topic" not in params:
            raise HTTPError(400, "MISSING_ARG_TOPIC")
        topic_name = params["topic"][0]
        if not is_valid_name(topic_name):
            raise HTTPError(400, "INVALID_ARG_TOPIC")
        if "channel" not in params:
            raise HTTPError(400, "MISSING_ARG_CHANNEL")
        channel_name = params["channel"][0]
        if not is_valid_name(channel_name):
            raise HTTPError(400, "INVALID_ARG_CHANNEL")
        topic = self.nsqd.topics.get(topic_name)
        if topic is None:
            raise HTTPError(404, "TOPIC_NOT_FOUND")
        return topic, channel_name

    # Endpoints.

    def ping(self, params: dict[str, list[str]], environ: dict[str, Any], length: int) -> str:
        return "OK"

    def info(self, params: dict[str, list[str]], environ: dict[str, Any], length: int) -> dict[str, Any]:
        opts = self.nsqd.opts
        assert self.nsqd.tcp_server is not None and self.nsqd.http_server is not None
        return {
            "version": VERSION, "broadcast_address": opts.broadcast_address, "hostname": socket.gethostname(),
            "http_port": self.nsqd.http_server.address[1], "tcp_port": self.nsqd.tcp_server.address[1],
            "start_time": self.nsqd.start_time,
            "max_heartbeat_interval": int(opts.max_heartbeat_interval * 1e9),
            "max_output_buffer_size": opts.max_output_buffer_size,
            "max_output_buffer_timeout": int(opts.max_output_buffer_timeout * 1e9),
            "max_deflate_level": opts.max_deflate_level,
        }

    def stats(self, params: dict[str, list[str]], environ: dict[str, Any], length: int) -> Any:
        def param(name: str) -> str:
            return params.get(name, [""])[0]

        include_clients = _BOOL_PARAMS.get(param("include_clients"), True)
        stats = self.nsqd.stats(param("topic"), param("channel"), include_clients)
        if _BOOL_PARAMS.get(param("include_mem"), True):
            stats["memory"] = {k: 0 for k in ("heap_objects", "heap_idle_bytes", "heap_in_use_bytes",
                                              "heap_released_bytes", "gc_pause_usec_100", "gc_pause_usec_99",
                                              "gc_pause_usec_95", "next_gc_bytes", "gc_total_runs")}
        if param("format") == "json":
            return stats
        return _stats_text(stats)

    def pub(self, params: dict[str, list[str]], environ: dict[str, Any], length: int) -> str:
        max_size = self.nsqd.opts.max_msg_size
        if length > max_size:
            raise HTTPError(413, "MSG_TOO_BIG", close=True)  # before reading a byte of the body
        data = environ["wsgi.input"].read(max_size + 1)
        if len(data) == max_size + 1:
            raise HTTPError(413, "MSG_TOO_BIG")
        if not data:
            raise HTTPError(400, "MSG_EMPTY")
        topic = self._topic_from_query(params)
        deferred = 0.0
        if "defer" in params:
            try:
                defer_ms = int(params["defer"][0])
            except ValueError as exc:
                raise HTTPError(400, "INVALID_DEFER") from exc
            if defer_ms < 0 or defer_ms > self.nsqd.opts.max_req_timeout * 1000:
                raise HTTPError(400, "INVALID_DEFER")
            deferred = defer_ms / 1000
        topic.put_messages([Message(self.nsqd.new_id(), data, deferred=deferred)])
        return "OK"

    def mpub(self, params: dict[str, list[str]], environ: dict[str, Any], length: int) -> str:
        opts = self.nsqd.opts
        if length > opts.max_body_size:
            raise HTTPError(413, "BODY_TOO_BIG", close=True)
        topic = self._topic_from_query(params)
        binary = False
        if "binary" in params:
            binary = _BOOL_PARAMS.get(params["binary"][0], True)
        if binary:
            data = environ["wsgi.input"].read(opts.max_body_size + 1)
            view = {"pos": 0}

            def read(n: int) -> bytes:
                chunk = data[view["pos"]:view["pos"] + n]
                if len(chunk) < n:
                    raise Closed
                view["pos"] += n
                return bytes(chunk)

            try:
                bodies = read_mpub(read, opts)
            except ClientError as err:
                raise HTTPError(413, err.code[2:]) from err
        else:
            data = environ["wsgi.input"].read(opts.max_body_size + 1)
            if len(data) == opts.max_body_size + 1:
                raise HTTPError(413, "BODY_TOO_BIG")
            bodies = [line for line in data.split(b"\n") if line]  # nsqd drops empty lines silently
            if any(len(b) > opts.max_msg_size for b in bodies):
                raise HTTPError(413, "MSG_TOO_BIG")
        topic.put_messages([Message(self.nsqd.new_id(), b) for b in bodies])
        return "OK"

    def topic_create(self, params: dict[str, list[str]], environ: dict[str, Any], length: int) -> None:
        self._topic_from_query(params)

    def topic_delete(self, params: dict[str, list[str]], environ: dict[str, Any], length: int) -> None:
        if "topic" not in params:
            raise HTTPError(400, "MISSING_ARG_TOPIC")
        name = params["topic"][0]
        if name not in self.nsqd.topics:
            raise HTTPError(404, "TOPIC_NOT_FOUND")
        self.nsqd.delete_topic(name)

    def topic_empty(self, params: dict[str, list[str]], environ: dict[str, Any], length: int) -> None:
        self._topic_from_query(params, create=False).queue.clear()

    def topic_pause(self, params: dict[str, list[str]], environ: dict[str, Any], length: int) -> None:
        if "topic" not in params:
            raise HTTPError(400, "MISSING_ARG_TOPIC")
        name = params["topic"][0]
        topic = self.nsqd.topics.get(name)
        if topic is None:
            raise HTTPError(404, "TOPIC_NOT_FOUND")
        topic.paused = "unpause" not in environ["PATH_INFO"]
        topic.pump()
        self.nsqd.persist_metadata()

    def channel_create(self, params: dict[str, list[str]], environ: dict[str, Any], length: int) -> None:
        topic, name = self._topic_channel(params)
        topic.get_channel(name)

    def channel_delete(self, params: dict[str, list[str]], environ: dict[str, Any], length: int) -> None:
        topic, name = self._topic_channel(params)
        try:
            topic.delete_channel(name)
        except KeyError as exc:
            raise HTTPError(404, "CHANNEL_NOT_FOUND") from exc

    def channel_empty(self, params: dict[str, list[str]], environ: dict[str, Any], length: int) -> None:
        topic, name = self._topic_channel(params)
        channel = topic.channels.get(name)
        if channel is None:
            raise HTTPError(404, "CHANNEL_NOT_FOUND")
        channel.queue.clear()
        for msg in list(channel.in_flight.values()):
            owner = channel.clients.get(msg.client_id)
            if owner is not None:
                owner.in_flight_count = 0
        channel.in_flight.clear()
        channel.deferred.clear()

    def channel_pause(self, params: dict[str, list[str]], environ: dict[str, Any], length: int) -> None:
        topic, name = self._topic_channel(params)
        channel = topic.channels.get(name)
        if channel is None:
            raise HTTPError(404, "CHANNEL_NOT_FOUND")
        channel.paused = "unpause" not in environ["PATH_INFO"]
        if channel.paused:
            for client in channel.clients.values():
                client.flush()  # a paused channel's clients are not ready: nsqd flushes their buffers
        channel.dispatch()
        self.nsqd.persist_metadata()


def _stats_text(stats: dict[str, Any]) -> str:
    lines = [f"nsqd v{VERSION} (NSQ protocol double)", f"start_time {stats['start_time']}", "",
             f"Health: {stats['health']}", ""]
    if not stats["topics"]:
        lines.append("Topics: None")
    else:
        lines.append("Topics:")
    for t in stats["topics"] or []:
        lines.append(f"   [{t['topic_name']:<15}] depth: {t['depth']:<5} be-depth: {t['backend_depth']:<5} "
                     f"msgs: {t['message_count']:<8}")
        for c in t["channels"]:
            lines.append(f"      [{c['channel_name']:<25}] depth: {c['depth']:<5} be-depth: {c['backend_depth']:<5} "
                         f"inflt: {c['in_flight_count']:<4} def: {c['deferred_count']:<4} "
                         f"re-q: {c['requeue_count']:<5} timeout: {c['timeout_count']:<5} "
                         f"msgs: {c['message_count']:<8}")
    return "\n".join(lines) + "\n"

