"""The shop's configuration: ``configuration_vmshop.xml``.

Read with the hardened loader and validated against
``xsd/vmshop-config-1.0.xsd``; relative paths are relative to the file's
directory. :func:`write_config` writes what :func:`load_config` reads back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lxml import etree

from vmshop_common.addresses import read_addresses
from vmshop_common.dagxml import validate_against
from vmshop_common.errors import ConfigurationError
from vmshop_common.lifecycle import DEFAULT_GRACE
from vmshop_common.metrics import DEFAULT_REFRESH
from vmshop_common.security import ServerSecurity, read_security, url, write_security
from vmshop_common.xmlload import parse_xml_file

from .quota import Limits, QuotaConfig

CONFIG_NS = "urn:vmshop:vmshop-config:1"
CONFIG_ROOT = f"{{{CONFIG_NS}}}vmshop"
CONFIG_XSD = "vmshop-config-1.0.xsd"
CONFIG_FILE = "configuration_vmshop.xml"


@dataclass(frozen=True)
class ShopConfig:
    """A shop's configuration; paths are absolute. An empty ``public_url`` is derived when listening."""

    database: Path | None  # the SQLite registry (None: on PostgreSQL)
    plants_file: Path
    name: str = "vmshop"
    listen_host: str = "127.0.0.1"
    listen_port: int = 8080
    public_url: str = ""
    bid_timeout: float = 10.0
    create_timeout: float = 900.0
    call_timeout: float = 60.0
    poll_interval: float = 5.0
    lease_interval: float = 1.0
    shutdown_grace: float = DEFAULT_GRACE
    security: ServerSecurity = ServerSecurity()
    quotas: QuotaConfig = field(default_factory=QuotaConfig)
    wsse_users: Path | None = None  # users file for WS-Security UsernameTokens (None: certificates only)
    wsse_window: float = 300.0
    metrics: bool = True  # Prometheus metrics at /metrics (admin role; vmshop_common/metrics.py)
    metrics_refresh: float = DEFAULT_REFRESH
    postgresql: str = ""  # a libpq connection string (no password): the registry is on PostgreSQL
    database_password_file: Path | None = None  # the PostgreSQL password, alone in a file
    dead_after: float = 60.0  # seconds without a heartbeat after which a shop sharing the registry counts dead
    bids: str = "offers"  # 'offers': priced here from the plants' offers; 'live': every plant asked per request
    offer_margin: float = 0.25  # a plant declines a create when its live cost exceeds its offer's by more
    offer_refresh: float = 60.0  # seconds between pulls of every plant's offer
    offer_penalty: float = 300.0  # seconds a plant whose offer proved wrong is ranked after the others

    def plants(self) -> list[str]:
        """The plants' endpoint URLs from the plant list file (ConfigurationError if it is bad): https, or
        http when the shop itself is insecure."""
        return plant_urls(self.plants_file, self.security.scheme)


def plant_urls(plants_file: Path, scheme: str) -> list[str]:
    """The endpoint URLs of the plants a plant list file names."""
    return [url(scheme, host, port) for host, port in read_addresses(plants_file)]


def _limit(value: str | None) -> int | None:
    return None if value is None or value == "unlimited" else int(value)


def _quotas(element: etree._Element | None) -> QuotaConfig:
    if element is None:
        return QuotaConfig()
    names = ("vms", "memory", "vcpus")
    default = Limits(**{name: _limit(element.get(name)) for name in names})
    identities = {}
    for quota in element.iterchildren(f"{{{CONFIG_NS}}}quota"):
        own = {name: _limit(quota.get(name)) if quota.get(name) is not None else getattr(default, name)
               for name in names}
        identities[quota.get("identity")] = Limits(**own)
    return QuotaConfig(default=default, identities=identities)


def _write_limits(element: etree._Element, limits: Limits) -> None:
    for name in ("vms", "memory", "vcpus"):
        value = getattr(limits, name)
        element.set(name, "unlimited" if value is None else str(value))


