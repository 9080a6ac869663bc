"""Private images that move between plants because their owner and both plants agreed (vmplant_service/transfer.py,
imageserve.py), with real plant servers on the fake backend over mutual TLS.

- p1 (identity ``plant``) serves owners' movable images (``--serve-movable``) and holds alice's ``moved`` and
  ``later`` (movable), alice's ``fixed`` (not movable) and bob's ``bobs`` (movable), all published from its VMs;
- p3 (identity ``plant``) holds alice's movable ``onp3`` but does not serve movable images, and lists p1 as its
  peer without fetching movable images;
- p2 (identity ``plant2``) fetches movable images (``--fetch-movable``) from p1 and p3, with a cache of 0 MiB;
- a shop knows all three.

Only ``moved``, ``later`` (for alice) and ``bobs`` (for bob) may move, and only to p2; every other case is the
absence of one agreement.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zeep.exceptions
from lxml import etree
from pki import test_pki
from servers import ServerProcess, fault_code, host_port, start_plant, start_shop, wait_for

from vmshop_common.dagxml import DAG_NS

pytestmark = pytest.mark.integration

IMAGES = {"moved": ("alice", "echo moved > /m", True), "later": ("alice", "echo later > /l", True),
          "fixed": ("alice", "echo fixed > /f", False), "bobs": ("bob", "echo bob > /b", True)}


def dag(*bodies: str, image: str = "tiny") -> str:
    nodes = "".join(f'<script id="s{n}">{body}</script>' for n, body in enumerate(bodies, start=1))
    ids = ["start"] + [f"s{n}" for n in range(1, len(bodies) + 1)]
    edges = "".join(f'<edge from="{a}" to="{b}"/>' for a, b in zip(ids, ids[1:], strict=False))
    return (f'<vm xmlns="{DAG_NS}"><nodes><image id="start" name="{image}"/>{nodes}</nodes>'
            f"<edges>{edges}</edges></vm>")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def publish(plant: ServerProcess, image: str, owner: str, body: str, movable: bool) -> None:
    made = plant.service.createVM(dag=dag(body), owner=owner, vm_id=f"for-{image}", max_cost=None)
    plant.service.publishVM(vm_id=made.vm.vm_id, image=image, owner=owner, is_public=False)
    if movable:  # the owner agrees (the plant's operation, as the shop asks it for the owner)
        assert plant.service.setImageMovable(image=image, is_movable=True, owner=owner).is_movable is True
    plant.service.collectVM(vm_id=made.vm.vm_id)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, warehouse_dir: Path) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("private-transfer")
    pki = test_pki()
    made: dict[str, Any] = {"base": base}
    try:
        tiny = (warehouse_dir / "tiny" / "image.xml").resolve()
        for name in ("p1", "p2", "p3"):
            (base / f"{name}-warehouse").mkdir()
            (base / f"{name}-warehouse" / "index.txt").write_text(f"{tiny}\n")
        metrics = {"boot_seconds": 1.0, "clone_seconds": 0.02}
        p1 = made["p1"] = start_plant(base / "p1", base / "p1-warehouse", name="p1", backend="fake", network="none",
                                      identity="plant", metrics=metrics, flags=["--serve-movable"])
        pki.plant_mapfile(p1.mapfile, [f'"{pki.subject("plant2")}" plant2 plant',
                                       f'"{pki.subject("plant")}" plant plant'])
        p1.stop()
        p1.start()
        p1.client()
        for image, (owner, body, movable) in IMAGES.items():
            publish(p1, image, owner, body, movable)
        p3 = made["p3"] = start_plant(base / "p3", base / "p3-warehouse", name="p3", backend="fake", network="none",
                                      identity="plant", metrics=metrics,
                                      flags=["--peer", p1.url, "--peers-refresh", "0.5"])
        pki.plant_mapfile(p3.mapfile, [f'"{pki.subject("plant2")}" plant2 plant'])
        p3.stop()
        p3.start()
        p3.client()
        publish(p3, "onp3", "alice", "echo p3 > /p3", True)
        made["p2"] = start_plant(base / "p2", base / "p2-warehouse", name="p2", backend="fake", network="none",
                                 identity="plant2", metrics=metrics,
                                 flags=["--peer", p1.url, "--peer", p3.url, "--fetch-movable", "--cache-size", "0",
                                        "--bandwidth", "100", "--peers-refresh", "0.5"])
        made["shop"] = start_shop(base / "shop", [host_port(made[p]) for p in ("p1", "p2", "p3")])
        yield made
    finally:
        for server in made.values():
            if isinstance(server, ServerProcess):
                server.cleanup()


def published(site: dict[str, Any], image: str, plant: str = "p1") -> Path:
    return Path(site["base"] / f"{plant}-warehouse" / "published" / plant / image)


def fetched(site: dict[str, Any], image: str) -> Path:
    return Path(site["base"] / "p2-warehouse" / "fetched" / "p2" / image)


def estimate(plant: ServerProcess, image: str, owner: str) -> Any:
    """``plant``'s bid for ``owner``'s request of image ``image``'s step and one more."""
    return plant.service.estimateCost(dag=dag(IMAGES[image][1], "echo more"), owner=owner)


