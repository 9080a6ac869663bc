"""Serving a plant's public images (and owners' movable ones) to its peers: ``GET /images/...`` on its own
mutual-TLS listener.

The layout (a plain HTTPS warehouse server may serve the same files; :mod:`.transfer` fetches them)::

    GET /images/catalog          {"images": [{"name", "parent", "size", "config"}, ...]}
    GET /images/NAME/manifest    {"name", "parent", "parent_disk_sha256", "files": [{"role", "size", "sha256"}]}
    GET /images/NAME/ROLE        the bytes of one file: config (image.xml), disk, kernel, initrd, state (a saved
                                 running state: ``<state file model macs>``)

    GET /images/catalog?movable=1        also every owner's movable private images (each config names its owner)
    GET /images/catalog?owner=O          also owner O's movable private images
    GET /images/NAME/...?owner=O         NAME as a peer fetching it for a request of owner O sees it

Rules:

- only callers whose certificate the plant's authorisation file maps to the
  ``plant``, ``shop`` or ``admin`` role are answered (403 otherwise);
- public images (:meth:`~.warehouse.Warehouse.visible` of no owner: the
  installer's and the public published ones, closed under lineage) are
  served to them all;
- an owner's private image is served only when the owner and both plants
  agree: the image is ``movable`` (its owner or an admin said so:
  ``setImageMovable``), this plant serves movable images (``<peers
  serve-movable="true">``), the caller has the ``plant`` role (a plant of
  the site, which offers and fetches it for that owner's requests only; a
  shop or admin certificate never gets private bytes this way), and the
  request names the owner (``owner=O``, checked with the identity-name
  rule: 400 otherwise) or asks for the movable catalog
  (:meth:`~.warehouse.Warehouse.shareable`). To any other caller, or
  without ``owner``, a private image is answered exactly as one that does
  not exist (404, the same words);
- no path comes from the request: the name is checked with the image-name
  rule (:mod:`vmshop_common.imagename`) and looked up in the warehouse,
  the role is one of four words, the file is the one the image's
  configuration names; the owner is a name, never a path;
- catalogs and manifests are made off the reactor (the plant's thread pool:
  its queue bounds them; within :data:`HASH_DEADLINE`); sha256 sums are kept
  while a file's inode, size and mtime stay the same; files are streamed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from vmshop_common.authz import ADMIN, PLANT, SHOP
from vmshop_common.authz import NAME as OWNER_NAME
from vmshop_common.errors import VMShopError
from vmshop_common.imagename import IMAGE_NAME
from vmshop_common.threads import in_thread
from vmshop_common.tls import peer_subject

from .warehouse import ImageInfo, Warehouse

log = logging.getLogger(__name__)

IMAGES_PREFIX = b"/images/"
#: The catalog's query for every owner's movable images too.
MOVABLE_QUERY = "movable=1"
ROLES = ("config", "disk", "kernel", "initrd", "state")
#: Bounds on what a catalog holds.
MAX_CONFIG_BYTES = 256 * 1024
MAX_IMAGES = 512
#: Seconds hashing an image's files may take when serving its manifest (a first manifest of a large image hashes
#: it).
HASH_DEADLINE = 600.0
CHUNK = 1024 * 1024


# Hashes ------------------------------------------------------------------------------------------------------
class HashCache:
    """sha256 of files, kept while a file's (device, inode, size, mtime) stays the same. Thread-safe."""

    def __init__(self, limit: int = 4096) -> None:
        self._sums: dict[tuple[str, int, int, int, int], str] = {}
        self._lock = threading.Lock()
        self.limit = limit

    def sha256(self, path: Path) -> tuple[int, str]:
        """(size, sha256 hex) of ``path``."""
        st = os.stat(path)
        key = (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            found = self._sums.get(key)
        if found is None:
            digest = hashlib.sha256()
            with open(path, "rb") as handle:
                while block := handle.read(CHUNK):
                    digest.update(block)
            found = digest.hexdigest()
            with self._lock:
                if len(self._sums) >= self.limit:
                    self._sums.pop(next(iter(self._sums)))
                self._sums[key] = found
        return st.st_size, found


def image_files(info: ImageInfo) -> dict[str, Path]:
    """The files of an image, by role."""
    files = {"config": info.config_path, "disk": info.disk}
    if info.kernel is not None:
        files["kernel"] = info.kernel
    if info.initrd is not None:
        files["initrd"] = info.initrd
    if info.state is not None:
        files["state"] = info.state
    return files


def image_size(info: ImageInfo) -> int:
    return sum(path.stat().st_size for path in image_files(info).values())


def manifest(info: ImageInfo, images: Mapping[str, ImageInfo], hashes: HashCache) -> dict[str, Any]:
    """The manifest of ``info`` (blocking: hashes its files)."""
    files = []
    for role, path in image_files(info).items():
        size, digest = hashes.sha256(path)
        files.append({"role": role, "size": size, "sha256": digest})
    parent = info.parent
    parent_sha = hashes.sha256(images[parent].disk)[1] if parent is not None and parent in images else None
    return {"name": info.name, "parent": parent, "parent_disk_sha256": parent_sha, "files": files}


def catalog(images: Mapping[str, ImageInfo]) -> dict[str, Any]:
    """The catalog of ``images`` (blocking: reads their configurations): at most MAX_IMAGES, the public ones
    first (owners' movable images never crowd them out)."""
    entries = []
    for name, info in sorted(images.items(), key=lambda item: (not item[1].public, item[0]))[:MAX_IMAGES]:
        try:
            config = info.config_path.read_bytes()
            size = image_size(info)
        except OSError:
            continue
        if len(config) > MAX_CONFIG_BYTES:
            continue
        entries.append({"name": name, "parent": info.parent, "size": size,
                        "config": config.decode("utf-8", "replace")})
    return {"images": entries}


# Serving -----------------------------------------------------------------------------------------------------
class ImagesResource(Resource):
    """``GET /images/...`` on the plant's listener (see the module docstring); ``warehouse`` is the plant's."""

    isLeaf = True

    def __init__(self, warehouse: Warehouse, site: Any, reactor: Any, hashes: HashCache | None = None,
                 run: Callable[[Callable[[], Any], str], Any] | None = None, serve_movable: bool = False) -> None:
        """``run(work, what)``: a Deferred of ``work()`` done off the reactor (the plant's pool; default: a thread
        of its own, within HASH_DEADLINE). ``serve_movable``: this plant agrees to serve owners' movable private
        images to peer plants (``<peers serve-movable>``)."""
        super().__init__()
        self.warehouse = warehouse
        self.serve_movable = serve_movable
        self.site = site
        self.reactor = reactor
        self.hashes = hashes or HashCache()
        self.run = run or (lambda work, what: in_thread(reactor, work, timeout=HASH_DEADLINE, what=what))

    def render(self, request: Request) -> bytes | int:
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"Allow", b"GET, HEAD")
            return _plain(request, 405, "only GET reads images")
        identity, refusal = self._identify(request)
        if refusal is not None:
            log.info("image request refused: %s", refusal)
            return _plain(request, 403, refusal)
        parts = request.path[len(IMAGES_PREFIX):].split(b"/")
        try:
            words = [part.decode("ascii") for part in parts]
            owner, every = _query(request)
        except UnicodeDecodeError:
            return _plain(request, 404, "no such image")
        except ValueError as exc:
            return _plain(request, 400, str(exc))
        # Owners' movable images go to the site's plants only, and only when this plant agreed to serve them.
        trusted = self.serve_movable and identity is not None and identity.has(PLANT)
        if trusted and every and words == ["catalog"]:
            images = self.warehouse.shareable(None)
        elif trusted and owner is not None:
            images = self.warehouse.shareable(owner)
        else:
            images = self.warehouse.visible("")
        if words == ["catalog"]:
            return self._json(request, lambda: catalog(images), "the catalog")
        if len(words) != 2 or not IMAGE_NAME.fullmatch(words[0]) or words[1] not in ("manifest", *ROLES):
            return _plain(request, 404, "no such image resource")
        info = images.get(words[0])
        if info is None:
            return _plain(request, 404, f"this plant serves no image named '{words[0]}'")
        if words[1] == "manifest":
            return self._json(request, lambda: manifest(info, images, self.hashes), f"the manifest of {info.name}")
        path = image_files(info).get(words[1])
        if path is None:
            return _plain(request, 404, f"image '{info.name}' has no {words[1]}")
        return _send_file(request, path)

    def _json(self, request: Request, work: Callable[[], Any], what: str) -> int:
        def send(document: Any) -> None:
            body = json.dumps(document).encode()
            _send(request, 200, b"application/json", body)

        def failed(failure: Any) -> None:
            log.warning("%s was not made: %s", what, failure.getErrorMessage())
            _send(request, 503, b"text/plain; charset=utf-8", f"{what} could not be made\n".encode())

        self.run(work, what).addCallbacks(send, failed)
        return NOT_DONE_YET  # type: ignore[no-any-return]

    def _identify(self, request: Request) -> tuple[Any, str | None]:
        """(the caller's identity, None), or (None, why it is refused)."""
        identities = getattr(self.site, "identities", None)
        if identities is None:
            return None, "this server knows no identities"
        subject = peer_subject(request.channel.transport) if request.isSecure() else None
        try:
            identity = identities.identify(subject)
        except VMShopError as exc:
            return None, f"[{exc.code}] {exc.message}"
        if not identity.has(PLANT, SHOP, ADMIN):
            return None, f"'{identity.name}' is not a plant, shop or admin: only they read this plant's images"
        return identity, None


