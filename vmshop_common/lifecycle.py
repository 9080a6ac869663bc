"""A server's life as a tree of Twisted services: start in order, stop in reverse order within a grace.

Both servers are a :class:`ServerService` (a ``MultiService``) whose children are, in start order: the
closing of what they hold (:class:`Closing`: records, registry, backend), the thread pool
(:class:`~vmshop_common.threads.ThreadPoolService`), their own service (the shop, the plant's
notifier), their timers (:class:`RoundTimer`) and, last, the SOAP listener
(:class:`~vmshop_common.soap.listener.SoapListener`). :func:`run_server` runs such a tree.

Stopping (SIGTERM or SIGINT; the rules both servers document in the README):

1. The listener stops accepting at once: no new connection, and a new request on a kept-alive one is
   answered ``Server.ShuttingDown`` (HTTP 503). Requests in progress may finish until the grace
   (``<shutdown grace=...>``, default 30 s) is over; then the ones left are cancelled (answered
   ``Server.ShuttingDown``, within :data:`AFTER_GRACE` seconds) and every connection is closed (its last
   answers sent, within :data:`AFTER_GRACE` seconds more).
2. Timers stop; a round in progress may finish until the grace is over, then it is cancelled.
3. The thread pool takes no new work and waits for the work in progress until the grace is over; work
   still running then is abandoned on its daemon threads (a plant's create in the middle of a boot: the
   guest keeps running and the next start deals with it, as after a crash).
4. The closers close files and databases on threads of their own, each within a deadline of its own
   (:data:`AFTER_GRACE` seconds unless told otherwise), and skip what abandoned work may still be using.

Each child's stop is awaited before the next begins (``MultiService`` would stop them all at once,
and the pool would stop under requests still using it). A second SIGTERM/SIGINT ends the grace at once.
A watchdog ends the process (status 1, logged) if the stop takes longer than the grace plus
:data:`WATCHDOG_MARGIN` seconds: the stop never hangs. SIGHUP runs the server's reload (in the reactor
thread; whatever it reads, it reads on a thread). The handlers are in place before the tree starts, so a
signal sent as soon as a server prints that it listens is handled, never the default action; a SIGHUP
that comes earlier still, while the server starts (:func:`record_hangups`, from the command line's
start), makes a reload once the reactor runs.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

from twisted.application.internet import TimerService
from twisted.application.service import MultiService, Service
from twisted.internet import defer, task
from twisted.internet.defer import Deferred

from .errors import VMShopError
from .threads import in_thread

log = logging.getLogger(__name__)

DEFAULT_GRACE = 30.0
"""Seconds a stopping server lets requests in progress finish (``<shutdown grace=...>``)."""

AFTER_GRACE = 5.0
"""Seconds, after the grace, for cancelled requests to be answered and for each closer."""

WATCHDOG_MARGIN = 30.0
"""Seconds past the grace after which a stop that has not ended ends the process."""


class Shutdown:
    """When a server's stop began and when its grace ends; shared by the services of one tree.

    :meth:`begin` starts the grace (once); :meth:`end` ends it early (a second signal). ``reactor`` gives
    the time and the timer (a ``task.Clock`` in tests).
    """

    def __init__(self, grace: float = DEFAULT_GRACE, reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.grace = float(grace)
        self.reactor = reactor
        self.began: float | None = None
        self.ended = False
        self._timer: Any = None
        self._waiters: list[Deferred[None]] = []

    def begin(self) -> None:
        """The stop begins now: the grace runs from here (a second call changes nothing)."""
        if self.began is None:
            self.began = self.reactor.seconds()
            self._timer = self.reactor.callLater(self.grace, self.end)

    def end(self) -> None:
        """The grace is over (now, if it was not yet)."""
        if self.ended:
            return
        self.ended = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def over(self) -> Deferred[None]:
        """A Deferred that fires when the grace is over (at once if it is)."""
        if self.ended:
            return defer.succeed(None)
        waiter: Deferred[None] = Deferred()
        self._waiters.append(waiter)
        return waiter

    def remaining(self) -> float:
        """Seconds left of the grace (all of it before the stop began, 0 once over)."""
        if self.ended:
            return 0.0
        if self.began is None:
            return self.grace
        return max(0.0, self.began + self.grace - self.reactor.seconds())


def first_of(*deferreds: Deferred[Any]) -> Deferred[None]:
    """A Deferred that fires (with ``None``) when the first of ``deferreds`` fires, whatever its result."""
    result: Deferred[None] = Deferred()

    def fired(outcome: Any) -> None:
        if not result.called:
            result.callback(None)

    for d in deferreds:
        d.addBoth(fired)
    return result


def within(reactor: Any, seconds: float, d: Deferred[Any]) -> Deferred[None]:
    """A Deferred that fires (with ``None``) when ``d`` does or ``seconds`` have passed, whichever is first."""
    timer: Deferred[None] = task.deferLater(reactor, seconds, lambda: None)

    def stop_timer(_: Any) -> None:
        if not timer.called:
            timer.cancel()

    return first_of(d, timer).addBoth(stop_timer)


class ServerService(MultiService):
    """A server's root service: children start in the order they were added and stop one after the other,
    each stop awaited, in reverse order; ``shutdown``'s grace begins when the stop does."""

    def __init__(self, name: str, shutdown: Shutdown) -> None:
        super().__init__()
        self.setName(name)
        self.shutdown = shutdown

    def stopService(self) -> Deferred[None]:  # noqa: N802 - Twisted's name
        self.shutdown.begin()
        Service.stopService(self)
        return self._stop_children(list(self)[::-1])

    @defer.inlineCallbacks
    def _stop_children(self, children: list[Any]) -> Any:
        for child in children:
            yield self._stop_child(child)
        log.info("%s stopped", self.name)

    def _stop_child(self, child: Any) -> Deferred[None]:
        def failed(failure: Any) -> None:
            log.error("stopping %s failed: %s", getattr(child, "name", child), failure.getTraceback())

        return defer.maybeDeferred(child.stopService).addCallbacks(lambda _: None, failed)


