"""Hostile input against a running shop and plant: every bad request is a SOAP fault with a stable code.

One shop and one plant (fake backend, a host-only address pool) for the
module, and one resident VM made through the shop before the corpus runs,
so per-VM operations meet a real VM too. :data:`CORPUS` is the table of bad
requests: its name, the server it goes to, how it is sent (a raw HTTP POST,
for what no SOAP client would send: a DOCTYPE, entities or deep nesting in
the envelope itself, an over-long body, garbage bytes, a wrong content type;
or a zeep call with a bad DAG, key, query or value) and the fault code it
must get. Afterwards both servers answer, the shop's registry is what it
was, and the plant holds no overlay, channel, run directory, pool address,
record or process beyond what it held before; neither server logged a
traceback.

Fault codes at the SOAP envelope level come from spyne 2.14.0 (pinned) and
are part of the contract (``tests/test_soap_stack.py`` holds them too):
``Client.XMLSyntaxError`` (the envelope is not well-formed XML, or nested
deeper than libxml2's 256 levels), ``Client.SchemaValidationError`` (the
envelope breaks the service's schema), ``Client.ValidationError`` (a value
spyne can't take), ``Client.RequestNotAllowed`` (not a POST with an XML
content type), and the project's ``Client.RequestTooLong``,
``Client.DoctypeRefused`` and the envelope's own (``VersionMismatch`` for a
SOAP 1.2 envelope, ``Client.NotAnEnvelope``, ``Client.ExtraBody``,
``Client.ExtraOperation``, ``Client.HeaderMisplaced``, ``Client.NoBody``,
``Client.NoOperation``, ``Client.StrayContent``: see
``vmshop_common/soap/envelope.py``).
Everything inside a DAG, a key, a query or a value has the project's codes
(``vmshop_common/errors.py``).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import zeep.exceptions
import zeep.helpers
from pki import test_pki
from servers import ServerProcess, host_port, processes_mentioning, start_plant, start_shop, switches_of

from vmplant_service.ippool import IPPool
from vmshop_common.dagxml import DAG_NS
from vmshop_common.xmlload import parse_xml

pytestmark = pytest.mark.integration

DAGS = Path(__file__).parent / "dags"
SOAP_ENV = "http://schemas.xmlsoap.org/soap/envelope/"
SOAP12_ENV = "http://www.w3.org/2003/05/soap-envelope"
TNS = {"plant": "urn:vmshop:vmplant:1", "shop": "urn:vmshop:vmshop:1"}
MAX_BODY = 2 * 1024 * 1024  # vmshop_common.soap.compat.DEFAULT_MAX_BODY_BYTES
XML = "text/xml; charset=utf-8"


# --- how items are sent -------------------------------------------------------------------------------


def envelope(body: str, prolog: str = "") -> str:
    """A SOAP 1.1 envelope around ``body``; the prefix ``t`` is bound to ``{tns}``, the target's namespace."""
    return f'{prolog}<e:Envelope xmlns:e="{SOAP_ENV}" xmlns:t="{{tns}}"><e:Body>{body}</e:Body></e:Envelope>'


def dag(name: str) -> str:
    return (DAGS / name).read_text()


def image_dag(image: str = "tiny", start: str = "", actions: str = "", edges: str = "") -> str:
    return (f'<vm xmlns="{DAG_NS}"><nodes><image id="s" name="{image}" {start}/>{actions}</nodes>'
            f"<edges>{edges}</edges></vm>")


