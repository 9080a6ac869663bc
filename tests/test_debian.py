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
- Resume (issue 14): the qemu plant publishes a Debian VM with its running
  state; two clones resume from it, each with its own identity (MACs, pool
  address, host name, entropy), which systemd-networkd keeps across its
  restart, and one reaches the other over their owner's segment.

Each backend boots ONE Debian guest for the sample (about a minute and a
half under TCG here); the qemu plant boots one more, the saved guest, at
the same time as the sample's (its clones resume in seconds); the tests
that can share them do.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

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
          extra_plants: list[ServerProcess] = (), capacity_vms: int = 2) -> Site:  # type: ignore[assignment]
    plant = start_plant(base / backend, warehouse, name=backend, backend=backend, backend_options=options,
                        datastore=datastore, capacity_vms=capacity_vms, capacity_memory=1536)
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


def own_warehouse(base: Path, shared: Path) -> Path:
    """A warehouse of its own in ``base`` whose index lists ``shared``'s images (what a plant publishes goes
    there, never into the shared warehouse)."""
    warehouse = base / "warehouse"
    warehouse.mkdir()
    lines = [line.strip() for line in (shared / "index.txt").read_text().splitlines()]
    (warehouse / "index.txt").write_text("".join(f"{(shared / line).resolve()}\n" for line in lines
                                                 if line and not line.startswith("#")))
    return warehouse


@pytest.fixture(scope="module")
def qemu_site(tmp_path_factory: pytest.TempPathFactory, debian_warehouse: Path, datastore: Path,
              uml_plant: ServerProcess) -> Iterator[Site]:
    base = tmp_path_factory.mktemp("deb-qemu")
    # Three Debian guests at most (512 MiB each): the saved guest and its two resumed clones.
    site = _site(base, own_warehouse(base, debian_warehouse), datastore, "qemu", {}, [uml_plant], capacity_vms=3)
    try:
        yield site
    finally:
        try:
            for vm in site.plant.service.listVMs(include_collected=False) or []:
                site.plant.service.collectVM(vm_id=vm.vm_id)
        except Exception:  # noqa: BLE001 - cleanup goes on
            pass
        site.shop.cleanup()
        site.plant.cleanup()
        assert processes_mentioning(str(site.plant.state_dir)) == []


def one_step(body: str, image: str = "debian12") -> str:
    """A DAG of ``image`` and one bash script."""
    return (f'<vm xmlns="{DAG_NS}"><nodes><image id="os" name="{image}"/>'
            f'<script id="go" interpreter="/bin/bash" timeout="120">{escape(body)}</script></nodes>'
            '<edges><edge from="os" to="go"/></edges></vm>')


@pytest.fixture(scope="module")
def saved_guest(qemu_site: Site) -> Iterator[Future[Any]]:
    """The Debian guest the resume test publishes with its state (alice's): its create starts in the background
    when a test first asks for it, so that its boot (a minute or more under TCG) overlaps the sample's, on the
    same plant. Its random generator is initialised (as a guest that ran a while has), it holds a file of its own,
    and its step prints its uptime and its NICs' MACs."""
    def create() -> Any:
        alice = qemu_site.shop.service_as("alice", timeout=900)
        return alice.createVM(dag=one_step("head -c 8 /dev/urandom >/dev/null && mkdir -p /srv/saved && "
                                           "echo 'saved guest' >/srv/saved/mark && sync && cut -d' ' -f1 "
                                           "/proc/uptime; cat /sys/class/net/e*/address | sort | tr '\\n' ' '"),
                              vm_key="alice-deb-saved")

    with ThreadPoolExecutor(1) as pool:  # (leaving waits for the create: the site collects the VM after)
        yield pool.submit(create)


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
    # The VM's cloud-init seed exists while it runs, 0600, in the plant's state directory (beside the seeds of the
    # plant's other VMs: on qemu, the resume test's saved guest boots at the same time).
    seed = plant.state_dir / "seeds" / f"{made.vm.plant_vm_id}.iso"
    assert seed.is_file() and seed.stat().st_mode & 0o777 == 0o600
    assert all(each.suffix == ".iso" and each.stat().st_mode & 0o777 == 0o600
               for each in (plant.state_dir / "seeds").iterdir())

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
    wait_for(lambda: [vm.vm_id for vm in shop.service.queryVMs(query="application=wordfreq image=debian12 "
                                                                     "state=running", limit=None)
                      or []] == [made.vm.vm_id], timeout=30, what="the shop to see the VM running again")

    assert shop.service.collectVM(vm=made.vm.epr).state == "collected"
    assert not seed.exists()
    assert not (plant.state_dir / "overlays" / f"{made.vm.plant_vm_id}.qcow2").exists()
    assert processes_mentioning(str(plant.state_dir / "run" / made.vm.plant_vm_id)) == []
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


def test_the_debian_sample_through_the_shop_on_qemu(qemu_site: Site, saved_guest: Future[Any]) -> None:
    sample_through_the_shop(qemu_site)  # (the resume test's saved guest boots meanwhile)


