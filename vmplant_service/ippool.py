"""The plant's pool of host-only addresses: ``ip.txt``, in the original's format.

Each address line has eight whitespace-separated fields, as in the original:

1. the host-only IPv4 address;
2. the software bridge name;
3. the exported directory (the share);
4. the copy-on-write directory (unsupported, kept);
5. the VFS proxy port for nfsd (unsupported, kept);
6. the VFS proxy port for mountd (unsupported, kept);
7. the server port (deprecated, kept);
8. ``unused``, or the id of the VM that holds the address.

Blank lines and ``#`` comment lines are kept as they are; an address line
is rewritten only when its holder changes, and then only its eighth field
and, when the plant says which segment the VM is on, its second (the
bridge field names the owner's segment while a VM holds the address, and
the pool's free value again once it is released).
The first comment ``# network A.B.C.D/N`` (which :func:`write_pool` writes)
gives the pool's prefix length.

Every operation re-reads the file and every change rewrites it atomically
(a temporary file, fsync, ``os.replace``, fsync of the directory) while
holding a :class:`threading.Lock` and an exclusive ``fcntl`` lock on the
sidecar ``<file>.lock``, so threads and processes sharing the file never
hand one address to two VMs. Loading validates every address line (eight
fields, an IPv4 address, no address twice); a bad line raises
:class:`ConfigurationError` naming its line.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import re
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from vmshop_common.errors import ConfigurationError, PoolExhaustedError, Problem

UNUSED = "unused"
FIELDS = 8
DEFAULT_PREFIX = 24
_LAST_FIELD = re.compile(r"^(.*\S\s+)(\S+)(\s*)$")
_FIELD = re.compile(r"\S+")
_BRIDGE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_NETWORK_COMMENT = re.compile(r"^#\s*network[:=]?\s+(\S+)\s*$", re.IGNORECASE)
_VM_ID = re.compile(r"^[^\s#]{1,128}$")


@dataclass(frozen=True)
class PoolEntry:
    """One address line: its eight fields (``holder`` is None when unused) and its line number."""

    address: str
    bridge: str
    share: str
    cow_dir: str
    nfsd_port: str
    mountd_port: str
    server_port: str
    holder: str | None
    line: int

    @property
    def free(self) -> bool:
        return self.holder is None

    def fields(self) -> tuple[str, ...]:
        """The eight fields as written in the file."""
        return (self.address, self.bridge, self.share, self.cow_dir, self.nfsd_port, self.mountd_port,
                self.server_port, self.holder or UNUSED)


class _Pool:
    """The parsed file: its lines (text kept verbatim) and the entries among them."""

    def __init__(self, lines: list[str], entries: dict[int, PoolEntry], prefix: int | None) -> None:
        self.lines = lines
        self.entries = entries  # index in lines -> entry
        self.prefix = prefix

    def ordered(self) -> list[tuple[int, PoolEntry]]:
        return sorted(self.entries.items())

    def set_holder(self, index: int, holder: str | None, bridge: str | None = None) -> None:
        entry = self.entries[index]
        match = _LAST_FIELD.match(self.lines[index])
        assert match is not None  # the line has eight fields
        self.lines[index] = match.group(1) + (holder or UNUSED) + match.group(3)
        self.entries[index] = replace(entry, holder=holder)
        if bridge is not None and bridge != entry.bridge:
            second = list(_FIELD.finditer(self.lines[index]))[1]
            self.lines[index] = self.lines[index][:second.start()] + bridge + self.lines[index][second.end():]
            self.entries[index] = replace(self.entries[index], bridge=bridge)

    def text(self) -> str:
        return "".join(line + "\n" for line in self.lines)


def _parse(text: str, path: Path) -> _Pool:
    lines = text.splitlines()
    entries: dict[int, PoolEntry] = {}
    seen: dict[str, int] = {}
    prefix: int | None = None
    for index, raw in enumerate(lines):
        number = index + 1
        stripped = raw.strip()
        if not stripped:
            continue
        if stripped.startswith("#"):
            found = _NETWORK_COMMENT.match(stripped)
            if found and prefix is None:
                try:
                    prefix = ipaddress.IPv4Network(found.group(1), strict=False).prefixlen
                except ValueError:
                    pass  # an ordinary comment that happens to start with 'network'
            continue
        fields = stripped.split()
        if len(fields) != FIELDS:
            raise _bad(path, number, f"{len(fields)} fields; an address line has exactly {FIELDS}")
        try:
            address = str(ipaddress.IPv4Address(fields[0]))
        except ValueError:
            raise _bad(path, number, f"'{fields[0]}' is not an IPv4 address") from None
        if address in seen:
            raise _bad(path, number, f"address {address} is listed twice (first on line {seen[address]})")
        seen[address] = number
        holder = None if fields[7] == UNUSED else fields[7]
        entries[index] = PoolEntry(address=address, bridge=fields[1], share=fields[2], cow_dir=fields[3],
                                   nfsd_port=fields[4], mountd_port=fields[5], server_port=fields[6],
                                   holder=holder, line=number)
    return _Pool(lines, entries, prefix)


def _bad(path: Path, number: int, message: str) -> ConfigurationError:
    return ConfigurationError(f"IP pool {path} is invalid at line {number}", [Problem(message, number)])


def _atomic_write(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically and durably (keeping the file's mode)."""
    directory = path.parent
    try:
        mode = path.stat().st_mode & 0o7777
    except FileNotFoundError:
        mode = 0o600
    fd, temp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fchmod(handle.fileno(), mode)
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class IPPool:
    """The address pool kept in ``path`` (validated on construction).

    ``prefix`` (the prefix length guests configure with their address)
    defaults to the file's ``# network`` comment, else 24.
    """

    def __init__(self, path: str | Path, prefix: int | None = None, free_bridge: str | None = None) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self._thread_lock = threading.Lock()
        self._prefix = prefix
        with self._locked() as pool:
            if self._prefix is None:
                self._prefix = pool.prefix if pool.prefix is not None else DEFAULT_PREFIX
            free = [entry.bridge for _, entry in pool.ordered() if entry.free]
        #: The bridge field of an address no VM holds: as given, else what the file's first free line says.
        self.free_bridge = free_bridge or (free[0] if free else "none")

    @property
    def prefix(self) -> int:
        assert self._prefix is not None
        return self._prefix

    @contextmanager
    def _locked(self) -> Iterator[_Pool]:
        """Hold both locks and yield the file as it is now."""
        with self._thread_lock:
            with open(self.lock_path, "a+b") as lock:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
                try:
                    try:
                        text = self.path.read_text(encoding="utf-8")
                    except (OSError, UnicodeDecodeError) as exc:
                        raise ConfigurationError(f"cannot read the IP pool {self.path}: {exc}") from None
                    yield _parse(text, self.path)
                finally:
                    fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def checkout(self, vm_id: str, bridge: str | None = None) -> PoolEntry:
        """The address for ``vm_id``: the one it holds already, else the first unused one in file order.

        ``bridge`` (the VM's segment) is written to the address's bridge field.
        Raises PoolExhaustedError when no address is free, ValueError for a
        VM id that can't be written as one field (whitespace, '#', 'unused')
        or a bridge name that can't.
        """
        _check_vm_id(vm_id)
        if bridge is not None and not _BRIDGE.match(bridge):
            raise ValueError(f"{bridge!r} cannot be a bridge field")
        with self._locked() as pool:
            free: int | None = None
            for index, entry in pool.ordered():
                if entry.holder == vm_id:
                    return entry
                if entry.holder is None and free is None:
                    free = index
            if free is None:
                raise PoolExhaustedError(f"all {len(pool.entries)} addresses of the pool {self.path} are in use")
            pool.set_holder(free, vm_id, bridge)
            _atomic_write(self.path, pool.text())
            return pool.entries[free]

    def release(self, vm_id: str) -> list[PoolEntry]:
        """Free every address ``vm_id`` holds; returns them as they were (empty if none). Safe to repeat."""
        return self._release(lambda holder: holder == vm_id)

    def reconcile(self, live_vm_ids: Iterable[str]) -> list[PoolEntry]:
        """Free the addresses held by VMs not in ``live_vm_ids``; returns them as they were."""
        live = set(live_vm_ids)
        return self._release(lambda holder: holder not in live)

    def _release(self, wanted: Callable[[str], bool]) -> list[PoolEntry]:
        with self._locked() as pool:
            chosen = [(index, entry) for index, entry in pool.ordered()
                      if entry.holder is not None and wanted(entry.holder)]
            if not chosen:
                return []
            for index, _ in chosen:
                pool.set_holder(index, None, self.free_bridge)
            _atomic_write(self.path, pool.text())
            return [entry for _, entry in chosen]

    def holder(self, address: str) -> str | None:
        """The VM holding ``address``, None if it is free. Raises KeyError if the pool lacks it."""
        try:
            wanted = str(ipaddress.IPv4Address(address))
        except ValueError:
            raise KeyError(address) from None
        for entry in self.entries():
            if entry.address == wanted:
                return entry.holder
        raise KeyError(address)

    def held_by(self, vm_id: str) -> PoolEntry | None:
        """The address ``vm_id`` holds (the first, should the file give it several), or None."""
        return next((entry for entry in self.entries() if entry.holder == vm_id), None)

    def entries(self) -> list[PoolEntry]:
        """Every address line, in file order."""
        with self._locked() as pool:
            return [entry for _, entry in pool.ordered()]

    def free_count(self) -> int:
        """How many addresses are unused."""
        return sum(1 for entry in self.entries() if entry.free)


