"""A faster SOAP 1.1 output protocol: Spyne's own XML, written by a compiled plan.

Spyne's ``XmlDocument`` serialises every value through a generic dispatch
(polymorphism check, class attributes, handler lookup, a coroutine per
complex value). For the plain records this project returns (complex types
whose members are strings, numbers, booleans, other such records and
arrays of them) that dispatch costs more than the XML itself: it was about
two thirds of the shop's CPU per ``queryVMs``.

:class:`FastSoap11` compiles, once per class, the list of members with their
tags and Spyne's own ``to_unicode`` handler for each simple type, and writes
the elements with lxml directly. Anything it does not compile (polymorphic
output, XML attributes, sub-protocols, members excluded from output,
values that are not instances of their class, a streaming parent, faults)
goes to Spyne's ``to_parent`` unchanged. The output is byte-for-byte what
Spyne writes (``tests/test_fastxml.py`` compares both on every type of the
shop's and the plant's WSDL).

A record whose every value is written by a plan (no nil, no empty string,
no value Spyne converts first) is written as XML text and parsed once by
lxml, which is about three times faster than building its elements one by
one (``queryVMs``' answer is a list of such records): the text uses the
prefixes the parent already declares, so that lxml drops the fragment's own
declarations when it joins the tree and the bytes are the same. Whatever the
text path cannot write exactly (a value it would have to leave to Spyne, a
namespace without one unambiguous prefix in scope, text the parser refuses)
takes the element path above, which writes it or refuses it as before.

It reads Spyne's serialiser internals (listed, guarded by Spyne's version
and fingerprinted, in :mod:`vmshop_common.patches`; :mod:`.compat`, imported
first, applies the guard).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from vmshop_common.soap import compat  # noqa: F401  (before spyne)

# isort: split
from lxml import etree
from spyne import BODY_STYLE_WRAPPED
from spyne.const.xml import DEFAULT_NS
from spyne.model import ComplexModelBase, SimpleModel, Unicode
from spyne.model.binary import ByteArray, File
from spyne.model.complex import XmlAttribute, XmlData
from spyne.protocol._outbase import OutProtocolBase
from spyne.protocol.soap import Soap11


@dataclass(frozen=True)
class _Member:
    """How to write one member: ``convert`` for a simple type, ``plan`` for a record."""

    attr: str
    tag: str
    cls: Any
    many: bool
    required: bool
    convert: Callable[[Any], str] | None
    plan: _Plan | None

    @property
    def record(self) -> type:
        """The class a record's value must be an instance of (a customised type's original)."""
        return _original(self.cls)


#: A member as the text path writes it: attribute, opening tag, closing tag, empty element, converter, record
#: plan, record class, required, many, whether its text may need escaping.
_TextMember = tuple[str, str, str, str, "Callable[[Any], str] | None", "_Plan | None", type, bool, bool, bool]


@dataclass
class _Plan:
    cls: Any
    members: list[_Member]
    #: Per tuple of prefixes (one per namespace of :meth:`FastSoap11._namespaces`): each member's opening and
    #: closing tag as text, for the text path.
    texts: dict[tuple[str, ...], list[_TextMember]] = field(default_factory=dict)
    #: Whether a member is an array of records (a list of VMs, bids, plants): where the text path pays (for a
    #: few values, building the elements costs less than writing and parsing the text).
    listing: bool = False


class _Fallback(Exception):
    """The text path cannot write this value exactly: the element path does."""


#: Characters XML 1.0 does not allow (lxml refuses them as text; the element path then raises as before).
_INVALID = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
#: What text content must escape to be parsed back to the same string (``\r`` would be read as ``\n``).
_SPECIAL = re.compile("[&<>\r]")
_ESCAPES = {"&": "&amp;", "<": "&lt;", ">": "&gt;", "\r": "&#13;"}


def _escape(match: re.Match[str]) -> str:
    return _ESCAPES[match.group()]


def _escaped(text: str) -> str:
    return text if _SPECIAL.search(text) is None else _SPECIAL.sub(_escape, text)


_PARSERS = threading.local()


def _fragment_parser() -> Any:
    """This thread's parser for the text path (an lxml parser serves one thread at a time)."""
    parser = getattr(_PARSERS, "parser", None)
    if parser is None:
        parser = _PARSERS.parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False,
                                                   huge_tree=True, remove_blank_text=False)
    return parser


def _original(cls: Any) -> type:
    """The class instances of ``cls`` are made of: ``customize()`` makes subclasses that values never are."""
    return getattr(cls, "__orig__", None) or cls


