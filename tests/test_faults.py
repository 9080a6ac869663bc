"""Faults: plants and shops that die or hang, and many create/collect cycles that must leak nothing.

- A plant SIGKILLed while it boots a VM: the shop gives the VM to the next
  bidder; the restarted plant marks its half-made VM failed and reclaims
  everything it held for it.
- A plant that stops answering (SIGSTOP) while the shop asks for bids: it is
  excluded as 'timeout' within the bid timeout, and the VM is made elsewhere.
- Shop and plant SIGKILLed with two real guests, one guest's QEMU killed
  meanwhile: after both restart no record is lost, the live guest is
  re-adopted (and configurable through the shop), the dead one ends 'failed'
  in the plant and in the shop, and what it held is reclaimed.
- 200 create/collect cycles on the fake backend and 10 on real guests, all
  through the shop: afterwards no address is held, no overlay, channel or run
  directory is left, no QEMU runs, and every record says 'collected'.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest
from servers import (
    ServerProcess,
    host_port,
    processes_mentioning,
    start_plant,
    start_shop,
    switches_of,
    wait_for,
)

from vmplant_service.ippool import IPPool
from vmplant_service.segment import segment_name
from vmshop_common.dagxml import DAG_NS

pytestmark = pytest.mark.integration

T = TypeVar("T")


def image_dag(*scripts: str, network: bool = False) -> str:
    """A VM from the image 'tiny': an optional pool address, then the scripts in a chain."""
    nodes, edges, previous = ['<image id="s" name="tiny"/>'], [], "s"
    if network:
        nodes.append('<network id="net" mode="pool"/>')
        edges.append('<edge from="s" to="net"/>')
        previous = "net"
    for index, body in enumerate(scripts):
        nodes.append(f'<script id="step{index}" timeout="60">{body}</script>')
        edges.append(f'<edge from="{previous}" to="step{index}"/>')
        previous = f"step{index}"
    return f'<vm xmlns="{DAG_NS}"><nodes>{"".join(nodes)}</nodes><edges>{"".join(edges)}</edges></vm>'



def shop_client(shop: ServerProcess, timeout: float = 600) -> Any:
    """A zeep service of its own on ``shop`` (one per thread: a zeep client is not shared between threads)."""
    return shop.service_as("admin", timeout)


def epr(shop: ServerProcess, key: str) -> dict[str, str]:
    return {"Address": shop.url, "VMKey": key}


def plant_state(plant: ServerProcess, vm_id: str) -> str | None:
    """The plant's state for ``vm_id``, or None while it has no record (or does not answer)."""
    try:
        return str(plant.service.describeVM(vm_id=vm_id).state)
    except Exception:  # noqa: BLE001 - not there yet
        return None


def holdings(plant: ServerProcess) -> dict[str, Any]:
    """What the plant holds on the host, from its state directory: pool, overlays, switches, run dirs, QEMUs."""
    state = plant.state_dir
    pool = {e.address: e.holder for e in IPPool(state / "ip.txt").entries() if e.holder}
    return {
        "pool": pool,
        "overlays": sorted(p.name for p in (state / "overlays").iterdir()),
        "switches": switches_of(plant),
        "run": sorted(p.name for p in (state / "run").iterdir()),
        "guests": processes_mentioning(str(state / "run")),
    }


NOTHING = {"pool": {}, "overlays": [], "switches": [], "run": [], "guests": []}


def only(plant: ServerProcess, vm_id: str, address: str, owner: str) -> dict[str, Any]:
    """What the plant holds with exactly one VM."""
    found = holdings(plant)
    return {**found, "guests": len(found["guests"])} == {
        "pool": {address: vm_id}, "overlays": [f"{vm_id}.qcow2"], "switches": [segment_name(owner)], "run": [vm_id],
        "guests": 1}


def registry_states(shop: ServerProcess) -> dict[str, str]:
    return {vm.vm_id: vm.state for vm in shop.service.queryVMs(query="") or []}


def plant_states(plant: ServerProcess) -> dict[str, str]:
    return {vm.vm_id: vm.state for vm in plant.service.listVMs(include_collected=True) or []}


class Servers:
    """Servers a test starts; ``cleanup()`` stops every one of them (and a plant's guests)."""

    def __init__(self) -> None:
        self.started: list[ServerProcess] = []

    def add(self, server: ServerProcess) -> ServerProcess:
        self.started.append(server)
        return server

    def cleanup(self) -> None:
        for server in reversed(self.started):
            if server.process is not None:
                try:
                    server.process.send_signal(signal.SIGCONT)  # a stopped process can't act on SIGTERM
                except ProcessLookupError:
                    pass
            server.cleanup()


@pytest.fixture
def servers() -> Iterator[Servers]:
    made = Servers()
    try:
        yield made
    finally:
        made.cleanup()


# --- a plant dies in the middle of a create -------------------------------------------------------------


