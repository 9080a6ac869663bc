"""The plant (vmplant_service.plant) on the fake backend, and its SOAP service.

Every plant lives in the test's tmp_path (``plant_fixtures``): a one-image
warehouse whose disk is a real qcow2 (clones are real overlays made with
qemu-img), an ip.txt pool, a data store, SQLite records and a FakeBackend
that plays the guest's agent on the real channel protocol. Nothing runs in
a guest, nothing boots.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# soap_harness and plant_fixtures live next to this file; import them whatever pytest's import mode.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from vmshop_common.soap import compat  # noqa: F401, E402  (before spyne)

# isort: split
import plant_fixtures as pf  # noqa: E402
import soap_harness  # noqa: E402
import zeep  # noqa: E402
import zeep.exceptions  # noqa: E402
from pki import test_pki  # noqa: E402

from vmplant_service import channel as channel_module  # noqa: E402
from vmplant_service.plant import Plant  # noqa: E402
from vmshop_common.authz import AuthorizationFile  # noqa: E402
from vmshop_common.cost import Bid, Decline  # noqa: E402
from vmshop_common.dagxml import load_dag  # noqa: E402
from vmshop_common.errors import (  # noqa: E402
    ActionFailedError,
    BackendError,
    CapacityExhaustedError,
    DagInvalidError,
    DeclinedError,
    DoctypeRefusedError,
    NoSuchImageError,
    NoSuchVMError,
    NotSupportedError,
    PoolExhaustedError,
    SchemaInvalidError,
)

DAGS = Path(__file__).resolve().parent / "dags"


@pytest.fixture
def built(tmp_path: Path) -> Iterator[tuple[Plant, pf.PlantParts]]:
    plant, parts = pf.make_plant(tmp_path / "p")
    yield plant, parts
    pf.shutdown_plant(parts)


@pytest.fixture
def plant(built: tuple[Plant, pf.PlantParts]) -> Plant:
    return built[0]


@pytest.fixture
def parts(built: tuple[Plant, pf.PlantParts]) -> pf.PlantParts:
    return built[1]


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Any]:
    """make(**options) -> (plant, parts): more plants for one test, all shut down at its end."""
    made: list[pf.PlantParts] = []

    def factory(**options: Any) -> tuple[Plant, pf.PlantParts]:
        plant, parts = pf.make_plant(tmp_path / f"p{len(made)}", **options)
        made.append(parts)
        return plant, parts

    yield factory
    for parts in made:
        pf.shutdown_plant(parts)


def here_line(path: Path) -> int:
    """The line of a sample DAG marked ``<!-- here -->``."""
    return next(n for n, line in enumerate(path.read_text().splitlines(), 1) if "<!-- here -->" in line)


def snapshot(plant: Plant) -> dict[str, Any]:
    """Everything a create could leave behind: records, files under the state dir, pool, guests."""
    state = Path(plant.config.state_dir)
    return {
        "records": [(r.vm_id, r.state) for r in plant.list_vms(include_collected=True)],
        "files": sorted(str(p.relative_to(state)) for sub in ("overlays", "run")
                        for p in (state / sub).rglob("*")),
        "pool": [(e.address, e.holder) for e in plant.pool.entries()] if plant.pool is not None else None,
        "running": plant.backend.running(),
    }


def assert_nothing_left(plant: Plant, vm_id: str) -> None:
    """A failed create of ``vm_id`` left nothing: no record, no files, no address, no guest."""
    with pytest.raises(NoSuchVMError):
        plant.records.get_vm(vm_id)
    assert plant.records.action_runs(vm_id) == []
    state = Path(plant.config.state_dir)
    assert not (state / "overlays" / f"{vm_id}.qcow2").exists()
    assert not (state / "run" / vm_id).exists()
    if plant.pool is not None:
        assert plant.pool.held_by(vm_id) is None
    assert vm_id not in plant.backend.running()


# Estimate --------------------------------------------------------------------------


def test_estimate_bids_with_breakdown(plant: Plant) -> None:
    bid = plant.estimate(pf.chain(pf.network(), pf.mount(), pf.script("a", cost=7), pf.file_node("f", "/etc/x")))
    assert isinstance(bid, Bid)
    assert bid.image == pf.IMAGE
    assert bid.remaining == ("net", "data", "a", "f")
    assert bid.matched == 1
    by_node = {item.node: item for item in bid.items if item.node}
    assert by_node["a"].source == "hint" and by_node["a"].seconds == 7.0
    assert by_node["net"].source == "default" and by_node["data"].source == "default"
    assert [i.source for i in bid.items if i.node is None][:1] == ["clone"]
    assert bid.cost == pytest.approx(sum(item.seconds for item in bid.items))


def test_estimate_of_a_blank_request_matches_the_image(plant: Plant) -> None:
    """A request starting from blank hardware that repeats the image's steps clones the image."""
    bid = plant.estimate(pf.chain(pf.script("os", pf.OS_SCRIPT), pf.script("a"), start=pf.blank()))
    assert isinstance(bid, Bid)
    assert (bid.image, bid.remaining, bid.matched) == (pf.IMAGE, ("a",), 1)


def test_history_beats_hint_after_a_run(plant: Plant) -> None:
    dag = pf.chain(pf.script("a", "echo measured", cost=42))
    before = plant.estimate(dag)
    assert isinstance(before, Bid)
    item = next(i for i in before.items if i.node == "a")
    assert (item.source, item.seconds) == ("hint", 42.0)
    plant.create(dag)
    after = plant.estimate(dag)
    assert isinstance(after, Bid)
    item = next(i for i in after.items if i.node == "a")
    assert item.source == "history"
    assert item.seconds < 42.0
    assert after.cost < before.cost
    # the measurements of the clone and the boot are taken too
    assert plant.records.metric("clone_seconds") is not None
    assert plant.records.metric("boot_seconds") is not None


