"""A backend without a hypervisor, for tests of everything above the backends.

It keeps real bookkeeping and plays the guest well enough for a plant to
create, configure, adopt and collect VMs on it:

- the "guest" of a VM is its file ``run_dir/fake.json`` (state, owner) and
  a fake guest agent (:mod:`vmplant_service.backends.fakeagent`) serving
  ``run_dir/qga.sock`` from a thread of the backend that owns it. The file
  outlives the backend, as a daemonized QEMU outlives the plant, so a new
  :class:`FakeBackend` on the same run directory can ``adopt`` the VM (and
  the old agent then stops answering);
- the agent speaks the real protocol (qemu-ga's, as the plant's transport
  expects it), answers once ``boot_seconds`` have passed, and runs nothing:
  see its module for the markers (``FAKE_FAIL``, ``FAKE_STATUS=<n>``,
  ``FAKE_HANG``) that make an action fail or hang.
  An agent stops when its VM is stopped, destroyed or crashed, when another
  backend adopts the VM, or when ``fake.json`` vanishes; ``close()`` leaves
  it running, as it would leave a QEMU.

Actions never run, here or anywhere on the host.

Options: ``boot_seconds`` (default 0.05), ``max_memory`` (MiB, default
65536), ``max_vcpus`` (default 64), ``architectures`` (comma-separated,
default ``x86_64``), ``pause_seconds`` (how long ``pause`` takes once the
guest is paused, default 0: a publish a test wants to kill midway),
``resume`` (``on``, default, or ``off``: whether it saves and restores
running states, rule 12), ``resume_seconds`` (how long a restored guest's
agent takes to answer, default 0.01). A saved state is a small JSON
document (the saved VM's id and model, and whether its file system was
frozen); a restored guest starts frozen when its state was.

Subclasses each inject one failure (:class:`FailingStartBackend`) or delay
(:class:`SlowBidBackend`).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from vmshop_common.errors import BackendError, ConfigurationError

from ..agent.transport import AgentTransport, SocketTransport
from .base import Backend, Capabilities, GuestSpec, VMState
from .fakeagent import FakeAgent

#: The fake guest's states (in ``fake.json``) as VMStates; anything else is UNKNOWN.
FAKE_STATES: dict[str, VMState] = {
    "running": VMState.RUNNING,
    "paused": VMState.PAUSED,
    "stopped": VMState.STOPPED,
    "crashed": VMState.CRASHED,
}
#: The fake guest's states in which it is there (its agent serves; a paused one is resumed, never booted again).
LIVE = ("running", "paused")
NIC_KINDS = ("user", "segment")
STATE_FILE = "fake.json"
AGENT_SOCKET = "qga.sock"
POLL = 0.01
JOIN_TIMEOUT = 5.0


@dataclass
class _FakeVM:
    spec: GuestSpec
    agent: FakeAgent | None = None
    transport: SocketTransport | None = None
    watcher: threading.Thread | None = None
    stop: threading.Event = field(default_factory=threading.Event)

    @property
    def state_file(self) -> Path:
        return Path(self.spec.run_dir) / STATE_FILE

    @property
    def socket(self) -> Path:
        return Path(self.spec.run_dir) / AGENT_SOCKET


class FakeBackend(Backend):
    """No processes; real bookkeeping and a fake guest agent (see the module docstring)."""

    name = "fake"

    def __init__(self, options: dict[str, str] | None = None) -> None:
        super().__init__(options)
        options = self.options
        try:
            self.boot_seconds = float(options.get("boot_seconds", "0.05"))
            self.max_memory = int(options.get("max_memory", "65536"))
            self.max_vcpus = int(options.get("max_vcpus", "64"))
            self.pause_seconds = float(options.get("pause_seconds", "0"))
            self.resume_seconds = float(options.get("resume_seconds", "0.01"))
        except ValueError as exc:
            raise ConfigurationError(f"fake backend: a numeric option is not a number: {exc}") from None
        self.architectures = tuple(a.strip() for a in options.get("architectures", "x86_64").split(",") if a.strip())
        self.can_resume = options.get("resume", "on") == "on"
        self.token = uuid.uuid4().hex
        self._vms: dict[str, _FakeVM] = {}
        self._ended: set[str] = set()
        #: The VMs this backend restored from a saved state (tests: resumed, not booted).
        self.restored: set[str] = set()
        self._lock = threading.Lock()

    def capabilities(self) -> Capabilities:
        return Capabilities(name=self.name, available=True, accelerator="none", architectures=self.architectures,
                            max_memory=self.max_memory, max_vcpus=self.max_vcpus, networks=NIC_KINDS,
                            channel="fake", publish=True, resume=self.can_resume)

    # Starting -------------------------------------------------------------------
    def start(self, spec: GuestSpec) -> None:
        vm = _FakeVM(spec)
        with self._lock:
            self._check(spec)
            self._vms[spec.vm_id] = vm
            self._ended.discard(spec.vm_id)
        try:
            Path(spec.run_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
            self._write_state(vm, "running")
            self._boot(vm)
        except BaseException:
            self._halt(vm)
            _remove(vm)
            with self._lock:
                self._vms.pop(spec.vm_id, None)
            raise

    def machine_model(self, spec: GuestSpec) -> str:
        if not self.can_resume:
            return super().machine_model(spec)
        parts = [spec.machine, str(spec.memory), str(spec.vcpus), str(spec.kernel), str(spec.initrd), spec.cmdline,
                 f"seed={spec.seed is not None}", f"data={spec.data_dir is not None}",
                 "nics=" + ",".join(nic.kind for nic in spec.nics)]
        return "fake:" + hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]

    def save_state(self, vm_id: str, fd: int, timeout: float = 60.0) -> None:
        if not self.can_resume:
            super().save_state(vm_id, fd, timeout)
        vm = self._vms.get(vm_id)
        if vm is None or self._file_state(vm) != "paused":
            raise BackendError(f"VM {vm_id} is not paused under this backend: only a paused guest's state is saved")
        state = {"fake-state": 1, "vm_id": vm_id, "model": self.machine_model(vm.spec),
                 "frozen": bool(vm.agent is not None and vm.agent.frozen)}
        os.write(fd, json.dumps(state).encode())

    def restore(self, spec: GuestSpec, fd: int, timeout: float = 60.0) -> None:
        if not self.can_resume:
            super().restore(spec, fd, timeout)
        try:
            state = json.loads(os.read(fd, 65536))
        except (OSError, ValueError) as exc:
            raise BackendError(f"VM {spec.vm_id}: the saved state cannot be read: {exc}") from None
        if not isinstance(state, dict) or state.get("fake-state") != 1:
            raise BackendError(f"VM {spec.vm_id}: not a saved state of the fake backend")
        if state.get("model") != self.machine_model(spec):
            raise BackendError(f"VM {spec.vm_id}: the saved state is of another machine model")
        vm = _FakeVM(spec)
        with self._lock:
            self._check(spec)
            self._vms[spec.vm_id] = vm
            self._ended.discard(spec.vm_id)
        try:
            Path(spec.run_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
            self._write_state(vm, "running")
            self._run_agent(vm, boot=False, delay=self.resume_seconds)
            assert vm.agent is not None
            vm.agent.frozen = bool(state.get("frozen"))
            self.restored.add(spec.vm_id)
        except BaseException:
            self._halt(vm)
            _remove(vm)
            with self._lock:
                self._vms.pop(spec.vm_id, None)
            raise

    def ex_agent(self, vm_id: str) -> FakeAgent | None:
        """The fake agent of a VM (tests read what the plant told the guest)."""
        vm = self._vms.get(vm_id)
        return vm.agent if vm is not None else None

    def _check(self, spec: GuestSpec) -> None:
        """Refuse what a real backend would refuse (called under the lock)."""
        def need(ok: bool, why: str) -> None:
            if not ok:
                raise BackendError(f"VM {spec.vm_id}: {why}")

        need(bool(spec.vm_id) and "/" not in spec.vm_id, "not a usable VM id")
        current = self._vms.get(spec.vm_id)
        need(current is None or self._file_state(current) != "running", "it already runs")
        need(_read_state(Path(spec.run_dir) / STATE_FILE).get("state") != "running",
             f"a guest of {spec.run_dir} still runs; adopt or destroy it first")
        need(spec.arch in self.architectures, f"the fake backend runs {', '.join(self.architectures)}, not {spec.arch}")
        need(spec.memory > 0 and spec.vcpus > 0, "memory and vcpus must be positive")
        need(spec.vcpus <= self.max_vcpus, f"{spec.vcpus} vCPUs is more than {self.max_vcpus}")
        used = sum(vm.spec.memory for vm in self._vms.values() if self._file_state(vm) == "running")
        need(used + spec.memory <= self.max_memory, f"{spec.memory} MiB asked, {self.max_memory - used} MiB free")
        need(Path(spec.disk).is_file(), f"the disk {spec.disk} is not a file")
        for path, label in ((spec.kernel, "kernel"), (spec.initrd, "initrd"), (spec.seed, "seed")):
            need(path is None or Path(path).is_file(), f"the {label} {path} is not a file")
        need(spec.data_dir is None or Path(spec.data_dir).is_dir(), f"the data directory {spec.data_dir} is missing")
        for nic in spec.nics:
            need(nic.kind in NIC_KINDS, f"no NIC of kind {nic.kind!r}")
            need(nic.kind != "segment" or bool(nic.switch), "a segment NIC needs a switch")

    def _boot(self, vm: _FakeVM) -> None:
        """Start the guest: its agent (subclasses inject failures here)."""
        self._run_agent(vm, boot=True)

    def _run_agent(self, vm: _FakeVM, boot: bool, delay: float = 0.0) -> None:
        ready_at = time.monotonic() + (self.boot_seconds if boot else delay)
        vm.agent = FakeAgent(vm.socket, ready_at, on_shutdown=lambda: self._shut_down(vm),
                             name=f"{vm.spec.vm_id}-{self.token[:8]}", seed=vm.spec.seed)
        vm.watcher = threading.Thread(target=self._watch, args=(vm,), daemon=True,
                                      name=f"fake-guest-{vm.spec.vm_id}-{self.token[:8]}")
        vm.watcher.start()

    def _watch(self, vm: _FakeVM) -> None:
        """The guest lives while this backend owns it: its agent stops when it no longer does."""
        while not vm.stop.wait(POLL * 5) and self._owns(vm):
            pass
        if vm.agent is None:
            return
        if vm.stop.is_set():
            vm.agent.stop()
        else:
            # Another backend adopted the guest (a plant restart): there is one guest, so a command already
            # on this agent's connection still gets its answers; the agent takes no new connection.
            vm.agent.retire()

    def _shut_down(self, vm: _FakeVM) -> None:
        """guest-shutdown: the guest powers off (its agent goes with it)."""
        if self._owns(vm):
            self._write_state(vm, "stopped")
        vm.stop.set()

    def close(self) -> None:
        """Drop the connections to the agents (the guests, as QEMUs would, run on)."""
        with self._lock:
            vms = list(self._vms.values())
        for vm in vms:
            if vm.transport is not None:
                vm.transport.close()

    def agent(self, vm_id: str) -> AgentTransport:
        with self._lock:
            vm = self._vms.get(vm_id)
            if vm is None:
                raise BackendError(f"VM {vm_id} is not controlled by this backend")
            if vm.transport is None:
                vm.transport = SocketTransport(vm.socket)
            return vm.transport

    # The contract ------------------------------------------------------------------
    def state(self, vm_id: str) -> VMState:
        vm = self._vms.get(vm_id)
        if vm is None:
            return VMState.STOPPED if vm_id in self._ended else VMState.UNKNOWN
        state = self._file_state(vm)
        return VMState.STOPPED if state is None else FAKE_STATES.get(state, VMState.UNKNOWN)

    def stop(self, vm_id: str, timeout: float = 30.0) -> None:
        vm = self._vms.get(vm_id)
        if vm is None:
            return
        if vm.state_file.exists():
            self._write_state(vm, "stopped")
        self._halt(vm)

    def destroy(self, vm_id: str) -> None:
        with self._lock:
            vm = self._vms.pop(vm_id, None)
            if vm is None:
                return
            self._ended.add(vm_id)
        self._halt(vm)
        _remove(vm)

    def adopt(self, spec: GuestSpec) -> bool:
        vm = _FakeVM(spec)
        with self._lock:
            old = self._vms.get(spec.vm_id)
            self._vms[spec.vm_id] = vm
            self._ended.discard(spec.vm_id)
        if old is not None:
            self._halt(old)  # this instance's earlier agent of the VM (the new one replaces it)
        if self._file_state(vm) not in LIVE:  # (a guest left paused by a cut-short publish is resumed)
            return False
        self._write_state(vm, "running")  # this backend owns it now: the old agent thread stops
        self._run_agent(vm, boot=False)
        return True

    def running(self) -> list[str]:
        with self._lock:
            vms = list(self._vms.items())
        return sorted(vm_id for vm_id, vm in vms if self._file_state(vm) in LIVE)

    def pause(self, vm_id: str, timeout: float = 30.0) -> None:
        """The guest's state becomes paused (the disk is the overlay qemu-img made: nothing to flush)."""
        vm = self._vms.get(vm_id)
        if vm is None or self._file_state(vm) not in LIVE:
            raise BackendError(f"VM {vm_id} is not running under this backend")
        self._write_state(vm, "paused")
        if self.pause_seconds:
            time.sleep(self.pause_seconds)

    def resume(self, vm_id: str, timeout: float = 30.0) -> None:
        vm = self._vms.get(vm_id)
        if vm is None or self._file_state(vm) not in LIVE:
            raise BackendError(f"VM {vm_id} is not running under this backend")
        if self._file_state(vm) == "paused":
            self._write_state(vm, "running")

    def ex_crash(self, vm_id: str) -> None:
        """Make the guest die at once (its state becomes CRASHED; its agent answers no more)."""
        vm = self._vms.get(vm_id)
        if vm is not None:
            self._write_state(vm, "crashed")
            self._halt(vm)

    # The fake guest -----------------------------------------------------------------
    def _write_state(self, vm: _FakeVM, state: str) -> None:
        data = {"vm_id": vm.spec.vm_id, "state": state, "owner": self.token, "pid": os.getpid(),
                "updated": time.time()}
        _put(vm.state_file, json.dumps(data))

    @staticmethod
    def _file_state(vm: _FakeVM) -> str | None:
        state = _read_state(vm.state_file).get("state")
        return str(state) if state is not None else None

    def _owns(self, vm: _FakeVM) -> bool:
        data = _read_state(vm.state_file)
        return data.get("state") in LIVE and data.get("owner") == self.token

    def _halt(self, vm: _FakeVM) -> None:
        vm.stop.set()
        if vm.transport is not None:
            vm.transport.close()
        thread = vm.watcher
        if thread is not None and thread is not threading.current_thread():
            thread.join(JOIN_TIMEOUT)
            if thread.is_alive():
                raise BackendError(f"the fake agent of VM {vm.spec.vm_id} did not stop")


class FailingStartBackend(FakeBackend):
    """A fake whose every start fails after it made the VM's files (they must be cleaned up)."""

    name = "fake-failstart"

    def _boot(self, vm: _FakeVM) -> None:
        raise BackendError(f"VM {vm.spec.vm_id}: injected start failure")


class SlowBidBackend(FakeBackend):
    """A fake that takes ``bid_delay`` seconds (default 1) to say what it can do: a plant slow to bid."""

    name = "fake-slowbid"

    def capabilities(self) -> Capabilities:
        time.sleep(float(self.options.get("bid_delay", "1")))
        return super().capabilities()


def _remove(vm: _FakeVM) -> None:
    vm.state_file.unlink(missing_ok=True)
    vm.socket.unlink(missing_ok=True)
    try:
        Path(vm.spec.run_dir).rmdir()
    except OSError:
        pass


def _put(path: Path, content: str) -> None:
    """Write through a temporary name and a rename, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(content)
    os.replace(tmp, path)


def _read_state(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
