"""The SOAP stack (Spyne 2.14.0 on Twisted 26.10, zeep 4.3.3): one test per point of the stack notes.

Servers run in the session's reactor thread (``soap_harness.reactor_thread``)
on 127.0.0.1, port 0; one test runs a server in a subprocess. Synchronous zeep
clients call from the test thread; ``AsyncSoapClient`` runs in the reactor
thread through ``ReactorThread.call``.
"""

from __future__ import annotations

import concurrent.futures
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# compat first: it must be imported before spyne (and spyne.server.twisted).
from vmshop_common.soap import compat  # noqa: F401

# isort: split
import requests
import zeep
import zeep.exceptions
from spyne import Float, Integer, ServiceBase, Unicode, rpc
from spyne.model.fault import Fault
from twisted.internet import defer, task

from vmshop_common.soap.client import (
    AsyncSoapClient,
    SoapCallTimeout,
    fault_code,
    gather_results,
    unwrap_first_error,
)
from vmshop_common.soap.server import (
    DOCTYPE_REFUSED,
    REQUEST_TOO_LONG,
    SoapSite,
    build_site,
    find_doctype,
    wsdl_document,
)

# soap_harness lives next to this file; import it under one name whatever pytest's import mode.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import soap_harness  # noqa: E402
from pki import test_pki  # noqa: E402

PKI = test_pki()
#: Every request of these tests goes over mutual TLS, as the admin of the test PKI.
HTTP = PKI.session("admin")


def zeep_client(url: str, timeout: float = 30) -> zeep.Client:
    return zeep.Client(url, transport=PKI.zeep_transport("admin", timeout))

TNS = "urn:vmshop:test:echo"
SOAP_ENV = "http://schemas.xmlsoap.org/soap/envelope/"

# Set by the ``relay_client`` fixture: the client the ``relay`` method uses.
RELAY_CLIENT: AsyncSoapClient | None = None
# Calls of ``held`` waiting for the test to answer them: (their Deferred, the Twisted request).
HELD: list[tuple[defer.Deferred[str], Any]] = []


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


class EchoService(ServiceBase):  # type: ignore[misc]
    """A tiny service exercising each path of the stack."""

    @rpc(Unicode, _returns=Unicode)  # type: ignore[misc]
    def echo(ctx, s):  # noqa: N805
        return s

    @rpc(Float, _returns=Unicode)  # type: ignore[misc]
    def slow(ctx, seconds):  # noqa: N805
        """Answers after ``seconds`` without holding a thread (returns a Deferred)."""
        return task.deferLater(_reactor(), seconds, lambda: "slept")

    @rpc(_returns=Unicode)  # type: ignore[misc]
    def held(ctx):  # noqa: N805
        """Answers when the test fires the Deferred it finds in ``HELD``."""
        d: defer.Deferred[str] = defer.Deferred()
        HELD.append((d, ctx.transport.req))
        return d

    @rpc(Unicode, _returns=Unicode)  # type: ignore[misc]
    def fail(ctx, code):  # noqa: N805
        raise Fault(code, "failed on purpose")

    @rpc(Unicode, _returns=Unicode)  # type: ignore[misc]
    def fail_later(ctx, code):  # noqa: N805
        def _fail() -> None:
            raise Fault(code, "failed later")

        return task.deferLater(_reactor(), 0.01, _fail)

    @rpc(_returns=Unicode)  # type: ignore[misc]
    def crash(ctx):  # noqa: N805
        raise RuntimeError("a bug")

    @rpc(_returns=Unicode)  # type: ignore[misc]
    def crash_later(ctx):  # noqa: N805
        def _crash() -> None:
            raise RuntimeError("a later bug")

        return task.deferLater(_reactor(), 0.01, _crash)

    @rpc(Integer, Float, _returns=Unicode)  # type: ignore[misc]
    def relay(ctx, n, seconds):  # noqa: N805
        """Calls ``slow(seconds)`` ``n`` times in parallel on RELAY_CLIENT, like the shop asking plants."""
        assert RELAY_CLIENT is not None
        d = gather_results(RELAY_CLIENT.call("slow", seconds=seconds) for _ in range(n))
        return d.addCallback(lambda results: ",".join(results))