def names_in(answer: Any) -> str:
    """Everything an answer says, as text (zeep objects print their fields)."""
    return str(answer)


def test_a_movable_image_is_served_to_plants_only_and_for_its_owner_only(site: dict[str, Any]) -> None:
    p1, p3 = site["p1"], site["p3"]
    plant2 = test_pki().session("plant2")

    def catalog(session: Any, query: str = "", at: ServerProcess = p1) -> set[str]:
        answer = session.get(f"{at.url}images/catalog{query}", timeout=30)
        assert answer.status_code == 200
        return {entry["name"] for entry in answer.json()["images"]}

    assert catalog(plant2) == {"tiny"}  # no owner named: public images only
    assert catalog(plant2, "?movable=1") == {"tiny", "moved", "later", "bobs"}  # 'fixed' is not movable
    assert catalog(plant2, "?owner=alice") == {"tiny", "moved", "later"}
    assert catalog(plant2, "?movable=1", at=p3) == {"tiny"}  # p3 does not serve movable images
    missing = plant2.get(f"{p1.url}images/nothere/manifest?owner=alice", timeout=30)
    assert missing.status_code == 404

    def refused_as_missing(session: Any, path: str) -> None:
        answer = session.get(f"{p1.url}images/{path}", timeout=30)
        image = path.split("/", 1)[0]
        assert (answer.status_code, answer.text.replace(image, "nothere")) == (404, missing.text), path

    manifest = plant2.get(f"{p1.url}images/moved/manifest?owner=alice", timeout=30)
    assert manifest.status_code == 200
    disk = next(f for f in manifest.json()["files"] if f["role"] == "disk")
    assert disk["sha256"] == sha256(published(site, "moved") / "disk.qcow2")
    assert plant2.get(f"{p1.url}images/moved/disk?owner=alice", timeout=30).content == \
        (published(site, "moved") / "disk.qcow2").read_bytes()
    for path in ("moved/manifest", "moved/disk", "moved/manifest?owner=bob", "moved/config?owner=bob",
                 "fixed/manifest?owner=alice", "fixed/disk?owner=alice", "bobs/manifest?owner=alice"):
        refused_as_missing(plant2, path)
    answer = plant2.get(f"{p3.url}images/onp3/manifest?owner=alice", timeout=30)
    assert answer.status_code == 404  # p3 did not agree to serve
    # A shop's or an admin's certificate never pulls private bytes, whatever it asks.
    for who in ("shop", "admin"):
        session = test_pki().session(who)
        assert catalog(session, "?movable=1") == catalog(session, "?owner=alice") == {"tiny"}
        for path in ("moved/manifest?owner=alice", "moved/disk?owner=alice", "moved/config?owner=alice"):
            refused_as_missing(session, path)
    # Owner names are names, never paths; a query is one owner at most.
    for query in ("owner=../alice", "owner=al/ice", "owner=", "owner=alice&owner=bob", "owner=%00",
                  "owner=%C3%A9", "movable=2", "movable=1&movable=1", "owner=" + "a" * 65):
        answer = plant2.get(f"{p1.url}images/moved/manifest?{query}", timeout=30)
        assert answer.status_code == 400, query
        assert plant2.get(f"{p1.url}images/catalog?{query}", timeout=30).status_code == 400, query
    assert "Traceback" not in p1.output()


