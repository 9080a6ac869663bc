"""Make Spyne 2.14.0's Twisted transport work on Python 3.11 and Twisted 26.10.

Import this module *before* anything imports ``spyne.server.twisted``
(``vmshop_common.soap.server`` does it for you). It implements route 1 of the
stack notes: Spyne's ``TwistedWebResource`` plus a small compatibility layer,
so that service methods may return Deferreds.

What is fixed, and how (point of the stack notes -> fix):

* ``No module named 'twisted.python.constants'`` (Twisted >= 24.11 removed it):
  the ``constantly`` package, which holds the same classes, is registered
  under that name. This is the only change to a module that is not ours.
* Every SOAP POST answered 405 ``Client.RequestNotAllowed`` (``b'POST'`` was
  compared with ``"POST"``) and the Content-Type header arrived as bytes (it
  then crashed ``cgi.parse_header``): :class:`CompatTransportContext` hands
  spyne the method and the Content-Type as ``str``.
* ``?wsdl`` answered 500 (``_reconstruct_url`` mixed str and bytes):
  :class:`CompatTwistedWebResource` serves the WSDL itself: a document given
  at construction (what ``server.py`` does: built once for the configured
  public URL), else one built for this request's own URL with
  :func:`reconstruct_url`, never cached, so one caller's Host header can
  never leak into another caller's WSDL.
* Request bodies of 100,000 bytes or more and chunked uploads answered an
  HTML 500 (Twisted spools them to a temporary file): the body is read from
  ``request.content`` whatever it is (``BytesIO`` or temporary file).
* ``max_content_length`` was not enforced for SOAP bodies:
  :class:`BodyLimitRequest` (the request factory of :class:`LimitedSite`)
  counts the bytes as they arrive, stops storing them past the limit, and the
  resource answers a SOAP fault ``Client.RequestTooLong`` with HTTP 413. The
  resource checks the size again itself, so the limit also holds under a
  plain ``twisted.web.server.Site`` (which still stores the whole body).
* Spyne's bundled six 1.14 importer lacks ``find_spec``: every later import
  of a missing module raised an ``ImportWarning`` (an error under
  ``-W error``). Its class gets six 1.16's three PEP 451 methods.
* Spyne's ``getChildWithDefault`` built Twisted's deprecated
  ``_UnsafeNoResource`` for every request path (a ``DeprecationWarning`` at
  each request): the resource is a leaf, so that is never called.
* Spyne's transport constructor scheduled a call with ``deferLater``, which
  is not thread-safe outside the reactor thread: :class:`CompatHttpTransport`
  uses ``callFromThread``, so a site may be built in any thread.
* Anything unexpected while handling a request becomes a SOAP fault
  ``Server`` with HTTP 500, never Twisted's HTML error page.
* Twisted logged ``RuntimeError: Producer was not unregistered`` when a
  connection was lost in the reactor turn in which a method's Deferred
  answered (a client's close read in the same turn, or every connection
  when the reactor stops): spyne wrote answers through a pull producer
  run at a later turn, and the lost connection stopped it, whose errback
  finished the request with the producer still registered. Answers are
  serialized whole and written at once, with a Content-Length.
* Spyne took the first Body of an envelope and the first element in it and
  ignored the rest: :meth:`CompatTwistedWebResource.inspect_document` sees
  the parsed document before spyne reads it as an envelope (``server.py``
  holds it to SOAP 1.1's structure there).

Additions for stopping: the resource knows its pending requests, refuses
new ones and cancels the rest (:meth:`CompatTwistedWebResource.stop_accepting`,
:meth:`~CompatTwistedWebResource.cancel_pending`); the site knows its open
connections and closes them (:meth:`LimitedSite.close_connections`, which
reads the HTTP/1.1 channel inside Twisted 26.10's site protocol through its
private ``_channel`` attribute, falling back to the protocol itself;
``tests/test_lifecycle.py`` covers it).

One addition that is not a fix: :meth:`CompatTwistedWebResource.caller`
says who sent a request (``server.py`` answers with the identity of the
TLS peer's certificate); the answer is the method context's ``udc``, the
one place service methods learn who is calling.

The fixes are subclasses; spyne's own classes are left alone, except that
its bundled six importer class gains the three methods above. Only the spyne
version these were written against is accepted (:data:`SPYNE_VERSION`): the
resource reuses spyne 2.14.0's module-level response helpers.
"""

