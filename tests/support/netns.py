"""Hosts on a network of their own: Linux network namespaces, veth pairs and packet filters.

:class:`Network` builds, for one test module, a broker host and server hosts
that talk over a switched "back" network (a bridge in the broker's namespace,
one veth pair per server), while the test process reaches every host over a
"front" veth pair of its own (clients, readiness checks)::

      test process (root namespace)
        | front          | front          | front
     [broker] ----bridge---- back --[server A]
                        \\---- back --[server B]

Faults are put on a server's ``back`` interface, in both directions, inside
that server's namespace, so its websocket clients (on ``front``) are never
affected: :meth:`Host.partition` drops every packet silently (no RST, no
ICMP: the peer sees a host vanish), :meth:`Host.degrade` delays and drops a
share of them, and :meth:`Host.heal` removes it all.

The rules are iptables rules (the nf_tables backend). Delay and loss are what
``tc qdisc add ... netem delay 100ms loss 20%`` would give, but the kernels
these tests run on are built without ``sch_netem`` (``Specified qdisc kind is
unknown``), and without ``sch_fq`` for timestamp-based delay; so loss is the
``statistic`` match dropping packets at random, and delay is an ``NFQUEUE``
rule handing packets to :mod:`tests.support.netdelay`, which holds each one
before accepting it. Both act on real packets in the kernel, so TCP's own
retransmission and RTT machinery is what the product meets.

Everything is torn down by :meth:`Network.close` (the context manager's exit),
on success, failure or KeyboardInterrupt: processes first, then whatever else
still runs in the namespaces, then the namespaces (which takes their veth
pairs with them). Names carry the test process's pid, and :func:`clean_leftovers`
removes those of a run whose process is gone, so a crashed run leaves nothing
for the next one to trip on.

This needs root, ``ip`` (iproute2) and ``iptables``. Without them the tests
skip, or fail under CI (``CI=true`` or ``ENTITYSYNC_TEST_REQUIRE_NETNS=1``).
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parent.parent.parent
PREFIX = "esnf"
#: The back network, private to the namespaces (the root namespace never sees it).
BACK_NET = "192.168.77"
#: The queue number the delay rules send packets to.
DELAY_QUEUE = 7
_OURS = re.compile(rf"^{PREFIX}(\d+)[-x]")


class NetnsUnavailable(RuntimeError):
    """This machine cannot build the test network (not root, or ``ip``/``iptables`` missing)."""


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - someone else's process
        return True
    return True


def check_available() -> None:
    """Raise :class:`NetnsUnavailable` saying what is missing, if anything is."""
    if os.geteuid() != 0:
        raise NetnsUnavailable("network namespaces need root")
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            raise NetnsUnavailable(f"{tool} is not on PATH (apt-get install iproute2 iptables)")


def _namespaces() -> list[str]:
    return [line.split()[0] for line in _run("ip", "netns", "list").stdout.splitlines() if line.strip()]


def _kill_inside(ns: str) -> None:
    """SIGKILL whatever still runs in ``ns``: only processes these tests started there."""
    pids = _run("ip", "netns", "pids", ns, check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def clean_leftovers() -> list[str]:
    """Remove the namespaces and links of earlier runs whose test process is gone; their names."""
    removed = []
    for ns in _namespaces():
        found = _OURS.match(ns)
        if found and not _alive(int(found.group(1))):
            _kill_inside(ns)
            _run("ip", "netns", "del", ns, check=False)
            removed.append(ns)
    for line in _run("ip", "-o", "link", "show").stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
        found = _OURS.match(name)
        if found and not _alive(int(found.group(1))):
            _run("ip", "link", "del", name, check=False)
            removed.append(name)
    return removed


def _front_subnet() -> int:
    """A second octet ``N`` such that nothing in the root namespace uses ``10.N.0.0/16``."""
    used = _run("ip", "-4", "route", "show", "table", "all").stdout + _run("ip", "-4", "addr").stdout
    start = 100 + os.getpid() % 100
    for offset in range(150):
        n = 100 + (start - 100 + offset) % 150
        if not re.search(rf"\b10\.{n}\.", used):
            return n
    raise NetnsUnavailable("no free 10.N.0.0/16 for the front links")  # pragma: no cover


class Host:
    """One namespace: a ``front`` link to the test process and, for servers, a ``back`` link."""

    def __init__(self, network: Network, name: str, index: int) -> None:
        self.network = network
        self.name = name
        self.ns = f"{PREFIX}{os.getpid()}-{network.number}{name}"
        self.index = index
        n = network.front_octet
        self.front_ip = f"10.{n}.{index}.2"  # where the test process reaches this host
        self.back_ip: str | None = None  # where the other hosts reach it
        self._delay: subprocess.Popen[str] | None = None
        _run("ip", "netns", "add", self.ns)
        network.namespaces.append(self.ns)
        self.exec("ip", "link", "set", "lo", "up")
        outside = f"{PREFIX}{os.getpid()}x{network.number % 100}{index}"
        _run("ip", "link", "add", outside, "type", "veth", "peer", "name", "front", "netns", self.ns)
        network.links.append(outside)
        _run("ip", "addr", "add", f"10.{n}.{index}.1/30", "dev", outside)
        _run("ip", "link", "set", outside, "up")
        self.exec("ip", "addr", "add", f"{self.front_ip}/30", "dev", "front")
        self.exec("ip", "link", "set", "front", "up")

    def wrap(self) -> tuple[str, ...]:
        """The command prefix that runs a program on this host."""
        return ("ip", "netns", "exec", self.ns)

    def exec(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run(*self.wrap(), *cmd, check=check)

    def spawn(self, cmd: Sequence[str], **popen: Any) -> subprocess.Popen[Any]:
        """Start ``cmd`` on this host; :meth:`Network.close` ends it."""
        env = dict(popen.pop("env", None) or os.environ)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        env["PYTHONUNBUFFERED"] = "1"
        proc = subprocess.Popen([*self.wrap(), *cmd], cwd=ROOT, env=env, **popen)
        self.network.processes.append(proc)
        return proc

    # -- faults on the back link ------------------------------------------------

    def _rules(self, *target: str) -> None:
        self.exec("iptables", "-w", "-A", "INPUT", "-i", "back", *target)
        self.exec("iptables", "-w", "-A", "OUTPUT", "-o", "back", *target)

    def partition(self) -> None:
        """Drop every packet between this host and the back network, silently, both ways."""
        self._rules("-j", "DROP")

    def degrade(self, delay_ms: float = 0, loss_percent: float = 0) -> None:
        """Delay each packet on the back link by ``delay_ms`` and drop ``loss_percent`` of them,
        in each direction (the round trip grows by twice ``delay_ms``)."""
        if loss_percent:
            self._rules("-m", "statistic", "--mode", "random", "--probability", str(loss_percent / 100),
                        "-j", "DROP")
        if delay_ms:
            if self._delay is None:
                self._delay = self.spawn([sys.executable, "-m", "tests.support.netdelay",
                                          "--queue", str(DELAY_QUEUE), "--delay-ms", str(delay_ms)],
                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                assert self._delay.stdout is not None
                line = self._delay.stdout.readline()
                if line.strip() != "ready":
                    raise RuntimeError(f"netdelay did not start: {line}{self._delay.stdout.read()}")
            # With --queue-bypass a packet is accepted, not dropped, should the listener be gone.
            self._rules("-j", "NFQUEUE", "--queue-num", str(DELAY_QUEUE), "--queue-bypass")

    def heal(self) -> dict[str, int]:
        """Remove every fault: the link is as good as before. What the faults did: packets
        ``dropped`` (by a partition or loss) and ``delayed``, both ways."""
        done = {"dropped": 0, "delayed": 0}
        for line in self.exec("iptables", "-w", "-L", "-n", "-v", "-x").stdout.splitlines():
            fields = line.split()
            if len(fields) > 2 and fields[0].isdigit() and fields[2] == "DROP":
                done["dropped"] += int(fields[0])
        self.exec("iptables", "-w", "-F", "INPUT")
        self.exec("iptables", "-w", "-F", "OUTPUT")
        if self._delay is not None:  # after the rules are gone: it lets through what it holds
            self._delay.terminate()
            output, _ = self._delay.communicate(timeout=10)
            found = re.search(r"delayed (\d+)", output)
            done["delayed"] = int(found.group(1)) if found else 0
            self._delay = None
        return done


class Network:
    """A broker host and server hosts on a back network; a context manager that removes them all."""

    built = 0

    def __init__(self) -> None:
        check_available()
        clean_leftovers()
        Network.built += 1
        self.number = Network.built  # names differ from those of another network of this process
        self.namespaces: list[str] = []
        self.links: list[str] = []  # in the root namespace
        self.processes: list[subprocess.Popen[Any]] = []
        self.hosts: dict[str, Host] = {}
        self.front_octet = _front_subnet()
        atexit.register(self.close)  # should the process end before the block does (Ctrl-C)
        try:
            self.broker = self._host("broker")
            self.broker.back_ip = f"{BACK_NET}.1"
            self.broker.exec("ip", "link", "add", "switch", "type", "bridge")
            self.broker.exec("ip", "addr", "add", f"{self.broker.back_ip}/24", "dev", "switch")
            self.broker.exec("ip", "link", "set", "switch", "up")
        except BaseException:
            self.close()
            raise

    def _host(self, name: str) -> Host:
        host = self.hosts[name] = Host(self, name, len(self.hosts) + 1)
        return host

    def server_host(self, name: str) -> Host:
        """A host on the back network, switched to the broker."""
        try:
            host = self._host(name)
            port = f"port{host.index}"
            _run("ip", "link", "add", "back", "netns", host.ns, "type", "veth", "peer", "name", port,
                 "netns", self.broker.ns)
            self.broker.exec("ip", "link", "set", port, "master", "switch")
            self.broker.exec("ip", "link", "set", port, "up")
            host.back_ip = f"{BACK_NET}.{10 + host.index}"
            host.exec("ip", "addr", "add", f"{host.back_ip}/24", "dev", "back")
            host.exec("ip", "link", "set", "back", "up")
        except BaseException:
            self.close()
            raise
        return host

    def close(self) -> None:
        """End every process started here, then remove the namespaces; never raises."""
        for proc in reversed(self.processes):
            if proc.poll() is None:
                proc.terminate()
        for proc in reversed(self.processes):
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        self.processes.clear()
        for link in self.links:  # now: a namespace's own links go only some time after it
            _run("ip", "link", "del", link, check=False)
        self.links.clear()
        for ns in reversed(self.namespaces):
            _kill_inside(ns)  # a worker whose parent is gone, say
            _run("ip", "netns", "del", ns, check=False)
        self.namespaces.clear()
        atexit.unregister(self.close)

    def leftovers(self) -> list[str]:
        """This network's namespaces and root-namespace links still present (none after close)."""
        mine = (f"{PREFIX}{os.getpid()}-{self.number}", f"{PREFIX}{os.getpid()}x{self.number % 100}")
        links = [line.split(":")[1].strip().split("@")[0]
                 for line in _run("ip", "-o", "link", "show").stdout.splitlines()]
        return [name for name in _namespaces() + links if name.startswith(mine)]

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

