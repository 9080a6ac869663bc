"""Who is calling: attacks on a real shop and real plants over real mutual TLS (issue 10).

Two plants (fake backend; certificates ``plant`` and ``plant2``) and a shop
whose authorisation file maps alice and bob (users), admin, and each plant
identity for its own address. Each attack is refused with a stable code or a
failed handshake, and changes nothing: the registry and the plants' records
are what they were, and no server logged a traceback.
"""

from __future__ import annotations

import concurrent.futures
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import zeep.exceptions
import zeep.helpers
from pki import TestPki
from servers import ServerProcess, fault_code, host_port, start_plant, start_shop, wait_for

from vmshop_common.errors import AuthenticationFailedError, CredentialsError, NoSuchVMError
from vmshop_service import cli
from vmshop_service.client import VMShopClient

pytestmark = pytest.mark.integration

DAG = ('<vm xmlns="urn:vmshop:dag:1"><nodes><image id="s" name="tiny"/><script id="run">echo hi</script></nodes>'
       '<edges><edge from="s" to="run"/></edges></vm>')
SMALL = '<vm xmlns="urn:vmshop:dag:1"><nodes><image id="s" name="tiny" memory="64"/></nodes></vm>'  # states it
#: bob may hold 3 VMs at once; carol (whose VMs only an admin makes) 200 MiB of guest memory.
QUOTAS = ["--quota", "bob:vms=3", "--quota", "carol:memory=200"]


class Site:
    """The module's servers."""

    def __init__(self, shop: ServerProcess, plant: ServerProcess, plant2: ServerProcess) -> None:
        self.shop, self.plant, self.plant2 = shop, plant, plant2
        self.as_: dict[str, Any] = {}

    def shop_as(self, identity: str) -> Any:
        if identity not in self.as_:
            self.as_[identity] = self.shop.service_as(identity, timeout=60)
        return self.as_[identity]

    def plant_as(self, identity: str | None, plant: ServerProcess | None = None) -> Any:
        return (plant or self.plant).service_as(identity, timeout=60)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, warehouse_dir: Path) -> Iterator[Site]:
    base = tmp_path_factory.mktemp("trust")
    servers: list[ServerProcess] = []
    try:
        plant = start_plant(base / "plant", warehouse_dir, name="p1", backend="fake", network="none",
                            capacity_vms=16)
        servers.append(plant)
        plant2 = start_plant(base / "plant2", warehouse_dir, name="p2", backend="fake", network="none",
                             identity="plant2", capacity_vms=16)
        servers.append(plant2)
        shop = start_shop(base / "shop", [host_port(plant), host_port(plant2)], quotas=QUOTAS, poll_interval=3600,
                          plant_identities={"plant": [host_port(plant)], "plant2": [host_port(plant2)]})
        servers.append(shop)
        yield Site(shop, plant, plant2)
    finally:
        for server in reversed(servers):
            server.cleanup()


@pytest.fixture(scope="module")
def alices_vm(site: Site) -> Any:
    made = site.shop_as("alice").createVM(dag=DAG, vm_key="alices")
    assert made.vm.owner == "alice" and made.vm.state == "running"
    return made.vm


def registry(site: Site) -> list[dict[str, Any]]:
    return [dict(zeep.helpers.serialize_object(vm, dict)) for vm in site.shop_as("admin").queryVMs(query="") or []]


def plant_records(plant: ServerProcess) -> list[tuple[str, str]]:
    return sorted((vm.vm_id, vm.state) for vm in plant.service.listVMs(include_collected=True) or [])


def refused(call: Any, *args: Any, **kwargs: Any) -> tuple[str, str]:
    with pytest.raises(zeep.exceptions.Fault) as info:
        call(*args, **kwargs)
    return fault_code(info), str(info.value.message)


def no_traceback(*servers: ServerProcess) -> None:
    for server in servers:
        log = server.output()
        assert "Traceback" not in log and "Unhandled Error" not in log, log[-3000:]


# Credentials -----------------------------------------------------------------------------------------------


