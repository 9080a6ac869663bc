#!/usr/bin/env python3
"""Prepare a VMPlant's configuration file, configuration_vmplant.xml.

As in the original, the script asks for each setting and offers a default
(press Enter to take it). Every setting can also be given as a flag; what a
flag gives is not asked. With --yes, or when standard input is not a
terminal, the defaults are taken for everything not given, without asking
(--interactive asks even then).

It writes the configuration (default: ./configuration_vmplant.xml) and
reads it back to check it. With network mode 'vde' and no IP pool file yet,
it writes a fresh pool (default 192.168.77.0/24, addresses .10 to .73,
bridge vmshop0). If the shops file does not exist it writes one listing
127.0.0.1:8080. The plant serves over TLS (--tls-cert, --tls-key, --tls-ca;
default pki/NAME.pem, pki/NAME.key, pki/ca.pem next to the output, made by
vmshop-ca) and takes calls from the shops and admins its authorisation file
maps (--authorization; written with a header if missing); --insecure
instead serves plain HTTP on loopback, to anyone.

    python scripts/configure_vmplant.py                      # asks
    python scripts/configure_vmplant.py --yes --port 8091    # defaults but the port

Exit status: 0 done, 1 a setting or a file is wrong, 2 bad command line.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from vmplant_service.config import (
    CONFIG_FILE,
    DEFAULT_BANDWIDTH_MIB,
    DEFAULT_CACHE_MIB,
    DEFAULT_CAPACITY_MEMORY,
    DEFAULT_CAPACITY_VMS,
    DEFAULT_CREATES,
    DEFAULT_PEERS_REFRESH,
    DEFAULT_PORT,
    DEFAULT_QUEUE,
    DEFAULT_THREADS,
    DEFAULT_WATCH_INTERVAL,
    NETWORK_MODES,
    PlantConfig,
    config_from_xml,
    config_to_xml,
    default_public_url,
    write_config,
)
from vmplant_service.ippool import write_pool
from vmplant_service.segment import default_switch_dir
from vmshop_common.addresses import read_addresses
from vmshop_common.errors import VMShopError
from vmshop_common.lifecycle import DEFAULT_GRACE
from vmshop_common.metrics import DEFAULT_REFRESH
from vmshop_common.security import add_security_flags, security_from_flags

DEFAULT_POOL = "192.168.77.0/24"
DEFAULT_POOL_FIRST = 10
DEFAULT_POOL_COUNT = 64
DEFAULT_BRIDGE = "vmshop0"
DEFAULT_SHOPS = "# The VMShop servers this plant notifies of changes: one host:port per line.\n127.0.0.1:8080\n"
BACKENDS = ("qemu", "libvirt", "fake")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--name", help="the plant's name (default plant1)")
    add("--host", help="address the plant listens on (default 127.0.0.1)")
    add("--port", type=int, help=f"port the plant listens on (default {DEFAULT_PORT})")
    add("--public-url", help="the URL its WSDL names (default https://HOST:PORT/; http:// when --insecure)")
    add("--warehouse", help="the warehouse directory, holding index.txt (default $VMSHOP_WAREHOUSE or ./var/warehouse)")
    add("--state-dir", help="records, overlays, channels (default ./var/vmplant)")
    add("--backend", help="hypervisor backend (default qemu)")
    add("--backend-option", action="append", default=[], metavar="NAME=VALUE", help="a backend option (repeatable)")
    add("--network", choices=NETWORK_MODES, help="host-only network: vde or none (default vde if vde_switch is here)")
    add("--ip-file", help="the address pool, ip.txt (default STATE_DIR/ip.txt)")
    add("--switch-dir", help="where the owners' VDE switches live (a short path: their sockets are below it; "
                             "default /run/vmshop/switches/<digest of STATE_DIR>)")
    add("--pool-network", default=DEFAULT_POOL, help=f"network of a new pool (default {DEFAULT_POOL})")
    add("--pool-first", type=int, default=DEFAULT_POOL_FIRST, help="first host number of a new pool (default 10)")
    add("--pool-count", type=int, default=DEFAULT_POOL_COUNT, help="addresses in a new pool (default 64)")
    add("--bridge", default=DEFAULT_BRIDGE, help=f"bridge name in a new pool (default {DEFAULT_BRIDGE})")
    add("--capacity-vms", type=int, help=f"most VMs at once (default {DEFAULT_CAPACITY_VMS})")
    add("--capacity-memory", type=int, help=f"MiB of guest memory in all (default {DEFAULT_CAPACITY_MEMORY})")
    add("--datastore", help="application data for mount actions ('' for none, the default)")
    add("--shops-file",
        help="the shops it notifies of changes, host:port per line (default ./addresses/vmshop_addresses.txt)")
    add("--watch-interval", type=float, default=DEFAULT_WATCH_INTERVAL,
        help=f"seconds between looks at the running guests (default {DEFAULT_WATCH_INTERVAL:g})")
    add("--threads", type=int, default=DEFAULT_THREADS, help=f"threads for requests (default {DEFAULT_THREADS})")
    add("--queue", type=int, default=DEFAULT_QUEUE,
        help=f"requests that may wait for a thread; more are refused (default {DEFAULT_QUEUE})")
    add("--max-creates", type=int, default=DEFAULT_CREATES,
        help=f"creates at once; more are declined at bid time (default {DEFAULT_CREATES})")
    add("--shutdown-grace", type=float, default=DEFAULT_GRACE,
        help=f"seconds a stopping plant lets requests in progress finish (default {DEFAULT_GRACE:g})")
    add("--no-metrics", dest="metrics", action="store_false",
        help="serve no Prometheus metrics (default: at /metrics, for the admin role)")
    add("--metrics-refresh", type=float, default=DEFAULT_REFRESH,
        help=f"seconds between two reads of the VM records' counts for the metrics (default {DEFAULT_REFRESH:g})")
    add("--peer", action="append", default=[], metavar="URL",
        help="a plant (or warehouse server) whose public images (and, with --fetch-movable, owners' "
             "movable ones) this plant may fetch (repeatable)")
    add("--cache-size", type=int, default=DEFAULT_CACHE_MIB,
        help=f"MiB the images fetched from peers may hold; the least recently used go past it "
             f"(default {DEFAULT_CACHE_MIB})")
    add("--bandwidth", type=float, default=DEFAULT_BANDWIDTH_MIB,
        help=f"MiB/s a transfer is estimated at until one was measured (default {DEFAULT_BANDWIDTH_MIB:g})")
    add("--peers-refresh", type=float, default=DEFAULT_PEERS_REFRESH,
        help=f"seconds between two reads of the peers' catalogs (default {DEFAULT_PEERS_REFRESH:g})")
    add("--serve-movable", action="store_true",
        help="serve owners' movable private images to peer plants (default: public images only)")
    add("--fetch-movable", action="store_true",
        help="fetch owners' movable private images from peers, for their owners only (default: public only)")
    add_security_flags(parser, "plant")
    add("--output", "-o", default=CONFIG_FILE, help=f"the file to write (default ./{CONFIG_FILE})")
    add("--yes", "-y", action="store_true", help="take the defaults for everything not given; ask nothing")
    add("--interactive", action="store_true", help="ask even when standard input is not a terminal")
    return parser.parse_args(argv)


class Asker:
    """Gets each setting from its flag, else by asking (with a default), else from its default."""

    def __init__(self, interactive: bool, stdin: TextIO, stdout: TextIO) -> None:
        self.interactive = interactive
        self.stdin = stdin
        self.stdout = stdout

    def get(self, given: Any, prompt: str, default: Any, parse: Callable[[str], Any] = str) -> Any:
        """The flag's value if given, else the answer to ``prompt`` (asked again while it doesn't parse)."""
        if given is not None:
            return parse(str(given))
        if not self.interactive:
            return parse(str(default)) if default is not None else None
        shown = "" if default is None else str(default)
        while True:
            self.stdout.write(f"{prompt} [{shown}]: ")
            self.stdout.flush()
            line = self.stdin.readline()
            if not line:  # end of input: the defaults for the rest
                self.interactive = False
                self.stdout.write("\n")
                return parse(shown) if default is not None else None
            answer = line.strip() or shown
            try:
                return parse(answer)
            except ValueError as exc:
                self.stdout.write(f"  {exc}; try again\n")


def _int_in(low: int, high: int, what: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"'{text}' is not a number") from None
        if not low <= value <= high:
            raise ValueError(f"{what} must be from {low} to {high}")
        return value
    return parse


def _choice(options: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in options:
            raise ValueError(f"'{text}' is not one of {', '.join(options)}")
        return text
    return parse


def _path(base: Path) -> Callable[[str], Path]:
    def parse(text: str) -> Path:
        if not text:
            raise ValueError("a path is needed")
        return Path(os.path.normpath(base / Path(text).expanduser()))
    return parse


def _optional_path(base: Path) -> Callable[[str], Path | None]:
    def parse(text: str) -> Path | None:
        return _path(base)(text) if text and text.lower() != "none" else None
    return parse


def _nonempty(text: str) -> str:
    if not text or any(ch.isspace() for ch in text):
        raise ValueError("no spaces, not empty")
    return text


def _url(text: str) -> str:
    if text and not text.startswith(("http://", "https://")):
        raise ValueError(f"'{text}' is not an http(s) URL")
    return text


def _options(pairs: list[str]) -> dict[str, str]:
    options = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise ValueError(f"backend option '{pair}' is not NAME=VALUE")
        options[name] = value
    return options


def build_config(args: argparse.Namespace, asker: Asker, cwd: Path) -> PlantConfig:
    """The configuration the flags and answers give (paths relative to ``cwd`` made absolute)."""
    output = _path(cwd)(args.output)
    here = output.parent
    name = asker.get(args.name, "Plant name", "plant1", _nonempty)
    host = asker.get(args.host, "Listen on host", "127.0.0.1", _nonempty)
    port = asker.get(args.port, "Listen on port", DEFAULT_PORT, _int_in(0, 65535, "the port"))
    security = security_from_flags(args, lambda given, prompt, default: asker.get(given, prompt, default),
                                   here, name, "plant", cwd)
    public_url = asker.get(args.public_url, "Public URL (the address its WSDL names)",
                           default_public_url(host, port, security.scheme), _url)
    warehouse = asker.get(args.warehouse, "Warehouse directory (holds index.txt)",
                          os.environ.get("VMSHOP_WAREHOUSE") or here / "var" / "warehouse", _path(cwd))
    state_dir = asker.get(args.state_dir, "State directory (records, overlays, channels)",
                          here / "var" / "vmplant", _path(cwd))
    backend = asker.get(args.backend, f"Backend ({', '.join(BACKENDS)})", "qemu", _nonempty)
    network = asker.get(args.network, "Host-only network (vde or none)",
                        "vde" if shutil.which("vde_switch") else "none", _choice(NETWORK_MODES))
    ip_file = switch_dir = None
    if network == "vde":
        ip_file = asker.get(args.ip_file, "IP pool file (ip.txt)", state_dir / "ip.txt", _path(cwd))
        switch_dir = asker.get(args.switch_dir, "VDE switches directory", default_switch_dir(state_dir), _path(cwd))
    capacity_vms = asker.get(args.capacity_vms, "Most VMs at once", DEFAULT_CAPACITY_VMS,
                             _int_in(1, 4096, "the number of VMs"))
    capacity_memory = asker.get(args.capacity_memory, "MiB of guest memory, all VMs together",
                                DEFAULT_CAPACITY_MEMORY, _int_in(64, 67108864, "the memory"))
    datastore = asker.get(args.datastore, "Application data directory for mounts ('none' for none)", "none",
                          _optional_path(cwd))
    shops_file = asker.get(args.shops_file, "File of the shops it tells of changes (host:port per line)",
                           here / "addresses" / "vmshop_addresses.txt", _path(cwd))
    return PlantConfig(name=name, listen_host=host, listen_port=port, public_url=public_url,
                       warehouse_dir=warehouse, state_dir=state_dir, backend=backend,
                       backend_options=_options(args.backend_option), network_mode=network, ip_file=ip_file,
                       switch_dir=switch_dir, capacity_vms=capacity_vms, capacity_memory=capacity_memory,
                       datastore=datastore, shops_file=shops_file, watch_interval=args.watch_interval,
                       threads=args.threads, queue=args.queue, max_creates=args.max_creates,
                       shutdown_grace=args.shutdown_grace, security=security, metrics=args.metrics,
                       metrics_refresh=args.metrics_refresh, peers=tuple(_url(p) for p in args.peer),
                       cache_mib=args.cache_size, bandwidth_mib=args.bandwidth, peers_refresh=args.peers_refresh,
                       serve_movable=args.serve_movable, fetch_movable=args.fetch_movable)


def main(argv: list[str] | None = None, stdin: TextIO | None = None, stdout: TextIO | None = None,
         cwd: Path | None = None) -> int:
    """Run the script; returns the exit status."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    args = parse_args(argv)
    cwd = cwd or Path.cwd()
    interactive = not args.yes and (args.interactive or stdin.isatty())
    try:
        config = build_config(args, Asker(interactive, stdin, stdout), cwd)
        output = _path(cwd)(args.output)
        config_from_xml(config_to_xml(config), output)  # refuse to write what would not read back
        if config.shops_file is not None:
            if config.shops_file.exists():
                read_addresses(config.shops_file)
            else:
                config.shops_file.parent.mkdir(parents=True, exist_ok=True)
                config.shops_file.write_text(DEFAULT_SHOPS, encoding="utf-8")
                stdout.write(f"wrote {config.shops_file} (127.0.0.1:8080; edit it for your site)\n")
        if config.network_mode == "vde" and config.ip_file is not None and not config.ip_file.exists():
            network = ipaddress.IPv4Network(args.pool_network)
            write_pool(config.ip_file, network, args.pool_first, args.pool_count, args.bridge,
                       config.state_dir / "shares")
            stdout.write(f"wrote {config.ip_file} ({args.pool_count} addresses of {network} "
                         f"from .{args.pool_first}, bridge {args.bridge})\n")
        write_config(config, output)
    except (VMShopError, ValueError, OSError) as exc:
        sys.stderr.write(f"configure_vmplant: {exc}\n")
        return 1
    stdout.write(f"wrote {output}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
