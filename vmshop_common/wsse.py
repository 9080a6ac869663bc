"""A second way in for users who cannot hold certificates: WS-Security UsernameToken with PasswordDigest.

A shop configured with ``<wsse users="FILE" window="300"/>`` accepts TLS
clients without a certificate, and such a request must carry, in its SOAP
header, an OASIS WSS 1.0 ``wsse:Security/wsse:UsernameToken`` with
``wsse:Username``, ``wsse:Password`` of type ``#PasswordDigest``,
``wsse:Nonce`` (Base64) and ``wsu:Created`` (what zeep's
``zeep.wsse.username.UsernameToken(name, password, use_digest=True)``
sends).

Rules:

* Only over TLS, and only when the client presented no certificate: a
  certificate, when there is one, decides alone (the token is not read).
* The digest is ``Base64(SHA-1(nonce + created + password))``, compared in
  constant time. ``#PasswordText`` is refused: the password never travels.
* ``Created`` must be within ``window`` seconds of the server's clock (either
  way); a nonce (per user) seen within the last ``2 * window`` seconds is a
  replay and is refused. The nonce cache is this process's (several shops
  on one registry, issue 13, will need a shared one).
* The users file, one user a line (``#`` comments)::

      # name   roles       password
      alice    user        correct-horse-battery-staple

  It must not be readable by group or others (PasswordDigest needs the
  server to know the password); it is re-read on SIGHUP, a bad file keeping
  the old users in force. The identity is the user's name and roles; the
  same rules as for certificate identities apply (:mod:`vmshop_common.authz`).
* Every refusal is ``Client.AuthenticationFailed``. An unknown user and a
  wrong password get the same words; a stale ``Created``, a replayed nonce
  or a malformed token say so (they reveal nothing about the users).
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import hmac
import logging
import stat
import time
from collections.abc import Callable
from pathlib import Path

from lxml import etree

from .authz import NAME, ROLES, Identity
from .errors import AuthenticationFailedError, ConfigurationError, Problem

log = logging.getLogger(__name__)

WSSE = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-secext-1.0.xsd"
WSU = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-utility-1.0.xsd"
SOAP_ENV = "http://schemas.xmlsoap.org/soap/envelope/"
PASSWORD_DIGEST = ("http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-username-token-profile-1.0"
                   "#PasswordDigest")
DEFAULT_WINDOW = 300.0
#: Most nonces remembered at once (older ones are forgotten first; a replay must then still be fresh).
MAX_NONCES = 200_000

_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False,
                          remove_comments=True)


def digest(nonce: bytes, created: str, password: str) -> str:
    """The PasswordDigest of a UsernameToken: Base64(SHA-1(nonce + created + password))."""
    return base64.b64encode(hashlib.sha1(nonce + created.encode() + password.encode()).digest()).decode()


def read_users(path: str | Path) -> dict[str, tuple[str, frozenset[str]]]:
    """name -> (password, roles) from a users file (ConfigurationError naming the file and line)."""
    source = Path(path)
    try:
        mode = stat.S_IMODE(source.stat().st_mode)
        text = source.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigurationError(f"cannot read the users file {source}: {reason}") from None
    if mode & 0o077:
        raise ConfigurationError(f"the users file {source} is readable by others (mode {mode:o}): chmod 600 it")
    users: dict[str, tuple[str, frozenset[str]]] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(None, 2)
        problem = None
        if len(parts) != 3:
            problem = "a line is NAME ROLES PASSWORD"
        elif not NAME.match(parts[0]):
            problem = f"'{parts[0]}' is not an identity name"
        elif not set(parts[1].split(",")) <= ROLES:
            problem = f"unknown role(s) in '{parts[1]}'"
        elif parts[0] in users:
            problem = f"{parts[0]} is listed already"
        if problem is not None:
            raise ConfigurationError(f"users file {source}, line {number}: {problem}", [Problem(problem, number)])
        users[parts[0]] = (parts[2], frozenset(parts[1].split(",")))
    return users


def _created(text: str) -> float:
    value = text.strip()
    if value.endswith(("Z", "z")):
        value = value[:-1] + "+00:00"
    moment = datetime.datetime.fromisoformat(value)
    if moment.tzinfo is None:
        raise ValueError("no time zone")
    return moment.timestamp()


class UsernameTokens:
    """Checks UsernameTokens against a users file (see the module docstring). Runs in the reactor thread."""

    def __init__(self, users_file: str | Path, window: float = DEFAULT_WINDOW,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = Path(users_file)
        self.window = float(window)
        self.clock = clock
        self._users = read_users(self.path)
        self._nonces: dict[tuple[str, bytes], float] = {}  # (user, nonce) -> when it may be forgotten

    def reload(self) -> int:
        """Read the users file again; returns how many users it lists (ConfigurationError keeps the old)."""
        self._users = read_users(self.path)
        log.info("users file %s: %d user(s)", self.path, len(self._users))
        return len(self._users)

    def identify(self, body: bytes) -> Identity | None:
        """The identity a request's UsernameToken proves; ``None`` when the request carries none.

        Raises AuthenticationFailedError for a token that does not check.
        """
        if b"UsernameToken" not in body:
            return None
        try:
            root = etree.fromstring(body, _PARSER)
        except etree.XMLSyntaxError:
            return None  # not XML: spyne says so
        token = root.find(f"{{{SOAP_ENV}}}Header/{{{WSSE}}}Security/{{{WSSE}}}UsernameToken")
        if token is None:
            return None
        name = (token.findtext(f"{{{WSSE}}}Username") or "").strip()
        password = token.find(f"{{{WSSE}}}Password")
        nonce_text = token.findtext(f"{{{WSSE}}}Nonce") or ""
        created = token.findtext(f"{{{WSU}}}Created") or ""
        if password is None or password.get("Type") != PASSWORD_DIGEST:
            raise AuthenticationFailedError("a UsernameToken must carry a PasswordDigest (the password itself "
                                            "is never accepted)")
        try:
            nonce = base64.b64decode(nonce_text.strip(), validate=True)
            when = _created(created)
        except (binascii.Error, ValueError):
            raise AuthenticationFailedError("the UsernameToken's Nonce or Created is malformed") from None
        if not 8 <= len(nonce) <= 64:
            raise AuthenticationFailedError("the UsernameToken's Nonce must be 8 to 64 bytes")
        now = self.clock()
        if abs(now - when) > self.window:
            raise AuthenticationFailedError(f"the UsernameToken was created {created[:40]!r}, more than "
                                            f"{self.window:g} s from the server's time")
        user = self._users.get(name)
        expected = digest(nonce, created, user[0]) if user is not None else digest(nonce, created, "")
        if user is None or not hmac.compare_digest(expected.encode(), (password.text or "").strip().encode()):
            raise AuthenticationFailedError("the UsernameToken's user name or password is wrong")
        self._forget_old(now)
        key = (name, nonce)
        if key in self._nonces:
            raise AuthenticationFailedError("the UsernameToken's nonce was used already (a replay)")
        self._nonces[key] = now + 2 * self.window
        return Identity(name=name, roles=user[1], subject="")

    def _forget_old(self, now: float) -> None:
        if len(self._nonces) > MAX_NONCES // 2:
            for key in [k for k, until in self._nonces.items() if until < now]:
                del self._nonces[key]
            while len(self._nonces) > MAX_NONCES:
                del self._nonces[next(iter(self._nonces))]


__all__ = ["DEFAULT_WINDOW", "PASSWORD_DIGEST", "UsernameTokens", "digest", "read_users"]
