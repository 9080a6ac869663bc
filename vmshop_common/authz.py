"""Who may do what: the authorisation file (grid-mapfile style) and the rules the shop and plants apply.

**Identities come from this file, never from anything a caller says.** A
caller proves a certificate subject (a DN) in the TLS handshake; the
server's authorisation file maps that DN to an identity name and roles.
A DN not in the file is no one (``Client.AuthenticationFailed``).

The file, one mapping a line (``#`` starts a comment, blank lines are
ignored)::

    # "subject DN"                       identity  roles         [addresses, for plants]
    "CN=alice,O=Example Grid"            alice     user
    "/O=Example Grid/CN=Bob Smith"       bob       user
    "CN=ops,O=Example Grid"              ops       admin,user
    "CN=shop1,O=Example Grid"            shop1     shop
    "CN=plant1,O=Example Grid"           plant1    plant         plant1.example.org:8090

* The DN is in double quotes, in RFC 4514 form (``CN=...,O=...``, most
  specific first, as ``openssl x509 -nameopt RFC2253`` prints it) or in
  the slash form of Globus grid-mapfiles (``/O=.../CN=...``, most general
  first). Both name the same subject; attribute types are compared by OID,
  values exactly. ``\\`` escapes a character inside the quotes.
* The identity name is ``[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}``: it is what
  owns VMs and what quotas are counted against. Several DNs may map to one
  name (a user with two certificates); one DN may appear only once.
* Roles, comma-separated: ``user`` (makes and manages its own VMs),
  ``admin`` (everything, every owner's VMs), ``shop`` (may call plants),
  ``plant`` (may tell a shop that its VMs changed).
* Addresses (``host:port``, comma-separated) name the plants a ``plant``
  identity speaks for: a shop hears ``plantChanged`` for a plant only from
  an identity listing that plant's address.

The rules (every server applies them through the functions below):

Shop:

* ``createVM``: ``user`` or ``admin``. The owner of the new VM is the
  caller's identity; an ``owner`` parameter naming anyone else is refused
  (``Client.NotAuthorized``) unless the caller is ``admin``.
* ``describeVM``, ``configureVM``, ``collectVM``, ``destroy``,
  ``setTerminationTime`` and the resource-property operations: ``user``
  or ``admin``; only the VM's owner or an ``admin`` is answered, anyone
  else gets ``Client.NoSuchVM``, exactly as for a key that does not exist,
  so other owners' VMs do not leak.
* ``queryVMs``: ``user`` or ``admin``; a user sees only its own VMs, an
  admin sees all.
* ``estimateCost``, ``listPlants``: any identity in the file.
* ``reloadPlants``: ``admin``.
* ``plantChanged``: a ``plant`` identity that lists the notice's plant
  address, or ``admin``.

Plant: every operation needs ``shop`` or ``admin``; its public images
(``/images/``, :mod:`vmplant_service.transfer`) are read by ``plant``,
``shop`` or ``admin``.

A server listening ``insecure`` (plain HTTP, loopback only) has no
certificates to go by: every caller is :data:`ANONYMOUS`, which has every
role. That is what insecure means; it is for development and benchmarks.

:class:`AuthorizationFile` re-reads its file on :meth:`~AuthorizationFile.reload`
(the servers call it on SIGHUP); a file with an error keeps the previous
mapping in force and the error names its line.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509

from .addresses import parse_address
from .errors import AuthenticationFailedError, ConfigurationError, NotAuthorizedError, Problem

log = logging.getLogger(__name__)

USER, ADMIN, SHOP, PLANT = "user", "admin", "shop", "plant"
ROLES = frozenset({USER, ADMIN, SHOP, PLANT})
NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")

# Attribute short names of the slash form (and RFC 4514's), by OID.
_ATTRIBUTE_OIDS = {
    "CN": "2.5.4.3", "SN": "2.5.4.4", "SERIALNUMBER": "2.5.4.5", "C": "2.5.4.6", "L": "2.5.4.7", "ST": "2.5.4.8",
    "STREET": "2.5.4.9", "O": "2.5.4.10", "OU": "2.5.4.11", "TITLE": "2.5.4.12", "GN": "2.5.4.42",
    "GIVENNAME": "2.5.4.42", "SURNAME": "2.5.4.4", "INITIALS": "2.5.4.43", "PSEUDONYM": "2.5.4.65",
    "DC": "0.9.2342.19200300.100.1.25", "UID": "0.9.2342.19200300.100.1.1", "USERID": "0.9.2342.19200300.100.1.1",
    "EMAILADDRESS": "1.2.840.113549.1.9.1", "EMAIL": "1.2.840.113549.1.9.1", "E": "1.2.840.113549.1.9.1",
}
_OID = re.compile(r"^\d+(\.\d+)+$")
_CAMEL = ("emailAddress", "serialNumber", "givenName", "surname", "userId", "pseudonym", "initials", "title",
          "street")


def _rfc4514_names() -> dict[str, x509.ObjectIdentifier]:
    """Attribute type names for cryptography's RFC 4514 parser, in the cases people write them."""
    names: dict[str, x509.ObjectIdentifier] = {}
    for name, oid in _ATTRIBUTE_OIDS.items():
        for form in (name, name.lower(), name.capitalize()):
            names[form] = x509.ObjectIdentifier(oid)
    for name in _CAMEL:
        names[name] = x509.ObjectIdentifier(_ATTRIBUTE_OIDS[name.upper()])
    return names


