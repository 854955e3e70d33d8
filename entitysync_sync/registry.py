"""What an app registered: its entities and callbacks, and how the package runs them.

:class:`Registry` holds the fetch callback of each entity and the optional
``authorize``, ``identify`` and ``on_message`` callbacks, as the decorators
of :class:`~entitysync_sync.EntitySync` record them. :class:`AppHandlers`
runs them for the rest of the package, which never touches a callback
directly: ``authorize`` and ``on_message`` get a fresh application context
per call; fetches run through a :class:`FetchRun`, which gives each one the
fetch timeout, its metrics and the encoding of its rows, and fetches made
one after another one application context that each call sees as fresh.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Callable

from flask import Flask
from flask.json.provider import DefaultJSONProvider
from flask.signals import appcontext_tearing_down

from .concurrency import Deadlines
from .exceptions import BatchFetchError, ConfigError, FetchTimeoutError
from .keys import EntityKey, validate_entity
from .metrics import FetchTally, Metrics
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
        self._encoders: tuple[Any, bool, bool, json.JSONEncoder] | None = None

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
        with FetchRun(self) as run:
            return run.fetch(key, secret)

    def fetch_batch(self, key: EntityKey, secrets: list[Any]) -> list[FetchResult]:
        """One call of a batch entity's fetch for ``secrets``: one result per secret, in order.

        Raises what the fetch raised, or :class:`BatchFetchError` when it did
        not return one result per secret.
        """
        with FetchRun(self) as run:
            return run.fetch_batch(key, secrets)

    def run(self) -> FetchRun:
        """Fetches made one after another by the caller (see :class:`FetchRun`)."""
        return FetchRun(self)

    def _timed_out(self) -> FetchTimeoutError:
        return FetchTimeoutError(f"timed out after {self._fetch_timeout:g}s (ENTITYSYNC_FETCH_TIMEOUT)")

    def _encode_result(self, result: Any) -> FetchResult:
        if result is None:
            return None
        # A list, a tuple or an iterator is a set of rows, sent whole; anything else is one row.
        if isinstance(result, (list, tuple)) or (
            not isinstance(result, dict) and isinstance(result, Iterator)
        ):
            encode = self._encode
            return [encode(row) for row in result]
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
            return self._encoder(provider).encode(row)
        return provider.dumps(row)

    def _encoder(self, provider: Any) -> json.JSONEncoder:
        """What ``provider.dumps(row, separators=(",", ":"))`` runs, built once per set of settings."""
        cached = self._encoders
        if (cached is None or cached[0] is not provider.default or cached[1] != provider.ensure_ascii
                or cached[2] != provider.sort_keys):
            default, ensure_ascii, sort_keys = provider.default, provider.ensure_ascii, provider.sort_keys
            encoder = json.JSONEncoder(default=default, ensure_ascii=ensure_ascii, sort_keys=sort_keys,
                                       separators=(",", ":"))
            cached = self._encoders = (default, ensure_ascii, sort_keys, encoder)
        return cached[3]


class FetchRun:
    """Fetches made one after another, in one greenlet or thread.

    A refresh fetches a key for each distinct secret among its subscribers,
    and a notification often changes many keys. What a fetch pays for once
    per call elsewhere is paid here once per run: one application context,
    whose ``g`` is fresh for each call and whose ``teardown_appcontext``
    functions run after each call (so Flask-SQLAlchemy's session, say, is
    never shared by two secrets); one timer for the fetch timeout of every
    call (:class:`~entitysync_sync.concurrency.Deadlines`); and one lock
    round to record their metrics, when the run ends. Use it as a context
    manager, in the greenlet or thread that makes the calls.
    """

    def __init__(self, handlers: AppHandlers) -> None:
        self._handlers = handlers
        self._entities = handlers._registry.entities
        self._deadlines = Deadlines(handlers._fetch_timeout, handlers._timed_out)
        #: Whether the calls run here (gevent, or no timeout), not each in a thread of its own.
        self._here = self._deadlines.in_caller
        self._context: Any = None
        #: Whether a call ran in the context since its ``g`` was made, and what it raised.
        self._used = False
        self._raised: BaseException | None = None
        self._tally = FetchTally()

    def __enter__(self) -> FetchRun:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def fetch(self, key: EntityKey, secret: Any) -> FetchResult:
        """The row or set of rows of ``key`` for ``secret`` as JSON texts, or None;
        raises what the fetch raised, or :class:`FetchTimeoutError`."""
        entity = self._entities[key.entity]
        if entity.batch:
            return self.fetch_batch(key, [secret])[0]
        if entity.shared:
            secret = None  # a shared fetch must not depend on whoever subscribed first
        started = time.monotonic()
        try:
            result: FetchResult = self._deadlines.call(self._call, entity, key, secret, False)
        except Exception:
            self._tally.failed(started)
            raise
        self._tally.fetched(key, started, result)
        return result

    def fetch_batch(self, key: EntityKey, secrets: list[Any]) -> list[FetchResult]:
        """One call of a batch entity's fetch of ``key`` for ``secrets``: one result per secret, in order.

        Raises what the fetch raised, :class:`FetchTimeoutError`, or
        :class:`BatchFetchError` when it did not return one result per secret.
        """
        entity = self._entities[key.entity]
        started = time.monotonic()
        try:
            results: list[FetchResult] = self._deadlines.call(self._call, entity, key, secrets, True)
        except Exception:
            self._tally.failed(started)
            raise
        self._tally.fetched_batch(key, started, results)
        return results

    def _call(self, entity: Entity, key: EntityKey, arg: Any, batch: bool) -> Any:
        """The fetch's encoded result (``batch``: results) in the run's application context,
        pushed on the first call and made as if fresh for each later one; or in a context of
        its own when calls run in threads of their own (a fetch timeout without gevent)."""
        app, encode = self._handlers._app, self._handlers._encode_result
        if not self._here:
            with app.app_context():
                return self._results(entity, key, arg) if batch else encode(entity.fetch(key, arg))
        context = self._context
        if context is None:
            context = self._context = app.app_context()
            context.push()
        elif self._used:
            raised, self._raised = self._raised, None
            if app.teardown_appcontext_funcs or appcontext_tearing_down.receivers:
                app.do_teardown_appcontext(raised)  # what popping the previous call's context would run
            context.g = app.app_ctx_globals_class()
        self._used = True
        try:
            return self._results(entity, key, arg) if batch else encode(entity.fetch(key, arg))
        except BaseException as exc:
            self._raised = exc
            raise

    def _results(self, entity: Entity, key: EntityKey, secrets: list[Any]) -> list[FetchResult]:
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
        encode = self._handlers._encode_result
        return [encode(result) for result in results]

    def close(self) -> None:
        """End the run: stop its timer, pop its context and record its metrics."""
        self._deadlines.close()
        context, self._context = self._context, None
        try:
            if context is not None:
                raised, self._raised = self._raised, None
                context.pop(raised)
        finally:
            self._tally.record(self._handlers._metrics)
