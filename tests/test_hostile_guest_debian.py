"""The hostile-guest suite's attacks from a stock Debian 12 guest (``debian12``): systemd, a real userland,
python3, cloud-init -- the attacker's best case.

Every attack of ``test_hostile_guest.py`` runs here, unchanged, with the
same checks after each (:func:`test_hostile_guest.unharmed`), on a qemu
plant whose guests are: ``m1`` (mallory's, Debian: the attacker), ``a1``
(alice's, tiny) and ``a2`` (alice's, Debian: the victim of the mute-agent
attack and the one that reaches ``a1`` across alice's segment). Under
Debian the agent is a systemd service (``Restart=always``): a guest that
replaces its binary gets its fake started by systemd itself. The two
Debian guests boot at once (about two minutes under TCG here).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import test_hostile_guest as suite
from test_hostile_guest import Lab, configure, hostile_lab

pytestmark = [pytest.mark.guest, pytest.mark.integration]

GUESTS = (("m1", "mallory", "debian12"), ("a1", "alice", "tiny"), ("a2", "alice", "debian12"))


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, warehouse_dir: Path) -> Iterator[Lab]:
    if not (warehouse_dir / "debian12" / "image.xml").is_file():
        pytest.fail("the Debian image is missing: build it with 'bash scripts/build_debian_image.sh var/warehouse'",
                    pytrace=False)
    base = tmp_path_factory.mktemp("hostile-debian")
    datastore = Path(tempfile.mkdtemp(prefix="hg-debian-", dir="/tmp"))
    datastore.chmod(0o755)
    try:
        with hostile_lab(base, warehouse_dir, GUESTS, datastore / "data", capacity_memory=1536) as made:
            # The attackers really are Debian guests, with systemd as their init.
            for name in ("m1", "a2"):
                runs = configure(made.plant, made.vms[name].vm_id, ". /etc/os-release; echo $PRETTY_NAME; "
                                 "cat /proc/1/comm")
                assert runs[0].output == "Debian GNU/Linux 12 (bookworm)\nsystemd\n", runs[0].output
            yield made
    finally:
        shutil.rmtree(datastore, ignore_errors=True)


# The attacks, collected here again (in the suite's order) against this module's lab.
test_links_devices_and_fifos_lead_nowhere = suite.test_links_devices_and_fifos_lead_nowhere
test_set_uid_files_stay_in_the_guest = suite.test_set_uid_files_stay_in_the_guest
test_a_flood_of_output_is_cut_in_the_guest = suite.test_a_flood_of_output_is_cut_in_the_guest
test_a_flood_on_the_console_is_bounded = suite.test_a_flood_on_the_console_is_bounded
test_renaming_and_linking_in_a_loop_while_the_plant_configures = \
    suite.test_renaming_and_linking_in_a_loop_while_the_plant_configures
test_another_owners_guest_is_out_of_reach_and_an_owners_own_are_not = \
    suite.test_another_owners_guest_is_out_of_reach_and_an_owners_own_are_not
test_spoofing_a_neighbours_address_is_refused_and_harmless = \
    suite.test_spoofing_a_neighbours_address_is_refused_and_harmless
test_an_agent_that_floods_its_channel_fails_that_vms_actions_only = \
    suite.test_an_agent_that_floods_its_channel_fails_that_vms_actions_only
test_a_mute_agent_holds_nothing_past_the_deadline = suite.test_a_mute_agent_holds_nothing_past_the_deadline
test_collecting_the_attackers_leaves_nothing = suite.test_collecting_the_attackers_leaves_nothing
