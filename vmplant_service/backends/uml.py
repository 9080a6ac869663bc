"""The User-Mode Linux backend: one ``linux.uml`` process (Debian's ``user-mode-linux``) per VM.

A UML guest is a Linux kernel running as an ordinary host process: there
is no machine to emulate, no KVM/TCG, and guest code runs natively (its
system calls are caught through ptrace). The guest is the same ``tiny``
image as everywhere (its ext4 root file system, its init and agent); only
the kernel is UML's own binary, so the image's ``vmlinux`` and its
initramfs (whose modules are built for that kernel) are not used: UML has
ext4, ubd and hostfs built in and mounts the root device itself.

What the backend makes in a VM's ``run_dir``:

- ``uml.pid``: the UML process's pid (written by the backend: the launcher
  execs UML in place, so the pid is UML's). A pid is trusted only while
  its command line names this VM's ``uml_dir=`` (pids get reused);
- ``ctl/``: UML's ``uml_dir``; UML makes ``ctl/uml/mconsole`` (the
  management console socket: state, Ctrl-Alt-Del) and ``ctl/uml/pid``;
- ``disk/``: the VM's disk as UML sees it (see "Disk" below);
- ``net/nicN/``, ``nicN.switch.pid``, ``nicN.plug.pid``: the private switch
  of segment NIC N and the plug joining it to the plant's switch (see
  "Networks");
- ``console.log`` (the guest console) and ``uml.err`` (what UML or the
  launcher printed on stderr);
- ``root/``: an empty directory, the mount point of the VM's jail.

**Disk.** UML's block driver (``ubd``) reads raw files and its own
copy-on-write format, not qcow2. The plant's overlay (``spec.disk``) is
read at start: if it holds nothing of its own (a fresh clone) and has its
backing image's size, the VM gets a UML COW file (``disk/disk.cow``) over a
raw copy of the backing image, converted once per image version with
``qemu-img convert`` and cached in ``<state_dir>/uml-bases/`` (never in the
warehouse, never written after it is made). Otherwise the whole overlay
chain is converted to ``disk/disk.raw`` (sparse). Either way the guest's
writes go to ``run_dir``: **the overlay itself is never written under UML**
(so, unlike QEMU, it does not hold the guest's changes after the VM ends).

**Channel.** The configuration directory reaches the guest through UML's
hostfs: the kernel command line carries ``vmshop.hostfs=<channel_dir>`` and
the guest's rcS/agent mount ``-t hostfs -o <channel_dir>`` at ``/vmshop``
(same agent protocol as over 9p). The optional data directory is offered
read-only as ``vmshop.data=<data_dir>`` (the plant's mount action must
mount it with hostfs under UML).

**Confinement.** hostfs lets the guest's root mount *any* host path the
UML process can reach (``-o /../../etc`` escapes a ``hostfs=`` prefix), and
UML runs with the plant's privileges. With ``confine=namespace`` (the
default) the launcher puts UML into a mount namespace whose root is a tmpfs
holding only the VM's own files (``disk/``, ``ctl/``, ``net/``, the channel;
the data directory and the base image read-only),
the programs it runs read-only (UML, ``vde_plug``, their libraries and
vdeplug4's modules), ``/dev/null`` and the random devices, bind-mounted ``nodev,nosuid`` (and ``noexec`` but for the
binaries), drops every capability and sets ``no_new_privs`` before it execs
UML. The guest then sees nothing else of the host. Non-root plants get the
namespace through a user namespace. ``confine=none`` skips all that (for
hosts without namespaces; the guest can then read and write what the plant
can).

**Host FPU state.** UML 6.1 saves the guest's FPU registers with
``PTRACE_[GS]ETREGSET(NT_X86_XSTATE)`` into a buffer sized at build time;
on hosts with AVX-512 or AMX the host's XSAVE area is larger and every
guest process dies ("ptrace set fp regs failed, errno = 14"). The launcher
then installs a seccomp filter that refuses those two ptrace requests, so
UML falls back to the legacy FXSAVE area (x87/SSE), and the guest's glibc is
told not to use AVX (``GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX,...`` on the
kernel command line, inherited by init and every guest process). Guest
programs that use AVX without asking glibc are not safe on such hosts.
Option ``fpu_workaround``: ``auto`` (default: when /proc/cpuinfo shows
avx512f or amx), ``yes``, ``no``.

**Networks.** Every NIC is ``ethN=vde,<vdeplug URL>,<mac>``: Debian's UML
links vdeplug4's static stub, which runs ``vde_plug --descr "UML
vde_transport" seqpacket://FD <URL>`` as a child of UML (so in its jail, and
killed with it). 'segment': the URL is a private ``vde_switch`` in
``net/nicN`` and a ``vde_plug`` daemon outside the jail joins it to the
plant's switch (a vde client makes its socket in the switch's directory, so
the shared switch's directory would have to be writable in the jail, where
the guest could remove other VMs' sockets through hostfs). 'user':
``slirp:///v4/restricted/tcpfwd=127.0.0.1:<host_port>:10.0.2.15:80``
(vdeplug4's libslirp module, Debian package ``libvdeplug-slirp``): DHCP
gives the guest 10.0.2.15, ``restricted`` keeps it from reaching anything
(host included) and the host reaches its port 80 on 127.0.0.1 only, as with
QEMU's ``restrict=on`` user network. The vde_plug of a NIC starts when the
guest brings the NIC up (rcS does, before the agent is ready), so the
forwarded port listens from then on, not from ``start``.

**States.** UML has no status query; what the host can observe is mapped
to a :class:`VMState` through one table (:data:`UML_STATES`): the process
lives and its mconsole answers ``version`` ('running'), lives but is
stopped by a signal ('paused'), lives but is mute ('mute'), or is gone —
after a clean halt ('halted'), killed by the backend ('killed'), after a
kernel panic (UML aborts itself; 'panicked') or another failure ('failed'),
or gone for reasons unknown ('gone'). UML is uniprocessor
(``CONFIG_NR_CPUS=1``): one vCPU per guest. A reboot inside the guest
re-execs UML in place (same pid): the VM keeps running.

**Stop.** mconsole ``cad`` (Ctrl-Alt-Del: busybox init runs ``poweroff``,
then UML halts and exits); every process of the VM is killed after the
timeout. Kills are by pid, each checked against the VM's marker first.

Options (strings, from the plant's configuration):

- ``uml_binary``: default ``linux.uml`` (looked up in PATH);
- ``state_dir``: where the raw base images are cached (default
  ``$XDG_CACHE_HOME/vmshop`` or ``~/.cache/vmshop``);
- ``confine``: ``namespace`` (default) or ``none``;
- ``fpu_workaround``: ``auto`` (default), ``yes`` or ``no``;
- ``start_timeout``: seconds UML may take to answer on its mconsole (default 30);
- ``mconsole_timeout``: seconds each mconsole exchange may take (default 5);
- ``memory_fraction``: share of the host's memory guests may use (default 0.75).
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from vmshop_common.errors import BackendError, ConfigurationError

from ..processes import owned_pid, proc_args, read_pid
from .base import Backend, Capabilities, GuestSpec, Nic, VMState
from .hostside import host_memory_mib, positive_number, tail

log = logging.getLogger(__name__)

#: What the host observes of a UML VM, as VMStates: the backend's one translation.
UML_STATES: dict[str, VMState] = {
    "running": VMState.RUNNING,  # the process lives and its mconsole answers
    "paused": VMState.PAUSED,  # the process is stopped by a signal (SIGSTOP)
    "mute": VMState.UNKNOWN,  # the process lives but its mconsole does not answer
    "halted": VMState.STOPPED,  # it exited with status 0 (the guest powered off)
    "killed": VMState.STOPPED,  # the backend killed it (stop's deadline, destroy)
    "panicked": VMState.CRASHED,  # the guest kernel panicked (UML aborts itself)
    "failed": VMState.CRASHED,  # it exited with another status
    "gone": VMState.STOPPED,  # not there, and nothing says it crashed
}

NIC_KINDS = ("user", "segment")
ARCHITECTURES = ("x86_64",)
CONFINEMENTS = ("namespace", "none")
FPU_CHOICES = ("auto", "yes", "no")
#: UML is built uniprocessor (CONFIG_NR_CPUS=1).
MAX_VCPUS = 1
#: The smallest guest worth booting (the tiny image needs ~40 MiB).
MIN_MEMORY = 32
UMID = "uml"
#: The guest's address on a 'user' NIC (libslirp's first DHCP address) and the forwarded port.
USER_GUEST_ADDRESS = "10.0.2.15"
GUEST_HTTP_PORT = 80
#: glibc in the guest must not use AVX when UML keeps only the legacy FPU state (see the module docstring).
GUEST_GLIBC_TUNABLES = "glibc.cpu.hwcaps=-AVX,-AVX2,-AVX512F,-AVX512VL,-AVX512BW,-AVX512DQ,-AVX512CD,-AVX_VNNI"
MAX_SOCKET_PATH = 107
VM_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
#: Kernel command line words of the image that are for QEMU's machine or would give the guest
#: host resources (UML reads its host-side options from the same command line): never passed.
DROPPED_WORDS = re.compile(
    r"^(console|clocksource|i8042\.[a-z_]+|no_timer_check|initrd|rdinit|"
    r"mem|umid|uml_dir|hostfs|iomem|mconsole|xterm|hostname|debug|noprocmm|nosysemu|skas0|mode|dsp|mixer|"
    r"tty_log_dir|aio|ptrace|fake_ide|fakehd|watchdog|pci|noxsave|vde|virtio_uml\.[a-z_]+|"
    r"ubd\d*[a-z]*|con\d*|ssl\d*|eth\d+|vec\d+|GLIBC_TUNABLES|vmshop\.hostfs|vmshop\.data)(=|$)")
POLL = 0.05
#: Seconds processes may take to disappear after SIGKILL.
KILL_WAIT = 10.0
#: UML's TMPDIR (its memory file) inside the jail: a directory no bound host path can be under.
JAIL_TMPDIR = "/.vmshop-uml-tmp"
#: The description UML's vde transport gives its vde_plug children.
UML_PLUG_DESCR = "UML vde_transport"
MCONSOLE_MAGIC = 0xCAFEBABE
MCONSOLE_VERSION = 2
MCONSOLE_MAX_DATA = 512

# The launcher: run as ``python -I -S -c LAUNCHER CONFIG_JSON UML_ARGV...``; it confines the process
# (mount namespace + chroot into a tmpfs of bind mounts, no capabilities, no_new_privs, the FPU seccomp
# filter) and execs UML in place, so UML keeps its pid. Only the standard library, no site packages.
LAUNCHER = r'''
import ctypes, json, os, resource, struct, sys
cfg = json.loads(sys.argv[1]); argv = sys.argv[2:]
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
def fail(what):
    sys.stderr.write("vmshop-uml-launcher: %s: %s\n" % (what, os.strerror(ctypes.get_errno()))); sys.exit(126)
def mount(src, dst, fstype, flags, data=None):
    enc = lambda s: s.encode() if s is not None else None
    if libc.mount(enc(src), enc(dst), enc(fstype), flags, enc(data)) != 0:
        fail("mount %s on %s" % (src, dst))
RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, BIND, REC, PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
jail = cfg.get("jail")
if jail:
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(0x00020000 | (0x10000000 if uid else 0)) != 0:
        fail("unshare (mount namespace)")
    if uid:
        for name, text in (("setgroups", "deny"), ("uid_map", "0 %d 1" % uid), ("gid_map", "0 %d 1" % gid)):
            with open("/proc/self/" + name, "w") as handle:
                handle.write(text)
    mount(None, "/", None, REC | PRIVATE)
    mount("vmshop-uml", jail, "tmpfs", NOSUID | NODEV, "mode=0755,size=1m")
    for src, target, writable, executable in cfg["binds"]:
        dst = jail + target
        if os.path.isdir(src):
            os.makedirs(dst, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            open(dst, "a").close()
        mount(src, dst, None, BIND)
        flags = os.statvfs(src).f_flag & (RDONLY | NOSUID | NODEV | NOEXEC)
        if not src.startswith("/dev/"):
            flags |= NOSUID | NODEV | (0 if executable else NOEXEC)
        mount(None, dst, None, BIND | REMOUNT | flags | (0 if writable else RDONLY))
    # UML's memory file lives in TMPDIR (a tmpfs of its own, exec allowed, where no bound path can be);
    # the rest of the jail's own tree is read-only.
    tmp = jail + cfg["env"]["TMPDIR"]
    os.makedirs(tmp, exist_ok=True)
    mount("vmshop-uml-tmp", tmp, "tmpfs", NOSUID | NODEV, "mode=1777,size=%dm" % cfg["tmpfs_mib"])
    os.makedirs(jail + cfg["cwd"], exist_ok=True)
    mount(None, jail, None, REMOUNT | RDONLY | NOSUID | NODEV, "mode=0755,size=1m")
    os.chdir(jail)
    if libc.chroot(b".") != 0:
        fail("chroot")
os.chdir(cfg["cwd"])
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
if cfg.get("drop_caps"):
    try:
        last = int(open("/proc/sys/kernel/cap_last_cap").read())
    except OSError:
        last = 63
    for cap in range(last + 1):
        libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP
    libc.prctl(47, 4, 0, 0, 0)  # PR_CAP_AMBIENT_CLEAR_ALL
    if libc.syscall(126, struct.pack("=II", 0x20080522, 0), bytes(24)) != 0:  # capset: nothing
        fail("capset")
if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
    fail("no_new_privs")
if cfg.get("fpu_workaround"):
    # ptrace(PTRACE_GETREGSET or PTRACE_SETREGSET, pid, NT_X86_XSTATE, ...) -> EIO; all else allowed.
    ins = lambda code, jt, jf, k: struct.pack("HBBI", code, jt, jf, k)
    prog = b"".join([
        ins(0x20, 0, 0, 4), ins(0x15, 0, 7, 0xC000003E),  # arch == x86_64
        ins(0x20, 0, 0, 0), ins(0x15, 0, 5, 101),  # nr == ptrace
        ins(0x20, 0, 0, 16), ins(0x15, 1, 0, 0x4204), ins(0x15, 0, 2, 0x4205),  # request
        ins(0x20, 0, 0, 32), ins(0x15, 1, 0, 0x202),  # addr == NT_X86_XSTATE
        ins(0x06, 0, 0, 0x7FFF0000), ins(0x06, 0, 0, 0x00050005)])  # allow / errno EIO
    buf = ctypes.create_string_buffer(prog)
    fprog = ctypes.create_string_buffer(struct.pack("HxxxxxxQ", len(prog) // 8, ctypes.addressof(buf)))
    if libc.prctl(22, 2, fprog, 0, 0) != 0:  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
        fail("seccomp")
os.execve(argv[0], argv, cfg["env"])
'''


def translate_condition(condition: str) -> VMState:
    """What the host observed of a UML VM (a key of :data:`UML_STATES`) as a VMState."""
    return UML_STATES.get(condition, VMState.UNKNOWN)


class MconsoleError(Exception):
    """The management console did not answer (no socket, refused, timed out) or answered an error."""


def mconsole(path: Path, command: str, timeout: float = 5.0) -> str:
    """Send ``command`` to UML's management console at ``path``; its answer (MconsoleError if none).

    The protocol (arch/um/include/shared/mconsole.h): one datagram
    ``{u32 magic, u32 version, u32 len, char data[512]}`` to the socket; the
    replies ``{u32 err, u32 more, u32 len, char data[512]}`` come back to the
    sender's address (an autobound abstract one here) until ``more`` is 0.
    """
    data = command.encode()
    if len(data) >= MCONSOLE_MAX_DATA:
        raise MconsoleError(f"command too long: {command[:40]!r}...")
    request = struct.pack(f"=III{MCONSOLE_MAX_DATA}s", MCONSOLE_MAGIC, MCONSOLE_VERSION, len(data), data)
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind("")  # autobind: an abstract address for the replies
            sock.settimeout(timeout)
            sock.sendto(request, str(path))
            parts: list[str] = []
            while True:
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                reply = sock.recv(12 + MCONSOLE_MAX_DATA)
                if len(reply) < 12:
                    raise MconsoleError("short reply")
                err, more, length = struct.unpack_from("=III", reply)
                parts.append(reply[12:12 + length].decode(errors="replace").replace("\0", ""))
                if not more:
                    break
        except (OSError, TimeoutError) as exc:
            raise MconsoleError(f"{command}: {exc}") from None
    text = "".join(parts)
    if err:
        raise MconsoleError(f"{command}: {text.strip() or f'error {err}'}")
    return text


@dataclass(frozen=True)
class RunPaths:
    """The files the backend makes in a VM's run directory (absolute paths)."""

    run_dir: Path

    @classmethod
    def of(cls, run_dir: Path) -> RunPaths:
        return cls(Path(os.path.abspath(run_dir)))

    @property
    def pidfile(self) -> Path:
        return self.run_dir / "uml.pid"

    @property
    def ctl(self) -> Path:
        """UML's ``uml_dir``."""
        return self.run_dir / "ctl"

    @property
    def mconsole(self) -> Path:
        return self.ctl / UMID / "mconsole"

    @property
    def disk_dir(self) -> Path:
        return self.run_dir / "disk"

    @property
    def net(self) -> Path:
        return self.run_dir / "net"

    def nic_switch(self, index: int) -> Path:
        return self.net / f"nic{index}"

    def switch_pidfile(self, index: int) -> Path:
        return self.run_dir / f"nic{index}.switch.pid"

    def plug_pidfile(self, index: int) -> Path:
        return self.run_dir / f"nic{index}.plug.pid"

    def helper_pidfiles(self) -> list[Path]:
        return sorted(self.run_dir.glob("nic*.switch.pid")) + sorted(self.run_dir.glob("nic*.plug.pid"))

    @property
    def cow(self) -> Path:
        return self.disk_dir / "disk.cow"

    @property
    def raw(self) -> Path:
        return self.disk_dir / "disk.raw"

    @property
    def console(self) -> Path:
        return self.run_dir / "console.log"

    @property
    def stderr(self) -> Path:
        return self.run_dir / "uml.err"

    @property
    def jail(self) -> Path:
        return self.run_dir / "root"

    @property
    def marker(self) -> str:
        """The argument every process of this VM's UML has (the launcher's and UML's own)."""
        return f"uml_dir={self.ctl}/"

    def files(self) -> tuple[Path, ...]:
        return (self.pidfile, self.console, self.stderr, *self.helper_pidfiles())

    def directories(self) -> tuple[Path, ...]:
        return (self.ctl, self.disk_dir, self.net, self.jail)


