"""A server's security settings, as both configuration files hold them, and what they start.

In ``configuration_vmshop.xml`` and ``configuration_vmplant.xml`` alike::

    <listen host="127.0.0.1" port="8080"/>
    <tls cert="shop.pem" key="shop.key" ca="ca.pem"/>   the server's certificate, its key, the CAs it trusts
    <authorization file="grid-mapfile"/>                DN -> identity and roles (vmshop_common.authz)

or, for development and benchmarks only, plain HTTP on a loopback address::

    <listen host="127.0.0.1" port="8080" insecure="true"/>

Rules (checked when the file is read, errors name the file):

* A server has ``<tls>`` and ``<authorization>``, or ``insecure="true"``
  on ``<listen>``; not both, not neither.
* ``insecure`` is refused on any host that is not a loopback address.
* Relative paths are relative to the configuration file.

:func:`start_security` loads the credentials and the authorisation file
(one-line ConfigurationError naming the problem: an expired certificate, a
key that does not match, a bad mapping line...).
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lxml import etree

from .authz import AuthorizationFile, Insecure
from .errors import ConfigurationError, CredentialsError, Problem
from .tls import ClientPolicy, Credentials, TlsFiles, load_credentials


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ServerSecurity:
    """TLS files and authorisation file of a server, or ``insecure`` (plain HTTP on loopback)."""

    tls: TlsFiles | None = None
    authorization: Path | None = None
    insecure: bool = False

    @property
    def scheme(self) -> str:
        """``https``, or ``http`` when insecure."""
        return "http" if self.insecure else "https"

    def check(self, host: str, what: str) -> None:
        """ConfigurationError unless the settings follow the module's rules for a server on ``host``."""
        if self.insecure:
            if self.tls is not None or self.authorization is not None:
                raise ConfigurationError(f"{what}: insecure (plain HTTP) and <tls>/<authorization> exclude each "
                                         "other")
            if not is_loopback(host):
                raise ConfigurationError(f"{what}: insecure (plain HTTP) is refused on {host}: only on a loopback "
                                         "address (127.0.0.1, ::1, localhost)")
            return
        if self.tls is None or self.authorization is None:
            raise ConfigurationError(f"{what}: a server needs <tls cert= key= ca=/> and <authorization file=/> "
                                     "(or, on loopback only, <listen insecure=\"true\"/>)")


PORT_PLACEHOLDER = "{port}"
"""A port for :func:`url` that :func:`vmshop_common.soap.server.listen` fills in with the bound port."""


def url(scheme: str, host: str, port: int | str) -> str:
    """``scheme://host:port/`` (brackets for an IPv6 host)."""
    return f"{scheme}://[{host}]:{port}/" if ":" in host else f"{scheme}://{host}:{port}/"


def read_security(root: etree._Element, ns: str, base: Path, what: str) -> ServerSecurity:
    """The settings from a configuration's root element (namespace ``ns``), paths relative to ``base``."""
    listen = root.find(f"{{{ns}}}listen")
    insecure = listen is not None and listen.get("insecure", "false") in ("true", "1")
    tls = root.find(f"{{{ns}}}tls")
    authorization = root.find(f"{{{ns}}}authorization")

    def path(value: str) -> Path:
        candidate = Path(value).expanduser()
        return candidate if candidate.is_absolute() else base / candidate

    files = TlsFiles(path(tls.get("cert", "")), path(tls.get("key", "")), path(tls.get("ca", ""))) \
        if tls is not None else None
    security = ServerSecurity(tls=files, insecure=insecure,
                              authorization=path(authorization.get("file", "")) if authorization is not None
                              else None)
    host = listen.get("host", "127.0.0.1") if listen is not None else "127.0.0.1"
    try:
        security.check(host, what)
    except ConfigurationError as exc:
        at = listen if insecure else root
        raise ConfigurationError(exc.message, [Problem(exc.message, at.sourceline if at is not None else None)]) \
            from None
    return security


def write_security(security: ServerSecurity, root: etree._Element, ns: str) -> None:
    """Add the settings to a configuration's root element (``listen`` must exist already)."""
    if security.insecure:
        listen = root.find(f"{{{ns}}}listen")
        assert listen is not None
        listen.set("insecure", "true")
    if security.tls is not None:
        etree.SubElement(root, f"{{{ns}}}tls", {"cert": str(security.tls.cert), "key": str(security.tls.key),
                                                 "ca": str(security.tls.ca)})
    if security.authorization is not None:
        etree.SubElement(root, f"{{{ns}}}authorization", {"file": str(security.authorization)})


