"""Run an nsqd for tests: the real one when ``NSQD_BIN`` names it, else the protocol double.

Both are launched with the same flags on 127.0.0.1, and both log
``TCP: listening on ADDR`` / ``HTTP: listening on ADDR``, which is where the ports
are read. The first start binds port 0; later starts reuse the ports it got, so
``stop()`` (or ``kill()``) then ``start()`` is nsqd going down and coming back at
the same address, with the same ``--data-path``.

Tests take the ``nsqd`` fixture (defined in ``conftest.py``); conftest shows
:func:`describe_backend` in the pytest header.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent.parent
HOST = "127.0.0.1"
_LISTENING = re.compile(r"(TCP|HTTP): listening on (\S+):(\d+)")


def nsqd_binary() -> str | None:
    """The real nsqd named by ``NSQD_BIN``, or None to use the double."""
    binary = os.environ.get("NSQD_BIN")
    if not binary:
        return None
    if not (os.path.isfile(binary) and os.access(binary, os.X_OK)):
        raise RuntimeError(f"NSQD_BIN={binary!r} is not an executable file; unset it to use the NSQ protocol double")
    return binary


def describe_backend() -> str:
    binary = nsqd_binary()
    if binary:
        return f"real nsqd at {binary}"
    return "NSQ protocol double (tests/support/nsqd_double/); set NSQD_BIN to test a real nsqd"


class NsqdHTTPError(Exception):
    """nsqd answered an HTTP request with an error status (its ``message`` is nsqd's code)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"nsqd HTTP {status}: {message}")
        self.status = status
        self.message = message


class Nsqd:
    """One nsqd process (real or double) with a private data directory and log file."""

    def __init__(self, extra_args: Iterable[str] = (), binary: str | None = None, host: str = HOST,
                 wrap: Iterable[str] = (), reach: str | None = None) -> None:
        """``host`` is the address to listen on, ``reach`` the one to reach it at (default ``host``),
        and ``wrap`` prefixes the command (``ip netns exec NS``)."""
        self.binary = binary if binary is not None else nsqd_binary()
        self.host = host
        self.reach = reach or host
        self.wrap = list(wrap)
        self.is_real = self.binary is not None
        self.extra_args = list(extra_args)
        self.data_path = tempfile.mkdtemp(prefix="nsqd-data-")
        self.log_path = Path(tempfile.mkstemp(prefix="nsqd-", suffix=".log")[1])
        self.tcp_port = 0
        self.http_port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    # Addresses.

    @property
    def tcp_address(self) -> str:
        return f"{self.reach}:{self.tcp_port}"

    @property
    def http_address(self) -> str:
        return f"{self.reach}:{self.http_port}"

    def describe(self) -> str:
        if self.is_real:
            return f"real nsqd at {self.binary}"
        return "NSQ protocol double (tests/support/nsqd_double/); set NSQD_BIN to test a real nsqd"

    # Process control.

    def command(self) -> list[str]:
        flags = [f"--tcp-address={self.host}:{self.tcp_port}", f"--http-address={self.host}:{self.http_port}",
                 f"--data-path={self.data_path}", f"--broadcast-address={self.host}", *self.extra_args]
        if self.is_real:
            assert self.binary is not None
            return [*self.wrap, self.binary, *flags]
        return [*self.wrap, sys.executable, "-m", "tests.support.nsqd_double", *flags]

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 30.0) -> None:
        """Start nsqd and wait until ``/ping`` answers; on the same ports as before, if any."""
        if self.running:
            raise RuntimeError("nsqd is already running")
        offset = self.log_path.stat().st_size
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        env["PYTHONUNBUFFERED"] = "1"
        with open(self.log_path, "ab") as log:
            log.write(f"--- starting: {' '.join(self.command())}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(self.command(), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        ports: dict[str, int] = {}
        while len(ports) < 2:
            self._check_alive("exited before listening")
            ports = {m.group(1): int(m.group(3)) for m in _LISTENING.finditer(self.log(offset))}
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"{self.describe()} did not listen within {timeout}s:\n{self.log()}")
            time.sleep(0.02)
        self.tcp_port, self.http_port = ports["TCP"], ports["HTTP"]
        while not self.ping():
            self._check_alive("exited before answering /ping")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"{self.describe()} did not answer /ping within {timeout}s:\n{self.log()}")
            time.sleep(0.02)

    def _check_alive(self, what: str) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"{self.describe()} {what} (exit {self.proc.returncode}):\n{self.log()}")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (nsqd flushes durable messages to disk and exits), then SIGKILL after ``timeout``."""
        if not self.running:
            return
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        """SIGKILL: a crash. Messages still in memory are lost, as with nsqd."""
        if not self.running:
            return
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        """Stop and remove the data directory (the log file stays for post-mortems)."""
        self.stop()
        shutil.rmtree(self.data_path, ignore_errors=True)

    def log(self, offset: int = 0) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    # HTTP API.

    def request(self, method: str, path: str, params: dict[str, str] | None = None, body: bytes | None = None,
                timeout: float = 10.0) -> bytes:
        url = f"http://{self.http_address}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        req = urllib.request.Request(url, data=body, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.read()  # type: ignore[no-any-return]
        except urllib.error.HTTPError as err:
            raw = err.read()
            try:
                message = json.loads(raw)["message"]
            except (ValueError, KeyError, TypeError):
                message = raw.decode(errors="replace")
            raise NsqdHTTPError(err.code, message) from None

    def ping(self) -> bool:
        try:
            return self.request("GET", "/ping", timeout=2) == b"OK"
        except (OSError, NsqdHTTPError):
            return False

    def pub(self, topic: str, body: bytes, defer_ms: int | None = None) -> None:
        params = {"topic": topic}
        if defer_ms is not None:
            params["defer"] = str(defer_ms)
        self.request("POST", "/pub", params, body)

    def mpub(self, topic: str, bodies: Iterable[bytes], binary: bool = False) -> None:
        """``/mpub``: newline-separated bodies, or nsqd's binary framing when ``binary``."""
        bodies = list(bodies)
        if binary:
            payload = len(bodies).to_bytes(4, "big") + b"".join(len(b).to_bytes(4, "big") + b for b in bodies)
            self.request("POST", "/mpub", {"topic": topic, "binary": "true"}, payload)
        else:
            if any(b"\n" in b for b in bodies):
                raise ValueError("a text-mode /mpub body cannot contain a newline; use binary=True")
            self.request("POST", "/mpub", {"topic": topic}, b"\n".join(bodies))

    def stats(self, topic: str | None = None, channel: str | None = None) -> dict[str, Any]:
        params = {"format": "json"}
        if topic:
            params["topic"] = topic
        if channel:
            params["channel"] = channel
        return json.loads(self.request("GET", "/stats", params))  # type: ignore[no-any-return]

    def topic_stats(self, topic: str) -> dict[str, Any] | None:
        """The /stats entry for ``topic``, or None if nsqd has no such topic."""
        return next((t for t in self.stats(topic)["topics"] or () if t["topic_name"] == topic), None)

    def channel_stats(self, topic: str, channel: str) -> dict[str, Any] | None:
        found = self.topic_stats(topic)
        if found is None:
            return None
        return next((c for c in found["channels"] if c["channel_name"] == channel), None)