def handshake(url: str, pki: TestPki, identity: str | None, ca: Path | None = None) -> Exception | int:
    """A raw HTTPS POST as ``identity`` (its certificate as it is; ``None``: none): the status, or the error."""
    session = requests.Session()
    session.trust_env = False
    cert = None if identity is None else (str(pki.cert(identity)), str(pki.key(identity)))
    try:
        return session.post(url, data=b"<x/>", cert=cert, verify=str(ca or pki.ca), timeout=30,
                            headers={"Content-Type": "text/xml"}).status_code
    except requests.exceptions.RequestException as exc:
        return exc


@pytest.mark.parametrize("identity", [None, "mallory", "expired"])
def test_no_certificate_another_ca_or_an_expired_one_fails_the_handshake(site: Site, pki: TestPki,
                                                                        identity: str | None) -> None:
    before = registry(site)
    for server in (site.shop, site.plant):
        outcome = handshake(server.url, pki, identity)
        assert isinstance(outcome, requests.exceptions.ConnectionError), outcome  # no HTTP answer at all
    # The same at the socket level: the TLS session never carries a request.
    context = ssl.create_default_context(cafile=str(pki.ca))
    if identity is not None:
        context.load_cert_chain(str(pki.cert(identity)), str(pki.key(identity)))
    with socket.create_connection(("127.0.0.1", site.shop.port), timeout=10) as raw:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                tls.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
                if not tls.recv(1):
                    raise ConnectionError("closed")
    assert registry(site) == before
    no_traceback(site.shop, site.plant)


def test_a_server_certificate_from_another_ca_is_refused_by_the_client(site: Site, pki: TestPki) -> None:
    outcome = handshake(site.shop.url, pki, "alice", ca=pki.other_ca)
    assert isinstance(outcome, requests.exceptions.SSLError) and "certificate verify failed" in str(outcome)


def test_a_subject_the_file_does_not_map_is_no_one(site: Site, alices_vm: Any) -> None:
    stranger = site.shop_as("stranger")
    for call in (lambda: stranger.queryVMs(query=""), lambda: stranger.estimateCost(dag=DAG),
                 lambda: stranger.listPlants(), lambda: stranger.createVM(dag=DAG),
                 lambda: stranger.describeVM(vm=alices_vm.epr)):
        code, message = refused(call)
        assert code == "Client.AuthenticationFailed" and "CN=stranger" in message
    code, _ = refused(site.plant_as("stranger").plantInfo)
    assert code == "Client.AuthenticationFailed"


def test_the_mapfile_decides_alone_and_sighup_rereads_it(site: Site, pki: TestPki, alices_vm: Any) -> None:
    mapfile = site.shop.mapfile
    assert mapfile is not None and site.shop.process is not None
    original = mapfile.read_text()
    try:
        mapfile.write_text(original + f'"{pki.subject("stranger")}" stranger user\n')
        site.shop.process.send_signal(1)  # SIGHUP
        wait_for(lambda: not _refused_quietly(site.shop.service_as("stranger").queryVMs, query=""),
                 timeout=20, what="the shop to re-read its authorisation file")
        assert site.shop.service_as("stranger").queryVMs(query="") in (None, [])  # no VM of its own
        mapfile.write_text(original + "this line is not a mapping\n")
        site.shop.process.send_signal(1)
        wait_for(lambda: "authorisation file not reloaded" in site.shop.output(), timeout=20,
                 what="the shop to refuse the bad file")
        assert site.shop.service_as("stranger").queryVMs(query="") in (None, [])  # the old mapping stays
    finally:
        mapfile.write_text(original)
        site.shop.process.send_signal(1)
        wait_for(lambda: _refused_quietly(site.shop.service_as("stranger").queryVMs, query=""), timeout=20,
                 what="the shop to forget the stranger again")


def _refused_quietly(call: Any, **kwargs: Any) -> bool:
    try:
        call(**kwargs)
    except zeep.exceptions.Fault:
        return True
    return False


# Tenants -----------------------------------------------------------------------------------------------------


