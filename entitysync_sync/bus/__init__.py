"""Buses that carry notifications between servers, chosen by URL."""

from __future__ import annotations

from urllib.parse import urlsplit

from ..exceptions import ConfigError
from .base import Bus as Bus
from .base import BusSink as BusSink
from .base import KeyBuffer as KeyBuffer
from .memory import MemoryBus as MemoryBus


def bus_from_url(url: str, *, buffer_size: int = 10_000) -> Bus:
    """Build the bus that ``ENTITYSYNC_BUS_URL`` names.

    Supported: ``memory://`` (this app only) and ``memory://NAME`` (shared
    by the apps of this process that use the same name).
    """
    if not isinstance(url, str):
        raise ConfigError(f"ENTITYSYNC_BUS_URL must be a string, got {type(url).__name__}")
    parts = urlsplit(url)
    if parts.scheme == "memory":
        return MemoryBus(parts.netloc + parts.path.strip("/") or None, buffer_size=buffer_size)
    raise ConfigError(
        f"ENTITYSYNC_BUS_URL {parts.scheme + '://' if parts.scheme else url!r}: "
        "unsupported bus; use memory://"
    )
