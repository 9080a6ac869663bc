"""Offers: what a plant's bid depends on, published so that a shop can price a request itself.

A plant's bid (:meth:`vmplant_service.plant.Plant.estimate_dag`) is a pure
function of the request and of a few facts about the plant: its catalog
(the cached images: names, hardware, embodied DAGs, hence their step
digests and lineage), its measured step, clone and boot seconds (each
image's own boot where measured), each image's ``<guest>`` traits, its
load, and its terms (backend capabilities, among them whether it can boot
an image's own kernel or attach a seed disk, capacity and limits), and the
images it lacks but can fetch from a peer, each with the seconds that
fetch takes (``transfer_seconds``; the catalog lists them): an image
the plant cannot run for a request (:func:`vmshop_common.guest.unfit`) is
passed over, by the plant and the shop alike. An
:class:`Offer` is those facts, versioned. :func:`price` is the bid, and the
plant prices with it too (its live state as an offer), so a shop pricing
against an offer gets what the plant would have said then.

Matching depends only on the catalog: :class:`Pricing` matches a request
once per distinct catalog (by digest), however many plants publish it.

A catalog names each private (published, not public) image's owner: a
request is priced against :meth:`Catalog.for_owner`, the public images and
its owner's own, closed under lineage, so no bid and no decline ever names
another owner's private image (the rule of
:meth:`vmplant_service.warehouse.Warehouse.visible`).

An offer is hostile input until :func:`offer_from_wire` accepted it:
bounded counts and sizes, finite non-negative figures, every image DAG
loaded by the hardened DAG loader, the catalog's digest computed here (never
taken from the sender). A refused offer raises
:class:`~vmshop_common.errors.OfferInvalidError`; the caller keeps the
offer it held.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from .cost import Bid, CostModel, Decline, Matched, match_request, pass_over
from .dag import Action, Dag, Hardware, ImageStart, MountAction, NetworkAction
from .errors import NoSuchImageError, OfferInvalidError, VMShopError
from .guest import AGENTS, CONTEXTUALIZATIONS, DATA_SHARES, KERNELS, GuestTraits, unfit
from .matching import CachedImage, flatten

#: Bounds on what an offer may carry.
MAX_IMAGES = 512
MAX_STEPS = 4096
MAX_DATASETS = 1024
MAX_IMAGE_DAG_CHARS = 256 * 1024
MAX_SECONDS = 10_000_000.0
MAX_COUNT = 10_000_000
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
DIGEST = re.compile(r"^[0-9a-f]{64}$")
DATASET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
#: Owners' views of one catalog (:meth:`Catalog.for_owner`) kept.
MAX_VIEWS = 1024


@dataclass(frozen=True)
class Terms:
    """What a plant allows and its backend can do (the facts of a bid that are not costs)."""

    backend: str
    available: bool = True
    reason: str = ""
    architectures: tuple[str, ...] = ("x86_64",)
    max_memory: int = 0  # the backend's bound on one guest (MiB; 0: none)
    max_vcpus: int = 0
    max_disk: int = 0  # GiB a VM may have on this plant
    capacity_memory: int = 0  # MiB for guests in all
    capacity_vms: int = 0
    max_creates: int = 0  # creates at once
    max_action_seconds: float = 0.0
    max_dag_seconds: float = 0.0
    network: bool = False  # has a host-only network (network actions)
    datastore: bool = False  # has a data store (mount actions)
    kernel_limit: str = ""  # why the backend cannot boot an image's own kernel ('' if it can)
    seed_disk: bool = True  # the backend attaches a cloud-init seed disk


def unservable(flat: Dag, terms: Terms, has_data: Callable[[str], bool]) -> str | None:
    """Why a plant with ``terms`` can never serve the (flattened) DAG, or None. ``has_data(source)``: whether the
    plant's data store holds ``source``."""
    hardware = flat.start.hardware  # type: ignore[union-attr]
    if not terms.available:
        return f"backend {terms.backend} is not available here: {terms.reason}"
    if hardware.arch not in terms.architectures:
        return f"backend {terms.backend} runs {', '.join(terms.architectures)}, not {hardware.arch}"
    if hardware.disk > terms.max_disk:
        return f"a {hardware.disk} GiB disk is more than this plant gives a VM ({terms.max_disk} GiB)"
    if hardware.memory > terms.capacity_memory:
        return f"{hardware.memory} MiB is more than this plant's {terms.capacity_memory} MiB for guests"
    if terms.max_memory and hardware.memory > terms.max_memory:
        return f"{hardware.memory} MiB is more than backend {terms.backend} allows ({terms.max_memory} MiB)"
    if terms.max_vcpus and hardware.vcpus > terms.max_vcpus:
        return f"{hardware.vcpus} vCPUs is more than backend {terms.backend} allows ({terms.max_vcpus})"
    for action in flat.actions:
        if isinstance(action, NetworkAction) and not terms.network:
            return f"action '{action.id}' needs a host-only network, which this plant does not have"
        if isinstance(action, MountAction):
            if not terms.datastore:
                return f"action '{action.id}' mounts data, and this plant has no data store"
            if not has_data(action.source):
                return f"action '{action.id}' mounts '{action.source}', which this plant's data store lacks"
    return None


