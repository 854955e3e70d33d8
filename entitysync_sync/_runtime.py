"""Where background work runs: greenlets under gevent, threads otherwise.

Under ``gunicorn -k gevent`` the process is monkey-patched and every
connection already lives in greenlets, so background work is a greenlet:
cheap to start and counted by gevent. Under the threaded Flask dev server
nothing is patched and the same work runs in daemon threads. The rest of
the package uses the ``threading`` primitives, which gevent patches too.
"""

from __future__ import annotations

import threading
from typing import Any, Callable


def gevent_active() -> bool:
    """True when gevent has patched ``threading`` in this process."""
    try:
        from gevent import monkey
    except ImportError:  # pragma: no cover - gevent is a dependency
        return False
    return bool(monkey.is_module_patched("threading"))


def spawn(fn: Callable[..., Any], *args: Any, name: str = "entitysync") -> None:
    """Run ``fn(*args)`` in the background, in a greenlet or a daemon thread.

    Greenlets are raw (``gevent.spawn_raw``): one is started per busy
    connection on every push, and a full ``Greenlet`` object costs several
    times more to create than the work it would carry.
    """
    if gevent_active():
        import gevent

        gevent.spawn_raw(fn, *args)
    else:
        threading.Thread(target=fn, args=args, name=name, daemon=True).start()
