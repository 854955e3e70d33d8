"""The double as a process: its topics, persistence, queue scanner, TCP and HTTP servers, and ``main``."""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import socket
import sys
import time
from typing import Any

import gevent
import gevent.event
from gevent.pywsgi import WSGIServer
from gevent.server import StreamServer

from .codec import FRAME_ERROR, MAGIC_V2, VERSION, frame, is_valid_name
from .http_server import HTTPApp
from .model import Channel, Message, Topic
from .options import CLIENT_TIMEOUT, ERROR, INFO, WARN, Logger, Options, parse_args
from .tcp_server import Client

QUEUE_SCAN_INTERVAL = 0.1
#: nsqd's queue scan only looks at the channels it listed at start or at its last refresh,
#: every QueueScanRefreshInterval (5 s; no flag changes it): a new channel's in-flight and
#: deferred messages wait for the next refresh before they can time out or come due.
QUEUE_SCAN_REFRESH_INTERVAL = 5.0
METADATA_FILE = "nsqd.dat"
MESSAGES_FILE = "nsqd-double.messages.json"


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

    def _channels(self) -> list[Channel]:
        return [channel for topic in self.topics.values() for channel in topic.channels.values()]

    def _scan_loop(self) -> None:
        scanned = self._channels()
        refresh_at = time.monotonic() + QUEUE_SCAN_REFRESH_INTERVAL
        while True:
            gevent.sleep(QUEUE_SCAN_INTERVAL)
            now = time.monotonic()
            if now >= refresh_at:
                scanned = self._channels()
                refresh_at = now + QUEUE_SCAN_REFRESH_INTERVAL
            for channel in scanned:
                if not channel.deleted and not channel.topic.deleted:
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
        # Go's encoding/json writes a nil slice as null: nsqd answers "topics": null (and
        # "producers": null) when the topic asked for does not exist, "clients": null and
        # "producers": null without clients, and "producers": null when there are none.
        if topic_name and topic_name not in self.topics:
            return {"version": VERSION, "health": "OK", "start_time": self.start_time, "topics": None,
                    "producers": None}
        topics = []
        for topic in sorted(self.topics.values(), key=lambda t: t.name):
            if topic_name and topic.name != topic_name:
                continue
            channels = []
            for channel in sorted(topic.channels.values(), key=lambda c: c.name):
                if channel_name and channel.name != channel_name:
                    continue
                clients = [c.stats() for c in channel.clients.values()] if include_clients else None
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
        producers = [c.stats() for c in self.producers.values()] or None if include_clients else None
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

