"""A fake VMShop core for client and CLI tests, served over real SOAP.

:class:`FakeShop` implements the methods :mod:`vmshop_service.service` calls
on ``ctx.app.vmshop`` (the protocol ``vmshop_service.service.ShopOperations``,
which the real :class:`~vmshop_service.shop.Shop` satisfies too; mypy and
``tests/test_shop_protocol.py`` hold both to it) with in-memory state: a real
:class:`~vmshop_service.registry.Registry` (``:memory:``, so queries have the
real syntax and semantics), the real resource-properties document and its
queries, DAGs loaded and checked by the real loader. Nothing is booted.

Behaviour tests can rely on:

- Two plants: ``127.0.0.1:9001`` (up, has the image ``tiny``) bids on blank
  DAGs and on DAGs starting from ``tiny``; ``127.0.0.1:9002`` is down. A DAG
  starting from another image gets no bid (estimate: no ``plant``;
  create: ``Server.NoPlantAvailable``).
- Cost: 1 s to clone ``tiny`` plus each action's hint (default 1 s).
- ``create`` registers the VM under its key at once (state ``placing``),
  then goes ``creating`` (from 10 % to 80 % of :attr:`FakeShop.create_seconds`),
  ``creating:configuring`` (the real shop's "creating, and the plant says
  configuring"), and answers with state ``running``. It waits with
  ``deferLater`` (methods run in the reactor thread; never block it).
  :attr:`FakeShop.fail_create` (an error) makes the next creates fail with
  it after the ``creating`` phase (and the VM's entry is removed).
- A script action whose body contains ``fake:fail`` fails: ``configure``
  raises ``Server.ActionFailed``; one containing ``fake:status`` is reported
  as a run that exited with status 3 (``ok`` false), nothing raised.
- A second create with a key in use is refused with ``Client.Declined``;
  a failed create removes the VM's entry again (as the real shop does).
- Like the real shop, every operation takes the caller's identity and
  applies :mod:`vmshop_common.authz`'s rules: a VM is seen and touched by
  its owner or an admin only (anyone else: ``Client.NoSuchVM``), queries see
  the caller's VMs (an admin's: all), ``owner`` is the caller's unless an
  admin names another, ``reloadPlants`` is for admins, ``plantChanged`` for
  the plant itself or an admin (a pushed offer is validated and kept in
  ``offers``).
- ``publish`` keeps the image in :attr:`FakeShop.images` (its steps: the
  VM's, its owner: the VM's; a name in use, ``tiny`` included, is
  ``Client.ImageExists``; ``public`` is for admins); ``unpublish`` removes
  the caller's own (anyone else's: ``Client.NoSuchImage``); ``set_image_public``
  (admins) flips an image's ``is_public``; ``set_image_movable`` (its owner
  or an admin) answers its plant.

Serve it with :func:`serve_fake_shop` (mutual TLS with the session's PKI,
its authorisation file mapping the test identities).
"""

from __future__ import annotations

import atexit
import itertools
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmshop_common.soap import compat  # noqa: F401  (before spyne)

# isort: split
from lxml import etree
from twisted.internet import defer, task

from vmshop_common import authz
from vmshop_common.authz import Identity
from vmshop_common.dag import Action, BlankStart, Dag, ScriptAction
from vmshop_common.dagxml import load_dag
from vmshop_common.errors import (
    ActionFailedError,
    DeclinedError,
    ImageExistsError,
    NoPlantError,
    NoSuchImageError,
    NoSuchPlantError,
    NoSuchVMError,
    NotAuthorizedError,
    NotSupportedError,
    VMShopError,
)
from vmshop_common.imagename import check_image_name
from vmshop_common.offers import CatalogCache, Offer, offer_from_wire
from vmshop_service import wire
from vmshop_service.query import Term, parse_query
from vmshop_service.registry import Registry, VMEntry
from vmshop_service.resource import get_resource_property, properties_document, query_resource_properties
from vmshop_service.service import APP_NAME, VMShopService

# soap_harness lives next to this file; import it under one name whatever pytest's import mode.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import soap_harness  # noqa: E402

PLANT_UP = "127.0.0.1:9001"
PLANT_DOWN = "127.0.0.1:9002"
IMAGE = "tiny"
CLONE_SECONDS = 1.0
DEFAULT_ACTION_SECONDS = 1.0


def default_plants() -> list[wire.PlantStatus]:
    """The fake's two plants: one up with the image ``tiny``, one down."""
    return [
        wire.PlantStatus(address=PLANT_UP, up=True, name="plant1", backend="fake", accelerator="none",
                         running_vms=0, capacity_vms=8, free_memory=4096, images=[IMAGE], last_error=None,
                         last_seen=time.time()),
        wire.PlantStatus(address=PLANT_DOWN, up=False, name=None, backend=None, accelerator=None,
                         running_vms=None, capacity_vms=None, free_memory=None, images=[],
                         last_error="connection refused", last_seen=None),
    ]


