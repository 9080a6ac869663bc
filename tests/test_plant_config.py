"""The plant's configuration file and scripts/configure_vmplant.py."""

from __future__ import annotations

import importlib.util
import io
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from pki import TestPki

from vmplant_service.config import PlantConfig, load_config, write_config
from vmplant_service.ippool import IPPool
from vmplant_service.segment import default_switch_dir
from vmshop_common.errors import ConfigurationError, DoctypeRefusedError, SchemaInvalidError, WrongRootError
from vmshop_common.security import ServerSecurity
from vmshop_common.tls import TlsFiles

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "configure_vmplant.py"

FULL = """<?xml version="1.0" encoding="UTF-8"?>
<vmplant xmlns="urn:vmshop:vmplant-config:1" name="plant1">
  <capacity vms="4" memory="2048"/>
  <listen host="0.0.0.0" port="8091"/>
  <tls cert="pki/plant1.pem" key="pki/plant1.key" ca="/etc/vmshop/ca.pem"/>
  <authorization file="vmplant-mapfile"/>
  <public url="https://plant1.example.org:8091/"/>
  <warehouse dir="/srv/warehouse"/>
  <state dir="state"/>
  <backend name="qemu">
    <option name="accel" value="auto"/>
    <option name="cpu" value="host"/>
  </backend>
  <network mode="vde" ipfile="ip.txt" switch-dir="../switch"/>
  <datastore dir="data"/>
  <shops file="vmshop_addresses.txt"/>
  <watch interval="2.5"/>
  <shutdown grace="12.5"/>
</vmplant>
"""

MINIMAL = """<vmplant xmlns="urn:vmshop:vmplant-config:1" name="p">
  <listen port="8090" insecure="true"/>
  <warehouse dir="/w"/>
  <state dir="/s"/>
</vmplant>
"""

WITH_TLS = MINIMAL.replace(' insecure="true"/>', '/>').replace(
    "</vmplant>", '<tls cert="/k/p.pem" key="/k/p.key" ca="/k/ca.pem"/><authorization file="/k/map"/></vmplant>')


def write(tmp_path: Path, text: str, name: str = "configuration_vmplant.xml") -> Path:
    path = tmp_path / "conf" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_load_full(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, FULL))
    conf = tmp_path / "conf"
    assert config == PlantConfig(
        name="plant1", listen_host="0.0.0.0", listen_port=8091, public_url="https://plant1.example.org:8091/",
        warehouse_dir=Path("/srv/warehouse"), state_dir=conf / "state", backend="qemu",
        backend_options={"accel": "auto", "cpu": "host"}, network_mode="vde", ip_file=conf / "ip.txt",
        switch_dir=tmp_path / "switch", capacity_vms=4, capacity_memory=2048, datastore=conf / "data",
        shops_file=conf / "vmshop_addresses.txt", watch_interval=2.5, shutdown_grace=12.5,
        security=ServerSecurity(tls=TlsFiles(conf / "pki" / "plant1.pem", conf / "pki" / "plant1.key",
                                             Path("/etc/vmshop/ca.pem")),
                                authorization=conf / "vmplant-mapfile"))
    assert config.source == conf / "configuration_vmplant.xml"
    assert config.records_path == conf / "state" / "records.sqlite3"


def test_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL))
    assert (config.listen_host, config.listen_port, config.public_url) == ("127.0.0.1", 8090, "http://127.0.0.1:8090/")
    assert (config.backend, config.backend_options, config.network_mode) == ("qemu", {}, "none")
    assert (config.ip_file, config.switch_dir, config.datastore, config.shops_file) == (None, None, None, None)
    assert (config.capacity_vms, config.capacity_memory, config.watch_interval) == (8, 4096, 5.0)
    assert config.shutdown_grace == 30.0
    assert config.shops() == []
    assert config.security == ServerSecurity(insecure=True)


