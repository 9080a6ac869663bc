"""The backend contract: what a plant asks of a hypervisor.

One :class:`Backend` per plant, loaded by name from the plant's
configuration (:func:`vmplant_service.backends.load_backend`). The plant
calls these methods from a thread pool, never from the reactor thread, so
they may block; they must be safe to call from several threads at once for
different VMs.

Rules every backend keeps (the contract tests in
``tests/test_backend_contract.py`` check each of them on every backend):

1. ``start(spec)`` boots a guest from ``spec.disk`` (a qcow2 overlay the
   plant already made; the backend never writes the cached image) and
   returns once the hypervisor process runs; it does not wait for the guest
   OS. If it raises (always ``BackendError`` for a spec it cannot run or a
   hypervisor that fails, with the hypervisor's own words), nothing of the
   VM is left running and every file the backend made under
   ``spec.run_dir`` is gone (the plant owns the overlay and removes it
   itself). Starting an id that already runs
   raises.
2. ``state(vm_id)`` translates the hypervisor's own state, at this edge
   only, to :class:`VMState`; an unknown or vanished VM is ``STOPPED`` if
   the backend knows it stopped, else ``UNKNOWN`` — never an exception.
   A VM whose hypervisor process lives but does not answer is ``UNKNOWN``.
   It is cheap enough to poll (the plant's "is it alive?" while waiting).
3. ``stop(vm_id, timeout)`` asks the guest to power down (ACPI), waits up
   to ``timeout`` seconds, then kills it. It returns once no process of the
   VM is left. Calling it for a VM that is already gone, or unknown, is
   not an error. It keeps the VM's files (``destroy`` removes them).
4. ``destroy(vm_id)`` kills the VM at once and removes everything the
   backend made for it (pidfile, sockets, logs under ``run_dir``, and
   ``run_dir`` itself if that leaves it empty). Safe to repeat; safe for a
   VM the backend never heard of (it then does nothing: a backend finds a
   VM's files only through a spec it was given by ``start`` or ``adopt``).
   Before a process is killed its identity is checked (pids get reused).
5. ``adopt(spec)`` re-attaches to a VM a previous plant process started
   (after a plant restart): it returns True if the guest is still running
   (and the backend now controls it again; a guest left paused by rule 11's
   ``pause``, a publish the restart cut short, is resumed first), False if it is gone or does
   not answer (the plant then reclaims what the VM held, calling
   ``destroy``). Either way the backend remembers the spec, so that
   ``destroy`` can kill a hypervisor process that lives on unanswering.
6. ``running()`` lists the ids of VMs this backend instance controls
   (started or adopted) whose guest is still there, sorted.
7. ``capabilities()`` says what the backend can do on this host right now;
   it is cheap and never boots anything.
8. ``agent(vm_id)`` is the stream to the guest's agent (qemu-ga's
   protocol), an :class:`~vmplant_service.agent.transport.AgentTransport`
   keeping that module's rules (bounded answers, deadlines, resync). The
   backend makes the stream's host end itself, somewhere no guest can
   write (a socket in ``run_dir``, or the hypervisor's own API); it never
   gives the guest a writable host directory, and nothing the guest sends
   is ever a host path to the backend. BackendError for a VM the backend
   does not control.
9. Files and processes: what the backend makes for a VM is not readable by
   other users (0600 files, 0700 directories), and the hypervisor runs
   unprivileged where the backend can arrange it (its docstring says how).
10. ``spec.seed`` (a cloud-init NoCloud seed the plant made, 0600 in its
    own 0700 directory) is attached as a READ-ONLY disk, or, by a backend
    whose ``capabilities().seed_disk`` is False, refused with
    ``BackendError`` before anything is made; it is never written, moved or
    chowned (the plant removes it).

11. ``pause(vm_id, timeout)`` stops the guest's CPUs and returns once
    every write the guest made has reached the VM's disk file (the
    hypervisor drained and flushed its block layer): until ``resume`` the
    disk file does not change, so the plant may read it (a publish).
    ``resume(vm_id, timeout)`` lets a paused guest run on; it is safe to
    repeat and does nothing for a guest that is not paused. Both have
    deadlines and raise BackendError for a VM the backend does not control
    or a hypervisor that fails. A backend whose ``capabilities().publish``
    is False keeps the base class's methods, which raise NotSupportedError.

12. Saved running states (a backend whose ``capabilities().resume`` is
    True; the others keep the base class's methods, which raise
    NotSupportedError). ``machine_model(spec)`` names, as a short string,
    everything of the virtual machine ``spec`` would run that a saved state
    depends on (hypervisor version, machine type, memory, vCPUs, kernel, the
    devices and their order); a state saved from one VM can be restored only
    into a spec with the same model. ``save_state(vm_id, fd, timeout)``
    writes the machine state of a guest that ``pause`` holds still into the
    open file ``fd`` (the plant opened it; the hypervisor never gets a path)
    and returns once it is whole; the guest stays paused (``resume`` lets it
    run on, also after a save that failed). ``restore(spec, fd, timeout)``
    is ``start`` for a guest that resumes from the state in ``fd`` (open for
    reading) instead of booting, with ``spec.disk`` an overlay of the disk
    saved with that state; it returns once the guest runs again, and keeps
    rule 1 when it fails. A restored guest learns that it is a new machine
    where the hypervisor can tell it (QEMU: a new VM generation id, on which
    the guest's kernel reseeds its random generator at once).

A backend is built as ``Backend(options)`` from the plant configuration's
string options; an option it cannot use raises ``ConfigurationError``.
Every wait inside a backend has a deadline: no method blocks forever.
"""

from __future__ import annotations

import abc
import enum
from dataclasses import dataclass, field
from pathlib import Path

from vmshop_common.errors import NotSupportedError

