"""Crash consistency: shop and plants SIGKILLed at many moments converge, losing and doubling nothing.

Real shop and plant processes (the fake backend; one test with real QEMU
guests at the end), real SOAP over mutual TLS. Each scenario kills a server
(or two) at a chosen moment of a burst of creates or collects, restarts it,
and then checks the promise of docs/consistency.md within a bounded settle
time (:func:`settled`):

- every VM a plant holds for the shop is in the registry, on that plant, in
  the same state;
- no registry entry is left in ``placing`` or ``creating``;
- no key is live on two plants;

and that every VM can then be collected, after which no address, overlay,
run directory, switch or process of a VM is left (:func:`collect_all`).
"""

from __future__ import annotations

import gc
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from servers import ServerProcess, host_port, processes_mentioning, start_plant, start_shop, switches_of

from vmplant_service.ippool import IPPool
from vmshop_common.dagxml import DAG_NS

pytestmark = pytest.mark.integration

LIVE = ("booting", "configuring", "running", "collecting")
#: Seconds the servers get to converge after the last restart: a poll interval (0.5 s) many times over, far
#: below the create timeout (so nothing here converges by a create timing out).
SETTLE = 30.0
CREATE_TIMEOUT = 60.0


def three_steps(network: bool = True) -> str:
    """A VM from 'tiny': a pool address, then three actions of 0.3 s each (the fake agent sleeps)."""
    nodes, edges, previous = ['<image id="s" name="tiny"/>'], [], "s"
    if network:
        nodes.append('<network id="net" mode="pool"/>')
        edges.append('<edge from="s" to="net"/>')
        previous = "net"
    for index in range(3):
        nodes.append(f'<script id="step{index}" timeout="60">echo step {index} # FAKE_SLEEP=0.3</script>')
        edges.append(f'<edge from="{previous}" to="step{index}"/>')
        previous = f"step{index}"
    return f'<vm xmlns="{DAG_NS}"><nodes>{"".join(nodes)}</nodes><edges>{"".join(edges)}</edges></vm>'


@dataclass
class World:
    shop: ServerProcess
    plants: list[ServerProcess]
    clients: list[Any] = field(default_factory=list)

    def service(self, server: ServerProcess, timeout: float = 60) -> Any:
        """A zeep service of its own on ``server`` as admin (its connections are closed at the end)."""
        client = server.client(timeout, "admin", keep=False)
        self.clients.append(client)
        return client.create_service(server.binding, server.url)

    def close(self) -> None:
        for client in self.clients:
            client.transport.session.close()
        self.clients.clear()

    def registry(self) -> dict[str, Any]:
        return {vm.vm_id: vm for vm in self.service(self.shop).queryVMs(query="") or []}

    def held(self, plant: ServerProcess) -> dict[str, Any]:
        """The live VMs ``plant`` holds (for any shop)."""
        return {vm.vm_id: vm for vm in self.service(plant).listVMs(include_collected=False) or []
                if vm.state in LIVE}

    def restart(self, *servers: ServerProcess) -> None:
        for server in servers:
            server.start()
            server.client()


@pytest.fixture
def world(tmp_path: Path, warehouse_dir: Path) -> Iterator[World]:
    started: list[ServerProcess] = []
    try:
        for name in ("a", "b"):
            started.append(start_plant(tmp_path / name, warehouse_dir, name=name, backend="fake", capacity_vms=40,
                                       capacity_memory=40 * 128, pool_count=40, flags=["--max-creates", "40"],
                                       backend_options={"boot_seconds": "0.5"}))
        shop = start_shop(tmp_path / "shop", [host_port(p) for p in started], poll_interval=0.5,
                          create_timeout=CREATE_TIMEOUT)
        started.append(shop)
        world = World(shop, started[:2])
        yield world
        world.close()
    finally:
        for server in reversed(started):
            if server.process is not None:
                try:
                    server.process.send_signal(signal.SIGCONT)
                except ProcessLookupError:
                    pass
            server.cleanup()
    for server in started:
        assert "Traceback" not in server.output(), server.output()[-4000:]