def _check_vm_id(vm_id: str) -> None:
    if not isinstance(vm_id, str) or not _VM_ID.match(vm_id) or vm_id == UNUSED:
        raise ValueError(f"{vm_id!r} cannot hold an address: a VM id is one token without whitespace or '#'")


HEADER = """\
# VMPlant IP pool (the original's ip.txt): one host-only address per line, eight fields:
#   1 address  2 bridge  3 exported directory (share)  4 COW directory (unsupported)
#   5 VFS proxy port nfsd (unsupported)  6 VFS proxy port mountd (unsupported)
#   7 server port (deprecated)  8 'unused', or the id of the VM holding the address
# Keep every field. The plant edits the eighth; edit the others while the plant is stopped.
"""


def write_pool(path: str | Path, network: ipaddress.IPv4Network, first: int | str | ipaddress.IPv4Address,
               count: int, bridge: str, share_root: str | Path, *, overwrite: bool = False) -> Path:
    """Write a fresh pool file of ``count`` unused addresses of ``network`` and return its path.

    ``first`` is the first address, or its offset in ``network`` (10 is
    .10 of a /24). Line i (from 1) gets the share ``share_root/i``, COW
    directory ``none`` and ports ``0``. Raises ValueError if an address
    would fall outside ``network``'s host addresses or a field would hold
    whitespace, FileExistsError if ``path`` exists and not ``overwrite``.
    """
    network = ipaddress.IPv4Network(network)
    start = (network.network_address + first if isinstance(first, int) else ipaddress.IPv4Address(first))
    if count < 1:
        raise ValueError("a pool needs at least one address")
    hosts = (network.network_address + 1, network.broadcast_address - 1) if network.prefixlen < 31 else \
        (network.network_address, network.broadcast_address)
    last = start + (count - 1) if int(start) + count - 1 <= 0xFFFFFFFF else None
    if last is None or start < hosts[0] or last > hosts[1]:
        raise ValueError(f"{count} addresses from {start} do not fit in the host addresses of {network}")
    share_root = str(share_root)
    for label, value in (("bridge", bridge), ("share root", share_root)):
        if not value or any(ch.isspace() for ch in value) or value.startswith("#"):
            raise ValueError(f"the {label} '{value}' cannot be a field (no whitespace, not empty)")
    target = Path(path)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; not overwriting it")
    lines = [HEADER + f"# network {network}\n"]
    width = len(str(last))
    for index in range(count):
        address = str(start + index)
        share = f"{share_root.rstrip('/')}/{index + 1}"
        lines.append(f"{address:<{width}} {bridge} {share} none 0 0 0 {UNUSED}\n")
    target.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(target, "".join(lines))
    return target