def test_decline_unknown_image(plant: Plant) -> None:
    dag = pf.chain(pf.script("a"), start=pf.image_start(name="nosuch"))
    result = plant.estimate(dag)
    assert isinstance(result, Decline)
    assert "nosuch" in result.reason
    before = snapshot(plant)
    with pytest.raises(NoSuchImageError, match="nosuch"):
        plant.create(dag)
    assert snapshot(plant) == before


def test_decline_network_without_pool(make: Any) -> None:
    plant, _ = make(pool_size=None)
    dag = pf.chain(pf.network("net1"))
    result = plant.estimate(dag)
    assert isinstance(result, Decline)
    assert "net1" in result.reason and "network" in result.reason
    with pytest.raises(DeclinedError, match="net1"):
        plant.create(dag)
    assert plant.list_vms(include_collected=True) == []


def test_decline_mount_without_datastore(make: Any) -> None:
    plant, _ = make(datastore=False)
    result = plant.estimate(pf.chain(pf.mount("m1")))
    assert isinstance(result, Decline)
    assert "m1" in result.reason and "data store" in result.reason


def test_decline_mount_of_missing_source(plant: Plant) -> None:
    result = plant.estimate(pf.chain(pf.mount("m1", source="nothere")))
    assert isinstance(result, Decline)
    assert "nothere" in result.reason
    assert isinstance(plant.estimate(pf.chain(pf.mount("m1"))), Bid)


def test_decline_memory_above_capacity(make: Any) -> None:
    plant, _ = make(capacity_memory=512)
    result = plant.estimate(pf.chain(pf.script("a"), start=pf.image_start(memory=1024)))
    assert isinstance(result, Decline)
    assert "1024 MiB" in result.reason and "512" in result.reason
    assert isinstance(plant.estimate(pf.chain(pf.script("a"), start=pf.image_start(memory=512))), Bid)


def test_decline_architecture_not_supported(plant: Plant) -> None:
    result = plant.estimate(pf.chain(pf.script("a"), start=pf.blank(arch="aarch64")))
    assert isinstance(result, Decline)
    assert "aarch64" in result.reason
    with pytest.raises(DeclinedError, match="aarch64"):
        plant.create(pf.chain(pf.script("a"), start=pf.blank(arch="aarch64")))


def test_estimate_of_an_invalid_dag_raises(plant: Plant) -> None:
    with pytest.raises(DagInvalidError):
        plant.estimate((DAGS / "cycle.xml").read_text())
    with pytest.raises(SchemaInvalidError):
        plant.estimate((DAGS / "duplicate_id.xml").read_text())


# Create ------------------------------------------------------------------------------


def test_create_makes_a_running_vm_with_its_records(plant: Plant, parts: pf.PlantParts) -> None:
    dag = pf.chain(pf.network(), pf.mount(), pf.script("a", cost=3), pf.file_node("conf", "/etc/app.conf"),
                   attributes={"purpose": "tests", "team": "grid"})
    made = plant.create(dag, owner="alice", vm_id="vm-1")
    record = made.record
    assert record.vm_id == "vm-1" and record.owner == "alice"
    assert record.state == "running"
    assert (record.image, record.memory, record.vcpus, record.disk, record.arch) == (pf.IMAGE, 128, 1, 1, "x86_64")
    assert record.address == "10.77.0.10"  # the first address of the pool
    assert plant.pool is not None and plant.pool.holder("10.77.0.10") == "vm-1"
    assert record.attributes == {"purpose": "tests", "team": "grid"}
    assert record.error is None and record.collected is None
    assert record.mac and record.mac.startswith("52:54:00:")
    assert record.host_port
    # the clone: a qcow2 overlay backed by the image's disk
    overlay = Path(record.overlay)
    assert overlay.is_file() and overlay.parent == parts.state_dir / "overlays"
    info = pf.qemu_img_info(overlay)
    assert info["format"] == "qcow2"
    image_disk = (parts.warehouse_dir / pf.IMAGE / "disk.qcow2").resolve()
    assert Path(info["full-backing-filename"]) == image_disk
    assert info["backing-filename-format"] == "qcow2"
    # the channel: the guest agent's socket in the VM's own run directory; no shared directory at all
    assert (Path(record.run_dir) / "qga.sock").is_socket() and not (parts.state_dir / "channels").exists()
    assert load_dag(record.dag_xml).attributes == {"purpose": "tests", "team": "grid"}
    assert plant.backend.running() == ["vm-1"]
    # the actions' runs, in bid.remaining order, with their durations
    assert made.bid.remaining == ("net", "data", "a", "conf")
    assert [r.name for r in made.results] == ["0001-net", "0002-data", "0003-a", "0004-conf"]
    assert all(r.ok and not r.timed_out for r in made.results)
    runs = plant.records.action_runs("vm-1")
    assert [run.node_id for run in runs] == list(made.bid.remaining)
    assert [run.kind for run in runs] == ["network", "mount", "script", "file"]
    assert all(run.ok and run.status == 0 and run.seconds >= 0 and run.output.startswith("fake:") for run in runs)
    assert all(run.started >= record.created for run in runs)
    # what the plant says about it
    assert plant.describe("vm-1") == record
    assert [r.vm_id for r in plant.list_vms()] == ["vm-1"]


def test_created_vm_gets_its_own_id_and_the_next_address(plant: Plant) -> None:
    first = plant.create(pf.chain(pf.script("a"))).record
    second = plant.create(pf.chain(pf.script("a"))).record
    assert first.vm_id != second.vm_id
    assert re.fullmatch(r"[0-9a-f]{12}", first.vm_id)
    assert (first.address, second.address) == ("10.77.0.10", "10.77.0.11")


