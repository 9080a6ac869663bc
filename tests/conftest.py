"""Shared fixtures: the guest image, short temporary directories, guest specs.

Tests that boot real guests need the image built by
``scripts/build_guest_image.sh`` in ``$VMSHOP_WAREHOUSE`` (default
``<repo>/var/warehouse``). If it is missing they FAIL and say how to build
it: a missing image must never turn into a quietly skipped suite.

Everything a test makes for a VM lives under one short session directory
(unix socket paths are limited to 107 bytes, pytest's own tmp paths are
long). When the session ends, any process that still names that directory
(a QEMU left behind) is killed and reported as an error.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pki import TestPki, test_pki  # noqa: E402
from socket_guard import MARKER as NETWORK_MARKER  # noqa: E402
from socket_guard import SocketGuard  # noqa: E402

from vmplant_service.backends.base import GuestSpec, Nic  # noqa: E402
from vmshop_common.xmlload import parse_xml_file  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
IMAGE_NS = "urn:vmshop:image:1"
BUILD_HINT = "build it with 'bash scripts/build_guest_image.sh' (or point VMSHOP_WAREHOUSE at a warehouse holding it)"


@dataclass(frozen=True)
class TinyImage:
    """The test guest image, as its image.xml describes it."""

    directory: Path
    disk: Path
    disk_format: str
    kernel: Path
    initrd: Path
    cmdline: str
    machine: str
    memory: int


@pytest.fixture(autouse=True)
def socket_guard(request: pytest.FixtureRequest) -> Iterator[SocketGuard | None]:
    """No network unless marked: a test whose process opens a non-loopback socket fails (see socket_guard.py).

    Tests marked ``@pytest.mark.network`` are not guarded (the fixture is then ``None``)."""
    if request.node.get_closest_marker(NETWORK_MARKER) is not None:
        yield None
        return
    guard = SocketGuard()
    guard.install()
    try:
        yield guard
    finally:
        guard.uninstall()
    if guard.violations:
        pytest.fail("a unit test used the network: " + "; ".join(guard.violations[:5]), pytrace=False)


@pytest.fixture(scope="session")
def pki() -> TestPki:
    """The session's PKI: a CA and credentials for every identity the tests play (see tests/pki.py)."""
    return test_pki()


@pytest.fixture(scope="module")
def client_env(pki: TestPki) -> Iterator[TestPki]:
    """``VMSHOP_CERT``/``VMSHOP_KEY``/``VMSHOP_CA`` set to the admin's credentials for a module's tests (the
    way a user's shell would hold them)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VMSHOP_CERT", str(pki.cert("admin")))
        patch.setenv("VMSHOP_KEY", str(pki.key("admin")))
        patch.setenv("VMSHOP_CA", str(pki.ca))
        yield pki


@pytest.fixture(scope="session")
def warehouse_dir() -> Path:
    """``$VMSHOP_WAREHOUSE`` or ``<repo>/var/warehouse``; fails (never skips) if it is missing."""
    path = Path(os.environ.get("VMSHOP_WAREHOUSE") or REPO / "var" / "warehouse")
    if not path.is_dir():
        pytest.fail(f"the warehouse {path} does not exist: {BUILD_HINT}", pytrace=False)
    return path


@pytest.fixture(scope="session")
def tiny_image(warehouse_dir: Path) -> TinyImage:
    """The 'tiny' guest image of the warehouse; fails with a clear message if any part is missing."""
    directory = warehouse_dir / "tiny"
    config = directory / "image.xml"
    if not config.is_file():
        pytest.fail(f"the guest image {config} is missing: {BUILD_HINT}", pytrace=False)
    root = parse_xml_file(config, what=str(config))
    disk = root.find(f"{{{IMAGE_NS}}}disk")
    boot = root.find(f"{{{IMAGE_NS}}}boot")
    hardware = root.find(f"{{{IMAGE_NS}}}hardware")
    if disk is None or boot is None or hardware is None or not boot.get("initrd"):
        pytest.fail(f"{config} lacks <disk>, <boot kernel initrd> or <hardware>: {BUILD_HINT}", pytrace=False)
    image = TinyImage(
        directory=directory, disk=directory / disk.get("file", ""), disk_format=disk.get("format", "qcow2"),
        kernel=directory / boot.get("kernel", ""), initrd=directory / boot.get("initrd", ""),
        cmdline=boot.get("cmdline", ""), machine=boot.get("machine", "pc"),
        memory=int(hardware.get("memory", "128")))
    for part in (image.disk, image.kernel, image.initrd):
        if not part.is_file():
            pytest.fail(f"the guest image's file {part} is missing: {BUILD_HINT}", pytrace=False)
    for tool in ("qemu-system-x86_64", "qemu-img"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed: run 'bash scripts/setup_host.sh'", pytrace=False)
    return image


def processes_naming(text: str) -> list[tuple[int, str]]:
    """Live (non-zombie) processes whose command line contains ``text``: (pid, command line)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                args = handle.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{entry}/stat") as handle:
                zombie = handle.read().rpartition(")")[2].split()[:1] == ["Z"]
        except OSError:
            continue
        if text in args and not zombie:
            found.append((int(entry), args.strip()))
    return found


