"""Cohorts: one fetch per distinct secret when a per-user key changes.

When a key of a per-user entity is delivered, the hub hands it to
:class:`Cohorts` instead of asking each subscriber to refresh on its own.
The subscribers are grouped by their secret (a user with five tabs is one
group, a user alone with its secret a group of one); each group's key is
fetched once, with that secret, its frames are encoded once (and once for
equal JSON texts of different groups), and every member gets them through
its own writer, exactly like a shared fetch (:mod:`entitysync_sync.fanout`),
so a slow member still delays only itself. The fetches of every changed key
wait in one queue, worked through by lanes (:mod:`entitysync_sync.lanes`).

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
from typing import Any, Hashable, Protocol

from . import protocol as p
from .concurrency import Tasks, light_lock
from .failures import FetchFailures
from .frames import EncodedFrame, SharedFrames
from .hub import Hub, Subscriber
from .keys import EntityKey
from .lanes import FetchRun, Lanes

log = logging.getLogger("entitysync_sync")


class CohortHandlers(Protocol):
    """What cohorts need from the application (implemented by the extension)."""

    def is_batch(self, entity: str) -> bool:
        """Whether ``entity`` was registered with ``batch=True``."""

    def run(self) -> FetchRun:
        """Fetches made one after another by the caller (see :class:`~entitysync_sync.registry.FetchRun`)."""


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
    """Refreshes per-user keys with one fetch per distinct secret among their local subscribers.

    A refresh of a key is a round: its subscribers are grouped, and each
    group (or, for a batch entity, each chunk of groups) is a unit of work
    in the queue of :class:`~entitysync_sync.lanes.Lanes`, shared by every
    key, so a notification of a thousand keys pays for a task, an
    application context and a fetch timer once, not once per subscriber,
    and a slow fetch for one user still holds up no one.
    """

    def __init__(self, handlers: CohortHandlers, tasks: Tasks, envelope: bool = True,
                 batch_size: int = 500, lanes: Lanes | None = None) -> None:
        self._handlers = handlers
        self._batch_size = batch_size
        self._envelope = envelope
        self._lanes = lanes if lanes is not None else Lanes(tasks, handlers.run)
        self._lock = light_lock()
        #: Keys being refreshed → whether another notification arrived meanwhile.
        self._running: dict[EntityKey, bool] = {}
        #: Rounds started so far (refreshes of a changed key for its subscribers).
        self._rounds = 0
        #: Only for logging: the first failure of a run is an error, later ones debug.
        self._failures = FetchFailures(0.0, tasks)

    def request(self, key: EntityKey, hub: Hub) -> None:
        """``key`` changed: refresh it for its subscribers in ``hub``; only queues work."""
        with self._lock:
            if key in self._running:
                self._running[key] = True
                return
            self._running[key] = False
        self._start(key, hub)

    def _start(self, key: EntityKey, hub: Hub) -> None:
        """Group the key's subscribers and queue their fetches; with none, end the refresh."""
        while True:
            units = self._group(key, hub)
            if units:
                with self._lock:
                    self._rounds += 1
                self._lanes.put(_Round(self, key, hub, units))
                return
            if self._done(key):
                return

    def stats(self) -> dict[str, int]:
        """``cohort_rounds`` (refreshes of changed per-user keys, coalesced) and ``cohort_queue``
        (fetches, of a group or of a batch chunk, waiting for a lane)."""
        waiting = self._lanes.queued(_Round)
        with self._lock:
            return {"cohort_rounds": self._rounds, "cohort_queue": waiting}

    def _done(self, key: EntityKey) -> bool:
        """End the key's refresh, unless a notification asked for another meanwhile."""
        with self._lock:
            if not self._running[key]:
                del self._running[key]
                return True
            self._running[key] = False
            return False

    def _end(self, round: _Round) -> None:
        """Every unit of ``round`` was fetched: end its key's refresh, or start the next round."""
        if not self._done(round.key):
            self._start(round.key, round.hub)

    def _abort(self, key: EntityKey) -> None:
        """The task fetching the last unit of a round of ``key`` was killed: end the key's refresh."""
        with self._lock:
            self._running.pop(key, None)

    def _group(self, key: EntityKey, hub: Hub) -> list[Any]:
        """What to fetch: a group per distinct secret, in chunks of ``batch_size`` for a batch entity."""
        groups: dict[Hashable, _Group] = {}
        alone: list[_Group] = []
        for conn in hub.subscribers(key):
            member = conn.cohort_member()
            if member is None:
                continue  # closed meanwhile
            secret, generation = member
            # A str is its own identity (no other type's identity equals a str).
            identity = secret if type(secret) is str else _identity(secret)
            group = groups.get(identity) if identity is not None else None
            if group is None:
                group = _Group(secret)
                if identity is None:
                    alone.append(group)
                else:
                    groups[identity] = group
            group.members.append((conn, generation))
        todo = [*groups.values(), *alone]
        if todo and self._handlers.is_batch(key.entity):
            size = self._batch_size
            return [todo[i : i + size] for i in range(0, len(todo), size)]
        return todo

    def _failed(self, key: EntityKey, exc: Exception, groups: list[_Group]) -> None:
        """Logged once for the whole call; each member hears of it, counts it quietly and retries."""
        self._failures.failed(key, exc, _no_retry)
        for group in groups:
            for conn, generation in group.members:
                conn.cohort_failed(key, exc, generation)


