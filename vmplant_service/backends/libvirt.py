"""The libvirt backend: one persistent libvirt domain ``vmshop-<vm id>`` per VM.

The plant talks to a libvirt daemon at ``uri`` (from its configuration), so
the same code drives a local QEMU (``qemu:///system``, what runs here, TCG
only), a remote KVM host (``qemu+ssh://root@host/system``) or, by the XML
it emits (:mod:`.domainxml`), libvirt's Xen and ESX drivers. The domain is
defined from the generated XML and started; ``stop`` presses the ACPI power
button, then destroys after the timeout; ``destroy`` destroys and
undefines. libvirt's domain states become :class:`VMState` through
:data:`LIBVIRT_STATES`, here and nowhere else.

What the guest gets (qemu/kvm flavor, see :mod:`.domainxml` for why each
piece is so): direct kernel boot, the plant's overlay as a virtio qcow2
disk, the guest agent's virtio-serial channel ``org.qemu.guest_agent.0``,
the serial console, application data as a read-only 9p share (tag
``vmdata``), and its NICs: a 'user' NIC with ``restrict=on`` and a forward
from 127.0.0.1, a 'segment' NIC on the owner's VDE switch. There is no
writable share: the guest is configured only through its agent, which
libvirt itself connects to; :meth:`LibvirtBackend.agent` reaches it
through libvirt's API (:class:`~vmplant_service.agent.libvirt_transport.
LibvirtAgentTransport`, on a libvirt connection of each VM's own).

QEMU runs unprivileged (rule 9): the domain's ``<seclabel type='static'
model='dac' relabel='yes'>`` is the ``dac_label`` user, ``vmshop-qemu`` by
default (``scripts/setup_host.sh`` makes it), under libvirt's seccomp
sandbox (``-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,
resourcecontrol=deny``: qemu.conf's default). That user cannot enter the
plant's 0700 directories, and nothing shared is handed to it:

- the overlay (read-write) and the layers below it (the cached image,
  read-only) are opened by the backend and passed as descriptors
  (``virDomainFDAssociate``); libvirt chowns neither; nor the cloud-init
  seed (a ``<readonly/>`` second disk, opened read-only, 0600 root's);
- the kernel and initramfs are read by QEMU itself, as that user (so they
  must be readable by it: :meth:`_check` says which directory is not);
  libvirt does not chown them;
- a 'segment' NIC: the backend plugs into the switch itself
  (:mod:`.vdeplug`) and hot-plugs the NIC into the domain, started
  paused, with the port's two descriptors (QMP ``getfd``, ``netdev_add``
  type ``dgram``, ``device_add``), then resumes it;
- the data share is opened by QEMU as that user: the data store must be
  readable by it.

What the DAC user does not give: every domain runs as the same user, and
libvirt sets that user before it execs QEMU, so (unlike the qemu backend's
QEMU, which drops to it itself and is then not dumpable) one libvirt QEMU
may ptrace another: a guest that escapes into its QEMU can reach the other
libvirt guests of the host. A distinct numeric label per VM would close
that (libvirt runs QEMU as a uid with no passwd entry, with group ``kvm``:
checked); it is not done here.

What libvirt changes on the host for a domain (and restores when it stops):
it makes ``run_dir/console.sock`` (the console's listening socket, chowned
to QEMU's user; the backend makes it 0600) and its own per-domain files
under ``/var/lib/libvirt/qemu`` (the agent's socket, the monitor's, a
master key, labelled for QEMU's user). It chowns nothing of the plant's:
not the overlay, the cached image, the kernel, the data store or
``run_dir`` (checked by the tests).

The console: libvirt hands QEMU the listening socket; the backend's
:class:`~vmplant_service.backends.console.ConsoleKeeper` reads it into
``run_dir/console.log``, rotated to ``console.log.1`` at ``console_limit``
bytes, so a guest's console never holds more than twice that of the host's
disk (QEMU drops console output while no one reads, e.g. while the plant is
down). Files of a VM in ``run_dir``: ``console.sock``, ``console.log``
(and ``.1``). libvirt keeps the definition (``/etc/libvirt/qemu/vmshop-
<id>.xml``) while the VM is stopped, and its own QEMU log
(``/var/log/libvirt/qemu/vmshop-<id>.log`` on this host, written by
virtlogd, which rotates it): ``destroy`` removes both. With a remote
``uri`` descriptors cannot be passed: the disk is a plain path, a
'segment' NIC is QEMU's own VDE client, and the paths in the spec are the
remote host's (the plant's state directory must be there under the same
path, readable by that daemon's QEMU user).

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
- ``dac_label``: whom QEMU runs as: a user name (its uid and primary
  group), ``user:group`` or ``+uid:+gid``; default ``vmshop-qemu`` for
  this host's daemon, ``daemon`` (the daemon's own qemu.conf user) for a
  remote one. ``+0:+0`` runs guests as root;
- ``console_limit``: bytes of console log kept before rotation (default 262144);
- ``disk_cache`` (default ``unsafe``), ``max_vcpus``, ``memory_fraction``
  (0.75), ``keepalive`` (seconds, 5: a daemon that stops answering is
  given up after about four times that), ``start_timeout`` (30: how long
  a spawned daemon may take to answer);
- ``xen_mode`` (``pv``/``hvm``), ``bridge`` (default ``xenbr0`` for xen,
  ``VM Network`` for esx), ``datastore`` (``datastore1``), ``nic_model``
  (esx: ``e1000``/``vmxnet3``).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import os
import pwd
import re
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple, TypeVar
from urllib.parse import urlsplit

from lxml import etree

from vmshop_common.errors import BackendError, ConfigurationError, VMShopError
from vmshop_common.xmlload import parse_xml

from ..agent.libvirt_transport import LibvirtAgentTransport
from ..agent.transport import AgentTransport
from . import vdeplug
from .base import Backend, Capabilities, GuestSpec, VMState
from .console import ConsoleKeeper, console_tail
from .domainxml import (
    AGENT_PORT,
    DISK_FD_GROUP,
    ESX_NIC_MODELS,
    FLAVORS,
    SEED_FD_GROUP,
    VMSHOP_NS,
    XEN_MODES,
    DiskLayer,
    DomainOptions,
    base_fd_group,
    console_path,
    console_socket,
    domain_name,
    domain_xml,
    hotplugged_segments,
    is_q35,
    nic_device,
    segment_port_alias,
)
from .hostside import choice, positive_number, tail
from .qemu import DISK_CACHES, MAC, PROBE_CMDLINE, PROBE_MARKER, VM_ID

try:  # The bindings are optional: without them the backend says it is unavailable.
    import libvirt
    import libvirt_qemu

    LibvirtError: type[Exception] = libvirt.libvirtError
except ImportError:  # pragma: no cover - exercised only where libvirt-python is missing
    libvirt = None
    libvirt_qemu = None

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
#: The user QEMU runs as by default under this host's daemon (made by scripts/setup_host.sh).
DEFAULT_DAC_USER = "vmshop-qemu"
#: Most images in a disk's backing chain (the overlay's own included).
MAX_CHAIN = 16
#: Image formats a backing layer may have (what libvirt and the plant's images use).
LAYER_FORMATS = ("qcow2", "raw")
#: Bytes of console log kept before rotation (as the qemu backend's).
DEFAULT_CONSOLE_LIMIT = 262144

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


def _connect_unix(path: Path) -> socket.socket | None:
    """A connection to the daemon listening on ``path``, or None if none answers."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(2.0)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        return None
    return sock


