"""The QEMU backend: one detached ``qemu-system-x86_64`` per VM.

Each VM's QEMU runs in a session of its own, so it outlives the plant process;
what the backend needs to find it again lives in the VM's ``run_dir``:

- ``qemu.pid``: QEMU's pidfile. A pid is trusted only while
  ``/proc/PID/cmdline`` names this very pidfile (pids get reused);
- ``qmp.sock``: the QMP control socket (state, power-down);
- ``qga.sock``: the guest agent's stream (a ``-chardev socket`` server
  behind the virtio-serial port ``org.qemu.guest_agent.0``), the VM's only
  configuration channel (:meth:`QemuBackend.agent`);
- ``console.sock``: the guest's serial console, read by the backend's
  :class:`~vmplant_service.backends.console.ConsoleKeeper` into
  ``console.log`` (rotated to ``console.log.1`` at ``console_limit`` bytes);
- ``qemu.err``: what QEMU printed on stderr (errors, warnings).

QEMU makes every socket, opens the disk, the kernel and the data share's
root and writes its pidfile while it is still root, then drops to the
``runas`` user, under its seccomp sandbox (:data:`SANDBOX`): from then on
the QEMU process (and a guest that escaped into it) holds no capability,
may not fork or exec, and can open nothing in the plant's 0700 directories
(every VM's files stay root's): it can write nothing on the host but its
already-open files. ``run_dir`` is 0700 and
belongs to the plant's user; every file in it is 0600.

The guest boots its kernel directly (or, without one, through its disk's
own boot loader, SeaBIOS first); its disk is the plant's overlay
(``cache=unsafe``: the overlay is a throw-away clone that never outlives
the host, so the guest's flushes need not reach the host's disk). There is
no shared writable directory: application data is an optional 9p share
exported ``readonly=on`` with ``security_model=none`` (tag ``vmdata``): the
guest can create, link or chmod nothing on it, and it sees the data
store's own owners and modes (mapped-xattr would hide them behind xattrs
that the site's files do not carry). QEMU reads it as the ``runas`` user,
so the data store must be readable by that user. NICs: 'user' is QEMU's
user-mode network with ``restrict=on`` (the guest reaches no address
outside QEMU, not even the host) and one forward from 127.0.0.1 to the
guest's port 80; 'segment' plugs into a VDE switch (the plant gives each
owner a switch of their own). A cloud-init seed (``spec.seed``) is a second
virtio disk, ``readonly=on``; QEMU opens it as root before it drops to the
``runas`` user, so it stays the plant's (0600).

Options (strings, from the plant's configuration):

- ``qemu_binary``: default ``qemu-system-x86_64`` (looked up in PATH);
- ``accel``: ``auto`` (default), ``kvm`` or ``tcg``. ``auto`` never trusts
  ``/dev/kvm`` alone: it boots the image's kernel under KVM once, with a
  deadline, and uses KVM only if the guest reached user space; the answer
  is cached in ``<state_dir>/accel-probe.json`` (default
  ``~/.cache/vmshop``), keyed by QEMU's version, the host kernel, the guest
  kernel and the machine type;
- ``state_dir``: where the probe's cache lives;
- ``probe_timeout``: seconds a KVM probe boot may take (default 5);
- ``disk_cache``: QEMU's cache mode for the overlay (default ``unsafe``);
- ``qmp_timeout``: seconds each QMP exchange may take (default 5);
- ``start_timeout``: seconds QEMU may take to answer on QMP once started (default 30);
- ``max_vcpus``: vCPUs a guest may have (default: the host's CPU count);
- ``memory_fraction``: share of the host's memory guests may use (default 0.75);
- ``runas``: the user QEMU drops to (default ``vmshop-qemu`` when the plant
  runs as root and that user exists, which ``scripts/setup_host.sh``
  makes; ``none`` keeps the plant's user); a plant that is root and finds
  no such user refuses to start guests as root unless ``runas=root`` says so;
- ``sandbox``: ``on`` (default) or ``off``: QEMU's seccomp sandbox;
- ``console_limit``: bytes of console log kept before rotation (default 262144).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from vmshop_common.errors import BackendError, ConfigurationError

from ..agent.transport import AgentTransport, SocketTransport
from ..processes import owned_pid, pid_alive
from .base import Backend, Capabilities, GuestSpec, VMState
from .console import ConsoleKeeper, console_tail
from .hostside import choice, host_memory_mib, positive_number, tail
from .qmp import QMPClient, QMPError

log = logging.getLogger(__name__)

#: QEMU's run states (QAPI ``RunState``) as VMStates; anything else is UNKNOWN.
QEMU_STATES: dict[str, VMState] = {
    "running": VMState.RUNNING,
    "paused": VMState.PAUSED,
    "prelaunch": VMState.PAUSED,
    "debug": VMState.PAUSED,
    "suspended": VMState.PAUSED,
    "inmigrate": VMState.PAUSED,
    "postmigrate": VMState.PAUSED,
    "finish-migrate": VMState.PAUSED,
    "save-vm": VMState.PAUSED,
    "restore-vm": VMState.PAUSED,
    "shutdown": VMState.STOPPED,
    "guest-panicked": VMState.CRASHED,
    "internal-error": VMState.CRASHED,
    "io-error": VMState.CRASHED,
    "watchdog": VMState.CRASHED,
}

#: The port of the guest that a 'user' NIC's host port forwards to (the guest's httpd).
GUEST_HTTP_PORT = 80
NIC_KINDS = ("user", "segment")
ARCHITECTURES = ("x86_64",)
ACCELERATORS = ("auto", "kvm", "tcg")
DISK_CACHES = ("unsafe", "writeback", "none", "writethrough", "directsync")
#: Longest unix socket path the kernel accepts (sun_path is 108 bytes with its NUL).
MAX_SOCKET_PATH = 107
VM_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
POLL = 0.05
#: Seconds a process may take to disappear after SIGKILL.
KILL_WAIT = 10.0
#: What the probe's init prints once the guest kernel has started user space.
PROBE_MARKER = "VMSHOP-ACCEL-PROBE-OK"
#: The virtio-serial port name qemu-ga looks for (and libvirt, Nova, Proxmox use).
AGENT_PORT = "org.qemu.guest_agent.0"
#: The user QEMU runs as by default (made by scripts/setup_host.sh).
DEFAULT_RUNAS = "vmshop-qemu"
#: QEMU's seccomp sandbox. ``elevateprivileges=deny`` is left out: QEMU 7.2 installs the filter before ``-runas``
#: drops to the unprivileged user, and that filter forbids the setgid/setuid the drop needs (QEMU dies of SIGSYS,
#: measured). Once dropped, QEMU holds no capability, and ``spawn=deny`` forbids the execve (of a set-uid program)
#: that could give it one back.
SANDBOX = "on,obsolete=deny,spawn=deny,resourcecontrol=deny"
#: The id of a VM's generation id device (QOM path /machine/peripheral/<id>).
VMGENID = "vmgenid0"
#: The name a state file's descriptor gets in QEMU (``getfd``), for a ``fd:`` migration.
STATE_FD = "vmshop-state"
#: Bytes per second a state is saved or restored at (QEMU's default, 32 MiB/s, is for live networks).
STATE_BANDWIDTH = 8 * 1024**3
PROBE_CMDLINE = ("console=ttyS0 quiet loglevel=0 panic=-1 "
                 f'rdinit=/bin/sh -- -c "echo {PROBE_MARKER}; /bin/busybox poweroff -f"')


def translate_status(status: str) -> VMState:
    """QEMU's run state (QMP ``query-status``) as a VMState: the backend's one translation."""
    return QEMU_STATES.get(status, VMState.UNKNOWN)


@dataclass(frozen=True)
class RunPaths:
    """The files the backend makes in a VM's run directory (absolute paths)."""

    run_dir: Path

    @classmethod
    def of(cls, run_dir: Path) -> RunPaths:
        return cls(Path(run_dir).absolute())

    @property
    def pidfile(self) -> Path:
        return self.run_dir / "qemu.pid"

    @property
    def qmp(self) -> Path:
        return self.run_dir / "qmp.sock"

    @property
    def agent(self) -> Path:
        return self.run_dir / "qga.sock"

    @property
    def console_socket(self) -> Path:
        return self.run_dir / "console.sock"

    @property
    def console(self) -> Path:
        return self.run_dir / "console.log"

    @property
    def stderr(self) -> Path:
        return self.run_dir / "qemu.err"

    def all(self) -> tuple[Path, ...]:
        return (self.pidfile, self.qmp, self.agent, self.console_socket, self.console,
                self.console.with_name("console.log.1"), self.stderr)


