"""What a server's worker process uses, read from outside it: CPU time and resident memory.

Every figure the benchmarks print about server cost comes from these two
functions, applied to the gunicorn worker's pid (never the arbiter's, which
only supervises and takes no part in serving).

CPU time is the worker's process CPU clock (``clock_getcpuclockid(3)`` on the
worker's pid, read with ``clock_gettime``): the kernel's on-CPU time of the
whole thread group, user plus system, in nanoseconds, counting threads that
have already exited. It is what ``getrusage(RUSAGE_SELF)`` would say inside
the worker. The two readings it replaces each lost something: utime+stime
from ``/proc/PID/stat`` counts in 10 ms clock ticks, which is 10 % or more of
a small fan-out's total, and the sum over ``/proc/PID/task/*/schedstat``
leaves out any thread that ended between two readings, so that thread's
time vanishes from the delta (and the delta can even come out negative).
"""

from __future__ import annotations

import ctypes
import os
import time
from pathlib import Path

_libc = ctypes.CDLL(None, use_errno=True)


def cpu_seconds(pid: int) -> float:
    """On-CPU time, user plus system, of every thread process ``pid`` has run, in seconds."""
    clock = ctypes.c_int()
    error = _libc.clock_getcpuclockid(pid, ctypes.byref(clock))
    if error:
        raise OSError(error, f"clock_getcpuclockid({pid}): {os.strerror(error)}")
    return time.clock_gettime(clock.value)


def rss_kb(pid: int) -> int:
    """The process's resident set size in KiB (``VmRSS`` of ``/proc/PID/status``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")
