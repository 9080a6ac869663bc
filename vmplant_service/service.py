"""The plant's SOAP service: :class:`~vmplant_service.plant.Plant` on the wire.

Every operation runs the plant's (blocking) work on the plant's own thread
pool and returns a Deferred, so the reactor never waits for QEMU, the
guest or SQLite. Each kind of work has a stated deadline, after which its
request is answered ``Server.DeadlineExceeded`` (:mod:`vmshop_common.threads`;
the plant's own bounds end the work first, the deadline is the backstop):
a read (estimate, describe, list, plant info) :data:`READ_DEADLINE`; a collect
(and an unpublish) :data:`COLLECT_DEADLINE`; a publish :data:`PUBLISH_DEADLINE`;
a create the boot timeout plus the plant's ``dag-seconds`` plus :data:`SLACK`; a configure ``dag-seconds`` plus
:data:`SLACK`. Failures become SOAP faults with the project's stable
codes (:mod:`vmshop_common.soap.faults`). Only identities with the ``shop``
or ``admin`` role are served (:func:`_runtime`, see :mod:`vmshop_common.authz`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from vmshop_common.soap import compat  # noqa: F401  (before spyne)

# isort: split
from spyne import Boolean, Double, ServiceBase, Unicode, rpc
from twisted.internet.defer import Deferred

from vmshop_common import authz
from vmshop_common.errors import AuthenticationFailedError, VMShopError
from vmshop_common.soap.fastxml import spyne_record
from vmshop_common.soap.faults import failure_to_fault, to_fault
from vmshop_common.soap.offer_wire import offer_fields
from vmshop_common.threads import ThreadPoolService

from .notify import ShopNotifier
from .plant import BOOT_TIMEOUT, SAVE_TIMEOUT, Plant
from .publish import CONVERT_TIMEOUT
from .quiesce import FREEZE_TIMEOUT, PAUSE_TIMEOUT
from .wire import (
    ActionRun,
    CreateResult,
    Estimate,
    Image,
    Offer,
    PlantInfo,
    VMInfo,
    estimate_out,
    image_out,
    info_out,
    run_out,
    vm_out,
)

T = TypeVar("T")
APP_NAME = "VMPlant"
MAX_DAG_CHARS = 1024 * 1024
#: Seconds a read (estimate, describe, list, plant info) may hold a thread.
READ_DEADLINE = 60.0
#: Seconds a collect may hold a thread (stopping the guest, reclaiming what it held).
COLLECT_DEADLINE = 300.0
#: Seconds added to a create's or configure's own bounds for what surrounds them (clone, records, reclaiming).
SLACK = 300.0
#: Seconds a publish may hold a thread: freezing, pausing, copying, resuming and thawing, and slack.
PUBLISH_DEADLINE = 2 * FREEZE_TIMEOUT + 2 * PAUSE_TIMEOUT + SAVE_TIMEOUT + CONVERT_TIMEOUT + SLACK


class PlantRuntime:
    """What the service methods reach through ``ctx.app.vmplant``: the plant, its thread pool and the
    notifier of its shops (None: it tells no shop)."""

    def __init__(self, plant: Plant, reactor: Any, pool: ThreadPoolService,
                 notifier: ShopNotifier | None = None) -> None:
        self.plant = plant
        self.reactor = reactor
        self.pool = pool
        self.notifier = notifier
        self.public_url = ""  # the plant's public URL (set once it listens): what its offers name

    def offer_fields(self) -> dict[str, Any]:
        """The plant's offer now, as wire fields (blocking)."""
        return offer_fields(self.plant.offer(self.public_url))

    def run(self, work: Callable[[], T], changes: bool = False, *, deadline: float = READ_DEADLINE,
            what: str = "") -> Deferred[T]:
        """``work`` on the plant's thread pool within ``deadline`` seconds; with ``changes`` the shops hear of it
        when it ends (even failed)."""
        d = self.pool.run(work, deadline=deadline, what=what or None)
        if changes:
            d.addBoth(self._told)
        return d.addErrback(failure_to_fault)

    @property
    def create_deadline(self) -> float:
        """Seconds a create may hold a thread: the boot timeout, the plant's bound on a DAG's actions, slack."""
        return BOOT_TIMEOUT + self.plant.config.max_dag_seconds + SLACK

    @property
    def configure_deadline(self) -> float:
        """Seconds a configure may hold a thread: the plant's bound on a DAG's actions, slack."""
        return self.plant.config.max_dag_seconds + SLACK

    def _told(self, result: Any) -> Any:
        if self.notifier is not None:
            self.notifier.changed()
        return result


