"""End to end, as a user meets it: the README's main job (scripts/demo.py).

A real plant (QEMU guests) and a real shop on loopback, over mutual TLS with
the demo's own CA, driven only by the ``vmshop`` command as the user
``demo``: plants, estimate, create (with its progress), configure, query,
show (and another user refused), collect. The demo exits non-zero if any command fails or if
anything is left running.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from servers import ROOT, processes_mentioning

pytestmark = [pytest.mark.guest, pytest.mark.integration]


def test_the_main_job_through_the_shop_by_the_cli() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "demo.py")], capture_output=True, text=True,
                            timeout=600, cwd=str(ROOT))
    out = result.stdout
    if result.returncode != 0:
        logs = ROOT / "var" / "demo"
        tails = "".join(f"\n--- end of {log.name}:\n" + "\n".join(log.read_text(errors="replace").splitlines()[-40:])
                        for log in (logs / "plant.log", logs / "shop.log") if log.is_file())
        pytest.fail(f"the demo failed (exit status {result.returncode}):\n{out}{result.stderr}{tails}")
    assert "vmshop-ca init" in out and "export VMSHOP_CERT=" in out  # its own CA, the user's credentials
    assert "best bid: https://127.0.0.1:" in out  # estimate shows the bids (mutual TLS all the way)
    assert "words: 5" in out  # the sample's script ran inside the guest, over the mounted data
    assert "hello from worker" in out  # configure's action output came back
    assert "running on https://127.0.0.1:" in out and "collected at" in out
    assert "[Client.NoSuchVM] no VM has id 'vm-demo-" in result.stderr  # another user does not see it
    assert "creating:booting" in result.stderr  # the live progress of the create
    assert "nothing is left running (0 stray processes" in out
    assert processes_mentioning(str(ROOT / "var" / "demo")) == []
