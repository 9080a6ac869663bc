"""Publishing a VM with its running state, and clones that resume from it (fake backend; real qcow2 files).

Nothing boots here: the fake backend saves and restores a small state
document, and its fake agent records what the plant told the guest. Real
guests resumed by QEMU are tests/test_resume_guest.py's.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import plant_fixtures as pf  # noqa: E402

from vmplant_service.backends.base import VMState  # noqa: E402
from vmplant_service.backends.fake import FakeBackend  # noqa: E402
from vmplant_service.backends.fakeagent import NO_FREEZE  # noqa: E402
from vmplant_service.plant import ENTROPY_BYTES, RESUME_GUESS, Plant  # noqa: E402
from vmplant_service.publish import PUBLISHED, STATE_FILE  # noqa: E402
from vmplant_service.segment import mac_for  # noqa: E402
from vmshop_common.cost import Bid  # noqa: E402
from vmshop_common.errors import BackendError, ImageExistsError, NotSupportedError  # noqa: E402

ALICE = "alice"
IMAGE = "alices-saved"


@pytest.fixture
def built(tmp_path: Path) -> Iterator[tuple[Plant, pf.PlantParts]]:
    plant, parts = pf.make_plant(tmp_path / "p")
    yield plant, parts
    pf.shutdown_plant(parts)


@pytest.fixture
def plant(built: tuple[Plant, pf.PlantParts]) -> Plant:
    return built[0]


def backend(plant: Plant) -> FakeBackend:
    assert isinstance(plant.backend, FakeBackend)
    return plant.backend


def saved(plant: Plant, vm_id: str = "v1") -> str:
    """A VM of ALICE that ran one step, published with its state as IMAGE."""
    plant.create(pf.chain(pf.script("a", "echo a > /a")), owner=ALICE, vm_id=vm_id)
    image = plant.publish(vm_id, IMAGE, owner=ALICE, with_state=True)
    assert image.with_state and image.steps == ("a",)
    return vm_id


def published_files(plant: Plant) -> list[str]:
    root = plant.warehouse.directory / PUBLISHED
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir()) if root.exists() else []


def test_publish_with_state_saves_the_machine_beside_the_disk(plant: Plant) -> None:
    vm_id = saved(plant)
    info = plant.warehouse.images[IMAGE]
    assert info.state is not None and info.state.name == STATE_FILE and info.state.stat().st_mode & 0o077 == 0
    assert info.state_model == backend(plant).machine_model(plant._spec(vm_id, info, 128, 1, plant._paths(vm_id),
                                                                        ALICE))
    assert info.state_macs == (mac_for(vm_id, 0), mac_for(vm_id, 1))  # the user NIC, then the segment NIC
    # The VM runs on, thawed (its state was saved frozen, with its disk).
    assert backend(plant).state(vm_id) == VMState.RUNNING
    agent = backend(plant).ex_agent(vm_id)
    assert agent is not None and not agent.frozen
    assert plant.describe(vm_id).state == "running"


def test_a_clone_of_a_saved_state_resumes_and_gets_its_own_identity(plant: Plant) -> None:
    vm_id = saved(plant)
    result = plant.create(pf.chain(pf.script("b", "echo b"), start=pf.image_start(name=IMAGE)), owner=ALICE,
                          vm_id="c1")
    assert result.bid.image == IMAGE and result.bid.remaining == ("b",)
    assert "c1" in backend(plant).restored  # resumed, not booted
    record = plant.describe("c1")
    assert record.state == "running" and record.address is not None
    agent = backend(plant).ex_agent("c1")
    assert agent is not None and not agent.frozen  # thawed first
    assert len(agent.files["/dev/urandom"]) == ENTROPY_BYTES
    assert agent.time_set is not None
    identity = next(args for args in agent.execs if args[2:3] == ["vmshop-identity"])
    assert identity[3] == "c1"  # its host name (no network action names one)
    assert identity[4] == mac_for("c1", 1) and identity[5] == f"{record.address}/24"
    assert identity[6:] == [f"{mac_for(vm_id, 0)}={mac_for('c1', 0)}", f"{mac_for(vm_id, 1)}={mac_for('c1', 1)}"]
    # The identity reset ran before the DAG's remaining action.
    names = [args[2] for args in agent.execs if len(args) > 2]
    assert names.index("vmshop-identity") < names.index("vmshop-action")
    assert [run.node_id for run in plant.records.action_runs("c1")] == ["b"]
    assert plant.records.metric(f"resume_seconds:{IMAGE}") is not None
    assert plant.records.metric(f"boot_seconds:{IMAGE}") is None


def test_bids_for_an_image_with_state_use_its_resume_seconds(plant: Plant) -> None:
    saved(plant)
    request = pf.chain(pf.script("b", "echo b"), start=pf.image_start(name=IMAGE))
    booted = plant.records.metric(f"boot_seconds:{pf.IMAGE}")
    assert booted is not None  # not resumed here yet: a share of its base's boot
    assert plant.offer().image_boot_seconds[IMAGE] == round(RESUME_GUESS * booted, 6)
    plant.records.set_metric("boot_seconds", 30.0)
    plant.records.set_metric(f"boot_seconds:{pf.IMAGE}", 30.0)
    plant.records.set_metric(f"resume_seconds:{IMAGE}", 0.25)
    assert plant.offer().image_boot_seconds[IMAGE] == 0.25
    bid = plant.estimate(request, owner=ALICE)
    assert isinstance(bid, Bid) and bid.image == IMAGE
    assert [item.seconds for item in bid.items if item.source == "boot"] == [0.25]


def test_a_backend_that_cannot_resume_boots_the_image_and_bids_its_boot(plant: Plant) -> None:
    saved(plant)
    backend(plant).can_resume = False  # as UML (and libvirt) say in their capabilities
    plant.records.set_metric(f"boot_seconds:{pf.IMAGE}", 7.0)
    assert plant.offer().image_boot_seconds[IMAGE] == 7.0  # boots as its base
    plant.create(pf.chain(pf.script("b", "echo b"), start=pf.image_start(name=IMAGE)), owner=ALICE, vm_id="c2")
    assert "c2" not in backend(plant).restored and plant.describe("c2").state == "running"
    assert plant.records.metric(f"boot_seconds:{IMAGE}") is not None
    agent = backend(plant).ex_agent("c2")
    assert agent is not None and not any(args[2:3] == ["vmshop-identity"] for args in agent.execs)
    with pytest.raises(NotSupportedError, match="cannot save a guest's running state"):
        plant.publish("c2", "again", owner=ALICE, with_state=True)


def test_other_hardware_boots_instead(plant: Plant) -> None:
    saved(plant)
    plant.create(pf.chain(pf.script("b"), start=pf.image_start(name=IMAGE, memory=256)), owner=ALICE, vm_id="c3")
    assert "c3" not in backend(plant).restored and plant.describe("c3").memory == 256


def test_a_state_that_does_not_restore_boots_instead(plant: Plant) -> None:
    saved(plant)
    state = plant.warehouse.images[IMAGE].state
    assert state is not None
    state.write_text("not a state")
    plant.create(pf.chain(pf.script("b"), start=pf.image_start(name=IMAGE)), owner=ALICE, vm_id="c4")
    assert "c4" not in backend(plant).restored and plant.describe("c4").state == "running"


def test_a_failed_save_publishes_nothing_and_the_guest_runs_on(plant: Plant, monkeypatch: pytest.MonkeyPatch
                                                                ) -> None:
    plant.create(pf.chain(pf.script("a")), owner=ALICE, vm_id="v1")
    before = (published_files(plant), plant.warehouse.index_path.read_text())

    def broken(vm_id: str, fd: int, timeout: float = 60.0) -> None:
        raise BackendError("injected: the state could not be saved")

    monkeypatch.setattr(backend(plant), "save_state", broken)
    with pytest.raises(BackendError, match="injected"):
        plant.publish("v1", IMAGE, owner=ALICE, with_state=True)
    assert (published_files(plant), plant.warehouse.index_path.read_text()) == before
    assert IMAGE not in plant.warehouse.images
    agent = backend(plant).ex_agent("v1")
    assert backend(plant).state("v1") == VMState.RUNNING and agent is not None and not agent.frozen
    assert plant.describe("v1").state == "running"


def test_bad_publishes_with_state_change_nothing(plant: Plant) -> None:
    vm_id = saved(plant)
    before = (published_files(plant), plant.warehouse.index_path.read_text())
    with pytest.raises(ImageExistsError):
        plant.publish(vm_id, IMAGE, owner=ALICE, with_state=True)
    plant.create(pf.chain(pf.file_node("nf", NO_FREEZE)), owner=ALICE, vm_id="v2")
    with pytest.raises(BackendError, match="did not freeze"):
        plant.publish("v2", "other", owner=ALICE, with_state=True)
    assert (published_files(plant), plant.warehouse.index_path.read_text()) == before
    assert backend(plant).state("v2") == VMState.RUNNING


def test_a_resumed_clone_whose_guest_stays_frozen_fails_and_leaves_nothing(plant: Plant,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    saved(plant)
    from vmplant_service.agent.qga import GuestAgent
    from vmplant_service.agent.transport import AgentError

    def refuse(self: GuestAgent, timeout: float = 10.0) -> int:
        raise AgentError("a hostile guest refuses to thaw")

    monkeypatch.setattr(GuestAgent, "fsfreeze_thaw", refuse)
    address_free = plant.pool.free_count() if plant.pool is not None else 0
    with pytest.raises(Exception, match="did not reset its identity"):
        plant.create(pf.chain(pf.script("b"), start=pf.image_start(name=IMAGE)), owner=ALICE, vm_id="c5")
    assert "c5" not in backend(plant).running()
    assert not (plant.state_dir / "overlays" / "c5.qcow2").exists()
    assert (plant.pool.free_count() if plant.pool is not None else 0) == address_free
