"""Images that move between plants (vmplant_service/transfer.py), with real plant servers on the fake backend over
mutual TLS.

p1 (identity ``plant``) holds the tiny image and publishes public images from VMs it made; p2 (identity
``plant2``) holds tiny only and lists p1 and a plain HTTPS warehouse server (``mirror``: the same layout, served
by Python's http.server with client certificates required) as its peers, with a cache of 0 MiB (every fetched
image not in use is evicted after the next fetch). The mirror serves copies of p1's image under other names,
some of them lying about their bytes. A shop prices from p2's offer.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import logging
import shutil
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import zeep.exceptions
from lxml import etree
from pki import test_pki
from servers import ServerProcess, fault_code, host_port, start_plant, start_shop, wait_for

from vmplant_service.transfer import evictable
from vmshop_common.dagxml import DAG_NS

pytestmark = pytest.mark.integration


def dag(*bodies: str, image: str = "tiny") -> str:
    nodes = "".join(f'<script id="s{n}">{body}</script>' for n, body in enumerate(bodies, start=1))
    ids = ["start"] + [f"s{n}" for n in range(1, len(bodies) + 1)]
    edges = "".join(f'<edge from="{a}" to="{b}"/>' for a, b in zip(ids, ids[1:], strict=False))
    return (f'<vm xmlns="{DAG_NS}"><nodes><image id="start" name="{image}"/>{nodes}</nodes>'
            f"<edges>{edges}</edges></vm>")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Mirror:
    """A plain HTTPS warehouse server: files under ``root``, client certificates required (the test CA)."""

    def __init__(self, root: Path) -> None:
        pki = test_pki()
        directory = str(root)

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, directory=directory, **kwargs)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
                pass

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(pki.cert("plant")), str(pki.key("plant")))
        context.load_verify_locations(str(pki.ca))
        context.verify_mode = ssl.CERT_REQUIRED
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


def copy_image(source: ServerProcess, name: str, as_name: str, tree: Path, lie: dict[str, Any] | None = None) -> None:
    """Serve p1's image ``name`` from the mirror as ``as_name`` (its configuration renamed), with its manifest;
    ``lie``: what the manifest says instead of the truth ({"disk": {"sha256": ...}})."""
    session = test_pki().session("plant2")
    manifest = session.get(f"{source.url}images/{name}/manifest", timeout=30).json()
    directory = tree / "images" / as_name
    directory.mkdir(parents=True)
    files = []
    for entry in manifest["files"]:
        data = session.get(f"{source.url}images/{name}/{entry['role']}", timeout=30).content
        if entry["role"] == "config":  # renamed, and embodying a step of its own (the disk is app's: the fake
            root = etree.fromstring(data)  # backend never boots it)
            root.set("name", as_name)
            for node in root.iter(f"{{{DAG_NS}}}script"):
                node.text = f"echo {as_name}"
            data = etree.tostring(root, xml_declaration=True, encoding="UTF-8")
        (directory / entry["role"]).write_bytes(data)
        files.append({"role": entry["role"], "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                      **(lie or {}).get(entry["role"], {})})
    (directory / "manifest").write_text(json.dumps({**manifest, "name": as_name, "files": files}))
    catalog_path = tree / "images" / "catalog"
    catalog = json.loads(catalog_path.read_text()) if catalog_path.exists() else {"images": []}
    catalog["images"].append({"name": as_name, "parent": manifest["parent"],
                              "size": sum(f["size"] for f in files),
                              "config": (directory / "config").read_text()})
    catalog_path.write_text(json.dumps(catalog))


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, warehouse_dir: Path) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("transfer")
    pki = test_pki()
    made: dict[str, Any] = {}
    mirror = None
    try:
        tiny = (warehouse_dir / "tiny" / "image.xml").resolve()
        for name in ("p1", "p2"):
            (base / f"{name}-warehouse").mkdir()
            (base / f"{name}-warehouse" / "index.txt").write_text(f"{tiny}\n")
        made["p1"] = start_plant(base / "p1", base / "p1-warehouse", name="p1", backend="fake", network="none",
                                 identity="plant", metrics={"boot_seconds": 1.0, "clone_seconds": 0.02})
        # p1 serves plant2 (a plant) its public images; alice (a user) is mapped too, and refused.
        p1 = made["p1"]
        pki.plant_mapfile(p1.mapfile, [f'"{pki.subject("plant2")}" plant2 plant'])
        p1.stop()
        p1.start()
        p1.client()
        admin = p1.service
        for image, body in (("app", "echo app > /app"), ("appb", "echo b > /b"), ("secret", "echo s > /s")):
            made_vm = admin.createVM(dag=dag(body), owner="alice", vm_id=f"for-{image}", max_cost=None)
            admin.publishVM(vm_id=made_vm.vm.vm_id, image=image, owner="alice", is_public=image != "secret")
        tree = base / "mirror"
        copy_image(p1, "app", "mirrored", tree)
        copy_image(p1, "app", "lying", tree, lie={"disk": {"sha256": "0" * 64}})
        copy_image(p1, "app", "oversized", tree, lie={"disk": {"size": 1000}})
        copy_image(p1, "app", "badsize", tree, lie={"config": {"size": 10}})
        copy_image(p1, "app", "swapped", tree)  # its catalog describes another DAG than the image it serves
        copy_image(p1, "app", "inflated", tree)  # its catalog says it is far smaller than it is
        catalog = json.loads((tree / "images" / "catalog").read_text())
        for entry in catalog["images"]:
            if entry["name"] == "swapped":
                entry["config"] = entry["config"].replace("echo swapped", "echo promised")
            if entry["name"] == "inflated":
                entry["size"] = 1000
        (tree / "images" / "catalog").write_text(json.dumps(catalog))
        mirror = Mirror(tree)
        made["mirror"] = mirror
        made["p2"] = start_plant(base / "p2", base / "p2-warehouse", name="p2", backend="fake", network="none",
                                 identity="plant2", metrics={"boot_seconds": 1.0, "clone_seconds": 0.02},
                                 flags=["--peer", p1.url, "--peer", mirror.url, "--cache-size", "0",
                                        "--bandwidth", "100", "--peers-refresh", "0.5"])
        made["shop"] = start_shop(base / "shop", [host_port(made["p2"])])
        made["base"] = base
        yield made
    finally:
        for server in made.values():
            if isinstance(server, ServerProcess):
                server.cleanup()
        if mirror is not None:
            mirror.close()


def p2_index(site: dict[str, Any]) -> str:
    return str((site["base"] / "p2-warehouse" / "index.txt").read_text())


def fetched_dir(site: dict[str, Any]) -> Path:
    return Path(site["base"] / "p2-warehouse" / "fetched" / "p2")


def test_only_plants_shops_and_admins_read_images_and_only_public_ones(site: dict[str, Any]) -> None:
    p1 = site["p1"]
    catalog = test_pki().session("plant2").get(f"{p1.url}images/catalog", timeout=30)
    assert catalog.status_code == 200
    names = {entry["name"] for entry in catalog.json()["images"]}
    assert names == {"tiny", "app", "appb"}  # 'secret' is private: not served
    as_user = test_pki().session("alice").get(f"{p1.url}images/catalog", timeout=30)
    assert as_user.status_code == 403 and "not a plant" in as_user.text
    assert test_pki().session("alice").get(f"{p1.url}images/app/disk", timeout=30).status_code == 403
    with pytest.raises(requests.exceptions.RequestException):
        test_pki().session(None).get(f"{p1.url}images/catalog", timeout=30)
    plant2 = test_pki().session("plant2")
    assert plant2.get(f"{p1.url}images/secret/manifest", timeout=30).status_code == 404
    for path in ("images/..%2f..%2fetc/passwd", "images/app/..%2F..%2Fx", "images/app%2Fdisk", "images/.hidden/disk",
                 "images/app/shadow", "images/tiny/disk/x"):
        assert plant2.get(f"{p1.url}{path}", timeout=30).status_code == 404
    manifest = plant2.get(f"{p1.url}images/app/manifest", timeout=30).json()
    disk = next(f for f in manifest["files"] if f["role"] == "disk")
    published = site["base"] / "p1-warehouse" / "published" / "p1" / "app" / "disk.qcow2"
    assert (disk["size"], disk["sha256"]) == (published.stat().st_size, sha256(published))
    assert manifest["parent"] == "tiny"


def test_the_bid_includes_the_transfer_and_the_shop_prices_it_the_same(site: dict[str, Any]) -> None:
    p2 = site["p2"]
    wanted = dag("echo app > /app", "echo more > /more")
    at_plant = wait_for(lambda: (e := p2.service.estimateCost(dag=wanted, owner="alice")).image == "app" and e,
                        what="p2 to bid with p1's image")
    fetch = [item for item in at_plant.items if item.source == "transfer"]
    published = site["base"] / "p1-warehouse" / "published" / "p1" / "app"
    assert len(fetch) == 1 and fetch[0].label == "fetch app" and fetch[0].seconds > 0
    alice = site["shop"].service_as("alice")
    at_shop = wait_for(lambda: (e := alice.estimateCost(dag=wanted)).image == "app" and e,
                       what="the shop to price p2's offer with p1's image")
    assert at_shop.bids[0].source == "offer"
    assert at_shop.cost == pytest.approx(at_plant.cost)
    assert [(i.label, i.seconds, i.source) for i in at_shop.items] == \
        [(i.label, i.seconds, i.source) for i in at_plant.items]
    assert published.is_dir()


def test_two_creates_fetch_once_and_the_image_is_the_same(site: dict[str, Any]) -> None:
    p2 = site["p2"]
    wait_for(lambda: p2.service.estimateCost(dag=dag("echo app > /app"), owner="alice").image == "app",
             what="p2 to know p1's image")
    results: dict[str, Any] = {}

    def create(vm_id: str) -> None:
        try:
            results[vm_id] = p2.service_as("admin").createVM(dag=dag("echo app > /app", f"echo {vm_id}"),
                                                             owner="alice", vm_id=vm_id, max_cost=None)
        except Exception as exc:  # noqa: BLE001 - reported below
            results[vm_id] = exc

    threads = [threading.Thread(target=create, args=(f"twin{n}",)) for n in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert all(not isinstance(r, Exception) for r in results.values()), results
    assert {r.vm.state for r in results.values()} == {"running"}
    assert {r.estimate.image for r in results.values()} == {"app"}
    assert p2.output().count("fetched image app from") == 1
    fetched = fetched_dir(site) / "app"
    published = site["base"] / "p1-warehouse" / "published" / "p1" / "app"
    assert sha256(fetched / "disk") == sha256(published / "disk.qcow2")  # the same base path: not rebased
    recorded = json.loads((fetched / "manifest.json").read_text())
    assert {f["role"]: f["sha256"] for f in recorded["files"]}["disk"] == sha256(published / "disk.qcow2")
    assert str(fetched / "image.xml") in p2_index(site)
    # A third create needs no fetch.
    third = p2.service.createVM(dag=dag("echo app > /app"), owner="alice", vm_id="third", max_cost=None)
    assert third.estimate.image == "app" and "transfer" not in {i.source for i in third.estimate.items}
    assert p2.output().count("fetched image app from") == 1
    for vm_id in ("twin1", "twin2", "third"):
        p2.service.collectVM(vm_id=vm_id)


@pytest.mark.parametrize(("image", "words"), [("lying", "sha256"), ("oversized", "longer than"),
                                              ("badsize", "longer than"), ("swapped", "catalog described"),
                                              ("inflated", "larger")])
def test_a_corrupted_transfer_is_refused_and_changes_nothing(site: dict[str, Any], image: str, words: str) -> None:
    p2 = site["p2"]
    wait_for(lambda: p2.service.estimateCost(dag=dag("echo more", image=image), owner="").image == image,
             what=f"p2 to know the mirror's {image}")
    index = p2_index(site)
    before = sorted(p.name for p in fetched_dir(site).iterdir()) if fetched_dir(site).exists() else []
    with pytest.raises(zeep.exceptions.Fault) as info:
        p2.service.createVM(dag=dag("echo more", image=image), owner="alice", vm_id=f"bad-{image}", max_cost=None)
    assert fault_code(info) == "Server.TransferFailed"
    assert words in str(info.value.message) and "refused" in str(info.value.message)
    assert p2_index(site) == index
    assert sorted(p.name for p in fetched_dir(site).iterdir()) == before
    assert "Traceback" not in p2.output()


def test_an_image_from_a_warehouse_server_is_fetched_and_checked(site: dict[str, Any]) -> None:
    p2 = site["p2"]
    made = p2.service.createVM(dag=dag("echo mirrored", "echo m"), owner="alice", vm_id="from-mirror",
                               max_cost=None)
    assert made.estimate.image == "mirrored" and made.vm.state == "running"
    assert p2.output().count(f"fetched image mirrored from {site['mirror'].url}") == 1
    fetched = fetched_dir(site) / "mirrored"
    served = site["base"] / "mirror" / "images" / "mirrored"
    for role in ("disk", "kernel", "initrd"):
        assert sha256(fetched / role) == sha256(served / role)
    # p2's cache is 0 MiB: the image fetched before (app), used by no VM now, was evicted by this fetch.
    assert not (fetched_dir(site) / "app").exists() and "/app/image.xml" not in p2_index(site)
    p2.service.collectVM(vm_id="from-mirror")


def test_least_recently_used_fetched_images_are_evicted_past_the_cache(site: dict[str, Any]) -> None:
    p2 = site["p2"]
    # p2's cache is 0 MiB: once a new image is fetched, every fetched image no VM uses goes.
    made = p2.service.createVM(dag=dag("echo b > /b"), owner="alice", vm_id="uses-appb", max_cost=None)
    assert made.estimate.image == "appb"
    # Only the image in use stays; the installer's tiny stays always.
    assert sorted(p.name for p in fetched_dir(site).iterdir()) == ["appb"]
    listed = [line for line in p2_index(site).splitlines() if line.strip()]
    assert len(listed) == 2 and listed[0].endswith("tiny/image.xml") and listed[1].endswith("/appb/image.xml")
    p2.service.collectVM(vm_id="uses-appb")


def test_eviction_order_keeps_what_is_in_use_and_parents() -> None:
    sizes = {"old": 100, "mid": 100, "new": 100, "used": 100, "parent": 100}
    used = {"old": 1.0, "mid": 2.0, "new": 3.0, "used": 0.5, "parent": 0.1}
    assert evictable(sizes, used, {"used"}, {"parent"}, 300) == ["old", "mid"]
    assert evictable(sizes, used, {"used"}, {"parent"}, 500) == []
    assert evictable(sizes, used, {"used"}, {"parent"}, 0) == ["old", "mid", "new"]


def test_a_fetched_disk_is_rebased_onto_the_local_parent(tmp_path: Path, warehouse_dir: Path) -> None:
    """Unit: a qcow2 whose backing path is another host's is rebased onto this plant's parent disk."""
    from vmplant_service.transfer import Transfers
    from vmplant_service.warehouse import Warehouse

    local = tmp_path / "tiny-copy"
    shutil.copytree(warehouse_dir / "tiny", local)
    (tmp_path / "index.txt").write_text(f"{local / 'image.xml'}\n")
    warehouse = Warehouse(tmp_path)
    parent = warehouse.get("tiny")
    disk = tmp_path / "fetched.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "/elsewhere/disk", "-F", "qcow2", "-u",
                    str(disk), "1G"], check=True)
    transfers = Transfers(warehouse, "p", [], None, None, cache_bytes=0, bandwidth=1.0, in_use=set)
    assert transfers._check_disk(disk, parent) == "qcow2"
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(disk)], check=True,
                                     capture_output=True).stdout)
    assert info["backing-filename"] == str(parent.disk)
    from vmshop_common.errors import TransferFailedError
    with pytest.raises(TransferFailedError, match="backing file"):
        transfers._check_disk(disk, None)  # an image with no parent must have no backing file


def _transfers(tmp_path: Path, warehouse_dir: Path) -> Any:
    from vmplant_service.transfer import Transfers
    from vmplant_service.warehouse import Warehouse

    (tmp_path / "index.txt").write_text(f"{(warehouse_dir / 'tiny' / 'image.xml').resolve()}\n")
    return Transfers(Warehouse(tmp_path), "p", [], None, None, cache_bytes=0, bandwidth=1.0, in_use=set)


def test_concurrent_needs_of_one_image_fetch_it_once(tmp_path: Path, warehouse_dir: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """Unit: the second create waits for the first's fetch (never a second fetch), and hears its failure too."""
    from vmplant_service.transfer import RemoteImage
    from vmshop_common.dag import Hardware
    from vmshop_common.dagxml import load_dag
    from vmshop_common.errors import TransferFailedError
    from vmshop_common.guest import GuestTraits

    caplog.set_level(logging.INFO, logger="vmplant_service.transfer")
    transfers = _transfers(tmp_path, warehouse_dir)
    image = RemoteImage("https://peer/", "wanted", "tiny", 100, load_dag(dag("echo w")), Hardware(128, 1, 1),
                        GuestTraits())
    transfers._remote = {"wanted": image}
    transfers.evict = lambda: []
    started, release, calls = threading.Event(), threading.Event(), []

    def slow_fetch(what: Any) -> None:
        calls.append(what.name)
        started.set()
        assert release.wait(10)
        raise TransferFailedError("the peer sent garbage: refused")

    transfers._fetch = slow_fetch
    outcomes: list[str] = []

    def need() -> None:
        try:
            transfers.ensure("wanted")
            outcomes.append("ok")
        except TransferFailedError as exc:
            outcomes.append(exc.message)

    first = threading.Thread(target=need)
    first.start()
    assert started.wait(10)
    second = threading.Thread(target=need)
    second.start()
    wait_for(lambda: "waiting for the fetch in progress" in caplog.text, timeout=10,
             what="the second need to wait for the first's fetch")
    release.set()
    first.join(10)
    second.join(10)
    assert calls == ["wanted"]
    assert outcomes == ["the peer sent garbage: refused"] * 2


def test_a_restart_sweeps_what_fetches_left(tmp_path: Path, warehouse_dir: Path) -> None:
    transfers = _transfers(tmp_path, warehouse_dir)
    transfers.root.mkdir(parents=True)
    (transfers.root / ".img.partial-abc").mkdir()
    (transfers.root / "unlisted").mkdir()
    (transfers.root / "unlisted" / "disk").write_bytes(b"x")
    assert sorted(p.name for p in transfers.sweep()) == [".img.partial-abc", "unlisted"]
    assert list(transfers.root.iterdir()) == []
