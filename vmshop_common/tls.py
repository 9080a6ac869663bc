"""TLS for VMShop's servers and clients: credentials, server options, client policies, errors.

Every server and client names three PEM files: its certificate (optionally
followed by intermediate CA certificates), its private key, and the CA
bundle it trusts to sign its peers' certificates (one file, one or more CA
certificates: a site's own CA works, nothing assumes ``vmshop-ca``'s).

Rules:

* :func:`load_credentials` reads and checks the three files before any
  connection is made; each problem is a :class:`CredentialsError` whose
  message is one line naming the file and the problem: unreadable, not PEM,
  a key that does not match the certificate, a certificate that is expired
  or not valid yet, a CA file without a certificate.
* Servers (:func:`server_options`) verify every client certificate against
  their CA bundle; with ``require_client_certificate`` (the default) a
  client without one fails the handshake. TLS 1.2 is the minimum.
* Clients (:class:`ClientPolicy`, :func:`requests_tls`) verify the server's
  certificate against their CA bundle and the host name (or IP address) of
  the URL against its subject alternative names, and present their own
  certificate. There is no unverified mode: an https URL without a CA file
  is an error (:func:`require_ca`).
* The identity of a TLS peer is its certificate's subject DN, as an
  RFC 4514 string (:func:`peer_subject`); what it may do is for
  :mod:`vmshop_common.authz` to say.
* :func:`describe_tls_failure` turns the exceptions of OpenSSL, the
  ``ssl`` module and ``requests`` into one line naming the problem (unknown
  CA, expired certificate, no certificate, host name mismatch, ...).
"""

from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from zope.interface import implementer

from .errors import CredentialsError

#: Environment variables the clients read when no flag names the files.
ENV_CERT, ENV_KEY, ENV_CA = "VMSHOP_CERT", "VMSHOP_KEY", "VMSHOP_CA"


@dataclass(frozen=True)
class TlsFiles:
    """The three PEM files of a TLS endpoint (paths as given)."""

    cert: Path
    key: Path
    ca: Path


@dataclass(frozen=True)
class Credentials:
    """Checked TLS credentials: the leaf certificate, its chain, its key and the trusted CAs."""

    files: TlsFiles
    cert: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    key: PrivateKeyTypes
    ca_certs: tuple[x509.Certificate, ...]
    _twisted: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def subject(self) -> str:
        """The certificate's subject DN (RFC 4514)."""
        return self.cert.subject.rfc4514_string()


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise CredentialsError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None


