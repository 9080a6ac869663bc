"""``vmshop_service.client``: every operation over real SOAP against the fake shop, typed results,
empty lists as ``[]``, faults as the project's exceptions with their codes, and an unreachable
shop as ``ShopUnreachableError``."""

from __future__ import annotations

import dataclasses
import http.server
import json
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

# fake_shop and soap_harness live next to this file; import them whatever pytest's import mode.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import fake_shop  # noqa: E402

from vmshop_common.errors import (  # noqa: E402
    ActionFailedError,
    BackendError,
    DagInvalidError,
    DeclinedError,
    DocumentTooLargeError,
    NoPlantError,
    NoSuchPlantError,
    NoSuchVMError,
    NotSupportedError,
    QueryInvalidError,
    VMShopError,
    XMLSyntaxError,
)
from vmshop_service.client import (  # noqa: E402
    VM,
    ActionRun,
    Bid,
    CostItem,
    CreateOutcome,
    EndpointRef,
    Estimate,
    PlantHealth,
    RequestInvalidError,
    ShopUnreachableError,
    VMShopClient,
    dag_from_file,
    wsdl_path,
)

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
BLANK = REPO / "scripts" / "sample_blank.xml"
IMAGE = REPO / "scripts" / "sample_image.xml"
MINIMAL = TESTS / "dags" / "good_minimal.xml"
CYCLE = TESTS / "dags" / "cycle.xml"
OTHER_IMAGE = """<vm xmlns="urn:vmshop:dag:1"><nodes><image id="base" name="nowhere"/></nodes></vm>"""
FAILING = """<vm xmlns="urn:vmshop:dag:1"><nodes><blank id="hw" memory="128" disk="1"/>
<script id="bad">echo fake:fail</script></nodes><edges><edge from="hw" to="bad"/></edges></vm>"""


@pytest.fixture(scope="module")
def server(client_env: object) -> Iterator[fake_shop.FakeShopServer]:
    served = fake_shop.serve_fake_shop(fake_shop.FakeShop(create_seconds=0.2))
    yield served
    served.stop()


@pytest.fixture
def shop(server: fake_shop.FakeShopServer) -> Iterator[fake_shop.FakeShop]:
    yield server.shop
    server.shop.fail_create = None
    server.shop.plant_list = fake_shop.default_plants()


@pytest.fixture(scope="module")
def client(server: fake_shop.FakeShopServer) -> Iterator[VMShopClient]:
    with VMShopClient(server.url, timeout=10) as made:
        yield made


@pytest.fixture(scope="module")
def made(client: VMShopClient) -> CreateOutcome:
    """A VM from the blank sample, owned by alice, with a lease and a chosen key."""
    return client.create(dag_from_file(BLANK), owner="alice", termination_time=time.time() + 3600, key="vm-made")


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# Create and estimate ---------------------------------------------------------------------------------------


def test_create_gives_typed_outcome(made: CreateOutcome, server: fake_shop.FakeShopServer) -> None:
    assert isinstance(made, CreateOutcome)
    vm = made.vm
    assert isinstance(vm, VM) and vm.key == "vm-made" == vm.vm_id
    assert vm.epr == EndpointRef(address=server.url, key="vm-made")
    assert (vm.state, vm.owner, vm.plant, vm.image) == ("running", "alice", fake_shop.PLANT_UP, "tiny")
    assert (vm.memory, vm.vcpus, vm.disk, vm.arch) == (192, 1, 1, "x86_64")
    assert vm.attributes == {"project": "samples"}
    assert vm.steps == ["hw", "os", "report"]
    assert isinstance(vm.created, float) and isinstance(vm.termination, float) and vm.collected is None
    assert vm.termination > time.time() + 3000
    assert isinstance(vm.host_port, int) and vm.address and vm.address.startswith("10.0.0.")
    assert made.plant == fake_shop.PLANT_UP and made.cost == pytest.approx(2.5)
    assert made.attempts == [f"{fake_shop.PLANT_UP}: created"]
    assert [type(b) for b in made.bids] == [Bid, Bid]
    winner, down = made.bids
    assert (winner.status, winner.image, down.status, down.reason) == ("bid", "tiny", "down", "connection refused")
    assert down.items == [] and down.cost is None
    assert all(isinstance(i, CostItem) for i in winner.items) and winner.items[0].label == "clone tiny"
    assert [r.node for r in made.runs] == ["os", "report"]
    run = made.runs[1]
    assert isinstance(run, ActionRun) and run.ok and run.status == 0 and not run.timed_out
    assert run.output == "+ uname -sr\ndone report\n"
    json.dumps(dataclasses.asdict(made))  # results are plain data


