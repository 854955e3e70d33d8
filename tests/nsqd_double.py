"""An NSQ protocol double: a small nsqd written with gevent, for tests on machines without nsqd.

Run it as its own process, with the flag names real nsqd uses::

    python -m tests.nsqd_double --tcp-address=127.0.0.1:0 --http-address=127.0.0.1:0 --data-path=/tmp/x

It logs the same ``TCP: listening on ADDR`` and ``HTTP: listening on ADDR`` lines as
nsqd 1.3.0 (``[nsqd] 2006/01/02 15:04:05.000000 INFO: ...`` on stderr), so one
fixture can launch either and read the ports the same way.

It follows the published TCP protocol and nsqd 1.3.0's source (``nsqd/protocol_v2.go``,
``client_v2.go``, ``channel.go``, ``topic.go``, ``http.go``, ``internal/protocol/names.go``):
the same commands, error codes and texts, fatal versus non-fatal errors, IDENTIFY range
checks, heartbeats and the two-interval read deadline, RDY accounting, in-flight and
deferred timeouts scanned every 100 ms, per-channel fan-out, ephemeral topics and
channels, and the HTTP endpoints a client or a test uses.

Where it differs from nsqd, on purpose:

- It behaves like ``nsqd --deflate=false --snappy=false`` with no TLS: feature
  negotiation answers ``false`` for all three, so a client never upgrades the stream.
  No auth server either: ``AUTH`` answers ``E_AUTH_DISABLED`` as nsqd does without one.
- There is no disk queue. A durable topic or channel keeps any number of messages in
  memory (where nsqd would spill past ``--mem-queue-size`` to disk); an ephemeral one
  holds at most ``--mem-queue-size`` and drops the rest, as nsqd does. ``backend_depth``
  in /stats reports what nsqd would have put on disk.
- Durability across restarts: with ``--data-path`` it writes ``nsqd.dat`` (nsqd's own
  metadata format: durable topics and channels) whenever one is created or deleted, and
  on a clean exit (SIGTERM/SIGINT) it also saves every queued, in-flight and deferred
  message of durable topics and channels, which come back on the next start, as nsqd's
  flush to disk does. After SIGKILL only the metadata survives, as with nsqd when its
  messages were all still in memory. Without ``--data-path`` nothing is written.
- Output buffering: frames are written as soon as they are ready, never held for
  ``output_buffer_timeout``; ``sample_rate`` is honoured; no nsqlookupd, statsd or e2e
  latency percentiles (flags for them are accepted and ignored).
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import os
import random
import re
import signal
import socket
import struct
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import gevent
import gevent.event
import gevent.queue
from gevent.pywsgi import WSGIServer
from gevent.server import StreamServer

VERSION = "1.3.0"
MAGIC_V2 = b"  V2"
FRAME_RESPONSE, FRAME_ERROR, FRAME_MESSAGE = 0, 1, 2
HEARTBEAT = b"_heartbeat_"
OK = b"OK"
MSG_ID_LENGTH = 16
READ_BUFFER_SIZE = 16 * 1024  # nsqd's bufio reader: a longer command line is a read error
DEFAULT_OUTPUT_BUFFER_SIZE = 16 * 1024
QUEUE_SCAN_INTERVAL = 0.1
CLIENT_TIMEOUT = 60.0  # nsqd's ClientTimeout; the default heartbeat is half of it
METADATA_FILE = "nsqd.dat"
MESSAGES_FILE = "nsqd-double.messages.json"

STATE_INIT, STATE_DISCONNECTED, STATE_CONNECTED, STATE_SUBSCRIBED, STATE_CLOSING = range(5)

_NAME_RE = re.compile(r"[.a-zA-Z0-9_-]+(#ephemeral)?")


# --------------------------------------------------------------------------- codec


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


def parse_duration(text: str) -> float:
    """A Go duration string (``60s``, ``1m30s``, ``250ms``, ``0``) in seconds."""
    units = {"ns": 1e-9, "us": 1e-6, "\u00b5s": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    text = text.strip()
    sign = -1.0 if text.startswith("-") else 1.0
    body = text.lstrip("+-")
    if body == "0":
        return 0.0
    parts = re.findall(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|\u00b5s|ms|s|m|h)", body)
    if not parts or "".join(n + u for n, u in parts) != body:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}")
    return sign * sum(float(n) * units[u] for n, u in parts)


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


# --------------------------------------------------------------------------- options


@dataclass
class Options:
    tcp_address: str = "0.0.0.0:4150"
    http_address: str = "0.0.0.0:4151"
    broadcast_address: str = field(default_factory=socket.gethostname)
    data_path: str = ""
    mem_queue_size: int = 10000
    msg_timeout: float = 60.0
    max_msg_timeout: float = 15 * 60.0
    max_msg_size: int = 1024 * 1024
    max_body_size: int = 5 * 1024 * 1024
    max_req_timeout: float = 3600.0
    max_heartbeat_interval: float = 60.0
    max_rdy_count: int = 2500
    max_output_buffer_size: int = 64 * 1024
    max_output_buffer_timeout: float = 30.0
    min_output_buffer_timeout: float = 0.025
    output_buffer_timeout: float = 0.25
    max_channel_consumers: int = 0
    max_deflate_level: int = 6
    log_level: str = "info"
    log_prefix: str = "[nsqd] "


_DURATION_FLAGS = ("msg-timeout", "max-msg-timeout", "max-req-timeout", "max-heartbeat-interval",
                   "max-output-buffer-timeout", "min-output-buffer-timeout", "output-buffer-timeout")
_INT_FLAGS = ("mem-queue-size", "max-msg-size", "max-body-size", "max-rdy-count", "max-output-buffer-size",
              "max-channel-consumers", "max-deflate-level")
_STR_FLAGS = ("tcp-address", "http-address", "broadcast-address", "data-path", "log-level", "log-prefix")
# Real flags whose features the double lacks; accepted so one command line serves both.
_BOOL_FLAGS = ("deflate", "snappy", "statsd-mem-stats", "statsd-exclude-ephemeral", "verbose")


def parse_args(argv: list[str]) -> tuple[Options, list[str], bool]:
    # Go's flag package takes -flag and --flag alike.
    argv = ["-" + a if a.startswith("-") and not a.startswith("--") and len(a) > 2 else a for a in argv]
    parser = argparse.ArgumentParser(prog="python -m tests.nsqd_double", add_help=True)
    for name in _STR_FLAGS:
        parser.add_argument("--" + name)
    for name in _INT_FLAGS:
        parser.add_argument("--" + name, type=int)
    for name in _DURATION_FLAGS:
        parser.add_argument("--" + name, type=parse_duration)
    for name in _BOOL_FLAGS:
        parser.add_argument("--" + name, nargs="?", const="true")
    parser.add_argument("--version", action="store_true")
    args, unknown = parser.parse_known_args(argv)
    opts = Options()
    for name in (*_STR_FLAGS, *_INT_FLAGS, *_DURATION_FLAGS):
        value = getattr(args, name.replace("-", "_"))
        if value is not None:
            setattr(opts, name.replace("-", "_"), value)
    return opts, unknown, args.version


# --------------------------------------------------------------------------- logging


_LEVELS = {"debug": 1, "info": 2, "warn": 3, "warning": 3, "error": 4, "fatal": 5}
_LEVEL_NAMES = {1: "DEBUG", 2: "INFO", 3: "WARNING", 4: "ERROR", 5: "FATAL"}


class Logger:
    """nsqd's log line: ``PREFIX 2006/01/02 15:04:05.000000 LEVEL: message``, on stderr."""

    def __init__(self, prefix: str, level: str) -> None:
        self.prefix = prefix
        self.level = _LEVELS.get(level.lower(), 2)

    def __call__(self, level: int, text: str) -> None:
        if level < self.level:
            return
        now = time.time()
        stamp = time.strftime("%Y/%m/%d %H:%M:%S", time.localtime(now)) + f".{int(now % 1 * 1e6):06d}"
        sys.stderr.write(f"{self.prefix}{stamp} {_LEVEL_NAMES[level]}: {text}\n")
        sys.stderr.flush()


