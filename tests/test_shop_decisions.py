"""The shop's decisions, as unit tests: time is a ``task.Clock``, plants are scripted, no process, no socket.

Ranking (filter, then weigh), falling back to the next bidder when the
chosen plant fails or times out, lease expiry, and the coalescing of a
plant's notices. The real :class:`~vmshop_service.shop.Shop` runs with an
in-memory registry whose clock is the same ``task.Clock``; its thread-pool
work runs inline.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import zeep.exceptions
from twisted.internet import defer, task

from vmshop_common.authz import ADMIN, USER, Identity
from vmshop_common.errors import NoPlantError, NoSuchPlantError, NotAuthorizedError
from vmshop_service.broker import BidResult, rank, rejection
from vmshop_service.config import ShopConfig
from vmshop_service.plants import PlantHandle
from vmshop_service.registry import Registry, VMEntry
from vmshop_service.shop import Shop

ROOT = Path(__file__).resolve().parent.parent
DAG = (ROOT / "scripts" / "sample_workflow.xml").read_text()
ADMIN_ID = Identity("admin", frozenset({ADMIN}))
ALICE = Identity("alice", frozenset({USER}))
START = 1_800_000_000.0  # the clock's epoch seconds when a test starts
BID_TIMEOUT, CREATE_TIMEOUT = 10.0, 60.0


class ScriptedPlant:
    """A plant's SOAP client whose answers the test scripts: ``replies[operation](**arguments)`` gives the result
    (a value, a Deferred, or an exception raised); no reply: a Deferred that never fires. Every call times out
    on the test's clock, as the real client's do."""

    def __init__(self, url: str, clock: task.Clock) -> None:
        self.url = url
        self.clock = clock
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.replies: dict[str, Callable[..., Any]] = {}

    def operations(self) -> list[str]:
        return [operation for operation, _ in self.calls]

    def call_with_timeout(self, timeout: float, operation: str, /, **arguments: Any) -> defer.Deferred[Any]:
        self.calls.append((operation, arguments))
        reply = self.replies.get(operation)
        d: defer.Deferred[Any] = defer.Deferred() if reply is None else defer.maybeDeferred(reply, **arguments)
        if not d.called:
            d.addTimeout(timeout, self.clock)
        return d

    def call(self, operation: str, /, **arguments: Any) -> defer.Deferred[Any]:
        return self.call_with_timeout(30.0, operation, **arguments)

    def close(self) -> defer.Deferred[None]:
        return defer.succeed(None)

    # Scripted answers ---------------------------------------------------------------------------------
    def bids(self, cost: float) -> None:
        self.replies["estimateCost"] = lambda **_: SimpleNamespace(
            accepted=True, cost=cost, image="tiny", items=[], remaining=[], memory=128, vcpus=1, reason=None)

    def declines(self, reason: str) -> None:
        self.replies["estimateCost"] = lambda **_: SimpleNamespace(accepted=False, reason=reason)

    def creates(self) -> None:
        self.replies["createVM"] = lambda **kw: SimpleNamespace(
            vm=SimpleNamespace(vm_id=kw["vm_id"], state="running", image="tiny", memory=128, vcpus=1, disk=1,
                               arch="x86_64", address="10.0.0.2", host_port=None, steps=["base"]),
            runs=[])

    def fails(self, operation: str, code: str = "Server.BackendFailure") -> None:
        def fail(**_: Any) -> Any:
            raise zeep.exceptions.Fault(f"{operation} failed here", code=f"soap11env:{code}")

        self.replies[operation] = fail

    def collects(self) -> None:
        self.replies["collectVM"] = lambda **_: SimpleNamespace(state="collected", error=None)


class Directory:
    """The shop's plant directory over scripted plants (what Shop and the broker use of PlantDirectory)."""

    def __init__(self, plants: list[ScriptedPlant]) -> None:
        self.handles = {p.url: PlantHandle(url=p.url, client=p, up=True, checked=True) for p in plants}  # type: ignore[arg-type]

    def all(self) -> list[PlantHandle]:
        return list(self.handles.values())

    def get(self, url: str) -> PlantHandle:
        return self.handles[url]

    def mark(self, handle: PlantHandle, up: bool, error: str | None = None) -> None:
        handle.up, handle.last_error = up, None if up else error

    def check_all(self, timeout: float | None = None) -> defer.Deferred[list[PlantHandle]]:
        return defer.succeed(self.all())

    def close(self) -> defer.Deferred[None]:
        return defer.succeed(None)