def _certificates(data: bytes, path: Path, what: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise CredentialsError(f"the {what} {path} holds no PEM certificate")
    return certs


def _valid_now(cert: x509.Certificate, path: Path, what: str, now: datetime.datetime) -> None:
    if now < cert.not_valid_before_utc:
        raise CredentialsError(f"the {what} {path} ({cert.subject.rfc4514_string()}) is not valid until "
                               f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC")
    if now > cert.not_valid_after_utc:
        raise CredentialsError(f"the {what} {path} ({cert.subject.rfc4514_string()}) expired on "
                               f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC")


def _public_der(key: Any) -> bytes:
    return key.public_bytes(serialization.Encoding.DER,  # type: ignore[no-any-return]
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def load_credentials(cert: str | Path, key: str | Path, ca: str | Path, *,
                     now: datetime.datetime | None = None) -> Credentials:
    """Read and check a certificate, its key and a CA bundle (see the module's rules)."""
    files = TlsFiles(Path(cert), Path(key), Path(ca))
    now = now or datetime.datetime.now(datetime.UTC)
    chain = _certificates(_read(files.cert, "certificate"), files.cert, "certificate")
    key_data = _read(files.key, "key")
    try:
        private = serialization.load_pem_private_key(key_data, password=None)
    except TypeError:
        raise CredentialsError(f"the key {files.key} is encrypted; give an unencrypted key") from None
    except (ValueError, Exception) as exc:  # noqa: BLE001 - cryptography raises several kinds for bad data
        raise CredentialsError(f"the key {files.key} is not a PEM private key ({type(exc).__name__})") from None
    if _public_der(private.public_key()) != _public_der(chain[0].public_key()):
        raise CredentialsError(f"the key {files.key} does not match the certificate {files.cert} "
                               f"({chain[0].subject.rfc4514_string()})")
    _valid_now(chain[0], files.cert, "certificate", now)
    ca_certs = _certificates(_read(files.ca, "CA file"), files.ca, "CA file")
    return Credentials(files=files, cert=chain[0], chain=tuple(chain[1:]), key=private, ca_certs=tuple(ca_certs))


def load_ca(ca: str | Path) -> tuple[x509.Certificate, ...]:
    """The CA certificates of a bundle (CredentialsError if it holds none)."""
    path = Path(ca)
    return tuple(_certificates(_read(path, "CA file"), path, "CA file"))


def require_ca(url: str, ca: str | Path | None, what: str = "server") -> None:
    """An https ``url`` needs a CA file: raise CredentialsError when there is none (never connect unverified)."""
    if url.lower().startswith("https:") and not ca:
        raise CredentialsError(f"{url} is https: name the CA that signs the {what}'s certificate "
                               f"(--ca FILE or {ENV_CA}); VMShop never connects without verifying it")


# Twisted ------------------------------------------------------------------------------------------------


def _twisted(creds: Credentials) -> dict[str, Any]:
    """pyOpenSSL/Twisted forms of the credentials, made once."""
    cache = creds._twisted
    if not cache:
        from OpenSSL import crypto
        from twisted.internet import ssl

        pem = creds.cert.public_bytes(serialization.Encoding.PEM)
        key_pem = creds.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption())
        cache["private"] = ssl.PrivateCertificate.loadPEM(pem + key_pem)
        cache["chain"] = [crypto.X509.from_cryptography(c) for c in creds.chain]
        cache["trust"] = ssl.trustRootFromCertificates(
            [ssl.Certificate.loadPEM(c.public_bytes(serialization.Encoding.PEM)) for c in creds.ca_certs])
        cache["ca_x509"] = [crypto.X509.from_cryptography(c) for c in creds.ca_certs]
    return cache


def server_options(creds: Credentials, *, require_client_certificate: bool = True) -> Any:
    """Twisted ``CertificateOptions`` for a server with ``creds`` that verifies client certificates."""
    from twisted.internet import ssl

    parts = _twisted(creds)
    private = parts["private"]
    options: dict[str, Any] = {"privateKey": private.privateKey.original, "certificate": private.original,
                               "raiseMinimumTo": ssl.TLSVersion.TLSv1_2}
    if parts["chain"]:
        options["extraCertChain"] = parts["chain"]
    if require_client_certificate:
        options["trustRoot"] = parts["trust"]
    else:
        options.update(verify=True, caCerts=parts["ca_x509"], requireCertificate=False)
    return ssl.CertificateOptions(**options)


def _policy_interface() -> Any:
    from twisted.web.iweb import IPolicyForHTTPS

    return IPolicyForHTTPS


@implementer(_policy_interface())
class ClientPolicy:
    """The ``contextFactory`` of a Twisted ``Agent``: verify servers against ``creds``' CAs, present ``creds``.

    ``creds`` may be a :class:`Credentials` (client certificate presented)
    or a CA bundle's certificates alone (no client certificate; ``ca_file``
    names the bundle, for :func:`requests_tls`). ``credentials`` and
    ``ca_file`` stay readable, so a blocking client of the same server (a
    WSDL loaded with requests) can use the same trust.
    """

    def __init__(self, creds: Credentials | tuple[x509.Certificate, ...], ca_file: str | Path | None = None) -> None:
        from twisted.internet import ssl

        self.credentials = creds if isinstance(creds, Credentials) else None
        self.ca_file = Path(ca_file) if ca_file else (creds.files.ca if isinstance(creds, Credentials) else None)
        if isinstance(creds, Credentials):
            parts = _twisted(creds)
            self._trust, self._client = parts["trust"], parts["private"]
            self._extra = {"extraCertChain": parts["chain"]} if parts["chain"] else None
        else:
            self._trust = ssl.trustRootFromCertificates(
                [ssl.Certificate.loadPEM(c.public_bytes(serialization.Encoding.PEM)) for c in creds])
            self._client, self._extra = None, None
        self._creators: dict[tuple[bytes, int], Any] = {}

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:  # noqa: N802 - Twisted's name
        key = (hostname, port)
        creator = self._creators.get(key)
        if creator is None:
            from twisted.internet import ssl

            creator = ssl.optionsForClientTLS(hostname.decode("idna"), trustRoot=self._trust,
                                              clientCertificate=self._client, extraCertificateOptions=self._extra)
            self._creators[key] = creator
        return creator


def peer_subject(transport: Any) -> str | None:
    """The subject DN (RFC 4514) of the certificate the peer on ``transport`` presented, or ``None``."""
    get = getattr(transport, "getPeerCertificate", None)
    if get is None:
        return None
    try:
        cert = get()
    except Exception:  # noqa: BLE001 - no TLS session (yet)
        return None
    if cert is None:
        return None
    return str(cert.to_cryptography().subject.rfc4514_string())


# requests (zeep's transport) -------------------------------------------------------------------------------


def _pinned_adapter(ca: str, cert: tuple[str, str] | None) -> Any:
    from requests.adapters import HTTPAdapter

    class PinnedTLSAdapter(HTTPAdapter):
        """An adapter that always verifies with ``ca`` and presents ``cert``, whatever requests merged in.

        requests lets ``$REQUESTS_CA_BUNDLE``/``$CURL_CA_BUNDLE`` override a
        session's ``verify`` (its environment settings win over the
        session's); this adapter sends with the client's own CA and
        certificate regardless.
        """

        def send(self, request: Any, stream: bool = False, timeout: Any = None, verify: Any = True,
                 cert: Any = None, proxies: Any = None) -> Any:
            return super().send(request, stream=stream, timeout=timeout, verify=ca, cert=pinned, proxies=proxies)

    pinned = cert
    return PinnedTLSAdapter()


def requests_tls(session: Any, creds: Credentials | None, ca: str | Path | None) -> None:
    """Make a ``requests.Session`` verify https servers with ``ca`` (only) and present ``creds`` (if any)."""
    if ca is None:
        return
    cert = (os.fspath(creds.files.cert), os.fspath(creds.files.key)) if creds is not None else None
    session.verify = os.fspath(ca)
    session.cert = cert
    session.mount("https://", _pinned_adapter(os.fspath(ca), cert))


# Errors ----------------------------------------------------------------------------------------------------

_FAILURES: tuple[tuple[re.Pattern[str], str], ...] = tuple((re.compile(p, re.IGNORECASE), m) for p, m in (
    (r"alert unknown ca", "the {peer} does not trust the CA that issued your certificate"),
    (r"alert certificate expired", "the {peer} refused your certificate: it has expired"),
    (r"certificate required|peer did not return a certificate",
     "the {peer} wants a client certificate (--cert/--key, or VMSHOP_CERT/VMSHOP_KEY)"),
    (r"alert bad certificate|alert certificate unknown|alert unsupported certificate",
     "the {peer} refused your certificate"),
    (r"alert certificate revoked", "the {peer} refused your certificate: it is revoked"),
    (r"alert decrypt error|alert handshake failure", "the TLS handshake with the {peer} failed (no common "
                                                      "parameters, or a key that does not match)"),
    (r"key values mismatch", "your key does not match your certificate"),
    (r"hostname mismatch|doesn't match|does not match|IP address mismatch|no subjectAltNames",
     "the {peer}'s certificate does not name the host in the URL"),
    (r"certificate has expired", "the {peer}'s certificate has expired"),
    (r"certificate verify failed|unable to get local issuer|self.signed certificate",
     "the {peer}'s certificate is not signed by a CA in your CA file (unknown CA)"),
    (r"wrong version number|packet length too long|http request|record layer failure",
     "the {peer} does not speak TLS there (is the URL http:// rather than https://?)"),
))
# In TLS 1.3 a server checks the client's certificate after the client has finished its side of the
# handshake: if the client's first request is already on its way, the server's closing of the
# connection can overtake its alert, and the client sees only an EOF or a reset.
_REFUSED_AFTER_HANDSHAKE = re.compile(r"EOF occurred in violation of protocol|unexpected eof|connection reset|"
                                      r"Connection aborted|RemoteDisconnected", re.IGNORECASE)
_ABOUT_CLIENT = re.compile(r"your certificate")


def _chain_text(error: BaseException | str) -> str:
    seen: list[str] = []
    current: Any = error
    depth = 0
    while current is not None and depth < 8:
        seen.append(f"{type(current).__name__}: {current}")
        reasons = getattr(current, "reasons", None)  # twisted ResponseNeverReceived / ResponseFailed
        if reasons:
            seen.extend(f"{type(getattr(r, 'value', r)).__name__}: {getattr(r, 'value', r)}" for r in reasons)
        current = getattr(current, "__cause__", None) or getattr(current, "__context__", None)
        depth += 1
    return " | ".join(seen)


def describe_tls_failure(error: BaseException | str, peer: str = "server", creds: Credentials | None = None,
                         client: bool = False) -> str | None:
    """One line naming a TLS failure found in ``error`` (or its causes), or ``None`` if it is none.

    ``client``: the caller is a client that knows what it presented, ``creds`` (its own credentials, or
    ``None``: no certificate). That adds which certificate was refused, and turns a connection the server
    closed during the handshake into the likeliest reason (see :data:`_REFUSED_AFTER_HANDSHAKE`).
    """
    text = _chain_text(error)
    found = next((message.format(peer=peer) for pattern, message in _FAILURES if pattern.search(text)), None)
    closed = found is None and client and re.search(r"SSL|TLS", text) and _REFUSED_AFTER_HANDSHAKE.search(text)
    if closed and creds is None:
        found = (f"the {peer} closed the connection in the TLS handshake: it wants a client certificate "
                 "(--cert/--key, or VMSHOP_CERT/VMSHOP_KEY)")
    elif closed and creds is not None:
        if issued_by_own_ca(creds):
            found = (f"the {peer} closed the connection while checking your certificate (it does not trust "
                     "its CA, or refused it)")
        else:
            found = f"the {peer} closed the connection: it does not trust the CA that issued your certificate"
    if found is None and re.search(r"SSLError|SSLEOFError|OpenSSL|\bTLS\b|\bSSL\b", text):
        found = f"the TLS handshake with the {peer} failed"
    if found is not None and creds is not None and _ABOUT_CLIENT.search(found):
        found += f" ({creds.subject}, issued by {creds.cert.issuer.rfc4514_string()})"
    return found


def issued_by_own_ca(creds: Credentials) -> bool:
    """True when ``creds``' certificate was issued by a CA of its own CA bundle (a one-CA site)."""
    return any(ca.subject == creds.cert.issuer for ca in creds.ca_certs)


__all__ = [
    "ENV_CA",
    "ENV_CERT",
    "ENV_KEY",
    "ClientPolicy",
    "Credentials",
    "CredentialsError",
    "TlsFiles",
    "describe_tls_failure",
    "issued_by_own_ca",
    "load_ca",
    "load_credentials",
    "peer_subject",
    "require_ca",
    "requests_tls",
    "server_options",
]
