"""A Python client for the VMShop (what ``vmshop`` the command uses).

:class:`VMShopClient` is a blocking zeep client for ``wsdl/vmshop.wsdl``
(the checked-in contract by default; the server's own ``?wsdl`` with
``wsdl="remote"``) pointed at one shop URL. It has one method per operation
and answers with typed, frozen dataclasses instead of zeep objects::

    shop = VMShopClient("https://127.0.0.1:8080/", cert="alice.pem", key="alice.key", ca="ca.pem")
    made = shop.create(dag_from_file("scripts/sample_blank.xml"), owner="alice")
    print(made.vm.key, made.vm.state, made.plant, made.cost)
    for vm in shop.query("memory>=128 state=running"):
        print(vm.key, vm.address)
    shop.collect(made.vm)

Contracts:

- Per-VM methods take a :class:`VM`, an :class:`EndpointRef`, or a key
  string; a key names a VM of the shop at this client's ``url`` (the EPR's
  Address is the client's url).
- Lists are never ``None``: an empty answer is ``[]`` (zeep gives ``None``
  for an absent repeated element). Times are floats (epoch seconds, UTC) or
  ``None``.
- Errors are :class:`~vmshop_common.errors.VMShopError` subclasses with
  their stable codes: a SOAP fault becomes the project error with the same
  code (``Client.NoSuchVM`` -> :class:`~vmshop_common.errors.NoSuchVMError`,
  unknown codes the base class with that code); no answer from the URL
  (refused, timed out, not HTTP, not SOAP) is :class:`ShopUnreachableError`
  (``Client.ShopUnreachable``); a request zeep cannot encode (text XML
  cannot carry, a missing argument) is :class:`RequestInvalidError`
  (``Client.RequestInvalid``). Nothing from zeep or requests escapes.
- One client may be used from several threads at once: each thread gets
  its own HTTP session (the parsed WSDL is shared).
- ``timeout`` (seconds) bounds each HTTP operation (connect, and the wait
  for the reply); ``createVM`` may take minutes, hence the long default.
- TLS: the client presents its certificate (``cert``/``key``, else
  ``$VMSHOP_CERT``/``$VMSHOP_KEY``) and verifies the shop's against the CA
  bundle (``ca``, else ``$VMSHOP_CA``). An https URL without a CA is an
  error, never an unverified connection. Unusable credentials (unreadable,
  expired, a key that does not match) raise
  :class:`~vmshop_common.errors.CredentialsError` (``Client.BadCredentials``)
  before anything is sent; a handshake the shop refuses (unknown CA,
  expired) raises it too, with one line naming the problem. A certificate
  whose subject the shop does not map is the shop's fault
  ``Client.AuthenticationFailed``.
- Without a certificate, a shop that takes them may be given a user name
  and password (``username``/``password``, else ``$VMSHOP_USER`` and
  ``$VMSHOP_PASSWORD``): every request then carries a WS-Security
  UsernameToken with a PasswordDigest, a fresh nonce and its creation time
  (zeep's ``wsse``); the password itself is never sent.
"""

from __future__ import annotations

import math
import os
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests
import zeep
import zeep.exceptions
from zeep.wsdl import Document
from zeep.wsse.username import UsernameToken

from vmshop_common import contracts
from vmshop_common.errors import CredentialsError, DocumentTooLargeError, Problem, VMShopError, XMLSyntaxError
from vmshop_common.soap.faults import from_fault
from vmshop_common.tls import (
    ENV_CA,
    ENV_CERT,
    ENV_KEY,
    Credentials,
    describe_tls_failure,
    load_ca,
    load_credentials,
    requests_tls,
    require_ca,
)
from vmshop_common.xmlload import MAX_BYTES

DEFAULT_URL = "https://127.0.0.1:8080/"
ENV_USER, ENV_PASSWORD = "VMSHOP_USER", "VMSHOP_PASSWORD"
TNS = "urn:vmshop:vmshop:1"
BINDING = f"{{{TNS}}}VMShop"
DEFAULT_TIMEOUT = 600.0
#: Largest DAG file :func:`dag_from_file` reads (the shop's limit too).
MAX_DAG_BYTES = MAX_BYTES