def test_remaining_follows_the_dag_order(plant: Plant) -> None:
    """A diamond: b and c both wait for a, d waits for both; ties go in document order."""
    nodes = [pf.image_start(), pf.script("d"), pf.script("c"), pf.script("b"), pf.script("a")]
    edges = [("base", "a"), ("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")]
    made = plant.create(pf.vm_xml(nodes, edges))
    assert made.bid.remaining == ("a", "c", "b", "d")
    assert [r.name.split("-", 1)[1] for r in made.results] == ["a", "c", "b", "d"]
    assert [run.node_id for run in plant.records.action_runs(made.record.vm_id)] == ["a", "c", "b", "d"]


def test_create_grows_the_disk_when_asked(plant: Plant) -> None:
    made = plant.create(pf.chain(pf.script("os", pf.OS_SCRIPT), start=pf.blank(disk=3)))
    assert made.bid.remaining == ()
    assert made.record.disk == 3
    assert pf.qemu_img_info(Path(made.record.overlay))["virtual-size"] == 3 * 1024 ** 3


def test_failed_action_leaves_nothing(plant: Plant) -> None:
    before = snapshot(plant)
    dag = pf.chain(pf.network(), pf.script("ok"), pf.script("broken", "echo FAKE_FAIL"), pf.script("never"))
    with pytest.raises(ActionFailedError) as caught:
        plant.create(dag, vm_id="doomed")
    error = caught.value
    assert error.code == "Server.ActionFailed"
    assert "'broken'" in error.message and "status 1" in error.message
    assert error.node == "broken"
    assert_nothing_left(plant, "doomed")
    assert snapshot(plant) == before
    assert plant.pool is not None and plant.pool.free_count() == 4
    # the plant is fine afterwards, and the address comes back
    assert plant.create(pf.chain(pf.script("ok"))).record.address == "10.77.0.10"


def test_action_exit_status_is_reported(plant: Plant) -> None:
    with pytest.raises(ActionFailedError, match=r"'three' \(script\) exited with status 3"):
        plant.create(pf.chain(pf.script("three", "echo FAKE_STATUS=3")), vm_id="st")
    assert_nothing_left(plant, "st")


def test_action_timeout_is_reported(plant: Plant) -> None:
    with pytest.raises(ActionFailedError, match=r"'slow' \(script\) timed out after 1 s"):
        plant.create(pf.chain(pf.script("slow", "FAKE_HANG", timeout=1)), vm_id="to")
    assert_nothing_left(plant, "to")


def test_failed_start_leaves_nothing(make: Any) -> None:
    plant, _ = make(backend="fake-failstart")
    before = snapshot(plant)
    with pytest.raises(BackendError, match="injected start failure") as caught:
        plant.create(pf.chain(pf.network(), pf.script("a")), vm_id="nostart")
    assert caught.value.code == "Server.BackendError"
    assert_nothing_left(plant, "nostart")
    assert snapshot(plant) == before
    assert plant.backend.running() == []


def test_a_mute_control_socket_is_not_a_dead_guest(plant: Plant, monkeypatch: pytest.MonkeyPatch) -> None:
    """UNKNOWN (e.g. QMP timed out on a busy host) while booting or configuring: the plant waits on."""
    from vmplant_service.backends.base import VMState

    real_state = plant.backend.state
    monkeypatch.setattr(plant.backend, "state", lambda vm_id: VMState.UNKNOWN)
    monkeypatch.setattr(channel_module, "ALIVE_EVERY", 0.0)
    made = plant.create(pf.chain(pf.script("a")), vm_id="mute")
    assert made.record.state == "running"
    plant.configure("mute", pf.chain(pf.script("b")))
    assert plant.describe("mute").state == "running"
    monkeypatch.setattr(plant.backend, "state", real_state)
    plant.collect("mute")


