"""Shop and plants on hosts of their own (network namespaces, tests/netns.py), real SOAP over mutual TLS
across them, offers mode: the plants push their offers to the shop across the fabric, a client on a host of
its own creates, queries and collects. A qemu-backend plant on its own host keeps its owners' host-only
segments (VDE switches), its guests and their taps inside its namespace (a guest test).
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import netns
import pytest
from pki import test_pki
from servers import ServerProcess, processes_mentioning, start_plant, start_shop, wait_for

from vmplant_service.config import load_config
from vmplant_service.segment import VdeSegment
from vmshop_common import pki as ca_tool
from vmshop_common.dagxml import DAG_NS

# network: the client reaches the servers at their namespace addresses (198.18.0.x, on the test's own bridge).
pytestmark = [pytest.mark.integration, pytest.mark.network,
              pytest.mark.skipif(netns.available() is not None, reason=str(netns.available()))]

DAG = (f'<vm xmlns="{DAG_NS}"><attributes><attribute name="project" value="hosts"/></attributes><nodes>'
       '<image id="s" name="tiny"/><script id="run">echo across</script></nodes>'
       '<edges><edge from="s" to="run"/></edges></vm>')


def _credentials(directory: Path, name: str, address: str) -> list[str]:
    """TLS flags for ``name`` (same subject as the test PKI's ``name``: the mapfiles know it) with a
    certificate for ``address``."""
    pki = test_pki()
    issued = ca_tool.issue(pki.directory, name, name if name == "shop" else "plant", hosts=[address],
                           out_dir=directory)
    return ["--tls-cert", str(issued.cert), "--tls-key", str(issued.key), "--tls-ca", str(pki.ca)]


@pytest.fixture(scope="module")
def hosts(warehouse_dir: Path) -> Iterator[dict[str, Any]]:
    netns.remove_abandoned()
    base = Path(tempfile.mkdtemp(prefix="vmshop-hosts-"))
    fabric = netns.Fabric()
    servers: list[ServerProcess] = []
    try:
        shop_host = fabric.add_host("shop")
        plant_hosts = [fabric.add_host(f"plant{i}") for i in range(3)]
        client = fabric.add_host("client")
        # The plants listen on known ports (their addresses go into the shop's plant list before they start).
        addresses = [f"{host.address}:9443" for host in plant_hosts]
        shop_address = f"{shop_host.address}:8443"
        plants = []
        for i, host in enumerate(plant_hosts):
            directory = base / f"plant{i}"
            directory.mkdir()
            plants.append(start_plant(directory, warehouse_dir, name=f"plant{i}", backend="fake", network="none",
                                      metrics={"boot_seconds": 1.0 + i, "clone_seconds": 0.01},
                                      shops=[shop_address], prefix=fabric.prefix(host), port=9443,
                                      flags=["--host", host.address,
                                             *_credentials(directory, "plant", host.address)]))
            servers.append(plants[-1])
        shop_dir = base / "shop"
        shop_dir.mkdir()
        shop = start_shop(shop_dir, addresses, prefix=fabric.prefix(shop_host), port=8443,
                          flags=["--host", shop_host.address, *_credentials(shop_dir, "shop", shop_host.address)])
        servers.append(shop)
        yield {"fabric": fabric, "client": client, "shop": shop, "plants": plants}
    finally:
        for server in servers:
            server.cleanup()
        fabric.close()
        import shutil
        shutil.rmtree(base, ignore_errors=True)
        assert not [name for name in netns.ours() if name.startswith(fabric.tag)]


def test_create_query_collect_across_hosts_in_offers_mode(hosts: dict[str, Any]) -> None:
    fabric, client, shop, plants = hosts["fabric"], hosts["client"], hosts["shop"], hosts["plants"]
    assert shop.url == f"https://{fabric.hosts['shop'].address}:8443/"

    def offered() -> Any:
        estimate = shop.service.estimateCost(dag=DAG)
        return estimate if [bid.source for bid in estimate.bids] == ["offer"] * 3 else None

    # Every call goes from the client's own host, across the fabric, over mutual TLS.
    estimate = fabric.run_in(client, lambda: wait_for(offered, what="the three plants' offers"))
    assert estimate.plant == plants[0].url and all(bid.status == "bid" for bid in estimate.bids)

    def create_query_collect() -> tuple[Any, Any, Any]:
        made = shop.service.createVM(dag=DAG, owner="alice")
        found = shop.service.queryVMs(query="project=hosts state=running", limit=None)
        collected = shop.service.collectVM(vm=made.vm.epr)
        return made, found, collected

    made, found, collected = fabric.run_in(client, create_query_collect)
    assert made.plant == plants[0].url and made.vm.state == "running"
    assert [vm.vm_id for vm in found] == [made.vm.vm_id]
    assert collected.state == "collected"
    # The plant on its own host made and collected it; the test reaches it across the fabric too.
    plant_vm = fabric.run_in(client, lambda: plants[0].service.describeVM(vm_id=made.vm.vm_id))
    assert plant_vm.state == "collected"
    shop.close_clients()
    plants[0].close_clients()


# --- a qemu plant on a host of its own: its owners' segments live in its namespace -------------------------

NET_DAG = (f'<vm xmlns="{DAG_NS}"><attributes><attribute name="project" value="segments"/></attributes><nodes>'
           '<image id="s" name="tiny"/><network id="net" mode="pool"/><script id="run">echo on the segment</script>'
           '</nodes><edges><edge from="s" to="net"/><edge from="net" to="run"/></edges></vm>')


def _netns_inode(pid: int | str) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def _links(namespace: str | None) -> str:
    command = ["ip", *(("-n", namespace) if namespace else ()), "-o", "link", "show"]
    return subprocess.run(command, check=True, capture_output=True, text=True, timeout=30).stdout


def _get(url: str) -> bytes | None:
    """The page at ``url``, or None while it does not answer."""
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return bytes(answer.read())
    except OSError:
        return None


def _pool_network(ip_file: Path) -> ipaddress.IPv4Network:
    for line in ip_file.read_text().splitlines():
        if line.startswith("# network "):
            return ipaddress.IPv4Network(line.split()[2])
    raise AssertionError(f"{ip_file} names no network")


@pytest.fixture(scope="module")
def qemu_hosts(warehouse_dir: Path) -> Iterator[dict[str, Any]]:
    """A shop, a qemu-backend plant (host-only segments on VDE switches) and a client, each on a host of its
    own; the plant can hold one tiny guest."""
    netns.remove_abandoned()
    base = Path(tempfile.mkdtemp(prefix="vmshop-qhosts-"))
    fabric = netns.Fabric()
    servers: list[ServerProcess] = []
    try:
        shop_host, plant_host, client = fabric.add_host("shop"), fabric.add_host("qplant"), fabric.add_host("client")
        shop_address, plant_address = f"{shop_host.address}:8443", f"{plant_host.address}:9443"
        directory = base / "qplant"
        directory.mkdir()
        plant = start_plant(directory, warehouse_dir, name="qplant", backend="qemu", network="vde", capacity_vms=1,
                            pool_count=4, shops=[shop_address], prefix=fabric.prefix(plant_host), port=9443,
                            flags=["--host", plant_host.address,
                                   *_credentials(directory, "plant", plant_host.address)])
        servers.append(plant)
        shop_dir = base / "shop"
        shop_dir.mkdir()
        shop = start_shop(shop_dir, [plant_address], prefix=fabric.prefix(shop_host), port=8443,
                          flags=["--host", shop_host.address, *_credentials(shop_dir, "shop", shop_host.address)])
        servers.append(shop)
        yield {"fabric": fabric, "client": client, "shop": shop, "plant": plant, "plant_host": plant_host}
    finally:
        for server in servers:
            server.cleanup()  # kills what is left of the plant's guests and switches (by pid), removes the switches
        fabric.close()
        import shutil
        shutil.rmtree(base, ignore_errors=True)
        assert not [name for name in netns.ours() if name.startswith(fabric.tag)]
        assert processes_mentioning(str(base)) == []


@pytest.mark.guest
def test_a_qemu_plant_keeps_its_segments_in_its_own_namespace(qemu_hosts: dict[str, Any]) -> None:
    """A VM with a pool address, made through the shop (another host) on a qemu plant in its own namespace:
    the owner's VDE switch and the guest's QEMU run in the plant's namespace, not the root one; a tap plugged
    into that switch exists only in the plant's namespace, and from there (only once the tap is there) the
    guest's web server answers on its pool address. Collecting the VM stops the switch."""
    fabric, client, shop, plant = qemu_hosts["fabric"], qemu_hosts["client"], qemu_hosts["shop"], qemu_hosts["plant"]
    namespace = qemu_hosts["plant_host"].namespace
    inside, root = os.stat(netns.NETNS_DIR / namespace).st_ino, _netns_inode("self")  # the test runs in the root one
    assert inside != root

    def offered() -> Any:
        estimate = shop.service.estimateCost(dag=NET_DAG)
        return estimate if [bid.source for bid in estimate.bids] == ["offer"] else None

    fabric.run_in(client, lambda: wait_for(offered, what="the qemu plant's offer"))
    made = fabric.run_in(client, lambda: shop.service.createVM(dag=NET_DAG, owner="alice"))
    vm = made.vm
    assert made.plant == plant.url and vm.state == "running" and all(run.ok for run in made.runs)
    network = _pool_network(plant.state_dir / "ip.txt")
    assert ipaddress.IPv4Address(vm.address) in network

    # The owner's switch (its pidfile names it) and the guest's QEMU run in the plant's namespace.
    switch_dir = load_config(plant.config).switch_dir
    assert switch_dir is not None
    pidfiles = list(Path(switch_dir).glob("seg-*/switch.pid"))
    assert len(pidfiles) == 1, pidfiles
    switch = VdeSegment(pidfiles[0].parent)
    assert switch.running()
    switch_pid = int(pidfiles[0].read_text().split()[0])
    guests = [pid for pid in processes_mentioning(str(plant.state_dir / "overlays")) if pid != plant.process.pid]
    assert guests, "no QEMU process names the VM's overlay"
    assert {_netns_inode(pid) for pid in [switch_pid, plant.process.pid, *guests]} == {inside}

    # Before a tap joins the segment, the plant's namespace has no way to the pool address at all.
    plant_host = qemu_hosts["plant_host"]
    with pytest.raises(OSError):
        fabric.run_in(plant_host, lambda: urllib.request.urlopen(f"http://{vm.address}/", timeout=5).read())

    # A tap on the owner's segment, made inside the plant's namespace: there only, and the guest answers on it.
    tap = f"vmst{os.getpid() % 100000}"
    plug = subprocess.Popen([*fabric.prefix(qemu_hosts["plant_host"]), "vde_plug2tap", "-s", str(switch.control),
                             tap], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: f" {tap}:" in _links(namespace) or plug.poll() is not None, timeout=20, what="the tap")
        assert plug.poll() is None, plug.stderr.read() if plug.stderr else ""
        assert f" {tap}:" not in _links(None)
        assert _netns_inode(plug.pid) == inside
        spare = network.network_address + network.num_addresses - 2  # the pool never reaches the top of its network
        subprocess.run(["ip", "-n", namespace, "addr", "add", f"{spare}/{network.prefixlen}", "dev", tap], check=True,
                       timeout=30)
        subprocess.run(["ip", "-n", namespace, "link", "set", tap, "up"], check=True, timeout=30)
        # The guest's web server, on its pool address, across the segment (from a thread in the plant's namespace).
        page = fabric.run_in(plant_host, lambda: wait_for(lambda: _get(f"http://{vm.address}/"), timeout=30,
                                                         what="the guest on its pool address"))
        assert b"vmshop-guest" in page
    finally:
        plug.kill()
        plug.wait(10)
        if plug.stderr:
            plug.stderr.close()
    assert f" {tap}:" not in _links(namespace)  # a tap of vde_plug2tap's ends with it

    collected = fabric.run_in(client, lambda: shop.service.collectVM(vm=vm.epr))
    assert collected.state == "collected"
    wait_for(lambda: not switch.running(), timeout=30, what="the owner's switch to stop (no VM of theirs left)")
    assert not [pid for pid in guests if Path(f"/proc/{pid}").exists()
                and (Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z")]
    shop.close_clients()
