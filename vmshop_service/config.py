"""The shop's configuration: ``configuration_vmshop.xml``.

Read with the hardened loader and validated against
``xsd/vmshop-config-1.0.xsd``; relative paths are relative to the file's
directory. :func:`write_config` writes what :func:`load_config` reads back.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lxml import etree

from vmshop_common.addresses import read_addresses
from vmshop_common.dagxml import validate_against
from vmshop_common.errors import ConfigurationError
from vmshop_common.xmlload import parse_xml_file

CONFIG_NS = "urn:vmshop:vmshop-config:1"
CONFIG_ROOT = f"{{{CONFIG_NS}}}vmshop"
CONFIG_XSD = "vmshop-config-1.0.xsd"
CONFIG_FILE = "configuration_vmshop.xml"


@dataclass(frozen=True)
class ShopConfig:
    """A shop's configuration; paths are absolute. An empty ``public_url`` is derived when listening."""

    database: Path
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

    def plants(self) -> list[str]:
        """The plants' endpoint URLs from the plant list file (ConfigurationError if it is bad)."""
        return [f"http://{host}:{port}/" if ":" not in host else f"http://[{host}]:{port}/"
                for host, port in read_addresses(self.plants_file)]


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

    return ShopConfig(
        name=root.get("name", "vmshop"), listen_host=str(get("listen", "host", "127.0.0.1")),
        listen_port=int(str(get("listen", "port", "8080"))), public_url=str(get("public", "url", "")),
        database=path_of("database", "path"), plants_file=path_of("plants", "file"),
        bid_timeout=float(str(get("timeouts", "bid", "10"))),
        create_timeout=float(str(get("timeouts", "create", "900"))),
        call_timeout=float(str(get("timeouts", "call", "60"))),
        poll_interval=float(str(get("intervals", "poll", "5"))),
        lease_interval=float(str(get("intervals", "lease", "1"))),
    )


def write_config(config: ShopConfig, path: str | Path) -> Path:
    """Write ``config`` to ``path`` (atomically) and return the path."""
    element = etree.Element(CONFIG_ROOT, nsmap={None: CONFIG_NS}, name=config.name)

    def add(local: str, **attributes: object) -> None:
        etree.SubElement(element, f"{{{CONFIG_NS}}}{local}", {k: str(v) for k, v in attributes.items()})

    add("listen", host=config.listen_host, port=config.listen_port)
    if config.public_url:
        add("public", url=config.public_url)
    add("database", path=config.database)
    add("plants", file=config.plants_file)
    add("timeouts", bid=config.bid_timeout, create=config.create_timeout, call=config.call_timeout)
    add("intervals", poll=config.poll_interval, lease=config.lease_interval)
    etree.indent(element, space="  ")
    target = Path(path)
    temporary = target.with_name(target.name + ".tmp")
    temporary.write_bytes(b'<?xml version="1.0" encoding="UTF-8"?>\n'
                          b"<!-- VMShop configuration (xsd/vmshop-config-1.0.xsd); written by "
                          b"scripts/configure_vmshop.py -->\n" + etree.tostring(element) + b"\n")
    temporary.replace(target)
    return target
