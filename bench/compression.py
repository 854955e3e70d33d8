"""Scenario f: what ``ENTITYSYNC_COMPRESSION`` (permessage-deflate) costs, next to the raw peer.

Three servers, one ``gunicorn`` process each: entitysync_sync with
``ENTITYSYNC_COMPRESSION`` off (the default: the server strips the client's
offer), entitysync_sync with it on, and the raw app, which accepts deflate
whenever offered (flask-sock) and sends one text to every socket, compressed
for each. ``--deflate-connections`` clients, each offering permessage-deflate
as a browser does and connecting without a user, all subscribe to one key.
For each server:

* the worker's RSS growth per connection once all are subscribed;
* ``--deflate-notifies`` notifies of that key fanned out to every client:
  the worker's CPU per delivered frame (median of each notify's, and over
  all notifies) and the wall time to the last client (median);
* the bytes on the wire per delivered frame, and whether deflate was negotiated.
"""

from __future__ import annotations

import argparse
from typing import Any

from bench.client import Tracker
from bench.measure import each_system, fan_out, open_measuring_memory, serving
from bench.systems import ES_COMPRESSION_OFF, ES_COMPRESSION_ON, RAW_DEFLATE, System

SYSTEMS = (ES_COMPRESSION_OFF, ES_COMPRESSION_ON, RAW_DEFLATE)


async def measure(system: System, args: argparse.Namespace) -> dict[str, Any]:
    """One server's compression row; an error ends its row, not the run."""
    n = args.deflate_connections
    row: dict[str, Any] = {"server": system.name, "connections": n}
    tracker = Tracker()
    async with serving(row, system, n, "-deflate") as (server, conns):
        memory = await open_measuring_memory(server, conns, lambda i: [(system.entity, "1")], tracker, [n],
                                             user=False, deflate=True)
        row["kb_per_conn"] = memory[n]
        negotiated = {c.deflate for c in conns}
        row["deflate"] = "yes" if negotiated == {True} else "no" if negotiated == {False} else "mixed"
        row["first_frame_chars"] = len(conns[0].last)
        bytes_start = sum(c.bytes_in for c in conns)
        fan = await fan_out(tracker, server, conns, f"/notify/{system.entity}/1", args.deflate_notifies)
        row["wire_bytes_per_frame"] = (sum(c.bytes_in for c in conns) - bytes_start) / (n * args.deflate_notifies)
        row["notify_frame_chars"] = len(conns[0].last)
        row["cpu_us_per_frame_median"] = fan["cpu_us_per_frame_median"]
        row["cpu_us_per_frame_total"] = fan["cpu_us_per_frame"]
        row["wall_ms_median"] = fan["wall_ms_median"]
    return row


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The rows of every server in :data:`SYSTEMS`."""
    return await each_system(SYSTEMS, "compression", measure, args)
