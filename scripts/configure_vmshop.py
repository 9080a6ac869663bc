#!/usr/bin/env python3
"""Prepare a VMShop's configuration file, configuration_vmshop.xml.

Asks for each value (with a default) on a terminal, or takes them as flags;
with --yes, or without a terminal, the defaults fill whatever no flag gave.
The shop serves over TLS (--tls-cert, --tls-key, --tls-ca; default
pki/NAME.pem, pki/NAME.key, pki/ca.pem next to the output, made by
vmshop-ca) and knows its users, admins and plants from its authorisation
file (--authorization; written with a header if missing); --insecure instead
serves plain HTTP on loopback, to anyone. Quotas: --default-quota and
--quota IDENTITY:vms=N,memory=MIB,vcpus=N (repeatable).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vmshop_common.errors import VMShopError
from vmshop_common.lifecycle import DEFAULT_GRACE
from vmshop_common.metrics import DEFAULT_REFRESH
from vmshop_common.security import add_security_flags, security_from_flags
from vmshop_common.wsse import read_users
from vmshop_service.config import CONFIG_FILE, ShopConfig, load_config, write_config
from vmshop_service.quota import Limits, QuotaConfig

ROOT = Path(__file__).resolve().parent.parent
# In a checkout, its addresses/ folder; installed (bin/configure_vmshop.py), addresses/ under the current directory.
PLANTS_FILE = (ROOT if (ROOT / "addresses").is_dir() else Path()) / "addresses" / "vmplant_addresses.txt"


def ask(label: str, default: str, interactive: bool) -> str:
    if not interactive:
        return default
    answer = input(f"{label} [{default}]: ").strip()
    return answer or default


def parse_limits(text: str) -> Limits:
    """``vms=2,memory=512,vcpus=2`` (any of them; ``unlimited`` for no limit)."""
    figures: dict[str, int | None] = {}
    for pair in filter(None, text.split(",")):
        name, sep, value = pair.partition("=")
        if not sep or name not in ("vms", "memory", "vcpus"):
            raise ValueError(f"'{pair}' is not vms=N, memory=MIB or vcpus=N")
        if value != "unlimited" and not value.isdigit():
            raise ValueError(f"'{value}' is not a number (or 'unlimited')")
        figures[name] = None if value == "unlimited" else int(value)
    return Limits(**figures)


def parse_quotas(default: str | None, own: list[str]) -> QuotaConfig:
    base = parse_limits(default or "")
    identities = {}
    for item in own:
        identity, sep, text = item.partition(":")
        if not sep or not identity:
            raise ValueError(f"--quota '{item}' is not IDENTITY:vms=N,memory=MIB,vcpus=N")
        given = parse_limits(text)
        fields = {name: getattr(given, name) if f"{name}=" in text else getattr(base, name)
                  for name in ("vms", "memory", "vcpus")}
        identities[identity] = Limits(**fields)
    return QuotaConfig(default=base, identities=identities)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", help="the shop's name (default vmshop)")
    parser.add_argument("--host", help="address the shop listens on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port the shop listens on (default 8080; 0: any)")
    parser.add_argument("--public-url", help="the URL its WSDL and VM references name (default https://HOST:PORT/; "
                                             "http:// when --insecure)")
    parser.add_argument("--database", help="the VM registry, SQLite (default ./var/vmshop/registry.sqlite3)")
    parser.add_argument("--postgresql", metavar="CONNINFO",
                        help="keep the VM registry in PostgreSQL instead (a libpq connection string without a "
                             "password, e.g. 'host=db dbname=vmshop user=vmshop'); several shops may share it")
    parser.add_argument("--database-password-file", metavar="FILE",
                        help="the PostgreSQL password, alone in this file (mode 0600)")
    parser.add_argument("--dead-after", type=float, default=60.0,
                        help="seconds without a heartbeat after which the shops sharing a PostgreSQL registry "
                             "resolve a silent shop's unfinished creates (default 60)")
    parser.add_argument("--plants-file", help=f"the plant list (default {PLANTS_FILE})")
    parser.add_argument("--bid-timeout", type=float, help="seconds a plant has to bid (default 10)")
    parser.add_argument("--bids", choices=("offers", "live"), default="offers",
                        help="offers: price requests here from the plants' offers and ask only the best plant "
                             "(default); live: ask every plant for a bid on every request")
    parser.add_argument("--offer-margin", type=float, default=0.25,
                        help="a plant declines a create when its live cost exceeds its offer's by more than this "
                             "fraction (default 0.25)")
    parser.add_argument("--offer-refresh", type=float, default=60.0,
                        help="seconds between pulls of every plant's offer (default 60)")
    parser.add_argument("--poll-interval", type=float, help="seconds between state refreshes (default 5)")
    parser.add_argument("--shutdown-grace", type=float, default=DEFAULT_GRACE,
                        help="seconds a stopping shop lets requests in progress finish (default %(default)g)")
    parser.add_argument("--no-metrics", dest="metrics", action="store_false",
                        help="serve no Prometheus metrics (default: at /metrics, for the admin role)")
    parser.add_argument("--metrics-refresh", type=float, default=DEFAULT_REFRESH,
                        help="seconds between two reads of the registry's counts for the metrics "
                             "(default %(default)g)")
    add_security_flags(parser, "shop")
    parser.add_argument("--default-quota", metavar="LIMITS",
                        help="every identity's quota: vms=N,memory=MIB,vcpus=N (default: none)")
    parser.add_argument("--quota", action="append", default=[], metavar="IDENTITY:LIMITS",
                        help="one identity's quota, e.g. alice:vms=2,memory=512 (repeatable)")
    parser.add_argument("--wsse-users", metavar="FILE",
                        help="also take WS-Security UsernameTokens from TLS callers without a certificate, for the "
                             "users of FILE (NAME ROLES PASSWORD per line, mode 0600)")
    parser.add_argument("--wsse-window", type=float, default=300.0,
                        help="seconds a UsernameToken's Created may be off (default 300)")
    parser.add_argument("--output", default=CONFIG_FILE, help=f"where to write (default ./{CONFIG_FILE})")
    parser.add_argument("--yes", action="store_true", help="take defaults for everything not given")
    args = parser.parse_args(argv)
    interactive = sys.stdin.isatty() and not args.yes

    def value(flag: object, label: str, default: str) -> str:
        return str(flag) if flag is not None else ask(label, default, interactive)

    try:
        name = value(args.name, "shop name", "vmshop")
        host = value(args.host, "listen address", "127.0.0.1")
        port = int(value(args.port, "port", "8080"))
        here = Path(args.output).absolute().parent
        security = security_from_flags(args, lambda given, prompt, default: value(given, prompt, default),
                                       here, name, "shop")
        default_url = f"{security.scheme}://{host}:{port}/" if port else ""
        public_url = value(args.public_url, "public URL", default_url)
        if args.postgresql and args.database:
            raise ValueError("--database (SQLite) and --postgresql exclude each other")
        database = None if args.postgresql else Path(value(args.database, "registry database",
                                                             str(Path("var/vmshop/registry.sqlite3"))))
        plants_file = Path(value(args.plants_file, "plant list file", str(PLANTS_FILE)))
        config = ShopConfig(name=name, listen_host=host, listen_port=port, public_url=public_url,
                            database=database.absolute() if database else None,
                            plants_file=plants_file.absolute(), postgresql=args.postgresql or "",
                            database_password_file=(Path(args.database_password_file).absolute()
                                                    if args.database_password_file else None),
                            dead_after=args.dead_after,
                            bid_timeout=float(value(args.bid_timeout, "bid timeout (s)", "10")),
                            poll_interval=float(value(args.poll_interval, "state refresh interval (s)", "5")),
                            security=security, quotas=parse_quotas(args.default_quota, args.quota),
                            wsse_users=Path(args.wsse_users).absolute() if args.wsse_users else None,
                            wsse_window=args.wsse_window, shutdown_grace=args.shutdown_grace,
                            metrics=args.metrics, metrics_refresh=args.metrics_refresh, bids=args.bids,
                            offer_margin=args.offer_margin, offer_refresh=args.offer_refresh)
        if config.wsse_users is not None:
            read_users(config.wsse_users)
        if config.database is not None:
            config.database.parent.mkdir(parents=True, exist_ok=True)
        if not config.plants_file.exists():
            config.plants_file.parent.mkdir(parents=True, exist_ok=True)
            config.plants_file.write_text("# VMPlant servers this shop uses: one host:port per line\n127.0.0.1:8090\n")
            print(f"wrote {config.plants_file} (127.0.0.1:8090; edit it for your site)")
        written = write_config(config, args.output)
        load_config(written)
    except (ValueError, OSError, VMShopError) as exc:
        print(f"configure_vmshop: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
