"""Network faults between app servers and the broker, on hosts of their own.

Each broker (Redis, and nsqd: the protocol double, or a real nsqd named by
``NSQD_BIN``) runs in a network namespace of its own, and two servers (server
A under ``gunicorn -k gevent``, server B under ``flask run``) each in theirs,
switched to the broker over a back network; see :mod:`tests.support.netns`.
Real websocket clients in the test process reach the servers over front links
that no fault touches. The faults are real packet-level ones on a server's
back link, in its namespace:

* a partition: every packet dropped, silently (no RST, no ICMP), both ways;
* delay and loss: each packet held 100 ms each way (200 ms more round trip)
  and 20 % of them dropped, each way.

``tc qdisc ... netem`` is what would usually add delay and loss, but these
kernels are built without ``sch_netem`` (and without ``sch_fq``), so loss is
iptables' ``statistic`` match dropping packets at random and delay is an
``NFQUEUE`` rule feeding :mod:`tests.support.netdelay`, which holds each
packet in the kernel's queue before accepting it. TCP meets real lost and late
segments either way.

The promise checked: once the network heals, every client on every server
holds the latest value of every row within 5 seconds, whatever was written,
through either server, while the fault lasted. The 5 seconds are a deadline
for convergence, not a performance figure; each test prints the time it
measured (``pytest -s``).

These tests need root, ``ip`` and ``iptables``; without them they skip, or
fail under CI.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.support.brokers import missing, redis_ping
from tests.support.clients import Client
from tests.support.netns import Host, NetnsUnavailable, Network, clean_leftovers
from tests.support.nsqd import Nsqd
from tests.support.pushes import converge, seed
from tests.support.servers import Server, stop_all
from tests.support.waiting import wait_for

#: Seconds after healing by which every client must hold the latest values.
CONVERGE_WITHIN = 5.0
#: Seconds the delay and loss last while writes go on.
DEGRADED_SECONDS = 3.0
#: Seconds between two writes: a steady stream, not a flood that starves the servers.
WRITE_PACING = 0.05


class Site:
    """The broker and two servers on their hosts, and the rows' shared database."""

    def __init__(self, net: Network, kind: str, db: Path) -> None:
        self.kind = kind
        self.nsqd: Nsqd | None = None
        self.data: str | None = None
        self.servers: list[Server] = []
        try:
            self._start(net, db)
        except BaseException:
            self.close()
            raise

    def _start(self, net: Network, db: Path) -> None:
        self.host_a = net.server_host("a")
        self.host_b = net.server_host("b")
        broker = net.broker
        if self.kind == "redis":
            binary = shutil.which("redis-server")
            if binary is None:
                missing("redis", "redis-server is not on PATH")
            assert binary is not None
            self.data = tempfile.mkdtemp(prefix="entitysync-redis-")
            broker.spawn([binary, "--port", "6379", "--bind", "0.0.0.0", "--protected-mode", "no",
                          "--save", "", "--appendonly", "no", "--dir", self.data],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
            wait_for(lambda: redis_ping(broker.front_ip, 6379), message="redis-server on the broker host")
            url = f"redis://{broker.back_ip}:6379/0"
        else:
            self.nsqd = Nsqd(host="0.0.0.0", reach=broker.front_ip, wrap=broker.wrap())
            self.nsqd.start()
            url = f"nsq://{broker.back_ip}:{self.nsqd.tcp_port}"
        for kind, host in (("gunicorn", self.host_a), ("flask", self.host_b)):
            server = Server(kind, {"ENTITYSYNC_BUS_URL": url, "ENTITYSYNC_TOPIC_PREFIX": "faults_"},
                            extra_env={"ENTITYSYNC_TEST_DB": str(db)}, host=host.front_ip, wrap=host.wrap())
            self.servers.append(server)
            wait_for(lambda s=server: s.get("/_t/bus-ready")["ready"], timeout=30, message="the bus subscriptions")
        self.a, self.b = self.servers

    def close(self) -> None:
        stop_all(self.servers, quick=True)
        if self.nsqd is not None:
            self.nsqd.close()
        if self.data is not None:
            shutil.rmtree(self.data, ignore_errors=True)


@pytest.fixture(scope="module", params=["redis", "nsq"])
def site(request: pytest.FixtureRequest) -> Iterator[Site]:
    try:
        net = Network()
    except NetnsUnavailable as exc:
        missing("netns", str(exc))
    db = Path(tempfile.mkdtemp(prefix="entitysync-db-")) / "rows.sqlite3"
    with net:
        built = Site(net, request.param, db)
        try:
            yield built
        finally:
            built.close()
    shutil.rmtree(db.parent, ignore_errors=True)
    assert not net.leftovers(), "namespaces or links left behind"


def _clients(site: Site, ids: list[str]) -> list[Client]:
    clients = [Client(server.ws_url) for server in (site.a, site.b, site.a, site.b)]
    for client in clients:
        for id in ids:
            client.subscribe("items", id)
        converge(client, dict.fromkeys(ids, "start"), timeout=15)
    return clients


def _write_during(site: Site, ids: list[str], seconds: float) -> dict[str, Any]:
    """Write rows through both servers, turn by turn, for ``seconds``; the last value of each."""
    written: dict[str, Any] = {}
    n = 0
    end = time.monotonic() + seconds
    pace = threading.Event()  # never set: its wait() paces the writes
    while time.monotonic() < end:
        id = ids[n % len(ids)]
        (site.a, site.b)[n % 2].set("items", id, f"w{n}")
        written[id] = f"w{n}"
        n += 1
        pace.wait(WRITE_PACING)
    assert n >= 2 * len(ids), f"only {n} writes in {seconds}s"
    return written


def _converged_after_heal(clients: list[Client], expected: dict[str, Any], healed: float) -> float:
    """Wait for every client (each on a thread) to hold ``expected``; the slowest's time since ``healed``."""
    times: list[float] = []
    errors: list[BaseException] = []

    def watch(client: Client) -> None:
        try:
            converge(client, expected, timeout=max(0.1, healed + CONVERGE_WITHIN - time.monotonic()))
            times.append(time.monotonic() - healed)
        except BaseException as exc:  # reported below, with the others
            errors.append(exc)

    threads = [threading.Thread(target=watch, args=(client,)) for client in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise AssertionError(f"{len(errors)} of {len(clients)} clients did not converge within "
                             f"{CONVERGE_WITHIN}s of healing: {errors[0]}")
    return max(times)


def _report(what: str, site: Site, seconds: float) -> None:
    print(f"\n{site.kind}: {what}: every client converged {seconds:.2f}s after healing", file=sys.stderr)


@pytest.mark.parametrize("seconds", [2, 6], ids=["2s", "6s"])
def test_a_partitioned_server_converges_within_5s_of_healing(site: Site, uid: str, seconds: float) -> None:
    """Server A loses the broker silently while rows change through both servers.

    After 2 s its broker connections may still be the same ones, which TCP's
    retransmissions bring back; after 6 s the bus has noticed the silence (a
    missed PING answer on Redis, two missed heartbeats on NSQ, within 3 s)
    and converges over new connections, however long TCP would have waited.
    """
    ids = [f"{uid}-{n}" for n in range(3)]
    for id in ids:
        seed(site.a, id, "start")
    clients = _clients(site, ids)
    try:
        reconnects = site.a.stats()["bus"].get("reconnects", 0)
        site.host_a.partition()
        try:
            received = site.a.stats()["bus"].get("received", 0)
            written = _write_during(site, ids, seconds)
            # B's notifications never reached A: the partition is real.
            assert site.a.stats()["bus"].get("received", 0) == received
        finally:
            done = site.host_a.heal()
        healed = time.monotonic()
        assert done["dropped"] > 0
        _report(f"{seconds} s partition", site, _converged_after_heal(clients, written, healed))
        if seconds > 3:
            assert site.a.stats()["bus"].get("reconnects", 0) > reconnects, "A's bus kept its silent connections"
    finally:
        for client in clients:
            client.close()


def test_delay_and_loss_then_healing_converges_within_5s(site: Site, uid: str) -> None:
    """Both servers' links are slow and lossy while rows change through both."""
    ids = [f"{uid}-{n}" for n in range(3)]
    for id in ids:
        seed(site.a, id, "start")
    clients = _clients(site, ids)
    hosts: tuple[Host, ...] = (site.host_a, site.host_b)
    try:
        try:
            for host in hosts:
                host.degrade(delay_ms=100, loss_percent=20)
            written = _write_during(site, ids, DEGRADED_SECONDS)
        finally:
            done = [host.heal() for host in hosts]
        healed = time.monotonic()
        # Both links really lost and held packets.
        assert all(d["dropped"] > 0 and d["delayed"] > 0 for d in done), done
        _report("200 ms more round trip and 20% loss", site, _converged_after_heal(clients, written, healed))
    finally:
        for client in clients:
            client.close()


def test_the_network_is_removed_even_when_the_test_fails() -> None:
    """Namespaces, links and processes go, when the block raises and after a crashed run."""
    try:
        net = Network()
    except NetnsUnavailable as exc:
        missing("netns", str(exc))
    with pytest.raises(RuntimeError, match="the test failed"):
        with net:
            host = net.server_host("x")
            proc = host.spawn(["sleep", "300"])
            host.partition()
            assert len(net.leftovers()) >= 3
            raise RuntimeError("the test failed")
    assert proc.poll() is not None
    assert net.leftovers() == []
    # A run that crashed left a namespace behind: the next run removes it.
    dead = subprocess.Popen(["true"])
    dead.wait()
    name = f"esnf{dead.pid}-crashed"
    subprocess.run(["ip", "netns", "add", name], check=True)
    assert name in clean_leftovers()
    assert name not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
