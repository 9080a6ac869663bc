"""The warehouse: the plant's cached images, listed in ``index.txt``.

A warehouse is a directory holding ``index.txt``: one absolute path of an
image configuration file per line (blank lines and ``#`` comment lines are
allowed). An image configuration file (``xsd/vmimage-1.1.xsd``; a 1.0 file
is a 1.1 file without ``<guest>``) names the image, its disk, how to boot
it, its hardware, how the plant reaches its guest (:class:`GuestTraits`) and
the DAG it embodies.

:func:`load_image_config` reads one such file and checks everything about
it: the hardened loader, the XSD, the embedded DAG (``load_embedded_dag``:
its own XSD and the DAG rules), and on the host: each file it names exists,
is a regular readable file, and a relative name (relative to the directory
the configuration file really is in) stays inside that directory even
through symlinks; the disk's content agrees with its declared format; the
hardware agrees with the DAG's blank start node; the embedded DAG's start
node carries no ``<cloud-config>`` (that is a request's, per VM).

An image may carry an ``owner`` (a published image: :mod:`.publish`); it
then serves only that owner's requests unless it is ``public``
(:meth:`Warehouse.visible`). The plant edits ``index.txt`` itself only to
publish and unpublish (:meth:`Warehouse.add_entry`, :meth:`Warehouse.remove_entry`:
atomic, under a lock).

:meth:`Warehouse.load` reads every entry; a bad entry is reported (index
line, code, message) and skipped, never fatal for the others. Entries whose
lineage (a DAG starting from ``<image name="parent">``) names an image the
warehouse lacks, or loops, are skipped too. The set of images is replaced
at once, so readers see either the old or the new warehouse.
"""

from __future__ import annotations

import fcntl
import os
import stat
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lxml import etree

from vmshop_common.dag import BlankStart, Dag, Hardware
from vmshop_common.dagxml import DAG_NS, DAG_ROOT, load_embedded_dag, validate_against
from vmshop_common.errors import (
    ConfigurationError,
    NoSuchImageError,
    Problem,
    SchemaInvalidError,
    VMShopError,
)
from vmshop_common.guest import GuestTraits
from vmshop_common.matching import CachedImage, flatten
from vmshop_common.xmlload import parse_xml_file

IMAGE_NS = "urn:vmshop:image:1"
IMAGE_ROOT = f"{{{IMAGE_NS}}}image"
IMAGE_XSD = "vmimage-1.1.xsd"
INDEX_NAME = "index.txt"
#: The lock file that serialises edits of index.txt, and the prefix of an edit's temporary file.
INDEX_LOCK = "index.lock"
INDEX_TMP_PREFIX = ".index.txt.tmp."
DISK_FORMATS = ("qcow2", "raw")
QCOW2_MAGIC = b"QFI\xfb"


@dataclass(frozen=True)
class ImageInfo:
    """A cached image, as its configuration file describes it.

    ``disk``, ``kernel`` and ``initrd`` are absolute, resolved paths of
    existing regular files; ``dag`` is the (valid) DAG the image embodies.
    """

    name: str
    config_path: Path
    disk: Path
    disk_format: str
    kernel: Path | None
    initrd: Path | None
    cmdline: str
    machine: str
    hardware: Hardware
    dag: Dag = field(hash=False)
    description: str | None = None
    guest: GuestTraits = GuestTraits()
    #: The identity that published it (None: the installer's image, which serves everyone).
    owner: str | None = None
    #: Whether it serves every owner's requests (always True for an installer's image).
    public: bool = True
    #: Whether its owner let it move between the site's plants (``movable="true"``; see :meth:`Warehouse.shareable`).
    movable: bool = False
    #: Its saved running state (``<state file>``: publishVM with_state), or None.
    state: Path | None = None
    #: The backend's machine model that state can be restored into (:meth:`~.backends.base.Backend.machine_model`).
    state_model: str = ""
    #: The saved guest's NICs' MACs, in order (a clone changes each to its own).
    state_macs: tuple[str, ...] = ()

    def visible_to(self, owner: str) -> bool:
        """Whether ``owner``'s requests may use this image (and see its name)."""
        return self.public or (bool(owner) and owner == self.owner)

    @property
    def parent(self) -> str | None:
        """The image its lineage starts from (its DAG's ``<image name>``), or None for a blank start."""
        start = self.dag.start
        return None if isinstance(start, BlankStart) else start.name

    def cached_image(self) -> CachedImage:
        """What matching and the cost model need of this image."""
        return CachedImage(name=self.name, dag=self.dag, hardware=self.hardware)


