"""A small site CA for VMShop: ``vmshop-ca init DIR`` and ``vmshop-ca issue DIR NAME --role ROLE``.

For the demo, the tests and small sites. A site that has a CA of its own
uses that instead: nothing in VMShop assumes this one (servers and clients
take any PEM certificate, key and CA bundle; identities come from the
authorisation file, see :mod:`vmshop_common.authz`).

Files in a CA directory (all PEM):

* ``ca.pem``: the CA's certificate. Give it to every server and client as
  their CA (``<tls ca=...>``, ``--ca``, ``VMSHOP_CA``).
* ``ca.key``: the CA's private key (mode 0600). Keep it off the servers.
* ``NAME.pem`` / ``NAME.key``: an issued certificate and its key (0600).

Rules:

* Keys are EC P-256 (quick to make, small, accepted by every TLS stack the
  project's clients use); certificates are signed with SHA-256.
* An issued certificate's subject is ``CN=NAME`` under the CA's
  organisation (``O=...``); its identity and roles are whatever the
  authorisation file maps that subject to, never read from the certificate.
* Every certificate may authenticate a TLS client (extended key usage
  ``clientAuth``); ``shop`` and ``plant`` certificates are also server
  certificates (``serverAuth``) and name their hosts as subject alternative
  names (default: ``localhost``, ``127.0.0.1``, ``::1``; ``--host`` replaces
  them). A server certificate is also the client certificate its server
  uses to call others (a shop calling its plants, a plant telling its shops).
* Nothing is overwritten: an existing file is an error.
* Key files are created with mode 0600 from the start (no window in which
  they are readable by others).
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
ROLES = ("user", "admin", "shop", "plant")
SERVER_ROLES = ("shop", "plant")
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
CA_DAYS = 3650
CERT_DAYS = 365


class PkiError(Exception):
    """A CA operation could not be done (the message says why, in one line)."""


@dataclass(frozen=True)
class Issued:
    """An issued certificate: its files, its subject and the authorisation-file line that maps it."""

    cert: Path
    key: Path
    subject: str
    mapfile_line: str


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``mode`` (never replacing a file), write ``data``."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    except FileExistsError:
        raise PkiError(f"{path} exists already; remove it first to make a new one") from None
    with os.fdopen(fd, "wb") as handle:
        os.fchmod(handle.fileno(), mode)
        handle.write(data)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def make_ca(org: str, common_name: str, *, days: int = CA_DAYS,
            key: ec.EllipticCurvePrivateKey | None = None) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed CA certificate and its key (in memory)."""
    key = key or new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
                         x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    start = _now() - datetime.timedelta(minutes=5)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(start)
            .not_valid_after(start + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_cert(ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, name: str, role: str, *,
              hosts: Sequence[str] = (), days: int = CERT_DAYS, not_before: datetime.datetime | None = None,
              not_after: datetime.datetime | None = None,
              key: ec.EllipticCurvePrivateKey | None = None) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A certificate for ``name`` in ``role`` signed by the CA (in memory); see the module's rules."""
    if not NAME.match(name):
        raise PkiError(f"'{name}' is not a name (letters, digits, _ . -; at most 64)")
    if role not in ROLES:
        raise PkiError(f"'{role}' is not a role (one of {', '.join(ROLES)})")
    key = key or new_key()
    orgs = ca_cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, str(orgs[0].value))] if orgs else []
    subject = x509.Name(attributes + [x509.NameAttribute(NameOID.COMMON_NAME, name)])
    start = not_before or _now() - datetime.timedelta(minutes=5)
    end = not_after or start + datetime.timedelta(days=days)
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if role in SERVER_ROLES:
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(end)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                            crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False))
    if role in SERVER_ROLES:
        builder = builder.add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts or DEFAULT_HOSTS]),
                                        critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def init_ca(directory: str | Path, *, org: str = "VMShop site", common_name: str = "VMShop site CA",
            days: int = CA_DAYS) -> Path:
    """Make a CA in ``directory`` (created if missing): ``ca.pem`` and ``ca.key`` (0600). Returns ``ca.pem``."""
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    for existing in (CA_CERT, CA_KEY):
        if (target / existing).exists():
            raise PkiError(f"{target / existing} exists already: {target} holds a CA")
    cert, key = make_ca(org, common_name, days=days)
    _write_new(target / CA_KEY, key_pem(key), 0o600)
    _write_new(target / CA_CERT, cert_pem(cert), 0o644)
    return target / CA_CERT


