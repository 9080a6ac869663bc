"""A real plant server with real guests, driven over SOAP by zeep.

One plant for the module (guests are shared between tests, in order):
VM "a" from the sample DAG (pool address, data mount, file, script), VM "b"
pinging "a" on the host-only segment, faults on bad input, a plant restart
(SIGKILL) with "a" running and "b"'s guest killed meanwhile, a create whose
action fails, and collection. After each step nothing must leak: QEMU
processes, overlays, pool addresses, records.
"""

from __future__ import annotations

import os
import signal
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from xml.sax.saxutils import escape as xml_escape

import pytest
import zeep.exceptions
from pki import test_pki
from servers import ROOT, PlantProcess, fault_code, processes_mentioning, start_plant, wait_for

from vmplant_service.ippool import IPPool
from vmshop_common.dagxml import DAG_NS

pytestmark = [pytest.mark.guest, pytest.mark.integration]

PUBLIC_URL = "https://localhost:8090/"


def script_dag(*scripts: str, network: bool = False) -> str:
    """A DAG from the image "tiny": an optional pool address, then the scripts in a chain."""
    nodes = ['<image id="s" name="tiny"/>']
    edges = []
    previous = "s"
    if network:
        nodes.append('<network id="net" mode="pool"/>')
        edges.append('<edge from="s" to="net"/>')
        previous = "net"
    for index, body in enumerate(scripts):
        node = f"step{index}"
        nodes.append(f'<script id="{node}" timeout="30">{body}</script>')
        edges.append(f'<edge from="{previous}" to="{node}"/>')
        previous = node
    return (f'<vm xmlns="{DAG_NS}"><nodes>{"".join(nodes)}</nodes>'
            f'<edges>{"".join(edges)}</edges></vm>')


@pytest.fixture(scope="module")
def plant(tmp_path_factory: pytest.TempPathFactory, warehouse_dir: Path) -> Iterator[PlantProcess]:
    directory = tmp_path_factory.mktemp("plant")
    data = directory / "data" / "appdata"
    data.mkdir(parents=True)
    (data / "words.txt").write_text("the quick brown fox jumps\n")
    process = start_plant(directory, warehouse_dir, capacity_vms=2, public_url=PUBLIC_URL,
                          datastore=directory / "data", watch_interval=1)
    process.client()
    try:
        yield process
    finally:
        try:
            for vm in process.service.listVMs(include_collected=False) or []:
                process.service.collectVM(vm_id=vm.vm_id)
        except Exception:  # noqa: BLE001 - cleanup goes on
            pass
        process.cleanup()
        assert processes_mentioning(str(process.state_dir)) == []


@pytest.fixture(scope="module")
def vms() -> dict[str, object]:
    """VMs made by earlier tests of this module, by role."""
    return {}



def pool_holders(plant: PlantProcess) -> dict[str, str]:
    return {entry.address: entry.holder for entry in IPPool(plant.state_dir / "ip.txt").entries() if entry.holder}


def overlays(plant: PlantProcess) -> list[str]:
    return sorted(path.name for path in (plant.state_dir / "overlays").iterdir())


def test_served_wsdl_is_the_checked_in_one_whatever_the_host_header(plant: PlantProcess) -> None:
    request = urllib.request.Request(plant.url + "?wsdl", headers={"Host": "evil.example.org:666"})
    with urllib.request.urlopen(request, timeout=10, context=test_pki().ssl_context("shop")) as answer:
        served = answer.read()
    assert served == (ROOT / "wsdl" / "vmplant.wsdl").read_bytes()
    assert b"evil.example.org" not in served


