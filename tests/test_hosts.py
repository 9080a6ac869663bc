"""Shop and plants on hosts of their own (network namespaces, tests/netns.py), real SOAP over mutual TLS
across them, offers mode: the plants push their offers to the shop across the fabric, a client on a host of
its own creates, queries and collects.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import netns
import pytest
from pki import test_pki
from servers import ServerProcess, start_plant, start_shop, wait_for

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