DEBUG, INFO, WARN, ERROR = 1, 2, 3, 4


# --------------------------------------------------------------------------- model


@dataclass(eq=False)
class Message:
    id: bytes
    body: bytes
    timestamp: int = field(default_factory=time.time_ns)
    attempts: int = 0
    deferred: float = 0.0  # seconds; only set while the message travels from topic to channel
    client_id: int = 0
    deadline: float = 0.0  # in flight: when it times out; deferred: when it becomes ready
    delivered_at: float = 0.0

    def copy(self) -> Message:
        return Message(self.id, self.body, self.timestamp, self.attempts, self.deferred)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id.decode(), "body": base64.b64encode(self.body).decode(),
                "timestamp": self.timestamp, "attempts": self.attempts}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Message:
        return cls(data["id"].encode(), base64.b64decode(data["body"]), data["timestamp"], data["attempts"])


class Channel:
    def __init__(self, nsqd: NSQD, topic: Topic, name: str) -> None:
        self.nsqd = nsqd
        self.topic = topic
        self.name = name
        self.ephemeral = name.endswith("#ephemeral")
        self.clients: dict[int, Client] = {}
        self.queue: deque[Message] = deque()
        self.in_flight: dict[bytes, Message] = {}
        self.deferred: dict[bytes, Message] = {}
        self.paused = False
        self.deleted = False
        self.message_count = 0
        self.requeue_count = 0
        self.timeout_count = 0
        self._next_client = itertools.count()

    # Messages in.

    def put_message(self, msg: Message) -> None:
        self.message_count += 1
        if msg.deferred:
            self.start_deferred(msg, msg.deferred)
        else:
            self.put(msg)

    def put(self, msg: Message) -> None:
        msg.deferred = 0.0
        self.queue.append(msg)
        self.dispatch()
        if self.ephemeral and len(self.queue) > self.nsqd.opts.mem_queue_size:
            self.queue.pop()  # no backend queue: nsqd drops what an ephemeral channel's memory cannot hold

    def start_deferred(self, msg: Message, delay: float) -> None:
        msg.deadline = time.monotonic() + delay
        self.deferred[msg.id] = msg

    # Messages out: every ready client of the channel takes turns.

    def dispatch(self) -> None:
        while self.queue and not self.paused and not self.topic.deleted:
            ready = [c for c in self.clients.values() if c.is_ready_for_messages()]
            if not ready:
                return
            client = ready[next(self._next_client) % len(ready)]
            msg = self.queue.popleft()
            if client.sample_rate > 0 and self.nsqd.random.randrange(100) > client.sample_rate:
                continue  # nsqd drops a message that a sampling client skips
            msg.attempts += 1
            now = time.monotonic()
            msg.client_id = client.id
            msg.delivered_at = now
            msg.deadline = now + client.msg_timeout
            self.in_flight[msg.id] = msg
            client.in_flight_count += 1
            client.message_count += 1
            client.send(frame(FRAME_MESSAGE, encode_message(msg)))

    def _pop_in_flight(self, client: Client, msg_id: bytes) -> Message:
        msg = self.in_flight.get(msg_id)
        if msg is None:
            raise ValueError("ID not in flight")
        if msg.client_id != client.id:
            raise ValueError("client does not own message")
        del self.in_flight[msg_id]
        return msg

    def finish(self, client: Client, msg_id: bytes) -> None:
        self._pop_in_flight(client, msg_id)

    def requeue(self, client: Client, msg_id: bytes, delay: float) -> None:
        msg = self._pop_in_flight(client, msg_id)
        self.requeue_count += 1
        if delay == 0:
            self.put(msg)
        else:
            self.start_deferred(msg, delay)

    def touch(self, client: Client, msg_id: bytes) -> None:
        msg = self.in_flight.get(msg_id)
        if msg is None:
            raise ValueError("ID not in flight")
        if msg.client_id != client.id:
            raise ValueError("client does not own message")
        msg.deadline = min(time.monotonic() + client.msg_timeout, msg.delivered_at + self.nsqd.opts.max_msg_timeout)

    def scan(self, now: float) -> None:
        """nsqd's processInFlightQueue and processDeferredQueue."""
        for msg in sorted((m for m in self.in_flight.values() if m.deadline <= now), key=lambda m: m.deadline):
            del self.in_flight[msg.id]
            self.timeout_count += 1
            owner = self.clients.get(msg.client_id)
            if owner is not None:
                owner.in_flight_count -= 1
            self.put(msg)
        for msg in sorted((m for m in self.deferred.values() if m.deadline <= now), key=lambda m: m.deadline):
            del self.deferred[msg.id]
            self.put(msg)
        if self.clients:
            self.dispatch()

    # Clients.

    def add_client(self, client: Client) -> None:
        limit = self.nsqd.opts.max_channel_consumers
        if limit and len(self.clients) >= limit:
            raise ValueError(f"consumers for {self.topic.name}:{self.name} exceeds limit of {limit}")
        self.clients[client.id] = client

    def remove_client(self, client: Client) -> None:
        # In-flight messages stay in flight until they time out, as in nsqd.
        if self.deleted:
            return
        if self.clients.pop(client.id, None) is not None and not self.clients and self.ephemeral:
            self.topic.delete_channel(self.name)

    def depth(self) -> int:
        return len(self.queue)

    def all_messages(self) -> list[Message]:
        return [*self.in_flight.values(), *self.deferred.values(), *self.queue]


