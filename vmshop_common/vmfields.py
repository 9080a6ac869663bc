"""A VM's fields, declared once: which models carry each, and of what kind.

A VM is modelled five times, each for its own seam:

========================  ===============================================  ============================
model                     class                                            what it is
========================  ===============================================  ============================
``registry``              ``vmshop_service.registry.VMEntry``              a row of the shop's registry
``shop-wire``             ``vmshop_service.wire.VMInfo``                   the shop's SOAP type (WSDL)
``client``                ``vmshop_service.client.VM``                     what the client library returns
``plant-record``          ``vmplant_service.records.VMRecord``             a row of the plant's records
``plant-wire``            ``vmplant_service.wire.VMInfo``                  the plant's SOAP type (WSDL)
========================  ===============================================  ============================

:data:`VM_FIELDS` is the one declaration: every field of every one of them,
its kind and the models that carry it. The shop's query language takes its
built-in attributes from it (:data:`QUERYABLE`, ``vmshop_service.query``);
``tests/test_vmfields.py`` holds each model (and the registry's table and the
checked-in WSDL, through their own tests) to it, so adding a field means:
declare it here, then add it where the test says it is missing.
"""

from __future__ import annotations

from dataclasses import dataclass

SHOP_MODELS = frozenset({"registry", "shop-wire", "client"})
PLANT_MODELS = frozenset({"plant-record", "plant-wire"})
MODELS = SHOP_MODELS | PLANT_MODELS
_ALL = MODELS

#: Kinds: a Python type name, or 'strings' (a list of str), 'attributes' (user attributes: name -> value),
#: 'epr' (the shop's endpoint reference of the VM).
KINDS = frozenset({"str", "int", "float", "bool", "strings", "attributes", "epr"})


@dataclass(frozen=True)
class VMField:
    """One field of a VM."""

    name: str
    kind: str
    models: frozenset[str]
    doc: str
    queryable: bool = False  #: a built-in attribute of the shop's queries (a registry column with its own index)


VM_FIELDS: tuple[VMField, ...] = (
    VMField("epr", "epr", frozenset({"shop-wire", "client"}), "the VM's identity: the shop's address and its key"),
    VMField("vm_id", "str", _ALL, "the VM's key at the shop; its id at the plant", queryable=True),
    VMField("owner", "str", _ALL, "the owner's identity name", queryable=True),
    VMField("state", "str", _ALL, "placing, creating, running, collected, failed, ... (the plant's own states)",
            queryable=True),
    VMField("plant", "str", SHOP_MODELS, "the URL of the plant that holds it", queryable=True),
    VMField("plant_vm_id", "str", SHOP_MODELS, "the plant's id for it"),
    VMField("image", "str", _ALL, "the cached image it was cloned from", queryable=True),
    VMField("memory", "int", _ALL, "MiB", queryable=True),
    VMField("vcpus", "int", _ALL, "virtual CPUs", queryable=True),
    VMField("disk", "int", _ALL, "GiB", queryable=True),
    VMField("arch", "str", _ALL, "the guest's architecture", queryable=True),
    VMField("address", "str", _ALL, "its address from the plant's pool", queryable=True),
    VMField("host_port", "int", _ALL, "the host port forwarded to it", queryable=True),
    VMField("created", "float", _ALL, "epoch seconds", queryable=True),
    VMField("updated", "float", _ALL, "epoch seconds", queryable=True),
    VMField("termination", "float", SHOP_MODELS, "the lease's end, epoch seconds", queryable=True),
    VMField("collected", "float", _ALL, "when it was collected, epoch seconds"),
    VMField("cost", "float", SHOP_MODELS, "the winning bid's cost", queryable=True),
    VMField("error", "str", _ALL, "why it failed"),
    VMField("steps", "strings", SHOP_MODELS | {"plant-wire"}, "the DAG nodes applied, in order"),
    VMField("attributes", "attributes", _ALL, "the DAG's user attributes"),
    VMField("dag_xml", "str", frozenset({"registry", "plant-record"}), "the DAG it was made from"),
    VMField("overlay", "str", frozenset({"plant-record"}), "its disk overlay's path"),
    VMField("run_dir", "str", frozenset({"plant-record"}), "its run directory's path"),
    VMField("mac", "str", frozenset({"plant-record"}), "its NIC's MAC address on the plant's segment"),
    VMField("made", "bool", PLANT_MODELS, "its create finished (its whole DAG ran)"),
    VMField("shop", "str", PLANT_MODELS | {"registry"},
            "the shop that asked for it (a plant's: that shop's identity; the registry's: the name of the shop "
            "whose create it is, while placing or creating)"),
)

#: Columns of the registry's table that are no VM field: a shop's claim on a due lease (who, since when).
REGISTRY_BOOKKEEPING = frozenset({"lease_claim", "lease_claimed"})

BY_NAME: dict[str, VMField] = {field.name: field for field in VM_FIELDS}

#: The shop's built-in query attributes.
QUERYABLE: tuple[VMField, ...] = tuple(field for field in VM_FIELDS if field.queryable)


def fields_of(model: str) -> tuple[VMField, ...]:
    """The fields ``model`` carries, in declaration order."""
    if model not in MODELS:
        raise ValueError(f"no VM model is called {model!r}: one of {sorted(MODELS)}")
    return tuple(field for field in VM_FIELDS if model in field.models)


def names_of(model: str) -> tuple[str, ...]:
    """The names of the fields ``model`` carries, in declaration order."""
    return tuple(field.name for field in fields_of(model))
