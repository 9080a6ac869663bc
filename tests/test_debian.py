"""A stock Debian 12 cloud image (``debian12``) served by real plants, through a real shop.

The image is the one ``scripts/build_debian_image.sh`` builds (systemd,
Debian's kernel, qemu-guest-agent, cloud-init NoCloud). The sample DAG
``scripts/sample_debian.xml`` runs through the shop as a user's would:
create (cloud-init from the VM's own seed, a pool address that lasts,
the read-only data share, a local ``.deb`` installed with dpkg, its
configuration file, its output), one more action by configure, a query,
a collect (the seed, overlay and processes gone).

- ``qemu``: the module's shop has a qemu plant and a uml plant; UML
  declines the Debian DAG at bid time with its capability reason (no
  boot), and declines nothing it can run (tiny).
- ``libvirt``: the same flow on a plant of its own.

Each backend boots ONE Debian guest (about a minute and a half under TCG
here); the tests that can share it do.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from servers import ROOT, ServerProcess, host_port, processes_mentioning, start_plant, start_shop, wait_for

from vmshop_common.dagxml import DAG_NS

pytestmark = [pytest.mark.guest, pytest.mark.integration]

SAMPLE = ROOT / "scripts" / "sample_debian.xml"
LIBVIRT = {"uri": "qemu:///system", "daemon": "spawn", "daemon_timeout": "10"}
DEBIAN_HINT = "build it with 'bash scripts/build_debian_image.sh var/warehouse' (scripts/setup_host.sh does)"
TEXT = "the cat and the dog and the bird\nthe end\n"

#: One more action on the running sample: the application again with another setting, and the pool address
#: surviving what a reboot does to the network (networkd starting over from its files).
MORE = f"""<vm xmlns="{DAG_NS}"><nodes><image id="os" name="debian12"/>
<file id="conf2" path="/etc/wordfreq.conf" mode="0644">input=/mnt/appdata
top=1</file>
<script id="again" interpreter="/bin/bash" timeout="120">
wordfreq
mac=$(sed -n 's/^MACAddress=//p' /etc/systemd/network/05-vmshop-segment.network)
for n in /sys/class/net/*; do [ "$(cat "$n/address")" = "$mac" ] &amp;&amp; dev=${{n##*/}}; done
addr=$(ip -4 -o addr show dev "$dev" | awk '{{print $4}}')
echo "segment $dev $addr"
ip addr flush dev "$dev"
systemctl restart systemd-networkd
for i in $(seq 100); do ip -4 -o addr show dev "$dev" | grep -q " $addr " &amp;&amp; break; sleep 0.2; done
echo "after networkd restarted: $(ip -4 -o addr show dev "$dev" | awk '{{print $4}}')"
</script></nodes>
<edges><edge from="os" to="conf2"/><edge from="conf2" to="again"/></edges></vm>"""


@dataclass
class Site:
    plant: ServerProcess
    shop: ServerProcess
    datastore: Path


@pytest.fixture(scope="module")
def debian_warehouse(warehouse_dir: Path) -> Path:
    """The warehouse, which must hold debian12 (fails, never skips, when it does not)."""
    config = warehouse_dir / "debian12" / "image.xml"
    if not config.is_file():
        pytest.fail(f"the Debian image {config} is missing: {DEBIAN_HINT}", pytrace=False)
    return warehouse_dir


@pytest.fixture(scope="module")
def datastore() -> Iterator[Path]:
    """A data store as a site would lay it out: the sample's package (built with dpkg-deb) and its input.

    Outside pytest's 0700 temporary directories: under libvirt QEMU reads it as its own user.
    """
    root = Path(tempfile.mkdtemp(prefix="vmt-deb-", dir="/tmp"))
    try:
        subprocess.run(["bash", str(ROOT / "scripts" / "build_sample_deb.sh"), str(root / "packages")], check=True,
                       capture_output=True)
        (root / "appdata").mkdir()
        (root / "appdata" / "text.txt").write_text(TEXT)
        for path in [root, *root.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _site(base: Path, warehouse: Path, datastore: Path, backend: str, options: dict[str, str],
          extra_plants: list[ServerProcess] = ()) -> Site:  # type: ignore[assignment]
    plant = start_plant(base / backend, warehouse, name=backend, backend=backend, backend_options=options,
                        datastore=datastore, capacity_vms=2, capacity_memory=1536)
    try:
        # The backend's first look (libvirt: starting its daemons) happens before the shop asks for bids; and a
        # bid may be slow on a busy 2-core machine, which is not what these tests are about.
        plant.service.plantInfo()
        shop = start_shop(base / "shop", [host_port(plant)] + [host_port(p) for p in extra_plants],
                          bid_timeout=30.0)
    except BaseException:
        plant.cleanup()
        raise
    # A Debian create boots a real distribution under TCG (~1.5 min here, several on a host busy with other work).
    shop.client(timeout=900)
    return Site(plant, shop, datastore)


@pytest.fixture(scope="module")
def uml_plant(tmp_path_factory: pytest.TempPathFactory, debian_warehouse: Path,
              datastore: Path) -> Iterator[ServerProcess]:
    """A UML plant that has all the sample needs but a kernel that boots Debian: a segment, a data store."""
    plant = start_plant(tmp_path_factory.mktemp("deb-uml"), debian_warehouse, name="uml", backend="uml",
                        capacity_vms=1, datastore=datastore)
    try:
        yield plant
    finally:
        plant.cleanup()


@pytest.fixture(scope="module")
def qemu_site(tmp_path_factory: pytest.TempPathFactory, debian_warehouse: Path, datastore: Path,
              uml_plant: ServerProcess) -> Iterator[Site]:
    site = _site(tmp_path_factory.mktemp("deb-qemu"), debian_warehouse, datastore, "qemu", {}, [uml_plant])
    try:
        yield site
    finally:
        site.shop.cleanup()
        site.plant.cleanup()
        assert processes_mentioning(str(site.plant.state_dir)) == []


def outputs(runs: Any) -> dict[str, str]:
    return {run.node: run.output for run in runs}


def sample_through_the_shop(site: Site) -> None:
    """Create the sample, configure one more action, query, collect; check each step's effect."""
    shop, plant = site.shop, site.plant
    made = shop.service.createVM(dag=SAMPLE.read_text(), owner="alice")
    assert made.vm.state == "running" and made.vm.image == "debian12", made.vm
    assert all(run.ok for run in made.runs), [(run.node, run.status, run.output) for run in made.runs]
    out = outputs(made.runs)
    assert "systemd-networkd, /etc/systemd/network/05-vmshop-segment.network" in out["net"], out["net"]
    assert made.vm.address and made.vm.address in out["net"]
    assert "mounted packages on /mnt/packages" in out["packages"]
    assert "vmshop-wordfreq 1.0 install ok installed" in out["install"], out["install"]
    assert out["conf"].startswith("wrote /etc/wordfreq.conf")
    assert "Debian GNU/Linux 12 (bookworm)" in out["run"] and made.vm.address in out["run"], out["run"]
    assert "wordfreq 1.0 on wordfreq: 1 file(s) in /mnt/appdata" in out["run"]
    assert "      4 the\n" in out["run"], out["run"]
    # The VM's cloud-init seed exists while it runs, 0600, and nowhere but the plant's state directory.
    seeds = list((plant.state_dir / "seeds").iterdir())
    assert [seed.name for seed in seeds] == [f"{made.vm.plant_vm_id}.iso"]
    assert seeds[0].stat().st_mode & 0o777 == 0o600

    runs = shop.service.configureVM(vm=made.vm.epr, dag=MORE)
    out = outputs(runs)
    assert all(run.ok for run in runs), out
    lines = out["again"].splitlines()
    assert lines[0].startswith("wordfreq 1.0 on wordfreq") and lines[1].split() == ["4", "the"], lines
    assert lines[2].startswith("segment "), lines  # top=1: the new configuration was read
    assert f"after networkd restarted: {made.vm.address}/" in out["again"], out["again"]

    found = shop.service.queryVMs(query="application=wordfreq image=debian12", limit=None) or []
    assert [vm.vm_id for vm in found] == [made.vm.vm_id] and found[0].address == made.vm.address
    # The shop learns the end of the configure from the plant (its next poll).
    wait_for(lambda: [vm.vm_id for vm in shop.service.queryVMs(query="image=debian12 state=running", limit=None)
                      or []] == [made.vm.vm_id], timeout=30, what="the shop to see the VM running again")

    assert shop.service.collectVM(vm=made.vm.epr).state == "collected"
    assert list((plant.state_dir / "seeds").iterdir()) == []
    assert list((plant.state_dir / "overlays").iterdir()) == []
    assert processes_mentioning(str(plant.state_dir / "run")) == []
    assert "Traceback" not in plant.output() + shop.output()


