"""The second way in: WS-Security UsernameToken (PasswordDigest, nonce, created, replay window) over TLS.

Unit tests of vmshop_common/wsse.py with a fixed clock, then a real shop
configured with a users file: a user without a certificate makes, finds and
collects a VM with zeep's ``wsse`` (through VMShopClient and the CLI); a
wrong password, a stale or replayed token, a token sent as plain text and
a request with neither certificate nor token are refused with
``Client.AuthenticationFailed``; certificates keep working.
"""

from __future__ import annotations

import base64
import datetime
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from pki import TestPki
from servers import ServerProcess, host_port, start_plant, start_shop

from vmshop_common.errors import AuthenticationFailedError, ConfigurationError
from vmshop_common.wsse import PASSWORD_DIGEST, SOAP_ENV, WSSE, WSU, UsernameTokens, digest
from vmshop_service import cli
from vmshop_service.client import VMShopClient

NOW = 1_800_000_000.0
DAG = ('<vm xmlns="urn:vmshop:dag:1"><nodes><image id="s" name="tiny"/><script id="run">echo hi</script></nodes>'
       '<edges><edge from="s" to="run"/></edges></vm>')


def iso(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).isoformat()


def token(user: str, password: str, nonce: bytes = b"0123456789abcdef", created: str | None = None,
          kind: str = PASSWORD_DIGEST, body: str = "<x:queryVMs xmlns:x='urn:vmshop:vmshop:1'/>") -> bytes:
    created = created or iso(NOW)
    value = digest(nonce, created, password) if kind == PASSWORD_DIGEST else password
    return (f'<e:Envelope xmlns:e="{SOAP_ENV}"><e:Header><s:Security xmlns:s="{WSSE}" xmlns:u="{WSU}">'
            f"<s:UsernameToken><s:Username>{user}</s:Username><s:Password Type=\"{kind}\">{value}</s:Password>"
            f"<s:Nonce>{base64.b64encode(nonce).decode()}</s:Nonce><u:Created>{created}</u:Created>"
            f"</s:UsernameToken></s:Security></e:Header><e:Body>{body}</e:Body></e:Envelope>").encode()


@pytest.fixture
def users(tmp_path: Path) -> Path:
    path = tmp_path / "users"
    path.write_text("# users\nalice user s3cret words\nops admin,user ops-pass\n")
    path.chmod(0o600)
    return path


def test_a_good_token_proves_its_user(users: Path) -> None:
    tokens = UsernameTokens(users, window=300, clock=lambda: NOW)
    alice = tokens.identify(token("alice", "s3cret words"))
    assert alice is not None and (alice.name, alice.roles, alice.subject) == ("alice", frozenset({"user"}), "")
    assert tokens.identify(token("ops", "ops-pass", nonce=b"another nonce!!")).is_admin  # type: ignore[union-attr]
    assert tokens.identify(b"<e:Envelope xmlns:e='x'/>") is None  # no token: certificates decide
    assert tokens.identify(b"not xml UsernameToken") is None


@pytest.mark.parametrize(("body", "words"), [
    (token("alice", "wrong"), "user name or password is wrong"),
    (token("mallory", "s3cret words"), "user name or password is wrong"),  # the same words: users do not leak
    (token("alice", "s3cret words", kind="http://docs.oasis-open.org/wss/2004/01/"
           "oasis-200401-wss-username-token-profile-1.0#PasswordText"), "must carry a PasswordDigest"),
    (token("alice", "s3cret words", created=iso(NOW - 301)), "more than 300 s from the server's time"),
    (token("alice", "s3cret words", created=iso(NOW + 301)), "more than 300 s from the server's time"),
    (token("alice", "s3cret words", created="yesterday"), "malformed"),
    (token("alice", "s3cret words", created="2027-01-15T08:00:00"), "malformed"),  # no time zone
    (token("alice", "s3cret words", nonce=b"short"), "8 to 64 bytes"),
    (token("alice", "s3cret words").replace(b"MDEy", b"!!!!"), "malformed"),
])
def test_bad_tokens_are_refused(users: Path, body: bytes, words: str) -> None:
    with pytest.raises(AuthenticationFailedError, match=words) as caught:
        UsernameTokens(users, clock=lambda: NOW).identify(body)
    assert caught.value.code == "Client.AuthenticationFailed"


def test_a_replayed_nonce_is_refused_within_the_window_and_a_fresh_one_is_not(users: Path) -> None:
    now = [NOW]
    tokens = UsernameTokens(users, window=300, clock=lambda: now[0])
    first = token("alice", "s3cret words")
    assert tokens.identify(first) is not None
    now[0] += 200
    with pytest.raises(AuthenticationFailedError, match="replay"):
        tokens.identify(first)
    assert tokens.identify(token("alice", "s3cret words", nonce=b"fresh nonce 1234", created=iso(now[0])))


