"""The ``Offer`` SOAP type (:mod:`vmshop_common.offers` on the wire), made for a service's namespace.

The plant serves it (``getOffer``) and the shop takes it (``plantChanged``), each in its own WSDL's
namespace; the fields are the same, so :func:`vmshop_common.offers.offer_from_wire` reads either (and zeep's
objects of either).
"""

from __future__ import annotations

from vmshop_common.soap import compat  # noqa: F401  (before spyne)

# isort: split
from typing import Any

from spyne import Boolean, ComplexModel, Double, Integer, Unicode


def offer_type(tns: str) -> Any:
    """The ``Offer`` complex type (with ``OfferImage`` and ``StepCost``) in namespace ``tns``."""
    image: Any = type("OfferImage", (ComplexModel,), {
        "__namespace__": tns, "name": Unicode, "dag": Unicode, "memory": Integer, "vcpus": Integer,
        "disk": Integer, "arch": Unicode, "boot_seconds": Double, "agent": Unicode, "contextualization": Unicode,
        "kernel": Unicode, "data_share": Unicode, "owner": Unicode,
        "transfer_seconds": Double})
    step: Any = type("StepCost", (ComplexModel,), {"__namespace__": tns, "digest": Unicode, "seconds": Double})
    return type("Offer", (ComplexModel,), {
        "__namespace__": tns,
        "__doc__": "A plant's offer (vmshop_common.offers): what its bids depend on, versioned.",
        "plant": Unicode, "version": Integer, "issued": Double,
        "images": image.customize(max_occurs="unbounded"), "steps": step.customize(max_occurs="unbounded"),
        "clone_seconds": Double, "boot_seconds": Double, "live_vms": Integer, "creating_vms": Integer,
        "free_memory": Integer, "backend": Unicode, "available": Boolean, "reason": Unicode,
        "architectures": Unicode.customize(max_occurs="unbounded"), "max_memory": Integer, "max_vcpus": Integer,
        "max_disk": Integer, "capacity_memory": Integer, "capacity_vms": Integer, "max_creates": Integer,
        "max_action_seconds": Double, "max_dag_seconds": Double, "network": Boolean, "datastore": Boolean,
        "datasets": Unicode.customize(max_occurs="unbounded"), "kernel_limit": Unicode, "seed_disk": Boolean})


def offer_fields(offer: Any) -> dict[str, Any]:
    """The wire fields of a :class:`~vmshop_common.offers.Offer` (for a Spyne record or a zeep call); image
    DAGs go as XML."""
    from vmshop_common.dagxml import dag_to_xml
    from vmshop_common.guest import GuestTraits

    terms = offer.terms
    default = GuestTraits()

    def image(i: Any) -> dict[str, Any]:
        guest = offer.guests.get(i.name, default)
        return {"name": i.name, "dag": dag_to_xml(i.dag), "memory": i.hardware.memory, "vcpus": i.hardware.vcpus,
                "disk": i.hardware.disk, "arch": i.hardware.arch, "boot_seconds": offer.image_boot_seconds.get(i.name),
                "agent": guest.agent, "contextualization": guest.contextualization, "kernel": guest.kernel,
                "data_share": guest.data_share, "owner": offer.catalog.owners.get(i.name),
                "transfer_seconds": offer.transfer_seconds.get(i.name)}

    return {
        "plant": offer.plant, "version": offer.version, "issued": offer.issued,
        "images": [image(i) for i in offer.catalog.images],
        "steps": [{"digest": d, "seconds": s} for d, s in sorted(offer.steps.items())],
        "clone_seconds": offer.clone_seconds, "boot_seconds": offer.boot_seconds, "live_vms": offer.live,
        "creating_vms": offer.creating, "free_memory": offer.free_memory, "backend": terms.backend,
        "available": terms.available, "reason": terms.reason, "architectures": list(terms.architectures),
        "max_memory": terms.max_memory, "max_vcpus": terms.max_vcpus, "max_disk": terms.max_disk,
        "capacity_memory": terms.capacity_memory, "capacity_vms": terms.capacity_vms,
        "max_creates": terms.max_creates, "max_action_seconds": terms.max_action_seconds,
        "max_dag_seconds": terms.max_dag_seconds, "network": terms.network, "datastore": terms.datastore,
        "datasets": sorted(offer.datasets), "kernel_limit": terms.kernel_limit, "seed_disk": terms.seed_disk}