class _Round:
    """One refresh of one key: its units, and the frames of each distinct result, built once."""

    __slots__ = ("_cohorts", "_frames", "_keyframes", "hub", "key", "left", "taken", "units")

    def __init__(self, cohorts: Cohorts, key: EntityKey, hub: Hub, units: list[Any]) -> None:
        self._cohorts = cohorts
        self.key = key
        self.hub = hub
        #: The groups (or chunks of groups) to fetch; how many a lane has taken, how many are unfinished.
        #: Both counts change under the lanes' lock.
        self.units = units
        self.taken = 0
        self.left = len(units)
        self._keyframes = p.KeyFrames(key, cohorts._envelope)
        #: The frames of each distinct result of this round.
        self._frames: dict[Any, SharedFrames] = {}

    def take(self) -> Any:
        """The next unit for a lane. Called under the lanes' lock, while units are left."""
        unit = self.units[self.taken]
        self.taken += 1
        return unit

    def exhausted(self) -> bool:
        """Whether every unit has been taken. Called under the lanes' lock."""
        return self.taken == len(self.units)

    def waiting(self) -> int:
        """Units not taken yet. Called under the lanes' lock."""
        return len(self.units) - self.taken

    def one_done(self) -> bool:
        """Count a unit fetched; True for the last one. Called under the lanes' lock."""
        self.left -= 1
        return not self.left

    def finish(self) -> None:
        """Every unit was fetched: end the key's refresh, or start its next round."""
        self._cohorts._end(self)

    def abort(self) -> None:
        """The lane fetching the last unit was killed."""
        self._cohorts._abort(self.key)

    def work(self, run: FetchRun, unit: Any) -> None:
        """Fetch a unit (a group, or a chunk of groups) and hand the frames to its members."""
        key = self.key
        if isinstance(unit, list):
            try:
                results = run.fetch_batch(key, [group.secret for group in unit])
            except Exception as exc:
                self._cohorts._failed(key, exc, unit)
                return
            for group, result in zip(unit, results, strict=True):
                self._deliver(group, result)
            return
        try:
            result = run.fetch(key, unit.secret)
        except Exception as exc:
            self._cohorts._failed(key, exc, [unit])
            return
        self._deliver(unit, result)

    def _deliver(self, group: _Group, result: p.FetchResult) -> None:
        self._cohorts._failures.forget(self.key)
        # Equal JSON texts make equal frames, whoever they were fetched for: build them once.
        cache_key = result if result is None or isinstance(result, str) else tuple(result)
        shared = self._frames.get(cache_key)
        if shared is None:
            texts, version = self._keyframes.frames(result)
            frames = tuple([EncodedFrame.of(text) for text in texts])
            shared = SharedFrames(self.key, frames, sum(map(len, texts)), None, version, personal=True)
            self._frames[cache_key] = shared
        for conn, generation in group.members:
            conn.push_cohort(shared, generation)


def _no_retry(key: EntityKey) -> None:
    """Members retry on their own."""