def test_the_users_file(tmp_path: Path, users: Path) -> None:
    users.chmod(0o644)
    with pytest.raises(ConfigurationError, match="readable by others"):
        UsernameTokens(users)
    for text, words in (("alice\n", "NAME ROLES PASSWORD"), ("a/b user p\n", "not an identity name"),
                        ("alice wizard p\n", "unknown role"), ("alice user p\nalice user q\n", "listed already")):
        bad = tmp_path / "bad"
        bad.write_text(text)
        bad.chmod(0o600)
        with pytest.raises(ConfigurationError, match=words):
            UsernameTokens(bad)
    users.chmod(0o600)
    tokens = UsernameTokens(users, clock=lambda: NOW)
    users.write_text("bob user b\n")
    assert tokens.reload() == 1
    with pytest.raises(AuthenticationFailedError):
        tokens.identify(token("alice", "s3cret words"))


# Against a real shop ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory, warehouse_dir: Path) -> Iterator[ServerProcess]:
    base = tmp_path_factory.mktemp("wsse")
    users = base / "vmshop-users"
    users.write_text("carol user carols-password\n")
    users.chmod(0o600)
    plant = start_plant(base / "plant", warehouse_dir, backend="fake", network="none")
    try:
        server = start_shop(base / "shop", [host_port(plant)], flags=["--wsse-users", str(users)])
        try:
            yield server
        finally:
            server.cleanup()
    finally:
        plant.cleanup()


def test_a_user_without_a_certificate_gets_in_with_a_token(shop: ServerProcess, pki: TestPki) -> None:
    carol = VMShopClient(shop.url, ca=pki.ca, username="carol", password="carols-password", timeout=60)
    made = carol.create(DAG, key="carols")
    assert made.vm.owner == "carol" and made.vm.state == "running"
    assert [vm.key for vm in carol.query("")] == ["carols"]
    with pytest.raises(Exception) as hidden:
        VMShopClient(shop.url, cert=pki.cert("bob"), key=pki.key("bob"), ca=pki.ca).describe("carols")
    assert getattr(hidden.value, "code", "") == "Client.NoSuchVM"  # the same rules for token identities
    assert carol.collect(made.vm).state == "collected"
    # certificates keep working on the same shop
    admin = VMShopClient(shop.url, cert=pki.cert("admin"), key=pki.key("admin"), ca=pki.ca)
    assert "carols" in [vm.key for vm in admin.query("owner=carol")]


def test_refusals(shop: ServerProcess, pki: TestPki) -> None:
    for password in ("wrong", ""):
        with pytest.raises(AuthenticationFailedError, match="user name or password is wrong"):
            VMShopClient(shop.url, ca=pki.ca, username="carol", password=password).query("")
    with pytest.raises(AuthenticationFailedError, match="none was presented"):
        VMShopClient(shop.url, ca=pki.ca).query("")  # neither a certificate nor a token
    session = requests.Session()
    session.trust_env = False
    now = datetime.datetime.now(datetime.UTC).timestamp()

    def post(body: bytes) -> str:
        answer = session.post(shop.url, data=body, verify=str(pki.ca), timeout=30,
                              headers={"Content-Type": "text/xml; charset=utf-8"})
        assert answer.status_code == 500
        return answer.text

    fresh = token("carol", "carols-password", nonce=os.urandom(16), created=iso(now),
                  body="<x:queryVMs xmlns:x='urn:vmshop:vmshop:1'><x:query></x:query></x:queryVMs>")
    ok = session.post(shop.url, data=fresh, verify=str(pki.ca), timeout=30, headers={"Content-Type": "text/xml"})
    assert ok.status_code == 200, ok.text
    assert "a replay" in post(fresh)  # the same message again
    assert "more than 300 s" in post(token("carol", "carols-password", nonce=os.urandom(16), created=iso(now - 900)))
    assert "Traceback" not in shop.output()


def test_the_cli_takes_a_user_and_its_password_from_the_environment(shop: ServerProcess, pki: TestPki,
                                                                    monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    for variable in ("VMSHOP_CERT", "VMSHOP_KEY"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("VMSHOP_CA", str(pki.ca))
    monkeypatch.setenv("VMSHOP_PASSWORD", "carols-password")
    assert cli.main(["--shop", shop.url, "--user", "carol", "query", "--json"]) == cli.EXIT_OK
    assert {vm["owner"] for vm in json.loads(capsys.readouterr().out)} <= {"carol"}  # carol sees only carol's
    monkeypatch.setenv("VMSHOP_PASSWORD", "nope")
    assert cli.main(["--shop", shop.url, "--user", "carol", "query"]) == cli.EXIT_INVALID
    err = capsys.readouterr().err
    assert err.startswith("vmshop: [Client.AuthenticationFailed] ") and err.count("\n") == 1


def test_tokens_need_tls(tmp_path: Path, users: Path) -> None:
    from vmshop_common.security import ServerSecurity
    from vmshop_service.config import ShopConfig, load_config, write_config

    config = ShopConfig(database=tmp_path / "r", plants_file=tmp_path / "p", security=ServerSecurity(insecure=True),
                        wsse_users=users)
    with pytest.raises(ConfigurationError, match="only over TLS"):
        load_config(write_config(config, tmp_path / "c.xml"))
