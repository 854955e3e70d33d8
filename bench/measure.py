"""The measuring steps the scenarios share, on a running :class:`~bench.server.Server`.

* :func:`each_system`: one row of results per server, an error ending only its row;
* :func:`serving`: one server for one row of results, stopped whatever happens;
* :func:`open_measuring_memory`: open subscribed connections in steps and
  read the worker's RSS growth per connection at each step;
* :func:`fan_out`: notify one key again and again, each time waiting until
  every subscriber has the push: worker CPU per delivered frame, wall time
  to the last subscriber, latency percentiles;
* :func:`settle` and :func:`warm_up`: wait for pushes to stop, or to start
  reaching everyone.

Nothing sleeps to synchronise: waits are on received frames, and every
poll has a deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from bench.client import Conn, Tracker, close_conns, open_conns
from bench.server import Server
from bench.systems import System
from bench.usage import cpu_seconds, rss_kb

#: Seconds for one notify to reach every subscriber, or for pushes to stop.
WAIT = 120.0


async def row_or_error(name: str, row: Awaitable[dict[str, Any]]) -> dict[str, Any]:
    """Await the row of server ``name``; if it fails outright (a server that never started), an error row."""
    try:
        return await row
    except Exception as exc:
        return {"server": name, "error": f"{type(exc).__name__}: {exc}"}


async def each_system(systems: Sequence[System], label: str,
                      measure: Callable[[System, argparse.Namespace], Awaitable[dict[str, Any]]],
                      args: argparse.Namespace) -> list[dict[str, Any]]:
    """``measure`` each of ``systems`` in turn, one server at a time; a failure ends only its row."""
    rows = []
    for system in systems:
        print(f"measuring {label}: {system.name} ...", file=sys.stderr, flush=True)
        rows.append(await row_or_error(system.name, measure(system, args)))
    return rows


@asynccontextmanager
async def serving(row: dict[str, Any], system: System, connections: int, tag: str = "",
                  env: dict[str, str] | None = None) -> AsyncIterator[tuple[Server, list[Conn]]]:
    """Start ``system`` for ``row``; yield it and a list for the connections opened on it.

    On the way out the connections are aborted, the server stopped and its
    log's problem lines added to ``row``. An exception in the block is
    recorded as ``row["error"]`` and ends this row only, keeping what it measured.
    """
    server = await Server.start(system, connections, tag, env)
    conns: list[Conn] = []
    try:
        yield server, conns
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        close_conns(conns)
        server.stop()
        row.setdefault("log_problems", []).extend(server.problems()[:5])


async def open_measuring_memory(server: Server, conns: list[Conn],
                                keys_for: Callable[[int], Sequence[tuple[str, str]]], tracker: Tracker,
                                steps: Sequence[int], user: bool = True, deflate: bool = False) -> dict[int, float]:
    """Open connections up to each of ``steps`` into ``conns``; worker RSS growth per connection at each, in KB.

    The baseline is taken after one warm-up connection has come and gone,
    so one-off imports and allocations are not counted.
    """
    system = server.system
    pid = server.worker_pid

    async def open_(start: int, count: int) -> list[Conn]:
        return await open_conns(server.port, system.dialect, system.path, keys_for, tracker, start, count,
                                user, deflate)

    warm = await open_(10**6, 1)
    close_conns(warm)
    await asyncio.gather(*(c.closed for c in warm))
    base = rss_kb(pid)
    memory: dict[int, float] = {}
    for n in sorted(steps):
        conns += await open_(len(conns), n - len(conns))
        memory[n] = (rss_kb(pid) - base) / n
    return memory


async def fan_out(tracker: Tracker, server: Server, conns: Sequence[Conn], path: str,
                  repeats: int) -> dict[str, Any]:
    """POST ``path`` ``repeats`` times, each after every conn got the last one's push.

    CPU is the worker's, per delivered frame: over all notifies, and the
    median of each notify's own. Wall time runs from just before the POST to
    the last subscriber's push; latencies are over every (notify, subscriber) pair.
    """
    pid = server.worker_pid
    cpu_start = cpu_seconds(pid)
    walls: list[float] = []
    latencies: list[float] = []
    cpus: list[float] = []
    for _ in range(repeats):
        cpu_before = cpu_seconds(pid)
        tracker.arm(conns)
        await server.post(path)
        try:
            await asyncio.wait_for(tracker.done.wait(), WAIT)
        except asyncio.TimeoutError:
            raise TimeoutError(f"only {tracker.reached} of {len(conns)} got the push in {WAIT} s") from None
        cpus.append((cpu_seconds(pid) - cpu_before) / len(conns) * 1e6)
        walls.append(max(tracker.latencies) * 1e3)
        latencies.extend(x * 1e3 for x in tracker.latencies)
    cpu = cpu_seconds(pid) - cpu_start
    latencies.sort()
    return {
        "n": len(conns),
        "repeats": repeats,
        "cpu_us_per_frame": cpu / (repeats * len(conns)) * 1e6,
        "cpu_us_per_frame_median": statistics.median(cpus),
        "wall_ms_median": statistics.median(walls),
        "wall_ms_each": walls,
        "p50_ms": latencies[len(latencies) // 2],
        "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
    }


async def settle(tracker: Tracker, quiet: float = 0.5, timeout: float = WAIT) -> None:
    """Return once no push has arrived for ``quiet`` seconds (polled, with a deadline)."""
    deadline = time.monotonic() + timeout
    last, since = tracker.pushes, time.monotonic()
    while time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        if tracker.pushes != last:
            last, since = tracker.pushes, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
    raise TimeoutError("pushes never stopped")


async def warm_up(tracker: Tracker, server: Server, conns: Sequence[Conn], path: str, timeout: float = 60) -> None:
    """Notify until one notify reaches every conn: every server's broker subscription is up."""
    deadline = time.monotonic() + timeout
    while True:
        tracker.arm(conns)
        await server.post(path)
        try:
            await asyncio.wait_for(tracker.done.wait(), 2.0)
            await settle(tracker)
            return
        except asyncio.TimeoutError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {tracker.reached} of {len(conns)} got a push in {timeout} s") from None
