"""Build and start a Spyne SOAP server on Twisted: what the shop and the plants share.

Usage (in the reactor thread)::

    from vmshop_common.soap.server import build_site, listen, bound_port

    site = build_site([ShopService], tns="urn:vmshop:shop:1",
                      public_url="https://shop.example.org:8080/")
    site.identities = AuthorizationFile("grid-mapfile", "shop")   # who the callers are
    creds = load_credentials("shop.pem", "shop.key", "ca.pem")
    port = listen(site, "127.0.0.1", 8080, tls=creds)   # 127.0.0.1 unless told otherwise
    print(bound_port(port))

:func:`build_site` may run in any thread; :func:`listen` must run in the
reactor thread.

Contract:

* A server speaks TLS (:func:`listen` with credentials): it verifies each
  client's certificate against its CA bundle, and a client without one
  fails the handshake. Plain HTTP only when asked for (``insecure``), and
  only on a loopback address.
* Who is calling: the subject of the client's certificate, mapped by the
  site's ``identities`` (an :class:`~vmshop_common.authz.AuthorizationFile`)
  to an :class:`~vmshop_common.authz.Identity` before the body is parsed,
  and handed to the service method as ``ctx.udc``. A subject the file does
  not map gets the fault ``Client.AuthenticationFailed``, whatever it asked.
* The WSDL is built once, at start-up, for the configured public URL, and
  every ``GET ...?wsdl`` (any path, also ``.wsdl``) answers exactly that
  document, whatever Host header the caller sends. :func:`wsdl_document`
  builds the same bytes, so a checked-in WSDL can be compared with it.
  A public URL containing ``{port}`` is completed by :func:`listen` with the
  bound port (for servers on port 0); until then ``?wsdl`` answers a fault.
* A request is a SOAP 1.1 envelope with exactly one Body holding exactly
  one operation element; anything else is refused before spyne reads it
  with a stable code of its own (``VersionMismatch`` for a SOAP 1.2
  envelope, ``Client.ExtraBody``, ``Client.ExtraOperation``, ...: see
  :mod:`vmshop_common.soap.envelope`), HTTP 500.
* Requests are SOAP 1.1 validated against the generated schema
  (``Soap11(validator='lxml')``): an invalid request gets the SOAP fault
  ``Client.SchemaValidationError`` (HTTP 500, as SOAP 1.1 wants for faults).
* A body containing a DOCTYPE (in any encoding lxml understands) is refused
  before spyne parses it: SOAP fault :data:`DOCTYPE_REFUSED`
  (``Client.DoctypeRefused``, HTTP 500).
* A body sent as anything but XML (``Content-Type`` other than ``text/xml``,
  ``application/soap+xml`` or ``application/xml``; ``multipart/related``
  SwA/MTOM bodies among them, which spyne would take apart and parse past
  the DOCTYPE check) is refused: SOAP fault :data:`NOT_XML`
  (``Client.RequestNotAllowed``, HTTP 415). Without a Content-Type spyne
  answers the same code with HTTP 405.
* A body over ``max_body_bytes`` gets the SOAP fault
  :data:`~vmshop_common.soap.compat.REQUEST_TOO_LONG`
  (``Client.RequestTooLong``) with HTTP 413.
* Nothing answers an HTML error page: unexpected errors are the SOAP fault
  ``Server`` ("Internal Error"). A Fault raised by a method reaches the
  client with its own code (``Client.X`` -> zeep's ``soap11env:Client.X``).
* Service methods may return a ``Deferred`` (see ``compat``).
* Spyne's logging is tamed by :func:`configure_spyne_logging`: no request
  bodies at ERROR, client faults at INFO on ``vmshop_common.soap``.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from typing import Any

# compat first: it must be imported before spyne (and spyne.server.twisted).
from vmshop_common.soap import compat  # noqa: F401

# isort: split
from lxml import etree
from spyne import Application
from spyne.error import RequestNotAllowed
from spyne.interface.wsdl import Wsdl11
from spyne.model.fault import Fault
from spyne.protocol.soap import Soap11
from twisted.internet.interfaces import IListeningPort
from twisted.web.server import Request

from vmshop_common.errors import ConfigurationError, VMShopError
from vmshop_common.metrics import METRICS_PATH
from vmshop_common.security import is_loopback
from vmshop_common.soap.compat import (
    DEFAULT_MAX_BODY_BYTES,
    REQUEST_TOO_LONG,
    CompatTwistedWebResource,
    LimitedSite,
)
from vmshop_common.soap.envelope import check_envelope
from vmshop_common.soap.fastxml import FastSoap11
from vmshop_common.soap.faults import to_fault
from vmshop_common.tls import Credentials, peer_subject, server_options

logger = logging.getLogger("vmshop_common.soap")

DOCTYPE_REFUSED = "Client.DoctypeRefused"
"""Stable fault code for a request with a DOCTYPE (same as ``errors.DoctypeRefusedError.CODE``)."""

NOT_XML = RequestNotAllowed.CODE  # "Client.RequestNotAllowed"
"""Stable fault code for a request whose Content-Type is not an XML media type (HTTP 415)."""

XML_MEDIA_TYPES = frozenset({"text/xml", "application/soap+xml", "application/xml"})
"""The media types a request body may be sent as."""

WSDL_NOT_READY = "Server.WsdlNotReady"
"""Fault code for ``?wsdl`` before :func:`listen` completed a ``{port}`` public URL."""

DEFAULT_HOST = "127.0.0.1"

SOAP_HTTP_TRANSPORT = "http://schemas.xmlsoap.org/soap/http"

# spyne loggers that log whole request documents, or log client faults at ERROR
# with a traceback (we log those ourselves, briefly, at INFO).
_SILENCED_SPYNE_LOGGERS = (
    "spyne.protocol.soap.soap11.invalid",
    "spyne.protocol.xml.invalid",
    "spyne.application.client",
    "spyne.server._base",
)


class _TruncateFilter(logging.Filter):
    """Cut a log message to ``limit`` characters, keeping its head and its tail.

    Spyne logs values with ``%r``; the tail is kept because that is where a
    logged traceback names the exception.
    """

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if len(message) > self.limit:
            half = self.limit // 2
            cut = len(message) - 2 * half
            record.msg = f"{message[:half]} [... {cut} characters cut ...] {message[-half:]}"
            record.args = None
        return True


def configure_spyne_logging(level: int = logging.WARNING, max_message_chars: int = 4000) -> None:
    """Make spyne's logging fit for a server. Idempotent.

    * ``spyne`` logs at ``level`` and above (it is chatty at DEBUG/INFO);
    * the loggers that log whole request bodies (``*.invalid``) and the ones
      that log each client fault at ERROR with a traceback are silenced:
      the resource logs each fault on ``vmshop_common.soap`` instead (client
      faults at INFO, others at WARNING), uncaught exceptions in methods still
      reach ``spyne.application.server`` at CRITICAL with their traceback;
    * every message of a spyne logger is cut to ``max_message_chars`` (its
      head and tail are kept).
    """
    logging.getLogger("spyne").setLevel(level)
    for name in _SILENCED_SPYNE_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    names = [n for n in logging.Logger.manager.loggerDict if n == "spyne" or n.startswith("spyne.")]
    for name in names:
        lg = logging.getLogger(name)
        for old in [f for f in lg.filters if isinstance(f, _TruncateFilter)]:
            lg.removeFilter(old)
        lg.addFilter(_TruncateFilter(max_message_chars))


# --- DOCTYPE refusal --------------------------------------------------------------


class _PrologDone(Exception):
    pass


class _PrologTarget:
    """lxml parser target that notes a DOCTYPE and stops at the root element."""

    def __init__(self) -> None:
        self.found: str | None = None

    def doctype(self, name: str | None, pubid: str | None, system: str | None) -> None:
        self.found = name or "?"
        raise _PrologDone()

    def start(self, tag: str, attrib: Any, nsmap: Any = None) -> None:
        raise _PrologDone()

    def end(self, tag: str) -> None:
        pass

    def data(self, data: str) -> None:
        pass

    def close(self) -> None:
        return None


_ASCII_COMPATIBLE = {b"utf-8", b"utf8", b"us-ascii", b"ascii", b"iso-8859-1", b"latin1", b"latin-1"}
_DECLARED_ENCODING = re.compile(rb"""encoding\s*=\s*["']([A-Za-z0-9._-]+)["']""")
_DOCTYPE_TEXT = re.compile(rb"<!doctype", re.IGNORECASE)


def _plainly_without_doctype(body: bytes) -> bool:
    """True when ``body`` cannot declare a DOCTYPE: it is in an ASCII-compatible encoding (it
    starts with '<' after an optional UTF-8 BOM and white space, and declares no other encoding)
    and the bytes '<!DOCTYPE' appear nowhere in it (any case). Anything else gets the full parse.
    """
    start = body[3:] if body.startswith(b"\xef\xbb\xbf") else body
    start = start.lstrip(b" \t\r\n")
    if not start.startswith(b"<"):
        return False
    if start.startswith(b"<?xml"):
        end = start.find(b"?>", 0, 512)
        if end < 0:
            return False
        declared = _DECLARED_ENCODING.search(start, 0, end)
        if declared is not None and declared.group(1).lower() not in _ASCII_COMPATIBLE:
            return False
    return _DOCTYPE_TEXT.search(body) is None


def find_doctype(body: bytes) -> str | None:
    """Name of the DOCTYPE declared in the XML document ``body``, or ``None``.

    Only the prolog is parsed (parsing stops at the root element), with no DTD
    loading, no entity resolution and no network, so the check is cheap and
    safe; the encoding is whatever lxml detects (UTF-16 bodies included).
    Malformed XML yields ``None``: spyne's parser reports it afterwards.
    """
    if _plainly_without_doctype(body):
        return None
    target = _PrologTarget()
    parser = etree.XMLParser(target=target, resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False)
    try:
        etree.fromstring(body, parser)
    except _PrologDone:
        pass
    except etree.XMLSyntaxError:
        pass
    return target.found


def refuse_doctype(body: bytes) -> None:
    """Raise the SOAP fault :data:`DOCTYPE_REFUSED` if ``body`` declares a DOCTYPE."""
    name = find_doctype(body)
    if name is not None:
        raise Fault(DOCTYPE_REFUSED, "a DOCTYPE is not accepted in a request")


# --- application, WSDL, resource, site ----------------------------------------------


def build_application(
    services: Sequence[Any], tns: str, *, name: str | None = None, validator: str | None = "lxml"
) -> Application:
    """A spyne ``Application`` speaking SOAP 1.1 in and out for ``services`` in namespace ``tns``.

    ``validator='lxml'`` (default) validates each request against the
    generated schema; ``None`` accepts anything that deserializes. ``name``
    is the application name (it names the WSDL service, port type and binding).
    """
    return Application(
        list(services),
        tns=tns,
        name=name,
        in_protocol=Soap11(validator=validator),
        out_protocol=FastSoap11(),
    )


def wsdl_document(app: Application, public_url: str) -> bytes:
    """The WSDL of ``app`` with ``public_url`` as its soap:address, as served.

    Deterministic: the same application and URL give the same bytes, equal to
    what a server built by :func:`build_site` with that URL serves on ``?wsdl``.
    A trailing ``?wsdl``/``.wsdl`` on ``public_url`` is dropped (spyne does so).
    Sets ``app.transport`` to SOAP over HTTP (spyne's application registry
    leaves it at ``noconn://null.spyne`` until a server is built, and zeep
    refuses a binding with that transport).
    """
    app.transport = SOAP_HTTP_TRANSPORT
    wsdl = Wsdl11(app.interface)
    wsdl.build_interface_document(public_url)
    document = wsdl.get_interface_document()
    assert isinstance(document, bytes)
    return _canonical(document)


def _canonical(document: bytes) -> bytes:
    """The WSDL with its schema's types in a fixed order, indented.

    spyne emits types in set order, which changes with Python's hash seed
    from one process to the next; sorting makes the document byte-stable.
    """
    root = etree.fromstring(document, etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False))
    for schema in root.iter("{http://www.w3.org/2001/XMLSchema}schema"):
        children = list(schema)
        schema[:] = sorted(children, key=lambda child: (
            etree.QName(child).localname != "import", etree.QName(child).localname, child.get("name") or ""))
    etree.indent(root, space="  ")
    return etree.tostring(root, xml_declaration=True, encoding="UTF-8") + b"\n"


