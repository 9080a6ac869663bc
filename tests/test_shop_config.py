"""The shop's configuration file: written by scripts/configure_vmshop.py, read back by load_config,
and the server's own refusal of a configuration it cannot use (one line, a stable code, exit 1)."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from pki import TestPki
from servers import ROOT

from vmshop_common.errors import ConfigurationError, VMShopError
from vmshop_common.security import ServerSecurity
from vmshop_common.tls import TlsFiles
from vmshop_service.config import ShopConfig, load_config, write_config
from vmshop_service.quota import Limits, QuotaConfig


def configure(tmp_path: Path, *flags: str) -> Path:
    output = tmp_path / "configuration_vmshop.xml"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "configure_vmshop.py"), "--yes", "--output", str(output),
                    *flags], check=True, capture_output=True, cwd=str(tmp_path))
    return output


def test_configure_script_writes_what_load_config_reads(tmp_path: Path, pki: TestPki) -> None:
    path = configure(tmp_path, "--name", "shop7", "--port", "9099", "--public-url", "https://shop.example:9099/",
                     "--database", "reg.sqlite3", "--plants-file", "plants.txt", "--bid-timeout", "3.5",
                     "--poll-interval", "2", "--shutdown-grace", "4.5", *pki.tls_flags("shop"),
                     "--authorization", "map",
                     "--default-quota", "vms=4,memory=1024", "--quota", "alice:vms=1", "--quota", "admin:vms=unlimited")
    config = load_config(path)
    assert (config.name, config.listen_port, config.public_url) == ("shop7", 9099, "https://shop.example:9099/")
    assert config.database == tmp_path / "reg.sqlite3" and config.plants_file == tmp_path / "plants.txt"
    assert (config.bid_timeout, config.poll_interval, config.shutdown_grace) == (3.5, 2.0, 4.5)
    assert config.security == ServerSecurity(tls=TlsFiles(pki.cert("shop"), pki.key("shop"), pki.ca),
                                             authorization=tmp_path / "map")
    assert config.quotas == QuotaConfig(Limits(vms=4, memory=1024), {"alice": Limits(vms=1, memory=1024),
                                                                      "admin": Limits(vms=None, memory=1024)})
    assert config.quotas.limits("bob") == Limits(vms=4, memory=1024)
    insecure = load_config(configure(tmp_path, "--insecure", "--port", "9098"))
    assert insecure.security.insecure and insecure.public_url == "http://127.0.0.1:9098/"


def test_write_then_load_round_trips(tmp_path: Path) -> None:
    config = ShopConfig(database=tmp_path / "r.sqlite3", plants_file=tmp_path / "p.txt", name="s", listen_port=0,
                        bid_timeout=1.5, create_timeout=60, call_timeout=7, poll_interval=0.5, lease_interval=0.25,
                        shutdown_grace=0,
                        security=ServerSecurity(tls=TlsFiles(tmp_path / "c.pem", tmp_path / "k.pem", tmp_path / "a"),
                                                authorization=tmp_path / "m"),
                        quotas=QuotaConfig(Limits(vcpus=8), {"x": Limits(vms=2, memory=None, vcpus=1)}))
    assert load_config(write_config(config, tmp_path / "c.xml")) == config
    insecure = replace(config, security=ServerSecurity(insecure=True), quotas=QuotaConfig())
    assert load_config(write_config(insecure, tmp_path / "c.xml")) == insecure
    no_public = replace(config, public_url="")
    assert load_config(write_config(no_public, tmp_path / "c.xml")).public_url == ""


@pytest.mark.parametrize(("content", "message"), [
    (None, "cannot read"),
    (b"<vmshop", "line 1"),
    (b'<other xmlns="urn:vmshop:vmshop-config:1"/>', "vmshop"),
    (b'<vmshop xmlns="urn:vmshop:vmshop-config:1"><listen port="not a port"/></vmshop>', "port"),
    (b'<!DOCTYPE vmshop [<!ENTITY x "y">]><vmshop xmlns="urn:vmshop:vmshop-config:1"/>', "DOCTYPE"),
    (b'<vmshop xmlns="urn:vmshop:vmshop-config:1"><database path="d"/><plants file="p"/></vmshop>', "needs <tls"),
    (b'<vmshop xmlns="urn:vmshop:vmshop-config:1"><listen host="10.0.0.1" insecure="true"/><database path="d"/>'
     b'<plants file="p"/></vmshop>', "refused on 10.0.0.1"),
    (b'<vmshop xmlns="urn:vmshop:vmshop-config:1"><listen insecure="true"/><database path="d"/><plants file="p"/>'
     b'<quotas vms="-1"/></vmshop>', "vms"),
    (b'<vmshop xmlns="urn:vmshop:vmshop-config:1"><listen insecure="true"/><database path="d"/><plants file="p"/>'
     b'<shutdown grace="forever"/></vmshop>', "grace"),
])
def test_a_bad_configuration_is_a_project_error(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "configuration_vmshop.xml"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(VMShopError, match=message) as caught:
        load_config(path)
    assert caught.value.code.startswith(("Server.", "Client."))
    if content is None:
        assert isinstance(caught.value, ConfigurationError)


@pytest.mark.parametrize(("program", "name"), [("vmshop_service.main", "vmshop-server"),
                                               ("vmplant_service.main", "vmplant")])
def test_a_server_refuses_a_missing_configuration_in_one_line(tmp_path: Path, program: str, name: str) -> None:
    result = subprocess.run([sys.executable, "-m", program, "--config", str(tmp_path / "missing.xml")],
                            capture_output=True, text=True, timeout=60, cwd=str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.startswith(f"{name}: [Server.Configuration] cannot read") and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1


def test_a_server_refuses_bad_credentials_in_one_line(tmp_path: Path, pki: TestPki) -> None:
    """An expired certificate, a key of another certificate: one line naming the problem, no traceback."""
    for cert, key, words in ((pki.cert("expired"), pki.key("expired"), "expired on"),
                             (pki.cert("shop"), pki.key("plant"), "does not match")):
        config = ShopConfig(database=tmp_path / "r.sqlite3", plants_file=tmp_path / "p.txt", listen_port=0,
                            security=ServerSecurity(tls=TlsFiles(cert, key, pki.ca), authorization=tmp_path / "m"))
        (tmp_path / "m").write_text("")
        (tmp_path / "p.txt").write_text("")
        write_config(config, tmp_path / "c.xml")
        result = subprocess.run([sys.executable, "-m", "vmshop_service.main", "--config", str(tmp_path / "c.xml")],
                                capture_output=True, text=True, timeout=60, cwd=str(tmp_path))
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert result.stderr.startswith("vmshop-server: [Server.Configuration] the shop's TLS credentials: ")
        assert words in result.stderr and result.stderr.count("\n") == 1


def test_insecure_is_refused_off_loopback_even_from_the_command_line(tmp_path: Path) -> None:
    config = ShopConfig(database=tmp_path / "r.sqlite3", plants_file=tmp_path / "p.txt", listen_port=0,
                        security=ServerSecurity(insecure=True))
    (tmp_path / "p.txt").write_text("")
    write_config(config, tmp_path / "c.xml")
    for program, name in (("vmshop_service.main", "vmshop-server"),):
        result = subprocess.run([sys.executable, "-m", program, "--config", str(tmp_path / "c.xml"),
                                 "--host", "0.0.0.0"], capture_output=True, text=True, timeout=60, cwd=str(tmp_path))
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert result.stderr.startswith(f"{name}: [Server.Configuration] insecure (plain HTTP) is refused on 0.0.0.0")


def test_a_postgresql_registry_is_configured(tmp_path: Path, pki: TestPki) -> None:
    path = configure(tmp_path, "--postgresql", "host=db.example dbname=vmshop user=vmshop",
                     "--database-password-file", "pw", "--dead-after", "20", "--plants-file", "plants.txt",
                     *pki.tls_flags("shop"), "--authorization", "map")
    config = load_config(path)
    assert (config.database, config.postgresql) == (None, "host=db.example dbname=vmshop user=vmshop")
    assert (config.database_password_file, config.dead_after) == (tmp_path / "pw", 20.0)
    assert load_config(write_config(config, tmp_path / "again.xml")) == config
    sqlite = load_config(configure(tmp_path, "--insecure"))
    assert sqlite.postgresql == "" and sqlite.database is not None and sqlite.dead_after == 60.0


@pytest.mark.parametrize(("database", "message"), [
    ('<database path="r.sqlite3" postgresql="dbname=x"/>', "exactly one"),
    ("<database/>", "exactly one"),
    ('<database postgresql="dbname=x password=hunter2hunter2"/>', "carries a password"),
    ('<database postgresql="dbname=\'x"/>', "not one libpq reads"),
])
def test_a_bad_database_element_is_refused(tmp_path: Path, database: str, message: str) -> None:
    path = tmp_path / "configuration_vmshop.xml"
    path.write_text('<vmshop xmlns="urn:vmshop:vmshop-config:1" name="s"><listen insecure="true"/>'
                    f'{database}<plants file="p.txt"/></vmshop>')
    with pytest.raises(ConfigurationError, match=message) as info:
        load_config(path)
    assert "hunter2" not in str(info.value)