class RoundTimer(TimerService):
    """``work()`` (it may return a Deferred) every ``step`` seconds: the first round one step after the start,
    or at once with ``now``. A round that fails is logged and the next one still comes (a bare
    ``TimerService`` would stop). Stopping waits for a round in progress until ``shutdown``'s grace is over,
    then cancels it. ``clock``: the reactor (a ``task.Clock`` in tests)."""

    def __init__(self, step: float, work: Callable[[], Any], *, name: str, shutdown: Shutdown | None = None,
                 now: bool = False, clock: Any = None) -> None:
        super().__init__(step, self._round)
        self.setName(name)
        self.work = work
        self.now = now
        self.clock = clock
        self.shutdown = shutdown
        self.current: Deferred[Any] | None = None

    def _round(self) -> Deferred[None]:
        d: Deferred[Any] = defer.maybeDeferred(self.work)
        self.current = d

        def failed(failure: Any) -> None:
            if failure.check(defer.CancelledError):
                log.info("%s: the round in progress was cancelled (the server is stopping)", self.name)
            elif failure.check(VMShopError):  # a known condition (a database unreachable, ...): no traceback
                log.warning("%s failed: %s", self.name, failure.getErrorMessage())
            else:
                log.error("%s failed: %s", self.name, failure.getTraceback())

        def ended(_: Any) -> None:
            self.current = None

        d.addCallbacks(lambda _: None, failed)
        d.addBoth(ended)
        return d

    def startService(self) -> None:  # noqa: N802 - Twisted's name
        Service.startService(self)
        self._loop = task.LoopingCall(self._round)
        if self.clock is not None:
            self._loop.clock = self.clock
        else:
            from twisted.internet import reactor

            self._loop.clock = reactor
        self._loopFinished = self._loop.start(self.step, now=self.now)
        self._loopFinished.addErrback(self._failed)

    def stopService(self) -> Deferred[None]:  # noqa: N802 - Twisted's name
        Service.stopService(self)
        if self._loop.running:
            self._loop.stop()
        finished: Deferred[None] = Deferred()

        def loop_ended(_: Any) -> None:
            if not finished.called:
                finished.callback(None)

        self._loopFinished.addBoth(loop_ended)
        if self.shutdown is not None and self.current is not None:
            def cancel(_: Any) -> None:
                if self.current is not None:
                    self.current.cancel()

            self.shutdown.over().addCallback(cancel)
        return finished


