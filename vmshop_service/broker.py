"""Choosing a plant: bids (priced from offers, or asked for live), filtered, then weighed.

In offers mode (the default) the shop prices most bids itself from the plants' offers
(:mod:`.offers`) and asks live only the plants it has no offer of; in live mode
(``bids="live"``) :func:`call_for_bids` asks every plant concurrently, each with its own
timeout; every plant's answer becomes a :class:`BidResult` whatever
happened (a bid, a decline, a timeout, a fault, a plant that is down).
:func:`rank` keeps the bids that pass every filter (:data:`FILTERS`) and
orders them by the weighers (:data:`WEIGHERS`): cost first, then load. The
shop creates on the first and falls back to the next when a plant fails.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer

from .plants import PlantDirectory, PlantHandle, describe_failure


@dataclass(frozen=True)
class BidResult:
    """One plant's answer. ``status``: 'bid', 'declined', 'timeout', 'fault' or 'down'."""

    plant: str
    status: str
    cost: float | None = None
    image: str | None = None
    reason: str | None = None
    seconds: float = 0.0
    load: int = 0
    items: tuple[Any, ...] = field(default=(), compare=False)
    remaining: tuple[str, ...] = ()
    memory: int | None = None  # the VM's hardware on this plant (for quotas)
    vcpus: int | None = None
    source: str = "live"  # 'live': the plant's own answer; 'offer': priced here from its offer
    offer_age: float | None = None  # seconds since the offer was received or confirmed
    offer_version: int | None = None
    marked_down: bool = False  # its offer proved wrong lately: ranked after the others


def call_for_bids(directory: PlantDirectory, dag_xml: str, timeout: float,
                  clock: Callable[[], float] = time.monotonic,
                  handles: Sequence[PlantHandle] | None = None, owner: str = "") -> defer.Deferred[list[BidResult]]:
    """Every plant's (or every one of ``handles``') answer to ``estimateCost`` for a VM ``owner`` would own
    (plants bid with the public images and that owner's own), asked concurrently; never fails."""
    asked = directory.all() if handles is None else handles
    return defer.gatherResults([_ask(directory, handle, dag_xml, timeout, clock, owner) for handle in asked])


def _ask(directory: PlantDirectory, handle: PlantHandle, dag_xml: str, timeout: float,
         clock: Callable[[], float], owner: str = "") -> defer.Deferred[BidResult]:
    started = clock()
    d = handle.client.call_with_timeout(timeout, "estimateCost", dag=dag_xml, owner=owner or None)

    def answered(estimate: Any) -> BidResult:
        directory.mark(handle, True)
        took = round(clock() - started, 6)
        if not estimate.accepted:
            return BidResult(handle.url, "declined", reason=estimate.reason, seconds=took, load=handle.load)
        return BidResult(handle.url, "bid", cost=float(estimate.cost), image=estimate.image, seconds=took,
                         load=handle.load, items=tuple(estimate.items or ()),
                         remaining=tuple(estimate.remaining or ()),
                         memory=getattr(estimate, "memory", None), vcpus=getattr(estimate, "vcpus", None))

    def failed(failure: Any) -> BidResult:
        status, reason = describe_failure(failure)
        if status != "fault":
            directory.mark(handle, False, reason)
        return BidResult(handle.url, status, reason=reason, seconds=round(clock() - started, 6), load=handle.load)

    return d.addCallbacks(answered, failed)


# Filters: a bid passes when every filter returns None; else the reason it fails.
def has_bid(bid: BidResult) -> str | None:
    return None if bid.status == "bid" else (bid.reason or bid.status)


def has_cost(bid: BidResult) -> str | None:
    return None if bid.cost is not None and bid.cost >= 0 else "the bid has no valid cost"


FILTERS: tuple[Callable[[BidResult], str | None], ...] = (has_bid, has_cost)


# Weighers: smaller is better; compared in order (a plant whose offer proved wrong lately last, then cost, then
# load, then the URL for a stable order).
def by_standing(bid: BidResult) -> int:
    return 1 if bid.marked_down else 0


def by_cost(bid: BidResult) -> float:
    return float(bid.cost or 0.0)


def by_load(bid: BidResult) -> float:
    return float(bid.load)


def by_name(bid: BidResult) -> str:
    return bid.plant


WEIGHERS: tuple[Callable[[BidResult], Any], ...] = (by_standing, by_cost, by_load, by_name)


def rejection(bid: BidResult) -> str | None:
    """Why ``bid`` fails the filters, or None when it passes."""
    for check in FILTERS:
        reason = check(bid)
        if reason is not None:
            return reason
    return None


def rank(bids: Sequence[BidResult]) -> list[BidResult]:
    """The bids that pass every filter, best first."""
    eligible = [bid for bid in bids if rejection(bid) is None]
    return sorted(eligible, key=lambda bid: tuple(weigh(bid) for weigh in WEIGHERS))
