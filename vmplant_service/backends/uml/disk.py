"""The disk a UML guest gets: a UML COW file over a cached raw base, or a raw copy of its own.

UML's block driver (``ubd``) reads raw files and its own copy-on-write
format, not qcow2. The plant's overlay (``spec.disk``) is read at start:

- a fresh clone (no data of its own, its backing image's size) becomes a
  **UML COW file** ``disk.cow`` in the run directory, over a raw copy of the
  backing image converted once per image version with ``qemu-img convert``
  and kept, read-only, in ``<state_dir>/uml-bases/`` (never in the
  warehouse, never written after it is made). The COW file is written here
  (:func:`write_cow_header`, UML's version 3 header), not by UML: UML's jail
  holds the VM's disk as one bound *file*, so the file must exist first;
- anything else is converted whole to ``disk.raw`` (sparse).

Either way the guest's writes go to that one file in the run directory:
**the overlay itself is never written under UML** (so, unlike QEMU, it does
not hold the guest's changes after the VM ends). The file belongs to root
and the hypervisor's group, mode 0660 (0600 without a hypervisor user): UML
reads and writes it, and the guest, which can reach it through hostfs as
that user, cannot chmod or chown it (it does not own it).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import struct
import threading
from pathlib import Path

from vmshop_common.errors import BackendError

from ...clone import convert_to_raw, has_own_data, image_info
from ..base import GuestSpec
from .command import DiskPlan
from .paths import RunPaths
from .procs import named_by_a_process

log = logging.getLogger(__name__)

COW_MAGIC = 0x4F4F4F4D  # "OOOM"
COW_VERSION = 3
#: UML's PATH_LEN_V3 (the backing file's name field).
COW_PATH_LEN = 4096
COW_SECTOR = 512
COW_ALIGNMENT = 4096
#: magic, version, mtime (u32), size (u64), sector size, alignment, format (0: bitmap), all big-endian.
COW_HEADER = struct.Struct(">IIIQIII")


def cow_layout(size: int) -> tuple[int, int]:
    """(bitmap offset, data offset) of a version 3 COW file over a ``size``-byte backing file."""
    bitmap_offset = _round_up(COW_HEADER.size + COW_PATH_LEN, COW_ALIGNMENT)
    bitmap_bytes = _ceil(_ceil(size, COW_SECTOR), 8)  # one bit per sector
    return bitmap_offset, _round_up(bitmap_offset + bitmap_bytes, COW_ALIGNMENT)


def _ceil(value: int, unit: int) -> int:
    return (value + unit - 1) // unit


def _round_up(value: int, unit: int) -> int:
    return _ceil(value, unit) * unit


def write_cow_header(cow: Path, backing: Path, mode: int = 0o600) -> int:
    """Make ``cow`` a fresh, empty UML COW file over ``backing`` (an absolute path); its full size in bytes.

    What UML's ``init_cow_file`` writes: the header (the backing file's
    mtime in whole seconds and its size, which UML checks at every open),
    an all-zero bitmap (nothing copied yet) and the file extended to
    ``data offset + size`` (sparse: nothing is allocated).
    """
    backing = Path(backing)
    name = str(backing).encode()
    if not backing.is_absolute() or len(name) >= COW_PATH_LEN:
        raise BackendError(f"{backing} cannot be a UML COW file's backing file")
    stat = backing.stat()
    header = COW_HEADER.pack(COW_MAGIC, COW_VERSION, int(stat.st_mtime) & 0xFFFFFFFF, stat.st_size, COW_SECTOR,
                             COW_ALIGNMENT, 0) + name.ljust(COW_PATH_LEN, b"\0")
    _, data_offset = cow_layout(stat.st_size)
    fd = os.open(cow, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.write(fd, header)
        os.ftruncate(fd, data_offset + stat.st_size)
    finally:
        os.close(fd)
    return data_offset + stat.st_size


def prepare_disk(spec: GuestSpec, paths: RunPaths, state_dir: Path, group: int | None) -> DiskPlan:
    """The VM's disk for UML (see the module docstring), owned by root and ``group`` (mode 0660), or 0600."""
    disk = Path(os.path.abspath(spec.disk))
    mode = 0o660 if group is not None else 0o600
    # Always read as qcow2 (what the plant makes): probing a guest-written image's format is unsafe.
    info = image_info(disk, "qcow2")
    backing = info.get("full-backing-filename") or info.get("backing-filename")
    backing_format = info.get("backing-filename-format")
    plan: DiskPlan | None = None
    if backing and backing_format and not has_own_data(disk):
        backing_path = Path(str(backing))
        if not backing_path.is_absolute():
            backing_path = disk.parent / backing_path
        backing_info = image_info(backing_path, backing_format)
        if backing_info.get("virtual-size") == info.get("virtual-size"):
            base = cached_base(state_dir, backing_path, backing_info)
            size = write_cow_header(paths.cow, base, mode)
            plan = DiskPlan(ubd=f"{paths.cow},{base}", file=paths.cow, base=base, limit=size)
    if plan is None:
        convert_to_raw(disk, paths.raw, "qcow2", "for UML")
        plan = DiskPlan(ubd=str(paths.raw), file=paths.raw, base=None, limit=_int(info.get("virtual-size")))
    if group is not None:
        os.chown(plan.file, 0, group)
    os.chmod(plan.file, mode)  # whatever the umask: UML opens it read-only (and quietly) if it cannot write
    return plan


def cached_base(state_dir: Path, image: Path, info: dict[str, object]) -> Path:
    """A raw copy of ``image`` in the cache, made once per image version (path, size, mtime, inode).

    Copies of older versions of the same image are removed once no UML
    names them any more (a rebuilt warehouse image gets a new copy). The
    copy is 0444: UML, as the hypervisor user, reads it through a
    read-only bind in its jail.
    """
    real = Path(os.path.realpath(image))
    stat = real.stat()
    where = hashlib.sha256(str(real).encode()).hexdigest()[:12]
    version = hashlib.sha256(f"{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ino}".encode()).hexdigest()[:12]
    cache = state_dir / "uml-bases"
    target = cache / f"{real.stem}-{where}-{version}.raw"
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f".{real.stem}-{where}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.is_file():
            tmp = cache / f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp"
            try:
                convert_to_raw(real, tmp, str(info.get("format") or "") or None, "for UML")
                tmp.chmod(0o444)
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
            log.info("cached a raw copy of %s for UML in %s", real, target)
            for old in cache.glob(f"{real.stem}-{where}-*.raw"):
                if old != target and not named_by_a_process(str(old)):
                    old.unlink(missing_ok=True)
    return target


def _int(value: object) -> int:
    return value if isinstance(value, int) and value > 0 else 0


__all__ = ["cached_base", "cow_layout", "prepare_disk", "write_cow_header"]
