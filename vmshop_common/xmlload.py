"""The one hardened XML loader for everything the project reads.

Every XML document that enters the project (DAGs in requests, image
configuration files, configuration files) is parsed by :func:`parse_xml`:

- no DTD is loaded and a DOCTYPE is refused outright (so no external
  entities, no entity expansion, no billion laughs);
- no network access, no entity resolution, no huge-tree mode;
- the document's size (bytes) and depth (elements) are limited;
- every failure is a :class:`~vmshop_common.errors.VMShopError` with a
  stable code and the line it concerns; nothing from lxml escapes.
"""

from __future__ import annotations

import re
from pathlib import Path

from lxml import etree

from .errors import (
    DoctypeRefusedError,
    DocumentTooLargeError,
    Problem,
    WrongRootError,
    XMLSyntaxError,
)

MAX_BYTES = 1024 * 1024
MAX_DEPTH = 32

_DOCTYPE = re.compile(rb"<!\s*DOCTYPE", re.IGNORECASE)
_ENTITY = re.compile(rb"<!\s*ENTITY", re.IGNORECASE)
_UTF8_NAMES = ("UTF-8", "UTF8", "US-ASCII", "ASCII")


def _parser() -> etree.XMLParser:
    # A parser is not thread-safe; building one is cheap, so each call gets its own.
    return etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        dtd_validation=False,
        huge_tree=False,
        remove_blank_text=False,
        collect_ids=False,
    )


def _utf8(data: bytes | str) -> bytes:
    if isinstance(data, str):
        # lxml refuses str input with an encoding declaration; bytes are parsed by it as declared.
        return data.encode("utf-8")
    return bytes(data)


def _line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def parse_xml(
    data: bytes | str,
    *,
    what: str = "document",
    expected_root: str | None = None,
    max_bytes: int = MAX_BYTES,
    max_depth: int = MAX_DEPTH,
) -> etree._Element:
    """Parse ``data`` safely and return its root element (with source lines).

    ``expected_root`` is a Clark name (``{namespace}local``); a document with
    another root raises :class:`WrongRootError`. ``what`` names the document
    in messages ("DAG", "image configuration", ...).
    """
    raw = _utf8(data)
    if len(raw) > max_bytes:
        raise DocumentTooLargeError(f"{what} is {len(raw)} bytes; the limit is {max_bytes}")
    if not raw.strip():
        raise XMLSyntaxError(f"{what} is empty", [Problem("no XML content", 1)])
    # UTF-16/32 documents would hide a DOCTYPE from the byte scan below: refuse them.
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff") or b"\x00" in raw[:4]:
        raise XMLSyntaxError(f"{what} must be encoded in UTF-8", [Problem("not UTF-8", 1)])
    for pattern, label in ((_DOCTYPE, "a DOCTYPE"), (_ENTITY, "an ENTITY declaration")):
        found = pattern.search(raw)
        if found:
            raise DoctypeRefusedError(
                f"{what} has {label}; DTDs and entities are refused",
                [Problem(f"{label} is not allowed", _line_of(raw, found.start()))],
            )
    try:
        root = etree.fromstring(raw, _parser())
    except etree.XMLSyntaxError as exc:
        line = exc.lineno if exc.lineno else None
        message = str(exc.msg if hasattr(exc, "msg") else exc)
        if "depth" in message.lower() or "nesting" in message.lower():
            raise DocumentTooLargeError(f"{what} is nested too deeply", [Problem(message, line)]) from None
        raise XMLSyntaxError(f"{what} is not well-formed XML", [Problem(message, line)]) from None
    except (ValueError, etree.LxmlError) as exc:
        raise XMLSyntaxError(f"{what} could not be read as XML", [Problem(str(exc), None)]) from None
    if root.getroottree().docinfo.doctype:
        raise DoctypeRefusedError(f"{what} has a DOCTYPE; DTDs are refused", [Problem("DOCTYPE", 1)])
    encoding = root.getroottree().docinfo.encoding or "UTF-8"
    if encoding.upper() not in _UTF8_NAMES:
        # A declared legacy encoding would be decoded differently from what the byte scan
        # above saw (and str input, which we encode as UTF-8, would be garbled): UTF-8 only.
        raise XMLSyntaxError(f"{what} must be encoded in UTF-8", [Problem(f"declared encoding {encoding}", 1)])
    _check_depth(root, what, max_depth)
    if expected_root is not None and root.tag != expected_root:
        raise WrongRootError(
            f"{what} has root element {_pretty(root.tag)}; expected {_pretty(expected_root)}",
            [Problem("wrong root element", root.sourceline)],
        )
    return root


def parse_xml_file(path: str | Path, **kwargs: object) -> etree._Element:
    """Read ``path`` (at most ``max_bytes`` of it) and :func:`parse_xml` it."""
    limit = int(kwargs.get("max_bytes", MAX_BYTES))  # type: ignore[call-overload]
    with open(path, "rb") as handle:
        raw = handle.read(limit + 1)
    return parse_xml(raw, **kwargs)  # type: ignore[arg-type]


def _check_depth(root: etree._Element, what: str, max_depth: int) -> None:
    stack = [(root, 1)]
    while stack:
        element, depth = stack.pop()
        if depth > max_depth:
            raise DocumentTooLargeError(
                f"{what} is nested more than {max_depth} elements deep",
                [Problem("too deep", element.sourceline)],
            )
        stack.extend((child, depth + 1) for child in element)


def _pretty(clark: object) -> str:
    text = str(clark)
    if text.startswith("{"):
        namespace, local = text[1:].split("}", 1)
        return f"<{local}> in namespace '{namespace}'"
    return f"<{text}> (no namespace)"
