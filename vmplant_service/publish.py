"""Publishing a VM as a cached image of its plant's warehouse, and unpublishing one.

A published image is a directory ``<warehouse>/published/<plant>/<name>/``
holding ``disk.qcow2`` and ``image.xml`` (``xsd/vmimage-1.1.xsd``):

- the disk holds only the VM's changes over its base: ``qemu-img convert
  -B <base disk>`` of the VM's overlay, so it is a qcow2 backed by the base
  image's disk (which must therefore stay: an image that others use as a
  base cannot be unpublished);
- its DAG starts from the VM's image (``<image name="base">``) and chains
  every step the VM ran, in the order it ran them (the create's remaining
  actions, then every configure's), each as recorded when it ran
  (:func:`vmshop_common.dagxml.step_to_xml`);
- it belongs to the VM's owner (``owner=``), and is ``public`` only when an
  admin says so, ``movable`` (a private image a peer plant may fetch for its
  owner: :mod:`.transfer`) only when its owner or an admin says so.

A running guest is quiesced for the copy: its file systems are frozen
through its agent (``guest-fsfreeze-freeze``), then the backend pauses it
with its disk flushed (backend rule 11); afterwards it is resumed and
thawed, always, whatever failed, each step within a deadline.

With ``with_state`` (:meth:`Publisher.make`'s ``save_state``) the image
also carries the guest's running state, ``state.bin`` beside the disk,
saved by the backend (rule 12: QEMU migrates the paused machine into a
file the plant opened) in the same pause as the disk's copy, so the two
belong to one instant; ``<state model macs>`` say what machine it can be
restored into and the MACs the saved guest had. The guest's file systems
are frozen in that state: a clone resumed from it is thawed first
(:meth:`vmplant_service.plant.Plant._reset_identity`).

Crash safety: the image is made in a partial directory (``.<name>.partial-*``),
each file fsynced, checked by the same loader the warehouse uses, renamed
into place, and only then listed in ``index.txt`` (atomically: the
warehouse's :meth:`~vmplant_service.warehouse.Warehouse.add_entry`), which
is the commit point. A publish killed at any instruction leaves at most a
directory no index lists, which :func:`sweep` removes when the plant starts.

What cannot be published (each answered with its fault, nothing changed): a
VM that ran a network or mount action (its address and mounts are its own,
not a clone's), one whose action failed (its disk is then in no state a DAG
describes), one whose steps were recorded before steps were kept.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from lxml import etree

from vmshop_common.dag import Action, Dag, Edge, ImageStart, MountAction, NetworkAction
from vmshop_common.dagxml import DAG_ROOT, dag_to_element, step_from_xml
from vmshop_common.errors import BackendError, DiskFullError, ImageExistsError, NotSupportedError
from vmshop_common.imagename import IMAGE_NAME, check_image_name
from vmshop_common.xmlload import parse_xml_file

from .clone import qemu_img
from .records import MAX_RUNS_PER_VM, ActionRun
from .warehouse import IMAGE_NS, ImageInfo, Warehouse, fsync_directory, load_image_config

log = logging.getLogger(__name__)

PUBLISHED = "published"
PARTIAL = ".partial-"
DISK_FILE = "disk.qcow2"
STATE_FILE = "state.bin"
CONFIG_FILE = "image.xml"
#: A DAG node id (xsd/vmdag-1.1.xsd's NodeId): a step keeps its id in the image's DAG where it is one.
NODE_ID = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]{0,63}")
#: Bytes a publish leaves free in the warehouse's file system beyond the new disk's size.
RESERVE_BYTES = 64 * 1024 * 1024
#: Seconds qemu-img may take to copy a VM's changes.
CONVERT_TIMEOUT = 600.0


@dataclass(frozen=True)
class PublishedImage:
    """What a publish made: the image, its owner, whether it is public, its base, its steps and its disk's size;
    ``with_state``: it carries a saved running state."""

    name: str
    owner: str
    public: bool
    base: str
    steps: tuple[str, ...]
    size: int
    with_state: bool = False
    movable: bool = False


@dataclass(frozen=True)
class SavedState:
    """What a backend said of a state it saved: the machine model it restores into, the saved guest's MACs."""

    model: str
    macs: tuple[str, ...]


def described(info: ImageInfo) -> PublishedImage:
    """What a published image is, as a publish answers it."""
    order = info.dag.topological_order()
    return PublishedImage(name=info.name, owner=info.owner or "", public=info.public, base=info.parent or "",
                          steps=tuple(n for n in order if n != info.dag.start.id), size=info.disk.stat().st_size,
                          with_state=info.state is not None, movable=info.movable)