def test_a_guest_that_stops_while_booting_names_its_console(make: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The error carries the console's last line (why a guest died is in it), and nothing is left."""
    from vmplant_service.backends.base import VMState

    plant, _ = make()
    monkeypatch.setattr(channel_module, "ALIVE_EVERY", 0.0)
    real_start = plant.backend.start

    def start_then_die(spec: Any) -> None:
        real_start(spec)
        console = "booting\nvmshop-initramfs: root device /dev/vda did not appear\n"
        (Path(spec.run_dir) / "console.log").write_text(console)
        plant.backend.ex_crash(spec.vm_id)  # type: ignore[attr-defined]

    monkeypatch.setattr(plant.backend, "start", start_then_die)
    monkeypatch.setattr(plant.backend, "state", lambda vm_id: VMState.STOPPED)
    with pytest.raises(BackendError, match="root device /dev/vda did not appear"):
        plant.create(pf.chain(pf.script("a")), vm_id="panics")
    assert_nothing_left(plant, "panics")


def test_capacity_in_vms(make: Any) -> None:
    plant, _ = make(capacity_vms=2)
    plant.create(pf.chain(pf.script("a")), vm_id="one")
    plant.create(pf.chain(pf.script("a")), vm_id="two")
    before = snapshot(plant)
    with pytest.raises(CapacityExhaustedError) as caught:
        plant.create(pf.chain(pf.script("a")), vm_id="three")
    assert caught.value.code == "Server.CapacityExhausted"
    assert snapshot(plant) == before
    # a collected VM frees its place
    plant.collect("one")
    assert plant.create(pf.chain(pf.script("a")), vm_id="three").record.state == "running"


def test_capacity_in_memory(make: Any) -> None:
    plant, _ = make(capacity_memory=600)
    big = pf.chain(pf.script("a"), start=pf.image_start(memory=400))
    assert isinstance(plant.estimate(big), Bid)
    plant.create(big, vm_id="big1")
    before = snapshot(plant)
    with pytest.raises(CapacityExhaustedError, match="400 MiB asked, 200 MiB"):
        plant.create(big, vm_id="big2")
    assert snapshot(plant) == before
    # what fits still fits
    small = plant.create(pf.chain(pf.script("a"), start=pf.image_start(memory=200)), vm_id="small")
    assert small.record.memory == 200
    assert plant.info()["free_memory"] == 0


def test_pool_exhausted_leaves_nothing(make: Any) -> None:
    plant, _ = make(pool_size=1)
    first = plant.create(pf.chain(pf.script("a")), vm_id="first")
    before = snapshot(plant)
    with pytest.raises(PoolExhaustedError) as caught:
        plant.create(pf.chain(pf.script("a")), vm_id="second")
    assert caught.value.code == "Server.PoolExhausted"
    assert_nothing_left(plant, "second")
    assert snapshot(plant) == before
    assert plant.pool is not None and plant.pool.holder(first.record.address) == "first"
    assert plant.describe("first").state == "running"


def test_duplicate_vm_id_is_refused(plant: Plant) -> None:
    made = plant.create(pf.chain(pf.script("a")), vm_id="twin")
    before = snapshot(plant)
    with pytest.raises(DeclinedError, match="twin"):
        plant.create(pf.chain(pf.script("b")), vm_id="twin")
    assert snapshot(plant) == before
    # the VM that has the id is untouched
    assert plant.describe("twin").state == "running"
    assert Path(made.record.overlay).is_file() and plant.backend.running() == ["twin"]
    assert plant.pool is not None and plant.pool.held_by("twin") is not None
    # an id stays used once its VM is collected
    plant.collect("twin")
    with pytest.raises(DeclinedError, match="used before"):
        plant.create(pf.chain(pf.script("b")), vm_id="twin")
    assert plant.describe("twin").state == "collected"


@pytest.mark.parametrize("vm_id", ["bad id", "-dash", "../up", "a/b", "x" * 65, "é"])
def test_invalid_vm_id_is_refused(plant: Plant, vm_id: str) -> None:
    before = snapshot(plant)
    with pytest.raises(DeclinedError, match="not a valid VM id"):
        plant.create(pf.chain(pf.script("a")), vm_id=vm_id)
    assert snapshot(plant) == before


@pytest.mark.parametrize(("name", "error"), [("cycle", DagInvalidError), ("duplicate_id", SchemaInvalidError),
                                             ("two_starts", DagInvalidError), ("memory_zero", SchemaInvalidError),
                                             ("xxe", DoctypeRefusedError)])
def test_invalid_dag_makes_nothing(plant: Plant, name: str, error: type[Exception]) -> None:
    before = snapshot(plant)
    with pytest.raises(error):
        plant.create((DAGS / f"{name}.xml").read_text(), vm_id="never")
    assert snapshot(plant) == before
    with pytest.raises(NoSuchVMError):
        plant.describe("never")


def test_invalid_dag_error_names_its_line(plant: Plant) -> None:
    with pytest.raises(DagInvalidError) as caught:
        plant.create((DAGS / "cycle.xml").read_text())
    assert caught.value.line == here_line(DAGS / "cycle.xml")
    assert f"line {here_line(DAGS / 'cycle.xml')}" in str(caught.value)


# Configure ---------------------------------------------------------------------------


def test_configure_runs_actions_in_dag_order(plant: Plant) -> None:
    made = plant.create(pf.chain(pf.script("setup")), vm_id="cfg")
    nodes = [pf.image_start("vm", name=pf.IMAGE), pf.script("last"), pf.file_node("two", "/etc/two"),
             pf.script("one"), pf.mount("m")]
    edges = [("vm", "one"), ("one", "two"), ("one", "m"), ("two", "last"), ("m", "last")]
    results = plant.configure("cfg", pf.vm_xml(nodes, edges))
    assert [r.name for r in results] == ["0002-one", "0003-two", "0004-m", "0005-last"]
    assert all(r.ok for r in results)
    assert "fake: echo one" in results[0].output
    runs = plant.records.action_runs("cfg")
    assert [run.node_id for run in runs] == ["setup", "one", "two", "m", "last"]
    record = plant.describe("cfg")
    assert record.state == "running" and record.updated >= made.record.updated


def test_configure_a_failing_action(plant: Plant) -> None:
    plant.create(pf.chain(pf.script("setup")), vm_id="cf")
    with pytest.raises(ActionFailedError, match="'bad'") as caught:
        plant.configure("cf", pf.chain(pf.script("fine"), pf.script("bad", "FAKE_FAIL"), pf.script("never")))
    assert caught.value.node == "bad"
    assert [run.node_id for run in plant.records.action_runs("cf")] == ["setup", "fine", "bad"]
    assert plant.describe("cf").state == "running"  # the guest still runs: the VM stays usable
    assert plant.configure("cf", pf.chain(pf.script("again")))[0].ok


def test_configure_unknown_vm(plant: Plant) -> None:
    with pytest.raises(NoSuchVMError):
        plant.configure("ghost", pf.chain(pf.script("a")))


def test_configure_collected_vm(plant: Plant) -> None:
    plant.create(pf.chain(pf.script("a")), vm_id="gone")
    plant.collect("gone")
    with pytest.raises(NotSupportedError, match="collected"):
        plant.configure("gone", pf.chain(pf.script("b")))
    assert plant.describe("gone").state == "collected"


def test_configure_network_on_a_plant_without_pool(make: Any) -> None:
    plant, _ = make(pool_size=None)
    plant.create(pf.chain(pf.script("a")), vm_id="np")
    with pytest.raises(DeclinedError, match="net"):
        plant.configure("np", pf.chain(pf.network()))
    assert plant.describe("np").state == "running"


def test_configure_invalid_dag(plant: Plant) -> None:
    plant.create(pf.chain(pf.script("a")), vm_id="iv")
    with pytest.raises(DagInvalidError):
        plant.configure("iv", (DAGS / "cycle.xml").read_text())
    assert plant.describe("iv").state == "running"


def test_configure_a_guest_that_died(plant: Plant) -> None:
    made = plant.create(pf.chain(pf.script("a")), vm_id="dies")
    plant.backend.ex_crash("dies")  # type: ignore[attr-defined]
    with pytest.raises(BackendError):
        plant.configure("dies", pf.chain(pf.script("b")))
    record = plant.describe("dies")
    assert record.state == "failed" and record.error
    # a failed VM holds nothing: no guest, no clone, no address
    assert not Path(made.record.overlay).exists() and not Path(made.record.run_dir).exists()
    assert plant.pool is not None and plant.pool.held_by("dies") is None
    assert plant.backend.running() == []
    assert plant.info()["running_vms"] == 0
    # collecting it is fine and keeps the record as it is
    assert plant.collect("dies").state == "failed"
    with pytest.raises(NotSupportedError, match="failed"):
        plant.configure("dies", pf.chain(pf.script("c")))


def test_the_watch_fails_and_reclaims_a_guest_that_died_on_its_own(plant: Plant) -> None:
    made = plant.create(pf.chain(pf.network(), pf.script("a")), vm_id="watched")
    healthy = plant.create(pf.chain(pf.script("a")), vm_id="healthy")
    assert plant.check_guests() == []
    plant.backend.ex_crash("watched")  # type: ignore[attr-defined]
    assert plant.check_guests() == ["watched"]
    record = plant.describe("watched")
    assert record.state == "failed" and record.error == "the guest crashed"
    assert not Path(made.record.overlay).exists() and not Path(made.record.run_dir).exists()
    assert plant.pool is not None and plant.pool.held_by("watched") is None
    assert plant.backend.running() == ["healthy"] and plant.describe("healthy").state == "running"
    assert plant.check_guests() == []  # once
    plant.collect(healthy.record.vm_id)


def test_the_watch_leaves_a_vm_being_configured_to_its_configure(plant: Plant) -> None:
    plant.create(pf.chain(pf.script("a")), vm_id="busy-w")
    plant.records.update_vm("busy-w", state="configuring")
    plant.backend.ex_crash("busy-w")  # type: ignore[attr-defined]
    assert plant.check_guests() == [] and plant.describe("busy-w").state == "configuring"
    plant.records.update_vm("busy-w", state="running")
    assert plant.check_guests() == ["busy-w"]


def test_configure_is_one_at_a_time_and_a_collect_wins(plant: Plant) -> None:
    """A VM being configured refuses another configure; collecting it meanwhile ends it collected, not failed."""
    plant.create(pf.chain(pf.script("a")), vm_id="busy")
    outcome: dict[str, BaseException] = {}

    def configure() -> None:
        try:
            plant.configure("busy", pf.chain(pf.script("hang", "FAKE_HANG", timeout=60)))
        except BaseException as exc:  # noqa: BLE001
            outcome["error"] = exc

    thread = threading.Thread(target=configure)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while plant.describe("busy").state != "configuring":
            assert time.monotonic() < deadline
            time.sleep(0.005)
        with pytest.raises(NotSupportedError, match="configuring"):
            plant.configure("busy", pf.chain(pf.script("other")))
        record = plant.collect("busy")
    finally:
        thread.join(30)
    assert record.state == "collected"
    assert isinstance(outcome.get("error"), BackendError)
    final = plant.describe("busy")
    assert final.state == "collected" and final.error is None
    assert plant.backend.running() == [] and plant.pool is not None and plant.pool.free_count() == 4


# Collect -----------------------------------------------------------------------------


def test_collect(plant: Plant) -> None:
    made = plant.create(pf.chain(pf.network(), pf.script("a")), vm_id="col", owner="bob")
    record = plant.collect("col")
    assert record.state == "collected" and record.collected is not None
    assert record.owner == "bob" and record.image == pf.IMAGE
    assert not Path(made.record.overlay).exists()
    assert not Path(made.record.run_dir).exists()
    assert not Path(made.record.run_dir).exists()
    assert plant.pool is not None and plant.pool.held_by("col") is None and plant.pool.free_count() == 4
    assert plant.backend.running() == []
    # the record is kept
    assert plant.describe("col").state == "collected"
    assert plant.list_vms() == []
    assert [r.vm_id for r in plant.list_vms(include_collected=True)] == ["col"]
    assert [run.node_id for run in plant.records.action_runs("col")] == ["net", "a"]


def test_collect_twice(plant: Plant) -> None:
    plant.create(pf.chain(pf.script("a")), vm_id="twice")
    first = plant.collect("twice")
    second = plant.collect("twice")
    assert first.state == second.state == "collected"
    assert first.collected == second.collected


def test_collect_unknown(plant: Plant) -> None:
    with pytest.raises(NoSuchVMError):
        plant.collect("ghost")


# Recover -----------------------------------------------------------------------------


def test_recover_after_a_restart(plant: Plant, parts: pf.PlantParts) -> None:
    keep = plant.create(pf.chain(pf.network(), pf.script("a")), vm_id="keep").record
    lost = plant.create(pf.chain(pf.network(), pf.script("a")), vm_id="lost").record
    plant.backend.destroy("lost")  # its guest dies while the plant is down
    stray_overlay = parts.state_dir / "overlays" / "stray.qcow2"
    stray_overlay.write_bytes(b"QFI\xfb")
    (parts.state_dir / "run" / "stray").mkdir()

    again = pf.restart_plant(plant, parts)
    assert again.backend is not plant.backend
    report = again.recover()
    assert report == {"adopted": ["keep"], "failed": ["lost"], "collected": []}
    # the running VM is adopted, and still works
    assert again.describe("keep").state == "running"
    assert again.backend.running() == ["keep"]
    assert Path(keep.overlay).is_file() and Path(keep.run_dir).is_dir()
    assert again.pool is not None and again.pool.held_by("keep") is not None
    assert again.pool.held_by("keep").address == keep.address  # type: ignore[union-attr]
    results = again.configure("keep", pf.chain(pf.script("after-restart")))
    assert [r.name for r in results] == ["0003-after-restart"] and results[0].ok
    # the VM whose guest is gone is failed and reclaimed
    gone = again.describe("lost")
    assert gone.state == "failed" and gone.error and "restart" in gone.error
    assert again.pool.held_by("lost") is None
    assert not Path(lost.overlay).exists() and not Path(lost.run_dir).exists()
    # strays are removed
    assert not stray_overlay.exists()
    assert not (parts.state_dir / "run" / "stray").exists()
    assert sorted(p.name for p in (parts.state_dir / "overlays").iterdir()) == ["keep.qcow2"]
    # and the restarted plant goes on: collect, create
    again.collect("keep")
    assert again.backend.running() == []
    assert again.create(pf.chain(pf.script("new")), vm_id="new").record.address == "10.77.0.10"


def test_recover_frees_a_create_the_restart_interrupted(plant: Plant, parts: pf.PlantParts) -> None:
    """A record left in 'booting' (the plant died mid-create) is failed and its guest destroyed."""
    plant.create(pf.chain(pf.script("a")), vm_id="half")
    plant.records.update_vm("half", state="booting")
    again = pf.restart_plant(plant, parts)
    assert again.recover() == {"adopted": [], "failed": ["half"], "collected": []}
    assert again.describe("half").state == "failed"
    assert again.backend.running() == []
    assert again.pool is not None and again.pool.free_count() == 4
    assert list((parts.state_dir / "overlays").iterdir()) == []


def test_recover_never_adopts_a_create_cut_short_even_with_its_guest_alive(plant: Plant,
                                                                          parts: pf.PlantParts) -> None:
    """The plant died while the DAG ran (its guest lives on): the half-made VM is failed, never 'running'."""
    plant.create(pf.chain(pf.script("a")), vm_id="half")
    plant.records.update_vm("half", state="configuring", made=False)
    again = pf.restart_plant(plant, parts)
    assert again.recover() == {"adopted": [], "failed": ["half"], "collected": []}
    record = again.describe("half")
    assert record.state == "failed" and "cut short" in (record.error or "")
    assert again.backend.running() == [] and list((parts.state_dir / "overlays").iterdir()) == []


def test_recover_adopts_a_made_vm_whose_configure_was_cut_short(plant: Plant, parts: pf.PlantParts) -> None:
    plant.create(pf.chain(pf.script("a")), vm_id="cfg")
    plant.records.update_vm("cfg", state="configuring")
    again = pf.restart_plant(plant, parts)
    assert again.recover() == {"adopted": ["cfg"], "failed": [], "collected": []}
    assert again.describe("cfg").state == "running"


def test_recover_finishes_a_collect_cut_short(plant: Plant, parts: pf.PlantParts) -> None:
    plant.create(pf.chain(pf.network(), pf.script("a")), vm_id="going")
    plant.records.update_vm("going", state="collecting")
    again = pf.restart_plant(plant, parts)
    assert again.recover() == {"adopted": [], "failed": [], "collected": ["going"]}
    assert again.describe("going").state == "collected"
    assert again.backend.running() == [] and again.pool is not None and again.pool.free_count() == 4


def test_a_collect_during_create_cancels_it(plant: Plant, parts: pf.PlantParts) -> None:
    """Collect-during-create: the create stops at its next step, reclaims, and the VM ends collected."""
    outcome: dict[str, BaseException] = {}

    def create() -> None:
        try:
            plant.create(pf.chain(pf.network(), pf.script("hang", "FAKE_HANG", timeout=300)), vm_id="cancel")
        except BaseException as exc:  # noqa: BLE001 - checked below
            outcome["error"] = exc

    creator = threading.Thread(target=create)
    creator.start()
    try:
        deadline = time.monotonic() + 30
        while not _state_is(plant, "cancel", "configuring"):
            assert time.monotonic() < deadline, "the create never reached its actions"
            time.sleep(0.02)
        started = time.monotonic()
        collected = plant.collect("cancel")
        assert time.monotonic() - started < 10
    finally:
        creator.join(60)
    assert collected.state == "collected" and "being created" in (collected.error or "")
    assert isinstance(outcome.get("error"), ActionFailedError) and "cancelled" in str(outcome["error"])
    assert plant.backend.running() == [] and plant.pool is not None and plant.pool.held_by("cancel") is None
    assert list((parts.state_dir / "overlays").iterdir()) == []
    assert plant.collect("cancel").state == "collected"  # and again: fine


def _state_is(plant: Plant, vm_id: str, state: str) -> bool:
    try:
        return plant.describe(vm_id).state == state
    except NoSuchVMError:
        return False


def test_a_busy_plant_declines_more_creates_than_it_makes_at_once(tmp_path: Path) -> None:
    """<work creates>: a plant making as many VMs as it may declines at bid time, and refuses at once."""
    from dataclasses import replace as copy

    plant, parts = pf.make_plant(tmp_path / "busy")
    plant.config = copy(plant.config, max_creates=1)
    creator = threading.Thread(target=lambda: plant.create(pf.chain(pf.script("s", "FAKE_SLEEP=2")), vm_id="one"))
    creator.start()
    try:
        deadline = time.monotonic() + 30
        while not _state_is(plant, "one", "configuring"):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        bid = plant.estimate(pf.chain(pf.script("t")))
        assert isinstance(bid, Decline) and "busy" in bid.reason
        with pytest.raises(CapacityExhaustedError, match="busy"):
            plant.create(pf.chain(pf.script("t")), vm_id="two")
        creator.join(30)
        assert plant.describe("one").state == "running"
    finally:
        creator.join(30)
        pf.shutdown_plant(parts)


def test_recover_with_nothing_to_do(plant: Plant) -> None:
    assert plant.recover() == {"adopted": [], "failed": [], "collected": []}


# Concurrency ---------------------------------------------------------------------------


def _race(plant: Plant, count: int) -> tuple[list[Any], list[BaseException]]:
    barrier = threading.Barrier(count)
    made: list[Any] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def work(index: int) -> None:
        barrier.wait()
        try:
            result = plant.create(pf.chain(pf.network(), pf.script("a")), vm_id=f"race-{index}")
        except BaseException as exc:  # noqa: BLE001 - collected for the test to look at
            with lock:
                errors.append(exc)
        else:
            with lock:
                made.append(result)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads)
    return made, errors