@dataclass(frozen=True)
class WarehouseProblem:
    """A warehouse entry that was skipped: the file, its line in index.txt, the error's code and message."""

    path: str
    line: int | None
    code: str
    message: str

    def __str__(self) -> str:
        where = f"{INDEX_NAME} line {self.line}" if self.line is not None else INDEX_NAME
        return f"{where}: {self.path}: {self.message} [{self.code}]"


def fsync_directory(directory: Path) -> None:
    """Make the directory's entries (a rename, a new file) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_image_config(path: str | Path) -> ImageInfo:
    """Read, validate and check the image configuration file ``path``.

    Raises a :class:`VMShopError`: XMLSyntaxError / DoctypeRefusedError /
    DocumentTooLargeError / WrongRootError for the document, SchemaInvalidError
    for the XSD (image or embedded DAG), DagInvalidError for the DAG's rules,
    ConfigurationError for the files it names and for disagreements; each
    names the line of the configuration file where it can.
    """
    config_path = Path(path)
    what = f"image configuration {config_path}"
    try:
        real = config_path.resolve(strict=True)
        if not real.is_file():
            raise ConfigurationError(f"{what} is not a regular file")
        root = parse_xml_file(real, what=what, expected_root=IMAGE_ROOT)
    except OSError as exc:
        raise ConfigurationError(f"cannot read {what}: {exc.strerror or exc}") from None
    validate_against(IMAGE_XSD, root, what)
    base = real.parent

    dag_element = next(child for child in root if isinstance(child.tag, str) and child.tag.startswith(f"{{{DAG_NS}}}"))
    if dag_element.tag != DAG_ROOT:
        local = etree.QName(dag_element).localname
        raise SchemaInvalidError(f"{what} must embody a <dag>, not a <{local}>",
                                 [Problem(f"<{local}> where <dag> is expected", dag_element.sourceline)])
    dag = load_embedded_dag(dag_element, f"the DAG of {what}")

    disk_el = _child(root, "disk")
    boot_el = _child(root, "boot")
    hw_el = _child(root, "hardware")
    assert disk_el is not None and hw_el is not None  # the schema requires them
    hardware = Hardware(memory=int(hw_el.get("memory")), vcpus=int(hw_el.get("vcpus", "1")),
                        disk=int(hw_el.get("disk")), arch=hw_el.get("arch", "x86_64"))
    disk_format = disk_el.get("format")
    disk = _host_file(base, disk_el.get("file"), "disk", what, disk_el.sourceline)
    _check_format(disk, disk_format, what, disk_el.sourceline)
    kernel = initrd = None
    cmdline, machine = "", "pc"
    if boot_el is not None:
        kernel = _host_file(base, boot_el.get("kernel"), "kernel", what, boot_el.sourceline)
        if boot_el.get("initrd") is not None:
            initrd = _host_file(base, boot_el.get("initrd"), "initrd", what, boot_el.sourceline)
        cmdline = boot_el.get("cmdline", "")
        machine = boot_el.get("machine", "pc")
    start = dag.start
    if start.cloud_config is not None:
        raise ConfigurationError(f"{what}: the DAG's start node '{start.id}' has a <cloud-config>: that is a "
                                 "request's (each VM's own first boot), never an image's",
                                 [Problem("<cloud-config> in an image's DAG", start.line, start.id)])
    if isinstance(start, BlankStart):
        _check_hardware(hardware, start, what, hw_el.sourceline)
    guest_el = _child(root, "guest")
    guest = GuestTraits() if guest_el is None else GuestTraits(
        agent=guest_el.get("agent", "qemu-ga"), contextualization=guest_el.get("contextualization", "none"),
        kernel=guest_el.get("kernel", "own"), data_share=guest_el.get("data-share", "9p"))
    state_el = _child(root, "state")
    state = None
    state_model, state_macs = "", ()
    if state_el is not None:
        state = _host_file(base, state_el.get("file"), "state", what, state_el.sourceline)
        state_model = state_el.get("model", "")
        state_macs = tuple(mac for mac in state_el.get("macs", "").split(",") if mac)
    description_el = _child(root, "description")
    description = (description_el.text or "").strip() if description_el is not None else None
    owner = root.get("owner")
    public = owner is None or root.get("public", "false") in ("true", "1")
    movable = owner is not None and root.get("movable", "false") in ("true", "1")
    return ImageInfo(name=root.get("name"), config_path=real, disk=disk, disk_format=disk_format, kernel=kernel,
                     initrd=initrd, cmdline=cmdline, machine=machine, hardware=hardware, dag=dag,
                     description=description, guest=guest, owner=owner, public=public, movable=movable, state=state,
                     state_model=state_model, state_macs=state_macs)


def _child(root: etree._Element, local: str) -> etree._Element | None:
    return root.find(f"{{{IMAGE_NS}}}{local}")


def _host_file(base: Path, name: str, label: str, what: str, line: int | None) -> Path:
    """The resolved path of a file the configuration names (see the module docstring for the rules)."""
    given = Path(name)
    if given.is_absolute():
        target = given
    else:
        target = base / given
    try:
        resolved = target.resolve(strict=True)
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop on older Pythons
        reason = "does not exist" if isinstance(exc, FileNotFoundError) else f"cannot be resolved ({exc})"
        raise ConfigurationError(f"{what}: the {label} file {target} {reason}", [Problem(f"no {label} file", line)]) \
            from None
    if not given.is_absolute() and not resolved.is_relative_to(base):
        raise ConfigurationError(
            f"{what}: the {label} file '{name}' leads to {resolved}, outside the configuration's directory {base}",
            [Problem(f"{label} file escapes the image's directory", line)])
    try:
        mode = resolved.stat().st_mode
    except OSError as exc:
        raise ConfigurationError(f"{what}: cannot stat the {label} file {resolved}: {exc}",
                                 [Problem(f"{label} file unreadable", line)]) from None
    if not stat.S_ISREG(mode):
        raise ConfigurationError(f"{what}: the {label} file {resolved} is not a regular file",
                                 [Problem(f"{label} is not a regular file", line)])
    if not os.access(resolved, os.R_OK):
        raise ConfigurationError(f"{what}: the {label} file {resolved} is not readable",
                                 [Problem(f"{label} file unreadable", line)])
    return resolved


def _check_format(disk: Path, disk_format: str, what: str, line: int | None) -> None:
    """The disk's first bytes must agree with its declared format (a raw disk must not look like qcow2)."""
    try:
        with open(disk, "rb") as handle:
            magic = handle.read(len(QCOW2_MAGIC))
    except OSError as exc:
        raise ConfigurationError(f"{what}: cannot read the disk {disk}: {exc}", [Problem("disk unreadable", line)]) \
            from None
    if disk_format == "qcow2" and magic != QCOW2_MAGIC:
        raise ConfigurationError(f"{what}: the disk {disk} is declared qcow2 but is not a qcow2 image",
                                 [Problem("disk is not qcow2", line)])
    if disk_format == "raw" and magic == QCOW2_MAGIC:
        raise ConfigurationError(f"{what}: the disk {disk} is declared raw but holds a qcow2 image",
                                 [Problem("disk declared raw is qcow2", line)])