@dataclass(frozen=True)
class DiskPlan:
    """How the VM's disk is given to UML: a COW over a cached raw base, or a raw copy of its own."""

    ubd: str
    base: Path | None
    writable: Path


def uml_command(spec: GuestSpec, binary: str, disk: DiskPlan, fpu_workaround: bool) -> list[str]:
    """The UML command line for ``spec`` (its kernel command line: UML's host options, then the guest's)."""
    paths = RunPaths.of(spec.run_dir)
    command = [
        binary,
        f"mem={spec.memory}M",
        f"ubd0={disk.ubd}",
        f"umid={UMID}",
        paths.marker,
        "con0=null,fd:1", "con=null", "ssl=null",
    ]
    for index, nic in enumerate(spec.nics):
        url = str(paths.nic_switch(index)) if nic.kind == "segment" else nic_plug_url(nic)
        command.append(f"eth{index}=vde,{url},{nic.mac}")
    command += guest_cmdline(spec.cmdline)
    command.append(f"vmshop.hostfs={Path(os.path.abspath(spec.channel_dir))}")
    if spec.data_dir is not None:
        command.append(f"vmshop.data={Path(os.path.abspath(spec.data_dir))}")
    if fpu_workaround:
        command.append(f"GLIBC_TUNABLES={GUEST_GLIBC_TUNABLES}")
    return command


