"""Scenario h: 1,000 subscribers of one per-user key, by how many distinct secrets they hold.

For each server, one ``gunicorn`` process and 1,000 connections subscribed to
key ``c1`` of a per-user entity, notified ``--cohort-repeats`` times (each once
every subscriber has the previous push): fetch calls per notification, worker
CPU per delivered push and notify-to-receive latency.

* entitysync per-user, 10 users (100 tabs each): one fetch per distinct secret (cohorts);
* entitysync per-user, 1,000 users: one fetch per subscriber;
* entitysync batch, 1,000 users: ``batch=True``, one call per 500 secrets;
* Flask-SocketIO, 1,000 users: the fetch and an emit per sid.
"""

from __future__ import annotations

import argparse
from typing import Any

from bench.client import Tracker, open_conns
from bench.measure import each_system, fan_out, serving
from bench.systems import ES_BATCH, ES_PER_USER, SOCKETIO_PER_USER, System

SUBSCRIBERS = 1000
CASES = ((ES_PER_USER, 10), (ES_PER_USER, SUBSCRIBERS), (ES_BATCH, SUBSCRIBERS), (SOCKETIO_PER_USER, SUBSCRIBERS))


async def measure_case(system: System, users: int, args: argparse.Namespace) -> dict[str, Any]:
    row: dict[str, Any] = {"server": f"{system.name}, {users} users", "users": users}
    tracker = Tracker()
    key = "c1"
    async with serving(row, system, SUBSCRIBERS, f"-cohorts-{users}") as (server, conns):
        conns += await open_conns(server.port, system.dialect, system.path, lambda i: [(system.entity, key)],
                                  tracker, 0, SUBSCRIBERS, users=users)
        before = (await server.get_json(f"/fetches/{system.entity}/{key}"))["count"]
        figures = await fan_out(tracker, server, conns, f"/notify/{system.entity}/{key}", args.cohort_repeats)
        calls = (await server.get_json(f"/fetches/{system.entity}/{key}"))["count"] - before
        row.update(figures, fetch_calls_per_notify=calls / args.cohort_repeats)
    return row


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The rows of every case in :data:`CASES`."""
    rows = []
    for system, users in CASES:

        async def measure(system: System, args: argparse.Namespace, users: int = users) -> dict[str, Any]:
            return await measure_case(system, users, args)

        rows.extend(await each_system((system,), f"cohorts ({users} users)", measure, args))
    return rows
