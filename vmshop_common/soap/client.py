"""Call SOAP servers from inside a Twisted service without blocking the reactor.

:class:`AsyncSoapClient` lets Twisted's ``Agent`` do the network I/O while
zeep only builds the request envelope and parses the reply (both in the
reactor thread, well under 1 ms each). There is no thread pool to size, so N calls at
once really run at once, each with its own timeout, and a timeout cancels the
HTTP request (the connection is aborted).

Measured on a 2-core machine (Python 3.11, Twisted 26.10, zeep 4.3.3), a
method that waits 0.3 s, median of 10 rounds after a warm-up:

=========================================  ========  ======================  ==========================
client                                     1 call    32 at once, 32 sites    32 at once, 32 processes
                                                     in one process
=========================================  ========  ======================  ==========================
this class (Agent I/O, zeep parsing)       0.305 s   0.354 s                 0.365 s
deferToThread, a zeep Client per thread:
  Twisted's default pool (10 threads)      0.307 s   1.281 s                 -
  the pool raised to 32 threads            0.305 s   0.367 s                 0.492 s
=========================================  ========  ======================  ==========================

Single rounds can be slow (up to ~0.9 s with 32 processes on 2 cores):
benchmarks should compare medians, after a warm-up call (first calls import
lazily loaded modules and open connections).

zeep's share is small (building an envelope ~0.06 ms, parsing a reply
~0.09 ms); what 32 calls add is mostly the servers' own work. Threads also
give no total per-call timeout (requests' timeouts are per socket
operation), cannot be cancelled, and share the reactor's pool with DNS
look-ups and every other ``deferToThread``.

Usage, in the reactor thread (e.g. inside a service method)::

    plant = AsyncSoapClient("wsdl/vmplant.wsdl", "http://127.0.0.1:9001/", timeout=10)
    d = plant.call("estimate", dag=dag_xml)     # Deferred -> zeep-parsed result

    def no_bid(failure):
        failure.trap(zeep.exceptions.Fault)
        return fault_code(failure.value)        # e.g. "Client.Declined"

    d.addErrback(no_bid)

    # all or nothing; a failure is the original one, not defer.FirstError:
    d = gather_results(c.call("estimate", dag=dag_xml) for c in plants)

Errors a call's Deferred can fail with:

* ``zeep.exceptions.Fault``: the server answered a SOAP fault; ``.code`` is
  as sent (``soap11env:Client.NoSuchPlant``), :func:`fault_code` gives
  ``Client.NoSuchPlant``;
* :class:`SoapCallTimeout` (a ``twisted.internet.defer.TimeoutError``): no
  complete answer within the timeout;
* ``zeep.exceptions.TransportError``: an HTTP error without a SOAP body, a
  reply that is not XML, or a reply over ``max_response_bytes``;
* Twisted's connection errors (``ConnectionRefusedError``, ``ResponseFailed``...);
* ``ValueError``/``TypeError``/``zeep.exceptions.ValidationError`` for an
  unknown operation or bad arguments.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import zeep
import zeep.exceptions
from lxml import etree
from requests.structures import CaseInsensitiveDict
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IResponse
from zeep.wsdl.utils import etree_to_string
from zope.interface import implementer

from vmshop_common.errors import CredentialsError
from vmshop_common.tls import requests_tls

DEFAULT_MAX_RESPONSE_BYTES = 16 * 1024 * 1024
"""Default largest reply body accepted (bytes)."""


class SoapCallTimeout(defer.TimeoutError):
    """A SOAP call got no complete answer within its timeout."""

    def __init__(self, operation: str, address: str, timeout: float) -> None:
        super().__init__(f"{operation} at {address}: no answer within {timeout:g} s")
        self.operation = operation
        self.address = address
        self.timeout = timeout


def fault_code(fault: zeep.exceptions.Fault) -> str:
    """The fault code without its namespace prefix: ``soap11env:Client.X`` -> ``Client.X``."""
    code = fault.code or ""
    if isinstance(code, etree.QName):
        code = code.localname
    return str(code).rsplit(":", 1)[-1]


def unwrap_first_error(failure: Failure) -> Failure:
    """The original failure inside ``defer.FirstError`` (from ``gatherResults``), recursively.

    Use as an errback: returning the unwrapped failure keeps the chain failing
    with the original exception (e.g. the ``zeep.exceptions.Fault`` and its code).
    Any other failure is returned unchanged.
    """
    while failure.check(defer.FirstError):
        first: Any = failure.value
        failure = first.subFailure
    return failure


def gather_results(deferreds: Iterable[Deferred[Any]]) -> Deferred[list[Any]]:
    """``gatherResults`` (fail fast) whose failure is the first original failure, not ``FirstError``.

    The other Deferreds' failures are consumed (not logged as unhandled).
    """
    d: Deferred[list[Any]] = defer.gatherResults(list(deferreds), consumeErrors=True)
    d.addErrback(unwrap_first_error)
    return d


@implementer(IBodyProducer)
class _BytesProducer:
    """A request body that is already in memory."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: Any) -> Deferred[None]:
        consumer.write(self.body)
        return defer.succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