def test_concurrent_creates_respect_capacity(make: Any) -> None:
    plant, _ = make(capacity_vms=3, pool_size=8)
    made, errors = _race(plant, 6)
    assert len(made) == 3, errors
    assert len(errors) == 3 and all(isinstance(e, CapacityExhaustedError) for e in errors), errors
    addresses = [m.record.address for m in made]
    assert len(set(addresses)) == 3
    assert sorted(r.vm_id for r in plant.list_vms()) == sorted(m.record.vm_id for m in made)
    assert plant.pool is not None and plant.pool.free_count() == 5
    assert len(list((Path(plant.config.state_dir) / "overlays").iterdir())) == 3


def test_concurrent_creates_never_share_an_address(make: Any) -> None:
    plant, _ = make(capacity_vms=8, pool_size=3)
    made, errors = _race(plant, 6)
    assert len(made) == 3, errors
    assert len(errors) == 3 and all(isinstance(e, PoolExhaustedError) for e in errors), errors
    assert sorted(m.record.address for m in made) == ["10.77.0.10", "10.77.0.11", "10.77.0.12"]
    assert plant.pool is not None
    assert sorted(e.holder for e in plant.pool.entries()) == sorted(m.record.vm_id for m in made)  # type: ignore[type-var]
    failed_ids = {f"race-{i}" for i in range(6)} - {m.record.vm_id for m in made}
    for vm_id in failed_ids:
        assert_nothing_left(plant, vm_id)


