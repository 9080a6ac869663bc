"""Helpers to build a :class:`~vmplant_service.plant.Plant` on the fake backend in a temporary directory.

What a test gets from :func:`make_plant`:

- a tiny warehouse: one image ``base`` (128 MiB, 1 GiB, x86_64) whose disk is
  a real, empty qcow2 (``qemu-img create -f qcow2 disk.qcow2 1G``) and whose
  DAG is a blank start plus one script ``os``; the plant clones it with
  ``qemu-img`` (real overlays);
- optionally an ``ip.txt`` pool (:func:`vmplant_service.ippool.write_pool`)
  with real per-owner VDE switches (:class:`OwnerSegments`, stopped by
  :func:`shutdown_plant`), so network actions render;
- optionally a data store with one source, ``appdata``;
- :class:`PlantConfig`, :class:`PlantRecords` and a fake backend from
  :func:`load_backend`.

:func:`restart_plant` builds a second plant over the same state directory,
records and pool with a NEW backend instance (a plant restart);
:func:`shutdown_plant` ends every fake guest a backend still runs and closes
the records. DAG documents are written with :func:`vm_xml` and the node
helpers below.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from vmplant_service.backends import load_backend
from vmplant_service.backends.base import Backend
from vmplant_service.config import PlantConfig
from vmplant_service.ippool import IPPool, write_pool
from vmplant_service.plant import Plant
from vmplant_service.records import PlantRecords
from vmplant_service.segment import OwnerSegments, default_switch_dir
from vmplant_service.warehouse import Warehouse

IMAGE = "base"
IMAGE_MEMORY = 128
OS_SCRIPT = "#vmshop-os: test base 1"
NETWORK = ipaddress.IPv4Network("10.77.0.0/24")
DATA_SOURCE = "appdata"
#: Fake guests boot fast: the tests wait for their agents, never for a clock.
FAST_BOOT = "0.01"

IMAGE_XML = """<?xml version="1.0" encoding="UTF-8"?>
<image xmlns="urn:vmshop:image:1" name="{name}">
  <disk file="disk.qcow2" format="qcow2"/>
  <hardware memory="{memory}" vcpus="1" disk="1" arch="x86_64"/>
  <dag xmlns="urn:vmshop:dag:1">
    <nodes>
      <blank id="hw" memory="{memory}" vcpus="1" disk="1" arch="x86_64"/>
      <script id="os">{os}</script>
    </nodes>
    <edges><edge from="hw" to="os"/></edges>
  </dag>
