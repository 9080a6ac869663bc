"""Holding a running guest still while the plant copies its disk (a publish), and undoing it after a crash.

:func:`quiesced` runs the copy with the guest's file systems frozen through
its agent (``guest-fsfreeze-freeze``: each is synced, then takes no writes)
and the guest paused by its backend with its disk flushed (backend rule 11),
and afterwards always resumes it (also after a pause that failed: a lost
answer may have paused it all the same; one retry) and thaws it (a failure
to thaw is logged: the guest's own agent is the only way in). Each step has
its deadline (:data:`FREEZE_TIMEOUT`, :data:`PAUSE_TIMEOUT`). A guest that
is not there is not touched: its disk is at rest.

While a guest is frozen, a marker file ``<markers>/<vm>`` exists; a plant
that restarts finds the markers a crash left and :func:`thaw_cut_short`
thaws those guests (their backend resumed them when it adopted them).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from vmshop_common.errors import BackendError, VMShopError

from .agent.qga import GuestAgent
from .agent.transport import AgentError
from .backends.base import Backend, VMState

log = logging.getLogger(__name__)

#: Seconds the guest's agent may take to freeze (or thaw) its file systems.
FREEZE_TIMEOUT = 30.0
#: Seconds the backend may take to pause (or resume) a guest.
PAUSE_TIMEOUT = 30.0


def quiesced(backend: Backend, vm_id: str, markers: Path, work: Callable[[], None]) -> None:
    """Run ``work`` while VM ``vm_id``'s disk is still and consistent (see the module docstring).

    BackendError when the agent does not freeze (``work`` then never runs) or the guest cannot be paused or
    resumed; ``work``'s own errors pass through, after the guest runs again.
    """
    if backend.state(vm_id) in (VMState.STOPPED, VMState.CRASHED):
        work()
        return
    agent = GuestAgent(backend.agent(vm_id))
    marker = markers / vm_id
    marker.touch(mode=0o600)
    try:
        try:
            frozen = agent.fsfreeze_freeze(FREEZE_TIMEOUT)
        except AgentError as exc:
            raise BackendError(f"VM {vm_id}'s agent did not freeze its file systems ({exc}): its disk was not "
                               "copied") from None
        log.info("VM %s: %d file system(s) frozen", vm_id, frozen)
        try:
            backend.pause(vm_id, PAUSE_TIMEOUT)
            work()
        finally:
            resume(backend, vm_id)
    finally:
        thaw(vm_id, agent)
        marker.unlink(missing_ok=True)


def resume(backend: Backend, vm_id: str) -> None:
    """Let a guest paused for a copy run on (a second try after a failed one; BackendError if both failed)."""
    for attempt in (1, 2):
        try:
            backend.resume(vm_id, PAUSE_TIMEOUT)
            return
        except BackendError as exc:
            log.error("VM %s: resuming it after a copy of its disk failed (attempt %d): %s", vm_id, attempt, exc)
            if attempt == 2:
                raise BackendError(f"VM {vm_id} could not be resumed after the copy: {exc.message}") from None
            time.sleep(1.0)


def thaw(vm_id: str, agent: GuestAgent) -> None:
    """Thaw the guest's file systems (nothing if none is frozen); a failure is logged, never raised."""
    try:
        agent.fsfreeze_thaw(FREEZE_TIMEOUT)
    except AgentError as exc:
        log.error("VM %s: its agent did not thaw its file systems: %s", vm_id, exc)


def thaw_cut_short(backend: Backend, markers: Path, adopted: set[str]) -> list[str]:
    """After a restart: thaw the adopted guests whose copy a crash cut short, and drop every marker; their ids."""
    thawed = []
    for marker in markers.iterdir():
        if marker.name in adopted:
            try:
                thaw(marker.name, GuestAgent(backend.agent(marker.name)))
                thawed.append(marker.name)
            except VMShopError as exc:
                log.warning("VM %s: no thaw after a copy cut short: %s", marker.name, exc)
        marker.unlink(missing_ok=True)
    return thawed