def test_a_vm_being_created_is_counted_once(make: Any) -> None:
    """While a create boots its guest (its record exists and its place is reserved), it takes one place."""
    plant, _ = make(capacity_vms=2, capacity_memory=512, backend_options={"boot_seconds": "1.0"})
    outcome: dict[str, Any] = {}

    def slow() -> None:
        try:
            outcome["made"] = plant.create(pf.chain(pf.script("a")), vm_id="slow")
        except BaseException as exc:  # noqa: BLE001
            outcome["error"] = exc

    thread = threading.Thread(target=slow)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not plant.list_vms() and time.monotonic() < deadline:
            time.sleep(0.005)
        assert plant.describe("slow").state == "booting"
        info = plant.info()
        assert info["running_vms"] == 1 and info["free_memory"] == 512 - 128
        fast = plant.create(pf.chain(pf.script("a"), start=pf.image_start(memory=384)), vm_id="fast")
        assert fast.record.state == "running"
    finally:
        thread.join(30)
    assert "error" not in outcome, outcome.get("error")
    assert outcome["made"].record.state == "running"
    with pytest.raises(CapacityExhaustedError):
        plant.create(pf.chain(pf.script("a")), vm_id="third")


# Info ----------------------------------------------------------------------------------


def test_info(plant: Plant) -> None:
    info = plant.info()
    assert info == {
        "name": "test-plant", "backend": "fake", "available": True, "accelerator": "none", "reason": "",
        "capacity_vms": 8, "running_vms": 0, "capacity_memory": 4096, "free_memory": 4096,
        "free_addresses": 4, "images": [pf.IMAGE], "architectures": ["x86_64"],
        "clone_seconds": None, "boot_seconds": None,
        "max_memory": 65536, "max_vcpus": 64, "networks": ["user", "segment"], "channel": "fake", "publish": True,
        "resume": True,
    }
    plant.create(pf.chain(pf.script("a"), start=pf.image_start(memory=256)), vm_id="i1")
    info = plant.info()
    assert (info["running_vms"], info["free_memory"], info["free_addresses"]) == (1, 4096 - 256, 3)
    assert isinstance(info["clone_seconds"], float) and isinstance(info["boot_seconds"], float)
    plant.collect("i1")
    info = plant.info()
    assert (info["running_vms"], info["free_memory"], info["free_addresses"]) == (0, 4096, 4)


