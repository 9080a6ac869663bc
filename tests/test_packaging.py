"""The package as a site installs it: a wheel built with ``python -m build``, installed into a fresh venv.

From a directory that is not the checkout, the installed ``vmshop validate`` finds its schemas, and a plant
(fake backend) and a shop configured with the installed configure scripts and started with the installed
commands answer: the CLI sees the plant up and makes a VM through them, ``?wsdl`` and ``/metrics`` answer.

The dependencies come from a wheelhouse (``$VMSHOP_WHEELHOUSE``, default ``var/wheelhouse``), filled once
with ``pip wheel`` from the package indexes and used with ``--no-index`` afterwards, so a re-run neither
downloads nor compiles anything.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pki import test_pki
from servers import SHOP_BINDING, SHOP_WSDL, ServerProcess, _started, host_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
WHEELHOUSE = Path(os.environ.get("VMSHOP_WHEELHOUSE") or ROOT / "var" / "wheelhouse")
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check"]


@dataclass(frozen=True)
class Install:
    bin: Path  # the fresh venv's bin/
    elsewhere: Path  # a directory that is not the checkout
    env: dict[str, str]  # no PYTHONPATH, no VMSHOP_* override, no checkout on any path


def _run(args: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, **kwargs)  # type: ignore[call-overload]
    assert done.returncode == 0, f"{args[:4]} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Install:
    base = tmp_path_factory.mktemp("install")
    dist = base / "dist"
    # As a site builds it: an sdist, then the wheel built from that sdist (so the sdist must carry wsdl/, xsd/).
    _run([sys.executable, "-m", "build", "--outdir", str(dist), str(ROOT)])
    wheels = list(dist.glob("vmshop-*.whl"))
    assert len(wheels) == 1, wheels
    wheel = wheels[0]
    venv = base / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    target = [*PIP, "--python", str(venv / "bin" / "python"), "install", "--no-index", "--find-links",
              str(WHEELHOUSE), str(wheel)]
    if subprocess.run(target, capture_output=True, timeout=600).returncode != 0:
        WHEELHOUSE.mkdir(parents=True, exist_ok=True)
        for stale in WHEELHOUSE.glob("vmshop-*.whl"):  # an older build of ours, with older dependencies
            stale.unlink()
        # Once (and again when a dependency is added): from the package indexes.
        _run([*PIP, "wheel", "--wheel-dir", str(WHEELHOUSE), str(wheel)])
        _run(target)
    elsewhere = base / "elsewhere"
    elsewhere.mkdir()
    env = {key: value for key, value in os.environ.items()
           if key != "PYTHONPATH" and not key.startswith("VMSHOP_") and key != "VIRTUAL_ENV"}
    env["PATH"] = f"{venv / 'bin'}:/usr/bin:/bin"
    return Install(venv / "bin", elsewhere, env)


def test_the_installed_package_carries_its_contracts(installed: Install, tmp_path: Path) -> None:
    where = _run([str(installed.bin / "python"), "-c",
                  "from vmshop_common.contracts import contract_dir; import vmshop_common;"
                  "print(vmshop_common.__file__); print(contract_dir('xsd')); print(contract_dir('wsdl'))"],
                 cwd=installed.elsewhere, env=installed.env).stdout.split()
    package, xsd, wsdl = (Path(line) for line in where)
    assert not package.is_relative_to(ROOT), package  # the installed copy, not the checkout
    assert xsd == package.parent / "published" / "xsd" and (xsd / "vmdag-1.0.xsd").is_file()
    assert (wsdl / "vmshop.wsdl").read_bytes() == (ROOT / "wsdl" / "vmshop.wsdl").read_bytes()
    assert {p.name for p in xsd.iterdir()} == {p.name for p in (ROOT / "xsd").glob("*.xsd")}
    overridden = _run([str(installed.bin / "python"), "-c",
                       "from vmshop_common.contracts import contract_dir; print(contract_dir('xsd'))"],
                      cwd=installed.elsewhere, env={**installed.env, "VMSHOP_XSD_DIR": str(tmp_path)}).stdout
    assert Path(overridden.strip()) == tmp_path


def test_vmshop_validate_runs_from_any_directory(installed: Install) -> None:
    sample = installed.elsewhere / "sample_image.xml"
    sample.write_bytes((ROOT / "scripts" / "sample_image.xml").read_bytes())
    done = _run([str(installed.bin / "vmshop"), "validate", sample.name], cwd=installed.elsewhere,
                env=installed.env)
    assert "valid" in done.stdout and "invalid" not in done.stdout, done.stdout
    bad = installed.elsewhere / "bad.xml"
    bad.write_text(sample.read_text().replace('name="tiny"', 'nam="tiny"'))
    refused = subprocess.run([str(installed.bin / "vmshop"), "validate", bad.name], cwd=installed.elsewhere,
                             env=installed.env, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "InternalError" not in refused.stdout + refused.stderr
    assert "Traceback" not in refused.stderr


@pytest.fixture
def installed_pair(installed: Install, tmp_path: Path,
                   warehouse_dir: Path) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    pki = test_pki()
    plant_dir, shop_dir = tmp_path / "plant", tmp_path / "shop"
    plant_dir.mkdir()
    shop_dir.mkdir()
    plant_config = plant_dir / "configuration_vmplant.xml"
    _run([str(installed.bin / "configure_vmplant.py"), "--yes", "--name", "installed", "--port", "0",
          "--warehouse", str(warehouse_dir), "--state-dir", str(plant_dir / "state"), "--backend", "fake",
          "--network", "none", "--shops-file", str(plant_dir / "shops.txt"), "--output", str(plant_config),
          *pki.tls_flags("plant"), "--authorization", str(pki.plant_mapfile(plant_dir / "vmplant-mapfile"))],
         cwd=installed.elsewhere, env=installed.env)
    plant = _started(ServerProcess(directory=installed.elsewhere, config=plant_config, state_dir=plant_dir / "state",
                                   log=plant_dir / "plant.log", program=[str(installed.bin / "vmplant")]))
    shop = None
    try:
        plants_file = shop_dir / "plants.txt"
        plants_file.write_text(host_port(plant) + "\n")
        shop_config = shop_dir / "configuration_vmshop.xml"
        mapfile = pki.shop_mapfile(shop_dir / "vmshop-mapfile", {"plant": [host_port(plant)]})
        _run([str(installed.bin / "configure_vmshop.py"), "--yes", "--port", "0", "--database",
              str(shop_dir / "registry.sqlite3"), "--plants-file", str(plants_file), "--output", str(shop_config),
              *pki.tls_flags("shop"), "--authorization", str(mapfile)], cwd=installed.elsewhere, env=installed.env)
        shop = _started(ServerProcess(directory=installed.elsewhere, config=shop_config, state_dir=shop_dir,
                                      log=shop_dir / "shop.log", module="vmshop_service.main", wsdl=SHOP_WSDL,
                                      binding=SHOP_BINDING, program=[str(installed.bin / "vmshop-server")]))
        yield shop, plant
    finally:
        if shop is not None:
            shop.cleanup()
        plant.cleanup()
    for server in (plant, shop):
        if server is not None:
            assert "Traceback" not in server.output(), server.output()[-3000:]


def test_a_shop_and_a_plant_run_from_the_install(installed: Install, installed_pair: tuple[ServerProcess,
                                                                                            ServerProcess]) -> None:
    shop, plant = installed_pair
    pki = test_pki()
    cli = [str(installed.bin / "vmshop"), "--shop", shop.url, "--cert", str(pki.cert("admin")), "--key",
           str(pki.key("admin")), "--ca", str(pki.ca), "--json"]
    plants = json.loads(_run([*cli, "plants"], cwd=installed.elsewhere, env=installed.env).stdout)
    assert json.dumps(plants).count('"up": true') == 1, plants
    sample = installed.elsewhere / "sample_blank.xml"
    sample.write_bytes((ROOT / "scripts" / "sample_blank.xml").read_bytes())
    made = json.loads(_run([*cli, "create", "--dag", sample.name], cwd=installed.elsewhere, env=installed.env).stdout)
    assert "running" in json.dumps(made), made
    session = pki.session("admin")
    try:
        for server, service in ((shop, b'name="VMShop"'), (plant, b'name="VMPlant"')):
            answer = session.get(server.url + "?wsdl", timeout=30)
            assert answer.status_code == 200 and service in answer.content
            metrics = session.get(server.url + "metrics", timeout=30)
            assert metrics.status_code == 200 and b"_requests_total" in metrics.content
        assert b'vmshop_requests_total{operation="createVM"} 1.0' in session.get(shop.url + "metrics",
                                                                                  timeout=30).content
    finally:
        session.close()