def build_echo_site(
    public_url: str = "https://127.0.0.1:{port}/", max_body_bytes: str | int = 2 * 1024 * 1024
) -> SoapSite:
    """The echo site (also the subprocess factory: arguments may come as str)."""
    return build_site([EchoService], TNS, public_url, name="Echo", max_body_bytes=int(max_body_bytes))


def envelope(body: str) -> bytes:
    return (
        f'<soap:Envelope xmlns:soap="{SOAP_ENV}" xmlns:t="{TNS}"><soap:Body>{body}</soap:Body></soap:Envelope>'
    ).encode()


def post(url: str, data: Any, **headers: str) -> requests.Response:
    headers.setdefault("Content-Type", "text/xml; charset=utf-8")
    return HTTP.post(url, data=data, headers=headers, timeout=30)


def assert_soap_fault(response: requests.Response, code: str, status: int = 500) -> None:
    """The response is a SOAP fault with ``code`` (without namespace prefix) and HTTP ``status``."""
    assert response.status_code == status, response.text[:500]
    assert response.headers["Content-Type"].startswith("text/xml"), response.headers
    from lxml import etree

    doc = etree.fromstring(response.content)
    faultcode = doc.find(f"{{{SOAP_ENV}}}Body/{{{SOAP_ENV}}}Fault/faultcode")
    assert faultcode is not None, response.text[:500]
    assert faultcode.text.rsplit(":", 1)[-1] == code


# --- fixtures ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def rt() -> soap_harness.ReactorThread:
    return soap_harness.reactor_thread()


@pytest.fixture(scope="module")
def server(rt: soap_harness.ReactorThread) -> Iterator[soap_harness.ServedSite]:
    served = soap_harness.serve_in_thread(build_echo_site(), rt=rt)
    yield served
    served.stop()


@pytest.fixture(scope="module")
def limited_server(rt: soap_harness.ReactorThread) -> Iterator[soap_harness.ServedSite]:
    served = soap_harness.serve_in_thread(build_echo_site(max_body_bytes=64 * 1024), rt=rt)
    yield served
    served.stop()


@pytest.fixture(scope="module")
def client(server: soap_harness.ServedSite) -> Iterator[Any]:
    with zeep_client(server.wsdl_url) as zc:
        yield zc.service