def test_owner_and_both_plants_agreed_the_image_is_fetched_and_stays_private_to_its_owner(
        site: dict[str, Any]) -> None:
    p2 = site["p2"]
    bid = wait_for(lambda: (e := estimate(p2, "moved", "alice")).image == "moved" and e,
                   what="p2 to bid for alice with p1's movable image")
    assert [i.label for i in bid.items if i.source == "transfer"] == ["fetch moved"]
    made = p2.service.createVM(dag=dag(IMAGES["moved"][1], "echo more"), owner="alice", vm_id="alices",
                               max_cost=None)
    assert made.estimate.image == "moved" and made.vm.state == "running"
    assert p2.output().count("fetched image moved from") == 1
    assert sha256(fetched(site, "moved") / "disk") == sha256(published(site, "moved") / "disk.qcow2")
    root = etree.parse(str(fetched(site, "moved") / "image.xml")).getroot()
    assert (root.get("owner"), root.get("public"), root.get("movable")) == ("alice", None, "true")
    # It is alice's: p2 lists no public image of that name, and bob's request of its steps is not priced with it.
    assert "moved" not in p2.service.plantInfo().images
    for_bob = estimate(p2, "moved", "bob")
    assert for_bob.image == "tiny" and "moved" not in names_in(for_bob)
    again = estimate(p2, "moved", "alice")
    assert again.image == "moved" and "transfer" not in {i.source for i in again.items}
    p2.service.collectVM(vm_id="alices")
    # Her withdrawal reaches the fetched copy too (it is then served on by no plant); she may agree again.
    alice = site["shop"].service_as("alice")
    assert set(alice.setImageMovable(image="moved", is_movable=False)) == {site["p1"].url, p2.url}
    assert etree.parse(str(fetched(site, "moved") / "image.xml")).getroot().get("movable") is None
    assert set(alice.setImageMovable(image="moved", is_movable=True)) == {site["p1"].url, p2.url}
    assert etree.parse(str(fetched(site, "moved") / "image.xml")).getroot().get("movable") == "true"


def test_another_owner_never_sees_it_in_bids_declines_or_estimates(site: dict[str, Any]) -> None:
    p2, shop = site["p2"], site["shop"]
    wait_for(lambda: estimate(p2, "bobs", "bob").image == "bobs", what="p2 to bid for bob with his image")
    alice, bob = shop.service_as("alice"), shop.service_as("bob")
    at_shop = wait_for(lambda: (e := bob.estimateCost(dag=dag(IMAGES["bobs"][1], "echo more")))
                       and any(b.image == "bobs" and b.plant == site["p2"].url for b in e.bids) and e,
                       what="the shop to price bob's request with p2's fetchable image")
    assert at_shop.image == "bobs"
    for image in ("moved", "later", "bobs"):
        owner = IMAGES[image][0]
        other = alice if owner == "bob" else bob
        seen = other.estimateCost(dag=dag(IMAGES[image][1], "echo more"))
        assert image not in names_in(seen), (image, seen)
        assert all(b.image == "tiny" for b in seen.bids if b.status == "bid")
        direct = estimate(p2, image, "bob" if owner == "alice" else "alice")
        assert image not in names_in(direct)
    # Named outright by another owner, it is declined exactly as an image that does not exist.
    named = p2.service.estimateCost(dag=dag("echo x", image="later"), owner="bob")
    absent = p2.service.estimateCost(dag=dag("echo x", image="nothere"), owner="bob")
    assert not named.accepted and named.reason.replace("later", "nothere") == absent.reason
    with pytest.raises(zeep.exceptions.Fault) as info:
        p2.service.createVM(dag=dag("echo x", image="later"), owner="bob", vm_id="bobs-try", max_cost=None)
    assert fault_code(info) == "Client.NoSuchImage"
    assert not fetched(site, "later").exists()
    # The offer names each fetchable private image with its owner (the shop scopes it: Catalog.for_owner).
    offer = p2.service.getOffer()
    owners = {i.name: i.owner for i in offer.images}
    assert owners.get("bobs") == "bob" and owners.get("later") == "alice" and "onp3" not in owners