def has_vmgenid(machine: str) -> bool:
    """Whether a VM of QEMU machine type ``machine`` gets a VM generation id device (ACPI: pc and q35 types)."""
    return machine in ("pc", "q35") or machine.startswith(("pc-", "pc-i440fx", "pc-q35"))


def qemu_command(spec: GuestSpec, binary: str, accelerator: str, disk_cache: str = "unsafe",
                 runas: str | None = None, sandbox: bool = True, incoming: bool = False) -> list[str]:
    """The command line that runs ``spec`` under QEMU (see the module docstring); ``incoming``: the guest does not
    boot, QEMU waits (paused) for its machine state (``migrate-incoming``, :meth:`QemuBackend.restore`)."""
    paths = RunPaths.of(spec.run_dir)
    command = [
        binary,
        "-name", f"vmshop-{spec.vm_id}",
        "-machine", spec.machine,
        "-accel", accelerator,
        "-m", f"{spec.memory}M",
        "-smp", str(spec.vcpus),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
    ]
    if spec.kernel is not None:
        command += ["-kernel", str(Path(spec.kernel).absolute())]
        if spec.initrd is not None:
            command += ["-initrd", str(Path(spec.initrd).absolute())]
        if spec.cmdline:
            command += ["-append", spec.cmdline]
    # file.auto-read-only=off: the overlay's file stays open read-write while a saved state is written or loaded.
    # With -drive's default (on), QEMU reopens the file BY PATH, read-only, when a migration inactivates the disk
    # (and read-write when it is activated again), which QEMU, by then the runas user, may not do in the plant's
    # 0700 directory: the save (or a restore) failed with "bdrv_inactivate_all() failed (-1)" (measured, 7.2).
    command += ["-drive", f"file={Path(spec.disk).absolute()},file.auto-read-only=off,if=virtio,format=qcow2,"
                          f"cache={disk_cache}"]
    if spec.seed is not None:
        # The cloud-init seed: a second virtio disk, read-only (QEMU opens it read-only, as root, before -runas).
        command += ["-drive", f"file={Path(spec.seed).absolute()},if=virtio,format=raw,readonly=on"]
    command += ["-chardev", f"socket,id=qga0,path={paths.agent},server=on,wait=off",
                "-device", "virtio-serial-pci,id=vser0",
                "-device", f"virtserialport,bus=vser0.0,chardev=qga0,name={AGENT_PORT}"]
    if has_vmgenid(spec.machine):
        # A VM generation id (guid=auto: a new one each time QEMU starts). A clone restored from a saved state gets
        # its own as the state loads (QEMU writes it into the guest and notifies it), on which the guest kernel
        # reseeds its random generator at once (Linux's vmgenid driver): clones never share a random stream.
        command += ["-device", f"vmgenid,id={VMGENID}"]
    if spec.data_dir is not None:
        command += ["-fsdev", f"local,id=data,path={Path(spec.data_dir).absolute()},security_model=none,readonly=on",
                    "-device", "virtio-9p-pci,fsdev=data,mount_tag=vmdata"]
    for index, nic in enumerate(spec.nics):
        netdev = f"net{index}"
        if nic.kind == "user":
            forward = f",hostfwd=tcp:127.0.0.1:{nic.host_port}-:{GUEST_HTTP_PORT}" if nic.host_port else ""
            command += ["-netdev", f"user,id={netdev},restrict=on{forward}"]
        else:
            command += ["-netdev", f"vde,id={netdev},sock={nic.switch}"]
        command += ["-device", f"virtio-net-pci,netdev={netdev},mac={nic.mac},romfile="]
    command += [
        "-qmp", f"unix:{paths.qmp},server=on,wait=off",
        "-chardev", f"socket,id=con0,path={paths.console_socket},server=on,wait=off",
        "-serial", "chardev:con0",
        "-pidfile", str(paths.pidfile),
    ]
    if incoming:
        command += ["-incoming", "defer", "-S"]
    if sandbox:
        command += ["-sandbox", SANDBOX]
    if runas:
        command += ["-runas", runas]
    return command