class FakeShop:
    """What ``VMShopService`` calls on ``ctx.app.vmshop``, in memory (see the module docstring)."""

    def __init__(self, *, create_seconds: float = 1.0) -> None:
        self.address = "http://127.0.0.1:8080/"  # the shop's public URL (EPR Address); set by serve_fake_shop
        self.notices: list[str] = []  # plantChanged calls heard
        self.offers: dict[str, Offer] = {}  # offers pushed with plantChanged, by plant address
        self._catalogs = CatalogCache()
        self.registry = Registry(":memory:")
        self.create_seconds = create_seconds
        self.fail_create: VMShopError | None = None
        self.plant_list: list[wire.PlantStatus] = default_plants()
        self.reloads = 0
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.images: dict[str, wire.PublishedImage] = {}  # published images, by name
        self._numbers = itertools.count(1)

    # Helpers ------------------------------------------------------------------------------------------

    def _info(self, entry: VMEntry) -> wire.VMInfo:
        return wire.VMInfo(
            epr=wire.EndpointReference(Address=self.address, VMKey=entry.vm_id),
            vm_id=entry.vm_id, owner=entry.owner, state=entry.state, plant=entry.plant,
            plant_vm_id=entry.plant_vm_id, image=entry.image, memory=entry.memory, vcpus=entry.vcpus,
            disk=entry.disk, arch=entry.arch, address=entry.address, host_port=entry.host_port,
            created=entry.created, updated=entry.updated, termination=entry.termination,
            collected=entry.collected, cost=entry.cost, error=entry.error, steps=list(entry.steps),
            attributes=[wire.Attribute(name=k, value=v) for k, v in sorted(entry.attributes.items())],
        )

    def _entry(self, caller: Identity, vm: Any) -> VMEntry:
        # Like the real shop: the key decides, whatever name the reference gives this shop, and another
        # owner's VM is one that does not exist.
        authz.require(caller, authz.VM_ROLES, "act on VMs")
        entry = self.registry.get(vm.VMKey)
        if not authz.may_manage(caller, entry.owner):
            raise NoSuchVMError(f"no VM has id '{vm.VMKey}'")
        return entry

    @staticmethod
    def _order(dag: Dag) -> list[Action]:
        order = dag.topological_order()
        return [dag.nodes[n] for n in order if isinstance(dag.nodes[n], Action)]  # type: ignore[misc]

    def _bids(self, dag: Dag) -> list[wire.Bid]:
        start = dag.start
        down = wire.Bid(plant=PLANT_DOWN, status="down", cost=None, image=None, reason="connection refused",
                        seconds=None, items=[])
        if not isinstance(start, BlankStart) and start.name != IMAGE:
            return [wire.Bid(plant=PLANT_UP, status="declined", cost=None, image=None,
                             reason=f"no cached image named '{start.name}'", seconds=None, items=[]), down]
        items = [wire.CostItem(label=f"clone {IMAGE}", seconds=CLONE_SECONDS, source="default", node=start.id)]
        for action in self._order(dag):
            hint = action.cost
            items.append(wire.CostItem(label=f"{action.kind} {action.id}",
                                       seconds=DEFAULT_ACTION_SECONDS if hint is None else hint,
                                       source="default" if hint is None else "hint", node=action.id))
        total = sum(item.seconds for item in items)
        return [wire.Bid(plant=PLANT_UP, status="bid", cost=total, image=IMAGE, reason=None, seconds=total,
                         items=items), down]

    @staticmethod
    def _runs(dag: Dag) -> list[wire.ActionRun]:
        runs = []
        for action in FakeShop._order(dag):
            if isinstance(action, ScriptAction) and "fake:fail" in action.body:
                raise ActionFailedError(f"action '{action.id}' failed with status 1: fake failure")
            first = next((line.strip() for line in getattr(action, "body", "").splitlines() if line.strip()), "")
            output = f"+ {first}\ndone {action.id}\n" if first else ""
            status = 3 if isinstance(action, ScriptAction) and "fake:status" in action.body else 0
            runs.append(wire.ActionRun(node=action.id, status=status, ok=status == 0, timed_out=False,
                                       seconds=0.05, output=output))
        return runs

    # The shop's operations -------------------------------------------------------------------------------

    def create(self, caller: Identity, dag_xml: str, owner: str, termination_time: float | None,
               vm_key: str | None) -> defer.Deferred[Any]:
        """Register the VM (placing), wait through creating/configuring, answer it running."""
        from twisted.internet import reactor

        self.calls.append(("create", (owner, termination_time, vm_key)))  # as sent
        owner = authz.owner_of_new_vm(caller, owner)
        dag = load_dag(dag_xml)
        number = next(self._numbers)
        key = vm_key or f"vm-{number:04d}"
        try:
            self.registry.get(key)
        except NoSuchVMError:
            pass
        else:
            raise DeclinedError(f"a VM with the key '{key}' exists already")
        start = dag.start
        hardware = start.hardware if isinstance(start, BlankStart) else None
        memory = hardware.memory if hardware else (start.memory or 128)  # type: ignore[union-attr]
        self.registry.add(VMEntry(
            vm_id=key, owner=owner, state="placing", memory=memory, vcpus=hardware.vcpus if hardware else 1,
            disk=hardware.disk if hardware else 1, arch=hardware.arch if hardware else "x86_64",
            termination=termination_time, dag_xml=dag_xml, attributes=dict(dag.attributes)))
        bids = self._bids(dag)
        winner = next((b for b in bids if b.status == "bid"), None)
        if winner is None:
            self.registry.delete(key)
            raise NoPlantError(f"no plant can create the VM: {'; '.join(f'{b.plant}: {b.reason}' for b in bids)}")
        failure = self.fail_create
        seconds = self.create_seconds

        def creating() -> None:
            self.registry.update(key, state="creating", plant=winner.plant, image=IMAGE,
                                 plant_vm_id=f"p-{number}", updated=time.time())

        def configuring() -> None:
            if failure is not None:
                self.registry.delete(key)
                raise failure
            self.registry.update(key, state="creating:configuring", address=f"10.0.0.{number % 250 + 2}",
                                 host_port=2200 + number, updated=time.time())

        def running() -> wire.CreateResult:
            runs = self._runs(dag)
            self.registry.update(key, state="running", cost=winner.cost, updated=time.time(),
                                 steps=[start.id] + [r.node for r in runs])
            entry = self.registry.get(key)
            return wire.CreateResult(vm=self._info(entry), plant=winner.plant, cost=winner.cost, bids=bids,
                                     runs=runs, attempts=[f"{winner.plant}: created"])

        d: defer.Deferred[Any] = task.deferLater(reactor, seconds * 0.1, creating)
        d.addCallback(lambda _: task.deferLater(reactor, seconds * 0.7, configuring))
        d.addCallback(lambda _: task.deferLater(reactor, seconds * 0.2, running))
        return d

    def estimate(self, caller: Identity, dag_xml: str) -> wire.Estimate:
        dag = load_dag(dag_xml)
        bids = self._bids(dag)
        best = next((b for b in bids if b.status == "bid"), None)
        if best is None:
            return wire.Estimate(plant=None, cost=None, image=None, items=[], remaining=[], bids=bids)
        return wire.Estimate(plant=best.plant, cost=best.cost, image=best.image, items=best.items,
                             remaining=[a.id for a in self._order(dag)], bids=bids)

    def configure(self, caller: Identity, vm: Any, dag_xml: str) -> list[wire.ActionRun]:
        entry = self._entry(caller, vm)
        if entry.state != "running":
            raise NotSupportedError(f"VM '{entry.vm_id}' is {entry.state}, not running")
        runs = self._runs(load_dag(dag_xml))
        self.registry.update(entry.vm_id, steps=entry.steps + [r.node for r in runs], updated=time.time())
        return runs

    def query(self, caller: Identity, text: str, limit: int | None) -> list[wire.VMInfo]:
        owner = authz.visible_owner(caller)
        query = parse_query(text) + ((Term("owner", "=", owner),) if owner is not None else ())
        return [self._info(e) for e in self.registry.query(query, limit)]

    def describe(self, caller: Identity, vm: Any) -> wire.VMInfo:
        return self._info(self._entry(caller, vm))

    def collect(self, caller: Identity, vm: Any) -> wire.VMInfo:
        entry = self._entry(caller, vm)
        if entry.collected is None:
            now = time.time()
            self.registry.update(entry.vm_id, state="collected", collected=now, updated=now)
        return self._info(self._entry(caller, vm))

    def set_termination(self, caller: Identity, vm: Any, termination_time: float | None) -> wire.VMInfo:
        entry = self._entry(caller, vm)
        self.registry.update(entry.vm_id, termination=termination_time, updated=time.time())
        return self._info(self._entry(caller, vm))

    def resource_document(self, caller: Identity, vm: Any) -> str:
        return etree.tostring(properties_document(self._entry(caller, vm), time.time()), encoding="unicode")

    def resource_property(self, caller: Identity, vm: Any, name: str) -> list[str]:
        return get_resource_property(self._entry(caller, vm), name, time.time())

    def resource_query(self, caller: Identity, vm: Any, xpath: str) -> list[str]:
        return query_resource_properties(self._entry(caller, vm), xpath, time.time())

    def publish(self, caller: Identity, vm: Any, image: str, public: bool,
                with_state: bool = False) -> wire.PublishedImage:
        check_image_name(image)
        if public:
            authz.require(caller, (authz.ADMIN,), "publish a public image")
        entry = self._entry(caller, vm)
        if entry.state != "running":
            raise NotSupportedError(f"VM {entry.vm_id} is {entry.state}; only a running VM can be published")
        if image in self.images or image == IMAGE:
            raise ImageExistsError(f"this plant's warehouse has an image named '{image}' already")
        steps = [step for step in entry.steps if step != "start"]
        made = wire.PublishedImage(name=image, plant=entry.plant, owner=entry.owner, is_public=public,
                                   base=entry.image, steps=steps, size=65536 * (len(steps) + 1),
                                   with_state=with_state)
        self.images[image] = made
        return made

    def unpublish(self, caller: Identity, image: str) -> list[str]:
        authz.require(caller, authz.VM_ROLES, "unpublish images")
        check_image_name(image)
        made = self.images.get(image)
        if made is None or not authz.may_manage(caller, made.owner):
            raise NoSuchImageError(f"no plant has an image named '{image}'")
        del self.images[image]
        return [PLANT_UP]

    def set_image_public(self, caller: Identity, image: str, public: bool) -> list[str]:
        authz.require(caller, (authz.ADMIN,), "make images public or private")
        check_image_name(image)
        made = self.images.get(image)
        if made is None:
            raise NoSuchImageError(f"no plant has an image named '{image}'")
        made.is_public = public
        return [PLANT_UP]

    def set_image_movable(self, caller: Identity, image: str, movable: bool) -> list[str]:
        authz.require(caller, authz.VM_ROLES, "make images movable")
        check_image_name(image)
        made = self.images.get(image)
        if made is None or not authz.may_manage(caller, made.owner):
            raise NoSuchImageError(f"no plant has an image named '{image}'")
        return [PLANT_UP]

    def plants_list(self, caller: Identity) -> list[wire.PlantStatus]:
        return list(self.plant_list)

    def reload_plants(self, caller: Identity) -> list[wire.PlantStatus]:
        authz.require(caller, (authz.ADMIN,), "reload the plant list")
        self.reloads += 1
        return list(self.plant_list)

    def plant_changed(self, caller: Identity, url: str, offer: Any = None) -> bool:
        if not authz.may_notify(caller, url):
            raise NotAuthorizedError(f"{caller.name} may not send notices for the plant at {url!r}")
        if url not in {p.address for p in self.plant_list}:
            raise NoSuchPlantError(f"{url!r} is not one of this shop's plants")
        self.notices.append(url)
        if offer is not None:  # validated as the real shop does (Client.OfferInvalid), then kept
            self.offers[url] = offer_from_wire(offer, url, self._catalogs, time.time())
        return True