def test_create_passes_owner_lease_and_key(client: VMShopClient, shop: fake_shop.FakeShop) -> None:
    made = client.create(dag_from_file(MINIMAL))
    assert made.vm.key.startswith("vm-") and made.vm.owner == "admin"  # the caller, by default
    assert shop.calls[-1] == ("create", ("", None, None))
    assert made.runs == [] and made.vm.attributes == {} and made.vm.steps == ["hw"]


def test_vm_is_visible_while_it_is_made(client: VMShopClient, shop: fake_shop.FakeShop) -> None:
    box: dict[str, CreateOutcome] = {}
    worker = threading.Thread(target=lambda: box.setdefault("made", client.create(dag_from_file(MINIMAL),
                                                                                 key="vm-watched")))
    worker.start()
    seen = set()
    while worker.is_alive():
        try:
            seen.add(client.describe("vm-watched").state)  # the same client, from another thread
        except NoSuchVMError:
            seen.add("unknown")
        time.sleep(0.02)
    worker.join()
    assert "creating" in seen
    assert box["made"].vm.state == "running"


def test_estimate(client: VMShopClient) -> None:
    estimate = client.estimate(dag_from_file(IMAGE))
    assert isinstance(estimate, Estimate)
    assert (estimate.plant, estimate.image) == (fake_shop.PLANT_UP, "tiny")
    assert estimate.cost == pytest.approx(1 + 1 + 1 + 0.2 + 1)
    assert estimate.remaining == ["net", "data", "conf", "run"]
    assert [i.node for i in estimate.items] == ["base", "net", "data", "conf", "run"]
    assert [i.source for i in estimate.items][-2:] == ["hint", "hint"]
    assert [b.plant for b in estimate.bids] == [fake_shop.PLANT_UP, fake_shop.PLANT_DOWN]


def test_estimate_without_any_bid_has_empty_lists(client: VMShopClient) -> None:
    estimate = client.estimate(OTHER_IMAGE)
    assert (estimate.plant, estimate.cost, estimate.image) == (None, None, None)
    assert estimate.items == [] and estimate.remaining == []
    assert [b.status for b in estimate.bids] == ["declined", "down"]
    assert "nowhere" in (estimate.bids[0].reason or "")


# Per-VM operations ------------------------------------------------------------------------------------------


def test_describe_takes_a_vm_an_epr_or_a_key(client: VMShopClient, made: CreateOutcome) -> None:
    by_vm = client.describe(made.vm)
    by_epr = client.describe(made.vm.epr)
    by_key = client.describe("vm-made")
    assert by_vm.key == by_epr.key == by_key.key == "vm-made"
    assert by_key.created == made.vm.created and by_key.attributes == made.vm.attributes
    with pytest.raises(TypeError):
        client.describe(42)  # type: ignore[arg-type]


def test_describe_unknown_vm(client: VMShopClient) -> None:
    with pytest.raises(NoSuchVMError) as caught:
        client.describe("vm-none")
    assert caught.value.code == "Client.NoSuchVM" and "vm-none" in str(caught.value)
    # The shop may be reached under another name (localhost, an alias): the key decides.
    assert client.describe(EndpointRef("http://localhost.example:8080/", "vm-made")).key == "vm-made"


def test_configure(client: VMShopClient, made: CreateOutcome) -> None:
    runs = client.configure(made.vm, dag_from_file(IMAGE))
    assert [r.node for r in runs] == ["net", "data", "conf", "run"]
    assert all(isinstance(r, ActionRun) and r.ok for r in runs)
    assert runs[0].output == "" and runs[3].output.startswith("+ . /etc/wordcount.conf")
    assert client.configure("vm-made", dag_from_file(MINIMAL)) == []
    assert client.describe("vm-made").steps[-4:] == ["net", "data", "conf", "run"]


def test_configure_faults(client: VMShopClient, made: CreateOutcome) -> None:
    with pytest.raises(ActionFailedError) as caught:
        client.configure(made.vm, FAILING)
    assert caught.value.code == "Server.ActionFailed" and "bad" in caught.value.message
    with pytest.raises(DagInvalidError) as invalid:
        client.configure(made.vm, CYCLE.read_text())
    assert invalid.value.code == "Client.DagInvalid" and "cycle: a -> b -> a" in str(invalid.value)


def test_query(client: VMShopClient, made: CreateOutcome) -> None:
    found = client.query("owner=alice memory>=128")
    assert [vm.key for vm in found] == ["vm-made"] and isinstance(found[0], VM)
    assert found[0].attributes == {"project": "samples"}
    assert client.query("owner=nobody") == []
    everything = client.query("")
    assert len(everything) >= 2
    assert len(client.query("", limit=1)) == 1
    assert client.query("project=samples", limit=0) == []