def test_bob_cannot_see_or_touch_alices_vm(site: Site, alices_vm: Any) -> None:
    bob = site.shop_as("bob")
    epr = alices_vm.epr
    ghost = {"Address": epr.Address, "VMKey": "no-such-vm"}
    before = registry(site)
    operations = {
        "describeVM": lambda vm: bob.describeVM(vm=vm),
        "configureVM": lambda vm: bob.configureVM(vm=vm, dag=DAG),
        "collectVM": lambda vm: bob.collectVM(vm=vm),
        "destroy": lambda vm: bob.destroy(vm=vm),
        "setTerminationTime": lambda vm: bob.setTerminationTime(vm=vm, termination_time=time.time()),
        "getResourcePropertyDocument": lambda vm: bob.getResourcePropertyDocument(vm=vm),
        "getResourceProperty": lambda vm: bob.getResourceProperty(vm=vm, name="rp:Memory"),
        "queryResourceProperties": lambda vm: bob.queryResourceProperties(vm=vm, xpath="string(rp:State)"),
    }
    for name, call in operations.items():
        code, message = refused(call, epr)
        missing_code, missing_message = refused(call, ghost)
        assert code == missing_code == "Client.NoSuchVM", name
        # Word for word what a key that does not exist gets: alice's VM does not leak.
        assert message.replace("alices", "KEY") == missing_message.replace("no-such-vm", "KEY"), name
    assert [vm.vm_id for vm in bob.queryVMs(query="") or []] == []
    assert bob.queryVMs(query="owner=alice") in (None, [])
    assert registry(site) == before
    mine = site.shop_as("alice").describeVM(vm=epr)
    assert (mine.state, mine.termination, mine.collected) == ("running", None, None)
    assert "alices" in [vm.vm_id for vm in site.shop_as("admin").queryVMs(query="owner=alice")]


def test_an_owner_parameter_naming_someone_else(site: Site) -> None:
    before = registry(site)
    code, message = refused(site.shop_as("alice").createVM, dag=DAG, owner="bob", vm_key="for-bob")
    assert code == "Client.NotAuthorized" and "only an admin" in message
    assert registry(site) == before
    made = site.shop_as("admin").createVM(dag=DAG, owner="bob", vm_key="admins-gift")
    assert made.vm.owner == "bob"
    bob = site.shop_as("bob")
    assert bob.describeVM(vm=made.vm.epr).owner == "bob"
    assert bob.collectVM(vm=made.vm.epr).state == "collected"


def test_roles(site: Site) -> None:
    code, _ = refused(site.shop_as("alice").reloadPlants)
    assert code == "Client.NotAuthorized"
    assert len(site.shop_as("admin").reloadPlants()) == 2
    assert len(site.shop_as("alice").listPlants()) == 2 and site.shop_as("bob").estimateCost(dag=DAG).plant
    code, _ = refused(site.shop.service_as("plant").queryVMs, query="")  # a plant makes no VMs
    assert code == "Client.NotAuthorized"


# Plants -------------------------------------------------------------------------------------------------------


def test_a_user_calling_a_plant_directly_is_refused(site: Site, alices_vm: Any) -> None:
    before = plant_records(site.plant)
    alice = site.plant_as("alice")
    calls = {"plantInfo": lambda: alice.plantInfo(), "listVMs": lambda: alice.listVMs(include_collected=True),
             "estimateCost": lambda: alice.estimateCost(dag=DAG),
             "createVM": lambda: alice.createVM(dag=DAG, owner="alice", vm_id="direct"),
             "describeVM": lambda: alice.describeVM(vm_id=alices_vm.plant_vm_id),
             "configureVM": lambda: alice.configureVM(vm_id=alices_vm.plant_vm_id, dag=DAG),
             "collectVM": lambda: alice.collectVM(vm_id=alices_vm.plant_vm_id)}
    for name, call in calls.items():
        code, message = refused(call)
        assert code == "Client.NotAuthorized" and "shop or admin" in message, name
    assert plant_records(site.plant) == before
    # The shop's own calls are what a plant obeys.
    assert site.plant_as("shop").plantInfo().name == "p1"


