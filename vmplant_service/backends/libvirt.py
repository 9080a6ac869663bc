"""The libvirt backend: one persistent libvirt domain ``vmshop-<vm id>`` per VM.

The plant talks to a libvirt daemon at ``uri`` (from its configuration), so
the same code drives a local QEMU (``qemu:///system``, what runs here, TCG
only), a remote KVM host (``qemu+ssh://root@host/system``) or, by the XML
it emits (:mod:`.domainxml`), libvirt's Xen and ESX drivers. The domain is
defined from the generated XML and started; ``stop`` presses the ACPI power
button, then destroys after the timeout; ``destroy`` destroys and
undefines. libvirt's domain states become :class:`VMState` through
:data:`LIBVIRT_STATES`, here and nowhere else.

What the guest gets (qemu/kvm flavor): direct kernel boot, the plant's
overlay as a virtio qcow2 disk, the configuration share as a 9p
``<filesystem>`` (tag ``vmshop``; ``vmdata`` read-only), the serial
console in ``run_dir/console.log``, and the NICs as QEMU arguments passed
through ``<qemu:commandline>`` — a 'user' NIC with ``restrict=on`` and a
forward from 127.0.0.1, a 'segment' NIC on the plant's VDE switch —
because libvirt 9.0 has no element for either (see :mod:`.domainxml`).
QEMU runs as root with no relabelling (``dac_label``): the channel share
must stay writable for the guest and the cached image must never be
chowned. Files of a VM in ``run_dir``: ``console.log`` only. libvirt keeps
the definition (``/etc/libvirt/qemu/vmshop-<id>.xml``) while the VM is
stopped, and its own QEMU log (``/var/log/libvirt/qemu/vmshop-<id>.log``
on this host): ``destroy`` removes both. With a remote ``uri`` the paths in
the spec (overlay, kernel, shares, console) are the remote host's: the
plant's state directory must be there under the same path (shared storage).

Xen and ESX: no such host exists where this was written. Their domain XML
is checked against libvirt's schema in the tests, ``start`` for ``xen`` is
the same define-and-create path as for QEMU but has never run against a
Xen host, and ``esx`` cannot start anything (its disk must be a VMDK in a
datastore, which the plant cannot put there). ``capabilities().reason``
says so for those flavors.

Options (strings, from the plant's configuration):

- ``uri``: the libvirt connection; default ``qemu:///system`` as root,
  ``qemu:///session`` otherwise (``xen:///system`` for ``flavor=xen``;
  ``esx`` needs one, e.g. ``esx://host/?no_verify=1``). As root,
  ``qemu:///session`` is the same daemon as ``qemu:///system``.
- ``flavor``: ``qemu`` (default), ``kvm``, ``xen`` or ``esx``;
- ``domain_type``: ``qemu`` (TCG; the default), ``kvm``, or ``auto``: KVM
  only if libvirt offers it *and* a probe boot of the image's kernel under
  KVM reaches user space (``probe_timeout`` seconds, once per kernel and
  machine per backend instance; a remote URI is trusted without a probe);
- ``daemon``: ``external`` (default: the host runs libvirtd) or ``spawn``:
  for ``qemu:///system`` on this host, if no daemon answers, start
  ``virtlogd`` and ``libvirtd`` with ``--timeout daemon_timeout`` (default
  120 s, as Debian's socket-activated units do): they exit by themselves
  once no client is connected and no domain runs. Needs what
  ``scripts/setup_libvirt.sh`` sets up;
- ``dac_label``: the ``user:group`` QEMU runs as, default ``+0:+0`` for
  ``qemu:///system``; ``daemon`` leaves it to libvirtd (its ``qemu.conf``
  user, which relabels files);
- ``disk_cache`` (default ``unsafe``), ``max_vcpus``, ``memory_fraction``
  (0.75), ``keepalive`` (seconds, 5: a daemon that stops answering is
  given up after about four times that), ``start_timeout`` (30: how long
  a spawned daemon may take to answer);
- ``xen_mode`` (``pv``/``hvm``), ``bridge`` (default ``xenbr0`` for xen,
  ``VM Network`` for esx), ``datastore`` (``datastore1``), ``nic_model``
  (esx: ``e1000``/``vmxnet3``).
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from lxml import etree

from vmshop_common.errors import BackendError, ConfigurationError, VMShopError
from vmshop_common.xmlload import parse_xml

from .base import Backend, Capabilities, GuestSpec, VMState
from .domainxml import (
    ESX_NIC_MODELS,
    FLAVORS,
    VMSHOP_NS,
    XEN_MODES,
    DomainOptions,
    console_path,
    domain_name,
    domain_xml,
)
from .hostside import choice, positive_number, tail
from .qemu import DISK_CACHES, MAC, PROBE_CMDLINE, PROBE_MARKER, VM_ID

try:  # The bindings are optional: without them the backend says it is unavailable.
    import libvirt

    LibvirtError: type[Exception] = libvirt.libvirtError
except ImportError:  # pragma: no cover - exercised only where libvirt-python is missing
    libvirt = None

    class LibvirtError(Exception):  # type: ignore[no-redef]
        """Stands in for libvirt.libvirtError where the bindings are missing (nothing raises it)."""

log = logging.getLogger(__name__)

# libvirt's virDomainState values (libvirt-domain.h), so the table does not need the bindings.
VIR_DOMAIN_NOSTATE = 0
VIR_DOMAIN_RUNNING = 1
VIR_DOMAIN_BLOCKED = 2
VIR_DOMAIN_PAUSED = 3
VIR_DOMAIN_SHUTDOWN = 4
VIR_DOMAIN_SHUTOFF = 5
VIR_DOMAIN_CRASHED = 6
VIR_DOMAIN_PMSUSPENDED = 7

#: libvirt's domain states as VMStates; anything else (NOSTATE, states of later libvirts) is UNKNOWN.
LIBVIRT_STATES: dict[int, VMState] = {
    VIR_DOMAIN_RUNNING: VMState.RUNNING,
    VIR_DOMAIN_BLOCKED: VMState.RUNNING,  # running, waiting on a resource (an idle Xen guest)
    VIR_DOMAIN_SHUTDOWN: VMState.RUNNING,  # still running while it shuts down
    VIR_DOMAIN_PAUSED: VMState.PAUSED,
    VIR_DOMAIN_PMSUSPENDED: VMState.PAUSED,
    VIR_DOMAIN_SHUTOFF: VMState.STOPPED,
    VIR_DOMAIN_CRASHED: VMState.CRASHED,
}

DOMAIN_TYPES = ("qemu", "kvm", "auto")
DAEMON_MODES = ("external", "spawn")
NIC_KINDS_QEMU = ("user", "segment")
#: What was never run here, per flavor: capabilities().reason says it even when the connection opens.
NOT_EXERCISED = {
    "xen": "the xen flavor was never exercised against a Xen host (none exists where it was written); "
           "only its domain XML is checked, against libvirt's schema",
    "esx": "the esx flavor was never exercised against an ESX host (none exists where it was written); it only "
           "emits domain XML, checked against libvirt's schema, and cannot start VMs: its disk must be a VMDK "
           "in a datastore",
}
VIRTLOGD_SOCKET = Path("/run/libvirt/virtlogd-sock")
SPAWN_LOCK = Path("/run/vmshop-libvirt-spawn.lock")
DAEMON_LOG = Path("/var/log/libvirt/libvirtd.log")
#: Where this host's privileged libvirtd logs each domain's QEMU (removed with the domain).
DOMAIN_LOG_DIR = Path("/var/log/libvirt/qemu")
POLL = 0.05

_T = TypeVar("_T")


def translate_state(state: int) -> VMState:
    """libvirt's virDomainState as a VMState: the backend's one translation."""
    return LIBVIRT_STATES.get(state, VMState.UNKNOWN)


def default_uri(flavor: str) -> str:
    if flavor == "xen":
        return "xen:///system"
    return "qemu:///system" if os.geteuid() == 0 else "qemu:///session"


def is_local(uri: str) -> bool:
    """Whether ``uri``'s daemon runs on this host (so its files, the console log included, are ours to see)."""
    return not urlsplit(uri).netloc


