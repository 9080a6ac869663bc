"""The plant's host-only segments: VDE switches over unix sockets, one per owner.

Each VM plugs a second NIC into its owner's switch (:class:`OwnerSegments`),
so one owner's VMs reach each other on their pool addresses, while another
owner's VMs are on another switch and cannot reach them, and nothing of
theirs touches the host's own interfaces or addresses (a switch has no
uplink). No root needed. A switch runs as a daemon with a pidfile, so it
outlives a plant restart and the guests still on it; :meth:`VdeSegment.stop`
ends it. Its directory is 0700: only the plant (and the hypervisors it
starts, which connect while they still have its rights) can reach it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

from vmshop_common.errors import BackendError

from .processes import owned_pid, pid_alive


def default_switch_dir(state_dir: Path) -> Path:
    """Where a plant whose state is ``state_dir`` keeps its owners' switches by default.

    A short runtime directory of its own (``/run/vmshop/switches/<digest of
    the state directory>``, or under ``$XDG_RUNTIME_DIR`` or
    ``/tmp/vmshop-<uid>`` for a plant that is not root), never inside a state
    directory whose path may be too long for the switches' sockets.
    """
    digest = hashlib.sha256(str(Path(state_dir).absolute()).encode()).hexdigest()[:12]
    if os.geteuid() == 0:
        base = Path("/run/vmshop")
    else:
        base = Path(os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/vmshop-{os.geteuid()}") / "vmshop"
    return base / "switches" / digest


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
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)
        self.stop()
        try:
            subprocess.run(
                [binary, "-s", str(self.control), "-d", "-p", str(self.pidfile), "-M", str(self.directory / "mgmt"),
                 "--mgmtmode", "0600"],
                check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                timeout=timeout,
            )
        except subprocess.CalledProcessError as exc:
            words = (exc.stderr or b"").decode(errors="replace").strip() or f"exit status {exc.returncode}"
            raise BackendError(f"the VDE switch {self.directory.name} did not start: {words}") from None
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise BackendError(f"the VDE switch {self.directory.name} did not start: {exc}") from None
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


#: The ip.txt bridge field of an address no VM holds.
FREE_BRIDGE = "none"


def segment_name(owner: str) -> str:
    """The name of ``owner``'s host-only segment on a plant (the ip.txt bridge field of their VMs' addresses).

    A digest of the owner's name, so any name (an X.509 subject with
    slashes, say) gives a short, path-safe, fixed-length name.
    """
    return "seg-" + hashlib.sha256(owner.encode()).hexdigest()[:12]


class OwnerSegments:
    """One VDE switch per owner: ``directory/<segment name>/switch.ctl``.

    Guests of one owner share their owner's switch and reach each other;
    guests of two owners are on two switches with no link between them, so
    they cannot reach (or spoof) each other at all. Switches outlive a plant
    restart, as their guests do; :meth:`release` stops the switches of
    owners who have no VM left. Thread-safe.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._lock = threading.Lock()

    def switch(self, owner: str) -> VdeSegment:
        """``owner``'s switch, not started."""
        return VdeSegment(self.directory / segment_name(owner))

    def start(self, owner: str) -> VdeSegment:
        """``owner``'s switch, started (or adopted) if it did not run; BackendError if it cannot start."""
        with self._lock:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            segment = self.switch(owner)
            segment.start()
            return segment

    def names(self) -> list[str]:
        """The segments that have a directory here (running or not)."""
        try:
            return sorted(p.name for p in self.directory.iterdir() if p.is_dir() and p.name.startswith("seg-"))
        except OSError:
            return []

    def release(self, owners_in_use: set[str]) -> list[str]:
        """Stop and remove every switch whose owner is not in ``owners_in_use``; their names."""
        keep = {segment_name(owner) for owner in owners_in_use}
        stopped = []
        with self._lock:
            for name in self.names():
                if name in keep:
                    continue
                segment = VdeSegment(self.directory / name)
                segment.stop()
                shutil.rmtree(segment.directory, ignore_errors=True)
                stopped.append(name)
        return stopped

    def stop_all(self) -> None:
        self.release(set())
