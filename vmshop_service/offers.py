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
from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet import defer

from vmshop_common.cost import Bid
from vmshop_common.dag import Dag
from vmshop_common.errors import OfferInvalidError
from vmshop_common.offers import CatalogCache, Offer, Pricing, offer_from_wire

from .broker import BidResult
from .plants import PlantDirectory, PlantHandle, describe_failure

log = logging.getLogger(__name__)


class OfferBook:
    """The offers of a shop's plants, by plant URL."""

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
        self.offers[url] = offer
        return offer

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
            del self.offers[url]
        self.catalogs.forget_unused(offer.catalog.digest for offer in self.offers.values())
        return defer.gatherResults([self.pull(handle) for handle in self.directory.all()])

    # Standing -------------------------------------------------------------------
    def mark_down(self, url: str, why: str) -> None:
        """The plant's offer proved wrong: rank it after the others for :attr:`penalty` seconds."""
        self._marked[url] = self.clock() + self.penalty
        log.warning("plant %s is marked down for %g s: %s", url, self.penalty, why)

    def marked_down(self, url: str) -> bool:
        until = self._marked.get(url)
        if until is None:
            return False
        if until <= self.clock():
            del self._marked[url]
            return False
        return True

    # Pricing --------------------------------------------------------------------
    def bids(self, dag: Dag, handles: Iterable[PlantHandle]) -> tuple[list[BidResult], list[PlantHandle]]:
        """Bids priced from the offers of ``handles``' plants, and the plants that have no offer (to ask live)."""
        pricing = Pricing(dag)
        now = self.clock()
        priced: list[BidResult] = []
        unpriced: list[PlantHandle] = []
        for handle in handles:
            offer = self.offers.get(handle.url)
            if offer is None:
                unpriced.append(handle)
                continue
            age = round(max(0.0, now - offer.received), 3)
            result = pricing.price(offer, self.inflight.get(handle.url, 0))
            load = max(offer.live, handle.load)
            penalized = self.marked_down(handle.url)
            if isinstance(result, Bid):
                priced.append(BidResult(handle.url, "bid", cost=result.cost, image=result.image, load=load,
                                        items=result.items, remaining=result.remaining, memory=result.memory,
                                        vcpus=result.vcpus, source="offer", offer_age=age,
                                        offer_version=offer.version, marked_down=penalized))
            else:
                priced.append(BidResult(handle.url, "declined", reason=result.reason, load=load, source="offer",
                                        offer_age=age, offer_version=offer.version, marked_down=penalized))
        return priced, unpriced