#: What a resumed Debian clone reports of itself (key=value lines): the saved guest's file, its uptime, MACs, host
#: name, its segment NIC's MAC, IPv4 and IPv6 link-local addresses, 32 bytes of /dev/urandom, how often its kernel
#: reseeded its random generator on a new VM generation id, and how systemd-networkd sees its NICs (once it has
#: configured them all, or after 30 s).
RESUMED = r"""
seg=$(ip -4 -o addr show | awk '$2 != "lo" && $4 !~ /^10\.0\.2\./ {print $2; exit}')
links() { networkctl list --no-legend | awk '$3 == "ether" {print $2 ":" $5}' | sort | tr '\n' ' '; }
echo "mark=$(cat /srv/saved/mark)"
echo "uptime=$(cut -d' ' -f1 /proc/uptime)"
echo "macs=$(cat /sys/class/net/e*/address | sort | tr '\n' ' ')"
echo "hostname=$(hostname)"
echo "segmac=$(cat /sys/class/net/$seg/address)"
echo "addresses=$(ip -4 -o addr show dev $seg | awk '{print $4}' | tr '\n' ' ')"
echo "linklocal=$(ip -6 -o addr show dev $seg scope link | awk '{print $4}' | tr '\n' ' ')"
echo "random=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"
echo "reseeded=$(dmesg | grep -c 'crng reseeded due to virtual machine fork')"
settled() { networkctl list --no-legend | awk '$3 == "ether" && $5 != "configured" {n++} END {exit n > 0}'; }
for i in $(seq 150); do settled && break; sleep 0.2; done
echo "links=$(links)"
"""
#: networkd started over (it matches its .network files again, by MAC): the segment's addresses and the NICs' setup.
RESTARTED = r"""
systemctl restart systemd-networkd
for i in $(seq 150); do settled && ip -4 -o addr show dev $seg | grep -q . && break; sleep 0.2; done
echo "restarted=$(ip -4 -o addr show dev $seg | awk '{print $4}' | tr '\n' ' ')"
echo "relinks=$(links)"
"""


def report(output: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in output.splitlines() if "=" in line)


def test_two_debian_clones_resume_from_one_saved_state_each_with_its_own_identity(qemu_site: Site,
                                                                                  saved_guest: Future[Any]) -> None:
    """Issue 14's resume acceptance on Debian: systemd-networkd (cloud-init's files match NICs by MAC) keeps each
    clone's MACs and pool address, also when it starts over; each clone reaches the other over alice's segment."""
    alice = qemu_site.shop.service_as("alice", timeout=900)

    def configure(vm: Any, body: str, image: str) -> str:
        runs = alice.configureVM(vm=vm.epr, dag=one_step(body, image))
        assert [run.ok for run in runs] == [True], [run.output for run in runs]
        wait_for(lambda: alice.describeVM(vm=vm.epr).state == "running", 30, "the VM running again")
        return str(runs[0].output)

    saved = saved_guest.result(timeout=900)
    assert saved.vm.state == "running" and saved.vm.image == "debian12"
    uptime, macs = saved.runs[0].output.splitlines()[:2]
    wait_for(lambda: alice.describeVM(vm=saved.vm.epr).state == "running", 30, "the VM running")
    image = alice.publishVM(vm=saved.vm.epr, image="alice-deb-saved", with_state=True)
    assert (image.base, image.with_state) == ("debian12", True)

    clones = []
    for key, body in (("alice-deb-1", RESUMED + RESTARTED), ("alice-deb-2", RESUMED)):
        made = alice.createVM(dag=one_step(body, "alice-deb-saved"), vm_key=key)
        assert made.vm.image == "alice-deb-saved" and [run.ok for run in made.runs] == [True], made.runs
        seen = report(made.runs[0].output)
        # Resumed, not booted: the saved guest's file, and its uptime goes on from the saved guest's.
        assert seen["mark"] == "saved guest" and float(seen["uptime"]) >= float(uptime), seen
        assert seen["reseeded"] == "1", seen
        # Its pool address alone on its segment NIC (never the saved guest's), set by networkd from its own
        # files (every NIC configured), and so again after networkd started over (the first clone: once is enough).
        assert seen["addresses"].split() == [f"{made.vm.address}/24"], seen
        assert seen["links"].count(":configured") == 2, seen
        if "restarted" in seen:
            assert seen["restarted"].split() == [f"{made.vm.address}/24"] and seen["relinks"] == seen["links"], seen
        clones.append((made.vm, seen))
    (one_vm, first), (two_vm, second) = clones
    assert len(first["random"]) == len(second["random"]) == 64 and first["random"] != second["random"]
    for a, b in ((first["macs"], second["macs"]), (first["macs"], macs), (second["macs"], macs)):
        assert set(a.split()).isdisjoint(b.split())
    assert first["linklocal"].split() != [] and first["linklocal"] != second["linklocal"]
    assert first["hostname"] != second["hostname"] and one_vm.address not in (two_vm.address, saved.vm.address)
    # Both answer their agent, and the second reaches the first over alice's segment, at its new MAC (a
    # closed port answers with a reset: the guest has no ping).
    reached = configure(two_vm, f"timeout 10 bash -c ': >/dev/tcp/{one_vm.address}/9' 2>&1; "
                                f"ip neigh show {one_vm.address}", "alice-deb-saved")
    assert "Connection refused" in reached and f"lladdr {first['segmac']} " in reached, reached
    assert configure(one_vm, "hostname", "alice-deb-saved") == f"{first['hostname']}\n"
    for vm in (one_vm, two_vm, saved.vm):
        alice.collectVM(vm=vm.epr)
    assert alice.unpublishImage(image="alice-deb-saved") == [qemu_site.plant.url]


def test_the_debian_sample_through_the_shop_on_libvirt(tmp_path_factory: pytest.TempPathFactory,
                                                       debian_warehouse: Path, datastore: Path) -> None:
    site = _site(tmp_path_factory.mktemp("deb-libvirt"), debian_warehouse, datastore, "libvirt", LIBVIRT)
    try:
        sample_through_the_shop(site)
    finally:
        site.shop.cleanup()
        site.plant.cleanup()
    assert processes_mentioning(str(site.plant.state_dir)) == []