from __future__ import annotations

import io
import logging
import sys
import threading
import warnings
from typing import Any

from vmshop_common.errors import ShuttingDownError

# --- twisted.python.constants -------------------------------------------------


def _install_twisted_constants() -> None:
    """Register ``constantly`` as ``twisted.python.constants`` if Twisted lacks it."""
    try:
        import twisted.python.constants  # noqa: F401
    except ImportError:
        import constantly
        import twisted.python

        sys.modules["twisted.python.constants"] = constantly
        twisted.python.constants = constantly  # type: ignore[attr-defined]


_install_twisted_constants()

# Spyne's bundled six raises ImportWarning, spyne imports the deprecated cgi
# module and twisted.web.resource's NoResource is deprecated: all at import
# time. Import them once here, with exactly those warnings silenced, so that a
# test run with ``filterwarnings = error`` does not depend on its ignore list.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", category=ImportWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=PendingDeprecationWarning)
    import spyne
    from spyne.auxproc import process_contexts
    from spyne.const.http import HTTP_200
    from spyne.error import InternalError, RequestTooLongError
    from spyne.model import ComplexModelBase
    from spyne.model.fault import Fault
    from spyne.protocol.http import HttpRpc
    from spyne.server.http import HttpBase
    from spyne.server.twisted import TwistedWebResource
    from spyne.server.twisted import http as _spyne_twisted_http
    from spyne.server.twisted.http import (
        TwistedHttpMethodContext,
        TwistedHttpTransport,
        TwistedHttpTransportContext,
    )
    from twisted.internet.defer import Deferred, succeed
    from twisted.python.failure import Failure
    from twisted.web.resource import Resource
    from twisted.web.server import NOT_DONE_YET, Request, Site



