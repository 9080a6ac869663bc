"""Publishing a VM as a cached image, and unpublishing it, on the plant (fake backend; real qcow2 files).

The disks are real (qemu-img makes the overlays and the published image's
qcow2); nothing boots. What a published image holds inside a real guest is
checked by tests/test_publish_guest.py.
"""

from __future__ import annotations

import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import plant_fixtures as pf  # noqa: E402

from vmplant_service.backends.base import VMState  # noqa: E402
from vmplant_service.backends.fakeagent import NO_FREEZE  # noqa: E402
from vmplant_service.plant import Plant  # noqa: E402
from vmplant_service.publish import PARTIAL, PUBLISHED  # noqa: E402
from vmplant_service.records import PlantRecords  # noqa: E402
from vmshop_common.cost import Bid, Decline  # noqa: E402
from vmshop_common.dag import ImageStart  # noqa: E402
from vmshop_common.errors import (  # noqa: E402
    BackendError,
    DiskFullError,
    ImageExistsError,
    ImageInUseError,
    ImageNameInvalidError,
    NoSuchImageError,
    NoSuchVMError,
    NotSupportedError,
    VMBusyError,
)

ALICE, BOB = "alice", "bob"
STEPS = [pf.script("a", "echo a > /a"), pf.file_node("b", "/etc/b.conf", "b=1")]
MORE = pf.script("c", "echo c > /c")


@pytest.fixture
def built(tmp_path: Path) -> Iterator[tuple[Plant, pf.PlantParts]]:
    plant, parts = pf.make_plant(tmp_path / "p")
    yield plant, parts
    pf.shutdown_plant(parts)


@pytest.fixture
def plant(built: tuple[Plant, pf.PlantParts]) -> Plant:
    return built[0]


def made(plant: Plant, vm_id: str = "v1", owner: str = ALICE, steps: list[str] | None = None) -> str:
    """A VM of ``owner`` made from the base image with ``steps`` (default STEPS), then configured with MORE."""
    plant.create(pf.chain(*(STEPS if steps is None else steps)), owner=owner, vm_id=vm_id)
    plant.configure(vm_id, pf.chain(MORE))
    return vm_id


def index_lines(plant: Plant) -> list[str]:
    return [line for line in plant.warehouse.index_path.read_text().splitlines() if line.strip()]


def warehouse_state(plant: Plant) -> tuple[list[str], list[str]]:
    """The index and every file under published/ (what a refused publish must leave as it was)."""
    root = plant.warehouse.directory / PUBLISHED
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir()) if root.exists() else []
    return index_lines(plant), files


def test_publish_makes_an_image_of_the_vms_changes_and_steps(plant: Plant) -> None:
    vm_id = made(plant)
    image = plant.publish(vm_id, "alices-app", owner=ALICE)
    assert (image.name, image.owner, image.public, image.base) == ("alices-app", ALICE, False, pf.IMAGE)
    assert image.steps == ("a", "b", "c")
    info = plant.warehouse.get("alices-app")
    assert info.owner == ALICE and not info.public
    assert isinstance(info.dag.start, ImageStart) and info.dag.start.name == pf.IMAGE
    assert [info.dag.nodes[n].kind for n in info.dag.topological_order()] == ["image", "script", "file", "script"]
    assert str(info.config_path) in index_lines(plant)
    disk = pf.qemu_img_info(info.disk)
    assert disk["format"] == "qcow2"
    assert disk["backing-filename"] == str(plant.warehouse.get(pf.IMAGE).disk)  # only its changes over the base
    # The guest ran on: resumed and thawed.
    assert plant.backend.state(vm_id) == VMState.RUNNING
    agent = plant.backend._vms[vm_id].agent  # type: ignore[attr-defined]
    assert agent is not None and agent.frozen is False
    assert plant.describe(vm_id).state == "running"
    plant.configure(vm_id, pf.chain(pf.script("after", "echo after")))


