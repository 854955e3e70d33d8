"""Failed fetches: how they are logged, what the client is told, when they are retried.

Per-subscriber refreshes (:mod:`entitysync_sync.connection`) and shared
fetches (:mod:`entitysync_sync.fanout`) fail the same way and must recover
the same way: a client hears of the first failure of a run only, the log
gets one error per run (later attempts at debug level), and the key is
fetched again with backoff until a fetch succeeds, so clients converge once
the database is back.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from .backoff import backoff
from .concurrency import Tasks
from .exceptions import FetchTimeoutError
from .keys import EntityKey

log = logging.getLogger("entitysync_sync")

#: Seconds before the first retry; each later one waits twice as long, up to the cap.
FIRST_RETRY = 0.5


def failure_message(key: EntityKey, exc: BaseException) -> str:
    """The ``fetch_failed`` text a client gets; never the exception's own text."""
    return f"fetching {key} {'timed out' if isinstance(exc, FetchTimeoutError) else 'failed'}"


class FetchFailures:
    """The keys whose last fetch failed, with how many times in a row; safe across threads.

    :param retry_max: the longest pause between retries, in seconds (0: no retries).
    :param tasks: where retries wait and run.
    """

    def __init__(self, retry_max: float, tasks: Tasks) -> None:
        self.retry_max = retry_max
        self._tasks = tasks
        self._counts: dict[EntityKey, int] = {}
        self._lock = threading.Lock()

    def failed(self, key: EntityKey, exc: BaseException, retry: Callable[[EntityKey], None],
               logged: bool = False) -> bool:
        """Count, log (unless ``logged`` already) and schedule ``retry(key)``; True for the first failure of a run."""
        with self._lock:
            attempt = self._counts[key] = self._counts.get(key, 0) + 1
        if logged:
            pass
        elif attempt > 1:
            log.debug("fetch of %s failed again (attempt %d): %r", key, attempt, exc)
        elif isinstance(exc, FetchTimeoutError):
            log.warning("fetch of %s %s", key, exc)
        else:
            log.error("fetch of %s failed", key, exc_info=exc)
        if self.retry_max:
            self._tasks.spawn_later(backoff(attempt, FIRST_RETRY, self.retry_max), retry, key)
        return attempt == 1

    def forget(self, key: EntityKey) -> None:
        """The key was fetched, or is no longer wanted: stop retrying it."""
        if key not in self._counts:
            return  # the common case, read without the lock: only a failure adds the key
        with self._lock:
            self._counts.pop(key, None)

    def __contains__(self, key: object) -> bool:
        return key in self._counts