class SoapResource(CompatTwistedWebResource):
    """The project's SOAP resource: fixed WSDL only, DOCTYPEs refused; every answer told to :attr:`observer`."""

    observer: Any = None
    """Told of every SOAP answer sent: ``observer.answered(method_request_string, fault_code or None, seconds)``
    (a :class:`vmshop_common.metrics.ServerMetrics`); ``None``: nobody is told."""

    def render(self, request: Request) -> bytes | int:
        request.vmshop_arrived = time.monotonic()  # type: ignore[attr-defined]
        return super().render(request)

    def _tell(self, request: Request, p_ctx: Any, fault_code: str | None) -> None:
        observer = self.observer
        if observer is None:
            return
        arrived = getattr(request, "vmshop_arrived", None)
        try:
            observer.answered(getattr(p_ctx, "method_request_string", None), fault_code,
                              None if arrived is None else time.monotonic() - arrived)
        except Exception:  # an observer's bug never costs a caller its answer
            logger.exception("the answer's observer failed")

    def _answer(self, result: Any, request: Request, p_ctx: Any, others: list[Any], *, normalize: bool) -> bytes:
        body = super()._answer(result, request, p_ctx, others, normalize=normalize)
        self._tell(request, p_ctx, None)
        return body

    def handle_rpc_error(self, p_ctx: Any, others: list[Any], error: Any, request: Request) -> bytes:
        self._tell(request, p_ctx, str(getattr(error, "faultcode", "Server") or "Server"))
        return super().handle_rpc_error(p_ctx, others, error, request)

    def render_wsdl(self, request: Request) -> bytes:
        """The fixed WSDL; never one built from the caller's Host header."""
        if self.wsdl is None:
            return self.fault_response(
                request, Fault(WSDL_NOT_READY, "the public URL is not known yet"), "503 Service Unavailable"
            )
        request.setHeader(b"Content-Type", b"text/xml; charset=utf-8")
        return self.wsdl

    def handle_rpc(self, request: Request) -> bytes | int:
        """Refuse a body that is not sent as XML (see the module's contract), else run the call."""
        header = request.getHeader(b"Content-Type")
        media = header.split(b";", 1)[0].strip().lower().decode("latin-1") if header else ""
        if media and media not in XML_MEDIA_TYPES and not self._body_too_long(request):
            fault = RequestNotAllowed(f"a request is sent as text/xml, not as {media[:100]}")
            return self.fault_response(request, fault, "415 Unsupported Media Type")
        return super().handle_rpc(request)

    identities: Any = None
    """What maps a caller to an identity (``identify(subject) -> Identity``, see :mod:`vmshop_common.authz`);
    ``None``: requests carry no identity (``ctx.udc`` is ``None``)."""

    tokens: Any = None
    """For TLS callers without a certificate: ``identify(body) -> Identity | None`` from a WS-Security
    UsernameToken (:mod:`vmshop_common.wsse`); ``None``: certificates only."""

    def caller(self, request: Request, body: bytes) -> Any:
        """The identity of the caller: its TLS client certificate's subject, through :attr:`identities`;
        without a certificate, a UsernameToken through :attr:`tokens` (when the site takes them).

        An unknown subject (or none, where one is needed) or a token that does not check is refused here,
        before spyne parses the body, with the fault ``Client.AuthenticationFailed``.
        """
        identities = self.identities
        if identities is None:
            return None
        secure = request.isSecure()
        subject = peer_subject(request.channel.transport) if secure else None
        try:
            if subject is None and secure and self.tokens is not None:
                found = self.tokens.identify(body)
                if found is not None:
                    return found
            return identities.identify(subject)
        except VMShopError as exc:
            raise to_fault(exc) from None

    def inspect_body(self, body: bytes) -> None:
        """Refuse a DOCTYPE before spyne parses the body."""
        refuse_doctype(body)

    def inspect_document(self, root: Any) -> None:
        """Refuse an envelope that is not SOAP 1.1 with one Body holding one operation (:mod:`.envelope`)."""
        try:
            check_envelope(root)
        except VMShopError as exc:
            raise to_fault(exc) from None


