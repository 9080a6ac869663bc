"""The plant's SOAP types (what ``wsdl/vmplant.wsdl`` describes) and their conversion from the model.

Times are seconds since the epoch (UTC) as doubles; absent values are
omitted (nillable). Lists are plain repeated elements.
"""

from __future__ import annotations

from vmshop_common.soap import compat  # noqa: F401  (before spyne)

# isort: split
from spyne import Boolean, ComplexModel, Double, Integer, Unicode

from vmshop_common.cost import Bid, Decline
from vmshop_common.soap.fastxml import spyne_record
from vmshop_common.soap.offer_wire import offer_type

from .channel import ActionResult
from .publish import PublishedImage
from .records import VMRecord

TNS = "urn:vmshop:vmplant:1"


def _many(model: type) -> type:
    return model.customize(max_occurs="unbounded")  # type: ignore[attr-defined, no-any-return]


class CostItem(ComplexModel):
    __namespace__ = TNS
    label = Unicode
    seconds = Double
    source = Unicode
    node = Unicode


class Estimate(ComplexModel):
    """A bid (accepted) with its breakdown, or a decline with the reason."""

    __namespace__ = TNS
    plant = Unicode
    accepted = Boolean
    cost = Double
    image = Unicode
    reason = Unicode
    items = _many(CostItem)
    remaining = _many(Unicode)
    memory = Integer  # MiB the VM would get (what the shop counts against quotas)
    vcpus = Integer


class Attribute(ComplexModel):
    __namespace__ = TNS
    name = Unicode
    value = Unicode


class VMInfo(ComplexModel):
    __namespace__ = TNS
    vm_id = Unicode
    owner = Unicode
    state = Unicode
    image = Unicode
    memory = Integer
    vcpus = Integer
    disk = Integer
    arch = Unicode
    address = Unicode
    host_port = Integer
    created = Double
    updated = Double
    collected = Double
    error = Unicode
    attributes = _many(Attribute)
    steps = _many(Unicode)
    made = Boolean  # its create finished (its whole DAG ran)
    shop = Unicode  # the identity (certificate subject) of the shop that asked for it


class ActionRun(ComplexModel):
    __namespace__ = TNS
    node = Unicode
    status = Integer
    ok = Boolean
    timed_out = Boolean
    seconds = Double
    output = Unicode


class CreateResult(ComplexModel):
    __namespace__ = TNS
    vm = VMInfo
    estimate = Estimate
    runs = _many(ActionRun)


class PlantInfo(ComplexModel):
    __namespace__ = TNS
    name = Unicode
    backend = Unicode
    available = Boolean
    accelerator = Unicode
    reason = Unicode
    capacity_vms = Integer
    running_vms = Integer
    capacity_memory = Integer
    free_memory = Integer
    free_addresses = Integer
    images = _many(Unicode)
    architectures = _many(Unicode)
    clone_seconds = Double
    boot_seconds = Double
    max_memory = Integer
    max_vcpus = Integer
    networks = _many(Unicode)
    channel = Unicode
    publish = Boolean  # its backend can publish VMs as images (it can pause a guest with its disk flushed)
    resume = Boolean  # its backend can save a guest's running state and resume clones from it


class Image(ComplexModel):
    """A published image: its name, owner, whether it is public, its base, the steps it embodies, its disk's bytes."""

    __namespace__ = TNS
    name = Unicode
    owner = Unicode
    is_public = Boolean
    base = Unicode
    steps = _many(Unicode)
    size = Integer
    with_state = Boolean  # it carries a saved running state (its clones resume where the backend can)
    is_movable = Boolean  # its owner let it move between the site's plants that agree (vmplant_service/transfer.py)


def image_out(image: PublishedImage) -> Image:
    return spyne_record(Image, name=image.name, owner=image.owner, is_public=image.public, base=image.base,
                        steps=list(image.steps), size=image.size, with_state=image.with_state,
                        is_movable=image.movable)


Offer = offer_type(TNS)


def estimate_out(plant: str, result: Bid | Decline) -> Estimate:
    if isinstance(result, Decline):
        return spyne_record(Estimate, plant=plant, accepted=False, reason=result.reason, items=[], remaining=[])
    items = [spyne_record(CostItem, label=i.label, seconds=i.seconds, source=i.source, node=i.node)
             for i in result.items]
    return spyne_record(Estimate, plant=plant, accepted=True, cost=result.cost, image=result.image, items=items,
                        remaining=list(result.remaining), memory=result.memory, vcpus=result.vcpus)


def vm_out(record: VMRecord, steps: list[str] | None = None) -> VMInfo:
    attributes = [spyne_record(Attribute, name=k, value=v) for k, v in sorted((record.attributes or {}).items())]
    return spyne_record(VMInfo, vm_id=record.vm_id, owner=record.owner, state=record.state, image=record.image,
                        memory=record.memory, vcpus=record.vcpus, disk=record.disk, arch=record.arch,
                        address=record.address, host_port=record.host_port, created=record.created,
                        updated=record.updated, collected=record.collected, error=record.error,
                        attributes=attributes, steps=list(steps or []), made=record.made, shop=record.shop)


def run_out(node: str, result: ActionResult) -> ActionRun:
    return ActionRun(node=node, status=result.status, ok=result.ok, timed_out=result.timed_out,
                     seconds=result.elapsed, output=result.output)


def info_out(info: dict[str, object]) -> PlantInfo:
    return PlantInfo(**info)
