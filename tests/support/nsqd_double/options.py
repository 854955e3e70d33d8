"""nsqd's command-line flags, as the double reads them, and nsqd's log line."""

from __future__ import annotations

import argparse
import re
import socket
import sys
import time
from dataclasses import dataclass, field

DEFAULT_OUTPUT_BUFFER_SIZE = 16 * 1024
CLIENT_TIMEOUT = 60.0  # nsqd's ClientTimeout; the default heartbeat is half of it


def parse_duration(text: str) -> float:
    """A Go duration string (``60s``, ``1m30s``, ``250ms``, ``0``) in seconds."""
    units = {"ns": 1e-9, "us": 1e-6, "\u00b5s": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    text = text.strip()
    sign = -1.0 if text.startswith("-") else 1.0
    body = text.lstrip("+-")
    if body == "0":
        return 0.0
    parts = re.findall(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|\u00b5s|ms|s|m|h)", body)
    if not parts or "".join(n + u for n, u in parts) != body:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}")
    return sign * sum(float(n) * units[u] for n, u in parts)



@dataclass
class Options:
    tcp_address: str = "0.0.0.0:4150"
    http_address: str = "0.0.0.0:4151"
    broadcast_address: str = field(default_factory=socket.gethostname)
    data_path: str = ""
    mem_queue_size: int = 10000
    msg_timeout: float = 60.0
    max_msg_timeout: float = 15 * 60.0
    max_msg_size: int = 1024 * 1024
    max_body_size: int = 5 * 1024 * 1024
    max_req_timeout: float = 3600.0
    max_heartbeat_interval: float = 60.0
    max_rdy_count: int = 2500
    max_output_buffer_size: int = 64 * 1024
    max_output_buffer_timeout: float = 30.0
    min_output_buffer_timeout: float = 0.025
    output_buffer_timeout: float = 0.25
    max_channel_consumers: int = 0
    max_deflate_level: int = 6
    log_level: str = "info"
    log_prefix: str = "[nsqd] "


_DURATION_FLAGS = ("msg-timeout", "max-msg-timeout", "max-req-timeout", "max-heartbeat-interval",
                   "max-output-buffer-timeout", "min-output-buffer-timeout", "output-buffer-timeout")
_INT_FLAGS = ("mem-queue-size", "max-msg-size", "max-body-size", "max-rdy-count", "max-output-buffer-size",
              "max-channel-consumers", "max-deflate-level")
_STR_FLAGS = ("tcp-address", "http-address", "broadcast-address", "data-path", "log-level", "log-prefix")
# Real flags whose features the double lacks; accepted so one command line serves both.
_BOOL_FLAGS = ("deflate", "snappy", "statsd-mem-stats", "statsd-exclude-ephemeral", "verbose")


def parse_args(argv: list[str]) -> tuple[Options, list[str], bool]:
    # Go's flag package takes -flag and --flag alike.
    argv = ["-" + a if a.startswith("-") and not a.startswith("--") and len(a) > 2 else a for a in argv]
    parser = argparse.ArgumentParser(prog="python -m tests.support.nsqd_double", add_help=True)
    for name in _STR_FLAGS:
        parser.add_argument("--" + name)
    for name in _INT_FLAGS:
        parser.add_argument("--" + name, type=int)
    for name in _DURATION_FLAGS:
        parser.add_argument("--" + name, type=parse_duration)
    for name in _BOOL_FLAGS:
        parser.add_argument("--" + name, nargs="?", const="true")
    parser.add_argument("--version", action="store_true")
    args, unknown = parser.parse_known_args(argv)
    opts = Options()
    for name in (*_STR_FLAGS, *_INT_FLAGS, *_DURATION_FLAGS):
        value = getattr(args, name.replace("-", "_"))
        if value is not None:
            setattr(opts, name.replace("-", "_"), value)
    return opts, unknown, args.version



_LEVELS = {"debug": 1, "info": 2, "warn": 3, "warning": 3, "error": 4, "fatal": 5}
_LEVEL_NAMES = {1: "DEBUG", 2: "INFO", 3: "WARNING", 4: "ERROR", 5: "FATAL"}


class Logger:
    """nsqd's log line: ``PREFIX 2006/01/02 15:04:05.000000 LEVEL: message``, on stderr."""

    def __init__(self, prefix: str, level: str) -> None:
        self.prefix = prefix
        self.level = _LEVELS.get(level.lower(), 2)

    def __call__(self, level: int, text: str) -> None:
        if level < self.level:
            return
        now = time.time()
        stamp = time.strftime("%Y/%m/%d %H:%M:%S", time.localtime(now)) + f".{int(now % 1 * 1e6):06d}"
        sys.stderr.write(f"{self.prefix}{stamp} {_LEVEL_NAMES[level]}: {text}\n")
        sys.stderr.flush()


DEBUG, INFO, WARN, ERROR = 1, 2, 3, 4