def load_config(path: str | Path) -> ShopConfig:
    """Read and check ``configuration_vmshop.xml``."""
    source = Path(path).absolute()
    what = f"shop configuration {source}"
    try:
        root = parse_xml_file(source, what=what, expected_root=CONFIG_ROOT)
    except OSError as exc:
        raise ConfigurationError(f"cannot read the {what}: {exc.strerror or exc}") from None
    validate_against(CONFIG_XSD, root, what)

    def get(local: str, attribute: str, default: str | None = None) -> str | None:
        element = root.find(f"{{{CONFIG_NS}}}{local}")
        return default if element is None else element.get(attribute, default)

    def path_of(local: str, attribute: str) -> Path:
        value = Path(str(get(local, attribute)))
        return value if value.is_absolute() else source.parent / value

    postgresql = str(get("database", "postgresql", "") or "")
    if bool(postgresql) == (get("database", "path") is not None):
        raise ConfigurationError(f"{what}: <database> names either an SQLite path or a postgresql connection "
                                 "string (exactly one)")
    if postgresql:
        check_conninfo(postgresql, what)

    config = ShopConfig(
        name=root.get("name", "vmshop"), listen_host=str(get("listen", "host", "127.0.0.1")),
        listen_port=int(str(get("listen", "port", "8080"))), public_url=str(get("public", "url", "")),
        database=None if postgresql else path_of("database", "path"), plants_file=path_of("plants", "file"),
        postgresql=postgresql,
        database_password_file=path_of("database", "password-file") if get("database", "password-file") else None,
        dead_after=float(str(get("database", "dead-after", "60"))),
        bid_timeout=float(str(get("timeouts", "bid", "10"))),
        create_timeout=float(str(get("timeouts", "create", "900"))),
        call_timeout=float(str(get("timeouts", "call", "60"))),
        poll_interval=float(str(get("intervals", "poll", "5"))),
        lease_interval=float(str(get("intervals", "lease", "1"))),
        shutdown_grace=float(str(get("shutdown", "grace", str(DEFAULT_GRACE)))),
        security=read_security(root, CONFIG_NS, source.parent, what),
        quotas=_quotas(root.find(f"{{{CONFIG_NS}}}quotas")),
        wsse_users=path_of("wsse", "users") if get("wsse", "users") else None,
        wsse_window=float(str(get("wsse", "window", "300"))),
        metrics=str(get("metrics", "enabled", "true")) in ("true", "1"),
        metrics_refresh=float(str(get("metrics", "refresh", str(DEFAULT_REFRESH)))),
        bids=root.get("bids", "offers"),
        offer_margin=float(str(get("offers", "margin", "0.25"))),
        offer_refresh=float(str(get("offers", "refresh", "60"))),
        offer_penalty=float(str(get("offers", "penalty", "300"))),
    )
    if config.wsse_users is not None and config.security.insecure:
        raise ConfigurationError(f"{what}: WS-Security UsernameTokens are accepted only over TLS, and this "
                                 "shop listens insecure")
    return config


def check_conninfo(conninfo: str, what: str) -> None:
    """Refuse a PostgreSQL connection string libpq cannot read, or one that carries a password (which belongs
    in the password file, never in a file that is shown and logged); the message never repeats the string."""
    import psycopg.conninfo

    try:
        parts = psycopg.conninfo.conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError:
        raise ConfigurationError(f"{what}: the postgresql connection string is not one libpq reads") from None
    if "password" in parts:
        raise ConfigurationError(f"{what}: the postgresql connection string carries a password; put it alone in "
                                 "the file <database password-file=...> names")


def write_config(config: ShopConfig, path: str | Path) -> Path:
    """Write ``config`` to ``path`` (atomically) and return the path."""
    element = etree.Element(CONFIG_ROOT, nsmap={None: CONFIG_NS}, name=config.name)
    if config.bids != "offers":
        element.set("bids", config.bids)

    def add(local: str, **attributes: object) -> None:
        etree.SubElement(element, f"{{{CONFIG_NS}}}{local}", {k: str(v) for k, v in attributes.items()})

    add("listen", host=config.listen_host, port=config.listen_port)
    write_security(config.security, element, CONFIG_NS)
    if config.public_url:
        add("public", url=config.public_url)
    if config.postgresql:
        database: dict[str, object] = {"postgresql": config.postgresql}
        if config.database_password_file is not None:
            database["password-file"] = config.database_password_file
        if config.dead_after != 60.0:
            database["dead-after"] = f"{config.dead_after:g}"
        add("database", **database)
    else:
        add("database", path=config.database)
    add("plants", file=config.plants_file)
    add("timeouts", bid=config.bid_timeout, create=config.create_timeout, call=config.call_timeout)
    add("intervals", poll=config.poll_interval, lease=config.lease_interval)
    if (config.offer_margin, config.offer_refresh, config.offer_penalty) != (0.25, 60.0, 300.0):
        add("offers", margin=f"{config.offer_margin:g}", refresh=f"{config.offer_refresh:g}",
            penalty=f"{config.offer_penalty:g}")
    if config.shutdown_grace != DEFAULT_GRACE:
        add("shutdown", grace=f"{config.shutdown_grace:g}")
    if not config.metrics or config.metrics_refresh != DEFAULT_REFRESH:
        add("metrics", enabled=str(config.metrics).lower(), refresh=f"{config.metrics_refresh:g}")
    if config.wsse_users is not None:
        add("wsse", users=config.wsse_users, window=config.wsse_window)
    if config.quotas.default != Limits() or config.quotas.identities:
        quotas = etree.SubElement(element, f"{{{CONFIG_NS}}}quotas")
        _write_limits(quotas, config.quotas.default)
        for identity, limits in sorted(config.quotas.identities.items()):
            quota = etree.SubElement(quotas, f"{{{CONFIG_NS}}}quota", identity=identity)
            _write_limits(quota, limits)
    etree.indent(element, space="  ")
    target = Path(path)
    temporary = target.with_name(target.name + ".tmp")
    temporary.write_bytes(b'<?xml version="1.0" encoding="UTF-8"?>\n'
                          b"<!-- VMShop configuration (xsd/vmshop-config-1.0.xsd); written by "
                          b"scripts/configure_vmshop.py -->\n" + etree.tostring(element) + b"\n")
    temporary.replace(target)
    return target
