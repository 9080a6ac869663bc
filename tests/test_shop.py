"""The shop brokering between real plant servers (fake backend), over real SOAP.

Plants bid with what they measured: a plant whose records say it boots in
1 s bids lower than one that boots in 9 s, so the shop's choice is known.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zeep.exceptions
from pki import test_pki
from servers import ROOT, ServerProcess, fault_code, host_port, start_plant, start_shop, wait_for

from vmshop_common.dagxml import DAG_NS

pytestmark = pytest.mark.integration

SAMPLE = (ROOT / "scripts" / "sample_workflow.xml").read_text()


def script_dag(body: str = "true", image: str = "tiny", attributes: dict[str, str] | None = None) -> str:
    attrs = "".join(f'<attribute name="{k}" value="{v}"/>' for k, v in (attributes or {}).items())
    return (f'<vm xmlns="{DAG_NS}"><attributes>{attrs}</attributes><nodes><image id="s" name="{image}"/>'
            f'<script id="run">{body}</script></nodes><edges><edge from="s" to="run"/></edges></vm>')




@pytest.fixture(scope="module", params=["offers", "live"])
def bids(request: pytest.FixtureRequest) -> str:
    """Both bidding modes pass every broker test: offers (priced at the shop) and live (a call for bids)."""
    return str(request.param)


def mode(bids: str) -> list[str]:
    return ["--bids", bids]


@pytest.fixture(scope="module")
def fake_warehouse(tmp_path_factory: pytest.TempPathFactory, warehouse_dir: Path) -> Path:
    """The real warehouse's image configuration, over a small qcow2 the fake backend never boots."""
    return warehouse_dir


@pytest.fixture(scope="module")
def plants(tmp_path_factory: pytest.TempPathFactory, warehouse_dir: Path) -> Iterator[dict[str, ServerProcess]]:
    base = tmp_path_factory.mktemp("plants")
    made: dict[str, ServerProcess] = {}
    try:
        for name, boot, backend in (("fast", 1.0, "fake"), ("medium", 3.0, "fake"), ("slow", 9.0, "fake"),
                                    ("broken", 0.5, "fake-failstart")):
            # The image's own boot too (bids price an image with its own measured boot): the plants serve both
            # modes' tests, and a create in one would otherwise set tiny's boot to the fake backend's.
            made[name] = start_plant(base / name, warehouse_dir, name=name, backend=backend, network="none",
                                     metrics={"boot_seconds": boot, "boot_seconds:tiny": boot, "clone_seconds": 0.02})
        yield made
    finally:
        for plant in made.values():
            plant.cleanup()


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory, plants: dict[str, ServerProcess],
         bids: str) -> Iterator[ServerProcess]:
    names = ("fast", "medium", "slow")
    server = start_shop(tmp_path_factory.mktemp("shop"), [host_port(plants[n]) for n in names] + ["127.0.0.1:1"],
                        flags=mode(bids))
    try:
        yield server
    finally:
        server.cleanup()


def test_the_cheapest_plant_wins_and_every_bid_is_shown(shop: ServerProcess, plants: dict[str, ServerProcess]) -> None:
    estimate = shop.service.estimateCost(dag=SAMPLE)
    assert estimate.plant == plants["fast"].url
    statuses = {bid.plant: bid.status for bid in estimate.bids}
    assert statuses == {plants["fast"].url: "bid", plants["medium"].url: "bid", plants["slow"].url: "bid",
                        "https://127.0.0.1:1/": "down"}
    costs = {bid.plant: bid.cost for bid in estimate.bids if bid.status == "bid"}
    assert costs[plants["fast"].url] < costs[plants["medium"].url] < costs[plants["slow"].url]

    made = shop.service.createVM(dag=SAMPLE, owner="alice")
    assert made.plant == plants["fast"].url and made.vm.state == "running"
    assert made.vm.epr.VMKey == made.vm.vm_id and made.vm.epr.Address == shop.url
    assert len(made.bids) == 4
    assert plants["fast"].service.describeVM(vm_id=made.vm.vm_id).state == "running"
    collected = shop.service.collectVM(vm=made.vm.epr)
    assert collected.state == "collected" and collected.collected is not None
    assert shop.service.collectVM(vm=made.vm.epr).state == "collected"  # twice is not an error
    assert plants["fast"].service.describeVM(vm_id=made.vm.vm_id).state == "collected"


def test_a_plant_that_fails_after_bidding_loses_the_vm_to_the_next(
        tmp_path: Path, plants: dict[str, ServerProcess], bids: str) -> None:
    shop = start_shop(tmp_path / "shop", [host_port(plants["broken"]), host_port(plants["medium"])],
                      flags=mode(bids))
    try:
        # A step of its own in each mode: the plants (shared by both modes) measured the other mode's run of it.
        made = shop.service.createVM(dag=script_dag(f"echo hi {bids}"), owner="bob")
        assert made.plant == plants["medium"].url
        assert made.attempts[0].startswith(plants["broken"].url) and "injected start failure" in made.attempts[0]
        assert made.attempts[1] == f"{plants['medium'].url}: created"
        assert plants["broken"].service.listVMs(include_collected=True) in (None, [])
        shop.service.collectVM(vm=made.vm.epr)
    finally:
        shop.cleanup()


