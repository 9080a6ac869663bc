"""cloud-init NoCloud seeds: the per-VM ``cidata`` disk of an image that declares cloud-init.

A seed is an ISO 9660 image (Rock Ridge and Joliet names, volume label
``CIDATA``, which cloud-init's NoCloud data source looks for) holding:

- ``meta-data``: ``instance-id`` (the VM's key: a new key is a new instance,
  so first-boot modules run once per VM) and ``local-hostname``;
- ``network-config`` (version 2): the user-mode NIC by DHCP, and the NIC on
  the owner's segment with the VM's pool address, each matched by its MAC;
- ``user-data``: the DAG's ``<cloud-config>``, or an empty cloud-config.

Everything in it is the plant's own data or the DAG's (already validated and
size-limited), never anything a guest said; the YAML documents are written as
JSON (JSON is YAML), so no value can break out of its string. The plant
writes the seed with :func:`write_seed` to a file only it can read (0600,
created exclusively, never through a link), attaches it read-only and
removes it with the VM's other files.
"""

from __future__ import annotations

import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

#: The volume label NoCloud looks for (it also accepts "cidata").
VOLUME_LABEL = "CIDATA"
#: The most bytes of user data a seed takes (the DAG's <cloud-config> is at most 65536 characters).
MAX_USER_DATA = 4 * 65536
EMPTY_USER_DATA = "#cloud-config\n{}\n"
_HOSTNAME_CHARS = re.compile(r"[^a-z0-9-]+")


@dataclass(frozen=True)
class SeedNic:
    """A NIC the network-config names: by MAC; ``address`` (with ``prefix``) static, else DHCP."""

    name: str
    mac: str
    address: str | None = None
    prefix: int = 24
    gateway: str | None = None


def hostname_for(text: str) -> str:
    """A valid host name (RFC 1123 label, at most 63 characters) made from ``text`` (a VM key or a DAG's name)."""
    label = _HOSTNAME_CHARS.sub("-", text.lower()).strip("-")[:63].strip("-")
    return label or "vm"


def meta_data(instance_id: str, hostname: str) -> str:
    return json.dumps({"instance-id": instance_id, "local-hostname": hostname}, indent=1) + "\n"


def network_config(nics: list[SeedNic]) -> str:
    """Network config version 2 (cloud-init's netplan-like form) for ``nics``."""
    ethernets: dict[str, dict[str, object]] = {}
    for nic in nics:
        entry: dict[str, object] = {"match": {"macaddress": nic.mac}}
        if nic.address is None:
            entry["dhcp4"] = True
        else:
            entry["dhcp4"] = False
            entry["addresses"] = [f"{nic.address}/{nic.prefix}"]
            if nic.gateway:
                entry["gateway4"] = nic.gateway
        ethernets[nic.name] = entry
    return json.dumps({"version": 2, "ethernets": ethernets}, indent=1) + "\n"


def seed_files(instance_id: str, hostname: str, nics: list[SeedNic], user_data: str | None) -> dict[str, bytes]:
    """The seed's files by name."""
    data = (user_data if user_data is not None else EMPTY_USER_DATA).encode()
    if len(data) > MAX_USER_DATA:
        raise ValueError(f"the user data is {len(data)} bytes; a seed takes at most {MAX_USER_DATA}")
    return {"meta-data": meta_data(instance_id, hostname).encode(),
            "network-config": network_config(nics).encode(),
            "user-data": data}


def iso_bytes(files: dict[str, bytes]) -> bytes:
    """An ISO 9660 image (Rock Ridge, Joliet) labelled CIDATA holding ``files`` in its root."""
    import pycdlib

    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident=VOLUME_LABEL)
    try:
        for index, (name, content) in enumerate(sorted(files.items())):
            iso.add_fp(io.BytesIO(content), len(content), f"/F{index}.;1", rr_name=name, joliet_path=f"/{name}")
        out = io.BytesIO()
        iso.write_fp(out)
        return out.getvalue()
    finally:
        iso.close()


def write_seed(path: Path, instance_id: str, hostname: str, nics: list[SeedNic], user_data: str | None) -> None:
    """Write the VM's seed to ``path``: a new file (0600, never through a link; FileExistsError if it exists)."""
    image = iso_bytes(seed_files(instance_id, hostname, nics, user_data))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            fd = -1
            handle.write(image)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        if fd >= 0:
            os.close(fd)
        path.unlink(missing_ok=True)
        raise


def read_seed(path: Path) -> dict[str, bytes]:
    """The files of a seed by their Rock Ridge names (for tests and ``vmplant check-image``)."""
    import pycdlib

    iso = pycdlib.PyCdlib()
    iso.open(str(path))
    try:
        found: dict[str, bytes] = {}
        for child in iso.list_children(rr_path="/"):
            if child.is_file():
                name = child.rock_ridge.name().decode()
                out = io.BytesIO()
                iso.get_file_from_iso_fp(out, rr_path=f"/{name}")
                found[name] = out.getvalue()
        return found
    finally:
        iso.close()


__all__ = ["EMPTY_USER_DATA", "MAX_USER_DATA", "VOLUME_LABEL", "SeedNic", "hostname_for", "iso_bytes", "meta_data",
           "network_config", "read_seed", "seed_files", "write_seed"]