class SoapSite(LimitedSite):
    """A Twisted ``Site`` serving one :class:`SoapResource` on every path.

    Attributes: ``app`` (the spyne Application), ``soap_resource``, ``public_url``
    (as configured, possibly with ``{port}``), ``wsdl`` (the served document,
    ``None`` until the URL is complete), ``max_body_bytes``.
    """

    def __init__(self, app: Application, public_url: str, *, max_body_bytes: int | None, **kwargs: Any) -> None:
        self.app = app
        self.public_url = public_url
        self.soap_resource = SoapResource(app, max_body_bytes=max_body_bytes, wsdl=None)
        super().__init__(self.soap_resource, max_body_bytes=max_body_bytes, **kwargs)
        self.wsdl: bytes | None = None
        if "{port}" not in public_url:
            self.set_public_url(public_url)

    metrics_resource: Any = None
    """What answers ``/metrics`` (a :class:`vmshop_common.metrics.MetricsResource`); ``None``: that path is SOAP
    like any other."""

    images_resource: Any = None
    """What answers ``/images/...`` (a plant's :class:`vmplant_service.transfer.ImagesResource`); ``None``: that
    path is SOAP like any other."""

    def getResourceFor(self, request: Request) -> Any:  # noqa: N802 - Twisted's name
        if self.metrics_resource is not None and request.path == METRICS_PATH:
            return self.metrics_resource
        if self.images_resource is not None and request.path.startswith(b"/images/"):
            return self.images_resource
        return super().getResourceFor(request)

    @property
    def identities(self) -> Any:
        """Who the callers are (see :attr:`SoapResource.identities`)."""
        return self.soap_resource.identities

    @identities.setter
    def identities(self, value: Any) -> None:
        self.soap_resource.identities = value

    @property
    def tokens(self) -> Any:
        """UsernameTokens for TLS callers without a certificate (see :attr:`SoapResource.tokens`)."""
        return self.soap_resource.tokens

    @tokens.setter
    def tokens(self, value: Any) -> None:
        self.soap_resource.tokens = value

    def set_public_url(self, url: str) -> None:
        """Build the WSDL for ``url`` (once) and serve it from now on."""
        self.public_url = url
        self.wsdl = wsdl_document(self.app, url)
        self.soap_resource.wsdl = self.wsdl
        logger.info("WSDL of %s built for %s", self.app.name, url)