def backing_chain(disk: Path) -> tuple[DiskLayer, ...]:
    """The images below the qcow2 overlay ``disk``, its backing file first (``qemu-img info --backing-chain``).

    BackendError if qemu-img cannot read the chain, or it is longer than
    :data:`MAX_CHAIN` or holds a format other than :data:`LAYER_FORMATS`.
    """
    from ..clone import qemu_img

    try:
        out = subprocess.run([qemu_img(), "info", "--backing-chain", "--output=json", "-f", "qcow2", str(disk)],
                             capture_output=True, timeout=60, check=True).stdout
        images = json.loads(out)
    except subprocess.CalledProcessError as exc:
        raise BackendError(f"qemu-img cannot read the disk {disk}: "
                           f"{exc.stderr.decode(errors='replace').strip()[:300]}") from None
    except (OSError, subprocess.TimeoutExpired, ValueError) as exc:
        raise BackendError(f"qemu-img cannot read the disk {disk}: {exc}") from None
    if isinstance(images, dict):
        images = [images]
    if not isinstance(images, list) or not 1 <= len(images) <= MAX_CHAIN:
        raise BackendError(f"the disk {disk} has no backing chain of at most {MAX_CHAIN} images")
    layers = []
    for image in images[1:]:
        path, image_format = image.get("filename"), image.get("format")
        if not isinstance(path, str) or not os.path.isabs(path) or image_format not in LAYER_FORMATS:
            raise BackendError(f"the disk {disk} has a backing image the backend cannot pass: {str(image)[:200]}")
        layers.append(DiskLayer(path, image_format))
    return tuple(layers)


