"""Where background work runs: greenlets under gevent, threads otherwise.

Under ``gunicorn -k gevent`` the process is monkey-patched and every
connection already lives in greenlets, so background work is a greenlet:
cheap to start and counted by gevent. Under the threaded Flask dev server
nothing is patched and the same work runs in daemon threads. The rest of
the package uses the ``threading`` primitives, which gevent patches too.
"""

from __future__ import annotations

import random
import threading
import time
from typing import Any, Callable, Protocol, TypeVar

T = TypeVar("T")


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


def spawn_later(seconds: float, fn: Callable[..., Any], *args: Any) -> None:
    """Run ``fn(*args)`` after ``seconds``, in a greenlet or a daemon timer thread."""
    if gevent_active():
        import gevent

        gevent.spawn_later(seconds, fn, *args)
    else:
        timer = threading.Timer(seconds, fn, args)
        timer.daemon = True
        timer.start()


def backoff(attempt: int, first: float, cap: float, jitter: bool = False) -> float:
    """Seconds to wait before try ``attempt + 1``: ``first``, doubling, at most ``cap``.

    With ``jitter`` the pause is drawn from its upper half, so that many
    processes that failed together do not retry together.
    """
    delay: float = min(cap, first * 2.0 ** (attempt - 1))
    return delay * random.uniform(0.5, 1.0) if jitter else delay


def call_with_timeout(seconds: float, timed_out: Callable[[], BaseException],
                      fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)``, or raise ``timed_out()`` if it has not returned after ``seconds`` (0: no limit).

    Under gevent the call is interrupted at its next blocking operation (a
    database query on a patched socket, say). Real threads cannot be
    interrupted: the call goes on in a thread of its own and its result is
    abandoned, which is good enough for the development server.
    """
    if not seconds:
        return fn(*args)
    if gevent_active():
        import gevent

        # gevent.Timeout is a BaseException, so the app's own `except Exception`
        # cannot swallow it; it becomes ``exc`` only out here.
        timer = gevent.Timeout(seconds)
        timer.start()
        try:
            return fn(*args)
        except gevent.Timeout as fired:
            if fired is not timer:
                raise
            raise timed_out() from None
        finally:
            timer.close()
    box: list[Any] = []
    done = threading.Event()

    def run() -> None:
        try:
            box.append((True, fn(*args)))
        except BaseException as error:  # handed to the caller
            box.append((False, error))
        finally:
            done.set()

    threading.Thread(target=run, name="entitysync-fetch", daemon=True).start()
    if not done.wait(seconds):
        raise timed_out()
    ok, value = box[0]
    if ok:
        return value  # type: ignore[no-any-return]
    raise value


class WakeEvent(Protocol):
    """An event set from any thread and waited on where an :class:`Executor` runs work."""

    def set(self) -> None: ...

    def clear(self) -> None: ...

    def wait(self, timeout: float | None = None) -> bool: ...


class Executor(Protocol):
    """Where a bus runs its loops, and how it sleeps and waits there."""

    def spawn(self, fn: Callable[..., Any], *args: Any) -> None: ...

    def event(self) -> WakeEvent: ...

    def sleep(self, seconds: float) -> None: ...


class DefaultExecutor:
    """Greenlets under patched gevent, daemon threads otherwise (see :func:`spawn`)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def spawn(self, fn: Callable[..., Any], *args: Any) -> None:
        spawn(fn, *args, name=self.name)

    def event(self) -> WakeEvent:
        return threading.Event()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class GeventThread:
    """A daemon thread running a gevent hub of its own.

    A gevent-only library (gnsq) cannot run on the threads of an unpatched
    process, such as the threaded Flask dev server. It runs here instead;
    other threads hand it work with :meth:`spawn` and wake it through the
    events of :meth:`event`, both of which go through the hub's thread-safe
    callback queue.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._ready = threading.Event()
        self._hub: Any = None
        self._stop: Any = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self._ready.wait()

    def _run(self) -> None:
        import gevent
        import gevent.event

        self._hub = gevent.get_hub()
        self._stop = gevent.event.Event()
        # Without an active watcher the loop would exit while it waits for work from other threads.
        keepalive = self._hub.loop.async_()
        keepalive.start(lambda: None)
        self._ready.set()
        try:
            self._stop.wait()
        finally:
            keepalive.close()

    def _call(self, fn: Callable[..., Any], *args: Any) -> None:
        if threading.current_thread() is self._thread:
            fn(*args)
        else:
            self._hub.loop.run_callback_threadsafe(fn, *args)

    def spawn(self, fn: Callable[..., Any], *args: Any) -> None:
        import gevent

        self._call(gevent.spawn_raw, fn, *args)

    def event(self) -> WakeEvent:
        return _CrossThreadEvent(self)

    def sleep(self, seconds: float) -> None:
        import gevent

        gevent.sleep(seconds)

    def running_here(self) -> bool:
        """True when called on this thread."""
        return threading.current_thread() is self._thread

    def stop(self) -> None:
        """Let the thread end once its greenlets have finished."""
        if self._stop is not None:
            self._call(self._stop.set)


class _CrossThreadEvent:
    def __init__(self, owner: GeventThread) -> None:
        import gevent.event

        self._owner = owner
        self._event = gevent.event.Event()

    def set(self) -> None:
        self._owner._call(self._event.set)

    def clear(self) -> None:
        self._event.clear()

    def wait(self, timeout: float | None = None) -> bool:
        return bool(self._event.wait(timeout))


def executor(name: str, *, needs_gevent: bool = False) -> DefaultExecutor | GeventThread:
    """The executor for a bus; ``needs_gevent`` buses get a :class:`GeventThread` when unpatched."""
    if needs_gevent and not gevent_active():
        return GeventThread(name)
    return DefaultExecutor(name)


def gunicorn_workers() -> int | None:
    """How many workers the gunicorn that forked this process runs, or None outside gunicorn.

    gunicorn keeps no global for it; its arbiter object survives in a forked
    worker's memory, so it is looked up there, once, only when gunicorn is loaded.
    """
    import sys

    arbiter = sys.modules.get("gunicorn.arbiter")
    if arbiter is None:
        return None
    import gc

    for obj in gc.get_objects():
        if isinstance(obj, arbiter.Arbiter):
            return int(obj.num_workers)
    return None
