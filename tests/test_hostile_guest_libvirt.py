"""The hostile-guest suite's agent attacks on the libvirt backend.

Under libvirt the plant does not read the agent's stream: libvirt does
(it connects to every ``org.qemu.guest_agent.0`` channel itself), and the
plant sends commands through libvirt's API. So a guest that attacks its
agent's channel attacks libvirt's agent client first. The attacks of
``test_hostile_guest.py`` (:func:`agent_flood_attack`,
:func:`mute_agent_attack`, with the same checks after each) run here
against a plant on libvirt, with two guests (the attacker's and a
neighbour's), plus one attack only libvirt has to survive: an answer over
libvirt's 10 MiB limit, which puts libvirt's connection to that guest's
agent into an error state (until the guest reopens its channel). It must
fail only that guest's actions, with a reason that says so; the plant then
sends that agent nothing more (libvirtd logs what it cannot parse, in
full), until a restarted plant adopts the VM and tries again.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zeep.exceptions
from servers import fault_code
from test_hostile_guest import (
    Lab,
    Watch,
    agent_flood_attack,
    configure,
    hostile_lab,
    mute_agent_attack,
    unharmed,
)

pytestmark = [pytest.mark.guest, pytest.mark.integration]

OPTIONS = {"uri": "qemu:///system", "daemon": "spawn", "daemon_timeout": "10"}
#: Replaces qemu-ga by a program that writes without a newline for 25 s (far over 10 MiB), then puts qemu-ga back.
OVERSIZED_AGENT = """cp /usr/sbin/qemu-ga /usr/sbin/qemu-ga.real
cat > /usr/sbin/fake-ga <<'EOF'
#!/bin/sh
timeout -s KILL 25 tr '\\0' x < /dev/zero > "$4"
mv /usr/sbin/qemu-ga.real /usr/sbin/qemu-ga
EOF
chmod 755 /usr/sbin/fake-ga && mv /usr/sbin/fake-ga /usr/sbin/qemu-ga && killall qemu-ga; sleep 5
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, warehouse_dir: Path) -> Iterator[Lab]:
    base = tmp_path_factory.mktemp("hostile-guest-libvirt")
    # QEMU reads the data store as its own user under libvirt: it must be reachable by it (pytest's tmp is 0700).
    datastore = Path(tempfile.mkdtemp(prefix="hg-libvirt-", dir="/tmp"))
    datastore.chmod(0o755)
    try:
        with hostile_lab(base, warehouse_dir, (("m1", "mallory"), ("a1", "alice")), datastore / "data",
                         backend="libvirt", backend_options=OPTIONS) as made:
            yield made
    finally:
        shutil.rmtree(datastore, ignore_errors=True)


def test_an_answer_over_libvirts_limit_fails_only_that_vms_actions_for_good(lab: Lab) -> None:
    vm_id = lab.vms["m1"].vm_id
    with Watch(lab) as watch:
        with pytest.raises(zeep.exceptions.Fault) as info:  # the action's own agent is killed under it
            configure(lab.plant, vm_id, OVERSIZED_AGENT, timeout=10)
        assert fault_code(info) == "Server.ActionFailed", info.value.message
        # Until the fake has opened the channel the agent is merely not there; then libvirt meets the flood.
        deadline = time.monotonic() + 60
        while True:
            started = time.monotonic()
            with pytest.raises(zeep.exceptions.Fault) as info:
                configure(lab.plant, vm_id, "echo never", timeout=10)
            assert fault_code(info) == "Server.ActionFailed" and "agent" in info.value.message, info.value.message
            assert time.monotonic() - started < 10 + 15 + 10
            if "10 MiB" in info.value.message or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert "10 MiB" in info.value.message, info.value.message
        # From now on the plant sends that agent nothing (libvirtd would log what comes back): at once, saying so.
        started = time.monotonic()
        with pytest.raises(zeep.exceptions.Fault) as info:
            configure(lab.plant, vm_id, "echo never", timeout=10)
        assert time.monotonic() - started < 5
        assert "no longer sends commands to this guest's agent" in info.value.message, info.value.message
        neighbour = configure(lab.plant, lab.vms["a1"].vm_id, "echo fine")
    assert neighbour[0].output == "fine\n"
    assert lab.plant.service.describeVM(vm_id=vm_id).state == "running"
    unharmed(lab, watch)


def agent_answers(vm_id: str) -> bool:
    """Whether ``vm_id``'s agent answers a guest-ping through libvirt (asked by the test, not the plant)."""
    import libvirt
    import libvirt_qemu
    conn = libvirt.open(OPTIONS["uri"])
    try:
        libvirt_qemu.qemuAgentCommand(conn.lookupByName(f"vmshop-{vm_id}"), '{"execute":"guest-ping"}', 2, 0)
        return True
    except libvirt.libvirtError:
        return False
    finally:
        conn.close()


def test_a_plant_restart_talks_to_the_agent_again(lab: Lab) -> None:
    """The fake above puts qemu-ga back after 25 s; a restarted plant adopts the VM and tries its agent afresh."""
    vm_id = lab.vms["m1"].vm_id
    # Wait (with a deadline) for the guest's side: libvirt's error state ends when the real qemu-ga reopens the channel.
    deadline = time.monotonic() + 90
    while not agent_answers(vm_id):
        assert time.monotonic() < deadline, "the guest's agent did not come back"
        time.sleep(0.5)
    lab.plant.stop()
    lab.plant.start()
    lab.plant.client()
    assert configure(lab.plant, vm_id, "echo back", timeout=10)[0].output == "back\n"
    assert configure(lab.plant, lab.vms["a1"].vm_id, "echo fine")[0].output == "fine\n"
    unharmed(lab)


def test_an_agent_that_floods_its_channel_fails_that_vms_actions_only(lab: Lab) -> None:
    agent_flood_attack(lab, "m1", "a1")


def test_a_mute_agent_holds_nothing_past_the_deadline(lab: Lab) -> None:
    mute_agent_attack(lab, "a1")
