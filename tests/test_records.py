"""The plant's durable records (SQLite)."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from vmplant_service.records import MAX_OUTPUT_BYTES, MAX_RUNS_PER_VM, VM_STATES, PlantRecords, VMRecord
from vmshop_common.cost import CostModel, StepHistory
from vmshop_common.dag import ScriptAction
from vmshop_common.errors import ConfigurationError, DeclinedError, NoSuchVMError
from vmshop_common.steps import step_digest


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        self.now += 1
        return self.now


@pytest.fixture
def records(tmp_path: Path):
    with PlantRecords(tmp_path / "state" / "records.sqlite3", clock=Clock()) as db:
        yield db


def vm(vm_id: str = "vm1", state: str = "booting", created: float = 10.0, **extra) -> VMRecord:
    values = dict(vm_id=vm_id, owner="alice", state=state, image="tiny", memory=128, vcpus=1, disk=1, arch="x86_64",
                  address="192.168.77.10", overlay=f"/s/overlays/{vm_id}.qcow2",
                  run_dir=f"/s/run/{vm_id}", created=created, updated=created, dag_xml="<vm/>", host_port=40000,
                  mac="52:54:00:00:00:01", attributes={"project": "samples", "n": "1"})
    values.update(extra)
    return VMRecord(**values)  # type: ignore[arg-type]


def test_schema_and_durability_settings(tmp_path: Path) -> None:
    path = tmp_path / "r.sqlite3"
    with PlantRecords(path) as records:
        assert records.schema_version == 3
        db = records._conn()
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"schema_version", "vms", "action_runs", "plant_metrics"} <= tables
        indexes = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert {"vms_state", "action_runs_digest"} <= indexes
    with PlantRecords(path) as again:  # reopening keeps one version row
        assert again._conn().execute("SELECT COUNT(*) FROM schema_version").fetchone()[0] == 1


V1_VMS = """CREATE TABLE vms (vm_id TEXT PRIMARY KEY, owner TEXT NOT NULL DEFAULT '', state TEXT NOT NULL,
    image TEXT NOT NULL, memory INTEGER NOT NULL, vcpus INTEGER NOT NULL, disk INTEGER NOT NULL, arch TEXT NOT NULL,
    address TEXT, overlay TEXT NOT NULL DEFAULT '', channel_dir TEXT NOT NULL DEFAULT '', run_dir TEXT NOT NULL
    DEFAULT '', created REAL NOT NULL, updated REAL NOT NULL, collected REAL, error TEXT, dag_xml TEXT NOT NULL
    DEFAULT '', host_port INTEGER, mac TEXT, attributes TEXT NOT NULL DEFAULT '{}')"""


def test_a_version_1_database_is_migrated(tmp_path: Path) -> None:
    """Records written before 'made' and 'shop' existed: a VM that ran had finished its create; one booting had not."""
    path = tmp_path / "r.sqlite3"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        db.execute("INSERT INTO schema_version VALUES (1)")
        db.execute(V1_VMS)
        for vm_id, state in (("ran", "running"), ("half", "booting")):
            db.execute("INSERT INTO vms (vm_id, state, image, memory, vcpus, disk, arch, created, updated) "
                       "VALUES (?, ?, 'tiny', 128, 1, 1, 'x86_64', 1, 1)", (vm_id, state))
    db.close()
    with PlantRecords(path) as records:
        assert records.schema_version == 3
        assert records.get_vm("ran").made is True and records.get_vm("half").made is False
        assert records.get_vm("ran").shop == ""
        records.update_vm("half", made=True, shop="shop1")
        assert records.get_vm("half").made is True and records.get_vm("half").shop == "shop1"


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "r.sqlite3"
    PlantRecords(path).close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE schema_version SET version = 99")
    db.close()
    with pytest.raises(ConfigurationError, match="schema version 99"):
        PlantRecords(path)


def test_add_get_update(records: PlantRecords) -> None:
    record = vm()
    records.add_vm(record)
    assert records.get_vm("vm1") == record
    updated = records.update_vm("vm1", state="running", error=None)
    assert updated.state == "running" and updated.updated == 1001.0
    assert records.get_vm("vm1") == updated
    assert records.update_vm("vm1", state="collected", collected=2000.5, updated=5.0).updated == 5.0
    with pytest.raises(NoSuchVMError):
        records.get_vm("nope")
    with pytest.raises(NoSuchVMError):
        records.update_vm("nope", state="running")
    with pytest.raises(DeclinedError):
        records.add_vm(vm())


@pytest.mark.parametrize("changes", [{"state": "exploded"}, {"bogus": 1}, {"vm_id": "x"}, {"state; DROP TABLE vms": 1}])
def test_update_refuses_unknown_columns_and_states(records: PlantRecords, changes: dict) -> None:
    records.add_vm(vm())
    with pytest.raises(ValueError):
        records.update_vm("vm1", **changes)
    assert records.get_vm("vm1").state == "booting"


def test_add_refuses_an_unknown_state(records: PlantRecords) -> None:
    with pytest.raises(ValueError):
        records.add_vm(vm(state="weird"))


def test_lists(records: PlantRecords) -> None:
    for n, state in enumerate(VM_STATES):
        records.add_vm(vm(f"vm-{state}", state=state, created=100.0 - n))
    live = [r.vm_id for r in records.live_vms()]
    assert live == ["vm-collecting", "vm-running", "vm-configuring", "vm-booting", "vm-creating"]
    assert all(r.live for r in records.live_vms())
    listed = [r.vm_id for r in records.list_vms()]
    assert "vm-collected" not in listed and "vm-failed" in listed and len(listed) == len(VM_STATES) - 1
    assert len(records.list_vms(include_collected=True)) == len(VM_STATES)


def test_delete_vm_forgets_it_and_its_runs(records: PlantRecords) -> None:
    records.add_vm(vm())
    records.add_action_run("vm1", "a", "d", "script", 1.0, 2.0, 0, "ok", True)
    assert records.delete_vm("vm1") is True
    assert records.delete_vm("vm1") is False
    assert records.action_runs("vm1") == []
    with pytest.raises(NoSuchVMError):
        records.get_vm("vm1")


def test_action_runs_and_history(records: PlantRecords) -> None:
    history: StepHistory = records  # the plant's records are the cost model's history (checked by mypy)
    assert history.expected_seconds("d1") is None
    assert records.expected_seconds("d1") is None
    for n, seconds in enumerate([100.0, 1.0, 2.0, 3.0, 4.0, 5.0]):
        records.add_action_run(vm_id="vm1", node_id=f"n{n}", digest="d1", kind="script", started=float(n),
                               seconds=seconds, status=0, output="", ok=True)
    records.add_action_run("vm1", "bad", "d1", "script", 9.0, 999.0, 1, "boom", False)  # failures don't count
    records.add_action_run("vm2", "x", "d2", "file", 9.0, 7.0, None, "", False)
    assert records.expected_seconds("d1") == pytest.approx(3.0)  # the last five successful runs
    assert records.expected_seconds("d2") is None
    runs = records.action_runs("vm1")
    assert [r.node_id for r in runs] == ["n0", "n1", "n2", "n3", "n4", "n5", "bad"]
    assert runs[-1].ok is False and runs[-1].status == 1 and runs[-1].output == "boom"
    assert records.action_runs("vm2")[0].status is None


def test_the_cost_model_uses_the_history(records: PlantRecords) -> None:
    action = ScriptAction("run", body="make", cost=50.0)
    model = CostModel(history=records)
    assert model.action_item(action).source == "hint"
    records.add_action_run("vm1", "run", step_digest(action), "script", 0.0, 12.5, 0, "", True)
    item = model.action_item(action)
    assert (item.source, item.seconds) == ("history", 12.5)


def test_output_is_cut_to_64_kib(records: PlantRecords) -> None:
    records.add_action_run("vm1", "n", "d", "script", 0.0, 1.0, 0, "é" * MAX_OUTPUT_BYTES, True)
    output = records.action_runs("vm1")[0].output
    assert len(output.encode()) <= MAX_OUTPUT_BYTES and output == "é" * (MAX_OUTPUT_BYTES // 2)


def test_metrics(records: PlantRecords) -> None:
    assert records.metric("clone_seconds") is None
    records.set_metric("clone_seconds", 0.25)
    records.set_metric("clone_seconds", 0.5)
    assert records.metric("clone_seconds") == 0.5


def test_records_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "r.sqlite3"
    records = PlantRecords(path)
    records.add_vm(vm())
    records.update_vm("vm1", state="running")
    records.set_metric("boot_seconds", 3.0)
    records.add_action_run("vm1", "n", "d", "script", 0.0, 1.5, 0, "out", True)
    records.close()
    records.close()  # safe to repeat
    with pytest.raises(RuntimeError):
        records.get_vm("vm1")
    with PlantRecords(path) as again:
        assert again.get_vm("vm1").state == "running"
        assert again.get_vm("vm1").attributes == {"project": "samples", "n": "1"}
        assert again.metric("boot_seconds") == 3.0 and again.expected_seconds("d") == 1.5


def test_many_threads_at_once(records: PlantRecords) -> None:
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(25):
                vm_id = f"t{n}-{i}"
                records.add_vm(vm(vm_id))
                records.update_vm(vm_id, state="running")
                records.add_action_run(vm_id, "n", "digest", "script", 0.0, 1.0, 0, "", True)
                records.get_vm(vm_id)
                records.live_vms()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(records.live_vms()) == 200
    assert records.expected_seconds("digest") == 1.0


def test_a_vm_keeps_its_latest_runs_only(records: PlantRecords) -> None:
    records.add_vm(vm("busy"))
    for number in range(MAX_RUNS_PER_VM + 200):
        records.add_action_run("busy", f"n{number}", "d", "script", 0.0, 0.1, 0, "", True)
    runs = records.action_runs("busy")
    assert MAX_RUNS_PER_VM <= len(runs) <= MAX_RUNS_PER_VM + 64
    assert runs[-1].node_id == f"n{MAX_RUNS_PER_VM + 199}"


def test_files_are_the_plants_alone(tmp_path: Path) -> None:
    with PlantRecords(tmp_path / "state" / "records.sqlite3") as records:
        records.add_vm(vm("x"))
        assert (tmp_path / "state" / "records.sqlite3").stat().st_mode & 0o777 == 0o600
        assert (tmp_path / "state").stat().st_mode & 0o077 == 0
