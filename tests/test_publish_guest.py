"""Publish with real guests (qemu and libvirt backends), through a real shop: issue 14's acceptance for part 1.

One plant (its own warehouse: an index listing the real tiny image) and one
shop for each backend; two guests boot on each, in order:

1. alice's VM runs two script steps that write files, and is published
   while it runs (its file systems frozen by its agent, the guest paused
   for the copy, then resumed and thawed: it answers afterwards);
2. alice's second create, with the same prefix and one more step, is made
   from the published image: only that step runs, and it finds the first
   VM's files;

meanwhile bob can neither see nor use alice's image. The image is then
unpublished (refused while the second VM uses it).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import pytest
import zeep.exceptions
from servers import (
    ServerProcess,
    fault_code,
    host_port,
    processes_mentioning,
    start_plant,
    start_shop,
    wait_for,
)

from vmshop_common.dagxml import DAG_NS

pytestmark = [pytest.mark.guest, pytest.mark.integration]

FIRST = ("mkdir -p /srv/app && echo 'made by the first VM' > /srv/app/origin && echo one",
         "echo 'settings=7' > /srv/app/settings && sync && echo two")
CHECK = "cat /srv/app/origin /srv/app/settings"


def dag(*bodies: str, image: str = "tiny") -> str:
    nodes = "".join(f'<script id="s{n}" timeout="60">{escape(body)}</script>' for n, body in enumerate(bodies, start=1))
    ids = ["start"] + [f"s{n}" for n in range(1, len(bodies) + 1)]
    edges = "".join(f'<edge from="{a}" to="{b}"/>' for a, b in zip(ids, ids[1:], strict=False))
    return (f'<vm xmlns="{DAG_NS}"><nodes><image id="start" name="{image}"/>{nodes}</nodes>'
            f"<edges>{edges}</edges></vm>")


#: The backends that publish: QEMU directly, and QEMU through libvirt (its chain of three images as descriptors).
BACKENDS = {"qemu": {}, "libvirt": {"uri": "qemu:///system", "daemon": "spawn", "daemon_timeout": "10"}}


@pytest.fixture(scope="module", params=sorted(BACKENDS, reverse=True))
def site(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
         warehouse_dir: Path) -> Iterator[dict[str, ServerProcess]]:
    backend = request.param
    base = tmp_path_factory.mktemp(f"publish-{backend}")
    warehouse = base / "warehouse"
    warehouse.mkdir()
    (warehouse / "index.txt").write_text(f"{(warehouse_dir / 'tiny' / 'image.xml').resolve()}\n")
    made: dict[str, ServerProcess] = {}
    try:
        made["plant"] = start_plant(base / "plant", warehouse, capacity_vms=3, network="none", backend=backend,
                                    backend_options=BACKENDS[backend])
        made["shop"] = start_shop(base / "shop", [host_port(made["plant"])])
        yield made
    finally:
        plant = made.get("plant")
        try:
            if plant is not None:
                for vm in plant.service.listVMs(include_collected=False) or []:
                    plant.service.collectVM(vm_id=vm.vm_id)
        except Exception:  # noqa: BLE001 - cleanup goes on
            pass
        for server in made.values():
            server.cleanup()
        if plant is not None:
            assert processes_mentioning(str(plant.state_dir)) == []


@pytest.fixture(scope="module")
def vms(site: dict[str, ServerProcess]) -> dict[str, Any]:
    """VMs and images made by earlier tests of this module (on this backend)."""
    return {}


def test_publish_a_running_guest(site: dict[str, ServerProcess], vms: dict[str, Any]) -> None:
    alice = site["shop"].service_as("alice")
    first = alice.createVM(dag=dag(*FIRST), vm_key="alice-first")
    assert first.vm.state == "running" and [run.node for run in first.runs] == ["s1", "s2"]
    image = alice.publishVM(vm=first.vm.epr, image="alice-app")
    assert (image.owner, image.is_public, image.base, image.steps) == ("alice", False, "tiny", ["s1", "s2"])
    assert 0 < image.size < 64 * 1024 * 1024  # its changes only, not the base's 1 GiB
    vms["first"] = first.vm
    # The guest runs on, thawed: it writes to its root file system again.
    runs = alice.configureVM(vm=first.vm.epr, dag=dag("echo after > /srv/app/after && cat /srv/app/after"))
    assert [(run.ok, run.output) for run in runs] == [(True, "after\n")]
    # (The shop's registry may have caught the configure in its state poll: it is running again by the next one.)
    wait_for(lambda: site["shop"].service.describeVM(vm=first.vm.epr).state == "running", 30, "the VM running")


def test_a_create_with_the_same_prefix_starts_from_the_published_image(site: dict[str, ServerProcess],
                                                                        vms: dict[str, Any]) -> None:
    alice = site["shop"].service_as("alice")
    wanted = dag(*FIRST, CHECK)
    estimate = alice.estimateCost(dag=wanted)
    assert (estimate.image, estimate.remaining) == ("alice-app", ["s3"])
    second = alice.createVM(dag=wanted, vm_key="alice-second")
    assert second.vm.image == "alice-app"
    assert [(run.node, run.ok) for run in second.runs] == [("s3", True)]
    assert second.runs[0].output == "made by the first VM\nsettings=7\n"
    vms["second"] = second.vm


def test_another_owner_cannot_see_or_use_it(site: dict[str, ServerProcess], vms: dict[str, Any]) -> None:
    bob = site["shop"].service_as("bob")
    estimate = bob.estimateCost(dag=dag(*FIRST, CHECK))
    assert estimate.image == "tiny" and estimate.remaining == ["s1", "s2", "s3"]
    assert all("alice-app" not in (bid.reason or "") for bid in estimate.bids)
    assert all("alice-app" not in (plant.images or []) for plant in bob.listPlants())
    with pytest.raises(zeep.exceptions.Fault) as info:
        bob.createVM(dag=dag(CHECK, image="alice-app"))
    assert fault_code(info) == "Server.NoPlantAvailable" and "no cached image is named 'alice-app'" in \
        str(info.value.message)
    for call in (lambda: bob.publishVM(vm=vms["first"].epr, image="bobs"),
                 lambda: bob.unpublishImage(image="alice-app")):
        with pytest.raises(zeep.exceptions.Fault) as info:
            call()
        assert fault_code(info) in ("Client.NoSuchVM", "Client.NoSuchImage")


def test_unpublish_once_no_vm_uses_it(site: dict[str, ServerProcess], vms: dict[str, Any]) -> None:
    alice = site["shop"].service_as("alice")
    with pytest.raises(zeep.exceptions.Fault) as info:
        alice.unpublishImage(image="alice-app")
    assert fault_code(info) == "Client.ImageInUse"
    alice.collectVM(vm=vms["second"].epr)
    assert alice.unpublishImage(image="alice-app") == [site["plant"].url]
    assert alice.estimateCost(dag=dag(*FIRST, CHECK)).image == "tiny"
    alice.collectVM(vm=vms["first"].epr)
