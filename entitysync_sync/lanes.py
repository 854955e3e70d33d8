"""Lanes: one queue of fetches for every changed key, worked through by a few tasks.

A notification burst can change thousands of keys at once. Giving each
key's refresh a task of its own costs a task, an application context and a
fetch timer per key; here the refreshes wait in one queue instead, and a
*lane* (one task) takes them one after another through one
:class:`FetchRun`. Yet a slow fetch holds up no one: while work is queued, a
spare lane is always queued too, and it runs exactly when the running fetch
waits (on a database socket, say); it takes the next unit and queues a spare
of its own, so fetches that wait overlap as if each ran in its own task. A
lane hands over to its spare after :data:`SLICE` seconds, so other greenlets
are not kept waiting behind a long queue.

The shared fan-out (:mod:`entitysync_sync.fanout`) queues one unit per key
refresh, the cohorts (:mod:`entitysync_sync.cohorts`) one per distinct
secret (or batch chunk) of a key's subscribers.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Callable, Protocol

from . import protocol as p
from .concurrency import Tasks, light_lock
from .keys import EntityKey

#: Seconds a lane fetches before it hands the rest of the queue over to a new one.
SLICE = 0.005


class FetchRun(Protocol):
    """Fetches made one after another, closed at the end (a context manager;
    implemented by :class:`~entitysync_sync.registry.FetchRun`)."""

    def __enter__(self) -> FetchRun: ...

    def __exit__(self, *exc_info: object) -> None: ...

    def fetch(self, key: EntityKey, secret: Any) -> p.FetchResult:
        """The row or rows of ``key`` for ``secret`` as JSON texts, or ``None``."""

    def fetch_batch(self, key: EntityKey, secrets: list[Any]) -> list[p.FetchResult]:
        """One call of a batch fetch: one result per secret, in order."""


class Job(Protocol):
    """Work for the lanes: one or more units, fetched one at a time, then finished once.

    :meth:`take`, :meth:`exhausted` and :meth:`one_done` are called under the
    lanes' lock and must only count; :meth:`work` and :meth:`finish` are
    called outside it.
    """

    def take(self) -> Any:
        """The next unit; called while :meth:`exhausted` is False."""

    def exhausted(self) -> bool:
        """Whether every unit has been taken (the job then leaves the queue)."""

    def waiting(self) -> int:
        """Units not taken yet."""

    def work(self, run: FetchRun, unit: Any) -> None:
        """Fetch ``unit`` and hand its frames on; exceptions from the fetch are the job's to handle."""

    def one_done(self) -> bool:
        """Count a unit worked through; True for the job's last one."""

    def finish(self) -> None:
        """Every unit was worked through (it may queue a job of the same key again)."""

    def abort(self) -> None:
        """The lane was killed (the server is stopping) while working on a unit of this job."""


class Lanes:
    """The queue of :class:`Job` objects and the lanes that work through it.

    :param tasks: where lanes run.
    :param open_run: a new :class:`FetchRun`, opened by each lane.
    """

    def __init__(self, tasks: Tasks, open_run: Callable[[], FetchRun]) -> None:
        self._tasks = tasks
        self._open_run = open_run
        self._lock = light_lock()
        #: Jobs with units waiting for a lane, oldest first.
        self._queue: deque[Job] = deque()
        #: Whether a lane has been started that is not running yet.
        self._spare = False

    def put(self, job: Job) -> None:
        """Queue ``job``; a lane starts if none is waiting to."""
        with self._lock:
            self._queue.append(job)
            spawn = not self._spare
            self._spare = True
        if spawn:
            self._tasks.spawn(self._lane)

    def queued(self, kind: type) -> int:
        """Units waiting for a lane, of the jobs that are instances of ``kind``."""
        with self._lock:
            return sum(job.waiting() for job in self._queue if isinstance(job, kind))

    def _lane(self) -> None:
        """Work queued units one after another, until none is left or the time slice is up."""
        lock, queue, tasks = self._lock, self._queue, self._tasks
        stop = time.monotonic() + SLICE
        finished: Job | None = None
        with self._open_run() as run:
            with lock:
                self._spare = False
            while True:
                with lock:
                    ended = finished is not None and finished.one_done()
                    job = unit = None
                    if queue and time.monotonic() < stop:
                        job = queue[0]
                        unit = job.take()
                        if job.exhausted():
                            queue.popleft()
                    spawn = bool(queue) and not self._spare
                    if spawn:
                        self._spare = True
                if spawn:
                    tasks.spawn(self._lane)
                if ended:
                    finished.finish()  # type: ignore[union-attr]  # ended implies a job
                    finished = None
                    if job is None:
                        continue  # finishing may have queued the key's next job
                if job is None:
                    return
                finished = job
                try:
                    job.work(run, unit)
                except BaseException:  # the task is killed: the job must still end
                    with lock:
                        ended = job.one_done()
                    if ended:
                        job.abort()
                    raise