def published_steps(runs: Sequence[ActionRun], vm_id: str) -> list[tuple[str, Action]]:
    """The steps VM ``vm_id`` ran, in order, as (node id, action); NotSupportedError when the VM cannot be published
    (see the module docstring)."""
    if len(runs) >= MAX_RUNS_PER_VM:
        raise NotSupportedError(f"VM {vm_id} ran {len(runs)} actions or more; the plant keeps only the latest "
                                f"{MAX_RUNS_PER_VM}, so the steps it embodies are not all known")
    steps: list[tuple[str, Action]] = []
    for run in runs:
        if not run.ok:
            raise NotSupportedError(f"VM {vm_id}'s action '{run.node_id}' failed: its disk is in no state a DAG "
                                    "describes, so it cannot be published")
        if not run.step:
            raise NotSupportedError(f"VM {vm_id}'s action '{run.node_id}' was recorded before the plant kept the "
                                    "steps it ran, so it cannot be published")
        action = step_from_xml(run.step)
        if isinstance(action, (NetworkAction, MountAction)):
            raise NotSupportedError(f"VM {vm_id} ran the {action.kind} action '{run.node_id}': an address and a "
                                    "mount are that VM's own, never a clone's, so it cannot be published (publish "
                                    "a VM before its network and mount actions)")
        steps.append((run.node_id, action))
    return steps


def image_dag(base: str, steps: Sequence[tuple[str, Action]]) -> Dag:
    """The DAG a published image embodies: ``<image name=base>`` then ``steps`` in a chain, in their order.

    Node ids are the steps' own where they can be written (an id from a flattened lineage holds ':'), made
    unique by a suffix.
    """
    nodes: dict[str, object] = {"base": ImageStart("base", name=base)}
    edges: list[Edge] = []
    previous = "base"
    for number, (node_id, action) in enumerate(steps, start=1):
        wanted = node_id if NODE_ID.fullmatch(node_id) and len(node_id) <= 60 else f"step{number}"
        new_id, suffix = wanted, 1
        while new_id in nodes:
            suffix += 1
            new_id = f"{wanted}-{suffix}"
        nodes[new_id] = replace(action, id=new_id, line=None)
        edges.append(Edge(previous, new_id))
        previous = new_id
    return Dag(nodes=nodes, edges=edges)  # type: ignore[arg-type]


def image_document(name: str, owner: str, public: bool, base: ImageInfo, disk_gib: int, memory: int, vcpus: int,
                   dag: Dag, state: SavedState | None = None) -> bytes:
    """The ``image.xml`` of a published image (its disk is ``disk.qcow2`` beside it; it boots as its base)."""
    root = etree.Element(f"{{{IMAGE_NS}}}image", nsmap={None: IMAGE_NS})
    root.set("name", name)
    if owner:
        root.set("owner", owner)
    if public:
        root.set("public", "true")
    etree.SubElement(root, f"{{{IMAGE_NS}}}description").text = (
        f"published from a VM of {owner or 'the installer'} (base {base.name}, {len(dag.actions)} steps)")
    etree.SubElement(root, f"{{{IMAGE_NS}}}disk", {"file": DISK_FILE, "format": "qcow2"})
    if base.kernel is not None:
        boot = {"kernel": str(base.kernel), "cmdline": base.cmdline, "machine": base.machine}
        if base.initrd is not None:
            boot["initrd"] = str(base.initrd)
        etree.SubElement(root, f"{{{IMAGE_NS}}}boot", boot)
    etree.SubElement(root, f"{{{IMAGE_NS}}}hardware", {"memory": str(memory), "vcpus": str(vcpus),
                                                       "disk": str(disk_gib), "arch": base.hardware.arch})
    guest = base.guest
    etree.SubElement(root, f"{{{IMAGE_NS}}}guest", {"agent": guest.agent, "contextualization": guest.contextualization,
                                                    "kernel": guest.kernel, "data-share": guest.data_share})
    if state is not None:
        etree.SubElement(root, f"{{{IMAGE_NS}}}state", {"file": STATE_FILE, "model": state.model,
                                                        "macs": ",".join(state.macs)})
    root.append(dag_to_element(dag, DAG_ROOT))
    etree.indent(root, space="  ")
    return etree.tostring(root, xml_declaration=True, encoding="UTF-8") + b"\n"