def test_bids_are_gathered_in_parallel_and_a_silent_plant_is_excluded(
        tmp_path: Path, warehouse_dir: Path, bids: str) -> None:
    slow = [start_plant(tmp_path / f"slow{i}", warehouse_dir, name=f"slow{i}", backend="fake-slowbid",
                        network="none", backend_options={"bid_delay": "1.5"}) for i in range(3)]
    silent = start_plant(tmp_path / "silent", warehouse_dir, name="silent", backend="fake-slowbid",
                         network="none", backend_options={"bid_delay": "60"})
    parallel = start_shop(tmp_path / "parallel", [host_port(p) for p in slow], bid_timeout=30, flags=mode(bids))
    with_silent = start_shop(tmp_path / "with-silent", [host_port(p) for p in slow + [silent]], bid_timeout=4,
                             flags=mode(bids))
    try:
        started = time.monotonic()
        estimate = parallel.service.estimateCost(dag=SAMPLE)
        took = time.monotonic() - started
        # Three plants that each take 1.5 s to bid, asked one after the other, would take 4.5 s or more.
        assert [bid.status for bid in estimate.bids] == ["bid", "bid", "bid"]
        assert took < 4.0, took
        started = time.monotonic()
        estimate = with_silent.service.estimateCost(dag=SAMPLE)
        took = time.monotonic() - started
        # The silent plant is cut off at the 4 s bid timeout, not waited for (it would take 60 s).
        assert sorted(bid.status for bid in estimate.bids) == ["bid", "bid", "bid", "timeout"]
        assert took < 15, took
        assert estimate.plant in {p.url for p in slow}
    finally:
        silent.stop(signal.SIGKILL)  # it is still busy bidding; no need to wait for it
        for server in slow + [silent, parallel, with_silent]:
            server.cleanup()


def test_no_plant_can_make_it_lists_every_reason_and_records_nothing(shop: ServerProcess) -> None:
    before = len(shop.service.queryVMs(query="", limit=None) or [])
    with pytest.raises(zeep.exceptions.Fault) as info:
        shop.service.createVM(dag=script_dag(image="nosuch"), owner="carol")
    assert fault_code(info) == "Server.NoPlantAvailable"
    assert info.value.message.count("nosuch") >= 3 and "127.0.0.1:1" in info.value.message
    assert len(shop.service.queryVMs(query="", limit=None) or []) == before


@pytest.mark.parametrize(("call", "code", "words"), [
    (lambda s: s.createVM(dag=script_dag().replace('to="run"', 'to="nowhere"')), "Client.SchemaInvalid",
     ["line 1", "nowhere"]),
    (lambda s: s.estimateCost(dag="<vm xmlns='urn:vmshop:dag:1'><nodes><script id='a'>x</script></nodes></vm>"),
     "Client.DagInvalid", ["start node"]),
    (lambda s: s.describeVM(vm={"Address": "", "VMKey": "vm-none"}), "Client.NoSuchVM", ["vm-none"]),
    (lambda s: s.collectVM(vm={"Address": "", "VMKey": "vm-none"}), "Client.NoSuchVM", ["vm-none"]),
    (lambda s: s.queryVMs(query="memory>>3", limit=None), "Client.QueryInvalid", ["memory>>3"]),
    (lambda s: s.queryVMs(query="colour=blue", limit=None), "Client.QueryInvalid", ["colour"]),
])
def test_bad_input_is_a_fault_that_records_nothing(shop: ServerProcess, call, code: str,  # type: ignore[no-untyped-def]
                                                   words: list[str]) -> None:
    before = len(shop.service.queryVMs(query="", limit=None) or [])
    with pytest.raises(zeep.exceptions.Fault) as info:
        call(shop.service)
    assert fault_code(info) == code
    for word in words:
        assert word in info.value.message
    assert len(shop.service.queryVMs(query="", limit=None) or []) == before


def test_queries_over_built_in_and_user_attributes_and_xpath(shop: ServerProcess) -> None:
    a = shop.service.createVM(dag=script_dag(attributes={"project": "climate", "rank": "7"}), owner="ann").vm
    b = shop.service.createVM(dag=script_dag(attributes={"project": "genome", "rank": "12"}), owner="ben").vm
    try:
        def keys(query: str) -> set[str]:
            return {vm.vm_id for vm in shop.service.queryVMs(query=query, limit=None) or []}

        assert keys("project=climate") == {a.vm_id}
        assert keys("state=running rank>=7") == {a.vm_id, b.vm_id}
        assert keys("rank>7") == {b.vm_id}  # numbers compare as numbers
        assert keys("owner^=an memory>=64") == {a.vm_id}
        assert keys("project!=climate state=running") == {b.vm_id}
        assert shop.service.getResourceProperty(vm=a.epr, name="rp:Owner") == [
            '<rp:Owner xmlns:rp="urn:vmshop:vm-resource:1">ann</rp:Owner>']
        assert shop.service.queryResourceProperties(
            vm=b.epr, xpath="/rp:VMResourceProperties/rp:Attribute[@name='rank'] > 10") == ["true"]
        document = shop.service.getResourcePropertyDocument(vm=a.epr)
        assert "urn:vmshop:vm-resource:1" in document and "climate" in document
        with pytest.raises(zeep.exceptions.Fault) as info:
            shop.service.queryResourceProperties(vm=a.epr, xpath="//rp:Attribute[")
        assert fault_code(info) == "Client.QueryInvalid"
    finally:
        for vm in (a, b):
            shop.service.collectVM(vm=vm.epr)


