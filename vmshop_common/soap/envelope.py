"""What a request envelope must be: SOAP 1.1, one Body, one operation element in it.

Spyne takes the first ``Body`` of an envelope and the first element in it
and ignores the rest: a second Body or a second operation was silently
dropped, a Header after the Body was read, and an empty Body or a Fault
sent as a request crashed into ``Server`` faults. :func:`check_envelope`
holds a parsed request to SOAP 1.1's structure before spyne looks at it
(``server.SoapResource`` calls it on every request; it only walks the
Envelope's and the Body's children, a few microseconds). Each rule broken
has its own stable code (``vmshop_common/errors.py``):

==============================  ==========================================================================
``VersionMismatch``             the root is an Envelope in another namespace than SOAP 1.1's (a SOAP 1.2
                                envelope, or one without a namespace): SOAP 1.1's own fault (section 4.4.1)
``Client.NotAnEnvelope``        the root element is not an Envelope at all
``Client.HeaderMisplaced``      a Header that is not the Envelope's first element (after the Body, or a
                                second Header)
``Client.ExtraBody``            a second Body
``Client.NoBody``               no Body
``Client.StrayContent``         anything else directly in the Envelope (an element other than Header and
                                Body: SOAP 1.1 lets namespace-qualified ones follow the Body, but a server
                                that ignores them would act on half a message), text that is not white
                                space in the Envelope or beside the operation
``Client.NoOperation``          the Body holds no element, or a SOAP Fault (a fault is not a request)
``Client.ExtraOperation``       the Body holds more than one element
==============================  ==========================================================================

Comments and processing instructions are passed over (spyne's parser drops
both before this check sees the document). What a Header holds is not
looked at here (WS-Security reads its own header entries).
"""

from __future__ import annotations

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
)

SOAP11_ENV = "http://schemas.xmlsoap.org/soap/envelope/"
"""The namespace of a SOAP 1.1 envelope."""

_ENVELOPE = f"{{{SOAP11_ENV}}}Envelope"
_HEADER = f"{{{SOAP11_ENV}}}Header"
_BODY = f"{{{SOAP11_ENV}}}Body"


def _name(tag: str) -> str:
    """A tag for a message: ``{ns}local`` as is, cut to 200 characters."""
    return tag if len(tag) <= 200 else tag[:200] + "..."


def _stray_text(text: str | None, where: str) -> None:
    if text and not text.isspace():
        raise StrayContentError(f"text {text.strip()[:60]!r} {where}: SOAP 1.1 puts only elements there")


def check_envelope(root: etree._Element) -> etree._Element:
    """The operation element of the request envelope ``root``; raises the project error of the first rule
    ``root`` breaks (see the module)."""
    tag = root.tag
    if tag != _ENVELOPE:
        qname = etree.QName(root)
        if qname.localname == "Envelope":
            raise VersionMismatchError(f"the Envelope is in the namespace {qname.namespace or '(none)'!r}; this "
                                       f"server speaks SOAP 1.1 only ({SOAP11_ENV})")
        raise NotAnEnvelopeError(f"the request's root element is {_name(tag)}, not a SOAP 1.1 Envelope")
    _stray_text(root.text, "in the Envelope")
    body = None
    elements = 0
    for child in root:
        tag = child.tag
        if tag == _BODY:
            if body is not None:
                raise ExtraBodyError("the Envelope has a second Body; a request has exactly one")
            body = child
        elif tag == _HEADER:
            if elements:
                where = "after the Body" if body is not None else "as a second Header"
                raise HeaderMisplacedError(f"a Header {where}: the Header, if any, is the Envelope's first element")
        elif isinstance(tag, str):
            raise StrayContentError(f"an element {_name(tag)} in the Envelope: a request holds a Header and a Body "
                                    "only")
        _stray_text(child.tail, "in the Envelope")
        if isinstance(tag, str):
            elements += 1
    if body is None:
        raise NoBodyError("the Envelope has no Body; a request has exactly one")
    _stray_text(body.text, "in the Body")
    operation = None
    for child in body:
        tag = child.tag
        if isinstance(tag, str):
            if operation is not None:
                raise ExtraOperationError(f"the Body holds a second operation ({_name(tag)}); a request holds "
                                          "exactly one")
            operation = child
        _stray_text(child.tail, "in the Body")
    if operation is None:
        raise NoOperationError("the Body holds no operation element")
    if operation.tag.startswith(f"{{{SOAP11_ENV}}}"):
        raise NoOperationError(f"the Body holds {_name(operation.tag)}, which is not an operation (a Fault is not "
                               "a request)")
    return operation


__all__ = ["SOAP11_ENV", "check_envelope"]
