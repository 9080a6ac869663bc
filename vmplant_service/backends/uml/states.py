"""What the host observes of a UML VM, and the one table that turns it into a :class:`VMState`.

UML has no status query, and the plant asks nothing of the guest to learn
its state (the guest could lie): a VM's *condition* comes from the process
table and from the exit record its relay writes (the relay is UML's parent,
so it alone gets UML's real exit status). No guest-written text (its
console) decides a state.

Conditions (keys of :data:`UML_STATES`):

- ``running``: UML lives (not stopped by a signal) and so does its relay;
- ``paused``: UML is stopped by a signal (SIGSTOP);
- ``mute``: UML lives but its relay does not (no agent, no console): it
  cannot be reached (it does not happen while the parent-death signal
  holds; kept for honesty);
- ``ending``: UML is gone and its relay has not yet recorded how (a moment);
- ``halted``: UML exited with status 0: the guest powered off (or halted);
- ``killed``: the backend killed it (stop's deadline, destroy);
- ``panicked``: UML died of SIGABRT, which is how UML ends after a guest
  kernel panic (it aborts itself; core dumps are off);
- ``failed``: another exit status (UML could not run, or the guest set one
  in ``/proc/exitcode``) or another signal (the host's OOM killer);
- ``gone``: no UML, no relay, no record (killed from outside along with its
  relay, or the host restarted): not running, and nothing says it crashed.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

from ..base import VMState

UML_STATES: dict[str, VMState] = {
    "running": VMState.RUNNING,
    "paused": VMState.PAUSED,
    "mute": VMState.UNKNOWN,
    "ending": VMState.UNKNOWN,
    "halted": VMState.STOPPED,
    "killed": VMState.STOPPED,
    "gone": VMState.STOPPED,
    "panicked": VMState.CRASHED,
    "failed": VMState.CRASHED,
}

#: The most bytes of an exit record read.
MAX_RECORD = 4096


def translate_condition(condition: str) -> VMState:
    """A condition (a key of :data:`UML_STATES`) as a VMState: the backend's one translation."""
    return UML_STATES.get(condition, VMState.UNKNOWN)


def read_exit_record(path: Path) -> dict[str, int] | None:
    """The relay's record of how UML ended, or None (no record, or not one the relay writes)."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_RECORD + 1)
        record = json.loads(data) if len(data) <= MAX_RECORD else None
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or type(record.get("pid")) is not int:
        return None
    keys = set(record) - {"pid"}
    if keys == {"exitcode"} and type(record["exitcode"]) is int and 0 <= record["exitcode"] <= 255:
        return record
    if keys == {"signal"} and type(record["signal"]) is int and 0 < record["signal"] < 128:
        return record
    return None


def ended_condition(record: dict[str, int] | None, killed: bool) -> str:
    """How a VM whose UML is gone ended (a condition), from its exit record and whether the backend killed it."""
    if record is None:
        return "killed" if killed else "gone"
    if "exitcode" in record:
        return "halted" if record["exitcode"] == 0 else "failed"
    if record["signal"] == signal.SIGKILL and killed:
        return "killed"
    if record["signal"] == signal.SIGABRT:
        return "panicked"
    return "failed"


__all__ = ["UML_STATES", "ended_condition", "read_exit_record", "translate_condition"]