_RESPONSE_DONE = Failure(ResponseDone())


class _LimitedBody(Protocol):
    """Collects a response body up to ``limit`` bytes (past it: aborts and fails)."""

    def __init__(self, deferred: Deferred[bytes], limit: int) -> None:
        self.deferred = deferred
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0

    def dataReceived(self, data: bytes) -> None:
        if self.deferred.called:
            return
        self.size += len(data)
        if self.size > self.limit:
            self.deferred.errback(
                zeep.exceptions.TransportError(f"reply longer than {self.limit} bytes, connection aborted")
            )
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        self.parts.append(data)

    def connectionLost(self, reason: Failure = _RESPONSE_DONE) -> None:  # type: ignore[override]
        if self.deferred.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.deferred.callback(b"".join(self.parts))
        else:
            self.deferred.errback(reason)


def _read_body(response: Any, limit: int) -> Deferred[bytes]:
    protocol: _LimitedBody

    def cancel(_d: Deferred[bytes]) -> None:
        abort = getattr(protocol.transport, "abortConnection", None)
        if abort is not None:
            abort()

    d: Deferred[bytes] = Deferred(cancel)
    protocol = _LimitedBody(d, limit)
    response.deliverBody(protocol)
    return d


class _Reply:
    """The part of ``requests.Response`` that zeep's ``process_reply`` reads."""

    def __init__(self, status_code: int, headers: Headers, content: bytes) -> None:
        self.status_code = status_code
        self.content = content
        self.encoding: str | None = None
        self.headers: CaseInsensitiveDict[str] = CaseInsensitiveDict()
        for name, values in headers.getAllRawHeaders():
            self.headers[name.decode("latin-1")] = ", ".join(v.decode("latin-1") for v in values)


class NoDelayConnectionPool(HTTPConnectionPool):
    """A connection pool whose connections have Nagle's algorithm off.

    A request is written in pieces (headers, then body); with Nagle on, each
    call on a kept-alive connection can wait for the server's delayed ACK.
    """

    def _newConnection(self, key: Any, endpoint: Any) -> Deferred[Any]:  # noqa: N802 - Twisted's name
        def no_delay(protocol: Any) -> Any:
            transport = getattr(protocol, "transport", None)
            if transport is not None and hasattr(transport, "setTcpNoDelay"):
                transport.setTcpNoDelay(True)
            return protocol

        return super()._newConnection(key, endpoint).addCallback(no_delay)  # type: ignore[no-any-return]


def _safe_settings() -> zeep.Settings:
    return zeep.Settings(strict=True, forbid_dtd=True, forbid_entities=True, forbid_external=True)


def load_wsdl(wsdl: str | os.PathLike[str], *, settings: zeep.Settings | None = None, tls: Any = None,
              timeout: float = 30.0) -> zeep.Client:
    """The WSDL at ``wsdl`` (a path or URL), parsed once, for any number of :class:`AsyncSoapClient`.

    Parsing a WSDL is blocking work (the shop's and the plant's take tens of milliseconds; a URL is
    fetched): do it at start-up or on a thread, never in the reactor thread of a running server. The
    result is only read by the clients made from it. ``settings`` default to refusing DTDs, entities and
    external references in replies; ``tls``: a :class:`~vmshop_common.tls.ClientPolicy` for an https URL.
    """
    transport = zeep.Transport(timeout=timeout, operation_timeout=timeout)
    if tls is not None and getattr(tls, "ca_file", None) is not None:
        requests_tls(transport.session, tls.credentials, tls.ca_file)  # a WSDL fetched over https
    try:
        return zeep.Client(os.fspath(wsdl), settings=settings or _safe_settings(), transport=transport)
    finally:
        transport.session.close()  # only used to load the WSDL; calls go through the Agent