def test_info_without_pool(make: Any) -> None:
    plant, _ = make(pool_size=None)
    assert plant.info()["free_addresses"] == 0


# The SOAP service ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def soap_plant(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Plant]]:
    """The real VMPlant service over a plant on the fake backend, served in the reactor thread."""
    from vmplant_service.service import APP_NAME, PlantRuntime, VMPlantService
    from vmplant_service.wire import TNS
    from vmshop_common.soap.server import build_site
    from vmshop_common.threads import ThreadPoolService

    plant, parts = pf.make_plant(tmp_path_factory.mktemp("soap-plant"))
    rt = soap_harness.reactor_thread()
    pool = ThreadPoolService(8, name="test-vmplant", reactor=rt.reactor)
    rt.call(pool.startService)
    served = None
    try:
        site = build_site([VMPlantService], TNS, "https://127.0.0.1:{port}/", name=APP_NAME)
        site.app.vmplant = PlantRuntime(plant, rt.reactor, pool)
        mapfile = test_pki().plant_mapfile(tmp_path_factory.mktemp("soap-plant-authz") / "vmplant-mapfile")
        site.identities = AuthorizationFile(mapfile, "plant")
        served = soap_harness.serve_in_thread(site, rt=rt)
        yield served, plant
    finally:
        if served is not None:
            served.stop()
        rt.call(pool.stopService)
        pf.shutdown_plant(parts)


