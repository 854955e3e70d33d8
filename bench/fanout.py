"""Scenarios a, c and d on one server: fan-out, memory per connection, latency.

For each server (entitysync shared and per-user, Flask-SocketIO, raw), one
``gunicorn`` process: connections open in steps of 1k, 5k and 10k (up to
``--connections``), the worker's RSS growth per idle subscribed connection
read at each step (c); connection ``i`` subscribes to key ``f<N>`` for every
fan-out size N > i, so then one notify of ``f<N>`` reaches the first N
connections, repeated until at least 5,000 frames were delivered (a);
the notifies at N = 1,000 also give the latency percentiles (d).
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from bench.client import Tracker
from bench.measure import each_system, fan_out, open_measuring_memory, serving
from bench.systems import ES_PER_USER, ES_SHARED, RAW, SOCKETIO, System

SYSTEMS = (ES_SHARED, ES_PER_USER, SOCKETIO, RAW)
#: Frames delivered per fan-out size at the least, so that CPU per frame is not noise.
MIN_FRAMES = 5000


async def measure(system: System, args: argparse.Namespace) -> dict[str, Any]:
    """One server's memory, fan-out and latency rows; an error ends its row, not the run."""
    sizes = sorted(args.fanout)
    steps = sorted({min(s, args.connections) for s in (1000, 5000, 10000)})
    row: dict[str, Any] = {"server": system.name, "memory": {}, "fanout": {}}
    tracker = Tracker()

    def keys_for(i: int) -> list[tuple[str, str]]:
        keys = [(system.entity, f"f{n}") for n in sizes if i < n]
        return keys or [(system.entity, "idle")]

    async with serving(row, system, args.connections) as (server, conns):
        row["memory"] = await open_measuring_memory(server, conns, keys_for, tracker, steps)
        for n in sizes:
            if n > len(conns):
                continue
            repeats = max(args.repeats, math.ceil(MIN_FRAMES / n) if not args.quick else 1)
            if n == 1000:
                repeats = max(repeats, args.latency_repeats)
            row["fanout"][n] = await fan_out(tracker, server, conns[:n], f"/notify/{system.entity}/f{n}", repeats)
    return row


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The rows of every server in :data:`SYSTEMS`."""
    return await each_system(SYSTEMS, "memory, fan-out and latency", measure, args)