def test_without_any_one_agreement_nothing_moves(site: dict[str, Any]) -> None:
    p2, p3 = site["p2"], site["p3"]
    wait_for(lambda: estimate(p2, "later", "alice").image == "later", what="p2 to know alice's movable 'later'")
    # The owner did not agree (fixed); the serving plant did not (onp3 on p3); the fetching plant did not (p3).
    assert estimate(p2, "fixed", "alice").image == "tiny"
    onp3 = p2.service.estimateCost(dag=dag("echo p3 > /p3", "echo more"), owner="alice")
    assert onp3.image == "tiny" and "transfer" not in {i.source for i in onp3.items}
    for image in ("moved", "later"):
        at_p3 = estimate(p3, image, "alice")
        assert at_p3.image == "tiny" and "transfer" not in {i.source for i in at_p3.items}
    # The owner withdraws its agreement (through the shop): p2 stops bidding with it.
    alice = site["shop"].service_as("alice")
    assert alice.setImageMovable(image="later", is_movable=False) == [site["p1"].url]
    wait_for(lambda: estimate(p2, "later", "alice").image == "tiny", what="p2 to stop bidding with 'later'")
    assert alice.setImageMovable(image="later", is_movable=True) == [site["p1"].url]
    wait_for(lambda: estimate(p2, "later", "alice").image == "later", what="p2 to bid with 'later' again")
    for image in ("fixed", "onp3", "later"):
        assert not fetched(site, image).exists()


def test_set_image_movable_refusals_change_nothing(site: dict[str, Any]) -> None:
    p1, shop = site["p1"], site["shop"]
    config = published(site, "moved") / "image.xml"
    before = config.read_bytes()
    bob, alice, admin = shop.service_as("bob"), shop.service_as("alice"), shop.service_as("admin")
    cases = [(bob, "moved", "Client.NoSuchImage"), (alice, "bobs", "Client.NoSuchImage"),
             (alice, "nothere", "Client.NoSuchImage"), (alice, "../moved", "Client.ImageNameInvalid"),
             (alice, "tiny", "Client.NoSuchImage"), (admin, "tiny", "Client.NotSupported")]
    for caller, image, code in cases:
        with pytest.raises(zeep.exceptions.Fault) as info:
            caller.setImageMovable(image=image, is_movable=False)
        assert fault_code(info) == code, (image, code)
    with pytest.raises(zeep.exceptions.Fault) as info:
        p1.service.setImageMovable(image="moved", is_movable=False, owner="bob")
    assert fault_code(info) == "Client.NoSuchImage"
    assert config.read_bytes() == before
    # An admin may, for any owner's image.
    fixed = published(site, "fixed") / "image.xml"
    assert admin.setImageMovable(image="fixed", is_movable=True) == [p1.url]
    assert etree.parse(str(fixed)).getroot().get("movable") == "true"
    assert admin.setImageMovable(image="fixed", is_movable=False) == [p1.url]
    assert etree.parse(str(fixed)).getroot().get("movable") is None


def test_the_fetched_copy_is_evicted_like_any_fetched_image(site: dict[str, Any]) -> None:
    """p2's cache is 0 MiB: once bob's image is fetched, alice's fetched copy (used by no VM) goes."""
    p2 = site["p2"]
    if not fetched(site, "moved").exists():  # run alone: fetch it first
        p2.service.createVM(dag=dag(IMAGES["moved"][1]), owner="alice", vm_id="alices-2", max_cost=None)
        p2.service.collectVM(vm_id="alices-2")
    assert fetched(site, "moved").exists()
    made = p2.service.createVM(dag=dag(IMAGES["bobs"][1]), owner="bob", vm_id="bobs-vm", max_cost=None)
    assert made.estimate.image == "bobs"
    root = etree.parse(str(fetched(site, "bobs") / "image.xml")).getroot()
    assert (root.get("owner"), root.get("public"), root.get("movable")) == ("bob", None, "true")
    assert not fetched(site, "moved").exists()
    index = (site["base"] / "p2-warehouse" / "index.txt").read_text()
    assert "/moved/" not in index and "/bobs/" in index
    p2.service.collectVM(vm_id="bobs-vm")


# Units: the scoping rules, without servers ------------------------------------------------------------------
def _image_xml(name: str, parent: str, owner: str | None, *, public: bool = False, movable: bool = False,
               step: str = "echo x") -> str:
    attributes = f' owner="{owner}"' if owner else ""
    attributes += ' public="true"' if public else ""
    attributes += ' movable="true"' if movable else ""
    return (f'<?xml version="1.0"?><image xmlns="urn:vmshop:image:1" name="{name}"{attributes}>'
            f'<disk file="disk" format="qcow2"/><hardware memory="128" disk="1"/>'
            f'<dag xmlns="{DAG_NS}"><nodes><image id="base" name="{parent}"/><script id="s">{step}</script></nodes>'
            f'<edges><edge from="base" to="s"/></edges></dag></image>')