@pytest.fixture(scope="module")
def soap(soap_plant: tuple[Any, Plant]) -> Iterator[Any]:
    served, _ = soap_plant
    with zeep.Client(served.wsdl_url, transport=test_pki().zeep_transport("shop", 60)) as client:
        yield client.service  # the plant's caller: a shop


def fault_of(call: Any, *args: Any, **kwargs: Any) -> zeep.exceptions.Fault:
    with pytest.raises(zeep.exceptions.Fault) as caught:
        call(*args, **kwargs)
    return caught.value


def test_soap_estimate(soap: Any) -> None:
    bid = soap.estimateCost(pf.chain(pf.network(), pf.script("a", cost=4)))
    assert bid.accepted is True and bid.plant == "test-plant" and bid.image == pf.IMAGE
    assert list(bid.remaining) == ["net", "a"]
    items = {item.node: item for item in bid.items if item.node}
    assert items["a"].source == "hint" and items["a"].seconds == 4.0
    assert bid.cost == pytest.approx(sum(item.seconds for item in bid.items))
    declined = soap.estimateCost(pf.chain(pf.script("a"), start=pf.image_start(name="nosuch")))
    assert declined.accepted is False and "nosuch" in declined.reason


def test_soap_vm_life(soap: Any, soap_plant: tuple[Any, Plant]) -> None:
    _, plant = soap_plant
    made = soap.createVM(pf.chain(pf.network(), pf.script("a"), attributes={"purpose": "soap"}),
                         "carol", "soap-1")
    vm = made.vm
    assert (vm.vm_id, vm.owner, vm.state, vm.image, vm.memory) == ("soap-1", "carol", "running", pf.IMAGE, 128)
    assert vm.address and vm.address.startswith("10.77.0.")
    assert [(a.name, a.value) for a in vm.attributes] == [("purpose", "soap")]
    assert list(vm.steps) == ["net", "a"]
    assert made.estimate.accepted is True and list(made.estimate.remaining) == ["net", "a"]
    assert [(r.node, r.ok, r.status) for r in made.runs] == [("net", True, 0), ("a", True, 0)]

    described = soap.describeVM("soap-1")
    assert described.state == "running" and list(described.steps) == ["net", "a"]
    assert "soap-1" in [v.vm_id for v in soap.listVMs(False)]

    runs = soap.configureVM("soap-1", pf.chain(pf.script("b"), pf.file_node("c", "/etc/c"),
                                               start=pf.image_start("vm")))
    assert [(r.node, r.ok) for r in runs] == [("b", True), ("c", True)]
    assert list(soap.describeVM("soap-1").steps) == ["net", "a", "b", "c"]

    info = soap.plantInfo()
    assert info.name == "test-plant" and info.backend == "fake" and info.available is True
    assert info.running_vms >= 1 and list(info.images) == [pf.IMAGE]

    collected = soap.collectVM("soap-1")
    assert collected.state == "collected" and collected.collected is not None
    assert soap.collectVM("soap-1").state == "collected"
    assert "soap-1" not in [v.vm_id for v in soap.listVMs(False)]
    assert "soap-1" in [v.vm_id for v in soap.listVMs(True)]
    assert plant.describe("soap-1").state == "collected"


def test_soap_fault_invalid_dag(soap: Any) -> None:
    fault = fault_of(soap.createVM, (DAGS / "cycle.xml").read_text(), "x", None)
    assert fault.code.endswith("Client.DagInvalid")
    assert f"line {here_line(DAGS / 'cycle.xml')}" in fault.message
    fault = fault_of(soap.estimateCost, (DAGS / "duplicate_id.xml").read_text())
    assert fault.code.endswith("Client.SchemaInvalid")
    assert f"line {here_line(DAGS / 'duplicate_id.xml')}" in fault.message


def test_soap_fault_unknown_vm(soap: Any) -> None:
    for call in (soap.describeVM, soap.collectVM):
        assert fault_of(call, "ghost").code.endswith("Client.NoSuchVM")
    assert fault_of(soap.configureVM, "ghost", pf.chain(pf.script("a"))).code.endswith("Client.NoSuchVM")


def test_soap_fault_failed_action(soap: Any, soap_plant: tuple[Any, Plant]) -> None:
    _, plant = soap_plant
    fault = fault_of(soap.createVM, pf.chain(pf.script("bad", "FAKE_FAIL")), "x", "soap-fail")
    assert fault.code.endswith("Server.ActionFailed")
    assert "'bad'" in fault.message
    with pytest.raises(NoSuchVMError):
        plant.describe("soap-fail")


def test_soap_fault_doctype(soap: Any, soap_plant: tuple[Any, Plant]) -> None:
    served, _ = soap_plant
    # a DOCTYPE in the SOAP request itself: refused before spyne reads it
    envelope = ('<?xml version="1.0"?>\n<!DOCTYPE e [<!ENTITY x "y">]>\n'
                '<soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/" '
                'xmlns:p="urn:vmshop:vmplant:1"><soap:Body><p:plantInfo/></soap:Body></soap:Envelope>')
    with test_pki().session("shop") as session:
        response = session.post(served.url, data=envelope.encode(), timeout=30,
                                headers={"Content-Type": "text/xml; charset=utf-8"})
    assert response.status_code == 500
    from lxml import etree

    code = etree.fromstring(response.content).findtext(".//faultcode")
    assert code is not None and code.endswith("Client.DoctypeRefused"), response.text[:500]
    # a DOCTYPE in the DAG the request carries
    fault = fault_of(soap.estimateCost, (DAGS / "xxe.xml").read_text())
    assert fault.code.endswith("Client.DoctypeRefused")
