"""Quotas: how many VMs, MiB of guest memory and vCPUs an identity may hold at once.

Configured in ``configuration_vmshop.xml`` (``<quotas>``: a default for every
identity, and ``<quota identity=...>`` for one; a figure an identity's own
quota omits is the default's; ``unlimited`` or no figure at all: no limit).

Rules:

* What counts is the registry: every VM of the owner that is neither
  collected nor failed, including the ones being placed or created, with
  the memory and vCPUs the registry holds for them.
* A quota is checked when a create starts (the VM, and the memory and vCPUs
  its DAG states) and again before the chosen plant is asked to make it
  (with the memory and vCPUs of that plant's bid, which is when a VM
  cloned from an image learns its hardware). Either check refuses with
  ``Client.QuotaExceeded``, naming the limit and the current use; then
  nothing is made and the VM's entry is removed.
* Atomicity: each check and the registry change that makes the VM count
  (:meth:`Quotas.admit`'s ``then``: adding the entry, or writing its
  hardware) run under one lock per owner, taken in the reactor thread, so
  N concurrent creates by one owner are decided one at a time and never
  together exceed the quota. Owners without limits take no lock.
* The lock is this process's: several shops sharing one registry (issue 13,
  PostgreSQL) will need the check and the change in one database
  transaction that locks the owner's row; :meth:`Quotas.admit` is the one
  place to change for that.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer

from vmshop_common.errors import QuotaExceededError


@dataclass(frozen=True)
class Limits:
    """At most this many VMs, MiB of guest memory and vCPUs at once; ``None``: no limit."""

    vms: int | None = None
    memory: int | None = None
    vcpus: int | None = None

    @property
    def unlimited(self) -> bool:
        return self.vms is None and self.memory is None and self.vcpus is None


@dataclass(frozen=True)
class QuotaConfig:
    """The default limits and each identity's own (already completed with the default)."""

    default: Limits = Limits()
    identities: dict[str, Limits] = field(default_factory=dict, hash=False)

    def limits(self, owner: str) -> Limits:
        return self.identities.get(owner, self.default)


@dataclass(frozen=True)
class Usage:
    """VMs, MiB of guest memory and vCPUs (held, or asked for)."""

    vms: int = 0
    memory: int = 0
    vcpus: int = 0


def _check(owner: str, limits: Limits, used: Usage, demand: Usage) -> None:
    for limit, have, need, unit in ((limits.vms, used.vms, demand.vms, "VMs"),
                                    (limits.memory, used.memory, demand.memory, "MiB of guest memory"),
                                    (limits.vcpus, used.vcpus, demand.vcpus, "vCPUs")):
        if limit is not None and need and have + need > limit:
            raise QuotaExceededError(f"quota exceeded: {owner} may hold at most {limit} {unit} at once, "
                                     f"holds {have} now, and this VM needs {need}")


class Quotas:
    """Admits VMs against the quotas (see the module docstring for the rules).

    :param usage: ``usage(owner, exclude_key)`` -> Deferred firing with the
        :class:`Usage` the registry holds for ``owner``, not counting the VM
        ``exclude_key``.
    """

    def __init__(self, config: QuotaConfig, usage: Callable[[str, str], defer.Deferred[Usage]]) -> None:
        self.config = config
        self._usage = usage
        self._locks: dict[str, defer.DeferredLock] = {}

    def admit(self, owner: str, key: str, demand: Usage, then: Callable[[], Any]) -> defer.Deferred[Any]:
        """Check that ``owner`` may hold VM ``key`` with ``demand``, and run ``then`` (the registry change that
        makes it count) before anyone else's check for that owner. Fails with QuotaExceededError (``then``
        not run)."""
        limits = self.config.limits(owner)
        if limits.unlimited:
            return defer.maybeDeferred(then)
        lock = self._locks.get(owner)
        if lock is None:
            lock = self._locks[owner] = defer.DeferredLock()

        @defer.inlineCallbacks
        def decide() -> Any:
            used = yield self._usage(owner, key)
            _check(owner, limits, used, demand)
            result = yield defer.maybeDeferred(then)
            return result

        def release(result: Any) -> Any:
            if not lock.locked and not lock.waiting:
                self._locks.pop(owner, None)
            return result

        return lock.run(decide).addBoth(release)


__all__ = ["Limits", "QuotaConfig", "Quotas", "Usage"]