class AsyncSoapClient:
    """A non-blocking SOAP client for one server, for use in the reactor thread.

    :param wsdl: a WSDL parsed by :func:`load_wsdl` (shared: making a client
        from it takes no blocking work), or the path or URL of one, then
        loaded here, synchronously (at start-up only; never from a URL served
        by the reactor of this very thread before it runs, that would deadlock).
    :param address: the server's endpoint URL; ``None`` uses the WSDL's
        ``soap:address``.
    :param timeout: seconds each call may take, connecting included; applies
        per call (see :meth:`call_with_timeout`).
    :param binding: QName (``{tns}Name``) of the binding to use; ``None``:
        the WSDL's only binding.
    :param reactor: the reactor (default: the global one).
    :param pool: a ``HTTPConnectionPool`` to share; ``None``: a private
        persistent pool (close it with :meth:`close`).
    :param max_response_bytes: largest reply accepted.
    :param settings: zeep settings; default forbids DTDs, entities and
        external references in replies (only used when ``wsdl`` is loaded here).
    :param tls: for an https address: a :class:`~vmshop_common.tls.ClientPolicy`
        (the CA bundle that verifies the server, and the client certificate
        presented). An https address without one raises
        :class:`~vmshop_common.errors.CredentialsError`: calls are never
        made to an unverified server.

    :meth:`call` must be called in the reactor thread; it never blocks.
    """

    def __init__(
        self,
        wsdl: str | os.PathLike[str] | zeep.Client,
        address: str | None = None,
        timeout: float = 30.0,
        *,
        binding: str | None = None,
        reactor: Any = None,
        pool: HTTPConnectionPool | None = None,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        settings: zeep.Settings | None = None,
        tls: Any = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.reactor = reactor
        self.timeout = float(timeout)
        self.max_response_bytes = max_response_bytes
        if isinstance(wsdl, zeep.Client):
            self.zeep = wsdl
        else:
            self.zeep = load_wsdl(wsdl, settings=settings, tls=tls, timeout=timeout)
        if binding is None:
            names = list(self.zeep.wsdl.bindings)
            if len(names) != 1:
                raise ValueError(f"the WSDL has {len(names)} bindings, name one of {sorted(names)}")
            binding = names[0]
        if address is None:
            proxy = self.zeep.service
            if proxy._binding.name.text != etree.QName(binding).text:
                raise ValueError("address is required when the binding is not the WSDL's default port")
        else:
            proxy = self.zeep.create_service(binding, address)
        self._binding = proxy._binding
        self._options: dict[str, Any] = proxy._binding_options
        self.address: str = self._options["address"]
        if tls is None and self.address.lower().startswith("https:"):
            raise CredentialsError(f"{self.address} is https, and this client has no TLS credentials to verify it")
        self._own_pool = pool is None
        if pool is None:
            pool = NoDelayConnectionPool(reactor, persistent=True)
            pool.maxPersistentPerHost = 8
            pool.retryAutomatically = False
        self.pool = pool
        agent_options: dict[str, Any] = {"contextFactory": tls} if tls is not None else {}
        self._agent = Agent(reactor, connectTimeout=max(1, int(timeout + 0.999)), pool=pool, **agent_options)

    @property
    def operations(self) -> list[str]:
        """Names of the operations of the binding."""
        return sorted(self._binding._operations)

    def call(self, op_name: str, /, **kwargs: Any) -> Deferred[Any]:
        """Call ``op_name`` with ``kwargs``; fires with zeep's parsed result.

        Fails with ``zeep.exceptions.Fault`` (original code kept),
        :class:`SoapCallTimeout` after ``self.timeout`` seconds, or the
        errors listed in the module docstring. Cancelling the Deferred aborts
        the HTTP request; it then fails with ``CancelledError``.
        """
        return self.call_with_timeout(self.timeout, op_name, **kwargs)

    def call_with_timeout(self, timeout: float, op_name: str, /, **kwargs: Any) -> Deferred[Any]:
        """:meth:`call` with its own ``timeout`` (seconds)."""
        try:
            envelope, http_headers = self._binding._create(op_name, (), kwargs, client=self.zeep, options=self._options)
            operation = self._binding.get(op_name)
            body = etree_to_string(envelope)
        except Exception:
            return defer.fail()
        headers = Headers({b"User-Agent": [b"vmshop-soap-client"]})
        for name, value in http_headers.items():
            headers.setRawHeaders(name.encode("latin-1"), [str(value).encode("latin-1")])
        producer: Any = _BytesProducer(body)
        d: Deferred[Any] = self._agent.request(b"POST", self.address.encode("ascii"), headers, producer)

        def _got_response(response: IResponse) -> Deferred[Any]:
            return _read_body(response, self.max_response_bytes).addCallback(
                lambda content: _Reply(response.code, response.headers, content)
            )

        def _timed_out(result: Any, _timeout: float) -> Any:
            # Only called when the timeout fired: whatever failure the
            # cancellation produced (CancelledError, ResponseNeverReceived...)
            # is the timeout.
            if isinstance(result, Failure):
                raise SoapCallTimeout(op_name, self.address, timeout)
            return result

        def _cancelled(failure: Failure) -> Failure:
            # Twisted's Agent reports a request cancelled while it waited as ResponseNeverReceived or
            # ResponseFailed holding a CancelledError: the caller that cancelled sees its CancelledError.
            reasons = getattr(failure.value, "reasons", None) or []
            if any(reason.check(defer.CancelledError) for reason in reasons):
                return Failure(defer.CancelledError(f"{op_name} at {self.address} was cancelled"))
            return failure

        d.addCallback(_got_response)
        d.addCallback(lambda reply: self._binding.process_reply(self.zeep, operation, reply))
        d.addErrback(_cancelled)
        d.addTimeout(timeout, self.reactor, onTimeoutCancel=_timed_out)
        return d

    def close(self) -> Deferred[None]:
        """Close the cached connections of the private pool (no-op for a shared pool)."""
        if self._own_pool:
            return self.pool.closeCachedConnections()
        return defer.succeed(None)


__all__ = [
    "DEFAULT_MAX_RESPONSE_BYTES",
    "AsyncSoapClient",
    "SoapCallTimeout",
    "fault_code",
    "gather_results",
    "load_wsdl",
    "unwrap_first_error",
]
