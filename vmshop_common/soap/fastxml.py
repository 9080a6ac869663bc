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

It reads Spyne's serialiser internals (listed, guarded by Spyne's version
and fingerprinted, in :mod:`vmshop_common.patches`; :mod:`.compat`, imported
first, applies the guard).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from vmshop_common.soap import compat  # noqa: F401  (before spyne)

# isort: split
from lxml import etree
from spyne.const.xml import DEFAULT_NS
from spyne.model import ComplexModelBase, SimpleModel
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


@dataclass
class _Plan:
    cls: Any
    members: list[_Member]


def _original(cls: Any) -> type:
    """The class instances of ``cls`` are made of: ``customize()`` makes subclasses that values never are."""
    return getattr(cls, "__orig__", None) or cls


class FastSoap11(Soap11):  # type: ignore[misc]
    """``Soap11`` whose output of plain records is written by compiled plans (see the module)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._plans: dict[Any, _Plan | None] = {}

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
        return _Plan(cls, members)

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
