"""Prometheus metrics at /metrics: a real shop and a real plant (fake backend), scraped with a real HTTP client.

Who may read them (admins, over the same TLS as SOAP), and that the numbers move with real operations:
requests and faults by operation and code, create/configure/collect latency, bid rounds, VMs by state,
plants up and down, guest-agent errors, registry size. Plus the bounds on label values (units).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import requests
import zeep.exceptions
from prometheus_client.parser import text_string_to_metric_families
from servers import ServerProcess, host_port, start_plant, start_shop, wait_for

from vmshop_common.metrics import MAX_FAULT_CODES, OTHER_CODE, ServerMetrics

pytestmark = pytest.mark.integration

REFRESH = ["--metrics-refresh", "0.2"]
SAMPLE = Path(__file__).resolve().parent.parent / "scripts" / "sample_blank.xml"

CONFIGURE = """<?xml version="1.0" encoding="UTF-8"?>
<vm xmlns="urn:vmshop:dag:1" name="metrics-configure">
  <nodes>
    <image id="vm" name="tiny"/>
    <script id="{id}" interpreter="/bin/sh" timeout="30">echo {marker}</script>
  </nodes>
  <edges><edge from="vm" to="{id}"/></edges>
</vm>
"""

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(server: ServerProcess, identity: str | None = "admin") -> requests.Response:
    from pki import test_pki

    session = test_pki().session(identity)
    try:
        return session.get(server.url + "metrics", timeout=30)
    finally:
        session.close()


def samples(server: ServerProcess) -> Samples:
    answer = scrape(server)
    assert answer.status_code == 200, answer.text
    assert answer.headers["Content-Type"].startswith("text/plain; version=")
    found: Samples = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found: Samples, name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def pair(tmp_path: Path, warehouse_dir: Path) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    plant = start_plant(tmp_path / "plant", warehouse_dir, backend="fake", network="none", flags=REFRESH)
    shop = None
    try:
        shop = start_shop(tmp_path / "shop", [host_port(plant)], flags=REFRESH)
        yield shop, plant
    finally:
        if shop is not None:
            shop.cleanup()
        plant.cleanup()
    for server in (plant, shop):
        if server is not None:
            assert "Traceback" not in server.output(), server.output()[-3000:]


def test_only_admins_read_the_metrics_over_the_services_own_tls(pair: tuple[ServerProcess, ServerProcess]) -> None:
    shop, plant = pair
    assert scrape(shop).status_code == 200
    refused = scrape(shop, "alice")
    assert refused.status_code == 403 and "not an admin" in refused.text
    assert scrape(plant).status_code == 200
    assert scrape(plant, "shop").status_code == 403  # the plant obeys its shop, which is no admin
    with pytest.raises(requests.exceptions.SSLError):
        scrape(shop, None)  # no certificate: the TLS handshake fails, as for SOAP
    session = __import__("pki").test_pki().session("admin")
    try:
        assert session.post(shop.url + "metrics", data=b"x", timeout=30).status_code == 405
    finally:
        session.close()


def test_the_numbers_move_with_real_operations(pair: tuple[ServerProcess, ServerProcess],
                                               tmp_path: Path) -> None:
    shop, plant = pair
    before_shop, before_plant = samples(shop), samples(plant)
    assert value(before_shop, "vmshop_requests_total", operation="createVM") == 0
    wait_for(lambda: value(samples(shop), "vmshop_plants", state="up") == 1, 30, "the plant counted up")
    assert value(samples(shop), "vmshop_plant_up", plant=f"https://{host_port(plant)}/") == 1

    made = shop.service.createVM(dag=SAMPLE.read_text(), owner="admin")
    reference = made.vm.epr
    shop.service.configureVM(vm=reference, dag=CONFIGURE.format(id="hello", marker="hello"))
    # A guest whose agent answers out of shape: the action fails, and the plant counts an agent error.
    with pytest.raises(zeep.exceptions.Fault):
        shop.service.configureVM(vm=reference, dag=CONFIGURE.format(id="broken", marker="FAKE_AGENT_ERROR"))
    with pytest.raises(zeep.exceptions.Fault) as missing:
        shop.service.describeVM(vm={"Address": shop.url, "VMKey": "vm-000000000000"})
    code = missing.value.code.split(":")[-1]

    found = wait_for(lambda: (lambda s: s if value(s, "vmshop_vms", state="running") == 1 else None)(samples(shop)),
                     30, "the running VM counted by the shop")
    assert value(found, "vmshop_registry_vms") == 1
    assert value(found, "vmshop_requests_total", operation="createVM") == 1
    assert value(found, "vmshop_requests_total", operation="configureVM") == 2
    assert value(found, "vmshop_faults_total", operation="describeVM", code=code) == 1
    assert sum(v for (name, labels), v in found.items()
               if name == "vmshop_faults_total" and ("operation", "configureVM") in labels) == 1
    assert value(found, "vmshop_request_seconds_count", operation="createVM") == 1
    assert value(found, "vmshop_request_seconds_sum", operation="createVM") > 0
    assert value(found, "vmshop_bid_round_seconds_count") == 1

    plant_found = wait_for(lambda: (lambda s: s if value(s, "vmplant_vms", state="running") == 1 else None)(
        samples(plant)), 30, "the running VM counted by the plant")
    # The shop prices from the plant's offer (offers mode, the default): it pulls getOffer, never estimateCost.
    assert value(plant_found, "vmplant_requests_total", operation="getOffer") >= 1
    assert value(plant_found, "vmplant_requests_total", operation="createVM") == 1
    assert value(plant_found, "vmplant_request_seconds_count", operation="configureVM") == 2
    assert value(plant_found, "vmplant_guest_agent_errors_total", reason="failed") == 1
    assert value(before_plant, "vmplant_guest_agent_errors_total", reason="failed") == 0

    shop.service.collectVM(vm=reference)
    found = wait_for(lambda: (lambda s: s if value(s, "vmshop_vms", state="running") == 0 else None)(samples(shop)),
                     30, "the collected VM no longer counted running")
    assert value(found, "vmshop_vms", state="collected") == 1
    assert value(found, "vmshop_request_seconds_count", operation="collectVM") == 1
    assert value(before_shop, "vmshop_registry_vms") == 0

    plant.stop()
    # Offers mode prices from the offer the shop holds: the state poll (not a bid) finds the plant down.
    wait_for(lambda: value(samples(shop), "vmshop_plants", state="down") == 1, 30, "the stopped plant counted down")
    shop.service.estimateCost(dag=SAMPLE.read_text())
    found = samples(shop)
    assert value(found, "vmshop_plants", state="down") == 1 and value(found, "vmshop_plants", state="up") == 0
    assert value(found, "vmshop_bid_round_seconds_count") == 2


def test_label_values_stay_bounded() -> None:
    metrics = ServerMetrics("t", ["createVM"])
    metrics.answered("{urn:x}createVM", None, 0.5)
    metrics.answered("{urn:x}noSuchOperation' OR 1=1", "Client.ResourceNotFound", 0.1)
    metrics.answered(None, "Client.AuthenticationFailed", None)
    for n in range(MAX_FAULT_CODES + 10):
        metrics.answered("{urn:x}createVM", f"Client.Code{n}", 0.01)
    metrics.answered("{urn:x}createVM", "Client.<script>", 0.01)
    text = metrics.exposition().decode()
    operations = {sample.labels.get("operation") for family in text_string_to_metric_families(text)
                  for sample in family.samples}
    assert operations <= {"createVM", "unknown", None}
    codes = {sample.labels["code"] for family in text_string_to_metric_families(text) for sample in family.samples
             if "code" in sample.labels}
    assert len(codes) == MAX_FAULT_CODES + 1 and OTHER_CODE in codes


# --- units: who reads, refreshes, configuration ------------------------------------------------------------------


class ThreadReactor:
    """Just what MetricsResource's rendering thread needs of a reactor: its answer comes back under a lock."""

    def __init__(self) -> None:
        from twisted.internet import task

        self.clock = task.Clock()
        self.lock = threading.Lock()

    def callLater(self, *args: Any) -> Any:  # noqa: N802 - Twisted's name
        return self.clock.callLater(*args)

    def callFromThread(self, work: Any, *args: Any) -> None:  # noqa: N802 - Twisted's name
        with self.lock:
            work(*args)


