"""The printed report: the machine, then one table per scenario, then errors and log problems.

Every figure comes from the result dictionary :mod:`bench.__main__` writes
to ``bench/results/suite.json``; ratios compare servers measured in the same run.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.systems import ES_PER_USER, RAW, SOCKETIO

#: The scenarios' parts of a result, in the order they run.
PARTS = ("fanout", "per_user", "cross", "compression", "pg", "routing", "redis_cost", "storm", "cohorts")
#: Parts that run only when named with ``--only``.
ON_REQUEST = ("pg",)

#: The distributions whose versions the report names.
VERSIONS = ("gevent", "flask-sock", "simple-websocket", "gunicorn", "flask", "flask-socketio", "python-socketio",
            "python-engineio", "redis", "gnsq", "psycopg")


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    versions = {}
    for dist in VERSIONS:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "missing"
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": model,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "versions": versions,
        # Other work on the machine skews every figure: compare servers of one run only.
        "load_at_start": os.getloadavg()[0],
    }


def _f(value: Any, fmt: str = ".1f") -> str:
    return format(value, fmt) if isinstance(value, int | float) and not isinstance(value, bool) else "-"


def _ratio(a: Any, b: Any) -> str:
    return f"{a / b:.2f}x" if isinstance(a, int | float) and isinstance(b, int | float) and b else "-"


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """``title`` over aligned columns (first left, the rest right); empty when there are no rows."""
    if not rows:
        return ""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [title]
    for cells in [header, *rows]:
        lines.append("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                               for i, (c, w) in enumerate(zip(cells, widths, strict=True))))
    return "\n".join(lines)


def _by_size(figures: dict[Any, Any], n: int) -> Any:
    """A per-size entry whose keys are ints when measured and strings when read back from JSON."""
    return figures.get(n) or figures.get(str(n))


def _fanout(result: dict[str, Any]) -> str:
    fan = {r["server"]: r for r in result.get("fanout", [])}
    sizes = sorted({int(n) for r in fan.values() for n in r.get("fanout", {})})
    sio, raw = fan.get(SOCKETIO.name, {}).get("fanout", {}), fan.get(RAW.name, {}).get("fanout", {})
    rows = []
    for n in sizes:
        sio_f, raw_f = _by_size(sio, n) or {}, _by_size(raw, n) or {}
        for r in fan.values():
            f = _by_size(r.get("fanout", {}), n)
            if f:
                rows.append([r["server"], str(n), _f(f["cpu_us_per_frame"]), _f(f["wall_ms_median"]),
                             _ratio(sio_f.get("cpu_us_per_frame"), f["cpu_us_per_frame"]),
                             _ratio(f["cpu_us_per_frame"], raw_f.get("cpu_us_per_frame")),
                             _ratio(f["wall_ms_median"], raw_f.get("wall_ms_median"))])
    return table("a. fan-out: one notify to N subscribers of one key (CPU: worker's own, per delivered frame)",
                 ["server", "N", "CPU us/frame", "wall ms to last", "socketio CPU / this", "this CPU / raw",
                  "this wall / raw"], rows)


def _memory(result: dict[str, Any]) -> str:
    rows = [[r["server"], *(_f(_by_size(r.get("memory", {}), n)) for n in (1000, 5000, 10000))]
            for r in result.get("fanout", [])]
    return table("c. memory: worker RSS growth per idle subscribed connection, KB",
                 ["server", "1k conns", "5k conns", "10k conns"], rows)


def _latency(result: dict[str, Any]) -> str:
    rows = []
    for r in result.get("fanout", []):
        f = _by_size(r.get("fanout", {}), 1000)
        if f:
            rows.append([r["server"] + ", 1 server", str(f["n"]), str(f["repeats"]), _f(f["p50_ms"]), _f(f["p99_ms"])])
    for r in result.get("cross", []):
        f = r.get("latency")
        if f:
            rows.append([r["server"], str(f["n"]), str(f["repeats"]), _f(f["p50_ms"]), _f(f["p99_ms"])])
        else:
            rows.append([r["server"], "-", "-", "-", "-"])
    out = [table("d. latency: POST /notify -> push received, over every (notify, subscriber) pair",
                 ["server", "subscribers", "notifies", "p50 ms", "p99 ms"], rows)]
    for r in result.get("cross", []):
        if "ingest" in r:
            i = r["ingest"]
            out.append(f"   NSQ ingest into one server: {i['notifications']} notifications published straight into"
                       f" nsqd, taken in at {i['per_s']:.0f}/s ({i['cpu_us_per_notification']:.1f} us CPU each;"
                       f" publishing took {i['publish_seconds']:.2f} s of {i['seconds']:.2f} s)")
        if "broker_cpu" in r:
            b = r["broker_cpu"]
            ingested = ""
            if "cpu_us_per_ingested" in b:
                ingested = f", {b['cpu_us_per_ingested']:.1f} us per notification taken in"
            out.append(f"   nsqd's own CPU: {b['idle_cpu_pct']:.2f} % of a core idle (two servers connected),"
                       f" {b['cpu_ms_per_notify']:.2f} ms per notify while measuring latency{ingested}")
    return "\n".join(filter(None, out))


def _throughput(result: dict[str, Any]) -> str:
    tput = result.get("per_user", [])
    es_t: dict[str, Any] = next((r.get("throughput", {}) for r in tput if r["server"] == ES_PER_USER.name), {})
    rows = []
    for r in tput:
        t = r.get("throughput")
        if t:
            rows.append([r["server"], _f(t["pushes_per_s"], ".0f"), _f(t["cpu_us_per_push"]), _f(t["cpu_share"], ".2f"),
                         _ratio(es_t.get("pushes_per_s"), t["pushes_per_s"])])
    return table("b. throughput: 1,000 conns x 10 keys, per-user fetch, notifies of all 1,000 keys back to back",
                 ["server", "pushes/s", "CPU us/push", "worker CPU share", "entitysync / this"], rows)


def _burst(result: dict[str, Any]) -> str:
    rows = []
    for r in result.get("per_user", []):
        b = r.get("burst")
        if b:
            rows.append([r["server"], str(b["notifies"]), str(b["subscribers"]), _f(b["fetches_per_subscriber"], ".2f"),
                         _f(b["frames_per_subscriber"], ".1f"), "yes" if b["final_state_everywhere"] else "NO",
                         _f(b["seconds"], ".2f")])
    return table("e. burst: notifies of one key (per-user entity)",
                 ["server", "notifies", "subscribers", "fetches/subscriber", "frames/subscriber",
                  "final state delivered", "seconds"], rows)


def _compression(result: dict[str, Any]) -> str:
    rows = [[r["server"], r.get("deflate", "-"), str(r.get("connections", "-")), _f(r.get("kb_per_conn")),
             _f(r.get("cpu_us_per_frame_median")), _f(r.get("cpu_us_per_frame_total")),
             _f(r.get("wall_ms_median")), _f(r.get("wire_bytes_per_frame"), ".0f")]
            for r in result.get("compression", [])]
    return table(f"f. compression: every client offers permessage-deflate; {result['args']['deflate_notifies']}"
                 " notifies of one key (CPU per delivered frame: median of the notifies; 'tot': over all of them)",
                 ["server", "deflate", "conns", "KB/conn", "CPU us/frame", "CPU tot us/fr", "wall ms last",
                  "wire B/frame"], rows)


def _pg(result: dict[str, Any]) -> str:
    forms = [r for r in result.get("pg", []) if "tps" in r]
    writers = sorted({int(n) for r in forms for n in r["tps"]})
    base = forms[0]["tps"] if forms else {}
    rows = [[r["server"], *(f"{_f(_by_size(r['tps'], n), '.0f')} ({_ratio(_by_size(r['tps'], n), _by_size(base, n))})"
                            for n in writers)] for r in forms]
    return table(f"g. PostgreSQL: commits/s of a one-row UPDATE, {result['args'].get('pg_seconds')} s each "
                 "(in brackets: / no notify at the same writers)",
                 ["form", *(f"{n} writer{'s' if n > 1 else ''}" for n in writers)], rows)


def _routing(result: dict[str, Any]) -> str:
    rows_in = [r for r in result.get("routing", []) if "routing" in r]
    entity: dict[str, Any] = next((r["routing"] for r in rows_in if r["server"].endswith("routing=entity")), {})
    rows = []
    for r in rows_in:
        g = r["routing"]
        rows.append([r["server"], str(g["notifications"]), " ".join(f"{s:.0%}" for s in g["received_share"]),
                     _f(g["cluster_per_s"], ".0f"), _ratio(g["cluster_per_s"], entity.get("cluster_per_s")),
                     _f(g.get("capacity_per_s"), ".0f"), _ratio(g.get("capacity_per_s"), entity.get("capacity_per_s")),
                     _f(g["cpu_us_per_notification"]), _f(g.get("redis_cpu_us_per_notification")),
                     _f(g.get("fetches_per_notification"), ".2f"), _f(g["seconds"], ".2f"),
                     " ".join(f"{rate / 1000:.0f}k" for rate in g.get("runs_per_s", []))])
    return table("h. routing: 4 servers on one Redis (or a Redis Cluster of 3 masters), each server's clients hold"
                 " 1,000 of 4,000 keys; notifications of random keys published into Redis; timed until every"
                 " server has taken in its notifications and finished their refreshes; the median of the bursts"
                 " (every burst's rate in the last column). capacity: notifications"
                 " / the busiest worker's CPU seconds (the rate with a core per server). CPU: all four workers,"
                 " per notification; Redis: the Redis servers' CPU per notification",
                 ["server", "notifications", "share each server received", "cluster notif/s", "vs entity",
                  "capacity/s", "vs entity", "CPU us/notif", "Redis us/notif", "fetches/notif", "seconds",
                  "bursts notif/s"], rows)


def _redis_cost(result: dict[str, Any]) -> str:
    lines = []
    for r in result.get("redis_cost", []):
        c = r.get("redis_cost")
        if c:
            lines.append(
                f"i. Redis's own cost ({r['server']}, a server of its own): {c['channels']} key channels take"
                f" {c['bytes_per_channel_first_subscriber']:.0f} B each, plus"
                f" {c['bytes_per_channel_second_subscriber']:.0f} B per further subscriber;"
                f" SUBSCRIBE/UNSUBSCRIBE {c['subscribe_unsubscribe_cpu_us_per_channel']:.2f} us CPU per channel;"
                f" PUBLISH {c['publish_cpu_us_key_routing']:.2f} us CPU to a key channel (1 subscriber),"
                f" {c['publish_cpu_us_entity_routing_4_subscribers']:.2f} / "
                f"{c['publish_cpu_us_entity_routing_32_subscribers']:.2f} us to an entity channel"
                " (4 / 32 subscribers)")
    return "\n".join(lines)


def _storm(result: dict[str, Any]) -> str:
    rows = [[r["server"], str(r.get("clients", "-")), str(r.get("fetches", "-")),
             _f(r.get("seconds_to_current"), ".2f"), _f(r.get("unchanged_bytes"), ".0f"),
             _f(r.get("full_resend_bytes"), ".0f"),
             _f(100 * r["unchanged_share"], ".1f") if r.get("unchanged_share") is not None else "-"]
            for r in result.get("storm", [])]
    return table("j. reconnect storm: clients x 5 of 10 shared keys, the server restarts (one key changed meanwhile),"
                 " everyone reconnects at once", ["server", "clients", "fetches on the new server",
                 "s until all current", "bytes, unchanged keys", "bytes of a full resend", "% of full"], rows)


def _cohorts(result: dict[str, Any]) -> str:
    rows = [[r["server"], _f(r.get("fetch_calls_per_notify"), ".1f"), _f(r.get("cpu_us_per_frame")),
             _f(r.get("p50_ms")), _f(r.get("p99_ms")), _f(r.get("wall_ms_median"))]
            for r in result.get("cohorts", [])]
    return table("k. cohorts and batch fetch: 1,000 subscribers of one per-user key",
                 ["server", "fetch calls / notify", "CPU us/push", "p50 ms", "p99 ms", "last push ms (median)"],
                 rows)


def report(result: dict[str, Any]) -> str:
    """The whole printed report of one run."""
    info = result["machine"]
    head = "\n".join([
        f"machine: {info['nproc']} CPUs, {info['cpu']}, Linux {info['kernel']}; python {info['python']}",
        "versions: " + ", ".join(f"{k} {val}" for k, val in info["versions"].items()),
        "servers: gunicorn -k gevent -w 1 each; load: one asyncio client process on the same machine"
        + (f"; 1-minute load average at the start: {info['load_at_start']:.1f}" if "load_at_start" in info else ""),
    ])
    tables = [t(result) for t in (_fanout, _memory, _latency, _throughput, _burst, _compression, _pg, _routing,
                                  _redis_cost, _storm, _cohorts)]
    problems = []
    for r in rows_of(result):
        if "error" in r:
            problems.append(f"ERROR {r['server']}: {r['error']}")
        problems.extend(f"log {r['server']}: {line}" for line in r.get("log_problems", [])[:3])
    return "\n\n".join(filter(None, [head, *tables, "\n".join(problems)]))


def rows_of(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Every server's row, from every scenario that ran."""
    return [r for part in PARTS for r in result.get(part, [])]
