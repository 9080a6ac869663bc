"""What UML's jail holds, and the launcher's configuration that builds it.

hostfs lets a UML guest mount any path its UML process can see, and act on
it with UML's rights. So UML sees only this (all bind mounts ``nosuid,nodev``
into a tmpfs root that is then made read-only; see :mod:`.launcher`):

- read-only and executable: UML's binary, its ELF interpreter and
  libraries; for NICs, ``vde_plug`` with its libraries and the vdeplug4
  modules UML's vde transport loads in the jail (``seqpacket``, and
  ``slirp`` for a 'user' NIC);
- ``/dev/null`` (writable), ``/dev/random``, ``/dev/urandom`` (read-only);
- read-only: the cached raw base image (a *file*) and the data store;
- writable: the VM's own disk file (a *file*, bound by itself: not its
  directory), which UML must write; it belongs to root, so the guest
  cannot chmod it, and ``RLIMIT_FSIZE`` keeps it from growing;
- a private tmpfs (``PRIVATE_DIR``, owned by the UML user, size = guest
  memory + :data:`PRIVATE_MARGIN_MIB`) holding UML's ``TMPDIR`` (its memory
  file) and ``uml_dir`` (its pid file and mconsole socket, which the plant
  never uses): it exists only in UML's mount namespace and vanishes with it.

Nothing in the jail is a host directory the plant writes or opens later:
no run directory, no control socket, no other VM's files, no switch.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from vmshop_common.errors import BackendError

from ..base import GuestSpec
from .command import PRIVATE_DIR, STATUS_FD, DiskPlan
from .paths import RunPaths

#: MiB of the private tmpfs beyond the guest's memory (UML's memory file is the guest's memory plus a little).
PRIVATE_MARGIN_MIB = 16
DEVICES = ("/dev/null", "/dev/random", "/dev/urandom")


def uml_dir(paths: RunPaths, jailed: bool) -> str:
    """UML's ``uml_dir``: in the jail's private tmpfs, or (unconfined) ``run_dir/ctl/``."""
    return f"{PRIVATE_DIR}/" if jailed else f"{paths.unconfined_ctl}/"


def launch_config(spec: GuestSpec, paths: RunPaths, disk: DiskPlan, binary: str, *, jailed: bool,
                  user: tuple[int, int] | None, fsize: int | None, fpu_workaround: bool) -> dict[str, Any]:
    """The launcher's configuration (its fields: :func:`.launcher.parse_config`)."""
    config: dict[str, Any] = {
        "jail": None, "binds": [], "private": None, "size_mib": spec.memory + PRIVATE_MARGIN_MIB,
        "cwd": "/", "env": {"PATH": "/usr/bin:/bin", "TMPDIR": PRIVATE_DIR}, "user": list(user) if user else None,
        "fsize": fsize, "fpu_workaround": fpu_workaround, "status_fd": STATUS_FD, "parent": None,
    }
    if not jailed:
        config["env"]["TMPDIR"] = "/dev/shm" if os.access("/dev/shm", os.W_OK) else "/tmp"
        return config
    # (source, where in the jail, writable, executable)
    binds: list[tuple[str, str, bool, bool]] = [(path, path, False, True) for path in program_files(binary)]
    binds += [(dev, dev, dev == "/dev/null", False) for dev in DEVICES if os.path.exists(dev)]
    binds.append((str(disk.file), str(disk.file), True, False))
    if disk.base is not None:
        binds.append((str(disk.base), str(disk.base), False, False))
    if spec.data_dir is not None:
        data = os.path.abspath(spec.data_dir)
        binds.append((data, data, False, False))
    if spec.nics:
        binds += [(src, dst, False, True) for src, dst in vdeplug_files({nic.kind for nic in spec.nics})]
    unique: dict[str, tuple[str, str, bool, bool]] = {}
    for bind in binds:
        unique.setdefault(bind[1], bind)
    config.update(jail=str(paths.jail), binds=[list(bind) for bind in unique.values()], private=PRIVATE_DIR)
    return config


def program_files(binary: str) -> list[str]:
    """A program, its ELF interpreter and libraries (as the loader looks them up), for the jail."""
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


def vdeplug_files(kinds: set[str]) -> list[tuple[str, str]]:
    """What UML's vde transport runs in the jail for NICs of ``kinds`` as (file, where in the jail):
    ``vde_plug``, the vdeplug4 modules it loads and their libraries. libvdeplug looks for a module in
    ``vdeplug/`` next to itself (as the loader found it: /lib/x86_64-linux-gnu on Debian, which is
    /usr/lib/... through a symlink)."""
    plug = shutil.which("vde_plug")
    if plug is None:
        raise BackendError("vde_plug is not installed (Debian package vdeplug)")
    files = [(path, path) for path in program_files(os.path.realpath(plug))]
    if plug != os.path.realpath(plug):
        files.append((os.path.realpath(plug), plug))
    library = next((path for path, _ in files if os.path.basename(path).startswith("libvdeplug.so")), None)
    if library is None:
        raise BackendError(f"cannot find the libvdeplug that {plug} uses")
    for name in ["seqpacket", *(["slirp"] if "user" in kinds else [])]:
        module = vdeplug_module(name)
        if module is None:
            raise BackendError(f"the vdeplug4 module {name} is not installed")
        files.append((module, os.path.join(os.path.dirname(library), "vdeplug", os.path.basename(module))))
        files += [(path, path) for path in program_files(module)[1:]]
    return list(dict.fromkeys(files))


def jail_sources(config: dict[str, Any]) -> list[Path]:
    """The host paths a launch configuration binds into the jail (for tests and the README's audit)."""
    return [Path(bind[0]) for bind in config.get("binds", [])]


__all__ = ["PRIVATE_MARGIN_MIB", "jail_sources", "launch_config", "program_files", "uml_dir", "vdeplug_files",
           "vdeplug_module"]