class Topic:
    def __init__(self, nsqd: NSQD, name: str) -> None:
        self.nsqd = nsqd
        self.name = name
        self.ephemeral = name.endswith("#ephemeral")
        self.channels: dict[str, Channel] = {}
        self.queue: deque[Message] = deque()
        self.paused = False
        self.deleted = False
        self.message_count = 0
        self.message_bytes = 0

    def put_messages(self, msgs: Iterable[Message]) -> None:
        for msg in msgs:
            self.message_count += 1
            self.message_bytes += len(msg.body)
            self.queue.append(msg)
            self.pump()
            if self.ephemeral and len(self.queue) > self.nsqd.opts.mem_queue_size:
                self.queue.pop()  # no backend queue for an ephemeral topic

    def pump(self) -> None:
        """nsqd's topic messagePump: with no channels (or paused) the topic holds its messages."""
        if not self.channels or self.paused:
            return
        while self.queue:
            msg = self.queue.popleft()
            for i, channel in enumerate(list(self.channels.values())):
                channel.put_message(msg if i == 0 else msg.copy())

    def get_channel(self, name: str) -> Channel:
        channel = self.channels.get(name)
        if channel is None:
            channel = self.channels[name] = Channel(self.nsqd, self, name)
            self.nsqd.log(INFO, f"TOPIC({self.name}): new channel({name})")
            self.nsqd.persist_metadata()
            self.pump()
        return channel

    def delete_channel(self, name: str) -> None:
        channel = self.channels.pop(name, None)
        if channel is None:
            raise KeyError(name)
        self.nsqd.log(INFO, f"TOPIC({self.name}): deleting channel {name}")
        channel.deleted = True
        for client in list(channel.clients.values()):
            client.close()
        channel.queue.clear()
        channel.in_flight.clear()
        channel.deferred.clear()
        self.nsqd.persist_metadata()
        if not self.channels and self.ephemeral:
            self.nsqd.delete_topic(self.name)

    def depth(self) -> int:
        return len(self.queue)


# --------------------------------------------------------------------------- TCP clients


class _Closed(Exception):
    pass