def test_query_faults(client: VMShopClient) -> None:
    with pytest.raises(QueryInvalidError) as caught:
        client.query("memory>>3")
    assert caught.value.code == "Client.QueryInvalid" and "memory>>3" in caught.value.message
    with pytest.raises(QueryInvalidError):
        client.query("", limit=-1)


def test_set_termination_time(client: VMShopClient, made: CreateOutcome) -> None:
    later = time.time() + 7200.5
    assert client.set_termination_time(made.vm, later).termination == pytest.approx(later)
    assert client.set_termination_time("vm-made", None).termination is None
    assert client.describe("vm-made").termination is None
    with pytest.raises(RequestInvalidError):
        client.set_termination_time("vm-made", float("nan"))


def test_resource_properties(client: VMShopClient, made: CreateOutcome) -> None:
    document = client.resource_document(made.vm)
    assert document.startswith("<rp:VMResourceProperties") and "<rp:VMId>vm-made</rp:VMId>" in document
    assert client.get_resource_property("vm-made", "rp:Memory") == [
        '<rp:Memory xmlns:rp="urn:vmshop:vm-resource:1">192</rp:Memory>']
    assert client.get_resource_property("vm-made", "rp:Attribute") == [
        '<rp:Attribute xmlns:rp="urn:vmshop:vm-resource:1" name="project">samples</rp:Attribute>']
    assert client.query_resource_properties("vm-made", "string(rp:State)") == ["running"]
    assert client.query_resource_properties("vm-made", "rp:Nothing") == []
    bare = client.create(dag_from_file(MINIMAL), key="vm-bare")
    assert client.get_resource_property(bare.vm, "rp:Attribute") == []
    with pytest.raises(QueryInvalidError):
        client.query_resource_properties("vm-made", "rp:Memory[")
    with pytest.raises(QueryInvalidError):
        client.get_resource_property("vm-made", "rp:Bogus")


def test_collect_and_destroy(client: VMShopClient) -> None:
    client.create(dag_from_file(MINIMAL), key="vm-collect")
    gone = client.collect("vm-collect")
    assert gone.state == "collected" and isinstance(gone.collected, float)
    assert client.collect("vm-collect").collected == gone.collected  # twice is fine
    client.create(dag_from_file(MINIMAL), key="vm-destroy")
    assert client.destroy(EndpointRef(client.url, "vm-destroy")).state == "collected"
    with pytest.raises(NotSupportedError):
        client.configure("vm-destroy", dag_from_file(MINIMAL))


def test_plants(client: VMShopClient, shop: fake_shop.FakeShop) -> None:
    plants = client.plants()
    assert [type(p) for p in plants] == [PlantHealth, PlantHealth]
    up, down = plants
    assert (up.address, up.up, up.backend, up.images, up.capacity_vms) == (fake_shop.PLANT_UP, True, "fake",
                                                                           ["tiny"], 8)
    assert isinstance(up.last_seen, float)
    assert (down.up, down.images, down.last_error, down.running_vms) == (False, [], "connection refused", None)
    before = shop.reloads
    assert client.reload_plants() == plants
    assert shop.reloads == before + 1
    assert client.plant_changed(fake_shop.PLANT_UP) is True and shop.notices == [fake_shop.PLANT_UP]
    with pytest.raises(NoSuchPlantError):
        client.plant_changed("http://127.0.0.1:1/nowhere/")
    shop.plant_list = []
    assert client.plants() == [] and client.reload_plants() == []


pytestmark = pytest.mark.usefixtures("client_env")

# Faults ------------------------------------------------------------------------------------------------


def test_create_faults_keep_their_codes(client: VMShopClient, shop: fake_shop.FakeShop) -> None:
    with pytest.raises(NoPlantError) as no_plant:
        client.create(OTHER_IMAGE, key="vm-nowhere")
    assert no_plant.value.code == "Server.NoPlantAvailable" and "nowhere" in no_plant.value.message
    with pytest.raises(NoSuchVMError):
        client.describe("vm-nowhere")  # a failed create leaves no VM
    with pytest.raises(XMLSyntaxError) as syntax:
        client.create("<vm")
    assert syntax.value.code == "Client.XMLSyntax"
    with pytest.raises(DeclinedError):
        client.create(dag_from_file(MINIMAL), key="vm-made")  # the key is taken
    shop.fail_create = BackendError("the hypervisor fell over")
    with pytest.raises(BackendError, match="fell over"):
        client.create(dag_from_file(MINIMAL))
    shop.fail_create = VMShopError("something new", code="Server.SomethingNew")
    with pytest.raises(VMShopError) as unknown:
        client.create(dag_from_file(MINIMAL))
    assert type(unknown.value) is VMShopError and unknown.value.code == "Server.SomethingNew"
    assert unknown.value.message == "something new"