class FastSoap11(Soap11):  # type: ignore[misc]
    """``Soap11`` whose output of plain records is written by compiled plans (see the module)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._plans: dict[Any, _Plan | None] = {}
        self._spaces: dict[Any, tuple[str, ...] | None] = {}
        self._frames: dict[Any, tuple[str, str, str, str, str, str] | None] = {}

    # --- compiling -------------------------------------------------------------------------------

    def _plan(self, cls: Any) -> _Plan | None:
        if cls in self._plans:
            return self._plans[cls]
        self._plans[cls] = None  # a recursive type is not compiled
        plan = self._compile(cls)
        self._plans[cls] = plan
        return plan

    def _compile(self, cls: Any) -> _Plan | None:
        if self.polymorphic or not issubclass(cls, ComplexModelBase) or getattr(cls, "__extends__", None):
            return None
        attrs = self.get_cls_attrs(cls)
        if attrs.prot is not None or attrs.exc:
            return None
        handler = self.serialization_handlers.get(cls)
        if getattr(handler, "__func__", None) is not type(self).complex_to_parent:
            return None
        members = []
        for name, member in cls._type_info.items():
            sub = self._member(cls, name, member)
            if sub is None:
                return None
            members.append(sub)
        return _Plan(cls, members, listing=any(m.many and m.plan is not None for m in members))

    def _member(self, owner: Any, name: str, cls: Any) -> _Member | None:
        attrs = self.get_cls_attrs(cls)
        if attrs.exc or attrs.prot is not None:
            return None
        if issubclass(cls, (XmlAttribute, XmlData, ByteArray, File)):
            return None
        ns = cls.Attributes.sub_ns or owner.get_namespace()
        tag = f"{{{ns}}}{cls.Attributes.sub_name or name}" if ns is not None else (cls.Attributes.sub_name or name)
        many = cls.Attributes.max_occurs > 1
        required = cls.Attributes.min_occurs > 0
        if issubclass(cls, ComplexModelBase):
            plan = self._plan(cls)
            return _Member(name, tag, cls, many, required, None, plan) if plan is not None else None
        if not issubclass(cls, SimpleModel):
            return None
        handler = self.serialization_handlers.get(cls)
        if getattr(handler, "__func__", None) is not type(self).modelbase_to_parent:
            return None
        to_unicode = self._to_unicode_handlers.get(cls)
        if to_unicode is None:
            return None
        return _Member(name, tag, cls, many, required, self._converter(cls, to_unicode), None)

    def _namespaces(self, plan: _Plan) -> tuple[str, ...] | None:
        """Every namespace the members of ``plan`` (and of its records) are in, in a fixed order; ``None`` if a
        member has no namespace (the text path does not write those)."""
        cached = self._spaces.get(plan.cls, False)
        if cached is not False:
            return cached  # type: ignore[return-value]
        found: dict[str, None] = {}
        self._spaces[plan.cls] = None  # recursion (not compiled anyway) ends here
        for member in plan.members:
            if not member.tag.startswith("{"):
                return None
            found[member.tag[1:].partition("}")[0]] = None
            if member.plan is not None:
                inner = self._namespaces(member.plan)
                if inner is None:
                    return None
                found.update(dict.fromkeys(inner))
        spaces = tuple(found)
        self._spaces[plan.cls] = spaces
        return spaces

    def _converter(self, cls: Any, to_unicode: Any) -> Callable[[Any], str]:
        """Spyne's ``to_unicode`` for ``cls``; for the four plain types without a format, the same
        steps without the per-call look-ups (checks included: ``int()``/``float()`` raise alike)."""
        generic = partial(to_unicode, cls)
        attrs = self.get_cls_attrs(cls)
        if attrs.str_format is not None or attrs.format is not None:
            return generic
        function = getattr(to_unicode, "__func__", None)
        if function is OutProtocolBase.unicode_to_unicode:
            return lambda value: value if type(value) is str else generic(value)
        if function is OutProtocolBase.integer_to_unicode:
            return lambda value: (int(value), str(value))[1]
        if function is OutProtocolBase.double_to_unicode:
            return lambda value: (float(value), repr(value))[1]
        if function is OutProtocolBase.boolean_to_unicode:
            return lambda value: str(bool(value)).lower()
        return generic

    # --- a whole answer as text --------------------------------------------------------------------

    def serialize(self, ctx: Any, message: Any) -> Any:
        """Spyne's ``Soap11.serialize``; an answer whose body the text path writes is made as bytes here (in
        ``ctx.out_string``, ``ctx.out_document`` left ``None``) without building its tree at all."""
        if message is self.RESPONSE and self._answer_as_text(ctx):
            return None
        return super().serialize(ctx, message)

    def create_out_string(self, ctx: Any, charset: Any = None) -> None:
        if ctx.out_document is None and ctx.out_string is not None:
            return  # made by serialize
        super().create_out_string(ctx, charset)

    def _answer_as_text(self, ctx: Any) -> bool:
        """Write the answer's envelope as bytes if the text path writes its body exactly (see the module)."""
        descriptor = ctx.descriptor
        if (ctx.out_error is not None or descriptor is None or descriptor.body_style is not BODY_STYLE_WRAPPED
                or self.pretty_print or str(self.encoding).lower().replace("-", "") != "utf8"
                or not self.xml_declaration or (ctx.out_header is not None and descriptor.out_header is not None)):
            return False
        cls = descriptor.out_message
        plan = self._plan(cls)
        if plan is None or not plan.listing:
            return False
        frame = self._frame(cls)
        if frame is None:
            return False
        head, opening, closing, empty, tail, prefix = frame
        self.event_manager.fire_event("before_serialize", ctx)
        inst = cls()
        attrs = self.get_cls_attrs(cls)
        values = iter(ctx.out_object)
        for key in cls._type_info:
            inst._safe_set(key, next(values, None), cls, attrs)
        uri = cls.get_namespace()
        out = [head, opening]
        try:
            self._text(plan, inst, {uri: prefix}, (prefix,), out)
            if len(out) == 2:
                out[1] = empty
            else:
                out.append(closing)
            out.append(tail)
            data = "".join(out).encode("utf-8")
        except Exception:  # noqa: BLE001 - Spyne's path (and the element path) write it or refuse it
            return False
        ctx.out_document = None
        ctx.out_string = [data]
        self.event_manager.fire_event("after_serialize", ctx)
        return True

    def _frame(self, cls: Any) -> tuple[str, str, str, str, str, str] | None:
        """The answer's text around the members of ``cls`` as Spyne writes it with no member: what comes before
        the wrapper element, its opening, closing and empty forms, what comes after, and its prefix (every
        member's namespace must be the wrapper's); ``None`` where that does not hold. Made once per class by
        Spyne's own steps."""
        if cls in self._frames:
            return self._frames[cls]
        self._frames[cls] = None
        attrs = self.get_cls_attrs(cls)
        plan = self._plan(cls)
        uri = cls.get_namespace()
        spaces = self._namespaces(plan) if plan is not None else None
        if (attrs.sub_name is not None or attrs.sub_ns is not None or not uri or plan is None
                or spaces is None or set(spaces) - {uri}):
            return None
        envelope = etree.Element(f"{{{self.ns_soap_env}}}Envelope", nsmap=self.app.interface.nsmap)
        body = etree.Element(f"{{{self.ns_soap_env}}}Body")
        etree.SubElement(body, f"{{{uri}}}{cls.get_type_name()}")
        envelope.append(body)
        if self.cleanup_namespaces:
            etree.cleanup_namespaces(envelope)
        wrapper = envelope[0][0]
        prefix = wrapper.prefix
        text = etree.tostring(envelope, encoding=self.encoding, xml_declaration=True).decode("utf-8")
        empty = f"<{prefix}:{cls.get_type_name()}/>"
        if not prefix or text.count(empty) != 1:
            return None
        head, tail = text.split(empty)
        name = f"{prefix}:{cls.get_type_name()}"
        frame = (head, f"<{name}>", f"</{name}>", empty, tail, prefix)
        self._frames[cls] = frame
        return frame

    # --- writing ---------------------------------------------------------------------------------

    def to_parent(self, ctx: Any, cls: Any, inst: Any, parent: Any, ns: Any, *args: Any, **kwargs: Any) -> Any:
        if (inst is not None and isinstance(parent, etree._Element) and isinstance(inst, _original(cls))
                and not kwargs.get("add_type")):
            plan = self._plan(cls)
            if plan is not None:
                attrs = self.get_cls_attrs(cls)
                name = attrs.sub_name or (args[0] if args else kwargs.get("name")) or cls.get_type_name()
                if attrs.sub_ns not in (None, DEFAULT_NS):
                    ns = attrs.sub_ns
                element = etree.SubElement(parent, f"{{{ns}}}{name}" if ns is not None else name)
                if not self._write_text(plan, inst, element):
                    self._write(ctx, plan, inst, element)
                return None
        return super().to_parent(ctx, cls, inst, parent, ns, *args, **kwargs)

    def _write(self, ctx: Any, plan: _Plan, inst: Any, element: Any) -> None:
        for member in plan.members:
            value = getattr(inst, member.attr, None)
            if value is not None and member.many:
                for item in value:
                    self._one(ctx, member, item, element)
            elif value is not None or member.required:
                self._one(ctx, member, value, element)

    def _one(self, ctx: Any, member: _Member, value: Any, element: Any) -> None:
        if value is not None:
            if member.convert is not None:
                etree.SubElement(element, member.tag).text = member.convert(value)
                return
            if member.plan is not None and isinstance(value, member.record):
                self._write(ctx, member.plan, value, etree.SubElement(element, member.tag))
                return
        # None (nil or a default), or a value Spyne converts first: Spyne's own path.
        tag = member.tag
        ns, _, name = tag[1:].partition("}") if tag.startswith("{") else (None, "", tag)
        super().to_parent(ctx, member.cls, value, element, ns, name)

    # --- the text path ---------------------------------------------------------------------------

    def _write_text(self, plan: _Plan, inst: Any, element: Any) -> bool:
        """Write the members of ``inst`` into ``element`` by the text path; ``False`` (nothing written) where
        only the element path writes them exactly.

        The members are parsed inside a wrapper that declares the prefixes ``element`` has in scope, and
        moved into ``element``, where lxml drops the wrapper's declarations as redundant: the tree is the one
        the element path builds. A namespace of the members without one prefix of its own in scope (or a
        default namespace in scope) is left to the element path, which declares what it needs where lxml
        chooses."""
        if not plan.listing:
            return False
        spaces = self._namespaces(plan)
        if spaces is None:
            return False
        prefix_of: dict[str, str] = {}
        for prefix, uri in element.nsmap.items():
            if prefix is None:
                return False
            prefix_of[uri] = "" if uri in prefix_of else prefix  # two prefixes for one namespace: lxml's choice
        mine = {uri: prefix_of.get(uri, "") for uri in spaces}
        key = tuple(mine.values())
        if not key or not all(key):
            return False
        declarations = "".join(f' xmlns:{prefix}="{_escaped(uri).replace(chr(34), "&quot;")}"'
                               for uri, prefix in mine.items())
        wrapper = f"{key[0]}:wrapper"
        out = [f"<{wrapper}{declarations}>"]
        try:
            self._text(plan, inst, mine, key, out)
            out.append(f"</{wrapper}>")
            parsed = etree.fromstring("".join(out).encode("utf-8"), _fragment_parser())
        except Exception:  # noqa: BLE001 - anything the text path cannot write, the element path writes or refuses
            return False
        element.extend(parsed)
        return True

    def _text_members(self, plan: _Plan, mine: dict[str, str], key: tuple[str, ...]) -> list[_TextMember]:
        members = plan.texts.get(key)
        if members is None:
            members = []
            for member in plan.members:
                uri, _, local = member.tag[1:].partition("}")
                qualified = f"{mine[uri]}:{local}"
                escape = member.convert is not None and issubclass(member.cls, Unicode)
                members.append((member.attr, f"<{qualified}>", f"</{qualified}>", f"<{qualified}/>", member.convert,
                                member.plan,
                                member.record, member.required, member.many,
                                escape))
            plan.texts[key] = members
        return members

    def _text(self, plan: _Plan, inst: Any, mine: dict[str, str], key: tuple[str, ...], out: list[str]) -> None:
        """Append the members of ``inst`` as XML text to ``out``; :class:`_Fallback` where the element path
        would give a value to Spyne (nil, a default, a value to convert first) or write an empty string
        (lxml writes ``<a></a>`` for ``''`` and ``<a/>`` for no text; parsed back, both are ``<a/>``)."""
        append = out.append
        for attr, opening, closing, empty, convert, sub, record, required, many, escape in \
                self._text_members(plan, mine, key):
            value = getattr(inst, attr, None)
            if value is None:
                if required:
                    raise _Fallback
                continue
            for item in (value if many else (value,)):
                if convert is not None and item is not None:
                    text = convert(item)
                    if not text:
                        raise _Fallback
                    if escape:
                        if _INVALID.search(text) is not None:
                            raise _Fallback
                        if _SPECIAL.search(text) is not None:
                            text = _SPECIAL.sub(_escape, text)
                    append(opening + text + closing)
                elif sub is not None and isinstance(item, record):
                    append(opening)
                    mark = len(out)
                    self._text(sub, item, mine, key, out)
                    if len(out) == mark:  # no member: lxml writes <a/>
                        out[-1] = empty
                    else:
                        append(closing)
                else:
                    raise _Fallback


_TEMPLATES: dict[type, dict[str, Any] | None] = {}
_IMMUTABLE = (str, int, float, bool, type(None))


def spyne_record(cls: Any, **values: Any) -> Any:
    """``cls(**values)`` for a plain Spyne record, without Spyne's per-instance set-up.

    ``ComplexModelBase.__init__`` looks up every member's defaults and
    properties on each call; here that is done once per class (the
    ``__dict__`` of ``cls()``) and copied. A class whose fresh instance holds
    anything mutable, or a member name the class does not have, takes
    Spyne's constructor.
    """
    if cls not in _TEMPLATES:
        fresh = cls().__dict__
        _TEMPLATES[cls] = dict(fresh) if all(isinstance(v, _IMMUTABLE) for v in fresh.values()) else None
    template = _TEMPLATES[cls]
    if template is None or not values.keys() <= template.keys():
        return cls(**values)
    inst = cls.__new__(cls)
    inst.__dict__.update(template)
    inst.__dict__.update(values)
    return inst