def build_site(
    services: Sequence[Any] | Application,
    tns: str | None,
    public_url: str,
    *,
    name: str | None = None,
    validator: str | None = "lxml",
    max_body_bytes: int | None = DEFAULT_MAX_BODY_BYTES,
    timeout: float = 60,
) -> SoapSite:
    """A Twisted ``Site`` serving ``services`` (or a ready ``Application``) as SOAP 1.1.

    :param services: spyne ``ServiceBase`` subclasses, or an ``Application``
        (then ``tns``, ``name`` and ``validator`` are ignored).
    :param tns: target namespace of the services.
    :param public_url: the address clients use (soap:address of the WSDL),
        e.g. ``http://plant1.example.org:9001/``. May contain ``{port}``:
        :func:`listen` fills it in with the bound port.
    :param max_body_bytes: largest request body; longer ones get
        ``Client.RequestTooLong`` (HTTP 413). ``None``: no limit.
    :param timeout: idle timeout of a connection, seconds.

    Also calls :func:`configure_spyne_logging`.
    """
    configure_spyne_logging()
    if isinstance(services, Application):
        app = services
    else:
        if tns is None:
            raise ValueError("tns is required when services are given")
        app = build_application(services, tns, name=name, validator=validator)
    return SoapSite(app, public_url, max_body_bytes=max_body_bytes, timeout=timeout)