def copy_changes(overlay: Path, base: ImageInfo, target: Path) -> None:
    """Write the changes ``overlay`` holds over ``base``'s disk to the new qcow2 ``target`` (backed by that disk).

    ``-U``: the VM's QEMU holds the overlay open (and locked) while it is paused; the plant reads it then.
    DiskFullError when the file system fills up meanwhile, BackendError for any other failure.
    """
    command = [qemu_img(), "convert", "-q", "-U", "-f", "qcow2", "-O", "qcow2", "-B", str(base.disk),
               "-F", base.disk_format, str(overlay), str(target)]
    try:
        done = subprocess.run(command, capture_output=True, timeout=CONVERT_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BackendError(f"qemu-img could not copy the VM's changes: {exc}") from None
    if done.returncode != 0:
        words = done.stderr.decode(errors="replace").strip()[-400:]
        if "No space left" in words:
            raise DiskFullError(f"the warehouse's file system filled up while the image was written: {words}")
        raise BackendError(f"qemu-img could not copy the VM's changes: {words}")


def set_flag(warehouse: Warehouse, directory: Path, info: ImageInfo, attribute: str, on: bool) -> None:
    """Rewrite the image file of ``info`` (in ``directory``, this plant's own: published or fetched) with the
    boolean ``attribute`` (``public``, ``movable``) set or removed, atomically (a temporary file, fsynced and
    renamed over it), and reload the warehouse."""
    root = parse_xml_file(info.config_path, what=f"image configuration {info.config_path}",
                          expected_root=f"{{{IMAGE_NS}}}image")
    if on:
        root.set(attribute, "true")
    elif attribute in root.attrib:
        del root.attrib[attribute]
    tmp = directory / f".{CONFIG_FILE}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "wb") as handle:
            handle.write(etree.tostring(root, xml_declaration=True, encoding="UTF-8") + b"\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, directory / CONFIG_FILE)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(directory)
    warehouse.load()


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def free_bytes(path: Path) -> int:
    """Bytes free for the plant in the file system holding ``path``."""
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


class Publisher:
    """Makes and removes the published images of one plant in ``warehouse`` (see the module docstring).

    ``plant`` names the plant's own directory under ``published/`` (plants may share a warehouse: each sweeps
    only its own). ``free_space`` says how many bytes are free where a path is (tests pass a smaller figure).
    """

    def __init__(self, warehouse: Warehouse, plant: str, free_space: Callable[[Path], int] = free_bytes) -> None:
        self.warehouse = warehouse
        safe = plant if IMAGE_NAME.fullmatch(plant or "") else "plant"
        self.root = warehouse.directory.resolve() / PUBLISHED / safe
        self.free_space = free_space

    def make(self, name: str, owner: str, public: bool, base: ImageInfo, overlay: Path,
             steps: Sequence[tuple[str, Action]], memory: int, vcpus: int, disk_gib: int,
             quiesced: Callable[[Callable[[], None]], None],
             save_state: Callable[[int], SavedState] | None = None) -> PublishedImage:
        """Make image ``name`` from ``overlay`` (``quiesced(work)`` runs ``work`` with the guest quiesced) and list
        it in the index. ImageExistsError if the name is taken (even by a publish that finished meanwhile);
        DiskFullError when the warehouse lacks the room; nothing is left behind by a failure. ``save_state(fd)``
        (with_state): writes the paused guest's machine state into ``fd`` (the image's ``state.bin``, opened
        here) while the guest is quiesced, before its disk is copied."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o755)
        final = self.root / name
        if name in self.warehouse.images or final.exists():
            raise ImageExistsError(f"this plant's warehouse has an image named '{name}' already")
        extra = memory * 2**20 if save_state is not None else 0
        self._check_room(overlay, extra)
        partial = self.root / f".{name}{PARTIAL}{uuid.uuid4().hex[:12]}"
        partial.mkdir(mode=0o755)
        try:
            disk = partial / DISK_FILE
            saved: list[SavedState] = []

            def copy() -> None:
                self._check_room(overlay, extra)  # again, once the guest is still: it may have written more since
                if save_state is not None:
                    fd = os.open(partial / STATE_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                    try:
                        saved.append(save_state(fd))
                        os.fsync(fd)
                    except OSError as exc:
                        if exc.errno == errno.ENOSPC:
                            raise DiskFullError("the warehouse's file system filled up while the state was "
                                                "written") from None
                        raise
                    finally:
                        os.close(fd)
                copy_changes(overlay, base, disk)

            quiesced(copy)
            if save_state is not None and not saved:
                raise BackendError("the guest's state was not saved")
            os.chmod(disk, 0o644)  # the hypervisor's user reads the chain of the clones made from it
            fsync_file(disk)
            dag = image_dag(base.name, steps)
            config = partial / CONFIG_FILE
            fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            with os.fdopen(fd, "wb") as handle:
                handle.write(image_document(name, owner, public, base, disk_gib, memory, vcpus, dag,
                                            saved[0] if saved else None))
                handle.flush()
                os.fsync(handle.fileno())
            fsync_directory(partial)
            load_image_config(config)  # the same checks the warehouse makes: a bad image never reaches the index
            try:
                os.rename(partial, final)  # fails when the directory exists (and is not empty)
            except OSError:
                raise ImageExistsError(f"this plant's warehouse has an image named '{name}' already") from None
            fsync_directory(self.root)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        try:
            self.warehouse.add_entry(final / CONFIG_FILE)
            loaded = self.warehouse.images.get(name)
            if loaded is None or loaded.config_path != (final / CONFIG_FILE).resolve():
                problem = next((str(p) for p in self.warehouse.problems if str(final) in p.path), "it did not load")
                raise BackendError(f"the published image '{name}' did not load from the index: {problem}")
        except BaseException:
            self._withdraw(final)
            raise
        size = (final / DISK_FILE).stat().st_size
        log.info("published image %s (owner %s, base %s, %d steps, %d bytes)", name, owner, base.name, len(steps),
                 size)
        return PublishedImage(name=name, owner=owner, public=public, base=base.name,
                              steps=tuple(dag.topological_order()[1:]), size=size, with_state=bool(saved))

    def _check_room(self, overlay: Path, extra: int = 0) -> None:
        """DiskFullError unless the warehouse's file system has room for the overlay's bytes, ``extra`` bytes (a
        saved state: at most the guest's memory) and the reserve."""
        try:  # the bytes the overlay holds (not qemu-img info: the VM's QEMU holds the overlay locked)
            used = overlay.stat().st_blocks * 512
        except OSError as exc:
            raise BackendError(f"the VM's disk {overlay.name} cannot be read: {exc.strerror or exc}") from None
        free = self.free_space(self.root)
        if free < used + extra + RESERVE_BYTES:
            raise DiskFullError(f"the warehouse has {free // 2**20} MiB free; the image needs about "
                                f"{(used + extra + RESERVE_BYTES) // 2**20} MiB (its changes"
                                f"{', its state' if extra else ''} and a reserve)")

    def set_public(self, info: ImageInfo, public: bool) -> None:
        """Rewrite a published image's file with ``public`` (:func:`set_flag`); NotSupportedError for an image this
        plant did not publish."""
        set_flag(self.warehouse, self._own(info), info, "public", public)

    def set_movable(self, info: ImageInfo, movable: bool) -> None:
        """Rewrite a published image's file with ``movable`` (:func:`set_flag`); NotSupportedError for an image
        this plant did not publish."""
        set_flag(self.warehouse, self._own(info), info, "movable", movable)

    def _own(self, info: ImageInfo) -> Path:
        """The directory of an image this plant published; NotSupportedError for any other."""
        directory = info.config_path.parent
        if directory.parent != self.root:
            raise NotSupportedError(f"image '{info.name}' was not published by this plant: it is the installer's "
                                    "(its file and index.txt are edited by hand)")
        return directory

    def remove(self, info: ImageInfo) -> None:
        """Take a published image out of the index, then delete its directory (NotSupportedError for an image this
        plant did not publish: the installer's are removed by hand)."""
        self._withdraw(self._own(info))

    def _withdraw(self, directory: Path) -> None:
        try:
            self.warehouse.remove_entry(directory / CONFIG_FILE)
        finally:
            shutil.rmtree(directory, ignore_errors=True)
            if self.root.exists():
                fsync_directory(self.root)

    def sweep(self) -> list[Path]:
        """Remove what publishes a crash cut short: partial directories, and image directories of this plant that
        index.txt does not list (their publish died before its commit point). Returns what it removed."""
        if not self.root.is_dir():
            return []
        listed = {info.config_path.parent for info in self.warehouse.images.values()}
        try:
            indexed = {Path(line.strip()).parent for line in
                       self.warehouse.index_path.read_text(encoding="utf-8").splitlines() if line.strip()}
        except OSError:
            return []  # without the index, nothing is known to be unlisted
        removed = []
        for entry in self.root.iterdir():
            if entry.is_symlink() or not entry.is_dir():
                continue
            if PARTIAL in entry.name or (entry.resolve() not in listed and entry not in indexed):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
                continue
            for leftover in entry.glob(f".{CONFIG_FILE}.*.tmp"):  # a set_public cut short
                leftover.unlink(missing_ok=True)
                removed.append(leftover)
        if removed:
            log.warning("removed %d leftover(s) of publishes a crash cut short: %s", len(removed),
                        ", ".join(p.name for p in removed))
        return removed



__all__ = ["PublishedImage", "Publisher", "SavedState", "check_image_name", "image_dag", "published_steps", "set_flag"]
