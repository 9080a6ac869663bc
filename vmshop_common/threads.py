"""Blocking work off the reactor thread, each piece with a deadline: a thread pool as a Twisted service, and
one-off threads.

Both servers run everything that blocks (SQLite, files, QEMU and its tools, guests) on threads, never on
the reactor thread. The rules here make sure no request and no stop ever waits on a thread without end:

* :meth:`ThreadPoolService.run` (called in the reactor thread) runs ``work`` on one of the pool's
  ``size`` threads and returns a Deferred. It fires with the work's result or failure, or, if
  ``deadline`` seconds pass first, fails with :class:`~vmshop_common.errors.DeadlineExceededError`: the
  request is answered. Python cannot stop a thread, so the work still runs to its end (its result
  unused, its lateness logged); while it does, the pool has one thread more, so that an overrun never
  takes a thread from the requests after it (at most ``size`` more at once).
* Cancelling that Deferred answers it at once (``CancelledError``), the same way.
* With a ``queue`` bound, work that would wait for a thread behind ``queue`` others is refused at once
  (:class:`~vmshop_common.errors.BusyError`): a burst is never queued without end.
* Stopping the service (``stopService``) refuses new work (``ShuttingDownError``) and returns a
  Deferred that fires when every work in progress has ended or when the shutdown's grace is over,
  whichever comes first. It never joins a busy thread: the pool's threads are daemon threads, so work
  still running then is abandoned (and named in the log) and the process exits without it. What that
  work held is left as a crash would leave it; the servers' start-up recovery handles that.
* :func:`in_thread` runs one rare blocking job (re-reading a file, closing a database) on a daemon thread
  of its own, with the same deadline rule.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from .errors import BusyError, DeadlineExceededError, ShuttingDownError

log = logging.getLogger(__name__)
T = TypeVar("T")

#: ``deadline`` of :meth:`ThreadPoolService.run` when none is given: the pool's own.
POOL_DEADLINE: Any = object()


class Grace(Protocol):
    """When a stopping server stops waiting (``vmshop_common.lifecycle.Shutdown``)."""

    def over(self) -> Deferred[None]:
        """A Deferred that fires when the grace is over."""


class _Workers:
    """Up to ``max`` daemon threads taking work from one queue (what :class:`ThreadPoolService` runs on).

    Twisted's ``ThreadPool`` hands each work through a coordinator and a queue per worker, with about
    three times the locking of this; a request that reads the registry pays that hand-off twice per call.
    A thread is started when work arrives and no idle thread is waiting for it, up to ``max``; threads
    above ``max`` (after :meth:`adjustPoolsize` lowered it) end when they next look for work.
    ``callInThreadWithCallback`` calls ``on_result(ok, result_or_failure)`` in the worker thread, as
    Twisted's does.
    """

    def __init__(self, maxthreads: int, name: str) -> None:
        self.max = maxthreads
        self.name = name
        self.started = False
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()
        self._idle = 0  # threads waiting on the queue
        self._queued = 0  # works in the queue not yet taken

    def start(self) -> None:
        self.started = True

    def adjustPoolsize(self, maxthreads: int) -> None:  # noqa: N802 - Twisted's name
        with self._lock:
            self.max = maxthreads
            self._grow()

    def callInThreadWithCallback(self, on_result: Callable[[bool, Any], None], work: Callable[..., Any],  # noqa: N802
                                 *args: Any, **kwargs: Any) -> None:
        with self._lock:
            self._queued += 1
            self._grow()  # a thread started now waits for the work on the queue
        self._queue.put((on_result, work, args, kwargs))  # not under the lock: the woken thread takes it next

    def _grow(self) -> None:  # with the lock held
        while self.started and self._queued > self._idle and len(self._threads) < self.max:
            thread = threading.Thread(target=self._serve, name=f"{self.name}-{len(self._threads) + 1}", daemon=True)
            self._threads.add(thread)
            self._idle += 1  # counted idle until it takes a work (so it is not started twice for one)
            thread.start()

    def _serve(self) -> None:
        me = threading.current_thread()
        while True:
            item = self._queue.get()
            with self._lock:
                self._idle -= 1
                if item is None or len(self._threads) > self.max:
                    self._threads.discard(me)
                    if item is not None:  # a work taken on the way out goes back for another thread
                        self._queue.put(item)
                        self._grow()
                    return
                self._queued -= 1
            on_result, work, args, kwargs = item
            result: Any
            try:
                result, ok = work(*args, **kwargs), True
            except BaseException:  # noqa: BLE001 - handed to on_result
                result, ok = Failure(), False
            on_result(ok, result)
            del item, on_result, work, args, kwargs, result
            with self._lock:
                self._idle += 1

    def stop(self) -> None:
        """End every thread (call it with no work in progress: idle threads end at once) and wait for them."""
        with self._lock:
            self.started = False
            threads = list(self._threads)
            for _ in threads:
                self._queue.put(None)
        for thread in threads:
            thread.join(5.0)


@dataclass(eq=False)
class _Work:
    what: str
    started: float
    deferred: Deferred[Any]
    timer: Any = None
    overdue: bool = False
    extra_thread: bool = False


class ThreadPoolService(Service):
    """A pool of ``size`` daemon threads for blocking work, as a Twisted service (see the module's rules).

    ``deadline``: seconds a work may take unless :meth:`run` says otherwise (``None``: no deadline).
    ``queue``: how many works may wait for a thread (``None``: any number).
    ``grace``: what says when a stop stops waiting for work in progress (``None``: the stop waits for it).
    """

    def __init__(self, size: int, *, name: str, deadline: float | None = None, queue: int | None = None,
                 grace: Grace | None = None, reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.reactor = reactor
        self.size = size
        self.name = name
        self.deadline = deadline
        self.queue = queue
        self.grace = grace
        self.pool = _Workers(size, name)
        self.abandoned: list[str] = []
        self._works: set[_Work] = set()
        self._extra = 0
        self._stopping = False
        self._idle: list[Deferred[None]] = []

    @property
    def busy(self) -> list[str]:
        """What the works in progress are (overdue ones included), oldest first."""
        return [work.what for work in sorted(self._works, key=lambda w: w.started)]

    def startService(self) -> None:  # noqa: N802 - Twisted's name
        Service.startService(self)
        self.pool.start()

    def run(self, work: Callable[..., T], /, *args: Any, deadline: float | None = POOL_DEADLINE,
            what: str | None = None, **kwargs: Any) -> Deferred[T]:
        """``work(*args, **kwargs)`` on the pool; a Deferred of its result (see the module's rules).

        ``deadline``: seconds (``None``: none; default: the pool's). ``what`` names the work in the log.
        """
        if self._stopping:
            return defer.fail(ShuttingDownError(f"the server is stopping: {self.name} takes no new work"))
        waiting = len(self._works) - (self.size + self._extra)  # works beyond the threads wait for one
        if self.queue is not None and waiting >= self.queue:
            return defer.fail(BusyError(f"the server is busy: {waiting} requests wait for its {self.size} threads "
                                        "already; try again later"))
        limit = self.deadline if deadline is POOL_DEADLINE else deadline
        entry = _Work(what or getattr(work, "__qualname__", None) or repr(work), self.reactor.seconds(), Deferred())
        self._works.add(entry)

        def done(ok: bool, result: Any) -> None:  # in the worker thread
            self.reactor.callFromThread(self._ended, entry, ok, result)

        self.pool.callInThreadWithCallback(done, work, *args, **kwargs)
        if limit is not None:
            entry.timer = self.reactor.callLater(limit, self._overdue, entry, limit)
        return entry.deferred

    def _ended(self, entry: _Work, ok: bool, result: Any) -> None:
        self._works.discard(entry)
        if entry.timer is not None and entry.timer.active():
            entry.timer.cancel()
        if entry.overdue:
            log.warning("%s: %s ended %.1f s after it started, past its deadline (its result is not used)",
                        self.name, entry.what, self.reactor.seconds() - entry.started)
        if entry.extra_thread:
            self._extra -= 1
            if self.pool.started:
                self.pool.adjustPoolsize(maxthreads=self.size + self._extra)
        if not entry.deferred.called:
            if ok:
                entry.deferred.callback(result)
            else:
                entry.deferred.errback(result)
        if not self._works and self._idle:
            waiters, self._idle = self._idle, []
            for waiter in waiters:
                waiter.callback(None)

    def _overdue(self, entry: _Work, limit: float) -> None:
        entry.overdue = True
        log.error("%s: %s did not end within its deadline of %g s: its request is answered, its thread goes on",
                  self.name, entry.what, limit)
        if self._extra < self.size and self.pool.started:
            self._extra += 1
            entry.extra_thread = True
            self.pool.adjustPoolsize(maxthreads=self.size + self._extra)
        if not entry.deferred.called:
            entry.deferred.errback(DeadlineExceededError(f"{entry.what} did not end within {limit:g} s"))

    def stopService(self) -> Deferred[None]:  # noqa: N802 - Twisted's name
        """Refuse new work; fire when the work in progress has ended or the grace is over (never join a busy
        thread)."""
        Service.stopService(self)
        self._stopping = True
        if not self._works:
            self._stop_pool()
            return defer.succeed(None)
        result: Deferred[None] = Deferred()
        idle: Deferred[None] = Deferred()
        self._idle.append(idle)

        def ended(_: Any) -> None:
            if not result.called:
                self._stop_pool()
                result.callback(None)

        def grace_over(_: Any) -> None:
            if not result.called:
                self._abandon()
                result.callback(None)

        idle.addCallback(ended)
        if self.grace is not None:
            self.grace.over().addCallback(grace_over)
        return result

    def _stop_pool(self) -> None:
        # No work is in progress: the threads are idle, and joining them takes no time.
        if self.pool.started:
            self.pool.stop()

    def _abandon(self) -> None:
        now = self.reactor.seconds()
        self.abandoned = self.busy
        for entry in sorted(self._works, key=lambda w: w.started):
            log.warning("%s: abandoning %s (running for %.1f s) as the server stops; its thread is left to the "
                        "process's exit", self.name, entry.what, now - entry.started)


def in_thread(reactor: Any, work: Callable[..., T], /, *args: Any, timeout: float, what: str,
              **kwargs: Any) -> Deferred[T]:
    """``work(*args, **kwargs)`` on a daemon thread of its own; a Deferred of its result that fails with
    DeadlineExceededError after ``timeout`` seconds (the thread then ends on its own, its result unused).

    Call it in the reactor thread (or before the reactor runs). For rare jobs only; requests use a pool.
    """
    d: Deferred[T] = Deferred()

    def late() -> None:
        if not d.called:
            d.errback(DeadlineExceededError(f"{what} did not end within {timeout:g} s"))

    timer = reactor.callLater(timeout, late)

    def done(ok: bool, result: Any) -> None:
        if timer.active():
            timer.cancel()
        if d.called:
            log.warning("%s ended after its deadline of %g s (its result is not used)", what, timeout)
        elif ok:
            d.callback(result)
        else:
            d.errback(result)

    def run() -> None:
        result: Any
        try:
            result, ok = work(*args, **kwargs), True
        except BaseException:  # noqa: BLE001 - handed to the Deferred
            result, ok = Failure(), False
        reactor.callFromThread(done, ok, result)

    threading.Thread(target=run, name=f"vmshop: {what}"[:60], daemon=True).start()
    return d


__all__ = ["POOL_DEADLINE", "Grace", "ThreadPoolService", "in_thread"]
