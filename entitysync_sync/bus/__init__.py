"""Buses that carry notifications between servers, chosen by URL."""

from __future__ import annotations

from urllib.parse import urlsplit

from ..exceptions import ConfigError
from .base import Bus as Bus
from .base import BusSink as BusSink
from .base import KeyBuffer as KeyBuffer
from .broker import BrokerBus as BrokerBus
from .memory import MemoryBus as MemoryBus

SCHEMES = ("memory", "redis", "rediss", "nsq")


def bus_from_url(url: str, *, buffer_size: int = 10_000, topic_prefix: str = "") -> Bus:
    """Build the bus that ``ENTITYSYNC_BUS_URL`` names.

    * ``memory://`` (this app only) and ``memory://NAME`` (shared by the apps
      of this process that use the same name);
    * ``redis://host:6379/0`` and ``rediss://...``, with the ``redis`` extra;
    * ``nsq://host:4150``, ``nsq://h1:4150,h2:4150`` and
      ``nsq://?lookupd=http://host:4161``, with the ``nsq`` extra.

    Errors never repeat the URL's credentials.
    """
    if not isinstance(url, str):
        raise ConfigError(f"ENTITYSYNC_BUS_URL must be a string, got {type(url).__name__}")
    scheme = urlsplit(url).scheme
    if scheme == "memory":
        parts = urlsplit(url)
        return MemoryBus(parts.netloc + parts.path.strip("/") or None, buffer_size=buffer_size)
    if scheme in ("redis", "rediss"):
        from .redis import RedisBus

        return RedisBus(url, topic_prefix=topic_prefix, buffer_size=buffer_size)
    if scheme == "nsq":
        from .nsq import NsqBus

        return NsqBus.from_url(url, topic_prefix=topic_prefix, buffer_size=buffer_size)
    shown = scheme + "://" if scheme else "(no scheme)"
    raise ConfigError(
        f"ENTITYSYNC_BUS_URL {shown}: unsupported bus; use one of "
        + ", ".join(f"{name}://" for name in SCHEMES)
    )
