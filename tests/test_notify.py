"""Plants watch their guests and tell their shops of changes (real plant and shop processes, fake backend).

The shop here polls only once an hour, so whatever it learns within seconds
it learned from the plant's notice (``plantChanged``), after which it asked
the plant itself. A guest that dies on its own is found by the plant's
watch, marked failed and reclaimed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import zeep.exceptions
from servers import ServerProcess, fault_code, host_port, start_plant, start_shop, wait_for

pytestmark = pytest.mark.integration

DAG = ('<vm xmlns="urn:vmshop:dag:1"><nodes><image id="s" name="tiny"/><script id="run">echo hi</script></nodes>'
       '<edges><edge from="s" to="run"/></edges></vm>')


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory,
         warehouse_dir: Path) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    base = tmp_path_factory.mktemp("notify")
    plant = start_plant(base / "plant", warehouse_dir, backend="fake", network="none", watch_interval=0.2)
    shop = None
    try:
        shop = start_shop(base / "shop", [host_port(plant)], poll_interval=3600)
        # The plant reads its shop list again at every change: no restart needed.
        (plant.directory / "vmshop_addresses.txt").write_text(host_port(shop) + "\n")
        yield plant, shop
    finally:
        if shop is not None:
            shop.cleanup()
        plant.cleanup()


Pair = tuple[ServerProcess, ServerProcess]


def test_a_guest_that_dies_is_failed_reclaimed_and_the_shop_hears_of_it(pair: Pair) -> None:
    plant, shop = pair
    made = shop.service.createVM(dag=DAG, owner="t", termination_time=None, vm_key="dies")
    assert made.vm.state == "running"
    plant_id = made.vm.plant_vm_id
    guest = plant.state_dir / "run" / plant_id / "fake.json"
    state = json.loads(guest.read_text())
    guest.write_text(json.dumps({**state, "state": "crashed"}))  # the guest dies on its own

    vm = wait_for(lambda: (v := shop.service.describeVM(vm=made.vm.epr)).state == "failed" and v, timeout=20,
                  what="the shop to hear that the guest died")
    assert "crashed" in (vm.error or "") and vm.collected is not None
    on_plant = plant.service.describeVM(vm_id=plant_id)
    assert on_plant.state == "failed" and "crashed" in on_plant.error
    assert not (plant.state_dir / "overlays" / f"{plant_id}.qcow2").exists()
    assert not (plant.state_dir / "run" / plant_id).exists()
    assert plant.service.plantInfo().running_vms == 0


def test_a_collect_at_the_plant_reaches_the_shop(pair: Pair) -> None:
    plant, shop = pair
    made = shop.service.createVM(dag=DAG, owner="t", termination_time=None, vm_key="elsewhere")
    plant.service.collectVM(vm_id=made.vm.plant_vm_id)  # not through this shop (another shop, an operator)
    wait_for(lambda: shop.service.describeVM(vm=made.vm.epr).state == "collected", timeout=20,
             what="the shop to hear of the collect")


def test_a_notice_is_heard_only_from_the_shops_plants(pair: Pair) -> None:
    plant, shop = pair
    assert shop.service.plantChanged(plant=plant.url) is True
    assert shop.service.plantChanged(plant=plant.url.upper().replace("HTTP://", "http://").rstrip("/")) is True
    with pytest.raises(zeep.exceptions.Fault) as info:
        shop.service.plantChanged(plant="http://127.0.0.1:1/")
    assert fault_code(info) == "Client.NoSuchPlant"
    # A notice is only a reason to ask: a running VM stays running.
    made = shop.service.createVM(dag=DAG, owner="t", termination_time=None, vm_key="stays")
    for _ in range(3):
        shop.service.plantChanged(plant=plant.url)
    assert shop.service.describeVM(vm=made.vm.epr).state == "running"
    shop.service.collectVM(vm=made.vm.epr)
