"""A second SOAP client: suds (suds-community) drives every VMShop operation.

The client is built from the checked-in ``wsdl/vmshop.wsdl`` alone (a
``file://`` URL, no cache) and pointed at a real shop brokering between two
fake-backend plants, to show that the contract serves clients other than
zeep. A message plugin notes every operation the shop answered without a
fault; the lifecycle test ends by checking that this is every operation of
the WSDL's portType.

suds-community (1.2.0 and earlier) does not escape an ``&`` that already
begins ``&amp;``, ``&lt;``, ``&gt;``, ``&quot;`` or ``&apos;``
(``suds.sax.enc.Encoder``), so a string argument holding such text (a DAG
whose script says ``&amp;&amp;``, XML for the shell's ``&&``) reaches the
server altered. Passing ``suds.sax.text.Raw(xml.sax.saxutils.escape(dag))``
sends it intact; both are tested below.

Over mutual TLS: suds' urllib transport takes an ``ssl`` context (the CA
that signs the shop's certificate, and the client's own certificate and
key) through an extra ``HTTPSHandler`` (:class:`MutualTlsTransport`).
"""

from __future__ import annotations

import ssl
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import pytest
from lxml import etree
from pki import test_pki
from servers import ROOT, ServerProcess, host_port, start_plant, start_shop
from suds import WebFault
from suds.client import Client
from suds.plugin import MessagePlugin
from suds.sax.text import Raw
from suds.transport.http import HttpTransport

from vmshop_common.dagxml import DAG_NS

pytestmark = pytest.mark.integration

WSDL = ROOT / "wsdl" / "vmshop.wsdl"
WSDL_NS = "http://schemas.xmlsoap.org/wsdl/"
RP_NS = "urn:vmshop:vm-resource:1"
SAMPLE = (ROOT / "scripts" / "sample_workflow.xml").read_text()
SAMPLE_STEPS = ["prepare", "left", "right", "join"]


def script_dag(body: str = "true", image: str = "tiny", attributes: dict[str, str] | None = None) -> str:
    """A DAG: the image, then one script node ``run`` (``body`` is XML text: escape it yourself)."""
    attrs = "".join(f'<attribute name="{k}" value="{v}"/>' for k, v in (attributes or {}).items())
    return (f'<vm xmlns="{DAG_NS}"><attributes>{attrs}</attributes><nodes><image id="s" name="{image}"/>'
            f'<script id="run">{body}</script></nodes><edges><edge from="s" to="run"/></edges></vm>')


def wsdl_operations() -> set[str]:
    """The operations of the checked-in WSDL's portType."""
    tree = etree.parse(str(WSDL))
    return set(tree.xpath("//wsdl:portType/wsdl:operation/@name", namespaces={"wsdl": WSDL_NS}))


class AnsweredOperations(MessagePlugin):
    """Notes the operation of every reply whose body is ``<opResponse>`` (not a fault)."""

    def __init__(self) -> None:
        self.names: set[str] = set()

    def parsed(self, context: Any) -> None:
        body = context.reply.getChild("Envelope").getChild("Body")
        for child in body.getChildren():
            if child.name.endswith("Response"):
                self.names.add(child.name.removesuffix("Response"))


