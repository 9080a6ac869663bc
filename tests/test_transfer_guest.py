"""Images move between plants with real guests (qemu, TCG), through a real shop: issue 14's acceptance for part 3.

p1 holds the tiny image and publishes a public image from a VM that wrote a file; p2 holds tiny only and lists
p1 as its peer; the shop knows p2 only. Through the shop, alice's first create (the published image's step plus
one more) is made on p2 from p1's image, which p2 fetches (over mutual TLS, checked, stored): only the last step
runs, and it finds the first VM's file. A second create clones the fetched image without any fetch.

The same VM, configured once more, is also published as alice's private image, which she makes movable; p1
serves movable images and p2 fetches them: her create is made on p2 from it, and bob never sees it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import pytest
from pki import test_pki
from servers import ServerProcess, host_port, start_plant, start_shop, wait_for

from vmshop_common.dagxml import DAG_NS

pytestmark = [pytest.mark.guest, pytest.mark.integration]

FIRST = "mkdir -p /srv/app && echo 'made on p1' > /srv/app/origin && sync"
PRIVATE = "echo 'alice only' > /srv/app/private && sync"


def dag(*bodies: str, first: int = 1) -> str:
    nodes = "".join(f'<script id="s{n}" timeout="60" cost="30">{escape(body)}</script>'
                    for n, body in enumerate(bodies, start=first))
    ids = ["start"] + [f"s{n}" for n in range(first, first + len(bodies))]
    edges = "".join(f'<edge from="{a}" to="{b}"/>' for a, b in zip(ids, ids[1:], strict=False))
    return (f'<vm xmlns="{DAG_NS}"><nodes><image id="start" name="tiny"/>{nodes}</nodes>'
            f"<edges>{edges}</edges></vm>")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, warehouse_dir: Path) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("transfer-guest")
    pki = test_pki()
    tiny = (warehouse_dir / "tiny" / "image.xml").resolve()
    made: dict[str, Any] = {"base": base}
    try:
        for name in ("p1", "p2"):
            (base / f"{name}-warehouse").mkdir()
            (base / f"{name}-warehouse" / "index.txt").write_text(f"{tiny}\n")
        p1 = made["p1"] = start_plant(base / "p1", base / "p1-warehouse", name="p1", network="none",
                                      capacity_vms=2, flags=["--serve-movable"])
        pki.plant_mapfile(p1.mapfile, [f'"{pki.subject("plant2")}" plant2 plant'])
        p1.stop()
        p1.start()
        p1.client()
        source = p1.service.createVM(dag=dag(FIRST), owner="alice", vm_id="source", max_cost=None)
        p1.service.publishVM(vm_id=source.vm.vm_id, image="shared-app", owner="alice", is_public=True)
        p1.service.configureVM(vm_id="source", dag=dag(PRIVATE, first=2))
        p1.service.publishVM(vm_id=source.vm.vm_id, image="alices-own", owner="alice", is_public=False)
        p1.service.setImageMovable(image="alices-own", is_movable=True, owner="alice")
        p1.service.collectVM(vm_id="source")
        made["p2"] = start_plant(base / "p2", base / "p2-warehouse", name="p2", network="none", capacity_vms=2,
                                 identity="plant2", flags=["--peer", p1.url, "--fetch-movable"])
        made["shop"] = start_shop(base / "shop", [host_port(made["p2"])],
                                  plant_identities={"plant2": [host_port(made["p2"])]})
        # p2 tells the shop of its changes (its offer without the fetch, once it holds the image).
        (made["p2"].directory / "vmshop_addresses.txt").write_text(f"{host_port(made['shop'])}\n")
        yield made
    finally:
        for server in made.values():
            if isinstance(server, ServerProcess):
                server.cleanup()


def test_a_create_fetches_the_peers_image_and_the_next_one_clones_it(site: dict[str, Any]) -> None:
    alice = site["shop"].service_as("alice")
    wanted = dag(FIRST, "cat /srv/app/origin")
    estimate = wait_for(lambda: (e := alice.estimateCost(dag=wanted)).image == "shared-app" and e, timeout=60,
                        what="the shop to price p2's offer with p1's image")
    assert "transfer" in {item.source for item in estimate.items}
    first = alice.createVM(dag=wanted, vm_key="first")
    assert (first.plant, first.vm.image, first.vm.state) == (site["p2"].url, "shared-app", "running")
    assert [run.node for run in first.runs] == ["s2"] and "made on p1" in first.runs[0].output
    p2 = site["p2"]
    assert p2.output().count("fetched image shared-app from") == 1
    # p2's new offer (told to the shop) holds the image: the shop prices it without the fetch.
    wait_for(lambda: "transfer" not in {item.source for item in alice.estimateCost(dag=wanted).items}, timeout=30,
             what="the shop to hear p2's offer with the image held")
    second = alice.createVM(dag=wanted, vm_key="second")
    assert (second.plant, second.vm.image) == (site["p2"].url, "shared-app")
    assert "made on p1" in second.runs[0].output
    assert p2.output().count("fetched image shared-app from") == 1  # cloned, not fetched again
    chosen = next(b for b in second.bids if b.plant == second.plant)
    assert "transfer" not in {item.source for item in chosen.items}
    for made in (first, second):
        alice.collectVM(vm=made.vm.epr)


def test_an_owners_movable_image_is_fetched_for_her_and_never_shown_to_another(site: dict[str, Any]) -> None:
    alice, bob = site["shop"].service_as("alice"), site["shop"].service_as("bob")
    wanted = dag(FIRST, PRIVATE, "cat /srv/app/private")
    wait_for(lambda: alice.estimateCost(dag=wanted).image == "alices-own", timeout=60,
             what="the shop to price p2's offer with alice's movable image")
    seen = bob.estimateCost(dag=wanted)
    assert "alices-own" not in str(seen) and seen.image != "alices-own"
    made = alice.createVM(dag=wanted, vm_key="own")
    assert (made.plant, made.vm.image) == (site["p2"].url, "alices-own")
    assert [run.node for run in made.runs] == ["s3"] and "alice only" in made.runs[0].output
    p2 = site["p2"]
    assert p2.output().count("fetched image alices-own from") == 1
    assert "alices-own" not in p2.service.plantInfo().images  # hers, private: not listed as public
    assert "alices-own" not in str(bob.estimateCost(dag=wanted))
    alice.collectVM(vm=made.vm.epr)