def _fix_six_importer() -> None:
    """Give spyne's bundled six 1.14 meta path importer the PEP 451 methods of six 1.16.

    Without ``find_spec`` every later import of a module that does not exist
    (e.g. urllib3 probing for ``brotlicffi``) falls back to ``find_module``
    and emits an ``ImportWarning`` - an error under ``-W error``. The methods
    are exactly six 1.16's; they are added only if missing.
    """
    from importlib.util import spec_from_loader

    from spyne.util import six as spyne_six

    cls = spyne_six._SixMetaPathImporter
    if "find_spec" in cls.__dict__:
        return

    def find_spec(self: Any, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname in self.known_modules:
            return spec_from_loader(fullname, self)
        return None

    def create_module(self: Any, spec: Any) -> Any:
        return self.load_module(spec.name)

    def exec_module(self: Any, module: Any) -> None:
        pass

    cls.find_spec = find_spec
    cls.create_module = create_module
    cls.exec_module = exec_module


_fix_six_importer()

SPYNE_VERSION = "2.14.0"
"""The only spyne release this module was written and tested against."""

if spyne.__version__ != SPYNE_VERSION:  # pragma: no cover - guarded by the pins in setup.py
    raise ImportError(
        f"vmshop_common.soap.compat supports spyne {SPYNE_VERSION} only, found {spyne.__version__}: "
        "it reuses that release's internals (see the stack notes)"
    )

logger = logging.getLogger("vmshop_common.soap")


def _no_forced_gc() -> None:
    """Stop spyne from running a full ``gc.collect()`` from its request path.

    ``MethodContext.close`` collects the whole heap at most once a second
    "to return file descriptors in a timely manner" (for file uploads, which
    these services do not take); in a shop holding a large registry cache
    that was a measurable share of every request. Python's own collector is
    untouched.
    """
    from spyne import const as spyne_const

    spyne_const.MIN_GC_INTERVAL = float("inf")


_no_forced_gc()

DEFAULT_MAX_BODY_BYTES = 2 * 1024 * 1024
"""Default largest accepted request body (bytes)."""

REQUEST_TOO_LONG = RequestTooLongError.CODE  # "Client.RequestTooLong"
"""Stable fault code for a request body over the limit (HTTP 413)."""

_HTTP_413 = "413 Request Entity Too Large"
_HTTP_500 = "500 Internal Server Error"


def _text(value: bytes | str | None, encoding: str = "latin-1") -> str | None:
    if isinstance(value, bytes):
        return value.decode(encoding)
    return value


def reconstruct_url(request: Request) -> str:
    """The URL (``str``) this request was addressed to, from its Host header.

    The str/bytes-correct replacement of spyne's ``_reconstruct_url``; it
    ignores X-Forwarded-* headers. Only used for a WSDL built for the caller's
    own URL when the resource has no fixed document.
    """
    host = request.getRequestHostname().decode("ascii", "replace")
    port = request.getHost().port
    secure = bool(request.isSecure())
    if (secure, port) not in ((True, 443), (False, 80)):
        host = f"{host}:{port}"
    uri = request.uri.decode("ascii", "replace")
    return f"{'https' if secure else 'http'}://{host}{uri}"


# --- spyne transport context: str where spyne expects str ---------------------


class CompatTransportContext(TwistedHttpTransportContext):  # type: ignore[misc]
    """Spyne's Twisted transport context with the method and Content-Type as ``str``."""

    def get_request_method(self) -> str | None:
        return _text(self.req.method, "ascii")

    def get_request_content_type(self) -> str | None:
        return _text(self.req.getHeader(b"Content-Type"))


class CompatMethodContext(TwistedHttpMethodContext):  # type: ignore[misc]
    """Method context whose transport is a :class:`CompatTransportContext`."""

    HttpTransportContext = CompatTransportContext


class CompatHttpTransport(TwistedHttpTransport):  # type: ignore[misc]
    """Spyne's Twisted HTTP transport, safe to construct outside the reactor thread.

    Spyne's constructor calls ``deferLater(reactor, 0, ...)`` to note the
    reactor thread, which is not thread-safe from another thread; this one
    uses ``reactor.callFromThread`` (safe from any thread, also before the
    reactor runs).
    """

    def __init__(
        self,
        app: Any,
        chunked: bool = False,
        max_content_length: int = DEFAULT_MAX_BODY_BYTES,
        block_length: int = 8 * 1024,
    ) -> None:
        HttpBase.__init__(self, app, chunked=chunked, max_content_length=max_content_length, block_length=block_length)
        self.reactor_thread = None

        def _note_reactor_thread() -> None:
            self.reactor_thread = threading.current_thread()

        from twisted.internet import reactor

        reactor.callFromThread(_note_reactor_thread)  # type: ignore[attr-defined]


# --- body size limit while the body arrives -------------------------------------


class _Discard(io.BytesIO):
    """A request ``content`` that throws away what is written to it."""

    def write(self, data: Any) -> int:
        return len(data)


class BodyLimitRequest(Request):
    """A ``twisted.web.server.Request`` that refuses to store an over-long body.

    The limit is the site's ``max_body_bytes`` (``None``: no limit). A body
    announced longer (Content-Length) or growing longer (chunked uploads) is
    still read off the wire, so the client gets the answer after sending it,
    but not stored; ``body_too_long`` is then ``True`` and the resource
    answers the fault. Past the site's ``discard_limit_bytes`` (``None``: no
    limit) the connection is dropped instead.
    """

    body_too_long: bool = False
    body_bytes_received: int = 0

    def _limits(self) -> tuple[int | None, int | None]:
        site = getattr(self.channel, "site", None)
        return getattr(site, "max_body_bytes", None), getattr(site, "discard_limit_bytes", None)

    def _start_discarding(self) -> None:
        self.body_too_long = True
        old = getattr(self, "content", None)
        if old is not None:
            old.close()
        self.content = _Discard()

    def gotLength(self, length: int | None) -> None:
        limit, discard_limit = self._limits()
        if limit is not None and length is not None and length > limit:
            if discard_limit is not None and length > discard_limit:
                logger.info("dropping a connection announcing a %d-byte body (limit %d)", length, limit)
                transport: Any = self.channel.transport
                transport.loseConnection()
            self._start_discarding()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        self.body_bytes_received += len(data)
        limit, discard_limit = self._limits()
        if not self.body_too_long and limit is not None and self.body_bytes_received > limit:
            self._start_discarding()
        if self.body_too_long:
            if discard_limit is not None and self.body_bytes_received > discard_limit:
                transport: Any = self.channel.transport
                transport.loseConnection()
            return
        super().handleContentChunk(data)


class LimitedSite(Site):
    """A ``Site`` whose requests are :class:`BodyLimitRequest`.

    ``max_body_bytes`` is the largest body stored (``None``: unlimited);
    ``discard_limit_bytes`` the most read and thrown away before the connection
    is dropped (default: 4x the limit plus 1 MiB). POST bodies are never parsed
    as HTML forms (``parsePOSTFormSubmission=False``).
    """

    def __init__(
        self,
        resource: Any,
        *,
        max_body_bytes: int | None = DEFAULT_MAX_BODY_BYTES,
        discard_limit_bytes: int | None = -1,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("parsePOSTFormSubmission", False)
        super().__init__(resource, requestFactory=BodyLimitRequest, **kwargs)
        self.channels: set[Any] = set()
        self._closed_waiters: list[Deferred[None]] = []
        self.max_body_bytes = max_body_bytes
        if discard_limit_bytes == -1:
            discard_limit_bytes = None if max_body_bytes is None else 4 * max_body_bytes + (1 << 20)
        self.discard_limit_bytes = discard_limit_bytes
        self.displayTracebacks = False

    def log(self, request: Any) -> None:
        """The access log line, written only when the site was given a ``logPath``.

        Without one, Twisted formats a line per request for its legacy log,
        which these services do not keep: that formatting was measurable CPU
        on every SOAP call for nothing.
        """
        if self.logPath is not None:
            super().log(request)

    def buildProtocol(self, addr: Any) -> Any:  # noqa: N802 - Twisted's name
        """The HTTP channel, with Nagle's algorithm off on its connection, kept in :attr:`channels` while
        it is connected.

        A SOAP answer is written in pieces (headers, then body); with Nagle on,
        a keep-alive client that waits for the answer meets the peer's delayed
        ACK and every request costs milliseconds of idle time.
        """
        protocol = super().buildProtocol(addr)
        if protocol is not None:
            make_connection = protocol.makeConnection
            connection_lost = protocol.connectionLost

            def make(transport: Any) -> None:
                if hasattr(transport, "setTcpNoDelay"):
                    transport.setTcpNoDelay(True)
                self.channels.add(protocol)
                make_connection(transport)

            def lost(reason: Any) -> None:
                self.channels.discard(protocol)
                connection_lost(reason)
                if not self.channels and self._closed_waiters:
                    waiters, self._closed_waiters = self._closed_waiters, []
                    for waiter in waiters:
                        waiter.callback(None)

            protocol.makeConnection = make
            protocol.connectionLost = lost
        return protocol

    def when_no_connections(self) -> Deferred[None]:
        """A Deferred that fires once no connection is open (what was written to them is then sent)."""
        if not self.channels:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._closed_waiters.append(waiter)
        return waiter

    def close_connections(self, *, idle_only: bool = False) -> int:
        """Close the connections (with ``idle_only``, those with no request in progress); how many."""
        # Twisted's site protocol wraps the HTTP/1.1 channel (to switch to HTTP/2): requests and transport are its.
        channels = [getattr(protocol, "_channel", protocol) for protocol in self.channels]
        closing = [channel for channel in channels if not (idle_only and getattr(channel, "requests", None))]
        for channel in closing:
            transport = getattr(channel, "transport", None)
            if transport is None:
                continue
            transport.loseConnection()  # TLS: sends close_notify after what is written...
            lower = getattr(transport, "transport", None)
            if lower is not None:
                lower.loseConnection()  # ...and closes without waiting for the peer's (an idle client never reads)
        return len(closing)


# --- the resource -----------------------------------------------------------------


def _is_wsdl_request(request: Request) -> bool:
    if request.method not in (b"GET", b"HEAD"):
        return False
    uri = request.uri.lower()
    return uri.endswith(b"?wsdl") or uri.endswith(b".wsdl")


class CompatTwistedWebResource(TwistedWebResource):  # type: ignore[misc]
    """Spyne's ``TwistedWebResource``, working on Python 3.11 / Twisted 26.10.

    :param app: the spyne ``Application``.
    :param max_body_bytes: largest request body accepted; a longer one gets
        the SOAP fault ``Client.RequestTooLong`` with HTTP 413. ``None``: no limit.
    :param wsdl: the WSDL document to serve for every ``?wsdl``/``.wsdl`` GET;
        ``None`` builds one per request for that request's own URL.

    Every path is served by this resource (it is a leaf), so it is meant
    to be a site's root. Service methods may return a ``Deferred``; its result (or Fault) is sent
    when it fires. If the client has gone away by then, nothing is written.
    Subclasses may override :meth:`inspect_body` to refuse a body before
    spyne parses it, and :meth:`inspect_document` to refuse a parsed
    document before spyne reads it as an envelope (raise a spyne ``Fault``).

    An answer is serialized whole and written at once, with its
    Content-Length (spyne registered a pull producer on the request instead;
    when the connection was lost before the producer ran, spyne finished the
    request with the producer still registered, and Twisted logged
    ``RuntimeError: Producer was not unregistered``).

    Stopping (:meth:`stop_accepting`, :meth:`when_idle`, :meth:`cancel_pending`):
    requests whose method returned a Deferred that has not fired yet are
    :attr:`pending`; once the resource stops accepting, every new request
    (also on a kept-alive connection) gets the SOAP fault
    ``Server.ShuttingDown`` with HTTP 503 and its connection is closed.
    """

    # A leaf: Twisted never walks to children, so spyne's getChildWithDefault
    # (which builds a deprecated _UnsafeNoResource for every path segment) is
    # not used; every path is served by this resource.
    isLeaf = True

    def __init__(
        self,
        app: Any,
        *,
        max_body_bytes: int | None = DEFAULT_MAX_BODY_BYTES,
        wsdl: bytes | None = None,
        chunked: bool = False,
        block_length: int = 8 * 1024,
    ) -> None:
        # TwistedWebResource.__init__ without its thread-unsafe transport.
        Resource.__init__(self)
        self.app = app
        self.http_transport = CompatHttpTransport(
            app,
            chunked=chunked,
            max_content_length=max_body_bytes if max_body_bytes is not None else sys.maxsize,
            block_length=block_length,
        )
        self._wsdl = None
        self.prepath = None
        self.max_body_bytes = max_body_bytes
        self.wsdl = wsdl
        self.pending: dict[Request, Deferred[Any]] = {}
        self._cancelled: set[Request] = set()
        self.accepting = True
        self._idle_waiters: list[Deferred[None]] = []

    # -- dispatch ---------------------------------------------------------------

    def render(self, request: Request) -> bytes | int:
        """Serve the WSDL on ``GET ...?wsdl``; anything else is an RPC. Once stopping: ``Server.ShuttingDown``."""
        try:
            if not self.accepting:
                return self._refuse_while_stopping(request)
            if _is_wsdl_request(request):
                return self.render_wsdl(request)
            return self.handle_rpc(request)
        except Exception:
            logger.exception("unexpected error while handling %r", request)
            return self._internal_error(request)

    def render_wsdl(self, request: Request) -> bytes:
        """The WSDL: the fixed document, or one built for this request's URL."""
        document = self.wsdl
        if document is None:
            wsdl11 = self.http_transport.doc.wsdl11
            wsdl11.build_interface_document(reconstruct_url(request))
            document = wsdl11.get_interface_document()
        request.setHeader(b"Content-Type", b"text/xml; charset=utf-8")
        return document

    def inspect_body(self, body: bytes) -> None:
        """Hook: raise a spyne ``Fault`` to refuse ``body`` before spyne parses it."""

    def inspect_document(self, root: Any) -> None:
        """Hook: raise a spyne ``Fault`` to refuse the parsed request (its root element) before spyne reads it."""

    def caller(self, request: Request, body: bytes) -> Any:
        """Hook: who sent ``request`` (kept as the method context's ``udc``); raise a spyne ``Fault`` to refuse it."""
        return None

    # -- stopping -----------------------------------------------------------------

    def stop_accepting(self) -> None:
        """From now on every request is answered ``Server.ShuttingDown`` (HTTP 503) and its connection closed."""
        self.accepting = False

    def when_idle(self) -> Deferred[None]:
        """A Deferred that fires once no request is :attr:`pending`."""
        if not self.pending:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._idle_waiters.append(waiter)
        return waiter

    def cancel_pending(self) -> int:
        """Cancel the Deferred of every pending request; returns how many were cancelled. A cancelled request
        whose method's chain then fails, whatever its failure became, is answered ``Server.ShuttingDown``
        (one that still succeeds is answered as usual)."""
        pending = list(self.pending.items())
        for request, d in pending:
            self._cancelled.add(request)
            d.cancel()
        return len(pending)

    def _forget(self, request: Request) -> None:
        self.pending.pop(request, None)
        self._cancelled.discard(request)
        if not self.pending and self._idle_waiters:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    @staticmethod
    def _cancelled_fault(failure: Failure) -> Fault:
        """The answer of a request cancelled at stop: ``Server.ShuttingDown``, naming what its chain made of it."""
        value: Any = failure.value
        code = getattr(value, "faultcode", None)
        text = "the server is stopping: this request was cancelled when its grace ran out"
        if code and code != ShuttingDownError.CODE:
            text += f" (it ended as {code}: {str(getattr(value, 'faultstring', ''))[:200]})"
        return Fault(ShuttingDownError.CODE, text)

    def _refuse_while_stopping(self, request: Request) -> bytes:
        request.setHeader(b"Connection", b"close")
        channel: Any = request.channel
        channel.persistent = False  # Twisted closes the connection once this answer is written
        fault = Fault(ShuttingDownError.CODE, "the server is stopping and takes no new request")
        return self.fault_response(request, fault, "503 Service Unavailable")

    # -- RPC ----------------------------------------------------------------------

    def _new_context(self, request: Request) -> CompatMethodContext:
        return CompatMethodContext(self.http_transport, request, self.http_transport.app.out_protocol.mime_type)

    def _body_too_long(self, request: Request) -> bool:
        if getattr(request, "body_too_long", False):
            return True
        if self.max_body_bytes is None:
            return False
        content: Any = request.content
        content.seek(0, io.SEEK_END)
        size = content.tell()
        return bool(size > self.max_body_bytes)

    def fault_response(self, request: Request, fault: Fault, http_code: str | None = None) -> bytes:
        """Serialize ``fault`` as this application's fault response and set the status."""
        ctx = self._new_context(request)
        ctx.transport.resp_code = http_code
        ctx.in_error = ctx.out_error = fault
        return self.handle_rpc_error(ctx, [], fault, request)

    def _internal_error(self, request: Request) -> bytes | int:
        if request.finished or request.startedWriting:
            return NOT_DONE_YET
        try:
            return self.fault_response(request, InternalError(Exception("Internal Error")), _HTTP_500)
        except Exception:  # pragma: no cover - last resort, still not HTML
            logger.exception("could not serialize a fault")
            request.setResponseCode(500)
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            return b"Internal Error\n"

    def handle_rpc_error(self, p_ctx: Any, others: list[Any], error: Any, request: Request) -> bytes:
        """Spyne's error response, logging client faults at INFO (not ERROR, no body)."""
        code = getattr(error, "faultcode", "Server") or "Server"
        client = code == "Client" or code.startswith("Client.") or code == "VersionMismatch"
        level = logging.INFO if client else logging.WARNING
        text = getattr(error, "faultstring", error)
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        logger.log(level, "SOAP fault %s: %.300s", code, text)
        resp_code = p_ctx.transport.resp_code
        if resp_code is None:
            resp_code = p_ctx.out_protocol.fault_to_http_response_code(error)
        request.setResponseCode(int(str(resp_code)[:3]))
        _spyne_twisted_http._set_response_headers(request, p_ctx.transport.resp_headers)
        p_ctx.out_document = None
        p_ctx.out_string = None
        p_ctx.out_object = error
        self.http_transport.get_out_string(p_ctx)
        retval = b"".join(p_ctx.out_string)
        p_ctx.close()
        _spyne_twisted_http.process_contexts(self.http_transport, others, p_ctx)
        return retval

    def _generate_contexts(self, ctx: Any) -> list[Any]:
        """Spyne's ``ServerBase.generate_contexts`` (parse, read the envelope, find the method) with
        :meth:`inspect_document` between parsing and reading the envelope."""
        in_protocol = self.http_transport.app.in_protocol
        try:
            in_protocol.create_in_document(ctx, None)
            document = ctx.in_document
            self.inspect_document(document[0] if isinstance(document, tuple) else document)
            in_protocol.decompose_incoming_envelope(ctx, in_protocol.REQUEST)
            return list(in_protocol.generate_method_contexts(ctx))
        except Fault as fault:
            ctx.in_object = None
            ctx.in_error = fault
            ctx.out_error = fault
            ctx.fire_event("method_exception_object")
            return [ctx]

    def handle_rpc(self, request: Request) -> bytes | int:
        """Run one SOAP call: limit, read, inspect, parse, call, answer."""
        if self._body_too_long(request):
            limit = self.max_body_bytes
            return self.fault_response(
                request, RequestTooLongError(f"request body longer than {limit} bytes"), _HTTP_413
            )
        content: Any = request.content
        content.seek(0)
        body = content.read()
        try:
            caller = self.caller(request, body)
            self.inspect_body(body)
        except Fault as fault:
            return self.fault_response(request, fault)

        initial_ctx = self._new_context(request)
        initial_ctx.udc = caller  # copied into every context spyne makes from this one
        initial_ctx.in_string = [body]
        if isinstance(self.http_transport.app.in_protocol, HttpRpc):
            initial_ctx.transport.file_info = _spyne_twisted_http._get_file_info(initial_ctx)
        else:
            initial_ctx.transport.file_info = []

        contexts = self._generate_contexts(initial_ctx)
        p_ctx, others = contexts[0], contexts[1:]
        p_ctx.active = True
        p_ctx.out_stream = request

        if p_ctx.in_error:
            return self.handle_rpc_error(p_ctx, others, p_ctx.in_error, request)
        self.http_transport.get_in_object(p_ctx)
        if p_ctx.in_error:
            return self.handle_rpc_error(p_ctx, others, p_ctx.in_error, request)
        self.http_transport.get_out_object(p_ctx)
        if p_ctx.out_error:
            return self.handle_rpc_error(p_ctx, others, p_ctx.out_error, request)

        ret = p_ctx.out_object[0] if p_ctx.out_object else None
        if isinstance(ret, Deferred):
            self._answer_later(ret, request, p_ctx, others)
            return NOT_DONE_YET
        if isinstance(ret, _spyne_twisted_http.PushBase):
            self.http_transport.init_root_push(ret, p_ctx, others)
            return NOT_DONE_YET
        try:
            return self._answer(p_ctx.out_object, request, p_ctx, others, normalize=False)
        except Exception:
            logger.exception("could not send the response")
            _spyne_twisted_http._eb_deferred(Failure(), request, p_ctx, others, resource=self)
            return NOT_DONE_YET

    def _answer(self, result: Any, request: Request, p_ctx: Any, others: list[Any], *, normalize: bool) -> bytes:
        """The response document for a method's ``result`` (status and headers set; the context closed).

        What spyne's ``_cb_deferred`` does for a SOAP answer, returning the bytes instead of registering a
        producer that writes them later. ``normalize``: ``result`` is what a Deferred fired with (spyne's
        ``cb=True``), which is put in the shape of the method's out message; else it is ``out_object``.
        """
        resp_code = p_ctx.transport.resp_code
        request.setResponseCode(int((resp_code or HTTP_200)[:3]))
        _spyne_twisted_http._set_response_headers(request, p_ctx.transport.resp_headers)
        if normalize:
            descriptor = p_ctx.descriptor
            message = descriptor.out_message
            if descriptor.is_out_bare() or not issubclass(message, ComplexModelBase) or len(message._type_info) <= 1:
                p_ctx.out_object = [result]
            else:
                p_ctx.out_object = result
        else:
            p_ctx.out_object = result
        if self.http_transport.get_out_string(p_ctx) is not None or p_ctx.out_string is None:
            raise RuntimeError("spyne did not serialize the answer in one piece")  # a push: not used here
        body = b"".join(p_ctx.out_string)
        process_contexts(self.http_transport, others, p_ctx)
        p_ctx.close()
        return body

    def _answer_later(self, d: Deferred, request: Request, p_ctx: Any, others: list[Any]) -> None:
        """Send the result of a method's Deferred, unless the client has left; the request is pending until then."""
        gone: list[bool] = []
        self.pending[request] = d

        def _finished(result: Any) -> None:
            if isinstance(result, Failure):
                gone.append(True)
            self._forget(request)

        request.notifyFinish().addBoth(_finished)

        def _cb(result: Any) -> Any:
            if gone:
                logger.info("client left before %s answered", p_ctx.method_request_string)
                p_ctx.close()
                return None
            body = self._answer(result, request, p_ctx, others, normalize=True)
            request.setHeader(b"Content-Length", b"%d" % len(body))
            request.write(body)
            request.finish()
            return None

        def _eb(failure: Failure) -> None:
            if gone:
                logger.info("client left before %s failed: %s", p_ctx.method_request_string, failure.getErrorMessage())
                p_ctx.close()
                return None
            if request in self._cancelled:
                failure = Failure(self._cancelled_fault(failure))
            _spyne_twisted_http._eb_deferred(failure, request, p_ctx, others, resource=self)
            return None

        def _last(failure: Failure) -> None:
            logger.error("error while answering %s: %s", p_ctx.method_request_string, failure.getTraceback())
            if not gone and not request.finished:
                try:
                    if not request.startedWriting:
                        fault = InternalError(Exception("Internal Error"))
                        request.write(self.fault_response(request, fault, _HTTP_500))
                    request.finish()
                except Exception:
                    logger.exception("could not finish the request")

        d.addCallback(_cb).addErrback(_eb).addErrback(_last)


__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "REQUEST_TOO_LONG",
    "SPYNE_VERSION",
    "BodyLimitRequest",
    "CompatHttpTransport",
    "CompatMethodContext",
    "CompatTransportContext",
    "CompatTwistedWebResource",
    "LimitedSite",
    "reconstruct_url",
]