@pytest.fixture(scope="module")
def wsdl_file(server: soap_harness.ServedSite, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The served WSDL saved to a file, as a checked-in WSDL would be."""
    path = tmp_path_factory.mktemp("wsdl") / "echo.wsdl"
    path.write_bytes(HTTP.get(server.wsdl_url, timeout=10).content)
    return path


@pytest.fixture(scope="module")
def relay_client(
    rt: soap_harness.ReactorThread, server: soap_harness.ServedSite, wsdl_file: Path
) -> Iterator[AsyncSoapClient]:
    global RELAY_CLIENT
    RELAY_CLIENT = AsyncSoapClient(wsdl_file, server.url, timeout=10, tls=PKI.client_policy("admin"))
    yield RELAY_CLIENT
    rt.call(RELAY_CLIENT.close)
    RELAY_CLIENT = None


# --- stack notes: Spyne on Twisted ----------------------------------------------------------


def test_post_works(server: soap_harness.ServedSite, client: Any) -> None:
    """Point 1: a SOAP POST used to answer 405 Client.RequestNotAllowed (b'POST' != 'POST')."""
    assert client.echo("hello") == "hello"
    response = post(server.url, envelope("<t:echo><t:s>raw</t:s></t:echo>"))
    assert response.status_code == 200
    assert b"<tns:echoResult>raw</tns:echoResult>" in response.content


def test_wsdl_served_for_configured_url_despite_forged_host(rt: soap_harness.ReactorThread) -> None:
    """Point 2: ?wsdl used to answer 500; and spyne cached the WSDL of the first caller's Host."""
    public = "http://vmshop.public.example:8080/echo"
    site = build_echo_site(public_url=public)
    served = soap_harness.serve_in_thread(site, rt=rt)
    try:
        forged = HTTP.get(served.wsdl_url, headers={"Host": "evil.example:6666"}, timeout=10)
        assert forged.status_code == 200
        assert forged.headers["Content-Type"].startswith("text/xml")
        assert f'location="{public}"'.encode() in forged.content
        assert b"evil.example" not in forged.content
        honest = HTTP.get(served.wsdl_url, timeout=10)
        upper = HTTP.get(served.url + "any/path?WSDL", timeout=10)
        assert honest.content == forged.content == upper.content == site.wsdl
        assert wsdl_document(site.app, public) == site.wsdl
    finally:
        served.stop()


def test_wsdl_names_bound_port_when_configured_with_placeholder(server: soap_harness.ServedSite) -> None:
    wsdl = HTTP.get(server.wsdl_url, headers={"Host": "evil.example"}, timeout=10).content
    assert f'location="https://127.0.0.1:{server.port}/"'.encode() in wsdl  # https, the bound port
    assert b'transport="http://schemas.xmlsoap.org/soap/http"' in wsdl


def test_wsdl_document_is_deterministic() -> None:
    site = build_echo_site(public_url="http://a.example/")
    assert wsdl_document(site.app, "http://b.example/") == wsdl_document(site.app, "http://b.example/")
    assert wsdl_document(site.app, "http://a.example/") == site.wsdl


def test_content_type_as_bytes(server: soap_harness.ServedSite) -> None:
    """Point 3: Twisted hands the Content-Type over as bytes; with parameters it crashed cgi.parse_header."""
    for content_type in ("text/xml; charset=utf-8", "text/xml", 'text/xml; charset="UTF-8"; action="echo"'):
        response = post(server.url, envelope("<t:echo><t:s>ct</t:s></t:echo>"), **{"Content-Type": content_type})
        assert response.status_code == 200, (content_type, response.text[:300])
    from vmshop_common.soap.compat import CompatTransportContext

    class FakeRequest:
        method = b"POST"

        def getHeader(self, name: bytes) -> bytes:  # noqa: N802
            return b"text/xml; charset=utf-8"

    ctx = CompatTransportContext.__new__(CompatTransportContext)
    ctx.req = FakeRequest()
    assert ctx.get_request_content_type() == "text/xml; charset=utf-8"
    assert ctx.get_request_method() == "POST"


def test_body_of_150_kb(client: Any) -> None:
    """Point 4a: bodies of 100,000 bytes or more are spooled to a temporary file by Twisted."""
    text = "x" * 150_000
    assert client.echo(text) == text


def test_chunked_upload(server: soap_harness.ServedSite) -> None:
    """Point 4b: a chunked upload (no Content-Length) is spooled to a temporary file too."""

    def chunks() -> Iterator[bytes]:
        yield b'<soap:Envelope xmlns:soap="%s" xmlns:t="%s"><soap:Body><t:echo><t:s>' % (
            SOAP_ENV.encode(),
            TNS.encode(),
        )
        for _ in range(8):
            yield b"y" * 20_000
        yield b"</t:s></t:echo></soap:Body></soap:Envelope>"

    response = post(server.url, chunks())
    assert response.request.headers.get("Transfer-Encoding") == "chunked"
    assert response.status_code == 200, response.text[:300]
    assert b"y" * 160_000 + b"</tns:echoResult>" in response.content


def test_body_over_limit_is_a_soap_fault(limited_server: soap_harness.ServedSite) -> None:
    """Point 4c: spyne's max_content_length was not enforced for SOAP bodies."""
    big = envelope("<t:echo><t:s>" + "z" * 100_000 + "</t:s></t:echo>")
    assert_soap_fault(post(limited_server.url, big), REQUEST_TOO_LONG, status=413)

    def chunks() -> Iterator[bytes]:
        for _ in range(10):
            yield big[:20_000]

    assert_soap_fault(post(limited_server.url, chunks()), REQUEST_TOO_LONG, status=413)
    with zeep_client(limited_server.wsdl_url) as zc:
        with pytest.raises(zeep.exceptions.Fault) as info:
            zc.service.echo("z" * 100_000)
        assert fault_code(info.value) == REQUEST_TOO_LONG
        assert zc.service.echo("small") == "small"  # the limit only refuses what is over it


def test_doctype_is_refused_before_parsing(server: soap_harness.ServedSite) -> None:
    """XML safety: any DOCTYPE is refused with a SOAP fault (with a validator it crashed into an HTML 500)."""
    laughs = (
        '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;">]>'
        f'<soap:Envelope xmlns:soap="{SOAP_ENV}" xmlns:t="{TNS}"><soap:Body><t:echo><t:s>&lol2;</t:s></t:echo>'
        "</soap:Body></soap:Envelope>"
    )
    external = '<!DOCTYPE x SYSTEM "http://127.0.0.1:1/x.dtd">' + envelope("<t:echo><t:s>x</t:s></t:echo>").decode()
    utf16 = ('<?xml version="1.0" encoding="UTF-16"?><!DOCTYPE x>' + envelope("<t:echo/>").decode()).encode("utf-16")
    for body in (laughs.encode(), external.encode(), utf16):
        assert find_doctype(body) is not None
        assert_soap_fault(post(server.url, body), DOCTYPE_REFUSED)
    assert find_doctype(envelope("<t:echo/>")) is None


def test_schema_validation_and_syntax_errors_are_soap_faults(server: soap_harness.ServedSite) -> None:
    """Soap11(validator='lxml'): invalid requests get SOAP faults, never HTML."""
    assert_soap_fault(
        post(server.url, envelope("<t:echo><t:bogus>1</t:bogus></t:echo>")), "Client.SchemaValidationError"
    )
    assert_soap_fault(post(server.url, b"not xml at all"), "Client.XMLSyntaxError")
    response = HTTP.get(server.url, timeout=10)  # GET without ?wsdl
    assert_soap_fault(response, "Client.RequestNotAllowed", status=405)
    response = HTTP.post(server.url, data=envelope("<t:echo/>"), timeout=10)  # no Content-Type
    assert_soap_fault(response, "Client.RequestNotAllowed", status=405)


def test_request_bodies_are_not_logged(server: soap_harness.ServedSite, caplog: pytest.LogCaptureFixture) -> None:
    """Spyne logs the whole body of an unparsable request at ERROR: configure_spyne_logging stops that."""
    caplog.set_level(logging.DEBUG)
    marker = "SECRET-BODY-MARKER"
    assert_soap_fault(post(server.url, ("<broken>" + marker * 100).encode()), "Client.XMLSyntaxError")
    assert_soap_fault(post(server.url, envelope("<t:fail><t:code>Client.Nope</t:code></t:fail>")), "Client.Nope")
    assert not [r for r in caplog.records if marker in r.getMessage()]
    assert not [r for r in caplog.records if r.name.startswith("spyne") and r.levelno >= logging.ERROR]
    assert any(r.name == "vmshop_common.soap" and "Client.Nope" in r.getMessage() for r in caplog.records)


def test_method_returning_a_deferred(client: Any) -> None:
    """Route 1: methods may return Deferreds (wait on other servers without holding a thread)."""
    started = time.monotonic()
    assert client.slow(0.2) == "slept"
    assert 0.19 <= time.monotonic() - started < 2


def test_fault_code_reaches_zeep(client: Any) -> None:
    """Fault(faultcode='Client.Something') reaches zeep as soap11env:Client.Something."""
    for method in (client.fail, client.fail_later):
        with pytest.raises(zeep.exceptions.Fault) as info:
            method("Client.Something")
        assert info.value.code == "soap11env:Client.Something"
        assert fault_code(info.value) == "Client.Something"
    for method in (client.crash, client.crash_later):
        with pytest.raises(zeep.exceptions.Fault) as info:
            method()
        assert fault_code(info.value) == "Server"
        assert "bug" not in (info.value.message or "")  # no internals leak to the client


@pytest.mark.parametrize("tls", [True, False], ids=["TLS", "plain HTTP"])
def test_an_answer_whose_connection_is_lost_as_it_is_written_logs_no_error(
        rt: soap_harness.ReactorThread, tls: bool) -> None:
    """A shop stopped during a burst of collects logged ``RuntimeError: Producer was not unregistered``.

    Spyne answered a method's Deferred by registering a pull producer on the request, run at a later
    reactor turn; a connection lost before then stopped the producer, whose errback finished the request
    (before Twisted had marked it disconnected) with the producer still registered. Answers are written
    whole, at once: the same loss now logs nothing."""
    from twisted.logger import globalLogPublisher

    events: list[dict[str, Any]] = []
    server = soap_harness.serve_in_thread(build_echo_site("http://127.0.0.1:{port}/" if not tls else
                                                          "https://127.0.0.1:{port}/"), rt=rt, tls=tls)
    globalLogPublisher.addObserver(events.append)  # type: ignore[arg-type]
    HELD.clear()
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            answer = pool.submit(post, server.url, envelope("<t:held/>"))
            deadline = time.monotonic() + 30
            while not HELD:
                assert time.monotonic() < deadline and not answer.done(), "the call never reached the server"
                time.sleep(0.01)

            def answer_and_lose_the_connection() -> None:
                # The answer is ready, and in the same reactor turn the connection goes: what a reactor
                # stopping does to every open connection, or a client's close read in the same turn.
                from twisted.internet.error import ConnectionDone
                from twisted.python.failure import Failure

                d, request = HELD[0]
                transport = request.channel.transport
                tcp = transport.transport if tls else transport
                d.callback("late")
                tcp.connectionLost(Failure(ConnectionDone()))

            rt.call(answer_and_lose_the_connection)
            with pytest.raises(requests.exceptions.ConnectionError):
                answer.result(30)
        rt.call(task.deferLater, _reactor(), 0.2, lambda: None)  # the reactor has handled the loss
        from twisted.logger import LogLevel, formatEvent

        failures = [e for e in events if "log_failure" in e or e.get("log_level") in (LogLevel.error,
                                                                                        LogLevel.critical)]
        assert not failures, [formatEvent(e) for e in failures]
        assert b"still" in post(server.url, envelope("<t:echo><t:s>still</t:s></t:echo>")).content
    finally:
        globalLogPublisher.removeObserver(events.append)  # type: ignore[arg-type]
        server.stop()


def test_server_binds_localhost(server: soap_harness.ServedSite) -> None:
    assert server.listening.getHost().host == "127.0.0.1"


# --- calling other servers from inside a service ------------------------------------------------


def test_async_client_parallel_calls(
    rt: soap_harness.ReactorThread, relay_client: AsyncSoapClient, server: soap_harness.ServedSite
) -> None:
    """Three parallel 1 s calls take ~1 s, not 3 s, and the reactor keeps serving meanwhile.

    The margins are wide (a loaded 2-core host once took 0.2036 s for an echo against a 0.2 s bound with 0.3 s
    calls): a serial client or a blocked reactor would still be told apart at any load."""
    # Warm up: the first call imports lazily loaded modules and opens a connection.
    assert rt.call(relay_client.call, "echo", s="warm-up") == "warm-up"
    started = time.monotonic()
    results = rt.call(lambda: gather_results(relay_client.call("slow", seconds=1.0) for _ in range(3)))
    elapsed = time.monotonic() - started
    assert results == ["slept"] * 3
    assert elapsed < 2.0, elapsed  # serial: >= 3 s

    # The shop's case: a service method (relay) waits on three calls; other requests are served meanwhile.
    def call_relay() -> tuple[str, float]:
        with zeep_client(server.wsdl_url) as zc:
            t0 = time.monotonic()
            return zc.service.relay(3, 1.0), time.monotonic() - t0

    with zeep_client(server.wsdl_url) as zc, concurrent.futures.ThreadPoolExecutor(1) as pool:
        zc.service.echo("warm-up")
        future = pool.submit(call_relay)
        latencies = []
        while not future.done():
            t0 = time.monotonic()
            assert zc.service.echo("meanwhile") == "meanwhile"
            latencies.append(time.monotonic() - t0)
        relayed, relay_elapsed = future.result()
    assert relayed == "slept,slept,slept"
    assert relay_elapsed < 2.0, relay_elapsed  # serial: >= 3 s
    assert len(latencies) >= 5 and max(latencies) < 0.5, latencies  # a reactor held by the relay: >= 1 s


def test_async_client_timeout(
    rt: soap_harness.ReactorThread, server: soap_harness.ServedSite, wsdl_file: Path, client: Any
) -> None:
    quick = AsyncSoapClient(wsdl_file, server.url, timeout=0.2, tls=PKI.client_policy("admin"))
    try:
        started = time.monotonic()
        with pytest.raises(SoapCallTimeout) as info:
            rt.call(quick.call, "slow", seconds=2.0)
        assert 0.15 < time.monotonic() - started < 1.0
        assert info.value.operation == "slow"
        assert isinstance(info.value, defer.TimeoutError)
        # per call: a longer timeout for one call, the short one still applies to others
        assert rt.call(quick.call_with_timeout, 2.0, "slow", seconds=0.3) == "slept"
        with pytest.raises(SoapCallTimeout):
            rt.call(quick.call, "slow", seconds=1.0)
    finally:
        rt.call(quick.close)
    assert client.echo("still serving") == "still serving"


def test_async_client_keeps_fault_code_through_gather(
    rt: soap_harness.ReactorThread, relay_client: AsyncSoapClient
) -> None:
    with pytest.raises(zeep.exceptions.Fault) as info:
        rt.call(relay_client.call, "fail", code="Client.NoSuchPlant")
    assert fault_code(info.value) == "Client.NoSuchPlant"

    def gathered() -> defer.Deferred[list[Any]]:
        return gather_results(
            [relay_client.call("echo", s="ok"), relay_client.call("fail_later", code="Client.Something")]
        )

    with pytest.raises(zeep.exceptions.Fault) as info:
        rt.call(gathered)
    assert info.value.code == "soap11env:Client.Something"

    def raw_gather() -> defer.Deferred[Any]:
        d = defer.gatherResults([relay_client.call("fail", code="Client.Raw")], consumeErrors=True)
        return d.addErrback(lambda f: unwrap_first_error(f).value)  # the unwrapped exception, as a value

    assert fault_code(rt.call(raw_gather)) == "Client.Raw"


def test_async_client_loads_wsdl_from_url(rt: soap_harness.ReactorThread, server: soap_harness.ServedSite) -> None:
    remote = AsyncSoapClient(server.wsdl_url, timeout=5, tls=PKI.client_policy("admin"))  # address: the WSDL's
    try:
        assert remote.address == server.url
        assert "echo" in remote.operations
        assert rt.call(remote.call, "echo", s="via url") == "via url"
    finally:
        rt.call(remote.close)


def test_server_in_subprocess() -> None:
    """The subprocess way of the harness (used by the shop and plant end-to-end tests)."""
    proc = soap_harness.start_subprocess_server("tests.test_soap_stack:build_echo_site",
                                                tls=(PKI.cert("shop"), PKI.key("shop"), PKI.ca))
    try:
        with zeep_client(proc.url + "?wsdl") as zc:
            assert zc.service.echo("from a subprocess") == "from a subprocess"
    finally:
        status = proc.stop()
    assert status == 0, proc.log()


@pytest.mark.parametrize(("body", "plain"), [
    (b'<?xml version="1.0" encoding="utf-8"?><a/>', True),
    (b"\xef\xbb\xbf  \n<a/>", True),
    (b"<a><![CDATA[<!DOCTYPE x>]]></a>", False),  # the bytes appear: the full parse decides (no DOCTYPE)
    (b"<!doctype x><a/>", False),
    (b'<?xml version="1.0" encoding="UTF-7"?><a/>', False),  # '<!DOCTYPE' could hide as +ADwAIQ-DOCTYPE
    (b'<?xml version="1.0" encoding="UTF-16"?><a/>', False),
    ('<?xml version="1.0" encoding="UTF-16"?><a/>'.encode("utf-16"), False),
    ("<a/>".encode("cp500"), False),  # EBCDIC: '<' is not 0x3C
    (b'<?xml version="1.0" encoding="utf-8"', False),  # no end of the declaration in sight
])
def test_the_doctype_shortcut_only_skips_what_cannot_hide_one(body: bytes, plain: bool) -> None:
    from vmshop_common.soap.server import _plainly_without_doctype

    assert _plainly_without_doctype(body) is plain
    if plain:
        assert find_doctype(body) is None



def test_no_access_log_work_without_a_log_path(tmp_path: Path) -> None:
    """The site formats access lines only for an access log file it was given."""
    from twisted.web.resource import Resource
    from twisted.web.test.requesthelper import DummyRequest

    from vmshop_common.soap.compat import LimitedSite

    formatted = []

    def formatter(timestamp: str, request: Any) -> str:
        formatted.append(request)
        return "line"

    quiet = LimitedSite(Resource(), logFormatter=formatter)
    quiet.log(DummyRequest([b""]))
    assert formatted == []
    logged = LimitedSite(Resource(), logPath=str(tmp_path / "access.log"), logFormatter=formatter)
    logged.startFactory()
    try:
        logged.log(DummyRequest([b""]))
    finally:
        logged.stopFactory()
    assert len(formatted) == 1 and (tmp_path / "access.log").read_text() == "line\n"


def test_spyne_runs_no_full_gc_per_request() -> None:
    from spyne import const as spyne_const

    assert spyne_const.MIN_GC_INTERVAL == float("inf")