def _runtime(ctx: Any) -> PlantRuntime:
    """The plant's runtime, for a caller that may use it: a plant obeys only shops and admins.

    The caller is the identity the SOAP resource found for the request (``ctx.udc``, from the client's
    certificate through the plant's authorisation file); anyone else gets the fault ``Client.NotAuthorized``.
    """
    caller = ctx.udc
    try:
        if caller is None:
            raise AuthenticationFailedError("no identity: this plant serves only identified callers")
        authz.require(caller, authz.PLANT_CALLERS, "call this plant")
    except VMShopError as exc:
        raise to_fault(exc) from None
    return ctx.app.vmplant  # type: ignore[no-any-return]


Dag = Unicode(max_len=MAX_DAG_CHARS, min_occurs=1, nillable=False)
VmId = Unicode(max_len=64, min_occurs=1, nillable=False)
#: An image name travels as any text (up to 256 characters): the plant answers Client.ImageNameInvalid for one
#: that is not a name, with its own words, instead of a schema error.
ImageName = Unicode(max_len=256, min_occurs=1, nillable=False)


class VMPlantService(ServiceBase):
    """The five operations for one host, plus describe, list and plant info."""

    @rpc(Dag, Unicode(max_len=256), _returns=Estimate)
    def estimateCost(ctx, dag: str, owner: str | None):  # noqa: N802, N805
        """Bid for making the VM the DAG describes for ``owner`` (who may use the public images and its own):
        cost and breakdown, or a decline with the reason."""
        rt = _runtime(ctx)
        return rt.run(lambda: estimate_out(rt.plant.config.name, rt.plant.estimate(dag, owner or "")),
                      what="estimateCost")

    @rpc(Dag, Unicode(max_len=256), Unicode(max_len=64), Double, _returns=CreateResult)
    def createVM(ctx, dag: str, owner: str | None, vm_id: str | None, max_cost: float | None):  # noqa: N802, N805
        """Make the VM; answers once it is configured. ``vm_id`` lets the caller choose the id. ``max_cost``:
        the most the caller accepts (from this plant's offer); a higher live cost declines (Server.OfferExceeded)."""
        rt = _runtime(ctx)
        shop = ctx.udc.subject or ctx.udc.name  # who asked: only that shop may later say it is unwanted
        if max_cost is not None and not (0 <= max_cost < float("inf")):
            max_cost = None

        def work() -> CreateResult:
            made = rt.plant.create(dag, owner or "", vm_id or None, shop=shop, max_cost=max_cost)
            runs = [run_out(node, result) for node, result in zip(made.bid.remaining, made.results, strict=False)]
            return CreateResult(vm=vm_out(made.record, list(made.bid.remaining)),
                                estimate=estimate_out(rt.plant.config.name, made.bid), runs=runs)

        return rt.run(work, changes=True, deadline=rt.create_deadline, what=f"createVM {vm_id!r}")

    @rpc(VmId, Dag, _returns=ActionRun.customize(max_occurs="unbounded"))
    def configureVM(ctx, vm_id: str, dag: str):  # noqa: N802, N805
        """Run the DAG's actions on the VM in DAG order; their results."""
        rt = _runtime(ctx)

        def work() -> list[ActionRun]:
            results = rt.plant.configure(vm_id, dag)
            return [run_out(result.name.split("-", 1)[1], result) for result in results]

        return rt.run(work, changes=True, deadline=rt.configure_deadline, what=f"configureVM {vm_id!r}")

    @rpc(VmId, _returns=VMInfo)
    def describeVM(ctx, vm_id: str):  # noqa: N802, N805
        """The VM's record, its state current."""
        rt = _runtime(ctx)
        return rt.run(lambda: _vm_with_steps(rt.plant, vm_id), what=f"describeVM {vm_id!r}")

    @rpc(Boolean, _returns=VMInfo.customize(max_occurs="unbounded"))
    def listVMs(ctx, include_collected: bool | None):  # noqa: N802, N805
        """Every VM the plant holds (and, if asked, the collected ones)."""
        rt = _runtime(ctx)
        return rt.run(lambda: [vm_out(r) for r in rt.plant.list_vms(bool(include_collected))], what="listVMs")

    @rpc(VmId, _returns=VMInfo)
    def collectVM(ctx, vm_id: str):  # noqa: N802, N805
        """Stop the VM, delete its clone, release its address; collecting twice is not an error."""
        rt = _runtime(ctx)
        return rt.run(lambda: vm_out(rt.plant.collect(vm_id)), changes=True, deadline=COLLECT_DEADLINE,
                      what=f"collectVM {vm_id!r}")

    @rpc(_returns=Offer)
    def getOffer(ctx):  # noqa: N802, N805
        """The plant's offer: its catalog, measured costs, load and terms, versioned (what a shop prices with)."""
        rt = _runtime(ctx)
        return rt.run(lambda: spyne_record(Offer, **_offer_records(rt.offer_fields())), what="getOffer")

    @rpc(VmId, ImageName, Unicode(max_len=256), Boolean, Boolean, _returns=Image)
    def publishVM(ctx, vm_id: str, image: str, owner: str | None, is_public: bool | None,  # noqa: N802, N805
                  with_state: bool | None):
        """Make the VM's disk a new cached image named ``image`` (its changes over its base; its steps as the
        image's DAG), owned by the VM's owner; ``owner``, when given, must be that owner. ``is_public``: it serves
        every owner (the shop lets only admins ask). ``with_state``: the image also carries the guest's running
        state, so its clones resume instead of booting (a backend that cannot save one: Client.NotSupported)."""
        rt = _runtime(ctx)
        return rt.run(lambda: image_out(rt.plant.publish(vm_id, image, owner or "", bool(is_public),
                                                         bool(with_state))), changes=True,
                      deadline=PUBLISH_DEADLINE, what=f"publishVM {vm_id!r}")

    @rpc(ImageName, Unicode(max_len=256), _returns=Unicode)
    def unpublishImage(ctx, image: str, owner: str | None):  # noqa: N802, N805
        """Remove a published image once no VM or image uses it as a base; ``owner``, when given, must be its
        owner. Answers the image's name."""
        rt = _runtime(ctx)
        return rt.run(lambda: rt.plant.unpublish(image, owner or ""), changes=True, deadline=COLLECT_DEADLINE,
                      what=f"unpublishImage {image!r}")

    @rpc(ImageName, Boolean(min_occurs=1, nillable=False), _returns=Image)
    def setImagePublic(ctx, image: str, is_public: bool):  # noqa: N802, N805
        """Make a published image public (it serves every owner) or private again (the shop lets only admins
        ask)."""
        rt = _runtime(ctx)
        return rt.run(lambda: image_out(rt.plant.set_public(image, bool(is_public))), changes=True,
                      what=f"setImagePublic {image!r}")

    @rpc(ImageName, Boolean(min_occurs=1, nillable=False), Unicode(max_len=256), _returns=Image)
    def setImageMovable(ctx, image: str, is_movable: bool, owner: str | None):  # noqa: N802, N805
        """Let a private image move between the site's plants that agree (or stop it): a peer plant may then fetch
        it for its owner's requests only. ``owner``, when given, must be the image's owner (else Client.NoSuchImage,
        as for an image that does not exist); the shop passes the caller's name, or none for an admin."""
        rt = _runtime(ctx)
        return rt.run(lambda: image_out(rt.plant.set_movable(image, bool(is_movable), owner or "")), changes=True,
                      what=f"setImageMovable {image!r}")

    @rpc(_returns=PlantInfo)
    def plantInfo(ctx):  # noqa: N802, N805
        """Backend, capacity, free memory and addresses, cached images, measured costs."""
        rt = _runtime(ctx)
        return rt.run(lambda: info_out(rt.plant.info()), what="plantInfo")


def _vm_with_steps(plant: Plant, vm_id: str) -> VMInfo:
    record = plant.describe(vm_id)
    steps = [run.node_id for run in plant.records.action_runs(vm_id) if run.ok]
    return vm_out(record, steps)


def _offer_records(fields: dict[str, Any]) -> dict[str, Any]:
    """Offer wire fields with the nested records as Spyne objects."""
    image_type = Offer._type_info["images"]
    step_type = Offer._type_info["steps"]
    return {**fields, "images": [spyne_record(image_type, **i) for i in fields["images"]],
            "steps": [spyne_record(step_type, **st) for st in fields["steps"]]}
