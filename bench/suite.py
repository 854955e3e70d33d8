"""The benchmark suite: entitysync_sync against Flask-SocketIO and the raw socket limit.

Run from the project root (``pip install -e '.[bench]'``)::

    python -m bench [--connections 10000] [--fanout 100,1000,2000,5000] [--quick]

Every server under test is a real ``gunicorn -k gevent -w 1`` process
(apps in :mod:`bench.peers`), run one after another; this process is the
load client (:mod:`bench.load`, asyncio). Servers, in the same run:

* ``entitysync shared``: ``@es.entity("shared", shared=True)``;
* ``entitysync per-user``: ``@es.entity("items")``, a fetch per subscriber;
* ``flask-socketio``: Flask-SocketIO 5, ``async_mode="gevent"``, a room per
  key; shared scenarios are one room emit, per-user ones one emit per sid;
* ``raw``: one pre-encoded frame ``sendall``'d to each socket in a loop
  (per-user: fetch, encode and frame per socket).

Scenarios:

a. fan-out: N subscribers of one key (each N in ``--fanout``), one notify,
   repeated; server CPU per delivered frame (the worker's own, see
   :mod:`bench.usage`) and wall time from the POST to the last client;
b. throughput: 1,000 connections x 10 keys each (1,000 keys, 10 subscribers
   per key), the per-user entity, notifies of all 1,000 keys back to back
   for a few seconds: pushes delivered per second and CPU per push;
c. memory: worker RSS per idle subscribed connection at 1k, 5k and 10k
   connections (baseline after one warm-up connection came and went);
d. latency: notify→receive p50/p99 over every (notify, subscriber) pair at
   1,000 subscribers in one server; then across two servers on Redis
   (entitysync and Flask-SocketIO's Redis message queue) and on NSQ
   (entitysync; tests/nsqd.py runs the NSQ protocol double, or a real nsqd
   when NSQD_BIN is set), half the subscribers on each server, notifies
   posted to the first; plus the rate at which one server takes in
   notifications published straight into nsqd;
e. burst: 10,000 notifies of one key with 20 subscribers: fetches per
   subscriber, frames per subscriber, and whether every subscriber's last
   frame holds the final value.

Results are printed and written to ``bench/results/suite.json``. Nothing
sleeps to synchronise: waits are on received frames, with deadlines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import signal
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from bench.compression import ROOT, GunicornServer, ServerSpec, http_request, machine
from bench.load import Conn, Tracker, close_conns, open_conns
from bench.usage import cpu_seconds, rss_kb

RESULTS = ROOT / "bench" / "results" / "suite.json"
REDIS_URL = "redis://127.0.0.1:6379/0"
WAIT = 120.0


@dataclass(frozen=True)
class System:
    """A server under test: its app, websocket path and dialect, and the entity its scenarios use."""

    name: str
    app: str
    path: str
    dialect: str
    entity: str
    env: dict[str, str] = field(default_factory=dict)

    def spec(self, extra: dict[str, str] | None = None) -> ServerSpec:
        return ServerSpec(self.name, self.app, self.path, {**self.env, **(extra or {})})


ES_SHARED = System("entitysync shared", "bench.peers:entitysync_app()", "/ws/entity-sync/", "ws", "shared")
ES_PER_USER = System("entitysync per-user", "bench.peers:entitysync_app()", "/ws/entity-sync/", "ws", "items")
SOCKETIO = System("flask-socketio", "bench.peers:socketio_app()", "/socket.io/?EIO=4&transport=websocket",
                  "socketio", "shared")
SOCKETIO_PER_USER = System("flask-socketio per-sid", SOCKETIO.app, SOCKETIO.path, "socketio", "items")
RAW = System("raw sendall loop", "bench.peers:raw_app()", "/ws", "ws", "shared")
RAW_PER_USER = System("raw per-socket", RAW.app, RAW.path, "ws", "items")

FANOUT_SYSTEMS = (ES_SHARED, ES_PER_USER, SOCKETIO, RAW)
PER_USER_SYSTEMS = (ES_PER_USER, SOCKETIO_PER_USER, RAW_PER_USER)


def stop(server: GunicornServer) -> None:
    """Quick shutdown (SIGQUIT): the benchmark's clients are gone, nothing to drain."""
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGQUIT)
    server.stop(timeout=5)


