"""The plant's configuration: ``configuration_vmplant.xml``.

:func:`load_config` reads it with the hardened loader, validates it against
``xsd/vmplant-config-1.0.xsd`` and checks what the schema can't say; a
relative path in it is taken relative to the file's own directory, so every
path of a :class:`PlantConfig` is absolute. :func:`write_config` writes a
file that :func:`load_config` reads back into an equal configuration.
Errors are :class:`ConfigurationError` or the loader's and schema's own
errors (:class:`SchemaInvalidError`, ...), each naming its line.
"""

from __future__ import annotations

import ipaddress
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from lxml import etree

from vmshop_common.addresses import read_addresses
from vmshop_common.dagxml import validate_against
from vmshop_common.errors import ConfigurationError, Problem
from vmshop_common.lifecycle import DEFAULT_GRACE
from vmshop_common.metrics import DEFAULT_REFRESH
from vmshop_common.security import ServerSecurity, read_security, url, write_security
from vmshop_common.xmlload import parse_xml, parse_xml_file

from .segment import default_switch_dir

CONFIG_NS = "urn:vmshop:vmplant-config:1"
CONFIG_ROOT = f"{{{CONFIG_NS}}}vmplant"
CONFIG_XSD = "vmplant-config-1.0.xsd"
CONFIG_FILE = "configuration_vmplant.xml"
NETWORK_MODES = ("vde", "none")
DEFAULT_PORT = 8090
DEFAULT_CAPACITY_VMS = 8
DEFAULT_CAPACITY_MEMORY = 4096
#: Seconds between two looks at the running guests (see Plant.check_guests).
DEFAULT_WATCH_INTERVAL = 5.0
#: Per-VM bounds a plant enforces by default (``<limits>``): an action's timeout, the sum of the timeouts of
#: one create's or configure's actions (seconds), and a VM's virtual disk (GiB; its overlay never grows beyond).
DEFAULT_MAX_ACTION_SECONDS = 3600
DEFAULT_MAX_DAG_SECONDS = 4 * 3600
DEFAULT_MAX_DISK_GIB = 64
#: Work a plant takes on at once (``<work>``): threads for requests, requests waiting for one, creates at once.
DEFAULT_THREADS = 64
DEFAULT_QUEUE = 64
DEFAULT_CREATES = 8
RECORDS_FILE = "records.sqlite3"
#: Images fetched from peers (``<peers>``): MiB the fetched images may hold in all before the least recently used
#: are evicted, the bandwidth (MiB/s) a transfer is estimated at before one was measured, seconds between two
#: reads of the peers' catalogs.
DEFAULT_CACHE_MIB = 4096
DEFAULT_BANDWIDTH_MIB = 50.0
DEFAULT_PEERS_REFRESH = 60.0
MAX_PEERS = 32
_WILDCARDS = ("0.0.0.0", "::", "")


