"""A backend without a hypervisor, for tests of everything above the backends.

It keeps real bookkeeping and plays the guest well enough for a plant to
create, configure, adopt and collect VMs on it:

- the "guest" of a VM is its file ``run_dir/fake.json`` (state, owner) and
  a thread of the backend that owns it. The file outlives the backend, as
  a daemonized QEMU outlives the plant, so a new :class:`FakeBackend` on the
  same run directory can ``adopt`` the VM (and the old thread then stops);
- the thread plays the guest's agent on ``spec.channel_dir`` with the real
  protocol (``vmplant_service.channel``): it writes ``agent/ready`` after
  ``boot_seconds``, then answers each ready action in name order with
  ``output``, ``status``, ``elapsed`` and, last, ``done``.
  A thread ends when its VM is stopped, destroyed or crashed, when another
  backend adopts the VM, or when ``fake.json`` vanishes; ``close()`` leaves
  it running, as it would leave a QEMU.

Actions never run, here or anywhere on the host: the fake agent only reads
them. Its output is ``fake: <first line of run>`` (and of ``body`` when
there is one); the status is 0 unless a file of the action holds a marker:
``FAKE_FAIL`` (status 1), ``FAKE_STATUS=<n>`` (status n) or ``FAKE_HANG``
(no answer until the action's timeout, then status 124 like the real agent).

Options: ``boot_seconds`` (default 0.05), ``max_memory`` (MiB, default
65536), ``max_vcpus`` (default 64), ``architectures`` (comma-separated,
default ``x86_64``).

Subclasses each inject one failure (:class:`FailingStartBackend`) or delay
(:class:`SlowBidBackend`).
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from vmshop_common.errors import BackendError, ConfigurationError

from .base import Backend, Capabilities, GuestSpec, VMState

#: The fake guest's states (in ``fake.json``) as VMStates; anything else is UNKNOWN.
FAKE_STATES: dict[str, VMState] = {
    "running": VMState.RUNNING,
    "paused": VMState.PAUSED,
    "stopped": VMState.STOPPED,
    "crashed": VMState.CRASHED,
}
NIC_KINDS = ("user", "segment")
STATE_FILE = "fake.json"
POLL = 0.01
JOIN_TIMEOUT = 5.0
#: Files of an action the fake agent writes (never read for markers).
AGENT_FILES = ("output", "status", "elapsed", "timedout", "done")
STATUS_MARKER = re.compile(r"FAKE_STATUS=(\d+)")


@dataclass
class _FakeVM:
    spec: GuestSpec
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    @property
    def state_file(self) -> Path:
        return Path(self.spec.run_dir) / STATE_FILE


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
        except ValueError as exc:
            raise ConfigurationError(f"fake backend: a numeric option is not a number: {exc}") from None
        self.architectures = tuple(a.strip() for a in options.get("architectures", "x86_64").split(",") if a.strip())
        self.token = uuid.uuid4().hex
        self._vms: dict[str, _FakeVM] = {}
        self._ended: set[str] = set()
        self._lock = threading.Lock()

    def capabilities(self) -> Capabilities:
        return Capabilities(name=self.name, available=True, accelerator="none", architectures=self.architectures,
                            max_memory=self.max_memory, max_vcpus=self.max_vcpus, networks=NIC_KINDS,
                            channel="directory")

    # Starting -------------------------------------------------------------------
    def start(self, spec: GuestSpec) -> None:
        vm = _FakeVM(spec)
        with self._lock:
            self._check(spec)
            self._vms[spec.vm_id] = vm
            self._ended.discard(spec.vm_id)
        try:
            Path(spec.run_dir).mkdir(parents=True, exist_ok=True)
            self._write_state(vm, "running")
            self._boot(vm)
        except BaseException:
            self._halt(vm)
            _remove(vm)
            with self._lock:
                self._vms.pop(spec.vm_id, None)
            raise

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
        for path, label in ((spec.kernel, "kernel"), (spec.initrd, "initrd")):
            need(path is None or Path(path).is_file(), f"the {label} {path} is not a file")
        need(Path(spec.channel_dir).is_dir(), f"the channel directory {spec.channel_dir} does not exist")
        need(spec.data_dir is None or Path(spec.data_dir).is_dir(), f"the data directory {spec.data_dir} is missing")
        for nic in spec.nics:
            need(nic.kind in NIC_KINDS, f"no NIC of kind {nic.kind!r}")
            need(nic.kind != "segment" or bool(nic.switch), "a segment NIC needs a switch")

    def _boot(self, vm: _FakeVM) -> None:
        """Start the guest: the agent thread (subclasses inject failures here)."""
        self._run_agent(vm, boot=True)

    def _run_agent(self, vm: _FakeVM, boot: bool) -> None:
        vm.thread = threading.Thread(target=self._agent, args=(vm, boot), daemon=True,
                                     name=f"fake-agent-{vm.spec.vm_id}-{self.token[:8]}")
        vm.thread.start()

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
            self._vms[spec.vm_id] = vm
            self._ended.discard(spec.vm_id)
        if self._file_state(vm) != "running":
            return False
        self._write_state(vm, "running")  # this backend owns it now: the old agent thread stops
        self._run_agent(vm, boot=False)
        return True

    def running(self) -> list[str]:
        with self._lock:
            vms = list(self._vms.items())
        return sorted(vm_id for vm_id, vm in vms if self._file_state(vm) == "running")

    def ex_crash(self, vm_id: str) -> None:
        """Make the guest die at once (its state becomes CRASHED; its agent answers no more)."""
        vm = self._vms.get(vm_id)
        if vm is not None:
            self._write_state(vm, "crashed")
            self._halt(vm)

    # The fake guest -----------------------------------------------------------------
    def _write_state(self, vm: _FakeVM, state: str) -> None:
        data = {"vm_id": vm.spec.vm_id, "state": state, "owner": self.token, "pid": os.getpid(),
                "channel_dir": str(vm.spec.channel_dir), "updated": time.time()}
        _put(vm.state_file, json.dumps(data))

    @staticmethod
    def _file_state(vm: _FakeVM) -> str | None:
        state = _read_state(vm.state_file).get("state")
        return str(state) if state is not None else None

    def _owns(self, vm: _FakeVM) -> bool:
        data = _read_state(vm.state_file)
        return data.get("state") == "running" and data.get("owner") == self.token

    def _halt(self, vm: _FakeVM) -> None:
        vm.stop.set()
        thread = vm.thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(JOIN_TIMEOUT)
            if thread.is_alive():
                raise BackendError(f"the fake agent of VM {vm.spec.vm_id} did not stop")

    def _agent(self, vm: _FakeVM, boot: bool) -> None:
        channel = Path(vm.spec.channel_dir)
        actions = channel / "actions"
        started = time.monotonic()
        if boot:
            if vm.stop.wait(self.boot_seconds) or not self._owns(vm):
                return
            (channel / "agent").mkdir(parents=True, exist_ok=True)
            _put(channel / "agent" / "ready", f"uptime={time.monotonic() - started:.2f}\n")
        while not vm.stop.is_set() and self._owns(vm):
            pending = sorted(d for d in _listdir(actions)
                             if (d / "ready").exists() and not (d / "done").exists())
            if pending:
                self._answer(vm, pending[0])
            else:
                vm.stop.wait(POLL)

    def _answer(self, vm: _FakeVM, action: Path) -> None:
        """Write the fake result of one action (following the agent's protocol; nothing is run)."""
        started = time.monotonic()
        texts = {p.name: _text(p) for p in _listdir_files(action) if p.name not in AGENT_FILES}
        marked = "\n".join(texts.values())
        lines = [f"fake: {_first_line(texts.get('run', ''))}"]
        if "body" in texts:
            lines.append(f"fake: {_first_line(texts['body'])}")
        status = 0
        if "FAKE_HANG" in marked:
            timeout = _seconds(texts.get("timeout", ""))
            while time.monotonic() - started < timeout:
                if vm.stop.wait(POLL) or not self._owns(vm):
                    return  # the guest went away mid-action: no result, as with a real guest
            status = 124
            lines.append(f"vmshop-agent: killed after the timeout of {timeout:g} s")
            _put(action / "timedout", f"{timeout:g}\n")
        elif "FAKE_FAIL" in marked:
            status = 1
        elif (found := STATUS_MARKER.search(marked)) is not None:
            status = int(found.group(1)) % 256
        elapsed = f"{time.monotonic() - started:.2f}"
        _put(action / "output", "\n".join(lines) + "\n")
        _put(action / "status", f"{status}\n")
        _put(action / "elapsed", f"{elapsed}\n")
        _put(action / "done", f"status={status}\nelapsed={elapsed}\n")


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
    try:
        Path(vm.spec.run_dir).rmdir()
    except OSError:
        pass


def _put(path: Path, content: str) -> None:
    """Write through a temporary name and a rename, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{threading.get_ident()}.tmp")
    tmp.write_text(content)
    os.replace(tmp, path)


def _read_state(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _listdir(directory: Path) -> list[Path]:
    try:
        return [p for p in directory.iterdir() if p.is_dir()]
    except OSError:
        return []


def _listdir_files(directory: Path) -> list[Path]:
    try:
        return [p for p in directory.iterdir() if p.is_file() and not p.name.startswith(".")]
    except OSError:
        return []


def _text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def _seconds(text: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        return 300.0
    return value if value > 0 else 300.0