</image>
"""


def qemu_img() -> str:
    binary = shutil.which("qemu-img")
    if binary is None:
        raise RuntimeError("qemu-img is not installed (Debian package qemu-utils): the plant clones with it")
    return binary


def make_warehouse(directory: Path, name: str = IMAGE, memory: int = IMAGE_MEMORY) -> Path:
    """A warehouse directory holding one image whose disk is a real (empty) 1 GiB qcow2; returns the directory."""
    image_dir = directory / name
    image_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run([qemu_img(), "create", "-q", "-f", "qcow2", str(image_dir / "disk.qcow2"), "1G"],
                   check=True, capture_output=True, timeout=60)
    config = image_dir / "image.xml"
    config.write_text(IMAGE_XML.format(name=name, memory=memory, os=OS_SCRIPT), encoding="utf-8")
    (directory / "index.txt").write_text(f"{config.resolve()}\n", encoding="utf-8")
    return directory


def qemu_img_info(path: Path) -> dict[str, Any]:
    """``qemu-img info --output=json`` of ``path`` (without opening its backing chain)."""
    out = subprocess.run([qemu_img(), "info", "--output=json", "-U", str(path)],
                         check=True, capture_output=True, timeout=60).stdout
    return json.loads(out)  # type: ignore[no-any-return]


@dataclass
class PlantParts:
    """Where a test plant keeps its files (all under one temporary root)."""

    root: Path
    warehouse_dir: Path
    state_dir: Path
    ip_file: Path | None
    datastore: Path | None
    segments: OwnerSegments | None
    config: PlantConfig
    backends: list[Backend] = field(default_factory=list)
    records: list[PlantRecords] = field(default_factory=list)


def make_plant(root: Path, *, backend: str = "fake", backend_options: dict[str, str] | None = None,
               pool_size: int | None = 4, datastore: bool = True, capacity_vms: int = 8,
               capacity_memory: int = 4096, name: str = "test-plant") -> tuple[Plant, PlantParts]:
    """A plant on the fake backend under ``root``; ``pool_size`` None: no pool and no segment."""
    root.mkdir(parents=True, exist_ok=True)
    warehouse_dir = make_warehouse(root / "warehouse")
    state_dir = root / "state"
    ip_file = None
    segments = None
    if pool_size is not None:
        ip_file = write_pool(root / "ip.txt", NETWORK, 10, pool_size, "vmbr0", root / "shares")
        segments = OwnerSegments(default_switch_dir(state_dir))
    store = None
    if datastore:
        store = root / "data"
        (store / DATA_SOURCE).mkdir(parents=True)
        (store / DATA_SOURCE / "input.txt").write_text("data\n")
    options = {"boot_seconds": FAST_BOOT, **(backend_options or {})}
    config = PlantConfig(name=name, listen_host="127.0.0.1", listen_port=0, public_url="",
                         warehouse_dir=warehouse_dir, state_dir=state_dir, backend=backend,
                         backend_options=options, network_mode="vde" if ip_file else "none", ip_file=ip_file,
                         switch_dir=default_switch_dir(state_dir) if ip_file else None, capacity_vms=capacity_vms,
                         capacity_memory=capacity_memory, datastore=store)
    parts = PlantParts(root=root, warehouse_dir=warehouse_dir, state_dir=state_dir, ip_file=ip_file,
                       datastore=store, segments=segments, config=config)
    return _build(parts, backend), parts


def _build(parts: PlantParts, backend_name: str) -> Plant:
    config = parts.config
    backend = load_backend(backend_name, dict(config.backend_options))
    records = PlantRecords(config.records_path)
    parts.backends.append(backend)
    parts.records.append(records)
    pool = IPPool(parts.ip_file) if parts.ip_file is not None else None
    return Plant(config, backend, records, Warehouse(parts.warehouse_dir), pool, parts.segments)


def restart_plant(old: Plant, parts: PlantParts) -> Plant:
    """A new plant over ``old``'s state directory, records database and pool, with a NEW backend instance.

    The old plant's records are closed (a restarted process has its own
    connection); its backend is left as it is (its guests live on, as a
    daemonized QEMU outlives the plant).
    """
    old.records.close()
    old.backend.close()  # a dead plant's connections to its guests are gone too
    return _build(parts, parts.config.backend)


def shutdown_plant(parts: PlantParts) -> None:
    """End every fake guest any backend of ``parts`` still runs, and close every records database."""
    for backend in parts.backends:
        for vm_id in backend.running():
            try:
                backend.destroy(vm_id)
            except Exception:  # noqa: BLE001 - teardown goes on
                pass
        backend.close()
    for records in parts.records:
        records.close()
    if parts.segments is not None:
        parts.segments.stop_all()


# DAG documents -------------------------------------------------------------------


def _attrs(**attributes: object) -> str:
    return "".join(f" {k.rstrip('_').replace('_', '-')}={quoteattr(str(v))}"
                   for k, v in attributes.items() if v is not None)


def image_start(node_id: str = "base", name: str = IMAGE, memory: int | None = None) -> str:
    return f"<image{_attrs(id=node_id, name=name, memory=memory)}/>"


def blank(node_id: str = "hw", memory: int = IMAGE_MEMORY, disk: int = 1, arch: str = "x86_64",
          vcpus: int = 1) -> str:
    return f"<blank{_attrs(id=node_id, memory=memory, vcpus=vcpus, disk=disk, arch=arch)}/>"


def script(node_id: str, body: str = "", cost: float | None = None, timeout: int | None = None) -> str:
    body = body or f"echo {node_id}"
    return f"<script{_attrs(id=node_id, cost=cost, timeout=timeout)}>{escape(body)}</script>"


def file_node(node_id: str, path: str, content: str = "x") -> str:
    return f"<file{_attrs(id=node_id, path=path)}>{escape(content)}</file>"


def network(node_id: str = "net") -> str:
    return f"<network{_attrs(id=node_id)}/>"


def mount(node_id: str = "data", source: str = DATA_SOURCE, target: str = "/srv/data") -> str:
    return f"<mount{_attrs(id=node_id, source=source, target=target)}/>"


def vm_xml(nodes: list[str], edges: list[tuple[str, str]] = (), attributes: dict[str, str] | None = None,  # type: ignore[assignment]
           name: str = "test") -> str:
    """A ``<vm>`` request document."""
    attrs = ""
    if attributes:
        attrs = "<attributes>" + "".join(f"<attribute{_attrs(name=k, value=v)}/>" for k, v in attributes.items()) \
            + "</attributes>"
    edge_xml = "<edges>" + "".join(f'<edge from="{a}" to="{b}"/>' for a, b in edges) + "</edges>" if edges else ""
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<vm xmlns="urn:vmshop:dag:1" name="{name}">\n'
            f"{attrs}\n<nodes>\n" + "\n".join(nodes) + f"\n</nodes>\n{edge_xml}\n</vm>\n")


def chain(*nodes: str, start: str | None = None, attributes: dict[str, str] | None = None) -> str:
    """A request: ``start`` (default: a clone of the image) then ``nodes`` one after the other.

    Each node's id is read from its ``id="..."``.
    """
    start = start or image_start()
    all_nodes = [start, *nodes]
    ids = [_node_id(n) for n in all_nodes]
    return vm_xml(all_nodes, list(zip(ids, ids[1:], strict=False)), attributes)


def _node_id(node: str) -> str:
    marker = ' id="'
    begin = node.index(marker) + len(marker)
    return node[begin:node.index('"', begin)]
