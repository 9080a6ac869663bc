"""The plant's disk work with qemu-img (vmplant_service.clone): clones, inspection, conversion to raw.

One implementation, shared by the backends: UML's disk preparation uses
these very functions. Needs qemu-img (scripts/setup_host.sh installs it), no guest.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vmplant_service import clone
from vmplant_service.backends.uml import disk as uml_disk
from vmshop_common.errors import BackendError


def _base(tmp_path: Path) -> Path:
    base = tmp_path / "base.raw"
    with open(base, "wb") as handle:
        handle.write(b"VMSHOP" * 1000)
        handle.truncate(4 * 1024 * 1024)
    return base


def test_uml_uses_the_plants_one_implementation() -> None:
    assert uml_disk.convert_to_raw is clone.convert_to_raw
    assert uml_disk.image_info is clone.image_info
    assert uml_disk.has_own_data is clone.has_own_data


def test_a_clone_is_inspected_and_converted_to_raw(tmp_path: Path) -> None:
    base = _base(tmp_path)
    overlay = tmp_path / "vm" / "disk.qcow2"
    clone.make_overlay(base, "raw", overlay)
    info = clone.image_info(overlay, "qcow2")
    assert info["format"] == "qcow2" and info["virtual-size"] == 4 * 1024 * 1024
    assert Path(str(info.get("full-backing-filename") or info["backing-filename"])) == base.resolve()
    assert clone.has_own_data(overlay) is False  # a fresh clone holds nothing of its own
    raw = tmp_path / "copy.raw"
    clone.convert_to_raw(overlay, raw, "qcow2", "for a test")
    assert raw.read_bytes() == base.read_bytes()


def test_failures_are_backend_errors_that_say_what_and_why(tmp_path: Path) -> None:
    not_an_image = tmp_path / "nothing.qcow2"
    not_an_image.write_bytes(b"not qcow2")
    with pytest.raises(BackendError, match="cannot read the disk .*nothing.qcow2"):
        clone.image_info(not_an_image, "qcow2")
    with pytest.raises(BackendError, match="cannot convert the disk .*nothing.qcow2 for UML"):
        clone.convert_to_raw(not_an_image, tmp_path / "out.raw", "qcow2", "for UML")