@dataclass(frozen=True)
class PlantConfig:
    """A plant's configuration; every path is absolute.

    ``public_url`` is the address the plant's WSDL names; it is empty when
    the plant listens on a wildcard host or on port 0 and none was given
    (the service then derives it at run time). ``switch_dir`` is set when
    ``network_mode`` is 'vde' (default: ``state_dir/switch``); ``ip_file`` is
    set when it is 'vde'.
    """

    name: str
    listen_host: str
    listen_port: int
    public_url: str
    warehouse_dir: Path
    state_dir: Path
    backend: str = "qemu"
    backend_options: dict[str, str] = field(default_factory=dict, hash=False)
    network_mode: str = "none"
    ip_file: Path | None = None
    switch_dir: Path | None = None
    capacity_vms: int = DEFAULT_CAPACITY_VMS
    capacity_memory: int = DEFAULT_CAPACITY_MEMORY
    datastore: Path | None = None
    shops_file: Path | None = None
    watch_interval: float = DEFAULT_WATCH_INTERVAL
    shutdown_grace: float = DEFAULT_GRACE
    max_action_seconds: int = DEFAULT_MAX_ACTION_SECONDS
    max_dag_seconds: int = DEFAULT_MAX_DAG_SECONDS
    max_disk: int = DEFAULT_MAX_DISK_GIB
    threads: int = DEFAULT_THREADS
    queue: int = DEFAULT_QUEUE
    max_creates: int = DEFAULT_CREATES
    security: ServerSecurity = ServerSecurity()
    metrics: bool = True  # Prometheus metrics at /metrics (admin role; vmshop_common/metrics.py)
    metrics_refresh: float = DEFAULT_REFRESH
    #: Where images a request needs may be fetched from (plants' URLs, or warehouse servers' with the same layout:
    #: vmplant_service/transfer.py), and the cache of fetched images.
    peers: tuple[str, ...] = ()
    cache_mib: int = DEFAULT_CACHE_MIB
    bandwidth_mib: float = DEFAULT_BANDWIDTH_MIB
    peers_refresh: float = DEFAULT_PEERS_REFRESH
    #: Whether this plant serves its owners' movable private images to peer plants, and whether it fetches them
    #: from its peers (``<peers serve-movable fetch-movable>``; both off: public images only move).
    serve_movable: bool = False
    fetch_movable: bool = False
    source: Path | None = field(default=None, compare=False)

    @property
    def records_path(self) -> Path:
        """The plant's SQLite records, in its state directory."""
        return self.state_dir / RECORDS_FILE

    def shops(self) -> list[tuple[str, int]]:
        """The shops this plant notifies (none without a shops file); ConfigurationError if bad. (Which shops
        it obeys is its authorisation file's to say.)"""
        return read_addresses(self.shops_file) if self.shops_file is not None else []


def default_public_url(host: str, port: int, scheme: str = "https") -> str:
    """``https://host:port/`` (``http`` for an insecure plant; brackets for IPv6), or '' for a wildcard host or
    port 0."""
    if host in _WILDCARDS or port == 0:
        return ""
    return url(scheme, host, port)


def load_config(path: str | Path) -> PlantConfig:
    """Read and check the configuration file ``path`` (see the module docstring)."""
    source = Path(path).absolute()
    what = f"plant configuration {source}"
    try:
        root = parse_xml_file(source, what=what, expected_root=CONFIG_ROOT)
    except OSError as exc:
        raise ConfigurationError(f"cannot read the {what}: {exc.strerror or exc}") from None
    return _config_from_root(root, source, what)


def config_from_xml(data: bytes | str, source: str | Path) -> PlantConfig:
    """Check the configuration text ``data`` as if it were the file ``source`` (paths relative to its directory)."""
    source = Path(source).absolute()
    what = f"plant configuration {source}"
    return _config_from_root(parse_xml(data, what=what, expected_root=CONFIG_ROOT), source, what)