class MutualTlsTransport(HttpTransport):  # type: ignore[misc]
    """suds' HTTP transport with an ``ssl`` context: verify the shop, present the client's certificate."""

    def __init__(self, context: ssl.SSLContext, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.context = context

    def u2handlers(self) -> list[Any]:
        return [*super().u2handlers(), urllib.request.HTTPSHandler(context=self.context)]


def suds_client(shop: ServerProcess, identity: str = "admin", **options: Any) -> Client:
    """suds from the checked-in WSDL, pointed at ``shop``, as ``identity`` over mutual TLS."""
    transport = MutualTlsTransport(test_pki().ssl_context(identity), timeout=60)
    return Client(WSDL.as_uri(), location=shop.url, cache=None, transport=transport, **options)


def fault_code(info: pytest.ExceptionInfo[WebFault]) -> str:
    """``Client.NoSuchVM`` from ``soap11env:Client.NoSuchVM``."""
    return str(info.value.fault.faultcode).split(":", 1)[-1]


@pytest.fixture(scope="module")
def plants(tmp_path_factory: pytest.TempPathFactory, warehouse_dir: Path) -> Iterator[dict[str, ServerProcess]]:
    """Two fake-backend plants; ``cheap`` boots in 1 s by its records, ``dear`` in 4 s, so cheap wins."""
    base = tmp_path_factory.mktemp("suds-plants")
    made: dict[str, ServerProcess] = {}
    try:
        for name, boot in (("cheap", 1.0), ("dear", 4.0)):
            made[name] = start_plant(base / name, warehouse_dir, name=name, backend="fake", network="none",
                                     metrics={"boot_seconds": boot, "clone_seconds": 0.02})
        yield made
    finally:
        for plant in made.values():
            plant.cleanup()


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory, plants: dict[str, ServerProcess]) -> Iterator[ServerProcess]:
    server = start_shop(tmp_path_factory.mktemp("suds-shop"), [host_port(p) for p in plants.values()])
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def answered() -> AnsweredOperations:
    return AnsweredOperations()


@pytest.fixture
def client(shop: ServerProcess, answered: AnsweredOperations) -> Client:
    """suds, from the checked-in WSDL (whose address is a placeholder), pointed at the running shop."""
    return suds_client(shop, plugins=[answered])


def field(answer: Any, name: str) -> Any:
    """An element of a suds answer; suds makes no attribute for an element the reply left out (a None)."""
    return getattr(answer, name, None)


def reference(client: Client, shop: ServerProcess, key: str) -> Any:
    epr = client.factory.create("ns0:EndpointReference")
    epr.Address = shop.url
    epr.VMKey = key
    return epr


def test_suds_reads_every_operation_of_the_wsdl(client: Client, shop: ServerProcess) -> None:
    methods = client.wsdl.services[0].ports[0].methods
    assert set(methods) == wsdl_operations() and len(methods) == 18
    assert client.service.createVM.method.location == "https://localhost:8080/"  # the WSDL's placeholder
    assert client.options.location == shop.url  # what suds sends to
    epr = client.factory.create("ns0:EndpointReference")
    assert epr.__class__.__name__ == "EndpointReference" and (epr.Address, epr.VMKey) == (None, None)