async def post(server: GunicornServer, path: str) -> None:
    status = await http_request(server.port, "POST", path)
    if status != 200:
        raise RuntimeError(f"POST {path} answered HTTP {status}")


async def get_json(port: int, path: str) -> Any:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
    return json.loads(data.split(b"\r\n\r\n", 1)[1])


async def start(spec: ServerSpec, worker_connections: int, tag: str = "") -> GunicornServer:
    slug = "".join(ch if ch.isalnum() else "-" for ch in (spec.name + tag).lower())
    server = GunicornServer(spec, worker_connections, RESULTS.parent / f"suite-{slug}.log")
    try:
        await server.wait_ready(30)
    except BaseException:
        stop(server)
        raise
    return server


async def fanout(tracker: Tracker, server: GunicornServer, conns: Sequence[Conn], path: str,
                 repeats: int) -> dict[str, Any]:
    """POST ``path`` ``repeats`` times, each after every conn got the last one's push."""
    pid = server.worker_pid
    cpu0 = cpu_seconds(pid)
    walls, latencies = [], []
    for _ in range(repeats):
        tracker.arm(conns)
        await post(server, path)
        try:
            await asyncio.wait_for(tracker.done.wait(), WAIT)
        except asyncio.TimeoutError:
            raise TimeoutError(f"only {tracker.reached} of {len(conns)} got the push") from None
        walls.append(max(tracker.latencies) * 1e3)
        latencies.extend(x * 1e3 for x in tracker.latencies)
    cpu = cpu_seconds(pid) - cpu0
    latencies.sort()
    return {
        "n": len(conns),
        "repeats": repeats,
        "cpu_us_per_frame": cpu / (repeats * len(conns)) * 1e6,
        "wall_ms_median": statistics.median(walls),
        "p50_ms": latencies[len(latencies) // 2],
        "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
    }


# -- a, c and d (one server): memory, fan-out, latency ----------------------------


async def fanout_and_memory(system: System, args: argparse.Namespace) -> dict[str, Any]:
    sizes = sorted(args.fanout)
    steps = sorted({min(s, args.connections) for s in (1000, 5000, 10000)})
    server = await start(system.spec(), args.connections + 200)
    row: dict[str, Any] = {"server": system.name, "memory": {}, "fanout": {}}
    tracker = Tracker()
    conns: list[Conn] = []

    def keys_for(i: int) -> list[tuple[str, str]]:
        keys = [(system.entity, f"f{n}") for n in sizes if i < n]
        return keys or [(system.entity, "idle")]

    try:
        pid = server.worker_pid
        warm = await open_conns(server.port, system.dialect, system.path, keys_for, tracker, 10**6, 1)
        close_conns(warm)
        await asyncio.gather(*(c.closed for c in warm))
        base = rss_kb(pid)
        for n in steps:
            conns += await open_conns(server.port, system.dialect, system.path, keys_for, tracker,
                                      len(conns), n - len(conns))
            row["memory"][n] = (rss_kb(pid) - base) / n
        for n in sizes:
            if n > len(conns):
                continue
            # At least 5,000 frames per size, so that CPU per frame is not noise.
            repeats = max(args.repeats, math.ceil(5000 / n) if not args.quick else 1)
            if n == 1000:
                repeats = max(repeats, args.latency_repeats)
            row["fanout"][n] = await fanout(tracker, server, conns[:n], f"/notify/{system.entity}/f{n}", repeats)
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        close_conns(conns)
        stop(server)
        row["log_problems"] = server.problems()[:5]
    return row


# -- b and e (per-user entity): throughput, burst ----------------------------------


async def throughput_and_burst(system: System, args: argparse.Namespace) -> dict[str, Any]:
    n_conns, per_conn, n_keys, burst_subs = 1000, 10, 1000, 20
    server = await start(system.spec(), n_conns + 200, "-tput")
    row: dict[str, Any] = {"server": system.name}
    tracker = Tracker()
    conns: list[Conn] = []

    def keys_for(i: int) -> list[tuple[str, str]]:
        keys = [(system.entity, f"t{(i * per_conn + j) % n_keys}") for j in range(per_conn)]
        if i < burst_subs:
            keys.append((system.entity, "burst"))
        return keys

    try:
        pid = server.worker_pid
        conns = await open_conns(server.port, system.dialect, system.path, keys_for, tracker, 0, n_conns)
        # b. notifies of every key, back to back, one request in flight.
        cpu0, pushes0, t0 = cpu_seconds(pid), tracker.pushes, time.perf_counter()
        requests = 0
        while time.perf_counter() - t0 < args.seconds:
            await post(server, f"/notify-range/{system.entity}?start=0&count={n_keys}")
            requests += 1
        # What was notified is delivered once the pushes stop coming; count those too.
        await settle(tracker)
        elapsed = time.perf_counter() - t0
        pushes = tracker.pushes - pushes0
        row["throughput"] = {
            "notifies": requests * n_keys,
            "pushes": pushes,
            "seconds": elapsed,
            "pushes_per_s": pushes / elapsed,
            "cpu_us_per_push": (cpu_seconds(pid) - cpu0) / max(1, pushes) * 1e6,
            "cpu_share": (cpu_seconds(pid) - cpu0) / elapsed,
        }
        # e. a burst of notifies of one key.
        subs = conns[:burst_subs]
        before = [c.pushes for c in subs]
        fetched0 = (await get_json(server.port, f"/fetches/{system.entity}/burst"))["count"]
        t0 = time.perf_counter()
        await post(server, f"/notify/{system.entity}/burst?n={args.burst}")
        await settle(tracker)
        fetched = (await get_json(server.port, f"/fetches/{system.entity}/burst"))["count"] - fetched0
        finals = [c.value() for c in subs]
        row["burst"] = {
            "notifies": args.burst,
            "subscribers": burst_subs,
            "seconds": time.perf_counter() - t0,
            "fetches_per_subscriber": fetched / burst_subs,
            "frames_per_subscriber": statistics.mean(c.pushes - b for c, b in zip(subs, before, strict=True)),
            "final_state_everywhere": all(v == finals[0] for v in finals)
            and finals[0] == max(finals) and finals[0] % args.burst == 0,
            "final_value": finals[0],
        }
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        close_conns(conns)
        stop(server)
        row["log_problems"] = server.problems()[:5]
    return row


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


# -- d across two servers ------------------------------------------------------------


async def cross_server(name: str, system: System, env: dict[str, str], args: argparse.Namespace,
                       ingest: Any = None) -> dict[str, Any]:
    n = 1000
    servers = []
    row: dict[str, Any] = {"server": name}
    tracker = Tracker()
    conns: list[Conn] = []
    try:
        for tag in ("-a", "-b"):
            servers.append(await start(system.spec(env), n + 200, tag))
        for s in servers:  # the bus connects lazily: start it, and wait until it is subscribed
            if system.app.startswith("bench.peers:entitysync"):
                await wait_bus(s)
        half = n // 2
        for k, s in enumerate(servers):
            conns += await open_conns(s.port, system.dialect, system.path,
                                      lambda i: [(system.entity, "lat")], tracker, k * half, half)
        await warm_up(tracker, servers[0], conns, f"/notify/{system.entity}/lat")
        result = await fanout(tracker, servers[0], conns, f"/notify/{system.entity}/lat", args.latency_repeats)
        result["cpu_us_per_frame"] = None  # two workers: see the one-server rows
        row["latency"] = result
        if ingest is not None:
            row["ingest"] = await ingest(servers[1])
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        close_conns(conns)
        for s in servers:
            stop(s)
            row.setdefault("log_problems", []).extend(s.problems()[:3])
    return row


async def warm_up(tracker: Tracker, server: GunicornServer, conns: Sequence[Conn], path: str,
                  timeout: float = 60) -> None:
    """Notify until one notify reaches every conn: both servers' broker subscriptions are up."""
    deadline = time.monotonic() + timeout
    while True:
        tracker.arm(conns)
        await post(server, path)
        try:
            await asyncio.wait_for(tracker.done.wait(), 2.0)
            await settle(tracker)
            return
        except asyncio.TimeoutError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {tracker.reached} of {len(conns)} got a push in {timeout} s") from None


async def wait_bus(server: GunicornServer, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (await get_json(server.port, "/bus-stats")).get("connects", 0) >= 2:
            return
        await asyncio.sleep(0.05)
    raise TimeoutError("the bus never connected")


def nsq_ingest(nsqd: Any, count: int) -> Any:
    """Publish ``count`` notifications straight into nsqd; measure how fast one server takes them in."""

    async def measure(server: GunicornServer) -> dict[str, Any]:
        # Keys no client holds: this is the bus's receive path and the hub's lookup, not fan-out.
        bodies = [json.dumps({"entity": "shared", "id": f"k{i % 1000}"}, separators=(",", ":")).encode()
                  for i in range(count)]
        before = (await get_json(server.port, "/bus-stats")).get("received", 0)
        cpu0 = cpu_seconds(server.worker_pid)
        t0 = time.perf_counter()
        for first in range(0, count, 5000):
            await asyncio.to_thread(nsqd.mpub, "shared", bodies[first : first + 5000])
        published = time.perf_counter() - t0
        deadline = time.monotonic() + WAIT
        while (await get_json(server.port, "/bus-stats")).get("received", 0) - before < count:
            if time.monotonic() > deadline:
                raise TimeoutError("the server never received every notification")
            await asyncio.sleep(0.01)
        elapsed = time.perf_counter() - t0
        return {
            "notifications": count,
            "publish_seconds": published,
            "seconds": elapsed,
            "per_s": count / elapsed,
            "cpu_us_per_notification": (cpu_seconds(server.worker_pid) - cpu0) / count * 1e6,
        }

    return measure


async def cross_servers(args: argparse.Namespace) -> list[dict[str, Any]]:
    sys.path.insert(0, str(ROOT))
    from tests.nsqd import Nsqd

    rows = []
    redis_env = {"FLASK_ENTITYSYNC_BUS_URL": REDIS_URL}
    print("measuring latency across two servers: entitysync on redis ...", file=sys.stderr, flush=True)
    rows.append(await cross_server("entitysync shared, 2 servers, redis", ES_SHARED, redis_env, args))
    print("measuring latency across two servers: flask-socketio on redis ...", file=sys.stderr, flush=True)
    rows.append(await cross_server("flask-socketio, 2 servers, redis", SOCKETIO,
                                   {"BENCH_SOCKETIO_QUEUE": REDIS_URL}, args))
    # An ephemeral channel keeps at most --mem-queue-size messages and drops the rest (nsqd does
    # too); the ingest burst is larger than nsqd's default of 10,000.
    nsqd = Nsqd(["--mem-queue-size=1000000"])
    nsqd.start()
    try:
        print(f"measuring latency across two servers: entitysync on {nsqd.describe()} ...",
              file=sys.stderr, flush=True)
        env = {"FLASK_ENTITYSYNC_BUS_URL": f"nsq://{nsqd.tcp_address}"}
        rows.append(await cross_server(f"entitysync shared, 2 servers, nsq ({'nsqd' if nsqd.is_real else 'double'})",
                                       ES_SHARED, env, args, nsq_ingest(nsqd, args.ingest)))
    finally:
        nsqd.close()
    return rows


# -- report ---------------------------------------------------------------------------


def _f(value: Any, fmt: str = ".1f") -> str:
    return format(value, fmt) if isinstance(value, int | float) and not isinstance(value, bool) else "-"


def _ratio(a: Any, b: Any) -> str:
    return f"{a / b:.2f}x" if isinstance(a, int | float) and isinstance(b, int | float) and b else "-"


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [title]
    for cells in [header, *rows]:
        lines.append("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                               for i, (c, w) in enumerate(zip(cells, widths, strict=True))))
    return "\n".join(lines)


def report(result: dict[str, Any]) -> str:
    info = result["machine"]
    v = info["versions"]
    out = [
        f"machine: {info['nproc']} CPUs, {info['cpu']}, Linux {info['kernel']}; python {info['python']}",
        "versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        "servers: gunicorn -k gevent -w 1 each; load: one asyncio client process on the same machine",
        "",
    ]
    fan = {r["server"]: r for r in result["fanout"]}
    sizes = sorted({int(n) for r in fan.values() for n in r.get("fanout", {})})
    sio, raw = fan.get(SOCKETIO.name, {}), fan.get(RAW.name, {})
    rows = []
    for n in sizes:
        for r in fan.values():
            f = r.get("fanout", {}).get(n) or r.get("fanout", {}).get(str(n))
            if not f:
                continue
            sio_f = (sio.get("fanout", {}).get(n) or {})
            raw_f = (raw.get("fanout", {}).get(n) or {})
            rows.append([r["server"], str(n), _f(f["cpu_us_per_frame"]), _f(f["wall_ms_median"]),
                         _ratio(sio_f.get("cpu_us_per_frame"), f["cpu_us_per_frame"]),
                         _ratio(f["cpu_us_per_frame"], raw_f.get("cpu_us_per_frame")),
                         _ratio(f["wall_ms_median"], raw_f.get("wall_ms_median"))])
    out.append(table("a. fan-out: one notify to N subscribers of one key (CPU: worker's own, per delivered frame)",
                     ["server", "N", "CPU us/frame", "wall ms to last", "socketio CPU / this", "this CPU / raw",
                      "this wall / raw"], rows))
    out.append("")
    rows = []
    for r in fan.values():
        mem = r.get("memory", {})
        rows.append([r["server"], *(_f(mem.get(n) if n in mem else mem.get(str(n))) for n in (1000, 5000, 10000))])
    out.append(table("c. memory: worker RSS growth per idle subscribed connection, KB",
                     ["server", "1k conns", "5k conns", "10k conns"], rows))
    out.append("")
    rows = []
    for r in fan.values():
        f = r.get("fanout", {}).get(1000) or r.get("fanout", {}).get("1000")
        if f:
            rows.append([r["server"] + ", 1 server", str(f["n"]), str(f["repeats"]), _f(f["p50_ms"]), _f(f["p99_ms"])])
    for r in result["cross"]:
        f = r.get("latency")
        if f:
            rows.append([r["server"], str(f["n"]), str(f["repeats"]), _f(f["p50_ms"]), _f(f["p99_ms"])])
        else:
            rows.append([r["server"], "-", "-", "-", "-"])
    out.append(table("d. latency: POST /notify -> push received, over every (notify, subscriber) pair",
                     ["server", "subscribers", "notifies", "p50 ms", "p99 ms"], rows))
    for r in result["cross"]:
        if "ingest" in r:
            i = r["ingest"]
            out.append(f"   NSQ ingest into one server: {i['notifications']} notifications published straight into"
                       f" nsqd, taken in at {i['per_s']:.0f}/s ({i['cpu_us_per_notification']:.1f} us CPU each;"
                       f" publishing took {i['publish_seconds']:.2f} s of {i['seconds']:.2f} s)")
    out.append("")
    tput = {r["server"]: r for r in result["per_user"]}
    es_t = tput.get(ES_PER_USER.name, {}).get("throughput", {})
    rows = []
    for r in tput.values():
        t = r.get("throughput")
        if t:
            rows.append([r["server"], _f(t["pushes_per_s"], ".0f"), _f(t["cpu_us_per_push"]), _f(t["cpu_share"], ".2f"),
                         _ratio(es_t.get("pushes_per_s"), t["pushes_per_s"])])
    out.append(table("b. throughput: 1,000 conns x 10 keys, per-user fetch, notifies of all 1,000 keys back to back",
                     ["server", "pushes/s", "CPU us/push", "worker CPU share", "entitysync / this"], rows))
    out.append("")
    rows = []
    for r in tput.values():
        b = r.get("burst")
        if b:
            rows.append([r["server"], str(b["notifies"]), str(b["subscribers"]), _f(b["fetches_per_subscriber"], ".2f"),
                         _f(b["frames_per_subscriber"], ".1f"), "yes" if b["final_state_everywhere"] else "NO",
                         _f(b["seconds"], ".2f")])
    out.append(table("e. burst: notifies of one key (per-user entity)",
                     ["server", "notifies", "subscribers", "fetches/subscriber", "frames/subscriber",
                      "final state delivered", "seconds"], rows))
    for r in [*result["fanout"], *result["per_user"], *result["cross"]]:
        if "error" in r:
            out.append(f"ERROR {r['server']}: {r['error']}")
        for line in r.get("log_problems", [])[:3]:
            out.append(f"log {r['server']}: {line}")
    return "\n".join(out)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--connections", type=int, default=10000, help="most idle connections (c) [10000]")
    parser.add_argument("--fanout", type=lambda s: [int(x) for x in s.split(",")], default=[100, 1000, 2000, 5000],
                        help="fan-out sizes (a) [100,1000,2000,5000]")
    parser.add_argument("--repeats", type=int, default=5, help="notifies per fan-out size [5]")
    parser.add_argument("--latency-repeats", type=int, default=20, help="notifies at 1,000 subscribers (d) [20]")
    parser.add_argument("--seconds", type=float, default=5.0, help="throughput run length (b) [5]")
    parser.add_argument("--burst", type=int, default=10000, help="notifies in the burst (e) [10000]")
    parser.add_argument("--ingest", type=int, default=50000, help="notifications published into nsqd [50000]")
    parser.add_argument("--only", default="", help="comma list of parts to run: fanout,per_user,cross [all]")
    parser.add_argument("--quick", action="store_true", help="small sizes, to check the suite runs (~1 min)")
    args = parser.parse_args(argv)
    if args.quick:
        args.connections, args.fanout, args.repeats, args.latency_repeats = 1000, [100, 1000], 2, 3
        args.seconds, args.burst, args.ingest = 1.0, 1000, 5000
    return args


async def run(args: argparse.Namespace) -> dict[str, Any]:
    only = set(filter(None, args.only.split(","))) or {"fanout", "per_user", "cross"}
    result: dict[str, Any] = {"fanout": [], "per_user": [], "cross": []}
    if "fanout" in only:
        for system in FANOUT_SYSTEMS:
            print(f"measuring memory, fan-out and latency: {system.name} ...", file=sys.stderr, flush=True)
            result["fanout"].append(await fanout_and_memory(system, args))
    if "per_user" in only:
        for system in PER_USER_SYSTEMS:
            print(f"measuring throughput and burst: {system.name} ...", file=sys.stderr, flush=True)
            result["per_user"].append(await throughput_and_burst(system, args))
    if "cross" in only:
        result["cross"] = await cross_servers(args)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    info = machine()
    for dist in ("flask-socketio", "python-socketio", "python-engineio", "redis", "gnsq"):
        try:
            info["versions"][dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            info["versions"][dist] = "missing"
    result = {"benchmark": "suite", "machine": info, "args": vars(args)}
    result.update(asyncio.run(run(args)))
    result["seconds"] = time.monotonic() - started
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(report(result))
    print(f"results: {RESULTS.relative_to(ROOT)} ({result['seconds']:.0f} s)")
    errors = [r for r in [*result["fanout"], *result["per_user"], *result["cross"]] if "error" in r]
    return 1 if errors else 0