def test_a_plant_killed_in_the_middle_of_a_create_loses_the_vm_to_the_next_bidder(
        tmp_path: Path, warehouse_dir: Path, servers: Servers) -> None:
    # A bids less (its records say it boots in 1 s) but takes 10 s to boot; B bids more.
    a = servers.add(start_plant(tmp_path / "a", warehouse_dir, name="a", backend="fake", pool_count=4,
                                backend_options={"boot_seconds": "10"},
                                metrics={"boot_seconds": 1.0, "clone_seconds": 0.02}))
    b = servers.add(start_plant(tmp_path / "b", warehouse_dir, name="b", backend="fake", pool_count=4,
                                metrics={"boot_seconds": 9.0, "clone_seconds": 0.02}))
    shop = servers.add(start_shop(tmp_path / "shop", [host_port(a), host_port(b)]))
    key = "vm-midcreate"
    outcome: dict[str, Any] = {}

    def create() -> None:
        try:
            outcome["made"] = shop_client(shop).createVM(dag=image_dag("echo made"), owner="ann", vm_key=key)
        except Exception as exc:  # noqa: BLE001 - reported below
            outcome["error"] = exc

    creator = threading.Thread(target=create)
    creator.start()
    try:
        wait_for(lambda: plant_state(a, key) == "booting", what="plant a to boot the VM")
        a.stop(signal.SIGKILL)
    finally:
        creator.join(120)
    assert not creator.is_alive() and "error" not in outcome, outcome
    made = outcome["made"]
    assert made.plant == b.url and made.vm.state == "running"
    assert len(made.attempts) == 2
    assert made.attempts[0].startswith(f"{a.url}: ") and "created" not in made.attempts[0]
    assert made.attempts[1] == f"{b.url}: created"
    # One registry entry, running, on b; b really runs it.
    entries = shop.service.queryVMs(query="") or []
    assert [(vm.vm_id, vm.state, vm.plant) for vm in entries] == [(key, "running", b.url)]
    assert plant_state(b, key) == "running"
    # A died holding the half-made VM's overlay, address and record; restarted, it reclaims them.
    assert holdings(a)["overlays"] == [f"{key}.qcow2"] and list(holdings(a)["pool"].values()) == [key]
    a.start()
    a.client()
    record = a.service.describeVM(vm_id=key)
    assert record.state == "failed" and "cut short" in record.error
    assert holdings(a) == NOTHING
    assert a.service.plantInfo().running_vms == 0
    # The shop sees a again; a's report of its failed VM does not touch the entry, which is b's.
    assert {p.address: p.up for p in shop.service.listPlants()} == {a.url: True, b.url: True}
    assert registry_states(shop) == {key: "running"}
    assert shop.service.collectVM(vm=epr(shop, key)).state == "collected"
    assert holdings(b) == NOTHING and plant_states(b) == {key: "collected"}


# --- a plant stops answering while the shop asks for bids -------------------------------------------


def test_a_plant_that_stops_answering_is_excluded_within_the_bid_timeout(
        tmp_path: Path, warehouse_dir: Path, servers: Servers) -> None:
    hung = servers.add(start_plant(tmp_path / "hung", warehouse_dir, name="hung", backend="fake", network="none",
                                   metrics={"boot_seconds": 1.0, "clone_seconds": 0.02}))
    alive = servers.add(start_plant(tmp_path / "alive", warehouse_dir, name="alive", backend="fake",
                                    network="none", metrics={"boot_seconds": 9.0, "clone_seconds": 0.02}))
    bid_timeout = 2.0
    # A live call for bids (offers mode: tests/test_offers.py's test_a_plant_that_stops_answering_loses_the_create).
    shop = servers.add(start_shop(tmp_path / "shop", [host_port(hung), host_port(alive)], bid_timeout=bid_timeout,
                                  flags=["--bids", "live"]))
    dag = image_dag("echo hello")
    assert shop.service.estimateCost(dag=dag).plant == hung.url  # the cheaper one, while it answers
    assert hung.process is not None
    hung.process.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        estimate = shop.service.estimateCost(dag=dag)
        took = time.monotonic() - started
        assert {bid.plant: bid.status for bid in estimate.bids} == {hung.url: "timeout", alive.url: "bid"}
        assert estimate.plant == alive.url
        assert bid_timeout - 0.1 <= took < bid_timeout + 5.0, took
        made = shop.service.createVM(dag=dag, owner="bob")
        assert made.plant == alive.url and made.vm.state == "running"
        assert {bid.plant: bid.status for bid in made.bids}[hung.url] == "timeout"
    finally:
        hung.process.send_signal(signal.SIGCONT)
    # Awake again, the plant answered the bids it missed and made nothing.
    assert plant_states(hung) == {}
    assert shop.service.collectVM(vm=made.vm.epr).state == "collected"
    assert registry_states(shop) == {made.vm.vm_id: "collected"}


# --- shop and plant SIGKILLed with real guests --------------------------------------------------------


