"""vmshop-ca (vmshop_common/pki.py) and the checks of vmshop_common/tls.py on what it makes."""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from vmshop_common import pki
from vmshop_common.authz import AuthorizationFile
from vmshop_common.errors import CredentialsError
from vmshop_common.tls import describe_tls_failure, issued_by_own_ca, load_credentials, require_ca


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_and_issue_from_the_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca = tmp_path / "ca"
    assert pki.main(["init", str(ca), "--org", "Example Grid"]) == 0
    assert mode(ca / "ca.key") == 0o600 and mode(ca / "ca.pem") == 0o644
    mapfile = tmp_path / "grid-mapfile"
    assert pki.main(["issue", str(ca), "alice", "--role", "user", "--mapfile", str(mapfile)]) == 0
    assert pki.main(["issue", str(ca), "plant1", "--role", "plant", "--host", "plant1.example.org",
                     "--host", "10.1.2.3", "--days", "30", "--out", str(tmp_path / "plant")]) == 0
    out = capsys.readouterr().out
    assert 'authorisation file line: "CN=plant1,O=Example Grid" plant1 plant' in out
    assert mode(ca / "alice.key") == 0o600 and mode(tmp_path / "plant" / "plant1.key") == 0o600
    assert mapfile.read_text() == '"CN=alice,O=Example Grid" alice user\n'
    assert AuthorizationFile(mapfile).identify("CN=alice,O=Example Grid").name == "alice"

    ca_cert = x509.load_pem_x509_certificate((ca / "ca.pem").read_bytes())
    alice = x509.load_pem_x509_certificate((ca / "alice.pem").read_bytes())
    plant = x509.load_pem_x509_certificate((tmp_path / "plant" / "plant1.pem").read_bytes())
    for cert in (alice, plant):
        cert.verify_directly_issued_by(ca_cert)
    assert alice.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == \
        x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])
    assert ExtendedKeyUsageOID.SERVER_AUTH in plant.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    names = plant.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["plant1.example.org"]
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.1.2.3")]
    assert (plant.not_valid_after_utc - plant.not_valid_before_utc).days == 30
    creds = load_credentials(ca / "alice.pem", ca / "alice.key", ca / "ca.pem")
    assert creds.subject == "CN=alice,O=Example Grid" and issued_by_own_ca(creds)


@pytest.mark.parametrize(("argv", "words"), [
    (["issue", "{ca}", "alice", "--role", "user"], "exists already"),
    (["init", "{ca}"], "holds a CA"),
    (["issue", "{ca}", "a/b", "--role", "user"], "is not a name"),
    (["issue", "{ca}", "carol", "--role", "user", "--host", "x"], "--host is for shop and plant"),
    (["issue", "{tmp}/nowhere", "carol", "--role", "user"], "vmshop-ca init"),
    (["issue", "{ca}", "carol", "--role", "user", "--days", "0"], "must be positive"),
])
def test_refusals_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str],
                               words: str) -> None:
    ca = tmp_path / "ca"
    pki.init_ca(ca)
    pki.issue(ca, "alice", "user")
    before = (ca / "alice.key").read_bytes()
    assert pki.main([a.format(ca=ca, tmp=tmp_path) for a in argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("vmshop-ca: ") and words in err and err.count("\n") == 1
    assert (ca / "alice.key").read_bytes() == before  # nothing overwritten


def test_the_console_script_is_installed(tmp_path: Path) -> None:
    command = shutil.which("vmshop-ca", path=str(Path(__import__("sys").executable).parent))
    assert command is not None
    result = subprocess.run([command, "init", str(tmp_path / "ca")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and (tmp_path / "ca" / "ca.pem").is_file()


def test_credentials_are_checked_before_use(tmp_path: Path) -> None:
    ca = tmp_path / "ca"
    pki.init_ca(ca)
    for name in ("a", "b"):
        pki.issue(ca, name, "user")
    now = datetime.datetime.now(datetime.UTC)
    pki.issue(ca, "old", "user", not_before=now - datetime.timedelta(days=9), not_after=now - datetime.timedelta(1))
    pki.issue(ca, "young", "user", not_before=now + datetime.timedelta(days=1))
    (tmp_path / "empty.pem").write_text("")
    cases = [
        ((ca / "a.pem", ca / "b.key", ca / "ca.pem"), "does not match the certificate"),
        ((ca / "old.pem", ca / "old.key", ca / "ca.pem"), "expired on"),
        ((ca / "young.pem", ca / "young.key", ca / "ca.pem"), "is not valid until"),
        ((ca / "missing.pem", ca / "a.key", ca / "ca.pem"), "cannot read the certificate"),
        ((ca / "a.pem", ca / "a.pem", ca / "ca.pem"), "is not a PEM private key"),
        ((ca / "a.pem", ca / "a.key", tmp_path / "empty.pem"), "holds no PEM certificate"),
    ]
    for files, words in cases:
        with pytest.raises(CredentialsError, match=words) as caught:
            load_credentials(*files)
        assert "\n" not in str(caught.value)
    with pytest.raises(CredentialsError, match="is https: name the CA"):
        require_ca("https://shop:1/", None)
    require_ca("http://127.0.0.1:1/", None)


@pytest.mark.parametrize(("error", "words"), [
    ("[SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown ca", "does not trust the CA that issued your certificate"),
    ("[('SSL routines', '', 'tls alert certificate expired')]", "refused your certificate: it has expired"),
    ("[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] tlsv13 alert certificate required", "wants a client certificate"),
    ("certificate verify failed: self-signed certificate in certificate chain", "not signed by a CA in your CA"),
    ("Hostname mismatch, certificate is not valid for 'x'", "does not name the host"),
    ("[SSL: WRONG_VERSION_NUMBER] wrong version number", "does not speak TLS there"),
    ("Connection refused", None),
])
def test_tls_failures_are_named(error: str, words: str | None) -> None:
    described = describe_tls_failure(ConnectionError(error), "shop")
    assert described is None if words is None else words in (described or "")
