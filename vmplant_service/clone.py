"""Copy-on-write clones of cached images.

A clone is a qcow2 overlay whose backing file is the cached image: making
one takes milliseconds whatever the image's size, and the guest's writes go
to the overlay only, so the cached image is never written.
"""

from __future__ import annotations

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