def test_tls_plants_name_https(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, WITH_TLS))
    assert config.public_url == "https://127.0.0.1:8090/" and config.security.scheme == "https"
    assert config.security.tls == TlsFiles(Path("/k/p.pem"), Path("/k/p.key"), Path("/k/ca.pem"))
    assert config.security.authorization == Path("/k/map")
    assert load_config(write_config(config, tmp_path / "again.xml")) == config


@pytest.mark.parametrize(("text", "words", "line"), [
    (MINIMAL.replace(' insecure="true"', ""), "a server needs <tls", 1),
    (WITH_TLS.replace("<authorization file=\"/k/map\"/>", ""), "a server needs <tls", 1),
    (WITH_TLS.replace('port="8090"/>', 'port="8090" insecure="true"/>'), "exclude each other", 2),
    (MINIMAL.replace('<listen port', '<listen host="0.0.0.0" port'), "refused on 0.0.0.0", 2),
    (MINIMAL.replace('<listen port', '<listen host="192.0.2.7" port'), "refused on 192.0.2.7", 2),
])
def test_tls_or_insecure_on_loopback(tmp_path: Path, text: str, words: str, line: int) -> None:
    with pytest.raises(ConfigurationError, match=words) as caught:
        load_config(write(tmp_path, text))
    assert caught.value.line == line


def test_insecure_on_loopback_names_are_accepted(tmp_path: Path) -> None:
    for host in ("127.0.0.1", "127.3.4.5", "::1", "localhost"):
        text = MINIMAL.replace("<listen port", f'<listen host="{host}" port')
        assert load_config(write(tmp_path, text)).security.insecure


def test_public_url_defaults(tmp_path: Path) -> None:
    def public(listen: str) -> str:
        return load_config(write(tmp_path, WITH_TLS.replace('<listen port="8090"/>', listen))).public_url

    assert public('<listen host="::1" port="9000"/>') == "https://[::1]:9000/"
    assert public('<listen host="0.0.0.0" port="9000"/>') == ""  # the service derives it
    assert public('<listen host="localhost" port="0"/>') == ""
    insecure = MINIMAL.replace('<listen port="8090"', '<listen host="::1" port="9000"')
    assert load_config(write(tmp_path, insecure)).public_url == "http://[::1]:9000/"


def test_vde_switch_dir_defaults_into_the_state_dir(tmp_path: Path) -> None:
    text = MINIMAL.replace("</vmplant>", '<network mode="vde" ipfile="/p/ip.txt"/></vmplant>')
    assert load_config(write(tmp_path, text)).switch_dir == default_switch_dir(Path("/s"))


def test_round_trip(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, FULL))
    out = write_config(config, tmp_path / "other" / "written.xml")
    again = load_config(out)
    assert again == config and again.source == out
    minimal = load_config(write(tmp_path, MINIMAL, "m.xml"))
    assert load_config(write_config(minimal, tmp_path / "m2.xml")) == minimal


