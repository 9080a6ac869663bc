"""The shop's SOAP types (what ``wsdl/vmshop.wsdl`` describes).

A VM is a WSRF-style resource: its identity is an :class:`EndpointReference`
(the shop's address and the VM's key) that every per-VM operation takes in
the body (not in SOAP headers: see the stack notes on headers with zeep and
Spyne). Times are seconds since the epoch (UTC) as doubles.
"""

from __future__ import annotations

from vmshop_common.soap import compat  # noqa: F401  (before spyne)

# isort: split
from spyne import Boolean, ComplexModel, Double, Integer, Unicode

from vmshop_common.soap.offer_wire import offer_type

TNS = "urn:vmshop:vmshop:1"


def _many(model: type) -> type:
    return model.customize(max_occurs="unbounded")  # type: ignore[attr-defined, no-any-return]


class EndpointReference(ComplexModel):
    """A VM's identity: the shop that holds it and the VM's key there."""

    __namespace__ = TNS
    Address = Unicode(min_occurs=1, nillable=False, max_len=2048)
    VMKey = Unicode(min_occurs=1, nillable=False, max_len=64)


class Attribute(ComplexModel):
    __namespace__ = TNS
    name = Unicode
    value = Unicode


class CostItem(ComplexModel):
    __namespace__ = TNS
    label = Unicode
    seconds = Double
    source = Unicode
    node = Unicode


class Bid(ComplexModel):
    """One plant's answer to a call for bids. ``status``: bid, declined, timeout, fault, down."""

    __namespace__ = TNS
    plant = Unicode
    status = Unicode
    cost = Double
    image = Unicode
    reason = Unicode
    seconds = Double
    items = _many(CostItem)
    source = Unicode  # live: the plant's answer; offer: priced by the shop from the plant's offer
    offer_age = Double  # seconds since the shop received (or had confirmed) that offer
    offer_version = Integer
    marked_down = Boolean  # its offer proved wrong lately: ranked after the others


class Estimate(ComplexModel):
    """The best bid (``plant`` empty when none) and every plant's answer."""

    __namespace__ = TNS
    plant = Unicode
    cost = Double
    image = Unicode
    items = _many(CostItem)
    remaining = _many(Unicode)
    bids = _many(Bid)
    seconds = Double  # the shop's bid round (pricing offers, or the call for bids)
    mode = Unicode  # offers or live
    omitted = Integer  # offers mode: offer-priced bids not listed (the best 16 and 16 declines are)


class VMInfo(ComplexModel):
    __namespace__ = TNS
    epr = EndpointReference
    vm_id = Unicode
    owner = Unicode
    state = Unicode
    plant = Unicode
    plant_vm_id = Unicode
    image = Unicode
    memory = Integer
    vcpus = Integer
    disk = Integer
    arch = Unicode
    address = Unicode
    host_port = Integer
    created = Double
    updated = Double
    termination = Double
    collected = Double
    cost = Double
    error = Unicode
    steps = _many(Unicode)
    attributes = _many(Attribute)


class ActionRun(ComplexModel):
    __namespace__ = TNS
    node = Unicode
    status = Integer
    ok = Boolean
    timed_out = Boolean
    seconds = Double
    output = Unicode


class CreateResult(ComplexModel):
    """The VM made, where and at what cost, every plant's bid, and its actions' results."""

    __namespace__ = TNS
    vm = VMInfo
    plant = Unicode
    cost = Double
    bids = _many(Bid)
    runs = _many(ActionRun)
    attempts = _many(Unicode)
    placement_seconds = Double  # from the request to asking the plant that made it first (bids, registry)
    omitted = Integer  # offers mode: offer-priced bids not listed


class PlantStatus(ComplexModel):
    __namespace__ = TNS
    address = Unicode
    up = Boolean
    name = Unicode
    backend = Unicode
    accelerator = Unicode
    running_vms = Integer
    capacity_vms = Integer
    free_memory = Integer
    images = _many(Unicode)
    last_error = Unicode
    last_seen = Double


Offer = offer_type(TNS)


class PublishedImage(ComplexModel):
    """An image a publish made: its name and plant, its owner, whether it is public, its base, the steps it
    embodies (in the order the VM ran them) and its disk's bytes (its changes over its base)."""

    __namespace__ = TNS
    name = Unicode
    plant = Unicode
    owner = Unicode
    is_public = Boolean
    base = Unicode
    steps = _many(Unicode)
    size = Integer
    with_state = Boolean  # it carries a saved running state: its clones resume instead of booting
