"""Images that move between plants: a plant fetches the images it lacks from its peers.

Peers are plants (which serve their public images: :mod:`.imageserve`, whose
docstring gives the layout) or plain HTTPS warehouse servers with the same
layout.

Owners' private images move only when the owner and both plants agree: the
image is ``movable`` (its owner or an admin said so), its plant serves
movable images to peer plants, and this plant fetches them
(``fetch_movable``). This plant then reads the catalog of every owner's
movable images (``catalog?movable=1``), offers each only to its own owner's
requests (:meth:`Transfers.offerable`; the offer names its owner, so a shop
prices it for that owner only) over a lineage that owner may use, fetches
it with ``?owner=O``, and keeps the copy that owner's: private, movable.

Fetching (:class:`Transfers`):

- the peers' catalogs are read at start and every ``<peers refresh>``
  seconds on the plant's thread pool, each within :data:`CATALOG_TIMEOUT`,
  bounded (:data:`MAX_CATALOG_BYTES`, :data:`MAX_IMAGES`); a peer that does not
  answer keeps its last catalog; an entry's ``config`` is parsed by the
  hardened loader and validated against the image XSD, or skipped;
- :meth:`Transfers.offerable` names the images a peer holds and this plant
  lacks, whose whole lineage it can get (held here, or fetchable), with the
  transfer's seconds: the missing lineage's bytes over the measured rate
  (metric ``transfer_bytes_per_second``, from earlier transfers), else over
  the configured bandwidth;
- :meth:`Transfers.ensure` fetches an image and its missing parents, parents
  first, once per image at a time (a second create waits for the first's
  fetch, within :data:`FETCH_TIMEOUT`); each image goes to a partial
  directory, every file is checked for its manifest's size (a longer one is
  cut off and refused) and sha256, the disk is checked with ``qemu-img info``
  (its declared format; no external data file; a backing file exactly when
  the image has a parent, then rebased onto this plant's parent disk, whose
  sha256 must be the one the manifest names), the configuration is rewritten
  to name the fetched files only (any element but :data:`KEPT_ELEMENTS` is
  dropped), must
  describe the image the catalog described (the bid was made on that: its
  DAG, hardware and guest traits), and is loaded by the warehouse's own loader, the
  directory renamed into place, then listed in ``index.txt`` (atomically, the
  commit point). A failure leaves nothing: ``Server.TransferFailed``;
- a saved running state (``<state file model macs>``, the ``state`` role) is
  fetched and checked like any file when this plant's backend can resume
  (``state_model``), and kept only when the machine a clone of the fetched
  image runs as here has the model the state was saved for (``<state
  model>``: the plant's own rule, :meth:`~.plant.Plant.clone_model`);
  otherwise it is dropped (never fetched, on a backend that cannot resume)
  and clones of the image boot;
- fetched images live in ``<warehouse>/fetched/<plant>/NAME/``; past
  ``<peers cache>`` MiB the least recently used are evicted (:func:`evictable`):
  never one a live VM, a VM being made or a fetch in progress uses (or
  another image starts from), never an installer's or a published one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lxml import etree

from vmshop_common.authz import NAME as OWNER_NAME
from vmshop_common.dag import BlankStart, Dag, Hardware
from vmshop_common.dagxml import DAG_NS, DAG_ROOT, dag_to_xml, load_embedded_dag, validate_against
from vmshop_common.errors import DiskFullError, NoSuchImageError, TransferFailedError, VMShopError
from vmshop_common.guest import GuestTraits
from vmshop_common.imagename import IMAGE_NAME
from vmshop_common.matching import CachedImage
from vmshop_common.tls import Credentials, describe_tls_failure, requests_tls
from vmshop_common.xmlload import parse_xml

from .clone import qemu_img
from .imageserve import CHUNK, HASH_DEADLINE, MAX_CONFIG_BYTES, MAX_IMAGES, MOVABLE_QUERY, ROLES, HashCache
from .warehouse import IMAGE_NS, IMAGE_ROOT, IMAGE_XSD, ImageInfo, Warehouse, fsync_directory, load_image_config

log = logging.getLogger(__name__)

FETCHED = "fetched"
PARTIAL = ".partial-"
#: Bounds on what a peer may send.
MAX_CATALOG_BYTES = 8 * 1024 * 1024
MAX_MANIFEST_BYTES = 64 * 1024
MAX_FILE_BYTES = 1 << 40
MAX_LINEAGE = 16
#: Seconds: a catalog read, a manifest read, one whole image's transfer, a create's wait for another's fetch.
CATALOG_TIMEOUT = 20.0
IMAGE_TIMEOUT = 1800.0
FETCH_TIMEOUT = 2 * IMAGE_TIMEOUT
#: Seconds a manifest's read may take (a first manifest of a large image hashes it).
MANIFEST_TIMEOUT = HASH_DEADLINE + 30.0
#: Seconds qemu-img may take to inspect or rebase a fetched disk.
QEMU_IMG_TIMEOUT = 60.0
#: Bytes a fetch leaves free in the warehouse's file system beyond the image.
RESERVE_BYTES = 64 * 1024 * 1024
RATE_METRIC = "transfer_bytes_per_second"
#: The elements of a fetched image's configuration that are kept (every other one is dropped: nothing of a peer's
#: file names a file of this host but the disk, kernel and initrd, which are rewritten to the fetched files, and a
#: saved state, kept only when it was fetched and fits this plant: Transfers._state_fits).
KEPT_ELEMENTS = frozenset({"description", "disk", "boot", "hardware", "guest"})
USED_METRIC = "fetched_used:"
HEX64 = frozenset("0123456789abcdef")


# What peers hold ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RemoteImage:
    """An image a peer serves: where, its name, parent, total bytes, and what matching needs of it; ``owner``: the
    owner of a movable private image (it serves that owner's requests only), None for a public image."""

    peer: str
    name: str
    parent: str | None
    size: int
    dag: Dag
    hardware: Hardware
    guest: GuestTraits
    owner: str | None = None

    def usable_by(self, owner: str | None) -> bool:
        """Whether a request of ``owner`` may use it (``None``: some owner's, as an offer lists every image)."""
        return self.owner is None or owner is None or self.owner == owner

    def cached_image(self) -> CachedImage:
        return CachedImage(name=self.name, dag=self.dag, hardware=self.hardware)


def image_owner(root: etree._Element, what: str, movable: bool) -> str | None:
    """The owner of the private image ``root`` describes (None: a public image). A private image moves only when
    this plant fetches movable images (``movable``) and its owner made it movable; else TransferFailedError."""
    if root.get("owner") is None or root.get("public", "false") in ("true", "1"):
        return None
    if not movable:
        raise TransferFailedError(f"{what} is a private image: only public images move between plants (this plant "
                                  "fetches no owner's movable images)")
    if root.get("movable", "false") not in ("true", "1"):
        raise TransferFailedError(f"{what} is a private image its owner did not make movable")
    owner = root.get("owner")
    if not isinstance(owner, str) or not OWNER_NAME.fullmatch(owner):
        raise TransferFailedError(f"{what} names no valid owner")
    return owner


def parse_image_document(data: bytes, what: str, movable: bool = False) -> tuple[etree._Element, str, Dag, Hardware,
                                                                                   GuestTraits, str | None]:
    """An image configuration sent by a peer: (root, name, DAG, hardware, guest traits, owner of a private image
    or None); the hardened loader, the image XSD and the embedded DAG's rules (never its files: they are the
    peer's). A private image is refused unless ``movable`` (:func:`image_owner`)."""
    root = parse_xml(data, what=what, expected_root=IMAGE_ROOT)
    validate_against(IMAGE_XSD, root, what)
    dag_element = next(child for child in root if isinstance(child.tag, str) and child.tag.startswith(f"{{{DAG_NS}}}"))
    if dag_element.tag != DAG_ROOT:
        raise TransferFailedError(f"{what} embodies no <dag>")
    owner = image_owner(root, what, movable)
    dag = load_embedded_dag(dag_element, f"the DAG of {what}")
    hw = root.find(f"{{{IMAGE_NS}}}hardware")
    assert hw is not None
    hardware = Hardware(memory=int(hw.get("memory")), vcpus=int(hw.get("vcpus", "1")), disk=int(hw.get("disk")),
                        arch=hw.get("arch", "x86_64"))
    guest_el = root.find(f"{{{IMAGE_NS}}}guest")
    guest = GuestTraits() if guest_el is None else GuestTraits(
        agent=guest_el.get("agent", "qemu-ga"), contextualization=guest_el.get("contextualization", "none"),
        kernel=guest_el.get("kernel", "own"), data_share=guest_el.get("data-share", "9p"))
    return root, root.get("name"), dag, hardware, guest, owner


def remote_images(peer: str, document: Any, movable: bool = False) -> dict[str, RemoteImage]:
    """The images of a peer's catalog ``document`` (bad entries skipped, logged); owners' movable private images
    only with ``movable`` (else skipped too)."""
    found: dict[str, RemoteImage] = {}
    entries = document.get("images") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise TransferFailedError(f"the catalog of {peer} has no list of images")
    for entry in entries[:MAX_IMAGES]:
        try:
            if not isinstance(entry, dict):
                raise TransferFailedError("an entry is not an object")
            name, parent, size, config = entry.get("name"), entry.get("parent"), entry.get("size"), entry.get("config")
            if not isinstance(name, str) or not IMAGE_NAME.fullmatch(name) or name in found:
                raise TransferFailedError(f"{str(name)[:80]!r} is not a (unique) image name")
            if parent is not None and (not isinstance(parent, str) or not IMAGE_NAME.fullmatch(parent)):
                raise TransferFailedError(f"image '{name}': its parent is not an image name")
            if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= MAX_FILE_BYTES:
                raise TransferFailedError(f"image '{name}': its size is not a number of bytes")
            if not isinstance(config, str) or len(config) > MAX_CONFIG_BYTES:
                raise TransferFailedError(f"image '{name}': no configuration, or one too long")
            _, named, dag, hardware, guest, owner = parse_image_document(config.encode(), f"image '{name}' of {peer}",
                                                                         movable)
            own_parent = None if isinstance(dag.start, BlankStart) else dag.start.name
            if named != name or own_parent != parent:
                raise TransferFailedError(f"image '{name}': its configuration names another image or parent")
            found[name] = RemoteImage(peer, name, parent, size, dag, hardware, guest, owner)
        except VMShopError as exc:
            log.warning("peer %s: catalog entry skipped: %s", peer, exc.message)
    return found


# Fetching ----------------------------------------------------------------------------------------------------
class Transfers:
    """What this plant's peers hold, and the fetched images of its warehouse (see the module docstring).

    ``credentials``: the plant's own (presented to its peers; their CA verifies them); ``None``: an insecure
    plant (http peers only). ``records``: the plant's records (the measured rate, when each fetched image was
    last used). ``in_use()``: the images live VMs and VMs being made use (called under ``lock``, the plant's).
    ``fetch_movable``: also fetch owners' movable private images (``<peers fetch-movable>``), each for its owner's
    requests only. ``state_model(info)``: the machine model a clone of ``info`` runs as here, or None when this
    plant cannot resume (None: saved states are never fetched).
    """

    def __init__(self, warehouse: Warehouse, plant: str, peers: Iterable[str], credentials: Credentials | None,
                 records: Any, *, cache_bytes: int, bandwidth: float, in_use: Callable[[], set[str]],
                 lock: threading.Lock | None = None, clock: Callable[[], float] = time.time,
                 free_space: Callable[[Path], int] | None = None, fetch_movable: bool = False,
                 state_model: Callable[[ImageInfo], str | None] | None = None) -> None:
        self.warehouse = warehouse
        self.state_model = state_model
        self.fetch_movable = fetch_movable
        self.peers = tuple(peers)
        self.credentials = credentials
        self.records = records
        self.cache_bytes = cache_bytes
        self.bandwidth = bandwidth
        self.in_use = in_use
        self.lock = lock or threading.Lock()
        self.clock = clock
        self.free_space = free_space or _free_bytes
        safe = plant if IMAGE_NAME.fullmatch(plant or "") else "plant"
        self.root = warehouse.directory.resolve() / FETCHED / safe
        self._remote: dict[str, RemoteImage] = {}
        self._by_peer: dict[str, dict[str, RemoteImage]] = {}
        self._fetches: dict[str, Future[None]] = {}
        self._fetch_lock = threading.Lock()
        self._pinned: dict[str, int] = {}
        self.hashes = HashCache(limit=64)
        self.fetched_count = 0  # images fetched since start (tests, bench)

    # Catalogs ------------------------------------------------------------------------------------------------
    def _session(self) -> Any:
        import requests

        session = requests.Session()
        session.trust_env = False
        if self.credentials is not None:
            requests_tls(session, self.credentials, self.credentials.files.ca)
        return session

    def refresh(self) -> dict[str, int]:
        """Read every peer's catalog (blocking, each within CATALOG_TIMEOUT); a peer that fails keeps its last.
        Returns the count of images per peer."""
        counts = {}
        path = f"images/catalog?{MOVABLE_QUERY}" if self.fetch_movable else "images/catalog"
        for peer in self.peers:
            try:
                document = json.loads(self._get(peer, path, MAX_CATALOG_BYTES, CATALOG_TIMEOUT))
                self._by_peer[peer] = remote_images(peer, document, self.fetch_movable)
            except (VMShopError, ValueError) as exc:
                log.warning("peer %s: catalog not read (%s); its last one stays", peer,
                            getattr(exc, "message", None) or exc)
            counts[peer] = len(self._by_peer.get(peer, {}))
        merged: dict[str, RemoteImage] = {}
        for public in (True, False):  # a public image wins a name over a private one, then the first peer listed
            for peer in self.peers:
                for name, image in self._by_peer.get(peer, {}).items():
                    if (image.owner is None) == public:
                        merged.setdefault(name, image)
        self._remote = merged
        return counts

    @property
    def remote(self) -> dict[str, RemoteImage]:
        return dict(self._remote)

    def _get(self, peer: str, path: str, limit: int, timeout: float) -> bytes:
        """The body of ``peer``/``path`` (at most ``limit`` bytes, within ``timeout`` s); TransferFailedError."""
        deadline = time.monotonic() + timeout
        url = peer.rstrip("/") + "/" + path
        try:
            with self._session() as session:
                response = session.get(url, stream=True, timeout=(min(timeout, 10.0), timeout), allow_redirects=False)
                with response:
                    if response.status_code != 200:
                        text = response.raw.read(300, decode_content=False).decode("utf-8", "replace").strip()
                        raise TransferFailedError(f"{url} answered {response.status_code}: {text}")
                    body = bytearray()
                    for block in response.iter_content(CHUNK):
                        body += block
                        if len(body) > limit:
                            raise TransferFailedError(f"{url} sent more than {limit} bytes")
                        if time.monotonic() > deadline:
                            raise TransferFailedError(f"{url} did not answer within {timeout:g} s")
                    return bytes(body)
        except VMShopError:
            raise
        except Exception as exc:  # noqa: BLE001 - requests and ssl raise many kinds
            tls = describe_tls_failure(exc, "peer", self.credentials, client=True)
            raise TransferFailedError(f"{url}: {tls or type(exc).__name__}: {str(exc)[:300]}") from None

    # Offers --------------------------------------------------------------------------------------------------
    def rate(self) -> float:
        """Bytes/second a transfer is expected at: measured, else the configured bandwidth."""
        measured = self.records.metric(RATE_METRIC)
        return measured if measured else self.bandwidth

    def offerable(self, local: Mapping[str, ImageInfo],
                  owner: str | None = None) -> dict[str, tuple[RemoteImage, float]]:
        """The images a peer holds that this plant lacks and whose whole lineage is in ``local`` (the images a
        request may use here) or fetchable, with the seconds fetching what is missing of it would take. A name
        this plant holds (even as another owner's private image) is never fetched.

        ``owner``: whose request it is; a movable private image is offered to its own owner's requests only
        (``None``: every image, each private one with its owner: what the offer lists), and its lineage is
        looked for among what that owner may use only (here and at the peers)."""
        remote = self._remote
        held = self.warehouse.images
        rate = self.rate()
        found: dict[str, tuple[RemoteImage, float]] = {}
        for name, image in remote.items():
            if name in held or not image.usable_by(owner):
                continue
            if image.owner is None:  # a public image: public ancestors only
                scope_local: Mapping[str, Any] = {n: i for n, i in local.items() if i.public}
                scope_remote = {n: r for n, r in remote.items() if r.owner is None}
            else:
                who = image.owner
                scope_local = {n: i for n, i in local.items() if i.visible_to(who)}
                scope_remote = {n: r for n, r in remote.items() if r.owner in (None, who)}
            missing = self._missing(name, scope_local, scope_remote)
            if missing is None:
                continue
            if any(n in held for n in missing):
                continue  # an ancestor's name is taken here by an image this request may not use
            seconds = sum(remote[n].size for n in missing) / rate
            found[name] = (image, round(seconds, 3))
        return found

    @staticmethod
    def _missing(name: str, local: Mapping[str, Any], remote: Mapping[str, RemoteImage]) -> list[str] | None:
        """The images to fetch for ``name``, parents first; None when some ancestor is nowhere."""
        chain: list[str] = []
        current: str | None = name
        while current is not None and current not in local:
            image = remote.get(current)
            if image is None or current in chain or len(chain) >= MAX_LINEAGE:
                return None
            chain.append(current)
            current = image.parent
        return list(reversed(chain))

    # Fetch ---------------------------------------------------------------------------------------------------
    def pin(self, names: Iterable[str]) -> list[str]:
        """Keep ``names`` from eviction until :meth:`unpin`."""
        names = list(names)
        with self.lock:
            for name in names:
                self._pinned[name] = self._pinned.get(name, 0) + 1
        return names

    def unpin(self, names: Iterable[str]) -> None:
        with self.lock:
            for name in names:
                left = self._pinned.get(name, 0) - 1
                if left > 0:
                    self._pinned[name] = left
                else:
                    self._pinned.pop(name, None)

    def lineage(self, name: str) -> list[str]:
        """``name`` and its ancestors, as far as they are known here or at a peer."""
        images, remote = self.warehouse.images, self._remote
        chain: list[str] = []
        current: str | None = name
        while current is not None and current not in chain and len(chain) < MAX_LINEAGE:
            chain.append(current)
            info = images.get(current)
            current = info.parent if info is not None else (remote[current].parent if current in remote else None)
        return chain

    def ensure(self, name: str, owner: str = "") -> None:
        """Have image ``name`` (and its lineage) in the warehouse for a request of ``owner``: fetch what is
        missing, parents first, each once at a time (a movable private image only for its own owner).
        NoSuchImageError when no peer holds a missing ancestor that ``owner`` may use; TransferFailedError,
        DiskFullError."""
        images = self.warehouse.images
        if name in images:
            self.touch(name)
            return
        usable = {n: r for n, r in self._remote.items() if r.owner is None or (owner and r.owner == owner)}
        missing = self._missing(name, {n: i for n, i in images.items() if i.visible_to(owner)}, usable)
        if missing is None:
            raise NoSuchImageError(f"image '{name}' (or an image it starts from) is neither here nor at a peer")
        for each in missing:
            self._fetch_once(each)
        self.evict()

    def _fetch_once(self, name: str) -> None:
        with self._fetch_lock:
            if name in self.warehouse.images:
                return
            running = self._fetches.get(name)
            mine = running is None
            if mine:
                running = self._fetches[name] = Future()
        assert running is not None
        if not mine:
            log.info("image %s: waiting for the fetch in progress", name)
            try:
                running.result(timeout=FETCH_TIMEOUT)
            except TimeoutError:
                raise TransferFailedError(f"the fetch of image '{name}' did not end within {FETCH_TIMEOUT:g} s") \
                    from None
            return
        try:
            image = self._remote.get(name)
            if image is None:
                raise NoSuchImageError(f"no peer holds image '{name}' any more")
            self._fetch(image)
            running.set_result(None)
        except BaseException as exc:
            running.set_exception(exc)
            raise
        finally:
            with self._fetch_lock:
                self._fetches.pop(name, None)

    def _fetch(self, image: RemoteImage) -> None:
        name = image.name
        started = time.monotonic()
        deadline = started + IMAGE_TIMEOUT
        document = self._manifest(image)
        query = f"?owner={image.owner}" if image.owner is not None else ""
        files = {entry["role"]: entry for entry in document["files"]}
        if self.state_model is None:
            files.pop("state", None)  # this plant cannot resume: the state is never fetched, clones boot
        total = sum(entry["size"] for entry in files.values())
        if total > image.size:
            raise TransferFailedError(f"image '{name}' from {image.peer} is larger ({total} bytes) than its catalog "
                                      f"said ({image.size} bytes; what the bid was priced on): refused")
        parent = self.warehouse.images.get(image.parent) if image.parent else None
        if image.parent is not None:
            if parent is None or not parent.visible_to(image.owner or ""):
                raise NoSuchImageError(f"image '{name}' starts from '{image.parent}', which this plant lacks")
            local_sha = self.hashes.sha256(parent.disk)[1]
            if local_sha != document["parent_disk_sha256"]:
                raise TransferFailedError(f"image '{name}' starts from '{image.parent}', but this plant's "
                                          f"'{image.parent}' is not the peer's (their disks differ)")
        self.root.mkdir(parents=True, exist_ok=True, mode=0o755)
        free = self.free_space(self.root)
        if free < total + RESERVE_BYTES:
            raise DiskFullError(f"the warehouse has {free // 2**20} MiB free; image '{name}' needs about "
                                f"{(total + RESERVE_BYTES) // 2**20} MiB")
        final = self.root / name
        partial = self.root / f".{name}{PARTIAL}{uuid.uuid4().hex[:12]}"
        partial.mkdir(mode=0o755)
        try:
            for role, entry in files.items():
                self._download(image, role, entry, partial / role, deadline, query)
            disk_format = self._check_disk(partial / "disk", parent)
            peer_config = (partial / "config").read_bytes()
            target = partial / "image.xml"
            info = self._write_config(image, target, self._rewrite_config(image, peer_config, disk_format, files))
            if info.state is not None and not self._state_fits(info):
                files.pop("state")
                (partial / "state").unlink()
                target.unlink()
                info = self._write_config(image, target, self._rewrite_config(image, peer_config, disk_format,
                                                                              files))
            (partial / "manifest.json").write_text(json.dumps(document))
            fsync_directory(partial)
            if info.name != name or info.parent != image.parent:
                raise TransferFailedError(f"image '{name}' from {image.peer} names another image or parent")
            if (None if info.public else info.owner) != image.owner or (image.owner is not None and not info.movable):
                raise TransferFailedError(f"image '{name}' from {image.peer} is not the owner's movable image its "
                                          "catalog described: refused")
            if dag_to_xml(info.dag) != dag_to_xml(image.dag) or info.hardware != image.hardware \
                    or info.guest != image.guest:
                raise TransferFailedError(f"image '{name}' from {image.peer} is not the image its catalog described "
                                          "(its DAG, hardware or guest differ): refused")
            if final.exists():
                shutil.rmtree(final, ignore_errors=True)  # a leftover no index lists (sweep's, missed)
            os.rename(partial, final)
            fsync_directory(self.root)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        try:
            self.warehouse.add_entry(final / "image.xml")
            loaded = self.warehouse.images.get(name)
            if loaded is None or loaded.config_path != (final / "image.xml").resolve():
                raise TransferFailedError(f"the fetched image '{name}' did not load from the index")
        except BaseException:
            self._withdraw(final)
            raise
        seconds = max(time.monotonic() - started, 1e-3)
        rate = total / seconds
        previous = self.records.metric(RATE_METRIC)
        self.records.set_metric(RATE_METRIC, rate if previous is None else 0.7 * previous + 0.3 * rate)
        self.touch(name)
        self.fetched_count += 1
        log.info("fetched image %s from %s (%d bytes in %.2f s)", name, image.peer, total, seconds)

    def _write_config(self, image: RemoteImage, target: Path, config: bytes) -> ImageInfo:
        """Write the fetched image's (rewritten) configuration to ``target``, fsynced, and load it."""
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "wb") as handle:
            handle.write(config)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            return load_image_config(target)
        except VMShopError as exc:
            raise TransferFailedError(f"image '{image.name}' from {image.peer} does not load: {exc.message}") \
                from None

    def _state_fits(self, info: ImageInfo) -> bool:
        """Whether the fetched saved state of ``info`` can be restored here: a clone's machine model here is the
        one it was saved for (else it is dropped: clones boot)."""
        try:
            model = self.state_model(info) if self.state_model is not None else None
        except VMShopError as exc:
            model = None
            log.info("image %s: no machine model here (%s)", info.name, exc.message)
        if model is not None and model == info.state_model:
            return True
        log.info("image %s: its saved state was made for machine %r, a clone here runs as %r: the state is "
                 "dropped, clones boot", info.name, info.state_model, model)
        return False

    def _manifest(self, image: RemoteImage) -> dict[str, Any]:
        query = f"?owner={image.owner}" if image.owner is not None else ""
        body = self._get(image.peer, f"images/{image.name}/manifest{query}", MAX_MANIFEST_BYTES, MANIFEST_TIMEOUT)
        try:
            document = json.loads(body)
        except ValueError:
            raise TransferFailedError(f"the manifest of '{image.name}' from {image.peer} is not JSON") from None
        what = f"the manifest of '{image.name}' from {image.peer}"
        if not isinstance(document, dict) or document.get("name") != image.name \
                or document.get("parent") != image.parent:
            raise TransferFailedError(f"{what} names another image or parent")
        entries = document.get("files")
        if not isinstance(entries, list) or not 2 <= len(entries) <= len(ROLES):
            raise TransferFailedError(f"{what} lists no files")
        roles = set()
        for entry in entries:
            if not isinstance(entry, dict) or entry.get("role") not in ROLES or entry["role"] in roles:
                raise TransferFailedError(f"{what} names a file that is not config, disk, kernel, initrd or "
                                          "state, or one twice")
            roles.add(entry["role"])
            size, digest = entry.get("size"), entry.get("sha256")
            if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= MAX_FILE_BYTES:
                raise TransferFailedError(f"{what}: the size of {entry['role']} is not a number of bytes")
            if not isinstance(digest, str) or len(digest) != 64 or not set(digest) <= HEX64:
                raise TransferFailedError(f"{what}: the sha256 of {entry['role']} is not a sha256")
        if not {"config", "disk"} <= roles:
            raise TransferFailedError(f"{what} lacks the configuration or the disk")
        if entries and next(e for e in entries if e["role"] == "config")["size"] > MAX_CONFIG_BYTES:
            raise TransferFailedError(f"{what}: the configuration is too long")
        parent_sha = document.get("parent_disk_sha256")
        if image.parent is not None and (not isinstance(parent_sha, str) or len(parent_sha) != 64):
            raise TransferFailedError(f"{what} does not say which disk its parent is")
        return document

    def _download(self, image: RemoteImage, role: str, entry: dict[str, Any], target: Path, deadline: float,
                  query: str = "") -> None:
        """One file, checked for its size (never more is written) and its sha256; ``query``: ``?owner=O`` for an
        owner's movable image."""
        url = f"{image.peer.rstrip('/')}/images/{image.name}/{role}{query}"
        size, expected = entry["size"], entry["sha256"]
        digest = hashlib.sha256()
        written = 0
        try:
            with self._session() as session:
                remaining = max(1.0, deadline - time.monotonic())
                response = session.get(url, stream=True, timeout=(min(remaining, 10.0), min(remaining, 60.0)),
                                       allow_redirects=False)
                with response:
                    if response.status_code != 200:
                        raise TransferFailedError(f"{url} answered {response.status_code}")
                    # A saved state holds the guest's memory: for the plant only, as publish writes it.
                    mode = 0o600 if role == "state" else 0o644
                    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
                    with os.fdopen(fd, "wb") as handle:
                        for block in response.iter_content(CHUNK):
                            written += len(block)
                            if written > size:
                                raise TransferFailedError(f"image '{image.name}': {role} from {image.peer} is "
                                                          f"longer than the {size} bytes its manifest says: refused")
                            if time.monotonic() > deadline:
                                raise TransferFailedError(f"image '{image.name}' was not fetched within "
                                                          f"{IMAGE_TIMEOUT:g} s")
                            digest.update(block)
                            handle.write(block)
                        handle.flush()
                        os.fsync(handle.fileno())
        except VMShopError:
            raise
        except OSError as exc:
            if getattr(exc, "errno", None) == 28:
                raise DiskFullError(f"the warehouse filled up while image '{image.name}' was fetched") from None
            raise TransferFailedError(f"{url}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - requests and ssl raise many kinds
            tls = describe_tls_failure(exc, "peer", self.credentials, client=True)
            raise TransferFailedError(f"{url}: {tls or type(exc).__name__}: {str(exc)[:300]}") from None
        if written != size:
            raise TransferFailedError(f"image '{image.name}': {role} from {image.peer} has {written} bytes, not the "
                                      f"{size} its manifest says: refused")
        if digest.hexdigest() != expected:
            raise TransferFailedError(f"image '{image.name}': the sha256 of {role} from {image.peer} is not the one "
                                      "its manifest says (a corrupted transfer): refused")

    def _check_disk(self, disk: Path, parent: ImageInfo | None) -> str:
        """The fetched disk's format, checked (see the module docstring); rebased onto ``parent``'s disk."""
        info = _qemu_img_json(["info", "--output=json", "-U", str(disk)])
        fmt = info.get("format")
        if fmt not in ("qcow2", "raw"):
            raise TransferFailedError(f"the fetched disk is {fmt!r}, not qcow2 or raw")
        specific = (info.get("format-specific") or {}).get("data") or {}
        if specific.get("data-file"):
            raise TransferFailedError("the fetched disk names an external data file: refused")
        backing = info.get("backing-filename")
        if parent is None and backing:
            raise TransferFailedError("the fetched disk has a backing file, but its image starts from no other: "
                                      "refused")
        if parent is not None:
            if fmt != "qcow2" or not backing:
                raise TransferFailedError("the fetched disk has no backing file, but its image starts from another")
            if backing != str(parent.disk):
                _qemu_img_json(["rebase", "-u", "-f", "qcow2", "-b", str(parent.disk), "-F", parent.disk_format,
                                str(disk)], want_json=False)
        return str(fmt)

    def _rewrite_config(self, image: RemoteImage, data: bytes, disk_format: str, files: Mapping[str, Any]) -> bytes:
        """The fetched configuration, naming the fetched files (and nothing else of the host)."""
        root, name, _, _, _, owner = parse_image_document(data, f"image '{image.name}' from {image.peer}",
                                                          self.fetch_movable)
        if name != image.name:
            raise TransferFailedError(f"the configuration of '{image.name}' from {image.peer} names '{name}'")
        if owner != image.owner:
            raise TransferFailedError(f"image '{image.name}' from {image.peer} belongs to another owner than its "
                                      "catalog said: refused")
        disk = root.find(f"{{{IMAGE_NS}}}disk")
        assert disk is not None
        if disk.get("format") != disk_format:
            raise TransferFailedError(f"image '{image.name}': its disk is declared {disk.get('format')} but is "
                                      f"{disk_format}")
        disk.set("file", "disk")
        state = root.find(f"{{{IMAGE_NS}}}state")
        if state is None and "state" in files:
            raise TransferFailedError(f"image '{image.name}': its manifest lists a saved state its configuration "
                                      "lacks")
        for child in list(root):  # anything else naming a host file goes (a state not fetched too: clones boot)
            if isinstance(child.tag, str) and child.tag.startswith(f"{{{IMAGE_NS}}}") \
                    and etree.QName(child).localname not in KEPT_ELEMENTS \
                    and not (child is state and "state" in files):
                root.remove(child)
        if state is not None and "state" in files:
            state.set("file", "state")
        boot = root.find(f"{{{IMAGE_NS}}}boot")
        if boot is not None:
            for attribute in ("kernel", "initrd"):
                if boot.get(attribute) is not None:
                    if attribute not in files:
                        raise TransferFailedError(f"image '{image.name}' boots a {attribute} its manifest lacks")
                    boot.set(attribute, attribute)
        elif "kernel" in files or "initrd" in files:
            raise TransferFailedError(f"image '{image.name}': its manifest lists a kernel its configuration lacks")
        return etree.tostring(root, xml_declaration=True, encoding="UTF-8") + b"\n"

    # The cache ------------------------------------------------------------------------------------------------
    def is_fetched(self, info: ImageInfo) -> bool:
        return info.config_path.parent.parent == self.root

    def touch(self, name: str) -> None:
        """Note that image ``name`` was used now (for LRU eviction; only fetched images are noted)."""
        info = self.warehouse.images.get(name)
        if info is not None and self.is_fetched(info):
            self.records.set_metric(USED_METRIC + name, self.clock())

    def evict(self) -> list[str]:
        """Remove the least recently used fetched images past the cache size (see :func:`evictable`)."""
        removed = []
        with self.lock:
            images = self.warehouse.images
            fetched = {name: info for name, info in images.items() if self.is_fetched(info)}
            sizes = {name: _directory_size(info.config_path.parent) for name, info in fetched.items()}
            used = {name: self.records.metric(USED_METRIC + name) or 0.0 for name in fetched}
            keep = self.in_use() | set(self._pinned)
            parents = {info.parent for info in images.values() if info.parent is not None}
            for name in evictable(sizes, used, keep, parents, self.cache_bytes):
                info = fetched[name]
                try:
                    self._withdraw(info.config_path.parent)
                except Exception:  # noqa: BLE001 - one image's trouble never stops a create
                    log.exception("evicting image %s failed", name)
                    continue
                removed.append(name)
        if removed:
            log.info("evicted fetched image(s) %s (cache %d MiB)", ", ".join(removed), self.cache_bytes // 2**20)
        return removed

    def _withdraw(self, directory: Path) -> None:
        try:
            self.warehouse.remove_entry(directory / "image.xml")
        finally:
            shutil.rmtree(directory, ignore_errors=True)
            if self.root.exists():
                fsync_directory(self.root)

    def sweep(self) -> list[Path]:
        """Remove partial fetches and fetched directories no index line lists (a crash cut them short)."""
        if not self.root.is_dir():
            return []
        listed = {info.config_path.parent for info in self.warehouse.images.values()}
        removed = []
        for entry in self.root.iterdir():
            if entry.is_symlink() or not entry.is_dir():
                continue
            if PARTIAL in entry.name or entry.resolve() not in listed:
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
                continue
            for leftover in entry.glob(".image.xml.*.tmp"):  # a setImageMovable cut short
                leftover.unlink(missing_ok=True)
                removed.append(leftover)
        if removed:
            log.warning("removed %d leftover(s) of fetches: %s", len(removed), ", ".join(p.name for p in removed))
        return removed


def evictable(sizes: Mapping[str, int], used: Mapping[str, float], keep: set[str], parents: set[str],
              limit: int) -> list[str]:
    """The fetched images to evict, least recently used first, until the rest hold at most ``limit`` bytes:
    never one in ``keep`` (in use) or in ``parents`` (another image starts from it; evicting that child first
    may free it in a later round)."""
    total = sum(sizes.values())
    chosen = []
    for name in sorted(sizes, key=lambda n: (used.get(n, 0.0), n)):
        if total <= limit:
            break
        if name in keep or name in parents:
            continue
        chosen.append(name)
        total -= sizes[name]
    return chosen


def _directory_size(directory: Path) -> int:
    total = 0
    for entry in directory.iterdir():
        try:
            if entry.is_file() and not entry.is_symlink():
                total += entry.stat().st_blocks * 512
        except OSError:
            pass
    return total


def _free_bytes(path: Path) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def _qemu_img_json(args: list[str], want_json: bool = True) -> dict[str, Any]:
    try:
        done = subprocess.run([qemu_img(), *args], capture_output=True, timeout=QEMU_IMG_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TransferFailedError(f"qemu-img could not check the fetched disk: {exc}") from None
    if done.returncode != 0:
        raise TransferFailedError("qemu-img refused the fetched disk: "
                                  + done.stderr.decode(errors="replace").strip()[-300:])
    if not want_json:
        return {}
    try:
        parsed = json.loads(done.stdout)
    except ValueError:
        raise TransferFailedError("qemu-img's answer about the fetched disk is not JSON") from None
    return parsed if isinstance(parsed, dict) else {}


__all__ = ["RemoteImage", "Transfers", "evictable", "parse_image_document", "remote_images"]