@pytest.mark.parametrize(("text", "error", "line"), [
    (MINIMAL.replace('port="8090"', 'port="70000"'), SchemaInvalidError, 2),
    (MINIMAL.replace('insecure="true"', 'insecure="yes"'), SchemaInvalidError, 2),
    (WITH_TLS.replace('ca="/k/ca.pem"', ""), SchemaInvalidError, 5),
    (MINIMAL.replace('<state dir="/s"/>', ""), SchemaInvalidError, 1),
    (MINIMAL.replace('name="p"', 'name="a plant"'), SchemaInvalidError, 1),
    (MINIMAL.replace("</vmplant>", "<bogus/></vmplant>"), SchemaInvalidError, 5),
    (MINIMAL.replace("</vmplant>", '<network mode="bridge"/></vmplant>'), SchemaInvalidError, 5),
    (MINIMAL.replace("</vmplant>", '<network mode="vde"/></vmplant>'), ConfigurationError, 5),
    (MINIMAL.replace("</vmplant>", '<capacity vms="0" memory="100"/></vmplant>'), SchemaInvalidError, 5),
    (MINIMAL.replace("</vmplant>", '<backend name="qemu"><option name="a" value="1"/><option name="a" value="2"/>'
                                   "</backend></vmplant>"), SchemaInvalidError, 5),
    (MINIMAL.replace("</vmplant>", '<public url="ftp://x/"/></vmplant>'), SchemaInvalidError, 5),
    (MINIMAL.replace("</vmplant>", '<public url="http:///nohost"/></vmplant>'), ConfigurationError, 5),
    (MINIMAL.replace('<listen port="8090" insecure="true"/>', '<listen host="1:2:3" port="1"/>'),
     ConfigurationError, 2),
    (MINIMAL.replace("</vmplant>", '<warehouse dir="/again"/></vmplant>'), SchemaInvalidError, 5),
    (MINIMAL.replace("</vmplant>", '<shutdown grace="-1"/></vmplant>'), SchemaInvalidError, 5),
    (MINIMAL.replace("</vmplant>", '<shutdown grace="3601"/></vmplant>'), SchemaInvalidError, 5),
    ('<vmshop xmlns="urn:vmshop:vmplant-config:1"/>', WrongRootError, 1),
    ('<?xml version="1.0"?>\n<!DOCTYPE x SYSTEM "file:///etc/passwd">\n' + MINIMAL, DoctypeRefusedError, 2),
])
def test_bad_configurations(tmp_path: Path, text: str, error: type[Exception], line: int) -> None:
    with pytest.raises(error) as caught:
        load_config(write(tmp_path, text))
    assert caught.value.line == line, str(caught.value)  # type: ignore[attr-defined]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="cannot read"):
        load_config(tmp_path / "none.xml")


def test_shops(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "shops.txt").write_text("# shops\nshop.example.org:8080\n")
    config = load_config(write(tmp_path, MINIMAL.replace("</vmplant>", '<shops file="shops.txt"/></vmplant>')))
    assert config.shops() == [("shop.example.org", 8080)]


# scripts/configure_vmplant.py ------------------------------------------------

