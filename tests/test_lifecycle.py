"""The service-tree parts both servers are made of (``vmshop_common/lifecycle.py``, ``threads.py``,
``soap/listener.py``).

Time-driven rules (the grace, timers, ordered stops) run on ``task.Clock`` with fake services; the
thread pool and the listener run on the session's real reactor thread (``soap_harness``), with real
threads and real TLS connections, because what they promise is about those.
"""

from __future__ import annotations

import concurrent.futures
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from twisted.application.service import IService, Service
from twisted.internet import defer, task
from zope.interface.verify import verifyObject

from vmshop_common.errors import BusyError, DeadlineExceededError, ShuttingDownError
from vmshop_common.lifecycle import Closing, RoundTimer, ServerService, Shutdown, first_of
from vmshop_common.soap.listener import SoapListener
from vmshop_common.threads import ThreadPoolService, in_thread

sys.path.insert(0, str(Path(__file__).resolve().parent))
import soap_harness  # noqa: E402
from test_soap_stack import HTTP, PKI, assert_soap_fault, build_echo_site, envelope  # noqa: E402

# --- Shutdown: the grace ----------------------------------------------------------------------------------


def test_the_grace_runs_from_the_stop_and_can_be_cut_short() -> None:
    clock = task.Clock()
    shutdown = Shutdown(5, clock)
    assert shutdown.remaining() == 5
    over = shutdown.over()
    clock.advance(100)  # nothing runs before the stop begins
    assert not over.called
    shutdown.begin()
    clock.advance(3)
    assert shutdown.remaining() == 2 and not over.called
    shutdown.begin()  # a second begin changes nothing
    clock.advance(2)
    assert over.called and shutdown.ended and shutdown.remaining() == 0
    assert shutdown.over().called  # asked after the end: at once

    early = Shutdown(30, clock)
    early.begin()
    waiting = early.over()
    early.end()  # a second signal
    assert waiting.called and not clock.getDelayedCalls()


def test_first_of_fires_once_with_the_first() -> None:
    a: defer.Deferred[int] = defer.Deferred()
    b: defer.Deferred[int] = defer.Deferred()
    first = first_of(a, b)
    b.errback(RuntimeError("either way"))
    assert first.called
    a.callback(1)  # later ones change nothing


# --- ServerService: ordered stops ---------------------------------------------------------------------------