from ..agent.transport import AgentTransport


class VMState(enum.Enum):
    """Hypervisor-independent VM states (backends translate to these at their edge)."""

    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    CRASHED = "crashed"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Nic:
    """A network card with MAC ``mac`` (lower-case, colon-separated).

    ``kind`` 'user': the hypervisor's user-mode network; the guest reaches
    nothing outside it (not the host, not any other address) and the host
    reaches the guest's port 80 through ``host_port`` on 127.0.0.1 (no
    forward when None). ``kind`` 'segment': the plant's host-only segment;
    ``switch`` is its VDE control socket.
    """

    kind: str
    mac: str
    host_port: int | None = None
    switch: str | None = None


@dataclass(frozen=True)
class GuestSpec:
    """Everything a backend needs to run one VM.

    ``disk`` is the VM's own overlay; ``kernel``/``initrd``/``cmdline`` boot
    it directly (without a kernel it boots through its disk's own boot
    loader); ``data_dir`` an optional share of application data, which
    the guest sees READ-ONLY (9p tag ``vmdata``; a read-only hostfs bind under
    UML); ``seed`` an optional raw image (the cloud-init NoCloud seed, ISO
    9660 labelled ``cidata``) the guest sees as a READ-ONLY second virtio
    disk; ``run_dir`` is the backend's own directory for this VM (pidfile,
    control and agent sockets, console log), which no guest can write.
    """

    vm_id: str
    disk: Path
    memory: int
    vcpus: int
    run_dir: Path
    kernel: Path | None = None
    initrd: Path | None = None
    cmdline: str = ""
    machine: str = "pc"
    arch: str = "x86_64"
    data_dir: Path | None = None
    nics: tuple[Nic, ...] = ()
    seed: Path | None = None
    extra: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do here.

    ``available`` False comes with a ``reason``; ``accelerator`` is how
    guests run ('kvm', 'tcg'; 'auto' while not yet probed; 'none' for the
    fake); ``max_memory`` (MiB) and ``max_vcpus`` bound one guest;
    ``networks`` are the :class:`Nic` kinds ``start`` accepts; ``channel``
    says how the agent's stream reaches the guest ('virtio-serial',
    'serial', 'fake'); ``kernel_limit`` is why the backend cannot boot an
    image's own kernel ('' when it can: a virtual machine), so images that
    need theirs (``<guest kernel="own">``) are declined; ``seed_disk``
    whether it attaches a seed disk (rule 10), which images with cloud-init
    need; ``publish`` whether its VMs can be published as images (rule 11:
    it can pause a guest with its disk flushed); ``resume`` whether it can
    save a guest's running state and start clones from it (rule 12).
    """

    name: str
    available: bool
    reason: str = ""
    accelerator: str = ""
    architectures: tuple[str, ...] = ("x86_64",)
    max_memory: int = 0
    max_vcpus: int = 0
    networks: tuple[str, ...] = ()
    channel: str = ""
    kernel_limit: str = ""
    seed_disk: bool = True
    publish: bool = False
    resume: bool = False


class Backend(abc.ABC):
    """A hypervisor driver; see the module docstring for the rules."""

    name = "abstract"

    def __init__(self, options: dict[str, str] | None = None) -> None:
        self.options: dict[str, str] = dict(options or {})

    @abc.abstractmethod
    def capabilities(self) -> Capabilities:
        """What this backend can do on this host right now."""

    @abc.abstractmethod
    def start(self, spec: GuestSpec) -> None:
        """Boot the guest (rule 1)."""

    @abc.abstractmethod
    def state(self, vm_id: str) -> VMState:
        """The VM's state, translated at this edge (rule 2)."""

    @abc.abstractmethod
    def stop(self, vm_id: str, timeout: float = 30.0) -> None:
        """Graceful power-down, then kill after ``timeout`` (rule 3)."""

    @abc.abstractmethod
    def destroy(self, vm_id: str) -> None:
        """Kill now and remove the backend's files; safe to repeat (rule 4)."""

    @abc.abstractmethod
    def adopt(self, spec: GuestSpec) -> bool:
        """Re-attach to a VM started by an earlier plant process (rule 5)."""

    @abc.abstractmethod
    def running(self) -> list[str]:
        """Ids of the VMs this backend controls (rule 6)."""

    @abc.abstractmethod
    def agent(self, vm_id: str) -> AgentTransport:
        """The stream to the guest's agent (rule 8)."""

    def pause(self, vm_id: str, timeout: float = 30.0) -> None:
        """Stop the guest with its disk flushed (rule 11); here: not supported."""
        raise NotSupportedError(f"backend {self.name} cannot pause a guest, so its VMs cannot be published")

    def resume(self, vm_id: str, timeout: float = 30.0) -> None:
        """Let a paused guest run on (rule 11); here: not supported."""
        raise NotSupportedError(f"backend {self.name} cannot pause or resume a guest")

    def machine_model(self, spec: GuestSpec) -> str:
        """What a saved state of ``spec``'s machine depends on (rule 12); here: not supported."""
        raise NotSupportedError(f"backend {self.name} cannot save or restore a guest's running state")

    def save_state(self, vm_id: str, fd: int, timeout: float = 60.0) -> None:
        """Write a paused guest's machine state into ``fd`` (rule 12); here: not supported."""
        raise NotSupportedError(f"backend {self.name} cannot save a guest's running state")

    def restore(self, spec: GuestSpec, fd: int, timeout: float = 60.0) -> None:
        """Start a guest from the machine state in ``fd`` (rule 12); here: not supported."""
        raise NotSupportedError(f"backend {self.name} cannot start a guest from a saved state")

    def close(self) -> None:
        """Release the backend's own resources (VMs are left as they are)."""
        return None