class InlinePool:
    """The shop's thread pool, run inline (the registry is in memory)."""

    def run(self, work: Callable[[], Any], what: str | None = None) -> defer.Deferred[Any]:
        return defer.maybeDeferred(work)


class World:
    def __init__(self, *names: str) -> None:
        self.clock = task.Clock()
        self.clock.advance(START)
        self.plants = {name: ScriptedPlant(f"https://{name}.test:9000/", self.clock) for name in names}
        self.registry = Registry(":memory:", clock=self.clock.seconds)
        config = ShopConfig(database=Path(":memory:"), plants_file=Path("/nonexistent"),
                            public_url="https://shop.test/", bid_timeout=BID_TIMEOUT, create_timeout=CREATE_TIMEOUT)
        self.directory = Directory(list(self.plants.values()))
        self.shop = Shop(config, self.registry, self.directory, self.clock, self.clock.seconds,  # type: ignore[arg-type]
                         pool=InlinePool())  # type: ignore[arg-type]

    def url(self, name: str) -> str:
        return self.plants[name].url


@pytest.fixture
def world() -> Any:
    made: list[World] = []

    def make(*names: str) -> World:
        made.append(World(*names))
        return made[-1]

    yield make
    for w in made:
        w.registry.close()


def result_of(d: defer.Deferred[Any]) -> Any:
    """What an already fired Deferred holds (its exception raised); fails if it has not fired."""
    outcome: list[Any] = []
    d.addBoth(outcome.append)
    assert outcome, "the Deferred has not fired"
    if isinstance(outcome[0], defer.Failure):
        outcome[0].raiseException()
    return outcome[0]


# Ranking ------------------------------------------------------------------------------------------------


def test_rank_keeps_real_bids_and_orders_them_by_cost_then_load_then_name() -> None:
    bids = [BidResult("c", "bid", cost=3.0, load=0), BidResult("b", "bid", cost=2.0, load=5),
            BidResult("a", "bid", cost=2.0, load=5), BidResult("d", "bid", cost=2.0, load=1),
            BidResult("x", "declined", reason="no image"), BidResult("y", "timeout"),
            BidResult("z", "bid", cost=-1.0), BidResult("w", "bid", cost=None)]
    assert [bid.plant for bid in rank(bids)] == ["d", "a", "b", "c"]
    assert rejection(bids[4]) == "no image" and rejection(bids[5]) == "timeout"
    assert rejection(bids[6]) == rejection(bids[7]) == "the bid has no valid cost"


def test_estimate_names_the_best_bid_and_every_plants_answer(world: Any) -> None:
    w = world("cheap", "dear", "picky", "silent", "gone")
    w.plants["cheap"].bids(4.0)
    w.plants["dear"].bids(9.0)
    w.plants["picky"].declines("no cached image named 'tiny'")

    def refused(**_: Any) -> Any:
        raise ConnectionRefusedError("connection refused")

    w.plants["gone"].replies["estimateCost"] = refused
    d = w.shop.estimate(ALICE, DAG)
    assert not d.called  # 'silent' has not answered yet
    w.clock.advance(BID_TIMEOUT)
    estimate = result_of(d)
    assert (estimate.plant, estimate.cost) == (w.url("cheap"), 4.0)
    statuses = {bid.plant: bid.status for bid in estimate.bids}
    assert statuses == {w.url("cheap"): "bid", w.url("dear"): "bid", w.url("picky"): "declined",
                        w.url("silent"): "timeout", w.url("gone"): "down"}
    assert w.directory.get(w.url("gone")).up is False  # a plant that is down is marked so
    assert w.directory.get(w.url("picky")).up is True


# Next-bidder fallback -----------------------------------------------------------------------------------


