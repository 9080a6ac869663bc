"""The plant: makes, configures, describes and collects VMs on one host.

This is the plant without SOAP (``service.py`` puts it on the wire). Every
method may block (QEMU tools, the guest's agent, SQLite) and is called from
a thread pool; several may run at once, so shared decisions (capacity, the
IP pool, VM ids) are taken under one lock.

Guarantees:
- a create that fails, at any step, leaves nothing behind: no process, no
  overlay, no cloud-init seed, no channel directory, no pool address, no
  record; the error says which step failed;
- an image is only used where it can run: its ``<guest>`` traits are
  checked against the backend and the DAG at bid time (:meth:`Plant._unfit`);
- an image with cloud-init gets a NoCloud seed of its own per VM (``seeds/<vm>.iso``,
  0600, attached read-only, removed with the VM), and its actions run only
  once cloud-init has finished the first boot without errors;
- records are written to SQLite (durable) before a method returns;
- a VM is only ever created from a DAG that :func:`load_dag` accepted;
- a VM is ``made`` only once its whole DAG ran: a restart fails and
  reclaims a create it cut short, never adopts it as running
  (``docs/consistency.md``);
- a collect that arrives while the VM is being created cancels the create:
  the create stops at its next step, reclaims everything, and the VM ends
  ``collected`` (it never runs unwanted);
- a VM is published (:meth:`Plant.publish`, :mod:`.publish`) only while it
  runs and no create, configure or other publish of it does, and a
  configure waits for its publish; bids and creates use only the images
  their owner may see (:meth:`~.warehouse.Warehouse.visible`), and an image
  is unpublished only when no VM being made or live uses it as a base;
- a clone of an image with a saved running state (publish ``with_state``)
  resumes from it instead of booting, when the backend can resume and the
  clone's machine is the saved one's (:meth:`Plant._resumable`), else it
  boots from the image's disk; a resumed clone gets its own identity
  (:meth:`Plant._reset_identity`: file systems thawed, fresh entropy, the
  clock, its own MACs, pool address and host name) before any action runs;
- an image a peer holds and this plant lacks (:mod:`.transfer`) is bid
  for with its fetch's seconds, and a create that needs it fetches it
  (and its missing lineage) first, once however many creates need it; the
  images a create fetched are kept from eviction until it ends.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmshop_common.cost import Bid, Decline, match_request
from vmshop_common.dag import Action, Dag, MountAction, NetworkAction
from vmshop_common.dagxml import dag_to_xml, load_dag, step_to_xml
from vmshop_common.errors import (
    ActionFailedError,
    BackendError,
    CapacityExhaustedError,
    DeclinedError,
    ImageExistsError,
    ImageInUseError,
    NoSuchImageError,
    NoSuchVMError,
    NotSupportedError,
    OfferExceededError,
    Problem,
    VMBusyError,
    VMShopError,
)
from vmshop_common.guest import GuestTraits, unfit
from vmshop_common.matching import flatten
from vmshop_common.offers import Catalog, Offer, Terms, catalog_digest, price, too_long, unservable
from vmshop_common.rules import check_static_addresses

from .agent.qga import GuestAgent
from .agent.transport import AgentError
from .backends.base import Backend, Capabilities, GuestSpec, Nic, VMState
from .backends.console import console_tail
from .channel import ActionContext, ActionResult, Channel
from .clone import make_overlay
from .config import PlantConfig
from .ippool import IPPool
from .publish import PublishedImage, Publisher, SavedState, check_image_name, described, published_steps, set_flag
from .quiesce import quiesced, thaw_cut_short
from .records import PlantRecords, VMRecord
from .seed import SeedNic, hostname_for, write_seed
from .segment import OwnerSegments, mac_for, segment_name
from .transfer import Transfers
from .warehouse import ImageInfo, Warehouse

log = logging.getLogger(__name__)

VM_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
LIVE_STATES = ("creating", "booting", "configuring", "running", "collecting")
#: Owners whose catalogs (:meth:`Plant.catalog`) a plant keeps, besides recomputing any other's.
CATALOGS_KEPT = 256
#: Seconds a guest may take from QEMU's start to its agent's first word.
BOOT_TIMEOUT = 180.0
#: Seconds cloud-init may take, once the agent answered, to finish a first boot (its user data included).
CLOUD_INIT_TIMEOUT = 300.0
#: Seconds a guest gets to power down before it is killed.
STOP_TIMEOUT = 20.0
#: Seconds a collect waits for a create it cancelled to stop (the create's longest uninterruptible step is a
#: backend's start, bounded by its own start timeout).
CANCEL_WAIT = 90.0
#: Seconds a backend may take to save a paused guest's machine state (publish with_state), and to restore one.
SAVE_TIMEOUT = 120.0
RESTORE_TIMEOUT = 120.0
#: A resume is bid at this share of the image's boot seconds before this plant measured one (of that image, or any).
RESUME_GUESS = 0.25
#: Seconds the identity reset of a resumed clone may take in all (the guest's agent answers within them).
IDENTITY_TIMEOUT = 60.0
#: Random bytes from the host written into a resumed clone's /dev/urandom.
ENTROPY_BYTES = 64
#: States of a VM whose create, configure or collect runs: it cannot be published now.
BUSY_STATES = ("creating", "booting", "configuring", "collecting")


class CreateCancelled(Exception):
    """A collect cancelled this create (internal: the create reclaims and answers as collected)."""


@dataclass(frozen=True)
class CreateResult:
    record: VMRecord
    bid: Bid
    results: tuple[ActionResult, ...]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Plant:
    """One host's VMs. ``clock`` gives wall-clock seconds (records' times)."""

    def __init__(self, config: PlantConfig, backend: Backend, records: PlantRecords, warehouse: Warehouse,
                 pool: IPPool | None = None, segments: OwnerSegments | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.backend = backend
        self.records = records
        self.warehouse = warehouse
        self.pool = pool
        self.segments = segments
        self.clock = clock
        self._lock = threading.Lock()
        self._reserved: dict[str, int] = {}  # vm_id -> MiB, VMs being created
        self._reserved_owners: dict[str, str] = {}  # vm_id -> owner, VMs being created
        self._reserved_shops: dict[str, str] = {}  # vm_id -> the shop that asked for it, VMs being created
        self._reserved_images: dict[str, str] = {}  # vm_id -> the image it is cloned from, VMs being created
        self._cancelled: set[str] = set()  # VMs being created that a collect cancelled
        self._publishing: dict[str, str] = {}  # vm_id -> the image name it is being published as
        self.publisher = Publisher(warehouse, config.name)
        #: Where images this plant lacks are fetched from (None: no peers; :meth:`attach_peers`).
        self.transfers: Transfers | None = None
        #: Told of each guest-agent error ('failed', 'timeout', 'no_answer'), from worker threads (the metrics'
        #: hook; vmplant_service/metrics.py).
        self.on_agent_error: Callable[[str], None] | None = None
        self._catalogs: dict[str | None, tuple[Any, Catalog]] = {}  # owner -> (its images, their catalog)
        self._offer_content: Any = None
        self._offer_version = 0
        self.state_dir = Path(config.state_dir)
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o700)
        for sub in ("overlays", "run", "seeds", "publishing"):
            (self.state_dir / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.state_dir / sub, 0o700)

    # Costs ------------------------------------------------------------------
    def estimate(self, dag_xml: str, owner: str = "") -> Bid | Decline:
        """A bid for the DAG (of a VM ``owner`` would own: the images it may use are the public ones and its
        own), or a decline with the reason. Invalid DAGs (and static addresses) raise."""
        dag = load_dag(dag_xml)
        check_static_addresses(dag, None)
        result = self.estimate_dag(dag, owner)
        if isinstance(result, Bid):
            full = self._full()
            if full:
                return Decline(full)
        return result

    def _full(self) -> str | None:
        """Why this plant has no room for another VM right now, or None (a bid it could not honour is a decline).

        Besides its capacity, a plant makes at most ``<work creates>`` VMs at once: it declines more (it is
        busy) instead of queueing them without end.
        """
        with self._lock:
            count = len({r.vm_id for r in self.records.live_vms()} | set(self._reserved))
            creating = len(self._reserved)
        if count >= self.config.capacity_vms:
            return f"this plant is full: it runs {count} VMs, its limit"
        if creating >= self.config.max_creates:
            return f"this plant is busy: it is making {creating} VMs at once, its limit"
        return None

    def estimate_dag(self, dag: Dag, owner: str = "", besides_shop: str = "") -> Bid | Decline:
        """The bid for ``dag`` with this plant's live state: :func:`vmshop_common.offers.price` of the plant's
        own offer (the code a shop prices offers with), with its live step records and data store, among the
        images ``owner`` may use (another owner's private images are not even named: to this request they do not
        exist). ``besides_shop``: leave that shop's creates in progress here out of the load (see
        :meth:`create`)."""
        offer = self._snapshot({}, besides_shop=besides_shop, owner=owner)
        return price(dag, match_request(dag, offer.catalog.images), offer, has_data=self._has_data,
                     history=self.records, check_full=False)

    def _has_data(self, source: str) -> bool:
        store = self.config.datastore
        return store is not None and (Path(store) / source).is_dir()

    def _too_long(self, actions: list[Any]) -> str | None:
        """Why running ``actions`` would take more than this plant allows a VM (its ``<limits>``), or None."""
        return too_long(actions, self.terms())

    @staticmethod
    def _unfit(info: ImageInfo, dag: Dag, caps: Capabilities) -> str | None:
        """Why ``info`` cannot serve the request ``dag`` on this backend (its ``<guest>`` traits), or None:
        :func:`vmshop_common.guest.unfit`, the rule a shop applies to this plant's offer too."""
        return unfit(info.guest, dag, caps.name, caps.kernel_limit, caps.seed_disk)

    def _unservable(self, flat: Dag) -> str | None:
        """Why this plant can never serve the (flattened) DAG, or None."""
        return unservable(flat, self.terms(), self._has_data)

    # The offer ----------------------------------------------------------------
    def terms(self) -> Terms:
        caps = self.backend.capabilities()
        config = self.config
        return Terms(backend=caps.name, available=caps.available, reason=caps.reason,
                     architectures=tuple(caps.architectures), max_memory=caps.max_memory or 0,
                     max_vcpus=caps.max_vcpus or 0, max_disk=config.max_disk,
                     capacity_memory=config.capacity_memory, capacity_vms=config.capacity_vms,
                     max_creates=config.max_creates, max_action_seconds=config.max_action_seconds,
                     max_dag_seconds=config.max_dag_seconds, network=self.pool is not None,
                     datastore=config.datastore is not None, kernel_limit=caps.kernel_limit,
                     seed_disk=caps.seed_disk)

    def catalog(self, owner: str | None = None) -> Catalog:
        """The images ``owner`` may use (:meth:`~.warehouse.Warehouse.visible`) as an offer's catalog, kept while
        those images are the same. ``None``: every image, each private one with its owner (what the offer holds:
        a shop prices a request of an owner against :meth:`Catalog.for_owner`)."""
        images = self.warehouse.images if owner is None else self.warehouse.visible(owner)
        remote = self._fetchable(images, owner)
        key = (tuple((name, id(info)) for name, info in sorted(images.items())),
               tuple((name, id(image)) for name, (image, _) in sorted(remote.items())))
        cached = self._catalogs.get(owner)
        if cached is not None and cached[0] == key:
            return cached[1]
        every = {**{name: image.cached_image() for name, (image, _) in remote.items()},
                 **{name: info.cached_image() for name, info in images.items()}}
        cached_images = tuple(image for _, image in sorted(every.items()))
        owners = {name: image.owner for name, (image, _) in remote.items() if image.owner}
        owners.update({name: info.owner for name, info in images.items() if not info.public and info.owner})
        digest = catalog_digest(((image.name, dag_to_xml(image.dag), image.hardware) for image in cached_images),
                                owners)
        catalog = Catalog(cached_images, digest, owners)
        if owner not in self._catalogs and len(self._catalogs) >= CATALOGS_KEPT:
            self._catalogs.pop(next(iter(self._catalogs)))
        self._catalogs[owner] = (key, catalog)
        return catalog

    def _fetchable(self, images: dict[str, ImageInfo], owner: str | None) -> dict[str, Any]:
        """The images peers hold that ``images`` lacks and this plant could fetch for ``owner``'s requests (None:
        for any owner's, each private one for its own owner only) as name -> (RemoteImage, seconds); none without
        peers."""
        if self.transfers is None:
            return {}
        return self.transfers.offerable(images, owner)

    def attach_peers(self, transfers: Transfers) -> None:
        """Fetch the images this plant lacks from ``transfers``' peers (see :mod:`.transfer`)."""
        self.transfers = transfers
        self._catalogs.clear()

    def _datasets(self) -> frozenset[str]:
        store = self.config.datastore
        if store is None:
            return frozenset()
        try:
            return frozenset(sorted(entry.name for entry in Path(store).iterdir() if entry.is_dir())[:1024])
        except OSError:
            return frozenset()

    def _snapshot(self, steps: dict[str, float], plant_url: str = "", besides_shop: str = "",
                  owner: str | None = None) -> Offer:
        """This plant's live state as an (unversioned) offer, with ``steps`` for its step costs; ``besides_shop``:
        the creates in progress that this shop asked for are left out of its ``creating``; its catalog:
        :meth:`catalog` of ``owner``."""
        metric = self.records.metric
        with self._lock:
            live_vms = self.records.live_vms()
            live = len({r.vm_id for r in live_vms} | set(self._reserved))
            creating = len(self._reserved)
            if besides_shop:
                creating -= sum(shop == besides_shop for shop in self._reserved_shops.values())
            used = sum(r.memory for r in live_vms if r.vm_id not in self._reserved) + sum(self._reserved.values())
        infos = self.warehouse.images if owner is None else self.warehouse.visible(owner)
        remote = self._fetchable(infos, owner)
        booted = self._booted({name: info.parent for name, info in infos.items()}
                              | {name: image.parent for name, (image, _) in remote.items()},
                              [name for name, info in infos.items() if info.state is not None])
        guests = {name: info.guest for name, info in infos.items() if info.guest != GuestTraits()}
        guests.update({name: image.guest for name, (image, _) in remote.items() if image.guest != GuestTraits()})
        return Offer(plant=plant_url or self.config.name, version=0, issued=self.clock(), catalog=self.catalog(owner),
                     terms=self.terms(), steps=steps, clone_seconds=metric("clone_seconds") or 0.05,
                     boot_seconds=metric("boot_seconds") or 5.0, live=live, creating=creating,
                     free_memory=self.config.capacity_memory - used, datasets=self._datasets(),
                     image_boot_seconds=booted, guests=guests,
                     transfer_seconds={name: seconds for name, (_, seconds) in remote.items()})

    def _booted(self, parents: dict[str, str | None], stateful: Iterable[str] = ()) -> dict[str, float]:
        """Each image's measured boot seconds (``parents``: each image's parent); an image not booted here yet
        boots as the image it was published from (its nearest booted ancestor). An image with a saved state
        (``stateful``), on a backend that resumes, costs its measured resume seconds instead (the figure the offer
        carries as that image's boot seconds)."""
        metric = self.records.metric
        booted = {name: seconds for name in parents if (seconds := metric(f"boot_seconds:{name}")) is not None}
        for name in parents:
            parent = parents[name]
            for _ in range(len(parents)):
                if name in booted or parent is None or parent not in parents:
                    break
                if parent in booted:
                    booted[name] = booted[parent]
                parent = parents[parent]
        stateful = list(stateful)
        if stateful and self.backend.capabilities().resume:
            # An image with a saved state resumes here instead of booting: bid with its measured resume seconds,
            # else this plant's for any image, else a share of its boot.
            resumed = metric("resume_seconds")
            boot = metric("boot_seconds") or 5.0
            for name in stateful:
                seconds = metric(f"resume_seconds:{name}")
                booted[name] = (seconds if seconds is not None else resumed if resumed is not None
                                else round(RESUME_GUESS * booted.get(name, boot), 6))
        return booted

    def offer(self, plant_url: str = "") -> Offer:
        """This plant's offer now: what its bids depend on (blocking: reads the records). Its version grows
        whenever its content changes, and only then."""
        offer = self._snapshot(self.records.step_costs(), plant_url)
        live, creating = offer.live, offer.creating
        content = (offer.catalog.digest, offer.terms, tuple(sorted(offer.steps.items())), offer.clone_seconds,
                   offer.boot_seconds, tuple(sorted(offer.image_boot_seconds.items())),
                   tuple(sorted(offer.guests.items())), tuple(sorted(offer.transfer_seconds.items())), live, creating,
                   offer.free_memory, offer.datasets)
        with self._lock:
            if content != self._offer_content:
                self._offer_content = content
                self._offer_version = max(self._offer_version + 1, int(self.clock() * 1000))
            offer.version = self._offer_version
        return offer

    # Create -----------------------------------------------------------------
    def create(self, dag_xml: str, owner: str = "", vm_id: str | None = None, shop: str = "",
               max_cost: float | None = None) -> CreateResult:
        """Make the VM the DAG describes; returns when it is configured (see the module's guarantees).

        ``shop`` is the identity (certificate subject) of the shop that asks:
        only it may later tell the plant the VM is unwanted. ``max_cost``: the
        most the shop accepts (it chose this plant by its offer, plus its
        margin); the plant re-prices with its live state and declines
        (OfferExceededError) when its cost is higher. That check leaves out the
        load of the asking shop's own creates in progress here: the shop counts
        them itself (each create it prices counts those in flight before it),
        but they reach this plant in any order (the shop's registry writes,
        its connections and this plant's threads overlap), so the first one it
        priced may find the later ones here already. What the check catches is
        what the shop could not know: this plant's costs, or other callers'
        creates, grown behind its offer. (Shops that share one identity count
        as one shop here.)
        """
        dag = load_dag(dag_xml)
        check_static_addresses(dag, None)
        estimate = self.estimate_dag(dag, owner)
        if isinstance(estimate, Decline):
            if estimate.reason.startswith("no cached image is named"):
                raise NoSuchImageError(estimate.reason)
            raise DeclinedError(f"this plant cannot make the VM: {estimate.reason}")
        if max_cost is not None and estimate.cost > max_cost:
            checked = self.estimate_dag(dag, owner, besides_shop=shop) if shop else estimate
            cost = checked.cost if isinstance(checked, Bid) else estimate.cost
            if cost > max_cost:
                raise OfferExceededError(f"this plant's cost for the VM is now {cost:g} s, more than the "
                                         f"{max_cost:g} s the shop accepts from its offer")
        pinned: list[str] = []
        if self.transfers is not None:
            pinned = self.transfers.pin(self.transfers.lineage(estimate.image))
        try:
            if estimate.image not in self.warehouse.images and self.transfers is not None:
                self.transfers.ensure(estimate.image, owner)  # fetched, with its lineage, once (TransferFailedError)
            elif self.transfers is not None:
                self.transfers.touch(estimate.image)
            return self._create(dag, estimate, owner, vm_id, shop)
        finally:
            if self.transfers is not None:
                self.transfers.unpin(pinned)

    def _create(self, dag: Dag, estimate: Bid, owner: str, vm_id: str | None, shop: str) -> CreateResult:
        visible = self.warehouse.visible(owner)
        info = visible[estimate.image]
        flat = flatten(dag, {name: image.dag for name, image in visible.items()})
        hardware = flat.start.hardware  # type: ignore[union-attr]
        vm_id = vm_id or uuid.uuid4().hex[:12]
        if not VM_ID.match(vm_id):
            raise DeclinedError(f"'{vm_id}' is not a valid VM id", [Problem("bad VM id", None, None)])
        self._reserve(vm_id, hardware.memory, owner, shop, info.name)
        paths = self._paths(vm_id)
        try:
            return self._build(vm_id, dag, flat, estimate, info, owner, paths, shop)
        except BaseException as exc:
            console = console_tail(paths["run"] / "console.log", 4000)
            cancelled = vm_id in self._cancelled
            self._reclaim(vm_id, paths, forget=not cancelled)
            if cancelled:
                self._mark_collected(vm_id, "collected while it was being created")
                raise ActionFailedError(f"the create of VM {vm_id} was cancelled: it was collected meanwhile") \
                    from None
            if isinstance(exc, BackendError) and console:
                log.warning("create %s failed (%s); the guest's console ended with:\n%s", vm_id, exc, console)
                last = console.splitlines()[-1][-200:] if console else ""
                raise BackendError(f"{exc} (its console's last line: {last})" if last else str(exc)) from exc
            if isinstance(exc, VMShopError):
                raise
            log.exception("create %s failed", vm_id)
            raise ActionFailedError(f"creating VM {vm_id} failed: {exc}") from exc
        finally:
            with self._lock:
                self._reserved.pop(vm_id, None)
                self._reserved_owners.pop(vm_id, None)
                self._reserved_shops.pop(vm_id, None)
                self._reserved_images.pop(vm_id, None)
                self._cancelled.discard(vm_id)
            self.release_segments()

    def _mark_collected(self, vm_id: str, why: str) -> None:
        try:
            self.records.update_vm(vm_id, state="collected", collected=self.clock(), error=why)
        except NoSuchVMError:
            pass  # cancelled before its record was written: nothing to show

    def _go_on(self, vm_id: str) -> None:
        """A create's checkpoint: raise CreateCancelled once a collect cancelled it."""
        if vm_id in self._cancelled:
            raise CreateCancelled(vm_id)

    def _reserve(self, vm_id: str, memory: int, owner: str, shop: str = "", image: str = "") -> None:
        with self._lock:
            # A VM being created is both reserved and (once recorded) live: count it once.
            live = [r for r in self.records.live_vms() if r.vm_id not in self._reserved]
            if vm_id in self._reserved or any(r.vm_id == vm_id for r in live):
                raise DeclinedError(f"a VM with id '{vm_id}' exists already")
            try:
                self.records.get_vm(vm_id)
                raise DeclinedError(f"the id '{vm_id}' was used before")
            except NoSuchVMError:
                pass
            count = len(live) + len(self._reserved)
            used = sum(r.memory for r in live) + sum(self._reserved.values())
            if count >= self.config.capacity_vms:
                raise CapacityExhaustedError(f"this plant runs {count} VMs, its limit")
            if len(self._reserved) >= self.config.max_creates:
                raise CapacityExhaustedError(f"this plant is busy: it is making {len(self._reserved)} VMs at once, "
                                             "its limit")
            if used + memory > self.config.capacity_memory:
                raise CapacityExhaustedError(
                    f"{memory} MiB asked, {self.config.capacity_memory - used} MiB of guest memory free")
            if image and image not in self.warehouse.images:
                raise NoSuchImageError(f"image '{image}' was unpublished meanwhile")
            self._reserved[vm_id] = memory
            self._reserved_owners[vm_id] = owner
            self._reserved_shops[vm_id] = shop
            self._reserved_images[vm_id] = image

    def _guest_gone(self, vm_id: str) -> bool:
        """True only when the backend is sure the guest has stopped or crashed.

        UNKNOWN (e.g. a control socket that did not answer in time on a busy
        host) is not gone: callers wait on with their own deadline.
        """
        return self.backend.state(vm_id) in (VMState.STOPPED, VMState.CRASHED)

    def _paths(self, vm_id: str) -> dict[str, Path]:
        return {"overlay": self.state_dir / "overlays" / f"{vm_id}.qcow2",
                "run": self.state_dir / "run" / vm_id,
                "seed": self.state_dir / "seeds" / f"{vm_id}.iso"}

    def _build(self, vm_id: str, dag: Dag, flat: Dag, bid: Bid, info: ImageInfo, owner: str,
               paths: dict[str, Path], shop: str) -> CreateResult:
        hardware = flat.start.hardware  # type: ignore[union-attr]
        address = None
        if self.pool is not None:
            address = self.pool.checkout(vm_id, segment_name(owner)).address
        clone_seconds = make_overlay(info.disk, info.disk_format, paths["overlay"],
                                     hardware.disk if hardware.disk > info.hardware.disk else None)
        self._remember("clone_seconds", clone_seconds)
        spec = self._spec(vm_id, info, hardware.memory, hardware.vcpus, paths, owner)
        if spec.seed is not None:
            self._write_seed(spec, dag, flat, address)
        now = self.clock()
        record = VMRecord(vm_id=vm_id, owner=owner, state="booting", image=info.name, memory=hardware.memory,
                          vcpus=hardware.vcpus, disk=hardware.disk, arch=hardware.arch, address=address,
                          overlay=str(paths["overlay"]), run_dir=str(paths["run"]),
                          created=now, updated=now, collected=None, error=None, dag_xml=dag_to_xml(dag),
                          host_port=_user_port(spec), mac=_segment_mac(spec), attributes=dict(dag.attributes),
                          made=False, shop=shop)
        self.records.add_vm(record)
        self._go_on(vm_id)
        started = time.monotonic()
        resumed = self._resumable(info, spec, hardware) and self._restore(spec, info, paths, hardware)
        if not resumed:
            self.backend.start(spec)
        self._go_on(vm_id)
        channel = self._channel(vm_id)
        going = lambda: not self._guest_gone(vm_id) and vm_id not in self._cancelled  # noqa: E731
        try:
            channel.wait_agent(RESTORE_TIMEOUT if resumed else BOOT_TIMEOUT, alive=going)
        except BackendError:
            if going():  # the guest runs and its agent never answered (not a guest that stopped or a collect)
                self._agent_error("no_answer")
            raise
        if resumed:
            self._go_on(vm_id)
            self._reset_identity(vm_id, channel, spec, info, flat, address, going)
            seconds = time.monotonic() - started
            self._remember("resume_seconds", seconds)
            self._remember(f"resume_seconds:{info.name}", seconds)
            log.info("VM %s resumed from image %s's saved state in %.2f s", vm_id, info.name, seconds)
        else:
            if info.guest.cloud_init:
                self._go_on(vm_id)
                source = channel.wait_cloud_init(CLOUD_INIT_TIMEOUT, alive=going)
                log.info("VM %s: cloud-init finished its first boot (%s)", vm_id, source)
            booted = time.monotonic() - started
            self._remember("boot_seconds", booted)
            self._remember(f"boot_seconds:{info.name}", booted)
        self._go_on(vm_id)
        self.records.update_vm(vm_id, state="configuring")
        results = self._run_actions(vm_id, flat, list(bid.remaining), channel, record, going)
        with self._lock:  # either the create ends here, or a collect cancelled it before: never both
            self._go_on(vm_id)
            self.records.update_vm(vm_id, state="running", made=True)
        return CreateResult(self.records.get_vm(vm_id), bid, tuple(results))

    def _resumable(self, info: ImageInfo, spec: GuestSpec, hardware: Any) -> bool:
        """Whether a clone of ``info`` (run as ``spec``, with the request's ``hardware``) resumes from the image's
        saved state: it has one, the backend can resume, and the clone's machine is the saved one (its memory,
        vCPUs and disk size, and the backend's machine model). Otherwise it boots from the image's disk."""
        if info.state is None or not self.backend.capabilities().resume:
            return False
        if (hardware.memory, hardware.vcpus, hardware.disk) != (info.hardware.memory, info.hardware.vcpus,
                                                                info.hardware.disk):
            log.info("VM %s boots: its hardware differs from image %s's saved machine", spec.vm_id, info.name)
            return False
        try:
            model = self.backend.machine_model(spec)
        except VMShopError as exc:
            log.warning("VM %s boots: no machine model for it (%s)", spec.vm_id, exc)
            return False
        if model != info.state_model:
            log.info("VM %s boots: its machine (%s) is not image %s's saved one (%s)", spec.vm_id, model, info.name,
                     info.state_model)
            return False
        return True

    def _restore(self, spec: GuestSpec, info: ImageInfo, paths: dict[str, Path], hardware: Any) -> bool:
        """Start ``spec`` from ``info``'s saved state (the plant opens the file and hands the backend its
        descriptor: the hypervisor never gets a path). False when that failed: the backend then left nothing
        running, and the clone boots instead from a fresh overlay (a restore never let the guest write)."""
        assert info.state is not None
        try:
            fd = os.open(info.state, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            log.warning("VM %s boots: image %s's saved state cannot be opened: %s", spec.vm_id, info.name, exc)
            return False
        try:
            self.backend.restore(spec, fd, RESTORE_TIMEOUT)
            return True
        except BackendError as exc:
            log.warning("VM %s boots: restoring image %s's saved state failed: %s", spec.vm_id, info.name, exc)
        finally:
            os.close(fd)
        paths["overlay"].unlink(missing_ok=True)
        make_overlay(info.disk, info.disk_format, paths["overlay"],
                     hardware.disk if hardware.disk > info.hardware.disk else None)
        return False

    def _reset_identity(self, vm_id: str, channel: Channel, spec: GuestSpec, info: ImageInfo, flat: Dag,
                        address: str | None, going: Callable[[], bool]) -> None:
        """Give a clone resumed from a saved state its own identity, through its agent, before any action runs:
        thaw its file systems (frozen when the state was saved), write :data:`ENTROPY_BYTES` random bytes of the
        host's into its /dev/urandom, set its clock, give each NIC its own MAC (the saved guest's are in the state)
        and the segment NIC its pool address (under systemd-networkd, through its files, which follow the new MACs:
        :data:`IDENTITY_PROGRAM`), and set its host name. Every value comes from the plant, never from
        the guest; what the guest answers is bounded (the agent client) and the whole reset has a deadline
        (:data:`IDENTITY_TIMEOUT`). ActionFailedError when the guest does not comply."""
        agent = channel.agent
        deadline = time.monotonic() + IDENTITY_TIMEOUT

        def left() -> float:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ActionFailedError(f"VM {vm_id}: its identity was not reset within {IDENTITY_TIMEOUT:g} s")
            return remaining

        try:
            agent.fsfreeze_thaw(min(left(), 30.0))
            agent.write_file("/dev/urandom", os.urandom(ENTROPY_BYTES), timeout=min(left(), 30.0))
            agent.set_time(time.time_ns(), min(left(), 30.0))
        except AgentError as exc:
            if not going():
                raise BackendError(f"VM {vm_id}'s guest stopped while its identity was reset") from None
            raise ActionFailedError(f"VM {vm_id}: its agent did not reset its identity: {exc}") from None
        names = [node.hostname for node_id in flat.topological_order()
                 if isinstance(node := flat.nodes[node_id], NetworkAction) and node.hostname]
        hostname = names[0] if names else hostname_for(vm_id)
        pairs = [f"{old}={nic.mac}" for old, nic in zip(info.state_macs, spec.nics, strict=False)]
        segment = _segment_mac(spec) if address is not None else None
        prefix = self.pool.prefix if self.pool is not None else 24
        args = ["-c", IDENTITY_PROGRAM, "vmshop-identity", hostname, segment or "",
                f"{address}/{prefix}" if segment else "", *pairs]
        try:
            status, _ = agent.run("/bin/sh", args, None, deadline, 4096, going, 0.5)
        except AgentError as exc:
            if not going():
                raise BackendError(f"VM {vm_id}'s guest stopped while its identity was reset") from None
            raise ActionFailedError(f"VM {vm_id}: its agent did not reset its identity: {exc}") from None
        if status.exitcode != 0:
            words = status.output[:400].decode("utf-8", "replace").strip()
            raise ActionFailedError(f"VM {vm_id}: resetting its identity failed (status {status.exitcode}): {words}")
        log.info("VM %s: identity reset (host name %s, %d MAC(s)%s)", vm_id, hostname, len(pairs),
                 f", address {address}" if segment else "")

    def _spec(self, vm_id: str, info: ImageInfo, memory: int, vcpus: int, paths: dict[str, Path],
              owner: str) -> GuestSpec:
        nics = [Nic("user", mac_for(vm_id, 0), host_port=free_port())]
        if self.segments is not None:
            # The owner's own switch: their VMs reach each other, no one else's.
            nics.append(Nic("segment", mac_for(vm_id, 1), switch=str(self.segments.start(owner).control)))
        return self._guest_spec(vm_id, info, memory, vcpus, paths, tuple(nics))

    def _guest_spec(self, vm_id: str, info: ImageInfo, memory: int, vcpus: int, paths: dict[str, Path],
                    nics: tuple[Nic, ...]) -> GuestSpec:
        datastore = Path(self.config.datastore) if self.config.datastore else None
        return GuestSpec(vm_id=vm_id, disk=paths["overlay"], memory=memory, vcpus=vcpus, run_dir=paths["run"],
                         kernel=info.kernel, initrd=info.initrd, cmdline=info.cmdline,
                         machine=info.machine, arch=info.hardware.arch, data_dir=datastore, nics=nics,
                         seed=paths["seed"] if info.guest.cloud_init else None)

    def clone_model(self, info: ImageInfo) -> str | None:
        """The backend's machine model of a clone of ``info`` made here with the image's own hardware (what a saved
        state must have been saved for to be restored: :meth:`_resumable`), or None when this backend cannot
        resume. Starts nothing (no switch, no port): the model depends on the NICs' kinds only."""
        if not self.backend.capabilities().resume:
            return None
        vm_id = "model"
        nics = [Nic("user", mac_for(vm_id, 0))]
        if self.segments is not None:
            nics.append(Nic("segment", mac_for(vm_id, 1), switch=""))
        return self.backend.machine_model(self._guest_spec(vm_id, info, info.hardware.memory, info.hardware.vcpus,
                                                           self._paths(vm_id), tuple(nics)))

    def _write_seed(self, spec: GuestSpec, dag: Dag, flat: Dag, address: str | None) -> None:
        """The VM's cloud-init NoCloud seed (:mod:`.seed`) at ``spec.seed``: its key, host name, NICs, user data.

        The host name is the first one a network action of the DAG names,
        else one made from the VM's key; the segment NIC gets the pool
        address (the same the network actions apply).
        """
        assert spec.seed is not None
        names = [node.hostname for node_id in flat.topological_order()
                 if isinstance(node := flat.nodes[node_id], NetworkAction) and node.hostname]
        nics = []
        for nic in spec.nics:
            if nic.kind == "user":
                nics.append(SeedNic("user0", nic.mac))
            elif nic.kind == "segment" and address is not None:
                # Without an address the segment NIC is left out: DHCP there would never be answered, and the
                # boot would wait for it (systemd-networkd-wait-online, before cloud-init's network stage).
                nics.append(SeedNic("segment0", nic.mac, address, self.pool.prefix if self.pool is not None else 24))
        write_seed(spec.seed, spec.vm_id, names[0] if names else hostname_for(spec.vm_id), nics,
                   dag.start.cloud_config)

    def _channel(self, vm_id: str) -> Channel:
        return Channel(GuestAgent(self.backend.agent(vm_id)))

    def _remember(self, metric: str, seconds: float) -> None:
        previous = self.records.metric(metric)
        value = seconds if previous is None else 0.7 * previous + 0.3 * seconds
        self.records.set_metric(metric, value)

    def _agent_error(self, reason: str) -> None:
        if self.on_agent_error is not None:
            try:
                self.on_agent_error(reason)
            except Exception:  # a metrics bug never fails a VM's work
                log.exception("the agent-error hook failed")

    def _context(self, record: VMRecord) -> ActionContext:
        return ActionContext(address=record.address, prefix=self.pool.prefix if self.pool is not None else 24,
                             segment_mac=record.mac,
                             datastore=Path(self.config.datastore) if self.config.datastore else None)

    def _run_actions(self, vm_id: str, dag: Dag, order: list[str], channel: Channel,
                     record: VMRecord, alive: Callable[[], bool] | None = None) -> list[ActionResult]:
        """Run ``order`` (action ids of ``dag``) in the guest, one by one; ActionFailedError on the first failure.

        ``alive`` (default: the guest has not stopped) is asked while an action runs; a create passes one that
        also turns False when a collect cancels it.
        """
        context = self._context(record)
        results = []
        first = len(self.records.action_runs(vm_id))
        going = alive or (lambda: not self._guest_gone(vm_id))
        for number, node_id in enumerate(order, start=first + 1):
            action = dag.nodes[node_id]
            assert isinstance(action, Action)
            started = self.clock()
            result = channel.run(f"{number:04d}-{node_id}", action, context, alive=going)
            self.records.add_action_run(vm_id=vm_id, node_id=node_id, digest=_digest(action), kind=action.kind,
                                        started=started, seconds=result.elapsed, status=result.status,
                                        output=result.output, ok=result.ok, step=step_to_xml(action))
            results.append(result)
            if result.error is not None:
                self._agent_error("timeout" if result.timed_out else "failed")
            if not result.ok:
                why = (result.error if result.error is not None
                       else f"timed out after {action.timeout} s" if result.timed_out
                       else f"exited with status {result.status}")
                raise ActionFailedError(
                    f"action '{node_id}' ({action.kind}) {why}: {result.output.strip()[-400:]}",
                    [Problem(why, action.line, node_id)])
        return results

    # Configure, describe, collect -------------------------------------------
    def configure(self, vm_id: str, dag_xml: str) -> tuple[ActionResult, ...]:
        """Run the DAG's actions on a running VM, in DAG order (its start node stands for the VM as it is)."""
        dag = load_dag(dag_xml)
        record = self.records.get_vm(vm_id)
        check_static_addresses(dag, record.address)
        for action in dag.actions:
            if isinstance(action, NetworkAction) and self.pool is None:
                raise DeclinedError(f"action '{action.id}' needs a host-only network, which this plant lacks")
        reason = self._too_long(list(dag.actions))
        if reason:
            raise DeclinedError(f"this plant will not configure VM {vm_id} so: {reason}")
        info = self.warehouse.images.get(record.image)
        mounts = [action.id for action in dag.actions if isinstance(action, MountAction)]
        if info is not None and info.guest.data_share == "none" and mounts:
            raise DeclinedError(f"action '{mounts[0]}' mounts data, and the kernel of VM {vm_id}'s image "
                                f"'{info.name}' cannot mount the data share (its <guest data-share='none'>)")
        order = [n for n in dag.topological_order() if isinstance(dag.nodes[n], Action)]
        with self._lock:
            record = self.records.get_vm(vm_id)
            if vm_id in self._publishing:
                raise VMBusyError(f"VM {vm_id} is being published; configure it once that is done")
            if record.state != "running":
                raise NotSupportedError(f"VM {vm_id} is {record.state}; only a running VM can be configured")
            self.records.update_vm(vm_id, state="configuring")
        try:
            results = self._run_actions(vm_id, dag, order, self._channel(vm_id), record)
        finally:
            alive = not self._guest_gone(vm_id)
            if not alive:  # reclaimed before it is marked failed (safe to repeat, as a collect may too)
                self._reclaim(vm_id, self._paths(vm_id), forget=False)
            with self._lock:
                # A collect that ran meanwhile decides the VM's state.
                if self.records.get_vm(vm_id).state == "configuring":
                    self.records.update_vm(vm_id, state="running" if alive else "failed",
                                           **({} if alive else {"error": "the guest stopped while being configured"}))
        return tuple(results)

    def describe(self, vm_id: str) -> VMRecord:
        return self.records.get_vm(vm_id)

    def list_vms(self, include_collected: bool = False) -> list[VMRecord]:
        return self.records.list_vms(include_collected=include_collected)

    def collect(self, vm_id: str) -> VMRecord:
        """Stop the VM, delete its clone, release its address; the record stays. Collecting twice is fine.

        A VM still being created is cancelled: its create stops at its next
        step and reclaims everything; this waits (at most CANCEL_WAIT s) and
        answers the VM collected. NoSuchVMError if the create was cancelled
        before it wrote the VM's record (nothing of it is left).
        """
        with self._lock:
            creating = vm_id in self._reserved
            if creating:
                self._cancelled.add(vm_id)
        if creating:
            log.info("VM %s is collected while it is being created: its create is cancelled", vm_id)
            deadline = time.monotonic() + CANCEL_WAIT
            while True:
                with self._lock:
                    if vm_id not in self._reserved:
                        break
                if time.monotonic() > deadline:
                    raise BackendError(f"the create of VM {vm_id} did not stop within {CANCEL_WAIT:g} s; "
                                       "it will be collected when it does")
                time.sleep(0.05)
        record = self.records.get_vm(vm_id)
        if record.state == "failed":
            self._reclaim(vm_id, self._paths(vm_id), forget=False)  # safe to repeat
        if record.state in ("collected", "failed"):
            return record
        with self._lock:
            if vm_id in self._reserved:  # a new create under this id began meanwhile
                raise NotSupportedError(f"VM {vm_id} is being created again; collect it once more")
            self.records.update_vm(vm_id, state="collecting")
        try:
            self.backend.stop(vm_id, STOP_TIMEOUT)
        finally:
            self._reclaim(vm_id, self._paths(vm_id), forget=False)
            self.records.update_vm(vm_id, state="collected", collected=self.clock())
            self.release_segments()
        return self.records.get_vm(vm_id)

    def check_guests(self) -> list[str]:
        """Find running VMs whose guest stopped or crashed on its own; mark them failed and reclaim them.

        Only VMs in state 'running' are looked at (a create, configure or
        collect in progress watches its own guest). Returns the ids of the
        VMs it marked failed. Never raises for one VM's trouble.
        """
        ended = []
        for record in self.records.live_vms():
            if record.state != "running":
                continue
            try:
                state = self.backend.state(record.vm_id)
            except Exception:  # noqa: BLE001 - one VM's trouble must not stop the watch
                log.exception("watch: the state of VM %s is unknown", record.vm_id)
                continue
            if state not in (VMState.STOPPED, VMState.CRASHED):
                continue
            why = "the guest crashed" if state == VMState.CRASHED else "the guest stopped on its own"
            # Reclaim first, so that 'failed' is only ever seen holding nothing (reclaiming is safe to
            # repeat: a configure or collect that began meanwhile may reclaim too, and then it decides).
            self._reclaim(record.vm_id, self._paths(record.vm_id), forget=False)
            with self._lock:
                if self.records.get_vm(record.vm_id).state != "running":
                    continue
                self.records.update_vm(record.vm_id, state="failed", error=why)
            log.warning("VM %s: %s; reclaimed and marked failed", record.vm_id, why)
            ended.append(record.vm_id)
        self.release_segments()
        return ended

    def release_segments(self) -> list[str]:
        """Stop the segments (switches) of owners with no VM here any more; their names. Never raises.

        Taken under the plant's lock, so a create that reserved its VM (and
        so its owner's segment) before is never left without its switch.
        """
        if self.segments is None:
            return []
        try:
            with self._lock:
                owners = {r.owner for r in self.records.live_vms()} | set(self._reserved_owners.values())
                return self.segments.release(owners)
        except Exception:  # noqa: BLE001 - a switch that will not stop is logged, not fatal
            log.exception("releasing unused segments failed")
            return []

    def _reclaim(self, vm_id: str, paths: dict[str, Path], forget: bool) -> None:
        """Free everything ``vm_id`` holds; with ``forget`` also its records. Never raises."""
        steps: list[tuple[str, Callable[[], object]]] = [
            ("destroy", lambda: self.backend.destroy(vm_id)),
            ("overlay", lambda: paths["overlay"].unlink(missing_ok=True)),
            ("seed", lambda: paths["seed"].unlink(missing_ok=True)),
            ("run dir", lambda: shutil.rmtree(paths["run"], ignore_errors=True)),
        ]
        if self.pool is not None:
            pool = self.pool
            steps.append(("address", lambda: pool.release(vm_id)))
        if forget:
            steps.append(("record", lambda: self.records.delete_vm(vm_id)))
        for label, step in steps:
            try:
                step()
            except Exception:  # noqa: BLE001 - reclaiming goes on whatever one step does
                log.exception("reclaiming %s of VM %s failed", label, vm_id)

    # Publish, unpublish ---------------------------------------------------------
    def publish(self, vm_id: str, name: str, owner: str = "", public: bool = False,
                with_state: bool = False) -> PublishedImage:
        """Make VM ``vm_id``'s disk the new cached image ``name`` (:mod:`.publish`), owned by the VM's owner.

        ``owner`` (when given: the shop passes the caller's VM owner) must be
        the VM's, else NoSuchVMError exactly as for a VM that does not exist.
        Faults, each leaving everything as it was: ImageNameInvalidError,
        NoSuchVMError, VMBusyError (its create, a configure, a collect or
        another publish runs), NotSupportedError (a VM that is not running,
        or that cannot be published, or a backend that cannot pause),
        ImageExistsError, DiskFullError. A public image needs a public base.
        The VM runs on afterwards (paused for the copy only).

        ``with_state``: the image also carries the guest's running state,
        saved in the same pause (backend rule 12), so its clones resume
        instead of booting; NotSupportedError from a backend that cannot
        save one.
        """
        name = check_image_name(name)
        caps = self.backend.capabilities()
        if not caps.publish:
            raise NotSupportedError(f"backend {caps.name} cannot publish VMs: it cannot pause a guest with its disk "
                                    "flushed")
        if with_state and not caps.resume:
            raise NotSupportedError(f"backend {caps.name} cannot save a guest's running state: publish without "
                                    "with_state")
        with self._lock:
            record = self.records.get_vm(vm_id)
            if owner and record.owner != owner:
                raise NoSuchVMError(f"no VM has the id '{vm_id}'")
            if vm_id in self._publishing or record.state in BUSY_STATES or vm_id in self._reserved:
                raise VMBusyError(f"VM {vm_id} is {'being published' if vm_id in self._publishing else record.state};"
                                  " publish it once that is done")
            if record.state != "running":
                raise NotSupportedError(f"VM {vm_id} is {record.state}; only a running VM can be published")
            if name in self.warehouse.images or name in self._publishing.values():
                raise ImageExistsError(f"this plant's warehouse has an image named '{name}' already")
            self._publishing[vm_id] = name
        try:
            base = self.warehouse.images.get(record.image)
            if base is None:
                raise NoSuchImageError(f"VM {vm_id}'s image '{record.image}' is no longer in this plant's warehouse")
            if public and not self.warehouse.visible("").get(base.name):
                raise NotSupportedError(f"VM {vm_id}'s image '{base.name}' is private: an image made from it cannot "
                                        "be public")
            steps = published_steps(self.records.action_runs(vm_id), vm_id)
            save_state = None
            if with_state:
                spec = self._spec(vm_id, base, record.memory, record.vcpus, self._paths(vm_id), record.owner)
                saved = SavedState(self.backend.machine_model(spec), tuple(nic.mac for nic in spec.nics))

                def save_state(fd: int) -> SavedState:
                    self.backend.save_state(vm_id, fd, SAVE_TIMEOUT)
                    return saved

            return self.publisher.make(name, record.owner, public, base, Path(record.overlay), steps, record.memory,
                                       record.vcpus, record.disk,
                                       lambda work: quiesced(self.backend, vm_id, self.state_dir / "publishing", work),
                                       save_state)
        finally:
            with self._lock:
                self._publishing.pop(vm_id, None)

    def unpublish(self, name: str, owner: str = "") -> str:
        """Remove the published image ``name`` (its index entry, then its files); returns its name.

        ``owner`` (when given) must be the image's owner, else NoSuchImageError
        exactly as for an image that does not exist (another owner's private
        image does not exist to this caller). ImageInUseError while a live VM
        was cloned from it or another image starts from it;
        NotSupportedError for an installer's image.
        """
        name = check_image_name(name)
        with self._lock:
            info = self.warehouse.images.get(name)
            if info is None or (owner and info.owner != owner):
                raise NoSuchImageError(f"the warehouse has no image named '{name}'")
            if info.owner is None:
                raise NotSupportedError(f"image '{name}' is the installer's, not a published one: it is removed by "
                                        "hand (from index.txt)")
            users = sorted({r.vm_id for r in self.records.live_vms() if r.image == name}
                           | {vm_id for vm_id, image in self._reserved_images.items() if image == name})
            children = sorted(n for n, i in self.warehouse.images.items() if i.parent == name)
            if users or children:
                what = ([f"VM {vm}" for vm in users] + [f"image {child}" for child in children])[:5]
                raise ImageInUseError(f"image '{name}' is still the base of {', '.join(what)}: collect those VMs "
                                      "(and unpublish those images) first")
            self.publisher.remove(info)
        log.info("unpublished image %s (owner %s)", name, info.owner)
        return name

    def set_public(self, name: str, public: bool) -> PublishedImage:
        """Make the published image ``name`` public (it then serves every owner) or private again (admins ask,
        through their shop). An image whose base is private cannot be public; one that a public image starts
        from cannot be private (both would leave a public image that names a private one)."""
        name = check_image_name(name)
        with self._lock:
            info = self.warehouse.images.get(name)
            if info is None:
                raise NoSuchImageError(f"the warehouse has no image named '{name}'")
            if info.owner is None:
                raise NotSupportedError(f"image '{name}' is the installer's: it serves everyone already")
            images = self.warehouse.images
            if public and info.parent is not None and not images[info.parent].public:
                raise NotSupportedError(f"image '{name}' starts from the private image '{info.parent}': it cannot "
                                        "be public")
            children = sorted(n for n, i in images.items() if i.parent == name and i.public and i.owner is not None)
            if not public and children:
                raise NotSupportedError(f"the public image '{children[0]}' starts from image '{name}': it cannot "
                                        "be private")
            if info.public != public:
                self.publisher.set_public(info, public)
            return described(self.warehouse.get(name))

    def set_movable(self, name: str, movable: bool, owner: str = "") -> PublishedImage:
        """Let the private image ``name`` move between the site's plants (or stop it): a peer plant that fetches
        owners' movable images may then fetch it from this one, if this one serves them, for ``owner``'s requests
        only (:mod:`.transfer`). The owner agrees (or an admin: ``owner`` ''). ``owner`` (when given) must be the
        image's owner, else NoSuchImageError exactly as for an image that does not exist; NotSupportedError for
        an installer's image (public already). An image this plant published or fetched is rewritten (the shop
        asks every plant, so fetched copies follow the owner's word too)."""
        name = check_image_name(name)
        with self._lock:
            info = self.warehouse.images.get(name)
            if info is None or (owner and info.owner != owner):
                raise NoSuchImageError(f"the warehouse has no image named '{name}'")
            if info.owner is None:
                raise NotSupportedError(f"image '{name}' is the installer's: it serves everyone and moves already")
            if info.movable != movable:
                if self.transfers is not None and self.transfers.is_fetched(info):
                    set_flag(self.warehouse, info.config_path.parent, info, "movable", movable)
                else:
                    self.publisher.set_movable(info, movable)
            return described(self.warehouse.get(name))

    # Start-up -----------------------------------------------------------------
    def recover(self) -> dict[str, list[str]]:
        """Reconcile records with the guests that really run (after a plant restart; ``docs/consistency.md``).

        - A VM whose create finished (``made``) and whose guest still runs is
          re-adopted (a configure the restart cut short leaves it running);
        - a VM whose create the restart cut short is failed and reclaimed,
          never adopted: its DAG did not finish;
        - a collect the restart cut short is finished (the VM ends collected);
        - a VM whose guest is gone is failed and reclaimed.

        Returns {'adopted': [...], 'failed': [...], 'collected': [...]}.
        """
        adopted, failed, collected = [], [], []
        for record in self.records.live_vms():
            paths = self._paths(record.vm_id)
            alive = False
            info = self.warehouse.images.get(record.image)
            if info is not None:
                # Adopt every live VM, even one that will be reclaimed: only an adopted VM's process can be
                # found (and killed) by the backend.
                alive = self.backend.adopt(self._spec(record.vm_id, info, record.memory, record.vcpus, paths,
                                                      record.owner))
            if record.state == "collecting":
                self._reclaim(record.vm_id, paths, forget=False)
                self.records.update_vm(record.vm_id, state="collected", collected=self.clock())
                collected.append(record.vm_id)
            elif alive and record.made and record.state in ("running", "configuring"):
                if record.state != "running":
                    self.records.update_vm(record.vm_id, state="running")
                adopted.append(record.vm_id)
            else:
                why = ("its create was cut short by a plant restart" if not record.made
                       else f"the guest was gone when the plant restarted (it was {record.state})")
                self._reclaim(record.vm_id, paths, forget=False)
                self.records.update_vm(record.vm_id, state="failed", collected=self.clock(), error=why)
                failed.append(record.vm_id)
        if self.pool is not None:
            self.pool.reconcile(set(adopted))
        self.release_segments()
        self._finish_publishes(set(adopted))
        live = set(adopted)
        for sub, suffix in (("overlays", ".qcow2"), ("run", ""), ("seeds", ".iso")):
            for leftover in (self.state_dir / sub).iterdir():
                if leftover.name.removesuffix(suffix) not in live:
                    if leftover.is_dir():
                        shutil.rmtree(leftover, ignore_errors=True)
                    else:
                        leftover.unlink(missing_ok=True)
        return {"adopted": adopted, "failed": failed, "collected": collected}

    def _finish_publishes(self, adopted: set[str]) -> None:
        """After a restart: thaw the guests of publishes it cut short (the backend resumed them when it adopted
        them), and remove what those publishes left in the warehouse."""
        thaw_cut_short(self.backend, self.state_dir / "publishing", adopted)
        self.publisher.sweep()
        self.warehouse.sweep_index_leftovers()

    def info(self) -> dict[str, object]:
        caps = self.backend.capabilities()
        live = self.records.live_vms()
        with self._lock:
            reserved = dict(self._reserved)
        used = sum(r.memory for r in live if r.vm_id not in reserved) + sum(reserved.values())
        return {
            "name": self.config.name, "backend": caps.name, "available": caps.available,
            "accelerator": caps.accelerator, "reason": caps.reason,
            "capacity_vms": self.config.capacity_vms, "running_vms": len(live),
            "capacity_memory": self.config.capacity_memory, "free_memory": self.config.capacity_memory - used,
            "free_addresses": self.pool.free_count() if self.pool is not None else 0,
            "images": sorted(self.warehouse.visible("")), "architectures": list(caps.architectures),
            "clone_seconds": self.records.metric("clone_seconds"), "boot_seconds": self.records.metric("boot_seconds"),
            "max_memory": caps.max_memory, "max_vcpus": caps.max_vcpus, "networks": list(caps.networks),
            "channel": caps.channel, "publish": caps.publish, "resume": caps.resume,
        }


#: The guest program of an identity reset (POSIX sh, busybox and Debian alike). $1 host name, $2 the segment NIC's
#: (new) MAC or '', $3 its address/prefix or '', then OLD=NEW MAC pairs: each NIC with the saved guest's MAC OLD
#: gets the clone's own MAC NEW (virtio-net tells the device: the hypervisor's NIC then uses it too).
#: Under systemd-networkd (Debian: cloud-init's ``10-cloud-init-*.network`` match NICs by MAC) its files follow:
#: the old MACs in them become the new ones, the segment NIC gets ``05-vmshop-segment.network`` (as a network
#: action writes it: it sorts first) with the clone's address, and networkd reloads and reconfigures the NICs, so
#: that its next restart, reload or carrier change (or a reboot: cloud-init then also sees the clone's new
#: instance-id) keeps the clone's identity, never gives back the saved guest's address, nor leaves a NIC unmanaged.
IDENTITY_PROGRAM = """\
name=$1; seg=$2; addr=$3; shift 3
nd=; devs=
if [ -d /run/systemd/system ] && command -v networkctl >/dev/null 2>&1 && \\
   systemctl -q is-enabled systemd-networkd.service 2>/dev/null; then nd=1; fi
for pair in "$@"; do
  old=${pair%%=*}; new=${pair#*=}; dev=
  for n in /sys/class/net/*; do [ "$(cat "$n/address")" = "$old" ] && dev=${n##*/}; done
  [ -n "$dev" ] || { echo "no NIC with MAC $old"; exit 3; }
  # Under networkd, down and up again: the kernel then drops the IPv6 link-local address made from the old MAC
  # and makes one from the new (clones never share one), and networkd configures the NIC anew below.
  [ -z "$nd" ] || ip link set dev "$dev" down
  ip link set dev "$dev" address "$new" || { echo "$dev kept MAC $old"; exit 3; }
  [ -z "$nd" ] || ip link set dev "$dev" up || exit 3
  devs="$devs $dev"
done
sdev=
if [ -n "$seg" ] && [ -n "$addr" ]; then
  for n in /sys/class/net/*; do [ "$(cat "$n/address")" = "$seg" ] && sdev=${n##*/}; done
  [ -n "$sdev" ] || { echo "no NIC with MAC $seg"; exit 4; }
fi
if [ -n "$nd" ]; then
  for pair in "$@"; do
    old=${pair%%=*}; new=${pair#*=}
    for f in /etc/systemd/network/* /run/systemd/network/*; do
      [ -f "$f" ] && [ ! -L "$f" ] || continue
      ! grep -qi "$old" "$f" || sed -i "s/$old/$new/gI" "$f" || { echo "$f kept MAC $old"; exit 4; }
    done
  done
  if [ -n "$sdev" ]; then
    f=/etc/systemd/network/05-vmshop-segment.network
    mkdir -p /etc/systemd/network
    printf '[Match]\\nMACAddress=%s\\n\\n[Network]\\nAddress=%s\\n' "$seg" "$addr" >"$f.new" || exit 4
    mv -f "$f.new" "$f" || exit 4
    ip -4 addr flush dev "$sdev"
  fi
  # networkctl needs D-Bus, which a minimal image may lack; a restart of networkd reads the files too.
  { networkctl reload && networkctl reconfigure $devs; } >/dev/null 2>&1 || \\
    systemctl restart systemd-networkd.service || { echo "systemd-networkd did not take the new MACs"; exit 4; }
elif [ -n "$sdev" ]; then
  ip link set "$sdev" up && ip addr flush dev "$sdev" && ip addr add "$addr" dev "$sdev" || exit 4
fi
if [ -n "$sdev" ]; then
  i=0
  until ip -4 -o addr show dev "$sdev" | grep -q " ${addr%/*}/"; do
    i=$((i + 1)); [ "$i" -le 150 ] || { echo "$sdev did not get $addr"; exit 4; }; sleep 0.1
  done
fi
echo "$name" >/etc/hostname && hostname "$name" || exit 5
echo "identity: $name"
"""


def _digest(action: Action) -> str:
    from vmshop_common.steps import step_digest
    return step_digest(action)


def _user_port(spec: GuestSpec) -> int | None:
    return next((nic.host_port for nic in spec.nics if nic.kind == "user"), None)


def _segment_mac(spec: GuestSpec) -> str | None:
    return next((nic.mac for nic in spec.nics if nic.kind == "segment"), None)