def label_ids(label: str) -> tuple[int, int]:
    """The uid and gid of a DAC label (``+uid:+gid`` or ``user:group``); BackendError if they do not exist."""
    import grp

    user, _, group = label.partition(":")
    try:
        uid = int(user[1:]) if user.startswith("+") else pwd.getpwnam(user).pw_uid
        gid = int(group[1:]) if group.startswith("+") else grp.getgrnam(group).gr_gid
    except (KeyError, ValueError):
        raise BackendError(f"the DAC label {label!r} names no user and group of this host") from None
    return uid, gid


def unreachable(path: Path, uid: int, gid: int, directory: bool = False) -> str:
    """Why user ``uid`` (group ``gid`` and that user's other groups) cannot read ``path``; '' if it can.

    Every directory on the way must let it search, and ``path`` itself read
    (and search, for a ``directory``): what QEMU needs to open a file by
    path once it runs as that user.
    """
    if uid == 0:
        return ""
    try:
        name = pwd.getpwuid(uid).pw_name
        groups = set(os.getgrouplist(name, gid))
    except KeyError:
        groups = {gid}

    def allows(info: os.stat_result, bits: int) -> bool:
        if info.st_uid == uid:
            return info.st_mode & (bits << 6) == bits << 6
        if info.st_gid in groups:
            return info.st_mode & (bits << 3) == bits << 3
        return info.st_mode & bits == bits

    path = Path(path).absolute()
    for parent in reversed(path.parents):
        try:
            info = os.stat(parent)
        except OSError as exc:
            return f"{parent}: {exc.strerror}"
        if not allows(info, 0o1):
            return f"{parent} ({stat.filemode(info.st_mode)}, uid {info.st_uid}) cannot be searched"
    try:
        info = os.stat(path)
    except OSError as exc:
        return f"{path}: {exc.strerror}"
    if not allows(info, 0o5 if directory else 0o4):
        return f"{path} ({stat.filemode(info.st_mode)}, uid {info.st_uid}) cannot be read"
    return ""


def agent_channel_connected(domain: Any) -> bool | None:
    """Whether the guest has opened its end of the agent's channel (libvirt's live XML); None if not known."""
    root = parse_xml(domain.XMLDesc(0), what="live domain XML", max_depth=64)
    for target in root.iterfind("devices/channel/target"):
        if target.get("name") == AGENT_PORT:
            state = target.get("state")
            return None if state is None else state == "connected"
    return None


def _associate(domain: Any, group: str, fd: int, conn: Any) -> None:
    domain.FDAssociate(group, [fd], 0)


def _agent_command(domain: Any, text: str, seconds: int) -> str:
    return libvirt_qemu.qemuAgentCommand(domain, text, seconds, 0)  # type: ignore[no-any-return]


def _monitor(domain: Any, command: dict[str, object], files: tuple[int, ...] = ()) -> Any:
    """One QMP command to the domain's QEMU through libvirt (with descriptors); its ``return`` value."""
    text = json.dumps(command)
    try:
        if files:
            answer, _ = libvirt_qemu.qemuMonitorCommandWithFiles(domain, text, list(files), 0)
        else:
            answer = libvirt_qemu.qemuMonitorCommand(domain, text, 0)
        reply = json.loads(answer)
    except (LibvirtError, ValueError) as exc:
        raise BackendError(f"QEMU's monitor: {command['execute']}: {_words(exc)}") from None
    if "error" in reply:
        raise BackendError(f"QEMU refused {command['execute']}: {str(reply['error'].get('desc', reply))[:300]}")
    return reply.get("return")


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



class _HostFacts(NamedTuple):
    """What a libvirt host offers, read once per connection."""

    memory: int  # MiB
    cpus: int
    arches: dict[str, set[str]]  # arch: the domain types libvirt offers for it
    vcpu_limit: int | None  # libvirt's maximum vCPUs for the wanted domain type (None: not known)