class Closing(Service):
    """At stop, ``close()`` (blocking: a database, files, processes) on a thread of its own, waited for at
    most ``timeout`` seconds; not done at all when ``skip()`` is true (work abandoned at stop may still use
    what it would close: the process's exit closes it). Failures are logged."""

    def __init__(self, name: str, close: Callable[[], Any], *, skip: Callable[[], bool] = lambda: False,
                 timeout: float = AFTER_GRACE, reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.setName(name)
        self.close = close
        self.skip = skip
        self.timeout = timeout
        self.reactor = reactor

    def stopService(self) -> Deferred[None]:  # noqa: N802 - Twisted's name
        Service.stopService(self)
        if self.skip():
            log.info("%s: not closed, work abandoned at stop may still use it", self.name)
            return defer.succeed(None)

        def failed(failure: Any) -> None:
            log.error("%s failed: %s", self.name, failure.getErrorMessage())

        return in_thread(self.reactor, self.close, timeout=self.timeout, what=str(self.name)).addCallbacks(
            lambda _: None, failed)


class HangupRecorder:
    """A SIGHUP handler for a server's start-up (:func:`record_hangups`): it notes the signal, and
    :func:`run_server` reloads once the reactor runs. Without it SIGHUP's default action would end a server
    still starting."""

    def __init__(self) -> None:
        self.seen = False

    def __call__(self, signum: int, frame: Any) -> None:
        self.seen = True


def record_hangups() -> None:
    """From now on until :func:`run_server` takes over, a SIGHUP is noted, not fatal."""
    signal.signal(signal.SIGHUP, HangupRecorder())


def _watchdog(seconds: float) -> None:
    """End the process if it has not ended ``seconds`` from now (a stop that hangs)."""
    def fire() -> None:
        log.critical("the stop did not end within %.0f s: exiting now", seconds)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(1)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()


def run_server(root: ServerService, *, reload: Callable[[], Any] | None = None,
               ready: Callable[[], None] | None = None, reactor: Any = None) -> int:
    """Run the service tree ``root`` on the reactor until SIGTERM or SIGINT; returns 0 after the stop.

    The signal handlers are installed first; then the tree starts (it may raise: nothing is served then);
    then ``ready()`` (the line that says the server listens) and the reactor runs. SIGHUP calls
    ``reload()`` in the reactor thread (it may return a Deferred; failures are logged). See the module
    for what stopping does. Call it in the main thread (signal handlers live there).
    """
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    shutdown = root.shutdown
    state = {"stopping": False}

    def stop(signum: int) -> None:
        if state["stopping"]:
            log.warning("signal %d again: the grace ends now", signum)
            shutdown.end()
            return
        state["stopping"] = True
        log.info("signal %d: stopping (requests in progress have %g s)", signum, shutdown.grace)
        _watchdog(shutdown.grace + WATCHDOG_MARGIN)
        if reactor.running:
            reactor.stop()
        else:
            reactor.callWhenRunning(reactor.stop)

    def reloaded() -> None:
        if reload is None:
            return

        def failed(failure: Any) -> None:
            log.error("reload failed: %s", failure.getTraceback())

        defer.maybeDeferred(reload).addErrback(failed)

    def on_stop_signal(signum: int, frame: Any) -> None:
        reactor.callFromThread(stop, signum)

    def on_hup(signum: int, frame: Any) -> None:
        reactor.callFromThread(reloaded)

    signal.signal(signal.SIGTERM, on_stop_signal)
    signal.signal(signal.SIGINT, on_stop_signal)
    early = signal.signal(signal.SIGHUP, on_hup)
    if isinstance(early, HangupRecorder) and early.seen:
        reactor.callWhenRunning(reloaded)  # a SIGHUP while the server started: the files may have changed since
    root.privilegedStartService()
    root.startService()
    reactor.addSystemEventTrigger("before", "shutdown", root.stopService)
    if ready is not None:
        ready()
    # Our own handlers, not Twisted's (which would replace SIGTERM/SIGINT only once the reactor runs).
    reactor.run(installSignalHandlers=False)
    sys.stdout.flush()
    return 0


__all__ = ["AFTER_GRACE", "DEFAULT_GRACE", "WATCHDOG_MARGIN", "Closing", "HangupRecorder", "RoundTimer",
           "ServerService", "Shutdown", "first_of", "record_hangups", "run_server", "within"]
