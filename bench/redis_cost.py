"""Scenario i: what key routing costs a Redis server of its own.

A ``redis-server`` on a free port of 127.0.0.1 (never the shared one), and
plain sockets in this process as its clients, so that Redis's own figures
(``INFO memory``, ``INFO cpu``) are what is measured:

* memory: ``--channels`` key channels subscribed by one connection, then the
  same channels by a second (two servers holding the same keys), in
  ``SUBSCRIBE`` batches of 1,000 as the bus sends them; then Redis CPU to
  subscribe and unsubscribe them;
* publishing: ``--publishes`` ``PUBLISH`` commands of a ~40-byte body, written
  in one go, to channels with one subscriber (key routing) and to one channel
  with 4 and with 32 subscribers (entity routing, 4 or 32 servers): Redis CPU per
  ``PUBLISH``.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

BATCH = 1000
#: Subscribers of the entity channel in the entity routing measurements (servers of a cluster).
ENTITY_SUBSCRIBERS = (4, 32)


def command(*parts: bytes) -> bytes:
    """One RESP command."""
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


class Conn:
    """A raw RESP connection that counts replies by their line ends."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_until(self, marker: bytes, count: int) -> None:
        """Read until ``marker`` has been seen ``count`` times (what the commands answer)."""
        seen, tail = 0, b""
        while seen < count:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("Redis closed the connection")
            data = tail + chunk
            seen += data.count(marker) - tail.count(marker)
            tail = data[-len(marker) + 1:]

    def info(self, section: str) -> dict[str, str]:
        self.send(command(b"INFO", section.encode()))
        data = b""
        while True:
            data += self.sock.recv(1 << 16)
            head, _, rest = data.partition(b"\r\n")
            if head.startswith(b"$") and len(rest) >= int(head[1:]):
                break
        return dict(line.split(":", 1) for line in rest.decode().splitlines() if ":" in line)

    def close(self) -> None:
        self.sock.close()


def cpu(conn: Conn) -> float:
    info = conn.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def subscribe(conn: Conn, channels: list[bytes], verb: bytes = b"SUBSCRIBE") -> None:
    for first in range(0, len(channels), BATCH):
        conn.send(command(verb, *channels[first:first + BATCH]))
    conn.read_until(verb.lower(), len(channels))


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Start a redis-server of its own, measure, stop it."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not on PATH")
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    workdir = tempfile.mkdtemp(prefix="bench-redis-")
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", workdir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                control = Conn(port)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        n = args.channels
        channels = [b"app_items:%d" % i for i in range(n)]
        base = int(control.info("memory")["used_memory"])
        cpu0 = cpu(control)
        first, second = Conn(port), Conn(port)
        subscribe(first, channels)
        one = int(control.info("memory")["used_memory"])
        subscribe(second, channels)
        two = int(control.info("memory")["used_memory"])
        subscribe(second, channels, b"UNSUBSCRIBE")
        churn_cpu = cpu(control) - cpu0
        # PUBLISH to key channels of one subscriber each (first still holds every channel)
        body = b'{"entity":"items","id":"123456","t":1767225600.1}'
        wire = b"".join(command(b"PUBLISH", channels[i % n], body) for i in range(args.publishes))
        cpu1 = cpu(control)
        control.send(wire)
        control.read_until(b"\r\n", args.publishes)
        key_cpu = cpu(control) - cpu1
        first.close()
        second.close()
        # PUBLISH to one entity channel with 4 and with 32 subscribers (servers on entity routing)
        entity_cpu: dict[int, float] = {}
        for count in ENTITY_SUBSCRIBERS:
            subscribers = [Conn(port) for _ in range(count)]
            for conn in subscribers:
                subscribe(conn, [b"app_items"])
            wire = command(b"PUBLISH", b"app_items", body) * args.publishes
            cpu2 = cpu(control)
            control.send(wire)
            control.read_until(b"\r\n", args.publishes)
            entity_cpu[count] = (cpu(control) - cpu2) / args.publishes * 1e6
            for conn in subscribers:
                conn.close()
        version = control.info("server").get("redis_version", "?")
        control.close()
        return {
            "server": f"redis-server {version}",
            "redis_cost": {
                "channels": n,
                "bytes_per_channel_first_subscriber": (one - base) / n,
                "bytes_per_channel_second_subscriber": (two - one) / n,
                "subscribe_unsubscribe_cpu_us_per_channel": churn_cpu / (3 * n) * 1e6,
                "publishes": args.publishes,
                "publish_cpu_us_key_routing": key_cpu / args.publishes * 1e6,
                **{f"publish_cpu_us_entity_routing_{n}_subscribers": us for n, us in entity_cpu.items()},
            },
        }
    finally:
        proc.kill()
        proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row: Redis's own memory and CPU."""
    print("measuring what key routing costs Redis ...", file=sys.stderr, flush=True)
    try:
        return [await asyncio.to_thread(measure, args)]
    except Exception as exc:
        return [{"server": "redis-server", "error": f"{type(exc).__name__}: {exc}"}]