def too_long(actions: Iterable[Any], terms: Terms) -> str | None:
    """Why running ``actions`` would take more than a plant with ``terms`` allows a VM, or None."""
    actions = list(actions)
    for action in actions:
        if action.timeout > terms.max_action_seconds:
            return (f"action '{action.id}' may run {action.timeout} s; this plant allows an action "
                    f"{terms.max_action_seconds:g} s")
    total = sum(action.timeout for action in actions)
    if total > terms.max_dag_seconds:
        return (f"the actions may run {total} s in all (the sum of their timeouts); this plant allows "
                f"{terms.max_dag_seconds:g} s")
    return None


def full(live: int, creating: int, terms: Terms) -> str | None:
    """Why a plant with ``live`` VMs (counting those being made) and ``creating`` creates in progress has no room
    for another, or None."""
    if live >= terms.capacity_vms:
        return f"this plant is full: it runs {live} VMs, its limit"
    if creating >= terms.max_creates:
        return f"this plant is busy: it is making {creating} VMs at once, its limit"
    return None


def load_seconds(creating: int, boot_seconds: float) -> float:
    """The load term of a bid: every VM being made competes for the CPU while it boots."""
    return round(creating * boot_seconds / 2, 6)


@dataclass(frozen=True)
class Catalog:
    """A plant's cached images as matching sees them; ``digest`` identifies the content (computed, not sent).

    ``owners``: the owner of each private image (an image not named serves everyone).
    """

    images: tuple[CachedImage, ...]
    digest: str
    owners: Mapping[str, str] = field(default_factory=dict)
    _views: dict[str, Catalog] = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def lineages(self) -> dict[str, Dag]:
        return {image.name: image.dag for image in self.images}

    def for_owner(self, owner: str) -> Catalog:
        """The images a request of ``owner`` may use: the public ones and ``owner``'s own, less any whose parent
        it may not use ('' : the public ones). The catalog itself when it has no private image."""
        if not self.owners:
            return self
        view = self._views.get(owner)
        if view is not None:
            return view
        kept = {image.name: image for image in self.images
                if self.owners.get(image.name) in (None, owner) and (owner or image.name not in self.owners)}
        changed = True
        while changed:
            changed = False
            for name, image in list(kept.items()):
                parent = image.dag.start.name if isinstance(image.dag.start, ImageStart) else None
                if parent is not None and parent not in kept:
                    del kept[name]
                    changed = True
        digest = hashlib.sha256(f"{self.digest}\0{owner}".encode("utf-8", "surrogatepass")).hexdigest()
        view = Catalog(tuple(kept.values()), digest,
                       {name: who for name, who in self.owners.items() if name in kept})
        if len(self._views) >= MAX_VIEWS:
            self._views.pop(next(iter(self._views)))
        self._views[owner] = view
        return view


def catalog_digest(entries: Iterable[tuple[str, str, Hardware]], owners: Mapping[str, str] | None = None) -> str:
    """The digest of a catalog: (name, embodied DAG XML, hardware, and a private image's owner) per image, in
    name order."""
    owners = owners or {}
    digest = hashlib.sha256()
    for name, dag_xml, hw in sorted(entries, key=lambda entry: entry[0]):
        parts = [name, dag_xml, str(hw.memory), str(hw.vcpus), str(hw.disk), hw.arch]
        if name in owners:
            parts += ["owner", owners[name]]
        for part in parts:
            data = part.encode("utf-8", "surrogatepass")
            digest.update(len(data).to_bytes(8, "big") + data)
    return digest.hexdigest()


