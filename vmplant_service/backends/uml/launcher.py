"""The UML launcher: confines the process it runs in, then execs User-Mode Linux in its place.

Run as ``python3 -I -S launcher.py CONFIG UML_ARGV...`` by the VM's relay
(:mod:`.relay`), never imported by a running plant: it is a program of its
own, on the standard library only (``-S``: no site packages, ``-I``: no
environment, no user site, not even its own directory on ``sys.path``), so
nothing the plant's environment holds runs in the process that becomes UML.
``CONFIG`` is one JSON object (:func:`parse_config` lists and checks its
fields); the relay gives the launcher its file descriptors at fixed numbers
(the agent's line, the console, the segment NICs, ``status_fd``).

What it does, in this order (each step's failure is written to
``status_fd`` and ends the launcher with status 126, before UML ever runs):

1. **Jail** (``jail`` set): a mount namespace of its own (and a user
   namespace when the launcher is not root), ``/`` made private, a tmpfs
   on ``jail`` holding nothing but the bind mounts of ``binds`` (each
   ``nosuid,nodev``, ``noexec`` unless it is a program, read-only unless
   it is writable: only the VM's own disk file and ``/dev/null`` are) and
   a **private** tmpfs at ``private`` (``size_mib``, owned by the UML user,
   ``nosuid,nodev``; UML's ``TMPDIR`` and ``uml_dir`` are there). The jail's
   own root is then remounted read-only and the launcher ``chroot``s into it.
   No path of the jail is a host directory that the plant opens later.
2. **Limits**: no core dumps; ``RLIMIT_FSIZE`` = ``fsize`` (no file UML
   writes, its disk file included, grows beyond that; ``SIGXFSZ`` is
   ignored, so a write past it fails with EFBIG instead of killing UML);
   no address-space randomisation (``ADDR_NO_RANDOMIZE``), so that UML's
   memory file is exactly the guest's memory (with a randomised heap it is
   up to ~1 GiB larger, which the file-size limit would have to allow).
3. **User**: the capability bounding set is emptied, then (``user`` set)
   ``setgroups([])``, ``setgid``, ``setuid``: UML runs as the unprivileged
   hypervisor user with no capability at all (``capset`` to nothing and the
   ambient set cleared for a launcher that keeps its user).
4. ``no_new_privs``; the parent-death signal SIGKILL (set after the user
   switch, which clears it; if the relay is already gone the launcher
   stops), so UML never outlives its relay; with ``fpu_workaround`` the
   seccomp filter of :func:`fpu_filter`.
5. ``status_fd`` becomes close-on-exec and the launcher ``execve``s UML with
   ``env`` only: the relay reads end-of-file with no message when the exec
   worked. UML keeps the launcher's pid.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import struct
import sys
from typing import Any

FAILED = 126
# mount(2) flags
RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, BIND, REC, PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
CLONE_NEWNS, CLONE_NEWUSER = 0x00020000, 0x10000000
# prctl(2) options
PR_SET_PDEATHSIG, PR_SET_SECCOMP, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT = 1, 22, 24, 38, 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
SECCOMP_MODE_FILTER = 2
SYS_CAPSET = 126
ADDR_NO_RANDOMIZE = 0x0040000
LINUX_CAPABILITY_VERSION_3 = 0x20080522


class LaunchError(Exception):
    """A step of the launch failed; the message goes to the relay."""


def parse_config(text: str) -> dict[str, Any]:
    """The launch configuration, checked for the fields and types the launcher uses (LaunchError if not)."""
    try:
        config = json.loads(text)
    except ValueError as exc:
        raise LaunchError(f"the configuration is not JSON: {exc}") from None
    if not isinstance(config, dict):
        raise LaunchError("the configuration is not an object")
    wanted: dict[str, tuple[type, ...]] = {
        "jail": (str, type(None)), "binds": (list,), "private": (str, type(None)), "size_mib": (int,),
        "cwd": (str,), "env": (dict,), "user": (list, type(None)), "fsize": (int, type(None)),
        "fpu_workaround": (bool,), "status_fd": (int,), "parent": (int, type(None)),
    }
    for name, types in wanted.items():
        if not isinstance(config.get(name), types):
            raise LaunchError(f"the configuration's {name!r} is missing or of the wrong type")
    for bind in config["binds"]:
        if not (isinstance(bind, list) and len(bind) == 4 and all(isinstance(p, str) for p in bind[:2])
                and all(isinstance(f, bool) for f in bind[2:]) and bind[0].startswith("/")
                and bind[1].startswith("/") and ".." not in bind[1].split("/")):
            raise LaunchError(f"bad bind {bind!r}")
    if config["user"] is not None and not (len(config["user"]) == 2 and all(type(n) is int and n > 0
                                                                           for n in config["user"])):
        raise LaunchError("'user' must be [uid, gid] of an unprivileged user")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in config["env"].items()):
        raise LaunchError("'env' must map strings to strings")
    return config


def fpu_filter() -> bytes:
    """The seccomp (classic BPF) program of the FPU workaround, as the kernel reads it.

    ``ptrace(PTRACE_GETREGSET or PTRACE_SETREGSET, pid, NT_X86_XSTATE, ...)``
    fails with EIO, so UML falls back to the legacy FXSAVE area; every
    other system call is allowed. (See the backend's documentation: on
    hosts where plain UML works, this filter corrupts the guest's vector
    registers, which is why ``auto`` decides by a probe boot.)
    """
    def ins(code: int, jt: int, jf: int, k: int) -> bytes:
        return struct.pack("HBBI", code, jt, jf, k)

    return b"".join([
        ins(0x20, 0, 0, 4), ins(0x15, 0, 7, 0xC000003E),  # arch == x86_64, else allow
        ins(0x20, 0, 0, 0), ins(0x15, 0, 5, 101),  # nr == ptrace, else allow
        ins(0x20, 0, 0, 16), ins(0x15, 1, 0, 0x4204), ins(0x15, 0, 2, 0x4205),  # GETREGSET or SETREGSET
        ins(0x20, 0, 0, 32), ins(0x15, 1, 0, 0x202),  # addr == NT_X86_XSTATE
        ins(0x06, 0, 0, 0x7FFF0000), ins(0x06, 0, 0, 0x00050005)])  # allow / errno EIO


class Launcher:
    """One launch (see the module docstring): ``run()`` returns only by failing."""

    def __init__(self, config: dict[str, Any], argv: list[str]) -> None:
        self.config = config
        self.argv = argv
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                                    ctypes.c_char_p]
        try:  # read now: the jail has no /proc
            with open("/proc/sys/kernel/cap_last_cap") as handle:
                self.last_cap = int(handle.read())
        except (OSError, ValueError):
            self.last_cap = 63

    def fail(self, what: str) -> LaunchError:
        return LaunchError(f"{what}: {os.strerror(ctypes.get_errno())}")

    def mount(self, source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
        def enc(text: str | None) -> bytes | None:
            return text.encode() if text is not None else None

        if self.libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)) != 0:
            raise self.fail(f"mount {source} on {target}")

    def prctl(self, option: int, arg: int, what: str) -> None:
        if self.libc.prctl(option, ctypes.c_ulong(arg), ctypes.c_ulong(0), ctypes.c_ulong(0),
                           ctypes.c_ulong(0)) != 0:
            raise self.fail(what)

    def jail(self) -> None:
        config = self.config
        jail = config["jail"]
        uid, gid = os.getuid(), os.getgid()
        if self.libc.unshare(CLONE_NEWNS | (CLONE_NEWUSER if uid else 0)) != 0:
            raise self.fail("unshare (mount namespace)")
        if uid:
            for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
                with open(f"/proc/self/{name}", "w") as handle:
                    handle.write(text)
        self.mount(None, "/", None, REC | PRIVATE)
        self.mount("vmshop-uml", jail, "tmpfs", NOSUID | NODEV, "mode=0755,size=1m")
        saved = os.umask(0o022)  # the jail's own directories are its user's way to the binds
        for source, target, writable, executable in config["binds"]:
            where = jail + target
            if os.path.isdir(source):
                os.makedirs(where, exist_ok=True)
            else:
                os.makedirs(os.path.dirname(where), exist_ok=True)
                os.close(os.open(where, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600))
            self.mount(source, where, None, BIND)
            flags = os.statvfs(source).f_flag & (RDONLY | NOSUID | NODEV | NOEXEC)
            if not source.startswith("/dev/"):
                flags |= NOSUID | NODEV | (0 if executable else NOEXEC)
            self.mount(None, where, None, BIND | REMOUNT | flags | (0 if writable else RDONLY))
        if config["private"]:
            # UML's memory file and uml_dir: jail-private, RAM-backed, never opened by the plant.
            # Not noexec: UML maps its memory file executable.
            where = jail + config["private"]
            os.makedirs(where, exist_ok=True)
            owner = config["user"] or [0, 0]  # the launcher's own user (root of its user namespace if not root)
            self.mount("vmshop-uml-private", where, "tmpfs", NOSUID | NODEV,
                       f"mode=0700,uid={owner[0]},gid={owner[1]},size={config['size_mib']}m")
        os.makedirs(jail + config["cwd"], exist_ok=True)
        os.umask(saved)
        self.mount(None, jail, None, REMOUNT | RDONLY | NOSUID | NODEV, "mode=0755,size=1m")
        os.chdir(jail)
        if self.libc.chroot(b".") != 0:
            raise self.fail("chroot")

    def drop_privileges(self) -> None:
        config = self.config
        for cap in range(self.last_cap + 1):  # needs CAP_SETPCAP: root (of the user namespace, in the jail) has it
            self.libc.prctl(PR_CAPBSET_DROP, ctypes.c_ulong(cap), ctypes.c_ulong(0), ctypes.c_ulong(0),
                            ctypes.c_ulong(0))
        if config["user"] is not None:
            uid, gid = config["user"]
            try:
                os.setgroups([])
                os.setgid(gid)
                os.setuid(uid)
            except OSError as exc:
                raise LaunchError(f"cannot become uid {uid} gid {gid}: {exc.strerror}") from None
            if os.getuid() != uid or os.geteuid() != uid or os.getgid() != gid or os.getgroups():
                raise LaunchError(f"the switch to uid {uid} did not hold")
        self.libc.prctl(PR_CAP_AMBIENT, ctypes.c_ulong(PR_CAP_AMBIENT_CLEAR_ALL), ctypes.c_ulong(0),
                        ctypes.c_ulong(0), ctypes.c_ulong(0))
        if self.libc.syscall(SYS_CAPSET, struct.pack("=II", LINUX_CAPABILITY_VERSION_3, 0), bytes(24)) != 0:
            raise self.fail("capset (no capabilities)")

    def run(self) -> None:
        config = self.config
        if config["jail"]:
            self.jail()
        os.chdir(config["cwd"])
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if config["fsize"] is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # stays ignored across execve
            resource.setrlimit(resource.RLIMIT_FSIZE, (config["fsize"], config["fsize"]))
        # UML sizes its memory file to reach from its own data to its heap: with the heap's address
        # randomised that is the guest's memory plus up to ~1 GiB (measured: 290-1000 MiB for mem=128M),
        # without it exactly the guest's memory, which keeps RLIMIT_FSIZE (and the tmpfs) tight.
        current = self.libc.personality(ctypes.c_ulong(0xFFFFFFFF))
        if current == -1 or self.libc.personality(ctypes.c_ulong(current | ADDR_NO_RANDOMIZE)) == -1:
            raise self.fail("personality (no address randomisation)")
        self.drop_privileges()
        self.prctl(PR_SET_NO_NEW_PRIVS, 1, "no_new_privs")
        self.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, "parent-death signal")
        if config["parent"] is not None and os.getppid() != config["parent"]:
            raise LaunchError("the relay that started the launcher is gone")
        if config["fpu_workaround"]:
            program = fpu_filter()
            buffer = ctypes.create_string_buffer(program)
            fprog = ctypes.create_string_buffer(struct.pack("HxxxxxxQ", len(program) // 8, ctypes.addressof(buffer)))
            if self.libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, fprog, 0, 0) != 0:
                raise self.fail("seccomp")
        os.set_inheritable(config["status_fd"], False)
        try:
            os.execve(self.argv[0], self.argv, config["env"])
        except OSError as exc:
            raise LaunchError(f"cannot run {self.argv[0]}: {exc.strerror}") from None


def report(fd: int, message: str) -> None:
    """Tell the relay why the launch failed (its status descriptor), or stderr if there is none."""
    data = ("vmshop-uml-launcher: " + message + "\n").encode(errors="replace")
    try:
        os.write(fd, data[:4000])
    except OSError:
        os.write(2, data[:4000])


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        sys.stderr.write("usage: launcher.py CONFIG UML_ARGV...\n")
        return 2
    status_fd = 2
    try:
        config = parse_config(argv[1])
        status_fd = config["status_fd"]
        Launcher(config, argv[2:]).run()
    except (LaunchError, OSError) as exc:
        report(status_fd, str(exc))
    return FAILED


if __name__ == "__main__":
    sys.exit(main(sys.argv))
