"""Processes the plant started and must find again by pidfile (QEMU, the VDE switch).

A pid read from a pidfile is trusted only while that process is alive (a
zombie is not) and, when a marker is given, its command line names the
marker: pids get reused, and the plant must never signal a stranger.
"""

from __future__ import annotations

import os
from pathlib import Path


def read_pid(path: Path) -> int | None:
    try:
        return int(Path(path).read_text().strip())
    except (OSError, ValueError):
        return None


def proc_args(pid: int) -> list[str]:
    """The command line of process ``pid`` ([] if it is gone or a zombie)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            raw = handle.read()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            stat = handle.read()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[:1] == ["Z"]


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (exited-but-unreaped zombies count as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not is_zombie(pid)


def owned_pid(pidfile: Path, marker: str | None = None) -> int | None:
    """The live pid in ``pidfile`` whose command line mentions ``marker`` (if given), else None."""
    pid = read_pid(pidfile)
    if pid is None or pid <= 1 or not pid_alive(pid):
        return None
    if marker is not None and not any(marker in arg for arg in proc_args(pid)):
        return None
    return pid