@dataclass
class Offer:
    """A plant's offer: its catalog, costs, load and terms at ``issued`` (the plant's clock), version ``version``.

    ``steps`` maps step digests to their measured seconds (the plant's history); ``live`` counts the VMs the
    plant holds (with those being made), ``creating`` the creates in progress; ``datasets`` the names at the top
    of its data store.
    """

    plant: str
    version: int
    issued: float
    catalog: Catalog
    terms: Terms
    steps: Mapping[str, float] = field(default_factory=dict)
    clone_seconds: float = 0.05
    boot_seconds: float = 5.0
    live: int = 0
    creating: int = 0
    free_memory: int = 0
    datasets: frozenset[str] = frozenset()
    received: float = 0.0  # when this shop received it (its own clock)
    #: Each image's own measured boot seconds (images not named boot in ``boot_seconds``).
    image_boot_seconds: Mapping[str, float] = field(default_factory=dict)
    #: Each image's ``<guest>`` traits (images not named have the defaults), for :func:`vmshop_common.guest.unfit`.
    guests: Mapping[str, GuestTraits] = field(default_factory=dict)
    #: The images of the catalog the plant must first fetch from a peer, with the seconds that takes.
    transfer_seconds: Mapping[str, float] = field(default_factory=dict)

    def expected_seconds(self, digest: str) -> float | None:
        return self.steps.get(digest)

    def has_data(self, source: str) -> bool:
        return source.split("/", 1)[0] in self.datasets


def price(request: Dag, matched: Matched | Decline, offer: Offer, *, extra_creating: int = 0,
          has_data: Callable[[str], bool] | None = None, history: Any = None, check_full: bool = True,
          memo: dict[Any, Any] | None = None) -> Bid | Decline:
    """The plant's bid for ``request`` as ``offer`` states it: the one cost code of plants and shops.

    ``matched``: :func:`match_request` of ``request`` against ``offer``'s catalog (shared by every offer with
    that catalog). ``extra_creating``: creates the pricer knows of that the offer does not count yet (a shop's
    creates in flight to that plant). ``has_data`` and ``history`` default to the offer's; the plant passes its
    live data store and step records, and ``check_full=False`` (it checks its room under its lock when it
    reserves the VM). ``memo``: where the answers that depend only on the request and an offer's terms are kept
    between offers (one request priced against many offers).
    """
    memo = {} if memo is None else memo
    terms = offer.terms
    if isinstance(matched, Decline):
        flat = _flat_or_none(request, offer.catalog)
        if flat is not None:
            reason = unservable(flat, terms, has_data or offer.has_data)
            if reason:
                return Decline(reason)
        return matched
    # Offers taken by a CatalogCache share equal terms and data sets (interned): keyed by identity, cheaply.
    key: tuple[Any, ...] = ("unservable", id(terms), id(offer.datasets))
    if has_data is not None or key not in memo:
        memo[key] = (terms, offer.datasets, unservable(matched.flat, terms, has_data or offer.has_data))
    reason = memo[key][2]
    if reason:
        return Decline(reason)
    key = ("unfit", id(terms), id(offer.guests))
    if key not in memo:
        memo[key] = (terms, offer.guests, pass_over(matched, image_unfitness(request, matched, offer)))
    fit = memo[key][2]
    if isinstance(fit, Decline):
        return fit
    creating = max(offer.creating, extra_creating)
    model = CostModel(clone_seconds=offer.clone_seconds, boot_seconds=offer.boot_seconds,
                      history=history if history is not None else offer,
                      image_boot_seconds=offer.image_boot_seconds, transfer_seconds=offer.transfer_seconds)
    bid = model.price(fit, load_seconds(creating, offer.boot_seconds))
    flat = matched.flat
    key = ("too long", id(terms), bid.remaining)
    if key not in memo:
        memo[key] = (terms, too_long([flat.nodes[n] for n in bid.remaining if isinstance(flat.nodes[n], Action)],
                                     terms))
    reason = memo[key][1]
    if reason:
        return Decline(reason)
    if check_full:
        reason = full(offer.live + max(0, extra_creating - offer.creating), creating, terms)
        if reason:
            return Decline(reason)
    return bid


