"""A Redis Cluster of the benchmark's own: three masters on free ports of 127.0.0.1.

``redis-server --cluster-enabled yes`` processes under a temporary directory,
joined with ``redis-cli --cluster create``, for the rows that run on
``redis+cluster://`` (never the shared Redis on 6379).
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from typing import Iterator


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _cli(port: int, *args: str) -> str:
    return subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True,
                          timeout=10).stdout


@contextlib.contextmanager
def redis_cluster(masters: int = 3) -> Iterator[list[int]]:
    """Start a cluster of ``masters`` masters (no replicas); yield their ports; stop it."""
    binary = shutil.which("redis-server")
    if binary is None or shutil.which("redis-cli") is None:
        raise RuntimeError("redis-server or redis-cli is not on PATH")
    workdir = tempfile.mkdtemp(prefix="bench-redis-cluster-")
    ports = [_free_port() for _ in range(masters)]
    procs = []
    try:
        for port in ports:
            node_dir = f"{workdir}/{port}"
            subprocess.run(["mkdir", "-p", node_dir], check=True)
            procs.append(subprocess.Popen(
                [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--dir", node_dir, "--cluster-enabled", "yes", "--cluster-port", str(_free_port())],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 10
        while not all("PONG" in _cli(port, "PING") for port in ports):
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        created = subprocess.run(["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
                                  "--cluster-yes"], capture_output=True, text=True, timeout=60)
        if created.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {created.stdout[-300:]}")
        deadline = time.monotonic() + 30
        while not all("cluster_state:ok" in _cli(port, "CLUSTER", "INFO") for port in ports):
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster never became ok")
            time.sleep(0.1)
        yield ports
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)
