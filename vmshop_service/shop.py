"""The shop: places VMs on plants, keeps the registry, answers queries.

Everything here runs in the reactor thread and returns Deferreds; calls to
plants go through non-blocking SOAP clients, registry and DAG work that
could take a while goes to the reactor's thread pool.

Guarantees:
- a DAG is validated (the same loader and rules as the plants') before any
  plant sees it; a bad DAG changes nothing;
- a create is registered (durably) under its key as 'placing' as soon as it
  starts, so callers can watch it; if no plant can make the VM the entry
  is removed again and the fault lists every plant's reason;
- a VM's lease (termination time) is enforced by a timer that reads the
  registry, so it survives a shop restart;
- every operation takes the caller's :class:`~vmshop_common.authz.Identity`
  (from its certificate, never from the request) and applies the rules of
  :mod:`vmshop_common.authz`: a VM is seen and touched only by its owner or
  an admin, anyone else is told there is no such VM;
- a create is admitted against the owner's quotas (:mod:`.quota`).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import logging
import math
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import zeep.exceptions
from twisted.internet import defer, threads

from vmshop_common import authz
from vmshop_common.authz import Identity
from vmshop_common.dagxml import load_dag
from vmshop_common.errors import (
    DeclinedError,
    NoPlantError,
    NoSuchImageError,
    NoSuchPlantError,
    NoSuchVMError,
    NotAuthorizedError,
    NotSupportedError,
    OfferExceededError,
    OfferInvalidError,
    PlantGoneError,
    Problem,
    RegistryUnavailableError,
    VMBusyError,
    VMShopError,
)
from vmshop_common.imagename import check_image_name
from vmshop_common.rules import check_static_addresses
from vmshop_common.soap.fastxml import spyne_record
from vmshop_common.soap.faults import from_fault
from vmshop_common.threads import ThreadPoolService

from . import resource
from .broker import BidResult, call_for_bids, rank, rejection
from .config import ShopConfig
from .offers import OfferBook
from .plants import PlantDirectory, describe_failure
from .query import Term, parse_query
from .quota import Quotas, Usage
from .registry import Registry, VMEntry, shops_alive
from .wire import (
    ActionRun,
    Attribute,
    Bid,
    CostItem,
    CreateResult,
    EndpointReference,
    Estimate,
    PlantStatus,
    PublishedImage,
    VMInfo,
)

log = logging.getLogger(__name__)
KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
CREATING_STATES = ("placing", "creating")
#: The latest termination time (9999-12-31T23:59:59Z): later ones can't be written as an xs:dateTime.
MAX_TERMINATION = 253402300799.0


#: Accepted DAGs kept by their text's digest (a repeated request is not parsed and validated again).
DAG_CACHE = 256
#: Query answers kept (by query text, the caller's scope and limit), each of at most QUERY_CACHE_VMS VMs.
QUERY_CACHE = 256
QUERY_CACHE_VMS = 256
#: Offer-priced bids an answer lists (the best ones, and as many declines); the others are counted.
SHOWN_BIDS = 16


@dataclass
class BidRound:
    """One request's bids: those an answer shows, and the candidates to create on, best first (``head``, then
    ``rest``). ``omitted``: offer-priced bids not shown; ``declined``: plants whose offers declined."""

    shown: list[BidResult]
    head: list[BidResult]
    rest: Iterator[BidResult] = field(default_factory=lambda: iter(()))
    omitted: int = 0
    declined: list[str] = field(default_factory=list)


def load_new_vm_dag(dag_xml: str) -> Any:
    """The DAG of a VM to be made, checked as the plants will: valid, and no static address (a new VM has no lease)."""
    dag = load_dag(dag_xml)
    check_static_addresses(dag, None)
    return dag


def check_termination(termination: float | None) -> None:
    """Refuse a termination time that is not a finite epoch time from 0 to :data:`MAX_TERMINATION`."""
    if termination is not None and not (math.isfinite(termination) and 0 <= termination <= MAX_TERMINATION):
        raise DeclinedError(f"termination time {termination!r} is not epoch seconds from 0 to {MAX_TERMINATION:.0f}",
                            [Problem("bad termination time")])


class Shop:
    """The shop's behaviour; ``reactor`` and ``clock`` (wall-clock seconds) are injected."""

    def __init__(self, config: ShopConfig, registry: Registry, plants: PlantDirectory, reactor: Any,
                 clock: Callable[[], float] = time.time, *, pool: ThreadPoolService | None = None) -> None:
        """``pool``: where registry and DAG work runs (each piece within the pool's deadline); ``None``: the
        reactor's own thread pool, without deadlines."""
        self.config = config
        self.registry = registry
        self.plants = plants
        self.reactor = reactor
        self.clock = clock
        self.pool = pool
        self.public_url = config.public_url
        self._creating: set[str] = set()  # keys whose create runs in this process
        self._cancelled: set[str] = set()  # ... and that were collected meanwhile
        self._collecting: set[str] = set()
        #: How the plants know this shop: its certificate's subject (VMs they hold record who asked for them).
        self.identity = _own_identity(config)
        #: How the registry knows this shop (its configured name: the shops sharing a registry each have
        #: their own), and this run of it.
        self.name = config.name
        self.instance = uuid.uuid4().hex
        #: The certificate subjects of every shop sharing the registry (VMs held for any of them are ours).
        self._shop_identities: set[str] = {self.identity}
        #: The other shops of the registry alive at the last look (None: not looked yet, so none is dead).
        self._alive_shops: set[str] | None = None
        self._looking: set[str] = set()  # plants being looked at after a notice
        self._look_again: set[str] = set()  # ... and noticed again meanwhile
        self.quotas = Quotas(config.quotas, self._usage)
        #: Told the seconds of each call for bids (the metrics' hook; vmshop_service/metrics.py).
        self.observe_bid_round: Callable[[float], None] | None = None
        self.offers = OfferBook(plants, time.monotonic, penalty=config.offer_penalty,
                                timeout=min(config.call_timeout, 10.0))
        self.live_bids = config.bids == "live"
        self._dags: OrderedDict[bytes, Any] = OrderedDict()  # accepted DAGs by the sha256 of their text
        # Query answers by (text, scope, limit): (the registry generation they are of, the entries).
        self._queries: OrderedDict[tuple[str, str | None, int | None], tuple[int, list[VMEntry]]] = OrderedDict()

    def _usage(self, owner: str, exclude: str) -> defer.Deferred[Usage]:
        return self._in_thread(self.registry.usage, owner, exclude).addCallback(lambda row: Usage(*row))

    # Life cycle ---------------------------------------------------------------
    # The shop's service tree (vmshop_service/main.py) calls start() once the reactor runs and stop() when
    # the shop stops; its timers call enforce_leases() and refresh() every lease and poll interval.
    def start(self) -> defer.Deferred[Any]:
        """The start-up round: pull the plants' offers (offers mode), check the plants, resolve creates a stop
        cut short, enforce the leases."""
        first = self.refresh_offers() if not self.live_bids else defer.succeed(None)
        return first.addCallback(lambda _: self.refresh()).addCallback(lambda _: self.enforce_leases())

    def refresh_offers(self) -> defer.Deferred[Any]:
        """Pull every plant's offer (the slow offer timer; offers mode only)."""
        if self.live_bids:
            return defer.succeed(None)
        return self.offers.pull_all()

    def register(self) -> None:
        """Say in the registry that this shop uses it (blocking: at start-up, before the reactor runs).

        ConfigurationError if another live shop has this shop's name on a shared registry."""
        self.registry.register_shop(self.name, self.identity, self.instance, self.clock())

    @staticmethod
    def _safely(work: Callable[[], Any]) -> defer.Deferred[Any]:
        """Run one timer round; a failure is logged and the timer goes on (a LoopingCall would stop)."""

        def failed(failure: Any) -> None:
            if failure.check(VMShopError):  # a known condition (the registry unreachable, ...): no traceback
                log.warning("%s failed: %s", getattr(work, "__name__", work), failure.getErrorMessage())
            else:
                log.error("%s failed: %s", getattr(work, "__name__", work), failure.getTraceback())

        return defer.maybeDeferred(work).addErrback(failed)

    def stop(self) -> defer.Deferred[Any]:
        """Close the connections to the plants (the requests and timer rounds have ended by then)."""
        return self.plants.close()

    # References ---------------------------------------------------------------
    def epr(self, key: str) -> EndpointReference:
        return spyne_record(EndpointReference, Address=self.public_url, VMKey=key)

    def _key(self, reference: Any) -> str:
        """The VM key of an endpoint reference sent to this shop.

        The reference's Address is not compared with the public URL: a client
        that reached this shop (by whatever name: localhost, an alias, a
        proxy) means this shop, and the key decides.
        """
        key = getattr(reference, "VMKey", None) or ""
        if not KEY.match(key):
            raise NoSuchVMError(f"'{key}' is not a VM key")
        return key

    def _entry(self, caller: Identity, reference: Any) -> defer.Deferred[VMEntry]:
        """The registry entry of a VM ``caller`` may manage; anyone else's is NoSuchVMError, as a missing one."""
        authz.require(caller, authz.VM_ROLES, "act on VMs")
        key = self._key(reference)

        def owned(entry: VMEntry) -> VMEntry:
            if not authz.may_manage(caller, entry.owner):
                raise NoSuchVMError(f"no VM has id '{key}'")  # the registry's own words for a missing key
            return entry

        return self._in_thread(self.registry.get, key).addCallback(owned)

    def _in_thread(self, work: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
        if self.pool is not None:
            return self.pool.run(functools.partial(work, *args, **kwargs), what=getattr(work, "__name__", None))
        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), work, *args, **kwargs)

    def _new_vm_dag(self, dag_xml: str) -> defer.Deferred[Any]:
        """:func:`load_new_vm_dag` on the pool, or the DAG it gave for the very same text lately (the same
        requests come again and again; a DAG is never changed once loaded). Only accepted DAGs are kept."""
        digest = hashlib.sha256(dag_xml.encode("utf-8", "surrogatepass")).digest()
        cached = self._dags.get(digest)
        if cached is not None:
            self._dags.move_to_end(digest)
            return defer.succeed(cached)

        def loaded(dag: Any) -> Any:
            self._dags[digest] = dag
            while len(self._dags) > DAG_CACHE:
                self._dags.popitem(last=False)
            return dag

        return self._in_thread(load_new_vm_dag, dag_xml).addCallback(loaded)

    # Estimate -----------------------------------------------------------------
    @defer.inlineCallbacks
    def estimate(self, caller: Identity, dag_xml: str) -> Any:
        dag = yield self._new_vm_dag(dag_xml)
        started = time.monotonic()
        owner = caller.name  # what a VM of the caller's would be made from
        bids = yield self._bids(dag, dag_xml, owner=owner)
        best = bids.head[0] if bids.head else None
        took = round(time.monotonic() - started, 6)
        return spyne_record(Estimate, plant=best.plant if best else None, cost=best.cost if best else None,
                            image=best.image if best else None, items=_items_out(best.items) if best else [],
                            remaining=list(best.remaining) if best else [],
                            bids=[_bid_out(b, b is best) for b in bids.shown], seconds=took,
                            mode="live" if self.live_bids else "offers", omitted=bids.omitted or None)

    def _bids(self, dag: Any, dag_xml: str, handles: list[Any] | None = None, live: bool = False,
              owner: str = "") -> defer.Deferred[BidRound]:
        """The bids of the plants (or of ``handles``): priced here from their offers, the plants with no offer
        asked live; every plant asked live in live mode or with ``live``. The round's duration is told to
        :attr:`observe_bid_round` (the metrics' hook)."""
        started = time.monotonic()

        def observed(bids: BidRound) -> BidRound:
            if self.observe_bid_round is not None:
                self.observe_bid_round(time.monotonic() - started)
            return bids

        return self._bid_round(dag, dag_xml, handles, live, owner).addCallback(observed)

    def _bid_round(self, dag: Any, dag_xml: str, handles: list[Any] | None, live: bool,
                   owner: str) -> defer.Deferred[BidRound]:
        handles = self.plants.all() if handles is None else handles
        if self.live_bids or live:
            return call_for_bids(self.plants, dag_xml, self.config.bid_timeout, handles=handles,
                                 owner=owner).addCallback(
                lambda answers: BidRound(shown=answers, head=rank(answers)))
        priced = self.offers.price(dag, handles, owner)
        ranked = priced.ranked()
        top = list(itertools.islice(ranked, SHOWN_BIDS))
        declines = list(itertools.islice(priced.declines(), SHOWN_BIDS))
        omitted = priced.bidders - len(top) + priced.decliners - len(declines)
        declined = [url for group in priced.declined for url in group.urls]

        def with_live(asked: list[BidResult]) -> BidRound:
            return BidRound(shown=top + declines + asked, head=rank(top + asked), rest=ranked, omitted=omitted,
                            declined=declined)

        if not priced.unpriced:
            return defer.succeed(with_live([]))
        return call_for_bids(self.plants, dag_xml, self.config.bid_timeout, handles=priced.unpriced,
                             owner=owner).addCallback(with_live)

    # Create -------------------------------------------------------------------
    @defer.inlineCallbacks
    def create(self, caller: Identity, dag_xml: str, owner: str, termination: float | None,
               key: str | None) -> Any:
        started = time.monotonic()
        owner = authz.owner_of_new_vm(caller, owner)
        dag = yield self._new_vm_dag(dag_xml)
        check_termination(termination)
        key = key or "vm-" + uuid.uuid4().hex[:12]
        if not KEY.match(key):
            raise DeclinedError(f"'{key}' is not a valid VM key", [Problem("bad key")])
        start = dag.start
        hardware = getattr(start, "hardware", None)
        entry = VMEntry(vm_id=key, owner=owner, state="placing", dag_xml=dag_xml, termination=termination,
                        attributes=dict(dag.attributes), created=self.clock(), updated=self.clock(),
                        memory=hardware.memory if hardware else getattr(start, "memory", None),
                        vcpus=hardware.vcpus if hardware else getattr(start, "vcpus", None),
                        disk=hardware.disk if hardware else None, arch=hardware.arch if hardware else None,
                        image=getattr(start, "name", None), shop=self.name)
        demand = Usage(1, entry.memory or 0, entry.vcpus or 0)
        if key in self._creating:
            raise DeclinedError(f"a VM with the key '{key}' exists already")
        # Marked ours before the entry exists: the state poll never takes it for one a stop left behind.
        self._creating.add(key)
        try:
            yield self.quotas.admit(owner, key, demand, lambda: self._in_thread(self.registry.add, entry))
        except ValueError:
            self._creating.discard(key)
            raise DeclinedError(f"a VM with the key '{key}' exists already") from None
        except BaseException:
            self._creating.discard(key)
            raise
        try:
            result = yield self._place(key, dag, dag_xml, owner, started)
        except BaseException:
            # A collected create keeps its (collected) entry: the VM existed. delete_owned leaves it, as it
            # leaves an entry another shop resolved meanwhile.
            if key not in self._cancelled:
                yield self._in_thread(self.registry.delete_owned, key, self.name)
            raise
        finally:
            self._creating.discard(key)
            self._cancelled.discard(key)
        return result

    @defer.inlineCallbacks
    def _place(self, key: str, dag: Any, dag_xml: str, owner: str, started: float) -> Any:
        """Create on the best bidder, then the next (docs/consistency.md). In offers mode the bidders are
        priced from offers and each re-prices at its create (declining above its offer plus the margin); when
        none of them made the VM, the plants whose offers declined are asked live, once. ``started``: when the
        create began (its placement time runs from there to asking the first plant)."""
        bids = yield self._bids(dag, dag_xml, owner=owner)
        attempts: list[str] = []
        tried: set[str] = set()
        timing: dict[str, float] = {}
        shown = list(bids.shown)
        candidates: Iterator[BidResult] = itertools.chain(bids.head, bids.rest)
        second = False
        while True:
            for bid in candidates:
                tried.add(bid.plant)
                made = yield self._try(key, bid, dag_xml, owner, attempts, started, timing)
                if made is not None:
                    attempts.append(f"{bid.plant}: created")
                    entry = yield self._in_thread(self.registry.get, key)
                    if all(b.plant != bid.plant for b in shown):
                        shown.append(bid)
                    return CreateResult(vm=self.vm_out(entry), plant=bid.plant, cost=bid.cost,
                                        bids=[_bid_out(b, b.plant == bid.plant) for b in shown], attempts=attempts,
                                        runs=[_run_out(run) for run in made.runs or []],
                                        placement_seconds=timing.get("placement"), omitted=bids.omitted or None)
            if self.live_bids or second:
                break
            # Offers can be stale: the plants whose offer declined (and were not tried), and those whose live price
            # exceeded their offer, are asked live, once.
            second = True
            exceeded = {a.split(": ", 1)[0] for a in attempts if OfferExceededError.CODE in a}
            again = [self.plants.get(url) for url in [*bids.declined, *sorted(exceeded)]
                     if self._listed(url) and (url not in tried or url in exceeded)]
            if not again:
                break
            self._still_wanted(key)
            live = yield self._bids(dag, dag_xml, again, live=True, owner=owner)
            asked = {b.plant for b in live.shown}
            shown = [b for b in shown if b.plant not in asked] + live.shown
            candidates = iter(live.head)
        reasons = [f"{b.plant}: {rejection(b)}" for b in shown if rejection(b) is not None] + attempts
        if bids.omitted:
            reasons.append(f"and {bids.omitted} more plants' offers (not listed)")
        if not shown:
            reasons = ["this shop has no plants (see its plant list file)"]
        raise NoPlantError("no plant could create the VM: " + "; ".join(reasons),
                           [Problem(reason) for reason in reasons])

    def _update_own_create(self, key: str, **changes: Any) -> defer.Deferred[None]:
        """Change this shop's create in the registry, only while it is still this shop's create (a collect from
        any shop sharing the registry ends it: NotSupportedError, and the create goes no further)."""

        def update() -> None:
            if not self.registry.update_owned(key, self.name, **changes):
                self._cancelled.add(key)  # its entry is collected (or resolved elsewhere): never deleted here
                raise NotSupportedError(f"VM {key} was collected while it was being created")

        return self._in_thread(update)

    def _listed(self, url: str) -> bool:
        try:
            self.plants.get(url)
        except PlantGoneError:
            return False
        return True

    @defer.inlineCallbacks
    def _try(self, key: str, bid: BidResult, dag_xml: str, owner: str, attempts: list[str], started: float,
             timing: dict[str, float]) -> Any:
        """Ask ``bid``'s plant to create; its ``made`` answer, or None (the reason added to ``attempts``).

        The create counts as in flight to that plant from now (in the reactor turn that priced it), so that the
        creates priced after it count it as the plant's load. They may reach the plant in another order than
        they were priced in (the registry writes before each call finish in any order, and so do the calls):
        the plant leaves this shop's own creates in progress out of its check against the offer
        (vmplant_service.plant.Plant.create), so that order does not matter."""
        inflight = self.offers.inflight
        inflight[bid.plant] = inflight.get(bid.plant, 0) + 1
        try:
            made = yield self._create_on(key, bid, dag_xml, owner, attempts, started, timing)
        finally:
            inflight[bid.plant] -= 1
            if not inflight[bid.plant]:
                del inflight[bid.plant]
        return made

    @defer.inlineCallbacks
    def _create_on(self, key: str, bid: BidResult, dag_xml: str, owner: str, attempts: list[str], started: float,
                   timing: dict[str, float]) -> Any:
        self._still_wanted(key)
        handle = self.plants.get(bid.plant)
        changes = {"state": "creating", "plant": bid.plant, "plant_vm_id": key, "cost": bid.cost,
                   "image": bid.image}
        if bid.memory is not None:
            changes.update(memory=bid.memory, vcpus=bid.vcpus)
        # The plant's bid says what hardware the VM gets: that is what the owner's quota must hold.
        demand = Usage(1, bid.memory or 0, bid.vcpus or 0)
        # Durable before the plant is asked: after a crash, the shop knows where to look (docs/consistency.md).
        yield self.quotas.admit(owner, key, demand, functools.partial(self._update_own_create, key, **changes))
        self._still_wanted(key)
        max_cost = None
        if bid.source == "offer" and bid.cost is not None:
            max_cost = round(bid.cost * (1 + self.config.offer_margin) + 1e-6, 6)
        timing.setdefault("placement", round(time.monotonic() - started, 6))
        call = handle.client.call_with_timeout(self.config.create_timeout, "createVM", dag=dag_xml, owner=owner,
                                               vm_id=key, max_cost=max_cost)
        silent: list[str] = []
        outcome: defer.Deferred[Any] = defer.Deferred(lambda _: call.cancel())
        call.addBoth(lambda result: outcome.callback(result) if not outcome.called else None)
        if bid.source == "offer":
            # No live bid showed that this plant answers: check it alongside the create, within the bid timeout.
            # A plant that does not answer loses the create as a silent bidder would (it is cancelled there).
            def checked(checked_handle: Any) -> None:
                if not checked_handle.up and not outcome.called:
                    silent.append(checked_handle.last_error or "no answer")
                    outcome.errback(defer.CancelledError("the plant did not answer its check"))
                    call.cancel()

            self.plants.check(handle, self.config.bid_timeout).addCallback(checked)
        try:
            made = yield outcome
        except defer.CancelledError:
            if not silent:
                raise  # the shop is stopping (its grace ran out): no next bidder
            reason = f"did not answer a check within {self.config.bid_timeout:g} s ({silent[0]})"
            attempts.append(f"{bid.plant}: {reason}")
            log.warning("create %s on %s: the plant %s; trying the next bidder", key, bid.plant, reason)
            handle.client.call("collectVM", vm_id=key).addErrback(lambda _: None)
            return None
        except Exception as exc:  # noqa: BLE001 - every failure means: try the next bidder
            status, reason = describe_failure(exc)
            attempts.append(f"{bid.plant}: {reason}")
            log.warning("create %s on %s failed (%s): %s; trying the next bidder", key, bid.plant, status, reason)
            if status in ("timeout", "down"):
                # The plant may still make it: cancel it there (a collect during a create cancels it). If
                # this does not get through, the plant's copy is unwanted and the state poll collects it.
                handle.client.call("collectVM", vm_id=key).addErrback(lambda _: None)
            elif OfferExceededError.CODE in reason and bid.source == "offer":
                self.offers.mark_down(bid.plant, reason)
                self.offers.pull(handle)  # its offer now
            return None
        self._still_wanted(key)
        vm = made.vm
        yield self._update_own_create(key, state=vm.state, image=vm.image, memory=vm.memory, vcpus=vm.vcpus,
                                      disk=vm.disk, arch=vm.arch, address=vm.address, host_port=vm.host_port,
                                      steps=list(vm.steps or []))
        return made

    def _still_wanted(self, key: str) -> None:
        """Raise NotSupportedError once the VM being created was collected (its create goes no further)."""
        if key in self._cancelled:
            raise NotSupportedError(f"VM {key} was collected while it was being created")

    # Per-VM operations ----------------------------------------------------------
    @defer.inlineCallbacks
    def describe(self, caller: Identity, reference: Any) -> Any:
        entry = yield self._entry(caller, reference)
        if entry.state in CREATING_STATES and entry.plant:
            # Finer progress from the plant (booting, configuring) while the create runs.
            try:
                remote = yield self.plants.get(entry.plant).client.call_with_timeout(
                    min(5.0, self.config.call_timeout), "describeVM", vm_id=entry.plant_vm_id)
                entry.state = f"creating:{remote.state}"
            except Exception:  # noqa: BLE001 - progress is best effort
                pass
        return self.vm_out(entry)

    @defer.inlineCallbacks
    def configure(self, caller: Identity, reference: Any, dag_xml: str) -> Any:
        yield self._in_thread(load_dag, dag_xml)
        entry = yield self._entry(caller, reference)
        if entry.state != "running":
            raise NotSupportedError(f"VM {entry.vm_id} is {entry.state}; only a running VM can be configured")
        handle = self._plant_of(entry)
        try:
            runs = yield handle.client.call_with_timeout(self.config.create_timeout, "configureVM",
                                                         vm_id=entry.plant_vm_id, dag=dag_xml)
        except zeep.exceptions.Fault as fault:
            raise from_fault(fault) from None
        except Exception as exc:  # noqa: BLE001
            raise PlantGoneError(f"plant {entry.plant} holding VM {entry.vm_id} does not answer: "
                                 f"{describe_failure(exc)[1]}") from None
        runs = list(runs or [])
        steps = list(entry.steps or []) + [run.node for run in runs if run.ok]
        yield self._in_thread(self.registry.update, entry.vm_id, steps=steps)
        return [_run_out(run) for run in runs]

    @defer.inlineCallbacks
    def collect(self, caller: Identity, reference: Any) -> Any:
        entry = yield self._entry(caller, reference)
        result = yield self._collect_entry(entry)
        return result

    @defer.inlineCallbacks
    def _collect_entry(self, entry: VMEntry) -> Any:
        if entry.collected is not None or entry.state in ("collected", "failed"):
            return self.vm_out(entry)
        if entry.state in CREATING_STATES:  # (an entry its create already made running is collected as any)
            result = yield self._collect_create(entry)
            return result
        handle = self._plant_of(entry)
        self._collecting.add(entry.vm_id)
        try:
            try:
                remote = yield handle.client.call("collectVM", vm_id=entry.plant_vm_id)
                state, error = remote.state, remote.error
            except zeep.exceptions.Fault as fault:
                problem = from_fault(fault)
                if not isinstance(problem, NoSuchVMError):
                    raise problem from None
                state, error = "collected", "the plant had no record of it"
            except Exception as exc:  # noqa: BLE001
                raise PlantGoneError(f"plant {entry.plant} holding VM {entry.vm_id} does not answer: "
                                     f"{describe_failure(exc)[1]}") from None
            if state != "failed":
                state = "collected"
            yield self._in_thread(self.registry.update, entry.vm_id, state=state, collected=self.clock(),
                                  error=error)
        finally:
            self._collecting.discard(entry.vm_id)
        updated = yield self._in_thread(self.registry.get, entry.vm_id)
        return self.vm_out(updated)

    @defer.inlineCallbacks
    def _collect_create(self, entry: VMEntry) -> Any:
        """Collect-during-create, whichever shop of the registry runs the create: the entry ends collected in
        the registry first (so the placing shop goes no further: no next bidder, no ``running``), then the
        plant it was sent to (if any) cancels it; if that plant cannot be told, its copy is unwanted and the
        state poll collects it (docs/consistency.md)."""
        key = entry.vm_id
        if key in self._creating:
            self._cancelled.add(key)
        error = "collected while it was being " + ("placed" if not entry.plant else "created")
        before = yield self._in_thread(self.registry.cancel_create, key, self.clock(), error)
        if before is None:  # the create ended meanwhile (made, failed or removed): collect what it is now
            current = yield self._in_thread(self.registry.get, key)
            if current.state in CREATING_STATES and current.collected is None:
                raise NotSupportedError(f"VM {key} is still being placed; try again")
            result = yield self._collect_entry(current)
            return result
        if before.plant:
            handle = self.plants.get(before.plant)
            try:
                yield handle.client.call("collectVM", vm_id=before.plant_vm_id or key)
            except Exception as exc:  # noqa: BLE001 - the poll collects the unwanted copy
                log.warning("VM %s: collected while being created; its plant %s was not told (%s): the state poll "
                            "collects its copy", key, before.plant, describe_failure(exc)[1])
        updated = yield self._in_thread(self.registry.get, key)
        return self.vm_out(updated)

    def _plant_of(self, entry: VMEntry) -> Any:
        if not entry.plant:
            raise PlantGoneError(f"VM {entry.vm_id} has no plant")
        return self.plants.get(entry.plant)

    @defer.inlineCallbacks
    def set_termination(self, caller: Identity, reference: Any, termination: float | None) -> Any:
        check_termination(termination)
        entry = yield self._entry(caller, reference)
        if entry.collected is not None:
            raise NotSupportedError(f"VM {entry.vm_id} was collected already")
        yield self._in_thread(self.registry.update, entry.vm_id, termination=termination)
        updated = yield self._in_thread(self.registry.get, entry.vm_id)
        if termination is not None and termination <= self.clock():
            yield self.enforce_leases()
            updated = yield self._in_thread(self.registry.get, entry.vm_id)
        return self.vm_out(updated)

    # Images -------------------------------------------------------------------
    @defer.inlineCallbacks
    def publish(self, caller: Identity, reference: Any, image: str, public: bool, with_state: bool = False) -> Any:
        """Publish the caller's VM as image ``image`` on the VM's plant (:mod:`vmplant_service.publish`).

        Only the VM's owner (or an admin) may: anyone else is told there is no
        such VM. The image belongs to the VM's owner; ``public`` (it serves
        every owner) is for admins only; ``with_state``: the image carries the
        guest's running state too (its clones resume instead of booting).
        """
        check_image_name(image)
        if public:
            authz.require(caller, (authz.ADMIN,), "publish a public image")
        entry = yield self._entry(caller, reference)
        if entry.state in CREATING_STATES or entry.vm_id in self._collecting:
            raise VMBusyError(f"VM {entry.vm_id} is {entry.state}; publish it once that is done")
        if entry.state != "running":
            raise NotSupportedError(f"VM {entry.vm_id} is {entry.state}; only a running VM can be published")
        handle = self._plant_of(entry)
        try:
            made = yield handle.client.call_with_timeout(self.config.create_timeout, "publishVM",
                                                         vm_id=entry.plant_vm_id, image=image, owner=entry.owner,
                                                         is_public=bool(public), with_state=bool(with_state))
        except zeep.exceptions.Fault as fault:
            raise from_fault(fault) from None
        except Exception as exc:  # noqa: BLE001
            raise PlantGoneError(f"plant {entry.plant} holding VM {entry.vm_id} does not answer: "
                                 f"{describe_failure(exc)[1]}") from None
        log.info("VM %s published as image %s on %s (owner %s)", entry.vm_id, made.name, entry.plant, made.owner)
        if not self.live_bids:
            yield self.offers.pull(handle)  # its offer with the image: the caller's next bids match it
        return spyne_record(PublishedImage, name=made.name, plant=entry.plant, owner=made.owner,
                            is_public=made.is_public, base=made.base, steps=list(made.steps or []), size=made.size,
                            with_state=bool(getattr(made, "with_state", False)))

    @defer.inlineCallbacks
    def unpublish(self, caller: Identity, image: str) -> Any:
        """Remove the caller's published image ``image`` from every plant that has it; the plants' addresses.

        A user removes only its own images (another owner's do not exist to
        it: ``Client.NoSuchImage``); an admin any published image. A plant
        keeps an image while a VM or another image uses it as a base
        (``Client.ImageInUse``).
        """
        authz.require(caller, authz.VM_ROLES, "unpublish images")
        check_image_name(image)
        owner = "" if caller.is_admin else caller.name
        done = yield self._on_every_plant("unpublishImage", image=image, owner=owner)
        return done

    @defer.inlineCallbacks
    def set_image_public(self, caller: Identity, image: str, public: bool) -> Any:
        """Make the published image ``image`` public (it serves every owner) or private again, on every plant
        that has it (admins only); the plants' addresses."""
        authz.require(caller, (authz.ADMIN,), "make images public or private")
        check_image_name(image)
        done = yield self._on_every_plant("setImagePublic", image=image, is_public=bool(public))
        return done

    @defer.inlineCallbacks
    def set_image_movable(self, caller: Identity, image: str, movable: bool) -> Any:
        """Let the published private image ``image`` move between the site's plants that agree (or stop it), on
        every plant that has it; the plants' addresses. Its owner agrees (a user, for its own images only: another
        owner's do not exist to it, ``Client.NoSuchImage``) or an admin for any."""
        authz.require(caller, authz.VM_ROLES, "make images movable")
        check_image_name(image)
        owner = "" if caller.is_admin else caller.name
        done = yield self._on_every_plant("setImageMovable", image=image, is_movable=bool(movable), owner=owner)
        return done

    @defer.inlineCallbacks
    def _on_every_plant(self, operation: str, **arguments: Any) -> Any:
        """Ask every plant to do ``operation`` on ``arguments['image']``; the addresses of those that did. When
        none did: the first refusal other than Client.NoSuchImage, else PlantGoneError if a plant did not answer,
        else NoSuchImageError."""
        image = arguments["image"]
        handles = list(self.plants.all())
        answers = yield defer.DeferredList(
            [handle.client.call_with_timeout(self.config.call_timeout, operation, **arguments) for handle in handles],
            consumeErrors=True)
        done: list[str] = []
        refusals: list[VMShopError] = []
        silent: list[str] = []
        for handle, (ok, result) in zip(handles, answers, strict=True):
            if ok:
                done.append(handle.url)
            elif result.check(zeep.exceptions.Fault):
                problem = from_fault(result.value)
                if not isinstance(problem, NoSuchImageError):
                    refusals.append(problem)
            else:
                silent.append(f"{handle.url}: {describe_failure(result.value)[1]}")
        if done:
            if not self.live_bids:  # their offers now, without (or with) the image
                yield defer.gatherResults([self.offers.pull(handle) for handle in handles if handle.url in done])
            return done
        if refusals:
            raise refusals[0]
        if silent:
            raise PlantGoneError(f"no plant that answered has an image named '{image}'; these did not answer: "
                                 + "; ".join(silent))
        raise NoSuchImageError(f"no plant has an image named '{image}'")

    # Queries ------------------------------------------------------------------
    @defer.inlineCallbacks
    def query(self, caller: Identity, text: str, limit: int | None) -> Any:
        """The caller's VMs that match ``text`` (an admin's: all). A registry only this shop writes (SQLite) has a
        generation that grows with every write: an answer of the current generation is given again without
        asking the registry (the same query text, scope and limit; answers of up to QUERY_CACHE_VMS VMs)."""
        owner = authz.visible_owner(caller)
        key = (text, owner, limit)
        kept = self._queries.get(key)
        if kept is not None and kept[0] == self.registry.generation:
            self._queries.move_to_end(key)
            return [self.vm_out(entry) for entry in kept[1]]

        def run() -> tuple[int | None, list[VMEntry]]:
            query = parse_query(text)
            if owner is not None:
                query = query + (Term("owner", "=", owner),)  # a user's queries see only its own VMs
            return self.registry.query_with_generation(query, limit)

        generation, entries = yield self._in_thread(run)
        if generation is not None and len(entries) <= QUERY_CACHE_VMS:
            self._queries[key] = (generation, entries)
            self._queries.move_to_end(key)
            while len(self._queries) > QUERY_CACHE:
                self._queries.popitem(last=False)
        return [self.vm_out(entry) for entry in entries]

    @defer.inlineCallbacks
    def resource_document(self, caller: Identity, reference: Any) -> Any:
        from lxml import etree
        entry = yield self._entry(caller, reference)
        return etree.tostring(resource.properties_document(entry, self.clock()), encoding="unicode")

    @defer.inlineCallbacks
    def resource_property(self, caller: Identity, reference: Any, name: str) -> Any:
        entry = yield self._entry(caller, reference)
        return resource.get_resource_property(entry, name or "", self.clock())

    @defer.inlineCallbacks
    def resource_query(self, caller: Identity, reference: Any, xpath: str) -> Any:
        entry = yield self._entry(caller, reference)
        return resource.query_resource_properties(entry, xpath or "", self.clock())

    # Plants -------------------------------------------------------------------
    def plants_status(self) -> list[PlantStatus]:
        return [_plant_out(handle) for handle in self.plants.all()]

    def plants_list(self, caller: Identity | None = None) -> defer.Deferred[Any]:
        """The plants and their health (any identity may ask)."""
        return self.plants.check_all(min(5.0, self.config.call_timeout)).addCallback(lambda _: self.plants_status())

    def reload_plants(self, caller: Identity) -> defer.Deferred[Any]:
        """Re-read the plant list (admins only) and check every plant."""
        authz.require(caller, (authz.ADMIN,), "reload the plant list")
        return self.reload_plant_list()

    def reload_plant_list(self) -> defer.Deferred[Any]:
        """Re-read the plant list (on a thread) and check every plant (SIGHUP; ConfigurationError for a bad
        file, which keeps the list in force)."""
        return self._in_thread(self.plants.read_urls).addCallback(self.plants.apply).addCallback(
            lambda _: self.plants_list())

    # Timers -------------------------------------------------------------------
    @defer.inlineCallbacks
    def enforce_leases(self) -> Any:
        """Collect every VM whose termination time has passed (the timer survives restarts: it reads the registry).

        Each due VM is first claimed in the registry, so among shops sharing it one collects it; a claim whose
        collect failed is given back for a later round, and one its shop never ended (it died) expires."""
        now = self.clock()
        expiry = max(self.config.dead_after, 2 * self.config.call_timeout)
        due = yield self._in_thread(self.registry.claim_due, now, self.name, now - expiry)
        for entry in due:
            if entry.vm_id in self._collecting or entry.vm_id in self._creating or entry.state in CREATING_STATES:
                yield self._in_thread(self.registry.release_claim, entry.vm_id, self.name)
                continue
            try:
                yield self._collect_entry(entry)
                log.info("lease of VM %s ran out: collected", entry.vm_id)
            except VMShopError as exc:
                log.warning("lease of VM %s ran out, but collecting it failed: %s", entry.vm_id, exc)
                if not isinstance(exc, RegistryUnavailableError):
                    yield self._in_thread(self.registry.release_claim, entry.vm_id, self.name)

    @defer.inlineCallbacks
    def refresh(self) -> Any:
        """Check every plant and bring the registry's states up to date with what the plants report.

        Also says this shop is alive (its heartbeat), and removes entries left in ``placing`` that this shop
        resolves (:meth:`_resolves`: a stop cut their bidding short, so no plant was asked and no plant holds
        them).
        """
        yield self._in_thread(self.registry.heartbeat, self.name, self.clock())
        yield self._learn_shops()
        placing = yield self._in_thread(self.registry.query, "state=placing", None)
        for entry in placing:
            if self._resolves(entry):
                log.info("VM %s: its placing (by shop %s) was cut short by a stop: removed", entry.vm_id,
                         entry.shop or "(unnamed)")
                yield self._in_thread(self._forget_create, entry)
        yield self.plants.check_all(min(5.0, self.config.call_timeout))
        for handle in self.plants.all():
            if handle.up:
                yield self._refresh_plant(handle)

    @defer.inlineCallbacks
    def _learn_shops(self) -> Any:
        """Read which shops share the registry: which are alive (by heartbeat) and their certificate subjects."""
        shops = yield self._in_thread(self.registry.shops)
        self._alive_shops = shops_alive(shops, self.clock(), self.config.dead_after) - {self.name}
        self._shop_identities = {self.identity} | {shop.identity for shop in shops if shop.identity}

    def _resolves(self, entry: VMEntry) -> bool:
        """Whether this shop resolves an entry a create left in ``placing``/``creating``: one of its own with no
        create of this process behind it (a stop cut it short), or one whose shop is dead (no heartbeat for
        ``dead-after`` seconds), or one no shop is named for (written before shops were named)."""
        if entry.vm_id in self._creating:
            return False
        if entry.shop is None or entry.shop == self.name:
            return True
        return self._alive_shops is not None and entry.shop not in self._alive_shops

    def _forget_create(self, entry: VMEntry) -> None:
        """Remove an unfinished create's entry (blocking), only if it still is that shop's unfinished create."""
        if entry.shop is not None:
            self.registry.delete_owned(entry.vm_id, entry.shop)
            return
        try:
            self.registry.delete(entry.vm_id)
        except NoSuchVMError:
            pass

    def plant_changed(self, caller: Identity, url: str, offer: Any = None) -> bool:
        """A plant says some of its VMs changed: look at that plant soon (the answer does not wait for it).
        With ``offer``, the plant's new offer: validated and taken (offers mode; a bad one is refused with
        Client.OfferInvalid and logged, and the offer held before stays).

        Heard only from that plant's own identity (one whose authorisation-file line lists its address) or
        an admin (else NotAuthorizedError), and only for plants on this shop's list (else NoSuchPlantError).
        What the registry takes is what the plant itself reports when asked, never the notice. Notices
        that arrive while that plant is being looked at make one more look. Returns True.
        """
        if not authz.may_notify(caller, url):
            log.warning("a notice%s for plant %s from %s refused: not that plant's identity",
                        " with an offer" if offer is not None else "", url[:200], caller.name)
            raise NotAuthorizedError(f"{caller.name} may not send notices for the plant at {url[:200]!r}: only "
                                     "the plant whose address its authorisation-file line lists")
        wanted = _normal_url(url)
        handle = next((h for h in self.plants.all() if _normal_url(h.url) == wanted), None)
        if handle is None:
            raise NoSuchPlantError(f"{url!r} is not one of this shop's plants")
        self._look(handle)
        if offer is not None and not self.live_bids:
            try:
                self.offers.take(handle.url, offer)
            except OfferInvalidError:
                log.warning("offer pushed by %s (as %s) refused", handle.url, caller.name)
                raise
        return True

    def _look(self, handle: Any) -> None:
        """Look at one plant's VMs soon; coalesces looks asked for while one runs."""
        if handle.url in self._looking:
            self._look_again.add(handle.url)
            return
        self._looking.add(handle.url)

        def look() -> defer.Deferred[Any]:
            return self._refresh_plant(handle)

        def done(_: Any) -> None:
            self._looking.discard(handle.url)
            if handle.url in self._look_again:
                self._look_again.discard(handle.url)
                self._look(handle)

        self._safely(look).addBoth(done)

    @defer.inlineCallbacks
    def _refresh_plant(self, handle: Any) -> Any:
        """Bring the registry's entries for one plant up to date with its ``listVMs`` (docs/consistency.md).

        - An entry the plant reports on is given the plant's state.
        - An entry left in ``creating`` by a stopped shop (no create of this
          process runs for it) is adopted once the plant made the VM; removed
          when the plant has no such VM, or failed or collected it; and
          cancelled at the plant and removed once it is older than the create
          timeout and one poll interval.
        - A live VM the plant holds for this shop that the registry does not
          want on this plant (no entry, an entry on another plant, or an
          ended one) is collected there, once it is older than the grace.
        """
        seen = self.registry.clock()  # the clock the registry stamps its changes with
        try:
            vms = yield handle.client.call("listVMs", include_collected=True)
        except Exception as exc:  # noqa: BLE001
            self.plants.mark(handle, False, describe_failure(exc)[1])
            return
        self.plants.mark(handle, True)
        reported = {vm.vm_id: vm for vm in vms or []}
        entries = yield self._in_thread(self.registry.query, f'plant="{handle.url}"', None)
        wanted: set[str] = set()
        for entry in entries:
            if entry.collected is None and entry.state not in ("collected", "failed"):
                wanted.add(entry.plant_vm_id or entry.vm_id)
            if entry.collected is not None or entry.vm_id in self._creating or entry.vm_id in self._collecting:
                continue
            vm = reported.get(entry.plant_vm_id or "")
            if entry.state in CREATING_STATES:
                if self._resolves(entry):  # another live shop's create in progress is that shop's to finish
                    yield self._resolve_create(handle, entry, vm, seen)
                continue
            if vm is None:
                continue
            changes: dict[str, Any] = {}
            if vm.state != entry.state:
                changes["state"] = vm.state
            if vm.state in ("collected", "failed"):
                changes["collected"] = vm.collected or self.clock()
                changes["error"] = vm.error
            if changes:
                # A create or collect that ended since the plant's report was taken wins over it.
                yield self._in_thread(self.registry.update_if_unchanged, entry.vm_id, seen, **changes)
        grace = max(2 * self.config.poll_interval, 1.0)
        for vm in reported.values():
            if (vm.state in ("collected", "failed", "collecting") or vm.vm_id in wanted or vm.vm_id in self._creating
                    or not any(same_identity(vm.shop or "", identity) for identity in self._shop_identities)
                    or (vm.created or 0) > self.clock() - grace):
                continue
            log.warning("plant %s holds VM %s (%s) for this shop, which the registry does not want there: "
                        "collecting it", handle.url, vm.vm_id, vm.state)
            handle.client.call("collectVM", vm_id=vm.vm_id).addErrback(
                lambda failure, vm_id=vm.vm_id: log.warning("collecting unwanted VM %s on %s failed: %s", vm_id,
                                                            handle.url, describe_failure(failure.value)[1]))

    @defer.inlineCallbacks
    def _resolve_create(self, handle: Any, entry: VMEntry, vm: Any, seen: float) -> Any:
        """An entry left in ``placing``/``creating`` with no create of this process behind it (a restart)."""
        if vm is not None and vm.made and vm.state not in ("collected", "failed", "collecting"):
            log.info("VM %s: its create on %s finished while the shop was away: adopted", entry.vm_id, handle.url)
            yield self._in_thread(self.registry.update_if_unchanged, entry.vm_id, seen, state=vm.state,
                                  address=vm.address, host_port=vm.host_port, image=vm.image, memory=vm.memory,
                                  vcpus=vm.vcpus, disk=vm.disk, arch=vm.arch, steps=list(vm.steps or []))
            return
        if vm is None or vm.state in ("collected", "failed", "collecting"):
            log.info("VM %s: its create on %s was cut short (%s): removed", entry.vm_id, handle.url,
                     "no such VM there" if vm is None else vm.state)
            yield self._in_thread(self._forget_create, entry)
            return
        if entry.updated < self.clock() - self.config.create_timeout - self.config.poll_interval:
            log.warning("VM %s: its create on %s outlived the create timeout: cancelled and removed", entry.vm_id,
                        handle.url)
            handle.client.call("collectVM", vm_id=entry.plant_vm_id or entry.vm_id).addErrback(lambda _: None)
            yield self._in_thread(self._forget_create, entry)

    # Output -------------------------------------------------------------------
    def vm_out(self, entry: VMEntry) -> VMInfo:
        attributes = [spyne_record(Attribute, name=k, value=v) for k, v in sorted(entry.attributes.items())]
        return spyne_record(VMInfo, epr=self.epr(entry.vm_id), vm_id=entry.vm_id, owner=entry.owner,
                            state=entry.state, plant=entry.plant, plant_vm_id=entry.plant_vm_id, image=entry.image,
                            memory=entry.memory, vcpus=entry.vcpus, disk=entry.disk, arch=entry.arch,
                            address=entry.address, host_port=entry.host_port, created=entry.created,
                            updated=entry.updated, termination=entry.termination, collected=entry.collected,
                            cost=entry.cost, error=entry.error, steps=list(entry.steps or []), attributes=attributes)


