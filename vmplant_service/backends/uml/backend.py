"""The UML backend's contract (``Backend``): start, state, stop, destroy, adopt, the agent.

See the package docstring (:mod:`vmplant_service.backends.uml`) for the
design; this module holds the class and its bookkeeping.
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from vmshop_common.errors import BackendError, ConfigurationError

from ...agent.qga import GuestAgent
from ...agent.transport import AgentCommandError, AgentError, AgentTransport
from ...channel import Channel
from ...processes import owned_pid, pid_alive, proc_args, read_pid
from ..base import Backend, Capabilities, GuestSpec, VMState
from ..console import console_tail
from ..hostside import choice, host_memory_mib, positive_number, tail
from . import fpu, launcher, relay
from .agent import SerialLineTransport
from .command import AGENT_FD, CONSOLE_FD, STATUS_FD, nic_fd, uml_command
from .disk import prepare_disk
from .jail import launch_config, uml_dir, vdeplug_module
from .paths import RunPaths
from .procs import process_state, processes_with, session_of
from .states import UML_STATES, ended_condition, read_exit_record, translate_condition

log = logging.getLogger(__name__)

NIC_KINDS = ("user", "segment")
ARCHITECTURES = ("x86_64",)
CONFINEMENTS = ("namespace", "none")
FPU_CHOICES = ("auto", "yes", "no")
#: UML is built uniprocessor (CONFIG_NR_CPUS=1).
MAX_VCPUS = 1
#: Why UML serves only images whose root file system boots under any kernel (``<guest kernel="any">``).
KERNEL_LIMIT = ("User-Mode Linux cannot boot it: the uml backend runs UML's own kernel (linux.uml) as a host process, "
                "never an image's x86 kernel or boot loader, and has no virtio devices for a stock system's agent")
#: The smallest guest worth booting (the tiny image needs ~40 MiB).
MIN_MEMORY = 32
MAX_SOCKET_PATH = 107
VM_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
#: Characters no path on UML's command line may hold (it splits its options on them).
UNSAFE_PATH = re.compile(r"[\s,\"=]")
POLL = 0.05
#: Seconds processes may take to disappear after SIGKILL.
KILL_WAIT = 10.0
#: Seconds UML must have run after its exec before ``start`` returns (it fails at once on a bad option).
SETTLE = 0.3
#: Seconds the guest-shutdown exchange may take at most (qemu-ga sends no answer to it: silence is normal,
#: and the channel closes as the guest goes down).
SHUTDOWN_EXCHANGE = 10.0
#: Bytes a UML process may make a file grow beyond the larger of its disk file and its memory file
#: (which is exactly the guest's memory: the launcher turns address randomisation off).
FSIZE_MARGIN = 1024 * 1024
#: The user UML runs as by default (made by scripts/setup_host.sh; the qemu backend's too).
DEFAULT_RUNAS = "vmshop-qemu"
OPTIONS = {"uml_binary", "state_dir", "confine", "fpu_workaround", "start_timeout", "memory_fraction", "runas",
           "console_limit", "probe_timeout"}
RELAY = Path(relay.__file__).absolute()
LAUNCHER = Path(launcher.__file__).absolute()


@dataclass
class _VM:
    spec: GuestSpec
    paths: RunPaths
    #: Set when the backend killed the VM's UML (so its end is 'killed', not 'failed').
    killed: bool = False
    transport: SerialLineTransport | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


class UmlBackend(Backend):
    """VMs as User-Mode Linux processes; see the package docstring for the design and the options."""

    name = "uml"

    def __init__(self, options: dict[str, str] | None = None) -> None:
        super().__init__(options)
        options = self.options
        unknown = sorted(set(options) - OPTIONS)
        if unknown:
            raise ConfigurationError(f"uml backend: unknown option(s) {', '.join(unknown)}")
        self.binary = options.get("uml_binary", "linux.uml")
        self.confine = choice(options, "confine", CONFINEMENTS, "namespace", "uml")
        self.fpu_option = choice(options, "fpu_workaround", FPU_CHOICES, "auto", "uml")
        state_dir = options.get("state_dir")
        cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        self.state_dir = Path(state_dir) if state_dir else cache_home / "vmshop"
        self.start_timeout = positive_number(options, "start_timeout", 30.0, "uml")
        self.probe_timeout = positive_number(options, "probe_timeout", 60.0, "uml")
        self.memory_fraction = positive_number(options, "memory_fraction", 0.75, "uml")
        self.console_limit = int(positive_number(options, "console_limit", 262144, "uml"))
        self.runas = _runas_option(options.get("runas"))
        self._vms: dict[str, _VM] = {}
        #: How VMs the backend saw end ended (a key of UML_STATES), for state() after destroy.
        self._ended: dict[str, str] = {}
        self._lock = threading.Lock()
        self._fpu_lock = threading.Lock()
        self._fpu: dict[str, bool] = {}

    # What is installed ----------------------------------------------------------------
    def _binary_path(self) -> str | None:
        if os.sep in self.binary:
            return self.binary if os.access(self.binary, os.X_OK) else None
        return shutil.which(self.binary)

    @staticmethod
    def _network_missing(kind: str) -> str:
        """Why NICs of ``kind`` cannot be made here ('' if they can)."""
        if shutil.which("vde_plug") is None:
            return "vde_plug is not installed (Debian package vdeplug)"
        if vdeplug_module("seqpacket") is None or (kind == "segment" and vdeplug_module("vde") is None):
            return "the vdeplug4 modules are not installed (Debian package libvdeplug2)"
        if kind == "user" and vdeplug_module("slirp") is None:
            return "the vdeplug slirp module is not installed (Debian package libvdeplug-slirp)"
        return ""

    def capabilities(self) -> Capabilities:
        binary = self._binary_path()
        networks = tuple(kind for kind in NIC_KINDS if not self._network_missing(kind))
        return Capabilities(
            name=self.name, available=binary is not None,
            reason="" if binary is not None else f"{self.binary} is not installed (Debian package user-mode-linux)",
            accelerator="ptrace", architectures=ARCHITECTURES, networks=networks, channel="serial",
            max_memory=int(host_memory_mib() * self.memory_fraction), max_vcpus=MAX_VCPUS,
            kernel_limit=KERNEL_LIMIT, seed_disk=False)

    # The contract ----------------------------------------------------------------------
    def start(self, spec: GuestSpec) -> None:
        self._check(spec)
        paths = RunPaths.of(spec.run_dir)
        with self._lock:
            known = self._vms.get(spec.vm_id)
            if known is not None and self._uml_pid(known.paths) is not None:
                raise BackendError(f"VM {spec.vm_id} already runs")
            if self._uml_pid(paths) is not None or owned_pid(paths.relay_pidfile, paths.marker) is not None:
                raise BackendError(f"a UML of {paths.run_dir} still runs; adopt or destroy VM {spec.vm_id} first")
            vm = _VM(spec, paths)
            # Claim the id now, so a second start of it fails instead of racing this one.
            self._vms[spec.vm_id] = vm
            self._ended.pop(spec.vm_id, None)
        try:
            binary = self._binary_path()
            if binary is None:
                raise BackendError(f"{self.binary} is not installed (Debian package user-mode-linux)")
            user = self._runas_ids()
            workaround = self.fpu_workaround_for(spec, os.path.realpath(binary))
            self._boot(vm, os.path.realpath(binary), user, workaround, ())
        except BaseException:
            try:
                self._kill(vm)
            finally:
                _remove(paths)
                with self._lock:
                    self._vms.pop(spec.vm_id, None)
            raise

    def _boot(self, vm: _VM, binary: str, user: tuple[int, int] | None, workaround: bool,
              extra_words: tuple[str, ...] = ()) -> None:
        """Make the VM's files and start its relay, which starts UML (BackendError with UML's words if not)."""
        spec, paths = vm.spec, vm.paths
        _remove(paths)
        paths.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(paths.run_dir, 0o700)
        jailed = self.confine == "namespace"
        if jailed:
            paths.jail.mkdir(mode=0o700, exist_ok=True)
        else:
            paths.unconfined_ctl.mkdir(mode=0o700, exist_ok=True)
            if user is not None:
                os.chown(paths.unconfined_ctl, *user)
        disk = prepare_disk(spec, paths, self.state_dir, user[1] if user else None)
        # The guest reaches its own disk file through hostfs: it may not grow it (or any file UML writes)
        # beyond what the disk holds. UML's memory file (the guest's memory, with no ASLR) is one UML writes too.
        fsize = max(disk.limit, spec.memory * 1024 * 1024) + FSIZE_MARGIN
        config = launch_config(spec, paths, disk, binary, jailed=jailed, user=user, fsize=fsize,
                               fpu_workaround=workaround)
        command = uml_command(spec, binary, disk, workaround, uml_dir(paths, jailed)) + list(extra_words)
        plug = shutil.which("vde_plug") or "vde_plug"
        relay_config = {
            "run_dir": str(paths.run_dir), "python": sys.executable, "launcher": str(LAUNCHER), "launch": config,
            "uml": command, "fds": {"status": STATUS_FD, "agent": AGENT_FD, "console": CONSOLE_FD},
            "nics": [{"index": index, "fd": nic_fd(index), "switch": os.path.abspath(str(nic.switch)), "plug": plug}
                     for index, nic in enumerate(spec.nics) if nic.kind == "segment"],
            "console_limit": self.console_limit, "settle": SETTLE, "timeout": self.start_timeout,
        }
        fd = os.open(paths.relay_errors, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            done = subprocess.run([sys.executable, "-I", "-S", str(RELAY), paths.marker],
                                  input=json.dumps(relay_config).encode(), stdout=subprocess.PIPE, stderr=fd,
                                  timeout=self.start_timeout + 15, start_new_session=True, umask=0o077)
        except (OSError, subprocess.SubprocessError) as exc:
            raise BackendError(f"cannot start the relay of VM {spec.vm_id}: {exc}") from None
        finally:
            os.close(fd)
        line = done.stdout.decode(errors="replace").strip().splitlines()[-1:] or [""]
        try:
            answer = json.loads(line[0])
        except ValueError:
            answer = {"ok": False, "error": line[0] or tail(paths.relay_errors, 1000) or "no message"}
        if not isinstance(answer, dict) or answer.get("ok") is not True:
            error = answer.get("error") if isinstance(answer, dict) else None
            raise BackendError(f"UML could not start VM {spec.vm_id}: {str(error or 'no message')[:1500]}")

    def _check(self, spec: GuestSpec) -> None:
        """Refuse a spec UML could not run, before anything is made."""
        def need(ok: bool, why: str) -> None:
            if not ok:
                raise BackendError(f"VM {spec.vm_id}: {why}")

        if not VM_ID.match(spec.vm_id):
            raise BackendError(f"{spec.vm_id!r} is not a usable VM id")
        need(spec.arch in ARCHITECTURES, f"the uml backend runs {', '.join(ARCHITECTURES)}, not {spec.arch}")
        need(spec.vcpus == MAX_VCPUS, f"UML guests have exactly {MAX_VCPUS} vCPU, not {spec.vcpus}")
        need(spec.memory >= MIN_MEMORY, f"UML guests need at least {MIN_MEMORY} MiB, not {spec.memory}")
        need(Path(spec.disk).is_file(), f"the disk {spec.disk} is not a file")
        need(spec.seed is None, "the uml backend attaches no cloud-init seed disk (capabilities: seed_disk False)")
        need(spec.data_dir is None or Path(spec.data_dir).is_dir(),
             f"the data directory {spec.data_dir} does not exist")
        paths = [spec.disk, spec.run_dir, spec.data_dir]
        paths += [Path(nic.switch) for nic in spec.nics if nic.switch]
        need(not any(UNSAFE_PATH.search(os.path.abspath(p)) for p in paths if p is not None),
             "paths on UML's command line cannot hold spaces, ',', '=' or '\"'")
        for nic in spec.nics:
            need(nic.kind in NIC_KINDS, f"no NIC of kind {nic.kind!r} (only {', '.join(NIC_KINDS)})")
            need(bool(MAC.match(nic.mac)), f"{nic.mac!r} is not a MAC address (lower-case hex)")
            missing = self._network_missing(nic.kind)
            need(not missing, f"no {nic.kind!r} NIC: {missing}")
            if nic.kind == "user":
                need(nic.host_port is None or 0 < nic.host_port < 65536, f"{nic.host_port} is not a TCP port")
                need(not nic.host_port or not _listening(nic.host_port), f"127.0.0.1:{nic.host_port} is taken")
            else:
                need(bool(nic.switch) and (Path(str(nic.switch)) / "ctl").exists(),
                     f"the segment's switch {nic.switch} is not running")
        need(len(str(RunPaths.of(spec.run_dir).agent).encode()) <= MAX_SOCKET_PATH,
             f"the run directory {spec.run_dir} is too long for a unix socket")

    # The FPU workaround -----------------------------------------------------------------
    @property
    def fpu_cache(self) -> Path:
        return self.state_dir / "uml-fpu-probe.json"

    def fpu_workaround_for(self, spec: GuestSpec, binary: str) -> bool:
        """Whether UML runs with the FPU workaround: the option, or (auto) the cached verdict of a probe boot."""
        if self.fpu_option != "auto":
            return self.fpu_option == "yes"
        key = fpu.probe_key(binary)
        with self._fpu_lock:
            if key in self._fpu:
                return self._fpu[key]
            entry = fpu.read_cache(self.fpu_cache).get(key)
            if isinstance(entry, dict) and isinstance(entry.get("workaround"), bool):
                self._fpu[key] = bool(entry["workaround"])
                return self._fpu[key]
            started = time.monotonic()
            plain = self._probe(spec, binary, False)
            workaround = False
            with_filter: bool | None = None
            if plain is not True:
                with_filter = self._probe(spec, binary, True)
                workaround = with_filter is True
                if not workaround:
                    log.error("UML failed its FPU probe with and without the workaround (%s / %s): running it "
                              "plain", plain, with_filter)
            log.info("UML's FPU probe: plain UML %s; the workaround is %s (%.1f s)",
                     "passes" if plain else "fails", "on" if workaround else "off", time.monotonic() - started)
            if plain is None and with_filter is None:
                return False  # no agent answered either way (the image, not the host): decide again next time
            fpu.write_cache(self.fpu_cache, key, {"workaround": workaround, "plain": plain,
                                                  "probed": time.time()})
            self._fpu[key] = workaround
            return workaround

    def _probe(self, spec: GuestSpec, binary: str, workaround: bool) -> bool | None:
        """Boot ``spec``'s disk (no NIC, no data) and check large agent answers (:func:`.fpu.probe_agent`);
        None if the guest's agent never answered (with the XSAVE failure, every guest process dies)."""
        where = Path(tempfile.mkdtemp(prefix="vmshop-uml-probe-"))
        probe = replace(spec, vm_id="fpu-probe", run_dir=where / "run", nics=(), data_dir=None)
        vm = _VM(probe, RunPaths.of(probe.run_dir))
        transport = SerialLineTransport(vm.paths.agent)
        try:
            self._boot(vm, binary, self._runas_ids(), workaround, ())
            deadline = time.monotonic() + self.probe_timeout
            agent = GuestAgent(transport)
            try:
                Channel(agent).wait_agent(self.probe_timeout, alive=lambda: self._uml_pid(vm.paths) is not None)
            except BackendError as exc:
                log.warning("UML FPU probe (workaround %s): %s", "on" if workaround else "off", exc)
                return None
            return fpu.probe_agent(agent, deadline)
        except BackendError as exc:
            log.warning("UML FPU probe (workaround %s) did not boot: %s", "on" if workaround else "off", exc)
            return None
        finally:
            transport.close()
            try:
                self._kill(vm)
            finally:
                _remove(vm.paths)
                shutil.rmtree(where, ignore_errors=True)

    # Observation ------------------------------------------------------------------------
    @staticmethod
    def _uml_pid(paths: RunPaths) -> int | None:
        """The live UML process of ``paths`` (its command line names the run directory), or None."""
        return owned_pid(paths.uml_pidfile, paths.marker)

    def _members(self, vm: _VM) -> list[int]:
        """Every live process of the VM: the relay's session (the relay, the plugs outside the jail) and UML's
        (UML makes itself a session leader: its own processes, those of the guest's processes, the vde_plugs
        in the jail), each only if it is still the VM's (one of its processes names the run directory), and
        any process named by the VM's pidfiles and marker."""
        marker = vm.paths.marker
        pids = {pid for pid in (owned_pid(vm.paths.relay_pidfile, marker), self._uml_pid(vm.paths))
                if pid is not None}
        pids |= {pid for pidfile in vm.paths.plug_pidfiles() if (pid := owned_pid(pidfile, marker)) is not None}
        sessions = {sid for sid in (read_pid(vm.paths.relay_pidfile), read_pid(vm.paths.uml_pidfile))
                    if sid is not None and sid > 1}
        if sessions:
            found: dict[int, list[int]] = {}
            for pid in processes_with(lambda pid, _: session_of(pid) in sessions):
                found.setdefault(session_of(pid) or 0, []).append(pid)
            for members in found.values():
                if any(marker in arg for pid in members for arg in proc_args(pid)):
                    pids.update(members)
        return sorted(pid for pid in pids if pid_alive(pid))

    def condition(self, vm_id: str) -> str:
        """What the host observes of ``vm_id`` (a key of :data:`UML_STATES`; '' for a VM never seen)."""
        vm = self._vms.get(vm_id)
        if vm is None:
            return self._ended.get(vm_id, "")
        return self._condition(vm)

    def _condition(self, vm: _VM) -> str:
        uml = self._uml_pid(vm.paths)
        relay_alive = owned_pid(vm.paths.relay_pidfile, vm.paths.marker) is not None
        if uml is not None:
            if process_state(uml) == "T":
                return "paused"
            return "running" if relay_alive else "mute"
        record = read_exit_record(vm.paths.exit_record)
        if record is None and relay_alive:
            return "ending"
        return ended_condition(record, vm.killed)

    def state(self, vm_id: str) -> VMState:
        condition = self.condition(vm_id)
        return translate_condition(condition) if condition else VMState.UNKNOWN

    # Ending -----------------------------------------------------------------------------
    def stop(self, vm_id: str, timeout: float = 30.0) -> None:
        """Ask the guest's agent for ``guest-shutdown`` (powerdown); kill what is left after ``timeout``."""
        vm = self._vms.get(vm_id)
        if vm is None:
            return
        deadline = time.monotonic() + timeout
        uml = self._uml_pid(vm.paths)
        if uml is not None:
            if process_state(uml) == "T":
                deadline = 0.0  # a stopped guest cannot power itself off
            else:
                try:
                    GuestAgent(self.agent(vm_id)).shutdown(timeout=min(SHUTDOWN_EXCHANGE, max(timeout / 2, 0.1)))
                except AgentCommandError as exc:
                    log.info("VM %s refused guest-shutdown (%s): killing it", vm_id, exc)
                    deadline = 0.0
                except AgentError as exc:  # pragma: no cover - shutdown() keeps these for itself
                    log.info("VM %s: guest-shutdown failed (%s); it is killed after %g s", vm_id, exc, timeout)
            if not self._wait_ended(vm, deadline):
                log.warning("VM %s is still there (guest-shutdown asked, %g s allowed): killing it", vm_id, timeout)
        self._kill(vm)
        if vm.transport is not None:
            vm.transport.close()
        with self._lock:
            self._ended[vm_id] = self._condition(vm)

    def _wait_ended(self, vm: _VM, deadline: float) -> bool:
        """Wait until UML is gone and its relay recorded how (and ended); False if not by ``deadline``."""
        while True:
            if self._uml_pid(vm.paths) is None and owned_pid(vm.paths.relay_pidfile, vm.paths.marker) is None:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(POLL)

    def destroy(self, vm_id: str) -> None:
        with self._lock:
            vm = self._vms.get(vm_id)
        if vm is None:
            return
        self._kill(vm)
        if vm.transport is not None:
            vm.transport.close()
        ended = self._condition(vm)
        _remove(vm.paths)
        with self._lock:
            self._vms.pop(vm_id, None)
            self._ended[vm_id] = ended

    def _kill(self, vm: _VM) -> None:
        """SIGKILL every process of the VM (UML first, so its relay records it) and wait until none is left."""
        deadline = time.monotonic() + KILL_WAIT
        uml = self._uml_pid(vm.paths)
        if uml is not None:
            vm.killed = True
            try:
                os.kill(uml, signal.SIGKILL)
            except ProcessLookupError:
                pass
        # The relay records UML's end and ends itself: it gets a moment before it is killed too.
        grace = time.monotonic() + 2.0
        while owned_pid(vm.paths.relay_pidfile, vm.paths.marker) is not None and time.monotonic() < grace:
            time.sleep(POLL)
        while True:
            pids = self._members(vm)
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if time.monotonic() > deadline:
                raise BackendError(f"processes {pids} of {vm.paths.run_dir} survived SIGKILL for {KILL_WAIT:g} s")
            time.sleep(POLL)

    def adopt(self, spec: GuestSpec) -> bool:
        """Re-attach to the UML whose relay runs in ``spec.run_dir``; True only if its guest is running.

        The VM is tracked even when this returns False, so that ``destroy``
        can still kill what lives on. Nothing is asked of the guest: the
        process table and the relay's record decide.
        """
        vm = _VM(spec, RunPaths.of(spec.run_dir))
        with self._lock:
            known = self._vms.get(spec.vm_id)
            if known is not None:
                vm.killed = known.killed and known.paths == vm.paths
                if known.transport is not None:
                    known.transport.close()
            self._vms[spec.vm_id] = vm
            self._ended.pop(spec.vm_id, None)
        return self._condition(vm) == "running"

    def running(self) -> list[str]:
        with self._lock:
            vms = list(self._vms.items())
        return sorted(vm_id for vm_id, vm in vms if self._uml_pid(vm.paths) is not None)

    def agent(self, vm_id: str) -> AgentTransport:
        """The relay's socket for the guest agent's line (one client at a time: this backend's transport), with
        every request small enough for UML's serial line (:class:`.agent.SerialLineTransport`)."""
        with self._lock:
            vm = self._vms.get(vm_id)
            if vm is None:
                raise BackendError(f"VM {vm_id} is not controlled by this backend")
            if vm.transport is None:
                vm.transport = SerialLineTransport(vm.paths.agent)
            return vm.transport

    def close(self) -> None:
        with self._lock:
            vms = list(self._vms.values())
        for vm in vms:
            if vm.transport is not None:
                vm.transport.close()

    def ex_console(self, vm_id: str) -> str:
        """The tail of the guest's console ('' for an unknown VM)."""
        vm = self._vms.get(vm_id)
        return console_tail(vm.paths.console, 8000) if vm is not None else ""

    def _runas_ids(self) -> tuple[int, int] | None:
        """(uid, gid) UML drops to (None: it keeps the plant's user); BackendError if a root plant has none."""
        if self.runas == "none" or os.geteuid() != 0 or self.runas == "root":
            return None
        try:
            entry = pwd.getpwnam(self.runas)
        except KeyError:
            raise BackendError(f"the user {self.runas!r} that UML should run as does not exist "
                               "(scripts/setup_host.sh makes vmshop-qemu; option runas=root runs guests as root)"
                               ) from None
        if entry.pw_uid == 0 or entry.pw_gid == 0:
            raise BackendError(f"the user {self.runas!r} that UML should run as is root")
        return entry.pw_uid, entry.pw_gid


def _runas_option(value: str | None) -> str:
    """The ``runas`` option: a user name, 'none' or 'root' (default: vmshop-qemu)."""
    if value is None or value == "":
        return DEFAULT_RUNAS
    if not re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", value):
        raise ConfigurationError(f"uml backend: runas must be a user name, 'none' or 'root', not {value!r}")
    return value


def _listening(port: int) -> bool:
    """Whether something listens on 127.0.0.1:``port`` (read from /proc/net/tcp, no connection made)."""
    wanted = f"0100007F:{port:04X}"
    try:
        with open("/proc/net/tcp") as handle:
            return any(line.split()[1] == wanted and line.split()[3] == "0A" for line in list(handle)[1:])
    except (OSError, IndexError):
        return False


def _remove(paths: RunPaths) -> None:
    """Remove the backend's files for one VM, and its run directory if that is then empty."""
    for path in paths.files():
        path.unlink(missing_ok=True)
    for directory in paths.directories():
        if directory.is_mount():
            log.error("%s is still a mount point: left in place", directory)
            continue
        shutil.rmtree(directory, ignore_errors=True)
    try:
        paths.run_dir.rmdir()
    except OSError:
        pass


__all__ = ["UML_STATES", "UmlBackend"]