def _check_hardware(hardware: Hardware, start: BlankStart, what: str, line: int | None) -> None:
    blank = start.hardware
    if hardware.arch != blank.arch:
        raise ConfigurationError(
            f"{what}: the hardware is {hardware.arch} but the DAG's blank node '{start.id}' is {blank.arch}",
            [Problem("architecture disagrees with the DAG", line)])
    if hardware.disk < blank.disk:
        raise ConfigurationError(
            f"{what}: the hardware's disk ({hardware.disk} GiB) is smaller than the DAG's blank node "
            f"'{start.id}' ({blank.disk} GiB)", [Problem("disk smaller than the DAG's", line)])


class Warehouse:
    """The cached images of the warehouse in ``directory`` (loaded on construction).

    Thread-safe: :meth:`load` may run while other threads read
    :attr:`images`, which is replaced as a whole.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self._lock = threading.Lock()
        self._images: dict[str, ImageInfo] = {}
        self._problems: list[WarehouseProblem] = []
        self.load()

    @property
    def index_path(self) -> Path:
        return self.directory / INDEX_NAME

    @property
    def images(self) -> dict[str, ImageInfo]:
        """Name -> image, for every entry that loaded (a copy; the warehouse's own view is unchanged)."""
        return dict(self._images)

    @property
    def problems(self) -> list[WarehouseProblem]:
        """What the last :meth:`load` skipped, in index order."""
        return list(self._problems)

    def get(self, name: str) -> ImageInfo:
        """The image called ``name``; raises NoSuchImageError."""
        try:
            return self._images[name]
        except KeyError:
            raise NoSuchImageError(f"the warehouse has no image named '{name}'") from None

    def cached_images(self) -> list[CachedImage]:
        """Every image as matching sees it, in name order."""
        return [info.cached_image() for _, info in sorted(self._images.items())]

    def visible(self, owner: str) -> dict[str, ImageInfo]:
        """Name -> image, for the images ``owner``'s requests may use: the public ones and ``owner``'s own.

        Closed under lineage: an image whose parent ``owner`` may not see is
        left out too, so nothing derived from the set (a bid, a decline's
        reasons) ever names another owner's private image. ``owner`` '' sees
        the public images only.
        """
        images = {name: info for name, info in self._images.items() if info.visible_to(owner)}
        changed = True
        while changed:
            changed = False
            for name, info in list(images.items()):
                if info.parent is not None and info.parent not in images:
                    del images[name]
                    changed = True
        return images

    def shareable(self, owner: str | None) -> dict[str, ImageInfo]:
        """Name -> image, for the images a peer plant may fetch on behalf of ``owner``: the public ones and
        ``owner``'s movable private ones (``None``: every owner's movable ones).

        Closed under lineage, per image: a public image's parent must be public, a private image's parent public
        or the same owner's movable image (an image whose parent is not shareable cannot be fetched anyway, and
        its entry would name that parent).
        """
        images = {name: info for name, info in self._images.items()
                  if info.public or (info.movable and info.owner and (owner is None or info.owner == owner))}
        changed = True
        while changed:
            changed = False
            for name, info in list(images.items()):
                parent = images.get(info.parent) if info.parent is not None else None
                if info.parent is not None and (
                        parent is None or not (parent.public if info.public else parent.visible_to(info.owner or ""))):
                    del images[name]
                    changed = True
        return images

    # Editing the index (publish, unpublish) -----------------------------------------
    def add_entry(self, config_path: Path) -> None:
        """List ``config_path`` in index.txt (atomically: see :meth:`_edit_index`) and reload."""
        entry = str(config_path)
        self._edit_index(lambda lines: [*lines, entry] if entry not in (line.strip() for line in lines) else lines)

    def remove_entry(self, config_path: Path) -> None:
        """Take ``config_path`` out of index.txt (atomically) and reload; nothing if it is not listed."""
        entry = str(config_path)
        self._edit_index(lambda lines: [line for line in lines if line.strip() != entry])

    def _edit_index(self, edit: Callable[[list[str]], list[str]]) -> None:
        """Rewrite index.txt as ``edit`` says, under an exclusive lock of ``index.lock`` (other plants sharing the
        warehouse edit it too), through a temporary file that is written, fsynced and renamed over the index
        (then the directory is fsynced): a reader, or a restart after a crash, sees the old index or the new,
        never half of one. The warehouse is then reloaded."""
        lock_fd = os.open(self.directory / INDEX_LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            try:
                old = self.index_path.read_text(encoding="utf-8").splitlines()
            except FileNotFoundError:
                old = []
            new = edit(old)
            tmp = self.directory / f"{INDEX_TMP_PREFIX}{os.getpid()}.{uuid.uuid4().hex[:8]}"
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
                with os.fdopen(fd, "w", encoding="utf-8") as handle:
                    handle.write("".join(f"{line}\n" for line in new))
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(tmp, self.index_path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            fsync_directory(self.directory)
        finally:
            os.close(lock_fd)  # releases the lock
        self.load()

    def sweep_index_leftovers(self) -> list[Path]:
        """Remove temporary index files a crash left behind (older than a minute: another plant sharing the
        warehouse may be writing one now); their paths."""
        removed = []
        for leftover in self.directory.glob(f"{INDEX_TMP_PREFIX}*"):
            try:
                if leftover.is_file() and time.time() - leftover.stat().st_mtime > 60:
                    leftover.unlink()
                    removed.append(leftover)
            except OSError:
                pass
        return removed

    def load(self) -> list[WarehouseProblem]:
        """Re-read index.txt and every entry; returns (and keeps) the problems of the skipped entries.

        A missing or unreadable index.txt gives an empty warehouse and one problem.
        """
        with self._lock:
            images: dict[str, ImageInfo] = {}
            lines: dict[str, tuple[int, str]] = {}  # name -> (index line, entry as written)
            problems: list[WarehouseProblem] = []
            try:
                text = self.index_path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                problems.append(WarehouseProblem(str(self.index_path), None, ConfigurationError.CODE,
                                                 f"cannot read the warehouse index: {exc}"))
                text = ""
            for number, raw in enumerate(text.splitlines(), start=1):
                entry = raw.strip()
                if not entry or entry.startswith("#"):
                    continue
                problem = self._load_entry(entry, number, images, lines)
                if problem is not None:
                    problems.append(problem)
            problems.extend(self._check_lineages(images, lines))
            problems.sort(key=lambda p: (p.line or 0))
            self._images = images
            self._problems = problems
            return list(problems)

    def _load_entry(self, entry: str, number: int, images: dict[str, ImageInfo],
                    lines: dict[str, tuple[int, str]]) -> WarehouseProblem | None:
        if not Path(entry).is_absolute():
            return WarehouseProblem(entry, number, ConfigurationError.CODE,
                                    "the path is not absolute (index.txt lists absolute paths)")
        try:
            info = load_image_config(entry)
        except VMShopError as exc:
            return WarehouseProblem(entry, number, exc.code, str(exc))
        except (OSError, ValueError) as exc:  # defensive: nothing about one entry may stop the others
            return WarehouseProblem(entry, number, ConfigurationError.CODE, f"cannot load: {exc}")
        if info.name in images:
            return WarehouseProblem(entry, number, ConfigurationError.CODE,
                                    f"duplicate image name '{info.name}' (first on line {lines[info.name][0]})")
        images[info.name] = info
        lines[info.name] = (number, entry)
        return None

    @staticmethod
    def _check_lineages(images: dict[str, ImageInfo],
                        lines: dict[str, tuple[int, str]]) -> list[WarehouseProblem]:
        """Drop images whose lineage is broken (repeatedly: a child of a dropped image goes too)."""
        problems: list[WarehouseProblem] = []
        changed = True
        while changed:
            changed = False
            dags = {name: info.dag for name, info in images.items()}
            for name, info in list(images.items()):
                if isinstance(info.dag.start, BlankStart):
                    continue
                reason = None
                try:
                    flat = flatten(info.dag, dags)
                    arch = flat.start.hardware.arch  # type: ignore[union-attr]
                    if arch != info.hardware.arch:
                        reason = f"its lineage is {arch} but its hardware is {info.hardware.arch}"
                except NoSuchImageError as exc:
                    reason = exc.message
                if reason is not None:
                    number, entry = lines[name]
                    problems.append(WarehouseProblem(entry, number, NoSuchImageError.CODE,
                                                     f"image '{name}': {reason}"))
                    del images[name]
                    changed = True
        return problems
