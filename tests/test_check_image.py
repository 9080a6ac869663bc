"""``vmplant check-image FILE``: a bad file or an image the backend cannot run fails at once (no boot); a good image
is booted, its agent answers, and the report says what the guest is; nothing is left behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from servers import ROOT, processes_mentioning

from vmplant_service.checkimage import check_image, parse_probe


def vmplant(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vmplant_service.main", *args], capture_output=True, text=True,
                          timeout=600, cwd=str(ROOT))


def test_the_probe_is_read_as_hostile_text() -> None:
    text = "kernel=Linux 6.1\nos=Evil\x1b[2J OS\nagent=" + "A" * 5000 + "\nninep=yes\nninep=no\nhome=/root\nnoise"
    found = parse_probe(text)
    assert found == {"kernel": "Linux 6.1", "os": "Evil?[2J OS", "agent": "A" * 200, "ninep": "yes"}


def test_a_file_that_is_not_an_image_file_fails_without_a_boot(tmp_path: Path) -> None:
    bad = tmp_path / "image.xml"
    bad.write_text('<image xmlns="urn:vmshop:image:1" name="x"><disk file="../../etc/passwd" format="raw"/></image>')
    result = vmplant("check-image", str(bad))
    assert result.returncode == 1 and "NOT FIT TO SERVE" in result.stdout and "[Client." in result.stdout
    assert "Traceback" not in result.stderr


def test_an_image_the_backend_cannot_run_is_declined_with_its_reason(warehouse_dir: Path) -> None:
    debian = warehouse_dir / "debian12" / "image.xml"
    if not debian.is_file():
        pytest.fail("the Debian image is missing: build it with 'bash scripts/build_debian_image.sh var/warehouse'",
                    pytrace=False)
    report = check_image(debian, "uml")
    assert not report.ok and report.agent_seconds is None
    assert "User-Mode Linux cannot boot it" in report.problems[0], report.problems


def test_the_usage_is_explained() -> None:
    result = vmplant("check-image")
    assert result.returncode == 2 and "usage: vmplant check-image" in result.stderr


@pytest.mark.guest
@pytest.mark.integration
def test_a_real_image_is_booted_and_its_agent_answers(tiny_image: object, warehouse_dir: Path) -> None:
    before = set(Path("/tmp").glob("vmck-*"))
    result = vmplant("check-image", str(warehouse_dir / "tiny" / "image.xml"))
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "image:        tiny" in out and "agent ready:" in out and "OK: a plant can serve this image" in out
    assert "qemu-ga:      QEMU Guest Agent" in out and "9p mounts:    yes" in out
    assert "cloud-init:   (none)" in out  # tiny declares none, and has none
    assert set(Path("/tmp").glob("vmck-*")) == before
    assert processes_mentioning("vmshop-check-") == []