def _get(resource: Any, method: bytes = b"GET") -> tuple[int, bytes]:
    from twisted.web.test.requesthelper import DummyRequest

    request = DummyRequest([b"metrics"])
    request.method = method
    request.isSecure = lambda: False  # type: ignore[method-assign]  # plain HTTP, as an insecure listener's
    body = resource.render(request)
    if isinstance(body, bytes):
        return request.responseCode or 200, body
    wait_for(lambda: request.finished, 30, "the metrics rendered")
    return request.responseCode or 200, b"".join(request.written)


def test_an_insecure_loopback_servers_callers_read_the_metrics_and_a_server_without_identities_refuses() -> None:
    from vmshop_common.authz import Insecure
    from vmshop_common.metrics import MetricsResource

    metrics = ServerMetrics("t", ["createVM"])
    metrics.answered("{urn:x}createVM", None, 0.25)
    site = SimpleNamespace(identities=Insecure())
    status, body = _get(MetricsResource(metrics, site, ThreadReactor()))
    assert status == 200 and b't_requests_total{operation="createVM"} 1.0' in body
    site.identities = None
    status, body = _get(MetricsResource(metrics, site, ThreadReactor()))
    assert status == 403 and b"no admin" in body
    assert _get(MetricsResource(metrics, SimpleNamespace(identities=Insecure()), ThreadReactor()), b"DELETE")[0] == 405


