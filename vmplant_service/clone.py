"""Copy-on-write clones of cached images, and the plant's other disk work with ``qemu-img``.

A clone is a qcow2 overlay whose backing file is the cached image: making
one takes milliseconds whatever the image's size, and the guest's writes go
to the overlay only, so the cached image is never written. The backends that
need more (UML reads raw files, not qcow2) inspect and convert disks with
:func:`image_info`, :func:`has_own_data` and :func:`convert_to_raw`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

from vmshop_common.errors import BackendError


def qemu_img() -> str:
    binary = shutil.which("qemu-img")
    if binary is None:
        raise BackendError("qemu-img is not installed (Debian package qemu-utils)")
    return binary


def make_overlay(base: Path, base_format: str, overlay: Path, size_gib: int | None = None) -> float:
    """Create ``overlay`` backed by ``base``; return the seconds it took.

    ``size_gib`` grows the virtual disk beyond the base's size when larger.
    Raises BackendError (and leaves no overlay) when qemu-img fails.
    """
    overlay.parent.mkdir(parents=True, exist_ok=True)
    command = [qemu_img(), "create", "-q", "-f", "qcow2", "-b", str(Path(base).resolve()), "-F", base_format,
               str(overlay)]
    if size_gib:
        command.append(f"{size_gib}G")
    started = time.monotonic()
    try:
        subprocess.run(command, check=True, capture_output=True, timeout=60)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        overlay.unlink(missing_ok=True)
        detail = getattr(exc, "stderr", b"") or b""
        raise BackendError(f"qemu-img could not clone {base}: {detail.decode(errors='replace').strip()}") from None
    return time.monotonic() - started


def virtual_size_gib(image: Path, image_format: str) -> int:
    """The image's virtual size in GiB, rounded up."""
    import json
    out = subprocess.run([qemu_img(), "info", "--output=json", "-f", image_format, str(image)],
                         check=True, capture_output=True, timeout=60).stdout
    size = int(json.loads(out)["virtual-size"])
    return -(-size // (1024 ** 3))


def image_info(image: Path, image_format: object = None) -> dict[str, object]:
    """``qemu-img info`` of ``image`` (read as ``image_format``; ``None``: probed, only for images the plant
    trusts); BackendError when it cannot be read."""
    command = [qemu_img(), "info", "--output=json"]
    if image_format:
        command += ["-f", str(image_format)]
    command.append(str(image))
    out = _run(command, f"cannot read the disk {image}")
    try:
        info = json.loads(out)
    except ValueError:
        raise BackendError(f"qemu-img info {image} did not answer JSON") from None
    if not isinstance(info, dict):
        raise BackendError(f"qemu-img info {image} did not answer an object")
    return info


def has_own_data(disk: Path) -> bool:
    """Whether the overlay holds clusters of its own (anything written to it after it was made)."""
    out = _run([qemu_img(), "map", "--output=json", "-f", "qcow2", str(disk)], f"cannot map the disk {disk}")
    try:
        extents = json.loads(out)
    except ValueError:
        return True
    return any(isinstance(e, dict) and e.get("depth") == 0 and e.get("present") for e in extents)


def convert_to_raw(source: Path, target: Path, source_format: object, purpose: str = "") -> None:
    """Write ``source`` (of ``source_format``; ``None``: probed, only for images the plant trusts) to ``target`` as
    a raw (sparse) image; BackendError naming ``purpose`` when qemu-img fails."""
    command = [qemu_img(), "convert", "-q", "-O", "raw"]
    if source_format:
        command += ["-f", str(source_format)]
    _run([*command, str(source), str(target)], f"cannot convert the disk {source}" + (f" {purpose}" if purpose else ""))


def _run(command: list[str], what: str) -> bytes:
    """The output of a qemu-img ``command`` (600 s at most); BackendError starting with ``what`` if it fails."""
    try:
        done = subprocess.run(command, capture_output=True, timeout=600, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BackendError(f"{what}: {exc}") from None
    if done.returncode != 0:
        raise BackendError(f"{what}: {done.stderr.decode(errors='replace').strip()}")
    return done.stdout