def test_a_catalog_keeps_private_entries_only_when_this_plant_fetches_movable_images() -> None:
    from vmplant_service.transfer import remote_images

    entries = [{"name": name, "parent": "tiny", "size": 10, "config": _image_xml(name, "tiny", owner, **flags)}
               for name, owner, flags in (("pub", "alice", {"public": True}), ("mov", "alice", {"movable": True}),
                                          ("fix", "alice", {}), ("bad", "../x", {"movable": True}))]
    document = {"images": entries}
    assert {n: i.owner for n, i in remote_images("https://p/", document).items()} == {"pub": None}
    assert {n: i.owner for n, i in remote_images("https://p/", document, movable=True).items()} == \
        {"pub": None, "mov": "alice"}


def test_offerable_names_a_movable_image_to_its_owner_only_and_over_its_owners_lineage(
        tmp_path: Path, warehouse_dir: Path) -> None:
    from vmplant_service.transfer import RemoteImage, Transfers
    from vmplant_service.warehouse import Warehouse
    from vmshop_common.dag import Hardware
    from vmshop_common.dagxml import load_dag
    from vmshop_common.guest import GuestTraits

    (tmp_path / "index.txt").write_text(f"{(warehouse_dir / 'tiny' / 'image.xml').resolve()}\n")
    class Records:
        def metric(self, name: str) -> None:
            return None

    transfers = Transfers(Warehouse(tmp_path), "p", [], None, Records(), cache_bytes=0, bandwidth=1.0, in_use=set,
                          fetch_movable=True)

    def remote(name: str, parent: str, owner: str | None) -> RemoteImage:
        return RemoteImage("https://peer/", name, parent, 100, load_dag(dag(f"echo {name}", image=parent)),
                           Hardware(128, 1, 1), GuestTraits(), owner)

    images = [remote("pub", "tiny", None), remote("a1", "tiny", "alice"), remote("a2", "a1", "alice"),
              remote("b1", "tiny", "bob"), remote("b2", "a1", "bob"), remote("p2", "a1", None)]
    transfers._remote = {image.name: image for image in images}
    local = transfers.warehouse.images
    assert set(transfers.offerable(local, "alice")) == {"pub", "a1", "a2"}
    assert set(transfers.offerable(local, "bob")) == {"pub", "b1"}  # b2 starts from alice's image
    assert set(transfers.offerable(local, "")) == {"pub"}  # p2: a public image never starts from a private one
    every = transfers.offerable(local, None)
    assert {name: image.owner for name, (image, _) in every.items()} == \
        {"pub": None, "a1": "alice", "a2": "alice", "b1": "bob"}
    from vmshop_common.errors import NoSuchImageError
    for owner, name in (("bob", "a1"), ("", "a1"), ("bob", "b2"), ("alice", "b1")):
        with pytest.raises(NoSuchImageError):
            transfers.ensure(name, owner)


def test_shareable_images_are_public_or_the_owners_movable_ones_closed_under_lineage(
        tmp_path: Path, warehouse_dir: Path) -> None:
    from dataclasses import replace

    from vmplant_service.warehouse import Warehouse
    from vmshop_common.dagxml import load_dag

    (tmp_path / "index.txt").write_text(f"{(warehouse_dir / 'tiny' / 'image.xml').resolve()}\n")
    warehouse = Warehouse(tmp_path)
    tiny = warehouse.get("tiny")

    def image(name: str, parent: str, owner: str, public: bool = False, movable: bool = False) -> Any:
        return replace(tiny, name=name, dag=load_dag(dag(f"echo {name}", image=parent)), owner=owner, public=public,
                       movable=movable)

    made = [image("pub", "tiny", "alice", public=True), image("a1", "tiny", "alice", movable=True),
            image("a2", "a1", "alice", movable=True), image("fixed", "tiny", "alice"),
            image("a3", "fixed", "alice", movable=True), image("b1", "a1", "bob", movable=True),
            image("b2", "tiny", "bob", movable=True)]
    warehouse._images = {"tiny": tiny, **{info.name: info for info in made}}
    assert set(warehouse.shareable("alice")) == {"tiny", "pub", "a1", "a2"}  # a3 starts from a fixed image
    assert set(warehouse.shareable("bob")) == {"tiny", "pub", "b2"}  # b1 starts from alice's
    assert set(warehouse.shareable(None)) == {"tiny", "pub", "a1", "a2", "b2"}
    assert set(warehouse.shareable("")) == set(warehouse.visible("")) == {"tiny", "pub"}