def _items_out(items: Any) -> list[CostItem]:
    """A cost breakdown as wire records (the fast serialiser writes records; other objects take Spyne's slower
    path, with the same bytes)."""
    return [spyne_record(CostItem, label=i.label, seconds=i.seconds, source=i.source, node=i.node) for i in items]


def _bid_out(bid: BidResult, full: bool = True) -> Bid:
    """One bid on the wire; its cost breakdown only when ``full`` or asked live (offers mode answers for every
    plant: the breakdown of the best is in the answer itself)."""
    items = _items_out(bid.items) if full or bid.source == "live" else []
    return spyne_record(Bid, plant=bid.plant, status=bid.status, cost=bid.cost, image=bid.image, reason=bid.reason,
                        seconds=bid.seconds, items=items, source=bid.source, offer_age=bid.offer_age,
                        offer_version=bid.offer_version, marked_down=bid.marked_down or None)


def _run_out(run: Any) -> ActionRun:
    return ActionRun(node=run.node, status=run.status, ok=run.ok, timed_out=run.timed_out, seconds=run.seconds,
                     output=run.output)


def _plant_out(handle: Any) -> PlantStatus:
    info = handle.info
    return PlantStatus(address=handle.url, up=handle.up, name=getattr(info, "name", None),
                       backend=getattr(info, "backend", None), accelerator=getattr(info, "accelerator", None),
                       running_vms=getattr(info, "running_vms", None), capacity_vms=getattr(info, "capacity_vms", None),
                       free_memory=getattr(info, "free_memory", None), images=list(getattr(info, "images", None) or []),
                       last_error=handle.last_error, last_seen=handle.last_seen)


def _own_identity(config: ShopConfig) -> str:
    """The subject DN of the shop's certificate (what its plants record as the VMs' shop); 'anonymous' without TLS."""
    tls = getattr(getattr(config, "security", None), "tls", None)
    if tls is None:
        return authz.ANONYMOUS.name
    from cryptography import x509

    try:
        return x509.load_pem_x509_certificate(Path(tls.cert).read_bytes()).subject.rfc4514_string()
    except (OSError, ValueError):
        return ""


def same_identity(recorded: str, mine: str) -> bool:
    """Whether a plant's record of who asked for a VM (a subject DN, or a name without TLS) is this shop."""
    if not recorded or not mine:
        return False
    if recorded == mine:
        return True
    try:
        return authz.canonical_dn(recorded) == authz.canonical_dn(mine)
    except ValueError:
        return False


def _normal_url(url: str) -> str:
    """``url`` for comparison: scheme and host lower-case, one trailing slash."""
    parts = urlsplit(url.strip())
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}{parts.path.rstrip('/')}/"
