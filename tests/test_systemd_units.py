"""contrib/systemd's units: systemd itself verifies them, and they keep the hardening they promise.

This host's PID 1 is not systemd, so the units are not started here: ``systemd-analyze verify`` loads them
as systemd would (an unknown key, a bad value or a missing program is reported), ``systemd-analyze
security --offline`` scores their exposure, and the rest is read from the files. The programs they start
are this checkout's own entry points (the units' ``/opt/vmshop/venv/bin/`` is pointed at ``.venv/bin/``).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "contrib" / "systemd"
INSTALLED_BIN = "/opt/vmshop/venv/bin/"
VENV_BIN = Path(sys.executable).parent
#: The most exposure ``systemd-analyze security`` may score each unit (0 best, 10 worst); they score 1.4 and 2.9.
MAX_EXPOSURE = {"vmshop.service": 2.0, "vmplant.service": 3.5}
EXPECTED = {"vmshop.service": ("vmshop", "vmshop-server", "vmshop"),
            "vmplant.service": ("vmplant", "vmplant", "vmplant")}  # user, program, state/config directory


def systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.fail("systemd-analyze is missing: scripts/setup_host.sh installs the 'systemd' package "
                    "(harmless where systemd is not PID 1)", pytrace=False)
    return tool


def unit_entries(path: Path) -> dict[str, list[str]]:
    """``Section.Key`` -> its values, in order (systemd units repeat keys)."""
    entries: dict[str, list[str]] = {}
    section = ""
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        entries.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return entries


@pytest.fixture
def local_units(tmp_path: Path) -> Path:
    """The units with their programs pointed at this checkout's .venv (verify checks the programs exist)."""
    for unit in EXPECTED:
        text = (UNITS / unit).read_text()
        assert INSTALLED_BIN in text
        (tmp_path / unit).write_text(text.replace(INSTALLED_BIN, f"{VENV_BIN}/"))
    return tmp_path


def test_systemd_verifies_the_units_without_a_word(local_units: Path) -> None:
    done = subprocess.run([systemd_analyze(), "verify", *(str(local_units / unit) for unit in EXPECTED)],
                          capture_output=True, text=True, timeout=120)
    # verify exits 0 on an unknown key (it only warns), so any output at all is a failure.
    assert done.returncode == 0 and done.stdout.strip() == "" and done.stderr.strip() == "", done.stdout + done.stderr


def test_a_unit_systemd_would_complain_about_is_caught(tmp_path: Path) -> None:
    bad = tmp_path / "bad.service"
    bad.write_text("[Service]\nProtectSystem=strictly\nExecStart=/bin/true\n")
    done = subprocess.run([systemd_analyze(), "verify", str(bad)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "bad.service:2: Failed to parse protect system value" in done.stderr  # rc 0!


@pytest.mark.parametrize("unit", sorted(EXPECTED))
def test_the_units_exposure_stays_low(local_units: Path, unit: str) -> None:
    done = subprocess.run([systemd_analyze(), "security", "--offline=true", "--no-pager", str(local_units / unit)],
                          capture_output=True, text=True, timeout=120)
    found = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", done.stdout + done.stderr)
    assert found is not None, done.stdout + done.stderr
    assert float(found.group(1)) <= MAX_EXPOSURE[unit], done.stdout


@pytest.mark.parametrize("unit", sorted(EXPECTED))
def test_each_server_runs_as_its_own_user_with_the_promised_hardening(unit: str) -> None:
    user, program, directory = EXPECTED[unit]
    entries = unit_entries(UNITS / unit)

    def one(key: str) -> str:
        values = entries.get(f"Service.{key}", [])
        assert len(values) == 1, f"{unit}: {key}= {values}"
        return values[0]

    assert one("User") == user and one("Group") == user
    command = one("ExecStart").split()
    assert command[0] == INSTALLED_BIN + program
    assert f"{program}=" in (ROOT / "setup.py").read_text()  # a console script the wheel installs
    assert command[1] == "--config" and command[2].startswith(f"/etc/{directory}/")
    assert one("ConfigurationDirectory") == directory
    assert one("StateDirectory") == directory
    assert one("ProtectSystem") == "strict"
    assert one("ReadWritePaths").split() == [f"/var/lib/{directory}"]
    assert one("NoNewPrivileges") == "yes" and one("PrivateTmp") == "yes" and one("ProtectHome") == "yes"
    assert one("CapabilityBoundingSet") == "" and one("AmbientCapabilities") == ""
    assert one("ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one("Restart") == "on-failure"
    # A stop waits for the servers' own shutdown grace (30 s by default) and then some.
    assert int(one("TimeoutStopSec")) >= 60
    if unit == "vmplant.service":
        assert one("KillMode") == "process"  # its guests outlive a restart and are re-adopted