def image_unfitness(request: Dag, matched: Matched, offer: Offer) -> dict[str, str]:
    """The images of ``matched`` that the plant of ``offer`` cannot run ``request`` on, with the reason."""
    terms = offer.terms
    default = GuestTraits()
    reasons = {}
    for match in matched.matches:
        why = unfit(offer.guests.get(match.image, default), request, terms.backend, terms.kernel_limit,
                    terms.seed_disk)
        if why:
            reasons[match.image] = why
    return reasons


def pricing_key(offer: Offer) -> tuple[Any, ...]:
    """What :func:`price` depends on in an offer (besides a pricer's own creates in flight): offers with equal
    keys get equal prices. Terms, data sets and step costs count by identity (a CatalogCache interns them)."""
    return (offer.catalog.digest, id(offer.terms), id(offer.datasets), id(offer.steps), offer.clone_seconds,
            offer.boot_seconds, id(offer.image_boot_seconds), id(offer.guests), id(offer.transfer_seconds), offer.live,
            offer.creating)


def _flat_or_none(request: Dag, catalog: Catalog) -> Dag | None:
    try:
        return flatten(request, catalog.lineages)
    except NoSuchImageError:
        return None


class Pricing:
    """One request priced against many offers: matched once per distinct catalog."""

    def __init__(self, request: Dag, matched: dict[str, Matched | Decline] | None = None, owner: str = "") -> None:
        """``matched``: matchings of this very request by catalog digest, kept from an earlier pricing (a
        matching depends only on the request and the catalog). ``owner``: whose VM the request would make (it is
        priced against :meth:`Catalog.for_owner`)."""
        self.request = request
        self.owner = owner
        self._matched: dict[str, Matched | Decline] = {} if matched is None else matched
        self._memo: dict[Any, Any] = {}

    def matched(self, catalog: Catalog) -> Matched | Decline:
        found = self._matched.get(catalog.digest)
        if found is None:
            found = self._matched[catalog.digest] = match_request(self.request, catalog.images)
        return found

    def price(self, offer: Offer, extra_creating: int = 0) -> Bid | Decline:
        catalog = offer.catalog.for_owner(self.owner)
        if catalog is not offer.catalog:
            offer = replace(offer, catalog=catalog)
        matched = self.matched(catalog)
        memo = self._memo.setdefault(catalog.digest, {})  # a flattened request is a catalog's own
        # The price depends on the offer only through these: offers equal in them share one answer.
        steps = tuple(offer.steps.get(d) for d in matched.digests.values()) if isinstance(matched, Matched) else ()
        key = ("price", id(offer.terms), id(offer.datasets), offer.clone_seconds, offer.boot_seconds,
               id(offer.image_boot_seconds), id(offer.guests), id(offer.transfer_seconds), offer.live,
               offer.creating, extra_creating, steps)
        found = memo.get(key)
        if found is None:
            found = memo[key] = (offer.terms, offer.datasets,
                                 price(self.request, matched, offer, extra_creating=extra_creating, memo=memo))
        return found[2]  # type: ignore[no-any-return]


# From the wire ----------------------------------------------------------------------------------------------------
class CatalogCache:
    """Parsed catalogs by digest, so that identical catalogs (and a plant's unchanged one) are parsed once.

    Keeps at most ``limit`` catalogs (the oldest not in use go first).
    """

    def __init__(self, limit: int = 4096) -> None:
        self.limit = limit
        self._catalogs: dict[str, Catalog] = {}

        self._interned: dict[Any, Any] = {}

    def __len__(self) -> int:
        return len(self._catalogs)

    def intern(self, value: Any, key: Any = None) -> Any:
        """One shared object for every equal ``value`` (terms, data sets, step costs: most plants of a site share
        them); ``key``: what decides equality, when ``value`` itself is not hashable."""
        if len(self._interned) > 4 * self.limit:
            self._interned.clear()
        return self._interned.setdefault(value if key is None else key, value)

    def get(self, entries: list[tuple[str, str, Hardware]], owners: Mapping[str, str] | None = None) -> Catalog:
        from .dagxml import load_dag

        owners = dict(owners or {})
        digest = catalog_digest(entries, owners)
        catalog = self._catalogs.get(digest)
        if catalog is not None:
            return catalog
        images = []
        for name, dag_xml, hardware in sorted(entries, key=lambda entry: entry[0]):
            try:
                dag = load_dag(dag_xml, what=f"image '{name}'")
            except VMShopError as exc:
                raise OfferInvalidError(f"image '{name}': {exc.message}") from None
            images.append(CachedImage(name=name, dag=dag, hardware=hardware))
        catalog = Catalog(tuple(images), digest, owners)
        if len(self._catalogs) >= self.limit:
            self._catalogs.pop(next(iter(self._catalogs)))
        self._catalogs[digest] = catalog
        return catalog

    def forget_unused(self, used: Iterable[str]) -> None:
        keep = set(used)
        for digest in [d for d in self._catalogs if d not in keep]:
            del self._catalogs[digest]