def load_ca(directory: str | Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The CA of ``directory`` (PkiError naming the file if it is missing or unreadable)."""
    target = Path(directory)
    try:
        cert = x509.load_pem_x509_certificate((target / CA_CERT).read_bytes())
        key = serialization.load_pem_private_key((target / CA_KEY).read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise PkiError(f"{exc.filename} is missing: make a CA with 'vmshop-ca init {target}'") from None
    except (OSError, ValueError, TypeError) as exc:
        raise PkiError(f"the CA in {target} cannot be read: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{target / CA_KEY} is not an EC key")
    return cert, key


def mapfile_line(subject: str, name: str, role: str) -> str:
    """The authorisation-file line mapping ``subject`` to ``name`` with ``role`` (see :mod:`vmshop_common.authz`)."""
    return f'"{subject}" {name} {role}'


def issue(directory: str | Path, name: str, role: str, *, hosts: Sequence[str] = (), days: int = CERT_DAYS,
          not_before: datetime.datetime | None = None, not_after: datetime.datetime | None = None,
          out_dir: str | Path | None = None) -> Issued:
    """Issue ``NAME.pem`` and ``NAME.key`` (0600) for ``name`` in ``role`` from the CA in ``directory``.

    The files go to ``out_dir`` (default: the CA's directory).
    """
    ca_cert, ca_key = load_ca(directory)
    cert, key = make_cert(ca_cert, ca_key, name, role, hosts=hosts, days=days, not_before=not_before,
                          not_after=not_after)
    target = Path(out_dir or directory)
    target.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = target / f"{name}.pem", target / f"{name}.key"
    if cert_path.exists():
        raise PkiError(f"{cert_path} exists already; remove it first to issue a new one")
    _write_new(key_path, key_pem(key), 0o600)
    _write_new(cert_path, cert_pem(cert), 0o644)
    subject = cert.subject.rfc4514_string()
    return Issued(cert=cert_path, key=key_path, subject=subject, mapfile_line=mapfile_line(subject, name, role))


def main(argv: Sequence[str] | None = None) -> int:
    """``vmshop-ca init DIR`` / ``vmshop-ca issue DIR NAME --role ROLE [--host H]... [--days N] [--out DIR]``."""
    parser = argparse.ArgumentParser(prog="vmshop-ca", description="A small site CA for VMShop (EC P-256 keys).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    init = commands.add_parser("init", help="make a CA in DIR (ca.pem, ca.key)")
    init.add_argument("directory", metavar="DIR")
    init.add_argument("--org", default="VMShop site", help="the organisation (O=) of every subject it issues")
    init.add_argument("--days", type=int, default=CA_DAYS, help=f"validity in days (default {CA_DAYS})")
    make = commands.add_parser("issue", help="issue NAME.pem and NAME.key (0600) from the CA in DIR")
    make.add_argument("directory", metavar="DIR")
    make.add_argument("name", metavar="NAME", help="the identity's name (also its CN)")
    make.add_argument("--role", required=True, choices=ROLES, help="what the name is for")
    make.add_argument("--host", action="append", default=[],
                      help="shop/plant: a host name or address it serves on (repeat; default localhost, "
                           "127.0.0.1, ::1)")
    make.add_argument("--days", type=int, default=CERT_DAYS, help=f"validity in days (default {CERT_DAYS})")
    make.add_argument("--out", metavar="DIR", help="where to write the files (default: the CA's directory)")
    make.add_argument("--mapfile", metavar="FILE", help="also append the mapping line to this authorisation file")
    args = parser.parse_args(argv)
    try:
        if args.days <= 0:
            raise PkiError(f"--days must be positive, not {args.days}")
        if args.command == "init":
            path = init_ca(args.directory, org=args.org, days=args.days)
            print(f"vmshop-ca: made the CA {path} (key {Path(args.directory) / CA_KEY}, mode 0600)")
            return 0
        if args.host and args.role not in SERVER_ROLES:
            raise PkiError("--host is for shop and plant certificates")
        issued = issue(args.directory, args.name, args.role, hosts=args.host, days=args.days, out_dir=args.out)
        print(f"vmshop-ca: issued {issued.cert} and {issued.key} (0600) for {issued.subject}")
        if args.mapfile:
            with open(args.mapfile, "a", encoding="utf-8") as handle:
                handle.write(issued.mapfile_line + "\n")
            print(f"vmshop-ca: added to {args.mapfile}: {issued.mapfile_line}")
        else:
            print(f"authorisation file line: {issued.mapfile_line}")
        return 0
    except PkiError as exc:
        print(f"vmshop-ca: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"vmshop-ca: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
