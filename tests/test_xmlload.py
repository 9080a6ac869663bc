"""The hardened XML loader (vmshop_common.xmlload) and the project's errors (vmshop_common.errors).

Hostile documents (XXE, billion laughs, external DTDs, deep nesting, huge
files, binary junk, other encodings, wrong roots) must be refused with the
right stable code and a clear message, before any expensive work. The
inputs are realistic in size (10 MB, 100 000 levels): they must still be
refused at once, but no test measures time.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lxml import etree

from vmshop_common import errors
from vmshop_common.errors import (
    ALL_ERRORS,
    ERROR_BY_CODE,
    DoctypeRefusedError,
    DocumentTooLargeError,
    Problem,
    VMShopError,
    WrongRootError,
    XMLSyntaxError,
    error_for_code,
)
from vmshop_common.xmlload import MAX_BYTES, MAX_DEPTH, parse_xml, parse_xml_file

NS = "urn:vmshop:dag:1"
VM = f"{{{NS}}}vm"


def nested(depth: int, tag: bytes = b"a") -> bytes:
    return (b"<" + tag + b">") * depth + (b"</" + tag + b">") * depth


def refused(data: bytes | str, error: type[VMShopError], **kwargs: object) -> VMShopError:
    with pytest.raises(error) as info:
        parse_xml(data, **kwargs)  # type: ignore[arg-type]
    exc = info.value
    assert type(exc) is error
    assert exc.code == error.CODE
    assert str(exc)  # a clear message, never empty
    return exc


# Accepted documents ---------------------------------------------------------------------------

def test_parses_and_keeps_source_lines() -> None:
    root = parse_xml(b'<?xml version="1.0" encoding="UTF-8"?>\n<r>\n  <a/>\n  <b>text</b>\n</r>\n')
    assert root.tag == "r"
    assert [(child.tag, child.sourceline) for child in root] == [("a", 3), ("b", 4)]


def test_str_bytes_and_bytearray_are_accepted() -> None:
    for data in ("<r>é</r>", "<r>é</r>".encode(), bytearray("<r>é</r>".encode())):
        assert parse_xml(data).text == "é"


def test_str_with_utf8_declaration_is_accepted() -> None:
    assert parse_xml('<?xml version="1.0" encoding="UTF-8"?><r>ü</r>').text == "ü"


def test_utf8_bom_is_accepted() -> None:
    assert parse_xml(b"\xef\xbb\xbf<r/>").tag == "r"


def test_ascii_declaration_is_accepted() -> None:
    assert parse_xml(b'<?xml version="1.0" encoding="US-ASCII"?><r/>').tag == "r"


def test_comments_processing_instructions_and_cdata_are_fine() -> None:
    root = parse_xml(b"<?pi data?><!-- c --><r><![CDATA[<not markup> & stuff]]><!-- c2 --></r>")
    assert root.text == "<not markup> & stuff"


def test_expected_root_matches_clark_name() -> None:
    assert parse_xml(f'<vm xmlns="{NS}"/>', expected_root=VM).tag == VM
    assert parse_xml(f'<d:vm xmlns:d="{NS}"/>', expected_root=VM).tag == VM


def test_size_limit_is_inclusive() -> None:
    doc = b"<r>" + b"x" * (100 - 7) + b"</r>"
    assert len(doc) == 100
    assert parse_xml(doc, max_bytes=100).tag == "r"
    exc = refused(doc + b" ", DocumentTooLargeError, max_bytes=100)
    assert "101 bytes" in exc.message and "100" in exc.message


def test_depth_limit_is_inclusive() -> None:
    assert parse_xml(nested(MAX_DEPTH)).tag == "a"
    exc = refused(nested(MAX_DEPTH + 1), DocumentTooLargeError)
    assert f"more than {MAX_DEPTH}" in exc.message
    assert exc.line == 1


def test_depth_limit_is_configurable() -> None:
    assert parse_xml(nested(40), max_depth=64).tag == "a"
    refused(nested(5), DocumentTooLargeError, max_depth=4)


def test_defaults_match_the_documented_limits() -> None:
    assert MAX_BYTES == 1024 * 1024
    assert MAX_DEPTH == 32


# Hostile documents ------------------------------------------------------------------------------

XXE = b"""<?xml version="1.0"?>
<!DOCTYPE r [
  <!ENTITY secret SYSTEM "file:///etc/passwd">
]>
<r>&secret;</r>"""

BILLION_LAUGHS = (b'<?xml version="1.0"?>\n<!DOCTYPE lolz [\n <!ENTITY lol "lol">\n'
                  + b"".join(b' <!ENTITY lol%d "%s">\n' % (i, (b"&lol%s;" % (str(i - 1).encode() if i > 1 else b""))
                                                                     * 10) for i in range(1, 10))
                  + b"]>\n<lolz>&lol9;</lolz>")


@pytest.mark.parametrize("data, line", [
    (XXE, 2),
    (BILLION_LAUGHS, 2),
    (b'<!DOCTYPE r SYSTEM "http://attacker.example/evil.dtd"><r/>', 1),
    (b'<!DOCTYPE r PUBLIC "-//X//Y" "file:///dev/random"><r/>', 1),
    (b"\n\n<!doctype r><r/>", 3),
    (b"<r/>\n<!DOCTYPE r>", 2),  # anywhere in the document
    (b'<r><!ENTITY x "y"></r>', 1),  # an entity declaration without a DOCTYPE
    (b'<?xml version="1.0"?>\n<r/>\n<!  ENTITY x "y">', 3),
], ids=["xxe", "billion-laughs", "external-dtd", "public-dtd", "lowercase", "after-root", "entity", "entity-spaced"])
def test_dtds_and_entities_are_refused_before_parsing(data: bytes, line: int) -> None:
    exc = refused(data, DoctypeRefusedError)
    assert exc.line == line
    assert "refused" in exc.message


def test_xxe_never_reads_the_file() -> None:
    exc = refused(XXE, DoctypeRefusedError)
    assert "root:" not in str(exc)


def test_doctype_hidden_in_utf7_is_still_refused() -> None:
    # The byte scan can't see '<!DOCTYPE' in UTF-7; the parsed document's doctype is checked too.
    data = (b'<?xml version="1.0" encoding="UTF-7"?>+ADw-!DOCTYPE r +AFs-+ADw-!ENTITY x \'y\'+AD4-+AF0-+AD4-'
            b"+ADw-r+AD4-+ACY-x+ADs-+ADw-/r+AD4-")
    refused(data, DoctypeRefusedError)


@pytest.mark.parametrize("data", [
    "<r/>".encode("utf-16"),  # BOM
    "<r/>".encode("utf-16-le"),  # no BOM: NUL bytes
    "<r/>".encode("utf-16-be"),
    "<r/>".encode("utf-32"),
    '<!DOCTYPE r [<!ENTITY x "y">]><r>&x;</r>'.encode("utf-16"),
], ids=["utf16-bom", "utf16le", "utf16be", "utf32", "utf16-doctype"])
def test_other_unicode_encodings_are_refused(data: bytes) -> None:
    exc = refused(data, XMLSyntaxError)
    assert "UTF-8" in exc.message
    assert exc.line == 1


@pytest.mark.parametrize("declared", ["ISO-8859-1", "windows-1252", "UTF-7"])
def test_declared_legacy_encodings_are_refused(declared: str) -> None:
    # UTF-8 only: a str is encoded as UTF-8, so a declared latin-1 would garble it; bytes likewise.
    text = f'<?xml version="1.0" encoding="{declared}"?><r>abc</r>'
    exc = refused(text, XMLSyntaxError)
    assert "UTF-8" in exc.message and declared in str(exc)
    refused(text.encode("ascii"), XMLSyntaxError)


def test_unknown_declared_encoding_is_a_syntax_error() -> None:
    refused(b'<?xml version="1.0" encoding="no-such-encoding"?><r/>', XMLSyntaxError)


def test_ebcdic_is_refused() -> None:
    refused('<?xml version="1.0" encoding="IBM037"?><!DOCTYPE r [<!ENTITY x "y">]><r>&x;</r>'.encode("cp037"),
            XMLSyntaxError)


def test_very_deep_nesting_is_refused() -> None:
    data = nested(100_000)
    assert len(data) < MAX_BYTES  # under the size limit: it's the depth that is refused
    exc = refused(data, DocumentTooLargeError)
    assert "deep" in exc.message


def test_very_deep_nesting_of_the_expected_root_is_refused() -> None:
    data = f'<vm xmlns="{NS}">'.encode() + nested(100_000, b"nodes") + b"</vm>"
    refused(data, DocumentTooLargeError, expected_root=VM)


def test_huge_document_is_refused_by_size() -> None:
    data = b"<r>" + b"<a>x</a>" * (10 * 1024 * 1024 // 8) + b"</r>"
    assert len(data) > 10 * 1024 * 1024
    exc = refused(data, DocumentTooLargeError)
    assert str(MAX_BYTES) in exc.message


def test_huge_str_is_refused_by_size() -> None:
    refused("<r>" + "é" * (MAX_BYTES // 2 + 1) + "</r>", DocumentTooLargeError)


def test_huge_file_is_read_only_up_to_the_limit(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "huge.xml")
    with open(path, "wb") as handle:
        handle.write(b"<r>")
        handle.write(b"x" * (10 * 1024 * 1024))
        handle.write(b"</r>")
    with pytest.raises(DocumentTooLargeError) as info:
        parse_xml_file(path)
    assert f"is {MAX_BYTES + 1} bytes" in info.value.message  # it stopped reading after the limit


def test_parse_xml_file_passes_options(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "doc.xml")
    with open(path, "wb") as handle:
        handle.write(b"<r><a/></r>")
    assert parse_xml_file(path, expected_root="r").tag == "r"
    with pytest.raises(WrongRootError):
        parse_xml_file(path, expected_root=VM)
    with pytest.raises(DocumentTooLargeError):
        parse_xml_file(path, max_bytes=5)


@pytest.mark.parametrize("data, line", [
    (b"", 1),
    (b"   \n\t  ", 1),
    (b"\xef\xbb\xbf", 1),
    (b"<r>", None),
    (b"<r>\n<a>\n</b>\n</r>", 3),
    (b"<r/><r/>", 1),
    (b"just text", 1),
    (b'<r a="1" a="2"/>', 1),
    (b"<r>&undefined;</r>", 1),
    (b"<r>\n&#0;</r>", 2),
    (b"<r>\x01</r>", 1),
    (b"<r>\xff\xfe</r>", 1),  # invalid UTF-8
], ids=["empty", "blank", "bom-only", "unclosed", "mismatch", "two-roots", "text", "dup-attr", "undefined-entity",
        "nul-ref", "control-char", "bad-utf8"])
def test_malformed_documents_are_syntax_errors(data: bytes, line: int | None) -> None:
    exc = refused(data, XMLSyntaxError)
    if line is not None:
        assert exc.line == line


def test_binary_junk_is_a_syntax_error() -> None:
    junk = bytes((i * 7919 + 13) % 256 for i in range(64 * 1024))
    refused(junk, XMLSyntaxError)
    refused(b"\x00" * 1000, XMLSyntaxError)
    refused(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 4, XMLSyntaxError)
    refused(b"\x1f\x8b\x08\x00" + bytes(200), XMLSyntaxError)  # gzip


@pytest.mark.parametrize("doc, message", [
    (b"<html><body/></html>", "<html> (no namespace)"),
    (b"<vm/>", "<vm> (no namespace)"),
    (b'<vm xmlns="urn:other"/>', "<vm> in namespace 'urn:other'"),
    (f'<dag xmlns="{NS}"/>'.encode(), "<dag> in namespace"),
], ids=["html", "no-namespace", "other-namespace", "dag"])
def test_wrong_root_is_refused(doc: bytes, message: str) -> None:
    exc = refused(b'<?xml version="1.0"?>\n' + doc, WrongRootError, expected_root=VM, what="DAG")
    assert message in exc.message
    assert "expected <vm> in namespace 'urn:vmshop:dag:1'" in exc.message
    assert exc.message.startswith("DAG ")
    assert exc.line == 2


def test_what_names_the_document_in_messages() -> None:
    assert refused(b"", XMLSyntaxError, what="image configuration").message.startswith("image configuration")
    assert refused(b"<!DOCTYPE x><x/>", DoctypeRefusedError, what="request").message.startswith("request")


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_leak_an_lxml_error(data: bytes) -> None:
    try:
        parse_xml(data)
    except VMShopError as exc:
        assert exc.code.startswith("Client.")


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet='<>/!?="\' abx&;#[]-\n:DOCTYPEENTITY', max_size=80))
def test_random_markup_never_leaks_an_lxml_error(text: str) -> None:
    try:
        parse_xml(text)
    except VMShopError as exc:
        assert exc.code.startswith("Client.")


def test_no_lxml_exception_escapes_parsing() -> None:
    # A str with a NUL and other oddities: lxml would raise ValueError or its own errors.
    for data in ("<r>\x00</r>", "\ud800<r/>".encode("utf-8", "surrogatepass"), "<r/>\x00"):
        with pytest.raises(VMShopError):
            parse_xml(data)
    assert not issubclass(etree.XMLSyntaxError, VMShopError)


# Errors -----------------------------------------------------------------------------------------

STABLE_CODES = {
    "XMLSyntaxError": "Client.XMLSyntax",
    "DoctypeRefusedError": "Client.DoctypeRefused",
    "DocumentTooLargeError": "Client.DocumentTooLarge",
    "WrongRootError": "Client.WrongRoot",
    "SchemaInvalidError": "Client.SchemaInvalid",
    "DagInvalidError": "Client.DagInvalid",
    "NoSuchImageError": "Client.NoSuchImage",
    "NoSuchVMError": "Client.NoSuchVM",
    "NoSuchPlantError": "Client.NoSuchPlant",
    "QueryInvalidError": "Client.QueryInvalid",
    "NotSupportedError": "Client.NotSupported",
    "DeclinedError": "Client.Declined",
    "AddressNotLeasedError": "Client.AddressNotLeased",
    "ImageExistsError": "Client.ImageExists",
    "ImageNameInvalidError": "Client.ImageNameInvalid",
    "VMBusyError": "Client.VMBusy",
    "ImageInUseError": "Client.ImageInUse",
    "CredentialsError": "Client.BadCredentials",
    "AuthenticationFailedError": "Client.AuthenticationFailed",
    "NotAuthorizedError": "Client.NotAuthorized",
    "QuotaExceededError": "Client.QuotaExceeded",
    "VersionMismatchError": "VersionMismatch",
    "NotAnEnvelopeError": "Client.NotAnEnvelope",
    "NoBodyError": "Client.NoBody",
    "ExtraBodyError": "Client.ExtraBody",
    "HeaderMisplacedError": "Client.HeaderMisplaced",
    "StrayContentError": "Client.StrayContent",
    "NoOperationError": "Client.NoOperation",
    "ExtraOperationError": "Client.ExtraOperation",
    "ShuttingDownError": "Server.ShuttingDown",
    "BusyError": "Server.Busy",
    "DeadlineExceededError": "Server.DeadlineExceeded",
    "RegistryUnavailableError": "Server.RegistryUnavailable",
    "CapacityExhaustedError": "Server.CapacityExhausted",
    "PoolExhaustedError": "Server.PoolExhausted",
    "ActionFailedError": "Server.ActionFailed",
    "BackendError": "Server.BackendError",
    "DiskFullError": "Server.DiskFull",
    "TransferFailedError": "Server.TransferFailed",
    "NoPlantError": "Server.NoPlantAvailable",
    "PlantGoneError": "Server.PlantGone",
    "OfferInvalidError": "Client.OfferInvalid",
    "OfferExceededError": "Server.OfferExceeded",
    "ConfigurationError": "Server.Configuration",
}


@pytest.mark.parametrize("name, code", sorted(STABLE_CODES.items()))
def test_every_error_class_has_its_stable_code(name: str, code: str) -> None:
    cls = getattr(errors, name)
    assert cls.CODE == code
    assert cls("boom").code == code
    assert issubclass(cls, VMShopError)
    assert ERROR_BY_CODE[code] is cls


def test_the_code_table_is_complete_and_unique() -> None:
    assert {cls.__name__ for cls in ALL_ERRORS} == set(STABLE_CODES)
    assert len({cls.CODE for cls in ALL_ERRORS}) == len(ALL_ERRORS)
    assert VMShopError.CODE == "Server.InternalError"
    for cls in ALL_ERRORS:  # SOAP 1.1's own VersionMismatch is the one code outside Client.* and Server.*
        assert cls.CODE.split(".")[0] in ("Client", "Server") or cls.CODE == "VersionMismatch"


@pytest.mark.parametrize("code", sorted(STABLE_CODES.values()))
def test_error_for_code_rebuilds_the_class(code: str) -> None:
    for wire in (code, f"soap11env:{code}", f"soap:{code}"):
        exc = error_for_code(wire, "the message")
        assert type(exc) is ERROR_BY_CODE[code]
        assert exc.code == code and exc.message == "the message"


def test_error_for_unknown_code_keeps_the_code() -> None:
    exc = error_for_code("soap11env:Client.SomethingNew", "hm")
    assert type(exc) is VMShopError
    assert exc.code == "Client.SomethingNew"
    assert exc.message == "hm"


def test_problem_formatting() -> None:
    assert str(Problem("bad")) == "bad"
    assert str(Problem("bad", 3)) == "line 3: bad"
    assert str(Problem("bad", None, "n1")) == "node 'n1': bad"
    assert str(Problem("bad", 3, "n1")) == "line 3, node 'n1': bad"


def test_error_carries_line_node_and_lists_problems() -> None:
    exc = errors.DagInvalidError("DAG is invalid: x", [Problem("x", 4, "a"), Problem("y", 7, "b")])
    assert (exc.line, exc.node) == (4, "a")
    assert str(exc) == "DAG is invalid: x\n  line 4, node 'a': x\n  line 7, node 'b': y"
    bare = errors.DagInvalidError("plain")
    assert (bare.line, bare.node, bare.problems, str(bare)) == (None, None, [], "plain")
    assert VMShopError("m", code="Client.Custom").code == "Client.Custom"