class CallFailed(Exception):
    """A call of a burst that got no answer (what it raised, in words)."""


def burst(world: World, count: int, dag: str) -> tuple[threading.Thread, list[Any]]:
    """Start ``count`` creates at once through the shop (each its own client); what they answered, as they end."""
    answers: list[Any] = []
    # Clients made before the burst starts: a shop killed meanwhile must not fail the making of one.
    services = [world.service(world.shop, 120) for _ in range(count)]

    def create(service: Any) -> None:
        try:
            answers.append(service.createVM(dag=dag, owner="crash"))
        except Exception as exc:  # noqa: BLE001 - a killed server answers nothing: that is the point
            failures.append(exc)
            answers.append(CallFailed(f"{type(exc).__name__}: {exc}"))

    # The exceptions hold the cut calls' sockets (through their tracebacks, in reference cycles). They are kept
    # here until the burst is over and then collected with their warnings ignored. Kept in ``answers``, they
    # outlived that collection and warned in whichever later test a full collection came (f1 of stop 19: a suds
    # test's setup); dropped as each call failed, a collection during the burst found them (with warnings as
    # errors).
    failures: list[Exception] = []

    def run() -> None:
        with ThreadPoolExecutor(count) as pool:
            list(pool.map(create, services))
        failures.clear()
        forget_broken_connections()

    thread = threading.Thread(target=run)
    thread.start()
    return thread, answers