@pytest.fixture(scope="module")
def script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("configure_vmplant", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(script: ModuleType, tmp_path: Path, *argv: str, answers: str | None = None) -> tuple[int, str]:
    out = io.StringIO()
    stdin = io.StringIO(answers or "")
    args = list(argv) + (["--interactive"] if answers is not None else [])
    status = script.main(args, stdin=stdin, stdout=out, cwd=tmp_path)
    return status, out.getvalue()


def test_flags_only(script: ModuleType, tmp_path: Path, pki: TestPki) -> None:
    status, out = run(script, tmp_path, "--yes", "--name", "plantA", "--port", "8100", "--host", "127.0.0.2",
                      "--warehouse", "wh", "--state-dir", "st", "--backend", "qemu", "--backend-option", "accel=tcg",
                      "--network", "vde", "--capacity-vms", "3", "--capacity-memory", "1024", "--datastore", "data",
                      "--shops-file", "shops.txt", "--output", "conf/plant.xml", *pki.tls_flags("plant"),
                      "--authorization", "conf/mapfile", "--shutdown-grace", "9")
    assert status == 0, out
    config = load_config(tmp_path / "conf" / "plant.xml")
    assert (config.name, config.listen_host, config.listen_port) == ("plantA", "127.0.0.2", 8100)
    assert config.public_url == "https://127.0.0.2:8100/"
    assert config.security.tls == TlsFiles(pki.cert("plant"), pki.key("plant"), pki.ca)
    assert config.security.authorization == tmp_path / "conf" / "mapfile"
    assert "vmshop-ca issue" in (tmp_path / "conf" / "mapfile").read_text()  # a missing one gets a header
    assert config.warehouse_dir == tmp_path / "wh" and config.state_dir == tmp_path / "st"
    assert config.backend_options == {"accel": "tcg"}
    assert config.ip_file == tmp_path / "st" / "ip.txt" and config.switch_dir == default_switch_dir(tmp_path / "st")
    assert (config.capacity_vms, config.capacity_memory, config.datastore) == (3, 1024, tmp_path / "data")
    assert config.shutdown_grace == 9 and '<shutdown grace="9"/>' in (tmp_path / "conf" / "plant.xml").read_text()
    pool = IPPool(config.ip_file)
    entries = pool.entries()
    assert (entries[0].address, entries[-1].address, len(entries), entries[0].bridge) == \
        ("192.168.77.10", "192.168.77.73", 64, "vmshop0")
    assert config.shops() == [("127.0.0.1", 8080)]  # a missing shops file is written with the default


def test_existing_ip_file_is_kept_and_network_none_writes_none(script: ModuleType, tmp_path: Path) -> None:
    (tmp_path / "ip.txt").write_text("10.0.0.5 b /s n 0 0 0 vmX\n")
    assert run(script, tmp_path, "--yes", "--insecure", "--network", "vde", "--ip-file", "ip.txt")[0] == 0
    assert (tmp_path / "ip.txt").read_text() == "10.0.0.5 b /s n 0 0 0 vmX\n"
    assert run(script, tmp_path, "--yes", "--insecure", "--network", "none", "--state-dir", "s2")[0] == 0
    assert not (tmp_path / "s2" / "ip.txt").exists()
    assert load_config(tmp_path / "configuration_vmplant.xml").network_mode == "none"


def test_interactive_answers_and_defaults(script: ModuleType, tmp_path: Path) -> None:
    # name, host, port (a bad answer first), public url, warehouse, state dir, backend, network,
    # capacity vms, capacity memory, datastore, shops file
    answers = "\n".join(["myplant", "", "notaport", "8095", "", "/srv/wh", "", "", "none",
                         "2", "", "", "", ""]) + "\n"
    status, out = run(script, tmp_path, "--insecure", answers=answers)
    assert status == 0, out
    assert "Listen on port [8090]: " in out and "'notaport' is not a number; try again" in out
    config = load_config(tmp_path / "configuration_vmplant.xml")
    assert (config.name, config.listen_host, config.listen_port) == ("myplant", "127.0.0.1", 8095)
    assert config.public_url == "http://127.0.0.1:8095/"
    assert config.warehouse_dir == Path("/srv/wh") and config.state_dir == tmp_path / "var" / "vmplant"
    assert (config.network_mode, config.capacity_vms, config.capacity_memory) == ("none", 2, 4096)
    assert config.datastore is None


def test_flags_are_not_asked(script: ModuleType, tmp_path: Path) -> None:
    status, out = run(script, tmp_path, "--name", "given", "--port", "8200", "--insecure", answers="")
    assert status == 0
    assert "Plant name" not in out and "Listen on port" not in out and "Listen on host" in out
    assert load_config(tmp_path / "configuration_vmplant.xml").listen_port == 8200


def test_bad_values_write_nothing(script: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(script, tmp_path, "--yes", "--insecure", "--name", "bad/name")[0] == 1
    assert "does not match the schema" in capsys.readouterr().err
    assert not (tmp_path / "configuration_vmplant.xml").exists()
    (tmp_path / "shops.txt").write_text("not an address\n")
    assert run(script, tmp_path, "--yes", "--insecure", "--shops-file", "shops.txt")[0] == 1
    assert "line 1" in capsys.readouterr().err
    assert not (tmp_path / "configuration_vmplant.xml").exists()


def test_runs_as_a_script(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(SCRIPT), "--network", "vde", "--state-dir", "st", "--port", "8300",
                             "--insecure"],
                            cwd=tmp_path, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    config = load_config(tmp_path / "configuration_vmplant.xml")
    assert config.listen_port == 8300 and (tmp_path / "st" / "ip.txt").is_file()
    assert config.shops_file == tmp_path / "addresses" / "vmshop_addresses.txt"


def test_tls_files_are_checked_before_writing(script: ModuleType, tmp_path: Path, pki: TestPki,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert run(script, tmp_path, "--yes", "--name", "plantB")[0] == 1  # default pki/plantB.pem: missing
    err = capsys.readouterr().err
    assert "cannot read the certificate" in err and "vmshop-ca init" in err
    assert run(script, tmp_path, "--yes", "--tls-cert", str(pki.cert("plant")), "--tls-key", str(pki.key("bob")),
               "--tls-ca", str(pki.ca))[0] == 1
    assert "does not match the certificate" in capsys.readouterr().err
    assert not (tmp_path / "configuration_vmplant.xml").exists()


def test_peers_round_trip_and_plain_http_peers_refused_with_tls(tmp_path: Path) -> None:
    peers = ('<peers cache="100" bandwidth="12.5" refresh="30"><peer url="https://p2.example.org:8090/"/>'
             '<peer url="https://warehouse.example.org/site/"/></peers></vmplant>')
    config = load_config(write(tmp_path, WITH_TLS.replace("</vmplant>", peers)))
    assert config.peers == ("https://p2.example.org:8090/", "https://warehouse.example.org/site/")
    assert (config.cache_mib, config.bandwidth_mib, config.peers_refresh) == (100, 12.5, 30.0)
    assert load_config(write_config(config, tmp_path / "again.xml")) == config
    plain = WITH_TLS.replace("</vmplant>", '<peers><peer url="http://p2.example.org:8090/"/></peers></vmplant>')
    with pytest.raises(ConfigurationError, match="https only"):
        load_config(write(tmp_path, plain, "plain.xml"))
    with pytest.raises(SchemaInvalidError):
        load_config(write(tmp_path, WITH_TLS.replace("</vmplant>", '<peers bandwidth="0"/></vmplant>'), "z.xml"))
    defaults = load_config(write(tmp_path, WITH_TLS, "d.xml"))
    assert (defaults.peers, defaults.cache_mib, defaults.bandwidth_mib) == ((), 4096, 50.0)
    assert (defaults.serve_movable, defaults.fetch_movable) == (False, False)  # public images only, by default
    for serve, fetch in ((True, False), (False, True), (True, True)):
        movable = f'<peers serve-movable="{str(serve).lower()}" fetch-movable="{str(fetch).lower()}"/></vmplant>'
        agreed = load_config(write(tmp_path, WITH_TLS.replace("</vmplant>", movable), "m.xml"))
        assert (agreed.serve_movable, agreed.fetch_movable) == (serve, fetch)
        assert load_config(write_config(agreed, tmp_path / "m-again.xml")) == agreed
    with pytest.raises(SchemaInvalidError):
        load_config(write(tmp_path, WITH_TLS.replace("</vmplant>", '<peers serve-movable="yes"/></vmplant>'),
                          "y.xml"))


def test_peer_flags(script: ModuleType, tmp_path: Path, pki: TestPki) -> None:
    status, out = run(script, tmp_path, "--yes", "--warehouse", "wh", "--state-dir", "st", "--network", "none",
                      "--output", "conf/plant.xml", *pki.tls_flags("plant"), "--authorization", "conf/mapfile",
                      "--peer", "https://127.0.0.1:8091/", "--peer", "https://127.0.0.1:8092/",
                      "--cache-size", "512", "--bandwidth", "20", "--peers-refresh", "15")
    assert status == 0, out
    config = load_config(tmp_path / "conf" / "plant.xml")
    assert config.peers == ("https://127.0.0.1:8091/", "https://127.0.0.1:8092/")
    assert (config.cache_mib, config.bandwidth_mib, config.peers_refresh) == (512, 20.0, 15.0)
    assert (config.serve_movable, config.fetch_movable) == (False, False)
    status, out = run(script, tmp_path, "--yes", "--warehouse", "wh", "--state-dir", "st", "--network", "none",
                      "--output", "conf/movable.xml", *pki.tls_flags("plant"), "--authorization", "conf/mapfile",
                      "--serve-movable", "--fetch-movable")
    assert status == 0, out
    config = load_config(tmp_path / "conf" / "movable.xml")
    assert (config.peers, config.serve_movable, config.fetch_movable) == ((), True, True)