def _number(value: Any, what: str, *, integer: bool = False, limit: float = MAX_SECONDS) -> Any:
    if value is None:
        raise OfferInvalidError(f"the offer has no {what}")
    try:
        number = int(value) if integer else float(value)
    except (TypeError, ValueError, OverflowError):
        raise OfferInvalidError(f"the offer's {what} is not a number") from None
    if not (math.isfinite(number) and 0 <= number <= limit):
        raise OfferInvalidError(f"the offer's {what} ({number!r}) is not from 0 to {limit:g}")
    return number


def _int_or_zero(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError, OverflowError):
        return 0


def _text(value: Any, what: str, limit: int = 1024) -> str:
    text = "" if value is None else str(value)
    if len(text) > limit:
        raise OfferInvalidError(f"the offer's {what} is longer than {limit} characters")
    return text


def _choice(value: Any, what: str, allowed: tuple[str, ...], limit: int = 32) -> str:
    """``value`` if it is one of ``allowed`` (absent: the first, a plant that does not send it), else an
    OfferInvalidError. An unknown agent is kept, bounded: the shop then passes over that image."""
    if value is None or value == "":
        return allowed[0]
    text = _text(value, what, limit)
    if text not in allowed and allowed is not AGENTS:
        raise OfferInvalidError(f"the offer's {what} {text[:64]!r} is not one of {', '.join(allowed)}")
    return text


def _many(value: Any, what: str, limit: int) -> list[Any]:
    items = list(value or [])
    if len(items) > limit:
        raise OfferInvalidError(f"the offer has more than {limit} {what}")
    return items


