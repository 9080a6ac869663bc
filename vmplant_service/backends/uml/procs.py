"""The process table as the UML backend reads it (``/proc``): states, sessions, command lines.

Every process of a VM is found by its command line naming the VM's marker
(its run directory) or by being in its relay's session; pids are never
trusted alone (:func:`vmplant_service.processes.owned_pid`).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from ...processes import proc_args


def _stat_fields(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rpartition(")")[2].split()
    except OSError:
        return []


def process_state(pid: int) -> str:
    """The state letter of ``pid`` ('R', 'S', 'T', 'Z', ...; '' if it is gone)."""
    fields = _stat_fields(pid)
    return fields[0] if fields else ""


def session_of(pid: int) -> int | None:
    fields = _stat_fields(pid)
    try:
        return int(fields[3])
    except (IndexError, ValueError):
        return None


def processes_with(match: Callable[[int, list[str]], bool]) -> list[int]:
    """Pids of live (non-zombie) processes for which ``match(pid, arguments)`` holds."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        if pid == os.getpid():
            continue
        args = proc_args(pid)
        if args and match(pid, args) and process_state(pid) not in ("Z", "X", ""):
            found.append(pid)
    return found


def named_by_a_process(text: str) -> bool:
    return bool(processes_with(lambda _, args: any(text in arg for arg in args)))


__all__ = ["named_by_a_process", "process_state", "processes_with", "session_of"]
