"""The cost model a plant bids with.

cost = clone cost + boot cost + the sum of the remaining actions' expected
seconds + a load term. An action's expected seconds come, in this order of
preference, from the plant's history of measured runs of that step
(``history``), from the DAG's ``cost`` hint, or from ``default_seconds``.
The boot cost is the image's own measured boot (``image_boot_seconds``: a
Debian cloud image boots far slower than tiny), else ``boot_seconds``. An
image the plant must first fetch from a peer (``transfer_seconds``: the
seconds that fetch takes, measured or estimated by the plant) costs that
too, as a 'transfer' item.
Among the images that can serve a request, the bid uses the one whose
boot and remaining actions cost least (ties: the one that embodies more
steps, then the name); images the plant cannot run (``unfit``, with the
reason) are passed over. Every figure of the sum is kept in the bid's
breakdown.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from .dag import Action, Dag
from .errors import NoSuchImageError
from .matching import CachedImage, Match, candidates, flatten
from .steps import step_digest

DEFAULT_ACTION_SECONDS = 5.0


class StepHistory(Protocol):
    """Measured durations of steps on one plant (the plant's records implement it)."""

    def expected_seconds(self, digest: str) -> float | None:
        """Expected seconds of the step with ``digest``, or None if it was never measured."""


@dataclass(frozen=True)
class CostItem:
    """One term of a bid: what it is for, its seconds, and where the figure came from.

    ``source`` is one of 'clone', 'transfer', 'boot', 'history', 'hint', 'default', 'load'.
    """

    label: str
    seconds: float
    source: str
    node: str | None = None
    digest: str | None = None


@dataclass(frozen=True)
class Bid:
    """An offer to make the VM: the image to clone, what remains, and the cost's breakdown."""

    image: str
    cost: float
    items: tuple[CostItem, ...]
    remaining: tuple[str, ...]
    matched: int
    memory: int | None = None  # MiB the VM gets (the image's, or the DAG's override)
    vcpus: int | None = None

    @property
    def action_seconds(self) -> float:
        return sum(item.seconds for item in self.items if item.source in ("history", "hint", "default"))


@dataclass(frozen=True)
class Decline:
    """A refusal to bid, with the reason (and each image's own reason)."""

    reason: str
    reasons: dict[str, str] = field(default_factory=dict)


@dataclass
class CostModel:
    """A plant's costs. ``clone_seconds`` and ``boot_seconds`` are measured by the plant."""

    clone_seconds: float = 0.05
    boot_seconds: float = 0.0
    default_seconds: float = DEFAULT_ACTION_SECONDS
    history: StepHistory | None = None
    image_boot_seconds: Mapping[str, float] = field(default_factory=dict)
    #: Seconds fetching each image a peer holds (and this plant lacks) takes; images not named are here.
    transfer_seconds: Mapping[str, float] = field(default_factory=dict)

    def boot_of(self, image: str) -> float:
        """The boot seconds of ``image``: its own measurement, else the plant's."""
        return self.image_boot_seconds.get(image, self.boot_seconds)

    def action_item(self, action: Action, digest: str | None = None) -> CostItem:
        """The expected seconds of one action, with their source (``digest``: its step digest, if known)."""
        digest = digest or step_digest(action)
        measured = self.history.expected_seconds(digest) if self.history is not None else None
        if measured is not None:
            return CostItem(f"{action.kind} {action.id}", float(measured), "history", action.id, digest)
        if action.cost is not None:
            return CostItem(f"{action.kind} {action.id}", float(action.cost), "hint", action.id, digest)
        return CostItem(f"{action.kind} {action.id}", self.default_seconds, "default", action.id, digest)

    def estimate(self, request: Dag, images: Iterable[CachedImage], load_seconds: float = 0.0,
                 unfit: Mapping[str, str] | None = None) -> Bid | Decline:
        """The bid for ``request`` on the best image, or a :class:`Decline` saying why none serves.

        ``unfit`` maps images that cannot run this request here to the reason;
        they still count as lineages, but are never bid with.
        """
        matched = pass_over(match_request(request, images), unfit)
        if isinstance(matched, Decline):
            return matched
        return self.price(matched, load_seconds)

    def price(self, matched: Matched, load_seconds: float = 0.0) -> Bid:
        """The bid on the best of ``matched``'s images with this plant's costs (the matching is not repeated:
        a shop prices one match against many plants' offers). Each image counts its own boot seconds."""
        flat = matched.flat
        digests = matched.digests
        best: tuple[float, int, str] | None = None
        chosen: tuple[Match, list[CostItem]] | None = None
        for match in matched.matches:
            items = [self.action_item(flat.nodes[node_id], digests.get(node_id))  # type: ignore[arg-type]
                     for node_id in match.remaining]
            seconds = (sum(item.seconds for item in items) + self.boot_of(match.image)
                       + self.transfer_seconds.get(match.image, 0.0))
            key = (seconds, -len(match.matched), match.image)
            if best is None or key < best:
                best, chosen = key, (match, items)
        assert chosen is not None
        match, items = chosen
        terms = [CostItem(f"clone {match.image}", self.clone_seconds, "clone")]
        transfer = self.transfer_seconds.get(match.image)
        if transfer is not None:
            terms.insert(0, CostItem(f"fetch {match.image}", transfer, "transfer"))
        boot = self.boot_of(match.image)
        if boot:
            terms.append(CostItem("boot", boot, "boot"))
        terms.extend(items)
        if load_seconds:
            terms.append(CostItem("load", load_seconds, "load"))
        hardware = matched.hardware
        return Bid(image=match.image, cost=round(sum(t.seconds for t in terms), 6), items=tuple(terms),
                   remaining=match.remaining, matched=len(match.matched),
                   memory=hardware.memory if hardware else None, vcpus=hardware.vcpus if hardware else None)


@dataclass(frozen=True)
class Matched:
    """The images that can serve a request (at least one), and the request flattened against their lineages."""

    flat: Dag
    matches: tuple[Match, ...]
    digests: dict[str, str] = field(default_factory=dict)  # step digests of the actions left to do, by node id
    hardware: Any = None  # the flattened request's hardware
    reasons: dict[str, str] = field(default_factory=dict)  # why the other images cannot serve it

    def __post_init__(self) -> None:
        if self.hardware is None:
            object.__setattr__(self, "hardware", getattr(self.flat.start, "hardware", None))


def match_request(request: Dag, images: Iterable[CachedImage]) -> Matched | Decline:
    """The matching half of a bid: which images can serve ``request`` (a :class:`Decline` if none can).

    It depends only on the images (a catalog), never on a plant's costs: plants with the same catalog share
    one result (:mod:`vmshop_common.offers`).
    """
    pool = list(images)
    try:
        matches, reasons = candidates(request, pool)
    except NoSuchImageError as exc:
        return Decline(exc.message)
    if not matches:
        if not pool:
            return Decline("the warehouse has no cached images")
        detail = "; ".join(f"{name}: {why}" for name, why in sorted(reasons.items()))
        return Decline(f"no cached image embodies a prefix of this DAG ({detail})", reasons)
    flat = flatten(request, {image.name: image.dag for image in pool})
    remaining = {node_id for match in matches for node_id in match.remaining}
    return Matched(flat, tuple(matches), {node_id: step_digest(flat.nodes[node_id])  # type: ignore[arg-type]
                                          for node_id in remaining}, reasons=dict(reasons))


def pass_over(matched: Matched | Decline, unfit: Mapping[str, str] | None) -> Matched | Decline:
    """``matched`` without the images in ``unfit`` (image -> why it cannot run the request on this plant), or a
    :class:`Decline` if no image is left. The matching itself is the catalog's; fitness is a plant's."""
    if isinstance(matched, Decline) or not unfit:
        return matched
    passed_over = {m.image: unfit[m.image] for m in matched.matches if m.image in unfit}
    if not passed_over:
        return matched
    reasons = {**matched.reasons, **passed_over}
    matches = tuple(m for m in matched.matches if m.image not in passed_over)
    if not matches:
        detail = "; ".join(f"image '{name}': {why}" for name, why in sorted(passed_over.items()))
        return Decline(f"no image that can serve this DAG runs it here ({detail})", reasons)
    return Matched(matched.flat, matches, matched.digests, matched.hardware, reasons)