@dataclass
class FakeShopServer:
    """A :class:`FakeShop` listening on 127.0.0.1 in the reactor thread."""

    shop: FakeShop
    served: soap_harness.ServedSite

    @property
    def url(self) -> str:
        return self.served.url

    def stop(self) -> None:
        self.served.stop()


def serve_fake_shop(shop: FakeShop | None = None, mapfile: Path | None = None) -> FakeShopServer:
    """Serve ``shop`` (a new :class:`FakeShop` by default) with the real service on a free port, over mutual
    TLS; ``mapfile`` (default: the test PKI's shop mapfile, in a temporary file) says who the callers are."""
    import tempfile

    from pki import test_pki

    from vmshop_common.soap.server import build_site

    shop = shop or FakeShop()
    if mapfile is None:
        handle, name = tempfile.mkstemp(prefix="fake-shop-mapfile-")
        os.close(handle)
        mapfile = test_pki().shop_mapfile(Path(name), {"plant": [PLANT_UP, PLANT_DOWN]})
        atexit.register(Path(name).unlink, True)
    site = build_site([VMShopService], wire.TNS, "https://127.0.0.1:{port}/", name=APP_NAME)
    site.app.vmshop = shop  # type: ignore[attr-defined]
    site.identities = authz.AuthorizationFile(mapfile, "shop")
    served = soap_harness.serve_in_thread(site)
    shop.address = served.url
    return FakeShopServer(shop=shop, served=served)
