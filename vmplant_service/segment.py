"""The plant's host-only segment: a VDE switch over unix sockets.

All of a plant's VMs plug a second NIC into one switch, so they reach each
other on their pool addresses while nothing of theirs touches the host's
own interfaces or addresses (the switch has no uplink). No root needed.
The switch runs as a daemon with a pidfile, so it outlives a plant restart
and the guests still on it; :meth:`VdeSegment.stop` ends it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from vmshop_common.errors import BackendError

from .processes import owned_pid, pid_alive


def mac_for(vm_id: str, index: int) -> str:
    """A stable, locally administered MAC for NIC ``index`` of ``vm_id`` (QEMU's 52:54:00 prefix)."""
    digest = hashlib.sha256(f"{vm_id}/{index}".encode()).digest()
    return "52:54:00:" + ":".join(f"{byte:02x}" for byte in digest[:3])


class VdeSegment:
    """A VDE switch whose control socket is ``directory/switch.ctl``."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    @property
    def control(self) -> Path:
        return self.directory / "switch.ctl"

    @property
    def pidfile(self) -> Path:
        return self.directory / "switch.pid"

    def running(self) -> bool:
        return owned_pid(self.pidfile, str(self.control)) is not None and self.control.exists()

    def start(self, timeout: float = 10.0) -> None:
        """Start the switch unless it already runs (adopting one a previous plant left)."""
        if self.running():
            return
        binary = shutil.which("vde_switch")
        if binary is None:
            raise BackendError("vde_switch is not installed (Debian package vde2)")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.stop()
        subprocess.run(
            [binary, "-s", str(self.control), "-d", "-p", str(self.pidfile), "-M", str(self.directory / "mgmt")],
            check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=timeout,
        )
        deadline = time.monotonic() + timeout
        while not self.running():
            if time.monotonic() > deadline:
                raise BackendError("the VDE switch did not start")
            time.sleep(0.02)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the switch (safe to repeat) and remove its sockets."""
        pid = owned_pid(self.pidfile, str(self.control))
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.02)
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        for leftover in (self.control, self.pidfile, self.directory / "mgmt"):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
