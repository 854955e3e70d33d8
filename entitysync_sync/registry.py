"""What an app registered: its entities and callbacks, and how the package runs them.

:class:`Registry` holds the fetch callback of each entity and the optional
``authorize``, ``identify`` and ``on_message`` callbacks, as the decorators
of :class:`~entitysync_sync.EntitySync` record them. :class:`AppHandlers`
runs them for the rest of the package, which never touches a callback
directly: every call gets a fresh application context, and a fetch gets
the fetch timeout, its metrics and the encoding of its rows.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Callable

from flask import Flask
from flask.json.provider import DefaultJSONProvider

from .concurrency import call_with_timeout
from .exceptions import BatchFetchError, ConfigError, FetchTimeoutError
from .keys import EntityKey, validate_entity
from .metrics import Metrics
from .protocol import FetchResult

FetchFn = Callable[[EntityKey, Any], Any]


@dataclass(frozen=True)
class Entity:
    """A registered entity: its name, its fetch and whether its rows are the same for everyone."""

    name: str
    fetch: FetchFn
    shared: bool = False
    #: ``fetch(key, secrets) -> results``: one result per secret, in order.
    batch: bool = False


class Registry:
    """The entities and callbacks of one :class:`~entitysync_sync.EntitySync`."""

    def __init__(self) -> None:
        self.entities: dict[str, Entity] = {}
        self.authorize: Callable[[EntityKey, Any], bool] | None = None
        self.identify: Callable[[], Any] | None = None
        self.on_message: Callable[[Any, str], None] | None = None
        #: Called with the name of each entity added, e.g. to subscribe a running bus to it.
        self.listeners: list[Callable[[str], None]] = []

    def add_entity(self, name: str, fetch: FetchFn, shared: bool = False, batch: bool = False) -> None:
        """Register ``fetch`` for ``name``; :class:`ConfigError` if it is registered already."""
        validate_entity(name)
        if name in self.entities:
            raise ConfigError(f"entity {name!r} is already registered")
        if shared and batch:
            raise ConfigError(f"entity {name!r}: a shared entity is fetched once for everyone; drop batch=True")
        self.entities[name] = Entity(name, fetch, shared, batch)
        for listener in list(self.listeners):
            listener(name)

    @property
    def names(self) -> frozenset[str]:
        """Names of the registered entities."""
        return frozenset(self.entities)


class AppHandlers:
    """Runs the registry's callbacks inside ``app``: for connections (``Handlers``) and shared fetches.

    :param fetch_timeout: seconds a fetch may take (0: no limit).
    """

    def __init__(self, registry: Registry, app: Flask, fetch_timeout: float, metrics: Metrics) -> None:
        self._registry = registry
        self._app = app
        self._fetch_timeout = fetch_timeout
        self._metrics = metrics

    def has_entity(self, entity: str) -> bool:
        return entity in self._registry.entities

    def is_shared(self, entity: str) -> bool:
        found = self._registry.entities.get(entity)
        return found is not None and found.shared

    def is_batch(self, entity: str) -> bool:
        found = self._registry.entities.get(entity)
        return found is not None and found.batch

    def authorize(self, key: EntityKey, secret: Any) -> bool:
        fn = self._registry.authorize
        if fn is None:
            return True
        with self._app.app_context():
            return bool(fn(key, secret))

    def pass_through(self, secret: Any, raw: str) -> bool:
        fn = self._registry.on_message
        if fn is None:
            return False
        with self._app.app_context():
            fn(secret, raw)
        return True

    def fetch(self, key: EntityKey, secret: Any) -> FetchResult:
        """The row (``str``) or set of rows (``list``) of ``key`` for ``secret`` as JSON
        texts, or None; raises what the fetch raised."""
        started = time.monotonic()
        try:
            result = call_with_timeout(self._fetch_timeout, self._timed_out, self._fetch, key, secret)
        except Exception:
            self._metrics.fetch_failed(started)
            raise
        self._metrics.fetched(key, started, None if result is None else 1)
        return result

    def fetch_batch(self, key: EntityKey, secrets: list[Any]) -> list[FetchResult]:
        """One call of a batch entity's fetch for ``secrets``: one result per secret, in order.

        Raises what the fetch raised, or :class:`BatchFetchError` when it did
        not return one result per secret.
        """
        started = time.monotonic()
        try:
            results = call_with_timeout(self._fetch_timeout, self._timed_out, self._fetch_batch, key, secrets)
        except Exception:
            self._metrics.fetch_failed(started)
            raise
        gones = results.count(None)
        self._metrics.fetched(key, started, len(results) - gones)
        if gones:
            self._metrics.count("gones", gones)
        return results

    def _fetch_batch(self, key: EntityKey, secrets: list[Any]) -> list[FetchResult]:
        entity = self._registry.entities[key.entity]
        with self._app.app_context():
            results = entity.fetch(key, list(secrets))
            if isinstance(results, (str, bytes, dict)) or not isinstance(results, Iterable):
                raise BatchFetchError(
                    f"the batch fetch of {key.entity!r} returned a {type(results).__name__}, "
                    f"not a sequence of one result per secret")
            results = list(results)
            if len(results) != len(secrets):
                raise BatchFetchError(
                    f"the batch fetch of {key.entity!r} returned {len(results)} results "
                    f"for {len(secrets)} secrets")
            return [self._encode_result(result) for result in results]

    def _timed_out(self) -> FetchTimeoutError:
        return FetchTimeoutError(f"timed out after {self._fetch_timeout:g}s (ENTITYSYNC_FETCH_TIMEOUT)")

    def _fetch(self, key: EntityKey, secret: Any) -> FetchResult:
        entity = self._registry.entities[key.entity]
        if entity.batch:
            return self._fetch_batch(key, [secret])[0]
        if entity.shared:
            secret = None  # a shared fetch must not depend on whoever subscribed first
        with self._app.app_context():
            return self._encode_result(entity.fetch(key, secret))

    def _encode_result(self, result: Any) -> FetchResult:
        if result is None:
            return None
        # A list, a tuple or an iterator is a set of rows, sent whole; anything else is one row.
        if isinstance(result, (list, tuple)) or (
            not isinstance(result, dict) and isinstance(result, Iterator)
        ):
            return [self._encode(row) for row in result]
        return self._encode(result)

    def _encode(self, row: Any) -> str:
        if isinstance(row, str):
            return row
        if isinstance(row, (bytes, bytearray)):
            return bytes(row).decode("utf-8")
        provider = self._app.json
        if type(provider).dumps is DefaultJSONProvider.dumps:
            # Compact, like the envelope around it. Another provider (orjson, say)
            # may not take json.dumps's arguments, and keeps its own format.
            return provider.dumps(row, separators=(",", ":"))
        return provider.dumps(row)
