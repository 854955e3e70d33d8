"""Cohorts: one fetch per distinct secret when a per-user key changes.

When a key of a per-user entity is delivered, the hub hands it to
:class:`Cohorts` instead of asking each subscriber to refresh on its own.
The subscribers are grouped by their secret (a user with five tabs is one
group); each group's key is fetched once, with that secret, its frames are
encoded once, and every member gets them through its own writer, exactly
like a shared fetch (:mod:`entitysync_sync.fanout`), so a slow member still
delays only itself.

A member is identified with the secret *and* the secret's generation it had
when the group was formed: a member whose secret changed meanwhile is not
handed the group's frames (its secret change refreshes it instead), so a
cohort never hands one user's rows to another. Secrets that cannot be
hashed are never grouped.

Notifications that arrive during a key's refresh queue exactly one more
refresh, as for shared fetches, so the last frames every subscriber gets
reflect state read after the last notification.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Hashable, Protocol

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

    def __init__(self, handlers: CohortHandlers, tasks: Tasks, envelope: bool = True) -> None:
        self._handlers = handlers
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
        self._tasks.spawn(self._run, key, hub)

    def _run(self, key: EntityKey, hub: Hub) -> None:
        try:
            while True:
                self._refresh(key, hub)
                with self._lock:
                    if not self._running[key]:
                        del self._running[key]
                        return
                    self._running[key] = False
        except BaseException:
            with self._lock:
                self._running.pop(key, None)
            raise

    def _refresh(self, key: EntityKey, hub: Hub) -> None:
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
        if len(todo) == 1:
            self._fetch_group(key, todo[0])
            return
        # Groups fetch side by side, as each subscriber's refresh did: a slow query for one
        # user does not hold up the others.
        done = threading.Event()
        left = [len(todo)]
        lock = threading.Lock()

        def one(group: _Group) -> None:
            try:
                self._fetch_group(key, group)
            finally:
                with lock:
                    left[0] -= 1
                    if not left[0]:
                        done.set()

        for group in todo:
            self._tasks.spawn(one, group)
        done.wait()

    def _fetch_group(self, key: EntityKey, group: _Group) -> None:
        try:
            result = self._handlers.fetch(key, group.secret)
        except Exception as exc:
            # Logged once for the whole refresh; each member counts it quietly and retries.
            self._failures.failed(key, exc, _no_retry)
            for conn, generation in group.members:
                conn.cohort_failed(key, exc, generation)
            return
        self._failures.forget(key)
        shared = encode_shared(key, result, self._envelope)
        for conn, generation in group.members:
            conn.push_cohort(shared, generation)


def encode_shared(key: EntityKey, result: p.FetchResult, envelope: bool) -> SharedFrames:
    """The frames of one fetch result, encoded once for every member of a cohort."""
    version = p.result_version(result) if envelope else None
    texts = p.encode_result(key, result, envelope, version)
    frames = tuple(EncodedFrame.of(t) for t in texts)
    return SharedFrames(key, frames, sum(map(len, texts)), None, version, personal=True)


def _no_retry(key: EntityKey) -> None:
    """Members retry on their own."""