@dataclass
class _VM:
    spec: GuestSpec
    lock: threading.Lock = field(default_factory=threading.Lock)
    transport: LibvirtAgentTransport | None = None


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
        self.dac_label = options.get("dac_label", DEFAULT_DAC_USER if is_local_system(self.uri) else "daemon")
        if self.dac_label != "daemon" and not re.fullmatch(
                r"[a-z_][a-z0-9_-]{0,31}|\+?[A-Za-z0-9_.-]+:\+?[A-Za-z0-9_.-]+", self.dac_label):
            raise ConfigurationError(f"libvirt backend: dac_label must be a user, user:group, +uid:+gid or "
                                     f"'daemon', not {self.dac_label!r}")
        self.xml_options = DomainOptions(
            flavor=self.flavor, domain_type="kvm" if self.flavor == "kvm" else "qemu", disk_cache=self.disk_cache,
            pass_fds=is_local(self.uri) and self.flavor in ("qemu", "kvm"),
            xen_mode=choice(options, "xen_mode", XEN_MODES, "pv", "libvirt"),
            bridge=options.get("bridge", "VM Network" if self.flavor == "esx" else "xenbr0"),
            datastore=options.get("datastore", "datastore1"),
            nic_model=choice(options, "nic_model", ESX_NIC_MODELS, "e1000", "libvirt"))
        self.keepalive = int(positive_number(options, "keepalive", 5.0, "libvirt"))
        self.start_timeout = positive_number(options, "start_timeout", 30.0, "libvirt")
        self.probe_timeout = positive_number(options, "probe_timeout", 5.0, "libvirt")
        self.memory_fraction = positive_number(options, "memory_fraction", 0.75, "libvirt")
        self.max_vcpus = int(positive_number(options, "max_vcpus", 1.0, "libvirt")) if "max_vcpus" in options else 0
        self.consoles = ConsoleKeeper(int(positive_number(options, "console_limit", DEFAULT_CONSOLE_LIMIT,
                                                          "libvirt")))
        self._conn: Any = None
        self._host: _HostFacts | None = None
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
            self._conn = self._open()
            return self._conn

    def _open(self) -> Any:
        """A new connection to ``uri`` (starting the daemons first with ``daemon=spawn`` if none answers)."""
        if libvirt is None:
            raise BackendError("the Python bindings for libvirt (libvirt-python) are not installed: "
                               "run scripts/setup_libvirt.sh")
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
        if self._host is None:
            # Now, while the plant starts (adopting its guests opens the first connection), rather than at the
            # first plantInfo, which a guest of ours may by then be making libvirtd slow to answer.
            try:
                self._host = self._read_host_facts(conn)
            except BackendError as exc:
                log.warning("%s (asked again at the next plantInfo)", exc.message)
        return conn

    def _drop_connection(self) -> None:
        # The host's facts stay: a new connection to the same URI reaches the same host.
        conn, self._conn = self._conn, None
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

    @contextlib.contextmanager
    def _virtlogd_held(self) -> Iterator[None]:
        """With daemon=spawn, make sure virtlogd runs, and keeps running, while a domain starts.

        libvirtd needs it to start a domain but, unlike the session daemon,
        does not start it; an idle virtlogd exits after its timeout while
        libvirtd (held by a connected plant) lives on. A connection of ours
        stays open until the start is over: a daemon with a client is not
        idle, so a define and start slower than its timeout (a loaded host)
        still find it there.
        """
        if self.daemon != "spawn":
            yield
            return
        with open(SPAWN_LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            held = _connect_unix(VIRTLOGD_SOCKET)
            if held is None:
                self._run_daemon("virtlogd")
                deadline = time.monotonic() + self.start_timeout
                while (held := _connect_unix(VIRTLOGD_SOCKET)) is None:
                    if time.monotonic() > deadline:
                        raise BackendError(f"virtlogd did not start within {self.start_timeout:g} s")
                    time.sleep(0.05)
        with held:
            yield

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
        self.consoles.close()
        with self._lock:
            vms = list(self._vms.values())
        for vm in vms:
            if vm.transport is not None:
                vm.transport.close()
        with self._conn_lock:
            self._drop_connection()

    # Capabilities -------------------------------------------------------------------------------
    def _host_facts(self) -> _HostFacts:
        """What the host offers, read once (when the first connection opens: at the plant's start if it has
        guests to adopt): plantInfo (every shop's poll) must not wait on libvirtd, whose event loop a guest
        can keep busy for seconds (an agent's flood)."""
        if self._host is None:
            conn = self._connection()
            if self._host is None:
                self._host = self._read_host_facts(conn)
        return self._host

    def _read_host_facts(self, conn: Any) -> _HostFacts:
        """The host's facts, asked of libvirt on ``conn``."""
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
        limit = None
        if self.flavor in ("qemu", "kvm"):
            try:
                limit = int(conn.getMaxVcpus(self._wanted_domain_type()))
            except LibvirtError:
                pass
        return _HostFacts(memory, int(info[2]), arches, limit)

    def _wanted_domain_type(self) -> str:
        if self.flavor == "xen":
            return "xen"
        if self.flavor == "esx":
            return "vmware"
        return "kvm" if self.domain_type == "kvm" else "qemu"

    def capabilities(self) -> Capabilities:
        networks = NIC_KINDS_QEMU if self.flavor in ("qemu", "kvm") else ("segment",)
        channel = {"qemu": "virtio-serial", "kvm": "virtio-serial", "xen": "xen-channel"}.get(self.flavor, "")
        note = NOT_EXERCISED.get(self.flavor, "")
        try:
            memory, cpus, arches, vcpu_limit = self._host_facts()
            max_vcpus = self.max_vcpus or cpus
            if vcpu_limit is not None:
                max_vcpus = min(max_vcpus, vcpu_limit)
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
            networks=networks, channel=channel, publish=self.flavor in ("qemu", "kvm"))

    def _known_accelerator(self) -> str:
        if self.flavor in ("xen", "esx"):
            return self.flavor
        if self.domain_type != "auto":
            return "kvm" if self.domain_type == "kvm" else "tcg"
        if self._decisions:
            return "kvm" if list(self._decisions.values())[-1] == "kvm" else "tcg"
        return "auto"

    # The domain type ------------------------------------------------------------------------------
    # The domain type ------------------------------------------------------------------------------
    def domain_type_for(self, spec: GuestSpec) -> str:
        """'qemu' or 'kvm' for ``spec`` (``auto``: libvirt must offer KVM and a probe boot must succeed)."""
        if self.domain_type != "auto":
            return self.domain_type
        with self._probe_lock:
            key = (str(spec.kernel), spec.machine)
            if key not in self._decisions:
                arches = self._host_facts().arches
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
        with tempfile.TemporaryDirectory(prefix="vmshop-probe-", dir="/tmp") as tmp:
            probe = GuestSpec(vm_id=f"probe-{os.getpid()}-{threading.get_ident()}", disk=Path(tmp) / "none",
                              memory=128, vcpus=1, run_dir=Path(tmp), kernel=spec.kernel,
                              initrd=spec.initrd, cmdline=PROBE_CMDLINE, machine=spec.machine, arch=spec.arch)
            xml = _without_disk_and_share(domain_xml(probe, DomainOptions(
                domain_type="kvm", dac_label=self._label(), pass_fds=False)))
            conn = self._connection()
            try:
                with self._virtlogd_held():
                    domain = conn.createXML(xml, libvirt.VIR_DOMAIN_START_AUTODESTROY
                                            | libvirt.VIR_DOMAIN_START_PAUSED)
            except LibvirtError as exc:
                log.info("KVM probe could not start: %s", _words(exc))
                self._remove_domain_log(domain_name(probe.vm_id))  # libvirt wrote why QEMU failed there
                return False
            try:
                return _read_until(console_socket(probe), PROBE_MARKER, time.monotonic() + self.probe_timeout,
                                   domain.resume)
            finally:
                try:
                    domain.destroy()
                except LibvirtError:
                    pass  # it powered itself off (the probe's init does), or is gone already
                self._remove_domain_log(domain_name(probe.vm_id))

    # The contract ---------------------------------------------------------------------------------
    def _label(self) -> str | None:
        """The DAC label QEMU runs with (``+uid:+gid``), None for the daemon's own; BackendError if no such user."""
        if self.dac_label == "daemon":
            return None
        if ":" in self.dac_label:
            label_ids(self.dac_label)
            return self.dac_label
        try:
            user = pwd.getpwnam(self.dac_label)
        except KeyError:
            raise BackendError(f"the user {self.dac_label!r} that QEMU should run as does not exist "
                               "(scripts/setup_host.sh makes vmshop-qemu; dac_label=+0:+0 runs guests as root)"
                               ) from None
        return f"+{user.pw_uid}:+{user.pw_gid}"

    def _options_for(self, spec: GuestSpec) -> DomainOptions:
        options = replace(self.xml_options, dac_label=self._label())
        if self.flavor == "qemu":
            options = replace(options, domain_type=self.domain_type_for(spec))
        return options

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
            self._forget(spec.vm_id)
            self._vms[spec.vm_id] = _VM(spec)
            self._ended.discard(spec.vm_id)
        domain = None
        try:
            if self.flavor == "esx":
                raise BackendError(NOT_EXERCISED["esx"])
            options = self._options_for(spec)
            chain = backing_chain(Path(spec.disk)) if options.pass_fds else None
            xml = domain_xml(spec, options, chain)
            Path(spec.run_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(spec.run_dir, 0o700)
            self._remove_console_files(spec)
            with self._virtlogd_held():
                domain = self._call(f"define {domain_name(spec.vm_id)}", lambda c: c.defineXML(xml))
                self._create(domain, spec, options, chain)
            if not domain_still_active(domain):
                raise BackendError(f"domain {domain_name(spec.vm_id)} stopped right after it started: "
                                   f"{console_tail(console_path(spec), 600)}")
        except BaseException:
            try:
                if domain is not None:
                    self._remove_domain(domain)
            finally:
                self.consoles.forget(spec.vm_id)
                self._remove_files(spec)
                with self._lock:
                    self._vms.pop(spec.vm_id, None)
            raise

    def _create(self, domain: Any, spec: GuestSpec, options: DomainOptions, chain: tuple[DiskLayer, ...] | None
                ) -> None:
        """Start the defined domain paused, give it its descriptors and console keeper, then let it run."""
        name = domain_name(spec.vm_id)
        flags = 0
        opened: list[int] = []
        try:
            if chain is not None:
                # The disk chain as descriptors the plant opened (see the module docstring): libvirt chowns nothing.
                files = [(DISK_FD_GROUP, str(spec.disk), os.O_RDWR)]
                files += [(base_fd_group(depth), layer.path, os.O_RDONLY) for depth, layer in enumerate(chain)]
                if spec.seed is not None:
                    files.append((SEED_FD_GROUP, str(spec.seed), os.O_RDONLY))
                for group, path, mode in files:
                    opened.append(os.open(path, mode | os.O_CLOEXEC))
                    fd = opened[-1]
                    self._call(f"pass the disk of {name}", functools.partial(_associate, domain, group, fd))
            if libvirt is not None and self.flavor in ("qemu", "kvm"):
                flags = libvirt.VIR_DOMAIN_START_PAUSED
            self._call(f"start {name}", lambda c: domain.createWithFlags(flags))
        except OSError as exc:
            raise BackendError(f"VM {spec.vm_id}: cannot open its disk: {exc.strerror}: {exc.filename}") from None
        finally:
            for fd in opened:
                os.close(fd)
        if not flags:
            return
        self._plug_segments(domain, spec, options)
        if is_local(self.uri):
            socket_path = console_socket(spec)
            try:
                os.chmod(socket_path, 0o600)  # libvirt makes it 0775 (its owner, QEMU's user, needs nothing more)
            except OSError as exc:
                raise BackendError(f"VM {spec.vm_id}: libvirt made no console socket: {exc.strerror}") from None
            self.consoles.keep(spec.vm_id, socket_path, console_path(spec))
        self._call(f"resume {name}", lambda c: domain.resume())

    def _plug_segments(self, domain: Any, spec: GuestSpec, options: DomainOptions) -> None:
        """Plug each 'segment' NIC into its switch here and hand QEMU the port (see the module docstring)."""
        for index in hotplugged_segments(spec, options):
            nic = spec.nics[index]
            ctl, data = vdeplug.plug(Path(str(nic.switch)), f"vmshop {spec.vm_id}")
            try:
                _monitor(domain, {"execute": "getfd", "arguments": {"fdname": f"vmshop-vde{index}"}},
                         (data.fileno(),))
                # QEMU keeps the stream socket under this name for its whole life: the port lives as long as QEMU.
                _monitor(domain, {"execute": "getfd", "arguments": {"fdname": f"vmshop-vdectl{index}"}},
                         (ctl.fileno(),))
            finally:
                ctl.close()
                data.close()
            _monitor(domain, {"execute": "netdev_add", "arguments": {
                "type": "dgram", "id": f"vmshop-net{index}", "local": {"type": "fd", "str": f"vmshop-vde{index}"}}})
            bus = segment_port_alias(index) if is_q35(spec.machine) else None
            _monitor(domain, {"execute": "device_add", "arguments": nic_device(nic, index, bus)})

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
            need_file(spec.seed, "seed")
            if spec.data_dir is not None and not Path(spec.data_dir).is_dir():
                raise BackendError(f"VM {spec.vm_id}: the data directory {spec.data_dir} does not exist")
            label = self._label() if self.flavor in ("qemu", "kvm") else None
            if label is not None:
                # QEMU opens these itself, as its unprivileged user: say which directory stops it, not QEMU's words.
                uid, gid = label_ids(label)
                for path, what, directory in ((spec.kernel, "kernel", False), (spec.initrd, "initrd", False),
                                              (spec.data_dir, "data directory", True)):
                    why = unreachable(Path(path), uid, gid, directory) if path is not None else ""
                    if why:
                        raise BackendError(f"VM {spec.vm_id}: QEMU runs as {label} and cannot read the {what} "
                                           f"{path}: {why}")
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
        arches = self._host_facts().arches
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

    def _remove_console_files(self, spec: GuestSpec) -> None:
        log_path = console_path(spec)
        for path in (console_socket(spec), log_path, log_path.with_name(log_path.name + ".1")):
            path.unlink(missing_ok=True)

    def _remove_files(self, spec: GuestSpec) -> None:
        """Remove the console's files, ``run_dir`` if that empties it, and (local daemon) libvirt's domain log."""
        self._remove_console_files(spec)
        try:
            Path(spec.run_dir).rmdir()
        except OSError:
            pass
        self._remove_domain_log(domain_name(spec.vm_id))

    def _remove_domain_log(self, name: str) -> None:
        if is_local_system(self.uri):
            for path in DOMAIN_LOG_DIR.glob(f"{glob_escape(name)}.log*"):  # virtlogd's rotated ones too
                try:
                    path.unlink(missing_ok=True)
                except OSError as exc:
                    log.info("cannot remove libvirt's log %s: %s", path, exc)

    def _forget(self, vm_id: str) -> None:
        """Drop what the backend holds for ``vm_id`` (its agent's connection, its console keeper); under _lock."""
        vm = self._vms.get(vm_id)
        if vm is not None and vm.transport is not None:
            vm.transport.close()
        self.consoles.forget(vm_id)

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
            with self._lock:
                self._forget(vm_id)
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
            self._forget(spec.vm_id)
            self._vms[spec.vm_id] = _VM(spec)
            self._ended.discard(spec.vm_id)
        try:
            domain = self._lookup(spec.vm_id)
            if domain is None or not self._ours(domain, spec):
                return False
            state = int(domain.state()[0])
            if state == libvirt.VIR_DOMAIN_PAUSED and self.flavor in ("qemu", "kvm"):
                log.info("VM %s was left paused (a publish a plant restart cut short): resumed", spec.vm_id)
                domain.resume()
                state = int(domain.state()[0])
            running = translate_state(state) == VMState.RUNNING
        except (BackendError, LibvirtError) as exc:
            log.warning("VM %s: cannot adopt it through libvirt: %s", spec.vm_id, exc)
            return False
        if running and is_local(self.uri) and self.flavor in ("qemu", "kvm"):
            self.consoles.keep(spec.vm_id, console_socket(spec), console_path(spec))
        return running

    def pause(self, vm_id: str, timeout: float = 30.0) -> None:
        """``virDomainSuspend``: for QEMU domains QMP ``stop``, which drains and flushes the disks (rule 11)."""
        if self.flavor not in ("qemu", "kvm"):
            super().pause(vm_id, timeout)
        domain, vm = self._domain_of(vm_id)
        with vm.lock:
            try:
                domain.suspend()
                state = int(domain.state()[0])
            except LibvirtError as exc:
                raise BackendError(f"libvirt ({self.uri}): cannot pause {domain_name(vm_id)}: {_words(exc)}") \
                    from None
        if state != libvirt.VIR_DOMAIN_PAUSED:
            raise BackendError(f"VM {vm_id} did not pause (libvirt state {state})")

    def resume(self, vm_id: str, timeout: float = 30.0) -> None:
        if self.flavor not in ("qemu", "kvm"):
            super().resume(vm_id, timeout)
        domain, vm = self._domain_of(vm_id)
        with vm.lock:
            try:
                if int(domain.state()[0]) == libvirt.VIR_DOMAIN_PAUSED:
                    domain.resume()
            except LibvirtError as exc:
                if _no_domain(exc):
                    return
                raise BackendError(f"libvirt ({self.uri}): cannot resume {domain_name(vm_id)}: {_words(exc)}") \
                    from None

    def _domain_of(self, vm_id: str) -> tuple[Any, Any]:
        """The libvirt domain of a VM this backend controls, and its bookkeeping; BackendError if there is none."""
        with self._lock:
            vm = self._vms.get(vm_id)
        domain = self._lookup(vm_id) if vm is not None else None
        if vm is None or domain is None or not self._ours(domain, vm.spec):
            raise BackendError(f"VM {vm_id} is not running under this backend")
        return domain, vm

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

    def agent(self, vm_id: str) -> AgentTransport:
        """The guest's agent through libvirt's API, on a libvirt connection of this VM's own (rule 8)."""
        with self._lock:
            vm = self._vms.get(vm_id)
            if vm is None:
                raise BackendError(f"VM {vm_id} is not controlled by this backend")
            if vm.transport is None:
                vm.transport = LibvirtAgentTransport(vm_id, functools.partial(self._agent_domain, vm.spec),
                                                     _agent_command, agent_channel_connected)
            return vm.transport

    def _agent_domain(self, spec: GuestSpec) -> Any:
        """The VM's domain on a new connection (the agent transport's own); BackendError if it is not this VM's."""
        conn = self._open()
        try:
            domain = conn.lookupByName(domain_name(spec.vm_id))
            if not self._ours(domain, spec):
                raise BackendError(f"domain {domain_name(spec.vm_id)} is not the one VM {spec.vm_id} made")
        except BaseException:
            conn.close()
            raise
        return domain

    # Vendor extras ----------------------------------------------------------------------------
    def ex_console(self, vm_id: str) -> str:
        """The tail of the guest's serial console ('' for an unknown VM)."""
        vm = self._vms.get(vm_id)
        return console_tail(console_path(vm.spec), 8000) if vm is not None else ""

    def ex_domain_xml(self, spec: GuestSpec) -> str:
        """The domain XML ``start`` would define for ``spec`` (no connection needed for a fixed domain type)."""
        options = self.xml_options
        if self.flavor == "qemu" and self.domain_type != "auto":
            options = replace(options, domain_type=self.domain_type)
        chain = backing_chain(Path(spec.disk)) if options.pass_fds and Path(spec.disk).is_file() else ()
        return domain_xml(spec, options, chain)


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def domain_still_active(domain: Any) -> bool:
    """Whether ``domain`` still runs (False once libvirt has no such domain)."""
    try:
        return bool(domain.isActive())
    except LibvirtError:
        return False


def _read_until(path: Path, marker: str, deadline: float, then: Callable[[], object]) -> bool:
    """Connect to the console socket ``path``, call ``then()``, read until ``marker`` shows or ``deadline``."""
    seen = b""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.settimeout(max(deadline - time.monotonic(), 0.1))
            sock.connect(str(path))
            then()
            while marker.encode() not in seen:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                sock.settimeout(left)
                chunk = sock.recv(4096)
                if not chunk:
                    return False
                seen = (seen + chunk)[-8192:]
        except (OSError, LibvirtError):
            return False
    return True


def _without_disk_and_share(xml: str) -> str:
    """The probe's domain: no disk, no share (it only boots the kernel and initramfs)."""
    root = parse_xml(xml, what="probe domain")
    devices = root.find("devices")
    if devices is not None:
        for element in list(devices):
            if element.tag in ("disk", "filesystem"):
                devices.remove(element)
    return etree.tostring(root, encoding="unicode")