# Characters XML 1.0 cannot carry (so neither can a SOAP body).
_XML_INVALID = re.compile("[^\u0009\u000a\u000d\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_ERRNO = re.compile(r"\[Errno -?\d+\] ([^'\")]+)")


class ShopUnreachableError(VMShopError):
    """Nothing at the shop URL answered as a VMShop (refused, timed out, not SOAP); the message names the url."""

    CODE = "Client.ShopUnreachable"


class RequestInvalidError(VMShopError):
    """The request could not be encoded (before anything was sent)."""

    CODE = "Client.RequestInvalid"


def wsdl_path() -> Path:
    """The published ``vmshop.wsdl`` (``VMSHOP_WSDL_DIR`` overrides its directory: :mod:`vmshop_common.contracts`)."""
    return contracts.wsdl_path("vmshop.wsdl")


def check_xml_text(text: str, what: str = "DAG") -> None:
    """Raise :class:`XMLSyntaxError` (naming the line) if ``text`` holds a character XML cannot carry."""
    bad = _XML_INVALID.search(text)
    if bad is not None:
        line = text.count("\n", 0, bad.start()) + 1
        raise XMLSyntaxError(f"{what} holds a character XML cannot carry (U+{ord(bad.group()):04X})",
                             [Problem(f"character U+{ord(bad.group()):04X} is not allowed in XML", line)])


def dag_from_file(path: str | Path) -> str:
    """The text of the DAG file at ``path``, ready for :meth:`VMShopClient.create` and friends.

    Reads at most :data:`MAX_DAG_BYTES` (+1) bytes. Raises ``OSError`` (and
    ``ValueError`` for a path with a NUL byte) if the file cannot be read,
    :class:`DocumentTooLargeError` if it is larger than the limit, and
    :class:`XMLSyntaxError` if it is not UTF-8 or holds characters XML cannot
    carry. The DAG itself is not validated here: the shop does that (and
    ``vmshop validate`` does it offline).
    """
    with open(path, "rb") as handle:
        data = handle.read(MAX_DAG_BYTES + 1)
    if len(data) > MAX_DAG_BYTES:
        raise DocumentTooLargeError(f"{path} is larger than {MAX_DAG_BYTES} bytes, the limit for a DAG")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise XMLSyntaxError(f"{path} must be encoded in UTF-8", [Problem("not UTF-8", line)]) from None
    check_xml_text(text, str(path))
    return text


# Results ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EndpointRef:
    """A VM's identity: the shop's address and the VM's key there."""

    address: str
    key: str


@dataclass(frozen=True)
class VM:
    """A VM as the shop's registry has it (``VMInfo``). ``None``: no value (yet)."""

    epr: EndpointRef
    vm_id: str
    owner: str
    state: str
    plant: str | None
    plant_vm_id: str | None
    image: str | None
    memory: int | None  # MiB
    vcpus: int | None
    disk: int | None  # GiB (the DAG's hardware unit)
    arch: str | None
    address: str | None
    host_port: int | None
    created: float | None
    updated: float | None
    termination: float | None
    collected: float | None
    cost: float | None
    error: str | None
    steps: list[str]
    attributes: dict[str, str]

    @property
    def key(self) -> str:
        """The VM's key (what per-VM calls and the CLI take)."""
        return self.epr.key


@dataclass(frozen=True)
class CostItem:
    """One line of a bid's cost: ``label`` takes ``seconds``; ``source`` says where the figure came from."""

    label: str
    seconds: float | None
    source: str | None
    node: str | None


@dataclass(frozen=True)
class Bid:
    """One plant's answer to a call for bids. ``status``: bid, declined, timeout, fault, down."""

    plant: str
    status: str
    cost: float | None
    image: str | None
    reason: str | None
    seconds: float | None
    items: list[CostItem]


@dataclass(frozen=True)
class Estimate:
    """The best bid (``plant`` is ``None`` when no plant bid) and every plant's answer."""

    plant: str | None
    cost: float | None
    image: str | None
    items: list[CostItem]
    remaining: list[str]
    bids: list[Bid]


@dataclass(frozen=True)
class ActionRun:
    """The result of one configuration action run inside the guest."""

    node: str
    status: int | None
    ok: bool
    timed_out: bool
    seconds: float | None
    output: str


@dataclass(frozen=True)
class CreateOutcome:
    """The VM made, the plant that made it at what cost, every bid, the actions' runs and the attempts."""

    vm: VM
    plant: str | None
    cost: float | None
    bids: list[Bid]
    runs: list[ActionRun]
    attempts: list[str]


@dataclass(frozen=True)
class PlantHealth:
    """A plant the shop knows, as last checked."""

    address: str
    up: bool
    name: str | None
    backend: str | None
    accelerator: str | None
    running_vms: int | None
    capacity_vms: int | None
    free_memory: int | None  # MiB
    images: list[str]
    last_error: str | None
    last_seen: float | None


@dataclass(frozen=True)
class PublishedImage:
    """An image a publish made: its name and plant, its owner, whether it is public, its base, the steps it
    embodies and its disk's bytes."""

    name: str
    plant: str | None
    owner: str | None
    public: bool
    base: str | None
    steps: list[str]
    size: int | None
    with_state: bool = False


VMRef = VM | EndpointRef | str


# zeep objects -> results ------------------------------------------------------------------------------------


def _get(obj: Any, name: str) -> Any:
    return None if obj is None else getattr(obj, name, None)


def _str(obj: Any, name: str) -> str | None:
    value = _get(obj, name)
    return None if value is None else str(value)


def _int(obj: Any, name: str) -> int | None:
    value = _get(obj, name)
    return None if value is None else int(value)


def _float(obj: Any, name: str) -> float | None:
    value = _get(obj, name)
    return None if value is None else float(value)


def _list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [item for item in value if item is not None]
    return [value]


def _strings(value: Any) -> list[str]:
    return [str(item) for item in _list(value)]


def _cost_item(obj: Any) -> CostItem:
    return CostItem(label=_str(obj, "label") or "", seconds=_float(obj, "seconds"), source=_str(obj, "source"),
                    node=_str(obj, "node"))


def _bid(obj: Any) -> Bid:
    return Bid(plant=_str(obj, "plant") or "", status=_str(obj, "status") or "", cost=_float(obj, "cost"),
               image=_str(obj, "image"), reason=_str(obj, "reason"), seconds=_float(obj, "seconds"),
               items=[_cost_item(i) for i in _list(_get(obj, "items"))])


def _run(obj: Any) -> ActionRun:
    return ActionRun(node=_str(obj, "node") or "", status=_int(obj, "status"), ok=bool(_get(obj, "ok")),
                     timed_out=bool(_get(obj, "timed_out")), seconds=_float(obj, "seconds"),
                     output=_str(obj, "output") or "")


def _plant(obj: Any) -> PlantHealth:
    return PlantHealth(address=_str(obj, "address") or "", up=bool(_get(obj, "up")), name=_str(obj, "name"),
                       backend=_str(obj, "backend"), accelerator=_str(obj, "accelerator"),
                       running_vms=_int(obj, "running_vms"), capacity_vms=_int(obj, "capacity_vms"),
                       free_memory=_int(obj, "free_memory"), images=_strings(_get(obj, "images")),
                       last_error=_str(obj, "last_error"), last_seen=_float(obj, "last_seen"))


# The client ----------------------------------------------------------------------------------------------


def _short_reason(exc: BaseException) -> str:
    """'Connection refused' out of requests' long nested message."""
    text = str(exc)
    found = _ERRNO.search(text)
    if found:
        return found.group(1).strip().rstrip(".,")
    if "Name or service not known" in text or "nodename nor servname" in text:
        return "unknown host"
    return type(exc).__name__


class VMShopClient:
    """A blocking client of one VMShop (see the module docstring for the contracts).

    :param url: the shop's SOAP endpoint (``https://host:port/``).
    :param cert: the client's certificate (PEM; default ``$VMSHOP_CERT``).
    :param key: its private key (PEM; default ``$VMSHOP_KEY``).
    :param ca: the CA bundle that signs the shop's certificate (PEM; default
        ``$VMSHOP_CA``); required for an https URL.
    :param wsdl: the WSDL to build the client from: ``None`` for the
        checked-in ``wsdl/vmshop.wsdl`` (no network access needed), a path,
        or ``"remote"`` for the shop's own ``url?wsdl`` (fetched now; a shop
        that does not answer raises :class:`ShopUnreachableError`).
    :param timeout: seconds allowed for each HTTP operation (> 0).
    :raises ValueError: ``url`` is not an http(s) URL or ``timeout`` is not positive.
    :raises CredentialsError: an https URL without a CA, or unusable credentials.
    """

    def __init__(self, url: str = DEFAULT_URL, *, wsdl: str | Path | None = None,
                 timeout: float = DEFAULT_TIMEOUT, cert: str | Path | None = None, key: str | Path | None = None,
                 ca: str | Path | None = None, username: str | None = None, password: str | None = None) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"the shop URL must be https://host:port/, not {url!r}")
        if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
            raise ValueError(f"the timeout must be a positive number of seconds, not {timeout!r}")
        self.url = url
        self.timeout = float(timeout)
        cert = cert or os.environ.get(ENV_CERT) or None
        key = key or os.environ.get(ENV_KEY) or None
        ca = ca or os.environ.get(ENV_CA) or None
        require_ca(url, ca, "shop")
        if bool(cert) != bool(key):
            raise CredentialsError("a client certificate needs its key, and a key its certificate: give both "
                                   f"--cert and --key (or {ENV_CERT} and {ENV_KEY})")
        self._ca = Path(ca) if ca else None
        username = username or os.environ.get(ENV_USER) or None
        password = password if password is not None else os.environ.get(ENV_PASSWORD)
        if username and password is None:
            raise CredentialsError(f"a user name needs its password (in {ENV_PASSWORD})")
        self._user: tuple[str, str] | None = (username, password or "") if username else None
        self._creds: Credentials | None = None
        if cert and key and ca:
            self._creds = load_credentials(cert, key, ca)
        elif ca:
            load_ca(ca)
        self._local = threading.local()
        self._clients: list[zeep.Client] = []
        self._lock = threading.Lock()
        self._settings = zeep.Settings(strict=True, forbid_dtd=True, forbid_entities=True)
        if wsdl == "remote":
            location = url + "?wsdl"
            self._document = self._guard(lambda: self._load(location), what=f"the WSDL at {location}")
        else:
            self._document = self._load(str(wsdl or wsdl_path()))

    def _load(self, location: str) -> Document:
        # zeep's annotation wants a Transport class; it takes (and needs) an instance.
        return Document(location, self._transport(), settings=self._settings)  # type: ignore[arg-type]

    def _transport(self) -> zeep.Transport:
        transport = zeep.Transport(timeout=self.timeout, operation_timeout=self.timeout)
        requests_tls(transport.session, self._creds, self._ca)
        return transport

    @property
    def subject(self) -> str | None:
        """The subject DN of the client certificate this client presents, if any."""
        return self._creds.subject if self._creds is not None else None

    def copy(self, *, timeout: float | None = None) -> VMShopClient:
        """A client of the same shop sharing the parsed WSDL (e.g. with a shorter ``timeout`` for polling)."""
        twin = VMShopClient.__new__(VMShopClient)
        twin.url = self.url
        twin.timeout = self.timeout if timeout is None else float(timeout)
        if not (math.isfinite(twin.timeout) and twin.timeout > 0):
            raise ValueError(f"the timeout must be a positive number of seconds, not {timeout!r}")
        twin._local = threading.local()
        twin._clients = []
        twin._lock = threading.Lock()
        twin._settings = self._settings
        twin._document = self._document
        twin._creds = self._creds
        twin._ca = self._ca
        twin._user = self._user
        return twin

    def close(self) -> None:
        """Close every thread's HTTP session (the client may not be used afterwards)."""
        with self._lock:
            clients, self._clients = self._clients, []
        for client in clients:
            client.transport.session.close()

    def __enter__(self) -> VMShopClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Plumbing ------------------------------------------------------------------------------------------

    def _proxy(self) -> Any:
        proxy = getattr(self._local, "proxy", None)
        if proxy is None:
            wsse = UsernameToken(*self._user, use_digest=True) if self._user is not None else None
            client = zeep.Client(self._document, transport=self._transport(), settings=self._settings, wsse=wsse)
            proxy = client.create_service(BINDING, self.url)
            self._local.proxy = proxy
            with self._lock:
                self._clients.append(client)
        return proxy

    def _guard(self, work: Any, what: str) -> Any:
        """Run ``work()`` with every zeep/requests failure turned into the project's errors."""
        try:
            return work()
        except zeep.exceptions.Fault as fault:
            raise from_fault(fault) from None
        except requests.exceptions.Timeout:
            raise ShopUnreachableError(f"the shop at {self.url} gave no answer within {self.timeout:g} s "
                                       f"({what})") from None
        except requests.exceptions.ConnectionError as exc:
            https = self.url.lower().startswith("https:")
            tls = describe_tls_failure(exc, "shop", self._creds, client=True) if https else None
            if tls is not None:
                raise CredentialsError(f"TLS with the shop at {self.url} failed: {tls}") from None
            hint = ""
            if self.url.lower().startswith("http:") and re.search(r"RemoteDisconnected|aborted", str(exc)):
                hint = " (the shop closed the connection: does it speak https?)"
            raise ShopUnreachableError(f"cannot reach the shop at {self.url}: {_short_reason(exc)}{hint}") from None
        except requests.exceptions.RequestException as exc:
            raise ShopUnreachableError(f"cannot reach the shop at {self.url}: {type(exc).__name__}: "
                                       f"{exc}") from None
        except zeep.exceptions.TransportError as exc:
            raise ShopUnreachableError(f"{self.url} answered HTTP {exc.status_code} without a SOAP reply: "
                                       "is it a VMShop?") from None
        except zeep.exceptions.XMLSyntaxError:
            raise ShopUnreachableError(f"{self.url} did not answer in SOAP ({what}): is it a VMShop?") from None
        except (zeep.exceptions.ValidationError, ValueError, TypeError) as exc:
            raise RequestInvalidError(f"the {what} request could not be encoded: {exc}") from None
        except zeep.exceptions.Error as exc:
            raise ShopUnreachableError(f"{self.url} did not answer as a VMShop ({what}): "
                                       f"{type(exc).__name__}: {exc}") from None

    def _call(self, operation: str, **arguments: Any) -> Any:
        return self._guard(lambda: getattr(self._proxy(), operation)(**arguments), operation)

    def _epr(self, vm: VMRef) -> dict[str, str]:
        if isinstance(vm, VM):
            vm = vm.epr
        if isinstance(vm, EndpointRef):
            return {"Address": vm.address, "VMKey": vm.key}
        if isinstance(vm, str):
            return {"Address": self.url, "VMKey": vm}
        raise TypeError(f"a VM is named by a VM, an EndpointRef or a key string, not {type(vm).__name__}")

    def _vm(self, obj: Any) -> VM:
        if obj is None:
            raise ShopUnreachableError(f"{self.url} answered without a VM: is it a VMShop?")
        epr = _get(obj, "epr")
        vm_id = _str(obj, "vm_id") or ""
        attributes = {str(_get(a, "name")): _str(a, "value") or "" for a in _list(_get(obj, "attributes"))}
        return VM(
            epr=EndpointRef(address=_str(epr, "Address") or self.url, key=_str(epr, "VMKey") or vm_id),
            vm_id=vm_id, owner=_str(obj, "owner") or "", state=_str(obj, "state") or "",
            plant=_str(obj, "plant"), plant_vm_id=_str(obj, "plant_vm_id"), image=_str(obj, "image"),
            memory=_int(obj, "memory"), vcpus=_int(obj, "vcpus"), disk=_int(obj, "disk"), arch=_str(obj, "arch"),
            address=_str(obj, "address"), host_port=_int(obj, "host_port"), created=_float(obj, "created"),
            updated=_float(obj, "updated"), termination=_float(obj, "termination"),
            collected=_float(obj, "collected"), cost=_float(obj, "cost"), error=_str(obj, "error"),
            steps=_strings(_get(obj, "steps")), attributes=attributes)

    def _vms(self, objs: Iterable[Any]) -> list[VM]:
        return [self._vm(obj) for obj in objs]

    # The operations ----------------------------------------------------------------------------------------

    def create(self, dag_xml: str, owner: str = "", termination_time: float | None = None,
               key: str | None = None) -> CreateOutcome:
        """createVM: make a VM from the DAG on the plant that bids least (the shop re-bids on failure).

        ``termination_time`` (epoch seconds) sets the lease; ``key`` chooses the VM's key (the shop
        registers the VM under it as soon as it starts placing it, so :meth:`describe` can follow it).
        """
        check_xml_text(dag_xml)
        made = self._call("createVM", dag=dag_xml, owner=owner or None, termination_time=termination_time,
                          vm_key=key or None)
        if made is None:
            raise ShopUnreachableError(f"{self.url} answered createVM without a result: is it a VMShop?")
        return CreateOutcome(vm=self._vm(_get(made, "vm")), plant=_str(made, "plant"), cost=_float(made, "cost"),
                             bids=[_bid(b) for b in _list(_get(made, "bids"))],
                             runs=[_run(r) for r in _list(_get(made, "runs"))],
                             attempts=_strings(_get(made, "attempts")))

    def estimate(self, dag_xml: str) -> Estimate:
        """estimateCost: every plant's bid for the DAG and the best one (nothing is created)."""
        check_xml_text(dag_xml)
        got = self._call("estimateCost", dag=dag_xml)
        return Estimate(plant=_str(got, "plant") or None, cost=_float(got, "cost"), image=_str(got, "image"),
                        items=[_cost_item(i) for i in _list(_get(got, "items"))],
                        remaining=_strings(_get(got, "remaining")),
                        bids=[_bid(b) for b in _list(_get(got, "bids"))])

    def configure(self, vm: VMRef, dag_xml: str) -> list[ActionRun]:
        """configureVM: run the DAG's actions inside the VM, in DAG order; their results."""
        check_xml_text(dag_xml)
        return [_run(r) for r in _list(self._call("configureVM", vm=self._epr(vm), dag=dag_xml))]

    def query(self, text: str, limit: int | None = None) -> list[VM]:
        """queryVMs: the VMs matching every term (see :mod:`vmshop_service.query`), oldest first."""
        return self._vms(_list(self._call("queryVMs", query=text, limit=limit)))

    def describe(self, vm: VMRef) -> VM:
        """describeVM: the VM's registry entry (``Client.NoSuchVM`` if the shop has none under that key)."""
        return self._vm(self._call("describeVM", vm=self._epr(vm)))

    def collect(self, vm: VMRef) -> VM:
        """collectVM: destroy the VM on its plant; the record stays (collecting twice is fine)."""
        return self._vm(self._call("collectVM", vm=self._epr(vm)))

    def destroy(self, vm: VMRef) -> VM:
        """WSRF Destroy: collect the VM now."""
        return self._vm(self._call("destroy", vm=self._epr(vm)))

    def set_termination_time(self, vm: VMRef, t: float | None) -> VM:
        """WSRF SetTerminationTime: the VM is collected once ``t`` (epoch seconds) passes; ``None``: never."""
        if t is not None and not math.isfinite(t):
            raise RequestInvalidError(f"a termination time is a finite number of seconds, not {t!r}")
        return self._vm(self._call("setTerminationTime", vm=self._epr(vm), termination_time=t))

    def resource_document(self, vm: VMRef) -> str:
        """The VM's resource-properties document (XML, namespace ``urn:vmshop:vm-resource:1``)."""
        return str(self._call("getResourcePropertyDocument", vm=self._epr(vm)) or "")

    def get_resource_property(self, vm: VMRef, name: str) -> list[str]:
        """WSRF GetResourceProperty: each element named ``name`` (e.g. ``rp:Memory``) as XML."""
        return _strings(self._call("getResourceProperty", vm=self._epr(vm), name=name))

    def query_resource_properties(self, vm: VMRef, xpath: str) -> list[str]:
        """WSRF QueryResourceProperties: an XPath 1.0 expression over the document (prefix ``rp``)."""
        return _strings(self._call("queryResourceProperties", vm=self._epr(vm), xpath=xpath))

    def publish(self, vm: VMRef, image: str, public: bool = False, with_state: bool = False) -> PublishedImage:
        """publishVM: make the VM's disk a new cached image named ``image`` on its plant (its changes over its
        base, the steps it ran as the image's DAG); ``public`` (admins only): it serves every owner;
        ``with_state``: it carries the guest's running state too (its clones resume instead of booting)."""
        got = self._call("publishVM", vm=self._epr(vm), image=image, is_public=public, with_state=with_state)
        return PublishedImage(name=_str(got, "name") or image, plant=_str(got, "plant"), owner=_str(got, "owner"),
                              public=bool(_get(got, "is_public")), base=_str(got, "base"),
                              steps=_strings(_get(got, "steps")), size=_int(got, "size"),
                              with_state=bool(_get(got, "with_state")))

    def unpublish(self, image: str) -> list[str]:
        """unpublishImage: remove the caller's published image from every plant that has it; those plants."""
        return _strings(self._call("unpublishImage", image=image))

    def set_image_public(self, image: str, public: bool) -> list[str]:
        """setImagePublic (admins): make the published image serve every owner, or its owner only again; the
        plants that have it."""
        return _strings(self._call("setImagePublic", image=image, is_public=public))

    def set_image_movable(self, image: str, movable: bool) -> list[str]:
        """setImageMovable (the image's owner, or an admin): let the private image move between the site's plants
        that agree, for its owner's requests only, or stop it; the plants that have it."""
        return _strings(self._call("setImageMovable", image=image, is_movable=movable))

    def plants(self) -> list[PlantHealth]:
        """listPlants: the plants the shop knows, with their health."""
        return [_plant(p) for p in _list(self._call("listPlants"))]

    def reload_plants(self) -> list[PlantHealth]:
        """reloadPlants: the shop re-reads its plant list and checks each plant."""
        return [_plant(p) for p in _list(self._call("reloadPlants"))]

    def plant_changed(self, plant_url: str) -> bool:
        """plantChanged: tell the shop that the plant at ``plant_url`` has changes (plants call this);
        NoSuchPlantError if it is not one of the shop's plants."""
        return bool(self._call("plantChanged", plant=plant_url))


__all__ = [
    "DEFAULT_URL",
    "MAX_DAG_BYTES",
    "ActionRun",
    "Bid",
    "CostItem",
    "CreateOutcome",
    "EndpointRef",
    "Estimate",
    "PlantHealth",
    "PublishedImage",
    "RequestInvalidError",
    "ShopUnreachableError",
    "VM",
    "VMRef",
    "VMShopClient",
    "check_xml_text",
    "dag_from_file",
    "wsdl_path",
]
