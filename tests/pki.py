"""The test session's PKI: one CA, credentials for every identity the tests play, made once per process.

:func:`test_pki` makes (on first use, in a temporary directory removed at
exit) a CA with ``vmshop_common.pki`` and, from it, EC P-256 credentials:

========== ================================ =============================================
name        role in the mapfiles             what it is for
========== ================================ =============================================
shop        shop (in plants' files)          every test shop's certificate (server + client)
plant       plant (in shops' files)          every test plant's certificate
plant2      plant                            a second plant, for notices sent for another's address
alice, bob  user                             two tenants
admin       admin, user                      the default identity of test clients
stranger    (not mapped anywhere)            a valid certificate of the CA whose DN no file maps
expired     user (mapped)                    a certificate that expired yesterday
mallory     (another CA)                     alice's very subject DN, issued by another CA
========== ================================ =============================================

Servers take ``shop``/``plant`` credentials and authorisation files from
:meth:`TestPki.shop_mapfile` / :meth:`TestPki.plant_mapfile`; clients take
a ``requests`` session, a zeep transport, an ``ssl`` context or a Twisted
client policy for any of the names.
"""

from __future__ import annotations

import atexit
import datetime
import os
import shutil
import ssl
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmshop_common import pki as ca_tool
from vmshop_common.tls import ClientPolicy, Credentials, load_credentials, requests_tls

ORG = "VMShop test"
SERVERS = {"shop": "shop", "plant": "plant", "plant2": "plant"}
USERS = {"alice": "user", "bob": "user", "admin": "admin", "stranger": "user", "expired": "user"}
MAPPED_USERS = {"alice": "user", "bob": "user", "admin": "admin,user", "expired": "user"}


@dataclass
class TestPki:
    """Files of the session's PKI (see the module docstring)."""

    directory: Path
    _creds: dict[str, Credentials] = field(default_factory=dict)

    @property
    def ca(self) -> Path:
        return self.directory / ca_tool.CA_CERT

    @property
    def other_ca(self) -> Path:
        return self.directory / "other" / ca_tool.CA_CERT

    def cert(self, name: str) -> Path:
        return self.directory / ("other" if name == "mallory" else "") / f"{name}.pem"

    def key(self, name: str) -> Path:
        return self.directory / ("other" if name == "mallory" else "") / f"{name}.key"

    def subject(self, name: str) -> str:
        from cryptography import x509

        return x509.load_pem_x509_certificate(self.cert(name).read_bytes()).subject.rfc4514_string()

    def credentials(self, name: str) -> Credentials:
        """Checked credentials of ``name`` (expired ones are read without the expiry check)."""
        if name not in self._creds:
            now = None
            if name == "expired":
                now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=2)
            self._creds[name] = load_credentials(self.cert(name), self.key(name), self.ca, now=now)
        return self._creds[name]

    def tls_flags(self, name: str) -> list[str]:
        """``--tls-cert/--tls-key/--tls-ca`` for a configure script."""
        return ["--tls-cert", str(self.cert(name)), "--tls-key", str(self.key(name)), "--tls-ca", str(self.ca)]

    def client_flags(self, name: str) -> list[str]:
        """``--cert/--key/--ca`` for the vmshop command."""
        return ["--cert", str(self.cert(name)), "--key", str(self.key(name)), "--ca", str(self.ca)]

    # Clients -------------------------------------------------------------------------------------------

    def session(self, name: str | None = "admin") -> Any:
        """A ``requests.Session`` that verifies servers with the CA and presents ``name``'s certificate
        (``None``: no certificate)."""
        import requests

        session = requests.Session()
        requests_tls(session, self.credentials(name) if name else None, self.ca)
        return session

    def zeep_transport(self, name: str | None = "admin", timeout: float = 300) -> Any:
        import zeep

        transport = zeep.Transport(timeout=timeout, operation_timeout=timeout)
        requests_tls(transport.session, self.credentials(name) if name else None, self.ca)
        return transport

    def ssl_context(self, name: str | None = "admin") -> ssl.SSLContext:
        """An ``ssl`` client context (for urllib) verifying with the CA, presenting ``name``'s certificate."""
        context = ssl.create_default_context(cafile=str(self.ca))
        if name:
            context.load_cert_chain(str(self.cert(name)), str(self.key(name)))
        return context

    def client_policy(self, name: str = "admin") -> ClientPolicy:
        """A Twisted ``Agent`` policy (``AsyncSoapClient(tls=...)``) presenting ``name``'s certificate."""
        return ClientPolicy(self.credentials(name))

    # Authorisation files ------------------------------------------------------------------------------

    def shop_mapfile(self, path: Path, plants: dict[str, list[str]] | None = None,
                     extra: list[str] | None = None) -> Path:
        """A shop's authorisation file: the users, the admin, and each plant identity (``plant``, ``plant2``)
        with the ``host:port`` addresses it speaks for."""
        lines = [f'"{self.subject(n)}" {n} {roles}' for n, roles in MAPPED_USERS.items()]
        for name, addresses in (plants or {}).items():
            lines.append(f'"{self.subject(name)}" {name} plant {",".join(addresses)}' if addresses
                         else f'"{self.subject(name)}" {name} plant')
        path.write_text("# test shop\n" + "\n".join(lines + list(extra or [])) + "\n", encoding="utf-8")
        return path

    def plant_mapfile(self, path: Path, extra: list[str] | None = None) -> Path:
        """A plant's authorisation file: the shop and the admin (and alice, a user, to be refused)."""
        lines = [f'"{self.subject("shop")}" shop shop', f'"{self.subject("admin")}" admin admin',
                 f'"{self.subject("alice")}" alice user']
        path.write_text("# test plant\n" + "\n".join(lines + list(extra or [])) + "\n", encoding="utf-8")
        return path


def _make(directory: Path) -> TestPki:
    ca_tool.init_ca(directory, org=ORG, common_name="VMShop test CA")
    for name, role in SERVERS.items():
        ca_tool.issue(directory, name, role, hosts=["localhost", "127.0.0.1", "::1"])
    now = datetime.datetime.now(datetime.UTC)
    for name, role in USERS.items():
        if name == "expired":
            ca_tool.issue(directory, name, role, not_before=now - datetime.timedelta(days=30),
                          not_after=now - datetime.timedelta(days=1))
        else:
            ca_tool.issue(directory, name, role)
    other = directory / "other"
    ca_tool.init_ca(other, org=ORG, common_name="Not the VMShop test CA")
    # mallory: alice's very subject, from a CA no test server trusts.
    issued = ca_tool.issue(other, "alice", "user")
    issued.cert.rename(other / "mallory.pem")
    issued.key.rename(other / "mallory.key")
    return TestPki(directory)


_PKI: TestPki | None = None
_LOCK = threading.Lock()


def test_pki() -> TestPki:
    """The session's PKI (made on first use, removed at exit)."""
    global _PKI
    with _LOCK:
        if _PKI is None:
            directory = Path(tempfile.mkdtemp(prefix="vmshop-pki-"))
            atexit.register(shutil.rmtree, directory, True)
            _PKI = _make(directory)
            os.chmod(directory, 0o755)
        return _PKI


test_pki.__test__ = False  # type: ignore[attr-defined]  # not a test, whatever its name
TestPki.__test__ = False  # type: ignore[attr-defined]