def test_a_failing_winner_loses_the_vm_to_the_next_bidder(world: Any) -> None:
    w = world("first", "second", "third")
    for name, cost in (("first", 1.0), ("second", 2.0), ("third", 3.0)):
        w.plants[name].bids(cost)
        w.plants[name].creates()
    w.plants["first"].fails("createVM")
    made = result_of(w.shop.create(ALICE, DAG, "", None, "vm-1"))
    assert made.plant == w.url("second") and made.cost == 2.0 and made.vm.state == "running"
    assert made.attempts[0].startswith(f"{w.url('first')}: [Server.BackendFailure]")
    assert made.attempts[1:] == [f"{w.url('second')}: created"]
    assert "createVM" not in w.plants["third"].operations()
    assert "collectVM" not in w.plants["first"].operations()  # it answered: it made nothing to cancel
    entry = w.registry.get("vm-1")
    assert (entry.plant, entry.state, entry.owner) == (w.url("second"), "running", "alice")
    assert entry.created == entry.updated == START  # the registry stamps with the shop's clock


def test_a_winner_that_times_out_is_cancelled_and_the_next_bidder_creates(world: Any) -> None:
    w = world("slow", "steady")
    w.plants["slow"].bids(1.0)  # bids, then never answers createVM
    w.plants["steady"].bids(2.0)
    w.plants["steady"].creates()
    d = w.shop.create(ALICE, DAG, "", None, "vm-2")
    assert not d.called and w.registry.get("vm-2").state == "creating"
    assert w.registry.get("vm-2").plant == w.url("slow")  # durable before the plant is asked
    w.clock.advance(CREATE_TIMEOUT)
    made = result_of(d)
    assert made.plant == w.url("steady")
    assert made.attempts == [f"{w.url('slow')}: no answer in time", f"{w.url('steady')}: created"]
    assert ("collectVM", {"vm_id": "vm-2"}) in w.plants["slow"].calls  # the slow plant may still make it


def test_when_every_bidder_fails_the_fault_lists_them_and_nothing_stays(world: Any) -> None:
    w = world("one", "two", "none")
    for name in ("one", "two"):
        w.plants[name].bids(1.0 if name == "one" else 2.0)
        w.plants[name].fails("createVM")
    w.plants["none"].declines("no cached image named 'tiny'")
    with pytest.raises(NoPlantError) as caught:
        result_of(w.shop.create(ALICE, DAG, "", None, "vm-3"))
    message = str(caught.value)
    assert w.url("one") in message and w.url("two") in message and "no cached image" in message
    assert w.registry.count() == 0


# Lease expiry -------------------------------------------------------------------------------------------


def test_a_lease_is_collected_once_its_time_has_passed_and_not_before(world: Any) -> None:
    w = world("home")
    plant = w.plants["home"]
    plant.bids(1.0)
    plant.creates()
    plant.collects()
    made = result_of(w.shop.create(ALICE, DAG, "", START + 100, "leased"))
    assert made.vm.termination == START + 100
    w.clock.advance(99)
    result_of(w.shop.enforce_leases())
    assert "collectVM" not in plant.operations() and w.registry.get("leased").collected is None
    w.clock.advance(1)
    result_of(w.shop.enforce_leases())
    assert plant.calls[-1] == ("collectVM", {"vm_id": "leased"})
    entry = w.registry.get("leased")
    assert entry.state == "collected" and entry.collected == START + 100
    result_of(w.shop.enforce_leases())  # a collected VM is not collected again
    assert plant.operations().count("collectVM") == 1


def test_a_vm_still_being_created_is_not_collected_when_its_lease_passes(world: Any) -> None:
    w = world("home")
    plant = w.plants["home"]
    plant.bids(1.0)  # createVM never answers
    plant.collects()
    d = w.shop.create(ALICE, DAG, "", START + 5, "young")
    w.clock.advance(10)
    result_of(w.shop.enforce_leases())
    assert "collectVM" not in plant.operations()
    w.clock.advance(CREATE_TIMEOUT)  # its create times out (no other bidder): it is removed
    with pytest.raises(NoPlantError):
        result_of(d)


def test_a_lease_set_in_the_past_is_enforced_at_once(world: Any) -> None:
    w = world("home")
    w.registry.add(VMEntry(vm_id="old", owner="alice", state="running", plant=w.url("home"), plant_vm_id="old"))
    w.plants["home"].collects()
    info = result_of(w.shop.set_termination(ALICE, SimpleNamespace(VMKey="old"), START - 1))
    assert info.state == "collected" and info.collected == START


# Notice coalescing ---------------------------------------------------------------------------------------