def test_every_operation_through_suds(client: Client, answered: AnsweredOperations, shop: ServerProcess,
                                      plants: dict[str, ServerProcess]) -> None:
    cheap, dear = plants["cheap"].url, plants["dear"].url

    health = {p.address: p for p in client.service.listPlants()}
    assert set(health) == {cheap, dear}
    assert all(p.up and p.backend == "fake" and "tiny" in p.images for p in health.values())
    assert {p.name for p in health.values()} == {"cheap", "dear"}

    estimate = client.service.estimateCost(SAMPLE)
    assert estimate.plant == cheap and estimate.image == "tiny"
    assert list(estimate.remaining) == SAMPLE_STEPS
    assert {item.label: item.seconds for item in estimate.items}["boot"] == 1.0
    bids = {bid.plant: bid for bid in estimate.bids}
    assert {p: b.status for p, b in bids.items()} == {cheap: "bid", dear: "bid"}
    assert estimate.cost == bids[cheap].cost < bids[dear].cost

    lease = time.time() + 3600
    made = client.service.createVM(dag=SAMPLE, owner="suds-alice", termination_time=lease, vm_key="suds-1")
    vm = made.vm
    assert made.plant == cheap and made.cost == estimate.cost
    assert list(made.attempts) == [f"{cheap}: created"] and {b.plant for b in made.bids} == {cheap, dear}
    assert [(run.node, run.ok, run.status) for run in made.runs] == [(s, True, 0) for s in SAMPLE_STEPS]
    assert "fake: seq 1 100 > /work/left" in made.runs[1].output
    assert (vm.vm_id, vm.owner, vm.state, vm.plant, vm.image) == ("suds-1", "suds-alice", "running", cheap, "tiny")
    assert (vm.epr.Address, vm.epr.VMKey) == (shop.url, "suds-1")
    assert vm.termination == lease  # an xs:double survives the round trip exactly
    assert {a.name: a.value for a in vm.attributes} == {"project": "samples", "workflow": "split-join"}
    assert list(vm.steps) == SAMPLE_STEPS and vm.memory == 128 and field(vm, "collected") is None

    epr = reference(client, shop, "suds-1")  # built by the client, not taken from an answer
    described = client.service.describeVM(epr)
    assert (described.vm_id, described.owner, described.state, described.plant) == (
        "suds-1", "suds-alice", "running", cheap)
    assert described.termination == lease and described.created <= described.updated

    found = client.service.queryVMs("owner=suds-alice state=running", 10)
    assert [v.vm_id for v in found] == ["suds-1"]
    assert client.service.queryVMs("owner=nobody-at-all", None) == []
    assert len(client.service.queryVMs("", 1)) == 1  # xs:integer limit

    runs = client.service.configureVM(vm.epr, script_dag("echo configured by suds"))  # the answer's own EPR
    assert [(r.node, r.ok, r.status, r.timed_out) for r in runs] == [("run", True, 0, False)]
    assert "fake: echo configured by suds" in runs[0].output

    document = etree.fromstring(client.service.getResourcePropertyDocument(epr).encode())
    rp = {"rp": RP_NS}
    assert document.tag == f"{{{RP_NS}}}VMResourceProperties"
    assert document.xpath("string(rp:VMId)", namespaces=rp) == "suds-1"
    assert document.xpath("string(rp:Plant)", namespaces=rp) == cheap
    assert document.xpath("string(rp:Attribute[@name='workflow'])", namespaces=rp) == "split-join"

    assert client.service.getResourceProperty(epr, "rp:Owner") == [
        f'<rp:Owner xmlns:rp="{RP_NS}">suds-alice</rp:Owner>']
    assert client.service.getResourceProperty(epr, "rp:Memory") == [f'<rp:Memory xmlns:rp="{RP_NS}">128</rp:Memory>']
    assert client.service.queryResourceProperties(epr, "count(/rp:VMResourceProperties/rp:Attribute)") == ["2"]
    assert client.service.queryResourceProperties(epr, "string(//rp:Attribute[@name='project'])") == ["samples"]
    with pytest.raises(WebFault) as info:
        client.service.queryResourceProperties(epr, "//rp:Attribute[")
    assert fault_code(info) == "Client.QueryInvalid"

    later = time.time() + 7200
    assert client.service.setTerminationTime(epr, later).termination == later
    assert field(client.service.setTerminationTime(epr, None), "termination") is None  # suds omits it: no lease
    assert field(client.service.describeVM(epr), "termination") is None

    image = client.service.publishVM(epr, "suds-image")  # is_public left out: a private image
    assert (image.name, image.plant, image.owner, image.is_public, image.base) == (
        "suds-image", cheap, "suds-alice", False, "tiny")
    assert list(image.steps) == SAMPLE_STEPS + ["run"] and image.size > 0
    assert list(client.service.setImagePublic("suds-image", True)) == [cheap]
    assert list(client.service.setImageMovable("suds-image", True)) == [cheap]  # an admin, for its owner
    assert "suds-image" in plants["cheap"].service.plantInfo().images
    assert list(client.service.unpublishImage("suds-image")) == [cheap]  # an admin removes anyone's image
    with pytest.raises(WebFault) as info:
        client.service.unpublishImage("suds-image")
    assert fault_code(info) == "Client.NoSuchImage"
    destroyed = client.service.destroy(epr)
    assert (destroyed.vm_id, destroyed.state) == ("suds-1", "collected") and destroyed.collected is not None
    assert plants["cheap"].service.describeVM(vm_id="suds-1").state == "collected"

    # createVM with the DAG only: the shop picks the key; collectVM on a running VM.
    second = client.service.createVM(script_dag("echo two", attributes={"client": "suds"})).vm
    assert second.vm_id.startswith("vm-") and field(second, "owner") == "admin"  # the caller, by default
    assert field(second, "termination") is None
    assert [v.vm_id for v in client.service.queryVMs("client=suds", None)] == [second.vm_id]
    collected = client.service.collectVM(second.epr)
    assert (collected.vm_id, collected.state) == (second.vm_id, "collected") and collected.collected is not None
    assert client.service.collectVM(reference(client, shop, second.vm_id)).state == "collected"  # twice is fine
    assert plants["cheap"].service.describeVM(vm_id=second.vm_id).state == "collected"

    plants_file = shop.directory / "vmplant_addresses.txt"
    original = plants_file.read_text()
    plants_file.write_text(host_port(plants["cheap"]) + "\n")
    try:
        assert [(p.address, p.up, p.name) for p in client.service.reloadPlants()] == [(cheap, True, "cheap")]
        assert [p.address for p in client.service.listPlants()] == [cheap]
    finally:
        plants_file.write_text(original)
        assert {p.address for p in client.service.reloadPlants()} == {cheap, dear}
    assert client.service.plantChanged(cheap) is True  # a plant's notice: the shop looks at that plant

    assert answered.names == wsdl_operations()