def test_a_plant_rereads_its_authorisation_file_on_sighup(site: Site, pki: TestPki) -> None:
    plant = site.plant2
    assert plant.mapfile is not None and plant.process is not None
    original = plant.mapfile.read_text()
    try:
        assert refused(site.plant_as("bob", plant).plantInfo)[0] == "Client.AuthenticationFailed"
        plant.mapfile.write_text(original + f'"{pki.subject("bob")}" bob shop\n')  # bob's becomes a shop
        plant.process.send_signal(1)  # SIGHUP
        wait_for(lambda: not _refused_quietly(site.plant_as("bob", plant).plantInfo), timeout=20,
                 what="the plant to re-read its authorisation file")
    finally:
        plant.mapfile.write_text(original)
        plant.process.send_signal(1)
    wait_for(lambda: _refused_quietly(site.plant_as("bob", plant).plantInfo), timeout=20,
             what="the plant to forget bob again")


def test_a_plant_may_speak_only_for_its_own_address(site: Site) -> None:
    p1, p2 = site.plant.url, site.plant2.url
    code, message = refused(site.shop.service_as("plant2").plantChanged, plant=p1)
    assert code == "Client.NotAuthorized" and "plant2" in message
    code, _ = refused(site.shop.service_as("alice").plantChanged, plant=p1)
    assert code == "Client.NotAuthorized"
    assert site.shop.service_as("plant").plantChanged(plant=p1) is True
    assert site.shop.service_as("plant2").plantChanged(plant=p2) is True
    assert site.shop.service_as("admin").plantChanged(plant=p2) is True


def test_plants_tell_the_shop_over_tls_with_their_own_certificates(site: Site) -> None:
    """The plant's notifier presents the plant's certificate: the shop hears it (no 'did not take' warning)."""
    for plant in (site.plant, site.plant2):
        (plant.directory / "vmshop_addresses.txt").write_text(host_port(site.shop) + "\n")
    made = site.shop_as("alice").createVM(dag=DAG, vm_key="noticed")
    holder = site.plant if made.plant == site.plant.url else site.plant2
    holder.service.collectVM(vm_id=made.vm.plant_vm_id)  # behind the shop's back
    wait_for(lambda: site.shop_as("alice").describeVM(vm=made.vm.epr).state == "collected", timeout=20,
             what="the shop to hear of the collect from the plant")
    assert "did not take a notice" not in holder.output()


# Quotas --------------------------------------------------------------------------------------------------------


def test_concurrent_creates_never_exceed_a_quota(site: Site) -> None:
    """bob may hold 3 VMs: 8 creates at once make exactly 3; the others are refused, naming the limit."""
    clients = [site.shop.service_as("bob") for _ in range(8)]

    def create(index: int) -> str:
        try:
            return str(clients[index].createVM(dag=DAG, vm_key=f"bob-{index}").vm.state)
        except zeep.exceptions.Fault as fault:
            return f"{str(fault.code).split(':', 1)[-1]}: {fault.message}"

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(create, range(8)))
    made = [o for o in outcomes if o == "running"]
    refusals = [o for o in outcomes if o != "running"]
    assert len(made) == 3, outcomes
    assert all(o.startswith("Client.QuotaExceeded: ") and "at most 3 VMs" in o for o in refusals), refusals
    bob = site.shop_as("bob")
    mine = [vm for vm in bob.queryVMs(query="state=running") or []]
    assert len(mine) == 3
    assert len([r for r in plant_records(site.plant) + plant_records(site.plant2) if r[0].startswith("bob-")]) == 3
    for vm in mine:  # a collected VM no longer counts
        bob.collectVM(vm=vm.epr)
    assert bob.createVM(dag=DAG, vm_key="bob-again").vm.state == "running"
    bob.collectVM(vm={"Address": site.shop.url, "VMKey": "bob-again"})


def test_a_memory_quota_counts_the_hardware_the_plant_bids(site: Site) -> None:
    """carol may hold 200 MiB: an image start names no memory, the plant's bid does (tiny: 128 MiB)."""
    admin = site.shop_as("admin")
    first = admin.createVM(dag=DAG, owner="carol", vm_key="carol-1")
    assert first.vm.memory == 128
    before = registry(site)
    code, message = refused(admin.createVM, dag=DAG, owner="carol", vm_key="carol-2")
    assert code == "Client.QuotaExceeded" and "200 MiB" in message and "holds 128" in message
    code, message = refused(admin.createVM, dag=SMALL.replace('memory="64"', 'memory="100"'), owner="carol")
    assert code == "Client.QuotaExceeded"  # the DAG states it: refused before any plant is asked
    assert registry(site) == before  # nothing registered, nothing made
    assert "carol-2" not in [r[0] for r in plant_records(site.plant) + plant_records(site.plant2)]
    assert admin.createVM(dag=SMALL, owner="carol", vm_key="carol-3").vm.memory == 64  # 128 + 64 <= 200
    for key in ("carol-1", "carol-3"):
        admin.collectVM(vm={"Address": site.shop.url, "VMKey": key})