def test_notices_during_a_look_at_a_plant_make_exactly_one_more_look(world: Any) -> None:
    w = world("busy", "quiet")
    busy = w.plants["busy"]
    looks: list[defer.Deferred[Any]] = []

    def list_vms(**_: Any) -> defer.Deferred[Any]:
        looks.append(defer.Deferred())
        return looks[-1]

    busy.replies["listVMs"] = list_vms
    w.plants["quiet"].replies["listVMs"] = lambda **_: []
    assert w.shop.plant_changed(ADMIN_ID, busy.url) is True
    for _ in range(5):
        w.shop.plant_changed(ADMIN_ID, busy.url.upper().rstrip("/"))  # the same plant, however it is written
    assert len(looks) == 1  # one look at a time
    w.shop.plant_changed(ADMIN_ID, w.url("quiet"))  # another plant is looked at independently
    assert w.plants["quiet"].operations() == ["listVMs"]
    looks[0].callback([])
    assert len(looks) == 2  # the five notices made one more look, not five
    looks[1].callback([])
    assert len(looks) == 2  # and nothing after it
    w.shop.plant_changed(ADMIN_ID, busy.url)
    assert len(looks) == 3  # a later notice is heard again


def test_a_failed_look_does_not_stop_the_next_one(world: Any) -> None:
    w = world("flaky")
    flaky = w.plants["flaky"]
    flaky.fails("listVMs")
    w.shop.plant_changed(ADMIN_ID, flaky.url)
    handle = w.directory.get(flaky.url)
    assert handle.up is False and "listVMs failed here" in (handle.last_error or "")
    flaky.replies["listVMs"] = lambda **_: []
    w.shop.plant_changed(ADMIN_ID, flaky.url)
    assert flaky.operations() == ["listVMs", "listVMs"]
    assert handle.up is True


def test_notices_are_heard_only_from_the_plant_or_an_admin_and_for_listed_plants(world: Any) -> None:
    w = world("home")
    with pytest.raises(NotAuthorizedError):
        w.shop.plant_changed(ALICE, w.url("home"))
    with pytest.raises(NoSuchPlantError):
        w.shop.plant_changed(ADMIN_ID, "https://elsewhere.test:9000/")
    assert w.plants["home"].calls == []


# Query answers kept between writes ------------------------------------------------------------------------


def test_a_kept_query_answer_is_given_only_while_the_registry_is_unchanged(world: Any) -> None:
    """The shop keeps a query's answer with the registry's generation and gives it again only while no write
    came between: every write (a new VM, an update, a delete) shows in the next answer; scopes never mix."""
    w = world()
    for vm_id, owner in (("vm-1", "alice"), ("vm-2", "bob")):
        w.registry.add(VMEntry(vm_id=vm_id, owner=owner, state="running", created=1.0, updated=1.0, memory=256))

    def ids(caller: Identity, text: str = "memory>=256", limit: int | None = None) -> list[str]:
        return [vm.vm_id for vm in result_of(w.shop.query(caller, text, limit))]

    asked: list[int] = []
    real = w.registry.query_with_generation
    w.registry.query_with_generation = lambda *a, **k: asked.append(1) or real(*a, **k)  # type: ignore[method-assign]
    assert ids(ALICE) == ["vm-1"] and ids(ALICE) == ["vm-1"] and len(asked) == 1  # the second from the kept answer
    assert sorted(ids(ADMIN_ID)) == ["vm-1", "vm-2"] and len(asked) == 2  # another scope: asked
    w.registry.add(VMEntry(vm_id="vm-3", owner="alice", state="running", created=2.0, updated=2.0, memory=512))
    assert ids(ALICE) == ["vm-1", "vm-3"] and len(asked) == 3
    w.registry.update("vm-1", memory=128)
    assert ids(ALICE) == ["vm-3"]
    assert ids(ALICE, limit=1) == ["vm-3"]
    w.registry.delete("vm-3")
    assert ids(ALICE) == [] and sorted(ids(ADMIN_ID)) == ["vm-2"]
    with pytest.raises(Exception, match="attribute"):
        result_of(w.shop.query(ALICE, "nosuchattr=1", None))  # a bad query is refused every time, never kept
    with pytest.raises(Exception, match="attribute"):
        result_of(w.shop.query(ALICE, "nosuchattr=1", None))