def listen(site: SoapSite | Any, host: str = DEFAULT_HOST, port: int = 0, *, tls: Credentials | None = None,
           insecure: bool = False, require_client_certificate: bool = True,
           reactor: Any = None) -> IListeningPort:
    """Listen on ``host:port`` for ``site`` over TLS (``tls``), or plain HTTP (``insecure``); returns the port.

    With ``tls`` the server presents its certificate and verifies every
    client's against ``tls``' CA bundle; with ``require_client_certificate``
    (default) a client without one fails the handshake. Plain HTTP must be
    asked for (``insecure=True``) and is refused (ConfigurationError) on
    any address but a loopback one.

    Call it in the reactor thread (before ``reactor.run()`` or from a reactor
    callback). Binds 127.0.0.1 unless told otherwise; ``port=0`` picks a free
    port (see :func:`bound_port`). If the site's public URL contains
    ``{port}`` it is completed with the bound port and the WSDL built now.
    Stop with ``port.stopListening()`` (a Deferred).
    """
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    if host in ("", "0.0.0.0", "::"):
        logger.warning("listening on all interfaces (%r): the SOAP server is reachable from the network", host)
    if tls is None:
        if not insecure:
            raise ConfigurationError("a server listens with TLS credentials, or insecure (plain HTTP, loopback only)")
        if not is_loopback(host):
            raise ConfigurationError(f"plain HTTP (insecure) is refused on {host}: only on a loopback address "
                                     "(127.0.0.1, ::1, localhost); give the server TLS credentials (<tls>)")
        listening = reactor.listenTCP(port, site, interface=host)
    else:
        options = server_options(tls, require_client_certificate=require_client_certificate)
        listening = reactor.listenSSL(port, site, options, interface=host)
    if isinstance(site, SoapSite) and site.wsdl is None and "{port}" in site.public_url:
        site.set_public_url(site.public_url.format(port=bound_port(listening)))
    return listening


def bound_port(listening: IListeningPort) -> int:
    """The TCP port number a listening port (from :func:`listen`) is bound to."""
    address: Any = listening.getHost()  # type: ignore[misc]
    return int(address.port)


__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_MAX_BODY_BYTES",
    "DOCTYPE_REFUSED",
    "NOT_XML",
    "REQUEST_TOO_LONG",
    "WSDL_NOT_READY",
    "XML_MEDIA_TYPES",
    "SoapResource",
    "SoapSite",
    "bound_port",
    "build_application",
    "build_site",
    "configure_spyne_logging",
    "find_doctype",
    "is_loopback",
    "listen",
    "refuse_doctype",
    "wsdl_document",
]
