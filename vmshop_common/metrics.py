"""Prometheus metrics of a server (shop or plant), served at ``/metrics`` on the SOAP listener.

Design (one of the two the issue allowed): the metrics are served by the
SOAP server's own listener, at ``GET /metrics``, behind the same TLS and
identity checks as the SOAP service; only a caller whose identity has the
``admin`` role may read them (an insecure loopback server's callers are
all ``anonymous``, who has every role). No second port is opened, so no
second thing has to be bound to loopback, firewalled or given TLS. A
Prometheus server scrapes with ``scheme: https`` and a client certificate
the authorisation file maps to an admin (see README, "Metrics").

Contract:

* Each server has its own :class:`ServerMetrics` with its own
  ``CollectorRegistry`` (never prometheus_client's process-wide one: tests
  run shops and plants in one process, and module state is shared state).
* Label values come from fixed, bounded sets, never from a caller's bytes:
  ``operation`` is one of the service's own operations, or ``unknown`` for
  a request refused before its operation was read (authentication,
  DOCTYPE, size, envelope) or naming no operation the service has; a fault
  ``code`` is kept when it has the shape of a SOAP fault code and fewer than
  :data:`MAX_FAULT_CODES` distinct codes were seen, else it is ``other``.
  So a scrape is a few hundred lines (a few thousand at most).
* Nothing here blocks the reactor: counters and histograms are updated
  where things happen (reactor or worker threads: prometheus_client's
  metrics are thread-safe); values that need the database (VMs by state,
  registry size) are refreshed by a timer on the server's thread pool
  (:class:`MetricsRefresh`) and a scrape reads the last refreshed values.
  The text itself is rendered on a thread of its own (prometheus_client
  takes ~50 us a line: 20 ms for 400 lines on a loaded 2-core host), one
  rendering at a time: scrapes that come meanwhile share it (so scrapes
  are no way to start threads), within :data:`RENDER_DEADLINE`.
* A scrape that is refused gets a plain-text 403 naming why (it is not a
  SOAP request, so not a SOAP fault); any method but GET and HEAD gets 405.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from .authz import ADMIN
from .errors import VMShopError
from .threads import in_thread
from .tls import peer_subject

log = logging.getLogger(__name__)

METRICS_PATH = b"/metrics"
"""Where a server with metrics serves them (on its SOAP listener)."""

DEFAULT_REFRESH = 15.0
"""Seconds between two refreshes of the values read from the database."""

RENDER_DEADLINE = 10.0
"""Seconds rendering the metrics may take before the scrape is answered 503."""

UNKNOWN_OPERATION = "unknown"
OTHER_CODE = "other"
MAX_FAULT_CODES = 64
"""Distinct fault codes a server labels by name; more are counted as ``other``."""

_FAULT_CODE = re.compile(r"[A-Za-z][A-Za-z0-9]{0,31}(?:\.[A-Za-z][A-Za-z0-9_]{0,47}){0,3}")

#: Seconds: from a trivial call to a create that boots a guest and runs its DAG (up to the 900 s default).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
                   900.0, float("inf"))
#: Seconds: a bid (offer) round asks every plant at once, each within the bid timeout (10 s by default).
ROUND_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, float("inf"))


def operation_names(app: Any) -> frozenset[str]:
    """The operations a spyne ``Application`` serves (the only values of the ``operation`` label)."""
    return frozenset(name for service in app.services for name in service.public_methods)


class ServerMetrics:
    """A server's metrics: its SOAP requests, faults and their latency, plus what the server adds.

    ``prefix`` (``vmshop`` or ``vmplant``) starts every metric's name. :meth:`answered` is the hook the SOAP
    resource calls for every answer it sends; servers add metrics of their own to :attr:`registry`.
    """

    def __init__(self, prefix: str, operations: Iterable[str]) -> None:
        self.prefix = prefix
        self.operations = frozenset(operations)
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(f"{prefix}_requests", "SOAP requests answered, by operation",
                                ["operation"], registry=self.registry)
        self.faults = Counter(f"{prefix}_faults", "SOAP faults answered, by operation and fault code",
                              ["operation", "code"], registry=self.registry)
        self.latency = Histogram(f"{prefix}_request_seconds",
                                 "Seconds from a SOAP request's arrival to its answer (faults included), by operation",
                                 ["operation"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self._codes: set[str] = set()
        self._lock = threading.Lock()

    def operation(self, method_request_string: str | None) -> str:
        """The ``operation`` label for spyne's ``{namespace}name`` of a request (``unknown`` if not ours)."""
        if not method_request_string:
            return UNKNOWN_OPERATION
        name = method_request_string.rpartition("}")[2]
        return name if name in self.operations else UNKNOWN_OPERATION

    def code(self, fault_code: str) -> str:
        """The ``code`` label for a fault code (bounded: see the module's contract)."""
        if len(fault_code) > 128 or not _FAULT_CODE.fullmatch(fault_code):
            return OTHER_CODE
        with self._lock:
            if fault_code in self._codes:
                return fault_code
            if len(self._codes) >= MAX_FAULT_CODES:
                return OTHER_CODE
            self._codes.add(fault_code)
            return fault_code

    def answered(self, method_request_string: str | None, fault_code: str | None, seconds: float | None) -> None:
        """One answer sent: for the operation of ``method_request_string``, a fault (its code) or not (``None``);
        ``seconds`` since the request arrived, when known."""
        operation = self.operation(method_request_string)
        self.requests.labels(operation).inc()
        if fault_code is not None:
            self.faults.labels(operation, self.code(fault_code)).inc()
        if seconds is not None:
            self.latency.labels(operation).observe(max(seconds, 0.0))

    def exposition(self) -> bytes:
        """The metrics in Prometheus' text format."""
        return generate_latest(self.registry)