def test_estimate_then_create_a_configured_guest(plant: PlantProcess, vms: dict[str, object]) -> None:
    dag = (ROOT / "scripts" / "sample_image.xml").read_text()
    bid = plant.service.estimateCost(dag=dag)
    assert bid.accepted and bid.image == "tiny"
    assert bid.remaining == ["net", "data", "conf", "run"]
    assert abs(sum(item.seconds for item in bid.items) - bid.cost) < 1e-6

    made = plant.service.createVM(dag=dag, owner="alice")
    vm = made.vm
    assert vm.state == "running" and vm.owner == "alice" and vm.image == "tiny"
    assert vm.address in pool_holders(plant) and pool_holders(plant)[vm.address] == vm.vm_id
    assert {a.name: a.value for a in vm.attributes}["application"] == "wordcount"
    outputs = {run.node: run.output for run in made.runs}
    assert "words: 5" in outputs["run"]
    assert all(run.ok for run in made.runs)
    assert overlays(plant) == [f"{vm.vm_id}.qcow2"]
    vms["a"] = vm

    described = plant.service.describeVM(vm_id=vm.vm_id)
    assert described.state == "running" and described.steps == ["net", "data", "conf", "run"]
    assert [v.vm_id for v in plant.service.listVMs(include_collected=False)] == [vm.vm_id]
    # The guest is reachable from the host, on 127.0.0.1 only.
    with urllib.request.urlopen(f"http://127.0.0.1:{vm.host_port}/", timeout=10) as answer:
        assert b"vmshop-guest" in answer.read()


def test_configure_runs_more_actions_inside_the_guest(plant: PlantProcess, vms: dict[str, object]) -> None:
    vm = vms["a"]
    runs = plant.service.configureVM(vm_id=vm.vm_id, dag=script_dag("cat /etc/wordcount.conf | wc -l",
                                                                     "echo inside $(uname -s)"))
    assert [run.node for run in runs] == ["step0", "step1"]
    assert runs[0].output.strip() == "2" and runs[1].output.strip() == "inside Linux"


def test_two_guests_reach_each_other_on_pool_addresses(plant: PlantProcess, vms: dict[str, object]) -> None:
    a = vms["a"]
    # The same owner: their VMs share their segment (another owner's would not reach "a": the hostile-guest suite)
    made = plant.service.createVM(dag=script_dag(f"ping -c 2 -W 5 {a.address}", network=True), owner="alice")
    assert made.vm.address != a.address
    assert " 0% packet loss" in made.runs[-1].output
    vms["b"] = made.vm


def test_capacity_exhausted_is_a_fault_and_changes_nothing(plant: PlantProcess) -> None:
    before = (overlays(plant), pool_holders(plant))
    with pytest.raises(zeep.exceptions.Fault) as info:
        plant.service.createVM(dag=script_dag("true"), owner="carol")
    assert fault_code(info) == "Server.CapacityExhausted"
    assert (overlays(plant), pool_holders(plant)) == before
    assert len(plant.service.listVMs(include_collected=True)) == 2


@pytest.mark.parametrize(("dag", "code", "words"), [
    (script_dag("true").replace('to="step0"', 'to="ghost"'), "Client.SchemaInvalid", ["line 1", "ghost"]),
    (script_dag("true", "true").replace('</edges>', '<edge from="step1" to="step0"/></edges>'),
     "Client.DagInvalid", ["cycle", "step0"]),
    (script_dag("true").replace('name="tiny"', 'name="nosuch"'), "Client.NoSuchImage", ["nosuch"]),
    ("<!DOCTYPE vm [<!ENTITY x SYSTEM 'file:///etc/passwd'>]><vm/>", "Client.DoctypeRefused", ["DOCTYPE"]),
    ("not xml at all", "Client.XMLSyntax", ["line 1"]),
])
def test_bad_dags_are_faults_that_change_nothing(plant: PlantProcess, dag: str, code: str, words: list[str]) -> None:
    before = (overlays(plant), pool_holders(plant), len(plant.service.listVMs(include_collected=True)))
    operations = [lambda: plant.service.createVM(dag=dag)]
    if code == "Client.NoSuchImage":
        # Another plant may hold the image: a bid is declined, not refused.
        declined = plant.service.estimateCost(dag=dag)
        assert not declined.accepted and "nosuch" in declined.reason
    else:
        operations.append(lambda: plant.service.estimateCost(dag=dag))
    for operation in operations:
        with pytest.raises(zeep.exceptions.Fault) as info:
            operation()
        assert fault_code(info) == code
        for word in words:
            assert word in info.value.message
    assert (overlays(plant), pool_holders(plant), len(plant.service.listVMs(include_collected=True))) == before


