"""Scenario d across two servers: latency through a broker, and NSQ ingest.

Two ``gunicorn`` processes of one app share a broker: entitysync shared on
Redis, Flask-SocketIO on its Redis message queue, entitysync shared on NSQ
(the NSQ protocol double from the tests, or a real nsqd when ``NSQD_BIN`` is
set). Half of 1,000 subscribers connect to each server, notifies are posted
to the first: POST-to-push latency over every (notify, subscriber) pair.
On NSQ, also the rate at which one server takes in notifications published
straight into nsqd.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from contextlib import AsyncExitStack
from typing import Any

from bench.client import Tracker, open_conns
from bench.measure import WAIT, fan_out, row_or_error, serving, warm_up
from bench.server import ROOT, Server
from bench.systems import ES_SHARED, SOCKETIO, System
from bench.usage import cpu_seconds

REDIS_URL = "redis://127.0.0.1:6379/0"
SUBSCRIBERS = 1000
#: Seconds the broker's CPU is measured while both servers are connected and nothing is sent.
IDLE_SECONDS = 5.0


async def measure(name: str, system: System, env: dict[str, str], args: argparse.Namespace,
                  ingest: Any = None, broker_pid: int | None = None) -> dict[str, Any]:
    """The latency row of ``system`` on two servers started with ``env``; an error ends the row only.

    With ``broker_pid``, also the broker's own CPU: idle, per notify while measuring
    latency, and per notification during ingest."""
    row: dict[str, Any] = {"server": name}
    tracker = Tracker()
    path = f"/notify/{system.entity}/lat"
    async with AsyncExitStack() as stack:
        servers = [await stack.enter_async_context(serving(row, system, SUBSCRIBERS, tag, env)) for tag in ("-a", "-b")]
        if system.kind == "entitysync":  # the bus connects lazily: start it, and wait until it is subscribed
            for server, _ in servers:
                await wait_bus(server)
        half = SUBSCRIBERS // 2
        for k, (server, conns) in enumerate(servers):
            conns += await open_conns(server.port, system.dialect, system.path,
                                      lambda i: [(system.entity, "lat")], tracker, k * half, half)
        everyone = [c for _, conns in servers for c in conns]
        await warm_up(tracker, servers[0][0], everyone, path)
        broker: dict[str, float] = {}
        if broker_pid is not None:
            cpu0, t0 = cpu_seconds(broker_pid), time.perf_counter()
            await asyncio.sleep(IDLE_SECONDS)  # a measurement of idle time, not a wait for anything
            broker["idle_cpu_pct"] = (cpu_seconds(broker_pid) - cpu0) / (time.perf_counter() - t0) * 100
            cpu0 = cpu_seconds(broker_pid)
        result = await fan_out(tracker, servers[0][0], everyone, path, args.latency_repeats)
        if broker_pid is not None:
            broker["cpu_ms_per_notify"] = (cpu_seconds(broker_pid) - cpu0) / args.latency_repeats * 1e3
        result["cpu_us_per_frame"] = None  # two workers: see the one-server rows
        row["latency"] = result
        if ingest is not None:
            cpu0 = cpu_seconds(broker_pid) if broker_pid is not None else 0.0
            row["ingest"] = await ingest(servers[1][0])
            if broker_pid is not None:
                broker["cpu_us_per_ingested"] = (cpu_seconds(broker_pid) - cpu0) / row["ingest"]["notifications"] * 1e6
        if broker:
            row["broker_cpu"] = broker
    return row


async def wait_bus(server: Server, timeout: float = 30) -> None:
    """Poll ``/bus-stats`` until the server's bus has connected both ways (with a deadline)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (await server.get_json("/bus-stats")).get("connects", 0) >= 2:
            return
        await asyncio.sleep(0.05)
    raise TimeoutError("the bus never connected")


def nsq_ingest(nsqd: Any, count: int) -> Any:
    """Publish ``count`` notifications straight into nsqd; measure how fast one server takes them in."""

    async def measure(server: Server) -> dict[str, Any]:
        # Keys no client holds: this is the bus's receive path and the hub's lookup, not fan-out.
        bodies = [json.dumps({"entity": "shared", "id": f"k{i % 1000}"}, separators=(",", ":")).encode()
                  for i in range(count)]
        before = (await server.get_json("/bus-stats")).get("received", 0)
        cpu0 = cpu_seconds(server.worker_pid)
        t0 = time.perf_counter()
        for first in range(0, count, 5000):
            await asyncio.to_thread(nsqd.mpub, "shared", bodies[first : first + 5000])
        published = time.perf_counter() - t0
        deadline = time.monotonic() + WAIT
        while (await server.get_json("/bus-stats")).get("received", 0) - before < count:
            if time.monotonic() > deadline:
                raise TimeoutError("the server never received every notification")
            await asyncio.sleep(0.01)
        elapsed = time.perf_counter() - t0
        return {
            "notifications": count,
            "publish_seconds": published,
            "seconds": elapsed,
            "per_s": count / elapsed,
            "cpu_us_per_notification": (cpu_seconds(server.worker_pid) - cpu0) / count * 1e6,
        }

    return measure


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The three two-server rows: entitysync on Redis, Flask-SocketIO on Redis, entitysync on NSQ."""
    sys.path.insert(0, str(ROOT))
    from tests.support.nsqd import Nsqd

    def measure_row(name: str, system: System, env: dict[str, str], ingest: Any = None,
                    broker_pid: int | None = None) -> Any:
        print(f"measuring latency across two servers: {name} ...", file=sys.stderr, flush=True)
        return row_or_error(name, measure(name, system, env, args, ingest, broker_pid))

    rows = [
        await measure_row("entitysync shared, 2 servers, redis", ES_SHARED, {"FLASK_ENTITYSYNC_BUS_URL": REDIS_URL}),
        await measure_row("flask-socketio, 2 servers, redis", SOCKETIO, {"BENCH_SOCKETIO_QUEUE": REDIS_URL}),
    ]
    # An ephemeral channel keeps at most --mem-queue-size messages and drops the rest (nsqd does
    # too); the ingest burst is larger than nsqd's default of 10,000.
    nsqd = Nsqd(["--mem-queue-size=1000000"])
    nsqd.start()
    try:
        print(f"(NSQ: {nsqd.describe()})", file=sys.stderr, flush=True)
        url = f"nsq://{nsqd.tcp_address}" + (f"?{args.nsq_options}" if args.nsq_options else "")
        name = f"entitysync shared, 2 servers, nsq ({'nsqd' if nsqd.is_real else 'double'})"
        if args.nsq_options:
            name += f" {args.nsq_options}"
        assert nsqd.proc is not None
        rows.append(await measure_row(name, ES_SHARED, {"FLASK_ENTITYSYNC_BUS_URL": url},
                                      nsq_ingest(nsqd, args.ingest), nsqd.proc.pid))
    finally:
        nsqd.close()
    return rows
