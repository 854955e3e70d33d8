"""Scenarios b and e on one server with the per-user entity: throughput, then a burst.

For each server (entitysync per-user, Flask-SocketIO one emit per sid, raw
per socket), one ``gunicorn`` process and 1,000 connections of 10 keys each
(1,000 keys, 10 subscribers per key); the first 20 also hold key ``burst``.

b. notifies of all 1,000 keys, one request in flight, back to back for
   ``--seconds``: pushes delivered per second, worker CPU per push and the
   worker's share of a core;
e. ``--burst`` notifies of ``burst`` in one request: fetches and frames per
   subscriber, and whether every subscriber's last frame holds the final value.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from bench.client import Tracker, open_conns
from bench.measure import each_system, serving, settle
from bench.systems import ES_PER_USER, RAW_PER_USER, SOCKETIO_PER_USER, System
from bench.usage import cpu_seconds

SYSTEMS = (ES_PER_USER, SOCKETIO_PER_USER, RAW_PER_USER)
CONNECTIONS, KEYS_PER_CONNECTION, KEYS, BURST_SUBSCRIBERS = 1000, 10, 1000, 20


async def measure(system: System, args: argparse.Namespace) -> dict[str, Any]:
    """One server's throughput and burst rows; an error ends its row, not the run."""
    row: dict[str, Any] = {"server": system.name}
    tracker = Tracker()
    entity = system.entity

    def keys_for(i: int) -> list[tuple[str, str]]:
        keys = [(entity, f"t{(i * KEYS_PER_CONNECTION + j) % KEYS}") for j in range(KEYS_PER_CONNECTION)]
        if i < BURST_SUBSCRIBERS:
            keys.append((entity, "burst"))
        return keys

    async with serving(row, system, CONNECTIONS, "-tput") as (server, conns):
        pid = server.worker_pid
        conns += await open_conns(server.port, system.dialect, system.path, keys_for, tracker, 0, CONNECTIONS)
        cpu0, pushes0, t0 = cpu_seconds(pid), tracker.pushes, time.perf_counter()
        requests = 0
        while time.perf_counter() - t0 < args.seconds:
            await server.post(f"/notify-range/{entity}?start=0&count={KEYS}")
            requests += 1
        # What was notified is delivered once the pushes stop coming; count those too.
        await settle(tracker)
        elapsed = time.perf_counter() - t0
        cpu = cpu_seconds(pid) - cpu0
        pushes = tracker.pushes - pushes0
        row["throughput"] = {
            "notifies": requests * KEYS,
            "pushes": pushes,
            "seconds": elapsed,
            "pushes_per_s": pushes / elapsed,
            "cpu_us_per_push": cpu / max(1, pushes) * 1e6,
            "cpu_share": cpu / elapsed,
        }

        subs = conns[:BURST_SUBSCRIBERS]
        before = [c.pushes for c in subs]
        fetched0 = (await server.get_json(f"/fetches/{entity}/burst"))["count"]
        t0 = time.perf_counter()
        await server.post(f"/notify/{entity}/burst?n={args.burst}")
        await settle(tracker)
        fetched = (await server.get_json(f"/fetches/{entity}/burst"))["count"] - fetched0
        finals = [c.value() for c in subs]
        row["burst"] = {
            "notifies": args.burst,
            "subscribers": BURST_SUBSCRIBERS,
            "seconds": time.perf_counter() - t0,
            "fetches_per_subscriber": fetched / BURST_SUBSCRIBERS,
            "frames_per_subscriber": statistics.mean(c.pushes - b for c, b in zip(subs, before, strict=True)),
            "final_state_everywhere": all(v == finals[0] for v in finals)
            and finals[0] == max(finals) and finals[0] % args.burst == 0,
            "final_value": finals[0],
        }
    return row


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The rows of every server in :data:`SYSTEMS`."""
    return await each_system(SYSTEMS, "throughput and burst", measure, args)