def is_local_system(uri: str) -> bool:
    """Whether ``uri`` is this host's privileged QEMU daemon (the only one ``daemon=spawn`` starts)."""
    parts = urlsplit(uri)
    return parts.scheme == "qemu" and not parts.netloc and parts.path in ("/system", "/session") and (
        parts.path == "/system" or os.geteuid() == 0)


def _error_code(exc: BaseException) -> int | None:
    getter = getattr(exc, "get_error_code", None)
    return getter() if callable(getter) else None


def _no_domain(exc: BaseException) -> bool:
    return libvirt is not None and _error_code(exc) == libvirt.VIR_ERR_NO_DOMAIN


def _words(exc: BaseException) -> str:
    """libvirt's own message for ``exc``."""
    getter = getattr(exc, "get_error_message", None)
    message = getter() if callable(getter) else None
    return str(message or exc).strip()


def _socket_answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2.0)
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


class _EventLoop:
    """libvirt's default event loop in one daemon thread, which keepalive needs.

    libvirt's event implementation is process-wide and must be registered
    before the first connection opens, so there is one per process.
    """

    _lock = threading.Lock()
    _started = False

    @classmethod
    def ensure(cls) -> None:
        with cls._lock:
            if cls._started:
                return
            # libvirt prints every error to stderr unless a handler takes them; ours become BackendErrors.
            libvirt.registerErrorHandler(lambda context, error: None, None)
            libvirt.virEventRegisterDefaultImpl()
            threading.Thread(target=cls._run, name="libvirt-events", daemon=True).start()
            cls._started = True

    @staticmethod
    def _run() -> None:
        while True:
            libvirt.virEventRunDefaultImpl()