def unknown(client: Client, shop: ServerProcess) -> Any:
    return reference(client, shop, "vm-none")


@pytest.mark.parametrize(("call", "code", "words"), [
    (lambda c, s: c.service.describeVM(unknown(c, s)), "Client.NoSuchVM", ["vm-none"]),
    (lambda c, s: c.service.collectVM(unknown(c, s)), "Client.NoSuchVM", ["vm-none"]),
    (lambda c, s: c.service.destroy(unknown(c, s)), "Client.NoSuchVM", ["vm-none"]),
    (lambda c, s: c.service.setTerminationTime(unknown(c, s), time.time()), "Client.NoSuchVM", ["vm-none"]),
    (lambda c, s: c.service.getResourcePropertyDocument({"Address": s.url, "VMKey": "no such key"}),
     "Client.NoSuchVM", ["no such key"]),
    (lambda c, s: c.service.estimateCost(f"<vm xmlns='{DAG_NS}'><nodes><script id='a'>x</script></nodes></vm>"),
     "Client.DagInvalid", ["start node"]),
    (lambda c, s: c.service.createVM(script_dag().replace('to="run"', 'to="nowhere"'), "suds-bob"),
     "Client.SchemaInvalid", ["nowhere"]),
    (lambda c, s: c.service.queryVMs("colour=blue", None), "Client.QueryInvalid", ["colour"]),
])
def test_faults_reach_suds_as_web_faults(client: Client, shop: ServerProcess,
                                         call: Callable[[Client, ServerProcess], Any], code: str,
                                         words: list[str]) -> None:
    before = len(client.service.queryVMs("", None))
    with pytest.raises(WebFault) as info:
        call(client, shop)
    assert fault_code(info) == code
    for word in words:
        assert word in info.value.fault.faultstring
    assert len(client.service.queryVMs("", None)) == before


AMPERSANDS = script_dag("true &amp;&amp; echo both")  # the shell's "true && echo both", as XML


def test_a_dag_holding_entities_goes_intact_when_escaped_by_the_caller(client: Client) -> None:
    made = client.service.createVM(Raw(escape(AMPERSANDS)), "suds-amp")
    try:
        assert [r.node for r in made.runs] == ["run"] and "fake: true && echo both" in made.runs[0].output
    finally:
        assert client.service.collectVM(made.vm.epr).state == "collected"


@pytest.mark.xfail(raises=WebFault, strict=True,
                   reason="suds-community's Encoder leaves '&amp;' unescaped: the shop receives '&&' "
                          "(Client.XMLSyntax); if this passes, suds was fixed: drop the Raw(escape()) advice")
def test_a_dag_holding_entities_as_a_plain_string(client: Client) -> None:
    assert client.service.estimateCost(AMPERSANDS).plant
