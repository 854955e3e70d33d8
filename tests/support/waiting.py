"""Waiting without sleeping as synchronisation: poll a condition with a deadline."""

from __future__ import annotations

import time
from typing import Any, Callable


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02,
             message: str = "condition", sleep: Callable[[float], Any] = time.sleep) -> Any:
    """Poll ``predicate`` until it returns something truthy, or fail after ``timeout``.

    ``sleep`` is how to wait between polls: ``gevent.sleep`` where greenlets
    of the test's own process must run meanwhile.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message}; last value {last!r}")
