"""``python -m bench``: every scenario, entitysync_sync side by side with Flask-SocketIO and the raw loop.

Run from the project root (``pip install -e '.[bench]'``)::

    python -m bench [--only fanout,per_user,cross,compression,routing,redis_cost,storm,cohorts,pg] [--quick]

The scenarios, in the order they run (see each module):

* ``fanout`` (:mod:`bench.fanout`): a. fan-out, c. memory, d. latency on one server;
* ``per_user`` (:mod:`bench.per_user`): b. throughput and e. burst with per-user fetches;
* ``cross`` (:mod:`bench.cross`): d. latency across two servers on Redis and NSQ, NSQ ingest;
* ``compression`` (:mod:`bench.compression`): f. what permessage-deflate costs;
* ``pg`` (:mod:`bench.pg`): g. what notifying from PostgreSQL costs its writers; it runs only
  when named (``--only pg``), as it needs PostgreSQL and ``pgbench``.
* ``routing`` (:mod:`bench.routing`): h. entity against key routing, four servers on Redis, and key
  routing on a Redis Cluster of three masters;
* ``redis_cost`` (:mod:`bench.redis_cost`): i. what key routing costs a Redis server of its own.
* ``storm`` (:mod:`bench.storm`): j. every client reconnecting at once after a restart;
* ``cohorts`` (:mod:`bench.cohorts`): k. 1,000 subscribers of one per-user key: cohorts and batch fetch.

Results are printed (:mod:`bench.report`) and written to ``bench/results/suite.json``;
the servers' logs go next to it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from bench import cohorts, compression, cross, fanout, per_user, pg, redis_cost, routing, storm
from bench.report import ON_REQUEST, PARTS, machine, report, rows_of
from bench.server import RESULTS_DIR, ROOT

RESULTS = RESULTS_DIR / "suite.json"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line: which scenarios to run and their sizes."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="", help=f"comma list of scenarios to run: {','.join(PARTS)} [all]")
    parser.add_argument("--connections", type=int, default=10000, help="most idle connections (c) [10000]")
    parser.add_argument("--fanout", type=lambda s: [int(x) for x in s.split(",")], default=[100, 1000, 2000, 5000],
                        help="fan-out sizes (a) [100,1000,2000,5000]")
    parser.add_argument("--repeats", type=int, default=5, help="notifies per fan-out size (a) [5]")
    parser.add_argument("--latency-repeats", type=int, default=20, help="notifies at 1,000 subscribers (d) [20]")
    parser.add_argument("--seconds", type=float, default=5.0, help="throughput run length (b) [5]")
    parser.add_argument("--burst", type=int, default=10000, help="notifies in the burst (e) [10000]")
    parser.add_argument("--ingest", type=int, default=50000, help="notifications published into nsqd (d) [50000]")
    parser.add_argument("--nsq-options", default="",
                        help="nsq:// URL query for the NSQ servers (d), e.g. output_buffer_timeout=25 [none]")
    parser.add_argument("--deflate-connections", type=int, default=2000, help="clients per server (f) [2000]")
    parser.add_argument("--deflate-notifies", type=int, default=20, help="notifies per server (f) [20]")
    parser.add_argument("--routing-repeats", type=int, default=3,
                        help="bursts per routing (h); the median one is reported [3]")
    parser.add_argument("--routing-notifications", type=int, default=20000,
                        help="notifications of random keys across four servers (h) [20000]")
    parser.add_argument("--channels", type=int, default=100000, help="key channels subscribed in Redis (i) [100000]")
    parser.add_argument("--publishes", type=int, default=200000, help="PUBLISH commands per routing (i) [200000]")
    pg.add_arguments(parser)
    parser.add_argument("--storm-connections", type=int, default=2000, help="clients in the reconnect storm (j) [2000]")
    parser.add_argument("--cohort-repeats", type=int, default=20, help="notifies per cohort case (k) [20]")
    parser.add_argument("--quick", action="store_true", help="small sizes, to check the harness runs (~1 min)")
    args = parser.parse_args(argv)
    args.only = [part for part in args.only.split(",") if part] or [p for p in PARTS if p not in ON_REQUEST]
    if unknown := set(args.only) - set(PARTS):
        parser.error(f"--only: no scenario {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}")
    if args.quick:
        args.connections, args.fanout, args.repeats, args.latency_repeats = 1000, [100, 1000], 2, 3
        args.seconds, args.burst, args.ingest = 1.0, 1000, 5000
        args.deflate_connections, args.deflate_notifies = 500, 3
        args.routing_notifications, args.channels, args.publishes = 2000, 10000, 20000
        args.routing_repeats = 1
        args.pg_seconds = 2
        args.storm_connections, args.cohort_repeats = 500, 3
    return args


#: What runs each part of the result (see :data:`bench.report.PARTS` for the order).
SCENARIOS: dict[str, Callable[[argparse.Namespace], Awaitable[list[dict[str, Any]]]]] = {
    "fanout": fanout.run,
    "per_user": per_user.run,
    "cross": cross.run,
    "compression": compression.run,
    "pg": pg.run,
    "routing": routing.run,
    "redis_cost": redis_cost.run,
    "storm": storm.run,
    "cohorts": cohorts.run,
}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the chosen scenarios, in :data:`~bench.report.PARTS` order."""
    return {part: await SCENARIOS[part](args) for part in PARTS if part in args.only}


def main(argv: Sequence[str] | None = None) -> int:
    """Run, print the report and write the JSON; exit 1 if any server's row has an error."""
    args = parse_args(argv)
    started = time.monotonic()
    result: dict[str, Any] = {"benchmark": "suite", "machine": machine(), "args": vars(args)}
    result.update(asyncio.run(run(args)))
    result["seconds"] = time.monotonic() - started
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(report(result))
    print(f"results: {RESULTS.relative_to(ROOT)} ({result['seconds']:.0f} s)")
    return 1 if any("error" in r for r in rows_of(result)) else 0


if __name__ == "__main__":
    sys.exit(main())