def offer_from_wire(data: Any, plant: str, catalogs: CatalogCache, received: float) -> Offer:
    """The :class:`Offer` in ``data`` (a zeep or Spyne object with the ``Offer`` type's fields), validated, for
    the plant at ``plant`` (its URL on the shop's list); OfferInvalidError says what is wrong."""
    if data is None:
        raise OfferInvalidError("no offer")
    version = _number(getattr(data, "version", None), "version", integer=True, limit=2**62)
    issued = _number(getattr(data, "issued", None), "issue time", limit=1e11)
    entries: list[tuple[str, str, Hardware]] = []
    names: set[str] = set()
    boots: dict[str, float] = {}
    transfers: dict[str, float] = {}
    guests: dict[str, GuestTraits] = {}
    owners: dict[str, str] = {}
    for image in _many(getattr(data, "images", None), "images", MAX_IMAGES):
        name = _text(getattr(image, "name", None), "image name", 128)
        if not NAME.match(name) or name in names:
            raise OfferInvalidError(f"image name {name[:64]!r} is not a valid, unique image name")
        names.add(name)
        dag_xml = _text(getattr(image, "dag", None), f"image '{name}' DAG", MAX_IMAGE_DAG_CHARS)
        arch = _text(getattr(image, "arch", None), f"image '{name}' architecture", 32)
        hardware = Hardware(memory=_number(getattr(image, "memory", None), "image memory", integer=True,
                                           limit=MAX_COUNT),
                            vcpus=_number(getattr(image, "vcpus", None), "image vCPUs", integer=True, limit=4096),
                            disk=_number(getattr(image, "disk", None), "image disk", integer=True, limit=MAX_COUNT),
                            arch=arch)
        entries.append((name, dag_xml, hardware))
        owner = _text(getattr(image, "owner", None), f"image '{name}' owner", 256)
        if owner:
            owners[name] = owner
        boot = getattr(image, "boot_seconds", None)
        if boot is not None:
            boots[name] = _number(boot, f"image '{name}' boot seconds")
        transfer = getattr(image, "transfer_seconds", None)
        if transfer is not None:
            transfers[name] = _number(transfer, f"image '{name}' transfer seconds")
        guest = GuestTraits(agent=_choice(getattr(image, "agent", None), f"image '{name}' agent", AGENTS, 32),
                            contextualization=_choice(getattr(image, "contextualization", None),
                                                      f"image '{name}' contextualization", CONTEXTUALIZATIONS),
                            kernel=_choice(getattr(image, "kernel", None), f"image '{name}' kernel", KERNELS),
                            data_share=_choice(getattr(image, "data_share", None), f"image '{name}' data share",
                                               DATA_SHARES))
        if guest != GuestTraits():
            guests[name] = guest
    steps: dict[str, float] = {}
    for step in _many(getattr(data, "steps", None), "step costs", MAX_STEPS):
        digest = _text(getattr(step, "digest", None), "step digest", 64)
        if not DIGEST.match(digest):
            raise OfferInvalidError(f"step digest {digest[:64]!r} is not a sha256 hex digest")
        steps[digest] = _number(getattr(step, "seconds", None), "step seconds")
    datasets = frozenset(_text(name, "data set name", 128)
                         for name in _many(getattr(data, "datasets", None), "data sets", MAX_DATASETS))
    if any(not DATASET.match(name) for name in datasets):
        raise OfferInvalidError("a data set name is not a plain name")
    architectures = tuple(_text(a, "architecture", 32)
                          for a in _many(getattr(data, "architectures", None), "architectures", 16))
    terms = Terms(backend=_text(getattr(data, "backend", None), "backend", 64),
                  available=bool(getattr(data, "available", False)),
                  reason=_text(getattr(data, "reason", None), "reason", 2048),
                  architectures=architectures,
                  max_memory=_number(getattr(data, "max_memory", 0) or 0, "max memory", integer=True, limit=MAX_COUNT),
                  max_vcpus=_number(getattr(data, "max_vcpus", 0) or 0, "max vCPUs", integer=True, limit=MAX_COUNT),
                  max_disk=_number(getattr(data, "max_disk", None), "max disk", integer=True, limit=MAX_COUNT),
                  capacity_memory=_number(getattr(data, "capacity_memory", None), "memory capacity", integer=True,
                                          limit=2**40),
                  capacity_vms=_number(getattr(data, "capacity_vms", None), "VM capacity", integer=True,
                                       limit=MAX_COUNT),
                  max_creates=_number(getattr(data, "max_creates", None), "creates at once", integer=True,
                                      limit=MAX_COUNT),
                  max_action_seconds=_number(getattr(data, "max_action_seconds", None), "action limit"),
                  max_dag_seconds=_number(getattr(data, "max_dag_seconds", None), "DAG limit"),
                  network=bool(getattr(data, "network", False)), datastore=bool(getattr(data, "datastore", False)),
                  kernel_limit=_text(getattr(data, "kernel_limit", None), "kernel limit", 1024),
                  seed_disk=bool(getattr(data, "seed_disk", True) is not False))
    return Offer(plant=plant, version=version, issued=issued, catalog=catalogs.get(entries, owners),
                 terms=catalogs.intern(terms), steps=catalogs.intern(steps, ("steps", tuple(sorted(steps.items())))),
                 clone_seconds=_number(getattr(data, "clone_seconds", None), "clone seconds"),
                 boot_seconds=_number(getattr(data, "boot_seconds", None), "boot seconds"),
                 live=_number(getattr(data, "live_vms", None), "live VMs", integer=True, limit=MAX_COUNT),
                 creating=_number(getattr(data, "creating_vms", None), "creates in progress", integer=True,
                                  limit=MAX_COUNT),
                 free_memory=_number(max(0, _int_or_zero(getattr(data, "free_memory", 0))), "free memory",
                                     integer=True, limit=2**40),
                 datasets=catalogs.intern(datasets), received=received,
                 image_boot_seconds=catalogs.intern(boots, ("boots", tuple(sorted(boots.items())))),
                 guests=catalogs.intern(guests, ("guests", tuple(sorted(guests.items())))),
                 transfer_seconds=catalogs.intern(transfers, ("transfers", tuple(sorted(transfers.items())))))


__all__ = ["Catalog", "CatalogCache", "Offer", "Pricing", "Terms", "catalog_digest", "full", "image_unfitness",
           "load_seconds", "offer_from_wire", "price", "too_long", "unservable"]