def guest_cmdline(cmdline: str) -> list[str]:
    """The image's kernel command line for UML: root on ``/dev/ubdX``, QEMU-only and host options dropped."""
    words: list[str] = []
    root = "/dev/ubda"
    for word in cmdline.split():
        if word.startswith("root="):
            value = word[len("root="):]
            match = re.fullmatch(r"/dev/(?:vd|sd|hd|xvd)([a-z])(\d*)", value)
            root = f"/dev/ubd{match.group(1)}{match.group(2)}" if match else value
            continue
        if DROPPED_WORDS.match(word):
            continue
        words.append(word)
    return [f"root={root}", *words]


def nic_plug_url(nic: Nic) -> str:
    """The vdeplug URL of a NIC's network: the plant's switch, or libslirp for a 'user' NIC.

    A 'user' NIC's libslirp is restricted (the guest reaches nothing), gives
    the guest 10.0.2.15 by DHCP and forwards 127.0.0.1:host_port to its port 80.
    """
    if nic.kind == "segment":
        return f"vde://{os.path.abspath(str(nic.switch))}"
    url = "slirp:///v4/restricted"
    if nic.host_port:
        url += f"/tcpfwd=127.0.0.1:{nic.host_port}:{USER_GUEST_ADDRESS}:{GUEST_HTTP_PORT}"
    return url