def test_a_refresh_sets_a_state_that_emptied_to_zero() -> None:
    from prometheus_client import Gauge
    from twisted.internet import defer

    from vmshop_common.metrics import MetricsRefresh

    metrics = ServerMetrics("t", [])
    gauge = Gauge("t_vms", "VMs", ["state"], registry=metrics.registry)
    counts = [{"running": 2.0, "failed": 1.0}, {"running": 3.0}]
    refresh = MetricsRefresh(lambda: {gauge: counts.pop(0)}, lambda read: defer.succeed(read()))
    refresh.run()
    refresh.run()
    text = metrics.exposition().decode()
    assert 't_vms{state="running"} 3.0' in text and 't_vms{state="failed"} 0.0' in text
    assert refresh.rounds == 2
    failing = MetricsRefresh(lambda: {}, lambda read: defer.fail(RuntimeError("busy")))
    assert failing.run().called and failing.rounds == 0  # a missed round is no failure of the timer


def test_the_metrics_settings_round_trip_through_both_configuration_files(tmp_path: Path) -> None:
    from dataclasses import replace

    from vmplant_service.config import PlantConfig, config_to_xml
    from vmplant_service.config import load_config as load_plant
    from vmshop_common.security import ServerSecurity
    from vmshop_service.config import ShopConfig, write_config
    from vmshop_service.config import load_config as load_shop

    shop = ShopConfig(database=tmp_path / "r.sqlite3", plants_file=tmp_path / "p.txt",
                      security=ServerSecurity(insecure=True))
    assert load_shop(write_config(shop, tmp_path / "shop.xml")).metrics is True
    for changed in (replace(shop, metrics=False), replace(shop, metrics_refresh=2.5)):
        again = load_shop(write_config(changed, tmp_path / "shop.xml"))
        assert (again.metrics, again.metrics_refresh) == (changed.metrics, changed.metrics_refresh)
    plant = PlantConfig(name="p", listen_host="127.0.0.1", listen_port=0, public_url="", warehouse_dir=tmp_path,
                        state_dir=tmp_path / "state", security=ServerSecurity(insecure=True))
    for changed in (plant, replace(plant, metrics=False, metrics_refresh=0.5)):
        (tmp_path / "plant.xml").write_text(config_to_xml(changed))
        again = load_plant(tmp_path / "plant.xml")
        assert (again.metrics, again.metrics_refresh) == (changed.metrics, changed.metrics_refresh)


def test_scrapes_that_come_while_the_metrics_render_share_that_rendering() -> None:
    from twisted.web.test.requesthelper import DummyRequest

    from vmshop_common.authz import Insecure
    from vmshop_common.metrics import MetricsResource

    metrics = ServerMetrics("t", [])
    release, calls = threading.Event(), []

    def slow() -> bytes:
        calls.append(1)
        release.wait(30)
        return b"rendered once\n"

    metrics.exposition = slow  # type: ignore[method-assign]
    resource = MetricsResource(metrics, SimpleNamespace(identities=Insecure()), ThreadReactor())
    requests_ = []
    for _ in range(3):
        request = DummyRequest([b"metrics"])
        request.isSecure = lambda: False  # type: ignore[method-assign]
        resource.render(request)
        requests_.append(request)
    release.set()
    wait_for(lambda: all(r.finished for r in requests_), 30, "every scrape answered")
    assert calls == [1] and all(b"".join(r.written) == b"rendered once\n" for r in requests_)