@dataclass
class StartedSecurity:
    """What a server runs with: its credentials (``None`` when insecure), who its callers are, and the TLS
    policy of its own calls to other servers (``None`` when insecure)."""

    credentials: Credentials | None
    identities: Any
    client_policy: ClientPolicy | None

    @property
    def insecure(self) -> bool:
        return self.credentials is None


def start_security(security: ServerSecurity, server: str) -> StartedSecurity:
    """Load the credentials and the authorisation file (ConfigurationError naming the problem)."""
    if security.insecure:
        return StartedSecurity(None, Insecure(), None)
    assert security.tls is not None and security.authorization is not None
    try:
        creds = load_credentials(security.tls.cert, security.tls.key, security.tls.ca)
    except CredentialsError as exc:
        raise ConfigurationError(f"the {server}'s TLS credentials: {exc.message}") from None
    return StartedSecurity(creds, AuthorizationFile(security.authorization, server), ClientPolicy(creds))




# The configure scripts ------------------------------------------------------------------------------------

MAPFILE_TEMPLATE = """\
# VMShop authorisation file (grid-mapfile style): who may call this {server}.
# One line per certificate subject:  "DN" identity roles [host:port,... for plants]
# Roles: user, admin, shop, plant. See README.md, "Who may do what".
# vmshop-ca issue CA_DIR NAME --role ROLE --mapfile {path} adds a line for a certificate it issues.
"""


def add_security_flags(parser: Any, server: str) -> None:
    """The configure scripts' flags for ``<tls>``, ``<authorization>`` and ``insecure``."""
    add = parser.add_argument
    add("--tls-cert", metavar="PEM", help=f"the {server}'s certificate (default: pki/NAME.pem next to the output)")
    add("--tls-key", metavar="PEM", help=f"the {server}'s private key (default: pki/NAME.key)")
    add("--tls-ca", metavar="PEM", help="the CA bundle that signs callers' certificates (default: pki/ca.pem)")
    add("--authorization", metavar="FILE",
        help=f"the authorisation file, DN -> identity and roles (default: vm{server}-mapfile next to the output; "
             "written with a header if missing)")
    add("--insecure", action="store_true",
        help="plain HTTP without identities (every caller may do everything); loopback only, for development")


def security_from_flags(args: Any, ask: Any, base: Path, name: str, server: str,
                        cwd: Path | None = None) -> ServerSecurity:
    """The security settings from the flags, else by ``ask(given, prompt, default) -> str``. Defaults are in
    ``base`` (the configuration file's directory); relative paths are taken from ``cwd`` (default: the
    current directory). The files are checked (ConfigurationError naming the problem); a missing
    authorisation file is written with a commented header."""
    if args.insecure:
        return ServerSecurity(insecure=True)
    here = cwd or Path.cwd()

    def path(value: str) -> Path:
        candidate = Path(value).expanduser()
        return Path(os.path.normpath(candidate if candidate.is_absolute() else here / candidate))

    pki = base / "pki"
    cert = path(ask(args.tls_cert, f"{server} certificate (PEM)", str(pki / f"{name}.pem")))
    key = path(ask(args.tls_key, f"{server} private key (PEM)", str(pki / f"{name}.key")))
    ca = path(ask(args.tls_ca, "CA bundle that signs callers' certificates (PEM)", str(pki / "ca.pem")))
    mapfile = path(ask(args.authorization, "authorisation file (DN -> identity, roles)",
                       str(base / f"vm{server}-mapfile")))
    try:
        load_credentials(cert, key, ca)
    except CredentialsError as exc:
        raise ConfigurationError(f"{exc.message} (make a CA and credentials with 'vmshop-ca init {pki}' and "
                                 f"'vmshop-ca issue {pki} {name} --role {server}', or give --tls-cert, --tls-key "
                                 "and --tls-ca; --insecure for plain HTTP on loopback)") from None
    if not mapfile.exists():
        mapfile.parent.mkdir(parents=True, exist_ok=True)
        mapfile.write_text(MAPFILE_TEMPLATE.format(server=server, path=mapfile), encoding="utf-8")
    else:
        from .authz import read_map

        read_map(mapfile)
    return ServerSecurity(tls=TlsFiles(cert, key, ca), authorization=mapfile)


__all__ = ["PORT_PLACEHOLDER", "ServerSecurity", "StartedSecurity", "add_security_flags", "is_loopback",
           "read_security", "security_from_flags", "start_security", "url", "write_security"]