def forget_broken_connections() -> None:
    """Collect the sockets of calls a killed server cut short (urllib3 leaves them to the garbage collector).

    They are the clients' side of the kill, not the servers': their ResourceWarnings are expected here.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


def wait_until_some_plant_holds(world: World, count: int, state: str | None = None,
                                timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        held = [vm for plant in world.plants for vm in world.held(plant).values() if state in (None, vm.state)]
        if len(held) >= count:
            return
        assert time.monotonic() < deadline, f"the plants never held {count} VMs ({len(held)})"
        time.sleep(0.05)


def plant_creating(world: World, timeout: float = 60.0) -> ServerProcess:
    """A plant that holds a create not finished yet (its VM is not made) right now."""
    deadline = time.monotonic() + timeout
    while True:
        for plant in world.plants:
            if any(not vm.made for vm in world.held(plant).values()):
                return plant
        assert time.monotonic() < deadline, "no plant was ever seen in the middle of a create"
        time.sleep(0.05)


def violations(world: World) -> list[str]:
    """What breaks the promise of docs/consistency.md right now (empty: it holds)."""
    registry = world.registry()
    found = [f"{key} is {vm.state} in the registry" for key, vm in registry.items()
             if vm.state in ("placing", "creating")]
    where: dict[str, list[str]] = {}
    for plant in world.plants:
        for key, vm in world.held(plant).items():
            where.setdefault(key, []).append(plant.url)
            entry = registry.get(key)
            if entry is None:
                found.append(f"{plant.url} holds {key} ({vm.state}), which the registry lacks")
            elif entry.plant != plant.url:
                found.append(f"{plant.url} holds {key} ({vm.state}), which the registry has on {entry.plant}")
            elif entry.state != vm.state:
                found.append(f"{key} is {vm.state} on {plant.url} but {entry.state} in the registry")
    found += [f"{key} is live on {len(urls)} plants" for key, urls in where.items() if len(urls) > 1]
    found += [f"{key} is {vm.state} in the registry on {vm.plant}, which does not hold it"
              for key, vm in registry.items() if vm.state in LIVE and key not in where]
    return found


def settled(world: World, timeout: float = SETTLE) -> float:
    """Wait until the promise holds (and still holds a poll later); the seconds it took. Fails with what broke."""
    started = time.monotonic()
    last: list[str] = []
    while time.monotonic() - started < timeout:
        try:
            last = violations(world)
            if not last:
                time.sleep(0.6)  # one more poll: a promise that holds must keep holding
                last = violations(world)
                if not last:
                    return time.monotonic() - started
        except Exception as exc:  # noqa: BLE001 - a server still starting
            last = [repr(exc)[:300]]
        time.sleep(0.2)
    raise AssertionError(f"not settled after {timeout:.0f} s: {last[:8]}")


def collect_all(world: World) -> None:
    """Every VM in the registry can be collected; afterwards nothing of any VM is left on any plant."""
    service = world.service(world.shop, 120)
    for key, vm in world.registry().items():
        if vm.state in LIVE:
            assert service.collectVM(vm=vm.epr).state in ("collected", "failed"), key
    for plant in world.plants:
        assert world.held(plant) == {}
        state = plant.state_dir
        assert {e.address: e.holder for e in IPPool(state / "ip.txt").entries() if e.holder} == {}
        assert sorted(p.name for p in (state / "overlays").iterdir()) == []
        assert sorted(p.name for p in (state / "run").iterdir()) == []
        assert switches_of(plant) == []
        assert processes_mentioning(str(state / "run")) == []


# The shop dies -------------------------------------------------------------------------------------
@pytest.mark.parametrize("moment", [0.05, 0.3, 1.0, 2.0])
def test_the_shop_killed_during_a_burst_of_20_creates(world: World, moment: float) -> None:
    """Killed early (while bidding), mid-way (plants creating) or late (answers going out)."""
    thread, answers = burst(world, 20, three_steps())
    time.sleep(moment)  # the moment of the kill is the point of the test
    world.shop.stop(signal.SIGKILL)
    thread.join(180)
    world.restart(world.shop)
    took = settled(world)
    print(f"shop killed {moment} s into 20 creates: settled {took:.1f} s after its restart")
    made = [a for a in answers if not isinstance(a, Exception)]
    registry = world.registry()
    assert all(registry[a.vm.vm_id].state == "running" for a in made)  # an answered create is never lost
    collect_all(world)


def test_the_shop_killed_during_a_burst_of_collects(world: World) -> None:
    thread, answers = burst(world, 10, three_steps())
    thread.join(180)
    made = [a.vm for a in answers if not isinstance(a, Exception)]
    assert len(made) == 10
    services = [world.service(world.shop, 120) for _ in made]

    failures: list[Exception] = []  # kept until the burst is over, as in burst()

    def collect(pair: tuple[Any, Any]) -> None:
        try:
            pair[0].collectVM(vm=pair[1].epr)
        except Exception as exc:  # noqa: BLE001 - the shop dies under it
            failures.append(exc)

    with ThreadPoolExecutor(10) as pool:
        future = pool.map(collect, zip(services, made, strict=True))
        time.sleep(0.2)
        world.shop.stop(signal.SIGKILL)
        list(future)
    failures.clear()
    forget_broken_connections()
    world.restart(world.shop)
    settled(world)
    collect_all(world)


# A plant dies ---------------------------------------------------------------------------------------
def test_a_plant_killed_mid_create(world: World) -> None:
    """Its half-made VMs are failed and reclaimed at its restart, never re-adopted; the shop re-bids them."""
    # Steps of 2 s: a create seen unfinished is still unfinished when the kill lands, however loaded the host
    # (with 0.3 s steps a fresh-clone run at load 8 saw every create on the first plant done before its kill).
    thread, answers = burst(world, 10, three_steps().replace("FAKE_SLEEP=0.3", "FAKE_SLEEP=2"))
    victim = plant_creating(world)
    victim.stop(signal.SIGKILL)
    thread.join(180)
    world.restart(victim)
    settled(world)
    half_made = [vm for vm in world.service(victim).listVMs(include_collected=True) or [] if not vm.made]
    assert half_made, "the kill came too late: no create was cut short"
    assert {vm.state for vm in half_made} <= {"failed", "collected"}, [(v.vm_id, v.state) for v in half_made]
    for answer in answers:
        if not isinstance(answer, Exception):
            assert answer.vm.state == "running"
    collect_all(world)


def test_a_plant_killed_mid_collect(world: World) -> None:
    thread, answers = burst(world, 10, three_steps())
    thread.join(180)
    made = [a.vm for a in answers if not isinstance(a, Exception)]
    services = [world.service(world.shop, 120) for _ in made]

    def collect(pair: tuple[Any, Any]) -> None:
        try:
            pair[0].collectVM(vm=pair[1].epr)
        except Exception:  # noqa: BLE001 - the plant dies under it
            pass

    with ThreadPoolExecutor(len(made)) as pool:
        future = pool.map(collect, zip(services, made, strict=True))
        time.sleep(0.3)
        for plant in world.plants:
            plant.stop(signal.SIGKILL)
        list(future)
    forget_broken_connections()
    world.restart(*world.plants)
    settled(world)
    collect_all(world)


def test_shop_and_plant_killed_at_once(world: World) -> None:
    thread, _ = burst(world, 20, three_steps())
    wait_until_some_plant_holds(world, 4)
    world.shop.stop(signal.SIGKILL)
    world.plants[1].stop(signal.SIGKILL)
    thread.join(180)
    world.restart(world.plants[1], world.shop)
    settled(world)
    collect_all(world)


def test_a_create_the_shop_gives_up_on_is_cancelled_at_its_plant(tmp_path: Path, warehouse_dir: Path) -> None:
    """The create timeout passes while the plant still creates: the plant's copy never keeps running."""
    plant = start_plant(tmp_path / "p", warehouse_dir, name="slow", backend="fake",
                        backend_options={"boot_seconds": "0.2"})
    shop = start_shop(tmp_path / "shop", [host_port(plant)], poll_interval=0.5, create_timeout=2)
    world = World(shop, [plant])
    try:
        slow = three_steps(network=False).replace("FAKE_SLEEP=0.3", "FAKE_SLEEP=3")
        with pytest.raises(Exception) as raised:
            world.service(shop).createVM(dag=slow, owner="crash", vm_key="gave-up")
        assert "NoPlantAvailable" in str(raised.value.code)  # type: ignore[attr-defined]
        settled(world)
        record = world.service(plant).describeVM(vm_id="gave-up")
        assert record.state == "collected"
        collect_all(world)
    finally:
        world.close()
        shop.cleanup()
        plant.cleanup()


