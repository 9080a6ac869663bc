"""A shop placing VMs across plants of three real hypervisor backends: qemu, libvirt, uml.

Each plant first makes (and collects) one VM of its own, so it has measured
its clone and boot costs; the shop's bids then differ by backend. Each plant
takes one VM at a time (a full plant declines), so three creates through the
shop land on three different backends, cheapest first. Each VM is
configured (its action's output comes back from inside the guest) and
collected, and nothing is left behind.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from servers import ServerProcess, host_port, processes_mentioning, start_plant, start_shop, wait_for

from vmshop_common.dagxml import DAG_NS

pytestmark = [pytest.mark.guest, pytest.mark.integration]

BACKENDS = {
    "qemu": {},
    "libvirt": {"uri": "qemu:///system", "daemon": "spawn", "daemon_timeout": "10"},
    "uml": {},
}


def dag(body: str) -> str:
    return (f'<vm xmlns="{DAG_NS}"><attributes><attribute name="suite" value="heterogeneous"/></attributes>'
            f'<nodes><image id="s" name="tiny"/><script id="run" timeout="60">{body}</script></nodes>'
            f'<edges><edge from="s" to="run"/></edges></vm>')


@pytest.fixture(scope="module")
def plants(tmp_path_factory: pytest.TempPathFactory, warehouse_dir: Path) -> Iterator[dict[str, ServerProcess]]:
    base = tmp_path_factory.mktemp("hetero")
    made: dict[str, ServerProcess] = {}
    try:
        for name, options in BACKENDS.items():
            made[name] = start_plant(base / name, warehouse_dir, name=name, backend=name, network="none",
                                     capacity_vms=1, backend_options=options)
        yield made
    finally:
        for plant in made.values():
            plant.cleanup()
        for plant in made.values():
            assert processes_mentioning(str(plant.state_dir / "run")) == []


def test_one_real_vm_on_each_backend_through_one_shop(plants: dict[str, ServerProcess], tmp_path: Path) -> None:
    # Each plant measures its own costs on a VM of its own.
    for plant in plants.values():
        made = plant.service.createVM(dag=dag("true"), owner="warm-up")
        plant.service.collectVM(vm_id=made.vm.vm_id)
        assert plant.service.plantInfo().boot_seconds is not None

    shop = start_shop(tmp_path / "shop", [host_port(p) for p in plants.values()])
    try:
        # As in production, the plants tell the shop of their changes, with their offers (the shop prices from
        # offers): a full plant's offer says so.
        for plant in plants.values():
            (plant.directory / "vmshop_addresses.txt").write_text(host_port(shop) + "\n")
        by_url = {plant.url: name for name, plant in plants.items()}
        estimate = shop.service.estimateCost(dag=dag("true"))
        costs = {by_url[bid.plant]: bid.cost for bid in estimate.bids}
        assert all(bid.status == "bid" for bid in estimate.bids), estimate.bids
        assert len(set(costs.values())) == 3, costs  # measured per plant, so they differ
        cheapest_first = sorted(costs, key=lambda name: costs[name])
        assert by_url[estimate.plant] == cheapest_first[0]

        vms = []
        for expected in cheapest_first:
            made = shop.service.createVM(dag=dag("uname -s; cat /proc/cmdline | wc -w"), owner="hetero")
            assert by_url[made.plant] == expected, (made.plant, made.bids)
            assert made.vm.state == "running" and made.runs[0].output.startswith("Linux")
            vms.append(made.vm)
        # All three plants are full now: a fourth VM is declined by every one of them (once their offers, pushed
        # after each create, reached the shop).
        wait_for(lambda: {bid.status for bid in shop.service.estimateCost(dag=dag("true")).bids} == {"declined"},
                 60, "every plant's offer declining a fourth VM")

        for vm in vms:
            runs = shop.service.configureVM(vm=vm.epr, dag=dag(f"echo configured on {by_url[vm.plant]}"))
            assert runs[0].output.strip() == f"configured on {by_url[vm.plant]}"
        for vm in vms:
            assert shop.service.collectVM(vm=vm.epr).state == "collected"
        for plant in plants.values():
            info = plant.service.plantInfo()
            assert info.running_vms == 0 and info.backend in BACKENDS
            assert list((plant.state_dir / "overlays").iterdir()) == []
    finally:
        shop.cleanup()