def test_uml_declines_debian_at_bid_time_with_its_reason(qemu_site: Site, uml_plant: ServerProcess) -> None:
    estimate = qemu_site.shop.service.estimateCost(dag=SAMPLE.read_text())
    bids = {bid.plant: bid for bid in estimate.bids}
    uml, qemu = bids[uml_plant.url], bids[qemu_site.plant.url]
    assert uml.status == "declined" and "User-Mode Linux cannot boot it" in uml.reason, uml
    assert "debian12" in uml.reason and "kernel" in uml.reason
    assert qemu.status == "bid" and estimate.plant == qemu_site.plant.url and estimate.image == "debian12"


def test_a_blank_request_naming_debian_12_is_served_from_the_debian_image(qemu_site: Site) -> None:
    def blank(os_step: str) -> str:
        return (f'<vm xmlns="{DAG_NS}"><nodes><blank id="hw" memory="512" vcpus="1" disk="2" arch="x86_64"/>'
                f'<script id="os" interpreter="/bin/sh">{os_step}</script><script id="go">true</script></nodes>'
                '<edges><edge from="hw" to="os"/><edge from="os" to="go"/></edges></vm>')

    debian = qemu_site.shop.service.estimateCost(dag=blank("#vmshop-os: Debian 12"))
    tiny = qemu_site.shop.service.estimateCost(dag=blank("#vmshop-os: tiny busybox linux 1"))
    assert (debian.image, tiny.image) == ("debian12", "tiny")
    assert list(debian.remaining) == ["go"]


def test_the_debian_sample_through_the_shop_on_qemu(qemu_site: Site) -> None:
    sample_through_the_shop(qemu_site)


def test_the_debian_sample_through_the_shop_on_libvirt(tmp_path_factory: pytest.TempPathFactory,
                                                       debian_warehouse: Path, datastore: Path) -> None:
    site = _site(tmp_path_factory.mktemp("deb-libvirt"), debian_warehouse, datastore, "libvirt", LIBVIRT)
    try:
        sample_through_the_shop(site)
    finally:
        site.shop.cleanup()
        site.plant.cleanup()
    assert processes_mentioning(str(site.plant.state_dir)) == []
