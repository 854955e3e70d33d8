"""Scenario pg: what notifying from PostgreSQL costs the writers (``python -m bench --only pg``).

NOTIFY takes a database-wide lock when its transaction commits and holds it
until the commit is done, so notifying transactions commit one at a time.
This measures it on the machine's PostgreSQL (``--pg-url``, default
``postgresql://root@127.0.0.1:5432/test``) with ``pgbench``: commits per
second of a transaction that updates one random row among 10,000, by 1, 4 and 16
concurrent writers (``--pg-writers``), for ``--pg-seconds`` each, in three forms:

* ``no notify``: ``BEGIN; UPDATE ...; COMMIT``;
* ``trigger``: the same table with :func:`~entitysync_sync.postgres.trigger_sql`'s trigger;
* ``es.watch in transaction``: the plain table, and in the same transaction the
  statement ``es.watch`` sends after a flush (``pg_notify`` over ``unnest``).

A listener LISTENs on the channel and drains it throughout, as a server would.
The figures include the commit's WAL flush (the server's own settings).
The machine is shared: compare the forms within one run, not across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

from entitysync_sync.bus.postgres import channel_name
from entitysync_sync.postgres import trigger_sql

SCHEMA = "entitysync_bench"
ROWS = 10_000
UPDATE = f"\\set id random(1, {ROWS})\nBEGIN;\nUPDATE {SCHEMA}.%s SET value = value + 1 WHERE id = :id;\n%sCOMMIT;\n"
WATCH = ("SELECT pg_notify(c, b) FROM unnest(ARRAY['%s'], "
         "ARRAY['{\"entity\":\"items\",\"id\":\"' || :id || '\"}']) AS n(c, b);\n")

FORMS = (("no notify", UPDATE % ("plain", "")), ("trigger", UPDATE % ("triggered", "")),
         ("es.watch in transaction", UPDATE % ("plain", WATCH % channel_name("", "items"))))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The scenario's options."""
    parser.add_argument("--pg-url", default="postgresql://root@127.0.0.1:5432/test",
                        help="database to measure (pg) [postgresql://root@127.0.0.1:5432/test]")
    parser.add_argument("--pg-writers", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16],
                        help="concurrent writers (pg) [1,4,16]")
    parser.add_argument("--pg-seconds", type=int, default=10, help="seconds per measurement (pg) [10]")


def _setup(conn: Any) -> None:
    conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
    conn.execute(f"CREATE SCHEMA {SCHEMA}")
    for table in ("plain", "triggered"):
        conn.execute(f"CREATE TABLE {SCHEMA}.{table} (id int PRIMARY KEY, value bigint NOT NULL)")
        conn.execute(f"INSERT INTO {SCHEMA}.{table} SELECT n, 0 FROM generate_series(1, {ROWS}) AS n")
    conn.execute(trigger_sql("items", f"{SCHEMA}.triggered"))
    conn.execute(f"VACUUM ANALYZE {SCHEMA}.plain")
    conn.execute(f"VACUUM ANALYZE {SCHEMA}.triggered")


def _drain(url: str, stop: threading.Event, counted: list[int]) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'LISTEN "{channel_name("", "items")}"')
        while not stop.is_set():
            counted[0] += sum(1 for _ in conn.notifies(timeout=0.2))


def _pgbench(binary: str, url: str, script: str, writers: int, seconds: int) -> float:
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as f:
        f.write(script)
    try:
        out = subprocess.run([binary, "-n", "-c", str(writers), "-j", str(min(writers, 4)), "-T", str(seconds),
                              "-f", f.name, url], capture_output=True, text=True, timeout=seconds + 120)
    finally:
        Path(f.name).unlink()
    found = re.search(r"tps = ([\d.]+)", out.stdout)
    if out.returncode != 0 or found is None:
        raise RuntimeError(f"pgbench failed: {(out.stderr or out.stdout)[-300:]}")
    return float(found.group(1))


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per form: commits per second at each number of writers."""
    import psycopg

    binary = shutil.which("pgbench")
    if binary is None:
        return [{"server": "pg", "error": "pgbench is not installed (apt-get install postgresql-contrib)"}]
    with psycopg.connect(args.pg_url, autocommit=True) as conn:
        _setup(conn)
    stop = threading.Event()
    counted = [0]
    drainer = threading.Thread(target=_drain, args=(args.pg_url, stop, counted), daemon=True)
    drainer.start()
    rows: list[dict[str, Any]] = [{"server": name, "tps": {}} for name, _ in FORMS]
    try:
        for writers in args.pg_writers:
            for row, (_, script) in zip(rows, FORMS, strict=True):  # the forms alternate: same noise for each
                row["tps"][writers] = _pgbench(binary, args.pg_url, script, writers, args.pg_seconds)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        for row in rows:
            row.setdefault("error", str(exc))
    finally:
        stop.set()
        drainer.join(5)
        with psycopg.connect(args.pg_url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
    for row in rows:
        row["notifications_received"] = counted[0]
    return rows


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The rows of every form in :data:`FORMS`."""
    return await asyncio.to_thread(measure, args)
