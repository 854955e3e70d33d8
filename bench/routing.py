"""Scenario h: entity routing against key routing on Redis, four servers.

Four ``gunicorn`` servers of entitysync (shared entity) on one Redis, first
with ``?routing=entity`` then with ``?routing=key``; then on a Redis Cluster of
three masters of the benchmark's own (``redis+cluster://``, key channels as
shard channels, published with ``SPUBLISH`` to the master of each key's slot). 4,000 keys, spread so
that each server's clients hold 1,000 of them (100 connections of 10 keys
each per server). Then 20,000 notifications of random keys are published
straight into Redis as ``PUBLISH`` commands written in one go on the channel each routing
sends them to (what :class:`~entitysync_sync.Publisher` does, without its
de-duplicating buffer, so every one of the 20,000 is sent; each body stamped
with its notify time, ``"t"``, as theirs are): the entity
channel, or the key's own channel.

The burst is repeated (``--routing-repeats``, 3 by default) on the same
servers, each time once the last has been finished, and the burst of median
duration is the routing's row; the rate of every burst is kept beside it.
Measured: what share of the notifications each server takes in; how long the
cluster takes until every server has taken in all that were routed to it
*and* has finished the work they caused (no shared refresh queued or
fetching), which gives the cluster's notifications per second; the servers'
CPU per notification; the fetches the servers made per notification (below
1 where notifications of one key arrive while its refresh still waits, and
are coalesced into it); and the Redis servers' CPU per notification.

Here the four workers, Redis and this load client share the machine's
cores, so the wall-clock rate also counts Redis's and the publisher's work
and each worker's wait for a core. Deployed, each server has cores of its
own, and the cluster's rate is set by its busiest worker: the row's
``capacity_per_s`` is that figure, the notifications divided by the largest
worker CPU time of the run.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import socket
import sys
import time
from contextlib import AsyncExitStack
from typing import Any

from bench.client import Tracker, open_conns
from bench.cross import wait_bus
from bench.measure import WAIT, row_or_error, serving
from bench.redis_cluster import redis_cluster
from bench.server import Server
from bench.systems import ES_SHARED
from bench.usage import cpu_seconds

REDIS_URL = "redis://127.0.0.1:6379/0"
SERVERS = 4
KEYS_PER_SERVER = 1000
KEYS_PER_CONN = 10


async def measure(routing: str, args: argparse.Namespace, cluster: list[int] | None = None) -> dict[str, Any]:
    """The row of one routing: four servers, their clients, then the burst of notifications;
    on the Redis Cluster of masters on ports ``cluster``, if given."""
    from entitysync_sync import EntityKey
    from entitysync_sync.bus.redis import RedisBus
    from entitysync_sync.bus.redis_cluster import key_slot
    from entitysync_sync.keys import NotifiedKey
    from entitysync_sync.protocol import encode_bus_body

    where = f", Redis Cluster of {len(cluster)} masters" if cluster else ""
    row: dict[str, Any] = {"server": f"entitysync shared, {SERVERS} servers{where}, routing={routing}"}
    tracker = Tracker()
    conns_per_server = KEYS_PER_SERVER // KEYS_PER_CONN
    url = (f"redis+cluster://{','.join(f'127.0.0.1:{port}' for port in cluster)}/" if cluster
           else f"{REDIS_URL}?routing={routing}")
    env = {"FLASK_ENTITYSYNC_BUS_URL": url}
    async with AsyncExitStack() as stack:
        servers = [await stack.enter_async_context(serving(row, ES_SHARED, conns_per_server, f"-{routing}-{n}", env))
                   for n in range(SERVERS)]
        for server, _ in servers:
            await wait_bus(server)
        for n, (server, conns) in enumerate(servers):
            first = n * KEYS_PER_SERVER

            def keys_for(i: int, first: int = first, n: int = n) -> list[tuple[str, str]]:
                base = first + (i - n * conns_per_server) * KEYS_PER_CONN
                return [("shared", f"k{base + j}") for j in range(KEYS_PER_CONN)]

            conns += await open_conns(server.port, ES_SHARED.dialect, ES_SHARED.path, keys_for, tracker,
                                      n * conns_per_server, conns_per_server)
        if routing == "key":  # every key channel subscribed before the burst
            for server, _ in servers:
                await wait_stat(server, "key_channels", KEYS_PER_SERVER)
        rng = random.Random(20)
        ids = [rng.randrange(SERVERS * KEYS_PER_SERVER) for _ in range(args.routing_notifications)]
        bus = RedisBus(REDIS_URL, routing=routing)
        # Each body stamped with its notify time, as notify() and the Publisher send it.
        stamped = time.time()
        messages = [(bus.key_channel(EntityKey("shared", f"k{i}")) if routing == "key" else bus.topic("shared"),
                     encode_bus_body(NotifiedKey.stamp(EntityKey("shared", f"k{i}"), stamped))) for i in ids]
        expected = [len(ids) if routing == "entity" else sum(1 for i in ids if i // KEYS_PER_SERVER == n)
                    for n in range(SERVERS)]
        # The commands are encoded beforehand and written in one go, so the publisher's own CPU
        # (one Python process on the same machine) stays out of the servers' figures. On the
        # cluster each master gets the SPUBLISH commands of the keys whose slot it serves.
        by_port: dict[int, list[tuple[str, bytes]]] = {}
        owners = _slot_owners(cluster[0]) if cluster else []
        for channel, body in messages:
            port = owners[key_slot(channel.encode())] if cluster else 6379
            by_port.setdefault(port, []).append((channel, body))
        verb = b"SPUBLISH" if cluster else b"PUBLISH"
        wires = {port: b"".join(b"*3\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n"
                                % (len(verb), verb, len(c), c.encode(), len(b), b) for c, b in group)
                 for port, group in by_port.items()}

        def publish(port: int) -> None:
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(wires[port])
                replies = 0
                while replies < len(by_port[port]):
                    chunk = sock.recv(1 << 16)
                    if not chunk:
                        raise ConnectionError("Redis closed the connection")
                    replies += chunk.count(b"\r\n")

        redis_pids = [_redis_pid(port) for port in (cluster or [6379])]

        async def burst() -> dict[str, Any]:
            """Publish the notifications; wait until every server took in its share and finished."""
            stats0 = [await server.get_json("/bus-stats") for server, _ in servers]
            before = [stats.get("received", 0) for stats in stats0]
            redis0 = [cpu_seconds(pid) for pid in redis_pids]
            cpu0 = [cpu_seconds(server.worker_pid) for server, _ in servers]
            t0 = time.perf_counter()
            await asyncio.gather(*(asyncio.to_thread(publish, port) for port in wires))
            published = time.perf_counter() - t0
            deadline = time.monotonic() + WAIT
            received = [0] * SERVERS
            fetches = [0] * SERVERS
            while True:
                busy = False
                for n, (server, _) in enumerate(servers):
                    stats = await server.get_json("/bus-stats")
                    received[n] = stats.get("received", 0) - before[n]
                    fetches[n] = stats["fetches"] - stats0[n]["fetches"]
                    busy = busy or stats["refreshing"] > 0
                if not busy and all(r >= e for r, e in zip(received, expected, strict=True)):
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"servers received {received} of {expected}")
                await asyncio.sleep(0.01)
            elapsed = time.perf_counter() - t0
            cpu = [cpu_seconds(server.worker_pid) - c for (server, _), c in zip(servers, cpu0, strict=True)]
            redis_cpu = sum(cpu_seconds(pid) - c for pid, c in zip(redis_pids, redis0, strict=True))
            return {
                "notifications": len(ids),
                "received_share": [r / len(ids) for r in received],
                "publish_seconds": published,
                "seconds": elapsed,
                "cluster_per_s": len(ids) / elapsed,
                "cpu_us_per_notification": sum(cpu) / len(ids) * 1e6,
                "busiest_worker_cpu_seconds": max(cpu),
                "capacity_per_s": len(ids) / max(cpu),
                "fetches_per_notification": sum(fetches) / len(ids),
                "redis_cpu_us_per_notification": redis_cpu / len(ids) * 1e6,
            }

        try:
            runs = [await burst() for _ in range(args.routing_repeats)]
        finally:
            bus.close()
        # The run of median duration stands for the routing; every run's rate is kept beside it.
        runs.sort(key=lambda run: run["seconds"])
        row["routing"] = {**runs[len(runs) // 2], "runs_per_s": [run["cluster_per_s"] for run in runs],
                          "runs_capacity_per_s": [run["capacity_per_s"] for run in runs]}
    return row


async def wait_stat(server: Server, name: str, value: int, timeout: float = 30) -> None:
    """Poll ``/bus-stats`` until ``name`` reaches ``value`` (with a deadline)."""
    deadline = time.monotonic() + timeout
    while (await server.get_json("/bus-stats")).get(name, 0) < value:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} never reached {value}")
        await asyncio.sleep(0.05)


def _redis_pid(port: int) -> int:
    """The pid of the Redis server on ``port`` (``INFO server``'s ``process_id``)."""
    import redis

    client = redis.Redis(port=port)
    try:
        return int(client.info("server")["process_id"])
    finally:
        client.close()


def _slot_owners(port: int) -> list[int]:
    """The port of the master of every slot, from ``CLUSTER SLOTS`` on the node at ``port``."""
    import redis

    client = redis.Redis(port=port)
    try:
        owners = [0] * 16384
        for first, last, master, *_ in client.execute_command("CLUSTER", "SLOTS"):
            owners[first:last + 1] = [int(master[1])] * (last - first + 1)
        return owners
    finally:
        client.close()


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The three rows: entity routing, key routing, and key routing on a Redis Cluster."""
    rows = []
    for routing in ("entity", "key"):
        print(f"measuring routing across {SERVERS} servers: {routing} ...", file=sys.stderr, flush=True)
        rows.append(await row_or_error(routing, measure(routing, args)))
    print(f"measuring routing across {SERVERS} servers: key, on a Redis Cluster ...", file=sys.stderr, flush=True)
    try:
        with redis_cluster() as ports:
            rows.append(await row_or_error("key", measure("key", args, ports)))
    except Exception as exc:
        rows.append({"server": "Redis Cluster", "error": f"{type(exc).__name__}: {exc}"})
    return rows