def _query(request: Request) -> tuple[str | None, bool]:
    """(the owner a request names, whether it asks for every owner's movable images); ValueError for a query
    that is not one ``owner`` (an identity name) and at most one ``movable=1``."""
    args = request.args or {}
    owners = args.get(b"owner", [])
    movable = args.get(b"movable", [])
    if len(owners) > 1 or len(movable) > 1 or (movable and movable != [b"1"]):
        raise ValueError("the query names at most one owner, and movable=1 only")
    if owners and not OWNER_NAME.fullmatch(owners[0].decode("ascii", "replace")):
        raise ValueError("the owner is not an identity name")
    return (owners[0].decode("ascii") if owners else None), bool(movable)


def _send_file(request: Request, path: Path) -> bytes | int:
    """Stream the file at ``path`` (a warehouse's, never one a request names) as the answer, with its length."""
    from twisted.protocols.basic import FileSender

    try:
        handle = open(path, "rb")  # noqa: SIM115 - closed when the transfer ends
        size = os.fstat(handle.fileno()).st_size
    except OSError as exc:
        return _plain(request, 404, f"the file cannot be read: {exc.strerror}")
    request.setResponseCode(200)
    request.setHeader(b"Content-Type", b"application/octet-stream")
    request.setHeader(b"Content-Length", b"%d" % size)
    if request.method == b"HEAD":
        handle.close()
        return b""

    def ended(_: Any) -> None:
        handle.close()
        if not request.finished and not getattr(request, "_disconnected", False):
            request.finish()

    FileSender().beginFileTransfer(handle, request).addBoth(ended)
    return NOT_DONE_YET  # type: ignore[no-any-return]


def _send(request: Request, status: int, content_type: bytes, body: bytes) -> None:
    if request.finished or getattr(request, "_disconnected", False):
        return
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", content_type)
    request.setHeader(b"Content-Length", b"%d" % len(body))
    if request.method != b"HEAD":
        request.write(body)
    request.finish()


def _plain(request: Request, status: int, text: str) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
    return (text + "\n").encode()


__all__ = ["HASH_DEADLINE", "IMAGES_PREFIX", "MOVABLE_QUERY", "ROLES", "HashCache", "ImagesResource", "catalog",
           "image_files", "image_size", "manifest"]
