"""Strict request envelopes (``vmshop_common/soap/envelope.py``): SOAP 1.1, one Body, one operation.

The rules one by one on parsed documents, then raw bodies against a server
of the project's stack (the echo site of ``test_soap_stack``, over mutual
TLS): each broken rule is a SOAP 1.1 fault with its own stable code and the
method never runs. ``tests/test_hostile.py`` sends the same kinds of
envelope to a real shop and plant.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from lxml import etree

from vmshop_common.errors import (
    ExtraBodyError,
    ExtraOperationError,
    HeaderMisplacedError,
    NoBodyError,
    NoOperationError,
    NotAnEnvelopeError,
    StrayContentError,
    VersionMismatchError,
    VMShopError,
)
from vmshop_common.soap.envelope import SOAP11_ENV, check_envelope

sys.path.insert(0, str(Path(__file__).resolve().parent))
import soap_harness  # noqa: E402
from test_soap_stack import HTTP, TNS, assert_soap_fault, build_echo_site  # noqa: E402

SOAP12_ENV = "http://www.w3.org/2003/05/soap-envelope"
OP = "<t:echo><t:s>one</t:s></t:echo>"
OTHER = "<t:echo><t:s>two</t:s></t:echo>"


def envelope(inside: str, ns: str = SOAP11_ENV) -> str:
    return f'<e:Envelope xmlns:e="{ns}" xmlns:t="{TNS}">{inside}</e:Envelope>'


def body(inside: str) -> str:
    return f"<e:Body>{inside}</e:Body>"


GOOD = {
    "plain": envelope(body(OP)),
    "an empty Header first": envelope("<e:Header/>" + body(OP)),
    "a Header with entries": envelope('<e:Header><x:token xmlns:x="urn:x">t</x:token></e:Header>' + body(OP)),
    "white space and comments everywhere": envelope(" \n<!-- a -->\n" + "<e:Body>\n  <!-- b -->" + OP
                                                    + "\n</e:Body><!-- c -->\n "),
    "processing instructions (spyne's parser drops them)": envelope("<?pi x?>" + body("<?pi y?>" + OP)),
    "default namespace prefixes": f'<Envelope xmlns="{SOAP11_ENV}"><Body><echo xmlns="{TNS}"><s>x</s></echo>'
                                  "</Body></Envelope>",
}

BAD: dict[str, tuple[str, type[VMShopError]]] = {
    "SOAP 1.2": (envelope(body(OP), SOAP12_ENV), VersionMismatchError),
    "an Envelope without a namespace": ("<Envelope><Body><echo/></Body></Envelope>", VersionMismatchError),
    "an Envelope of some other namespace": (envelope(body(OP), "urn:not-soap"), VersionMismatchError),
    "an operation as the root": (f'<t:echo xmlns:t="{TNS}"><t:s>x</t:s></t:echo>', NotAnEnvelopeError),
    "a Body as the root": (f'<e:Body xmlns:e="{SOAP11_ENV}" xmlns:t="{TNS}">{OP}</e:Body>', NotAnEnvelopeError),
    "two Bodies": (envelope(body(OP) + body(OTHER)), ExtraBodyError),
    "two Bodies, the second empty": (envelope(body(OP) + "<e:Body/>"), ExtraBodyError),
    "two operations": (envelope(body(OP + OTHER)), ExtraOperationError),
    "three operations": (envelope(body(OP + OTHER + OTHER)), ExtraOperationError),
    "a Header after the Body": (envelope(body(OP) + "<e:Header/>"), HeaderMisplacedError),
    "two Headers": (envelope("<e:Header/><e:Header/>" + body(OP)), HeaderMisplacedError),
    "no Body": (envelope("<e:Header/>"), NoBodyError),
    "nothing in the Envelope": (envelope(""), NoBodyError),
    "an empty Body": (envelope(body("")), NoOperationError),
    "a Body of comments": (envelope(body("<!-- x -->")), NoOperationError),
    "a Fault as the request": (envelope(body("<e:Fault><faultcode>e:Server</faultcode></e:Fault>")),
                               NoOperationError),
    "an element before the Body": (envelope(OP + body(OP)), StrayContentError),
    "an element after the Body": (envelope(body(OP) + OTHER), StrayContentError),
    "text in the Envelope": (envelope("text" + body(OP)), StrayContentError),
    "text after the Body": (envelope(body(OP) + "text"), StrayContentError),
    "text before the operation": (envelope(body("text" + OP)), StrayContentError),
    "text after the operation": (envelope(body(OP + "text")), StrayContentError),
    "text alone in the Body": (envelope(body("text")), StrayContentError),
}


@pytest.mark.parametrize("name", sorted(GOOD))
def test_a_soap_1_1_envelope_with_one_body_and_one_operation_passes(name: str) -> None:
    operation = check_envelope(etree.fromstring(GOOD[name]))
    assert etree.QName(operation).localname == "echo"


@pytest.mark.parametrize("name", sorted(BAD))
def test_each_broken_rule_has_its_own_error(name: str) -> None:
    text, error = BAD[name]
    with pytest.raises(VMShopError) as info:
        check_envelope(etree.fromstring(text))
    assert type(info.value) is error, info.value
    assert len(str(info.value)) < 400


def test_messages_name_what_is_wrong_and_stay_short() -> None:
    with pytest.raises(VersionMismatchError, match=SOAP12_ENV):
        check_envelope(etree.fromstring(envelope(body(OP), SOAP12_ENV)))
    long_name = "x" * 5000
    with pytest.raises(NotAnEnvelopeError) as info:
        check_envelope(etree.fromstring(f"<{long_name}/>"))
    assert len(str(info.value)) < 300
    with pytest.raises(StrayContentError, match="'junk'"):
        check_envelope(etree.fromstring(envelope(body("  junk " + OP))))


def test_every_code_is_distinct() -> None:
    codes = {error.CODE for _, error in BAD.values()}
    assert len(codes) == 8 and "VersionMismatch" in codes


# --- raw bodies against a server --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[soap_harness.ServedSite]:
    served = soap_harness.serve_in_thread(build_echo_site(), rt=soap_harness.reactor_thread())
    yield served
    served.stop()


def post(url: str, text: str, content_type: str = "text/xml; charset=utf-8") -> bytes:
    response = HTTP.post(url, data=text.encode(), headers={"Content-Type": content_type}, timeout=30)
    return response  # type: ignore[return-value]


@pytest.mark.parametrize("name", sorted(BAD))
def test_the_server_answers_each_broken_rule_with_its_fault(server: soap_harness.ServedSite, name: str) -> None:
    text, error = BAD[name]
    assert_soap_fault(post(server.url, text), error.CODE)  # type: ignore[arg-type]


def test_a_soap_1_2_envelope_gets_soap_1_1s_own_version_mismatch(server: soap_harness.ServedSite) -> None:
    """SOAP 1.1 section 4.4.1; SOAP 1.2 part 1 appendix A: a SOAP/1.1 node answers a SOAP 1.2 message with a
    SOAP/1.1 VersionMismatch fault. Sent as SOAP 1.2 clients send it (application/soap+xml)."""
    response = post(server.url, envelope(body(OP), SOAP12_ENV), 'application/soap+xml; charset=utf-8; action="echo"')
    assert response.status_code == 500  # type: ignore[attr-defined]
    document = etree.fromstring(response.content)  # type: ignore[attr-defined]
    assert document.tag == f"{{{SOAP11_ENV}}}Envelope"
    code = document.find(f"{{{SOAP11_ENV}}}Body/{{{SOAP11_ENV}}}Fault/faultcode")
    assert code is not None and code.text is not None
    prefix, _, local = code.text.partition(":")
    assert local == "VersionMismatch" and code.nsmap[prefix] == SOAP11_ENV


def test_good_envelopes_are_still_answered(server: soap_harness.ServedSite) -> None:
    for name, text in GOOD.items():
        response = post(server.url, text)
        assert response.status_code == 200, (name, response.content[:300])  # type: ignore[attr-defined]
        assert b"echoResult" in response.content  # type: ignore[attr-defined]