@pytest.mark.guest
def test_shop_and_plant_killed_and_restarted_keep_every_record_and_readopt_live_guests(
        guest_tmp: Path, warehouse_dir: Path, tiny_image: Any, servers: Servers) -> None:
    base = Path(guest_tmp) / "restart"
    plant = servers.add(start_plant(base / "plant", warehouse_dir, name="real", capacity_vms=2))
    shop = servers.add(start_shop(base / "shop", [host_port(plant)], poll_interval=0.5))
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(lambda o: shop_client(shop).createVM(dag=image_dag("echo up", network=True), owner=o),
                               owner) for owner in ("live", "dead")]
        live, dead = (future.result().vm for future in futures)
    assert {live.state, dead.state} == {"running"} and live.address != dead.address

    shop.stop(signal.SIGKILL)
    plant.stop(signal.SIGKILL)
    dead_pid = int((plant.state_dir / "run" / dead.vm_id / "qemu.pid").read_text())
    os.kill(dead_pid, signal.SIGKILL)
    wait_for(lambda: not Path(f"/proc/{dead_pid}").exists() or
             Path(f"/proc/{dead_pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z",
             what="the killed QEMU to end")
    plant.start()
    plant.client()
    shop.start()
    shop.client()

    # The plant re-adopted the live guest and reclaimed what the dead one held.
    assert plant_state(plant, live.vm_id) == "running"
    failed = plant.service.describeVM(vm_id=dead.vm_id)
    assert failed.state == "failed" and "gone" in failed.error
    assert only(plant, live.vm_id, live.address, "live")
    # The shop lost no record; its state poll brings the dead VM's end into the registry.
    assert set(registry_states(shop)) == {live.vm_id, dead.vm_id}
    wait_for(lambda: registry_states(shop)[dead.vm_id] == "failed", what="the shop to see the dead VM failed")
    gone = shop.service.describeVM(vm=dead.epr)
    assert gone.collected is not None and "gone" in gone.error
    assert registry_states(shop)[live.vm_id] == "running"
    runs = shop.service.configureVM(vm=live.epr, dag=image_dag("echo still here"))
    assert [run.output.strip() for run in runs] == ["still here"]

    assert shop.service.collectVM(vm=live.epr).state == "collected"
    assert holdings(plant) == NOTHING
    assert registry_states(shop) == {live.vm_id: "collected", dead.vm_id: "failed"}
    assert plant_states(plant) == {live.vm_id: "collected", dead.vm_id: "failed"}


# --- many create/collect cycles ---------------------------------------------------------------------


def cycles(shop: ServerProcess, count: int, workers: int, dag: str) -> list[str]:
    """``count`` create/collect cycles through the shop, ``workers`` at a time; the VMs' keys."""
    def worker(share: int) -> list[str]:
        service = shop_client(shop)
        keys = []
        for _ in range(share):
            made = service.createVM(dag=dag, owner="cycler")
            assert made.vm.state == "running", made.vm
            keys.append(made.vm.vm_id)
            assert service.collectVM(vm=made.vm.epr).state == "collected"
        return keys

    shares = [count // workers + (1 if index < count % workers else 0) for index in range(workers)]
    with ThreadPoolExecutor(workers) as pool:
        return [key for keys in pool.map(worker, shares) for key in keys]


def assert_nothing_leaked(shop: ServerProcess, plant: ServerProcess, keys: list[str]) -> None:
    assert len(set(keys)) == len(keys)
    assert holdings(plant) == NOTHING
    assert registry_states(shop) == dict.fromkeys(keys, "collected")
    assert plant_states(plant) == dict.fromkeys(keys, "collected")
    info = plant.service.plantInfo()
    assert info.running_vms == 0 and info.free_memory == info.capacity_memory
    assert info.free_addresses == len(IPPool(plant.state_dir / "ip.txt").entries())


def test_200_create_collect_cycles_on_the_fake_backend_leak_nothing(
        tmp_path: Path, warehouse_dir: Path, servers: Servers) -> None:
    plant = servers.add(start_plant(tmp_path / "plant", warehouse_dir, name="cycler", backend="fake",
                                    capacity_vms=8, pool_count=8))
    shop = servers.add(start_shop(tmp_path / "shop", [host_port(plant)]))
    keys = cycles(shop, 200, 4, image_dag("echo cycle", network=True))
    assert_nothing_leaked(shop, plant, keys)


@pytest.mark.guest
def test_10_create_collect_cycles_on_real_guests_leak_nothing(
        guest_tmp: Path, warehouse_dir: Path, tiny_image: Any, servers: Servers) -> None:
    base = Path(guest_tmp) / "cycles"
    plant = servers.add(start_plant(base / "plant", warehouse_dir, name="real-cycler", capacity_vms=2))
    shop = servers.add(start_shop(base / "shop", [host_port(plant)]))
    keys = cycles(shop, 10, 2, image_dag("echo cycle", network=True))
    assert_nothing_leaked(shop, plant, keys)