def test_server_side_schema_faults(client: VMShopClient) -> None:
    with pytest.raises(VMShopError) as caught:
        client.create(dag_from_file(MINIMAL), owner="x" * 300)
    assert caught.value.code == "Client.SchemaValidationError" and "owner" in caught.value.message


def test_requests_zeep_cannot_encode(client: VMShopClient, shop: fake_shop.FakeShop) -> None:
    calls = len(shop.calls)
    with pytest.raises(XMLSyntaxError, match="U\\+0000"):
        client.create("<vm>\x00</vm>")
    with pytest.raises(RequestInvalidError) as caught:
        client.query("owner=\x01")
    assert caught.value.code == "Client.RequestInvalid"
    assert len(shop.calls) == calls


# An unreachable shop ----------------------------------------------------------------------------------------


def test_refused_connection() -> None:
    url = f"http://127.0.0.1:{closed_port()}/"
    client = VMShopClient(url, timeout=5)
    with pytest.raises(ShopUnreachableError) as caught:
        client.query("")
    assert caught.value.code == "Client.ShopUnreachable"
    assert url in caught.value.message and "refused" in caught.value.message.lower()
    with pytest.raises(ShopUnreachableError):
        VMShopClient(url, wsdl="remote")


def test_no_answer_within_the_timeout() -> None:
    with socket.socket() as silent:  # accepts connections (backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/"
        started = time.monotonic()
        with pytest.raises(ShopUnreachableError, match="no answer within 0.3 s"):
            VMShopClient(url, timeout=0.3).plants()
        assert time.monotonic() - started < 5


def test_something_else_at_the_url() -> None:
    class NotAShop(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = b"<html>hello</html>" if self.path == "/html/" else b"nothing here"
            self.send_response(200 if self.path == "/html/" else 404)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotAShop)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{httpd.server_address[1]}"
        with pytest.raises(ShopUnreachableError, match="HTTP 404"):
            VMShopClient(base + "/", timeout=5).plants()
        with pytest.raises(ShopUnreachableError, match="VMShop"):
            VMShopClient(base + "/html/", timeout=5).plants()
    finally:
        httpd.shutdown()
        httpd.server_close()


# Construction and files -----------------------------------------------------------------------------------------


def test_remote_wsdl(server: fake_shop.FakeShopServer, made: CreateOutcome) -> None:
    with VMShopClient(server.url, wsdl="remote", timeout=10) as remote:
        assert remote.describe("vm-made").key == "vm-made"


def test_checked_in_wsdl_is_the_default() -> None:
    assert wsdl_path().is_file() and wsdl_path().parent.name == "wsdl"


@pytest.mark.parametrize("url", ["127.0.0.1:8080", "ftp://host/", "http://", ""])
def test_bad_url(url: str) -> None:
    with pytest.raises(ValueError):
        VMShopClient(url)


@pytest.mark.parametrize("timeout", [0, -1, float("inf"), float("nan")])
def test_bad_timeout(timeout: float) -> None:
    with pytest.raises(ValueError):
        VMShopClient(timeout=timeout)


def test_dag_from_file(tmp_path: Path) -> None:
    assert dag_from_file(BLANK) == BLANK.read_text(encoding="utf-8")
    with_bom = tmp_path / "bom.xml"
    with_bom.write_bytes(b"\xef\xbb\xbf" + MINIMAL.read_bytes())
    assert dag_from_file(with_bom) == MINIMAL.read_text()
    latin = tmp_path / "latin.xml"
    latin.write_bytes(b"<vm>\n caf\xe9</vm>")
    with pytest.raises(XMLSyntaxError) as caught:
        dag_from_file(latin)
    assert caught.value.line == 2
    control = tmp_path / "control.xml"
    control.write_bytes(b"<vm>\x1b[31m</vm>")
    with pytest.raises(XMLSyntaxError):
        dag_from_file(control)
    huge = tmp_path / "huge.xml"
    huge.write_bytes(b"<vm>" + b" " * (1024 * 1024) + b"</vm>")
    with pytest.raises(DocumentTooLargeError):
        dag_from_file(huge)
    with pytest.raises(OSError):
        dag_from_file(tmp_path / "missing.xml")
    with pytest.raises(OSError):
        dag_from_file(tmp_path)