class Recorder(Service):
    """A child that notes when it starts and stops; its stop returns a Deferred the test fires."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.setName(name)
        self.log = log
        self.stopping: defer.Deferred[None] | None = None

    def startService(self) -> None:  # noqa: N802
        Service.startService(self)
        self.log.append(f"start {self.name}")

    def stopService(self) -> defer.Deferred[None]:  # noqa: N802
        Service.stopService(self)
        self.log.append(f"stop {self.name}")
        self.stopping = defer.Deferred()
        return self.stopping


def test_children_start_in_order_and_stop_one_after_the_other_in_reverse() -> None:
    clock = task.Clock()
    root = ServerService("server", Shutdown(30, clock))
    verifyObject(IService, root)
    log: list[str] = []
    first, second, third = (Recorder(name, log) for name in ("pool", "timers", "listener"))
    for child in (first, second, third):
        child.setServiceParent(root)
    root.startService()
    assert log == ["start pool", "start timers", "start listener"]
    stopped = root.stopService()
    assert root.shutdown.began is not None  # the grace began with the stop
    assert log[3:] == ["stop listener"]  # the next waits for this one
    assert third.stopping is not None
    third.stopping.callback(None)
    assert log[3:] == ["stop listener", "stop timers"]
    assert second.stopping is not None
    second.stopping.errback(RuntimeError("a failed stop does not stop the others"))
    assert log[3:] == ["stop listener", "stop timers", "stop pool"]
    assert not stopped.called
    assert first.stopping is not None
    first.stopping.callback(None)
    assert stopped.called


# --- RoundTimer -------------------------------------------------------------------------------------------------


def test_a_round_timer_starts_one_step_later_survives_failures_and_waits_for_a_round_in_progress() -> None:
    clock = task.Clock()
    shutdown = Shutdown(10, clock)
    rounds: list[defer.Deferred[None]] = []

    def work() -> defer.Deferred[None]:
        rounds.append(defer.Deferred())
        return rounds[-1]

    timer = RoundTimer(1.0, work, name="poll", shutdown=shutdown, clock=clock)
    timer.startService()
    assert rounds == []  # not at once
    clock.advance(1)
    assert len(rounds) == 1
    rounds[0].errback(RuntimeError("a bad round"))  # logged, not fatal
    clock.advance(1)
    assert len(rounds) == 2
    shutdown.begin()
    stopped = timer.stopService()
    assert not stopped.called  # the round in progress may finish...
    clock.advance(1)
    assert len(rounds) == 2  # ...and no new one starts
    rounds[1].callback(None)
    assert stopped.called


def test_a_round_failing_with_a_known_fault_is_logged_in_one_line(caplog: pytest.LogCaptureFixture) -> None:
    """A round that fails with a project error (a registry unreachable) is a warning, not a traceback."""
    from vmshop_common.errors import RegistryUnavailableError

    clock = task.Clock()
    timer = RoundTimer(1.0, lambda: defer.fail(RegistryUnavailableError("the registry cannot be reached")),
                       name="state poll", shutdown=Shutdown(10, clock), clock=clock)
    timer.startService()
    with caplog.at_level("WARNING"):
        clock.advance(1)
    assert "state poll failed: the registry cannot be reached" in caplog.text
    assert "Traceback" not in caplog.text
    timer.stopService()


def test_a_round_still_running_when_the_grace_ends_is_cancelled() -> None:
    clock = task.Clock()
    shutdown = Shutdown(3, clock)
    cancelled: list[bool] = []
    timer = RoundTimer(1.0, lambda: defer.Deferred(lambda d: cancelled.append(True)), name="watch",
                       shutdown=shutdown, clock=clock, now=True)
    timer.startService()
    shutdown.begin()
    stopped = timer.stopService()
    clock.advance(2.9)
    assert not stopped.called and not cancelled
    clock.advance(0.2)
    assert cancelled == [True] and stopped.called


def test_a_closer_runs_on_a_thread_and_is_skipped_when_abandoned_work_may_use_it(
        rt: soap_harness.ReactorThread) -> None:
    threads: list[str] = []
    closer = Closing("closing", lambda: threads.append(threading.current_thread().name), reactor=rt.reactor)
    rt.call(closer.stopService)
    assert threads and threads[0] != "twisted-reactor"
    skipped = Closing("closing", lambda: threads.append("again"), skip=lambda: True, reactor=rt.reactor)
    rt.call(skipped.stopService)
    assert threads == threads[:1]


# --- ThreadPoolService ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rt() -> soap_harness.ReactorThread:
    return soap_harness.reactor_thread()


def started_pool(rt: soap_harness.ReactorThread, size: int, *, grace: float = 30.0,
                 deadline: float | None = None) -> tuple[ThreadPoolService, Shutdown]:
    shutdown = Shutdown(grace, rt.reactor)
    pool = ThreadPoolService(size, name="test-pool", deadline=deadline, grace=shutdown, reactor=rt.reactor)
    rt.call(pool.startService)
    return pool, shutdown


def test_the_pool_answers_results_and_failures(rt: soap_harness.ReactorThread) -> None:
    pool, _ = started_pool(rt, 2)
    try:
        assert rt.call(pool.run, lambda a, b: a + b, 2, 3) == 5
        with pytest.raises(ZeroDivisionError):
            rt.call(pool.run, lambda: 1 / 0)
        names = rt.call(pool.run, lambda: (threading.current_thread().name, threading.current_thread().daemon))
        assert names[0] != "twisted-reactor" and names[1] is True  # never joined at exit
    finally:
        rt.call(pool.stopService)


def test_a_burst_gets_a_thread_per_work_up_to_the_size_and_no_more(rt: soap_harness.ReactorThread) -> None:
    """Works submitted at once run at once while threads remain (none waits behind a busy one), never more than
    the size at a time; threads are reused afterwards."""
    pool, _ = started_pool(rt, 3)
    gate = threading.Barrier(3, timeout=10)
    running, most, lock = [0], [0], threading.Lock()

    def work() -> str:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            gate.wait()  # all three must run at once, or this times out
        except threading.BrokenBarrierError:
            pass
        with lock:
            running[0] -= 1
        return threading.current_thread().name

    try:
        ds = rt.call(lambda: [pool.run(work) for _ in range(6)])  # two rounds of three
        deadline = time.monotonic() + 20
        while not all(d.called for d in ds):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        names = [d.result for d in ds]
        assert most[0] == 3 and not gate.broken and len(set(names)) == 3
        assert len(pool.pool._threads) == 3
    finally:
        rt.call(pool.stopService)
    assert not pool.pool._threads


def test_work_past_its_deadline_is_answered_and_its_thread_is_replaced_meanwhile(
        rt: soap_harness.ReactorThread) -> None:
    pool, _ = started_pool(rt, 1, deadline=0.3)
    release = threading.Event()
    try:
        started = time.monotonic()
        with pytest.raises(DeadlineExceededError, match="within 0.3 s"):
            rt.call(pool.run, release.wait, 60, what="a hung work")
        assert time.monotonic() - started < 10
        assert pool.busy == ["a hung work"]
        # The one thread is still taken, yet the next work runs: the pool has a thread more while it is.
        assert rt.call(pool.run, lambda: "next", deadline=None) == "next"
        release.set()
        deadline = time.monotonic() + 10
        while pool.busy:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert pool.pool.max == 1  # back to its size
    finally:
        release.set()
        rt.call(pool.stopService)


def test_a_stopping_pool_takes_no_work_waits_for_the_grace_then_abandons_never_joining(
        rt: soap_harness.ReactorThread) -> None:
    pool, shutdown = started_pool(rt, 2, grace=0.5)
    release = threading.Event()
    try:
        running = rt.call(lambda: {"work": pool.run(release.wait, 60, what="a long create")})  # started, not awaited

        def stop() -> defer.Deferred[None]:
            shutdown.begin()
            return pool.stopService()

        started = time.monotonic()
        rt.call(stop)
        assert 0.4 < time.monotonic() - started < 10  # the grace, not the work's 60 s
        assert pool.abandoned == ["a long create"]
        with pytest.raises(ShuttingDownError):
            rt.call(pool.run, lambda: None)
        assert not running["work"].called  # the work goes on, on its daemon thread
    finally:
        release.set()


def test_work_beyond_the_queue_is_refused_at_once(rt: soap_harness.ReactorThread) -> None:
    shutdown = Shutdown(0.5, rt.reactor)
    pool = ThreadPoolService(1, name="test-pool", queue=2, grace=shutdown, reactor=rt.reactor)
    rt.call(pool.startService)
    release = threading.Event()
    try:
        rt.call(lambda: {"works": [pool.run(release.wait, 60) for _ in range(3)]})  # one runs, two wait
        with pytest.raises(BusyError, match="2 requests wait"):
            rt.call(pool.run, lambda: None)
        release.set()
        deadline = time.monotonic() + 10
        while pool.busy:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert rt.call(pool.run, lambda: "room again") == "room again"
    finally:
        release.set()
        rt.call(pool.stopService)


def test_an_idle_pool_stops_at_once(rt: soap_harness.ReactorThread) -> None:
    pool, _ = started_pool(rt, 2)
    rt.call(pool.run, lambda: None)
    started = time.monotonic()
    rt.call(pool.stopService)
    assert time.monotonic() - started < 1 and not pool.abandoned and not pool.pool.started


def test_a_one_off_thread_has_a_deadline_too(rt: soap_harness.ReactorThread) -> None:
    daemon = rt.call(lambda: in_thread(rt.reactor, lambda: threading.current_thread().daemon, timeout=5, what="x"))
    assert daemon is True
    release = threading.Event()
    try:
        with pytest.raises(DeadlineExceededError, match="re-reading a file"):
            rt.call(lambda: in_thread(rt.reactor, release.wait, 60, timeout=0.2, what="re-reading a file"))
    finally:
        release.set()


# --- SoapListener -------------------------------------------------------------------------------------------


@pytest.fixture
def listener(rt: soap_harness.ReactorThread) -> Iterator[tuple[SoapListener, Shutdown]]:
    shutdown = Shutdown(1.0, rt.reactor)
    served = SoapListener(build_echo_site(), "127.0.0.1", 0, shutdown=shutdown, tls=PKI.credentials("shop"),
                          reactor=rt.reactor, after_grace=2.0)
    rt.call(served.startService)
    yield served, shutdown
    if served.running:
        rt.call(stop_listener, served, shutdown)


def stop_listener(listener: SoapListener, shutdown: Shutdown) -> defer.Deferred[None]:
    shutdown.begin()
    return listener.stopService()


def slow(seconds: float) -> bytes:
    return envelope(f"<t:slow><t:seconds>{seconds}</t:seconds></t:slow>")


def post(session: requests.Session | None, url: str, body: bytes) -> requests.Response:
    """POST ``body`` as the admin, on ``session`` (kept open) or on a session of its own (closed after)."""
    own = session is None
    session = session or PKI.session("admin")
    try:
        return session.post(url, data=body, headers={"Content-Type": "text/xml; charset=utf-8"}, timeout=30)
    finally:
        if own:
            session.close()


def test_a_request_that_ends_within_the_grace_is_answered(
        rt: soap_harness.ReactorThread, listener: tuple[SoapListener, Shutdown]) -> None:
    served, shutdown = listener
    url = served.public_url
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        answer = pool.submit(post, None, url, slow(0.5))
        wait_until(lambda: served.site.soap_resource.pending)
        started = time.monotonic()
        rt.call(stop_listener, served, shutdown)
        assert time.monotonic() - started < 1.0  # it did not wait for the whole grace
        response = answer.result(30)
    assert response.status_code == 200 and b"slept" in response.content
    assert not served.site.channels


def test_a_request_past_the_grace_is_cancelled_and_nothing_new_is_taken(
        rt: soap_harness.ReactorThread, listener: tuple[SoapListener, Shutdown]) -> None:
    served, shutdown = listener
    url = served.public_url
    kept_alive = PKI.session("admin")
    assert post(kept_alive, url, envelope("<t:echo><t:s>hello</t:s></t:echo>")).status_code == 200
    with kept_alive, concurrent.futures.ThreadPoolExecutor(2) as pool:
        long = pool.submit(post, None, url, slow(60))
        wait_until(lambda: served.site.soap_resource.pending)
        started = time.monotonic()
        stopping = pool.submit(rt.call, stop_listener, served, shutdown, timeout=30)
        wait_until(lambda: not served.site.soap_resource.accepting)
        with pytest.raises(requests.exceptions.ConnectionError):  # no new connection
            post(None, url, envelope("<t:echo><t:s>late</t:s></t:echo>"))
        answer = long.result(30)
        stopping.result(30)
    assert 0.9 < time.monotonic() - started < 10
    assert_soap_fault(answer, "Server.ShuttingDown")
    assert not served.site.channels  # the kept-alive connection was closed too


def test_a_new_request_on_a_kept_alive_connection_during_the_grace_gets_shutting_down(
        rt: soap_harness.ReactorThread) -> None:
    """Closing idle connections and the request on one crossing: the request is refused, 503."""
    site = build_echo_site()
    resource = site.soap_resource
    served = soap_harness.serve_in_thread(site, rt=rt)
    try:
        rt.call(resource.stop_accepting)
        response = HTTP.post(served.url, data=envelope("<t:echo><t:s>x</t:s></t:echo>"),
                             headers={"Content-Type": "text/xml"}, timeout=30)
        assert_soap_fault(response, "Server.ShuttingDown", status=503)
        assert response.headers.get("Connection") == "close"
    finally:
        served.stop()


def wait_until(predicate: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


# --- the shop's tree ----------------------------------------------------------------------------------------------


def test_the_shops_tree_starts_the_listener_last_and_stops_it_first(tmp_path: Path) -> None:
    from vmshop_common.security import ServerSecurity
    from vmshop_service.config import ShopConfig
    from vmshop_service.main import build_shop

    plants = tmp_path / "vmplant_addresses.txt"
    plants.write_text("127.0.0.1:9001\n")
    config = ShopConfig(database=tmp_path / "registry.sqlite3", plants_file=plants, shutdown_grace=7,
                        security=ServerSecurity(insecure=True))
    server = build_shop(config, port=0, reactor=task.Clock())
    assert [child.name for child in server.root] == ["closing the registry", "vmshop-pool", "shop", "lease timer",
                                                     "state poll", "metrics refresh", "offer pull", "listener"]
    assert server.root.shutdown.grace == 7 and server.pool.deadline == 60
    assert server.shop.pool is server.pool