class Client:
    """One TCP connection speaking protocol V2."""

    def __init__(self, nsqd: NSQD, sock: socket.socket, address: tuple[str, int]) -> None:
        self.nsqd = nsqd
        self.sock = sock
        self.remote_address = f"{address[0]}:{address[1]}"
        self.id = next(nsqd.client_ids)
        self.state = STATE_INIT
        self.client_id = address[0]
        self.hostname = address[0]
        self.user_agent = ""
        self.heartbeat_interval = CLIENT_TIMEOUT / 2
        self.msg_timeout = nsqd.opts.msg_timeout
        self.output_buffer_size = DEFAULT_OUTPUT_BUFFER_SIZE
        self.output_buffer_timeout = nsqd.opts.output_buffer_timeout
        self.sample_rate = 0
        self.ready_count = 0
        self.in_flight_count = 0
        self.message_count = 0
        self.finish_count = 0
        self.requeue_count = 0
        self.pub_counts: dict[str, int] = {}
        self.connect_ts = int(time.time())
        self.channel: Channel | None = None
        self.identified = False
        self.closed = False
        self._buf = b""
        self._out: gevent.queue.Queue[bytes | None] = gevent.queue.Queue()
        self._writer = gevent.spawn(self._write_loop)
        self._heartbeat: gevent.Greenlet | None = None

    def __str__(self) -> str:
        return self.remote_address

    # I/O.

    def send(self, data: bytes) -> None:
        if not self.closed:
            self._out.put(data)

    def close(self) -> None:
        """Close after what is already queued has been written (so a fatal error frame arrives)."""
        if not self.closed:
            self.closed = True
            self._out.put(None)

    def _write_loop(self) -> None:
        try:
            while True:
                data = self._out.get()
                if data is None:
                    break
                self.sock.sendall(data)
        except OSError:
            pass
        finally:
            self.closed = True
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.sock.close()

    def _fill(self, deadline: float | None) -> None:
        timeout = None if deadline is None else deadline - time.monotonic()
        if timeout is not None and timeout <= 0:
            raise TimeoutError("read deadline passed")
        self.sock.settimeout(timeout)
        data = self.sock.recv(65536)
        if not data:
            raise _Closed
        self._buf += data

    def _read_line(self, deadline: float | None) -> bytes:
        while True:
            end = self._buf.find(b"\n")
            if end >= 0:
                line, self._buf = self._buf[:end], self._buf[end + 1:]
                return line[:-1] if line.endswith(b"\r") else line
            if len(self._buf) >= READ_BUFFER_SIZE:
                raise ValueError("bufio: buffer full")
            self._fill(deadline)

    def _read_exact(self, size: int, deadline: float | None) -> bytes:
        while len(self._buf) < size:
            self._fill(deadline)
        data, self._buf = self._buf[:size], self._buf[size:]
        return data

    def _read_len(self, deadline: float | None) -> int:
        return int(struct.unpack(">i", self._read_exact(4, deadline))[0])

    # Heartbeats: a ticker, as in nsqd's messagePump, restarted by IDENTIFY.

    def _start_heartbeats(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.kill(block=False)
            self._heartbeat = None
        if self.heartbeat_interval > 0:
            self._heartbeat = gevent.spawn(self._heartbeat_loop, self.heartbeat_interval)

    def _heartbeat_loop(self, interval: float) -> None:
        while not self.closed:
            gevent.sleep(interval)
            self.send(frame(FRAME_RESPONSE, HEARTBEAT))

    # The read loop (nsqd's IOLoop).

    def serve(self) -> None:
        self._start_heartbeats()
        try:
            while not self.closed:
                deadline = time.monotonic() + 2 * self.heartbeat_interval if self.heartbeat_interval > 0 else None
                try:
                    line = self._read_line(deadline)
                except _Closed:
                    break
                except (OSError, ValueError) as exc:
                    self.nsqd.log(ERROR, f"[{self}] - failed to read command - {exc or type(exc).__name__}")
                    break
                params = line.split(b" ")
                try:
                    response = self.exec(params, deadline)
                except ClientError as err:
                    self.nsqd.log(ERROR, f"[{self}] - {err}")
                    self.send(frame(FRAME_ERROR, str(err).encode()))
                    if err.fatal:
                        break
                    continue
                except (_Closed, OSError):
                    break
                if response is not None:
                    self.send(frame(FRAME_RESPONSE, response))
        finally:
            self.nsqd.log(INFO, f"PROTOCOL(V2): [{self}] exiting ioloop")
            self.close()
            if self._heartbeat is not None:
                self._heartbeat.kill(block=False)
            if self.channel is not None:
                self.channel.remove_client(self)
            self.nsqd.clients.pop(self.id, None)
            self._writer.join()

    def is_ready_for_messages(self) -> bool:
        if self.closed or self.state != STATE_SUBSCRIBED:
            return False
        return 0 < self.ready_count and self.in_flight_count < self.ready_count

    def exec(self, params: list[bytes], deadline: float | None) -> bytes | None:
        cmd = params[0]
        handler: Callable[[list[bytes], float | None], bytes | None] | None = {
            b"IDENTIFY": self.identify, b"FIN": self.fin, b"RDY": self.rdy, b"REQ": self.req,
            b"PUB": self.pub, b"MPUB": self.mpub, b"DPUB": self.dpub, b"NOP": self.nop,
            b"TOUCH": self.touch, b"SUB": self.sub, b"CLS": self.cls, b"AUTH": self.auth,
        }.get(cmd)
        if handler is None:
            raise fatal("E_INVALID", f"invalid command {cmd.decode(errors='replace')}")
        return handler(params, deadline)

    # Commands.

    def identify(self, params: list[bytes], deadline: float | None) -> bytes | None:
        if self.state != STATE_INIT:
            raise fatal("E_INVALID", "cannot IDENTIFY in current state")
        try:
            size = self._read_len(deadline)
        except (OSError, _Closed) as exc:
            raise fatal("E_BAD_BODY", "IDENTIFY failed to read body size") from exc
        if size > self.nsqd.opts.max_body_size:
            raise fatal("E_BAD_BODY", f"IDENTIFY body too big {size} > {self.nsqd.opts.max_body_size}")
        if size <= 0:
            raise fatal("E_BAD_BODY", f"IDENTIFY invalid body size {size}")
        try:
            body = self._read_exact(size, deadline)
        except (OSError, _Closed) as exc:
            raise fatal("E_BAD_BODY", "IDENTIFY failed to read body") from exc
        data = _decode_identify(body)
        first = not self.identified
        self.identified = True
        opts = self.nsqd.opts
        self.client_id = data.get("client_id", "")
        self.hostname = data.get("hostname", "")
        self.user_agent = data.get("user_agent", "")
        try:
            self._apply_identify(data)
        except ValueError as exc:
            raise fatal("E_BAD_BODY", f"IDENTIFY {exc}") from exc
        if first:
            # nsqd's message pump takes only the first IDENTIFY's settings for its heartbeat
            # ticker; a second one (allowed before SUB) changes the read deadline only.
            self._start_heartbeats()
        if not data.get("feature_negotiation", False):
            return OK
        deflate_level = min(6, opts.max_deflate_level)
        return json.dumps({
            "max_rdy_count": opts.max_rdy_count,
            "version": VERSION,
            "max_msg_timeout": int(opts.max_msg_timeout * 1000),
            "msg_timeout": int(self.msg_timeout * 1000),
            "tls_v1": False,
            "deflate": False,
            "deflate_level": deflate_level,
            "max_deflate_level": opts.max_deflate_level,
            "snappy": False,
            "sample_rate": self.sample_rate,
            "auth_required": False,
            "output_buffer_size": self.output_buffer_size,
            "output_buffer_timeout": int(self.output_buffer_timeout * 1000),
        }, separators=(",", ":")).encode()

    def _apply_identify(self, data: dict[str, Any]) -> None:
        """client_v2.go's SetHeartbeatInterval, SetOutputBuffer, SetSampleRate, SetMsgTimeout."""
        opts = self.nsqd.opts
        hb = data.get("heartbeat_interval", 0)
        if hb == -1:
            self.heartbeat_interval = 0
        elif hb == 0:
            pass
        elif 1000 <= hb <= int(opts.max_heartbeat_interval * 1000):
            self.heartbeat_interval = hb / 1000
        else:
            raise ValueError(f"heartbeat interval ({hb}) is invalid")

        size, timeout = data.get("output_buffer_size", 0), data.get("output_buffer_timeout", 0)
        if timeout == -1:
            self.output_buffer_timeout = 0
        elif timeout == 0:
            pass
        elif int(opts.min_output_buffer_timeout * 1000) <= timeout <= int(opts.max_output_buffer_timeout * 1000):
            self.output_buffer_timeout = timeout / 1000
        else:
            raise ValueError(f"output buffer timeout ({timeout}) is invalid")
        if size == -1:
            self.output_buffer_size, self.output_buffer_timeout = 1, 0
        elif size == 0:
            pass
        elif 64 <= size <= opts.max_output_buffer_size:
            self.output_buffer_size = size
        else:
            raise ValueError(f"output buffer size ({size}) is invalid")

        rate = data.get("sample_rate", 0)
        if rate < 0 or rate > 99:
            raise ValueError(f"sample rate ({rate}) is invalid")
        self.sample_rate = rate

        msg_timeout = data.get("msg_timeout", 0)
        if msg_timeout == 0:
            pass
        elif 1000 <= msg_timeout <= int(opts.max_msg_timeout * 1000):
            self.msg_timeout = msg_timeout / 1000
        else:
            raise ValueError(f"msg timeout ({msg_timeout}) is invalid")

    def auth(self, params: list[bytes], deadline: float | None) -> bytes | None:
        if self.state != STATE_INIT:
            raise fatal("E_INVALID", "cannot AUTH in current state")
        if len(params) != 1:
            raise fatal("E_INVALID", "AUTH invalid number of parameters")
        try:
            size = self._read_len(deadline)
        except (OSError, _Closed) as exc:
            raise fatal("E_BAD_BODY", "AUTH failed to read body size") from exc
        if size > self.nsqd.opts.max_body_size:
            raise fatal("E_BAD_BODY", f"AUTH body too big {size} > {self.nsqd.opts.max_body_size}")
        if size <= 0:
            raise fatal("E_BAD_BODY", f"AUTH invalid body size {size}")
        try:
            self._read_exact(size, deadline)
        except (OSError, _Closed) as exc:
            raise fatal("E_BAD_BODY", "AUTH failed to read body") from exc
        raise fatal("E_AUTH_DISABLED", "AUTH disabled")

    def sub(self, params: list[bytes], deadline: float | None) -> bytes | None:
        if self.state != STATE_INIT:
            raise fatal("E_INVALID", "cannot SUB in current state")
        if self.heartbeat_interval <= 0:
            raise fatal("E_INVALID", "cannot SUB with heartbeats disabled")
        if len(params) < 3:
            raise fatal("E_INVALID", "SUB insufficient number of parameters")
        topic_name = params[1].decode(errors="replace")
        if not is_valid_name(topic_name):
            raise fatal("E_BAD_TOPIC", f"SUB topic name {go_quote(topic_name)} is not valid")
        channel_name = params[2].decode(errors="replace")
        if not is_valid_name(channel_name):
            raise fatal("E_BAD_CHANNEL", f"SUB channel name {go_quote(channel_name)} is not valid")
        channel = self.nsqd.get_topic(topic_name).get_channel(channel_name)
        try:
            channel.add_client(self)
        except ValueError as exc:
            raise fatal("E_SUB_FAILED", f"SUB failed {exc}") from exc
        self.state = STATE_SUBSCRIBED
        self.channel = channel
        return OK

    def rdy(self, params: list[bytes], deadline: float | None) -> bytes | None:
        if self.state == STATE_CLOSING:
            self.nsqd.log(INFO, f"PROTOCOL(V2): [{self}] ignoring RDY after CLS in state ClientStateV2Closing")
            return None
        if self.state != STATE_SUBSCRIBED:
            raise fatal("E_INVALID", "cannot RDY in current state")
        count = 1
        if len(params) > 1:
            try:
                count = byte_to_base10(params[1])
            except ValueError as exc:
                raise fatal("E_INVALID", f"RDY could not parse count {params[1].decode(errors='replace')}") from exc
        max_rdy = self.nsqd.opts.max_rdy_count
        if count < 0 or count > max_rdy:
            raise fatal("E_INVALID", f"RDY count {count} out of range 0-{max_rdy}")
        self.ready_count = count
        assert self.channel is not None
        self.channel.dispatch()
        return None

    def _message_id(self, params: list[bytes], verb: str) -> bytes:
        if self.state not in (STATE_SUBSCRIBED, STATE_CLOSING):
            raise fatal("E_INVALID", f"cannot {verb} in current state")
        if len(params) < (3 if verb == "REQ" else 2):
            raise fatal("E_INVALID", f"{verb} insufficient number of params")
        if len(params[1]) != MSG_ID_LENGTH:
            raise fatal("E_INVALID", "Invalid Message ID")
        return params[1]

    def fin(self, params: list[bytes], deadline: float | None) -> bytes | None:
        msg_id = self._message_id(params, "FIN")
        assert self.channel is not None
        try:
            self.channel.finish(self, msg_id)
        except ValueError as exc:
            raise ClientError("E_FIN_FAILED", f"FIN {msg_id.decode(errors='replace')} failed {exc}",
                              fatal=False) from exc
        self.finish_count += 1
        self.in_flight_count -= 1
        self.channel.dispatch()
        return None

    def req(self, params: list[bytes], deadline: float | None) -> bytes | None:
        msg_id = self._message_id(params, "REQ")
        try:
            timeout_ms = byte_to_base10(params[2])
        except ValueError as exc:
            raise fatal("E_INVALID", f"REQ could not parse timeout {params[2].decode(errors='replace')}") from exc
        # nsqd clamps an out-of-range timeout to 0..--max-req-timeout rather than failing
        delay = min(timeout_ms / 1000, self.nsqd.opts.max_req_timeout)
        assert self.channel is not None
        try:
            self.channel.requeue(self, msg_id, delay)
        except ValueError as exc:
            raise ClientError("E_REQ_FAILED", f"REQ {msg_id.decode(errors='replace')} failed {exc}",
                              fatal=False) from exc
        self.requeue_count += 1
        self.in_flight_count -= 1
        self.channel.dispatch()
        return None

    def touch(self, params: list[bytes], deadline: float | None) -> bytes | None:
        msg_id = self._message_id(params, "TOUCH")
        assert self.channel is not None
        try:
            self.channel.touch(self, msg_id)
        except ValueError as exc:
            raise ClientError("E_TOUCH_FAILED", f"TOUCH {msg_id.decode(errors='replace')} failed {exc}",
                              fatal=False) from exc
        return None

    def cls(self, params: list[bytes], deadline: float | None) -> bytes | None:
        if self.state != STATE_SUBSCRIBED:
            raise fatal("E_INVALID", "cannot CLS in current state")
        self.ready_count = 0
        self.state = STATE_CLOSING
        return b"CLOSE_WAIT"

    def nop(self, params: list[bytes], deadline: float | None) -> bytes | None:
        return None

    def _topic_param(self, params: list[bytes], verb: str, minimum: int, prefix: str = "") -> str:
        if len(params) < minimum:
            raise fatal("E_INVALID", f"{verb} insufficient number of parameters")
        name = params[1].decode(errors="replace")
        if not is_valid_name(name):
            raise fatal("E_BAD_TOPIC", f"{prefix}{verb} topic name {go_quote(name)} is not valid")
        return name

    def _read_message_body(self, verb: str, deadline: float | None) -> bytes:
        try:
            size = self._read_len(deadline)
        except (OSError, _Closed) as exc:
            raise fatal("E_BAD_MESSAGE", f"{verb} failed to read message body size") from exc
        if size <= 0:
            raise fatal("E_BAD_MESSAGE", f"{verb} invalid message body size {size}")
        if size > self.nsqd.opts.max_msg_size:
            raise fatal("E_BAD_MESSAGE", f"{verb} message too big {size} > {self.nsqd.opts.max_msg_size}")
        try:
            return self._read_exact(size, deadline)
        except (OSError, _Closed) as exc:
            raise fatal("E_BAD_MESSAGE", f"{verb} failed to read message body") from exc

    def _published(self, topic: str, count: int) -> None:
        self.pub_counts[topic] = self.pub_counts.get(topic, 0) + count
        self.nsqd.producers[self.id] = self

    def pub(self, params: list[bytes], deadline: float | None) -> bytes | None:
        name = self._topic_param(params, "PUB", 2)
        body = self._read_message_body("PUB", deadline)
        topic = self.nsqd.get_topic(name)
        topic.put_messages([Message(self.nsqd.new_id(), body)])
        self._published(name, 1)
        return OK

    def dpub(self, params: list[bytes], deadline: float | None) -> bytes | None:
        name = self._topic_param(params, "DPUB", 3)
        try:
            timeout_ms = byte_to_base10(params[2])
        except ValueError as exc:
            raise fatal("E_INVALID", f"DPUB could not parse timeout {params[2].decode(errors='replace')}") from exc
        max_ms = int(self.nsqd.opts.max_req_timeout * 1000)
        if timeout_ms > max_ms:
            raise fatal("E_INVALID", f"DPUB timeout {timeout_ms} out of range 0-{max_ms}")
        body = self._read_message_body("DPUB", deadline)
        msg = Message(self.nsqd.new_id(), body, deferred=timeout_ms / 1000)
        self.nsqd.get_topic(name).put_messages([msg])
        self._published(name, 1)
        return OK

    def mpub(self, params: list[bytes], deadline: float | None) -> bytes | None:
        name = self._topic_param(params, "MPUB", 2, prefix="E_BAD_TOPIC ")  # sic: nsqd repeats the code
        topic = self.nsqd.get_topic(name)  # nsqd creates the topic before reading the body
        try:
            size = self._read_len(deadline)
        except (OSError, _Closed) as exc:
            raise fatal("E_BAD_BODY", "MPUB failed to read body size") from exc
        if size <= 0:
            raise fatal("E_BAD_BODY", f"MPUB invalid body size {size}")
        if size > self.nsqd.opts.max_body_size:
            raise fatal("E_BAD_BODY", f"MPUB body too big {size} > {self.nsqd.opts.max_body_size}")
        bodies = read_mpub(lambda n: self._read_exact(n, deadline), self.nsqd.opts)
        topic.put_messages([Message(self.nsqd.new_id(), b) for b in bodies])
        self._published(name, len(bodies))
        return OK

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = {
            "client_id": self.client_id, "hostname": self.hostname, "version": "V2",
            "remote_address": self.remote_address, "state": self.state, "ready_count": self.ready_count,
            "in_flight_count": self.in_flight_count, "message_count": self.message_count,
            "finish_count": self.finish_count, "requeue_count": self.requeue_count,
            "connect_ts": self.connect_ts, "sample_rate": self.sample_rate, "deflate": False, "snappy": False,
            "user_agent": self.user_agent,
        }
        if self.pub_counts:
            stats["pub_counts"] = [{"topic": t, "count": c} for t, c in self.pub_counts.items()]
        stats.update({"tls": False, "tls_cipher_suite": "", "tls_version": "", "tls_negotiated_protocol": "",
                      "tls_negotiated_protocol_is_mutual": False})
        return stats


_IDENTIFY_TYPES: dict[str, type] = {
    "client_id": str, "hostname": str, "user_agent": str, "heartbeat_interval": int, "output_buffer_size": int,
    "output_buffer_timeout": int, "feature_negotiation": bool, "tls_v1": bool, "deflate": bool,
    "deflate_level": int, "snappy": bool, "sample_rate": int, "msg_timeout": int,
}


def _decode_identify(body: bytes) -> dict[str, Any]:
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
    except (OSError, _Closed, struct.error) as exc:
        raise fatal("E_BAD_BODY", "MPUB failed to read message count") from exc
    max_messages = (opts.max_body_size - 4) // 5
    if count <= 0 or count > max_messages:
        raise fatal("E_BAD_BODY", f"MPUB invalid message count {count}")
    bodies = []
    for i in range(count):
        try:
            size = struct.unpack(">i", read(4))[0]
        except (OSError, _Closed, struct.error) as exc:
            raise fatal("E_BAD_MESSAGE", f"MPUB failed to read message({i}) body size") from exc
        if size <= 0:
            raise fatal("E_BAD_MESSAGE", f"MPUB invalid message({i}) body size {size}")
        if size > opts.max_msg_size:
            raise fatal("E_BAD_MESSAGE", f"MPUB message too big {size} > {opts.max_msg_size}")
        try:
            body = read(size)
        except (OSError, _Closed) as exc:
            raise fatal("E_BAD_MESSAGE", "MPUB failed to read message body") from exc
        if len(body) != size:
            raise fatal("E_BAD_MESSAGE", "MPUB failed to read message body")
        bodies.append(body)
    return bodies


# --------------------------------------------------------------------------- the daemon


class NSQD:
    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.log = Logger(opts.log_prefix, opts.log_level)
        self.topics: dict[str, Topic] = {}
        self.clients: dict[int, Client] = {}
        self.producers: dict[int, Client] = {}
        self.client_ids = itertools.count(1)
        # Message IDs are 16 hex digits, as nsqd's GUIDs; seeded from the clock so IDs
        # of messages saved across a restart are never reused.
        self._ids = itertools.count(time.time_ns() // 1000)
        self.random = random.Random()
        self.start_time = int(time.time())
        self.loading = False
        self.tcp_server: StreamServer | None = None
        self.http_server: WSGIServer | None = None
        self._scanner: gevent.Greenlet | None = None

    def new_id(self) -> bytes:
        return f"{next(self._ids) & 0xFFFFFFFFFFFFFFFF:016x}".encode()

    # Topics.

    def get_topic(self, name: str) -> Topic:
        topic = self.topics.get(name)
        if topic is None:
            topic = self.topics[name] = Topic(self, name)
            self.log(INFO, f"TOPIC({name}): created")
            self.persist_metadata()
        return topic

    def delete_topic(self, name: str) -> None:
        topic = self.topics.pop(name, None)
        if topic is None:
            return
        self.log(INFO, f"TOPIC({name}): deleting")
        topic.deleted = True
        for channel_name in list(topic.channels):
            channel = topic.channels.pop(channel_name)
            channel.deleted = True
            for client in list(channel.clients.values()):
                client.close()
        topic.queue.clear()
        self.persist_metadata()

    # Persistence (see the module docstring).

    def persist_metadata(self) -> None:
        if not self.opts.data_path or self.loading:
            return
        topics = [{"channels": [{"name": c.name, "paused": c.paused} for c in t.channels.values() if not c.ephemeral],
                   "name": t.name, "paused": t.paused} for t in self.topics.values() if not t.ephemeral]
        self._write_json(METADATA_FILE, {"topics": topics, "version": VERSION})

    def _write_json(self, name: str, data: Any) -> None:
        path = os.path.join(self.opts.data_path, name)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def load(self) -> None:
        if not self.opts.data_path:
            return
        path = os.path.join(self.opts.data_path, METADATA_FILE)
        if not os.path.exists(path):
            return
        with open(path) as f:
            meta = json.load(f)
        saved: dict[str, Any] = {}
        messages_path = os.path.join(self.opts.data_path, MESSAGES_FILE)
        if os.path.exists(messages_path):
            with open(messages_path) as f:
                saved = json.load(f)
            os.remove(messages_path)
        self.loading = True
        try:
            for t in meta.get("topics", []):
                if not is_valid_name(t["name"]):
                    continue
                topic = self.get_topic(t["name"])
                topic.paused = bool(t.get("paused"))
                for c in t.get("channels", []):
                    if is_valid_name(c["name"]):
                        topic.get_channel(c["name"]).paused = bool(c.get("paused"))
                state = saved.get(t["name"], {})
                for c_name, msgs in state.get("channels", {}).items():
                    if c_name in topic.channels:
                        topic.channels[c_name].queue.extend(Message.from_json(m) for m in msgs)
                topic.queue.extend(Message.from_json(m) for m in state.get("messages", []))
                topic.pump()
        finally:
            self.loading = False

    def save_messages(self) -> None:
        if not self.opts.data_path:
            return
        data = {t.name: {"messages": [m.to_json() for m in t.queue],
                         "channels": {c.name: [m.to_json() for m in c.all_messages()]
                                      for c in t.channels.values() if not c.ephemeral}}
                for t in self.topics.values() if not t.ephemeral}
        self._write_json(MESSAGES_FILE, data)

    # Running.

    def _scan_loop(self) -> None:
        while True:
            gevent.sleep(QUEUE_SCAN_INTERVAL)
            now = time.monotonic()
            for topic in list(self.topics.values()):
                for channel in list(topic.channels.values()):
                    channel.scan(now)

    def _handle_tcp(self, sock: socket.socket, address: tuple[str, int]) -> None:
        self.log(INFO, f"TCP: new client({address[0]}:{address[1]})")
        sock.settimeout(CLIENT_TIMEOUT)
        magic = b""
        try:
            while len(magic) < 4:
                chunk = sock.recv(4 - len(magic))
                if not chunk:
                    break
                magic += chunk
        except OSError:
            pass
        if len(magic) < 4:
            self.log(ERROR, f"client({address[0]}:{address[1]}) - failed to read protocol version")
            sock.close()
            return
        if magic != MAGIC_V2:
            self.log(ERROR, f"client({address[0]}:{address[1]}) bad protocol magic {magic.decode(errors='replace')!r}")
            try:
                sock.sendall(frame(FRAME_ERROR, b"E_BAD_PROTOCOL"))
            except OSError:
                pass
            sock.close()
            return
        self.log(INFO, f"CLIENT({address[0]}:{address[1]}): desired protocol magic '  V2'")
        client = Client(self, sock, address)
        self.clients[client.id] = client
        client.serve()

    def start(self) -> None:
        self.load()
        tcp_host, tcp_port = _split_address(self.opts.tcp_address)
        http_host, http_port = _split_address(self.opts.http_address)
        self.tcp_server = StreamServer((tcp_host, tcp_port), self._handle_tcp)
        self.tcp_server.start()
        self.log(INFO, f"TCP: listening on {_format_address(self.tcp_server.address)}")
        self.http_server = WSGIServer((http_host, http_port), HTTPApp(self), log=None, error_log=None)
        self.http_server.start()
        self.log(INFO, f"HTTP: listening on {_format_address(self.http_server.address)}")
        self._scanner = gevent.spawn(self._scan_loop)

    def stop(self) -> None:
        for server in (self.tcp_server, self.http_server):
            if server is not None:
                server.close()
        for client in list(self.clients.values()):
            client.close()
        if self.tcp_server is not None:
            self.log(INFO, f"TCP: closing {_format_address(self.tcp_server.address)}")
            self.tcp_server.stop(timeout=1)
        if self.http_server is not None:
            self.log(INFO, f"HTTP: closing {_format_address(self.http_server.address)}")
            self.http_server.stop(timeout=1)
        if self._scanner is not None:
            self._scanner.kill()
        self.persist_metadata()
        self.save_messages()
        self.log(INFO, "NSQ: bye")

    # Stats (nsqd 1.3.0's /stats?format=json shape).

    def stats(self, topic_name: str = "", channel_name: str = "", include_clients: bool = True) -> dict[str, Any]:
        topics = []
        for topic in sorted(self.topics.values(), key=lambda t: t.name):
            if topic_name and topic.name != topic_name:
                continue
            channels = []
            for channel in sorted(topic.channels.values(), key=lambda c: c.name):
                if channel_name and channel.name != channel_name:
                    continue
                clients = [c.stats() for c in channel.clients.values()] if include_clients else []
                channels.append({
                    "channel_name": channel.name,
                    "depth": channel.depth(),
                    "backend_depth": self._backend_depth(channel.depth(), channel.ephemeral),
                    "in_flight_count": len(channel.in_flight),
                    "deferred_count": len(channel.deferred),
                    "message_count": channel.message_count,
                    "requeue_count": channel.requeue_count,
                    "timeout_count": channel.timeout_count,
                    "client_count": len(channel.clients),
                    "clients": clients,
                    "paused": channel.paused,
                    "e2e_processing_latency": {"count": 0, "percentiles": None},
                })
            topics.append({
                "topic_name": topic.name,
                "channels": channels,
                "depth": topic.depth(),
                "backend_depth": self._backend_depth(topic.depth(), topic.ephemeral),
                "message_count": topic.message_count,
                "message_bytes": topic.message_bytes,
                "paused": topic.paused,
                "e2e_processing_latency": {"count": 0, "percentiles": None},
            })
        producers = [c.stats() for c in self.producers.values()] if include_clients else []
        return {"version": VERSION, "health": "OK", "start_time": self.start_time, "topics": topics,
                "producers": producers}

    def _backend_depth(self, depth: int, ephemeral: bool) -> int:
        return 0 if ephemeral else max(0, depth - self.opts.mem_queue_size)


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


def _format_address(address: tuple[str, int]) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --------------------------------------------------------------------------- HTTP


class HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


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
            status, data = err.status, {"message": err.message}
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
            raise HTTPError(413, "MSG_TOO_BIG")
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
            raise HTTPError(413, "BODY_TOO_BIG")
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
                    raise _Closed
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
        channel.dispatch()
        self.nsqd.persist_metadata()


def _stats_text(stats: dict[str, Any]) -> str:
    lines = [f"nsqd v{VERSION} (NSQ protocol double)", f"start_time {stats['start_time']}", "",
             f"Health: {stats['health']}", ""]
    if not stats["topics"]:
        lines.append("Topics: None")
    else:
        lines.append("Topics:")
    for t in stats["topics"]:
        lines.append(f"   [{t['topic_name']:<15}] depth: {t['depth']:<5} be-depth: {t['backend_depth']:<5} "
                     f"msgs: {t['message_count']:<8}")
        for c in t["channels"]:
            lines.append(f"      [{c['channel_name']:<25}] depth: {c['depth']:<5} be-depth: {c['backend_depth']:<5} "
                         f"inflt: {c['in_flight_count']:<4} def: {c['deferred_count']:<4} "
                         f"re-q: {c['requeue_count']:<5} timeout: {c['timeout_count']:<5} "
                         f"msgs: {c['message_count']:<8}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    opts, unknown, version = parse_args(sys.argv[1:] if argv is None else argv)
    if version:
        print(f"nsqd v{VERSION} (NSQ protocol double, Python {sys.version.split()[0]})")
        return 0
    nsqd = NSQD(opts)
    nsqd.log(INFO, f"nsqd v{VERSION} (NSQ protocol double, Python {sys.version.split()[0]})")
    for arg in unknown:
        nsqd.log(WARN, f"ignoring {arg!r}: not implemented by the NSQ protocol double")
    if opts.data_path and not os.path.isdir(opts.data_path):
        nsqd.log(5, f"--data-path={opts.data_path} does not exist")
        return 1
    try:
        nsqd.start()
    except OSError as exc:
        nsqd.log(5, f"failed to listen - {exc}")
        return 1
    done = gevent.event.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        # A Python-level handler: gevent's hub lets it run promptly, and it only sets an event.
        signal.signal(signum, lambda *_: done.set())
    done.wait()
    nsqd.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