# Real guests ----------------------------------------------------------------------------------------
@pytest.mark.guest
def test_real_guests_survive_a_shop_kill_and_a_plant_kill(guest_tmp: Path, warehouse_dir: Path,
                                                          tiny_image: Any) -> None:
    """The same promise with the qemu backend: one shop kill and one plant kill, each mid-create."""
    base = Path(guest_tmp) / "crash"
    plant = start_plant(base / "plant", warehouse_dir, name="real", capacity_vms=4, capacity_memory=1024)
    shop = start_shop(base / "shop", [host_port(plant)], poll_interval=0.5, create_timeout=CREATE_TIMEOUT)
    world = World(shop, [plant])
    simple = three_steps().replace(" # FAKE_SLEEP=0.3", "")
    try:
        # The shop dies while its plant boots two guests.
        thread, _ = burst(world, 2, simple)
        wait_until_some_plant_holds(world, 1, "booting", timeout=120)
        shop.stop(signal.SIGKILL)
        thread.join(300)
        world.restart(shop)
        print(f"real guests, shop killed mid-create: settled after {settled(world, 120):.1f} s")
        # The plant dies while it boots one more; its guest is failed and reclaimed at its restart.
        thread, _ = burst(world, 1, simple)
        deadline = time.monotonic() + 120
        while not any(vm.state == "booting" for vm in world.held(plant).values()):
            assert time.monotonic() < deadline, "the third guest never booted"
            time.sleep(0.05)
        plant.stop(signal.SIGKILL)
        thread.join(300)
        world.restart(plant)
        print(f"real guests, plant killed mid-create: settled after {settled(world, 120):.1f} s")
        half_made = [vm for vm in world.service(plant).listVMs(include_collected=True) or [] if not vm.made]
        assert half_made and {vm.state for vm in half_made} <= {"failed", "collected"}
        collect_all(world)
    finally:
        world.close()
        shop.cleanup()
        plant.cleanup()
    for server in (plant, shop):
        assert "Traceback" not in server.output(), server.output()[-4000:]
