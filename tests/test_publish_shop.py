"""publishVM and unpublishImage through the shop, with real plant servers on the fake backend, over real SOAP.

Each plant has a warehouse of its own (its index lists the real tiny image's
file, whose qcow2 the fake backend clones but never boots), so what the
tests publish never reaches the shared warehouse. The identities are the
test PKI's: alice and bob (users), admin.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zeep.exceptions
from servers import ServerProcess, fault_code, host_port, start_plant, start_shop, wait_for

from vmshop_common.dagxml import DAG_NS

pytestmark = pytest.mark.integration


def dag(*bodies: str, image: str = "tiny") -> str:
    """A request: the image, then one script per body, in a chain."""
    nodes = "".join(f'<script id="s{n}">{body}</script>' for n, body in enumerate(bodies, start=1))
    ids = ["start"] + [f"s{n}" for n in range(1, len(bodies) + 1)]
    edges = "".join(f'<edge from="{a}" to="{b}"/>' for a, b in zip(ids, ids[1:], strict=False))
    return (f'<vm xmlns="{DAG_NS}"><nodes><image id="start" name="{image}"/>{nodes}</nodes>'
            f"<edges>{edges}</edges></vm>")


APP = ("echo one > /one", "echo two > /two")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, warehouse_dir: Path) -> Iterator[dict[str, ServerProcess]]:
    base = tmp_path_factory.mktemp("publish")
    made: dict[str, ServerProcess] = {}
    try:
        for name in ("p1", "p2"):
            warehouse = base / f"{name}-warehouse"
            warehouse.mkdir()
            (warehouse / "index.txt").write_text(f"{(warehouse_dir / 'tiny' / 'image.xml').resolve()}\n")
            # p2 boots slower: the shop creates on p1 unless an image there is worth less than p2's base.
            made[name] = start_plant(base / name, warehouse, name=name, backend="fake", network="none",
                                     metrics={"boot_seconds": 1.0 if name == "p1" else 1.5,
                                              "clone_seconds": 0.02})
        made["shop"] = start_shop(base / "shop", [host_port(made["p1"]), host_port(made["p2"])])
        yield made
    finally:
        for server in made.values():
            server.cleanup()


def refused(call: Any, *args: Any, **kwargs: Any) -> tuple[str, str]:
    with pytest.raises(zeep.exceptions.Fault) as info:
        call(*args, **kwargs)
    return fault_code(info), str(info.value.message)


def test_publish_then_a_create_with_the_same_prefix_runs_only_the_rest(site: dict[str, ServerProcess]) -> None:
    alice = site["shop"].service_as("alice")
    first = alice.createVM(dag=dag(*APP), vm_key="alice-first")
    assert first.plant == site["p1"].url and first.vm.state == "running"
    image = alice.publishVM(vm=first.vm.epr, image="alice-app")
    assert (image.name, image.plant, image.owner, image.is_public, image.base) == ("alice-app", site["p1"].url,
                                                                                 "alice", False, "tiny")
    assert image.steps == ["s1", "s2"] and image.size > 0
    wanted = dag(*APP, "echo three > /three")
    estimate = alice.estimateCost(dag=wanted)
    assert (estimate.plant, estimate.image, estimate.remaining) == (site["p1"].url, "alice-app", ["s3"])
    second = alice.createVM(dag=wanted, vm_key="alice-second")
    assert second.vm.image == "alice-app" and [run.node for run in second.runs] == ["s3"]
    code, _ = refused(alice.unpublishImage, image="alice-app")
    assert code == "Client.ImageInUse"
    alice.collectVM(vm=second.vm.epr)
    assert alice.unpublishImage(image="alice-app") == [site["p1"].url]
    assert alice.estimateCost(dag=wanted).image == "tiny"
    alice.collectVM(vm=first.vm.epr)


def test_another_owner_cannot_see_or_use_a_private_image(site: dict[str, ServerProcess]) -> None:
    alice, bob = site["shop"].service_as("alice"), site["shop"].service_as("bob")
    vm = alice.createVM(dag=dag(*APP), vm_key="alice-private").vm
    alice.publishVM(vm=vm.epr, image="alice-secret")
    estimate = bob.estimateCost(dag=dag(*APP))
    assert estimate.image == "tiny" and estimate.remaining == ["s1", "s2"]
    named = bob.estimateCost(dag=dag("true", image="alice-secret"))
    nowhere = bob.estimateCost(dag=dag("true", image="nowhere-image"))
    assert named.plant is None and nowhere.plant is None
    reasons = [bid.reason for bid in named.bids]
    assert reasons == [reason.replace("nowhere-image", "alice-secret") for reason in
                       (bid.reason for bid in nowhere.bids)]
    for plant in bob.listPlants():
        assert "alice-secret" not in (plant.images or [])
    code, _ = refused(bob.createVM, dag=dag("true", image="alice-secret"))
    assert code == "Server.NoPlantAvailable"
    # Bob cannot publish alice's VM: it does not exist to him, word for word as a key that exists nowhere.
    code, message = refused(bob.publishVM, vm=vm.epr, image="bobs-copy")
    ghost = {"Address": vm.epr.Address, "VMKey": "no-such-vm"}
    missing_code, missing_message = refused(bob.publishVM, vm=ghost, image="bobs-copy")
    assert code == missing_code == "Client.NoSuchVM"
    assert message.replace("alice-private", "KEY") == missing_message.replace("no-such-vm", "KEY")
    code, message = refused(bob.unpublishImage, image="alice-secret")
    assert code == "Client.NoSuchImage" and "alice-secret" in message
    # An admin may make an image public; alice may not.
    code, _ = refused(alice.publishVM, vm=vm.epr, image="alice-public", is_public=True)
    assert code == "Client.NotAuthorized"
    admin = site["shop"].service_as("admin")
    public = admin.publishVM(vm=vm.epr, image="for-everyone", is_public=True)
    assert public.owner == "alice" and public.is_public is True
    assert bob.estimateCost(dag=dag(*APP)).image == "for-everyone"
    assert "for-everyone" in site["p1"].service.plantInfo().images
    # Made public afterwards, by an admin only; and private again.
    code, _ = refused(alice.setImagePublic, image="alice-secret", is_public=True)
    assert code == "Client.NotAuthorized"
    assert admin.setImagePublic(image="alice-secret", is_public=True) == [site["p1"].url]
    assert "alice-secret" in site["p1"].service.plantInfo().images
    assert admin.setImagePublic(image="alice-secret", is_public=False) == [site["p1"].url]
    assert "alice-secret" not in site["p1"].service.plantInfo().images
    code, _ = refused(admin.setImagePublic, image="no-such-image", is_public=True)
    assert code == "Client.NoSuchImage"
    alice.collectVM(vm=vm.epr)
    assert admin.unpublishImage(image="for-everyone") == [site["p1"].url]
    assert alice.unpublishImage(image="alice-secret") == [site["p1"].url]


@pytest.mark.parametrize("name", ["../../etc/passwd", "a/b", ".", "..", "", " ", "x" * 65, "-rf", "tiny\n"])
def test_bad_image_names(site: dict[str, ServerProcess], name: str) -> None:
    alice = site["shop"].service_as("alice")
    vm = alice.createVM(dag=dag("true")).vm
    try:
        code, message = refused(alice.publishVM, vm=vm.epr, image=name)
        assert code == "Client.ImageNameInvalid", message
        code, _ = refused(alice.unpublishImage, image=name)
        assert code == "Client.ImageNameInvalid"
    finally:
        alice.collectVM(vm=vm.epr)


def test_a_name_in_use_and_a_vm_that_is_not_running(site: dict[str, ServerProcess]) -> None:
    alice = site["shop"].service_as("alice")
    vm = alice.createVM(dag=dag("true")).vm
    code, _ = refused(alice.publishVM, vm=vm.epr, image="tiny")
    assert code == "Client.ImageExists"
    alice.collectVM(vm=vm.epr)
    code, _ = refused(alice.publishVM, vm=vm.epr, image="after-collect")
    assert code == "Client.NotSupported"
    code, _ = refused(site["p1"].service_as("alice").publishVM, vm_id=vm.plant_vm_id, image="direct")
    assert code == "Client.NotAuthorized"  # a user never reaches a plant


def test_a_plant_killed_in_the_middle_of_a_publish_lists_no_half_image(
        tmp_path: Path, warehouse_dir: Path) -> None:
    """SIGKILL while the guest is paused for the copy: after the restart the index lists no new image, nothing of
    the publish is left in the warehouse, and the VM runs again (resumed, thawed) and can be published."""
    warehouse = tmp_path / "warehouse"
    warehouse.mkdir()
    index = warehouse / "index.txt"
    index.write_text(f"{(warehouse_dir / 'tiny' / 'image.xml').resolve()}\n")
    plant = start_plant(tmp_path / "plant", warehouse, name="killed", backend="fake", network="none",
                        backend_options={"pause_seconds": "60"})
    try:
        vm = plant.service.createVM(dag=dag(*APP), owner="alice", vm_id="victim").vm
        caller = plant.client(timeout=120, keep=False).create_service(plant.binding, plant.url)
        outcome: list[Any] = []
        worker = threading.Thread(target=lambda: outcome.append(_try(caller.publishVM, vm_id=vm.vm_id,
                                                                     image="half", owner="alice")))
        worker.start()
        marker = plant.state_dir / "publishing" / vm.vm_id
        wait_for(marker.exists, 30, "the publish to pause the guest")
        published = warehouse / "published" / "killed"
        assert [p.name for p in published.iterdir() if ".partial-" in p.name]  # the copy was under way
        plant.stop(signal.SIGKILL)
        worker.join(60)
        assert outcome and isinstance(outcome[0], Exception)
        assert index.read_text().splitlines() == [str((warehouse_dir / "tiny" / "image.xml").resolve())]
        plant.start()
        plant.client()
        assert list(published.iterdir()) == [] and not marker.exists()
        assert plant.service.describeVM(vm_id=vm.vm_id).state == "running"
        assert "half" not in (plant.service.plantInfo().images or [])
        plant.stop()
        # Once paused for a moment only, the same VM publishes.
        config = tmp_path / "plant" / "configuration_vmplant.xml"
        config.write_text(config.read_text().replace('value="60"', 'value="0"'))
        plant.start()
        plant.client()
        made = plant.service.publishVM(vm_id=vm.vm_id, image="half", owner="alice")
        assert made.name == "half" and made.steps == ["s1", "s2"]
        assert len(index.read_text().splitlines()) == 2
    finally:
        plant.cleanup()


def _try(call: Any, **kwargs: Any) -> Any:
    try:
        return call(**kwargs)
    except Exception as exc:  # noqa: BLE001 - the test looks at what it was
        return exc


def test_publish_with_state_then_clones_resume_and_are_priced_so(site: dict[str, ServerProcess]) -> None:
    alice = site["shop"].service_as("alice")
    first = alice.createVM(dag=dag(*APP), vm_key="alice-stateful")
    image = alice.publishVM(vm=first.vm.epr, image="alice-saved", with_state=True)
    assert (image.name, image.plant, image.with_state) == ("alice-saved", first.plant, True)
    wanted = dag("echo resumed", image="alice-saved")
    estimate = alice.estimateCost(dag=wanted)
    # The shop prices with the plant's offer: the image's boot figure there is its resume seconds (not resumed
    # yet: a share of its base's boot), well under the plant's boot.
    boots = [item.seconds for item in estimate.items if item.source == "boot"]
    assert estimate.image == "alice-saved" and len(boots) == 1 and boots[0] < 1.0
    clone = alice.createVM(dag=wanted, vm_key="alice-resumed")
    assert clone.vm.image == "alice-saved" and [run.ok for run in clone.runs] == [True]
    alice.collectVM(vm=clone.vm.epr)
    assert alice.unpublishImage(image="alice-saved") == [first.plant]
    alice.collectVM(vm=first.vm.epr)
