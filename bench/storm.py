"""Scenario g: a reconnect storm after a server restart.

For each server (entitysync shared; Flask-SocketIO, a room per key), one
``gunicorn`` process and ``--storm-connections`` clients (2,000), each
subscribed to 5 of 10 shared keys. The server is stopped and a fresh one
started; one key (``t0``) is changed on it before anyone is back, the nine
others are as they were. Then every client reconnects at once and subscribes
again, the entitysync clients with the version (``"v"``) of each key they hold,
as the browser client does. Measured on the new server: fetches run, seconds
until every client is current (its acks, and the push of ``t0`` if it holds
it), and the bytes of pushes of the nine unchanged keys against a full
resend of them. Flask-SocketIO has no versions: its clients get every row again.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from bench.client import BATCH, CONNECT_TIMEOUT, HOST, Conn, Tracker, close_conns
from bench.measure import each_system, row_or_error
from bench.server import Server
from bench.systems import ES_SHARED, SOCKETIO, System

SYSTEMS = (ES_SHARED, SOCKETIO)
KEYS, KEYS_PER_CLIENT, CHANGED = 10, 5, "t0"


def keys_for(entity: str, i: int) -> list[tuple[str, str]]:
    return [(entity, f"t{(i + j) % KEYS}") for j in range(KEYS_PER_CLIENT)]


async def connect(server: Server, system: System, count: int, tracker: Tracker,
                  prepare: Any = None) -> tuple[list[Conn], float]:
    """``count`` connections, ``BATCH`` at a time, or all at once with ``prepare``; the seconds it took."""
    loop = asyncio.get_running_loop()
    conns: list[Conn] = []

    def factory(i: int) -> Conn:
        conn = Conn(system.dialect, system.path, keys_for(system.entity, i), tracker, i)
        if prepare is not None:
            prepare(conn)
        else:
            conn.versions, conn.push_bytes = {}, {}
        return conn

    async def one(i: int) -> None:
        _, conn = await loop.create_connection(lambda: factory(i), HOST, server.port)
        conns.append(conn)
        await conn.ready

    started = time.perf_counter()
    step = count if prepare is not None else BATCH  # the storm: everyone at once
    for first in range(0, count, step):
        batch = range(first, min(first + step, count))
        results = await asyncio.gather(*(asyncio.wait_for(one(i), CONNECT_TIMEOUT) for i in batch),
                                       return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            close_conns(conns)
            raise ConnectionError(f"{len(failed)} of {len(batch)} connections failed: {failed[0]!r}")
    seconds = time.perf_counter() - started
    conns.sort(key=lambda c: c.index)
    return conns, seconds


async def fetches(server: Server, entity: str) -> int:
    return sum([(await server.get_json(f"/fetches/{entity}/t{n}"))["count"] for n in range(KEYS)])


async def measure(system: System, args: argparse.Namespace) -> dict[str, Any]:
    row: dict[str, Any] = {"server": system.name}
    count = args.storm_connections
    tracker = Tracker()
    first = await Server.start(system, count, "-storm-before")
    before: list[Conn] = []
    try:
        before, _ = await connect(first, system, count, tracker)
        held = [dict(c.versions or {}) for c in before]
        full = sum(n for c in before for id, n in (c.push_bytes or {}).items() if id != CHANGED)
    finally:
        close_conns(before)
        first.stop()
    second = await Server.start(system, count, "-storm-after")
    conns: list[Conn] = []
    try:
        await second.post(f"/notify/{system.entity}/{CHANGED}")  # changed while the clients were away
        fetched = await fetches(second, system.entity)

        def resume(conn: Conn) -> None:
            conn.push_bytes = {}
            if system.dialect == "ws":
                conn.resume = held[conn.index]
                conn.expect = sum(1 for _, id in conn.keys if id == CHANGED)

        conns, seconds = await connect(second, system, count, tracker, resume)
        resent = sum(n for c in conns for id, n in (c.push_bytes or {}).items() if id != CHANGED)
        row.update({
            "clients": count,
            "fetches": await fetches(second, system.entity) - fetched,
            "seconds_to_current": seconds,
            "unchanged_bytes": resent,
            "full_resend_bytes": full,
            "unchanged_share": resent / full if full else None,
            "changed_pushes": sum((c.push_bytes or {}).get(CHANGED, 0) > 0 for c in conns),
        })
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        close_conns(conns)
        second.stop()
        row["log_problems"] = (first.problems() + second.problems())[:5]
    return row


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The rows of every server in :data:`SYSTEMS`."""
    return await each_system(SYSTEMS, "reconnect storm", lambda s, a: row_or_error(s.name, measure(s, a)), args)
