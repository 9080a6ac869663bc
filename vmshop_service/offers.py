"""The plants' offers, as this shop holds them, and its bids priced from them.

Offers arrive two ways: pushed by a plant with its ``plantChanged`` notice
(heard only from that plant's identity: :meth:`Shop.plant_changed`), and
pulled (``getOffer``) at start-up, on the slow offer timer
(``<offers refresh>``) and when a plant's offer proved wrong. Every offer is
validated (:func:`vmshop_common.offers.offer_from_wire`); a refused one is
logged and the one held before stays. An offer older (by version) than the
one held is ignored. Catalogs are parsed once per distinct content.

:meth:`OfferBook.bids` prices a request against every offer held, with the
plants' own cost code (:class:`vmshop_common.offers.Pricing`: one matching
per distinct catalog). A plant with no offer gets no priced bid: the broker
asks it live instead, so a missing offer never stops placement. A plant
whose live price exceeded its offer is marked down (ranked after every
other plant) for ``<offers penalty>`` seconds. Everything runs in the
reactor thread.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer

from vmshop_common.cost import Bid
from vmshop_common.dag import Dag
from vmshop_common.errors import OfferInvalidError
from vmshop_common.offers import CatalogCache, Offer, Pricing, offer_from_wire, pricing_key

from .broker import BidResult
from .plants import PlantDirectory, PlantHandle, describe_failure

log = logging.getLogger(__name__)
#: Requests whose matchings (per catalog) are kept.
MATCHINGS = 256


@dataclass
class _Class:
    """Plants whose offers price alike: their URLs (sorted lazily) and one of their offers."""

    offer: Offer
    urls: set[str] = field(default_factory=set)
    _sorted: list[str] | None = None

    def ordered(self) -> list[str]:
        if self._sorted is None:
            self._sorted = sorted(self.urls)
        return self._sorted

    def add(self, url: str) -> None:
        self.urls.add(url)
        self._sorted = None

    def discard(self, url: str) -> None:
        self.urls.discard(url)
        self._sorted = None


@dataclass
class _Group:
    """A priced class (or one plant with creates in flight): its bid or decline and its plants, in URL order."""

    result: Bid | Any
    urls: list[str]
    offer: Offer


class Priced:
    """A request priced against the offers: bids made only for the plants a caller takes (best first)."""

    def __init__(self, book: OfferBook, groups: list[_Group], unpriced: list[PlantHandle], listed: set[str]) -> None:
        self.book = book
        self.unpriced = unpriced
        self._listed = listed
        self.accepted = sorted((g for g in groups if isinstance(g.result, Bid)),
                               key=lambda g: (g.result.cost, g.offer.live))
        self.declined = [g for g in groups if not isinstance(g.result, Bid)]
        self.bidders = sum(len(g.urls) for g in self.accepted)
        self.decliners = sum(len(g.urls) for g in self.declined)

    def ranked(self) -> Iterator[BidResult]:
        """The accepted bids, best first (cost, then load, then URL; plants marked down after all others)."""
        marked: list[tuple[_Group, str]] = []
        for group in self.accepted:
            for url in group.urls:
                if self.book.marked_down(url):
                    marked.append((group, url))
                else:
                    yield self._bid(group, url, False)
        for group, url in marked:
            yield self._bid(group, url, True)

    def declines(self) -> Iterator[BidResult]:
        for group in self.declined:
            for url in group.urls:
                yield self._bid(group, url, self.book.marked_down(url))

    def _bid(self, group: _Group, url: str, marked: bool) -> BidResult:
        offer = self.book.offers.get(url, group.offer)
        age = round(max(0.0, self.book.clock() - offer.received), 3)
        result = group.result
        if isinstance(result, Bid):
            return BidResult(url, "bid", cost=result.cost, image=result.image, load=offer.live, items=result.items,
                             remaining=result.remaining, memory=result.memory, vcpus=result.vcpus, source="offer",
                             offer_age=age, offer_version=offer.version, marked_down=marked)
        return BidResult(url, "declined", reason=result.reason, load=offer.live, source="offer", offer_age=age,
                         offer_version=offer.version, marked_down=marked)


class OfferBook:
    """The offers of a shop's plants, by plant URL, and the plants grouped by what their prices depend on."""

    def __init__(self, directory: PlantDirectory, clock: Callable[[], float], penalty: float = 300.0,
                 timeout: float = 10.0) -> None:
        self.directory = directory
        self.clock = clock
        self.penalty = penalty
        self.timeout = timeout
        self.catalogs = CatalogCache()
        self.offers: dict[str, Offer] = {}
        self.inflight: dict[str, int] = {}  # creates this shop has asked a plant for and not yet heard back
        self._marked: dict[str, float] = {}  # plant URL -> until when it is marked down
        self._classes: dict[tuple[Any, ...], _Class] = {}
        self._class_of: dict[str, tuple[Any, ...]] = {}
        # Matchings by request (the shop keeps each accepted DAG text's Dag object, so a repeated request is
        # the same object; the entry holds it, so its id is not reused while the entry lives).
        self._matchings: OrderedDict[int, tuple[Dag, dict[str, Any]]] = OrderedDict()
        self.refused = 0

    # Taking offers --------------------------------------------------------------
    def take(self, url: str, data: Any) -> Offer:
        """Validate and keep the offer ``data`` for the plant at ``url`` (OfferInvalidError, logged, if it is
        bad: the offer held before stays). An offer of an older version than the one held is not taken."""
        try:
            offer = offer_from_wire(data, url, self.catalogs, self.clock())
        except OfferInvalidError as exc:
            self.refused += 1
            log.warning("offer from plant %s refused: %s", url, exc.message)
            raise
        held = self.offers.get(url)
        if held is not None and offer.version < held.version:
            log.info("offer version %s from plant %s is older than the one held (%s): ignored", offer.version, url,
                     held.version)
            return held
        if held is not None and offer.version == held.version:
            held.received = offer.received  # confirmed: as fresh as now
            return held
        self._set(url, offer)
        return offer

    def _set(self, url: str, offer: Offer | None) -> None:
        old = self._class_of.pop(url, None)
        if old is not None:
            former = self._classes[old]
            former.discard(url)
            if not former.urls:
                del self._classes[old]
        if offer is None:
            self.offers.pop(url, None)
            return
        self.offers[url] = offer
        key = pricing_key(offer)
        joined = self._classes.get(key)
        if joined is None:
            joined = self._classes[key] = _Class(offer)
        joined.add(url)
        self._class_of[url] = key

    def pull(self, handle: PlantHandle) -> defer.Deferred[Offer | None]:
        """Ask one plant for its offer (``getOffer``); never fails (None when there is none to take)."""
        d = handle.client.call_with_timeout(self.timeout, "getOffer")

        def got(data: Any) -> Offer | None:
            self.directory.mark(handle, True)
            try:
                return self.take(handle.url, data)
            except OfferInvalidError:
                return None

        def failed(failure: Any) -> None:
            status, reason = describe_failure(failure)
            if status != "fault":
                self.directory.mark(handle, False, reason)
            else:
                log.warning("plant %s gave no offer: %s", handle.url, reason)

        return d.addCallbacks(got, failed)

    def pull_all(self) -> defer.Deferred[Any]:
        """Pull every plant's offer (start-up and the slow timer); forget those of plants no longer listed."""
        urls = {handle.url for handle in self.directory.all()}
        for url in [u for u in self.offers if u not in urls]:
            self._set(url, None)
        self.catalogs.forget_unused(offer.catalog.digest for offer in self.offers.values())
        return defer.gatherResults([self.pull(handle) for handle in self.directory.all()])

    # Standing -------------------------------------------------------------------
    def mark_down(self, url: str, why: str) -> None:
        """The plant's offer proved wrong: rank it after the others for :attr:`penalty` seconds."""
        self._marked[url] = self.clock() + self.penalty
        log.warning("plant %s is marked down for %g s: %s", url, self.penalty, why)

    def marked_down(self, url: str) -> bool:
        if not self._marked:
            return False
        until = self._marked.get(url)
        if until is None:
            return False
        if until <= self.clock():
            del self._marked[url]
            return False
        return True

    # Pricing --------------------------------------------------------------------
    def price(self, dag: Dag, handles: Iterable[PlantHandle], owner: str = "") -> Priced:
        """``dag`` (a VM ``owner`` would own: priced against the public images and ``owner``'s own) priced from
        the offers of ``handles``' plants: once per class of alike offers (a plant with creates of this shop in
        flight is priced on its own, with them counted); the plants with no offer are :attr:`Priced.unpriced`
        (to ask live)."""
        kept = self._matchings.get(id(dag))
        if kept is None or kept[0] is not dag:
            kept = self._matchings[id(dag)] = (dag, {})
            while len(self._matchings) > MATCHINGS:
                self._matchings.popitem(last=False)
        pricing = Pricing(dag, kept[1], owner)
        handles = list(handles)
        listed = {handle.url for handle in handles}
        unpriced = [handle for handle in handles if handle.url not in self.offers]
        busy = {url for url in self.inflight if url in listed and url in self.offers}
        everyone = not busy and listed.issuperset(self.offers)
        groups: list[_Group] = []
        for group in self._classes.values():
            urls = group.ordered() if everyone else [url for url in group.ordered()
                                                    if url in listed and url not in busy]
            if urls:
                groups.append(_Group(pricing.price(group.offer), urls, group.offer))
        for url in sorted(busy):
            offer = self.offers[url]
            groups.append(_Group(pricing.price(offer, self.inflight[url]), [url], offer))
        return Priced(self, groups, unpriced, listed)
