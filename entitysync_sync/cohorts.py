"""Cohorts: one fetch per distinct secret when a per-user key changes.

When a key of a per-user entity is delivered, the hub hands it to
:class:`Cohorts` instead of asking each subscriber to refresh on its own.
The subscribers are grouped by their secret (a user with five tabs is one
group); each group's key is fetched once, with that secret, its frames are
encoded once, and every member gets them through its own writer, exactly
like a shared fetch (:mod:`entitysync_sync.fanout`), so a slow member still
delays only itself. A subscriber alone with its secret is asked to refresh
on its own instead, as without cohorts: its connection's worker fetches,
which costs less than a group of one.

A member is identified with the secret *and* the secret's generation it had
when the group was formed: a member whose secret changed meanwhile is not
handed the group's frames (its secret change refreshes it instead), so a
cohort never hands one user's rows to another. Secrets that cannot be
hashed are never grouped.

An entity registered with ``batch=True`` is fetched with one call per
``batch_size`` distinct secrets instead of one call per secret; a call that
fails, or returns the wrong number of results, fails for every subscriber in
it.

Notifications that arrive during a key's refresh queue exactly one more
refresh, as for shared fetches, so the last frames every subscriber gets
reflect state read after the last notification.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Hashable, Protocol

from . import protocol as p
from .concurrency import Tasks
from .failures import FetchFailures
from .frames import EncodedFrame, SharedFrames
from .hub import Hub, Subscriber
from .keys import EntityKey

log = logging.getLogger("entitysync_sync")


class CohortHandlers(Protocol):
    """What cohorts need from the application (implemented by the extension)."""

    def fetch(self, key: EntityKey, secret: Any) -> p.FetchResult:
        """The row or rows of ``key`` for ``secret`` as JSON texts, or ``None``."""

    def is_batch(self, entity: str) -> bool:
        """Whether ``entity`` was registered with ``batch=True``."""

    def fetch_batch(self, key: EntityKey, secrets: list[Any]) -> list[p.FetchResult]:
        """One call of a batch fetch: one result per secret, in order."""


class _Group:
    """Subscribers of one key holding equal secrets: one fetch for all of them."""

    __slots__ = ("members", "secret")

    def __init__(self, secret: Any) -> None:
        self.secret = secret
        #: Each member with the generation of its secret when the group was formed.
        self.members: list[tuple[Subscriber, int]] = []


def _identity(secret: Any) -> Hashable | None:
    """What makes two secrets equal for grouping; None when the secret cannot be grouped."""
    try:
        hash(secret)
    except TypeError:
        return None
    return (type(secret), secret)


class Cohorts:
    """Refreshes per-user keys with one fetch per distinct secret among their local subscribers."""

    def __init__(self, handlers: CohortHandlers, tasks: Tasks, envelope: bool = True,
                 batch_size: int = 500) -> None:
        self._handlers = handlers
        self._batch_size = batch_size
        self._tasks = tasks
        self._envelope = envelope
        self._lock = threading.Lock()
        #: Keys being refreshed → whether another notification arrived meanwhile.
        self._running: dict[EntityKey, bool] = {}
        #: Only for logging: the first failure of a run is an error, later ones debug.
        self._failures = FetchFailures(0.0, tasks)

    def request(self, key: EntityKey, hub: Hub) -> None:
        """``key`` changed: refresh it for its subscribers in ``hub``; only queues work."""
        with self._lock:
            if key in self._running:
                self._running[key] = True
                return
            self._running[key] = False
        self._rounds(key, hub)

    def _rounds(self, key: EntityKey, hub: Hub) -> None:
        """Group the subscribers; a fetch for the groups goes to a task, the rest is queued here."""
        while True:
            todo = self._group(key, hub)
            if todo:
                self._tasks.spawn(self._run, key, hub, todo)
                return
            if self._done(key):
                return

    def _done(self, key: EntityKey) -> bool:
        """End the key's refresh, unless a notification asked for another meanwhile."""
        with self._lock:
            if not self._running[key]:
                del self._running[key]
                return True
            self._running[key] = False
            return False

    def _run(self, key: EntityKey, hub: Hub, todo: list[_Group]) -> None:
        try:
            self._fetch(key, todo)
        except BaseException:
            with self._lock:
                self._running.pop(key, None)
            raise
        if not self._done(key):
            self._rounds(key, hub)

    def _group(self, key: EntityKey, hub: Hub) -> list[_Group]:
        """The groups to fetch together. A subscriber alone with its secret refreshes on its
        own instead (its connection's worker fetches), unless the entity fetches in batches."""
        groups: dict[Hashable, _Group] = {}
        alone: list[_Group] = []
        for conn in hub.subscribers(key):
            member = conn.cohort_member()
            if member is None:
                continue  # closed meanwhile
            secret, generation = member
            identity = _identity(secret)
            group = groups.get(identity) if identity is not None else None
            if group is None:
                group = _Group(secret)
                if identity is None:
                    alone.append(group)
                else:
                    groups[identity] = group
            group.members.append((conn, generation))
        todo = [*groups.values(), *alone]
        if self._handlers.is_batch(key.entity):
            return todo
        together = []
        for group in todo:
            if len(group.members) > 1:
                together.append(group)
            else:
                group.members[0][0].request_refresh(key)
        return together

    def _fetch(self, key: EntityKey, todo: list[_Group]) -> None:
        if self._handlers.is_batch(key.entity):
            size = self._batch_size
            chunks = [todo[i : i + size] for i in range(0, len(todo), size)]
            self._side_by_side(lambda chunk: self._fetch_chunk(key, chunk), chunks)
        else:
            self._side_by_side(lambda group: self._fetch_group(key, group), todo)

    def _side_by_side(self, fn: Callable[[Any], None], units: list[Any]) -> None:
        """Run ``fn`` on every unit at once and wait for all of them, as each subscriber's
        refresh ran on its own: a slow query for one user does not hold up the others."""
        if len(units) == 1:
            fn(units[0])
            return
        done = threading.Event()
        left = [len(units)]
        lock = threading.Lock()

        def one(unit: Any) -> None:
            try:
                fn(unit)
            finally:
                with lock:
                    left[0] -= 1
                    if not left[0]:
                        done.set()

        for unit in units:
            self._tasks.spawn(one, unit)
        done.wait()

    def _fetch_chunk(self, key: EntityKey, chunk: list[_Group]) -> None:
        try:
            results = self._handlers.fetch_batch(key, [group.secret for group in chunk])
        except Exception as exc:
            self._failed(key, exc, chunk)
            return
        self._failures.forget(key)
        for group, result in zip(chunk, results, strict=True):
            self._deliver(key, group, result)

    def _fetch_group(self, key: EntityKey, group: _Group) -> None:
        try:
            result = self._handlers.fetch(key, group.secret)
        except Exception as exc:
            self._failed(key, exc, [group])
            return
        self._failures.forget(key)
        self._deliver(key, group, result)

    def _deliver(self, key: EntityKey, group: _Group, result: p.FetchResult) -> None:
        shared = encode_shared(key, result, self._envelope)
        for conn, generation in group.members:
            conn.push_cohort(shared, generation)

    def _failed(self, key: EntityKey, exc: Exception, groups: list[_Group]) -> None:
        """Logged once for the whole call; each member hears of it, counts it quietly and retries."""
        self._failures.failed(key, exc, _no_retry)
        for group in groups:
            for conn, generation in group.members:
                conn.cohort_failed(key, exc, generation)


def encode_shared(key: EntityKey, result: p.FetchResult, envelope: bool) -> SharedFrames:
    """The frames of one fetch result, encoded once for every member of a cohort."""
    version = p.result_version(result) if envelope else None
    texts = p.encode_result(key, result, envelope, version)
    frames = tuple(EncodedFrame.of(t) for t in texts)
    return SharedFrames(key, frames, sum(map(len, texts)), None, version, personal=True)


def _no_retry(key: EntityKey) -> None:
    """Members retry on their own."""
