"""A real Redis Cluster of the tests' own: redis-server processes on free ports, joined by redis-cli.

Three masters, each with one replica (six ``redis-server --cluster-enabled
yes`` processes under a temporary directory), so that a test can restart a
node or fail a shard over to its replica. A short ``cluster-node-timeout``
keeps failure detection within seconds. Under CI (``CI=true``) or with
``ENTITYSYNC_TEST_REQUIRE_REDIS=1``, a cluster that cannot be started fails
the tests instead of skipping them.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.support.brokers import missing, redis_ping
from tests.support.ports import free_port
from tests.support.waiting import wait_for

#: Milliseconds a node may be unreachable before it counts as failed (and its replica takes over).
NODE_TIMEOUT_MS = 2000


def command(port: int, *args: str, timeout: float = 5.0) -> str:
    """Run one command on the node at ``port`` with redis-cli; its reply as text."""
    result = subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args],
                            capture_output=True, text=True, timeout=timeout)
    return result.stdout


class RedisClusterNodes:
    """Six redis-server processes forming a cluster of three shards (a master and a replica each)."""

    def __init__(self, masters: int = 3, replicas: int = 1) -> None:
        self.server = shutil.which("redis-server")
        self.cli = shutil.which("redis-cli")
        if self.server is None or self.cli is None:
            missing("redis", "redis-server or redis-cli is not on PATH")
        self.dir = Path(tempfile.mkdtemp(prefix="entitysync-redis-cluster-"))
        self.ports = [free_port() for _ in range(masters * (1 + replicas))]
        # Each node's cluster bus port, named since the default (port + 10000) may be taken or too high.
        self.bus_ports = {port: free_port() for port in self.ports}
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        try:
            for port in self.ports:
                self.start(port)
            created = subprocess.run(
                [self.cli, "--cluster", "create", *(f"127.0.0.1:{port}" for port in self.ports),
                 "--cluster-replicas", str(replicas), "--cluster-yes"],
                capture_output=True, text=True, timeout=60)
            if created.returncode != 0:
                missing("redis", f"redis-cli --cluster create failed: {created.stdout[-500:]}{created.stderr[-500:]}")
            self.wait_healthy(masters)
        except BaseException:
            self.close()
            raise

    def url(self, *, password: str | None = None, query: str = "") -> str:
        """The bus URL naming the first two nodes (the rest are found from them)."""
        auth = f":{password}@" if password else ""
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.ports[:2])
        return f"redis+cluster://{auth}{hosts}/" + (f"?{query}" if query else "")

    def start(self, port: int) -> None:
        """Start (or restart, with its saved cluster configuration) the node on ``port``."""
        assert self.server is not None
        node_dir = self.dir / str(port)
        node_dir.mkdir(exist_ok=True)
        self.procs[port] = subprocess.Popen(
            [self.server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(node_dir), "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
             "--cluster-port", str(self.bus_ports[port]),
             "--cluster-node-timeout", str(NODE_TIMEOUT_MS), "--logfile", str(node_dir / "redis.log"),
             # A new replica's first sync starts at once, not after Redis's default 5 s wait.
             "--repl-diskless-sync-delay", "0"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        wait_for(lambda: redis_ping("127.0.0.1", port), message=f"redis-server on {port}")

    def kill(self, port: int) -> None:
        """Kill the node on ``port`` at once (no shutdown, as a crash)."""
        proc = self.procs.pop(port)
        proc.kill()
        proc.wait(10)

    def masters(self) -> dict[int, list[tuple[int, int]]]:
        """The port of every master that serves slots, and its slot ranges, as a live node sees them."""
        result: dict[int, list[tuple[int, int]]] = {}
        for port in self.procs:
            lines = command(port, "CLUSTER", "NODES").splitlines()
            if not lines:
                continue
            for line in lines:
                fields = line.split()
                if "master" not in fields[2] or "fail" in fields[2] or len(fields) < 9:
                    continue
                master = int(fields[1].split("@")[0].rpartition(":")[2])
                ranges = []
                for part in fields[8:]:
                    if part.startswith("["):
                        continue
                    first, _, last = part.partition("-")
                    ranges.append((int(first), int(last or first)))
                result[master] = ranges
            return result
        return result

    def replica_of(self, master: int) -> int:
        """The port of a replica of the master on ``master`` (polled: a new replica is announced by gossip)."""
        def find() -> int | None:
            for port in self.procs:
                nodes = [line.split() for line in command(port, "CLUSTER", "NODES").splitlines()]
                ports = {fields[0]: int(fields[1].split("@")[0].rpartition(":")[2]) for fields in nodes}
                master_id = next((node for node, node_port in ports.items() if node_port == master), None)
                for fields in nodes:
                    if fields[3] == master_id and "slave" in fields[2] and "fail" not in fields[2]:
                        return ports[fields[0]]
            return None

        found: int = wait_for(find, timeout=20, interval=0.1, message=f"a replica of {master}")
        return found

    def failover(self, replica: int, timeout: float = 30.0) -> None:
        """Promote ``replica`` with ``CLUSTER FAILOVER``, asked again if an attempt times out
        (Redis gives a manual failover 5 s to complete, which a loaded machine can miss)."""
        deadline = time.monotonic() + timeout
        while True:
            assert command(replica, "CLUSTER", "FAILOVER").strip() == "OK"
            try:
                wait_for(lambda: replica in self.masters(), timeout=6, interval=0.1,
                         message="the replica promoted")
                return
            except AssertionError:
                if time.monotonic() >= deadline:
                    raise

    def master_of_slot(self, slot: int) -> int:
        for port, ranges in self.masters().items():
            if any(first <= slot <= last for first, last in ranges):
                return port
        raise AssertionError(f"no master serves slot {slot}")

    def healthy(self, masters: int = 3) -> bool:
        """Every running node says the cluster is ok, ``masters`` masters serve all 16,384 slots,
        and every replica has finished syncing with its master.

        The last matters to a test that then kills a master: a replica whose
        first sync has not finished counts as disconnected from its master for
        too long (``cluster-replica-validity-factor``) and never takes over.
        """
        for port in self.procs:
            if "cluster_state:ok" not in command(port, "CLUSTER", "INFO"):
                return False
            replication = command(port, "INFO", "replication")
            if "role:slave" in replication and "master_link_status:up" not in replication:
                return False
        serving = self.masters()
        if len(serving) != masters or sum(last - first + 1 for ranges in serving.values()
                                          for first, last in ranges) != 16384:
            return False
        replicas = [line for line in command(next(iter(self.procs)), "CLUSTER", "NODES").splitlines()
                    if "slave" in line.split()[2] and "fail" not in line.split()[2]]
        return len(replicas) == len(self.procs) - masters  # every running node serves or replicates

    def wait_healthy(self, masters: int = 3, timeout: float = 30.0) -> None:
        wait_for(lambda: self.healthy(masters), timeout=timeout, interval=0.1,
                 message="the Redis Cluster to be ok")

    def shard_numsub(self, channel: str) -> int:
        """Subscribers of shard channel ``channel`` on the master that serves it."""
        from redis.cluster import key_slot

        port = self.master_of_slot(key_slot(channel.encode()))
        reply = command(port, "PUBSUB", "SHARDNUMSUB", channel).split()
        return int(reply[1]) if len(reply) == 2 else 0

    def spublish(self, channel: str, body: bytes) -> int:
        """SPUBLISH ``body`` on ``channel`` through the master that serves it; how many received it."""
        from redis.cluster import key_slot

        port = self.master_of_slot(key_slot(channel.encode()))
        return self._send(port, ["SPUBLISH", channel.encode(), body])

    def publish(self, channel: str, body: bytes, port: int | None = None) -> int:
        """Classic PUBLISH ``body`` on ``channel`` on one node (the cluster broadcasts it)."""
        return self._send(port or next(iter(self.procs)), ["PUBLISH", channel.encode(), body])

    @staticmethod
    def _send(port: int, args: list[bytes | str]) -> int:
        parts = [arg.encode() if isinstance(arg, str) else arg for arg in args]
        request = b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(request)
            reply = sock.recv(64)
        assert reply.startswith(b":"), reply
        return int(reply[1:].split(b"\r\n")[0])

    def close(self) -> None:
        for port in list(self.procs):
            self.kill(port)
        shutil.rmtree(self.dir, ignore_errors=True)