def escaped(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


LAUGHS = ('<?xml version="1.0"?><!DOCTYPE e:Envelope [<!ENTITY a "aaaaaaaaaa">'
          + "".join(f'<!ENTITY {chr(98 + i)} "{("&" + chr(97 + i) + ";") * 10}">' for i in range(9))
          + "]>")
XXE = '<?xml version="1.0"?><!DOCTYPE e:Envelope [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
EXTERNAL_DTD = '<!DOCTYPE e:Envelope SYSTEM "http://127.0.0.1:1/evil.dtd">'
SWA_BOUNDARY = "hostile"


def swa(inner: str) -> str:
    """A SOAP-with-attachments (multipart/related) body around ``inner``."""
    return (f"--{SWA_BOUNDARY}\r\nContent-Type: text/xml\r\nContent-ID: <root>\r\n\r\n{inner}\r\n"
            f"--{SWA_BOUNDARY}\r\nContent-Type: text/plain\r\n\r\nattachment\r\n--{SWA_BOUNDARY}--\r\n")


@dataclass
class Resident:
    """The VM made before the corpus: its key and endpoint reference."""

    key: str
    epr: dict[str, str]


@dataclass(frozen=True)
class Item:
    """One bad request: sent raw (``raw``: the body, ``{tns}`` filled in) or by ``call(service, resident)``."""

    name: str
    target: str  # "shop" or "plant"
    code: str
    raw: str | bytes | Callable[[], bytes | Iterator[bytes]] | None = None
    call: Callable[[Any, Resident], Any] | None = None
    content_type: str | None = XML
    status: int = 500


def deep(levels: int) -> str:
    return "<t:x>" * levels + "</t:x>" * levels


def utf16_doctype() -> bytes:
    """An envelope in UTF-16 (a byte scan for '<!DOCTYPE' finds nothing) with an external entity."""
    prolog = '<?xml version="1.0" encoding="UTF-16"?>' + XXE.split("?>", 1)[1]
    text = envelope("<t:describeVM><t:vm_id>&x;</t:vm_id></t:describeVM>", prolog=prolog)
    return text.replace("{tns}", TNS["plant"]).encode("utf-16")


def over_limit() -> bytes:
    """A well-formed envelope one byte over the limit."""
    text = envelope("<t:queryVMs><t:query></t:query></t:queryVMs>").replace("{tns}", TNS["shop"])
    return text.replace("<t:query>", "<t:query>" + "a" * (MAX_BODY + 1 - len(text)), 1).encode()


def over_limit_chunks() -> Iterator[bytes]:
    """A body sent in chunks (no Content-Length to refuse it by) that grows past the limit."""
    yield envelope("").replace("{tns}", TNS["plant"]).split("<e:Body>")[0].encode() + b"<e:Body><t:plantInfo>"
    for _ in range(MAX_BODY // 65536 + 2):
        yield b"<!--" + b"x" * 65536 + b"-->"


def create(name: str) -> Callable[[Any, Resident], Any]:
    """createVM (on the shop or the plant) of the DAG ``tests/dags/<name>``."""
    return lambda s, r: s.createVM(dag=dag(name))


def estimate(name: str) -> Callable[[Any, Resident], Any]:
    return lambda s, r: s.estimateCost(dag=dag(name))


def absurd(**changes: str) -> Callable[[Any, Resident], Any]:
    """A shop or plant createVM of the image 'tiny' with start-node attributes ``changes``."""
    start = " ".join(f'{k}="{v}"' for k, v in changes.items())
    return lambda s, r: s.createVM(dag=image_dag(start=start), owner="mallory")


SCRIPT = '<script id="run">true</script>'
RUN_EDGE = '<edge from="s" to="run"/>'
# An operation that would make a VM if it ran: hidden where spyne used to ignore it (a second Body, a second
# operation), it must make nothing (the last test checks that nothing changed).
CREATE_ON_PLANT = f"<t:createVM><t:dag>{escaped(image_dag())}</t:dag><t:vm_id>smuggled</t:vm_id></t:createVM>"
CREATE_ON_SHOP = f"<t:createVM><t:dag>{escaped(image_dag())}</t:dag><t:vm_key>smuggled</t:vm_key></t:createVM>"

CORPUS: list[Item] = [
    # Not XML, malformed XML -------------------------------------------------------------------------
    Item("garbage bytes", "plant", "Client.XMLSyntaxError", raw=b"\x00\xff\xfe\x9c garbage \x00"),
    Item("plain text", "shop", "Client.XMLSyntaxError", raw=b"createVM please"),
    Item("empty body", "shop", "Client.XMLSyntaxError", raw=b""),
    Item("unclosed element", "plant", "Client.XMLSyntaxError", raw=envelope("<t:describeVM><t:vm_id>a</t:describeVM>")),
    Item("truncated envelope", "shop", "Client.XMLSyntaxError", raw=envelope("<t:listPlants/>")[:-20]),
    Item("invalid UTF-8", "plant", "Client.XMLSyntaxError",
         raw=lambda: envelope("<t:describeVM><t:vm_id>X</t:vm_id></t:describeVM>").format(
             tns=TNS["plant"]).encode().replace(b"X", b"\xc3\x28\xff")),
    Item("control character reference", "shop", "Client.XMLSyntaxError",
         raw=envelope("<t:queryVMs><t:query>&#1;</t:query></t:queryVMs>")),
    Item("undeclared entity", "shop", "Client.XMLSyntaxError",
         raw=envelope("<t:queryVMs><t:query>&passwd;</t:query></t:queryVMs>")),
    Item("not a SOAP envelope", "shop", "Client.NotAnEnvelope", raw=b"<createVM><dag/></createVM>"),
    # Envelopes that are not one SOAP 1.1 Body holding one operation (vmshop_common/soap/envelope.py) ------
    Item("SOAP 1.2 envelope", "shop", "VersionMismatch", raw=envelope("<t:listPlants/>").replace(SOAP_ENV, SOAP12_ENV)),
    Item("SOAP 1.2 envelope", "plant", "VersionMismatch", raw=envelope("<t:plantInfo/>").replace(SOAP_ENV, SOAP12_ENV)),
    Item("envelope in no namespace", "plant", "VersionMismatch",
         raw='<Envelope xmlns:t="{tns}"><Body><t:plantInfo/></Body></Envelope>'),
    Item("two Bodies, the second creating a VM", "plant", "Client.ExtraBody",
         raw=envelope("<t:plantInfo/></e:Body><e:Body>" + CREATE_ON_PLANT)),
    Item("two operations in one Body, the second creating a VM", "shop", "Client.ExtraOperation",
         raw=envelope("<t:listPlants/>" + CREATE_ON_SHOP)),
    Item("two operations in one Body, the second creating a VM", "plant", "Client.ExtraOperation",
         raw=envelope("<t:plantInfo/>" + CREATE_ON_PLANT)),
    Item("a Header after the Body", "shop", "Client.HeaderMisplaced",
         raw=envelope("<t:listPlants/>").replace("</e:Envelope>", "<e:Header/></e:Envelope>")),
    Item("two Headers", "plant", "Client.HeaderMisplaced",
         raw=envelope("<t:plantInfo/>").replace("<e:Body>", "<e:Header/><e:Header/><e:Body>")),
    Item("no Body", "plant", "Client.NoBody", raw=envelope("").replace("<e:Body></e:Body>", "<e:Header/>")),
    Item("an empty Body", "shop", "Client.NoOperation", raw=envelope("")),
    Item("a Fault sent as a request", "shop", "Client.NoOperation",
         raw=envelope("<e:Fault><faultcode>e:Server.Mine</faultcode><faultstring>x</faultstring></e:Fault>")),
    Item("an element after the Body", "plant", "Client.StrayContent",
         raw=envelope("<t:plantInfo/>").replace("</e:Body>", "</e:Body>" + CREATE_ON_PLANT)),
    Item("text beside the operation", "shop", "Client.StrayContent", raw=envelope("junk<t:listPlants/>")),
    # DOCTYPEs, external entities, entity expansion in the envelope -----------------------------------
    Item("envelope DOCTYPE, external entity", "shop", "Client.DoctypeRefused",
         raw=envelope("<t:queryVMs><t:query>&x;</t:query></t:queryVMs>", prolog=XXE)),
    Item("envelope DOCTYPE, external entity", "plant", "Client.DoctypeRefused",
         raw=envelope("<t:describeVM><t:vm_id>&x;</t:vm_id></t:describeVM>", prolog=XXE)),
    Item("envelope entity expansion (billion laughs)", "plant", "Client.DoctypeRefused",
         raw=envelope("<t:describeVM><t:vm_id>&j;</t:vm_id></t:describeVM>", prolog=LAUGHS)),
    Item("envelope entity expansion (billion laughs)", "shop", "Client.DoctypeRefused",
         raw=envelope("<t:queryVMs><t:query>&j;</t:query></t:queryVMs>", prolog=LAUGHS)),
    Item("envelope external DTD", "plant", "Client.DoctypeRefused", raw=envelope("<t:plantInfo/>", EXTERNAL_DTD)),
    Item("envelope DOCTYPE hidden in UTF-16", "plant", "Client.DoctypeRefused", raw=utf16_doctype),
    Item("envelope DOCTYPE smuggled in multipart/related", "shop", "Client.RequestNotAllowed",
         raw=swa(envelope("<t:queryVMs><t:query>&x;</t:query></t:queryVMs>", prolog=XXE)),
         content_type=f'multipart/related; boundary={SWA_BOUNDARY}; start="<root>"', status=415),
    # Deep nesting, size ------------------------------------------------------------------------------
    Item("envelope nested 20000 deep", "plant", "Client.XMLSyntaxError",
         raw=envelope(f"<t:describeVM><t:vm_id>{deep(20000)}</t:vm_id></t:describeVM>")),
    Item("envelope nested 200 deep", "shop", "Client.SchemaValidationError",
         raw=envelope(f"<t:queryVMs><t:query>{deep(200)}</t:query></t:queryVMs>")),
    Item("body over the size limit", "shop", "Client.RequestTooLong", raw=over_limit, status=413),
    Item("chunked body over the size limit", "plant", "Client.RequestTooLong", raw=over_limit_chunks,
         status=413),
    # HTTP and SOAP framing ---------------------------------------------------------------------------
    Item("wrong content type", "plant", "Client.RequestNotAllowed", raw=envelope("<t:plantInfo/>"),
         content_type="application/json", status=415),
    Item("form content type", "shop", "Client.RequestNotAllowed", raw=b"query=&limit=1",
         content_type="application/x-www-form-urlencoded", status=415),
    Item("no content type", "plant", "Client.RequestNotAllowed", raw=envelope("<t:plantInfo/>"),
         content_type=None, status=405),
    Item("unknown operation", "plant", "Client.SchemaValidationError", raw=envelope("<t:rebootHost/>")),
    Item("missing DAG", "shop", "Client.SchemaValidationError", raw=envelope("<t:createVM><t:owner>m</t:owner>"
                                                                            "</t:createVM>")),
    Item("XInclude of a host file", "plant", "Client.SchemaValidationError",
         raw=envelope('<t:describeVM><t:vm_id><xi:include xmlns:xi="http://www.w3.org/2001/XInclude" '
                      'href="file:///etc/passwd" parse="text"/></t:vm_id></t:describeVM>')),
    Item("integer of 5000 digits", "shop", "Client.ValidationError",
         raw=envelope(f"<t:queryVMs><t:query></t:query><t:limit>{'9' * 5000}</t:limit></t:queryVMs>")),
    Item("infinite termination time", "shop", "Client.Declined",
         raw=envelope(f"<t:createVM><t:dag>{escaped(image_dag())}</t:dag><t:owner>m</t:owner>"
                      "<t:termination_time>INF</t:termination_time></t:createVM>")),
    # DAGs: cycles, dangling edges, duplicate ids, hostile XML inside the DAG --------------------------
    Item("cyclic DAG", "shop", "Client.DagInvalid", call=create("cycle.xml")),
    Item("cyclic DAG (three nodes)", "plant", "Client.DagInvalid",
         call=create("cycle_three.xml")),
    Item("cyclic DAG configuring a VM", "shop", "Client.DagInvalid",
         call=lambda s, r: s.configureVM(vm=r.epr, dag=dag("cycle.xml"))),
    Item("dangling edge", "shop", "Client.SchemaInvalid",
         call=create("dangling_edge_to.xml")),
    Item("dangling edge", "plant", "Client.SchemaInvalid",
         call=estimate("dangling_edge_from.xml")),
    Item("duplicate node ids", "plant", "Client.SchemaInvalid", call=create("duplicate_id.xml")),
    Item("duplicate node ids", "shop", "Client.SchemaInvalid", call=estimate("duplicate_id.xml")),
    Item("DAG with an external entity", "shop", "Client.DoctypeRefused", call=create("xxe.xml")),
    Item("DAG with entity expansion", "plant", "Client.DoctypeRefused",
         call=create("billion_laughs.xml")),
    Item("DAG nested too deep", "plant", "Client.DocumentTooLarge", call=estimate("too_deep.xml")),
    Item("DAG not well-formed", "shop", "Client.XMLSyntax", call=create("not_well_formed.xml")),
    # Unknown images --------------------------------------------------------------------------------------
    Item("unknown image", "shop", "Server.NoPlantAvailable", call=lambda s, r: s.createVM(dag=image_dag("nosuch"))),
    Item("unknown image", "plant", "Client.NoSuchImage", call=lambda s, r: s.createVM(dag=image_dag("nosuch"))),
    # Path traversal and shell metacharacters in names and file paths ---------------------------------
    Item("image name ../../etc/passwd", "shop", "Client.SchemaInvalid",
         call=create("image_name_traversal.xml")),
    Item("image name with ;rm -rf /", "plant", "Client.SchemaInvalid",
         call=create("image_name_shell.xml")),
    Item("file path /tmp/$(id)", "shop", "Client.SchemaInvalid", call=create("file_path_shell.xml")),
    Item("file path with ..", "plant", "Client.DagInvalid",
         call=lambda s, r: s.configureVM(vm_id=r.key, dag=dag("file_path_dotdot.xml"))),
    Item("mount source ../secrets", "shop", "Client.SchemaInvalid",
         call=lambda s, r: s.configureVM(vm=r.epr, dag=dag("mount_source_traversal.xml"))),
    Item("interpreter '/bin/sh -c id|sh'", "plant", "Client.SchemaInvalid",
         call=create("interpreter_shell.xml")),
    Item("hostname with backquotes", "shop", "Client.SchemaInvalid", call=create("hostname_shell.xml")),
    Item("VM key ../../etc", "shop", "Client.Declined",
         call=lambda s, r: s.createVM(dag=image_dag(), owner="m", vm_key="../../etc")),
    Item("VM id with shell metacharacters", "plant", "Client.Declined",
         call=lambda s, r: s.createVM(dag=image_dag(), owner="m", vm_id="a;rm -rf /")),
    Item("owner over 256 characters", "shop", "Client.SchemaValidationError",
         call=lambda s, r: s.createVM(dag=image_dag(), owner="m" * 300)),
    # Negative or absurd hardware -----------------------------------------------------------------------
    Item("negative memory", "shop", "Client.SchemaInvalid", call=create("memory_negative.xml")),
    Item("absurd memory", "plant", "Client.SchemaInvalid", call=create("memory_absurd.xml")),
    Item("zero vCPUs", "plant", "Client.SchemaInvalid", call=estimate("vcpus_zero.xml")),
    Item("absurd disk", "shop", "Client.SchemaInvalid", call=estimate("disk_absurd.xml")),
    Item("1 TiB of memory (schema's maximum)", "shop", "Server.NoPlantAvailable", call=absurd(memory="1048576")),
    Item("1 TiB of memory (schema's maximum)", "plant", "Client.Declined", call=absurd(memory="1048576")),
    Item("256 vCPUs", "plant", "Client.Declined", call=absurd(vcpus="256")),
    # Unknown VMs, clashing keys ------------------------------------------------------------------------
    Item("unknown VM", "shop", "Client.NoSuchVM",
         call=lambda s, r: s.describeVM(vm={"Address": "", "VMKey": "vm-none"})),
    Item("VM key ../resident", "shop", "Client.NoSuchVM",
         call=lambda s, r: s.collectVM(vm={"Address": "", "VMKey": "../" + r.key})),
    Item("unknown VM lease", "shop", "Client.NoSuchVM",
         call=lambda s, r: s.setTerminationTime(vm={"Address": "", "VMKey": "vm-none"}, termination_time=1.0)),
    Item("unknown VM", "plant", "Client.NoSuchVM", call=lambda s, r: s.describeVM(vm_id="nosuchvm")),
    Item("VM id ../../etc/passwd", "plant", "Client.NoSuchVM", call=lambda s, r: s.collectVM(vm_id="../../etc/passwd")),
    Item("unknown VM configured", "plant", "Client.NoSuchVM",
         call=lambda s, r: s.configureVM(vm_id="$(reboot)", dag=image_dag(actions=SCRIPT, edges=RUN_EDGE))),
    Item("a second VM under the resident's key", "shop", "Client.Declined",
         call=lambda s, r: s.createVM(dag=image_dag(), owner="m", vm_key=r.key)),
    Item("a second VM under the resident's id", "plant", "Client.Declined",
         call=lambda s, r: s.createVM(dag=image_dag(), owner="m", vm_id=r.key)),
    Item("absurd lease", "shop", "Client.Declined",
         call=lambda s, r: s.setTerminationTime(vm=r.epr, termination_time=1e300)),
    # Malformed queries ---------------------------------------------------------------------------------
    Item("query with a bad operator", "shop", "Client.QueryInvalid", call=lambda s, r: s.queryVMs(query="memory>>3")),
    Item("query on an unknown attribute", "shop", "Client.QueryInvalid",
         call=lambda s, r: s.queryVMs(query="colour=red")),
    Item("query with SQL", "shop", "Client.QueryInvalid", call=lambda s, r: s.queryVMs(query="owner=\"x' OR 1=1 --")),
    Item("query on a column name", "shop", "Client.QueryInvalid", call=lambda s, r: s.queryVMs(query="vms.owner=x")),
    Item("negative limit", "shop", "Client.QueryInvalid", call=lambda s, r: s.queryVMs(query="", limit=-1)),
    Item("limit over 64 bits", "shop", "Client.QueryInvalid", call=lambda s, r: s.queryVMs(query="", limit=10**30)),
    Item("XPath reading a host file", "shop", "Client.QueryInvalid",
         call=lambda s, r: s.queryResourceProperties(vm=r.epr, xpath="document('/etc/passwd')")),
    Item("XPath extension function", "shop", "Client.QueryInvalid",
         call=lambda s, r: s.queryResourceProperties(vm=r.epr, xpath="exsl:node-set('x')")),
    Item("XPath nested predicates", "shop", "Client.QueryInvalid",
         call=lambda s, r: s.queryResourceProperties(vm=r.epr, xpath="//*[//*[//*[//*[//*]]]]")),
    Item("resource property ../../etc/passwd", "shop", "Client.QueryInvalid",
         call=lambda s, r: s.getResourceProperty(vm=r.epr, name="../../etc/passwd")),
]


# --- the servers and what they hold ---------------------------------------------------------------------


@dataclass
class Servers:
    plant: ServerProcess
    shop: ServerProcess
    resident: Resident
    before: dict[str, Any]


def shop_registry(shop: ServerProcess) -> list[dict[str, Any]]:
    return [dict(zeep.helpers.serialize_object(vm, dict)) for vm in shop.service.queryVMs(query="") or []]


def plant_holdings(plant: ServerProcess) -> dict[str, Any]:
    """Everything the plant holds, from its state directory."""
    state = plant.state_dir
    with closing(sqlite3.connect(f"file:{state / 'records.sqlite3'}?mode=ro", uri=True)) as db:
        records = db.execute("SELECT vm_id, state, overlay, address, collected, error FROM vms "
                             "ORDER BY vm_id").fetchall()
        runs = db.execute("SELECT COUNT(*) FROM action_runs").fetchone()[0]
    return {
        "records": records, "action runs": runs,
        "overlays": sorted(p.name for p in (state / "overlays").iterdir()),
        "switches": switches_of(plant),
        "run": sorted(p.name for p in (state / "run").iterdir()),
        "pool": {e.address: e.holder for e in IPPool(state / "ip.txt").entries() if e.holder},
        "processes": sorted(processes_mentioning(str(state))),
    }


def snapshot(servers: Servers) -> dict[str, Any]:
    return {"registry": shop_registry(servers.shop), "plant": plant_holdings(servers.plant)}


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory, warehouse_dir: Path) -> Iterator[Servers]:
    base = tmp_path_factory.mktemp("hostile")
    plant = shop = None
    try:
        plant = start_plant(base / "plant", warehouse_dir, name="target", backend="fake", network="vde",
                            pool_count=4)
        shop = start_shop(base / "shop", [host_port(plant)])
        made = shop.service.createVM(dag=image_dag(actions=SCRIPT, edges=RUN_EDGE), owner="resident")
        resident = Resident(made.vm.vm_id, {"Address": shop.url, "VMKey": made.vm.vm_id})
        made_servers = Servers(plant, shop, resident, {})
        made_servers.before = snapshot(made_servers)
        assert made_servers.before["plant"]["pool"] and made_servers.before["plant"]["overlays"]
        yield made_servers
    finally:
        for server in (shop, plant):
            if server is not None:
                server.cleanup()


def fault_of(response: requests.Response) -> tuple[str, str]:
    """(code without prefix, message) of a SOAP fault response, read with the project's hardened loader."""
    assert response.headers.get("Content-Type", "").startswith("text/xml"), response.content[:300]
    root = parse_xml(response.content, what="fault response", expected_root=f"{{{SOAP_ENV}}}Envelope")
    fault = root.find(f"{{{SOAP_ENV}}}Body/{{{SOAP_ENV}}}Fault")
    assert fault is not None, response.content[:300]
    return (fault.findtext("faultcode") or "").rsplit(":", 1)[-1], fault.findtext("faultstring") or ""


def send_raw(server: ServerProcess, item: Item) -> tuple[str, str]:
    raw = item.raw
    data: Any = raw() if callable(raw) else raw
    if isinstance(data, str):
        data = data.replace("{tns}", TNS[item.target]).encode()
    headers = {} if item.content_type is None else {"Content-Type": item.content_type}
    with test_pki().session("admin") as session:  # closed: a socket left to the garbage collector warns later
        response = session.post(server.url, data=data, headers=headers, timeout=120)
    assert response.status_code == item.status, (response.status_code, response.content[:300])
    return fault_of(response)


def send_call(server: ServerProcess, item: Item, resident: Resident) -> tuple[str, str]:
    assert item.call is not None
    with pytest.raises(zeep.exceptions.Fault) as info:
        item.call(server.service, resident)
    return str(info.value.code).rsplit(":", 1)[-1], str(info.value.message)


def test_the_corpus_covers_every_category_and_both_servers() -> None:
    assert len(CORPUS) >= 25
    assert {item.target for item in CORPUS} == {"shop", "plant"}
    names = " ".join(item.name for item in CORPUS).lower()
    for word in ("unclosed", "external entity", "entity expansion", "nested", "size limit",
                 "cyclic", "dangling", "duplicate", "unknown image", "..", "$(", "memory", "unknown vm", "query"):
        assert word in names, word
    assert all((item.raw is None) != (item.call is None) for item in CORPUS)


@pytest.mark.parametrize("item", CORPUS, ids=[f"{item.target}: {item.name}" for item in CORPUS])
def test_a_bad_request_gets_a_fault_with_a_stable_code(servers: Servers, item: Item) -> None:
    server = servers.shop if item.target == "shop" else servers.plant
    if item.raw is not None:
        code, message = send_raw(server, item)
    else:
        code, message = send_call(server, item, servers.resident)
    assert code == item.code, message
    assert "Traceback" not in message and "/work/" not in message  # no internals reach the client


def test_afterwards_both_servers_answer_and_nothing_changed_or_leaked(servers: Servers) -> None:
    info = servers.plant.service.plantInfo()
    assert info.name == "target" and info.running_vms == 1
    plants = servers.shop.service.listPlants()
    assert [(p.address, p.up) for p in plants] == [(servers.plant.url, True)]
    after = snapshot(servers)
    assert after["registry"] == servers.before["registry"]
    assert after["plant"] == servers.before["plant"]
    # The resident VM still works.
    runs = servers.shop.service.configureVM(vm=servers.resident.epr, dag=image_dag(actions=SCRIPT, edges=RUN_EDGE))
    assert [run.ok for run in runs] == [True]
    for server in (servers.plant, servers.shop):
        log = server.output()
        assert "Traceback" not in log and "internal error" not in log.lower(), log[-3000:]