def host_needs_fpu_workaround() -> bool:
    """Whether the host's XSAVE area is larger than UML 6.1's buffer (AVX-512 or AMX present)."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512f", "amx_tile"})
    except OSError:
        pass
    return False


def _process_state(pid: int) -> str:
    """The state letter of ``pid`` in /proc ('' if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return ""


def _session_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return int(handle.read().rpartition(")")[2].split()[3])
    except (OSError, IndexError, ValueError):
        return None


def _named_by_a_process(text: str) -> bool:
    return bool(processes_with(lambda _, args: any(text in arg for arg in args)))


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
        if args and match(pid, args) and _process_state(pid) not in ("Z", "X", ""):
            found.append(pid)
    return found


@dataclass
class _VM:
    spec: GuestSpec
    paths: RunPaths
    process: subprocess.Popen[bytes] | None = None
    #: Set when the backend killed the VM's UML (so its end is 'killed', not 'failed').
    killed: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


class UmlBackend(Backend):
    """VMs as User-Mode Linux processes; see the module docstring for the options."""

    name = "uml"

    def __init__(self, options: dict[str, str] | None = None) -> None:
        super().__init__(options)
        options = self.options
        known = {"uml_binary", "state_dir", "confine", "fpu_workaround", "start_timeout", "mconsole_timeout",
                 "memory_fraction"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigurationError(f"uml backend: unknown option(s) {', '.join(unknown)}")
        self.binary = options.get("uml_binary", "linux.uml")
        self.confine = options.get("confine", "namespace")
        if self.confine not in CONFINEMENTS:
            raise ConfigurationError(f"uml backend: confine must be one of {', '.join(CONFINEMENTS)}")
        fpu = options.get("fpu_workaround", "auto")
        if fpu not in FPU_CHOICES:
            raise ConfigurationError(f"uml backend: fpu_workaround must be one of {', '.join(FPU_CHOICES)}")
        self.fpu_workaround = host_needs_fpu_workaround() if fpu == "auto" else fpu == "yes"
        state_dir = options.get("state_dir")
        cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        self.state_dir = Path(state_dir) if state_dir else cache_home / "vmshop"
        self.start_timeout = positive_number(options, "start_timeout", 30.0, "uml")
        self.mconsole_timeout = positive_number(options, "mconsole_timeout", 5.0, "uml")
        self.memory_fraction = positive_number(options, "memory_fraction", 0.75, "uml")
        self._vms: dict[str, _VM] = {}
        #: How VMs the backend saw end ended (a key of UML_STATES), for state() after destroy.
        self._ended: dict[str, str] = {}
        self._lock = threading.Lock()

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
        if kind == "segment" and shutil.which("vde_switch") is None:
            return "vde_switch is not installed (Debian package vde2)"
        if vdeplug_module("seqpacket") is None or vdeplug_module("vde") is None:
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
            accelerator="ptrace", architectures=ARCHITECTURES, networks=networks, channel="hostfs",
            max_memory=int(host_memory_mib() * self.memory_fraction), max_vcpus=MAX_VCPUS)

    # The contract ----------------------------------------------------------------------
    def start(self, spec: GuestSpec) -> None:
        self._check(spec)
        paths = RunPaths.of(spec.run_dir)
        with self._lock:
            known = self._vms.get(spec.vm_id)
            if known is not None and self._main_pid(known) is not None:
                raise BackendError(f"VM {spec.vm_id} already runs")
            if owned_pid(paths.pidfile, paths.marker) is not None or processes_with(lambda _, a: paths.marker in a):
                raise BackendError(f"a UML of {paths.run_dir} still runs; adopt or destroy VM {spec.vm_id} first")
            vm = _VM(spec, paths)
            # Claim the id now, so a second start of it fails instead of racing this one.
            self._vms[spec.vm_id] = vm
            self._ended.pop(spec.vm_id, None)
        try:
            binary = self._binary_path()
            if binary is None:
                raise BackendError(f"{self.binary} is not installed (Debian package user-mode-linux)")
            _remove(paths)
            for directory in (paths.run_dir, paths.ctl, paths.disk_dir, paths.net, paths.jail):
                directory.mkdir(parents=True, exist_ok=True)
            disk = self._prepare_disk(spec, paths)
            for index, nic in enumerate(spec.nics):
                if nic.kind == "segment":
                    self._link_to_segment(index, nic, paths)
            self._launch(vm, uml_command(spec, os.path.realpath(binary), disk, self.fpu_workaround), disk)
        except BaseException:
            try:
                self._kill(vm)
            finally:
                _remove(paths)
                with self._lock:
                    self._vms.pop(spec.vm_id, None)
            raise

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
        need(Path(spec.channel_dir).is_dir(), f"the channel directory {spec.channel_dir} does not exist")
        need(spec.data_dir is None or Path(spec.data_dir).is_dir(),
             f"the data directory {spec.data_dir} does not exist")
        paths = [spec.disk, spec.channel_dir, spec.run_dir, spec.data_dir]
        paths += [Path(nic.switch) for nic in spec.nics if nic.switch]
        need(not any(re.search(r"[\s,\"=]", os.path.abspath(p)) for p in paths if p is not None),
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
        longest = max([str(RunPaths.of(spec.run_dir).mconsole)] +
                      [f"{RunPaths.of(spec.run_dir).nic_switch(i)}/.00000-00000" for i in range(len(spec.nics))],
                      key=len)
        need(len(longest.encode()) <= MAX_SOCKET_PATH,
             f"the run directory {spec.run_dir} is too long for a unix socket")

    # Disk -------------------------------------------------------------------------------
    def _prepare_disk(self, spec: GuestSpec, paths: RunPaths) -> DiskPlan:
        """The VM's disk for UML: a COW over a cached raw base if the overlay is a fresh clone, else a raw copy."""
        disk = Path(os.path.abspath(spec.disk))
        # Always read as qcow2 (what the plant makes): probing a guest-written image's format is unsafe.
        info = _image_info(disk, "qcow2")
        backing = info.get("full-backing-filename") or info.get("backing-filename")
        backing_format = info.get("backing-filename-format")
        if backing and backing_format and not _has_own_data(disk):
            backing_path = Path(str(backing))
            if not backing_path.is_absolute():
                backing_path = disk.parent / backing_path
            backing_info = _image_info(backing_path, backing_format)
            if backing_info.get("virtual-size") == info.get("virtual-size"):
                base = self._cached_base(backing_path, backing_info)
                return DiskPlan(ubd=f"{paths.cow},{base}", base=base, writable=paths.disk_dir)
        _convert(disk, paths.raw, "qcow2")
        return DiskPlan(ubd=str(paths.raw), base=None, writable=paths.disk_dir)

    def _cached_base(self, image: Path, info: dict[str, object]) -> Path:
        """A raw copy of ``image`` in the cache, made once per image version (path, size, mtime, inode).

        Copies of older versions of the same image are removed once no UML
        names them any more (a rebuilt warehouse image gets a new copy).
        """
        real = Path(os.path.realpath(image))
        stat = real.stat()
        where = hashlib.sha256(str(real).encode()).hexdigest()[:12]
        version = hashlib.sha256(f"{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ino}".encode()).hexdigest()[:12]
        cache = self.state_dir / "uml-bases"
        target = cache / f"{real.stem}-{where}-{version}.raw"
        if target.is_file():
            return target
        cache.mkdir(parents=True, exist_ok=True)
        with open(cache / f".{real.stem}-{where}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not target.is_file():
                tmp = cache / f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp"
                try:
                    _convert(real, tmp, str(info.get("format") or "") or None)
                    tmp.chmod(0o444)
                    os.replace(tmp, target)
                finally:
                    tmp.unlink(missing_ok=True)
                log.info("cached a raw copy of %s for UML in %s", real, target)
                for old in cache.glob(f"{real.stem}-{where}-*.raw"):
                    if old != target and not _named_by_a_process(str(old)):
                        old.unlink(missing_ok=True)
        return target

    # Networks ---------------------------------------------------------------------------
    def _link_to_segment(self, index: int, nic: Nic, paths: RunPaths) -> None:
        """The private switch of segment NIC ``index`` and the plug joining it to the plant's switch."""
        switch = paths.nic_switch(index)
        _run_daemon(["vde_switch", "-s", str(switch), "-d", "-p", str(paths.switch_pidfile(index))],
                    f"the private switch of NIC {index}")
        _run_daemon(["vde_plug", "-d", "-p", str(paths.plug_pidfile(index)), f"vde://{switch}", nic_plug_url(nic)],
                    f"the link of NIC {index} to the segment")
        deadline = time.monotonic() + 5.0
        while owned_pid(paths.switch_pidfile(index), str(switch)) is None or \
                owned_pid(paths.plug_pidfile(index), f"vde://{switch}") is None:
            if time.monotonic() > deadline:
                raise BackendError(f"the link of NIC {index} to the segment {nic.switch} did not come up: "
                                   f"{tail(paths.stderr) or 'no message'}")
            time.sleep(POLL)

    def _helpers(self, paths: RunPaths) -> list[int]:
        """The live private switches and plugs of the VM's segment NICs (each checked by its command line)."""
        pids = []
        for pidfile in paths.helper_pidfiles():
            switch = str(paths.net / pidfile.name.split(".")[0])
            marker = switch if pidfile.name.endswith(".switch.pid") else f"vde://{switch}"
            pid = owned_pid(pidfile, marker)
            if pid is not None:
                pids.append(pid)
        return pids

    # Launch -----------------------------------------------------------------------------
    def _launch_config(self, spec: GuestSpec, paths: RunPaths, disk: DiskPlan, binary: str) -> dict[str, object]:
        env = {"PATH": "/usr/bin:/bin", "TMPDIR": JAIL_TMPDIR}
        config: dict[str, object] = {"cwd": str(paths.run_dir), "env": env, "fpu_workaround": self.fpu_workaround,
                                     "drop_caps": self.confine == "namespace"}
        if self.confine == "none":
            env["TMPDIR"] = "/dev/shm" if os.access("/dev/shm", os.W_OK) else "/tmp"
            return config
        # (source, where in the jail, writable, executable)
        binds: list[tuple[str, str, bool, bool]] = [(path, path, False, True) for path in _program_files(binary)]
        binds += [(dev, dev, dev == "/dev/null", False) for dev in ("/dev/null", "/dev/random", "/dev/urandom")
                  if os.path.exists(dev)]
        own = [str(paths.ctl), str(disk.writable), str(paths.net), str(Path(os.path.abspath(spec.channel_dir)))]
        binds += [(path, path, True, False) for path in own]
        shared = [str(disk.base)] if disk.base is not None else []
        shared += [str(Path(os.path.abspath(spec.data_dir)))] if spec.data_dir is not None else []
        binds += [(path, path, False, False) for path in shared]
        if spec.nics:
            binds += [(src, dst, False, True) for src, dst in _vdeplug_files({nic.kind for nic in spec.nics})]
        unique: dict[str, tuple[str, str, bool, bool]] = {}
        for bind in binds:
            unique.setdefault(bind[1], bind)
        config.update(jail=str(paths.jail), binds=list(unique.values()), tmpfs_mib=spec.memory + 128)
        return config

    def _launch(self, vm: _VM, command: list[str], disk: DiskPlan) -> None:
        """Start the launcher (which execs UML); BackendError with UML's words unless its mconsole answers."""
        spec, paths = vm.spec, vm.paths
        config = self._launch_config(spec, paths, disk, command[0])
        argv = [sys.executable, "-I", "-S", "-c", LAUNCHER, json.dumps(config), *command]
        try:
            with open(paths.console, "wb") as out, open(paths.stderr, "wb") as err:
                vm.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                              cwd=paths.run_dir, start_new_session=True)
        except OSError as exc:
            raise BackendError(f"cannot run {command[0]}: {exc}") from None
        paths.pidfile.write_text(f"{vm.process.pid}\n")
        deadline = time.monotonic() + self.start_timeout
        while True:
            status = vm.process.poll()
            if status is not None:
                raise BackendError(f"UML for VM {spec.vm_id} exited at once (status {status}): "
                                   f"{self._last_words(paths)}")
            try:
                mconsole(paths.mconsole, "version", min(self.mconsole_timeout, 1.0))
                return
            except MconsoleError:
                pass
            if time.monotonic() > deadline:
                raise BackendError(f"UML for VM {spec.vm_id} did not answer on its mconsole within "
                                   f"{self.start_timeout:g} s: {self._last_words(paths)}")
            time.sleep(POLL)

    @staticmethod
    def _last_words(paths: RunPaths) -> str:
        words = " ".join(part for part in (tail(paths.stderr, 1000), tail(paths.console, 1000)) if part)
        return words or "no message"

    # Observation ------------------------------------------------------------------------
    def _main_pid(self, vm: _VM) -> int | None:
        """The live UML (or launcher) process of ``vm``, or None (reaping it if it is our child)."""
        if vm.process is not None:
            vm.process.poll()
        return owned_pid(vm.paths.pidfile, vm.paths.marker)

    def _members(self, vm: _VM) -> list[int]:
        """Every live process of the VM: UML's own (the main one, its helpers, the guest's host processes),
        which all have the VM's ``uml_dir=`` argument, and the ``vde_plug`` children of its NICs, which are
        in UML's session (whose id is UML's pid)."""
        marker = vm.paths.marker
        session = read_pid(vm.paths.pidfile)

        def ours(pid: int, args: list[str]) -> bool:
            if marker in args:
                return True
            return (session is not None and os.path.basename(args[0]) == "vde_plug"
                    and UML_PLUG_DESCR in args and _session_of(pid) == session)

        return processes_with(ours)

    def condition(self, vm_id: str) -> str:
        """What the host observes of ``vm_id`` (a key of :data:`UML_STATES`)."""
        vm = self._vms.get(vm_id)
        if vm is None:
            return self._ended.get(vm_id, "")
        pid = self._main_pid(vm)
        if pid is None:
            return self._end_of(vm)
        if _process_state(pid) == "T":
            return "paused"
        try:
            with vm.lock:
                mconsole(vm.paths.mconsole, "version", self.mconsole_timeout)
        except MconsoleError:
            # It may have exited between the two looks; else it is there but mute.
            return self._end_of(vm) if self._main_pid(vm) is None else "mute"
        return "running"

    def _end_of(self, vm: _VM) -> str:
        """How the VM's UML ended (it is not running)."""
        if vm.killed:
            return "killed"
        status = vm.process.poll() if vm.process is not None else None
        console = tail(vm.paths.console, 6000)
        if "Kernel panic" in console:
            return "panicked"
        if status is None:
            return "halted" if "reboot: System halted" in console or "reboot: Power down" in console else "gone"
        return "halted" if status == 0 else "failed"

    def state(self, vm_id: str) -> VMState:
        condition = self.condition(vm_id)
        if not condition:
            return VMState.UNKNOWN
        return translate_condition(condition)

    # Ending -----------------------------------------------------------------------------
    def stop(self, vm_id: str, timeout: float = 30.0) -> None:
        vm = self._vms.get(vm_id)
        if vm is None:
            return
        deadline = time.monotonic() + timeout
        if self._main_pid(vm) is not None:
            try:
                with vm.lock:
                    if _process_state(self._main_pid(vm) or 0) == "T":
                        raise MconsoleError("the UML process is stopped by a signal")
                    mconsole(vm.paths.mconsole, "cad", min(self.mconsole_timeout, max(timeout, 0.1)))
            except MconsoleError as exc:
                log.info("VM %s: no Ctrl-Alt-Del (%s); it will be killed after %g s", vm_id, exc, timeout)
                deadline = time.monotonic()  # nobody will power it off
            while self._main_pid(vm) is not None and time.monotonic() < deadline:
                time.sleep(POLL)
            if self._main_pid(vm) is not None:
                log.warning("VM %s is still there (Ctrl-Alt-Del sent, %g s allowed): killing it", vm_id, timeout)
        self._kill(vm)
        with self._lock:
            self._ended[vm_id] = self._end_of(vm)

    def destroy(self, vm_id: str) -> None:
        with self._lock:
            vm = self._vms.get(vm_id)
        if vm is None:
            return
        self._kill(vm)
        ended = self._end_of(vm)
        _remove(vm.paths)
        with self._lock:
            self._vms.pop(vm_id, None)
            self._ended[vm_id] = ended

    def _kill(self, vm: _VM) -> None:
        """SIGKILL every process of the VM (each checked to be the VM's) and wait until none is left."""
        deadline = time.monotonic() + KILL_WAIT
        while True:
            pids = self._members(vm) + self._helpers(vm.paths)
            if vm.process is not None and vm.process.poll() is None and vm.process.pid not in pids:
                pids.append(vm.process.pid)  # still the launcher, before its command line names the VM
            if not pids:
                break
            if self._main_pid(vm) is not None:
                vm.killed = True
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if time.monotonic() > deadline:
                raise BackendError(f"processes {pids} of {vm.paths.run_dir} survived SIGKILL for {KILL_WAIT:g} s")
            time.sleep(POLL)
        if vm.process is not None:
            try:
                vm.process.wait(timeout=KILL_WAIT)
            except subprocess.TimeoutExpired:
                pass

    def adopt(self, spec: GuestSpec) -> bool:
        """Re-attach to the UML whose pidfile is in ``spec.run_dir``; True only if its mconsole answers.

        The VM is tracked even when this returns False, so that ``destroy``
        can still kill a UML that lives on but no longer answers.
        """
        vm = _VM(spec, RunPaths.of(spec.run_dir))
        with self._lock:
            known = self._vms.get(spec.vm_id)
            if known is not None and known.paths == vm.paths:
                vm.process = known.process  # still ours to reap
            self._vms[spec.vm_id] = vm
            self._ended.pop(spec.vm_id, None)
        return self.condition(spec.vm_id) == "running"

    def running(self) -> list[str]:
        with self._lock:
            vms = list(self._vms.items())
        return sorted(vm_id for vm_id, vm in vms if self._main_pid(vm) is not None)

    def ex_console(self, vm_id: str) -> str:
        """The tail of the guest's console ('' for an unknown VM)."""
        vm = self._vms.get(vm_id)
        return tail(vm.paths.console, 8000) if vm is not None else ""


def _image_info(image: Path, image_format: object = None) -> dict[str, object]:
    command = ["qemu-img", "info", "--output=json"]
    if image_format:
        command += ["-f", str(image_format)]
    command.append(str(image))
    out = _qemu_img(command, f"cannot read the disk {image}")
    try:
        info = json.loads(out)
    except ValueError:
        raise BackendError(f"qemu-img info {image} did not answer JSON") from None
    if not isinstance(info, dict):
        raise BackendError(f"qemu-img info {image} did not answer an object")
    return info


def _has_own_data(disk: Path) -> bool:
    """Whether the overlay holds clusters of its own (anything written to it after it was made)."""
    out = _qemu_img(["qemu-img", "map", "--output=json", "-f", "qcow2", str(disk)], f"cannot map the disk {disk}")
    try:
        extents = json.loads(out)
    except ValueError:
        return True
    return any(isinstance(e, dict) and e.get("depth") == 0 and e.get("present") for e in extents)


def _convert(source: Path, target: Path, source_format: object) -> None:
    command = ["qemu-img", "convert", "-q", "-O", "raw"]
    if source_format:
        command += ["-f", str(source_format)]
    _qemu_img([*command, str(source), str(target)], f"cannot convert the disk {source} for UML")


def _qemu_img(command: list[str], what: str) -> bytes:
    binary = shutil.which("qemu-img")
    if binary is None:
        raise BackendError("qemu-img is not installed (Debian package qemu-utils)")
    try:
        done = subprocess.run([binary, *command[1:]], capture_output=True, timeout=600, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BackendError(f"{what}: {exc}") from None
    if done.returncode != 0:
        raise BackendError(f"{what}: {done.stderr.decode(errors='replace').strip()}")
    return done.stdout


def _program_files(binary: str) -> list[str]:
    """The UML binary, its ELF interpreter and libraries (as the loader looks them up), for the jail."""
    files = [binary]
    try:
        out = subprocess.run(["ldd", binary], capture_output=True, timeout=30, check=True).stdout.decode()
    except (OSError, subprocess.SubprocessError):
        out = ""
    for line in out.splitlines():
        parts = line.split()
        if "=>" in parts and len(parts) > parts.index("=>") + 1 and parts[parts.index("=>") + 1].startswith("/"):
            files.append(parts[parts.index("=>") + 1])
        elif parts and parts[0].startswith("/"):
            files.append(parts[0])
    if len(files) == 1 and out:
        raise BackendError(f"cannot tell which libraries {binary} needs: {out.strip()[:200]}")
    return list(dict.fromkeys(files))


def vdeplug_module(name: str) -> str | None:
    """The path of vdeplug4's module ``name`` (e.g. 'vde', 'slirp'), or None if it is not installed."""
    found = sorted(glob.glob(f"/usr/lib/*/vdeplug/libvdeplug_{name}.so") +
                   glob.glob(f"/usr/lib/vdeplug/libvdeplug_{name}.so"))
    return found[0] if found else None


def _vdeplug_files(kinds: set[str]) -> list[tuple[str, str]]:
    """What UML's vde transport runs for NICs of ``kinds`` as (file, where in the jail): vde_plug, the vdeplug4
    modules it loads and their libraries. libvdeplug looks for a module in ``vdeplug/`` next to itself
    (as the loader found it: /lib/x86_64-linux-gnu on Debian, which is /usr/lib/... through a symlink)."""
    plug = shutil.which("vde_plug")
    if plug is None:
        raise BackendError("vde_plug is not installed (Debian package vdeplug)")
    files = [(path, path) for path in _program_files(os.path.realpath(plug))]
    library = next((path for path, _ in files if os.path.basename(path).startswith("libvdeplug.so")), None)
    if library is None:
        raise BackendError(f"cannot find the libvdeplug that {plug} uses")
    for name in ["seqpacket", *(["vde"] if "segment" in kinds else []), *(["slirp"] if "user" in kinds else [])]:
        module = vdeplug_module(name)
        if module is None:
            raise BackendError(f"the vdeplug4 module {name} is not installed")
        files.append((module, os.path.join(os.path.dirname(library), "vdeplug", os.path.basename(module))))
        files += [(path, path) for path in _program_files(module)[1:]]
    return list(dict.fromkeys(files))


def _run_daemon(command: list[str], what: str) -> None:
    binary = shutil.which(command[0])
    if binary is None:
        raise BackendError(f"{command[0]} is not installed")
    try:
        done = subprocess.run([binary, *command[1:]], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BackendError(f"cannot start {what}: {exc}") from None
    if done.returncode != 0:
        raise BackendError(f"cannot start {what}: {done.stderr.decode(errors='replace').strip() or 'no message'}")


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