def test_bids_match_a_published_image_for_its_owner_only(plant: Plant) -> None:
    plant.publish(made(plant), "alices-app", owner=ALICE)
    request = pf.chain(*STEPS, MORE, pf.script("d", "echo d"))
    bid = plant.estimate(request, owner=ALICE)
    assert isinstance(bid, Bid) and bid.image == "alices-app" and bid.remaining == ("d",)
    theirs = plant.estimate(request, owner=BOB)
    assert isinstance(theirs, Bid) and theirs.image == pf.IMAGE and theirs.remaining == ("a", "b", "c", "d")
    assert plant.estimate(request).image == pf.IMAGE  # type: ignore[union-attr]  # no owner: public images only
    # Bob names it: it does not exist for him, word for word as a name that exists nowhere.
    asked = plant.estimate(pf.chain(MORE, start=pf.image_start(name="alices-app")), owner=BOB)
    nowhere = plant.estimate(pf.chain(MORE, start=pf.image_start(name="no-such-app")), owner=BOB)
    assert isinstance(asked, Decline) and isinstance(nowhere, Decline)
    assert asked.reason.replace("alices-app", "X") == nowhere.reason.replace("no-such-app", "X")
    declined = plant.estimate(pf.chain(pf.script("zzz")), owner=BOB)
    assert "alices-app" not in str(declined)
    assert "alices-app" not in plant.info()["images"]  # type: ignore[operator]
    # Alice's create from it runs only what remains.
    result = plant.create(request, owner=ALICE, vm_id="v2")
    assert result.record.image == "alices-app" and [r.name.split("-", 1)[1] for r in result.results] == ["d"]
    with pytest.raises(NoSuchImageError):
        plant.create(pf.chain(MORE, start=pf.image_start(name="alices-app")), owner=BOB, vm_id="bobs")


def test_a_public_image_serves_everyone(plant: Plant) -> None:
    plant.publish(made(plant), "shared-app", owner=ALICE, public=True)
    assert plant.warehouse.get("shared-app").public
    bid = plant.estimate(pf.chain(*STEPS, MORE), owner=BOB)
    assert isinstance(bid, Bid) and bid.image == "shared-app" and bid.remaining == ()
    assert "shared-app" in plant.info()["images"]  # type: ignore[operator]
    # A VM made from a private image cannot make a public one (its lineage would leak).
    plant.publish(made(plant, "v2"), "private-app", owner=ALICE)
    plant.create(pf.chain(*STEPS, MORE, pf.script("e"), start=pf.image_start(name="private-app")), owner=ALICE,
                 vm_id="v3")
    with pytest.raises(NotSupportedError, match="private"):
        plant.publish("v3", "leaky", public=True)


def test_unpublish_waits_until_no_vm_or_image_uses_it(plant: Plant) -> None:
    plant.publish(made(plant), "app", owner=ALICE)
    plant.create(pf.chain(*STEPS, MORE, pf.script("d")), owner=ALICE, vm_id="v2")
    plant.publish("v2", "app-plus", owner=ALICE)
    with pytest.raises(ImageInUseError, match="v2"):
        plant.unpublish("app", owner=ALICE)
    with pytest.raises(NoSuchImageError) as other:
        plant.unpublish("app-plus", owner=BOB)
    with pytest.raises(NoSuchImageError) as missing:
        plant.unpublish("nothing", owner=BOB)
    assert str(other.value).replace("app-plus", "X") == str(missing.value).replace("nothing", "X")
    with pytest.raises(NotSupportedError, match="installer"):
        plant.unpublish(pf.IMAGE)
    plant.collect("v2")
    with pytest.raises(ImageInUseError, match="image app-plus"):
        plant.unpublish("app", owner=ALICE)
    directory = plant.warehouse.get("app-plus").config_path.parent
    assert plant.unpublish("app-plus", owner=ALICE) == "app-plus"
    assert not directory.exists() and "app-plus" not in plant.warehouse.images
    assert not any("app-plus" in line for line in index_lines(plant))
    assert plant.unpublish("app") == "app"  # an admin (no owner given) may
    assert sorted(plant.warehouse.images) == [pf.IMAGE]
    assert [p.name for p in (plant.warehouse.directory / PUBLISHED).rglob("*") if p.is_file()] == []