class MetricsRefresh:
    """Values read from the server's database, refreshed by a timer on its thread pool.

    ``read`` runs on a worker thread and returns ``{gauge: {label value or (): value}}``; the gauges are
    updated from the reactor once it returns. A label value seen before and missing now is set to 0 (a state
    with no VM left still shows, at 0). ``run`` is what a :class:`~vmshop_common.lifecycle.RoundTimer` calls.
    """

    def __init__(self, read: Callable[[], dict[Gauge, dict[Any, float]]],
                 in_thread: Callable[[Callable[[], Any]], Any]) -> None:
        self.read = read
        self.in_thread = in_thread
        self._seen: dict[Gauge, set[Any]] = {}
        self.rounds = 0

    def run(self) -> Any:
        """One refresh. A busy pool or a slow database skips it (logged in one line; the last values stay)."""
        return self.in_thread(self.read).addCallbacks(self.apply, self._missed)

    @staticmethod
    def _missed(failure: Failure) -> None:
        if failure.check(defer.CancelledError):
            failure.raiseException()  # the server is stopping: the timer says so itself
        log.warning("the metrics' counts were not refreshed (the last ones stay): %s", failure.getErrorMessage())

    def apply(self, values: dict[Gauge, dict[Any, float]]) -> None:
        for gauge, by_label in values.items():
            seen = self._seen.setdefault(gauge, set())
            for label in seen - set(by_label):
                _child(gauge, label).set(0)
            for label, value in by_label.items():
                _child(gauge, label).set(value)
                seen.add(label)
        self.rounds += 1


def _child(gauge: Gauge, label: Any) -> Any:
    if label == ():
        return gauge
    return gauge.labels(*label) if isinstance(label, tuple) else gauge.labels(label)