@pytest.fixture(scope="session")
def guest_tmp() -> Iterator[Path]:
    """A short session directory for VM files; at the end no process may still name it."""
    root = Path(tempfile.mkdtemp(prefix="vmt-", dir="/tmp"))
    yield root
    left = processes_naming(str(root))
    for pid, _ in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while processes_naming(str(root)) and time.monotonic() < deadline:
        time.sleep(0.05)
    shutil.rmtree(root, ignore_errors=True)
    if left:
        pytest.fail("processes were left behind (now killed): " + "; ".join(f"{p}: {a[:200]}" for p, a in left),
                    pytrace=False)


@pytest.fixture(scope="session")
def accel_state_dir(guest_tmp: Path) -> Path:
    """One accelerator-probe cache for the session, so KVM is probed at most once per test run."""
    path = guest_tmp / "accel"
    path.mkdir()
    return path


class SpecFactory:
    """Makes each VM's directories (overlay, run) under a short root and its GuestSpec."""

    def __init__(self, root: Path, image: TinyImage | None) -> None:
        self.root = root
        self.image = image
        self._numbers = itertools.count(1)

    def new(self, prefix: str = "vm", nics: tuple[Nic, ...] = (), data_dir: Path | None = None) -> GuestSpec:
        """A fresh VM id with its overlay of the tiny image (an empty disk file without an image)."""
        from vmplant_service.clone import make_overlay

        vm_id = f"{prefix}-{next(self._numbers)}"
        base = self.root / vm_id
        base.mkdir(parents=True)
        overlay = base / "disk.qcow2"
        if self.image is not None:
            make_overlay(self.image.disk, self.image.disk_format, overlay)
        else:
            overlay.write_bytes(b"")
        image = self.image
        return GuestSpec(
            vm_id=vm_id, disk=overlay, memory=image.memory if image else 128, vcpus=1, run_dir=base / "run",
            kernel=image.kernel if image else None,
            initrd=image.initrd if image else None, cmdline=image.cmdline if image else "",
            machine=image.machine if image else "pc", data_dir=data_dir, nics=nics)


@pytest.fixture(scope="session")
def guest_specs(guest_tmp: Path, tiny_image: TinyImage) -> SpecFactory:
    """Specs of real guests (needs the image)."""
    return SpecFactory(guest_tmp / "guests", tiny_image)


@pytest.fixture(scope="session")
def fake_specs(guest_tmp: Path) -> SpecFactory:
    """Specs for backends that boot nothing (no image needed)."""
    return SpecFactory(guest_tmp / "fakes", None)


# PostgreSQL --------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Any]:
    """A private PostgreSQL server for the session (tests/pgcluster.py), stopped and removed at its end."""
    from pgcluster import PgCluster

    cluster = PgCluster()
    try:
        yield cluster
    finally:
        cluster.cleanup()


@pytest.fixture(scope="session")
def pg_database(pg_cluster: Any) -> str:
    """A database of the session's cluster that tests share, each in a schema of its own."""
    return str(pg_cluster.new_database("contract"))


@pytest.fixture
def pg_conninfo(pg_cluster: Any, pg_database: str) -> Iterator[str]:
    """A connection string to a fresh empty schema (dropped after the test)."""
    conninfo = pg_cluster.new_schema(pg_database)
    yield conninfo
    pg_cluster.drop_schema(conninfo)
