"""The ``ENTITYSYNC_*`` configuration keys, their defaults and their checks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, MutableMapping

from .exceptions import ConfigError
from .keys import check_topic_prefix

#: Every configuration key with its default; documented in the README.
DEFAULTS: dict[str, Any] = {
    "ENTITYSYNC_PATH": "/ws/entity-sync/",
    "ENTITYSYNC_BUS_URL": "memory://",
    "ENTITYSYNC_PUSH_ON_SUBSCRIBE": True,
    "ENTITYSYNC_ENVELOPE": True,
    "ENTITYSYNC_MAX_SUBSCRIPTIONS": 1000,
    "ENTITYSYNC_MAX_MESSAGE_BYTES": 4096,
    "ENTITYSYNC_OUTBOX_LIMIT": 1 << 20,
    "ENTITYSYNC_SEND_TIMEOUT": 10.0,
    "ENTITYSYNC_COMPRESSION": False,
    "ENTITYSYNC_PUBLISH_BUFFER": 10_000,
    "ENTITYSYNC_TOPIC_PREFIX": "",
    "ENTITYSYNC_ALLOWED_ORIGINS": None,
    "ENTITYSYNC_PING_INTERVAL": 25.0,
    "ENTITYSYNC_FETCH_TIMEOUT": 10.0,
    "ENTITYSYNC_FETCH_RETRY_MAX": 30.0,
    "ENTITYSYNC_RATE_LIMIT": 200.0,
    "ENTITYSYNC_RATE_BURST": 2000,
    "ENTITYSYNC_SHARED_CACHE_SIZE": 64 << 20,
    "ENTITYSYNC_BATCH_SIZE": 500,
    "ENTITYSYNC_DRAIN_SECONDS": 10.0,
}


@dataclass(frozen=True)
class Settings:
    """The checked configuration of one app."""

    path: str
    bus_url: str
    push_on_subscribe: bool
    envelope: bool
    max_subscriptions: int
    max_message_bytes: int
    outbox_limit: int
    send_timeout: float
    compression: bool
    publish_buffer: int
    topic_prefix: str
    allowed_origins: frozenset[str] | None
    ping_interval: float
    fetch_timeout: float
    fetch_retry_max: float
    rate_limit: float
    rate_burst: int
    shared_cache_size: int
    batch_size: int
    drain_seconds: float


def _bool(config: MutableMapping[str, Any], key: str) -> bool:
    value = config[key]
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be True or False, got {value!r}")
    return value


def _positive_int(config: MutableMapping[str, Any], key: str) -> int:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key} must be a positive integer, got {value!r}")
    return value


def _positive_number(config: MutableMapping[str, Any], key: str) -> float:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"{key} must be a positive number of seconds, got {value!r}")
    return float(value)


def _seconds_or_off(config: MutableMapping[str, Any], key: str) -> float:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ConfigError(f"{key} must be a number of seconds, or 0 to turn it off, got {value!r}")
    return float(value)


def _rate(config: MutableMapping[str, Any], key: str) -> float:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ConfigError(f"{key} must be a number of frames per second, or 0 to turn it off, got {value!r}")
    return float(value)


def _size_or_off(config: MutableMapping[str, Any], key: str) -> int:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{key} must be a number of characters, or 0 to turn it off, got {value!r}")
    return value


def _origins(config: MutableMapping[str, Any], key: str) -> frozenset[str] | None:
    value = config[key]
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple, set, frozenset)) or not all(isinstance(v, str) for v in value):
        raise ConfigError(
            f"{key} must be None (same origin only), '*' or a list of origins such as "
            f"['https://app.example.com'], got {value!r}"
        )
    return frozenset(v.rstrip("/").lower() for v in value)


def load_settings(config: MutableMapping[str, Any]) -> Settings:
    """Fill in defaults with ``config.setdefault`` and check every value."""
    for key, default in DEFAULTS.items():
        config.setdefault(key, default)
    path = config["ENTITYSYNC_PATH"]
    if not isinstance(path, str) or not path.startswith("/"):
        raise ConfigError(f"ENTITYSYNC_PATH must be a URL path starting with '/', got {path!r}")
    bus_url = config["ENTITYSYNC_BUS_URL"]
    if not isinstance(bus_url, str):
        raise ConfigError("ENTITYSYNC_BUS_URL must be a string such as 'memory://'")
    return Settings(
        path=path,
        bus_url=bus_url,
        push_on_subscribe=_bool(config, "ENTITYSYNC_PUSH_ON_SUBSCRIBE"),
        envelope=_bool(config, "ENTITYSYNC_ENVELOPE"),
        max_subscriptions=_positive_int(config, "ENTITYSYNC_MAX_SUBSCRIPTIONS"),
        max_message_bytes=_positive_int(config, "ENTITYSYNC_MAX_MESSAGE_BYTES"),
        outbox_limit=_positive_int(config, "ENTITYSYNC_OUTBOX_LIMIT"),
        send_timeout=_positive_number(config, "ENTITYSYNC_SEND_TIMEOUT"),
        compression=_bool(config, "ENTITYSYNC_COMPRESSION"),
        publish_buffer=_positive_int(config, "ENTITYSYNC_PUBLISH_BUFFER"),
        topic_prefix=check_topic_prefix(config["ENTITYSYNC_TOPIC_PREFIX"]),
        allowed_origins=_origins(config, "ENTITYSYNC_ALLOWED_ORIGINS"),
        ping_interval=_seconds_or_off(config, "ENTITYSYNC_PING_INTERVAL"),
        fetch_timeout=_seconds_or_off(config, "ENTITYSYNC_FETCH_TIMEOUT"),
        fetch_retry_max=_seconds_or_off(config, "ENTITYSYNC_FETCH_RETRY_MAX"),
        rate_limit=_rate(config, "ENTITYSYNC_RATE_LIMIT"),
        rate_burst=_positive_int(config, "ENTITYSYNC_RATE_BURST"),
        shared_cache_size=_size_or_off(config, "ENTITYSYNC_SHARED_CACHE_SIZE"),
        batch_size=_positive_int(config, "ENTITYSYNC_BATCH_SIZE"),
        drain_seconds=_seconds_or_off(config, "ENTITYSYNC_DRAIN_SECONDS"),
    )