_RFC4514_NAMES = _rfc4514_names()

CanonicalDN = tuple[tuple[tuple[str, str], ...], ...]


@dataclass(frozen=True)
class Identity:
    """Who a caller is: its name, roles, subject DN (RFC 4514; '' if none) and, for plants, its addresses."""

    name: str
    roles: frozenset[str]
    subject: str = ""
    addresses: tuple[tuple[str, int], ...] = field(default=())

    def has(self, *roles: str) -> bool:
        """True when the identity has any of ``roles``."""
        return any(role in self.roles for role in roles)

    @property
    def is_admin(self) -> bool:
        return ADMIN in self.roles

    def __str__(self) -> str:
        return self.name


ANONYMOUS = Identity("anonymous", ROLES, "")
"""Every caller of a server listening insecure (plain HTTP on loopback)."""


# Distinguished names --------------------------------------------------------------------------------------


def _canonical_name(name: x509.Name) -> CanonicalDN:
    return tuple(tuple(sorted((attr.oid.dotted_string, str(attr.value)) for attr in rdn)) for rdn in name.rdns)


def _split_unescaped(text: str, separator: str) -> list[str]:
    parts, current, escaped = [], [], False
    for char in text:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == separator:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if escaped:
        raise ValueError("a backslash at the end")
    parts.append("".join(current))
    return parts


def _oid(attribute: str) -> str:
    key = attribute.strip()
    if _OID.match(key):
        return key
    oid = _ATTRIBUTE_OIDS.get(key.upper())
    if oid is None:
        raise ValueError(f"unknown attribute type '{key}'")
    return oid


def _slash_form(text: str) -> CanonicalDN:
    # "/O=Grid/OU=Example/CN=Bob Smith": most general first (the certificate's order).
    rdns = []
    for part in _split_unescaped(text[1:], "/"):
        if not part:
            raise ValueError("an empty component")
        attributes = []
        for pair in _split_unescaped(part, "+") if "+" in part else [part]:
            attribute, sep, value = pair.partition("=")
            if not sep or not value:
                raise ValueError(f"'{pair}' is not TYPE=value")
            attributes.append((_oid(attribute), value))
        rdns.append(tuple(sorted(attributes)))
    return tuple(rdns)


@functools.lru_cache(maxsize=4096)
def canonical_dn(text: str) -> CanonicalDN:
    """A DN in RFC 4514 or slash form as a comparable value (ValueError naming the problem)."""
    text = text.strip()
    if not text:
        raise ValueError("an empty DN")
    if text.startswith("/"):
        return _slash_form(text)
    try:
        return _canonical_name(x509.Name.from_rfc4514_string(text, _RFC4514_NAMES))
    except ValueError as exc:
        raise ValueError(f"not an RFC 4514 DN ({exc})") from None


# The file -----------------------------------------------------------------------------------------------


def _tokens(line: str) -> list[str]:
    """The quoted DN (with its escapes kept for the DN parser) and the words after it."""
    line = line.strip()
    if not line.startswith('"'):
        raise ValueError('a line starts with the subject DN in double quotes')
    index, escaped = 1, False
    while index < len(line):
        char = line[index]
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            break
        index += 1
    else:
        raise ValueError("the DN's closing quote is missing")
    dn, rest = line[1:index], line[index + 1:]
    if rest and not rest[0].isspace():
        raise ValueError("a space must follow the DN's closing quote")
    return [dn] + rest.split()


def parse_line(line: str) -> tuple[CanonicalDN, Identity]:
    """One mapping line (ValueError naming the problem)."""
    tokens = _tokens(line)
    if len(tokens) < 3:
        raise ValueError('a line is "DN" NAME ROLES [ADDRESSES]')
    if len(tokens) > 4:
        raise ValueError(f"unexpected words after the addresses: {' '.join(tokens[4:])}")
    dn_text, name, role_text = tokens[0], tokens[1], tokens[2]
    dn = canonical_dn(dn_text)
    if not NAME.match(name):
        raise ValueError(f"'{name}' is not an identity name ([A-Za-z0-9_][A-Za-z0-9_.-], at most 64)")
    roles = frozenset(role.strip() for role in role_text.split(","))
    unknown = sorted(roles - ROLES)
    if unknown:
        raise ValueError(f"unknown role(s) {', '.join(unknown)} (roles: {', '.join(sorted(ROLES))})")
    addresses: tuple[tuple[str, int], ...] = ()
    if len(tokens) == 4:
        if PLANT not in roles:
            raise ValueError("addresses are for plant identities")
        addresses = tuple(parse_address(a) for a in tokens[3].split(",") if a)
    return dn, Identity(name=name, roles=roles, subject=dn_text, addresses=addresses)


