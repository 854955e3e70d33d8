"""Where background work runs: greenlets under gevent, threads otherwise, always owned.

Under ``gunicorn -k gevent`` the process is monkey-patched and every
connection already lives in greenlets, so background work is a greenlet:
cheap to start and counted by gevent. Under the threaded Flask dev server
nothing is patched and the same work runs in daemon threads. The rest of
the package uses the ``threading`` primitives, which gevent patches too.

Nothing here starts work that nobody owns: every greenlet or thread is
started through a :class:`Tasks`, which its owner closes and joins.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Callable, Protocol, TypeVar, cast

log = logging.getLogger("entitysync_sync")

T = TypeVar("T")


_patched = False


def gevent_active() -> bool:
    """True when gevent has patched ``threading`` in this process."""
    global _patched
    if _patched:
        return True  # patching is never undone: asked on every spawn, answered at once
    try:
        from gevent import monkey
    except ImportError:  # pragma: no cover - gevent is a dependency
        return False
    _patched = bool(monkey.is_module_patched("threading"))
    return _patched


class Lock(Protocol):
    """What :func:`light_lock` returns: the ``threading.Lock`` interface."""

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool: ...

    def release(self) -> None: ...

    def __enter__(self) -> bool: ...

    def __exit__(self, exc_type: Any, exc: Any, tb: Any, /) -> Any: ...


def light_lock() -> Lock:
    """A non-reentrant lock for short critical sections taken on every push.

    Under gevent, ``threading.Lock`` is patched into a class whose
    ``acquire`` is written in Python around gevent's compiled semaphore; the
    semaphore itself behaves the same for greenlets (and for other native
    threads) at about half the cost, which counts when a fan-out takes a
    lock per subscriber. Without gevent it is ``threading.Lock``.
    """
    if gevent_active():
        from gevent.lock import Semaphore

        return cast(Lock, Semaphore(1))
    return threading.Lock()


class Tasks:
    """The greenlets or threads one owner started, so that it can stop and join them.

    Greenlets are raw (``gevent.spawn_raw``): one is started per busy
    connection on every push, and a full ``Greenlet`` object costs several
    times more to create than the work it would carry. An exception that
    ends a task is logged, never lost.
    """

    def __init__(self, name: str = "entitysync") -> None:
        self.name = name
        self._live: set[Any] = set()
        self._changed = threading.Condition(threading.Lock())
        self._closing = threading.Event()

    def spawn(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` in the background."""
        if gevent_active():
            import gevent

            gevent.spawn_raw(self._run, fn, args)
        else:
            threading.Thread(target=self._run, args=(fn, args), name=self.name, daemon=True).start()

    def spawn_later(self, seconds: float, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` after ``seconds``, unless the tasks are closed first."""
        self.spawn(self._later, seconds, fn, args)

    def _later(self, seconds: float, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        if not self._closing.wait(seconds):
            fn(*args)

    def _run(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        me = _current()
        with self._changed:
            self._live.add(me)
        try:
            fn(*args)
        except Exception:
            log.exception("a background task of %s failed", self.name)
        except BaseException as exc:
            if not _is_greenlet_exit(exc):
                raise
        finally:
            with self._changed:
                self._live.discard(me)
                if not self._live:
                    self._changed.notify_all()

    def wait(self, seconds: float) -> bool:
        """Sleep ``seconds``, or less if closed meanwhile; True once closed. For loops of tasks."""
        return self._closing.wait(seconds)

    @property
    def closing(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closing.is_set()

    def __len__(self) -> int:
        """How many tasks are running."""
        return len(self._live)

    def running_here(self) -> bool:
        """Whether the caller is one of these tasks."""
        return _current() in self._live

    def join(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for every task to end; True if they all did."""
        with self._changed:
            return self._changed.wait_for(lambda: not self._live, timeout)

    def close(self, timeout: float = 5.0) -> bool:
        """Stop the tasks and join them; True if they all ended within ``timeout`` seconds.

        Waiting tasks (:meth:`wait`, :meth:`spawn_later`) end at once. Under
        gevent, tasks still running after half the timeout are killed
        (``GreenletExit`` at their next blocking call); threads cannot be
        killed, and are left to end by themselves.
        """
        self._closing.set()
        if self.running_here():
            return False  # a task closing its own owner cannot join itself
        if self.join(timeout / 2):
            return True
        if gevent_active():
            import gevent

            with self._changed:
                live = list(self._live)
            for task in live:
                gevent.kill(task, block=False)
        return self.join(timeout / 2)


def _current() -> Any:
    if gevent_active():
        from greenlet import getcurrent

        return getcurrent()
    return threading.current_thread()


def _is_greenlet_exit(exc: BaseException) -> bool:
    try:
        from greenlet import GreenletExit
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, GreenletExit)


class OncePerProcess:
    """Runs a start function once in each process that uses it.

    Things that start background work start lazily, on first use, so that
    nothing runs in a process that only forks workers (``gunicorn
    --preload``). If one was started before a fork anyway, the child's copy
    has lost the parent's threads and greenlets, so the child starts again.
    """

    def __init__(self) -> None:
        self._pid: int | None = None
        self._lock = threading.Lock()

    def run(self, start: Callable[[bool], None]) -> None:
        """Call ``start(forked)`` unless it already ran in this process; ``forked`` is True
        when it ran in a parent process before. Safe to call from several threads."""
        pid = os.getpid()
        if self._pid == pid:
            return
        with self._lock:
            if self._pid == pid:
                return
            start(self._pid is not None)
            self._pid = pid

    @property
    def started(self) -> bool:
        """Whether the start ran, in this process or a parent."""
        return self._pid is not None


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

    # An abandoned call cannot be stopped, so it is not owned: nothing could join it.
    threading.Thread(target=run, name="entitysync-fetch", daemon=True).start()
    if not done.wait(seconds):
        raise timed_out()
    ok, value = box[0]
    if ok:
        return value  # type: ignore[no-any-return]
    raise value


class _Expired(BaseException):
    """Thrown into a call that outlived its :class:`Deadlines`; a ``BaseException``, like
    ``gevent.Timeout``, so the app's own ``except Exception`` cannot swallow it."""

    def __init__(self, owner: Deadlines) -> None:
        super().__init__()
        self.owner = owner


class Deadlines:
    """The same time limit for each of many calls made one after another by one greenlet.

    :func:`call_with_timeout` arms a timer for every call; here one timer
    watches them all. It fires ``seconds`` after it was armed; if the call
    running then has run for ``seconds``, it is interrupted, else the timer
    is armed again for what that call has left, and if no call is running
    it is dropped until the next call. A run of quick calls thus costs one
    timer, however many calls it makes. Threads, which cannot be
    interrupted, fall back to :func:`call_with_timeout` for each call.
    Call :meth:`close` when done.
    """

    __slots__ = ("_gevent", "_owner", "_seconds", "_started", "_timed_out", "_timer")

    def __init__(self, seconds: float, timed_out: Callable[[], BaseException]) -> None:
        self._seconds = seconds
        self._timed_out = timed_out
        self._gevent = bool(seconds) and gevent_active()
        #: ``time.monotonic()`` when the current call began; 0.0 between calls.
        self._started = 0.0
        self._timer: Any = None
        self._owner: Any = None

    @property
    def in_caller(self) -> bool:
        """Whether :meth:`call` runs its calls in the caller's greenlet or thread (else each in a thread)."""
        return self._gevent or not self._seconds

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)``, or raise ``timed_out()`` if it has not returned after ``seconds`` (0: no limit)."""
        if not self._gevent:
            if not self._seconds:
                return fn(*args)
            return call_with_timeout(self._seconds, self._timed_out, fn, *args)
        if self._timer is None:
            if self._owner is None:
                from greenlet import getcurrent

                self._owner = getcurrent()
            self._arm(self._seconds)
        self._started = time.monotonic()
        try:
            return fn(*args)
        except _Expired as expired:
            if expired.owner is not self:
                raise
            raise self._timed_out() from None
        finally:
            self._started = 0.0

    def _arm(self, seconds: float) -> None:
        import gevent

        self._timer = gevent.get_hub().loop.timer(seconds)
        self._timer.start(self._fire, update=True)

    def _fire(self) -> None:
        """In gevent's hub: the owner is switched out, inside a call if one has started."""
        self._timer.close()
        self._timer = None
        started = self._started
        if not started:
            return  # between calls: the next one arms the timer again
        left = started + self._seconds - time.monotonic()
        if left > 0:
            self._arm(left)
        else:
            self._owner.throw(_Expired(self))

    def close(self) -> None:
        """Stop the timer; the calls are over."""
        if self._timer is not None:
            self._timer.close()
            self._timer = None


class WakeEvent(Protocol):
    """An event set from any thread and waited on where an executor runs work."""

    def set(self) -> None: ...

    def clear(self) -> None: ...

    def wait(self, timeout: float | None = None) -> bool: ...


class DefaultExecutor:
    """Greenlets under patched gevent, daemon threads otherwise (see :class:`Tasks`)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.tasks = Tasks(name)

    def spawn(self, fn: Callable[..., Any], *args: Any) -> None:
        self.tasks.spawn(fn, *args)

    def event(self) -> WakeEvent:
        return threading.Event()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def running_here(self) -> bool:
        """Whether the caller is one of this executor's tasks."""
        return self.tasks.running_here()

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop and join every task; True if they all ended."""
        return self.tasks.close(timeout)

    @property
    def running(self) -> int:
        """How many of its tasks are running."""
        return len(self.tasks)


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
        self._greenlets: set[Any] = set()
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
            gevent.joinall(list(self._greenlets), timeout=2.5)
            gevent.killall(list(self._greenlets), timeout=2.5)
        finally:
            keepalive.close()

    def _call(self, fn: Callable[..., Any], *args: Any) -> None:
        if threading.current_thread() is self._thread:
            fn(*args)
        else:
            self._hub.loop.run_callback_threadsafe(fn, *args)

    def spawn(self, fn: Callable[..., Any], *args: Any) -> None:
        self._call(self._spawn_here, fn, args)

    def _spawn_here(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        import gevent

        greenlet = gevent.spawn(fn, *args)
        self._greenlets.add(greenlet)
        greenlet.link(self._greenlets.discard)

    def event(self) -> WakeEvent:
        return _CrossThreadEvent(self)

    def sleep(self, seconds: float) -> None:
        import gevent

        gevent.sleep(seconds)

    def running_here(self) -> bool:
        """True when called on this thread."""
        return threading.current_thread() is self._thread

    @property
    def running(self) -> int:
        """Its greenlets, plus one for the thread itself while it runs."""
        return len(self._greenlets) + self._thread.is_alive()

    def stop(self, timeout: float = 5.0) -> bool:
        """End the thread once its greenlets have finished (killing them after a while); join it."""
        if self._stop is not None:
            self._call(self._stop.set)
        if self.running_here():
            return False
        self._thread.join(timeout)
        return not self._thread.is_alive()


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


Executor = DefaultExecutor | GeventThread


def executor(name: str, *, needs_gevent: bool = False) -> Executor:
    """The executor for a bus; ``needs_gevent`` buses get a :class:`GeventThread` when unpatched."""
    if needs_gevent and not gevent_active():
        return GeventThread(name)
    return DefaultExecutor(name)