# The wire and the clients ---------------------------------------------------------------------------------


def test_plain_http_to_a_tls_port_gets_no_http_answer(site: Site) -> None:
    before = registry(site)
    for server in (site.shop, site.plant):
        session = requests.Session()
        session.trust_env = False
        plain = server.url.replace("https://", "http://")
        with pytest.raises(requests.exceptions.ConnectionError):
            session.post(plain, data=b"<x/>", headers={"Content-Type": "text/xml"}, timeout=30)
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
            raw.sendall(b"GET /?wsdl HTTP/1.0\r\n\r\n")
            answer = raw.recv(1024)
        assert not answer.startswith(b"HTTP/")  # a TLS alert, or nothing: never a document
    assert registry(site) == before


@pytest.mark.parametrize(("flags", "code", "words"), [
    (["--cert", "other/mallory.pem", "--key", "other/mallory.key"], "Client.BadCredentials",
     "does not trust the CA that issued your certificate"),
    (["--cert", "expired.pem", "--key", "expired.key"], "Client.BadCredentials", "expired on"),
    (["--cert", "alice.pem", "--key", "bob.key"], "Client.BadCredentials", "does not match the certificate"),
    (["--cert", "stranger.pem", "--key", "stranger.key"], "Client.AuthenticationFailed",
     "is not in this shop's authorisation file"),
    (["--cert", "alice.pem", "--key", "alice.key", "--ca", "other/ca.pem"], "Client.BadCredentials",
     "not signed by a CA in your CA file"),
    (["--ca", ""], "Client.BadCredentials", "name the CA"),
    ([], "Client.BadCredentials", "wants a client certificate"),
])
def test_bad_credentials_are_one_line_from_the_cli(site: Site, pki: TestPki, flags: list[str], code: str,
                                                  words: str, capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in ("VMSHOP_CERT", "VMSHOP_KEY", "VMSHOP_CA"):
        monkeypatch.delenv(variable, raising=False)
    files = [str(pki.directory / f) if f and not f.startswith("--") else f for f in flags]
    if "--ca" not in flags:
        files += ["--ca", str(pki.ca)]
    status = cli.main(["--shop", site.shop.url, *files, "query"])
    out, err = capsys.readouterr()
    assert status == cli.EXIT_INVALID, err
    assert err.startswith(f"vmshop: [{code}] ") and words in err, err
    assert err.count("\n") == 1 and "Traceback" not in out + err


def test_the_client_library_names_the_problem(site: Site, pki: TestPki) -> None:
    with pytest.raises(CredentialsError, match="wants a client certificate"):
        VMShopClient(site.shop.url, ca=pki.ca, timeout=30).plants()
    with pytest.raises(AuthenticationFailedError):
        VMShopClient(site.shop.url, cert=pki.cert("stranger"), key=pki.key("stranger"), ca=pki.ca).plants()
    with pytest.raises(CredentialsError, match="is https: name the CA"):
        VMShopClient(site.shop.url, cert=pki.cert("alice"), key=pki.key("alice"))
    with pytest.raises(CredentialsError, match="give both"):
        VMShopClient(site.shop.url, cert=pki.cert("alice"), ca=pki.ca)
    alice = VMShopClient(site.shop.url, cert=pki.cert("alice"), key=pki.key("alice"), ca=pki.ca, timeout=60)
    with pytest.raises(NoSuchVMError):
        alice.describe("admins-gift")  # bob's
    assert alice.subject == pki.subject("alice")


def test_afterwards_no_server_logged_a_traceback(site: Site) -> None:
    no_traceback(site.shop, site.plant, site.plant2)