BAD_NAMES = ["../escape", "a/b", ".hidden", "", "-dash", "x" * 65, "..", "a\nb", "abc\n", "/etc", "a b"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_are_refused_and_change_nothing(plant: Plant, name: str) -> None:
    vm_id = made(plant)
    before = warehouse_state(plant)
    with pytest.raises(ImageNameInvalidError):
        plant.publish(vm_id, name, owner=ALICE)
    with pytest.raises(ImageNameInvalidError):
        plant.unpublish(name, owner=ALICE)
    assert warehouse_state(plant) == before and plant.backend.state(vm_id) == VMState.RUNNING


def test_refusals_change_nothing(built: tuple[Plant, pf.PlantParts]) -> None:
    plant, _ = built
    vm_id = made(plant)
    plant.publish(vm_id, "taken", owner=ALICE)
    before = warehouse_state(plant)
    for name in ("taken", pf.IMAGE):
        with pytest.raises(ImageExistsError):
            plant.publish(vm_id, name, owner=ALICE)
    with pytest.raises(NoSuchVMError) as foreign:
        plant.publish(vm_id, "bobs", owner=BOB)
    with pytest.raises(NoSuchVMError) as missing:
        plant.publish("ghost", "bobs", owner=BOB)
    assert str(foreign.value).replace(vm_id, "X") == str(missing.value).replace("ghost", "X")
    plant.records.update_vm(vm_id, state="configuring")
    with pytest.raises(VMBusyError):
        plant.publish(vm_id, "busy", owner=ALICE)
    plant.records.update_vm(vm_id, state="running")
    plant.publisher.free_space = lambda path: 1024
    with pytest.raises(DiskFullError):
        plant.publish(vm_id, "full", owner=ALICE)
    plant.publisher.free_space = lambda path: 2**40
    plant.create(pf.chain(pf.network()), owner=ALICE, vm_id="netted")
    with pytest.raises(NotSupportedError, match="network"):
        plant.publish("netted", "netted-app", owner=ALICE)
    plant.create(pf.chain(pf.script("bad", "# FAKE_STATUS=0")), owner=ALICE, vm_id="failing")
    with pytest.raises(Exception):  # noqa: B017 - the action's own failure
        plant.configure("failing", pf.chain(pf.script("boom", "# FAKE_FAIL")))
    with pytest.raises(NotSupportedError, match="failed"):
        plant.publish("failing", "failing-app", owner=ALICE)
    plant.collect("failing")
    with pytest.raises(NotSupportedError, match="collected"):
        plant.publish("failing", "gone-app", owner=ALICE)
    assert warehouse_state(plant) == before
    assert plant.backend.state(vm_id) == VMState.RUNNING


def test_a_guest_that_will_not_freeze_is_not_published_and_runs_on(plant: Plant) -> None:
    vm_id = made(plant, steps=[pf.file_node("nofreeze", NO_FREEZE, "1")])
    before = warehouse_state(plant)
    with pytest.raises(BackendError, match="freeze"):
        plant.publish(vm_id, "unfrozen", owner=ALICE)
    assert warehouse_state(plant) == before
    assert plant.backend.state(vm_id) == VMState.RUNNING
    assert not list((plant.state_dir / "publishing").iterdir())
    plant.configure(vm_id, pf.chain(pf.script("still", "echo still")))


def test_configure_waits_for_a_publish(plant: Plant) -> None:
    vm_id = made(plant)
    plant._publishing[vm_id] = "in-progress"
    with pytest.raises(VMBusyError):
        plant.configure(vm_id, pf.chain(pf.script("x")))
    with pytest.raises(VMBusyError):
        plant.publish(vm_id, "second", owner=ALICE)
    del plant._publishing[vm_id]


def test_a_restart_sweeps_what_a_killed_publish_left(built: tuple[Plant, pf.PlantParts]) -> None:
    plant, parts = built
    vm_id = made(plant)
    plant.publish(vm_id, "kept", owner=ALICE)
    root = plant.publisher.root
    partial = root / f".half{PARTIAL}0123"
    partial.mkdir()
    (partial / "disk.qcow2").write_bytes(b"half")
    (root / "kept" / ".image.xml.0123abcd.tmp").write_text("<half")  # a set_public killed before its rename
    unlisted = root / "renamed-not-listed"  # killed between the rename and the index
    unlisted.mkdir()
    (unlisted / "image.xml").write_text("<image/>")
    plant.backend.pause(vm_id)  # killed while the guest was paused and frozen
    (plant.state_dir / "publishing" / vm_id).touch()
    agent = plant.backend._vms[vm_id].agent  # type: ignore[attr-defined]
    restarted = pf.restart_plant(plant, parts)
    assert restarted.recover()["adopted"] == [vm_id]
    assert sorted(p.name for p in root.iterdir()) == ["kept"]
    assert sorted(p.name for p in (root / "kept").iterdir()) == ["disk.qcow2", "image.xml"]
    assert "kept" in restarted.warehouse.images
    assert restarted.backend.state(vm_id) == VMState.RUNNING
    assert not list((restarted.state_dir / "publishing").iterdir())
    assert agent is not None
    restarted.configure(vm_id, pf.chain(pf.script("after-restart")))


def test_records_of_schema_2_gain_the_step_column(tmp_path: Path) -> None:
    path = tmp_path / "r.sqlite3"
    PlantRecords(path).close()
    with sqlite3.connect(path) as db:  # back to what schema 2 had
        db.execute("ALTER TABLE action_runs DROP COLUMN step")
        db.execute("DELETE FROM schema_version")
        db.execute("INSERT INTO schema_version VALUES (2)")
        db.execute("INSERT INTO action_runs (vm_id, node_id, digest, kind, started, seconds, output, ok) "
                   "VALUES ('old', 'a', 'd', 'script', 1, 1, '', 1)")
    db.close()
    with PlantRecords(path) as records:
        assert records.schema_version == 3
        assert [run.step for run in records.action_runs("old")] == [""]


def test_a_vm_whose_steps_were_not_kept_cannot_be_published(plant: Plant) -> None:
    vm_id = made(plant)
    with plant.records._lock:
        plant.records._conn().execute("UPDATE action_runs SET step = '' WHERE vm_id = ?", (vm_id,))
    with pytest.raises(NotSupportedError, match="recorded before"):
        plant.publish(vm_id, "old", owner=ALICE)


def test_an_image_name_is_never_a_path(plant: Plant, tmp_path: Path) -> None:
    vm_id = made(plant)
    image = plant.publish(vm_id, "a..b", owner=ALICE)
    info: Any = plant.warehouse.get(image.name)
    assert info.config_path.parent.parent == plant.publisher.root


def test_a_backend_that_cannot_pause_cannot_publish(plant: Plant, monkeypatch: pytest.MonkeyPatch) -> None:
    """UML's capabilities say publish False (its pause is the base class's NotSupportedError)."""
    from dataclasses import replace

    vm_id = made(plant)
    caps = replace(plant.backend.capabilities(), name="uml", publish=False)
    monkeypatch.setattr(plant.backend, "capabilities", lambda: caps)
    before = warehouse_state(plant)
    with pytest.raises(NotSupportedError, match="cannot publish"):
        plant.publish(vm_id, "on-uml", owner=ALICE)
    assert plant.info()["publish"] is False
    assert warehouse_state(plant) == before and plant.backend.state(vm_id) == VMState.RUNNING


def test_the_disk_filling_up_while_the_guest_is_still_is_a_full_disk(plant: Plant) -> None:
    """The room is checked again once the guest is paused: what it wrote meanwhile counts."""
    vm_id = made(plant)
    checks: list[int] = []

    def free(path: Path) -> int:
        checks.append(1)
        return 2**40 if len(checks) == 1 else 1024

    plant.publisher.free_space = free
    before = warehouse_state(plant)
    with pytest.raises(DiskFullError):
        plant.publish(vm_id, "grew", owner=ALICE)
    assert len(checks) == 2 and warehouse_state(plant) == before
    assert plant.backend.state(vm_id) == VMState.RUNNING
    agent = plant.backend._vms[vm_id].agent  # type: ignore[attr-defined]
    assert agent is not None and agent.frozen is False


def test_step_ids_that_are_not_node_ids_are_renamed() -> None:
    from vmplant_service.publish import image_dag
    from vmshop_common.dag import ScriptAction

    steps = [("tiny:os", ScriptAction("x", body="a")), ("base", ScriptAction("y", body="b")),
             ("run", ScriptAction("z", body="c")), ("run", ScriptAction("w", body="d"))]
    dag = image_dag("tiny", steps)
    assert dag.topological_order() == ["base", "step1", "base-2", "run", "run-2"]


def test_an_admin_makes_an_image_public_and_private_again(plant: Plant) -> None:
    plant.publish(made(plant), "app", owner=ALICE)
    request = pf.chain(*STEPS, MORE)
    assert plant.estimate(request, owner=BOB).image == pf.IMAGE  # type: ignore[union-attr]
    shown = plant.set_public("app", True)
    assert shown.public and shown.owner == ALICE and shown.steps == ("a", "b", "c") and shown.base == pf.IMAGE
    info = plant.warehouse.get("app")
    assert info.public and 'public="true"' in info.config_path.read_text()
    assert plant.estimate(request, owner=BOB).image == "app"  # type: ignore[union-attr]
    assert "app" in plant.info()["images"]  # type: ignore[operator]
    # A public image's base must stay public; an image made from a private one cannot be public.
    plant.create(pf.chain(*STEPS, MORE, pf.script("d"), start=pf.image_start(name="app")), owner=ALICE, vm_id="v2")
    plant.publish("v2", "app-plus", owner=ALICE, public=True)
    with pytest.raises(NotSupportedError, match="app-plus"):
        plant.set_public("app", False)
    plant.set_public("app-plus", False)
    assert plant.set_public("app", False).public is False
    with pytest.raises(NotSupportedError, match="private image 'app'"):
        plant.set_public("app-plus", True)
    assert plant.estimate(request, owner=BOB).image == pf.IMAGE  # type: ignore[union-attr]
    with pytest.raises(NotSupportedError, match="installer"):
        plant.set_public(pf.IMAGE, False)
    with pytest.raises(NoSuchImageError):
        plant.set_public("nothing", True)
    assert not [p for p in plant.publisher.root.rglob("*.tmp")]


def test_a_pause_that_fails_still_resumes_the_guest(plant: Plant, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pause that stopped the guest and then failed (a QMP answer lost) is resumed all the same, and thawed."""
    vm_id = made(plant)
    real_pause = plant.backend.pause

    def pause_then_fail(vm: str, timeout: float = 30.0) -> None:
        real_pause(vm, timeout)
        raise BackendError("QMP stop: no answer")

    monkeypatch.setattr(plant.backend, "pause", pause_then_fail)
    before = warehouse_state(plant)
    with pytest.raises(BackendError, match="no answer"):
        plant.publish(vm_id, "unpaused", owner=ALICE)
    assert warehouse_state(plant) == before
    assert plant.backend.state(vm_id) == VMState.RUNNING
    agent = plant.backend._vms[vm_id].agent  # type: ignore[attr-defined]
    assert agent is not None and agent.frozen is False
    assert not list((plant.state_dir / "publishing").iterdir())


def test_publishes_at_once_each_list_their_image(built: tuple[Plant, pf.PlantParts]) -> None:
    """Four VMs published at once: every image is listed, the index holds each once, no temporary file is left."""
    import threading

    plant, _ = built
    vm_ids = [made(plant, f"c{n}", steps=[pf.script(f"only{n}", f"echo {n}")]) for n in range(4)]
    errors: list[BaseException] = []

    def publish(vm_id: str) -> None:
        try:
            plant.publish(vm_id, f"img-{vm_id}", owner=ALICE)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=publish, args=(vm_id,)) for vm_id in vm_ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert sorted(n for n in plant.warehouse.images if n.startswith("img-")) == [f"img-{v}" for v in vm_ids]
    lines = index_lines(plant)
    assert len(lines) == len(set(lines)) == 5
    assert not list(plant.warehouse.directory.glob(".index.txt.tmp.*"))
