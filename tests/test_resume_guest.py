"""Clones resumed from a saved running state, with real guests (qemu backend, tiny image, TCG), through a real shop:
issue 14's acceptance for part 2.

One plant (qemu, its owners' host-only segments, its own warehouse listing
the real tiny image) and one shop; three guests, in order:

1. alice's VM runs a step and is published ``with_state``: its file systems
   frozen, the guest paused, its machine state migrated into the image's
   ``state.bin`` (QMP ``getfd`` + ``migrate fd:``) and its disk copied, then
   it runs on (thawed: it answers and writes again);
2. two creates from that image resume from that one state instead of
   booting (their uptime goes on from the saved guest's) and each gets its
   own identity before its action runs: different MACs, pool addresses and
   host names, different bytes from /dev/urandom; both answer their agent,
   and one reaches the other over their owner's segment.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import pytest
from servers import ServerProcess, host_port, processes_mentioning, start_plant, start_shop, wait_for

from vmshop_common.dagxml import DAG_NS

pytestmark = [pytest.mark.guest, pytest.mark.integration]

#: What each clone reports of itself (one line each): its uptime, its NICs' MACs, host name, segment address,
#: 32 bytes of /dev/urandom, the file the saved guest wrote, and how often its kernel reseeded its random generator
#: because it learnt it is a new machine (a new VM generation id).
REPORT = ("cut -d' ' -f1 /proc/uptime; cat /sys/class/net/eth*/address | sort | tr '\\n' ' '; echo; hostname; "
          "ip -4 -o addr show | grep -v ' lo ' | grep -v 10.0.2. | awk '{print $4}' | head -n1; "
          "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; cat /srv/saved/mark; "
          "dmesg | grep -c 'crng reseeded due to virtual machine fork'")


def dag(*bodies: str, image: str = "tiny") -> str:
    nodes = "".join(f'<script id="s{n}" timeout="60">{escape(body)}</script>' for n, body in enumerate(bodies, start=1))
    ids = ["start"] + [f"s{n}" for n in range(1, len(bodies) + 1)]
    edges = "".join(f'<edge from="{a}" to="{b}"/>' for a, b in zip(ids, ids[1:], strict=False))
    return (f'<vm xmlns="{DAG_NS}"><nodes><image id="start" name="{image}"/>{nodes}</nodes>'
            f"<edges>{edges}</edges></vm>")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, warehouse_dir: Path) -> Iterator[dict[str, ServerProcess]]:
    base = tmp_path_factory.mktemp("resume-qemu")
    warehouse = base / "warehouse"
    warehouse.mkdir()
    (warehouse / "index.txt").write_text(f"{(warehouse_dir / 'tiny' / 'image.xml').resolve()}\n")
    made: dict[str, ServerProcess] = {}
    try:
        made["plant"] = start_plant(base / "plant", warehouse, capacity_vms=3, capacity_memory=1024, backend="qemu")
        made["shop"] = start_shop(base / "shop", [host_port(made["plant"])])
        yield made
    finally:
        plant = made.get("plant")
        try:
            if plant is not None:
                for vm in plant.service.listVMs(include_collected=False) or []:
                    plant.service.collectVM(vm_id=vm.vm_id)
        except Exception:  # noqa: BLE001 - cleanup goes on
            pass
        for server in made.values():
            server.cleanup()
        if plant is not None:
            assert processes_mentioning(str(plant.state_dir)) == []


@pytest.fixture(scope="module")
def vms(site: dict[str, ServerProcess]) -> dict[str, Any]:
    return {}


def run_one(alice: Any, vm: Any, body: str) -> str:
    """Configure ``vm`` with one script; its output. (The shop's state poll may have caught the configure: the VM is
    waited for until the shop says it runs again, as a next configure or publish needs.)"""
    runs = alice.configureVM(vm=vm.epr, dag=dag(body))
    assert [run.ok for run in runs] == [True], [run.output for run in runs]
    wait_for(lambda: alice.describeVM(vm=vm.epr).state == "running", 30, "the VM running")
    return str(runs[0].output)


def test_publish_a_running_guest_with_its_state(site: dict[str, ServerProcess], vms: dict[str, Any]) -> None:
    alice = site["shop"].service_as("alice")
    # (Reading /dev/urandom makes the guest's kernel finish initialising its random generator now, as a guest that
    # ran for a while has: the clones then reseed it, on their new VM generation id.)
    first = alice.createVM(dag=dag("mkdir -p /srv/saved && echo 'saved guest' > /srv/saved/mark && "
                                   "head -c 8 /dev/urandom >/dev/null && sync"),
                           vm_key="alice-saved")
    assert first.vm.state == "running"
    vms["uptime"] = float(run_one(alice, first.vm, "cut -d' ' -f1 /proc/uptime"))
    vms["macs"] = run_one(alice, first.vm, "cat /sys/class/net/eth*/address | sort | tr '\\n' ' '").split()
    image = alice.publishVM(vm=first.vm.epr, image="alice-saved", with_state=True)
    assert (image.name, image.owner, image.base, image.with_state) == ("alice-saved", "alice", "tiny", True)
    # The guest runs on, thawed.
    assert run_one(alice, first.vm, "echo after > /srv/saved/after && cat /srv/saved/after") == "after\n"
    vms["first"] = first.vm


def test_two_clones_resume_from_one_state_each_with_its_own_identity(site: dict[str, ServerProcess],
                                                                      vms: dict[str, Any]) -> None:
    alice = site["shop"].service_as("alice")
    wanted = dag(REPORT, image="alice-saved")
    assert alice.estimateCost(dag=wanted).image == "alice-saved"
    reports = []
    for key in ("alice-clone-1", "alice-clone-2"):
        made = alice.createVM(dag=wanted, vm_key=key)
        assert made.vm.image == "alice-saved" and [run.ok for run in made.runs] == [True], made.runs
        uptime, macs, hostname, address, random, mark, reseeded = made.runs[0].output.splitlines()[:7]
        # Resumed, not booted: its clock of uptime goes on from the saved guest's.
        assert float(uptime) >= vms["uptime"]
        assert mark == "saved guest" and reseeded == "1"
        assert address.split("/")[0] == made.vm.address
        reports.append({"vm": made.vm, "macs": macs.split(), "hostname": hostname, "address": made.vm.address,
                        "random": random})
    one, two = reports
    assert len(one["random"]) == len(two["random"]) == 64 and one["random"] != two["random"]
    assert set(one["macs"]).isdisjoint(two["macs"]) and set(one["macs"]).isdisjoint(vms["macs"])
    assert set(two["macs"]).isdisjoint(vms["macs"])
    assert one["hostname"] != two["hostname"] and one["address"] != two["address"]
    # Both answer their agent, and they reach each other over alice's segment with their new identities.
    assert run_one(alice, two["vm"], f"ping -c 1 -W 5 {one['address']} >/dev/null && echo reached") == "reached\n"
    assert run_one(alice, one["vm"], "hostname") == f"{one['hostname']}\n"
    for report in reports:
        alice.collectVM(vm=report["vm"].epr)
    alice.collectVM(vm=vms["first"].epr)
    assert alice.unpublishImage(image="alice-saved") == [site["plant"].url]
