"""Quotas (vmshop_service/quota.py): decided one at a time per owner, against what the registry holds."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import defer

from vmshop_common.errors import QuotaExceededError
from vmshop_service.quota import Limits, QuotaConfig, Quotas, Usage
from vmshop_service.registry import Registry, VMEntry


class SlowRegistry:
    """The owners' VMs in memory; each usage answer waits until the test fires it (as a thread would)."""

    def __init__(self) -> None:
        self.vms: dict[str, tuple[str, int, int]] = {}  # key -> (owner, memory, vcpus)
        self.pending: list[tuple[defer.Deferred[Usage], str, str]] = []
        self.asked = 0

    def usage(self, owner: str, exclude: str) -> defer.Deferred[Usage]:
        self.asked += 1
        d: defer.Deferred[Usage] = defer.Deferred()
        self.pending.append((d, owner, exclude))
        return d

    def answer_all(self) -> None:
        while self.pending:
            d, owner, exclude = self.pending.pop(0)
            held = [(m, c) for key, (o, m, c) in self.vms.items() if o == owner and key != exclude]
            d.callback(Usage(len(held), sum(m for m, _ in held), sum(c for _, c in held)))

    def add(self, key: str, owner: str, memory: int, vcpus: int) -> Any:
        self.vms[key] = (owner, memory, vcpus)
        return key


def test_concurrent_admissions_are_decided_one_at_a_time() -> None:
    registry = SlowRegistry()
    quotas = Quotas(QuotaConfig(Limits(vms=2)), registry.usage)
    outcomes: list[Any] = []
    for index in range(5):  # five creates arrive before any registry answer
        d = quotas.admit("bob", f"k{index}", Usage(1, 64, 1), lambda i=index: registry.add(f"k{i}", "bob", 64, 1))
        d.addCallbacks(outcomes.append, lambda f: outcomes.append(f.value))
    assert registry.asked == 1  # the others wait for the first decision
    registry.answer_all()
    while registry.pending:
        registry.answer_all()
    assert outcomes[:2] == ["k0", "k1"]
    assert all(isinstance(o, QuotaExceededError) for o in outcomes[2:])
    assert "at most 2 VMs at once, holds 2 now, and this VM needs 1" in str(outcomes[2])
    assert sorted(registry.vms) == ["k0", "k1"]


def test_owners_do_not_wait_for_each_other_and_unlimited_ones_take_no_lock() -> None:
    registry = SlowRegistry()
    quotas = Quotas(QuotaConfig(Limits(), {"bob": Limits(vms=1)}), registry.usage)
    d_bob = quotas.admit("bob", "b", Usage(1), lambda: "bob's")
    made: list[str] = []
    quotas.admit("alice", "a", Usage(1), lambda: "alice's").addCallback(made.append)
    assert made == ["alice's"] and registry.asked == 1  # alice: no limit, no lookup, no wait
    registry.answer_all()
    assert d_bob.result == "bob's"


@pytest.mark.parametrize(("demand", "words"), [
    (Usage(1, 300, 1), "at most 512 MiB of guest memory at once, holds 256 now, and this VM needs 300"),
    (Usage(1, 64, 3), "at most 4 vCPUs at once, holds 2 now, and this VM needs 3"),
])
def test_memory_and_vcpus(demand: Usage, words: str) -> None:
    registry = SlowRegistry()
    registry.add("old", "carol", 256, 2)
    quotas = Quotas(QuotaConfig(Limits(memory=512, vcpus=4)), registry.usage)
    failures: list[Any] = []
    quotas.admit("carol", "new", demand, lambda: registry.add("new", "carol", demand.memory, demand.vcpus)) \
        .addErrback(lambda failure: failures.append(failure.value))
    registry.answer_all()
    assert len(failures) == 1 and isinstance(failures[0], QuotaExceededError) and words in str(failures[0])
    assert failures[0].code == "Client.QuotaExceeded"
    assert "new" not in registry.vms
    ok = quotas.admit("carol", "old", Usage(1, 256, 2), lambda: "kept")  # a VM's own figures are not counted twice
    registry.answer_all()
    assert ok.result == "kept"


def test_the_registry_counts_what_is_held(tmp_path: Any) -> None:
    with Registry(tmp_path / "r.sqlite3") as registry:
        for key, owner, state, memory, vcpus in (("a", "bob", "running", 128, 1), ("b", "bob", "placing", None, None),
                                                 ("c", "bob", "failed", 512, 4), ("d", "bob", "collected", 64, 1),
                                                 ("e", "eve", "running", 999, 9), ("f", "bob", "creating", 64, 2)):
            registry.add(VMEntry(vm_id=key, owner=owner, state=state, memory=memory, vcpus=vcpus))
        registry.update("d", collected=1.0)
        assert registry.usage("bob") == (3, 192, 3)
        assert registry.usage("bob", exclude="f") == (2, 128, 1)
        assert registry.usage("nobody") == (0, 0, 0)