def _config_from_root(root: etree._Element, source: Path, what: str) -> PlantConfig:
    validate_against(CONFIG_XSD, root, what)
    base = source.parent

    def element(local: str) -> etree._Element | None:
        return root.find(f"{{{CONFIG_NS}}}{local}")

    def path_of(local: str, attribute: str) -> Path | None:
        found = element(local)
        if found is None or found.get(attribute) is None:
            return None
        return _absolute(base, found.get(attribute))

    def fail(message: str, at: etree._Element | None) -> ConfigurationError:
        line = at.sourceline if at is not None else root.sourceline
        return ConfigurationError(f"{what}: {message}", [Problem(message, line)])

    listen = element("listen")
    assert listen is not None  # required by the schema
    host, port = listen.get("host", "127.0.0.1"), int(listen.get("port"))
    if ":" in host and not _is_ipv6(host):
        raise fail(f"'{host}' is not a host name or an IP address", listen)
    security = read_security(root, CONFIG_NS, base, what)
    public = element("public")
    public_url = public.get("url") if public is not None else default_public_url(host, port, security.scheme)
    if public is not None:
        parts = urlsplit(public_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise fail(f"the public URL '{public_url}' is not an http(s) URL with a host", public)
    backend = element("backend")
    options: dict[str, str] = {}
    if backend is not None:
        for option in backend.iterchildren(f"{{{CONFIG_NS}}}option"):
            options[option.get("name")] = option.get("value")
    network = element("network")
    mode = network.get("mode") if network is not None else "none"
    ip_file = path_of("network", "ipfile")
    switch_dir = path_of("network", "switch-dir")
    state_dir = path_of("state", "dir")
    assert state_dir is not None
    if mode == "vde":
        if ip_file is None:
            raise fail("network mode 'vde' needs an ipfile (the address pool)", network)
        switch_dir = switch_dir or default_switch_dir(state_dir)
    capacity = element("capacity")
    watch = element("watch")
    shutdown = element("shutdown")
    limits = element("limits")
    work = element("work")
    metrics = element("metrics")
    peers_el = element("peers")
    peers: list[str] = []
    if peers_el is not None:
        for peer in peers_el.iterchildren(f"{{{CONFIG_NS}}}peer"):
            parts = urlsplit(peer.get("url"))
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise fail(f"the peer URL '{peer.get('url')}' is not an http(s) URL with a host", peer)
            if parts.scheme == "http" and not security.insecure:
                raise fail(f"the peer URL '{peer.get('url')}' is plain http: a plant with TLS fetches images over "
                           "https only", peer)
            peers.append(peer.get("url"))

    def limit(name: str, default: int, of: etree._Element | None = limits) -> int:
        return int(of.get(name)) if of is not None and of.get(name) is not None else default

    warehouse_dir = path_of("warehouse", "dir")
    assert warehouse_dir is not None
    return PlantConfig(
        name=root.get("name"), listen_host=host, listen_port=port, public_url=public_url,
        warehouse_dir=warehouse_dir, state_dir=state_dir,
        backend=backend.get("name") if backend is not None else "qemu", backend_options=options,
        network_mode=mode, ip_file=ip_file, switch_dir=switch_dir,
        capacity_vms=int(capacity.get("vms")) if capacity is not None else DEFAULT_CAPACITY_VMS,
        capacity_memory=int(capacity.get("memory")) if capacity is not None else DEFAULT_CAPACITY_MEMORY,
        datastore=path_of("datastore", "dir"), shops_file=path_of("shops", "file"),
        watch_interval=float(watch.get("interval")) if watch is not None else DEFAULT_WATCH_INTERVAL,
        shutdown_grace=float(shutdown.get("grace")) if shutdown is not None else DEFAULT_GRACE,
        max_action_seconds=limit("action-timeout", DEFAULT_MAX_ACTION_SECONDS),
        max_dag_seconds=limit("dag-seconds", DEFAULT_MAX_DAG_SECONDS),
        max_disk=limit("disk", DEFAULT_MAX_DISK_GIB), threads=limit("threads", DEFAULT_THREADS, work),
        queue=limit("queue", DEFAULT_QUEUE, work), max_creates=limit("creates", DEFAULT_CREATES, work),
        metrics=metrics is None or metrics.get("enabled", "true") in ("true", "1"),
        metrics_refresh=float(metrics.get("refresh", DEFAULT_REFRESH)) if metrics is not None else DEFAULT_REFRESH,
        peers=tuple(peers),
        cache_mib=int(peers_el.get("cache", DEFAULT_CACHE_MIB)) if peers_el is not None else DEFAULT_CACHE_MIB,
        bandwidth_mib=(float(peers_el.get("bandwidth", DEFAULT_BANDWIDTH_MIB)) if peers_el is not None
                       else DEFAULT_BANDWIDTH_MIB),
        peers_refresh=(float(peers_el.get("refresh", DEFAULT_PEERS_REFRESH)) if peers_el is not None
                       else DEFAULT_PEERS_REFRESH),
        serve_movable=peers_el is not None and peers_el.get("serve-movable", "false") in ("true", "1"),
        fetch_movable=peers_el is not None and peers_el.get("fetch-movable", "false") in ("true", "1"),
        security=security, source=source)


def _absolute(base: Path, value: str) -> Path:
    """``value`` as an absolute, normalised path (relative to ``base``); symlinks are left alone."""
    return Path(os.path.normpath(base / Path(value).expanduser()))


def _is_ipv6(host: str) -> bool:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        return False
    return True


def config_to_xml(config: PlantConfig) -> str:
    """The configuration file's text for ``config`` (paths written absolute)."""
    ns = CONFIG_NS

    def add(local: str, **attributes: object) -> etree._Element:
        return etree.SubElement(root, f"{{{ns}}}{local}",
                                {k.replace("_", "-"): str(v) for k, v in attributes.items() if v is not None})

    root = etree.Element(f"{{{ns}}}vmplant", {"name": config.name}, nsmap={None: ns})
    add("listen", host=config.listen_host, port=config.listen_port)
    write_security(config.security, root, ns)
    if config.public_url:
        add("public", url=config.public_url)
    add("warehouse", dir=config.warehouse_dir)
    add("state", dir=config.state_dir)
    backend = add("backend", name=config.backend)
    for name, value in config.backend_options.items():
        etree.SubElement(backend, f"{{{ns}}}option", {"name": name, "value": value})
    add("network", mode=config.network_mode, ipfile=config.ip_file, switch_dir=config.switch_dir)
    add("capacity", vms=config.capacity_vms, memory=config.capacity_memory)
    if config.datastore is not None:
        add("datastore", dir=config.datastore)
    if config.shops_file is not None:
        add("shops", file=config.shops_file)
    if config.watch_interval != DEFAULT_WATCH_INTERVAL:
        add("watch", interval=f"{config.watch_interval:g}")
    if config.shutdown_grace != DEFAULT_GRACE:
        add("shutdown", grace=f"{config.shutdown_grace:g}")
    if not config.metrics or config.metrics_refresh != DEFAULT_REFRESH:
        add("metrics", enabled=str(config.metrics).lower(), refresh=f"{config.metrics_refresh:g}")
    limits = {"action_timeout": config.max_action_seconds, "dag_seconds": config.max_dag_seconds,
              "disk": config.max_disk}
    defaults = {"action_timeout": DEFAULT_MAX_ACTION_SECONDS, "dag_seconds": DEFAULT_MAX_DAG_SECONDS,
                "disk": DEFAULT_MAX_DISK_GIB}
    if limits != defaults:
        add("limits", **limits)
    if (config.threads, config.queue, config.max_creates) != (DEFAULT_THREADS, DEFAULT_QUEUE, DEFAULT_CREATES):
        add("work", threads=config.threads, queue=config.queue, creates=config.max_creates)
    if config.peers or config.serve_movable or config.fetch_movable or (
            config.cache_mib, config.bandwidth_mib, config.peers_refresh) != (
            DEFAULT_CACHE_MIB, DEFAULT_BANDWIDTH_MIB, DEFAULT_PEERS_REFRESH):
        movable = {key: "true" for key, on in (("serve-movable", config.serve_movable),
                                                ("fetch-movable", config.fetch_movable)) if on}
        peers = add("peers", cache=config.cache_mib, bandwidth=f"{config.bandwidth_mib:g}",
                    refresh=f"{config.peers_refresh:g}", **movable)
        for peer in config.peers:
            etree.SubElement(peers, f"{{{ns}}}peer", {"url": peer})
    etree.indent(root, space="  ")
    body = etree.tostring(root, encoding="unicode")
    return ('<?xml version="1.0" encoding="UTF-8"?>\n'
            "<!-- VMPlant configuration (xsd/vmplant-config-1.0.xsd); written by scripts/configure_vmplant.py -->\n"
            + body + "\n")


def write_config(config: PlantConfig, path: str | Path) -> Path:
    """Write ``config`` to ``path`` atomically (a file :func:`load_config` reads back equal); returns the path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(config_to_xml(config))
            handle.flush()
            os.fchmod(handle.fileno(), 0o600)
            os.fsync(handle.fileno())
        os.replace(temp, target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return target