def test_lease_fires_and_survives_a_shop_restart(shop: ServerProcess, plants: dict[str, ServerProcess]) -> None:
    soon = shop.service.createVM(dag=script_dag(), owner="dora", termination_time=time.time() + 3600).vm
    later = shop.service.createVM(dag=script_dag(), owner="dora", termination_time=time.time() + 3600).vm
    assert shop.service.setTerminationTime(vm=soon.epr, termination_time=time.time() + 0.5).termination
    wait_for(lambda: shop.service.describeVM(vm=soon.epr).state == "collected", what="the lease to fire")
    # The lease of the other VM runs out while the shop is down: a restarted shop collects it.
    shop.service.setTerminationTime(vm=later.epr, termination_time=time.time() + 2)
    shop.stop()
    time.sleep(2.5)  # the lease passes while no shop runs (the point of this test, not a wait for a result)
    shop.start()
    shop.client()
    wait_for(lambda: shop.service.describeVM(vm=later.epr).state == "collected", what="the lease after restart")
    plant = next(p for p in plants.values() if p.url == shop.service.describeVM(vm=later.epr).plant)
    assert plant.service.describeVM(vm_id=later.vm_id).state == "collected"
    # The registry kept everything across the restart.
    assert shop.service.describeVM(vm=soon.epr).owner == "dora"


def test_plants_and_reload(shop: ServerProcess, plants: dict[str, ServerProcess]) -> None:
    health = {p.address: p for p in shop.service.listPlants()}
    assert health[plants["fast"].url].up and health[plants["fast"].url].backend == "fake"
    assert not health["https://127.0.0.1:1/"].up and health["https://127.0.0.1:1/"].last_error
    plants_file = shop.directory / "vmplant_addresses.txt"
    original = plants_file.read_text()
    plants_file.write_text(original + host_port(plants["broken"]) + "\n")
    try:
        assert plants["broken"].url in {p.address for p in shop.service.reloadPlants()}
    finally:
        plants_file.write_text(original)
        shop.service.reloadPlants()


def test_served_wsdl_is_the_checked_in_one(tmp_path: Path) -> None:
    import urllib.request
    shop = start_shop(tmp_path / "shop", [], public_url="https://localhost:8080/")
    try:
        request = urllib.request.Request(shop.url + "?wsdl", headers={"Host": "evil.example.org"})
        with urllib.request.urlopen(request, timeout=10, context=test_pki().ssl_context()) as answer:
            assert answer.read() == (ROOT / "wsdl" / "vmshop.wsdl").read_bytes()
    finally:
        shop.cleanup()


def test_checked_in_wsdl_files_are_current() -> None:
    import subprocess
    import sys
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "generate_wsdl.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_vm_whose_plant_is_gone_is_reported_as_such(tmp_path: Path, warehouse_dir: Path, bids: str) -> None:
    plant = start_plant(tmp_path / "plant", warehouse_dir, name="doomed", backend="fake", network="none")
    shop = start_shop(tmp_path / "shop", [host_port(plant)], flags=mode(bids))
    try:
        vm = shop.service.createVM(dag=script_dag(), owner="erin").vm
        plant.stop(signal.SIGKILL)
        for call in (lambda: shop.service.collectVM(vm=vm.epr),
                     lambda: shop.service.configureVM(vm=vm.epr, dag=script_dag("echo again"))):
            with pytest.raises(zeep.exceptions.Fault) as info:
                call()
            assert fault_code(info) == "Server.PlantGone" and plant.url in info.value.message
        wait_for(lambda: not shop.service.listPlants()[0].up, what="the plant to be marked down")
        assert shop.service.describeVM(vm=vm.epr).state == "running"  # as last known; not invented
    finally:
        shop.cleanup()
        plant.cleanup()


def test_sighup_rereads_the_plant_list(tmp_path: Path, plants: dict[str, ServerProcess]) -> None:
    shop = start_shop(tmp_path / "shop", [host_port(plants["fast"])])
    try:
        (shop.directory / "vmplant_addresses.txt").write_text(
            f"{host_port(plants['fast'])}\n{host_port(plants['medium'])}\n")
        assert shop.process is not None
        shop.process.send_signal(signal.SIGHUP)
        wait_for(lambda: len(shop.service.listPlants()) == 2, what="the plant list to be re-read")
    finally:
        shop.cleanup()
