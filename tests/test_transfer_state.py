"""Saved running states move with their images (vmplant_service/transfer.py), with real plant servers on the fake
backend over mutual TLS.

p1 (identity ``plant``) holds tiny and ``diskboot`` (an installer's image with no ``<boot>``: it boots from its
disk, so no file of the host enters a clone's machine model) and publishes public images with their state:
``saved`` from a VM of diskboot, ``tinysaved`` from a VM of tiny (its image boots tiny's kernel by path). p2
(identity ``plant2``, the same configuration otherwise) fetches them:

- ``saved``: a clone on p2 runs as the very machine the state was saved for: the state is fetched, checked
  (sha256) and kept, and p2's clone resumes from it;
- ``tinysaved``: the fetched image boots its own copy of the kernel, another path, so another machine model here:
  the state is dropped (a clone boots);
- p3 (backend option resume=off) never fetches a state.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from lxml import etree
from pki import test_pki
from servers import ServerProcess, start_plant, wait_for

from vmshop_common.dagxml import DAG_NS

pytestmark = pytest.mark.integration

IMAGE_NS = "urn:vmshop:image:1"


def dag(*bodies: str, image: str = "tiny") -> str:
    nodes = "".join(f'<script id="s{n}">{body}</script>' for n, body in enumerate(bodies, start=1))
    ids = ["start"] + [f"s{n}" for n in range(1, len(bodies) + 1)]
    edges = "".join(f'<edge from="{a}" to="{b}"/>' for a, b in zip(ids, ids[1:], strict=False))
    return (f'<vm xmlns="{DAG_NS}"><nodes><image id="start" name="{image}"/>{nodes}</nodes>'
            f"<edges>{edges}</edges></vm>")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def diskboot(base: Path, warehouse_dir: Path) -> Path:
    """An installer's image like tiny but without <boot> (the fake backend boots nothing anyway)."""
    directory = base / "diskboot"
    directory.mkdir()
    shutil.copy(warehouse_dir / "tiny" / "disk.qcow2", directory / "disk.qcow2")
    root = etree.parse(str(warehouse_dir / "tiny" / "image.xml")).getroot()
    root.set("name", "diskboot")
    root.remove(root.find(f"{{{IMAGE_NS}}}boot"))
    for script in root.iter(f"{{{DAG_NS}}}script"):
        script.text = "#vmshop-os: tiny busybox linux 1, booted from its disk"
    (directory / "image.xml").write_bytes(etree.tostring(root, xml_declaration=True, encoding="UTF-8"))
    return directory / "image.xml"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, warehouse_dir: Path) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("state-transfer")
    pki = test_pki()
    made: dict[str, Any] = {"base": base}
    try:
        tiny = (warehouse_dir / "tiny" / "image.xml").resolve()
        own = diskboot(base, warehouse_dir)
        for name in ("p1", "p2", "p3"):
            (base / f"{name}-warehouse").mkdir()
            (base / f"{name}-warehouse" / "index.txt").write_text(f"{tiny}\n" + (f"{own}\n" if name == "p1" else ""))
        metrics = {"boot_seconds": 1.0, "clone_seconds": 0.02}
        p1 = made["p1"] = start_plant(base / "p1", base / "p1-warehouse", name="p1", backend="fake", network="none",
                                      identity="plant", metrics=metrics)
        pki.plant_mapfile(p1.mapfile, [f'"{pki.subject("plant2")}" plant2 plant',
                                       f'"{pki.subject("plant")}" plant plant'])
        p1.stop()
        p1.start()
        p1.client()
        for image, body, start in (("saved", "echo saved > /s", "diskboot"), ("tinysaved", "echo t > /t", "tiny")):
            vm = p1.service.createVM(dag=dag(body, image=start), owner="alice", vm_id=f"for-{image}", max_cost=None)
            made_image = p1.service.publishVM(vm_id=vm.vm.vm_id, image=image, owner="alice", is_public=True,
                                              with_state=True)
            assert made_image.with_state is True
            p1.service.collectVM(vm_id=vm.vm.vm_id)
        # diskboot is fetched as saved's parent: p2 lacks it.
        flags = ["--peer", p1.url, "--cache-size", "1024", "--peers-refresh", "0.5"]
        made["p2"] = start_plant(base / "p2", base / "p2-warehouse", name="p2", backend="fake", network="none",
                                 identity="plant2", metrics=metrics, flags=flags)
        made["p3"] = start_plant(base / "p3", base / "p3-warehouse", name="p3", backend="fake", network="none",
                                 identity="plant", metrics=metrics, flags=flags,
                                 backend_options={"resume": "off"})
        yield made
    finally:
        for server in made.values():
            if isinstance(server, ServerProcess):
                server.cleanup()


def published(site: dict[str, Any], image: str) -> Path:
    return Path(site["base"] / "p1-warehouse" / "published" / "p1" / image)


def fetched(site: dict[str, Any], plant: str, image: str) -> Path:
    return Path(site["base"] / f"{plant}-warehouse" / "fetched" / plant / image)


def test_the_state_is_served_as_a_role_of_its_image(site: dict[str, Any]) -> None:
    p1 = site["p1"]
    plant2 = test_pki().session("plant2")
    manifest = plant2.get(f"{p1.url}images/saved/manifest", timeout=30).json()
    state = next(f for f in manifest["files"] if f["role"] == "state")
    assert state["sha256"] == sha256(published(site, "saved") / "state.bin")
    assert plant2.get(f"{p1.url}images/saved/state", timeout=30).content == \
        (published(site, "saved") / "state.bin").read_bytes()
    catalog = plant2.get(f"{p1.url}images/catalog", timeout=30).json()
    size = next(e["size"] for e in catalog["images"] if e["name"] == "saved")
    assert size == sum(f["size"] for f in manifest["files"])  # the bid is priced on the state's bytes too
    assert plant2.get(f"{p1.url}images/diskboot/state", timeout=30).status_code == 404  # it has none