def test_unknown_vm_is_a_fault(plant: PlantProcess) -> None:
    for operation in (lambda: plant.service.describeVM(vm_id="nosuchvm"),
                      lambda: plant.service.collectVM(vm_id="nosuchvm"),
                      lambda: plant.service.configureVM(vm_id="nosuchvm", dag=script_dag("true"))):
        with pytest.raises(zeep.exceptions.Fault) as info:
            operation()
        assert fault_code(info) == "Client.NoSuchVM"


def test_restart_readopts_running_guests_and_reclaims_dead_ones(plant: PlantProcess, vms: dict[str, object]) -> None:
    a, b = vms["a"], vms["b"]
    plant.stop(signal.SIGKILL)
    b_pid = int((plant.state_dir / "run" / b.vm_id / "qemu.pid").read_text())
    os.kill(b_pid, signal.SIGKILL)
    plant.start()
    plant.client()
    assert plant.service.describeVM(vm_id=a.vm_id).state == "running"
    dead = plant.service.describeVM(vm_id=b.vm_id)
    assert dead.state == "failed" and "gone" in dead.error
    assert b.address not in pool_holders(plant) and pool_holders(plant)[a.address] == a.vm_id
    assert overlays(plant) == [f"{a.vm_id}.qcow2"]
    runs = plant.service.configureVM(vm_id=a.vm_id, dag=script_dag("echo still here"))
    assert runs[0].output.strip() == "still here"


def test_a_failed_action_leaves_nothing_behind(plant: PlantProcess, vms: dict[str, object]) -> None:
    before = (overlays(plant), pool_holders(plant), len(plant.service.listVMs(include_collected=True)))
    with pytest.raises(zeep.exceptions.Fault) as info:
        plant.service.createVM(dag=script_dag("echo about to fail; exit 3", network=True), owner="dave")
    assert fault_code(info) == "Server.ActionFailed"
    assert "step0" in info.value.message and "status 3" in info.value.message
    assert (overlays(plant), pool_holders(plant), len(plant.service.listVMs(include_collected=True))) == before
    assert len(processes_mentioning(str(plant.state_dir / "run"))) == 1  # only "a"'s QEMU


def test_collect_leaves_a_record_and_nothing_else(plant: PlantProcess, vms: dict[str, object]) -> None:
    a = vms["a"]
    assert plant.service.collectVM(vm_id=a.vm_id).state == "collected"
    assert plant.service.collectVM(vm_id=a.vm_id).state == "collected"  # twice is fine
    assert plant.service.describeVM(vm_id=a.vm_id).collected is not None
    assert overlays(plant) == [] and pool_holders(plant) == {}
    assert processes_mentioning(str(plant.state_dir / "run")) == []
    assert plant.service.plantInfo().running_vms == 0


def test_a_guest_that_powers_itself_off_is_found_failed_and_reclaimed(plant: PlantProcess) -> None:
    """The plant's watch (every second here) notices a guest that ended on its own."""
    later = xml_escape("(sleep 2; poweroff -f) </dev/null >/dev/null 2>&1 &")
    made = plant.service.createVM(dag=script_dag(later, network=True), owner="erin")
    vm_id = made.vm.vm_id
    assert made.vm.state == "running" and pool_holders(plant)[made.vm.address] == vm_id
    gone = wait_for(lambda: (v := plant.service.describeVM(vm_id=vm_id)).state == "failed" and v, timeout=60,
                    what="the watch to notice the guest powered off")
    assert gone.error == "the guest stopped on its own"
    assert overlays(plant) == [] and pool_holders(plant) == {}
    assert processes_mentioning(str(plant.state_dir / "run")) == []
    assert plant.service.plantInfo().running_vms == 0