class MetricsResource(Resource):
    """``GET /metrics``: the server's metrics, for callers with the admin role (see the module's contract).

    ``identities`` is read from ``site`` at each request (SIGHUP may replace the authorisation file's content).
    """

    isLeaf = True

    def __init__(self, metrics: ServerMetrics, site: Any, reactor: Any = None) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.metrics = metrics
        self.site = site
        self.reactor = reactor
        self._rendering: list[Deferred[bytes]] = []  # the scrapes waiting for the rendering in progress

    def render(self, request: Request) -> bytes | int:
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"Allow", b"GET, HEAD")
            return self._plain(request, 405, "only GET reads the metrics")
        refusal = self._refusal(request)
        if refusal is not None:
            log.info("metrics refused: %s", refusal)
            return self._plain(request, 403, refusal)
        self._rendered().addCallbacks(lambda body: self._send(request, 200, CONTENT_TYPE_LATEST.encode(), body),
                                      lambda failure: self._failed(request, failure))
        return NOT_DONE_YET

    def _rendered(self) -> Deferred[bytes]:
        """The exposition, rendered on a thread; a rendering in progress is shared."""
        waiter: Deferred[bytes] = Deferred()
        self._rendering.append(waiter)
        if len(self._rendering) == 1:
            def done(result: Any) -> None:
                waiters, self._rendering = self._rendering, []
                for each in waiters:
                    if isinstance(result, Failure):
                        each.errback(result)
                    else:
                        each.callback(result)

            in_thread(self.reactor, self.metrics.exposition, timeout=RENDER_DEADLINE,
                      what="rendering the metrics").addBoth(done)
        return waiter

    def _failed(self, request: Request, failure: Failure) -> None:
        log.error("the metrics were not rendered: %s", failure.getErrorMessage())
        self._send(request, 503, b"text/plain; charset=utf-8", b"the metrics could not be rendered in time\n")

    @staticmethod
    def _send(request: Request, status: int, content_type: bytes, body: bytes) -> None:
        if request.finished or getattr(request, "_disconnected", False):
            return  # the scraper left
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", content_type)
        request.setHeader(b"Content-Length", b"%d" % len(body))
        if request.method != b"HEAD":
            request.write(body)
        request.finish()

    def _refusal(self, request: Request) -> str | None:
        """Why ``request`` may not read the metrics, or ``None``."""
        identities = getattr(self.site, "identities", None)
        if identities is None:
            return "this server knows no identities, so no admin"
        subject = peer_subject(request.channel.transport) if request.isSecure() else None
        try:
            identity = identities.identify(subject)
        except VMShopError as exc:
            return f"[{exc.code}] {exc.message}"
        if ADMIN not in identity.roles:
            return f"'{identity.name}' is not an admin: only admins read the metrics"
        return None

    @staticmethod
    def _plain(request: Request, status: int, text: str) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return (text + "\n").encode()


def new_gauge(metrics: ServerMetrics, name: str, documentation: str, labels: Iterable[str] = ()) -> Gauge:
    """A gauge ``<prefix>_<name>`` in ``metrics``' registry."""
    return Gauge(f"{metrics.prefix}_{name}", documentation, list(labels), registry=metrics.registry)


def new_counter(metrics: ServerMetrics, name: str, documentation: str, labels: Iterable[str] = ()) -> Counter:
    """A counter ``<prefix>_<name>`` (exposed as ``..._total``) in ``metrics``' registry."""
    return Counter(f"{metrics.prefix}_{name}", documentation, list(labels), registry=metrics.registry)


def new_histogram(metrics: ServerMetrics, name: str, documentation: str,
                  buckets: Iterable[float] = LATENCY_BUCKETS) -> Histogram:
    """A histogram ``<prefix>_<name>`` in ``metrics``' registry."""
    return Histogram(f"{metrics.prefix}_{name}", documentation, buckets=tuple(buckets), registry=metrics.registry)


__all__ = [
    "DEFAULT_REFRESH",
    "LATENCY_BUCKETS",
    "METRICS_PATH",
    "RENDER_DEADLINE",
    "ROUND_BUCKETS",
    "MetricsRefresh",
    "MetricsResource",
    "ServerMetrics",
    "new_counter",
    "new_gauge",
    "new_histogram",
    "operation_names",
]