def qemu_pid(paths: RunPaths) -> int | None:
    """The pid of the live QEMU that owns ``paths``' pidfile, or None.

    A pid read from the pidfile counts only if that process's command line
    names this pidfile: a pid reused by another process is never ours.
    """
    return owned_pid(paths.pidfile, str(paths.pidfile))


@dataclass
class _VM:
    spec: GuestSpec
    paths: RunPaths
    lock: threading.Lock = field(default_factory=threading.Lock)
    transport: SocketTransport | None = None


class QemuBackend(Backend):
    """VMs as detached QEMU processes; see the module docstring for the options."""

    name = "qemu"

    def __init__(self, options: dict[str, str] | None = None) -> None:
        super().__init__(options)
        options = self.options
        self.binary = options.get("qemu_binary", "qemu-system-x86_64")
        self.accel = options.get("accel", "auto")
        if self.accel not in ACCELERATORS:
            raise ConfigurationError(f"qemu backend: accel must be one of {', '.join(ACCELERATORS)}, "
                                     f"not {self.accel!r}")
        self.disk_cache = options.get("disk_cache", "unsafe")
        if self.disk_cache not in DISK_CACHES:
            raise ConfigurationError(f"qemu backend: disk_cache must be one of {', '.join(DISK_CACHES)}")
        state_dir = options.get("state_dir")
        cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        self.state_dir = Path(state_dir) if state_dir else cache_home / "vmshop"
        self.probe_timeout = positive_number(options, "probe_timeout", 5.0, "qemu")
        self.qmp_timeout = positive_number(options, "qmp_timeout", 5.0, "qemu")
        self.start_timeout = positive_number(options, "start_timeout", 30.0, "qemu")
        self.memory_fraction = positive_number(options, "memory_fraction", 0.75, "qemu")
        self.max_vcpus = int(positive_number(options, "max_vcpus", float(os.cpu_count() or 1), "qemu"))
        self.runas = _runas_option(options.get("runas"))
        self.sandbox = choice(options, "sandbox", ("on", "off"), "on", "qemu") == "on"
        self.consoles = ConsoleKeeper(int(positive_number(options, "console_limit", 262144, "qemu")))
        self._vms: dict[str, _VM] = {}
        self._ended: set[str] = set()
        self._lock = threading.Lock()
        self._accel_lock = threading.Lock()
        self._decisions: dict[str, str] = {}
        self._version: str | None = None

    # Where QEMU is and what it can do ----------------------------------------------
    def _binary_path(self) -> str | None:
        if os.sep in self.binary:
            return self.binary if os.access(self.binary, os.X_OK) else None
        return shutil.which(self.binary)

    def qemu_version(self) -> str:
        """QEMU's version line (cached; BackendError if QEMU cannot run)."""
        if self._version is None:
            binary = self._binary_path()
            if binary is None:
                raise BackendError(f"{self.binary} is not installed (Debian package qemu-system-x86)")
            try:
                out = subprocess.run([binary, "--version"], capture_output=True, timeout=30, check=True).stdout
            except (OSError, subprocess.SubprocessError) as exc:
                raise BackendError(f"cannot run {binary} --version: {exc}") from None
            self._version = out.decode(errors="replace").splitlines()[0].strip() if out else "unknown"
        return self._version

    def capabilities(self) -> Capabilities:
        binary = self._binary_path()
        return Capabilities(
            name=self.name, available=binary is not None,
            reason="" if binary is not None else f"{self.binary} is not installed",
            accelerator=self._known_accelerator() if binary is not None else "",
            architectures=ARCHITECTURES, networks=NIC_KINDS, channel="virtio-serial",
            max_memory=int(host_memory_mib() * self.memory_fraction), max_vcpus=self.max_vcpus, publish=True,
            resume=True)

    # Accelerator ---------------------------------------------------------------------
    @property
    def probe_cache(self) -> Path:
        return self.state_dir / "accel-probe.json"

    def _probe_key(self, spec: GuestSpec) -> str:
        kernel = Path(spec.kernel).absolute() if spec.kernel else None
        try:
            stamp = f"{kernel.stat().st_size}:{kernel.stat().st_mtime_ns}" if kernel else "-"
        except OSError:
            stamp = "?"
        return "|".join((self.qemu_version(), os.uname().release, str(kernel), stamp, spec.machine))

    def _read_cache(self) -> dict[str, dict[str, object]]:
        try:
            data = json.loads(self.probe_cache.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _known_accelerator(self) -> str:
        """kvm/tcg if fixed or already decided for this QEMU on this host; else 'auto'."""
        if self.accel != "auto":
            return self.accel
        if self._decisions:
            return list(self._decisions.values())[-1]
        try:
            prefix = f"{self.qemu_version()}|{os.uname().release}|"
        except BackendError:
            return "auto"
        found = {str(entry.get("accel")) for key, entry in self._read_cache().items()
                 if key.startswith(prefix) and isinstance(entry, dict)}
        return found.pop() if len(found) == 1 else "auto"

    def accelerator_for(self, spec: GuestSpec) -> str:
        """'kvm' or 'tcg' for booting ``spec`` (probing once per QEMU, host, kernel and machine)."""
        if self.accel != "auto":
            return self.accel
        with self._accel_lock:
            key = self._probe_key(spec)
            if key in self._decisions:
                return self._decisions[key]
            entry = self._read_cache().get(key)
            if isinstance(entry, dict) and entry.get("accel") in ("kvm", "tcg"):
                decision = str(entry["accel"])
            else:
                started = time.monotonic()
                works = self._kvm_usable() and self.probe_kvm(spec)
                decision = "kvm" if works else "tcg"
                self._write_cache(key, {"accel": decision, "seconds": round(time.monotonic() - started, 2),
                                        "probed": time.time()})
                log.info("accelerator probe for %s: %s", spec.kernel, decision)
            self._decisions[key] = decision
            return decision

    @staticmethod
    def _kvm_usable() -> bool:
        """Whether KVM could work at all (its device is there and ours); a probe boot still decides."""
        return os.path.exists("/dev/kvm") and os.access("/dev/kvm", os.R_OK | os.W_OK)

    def probe_kvm(self, spec: GuestSpec) -> bool:
        """Boot ``spec``'s kernel and initramfs under KVM; True if its init printed the marker in time.

        The initramfs must have ``/bin/sh`` (busybox); without an initramfs
        there is nothing to probe with, and the answer is False (TCG).
        """
        binary = self._binary_path()
        if binary is None or spec.kernel is None or spec.initrd is None:
            return False
        with tempfile.TemporaryDirectory(prefix="vmshop-probe-") as tmp:
            console = Path(tmp) / "console.log"
            command = [binary, "-machine", spec.machine, "-accel", "kvm", "-m", "128M", "-smp", "1",
                       "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
                       "-kernel", str(spec.kernel), "-initrd", str(spec.initrd), "-append", PROBE_CMDLINE,
                       "-serial", f"file:{console}"]
            with open(Path(tmp) / "stderr", "wb") as err:
                try:
                    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                            stderr=err, start_new_session=True)
                except OSError:
                    return False
            deadline = time.monotonic() + self.probe_timeout
            try:
                while time.monotonic() < deadline:
                    if PROBE_MARKER in tail(console, 4096):
                        return True
                    if proc.poll() is not None:
                        return PROBE_MARKER in tail(console, 4096)
                    time.sleep(POLL)
                return False
            finally:
                if proc.poll() is None:
                    proc.kill()
                try:
                    proc.wait(timeout=KILL_WAIT)
                except subprocess.TimeoutExpired:
                    log.error("the KVM probe QEMU (pid %d) did not die", proc.pid)

    def _write_cache(self, key: str, entry: dict[str, object]) -> None:
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            data = self._read_cache()
            data[key] = entry
            tmp = self.probe_cache.with_name(f".{self.probe_cache.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            os.replace(tmp, self.probe_cache)
        except OSError as exc:
            log.warning("cannot cache the accelerator probe in %s: %s", self.probe_cache, exc)

    # The contract ----------------------------------------------------------------------
    def start(self, spec: GuestSpec) -> None:
        self._run(spec, None, 0.0)

    def restore(self, spec: GuestSpec, fd: int, timeout: float = 60.0) -> None:
        """Start QEMU with ``-incoming defer -S``, give it ``fd`` (``getfd``, SCM_RIGHTS on the QMP socket) and
        ``migrate-incoming fd:``, wait (until ``timeout``) until the state is loaded, then ``cont``."""
        self._run(spec, fd, timeout)

    def _run(self, spec: GuestSpec, state_fd: int | None, timeout: float) -> None:
        self._check(spec)
        paths = RunPaths.of(spec.run_dir)
        with self._lock:
            if spec.vm_id in self._vms and qemu_pid(self._vms[spec.vm_id].paths) is not None:
                raise BackendError(f"VM {spec.vm_id} already runs")
            if qemu_pid(paths) is not None:
                raise BackendError(f"a QEMU of {paths.run_dir} still runs; adopt or destroy VM {spec.vm_id} first")
            # Claim the id now, so a second start of it fails instead of racing this one.
            self._vms[spec.vm_id] = _VM(spec, paths)
            self._ended.discard(spec.vm_id)
        binary = self._binary_path()
        try:
            if binary is None:
                raise BackendError(f"{self.binary} is not installed (Debian package qemu-system-x86)")
            accelerator = self.accelerator_for(spec)
            _remove(paths)
            paths.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(paths.run_dir, 0o700)
            self._launch(qemu_command(spec, binary, accelerator, self.disk_cache, self._runas_user(),
                                      self.sandbox, incoming=state_fd is not None), spec, paths)
            self.consoles.keep(spec.vm_id, paths.console_socket, paths.console)
            if state_fd is not None:
                self._incoming(spec, paths, state_fd, timeout)
        except BaseException:
            self.consoles.forget(spec.vm_id)
            try:
                self._kill(paths)
            finally:
                _remove(paths)
            with self._lock:
                self._vms.pop(spec.vm_id, None)
            raise

    def _launch(self, command: list[str], spec: GuestSpec, paths: RunPaths) -> None:
        """Start QEMU detached; BackendError (with QEMU's words) unless it then answers QMP.

        QEMU is not told to ``-daemonize`` (in 7.2 its sandbox forbids the
        fork that takes): a shell starts it in the background of a session of
        its own, with umask 077, says its pid and exits, so QEMU is init's
        child, never the plant's (no zombie to reap), and outlives the plant.
        """
        try:
            fd = os.open(paths.stderr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as err:
                shell = subprocess.run(["/bin/sh", "-c", '"$@" </dev/null >/dev/null & echo $!', "vmshop-qemu-launch",
                                        *command], stdout=subprocess.PIPE, stderr=err, start_new_session=True,
                                       umask=0o077, timeout=self.start_timeout, check=True)
            pid = int(shell.stdout.strip())
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            raise BackendError(f"cannot run {command[0]}: {exc}") from None
        deadline = time.monotonic() + self.start_timeout
        last = ""
        while True:
            if not pid_alive(pid):
                raise BackendError(f"QEMU could not start VM {spec.vm_id}: "
                                   f"{tail(paths.stderr) or console_tail(paths.console, 600) or 'no message'}")
            if qemu_pid(paths) == pid:
                try:
                    with QMPClient(paths.qmp, min(self.qmp_timeout, max(deadline - time.monotonic(), 0.1))) as qmp:
                        qmp.execute("query-status")
                    return
                except QMPError as exc:
                    last = str(exc)
            if time.monotonic() > deadline:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                raise BackendError(f"QEMU did not start VM {spec.vm_id} within {self.start_timeout:g} s: "
                                   f"{tail(paths.stderr) or last}") from None
            time.sleep(POLL)

    def _incoming(self, spec: GuestSpec, paths: RunPaths, fd: int, timeout: float) -> None:
        """Load the machine state from ``fd`` into the QEMU that waits for it, then let the guest run."""
        deadline = time.monotonic() + timeout
        with QMPClient(paths.qmp, self.qmp_timeout) as qmp:
            qmp.execute("getfd", {"fdname": STATE_FD}, fds=(fd,))
            qmp.execute("migrate-incoming", {"uri": f"fd:{STATE_FD}"})
        status = self._wait_migration(spec.vm_id, paths, deadline, incoming=True)
        if status not in ("paused", "prelaunch", "postmigrate"):
            raise BackendError(f"VM {spec.vm_id}: QEMU loaded the saved state and is {status[:40]!r}, not paused")
        with QMPClient(paths.qmp, self.qmp_timeout) as qmp:
            qmp.execute("cont")
            status = str(qmp.execute("query-status").get("status", ""))
        if translate_status(status) != VMState.RUNNING:
            raise BackendError(f"VM {spec.vm_id} did not run from its saved state (QEMU says {status[:40]!r})")

    def _wait_migration(self, vm_id: str, paths: RunPaths, deadline: float, incoming: bool,
                        lock: threading.Lock | None = None) -> str:
        """Poll ``query-migrate`` (a short QMP connection each time) until the migration ended; QEMU's run state
        then. BackendError when it failed, or it did not end by ``deadline`` (an outgoing one is cancelled)."""
        what = "load the saved state" if incoming else "save the guest's state"
        while True:
            if qemu_pid(paths) is None:
                raise BackendError(f"VM {vm_id}: QEMU ended while it was to {what}: "
                                   f"{tail(paths.stderr) or 'no message'}")
            with lock or threading.Lock(), QMPClient(paths.qmp, self.qmp_timeout) as qmp:
                info = qmp.execute("query-migrate")
                migration = str(info.get("status", "")) if isinstance(info, dict) else ""
                status = str(qmp.execute("query-status").get("status", ""))
            if migration == "completed" or (incoming and status not in ("inmigrate", "") and migration != "failed"):
                return status
            if migration in ("failed", "cancelled"):
                detail = str(info.get("error-desc", ""))[:300] if isinstance(info, dict) else ""
                raise BackendError(f"VM {vm_id}: QEMU could not {what}: {detail or tail(paths.stderr) or migration}")
            if time.monotonic() > deadline:
                if not incoming:
                    try:
                        with lock or threading.Lock(), QMPClient(paths.qmp, self.qmp_timeout) as qmp:
                            qmp.execute("migrate_cancel")
                    except QMPError as exc:
                        log.warning("VM %s: cancelling the save of its state failed: %s", vm_id, exc)
                raise BackendError(f"VM {vm_id}: QEMU did not {what} in time (migration {migration or 'unknown'})")
            time.sleep(POLL)

    def machine_model(self, spec: GuestSpec) -> str:
        """A digest of what a saved state of ``spec``'s machine depends on: QEMU's version and accelerator, the
        machine type, memory, vCPUs, kernel, and every device in :func:`qemu_command`'s order (kinds, not paths)."""
        parts = [self.qemu_version(), self.accelerator_for(spec), spec.machine, str(spec.memory), str(spec.vcpus),
                 str(spec.kernel), str(spec.initrd), spec.cmdline, f"seed={spec.seed is not None}",
                 f"data={spec.data_dir is not None}", f"vmgenid={has_vmgenid(spec.machine)}",
                 "nics=" + ",".join(nic.kind for nic in spec.nics)]
        return "qemu:" + hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]

    def save_state(self, vm_id: str, fd: int, timeout: float = 60.0) -> None:
        """``getfd`` (``fd`` over the QMP socket) then ``migrate fd:`` of the paused guest, polled until it
        completed (QEMU is then in ``postmigrate``: :meth:`resume` lets the guest run on)."""
        vm = self._controlled(vm_id)
        deadline = time.monotonic() + timeout
        with vm.lock, QMPClient(vm.paths.qmp, self.qmp_timeout) as qmp:
            status = str(qmp.execute("query-status").get("status", ""))
            if translate_status(status) != VMState.PAUSED:
                raise BackendError(f"VM {vm_id} is {status[:40]!r}: only a paused guest's state is saved")
            qmp.execute("getfd", {"fdname": STATE_FD}, fds=(fd,))
            qmp.execute("migrate-set-parameters", {"max-bandwidth": STATE_BANDWIDTH})
            qmp.execute("migrate", {"uri": f"fd:{STATE_FD}"})
        self._wait_migration(vm_id, vm.paths, deadline, incoming=False, lock=vm.lock)

    def _check(self, spec: GuestSpec) -> None:
        """Refuse a spec QEMU could not run, before anything is made."""
        def need_file(path: Path | None, label: str) -> None:
            if path is not None and not Path(path).is_file():
                raise BackendError(f"VM {spec.vm_id}: the {label} {path} is not a file")

        if not VM_ID.match(spec.vm_id):
            raise BackendError(f"{spec.vm_id!r} is not a usable VM id")
        if spec.arch not in ARCHITECTURES:
            raise BackendError(f"VM {spec.vm_id}: the qemu backend runs {', '.join(ARCHITECTURES)}, not {spec.arch}")
        if spec.memory < 1 or spec.vcpus < 1:
            raise BackendError(f"VM {spec.vm_id}: memory and vcpus must be positive")
        need_file(spec.disk, "disk")
        need_file(spec.kernel, "kernel")
        need_file(spec.initrd, "initrd")
        need_file(spec.seed, "seed")
        if spec.initrd is not None and spec.kernel is None:
            raise BackendError(f"VM {spec.vm_id}: an initrd needs a kernel")
        if spec.data_dir is not None and not Path(spec.data_dir).is_dir():
            raise BackendError(f"VM {spec.vm_id}: the data directory {spec.data_dir} does not exist")
        paths = [spec.disk, spec.run_dir, spec.kernel, spec.initrd, spec.data_dir, spec.seed]
        paths += [Path(nic.switch) for nic in spec.nics if nic.switch]
        if any("," in str(path) for path in paths if path is not None):
            raise BackendError(f"VM {spec.vm_id}: QEMU option values cannot hold ',' (a path has one)")
        for nic in spec.nics:
            if nic.kind not in NIC_KINDS:
                raise BackendError(f"VM {spec.vm_id}: no NIC of kind {nic.kind!r} (only {', '.join(NIC_KINDS)})")
            if not MAC.match(nic.mac):
                raise BackendError(f"VM {spec.vm_id}: {nic.mac!r} is not a MAC address (lower-case hex)")
            if nic.kind == "user" and nic.host_port is not None and not 0 < nic.host_port < 65536:
                raise BackendError(f"VM {spec.vm_id}: {nic.host_port} is not a TCP port")
            if nic.kind == "segment" and (not nic.switch or not Path(nic.switch).exists()):
                raise BackendError(f"VM {spec.vm_id}: the segment's switch {nic.switch} is not running")
            if nic.kind == "segment" and len(str(nic.switch).encode()) + len("/.PPPPP-NNNNN") > MAX_SOCKET_PATH:
                # QEMU's vde client binds a socket of its own in the switch's directory.
                raise BackendError(f"VM {spec.vm_id}: the segment's switch {nic.switch} is too deep for QEMU's vde "
                                   "client (a unix socket path has at most 107 bytes): give the plant a shorter "
                                   "<network switch-dir>")
        if len(str(RunPaths.of(spec.run_dir).console_socket).encode()) > MAX_SOCKET_PATH:
            raise BackendError(f"VM {spec.vm_id}: the run directory {spec.run_dir} is too long for a unix socket")

    def state(self, vm_id: str) -> VMState:
        vm = self._vms.get(vm_id)
        if vm is None:
            return VMState.STOPPED if vm_id in self._ended else VMState.UNKNOWN
        if qemu_pid(vm.paths) is None:
            return VMState.STOPPED
        try:
            with vm.lock, QMPClient(vm.paths.qmp, self.qmp_timeout) as qmp:
                status = qmp.execute("query-status").get("status", "")
        except QMPError:
            # QEMU may have exited between the two looks; else it is there but mute.
            return VMState.STOPPED if qemu_pid(vm.paths) is None else VMState.UNKNOWN
        return translate_status(str(status))

    def stop(self, vm_id: str, timeout: float = 30.0) -> None:
        vm = self._vms.get(vm_id)
        if vm is None or qemu_pid(vm.paths) is None:
            return
        deadline = time.monotonic() + timeout
        try:
            with vm.lock, QMPClient(vm.paths.qmp, min(self.qmp_timeout, max(timeout, 0.1))) as qmp:
                status = qmp.execute("query-status").get("status", "")
                if translate_status(str(status)) == VMState.RUNNING:
                    qmp.execute("system_powerdown")
                else:
                    deadline = 0.0  # a guest that does not run cannot hear the power button
        except QMPError as exc:
            log.info("VM %s: no ACPI power-down (%s); it will be killed after %g s", vm_id, exc, timeout)
        if not _wait_gone(vm.paths, deadline):
            log.warning("VM %s is still there (power-down asked, %g s allowed): killing it", vm_id, timeout)
            self._kill(vm.paths)

    def pause(self, vm_id: str, timeout: float = 30.0) -> None:
        """QMP ``stop``: QEMU stops the vCPUs, drains every in-flight request and flushes its block layer (qcow2's
        metadata caches included) before it answers, so the overlay file is whole and still until ``cont``."""
        vm = self._controlled(vm_id)
        with vm.lock, QMPClient(vm.paths.qmp, min(self.qmp_timeout * 4, max(timeout, 0.1))) as qmp:
            qmp.execute("stop")
            status = str(qmp.execute("query-status").get("status", ""))
        if translate_status(status) != VMState.PAUSED:
            raise BackendError(f"VM {vm_id} did not pause (QEMU says it is {status[:40]!r})")

    def resume(self, vm_id: str, timeout: float = 30.0) -> None:
        """QMP ``cont`` for a guest QEMU holds paused (``stop``); nothing for one that runs or is gone."""
        vm = self._controlled(vm_id)
        if qemu_pid(vm.paths) is None:
            return
        with vm.lock, QMPClient(vm.paths.qmp, min(self.qmp_timeout, max(timeout, 0.1))) as qmp:
            status = str(qmp.execute("query-status").get("status", ""))
            if status in ("paused", "postmigrate"):  # postmigrate: after its state was saved (rule 12)
                qmp.execute("cont")

    def _controlled(self, vm_id: str) -> _VM:
        with self._lock:
            vm = self._vms.get(vm_id)
        if vm is None or qemu_pid(vm.paths) is None:
            raise BackendError(f"VM {vm_id} is not running under this backend")
        return vm

    def destroy(self, vm_id: str) -> None:
        with self._lock:
            vm = self._vms.get(vm_id)
        if vm is None:
            return
        self._kill(vm.paths)
        self.consoles.forget(vm_id)
        if vm.transport is not None:
            vm.transport.close()
        _remove(vm.paths)
        with self._lock:
            self._vms.pop(vm_id, None)
            self._ended.add(vm_id)

    def _kill(self, paths: RunPaths) -> None:
        """SIGKILL the VM's QEMU (only if the pid really is it) and wait until it is gone."""
        pid = qemu_pid(paths)
        if pid is None:
            return
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        if not _wait_gone(paths, time.monotonic() + KILL_WAIT):
            raise BackendError(f"QEMU (pid {pid}) of {paths.run_dir} survived SIGKILL for {KILL_WAIT:g} s")

    def adopt(self, spec: GuestSpec) -> bool:
        """Re-attach to the QEMU whose pidfile is in ``spec.run_dir``; True only if its guest is running (a guest
        left paused, by a publish a plant restart cut short, is resumed first).

        The VM is tracked even when this returns False, so that ``destroy``
        can still kill a QEMU that lives on but no longer answers QMP.
        """
        paths = RunPaths.of(spec.run_dir)
        vm = _VM(spec, paths)
        with self._lock:
            known = self._vms.get(spec.vm_id)
            if known is not None and known.transport is not None:
                known.transport.close()
            self._vms[spec.vm_id] = vm
            self._ended.discard(spec.vm_id)
        if qemu_pid(paths) is None:
            return False
        try:
            with vm.lock, QMPClient(paths.qmp, self.qmp_timeout) as qmp:
                status = qmp.execute("query-status").get("status", "")
                if status in ("paused", "postmigrate"):  # paused by a publish (rule 11) a restart cut short
                    log.info("VM %s was left paused: resumed", spec.vm_id)
                    qmp.execute("cont")
                    status = qmp.execute("query-status").get("status", "")
        except QMPError as exc:
            log.warning("VM %s: QEMU runs but does not answer QMP: %s", spec.vm_id, exc)
            return False
        self.consoles.keep(spec.vm_id, paths.console_socket, paths.console)
        return translate_status(str(status)) == VMState.RUNNING

    def running(self) -> list[str]:
        with self._lock:
            vms = list(self._vms.items())
        return sorted(vm_id for vm_id, vm in vms if qemu_pid(vm.paths) is not None)

    def agent(self, vm_id: str) -> AgentTransport:
        with self._lock:
            vm = self._vms.get(vm_id)
            if vm is None:
                raise BackendError(f"VM {vm_id} is not controlled by this backend")
            if vm.transport is None:
                vm.transport = SocketTransport(vm.paths.agent)
            return vm.transport

    def close(self) -> None:
        self.consoles.close()
        with self._lock:
            vms = list(self._vms.values())
        for vm in vms:
            if vm.transport is not None:
                vm.transport.close()

    def _runas_user(self) -> str | None:
        """The user QEMU drops to (None: it keeps the plant's); BackendError if a root plant has none."""
        if self.runas == "none" or os.geteuid() != 0:
            return None
        if self.runas == "root":
            return None
        try:
            pwd.getpwnam(self.runas)
        except KeyError:
            raise BackendError(f"the user {self.runas!r} that QEMU should run as does not exist "
                               "(scripts/setup_host.sh makes vmshop-qemu; option runas=root runs guests as root)"
                               ) from None
        return self.runas

    def ex_console(self, vm_id: str) -> str:
        """The tail of the guest's serial console ('' for an unknown VM)."""
        vm = self._vms.get(vm_id)
        return console_tail(vm.paths.console, 8000) if vm is not None else ""


def _runas_option(value: str | None) -> str:
    """The ``runas`` option: a user name, 'none' or 'root' (default: vmshop-qemu)."""
    if value is None or value == "":
        return DEFAULT_RUNAS
    if not re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", value):
        raise ConfigurationError(f"qemu backend: runas must be a user name, 'none' or 'root', not {value!r}")
    return value


def _wait_gone(paths: RunPaths, deadline: float) -> bool:
    """Wait until no QEMU of ``paths`` is left; False if one still is at ``deadline``."""
    while qemu_pid(paths) is not None:
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL)
    return True


def _remove(paths: RunPaths) -> None:
    """Remove the backend's files for one VM, and its run directory if that is then empty."""
    for path in paths.all():
        try:
            path.unlink(missing_ok=True)
        except IsADirectoryError:
            shutil.rmtree(path, ignore_errors=True)
    try:
        paths.run_dir.rmdir()
    except OSError:
        pass