def read_map(path: str | Path) -> dict[CanonicalDN, Identity]:
    """The mappings of an authorisation file (ConfigurationError naming the file and line)."""
    source = Path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigurationError(f"cannot read the authorisation file {source}: {reason}") from None
    mapping: dict[CanonicalDN, Identity] = {}
    problems: list[Problem] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            dn, identity = parse_line(line)
        except ValueError as exc:
            problems.append(Problem(str(exc), number))
            continue
        if dn in mapping:
            problems.append(Problem(f"this DN is mapped already (to {mapping[dn].name})", number))
            continue
        mapping[dn] = identity
    if problems:
        first = problems[0]
        raise ConfigurationError(f"authorisation file {source}, line {first.line}: {first.message}", problems)
    return mapping


class AuthorizationFile:
    """The authorisation file of a server: DN -> :class:`Identity` (see the module docstring).

    :meth:`identify` runs in the reactor thread for every request; it only
    looks in a dict. :meth:`reload` reads the file again (a bad file keeps
    the mapping in force and raises ConfigurationError).
    """

    def __init__(self, path: str | Path, server: str = "server") -> None:
        self.path = Path(path)
        self.server = server
        self._map = read_map(self.path)

    def reload(self) -> int:
        """Read the file again; returns how many DNs it maps."""
        self._map = read_map(self.path)
        log.info("authorisation file %s: %d subject(s)", self.path, len(self._map))
        return len(self._map)

    def __len__(self) -> int:
        return len(self._map)

    def identify(self, subject: str | None) -> Identity:
        """The identity of a caller whose certificate has ``subject`` (AuthenticationFailedError if none)."""
        if subject is None:
            raise AuthenticationFailedError(f"this {self.server} identifies callers by their client certificate, "
                                            "and none was presented")
        try:
            identity = self._map.get(canonical_dn(subject))
        except ValueError:
            identity = None
        if identity is None:
            raise AuthenticationFailedError(f"the certificate subject '{subject[:300]}' is not in this "
                                            f"{self.server}'s authorisation file")
        if identity.subject != subject:
            identity = Identity(identity.name, identity.roles, subject, identity.addresses)
        return identity


class Insecure:
    """The identities of an insecure (plain HTTP, loopback) listener: every caller is :data:`ANONYMOUS`."""

    server = "server"

    def identify(self, subject: str | None) -> Identity:
        return ANONYMOUS

    def reload(self) -> int:
        return 0


# The rules ------------------------------------------------------------------------------------------------


def require(caller: Identity, roles: Iterable[str], action: str) -> None:
    """NotAuthorizedError unless ``caller`` has one of ``roles`` (``action`` names what was asked)."""
    wanted = tuple(roles)
    if not caller.has(*wanted):
        have = ", ".join(sorted(caller.roles)) or "none"
        raise NotAuthorizedError(f"{caller.name} may not {action}: that needs the role "
                                 f"{' or '.join(wanted)} (it has {have})")


VM_ROLES = (USER, ADMIN)
PLANT_CALLERS = (SHOP, ADMIN)


def owner_of_new_vm(caller: Identity, requested: str | None) -> str:
    """The owner of a VM ``caller`` creates: the caller, unless an admin names another owner."""
    require(caller, VM_ROLES, "create VMs")
    if not requested or requested == caller.name:
        return caller.name
    if caller.is_admin:
        if not NAME.match(requested):
            raise NotAuthorizedError(f"'{requested[:100]}' is not an identity name")
        return requested
    raise NotAuthorizedError(f"{caller.name} may not create a VM for '{requested[:100]}': only an admin names "
                             "another owner")


def may_manage(caller: Identity, owner: str) -> bool:
    """True when ``caller`` may see and touch a VM of ``owner`` (its owner, or an admin)."""
    return caller.is_admin or (caller.has(USER) and caller.name == owner)


def visible_owner(caller: Identity) -> str | None:
    """The owner whose VMs ``caller``'s queries see: its own name, or ``None`` (all) for an admin."""
    require(caller, VM_ROLES, "query VMs")
    return None if caller.is_admin else caller.name


def may_notify(caller: Identity, plant_url: str) -> bool:
    """True when ``caller`` may tell a shop that the plant at ``plant_url`` changed."""
    if caller.is_admin:
        return True
    if not caller.has(PLANT):
        return False
    parts = urlsplit(plant_url.strip())
    try:
        host, port = (parts.hostname or "").lower(), parts.port
    except ValueError:
        return False
    return any(host == h.lower() and port == p for h, p in caller.addresses)


__all__ = [
    "ADMIN",
    "ANONYMOUS",
    "PLANT",
    "PLANT_CALLERS",
    "ROLES",
    "SHOP",
    "USER",
    "VM_ROLES",
    "AuthorizationFile",
    "Identity",
    "Insecure",
    "canonical_dn",
    "may_manage",
    "may_notify",
    "owner_of_new_vm",
    "parse_line",
    "read_map",
    "require",
    "visible_owner",
]