def test_a_state_saved_for_this_plants_machine_is_fetched_checked_and_resumed(site: dict[str, Any]) -> None:
    p2 = site["p2"]
    wanted = dag("echo saved > /s", "echo more", image="diskboot")
    wait_for(lambda: p2.service.estimateCost(dag=wanted, owner="bob").image == "saved", what="p2 to know 'saved'")
    made = p2.service.createVM(dag=wanted, owner="bob", vm_id="resumed", max_cost=None)
    assert made.estimate.image == "saved" and made.vm.state == "running"
    copy = fetched(site, "p2", "saved")
    assert sha256(copy / "state") == sha256(published(site, "saved") / "state.bin")
    assert (copy / "state").stat().st_mode & 0o077 == 0  # the guest's memory: the plant's only
    state = etree.parse(str(copy / "image.xml")).getroot().find(f"{{{IMAGE_NS}}}state")
    original = etree.parse(str(published(site, "saved") / "image.xml")).getroot().find(f"{{{IMAGE_NS}}}state")
    assert state is not None and original is not None
    assert (state.get("file"), state.get("model"), state.get("macs")) == \
        ("state", original.get("model"), original.get("macs"))
    assert "VM resumed resumed from image saved's saved state" in p2.output()
    p2.service.collectVM(vm_id="resumed")


def test_a_state_saved_for_another_machine_is_dropped_and_clones_boot(site: dict[str, Any]) -> None:
    p2 = site["p2"]
    wanted = dag("echo t > /t", "echo more")
    wait_for(lambda: p2.service.estimateCost(dag=wanted, owner="bob").image == "tinysaved",
             what="p2 to know 'tinysaved'")
    made = p2.service.createVM(dag=wanted, owner="bob", vm_id="booted", max_cost=None)
    assert made.estimate.image == "tinysaved" and made.vm.state == "running"
    copy = fetched(site, "p2", "tinysaved")
    assert not (copy / "state").exists()
    assert etree.parse(str(copy / "image.xml")).getroot().find(f"{{{IMAGE_NS}}}state") is None
    assert "image tinysaved: its saved state was made for machine" in p2.output()
    assert "VM booted resumed" not in p2.output()
    p2.service.collectVM(vm_id="booted")


def test_a_plant_that_cannot_resume_never_fetches_a_state(site: dict[str, Any]) -> None:
    p3 = site["p3"]
    wanted = dag("echo saved > /s", image="diskboot")
    wait_for(lambda: p3.service.estimateCost(dag=wanted, owner="bob").image == "saved", what="p3 to know 'saved'")
    made = p3.service.createVM(dag=wanted, owner="bob", vm_id="on-p3", max_cost=None)
    assert made.estimate.image == "saved"
    copy = fetched(site, "p3", "saved")
    assert (copy / "disk").exists() and not (copy / "state").exists()
    assert etree.parse(str(copy / "image.xml")).getroot().find(f"{{{IMAGE_NS}}}state") is None
    p3.service.collectVM(vm_id="on-p3")


def test_a_state_and_its_manifest_must_agree(tmp_path: Path, warehouse_dir: Path) -> None:
    """Unit: a manifest listing a state the configuration lacks is refused; a configuration naming a state that was
    not fetched loses it (clones boot)."""
    from vmplant_service.transfer import RemoteImage, Transfers
    from vmplant_service.warehouse import Warehouse
    from vmshop_common.dag import Hardware
    from vmshop_common.dagxml import load_dag
    from vmshop_common.errors import TransferFailedError
    from vmshop_common.guest import GuestTraits

    (tmp_path / "index.txt").write_text(f"{(warehouse_dir / 'tiny' / 'image.xml').resolve()}\n")
    transfers = Transfers(Warehouse(tmp_path), "p", [], None, None, cache_bytes=0, bandwidth=1.0, in_use=set)
    image = RemoteImage("https://peer/", "img", "tiny", 100, load_dag(dag("echo x")), Hardware(128, 1, 1),
                        GuestTraits())
    config = (f'<image xmlns="{IMAGE_NS}" name="img"><disk file="d" format="qcow2"/>'
              f'<hardware memory="128" disk="1"/>{{state}}'
              f'<dag xmlns="{DAG_NS}"><nodes><image id="b" name="tiny"/><script id="s">echo x</script></nodes>'
              f'<edges><edge from="b" to="s"/></edges></dag></image>')
    stateless = config.replace("{state}", "").encode()
    with pytest.raises(TransferFailedError, match="saved state its configuration lacks"):
        transfers._rewrite_config(image, stateless, "qcow2", {"config": {}, "disk": {}, "state": {}})
    stateful = config.replace("{state}", '<state file="/etc/shadow" model="m" macs=""/>').encode()
    dropped = etree.fromstring(transfers._rewrite_config(image, stateful, "qcow2", {"config": {}, "disk": {}}))
    assert dropped.find(f"{{{IMAGE_NS}}}state") is None
    kept = etree.fromstring(transfers._rewrite_config(image, stateful, "qcow2", {"config": {}, "disk": {},
                                                                                   "state": {}}))
    assert kept.find(f"{{{IMAGE_NS}}}state").get("file") == "state"  # the fetched file, never the peer's path