@dataclass
class _VM:
    spec: GuestSpec
    lock: threading.Lock = field(default_factory=threading.Lock)


class LibvirtBackend(Backend):
    """VMs as persistent libvirt domains; see the module docstring for the options."""

    name = "libvirt"

    def __init__(self, options: dict[str, str] | None = None) -> None:
        super().__init__(options)
        options = self.options
        self.flavor = choice(options, "flavor", FLAVORS, "qemu", "libvirt")
        self.uri = options.get("uri") or ("" if self.flavor == "esx" else default_uri(self.flavor))
        if not self.uri:
            raise ConfigurationError("libvirt backend: flavor esx needs a uri (e.g. esx://host/?no_verify=1)")
        self.domain_type = choice(options, "domain_type", DOMAIN_TYPES, "kvm" if self.flavor == "kvm" else "qemu",
                                  "libvirt")
        self.daemon = choice(options, "daemon", DAEMON_MODES, "external", "libvirt")
        if self.daemon == "spawn" and not is_local_system(self.uri):
            raise ConfigurationError(f"libvirt backend: daemon=spawn starts only this host's qemu:///system, "
                                     f"not {self.uri}")
        self.daemon_timeout = int(positive_number(options, "daemon_timeout", 120.0, "libvirt"))
        self.disk_cache = choice(options, "disk_cache", DISK_CACHES, "unsafe", "libvirt")
        label = options.get("dac_label", "+0:+0" if is_local_system(self.uri) else "daemon")
        if label != "daemon" and not re.fullmatch(r"\+?[A-Za-z0-9_.-]+:\+?[A-Za-z0-9_.-]+", label):
            raise ConfigurationError(f"libvirt backend: dac_label must be user:group or 'daemon', not {label!r}")
        self.xml_options = DomainOptions(
            flavor=self.flavor, domain_type="kvm" if self.flavor == "kvm" else "qemu", disk_cache=self.disk_cache,
            dac_label=None if label == "daemon" else label,
            xen_mode=choice(options, "xen_mode", XEN_MODES, "pv", "libvirt"),
            bridge=options.get("bridge", "VM Network" if self.flavor == "esx" else "xenbr0"),
            datastore=options.get("datastore", "datastore1"),
            nic_model=choice(options, "nic_model", ESX_NIC_MODELS, "e1000", "libvirt"))
        self.keepalive = int(positive_number(options, "keepalive", 5.0, "libvirt"))
        self.start_timeout = positive_number(options, "start_timeout", 30.0, "libvirt")
        self.probe_timeout = positive_number(options, "probe_timeout", 5.0, "libvirt")
        self.memory_fraction = positive_number(options, "memory_fraction", 0.75, "libvirt")
        self.max_vcpus = int(positive_number(options, "max_vcpus", 1.0, "libvirt")) if "max_vcpus" in options else 0
        self._conn: Any = None
        self._host: tuple[int, int, dict[str, set[str]]] | None = None
        self._conn_lock = threading.Lock()
        self._lock = threading.Lock()
        self._probe_lock = threading.Lock()
        self._decisions: dict[tuple[str, str], str] = {}
        self._vms: dict[str, _VM] = {}
        self._ended: set[str] = set()
        self._starting: set[str] = set()

    # The connection ---------------------------------------------------------------------------
    def _connection(self) -> Any:
        """The open connection (opening it, and starting a daemon if configured, when needed)."""
        if libvirt is None:
            raise BackendError("the Python bindings for libvirt (libvirt-python) are not installed: "
                               "run scripts/setup_libvirt.sh")
        with self._conn_lock:
            if self._conn is not None:
                try:
                    if self._conn.isAlive():
                        return self._conn
                except LibvirtError:
                    pass
                self._drop_connection()
            _EventLoop.ensure()
            try:
                conn = libvirt.open(self.uri)
            except LibvirtError as exc:
                if self.daemon != "spawn":
                    raise BackendError(f"cannot open libvirt connection {self.uri}: {_words(exc)}") from None
                self._spawn_daemons()
                try:
                    conn = libvirt.open(self.uri)
                except LibvirtError as again:
                    raise BackendError(f"cannot open libvirt connection {self.uri} even after starting "
                                       f"libvirtd: {_words(again)} {tail(DAEMON_LOG, 600)}") from None
            if self.keepalive > 0:
                try:
                    conn.setKeepAlive(self.keepalive, 3)
                except LibvirtError as exc:  # e.g. a driver without keepalive (esx, test)
                    log.debug("libvirt keepalive not available on %s: %s", self.uri, _words(exc))
            self._conn = conn
            return conn

    def _drop_connection(self) -> None:
        conn, self._conn, self._host = self._conn, None, None
        if conn is not None:
            try:
                conn.close()
            except LibvirtError:
                pass

    def _spawn_daemons(self) -> None:
        """Start virtlogd and libvirtd standalone (they exit after ``daemon_timeout`` idle seconds).

        A file lock serialises plants and threads; a daemon already running
        refuses to start twice (its pidfile is locked), which is fine.
        """
        with open(SPAWN_LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self._answers():
                return
            DAEMON_LOG.parent.mkdir(parents=True, exist_ok=True)
            log.info("starting virtlogd and libvirtd (--timeout %d)", self.daemon_timeout)
            self._run_daemon("virtlogd")
            self._run_daemon("libvirtd")
            deadline = time.monotonic() + self.start_timeout
            while not self._answers():
                if time.monotonic() > deadline:
                    raise BackendError(f"libvirtd did not answer within {self.start_timeout:g} s: "
                                       f"{tail(DAEMON_LOG, 800) or 'no log'}")
                time.sleep(0.1)

    def _ensure_virtlogd(self) -> None:
        """With daemon=spawn, make sure virtlogd runs before a domain starts.

        libvirtd needs it to start a domain but, unlike the session daemon,
        does not start it; an idle virtlogd exits after its timeout while
        libvirtd (held by a connected plant) lives on. Connecting to it also
        restarts its idle timer, so it is there when libvirtd asks.
        """
        if self.daemon != "spawn":
            return
        with open(SPAWN_LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if _socket_answers(VIRTLOGD_SOCKET):
                return
            self._run_daemon("virtlogd")
            deadline = time.monotonic() + self.start_timeout
            while not _socket_answers(VIRTLOGD_SOCKET):
                if time.monotonic() > deadline:
                    raise BackendError(f"virtlogd did not start within {self.start_timeout:g} s")
                time.sleep(0.05)

    def _run_daemon(self, name: str) -> None:
        binary = shutil.which(name) or next(
            (f"{d}/{name}" for d in ("/usr/sbin", "/sbin") if os.access(f"{d}/{name}", os.X_OK)), None)
        if binary is None:
            raise BackendError(f"{name} is not installed: run scripts/setup_libvirt.sh")
        env = dict(os.environ, PATH=f"/usr/sbin:/usr/bin:/sbin:/bin:{os.environ.get('PATH', '')}")
        try:
            subprocess.run([binary, "--daemon", "--timeout", str(self.daemon_timeout)],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           cwd="/", env=env, timeout=self.start_timeout, start_new_session=True)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise BackendError(f"cannot start {name}: {exc}") from None

    def _answers(self) -> bool:
        try:
            libvirt.open(self.uri).close()
        except LibvirtError:
            return False
        return True

    def _call(self, what: str, action: Callable[[Any], _T]) -> _T:
        """Run ``action(connection)``; libvirt's errors become BackendError with libvirt's words."""
        conn = self._connection()
        try:
            return action(conn)
        except LibvirtError as exc:
            raise BackendError(f"libvirt ({self.uri}): {what}: {_words(exc)}") from None

    def _lookup(self, vm_id: str) -> Any:
        """The domain of ``vm_id``, or None if libvirt has none."""
        conn = self._connection()
        try:
            return conn.lookupByName(domain_name(vm_id))
        except LibvirtError as exc:
            if _no_domain(exc):
                return None
            raise BackendError(f"libvirt ({self.uri}): cannot look up {domain_name(vm_id)}: {_words(exc)}") from None

    def close(self) -> None:
        with self._conn_lock:
            self._drop_connection()

    # Capabilities -------------------------------------------------------------------------------
    def _host_facts(self) -> tuple[int, int, dict[str, set[str]]]:
        """(memory MiB, CPUs, {arch: domain types}) of the connection's host, read once per connection."""
        if self._host is None:
            conn = self._connection()
            try:
                info = conn.getInfo()
                caps = conn.getCapabilities()
            except LibvirtError as exc:
                raise BackendError(f"libvirt ({self.uri}): cannot read the host's capabilities: {_words(exc)}") \
                    from None
            memory = int(info[1])
            try:
                # getInfo sums the NUMA nodes' memory, which on some hosts is less than the host has
                # (seen here: 8.5 of 24 GiB); the host's own total is in the memory statistics (KiB).
                memory = int(conn.getMemoryStats(libvirt.VIR_NODE_MEMORY_STATS_ALL_CELLS, 0)["total"]) // 1024
            except (LibvirtError, KeyError, ValueError):
                pass
            try:
                root = parse_xml(caps, what="libvirt capabilities", max_depth=64)
            except VMShopError as exc:
                raise BackendError(f"libvirt ({self.uri}) sent capabilities that cannot be read: {exc}") from None
            arches: dict[str, set[str]] = {}
            for arch in root.iterfind("guest/arch"):
                arches.setdefault(arch.get("name", ""), set()).update(
                    d.get("type", "") for d in arch.iterfind("domain"))
            self._host = (memory, int(info[2]), arches)
        return self._host

    def _wanted_domain_type(self) -> str:
        if self.flavor == "xen":
            return "xen"
        if self.flavor == "esx":
            return "vmware"
        return "kvm" if self.domain_type == "kvm" else "qemu"

    def capabilities(self) -> Capabilities:
        networks = NIC_KINDS_QEMU if self.flavor in ("qemu", "kvm") else ("segment",)
        channel = "" if self.flavor == "esx" else "9p"
        note = NOT_EXERCISED.get(self.flavor, "")
        try:
            memory, cpus, arches = self._host_facts()
            max_vcpus = self.max_vcpus or cpus
            if self.flavor in ("qemu", "kvm"):
                try:
                    max_vcpus = min(max_vcpus, int(self._connection().getMaxVcpus(self._wanted_domain_type())))
                except LibvirtError:
                    pass
        except BackendError as exc:
            reason = f"{exc.message}; {note}" if note else exc.message
            return Capabilities(name=self.name, available=False, reason=reason, networks=networks, channel=channel)
        wanted = self._wanted_domain_type()
        architectures = tuple(sorted(a for a, types in arches.items() if wanted in types or self.flavor == "esx"))
        available = bool(architectures) and self.flavor != "esx"
        reason = note
        if not architectures:
            reason = f"libvirt at {self.uri} offers no architecture with domain type {wanted}"
        return Capabilities(
            name=self.name, available=available, reason=reason, accelerator=self._known_accelerator(),
            architectures=architectures, max_memory=int(memory * self.memory_fraction), max_vcpus=max_vcpus,
            networks=networks, channel=channel)

    def _known_accelerator(self) -> str:
        if self.flavor in ("xen", "esx"):
            return self.flavor
        if self.domain_type != "auto":
            return "kvm" if self.domain_type == "kvm" else "tcg"
        if self._decisions:
            return "kvm" if list(self._decisions.values())[-1] == "kvm" else "tcg"
        return "auto"

    # The domain type ------------------------------------------------------------------------------
    def domain_type_for(self, spec: GuestSpec) -> str:
        """'qemu' or 'kvm' for ``spec`` (``auto``: libvirt must offer KVM and a probe boot must succeed)."""
        if self.domain_type != "auto":
            return self.domain_type
        with self._probe_lock:
            key = (str(spec.kernel), spec.machine)
            if key not in self._decisions:
                _, _, arches = self._host_facts()
                offered = "kvm" in arches.get(spec.arch, set())
                if not offered:
                    decision = "qemu"
                elif not is_local(self.uri):
                    decision = "kvm"  # a remote host's console file is out of reach: trust its capabilities
                else:
                    decision = "kvm" if self.probe_kvm(spec) else "qemu"
                log.info("libvirt domain type for %s on %s: %s (kvm offered: %s)", spec.kernel, self.uri, decision,
                         offered)
                self._decisions[key] = decision
            return self._decisions[key]

    def probe_kvm(self, spec: GuestSpec) -> bool:
        """Boot ``spec``'s kernel and initramfs in a transient KVM domain; True if its init printed the marker.

        The probe domain is destroyed whatever happens (and libvirt destroys
        it by itself if this connection dies: ``VIR_DOMAIN_START_AUTODESTROY``).
        """
        if spec.kernel is None or spec.initrd is None:
            return False
        with tempfile.TemporaryDirectory(prefix="vmshop-probe-") as tmp:
            console = Path(tmp) / "console.log"
            probe = GuestSpec(vm_id=f"probe-{os.getpid()}-{threading.get_ident()}", disk=Path(tmp) / "none",
                              memory=128, vcpus=1, run_dir=Path(tmp), channel_dir=Path(tmp), kernel=spec.kernel,
                              initrd=spec.initrd, cmdline=PROBE_CMDLINE, machine=spec.machine, arch=spec.arch)
            xml = _without_disk_and_share(domain_xml(probe, DomainOptions(
                domain_type="kvm", dac_label=self.xml_options.dac_label)))
            conn = self._connection()
            try:
                domain = conn.createXML(xml, libvirt.VIR_DOMAIN_START_AUTODESTROY)
            except LibvirtError as exc:
                log.info("KVM probe could not start: %s", _words(exc))
                return False
            try:
                deadline = time.monotonic() + self.probe_timeout
                while time.monotonic() < deadline:
                    if PROBE_MARKER in tail(console, 4096):
                        return True
                    time.sleep(POLL)
                return PROBE_MARKER in tail(console, 4096)
            finally:
                try:
                    domain.destroy()
                except LibvirtError:
                    pass  # it powered itself off (the probe's init does), or is gone already
                self._remove_domain_log(domain_name(probe.vm_id))

    # The contract ---------------------------------------------------------------------------------
    def start(self, spec: GuestSpec) -> None:
        self._check(spec)
        with self._lock:
            # Claim the id first, so a second start of it fails instead of racing this one.
            if spec.vm_id in self._starting:
                raise BackendError(f"VM {spec.vm_id} is being started already")
            self._starting.add(spec.vm_id)
        try:
            self._start(spec)
        finally:
            with self._lock:
                self._starting.discard(spec.vm_id)

    def _start(self, spec: GuestSpec) -> None:
        self._clear_the_name(spec)
        with self._lock:
            self._vms[spec.vm_id] = _VM(spec)
            self._ended.discard(spec.vm_id)
        domain = None
        try:
            if self.flavor == "esx":
                raise BackendError(NOT_EXERCISED["esx"])
            options = self.xml_options
            if self.flavor == "qemu":
                options = replace(options, domain_type=self.domain_type_for(spec))
            xml = domain_xml(spec, options)
            Path(spec.run_dir).mkdir(parents=True, exist_ok=True)
            console_path(spec).unlink(missing_ok=True)
            self._ensure_virtlogd()
            domain = self._call(f"define {domain_name(spec.vm_id)}", lambda c: c.defineXML(xml))
            self._call(f"start {domain_name(spec.vm_id)}", lambda c: domain.create())
            if not domain_still_active(domain):
                raise BackendError(f"domain {domain_name(spec.vm_id)} stopped right after it started: "
                                   f"{tail(console_path(spec), 600)}")
        except BaseException:
            try:
                if domain is not None:
                    self._remove_domain(domain)
            finally:
                self._remove_files(spec)
                with self._lock:
                    self._vms.pop(spec.vm_id, None)
            raise

    def _clear_the_name(self, spec: GuestSpec) -> None:
        """Refuse a running domain of that name; undefine a stopped one this plant left (a stopped VM's)."""
        existing = self._lookup(spec.vm_id)
        if existing is None:
            return
        if domain_still_active(existing):
            raise BackendError(f"VM {spec.vm_id} already runs (domain {domain_name(spec.vm_id)}); "
                               f"adopt or destroy it first")
        if self._identity(existing) is None:
            raise BackendError(f"a domain named {domain_name(spec.vm_id)} exists that this plant did not "
                               f"define; it is left alone")
        self._call("undefine the stopped domain it left", lambda c: existing.undefine())

    def _check(self, spec: GuestSpec) -> None:
        """Refuse a spec this backend cannot run, before anything is made."""
        def need_file(path: Path | None, label: str) -> None:
            if path is not None and not Path(path).is_file():
                raise BackendError(f"VM {spec.vm_id}: the {label} {path} is not a file")

        if not VM_ID.match(spec.vm_id):
            raise BackendError(f"{spec.vm_id!r} is not a usable VM id")
        if spec.memory < 1 or spec.vcpus < 1:
            raise BackendError(f"VM {spec.vm_id}: memory and vcpus must be positive")
        remote = not is_local(self.uri)
        if not remote:  # on a remote host the files are the remote host's: libvirt will say what is missing
            need_file(spec.disk, "disk")
            need_file(spec.kernel, "kernel")
            need_file(spec.initrd, "initrd")
            if not Path(spec.channel_dir).is_dir():
                raise BackendError(f"VM {spec.vm_id}: the channel directory {spec.channel_dir} does not exist")
            if spec.data_dir is not None and not Path(spec.data_dir).is_dir():
                raise BackendError(f"VM {spec.vm_id}: the data directory {spec.data_dir} does not exist")
        if spec.initrd is not None and spec.kernel is None:
            raise BackendError(f"VM {spec.vm_id}: an initrd needs a kernel")
        kinds = NIC_KINDS_QEMU if self.flavor in ("qemu", "kvm") else ("segment",)
        for nic in spec.nics:
            if nic.kind not in kinds:
                raise BackendError(f"VM {spec.vm_id}: the {self.flavor} flavor has no NIC of kind {nic.kind!r} "
                                   f"(only {', '.join(kinds)})")
            if not MAC.match(nic.mac):
                raise BackendError(f"VM {spec.vm_id}: {nic.mac!r} is not a MAC address (lower-case hex)")
            if nic.kind == "user" and nic.host_port is not None and not 0 < nic.host_port < 65536:
                raise BackendError(f"VM {spec.vm_id}: {nic.host_port} is not a TCP port")
            if self.flavor in ("qemu", "kvm") and nic.kind == "segment" and (
                    not nic.switch or (not remote and not Path(nic.switch).exists())):
                raise BackendError(f"VM {spec.vm_id}: the segment's switch {nic.switch} is not running")
        _, _, arches = self._host_facts()
        if arches and spec.arch not in arches:
            raise BackendError(f"VM {spec.vm_id}: libvirt at {self.uri} runs {', '.join(sorted(arches))}, "
                               f"not {spec.arch}")

    def _identity(self, domain: Any) -> dict[str, str] | None:
        """The vmshop metadata of ``domain`` (id, run_dir, disk), or None if it has none."""
        try:
            text = domain.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, VMSHOP_NS, 0)
        except LibvirtError:
            return None
        try:
            return dict(parse_xml(text, what="domain metadata").attrib)
        except VMShopError:
            return None

    def _ours(self, domain: Any, spec: GuestSpec) -> bool:
        """Whether ``domain`` is the one this spec made (checked before it is stopped or destroyed)."""
        identity = self._identity(domain)
        return identity is not None and identity.get("id") == spec.vm_id and \
            identity.get("run_dir") == str(Path(spec.run_dir).absolute())

    def _active(self, vm_id: str) -> bool:
        domain = self._lookup(vm_id)
        return domain is not None and bool(self._call("is it active", lambda c: domain.isActive()))

    def _remove_domain(self, domain: Any) -> None:
        """Destroy (if it runs) and undefine ``domain``; a domain already gone is fine."""
        try:
            if domain.isActive():
                domain.destroy()
        except LibvirtError as exc:
            if not _no_domain(exc) and domain_still_active(domain):
                raise BackendError(f"libvirt ({self.uri}): cannot destroy {domain.name()}: {_words(exc)}") from None
        try:
            domain.undefine()
        except LibvirtError as exc:
            if not _no_domain(exc):
                raise BackendError(f"libvirt ({self.uri}): cannot undefine {domain.name()}: {_words(exc)}") from None

    def _remove_files(self, spec: GuestSpec) -> None:
        """Remove the console log, ``run_dir`` if that empties it, and (local daemon) libvirt's log of the domain."""
        console_path(spec).unlink(missing_ok=True)
        try:
            Path(spec.run_dir).rmdir()
        except OSError:
            pass
        self._remove_domain_log(domain_name(spec.vm_id))

    def _remove_domain_log(self, name: str) -> None:
        if is_local_system(self.uri):
            try:
                (DOMAIN_LOG_DIR / f"{name}.log").unlink(missing_ok=True)
            except OSError as exc:
                log.info("cannot remove libvirt's log of domain %s: %s", name, exc)

    def state(self, vm_id: str) -> VMState:
        vm = self._vms.get(vm_id)
        if vm is None:
            return VMState.STOPPED if vm_id in self._ended else VMState.UNKNOWN
        try:
            domain = self._lookup(vm_id)
            if domain is None:
                return VMState.STOPPED
            state, _reason = domain.state()
        except (BackendError, LibvirtError) as exc:
            if _no_domain(exc):
                return VMState.STOPPED
            log.info("VM %s: no state from libvirt: %s", vm_id, exc)
            return VMState.UNKNOWN
        return translate_state(int(state))

    def stop(self, vm_id: str, timeout: float = 30.0) -> None:
        vm = self._vms.get(vm_id)
        if vm is None:
            return
        deadline = time.monotonic() + timeout
        with vm.lock:
            domain = self._lookup(vm_id)
            if domain is None or not self._ours(domain, vm.spec):
                return
            try:
                state = translate_state(int(domain.state()[0]))
                if state == VMState.STOPPED:
                    return
                if state == VMState.RUNNING:
                    flags = libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN if self.flavor in ("qemu", "kvm") else 0
                    domain.shutdownFlags(flags)
                else:
                    deadline = 0.0  # a guest that does not run cannot hear the power button
            except LibvirtError as exc:
                if _no_domain(exc):
                    return
                log.info("VM %s: no ACPI power-down (%s); it will be destroyed after %g s", vm_id, _words(exc),
                         timeout)
            while domain_still_active(domain):
                if time.monotonic() > deadline:
                    log.warning("VM %s is still there (power-down asked, %g s allowed): destroying it", vm_id,
                                timeout)
                    try:
                        domain.destroy()
                    except LibvirtError as exc:
                        if domain_still_active(domain):
                            raise BackendError(f"libvirt ({self.uri}): cannot destroy {domain_name(vm_id)}: "
                                               f"{_words(exc)}") from None
                    break
                time.sleep(POLL)

    def destroy(self, vm_id: str) -> None:
        with self._lock:
            vm = self._vms.get(vm_id)
        if vm is None:
            return
        with vm.lock:
            domain = self._lookup(vm_id)
            if domain is not None:
                if self._ours(domain, vm.spec):
                    self._remove_domain(domain)
                else:
                    log.warning("domain %s is not the one VM %s made (its metadata differs): left alone",
                                domain_name(vm_id), vm_id)
            self._remove_files(vm.spec)
        with self._lock:
            self._vms.pop(vm_id, None)
            self._ended.add(vm_id)

    def adopt(self, spec: GuestSpec) -> bool:
        """Re-attach to domain ``vmshop-<id>``; True only if it is this spec's and its guest runs.

        The VM is tracked even when this returns False, so that ``destroy``
        can still remove a domain that is defined but stopped or mute.
        """
        with self._lock:
            self._vms[spec.vm_id] = _VM(spec)
            self._ended.discard(spec.vm_id)
        try:
            domain = self._lookup(spec.vm_id)
            if domain is None or not self._ours(domain, spec):
                return False
            return translate_state(int(domain.state()[0])) == VMState.RUNNING
        except (BackendError, LibvirtError) as exc:
            log.warning("VM %s: cannot adopt it through libvirt: %s", spec.vm_id, exc)
            return False

    def running(self) -> list[str]:
        with self._lock:
            ids = list(self._vms)
        alive = []
        for vm_id in ids:
            try:
                if self._active(vm_id):
                    alive.append(vm_id)
            except BackendError:
                continue
        return sorted(alive)

    # Vendor extras ----------------------------------------------------------------------------
    def ex_console(self, vm_id: str) -> str:
        """The tail of the guest's serial console ('' for an unknown VM)."""
        vm = self._vms.get(vm_id)
        return tail(console_path(vm.spec), 8000) if vm is not None else ""

    def ex_domain_xml(self, spec: GuestSpec) -> str:
        """The domain XML ``start`` would define for ``spec`` (no connection needed for a fixed domain type)."""
        options = self.xml_options
        if self.flavor == "qemu" and self.domain_type != "auto":
            options = replace(options, domain_type=self.domain_type)
        return domain_xml(spec, options)


def domain_still_active(domain: Any) -> bool:
    """Whether ``domain`` still runs (False once libvirt has no such domain)."""
    try:
        return bool(domain.isActive())
    except LibvirtError:
        return False


def _without_disk_and_share(xml: str) -> str:
    """The probe's domain: no disk, no share (it only boots the kernel and initramfs)."""
    root = parse_xml(xml, what="probe domain")
    devices = root.find("devices")
    if devices is not None:
        for element in list(devices):
            if element.tag in ("disk", "filesystem"):
                devices.remove(element)
    return etree.tostring(root, encoding="unicode")


