"""Which bus a URL names: the one registry of bus schemes.

The extension, :class:`~entitysync_sync.Publisher` and the CLI all build
buses here. A new backend is one module with a :class:`BufferedBus`
subclass, plus one line in :data:`SCHEMES`.
"""

from __future__ import annotations

import importlib
from urllib.parse import urlsplit

from ..exceptions import ConfigError
from .buffered import BufferedBus

#: URL scheme → ``module:class`` of its bus; imported only when used, so a
#: missing optional dependency matters only to those who use that bus.
SCHEMES: dict[str, str] = {
    "memory": "entitysync_sync.bus.memory:MemoryBus",
    "redis": "entitysync_sync.bus.redis:RedisBus",
    "rediss": "entitysync_sync.bus.redis:RedisBus",
    "redis+cluster": "entitysync_sync.bus.redis_cluster:RedisClusterBus",
    "nsq": "entitysync_sync.bus.nsq:NsqBus",
    "postgresql": "entitysync_sync.bus.postgres:PostgresBus",
    "postgres": "entitysync_sync.bus.postgres:PostgresBus",
}


def bus_class(url: str) -> type[BufferedBus]:
    """The class of the bus ``url`` names; :class:`ConfigError` for an unknown scheme."""
    if not isinstance(url, str):
        raise ConfigError(f"ENTITYSYNC_BUS_URL must be a string, got {type(url).__name__}")
    scheme = urlsplit(url).scheme
    target = SCHEMES.get(scheme)
    if target is None:
        shown = scheme + "://" if scheme else "(no scheme)"
        raise ConfigError(
            f"ENTITYSYNC_BUS_URL {shown}: unsupported bus; use one of "
            + ", ".join(f"{name}://" for name in SCHEMES)
        )
    module, _, name = target.partition(":")
    cls: type[BufferedBus] = getattr(importlib.import_module(module), name)
    return cls


def bus_from_url(url: str, *, buffer_size: int = 10_000, topic_prefix: str = "") -> BufferedBus:
    """Build the bus that ``ENTITYSYNC_BUS_URL`` names.

    * ``memory://`` (this app only) and ``memory://NAME`` (shared by the apps
      of this process that use the same name);
    * ``redis://host:6379/0`` and ``rediss://...``, with the ``redis`` extra;
    * ``redis+cluster://h1:7000,h2:7001/`` (a Redis Cluster, sharded pub/sub), likewise;
    * ``nsq://host:4150``, ``nsq://h1:4150,h2:4150`` and
      ``nsq://?lookupd=http://host:4161``, with the ``nsq`` extra;
    * ``postgresql://user@host:5432/db`` (or ``postgres://``), with the ``postgres`` extra.

    Errors never repeat the URL's credentials.
    """
    return bus_class(url).from_url(url, topic_prefix=topic_prefix, buffer_size=buffer_size)
