"""``vmplant-farm``: many real plant services in one process, for scale tests and benchmarks.

Each plant of the farm is the real plant (:func:`vmplant_service.main.build_plant_server`: its records,
warehouse, thread pool, notifier of its shops and SOAP listener), made from one template configuration
(``configuration_vmplant.xml``, written by ``scripts/configure_vmplant.py``) with its own name
(``<template name>-<n>``), its own state directory (``STATE/<n>``: records, overlays) and its own address:
the n-th address from ``--first`` (127.x.y.z loopback addresses by default, or addresses of a test network
namespace), on a port the OS picks. The template's backend should be ``fake`` (a farm is for the shop's scale,
not for guests); its security (TLS, or insecure on loopback), warehouse and shop list hold for every plant.

When every plant listens, the farm writes ``--list`` (one ``host:port`` per line: a shop's plant list)
and prints ``vmplant-farm listening: N plants``. SIGTERM/SIGINT stop every plant (their trees, in reverse
order, within the template's shutdown grace).

Usage::

    python -m vmplant_service.farm --config configuration_vmplant.xml --count 125 --first 127.1.0.1 \\
        --state var/farm1 --list var/farm1/plants.txt
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from vmshop_common.soap import compat  # noqa: F401  (before spyne)

# isort: split
from vmshop_common.lifecycle import ServerService, Shutdown, run_server

from .config import load_config
from .main import PlantServer, build_plant_server, shop_urls
from .notify import ShopNotifier

log = logging.getLogger("vmplant.farm")
#: The most plants one farm process hosts.
MAX_PLANTS = 4096


def addresses(first: str, count: int) -> list[str]:
    """``count`` consecutive IPv4 addresses from ``first`` (ValueError past 255.255.255.255)."""
    start = ipaddress.IPv4Address(first)
    return [str(start + n) for n in range(count)]


def build_farm(template: Path, count: int, first: str, state: Path, reactor: Any = None,
               threads: int = 4) -> tuple[ServerService, list[PlantServer]]:
    """The farm's service tree (not started) and its plants; each plant's pool has ``threads`` threads."""
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    base = load_config(template)
    farm = ServerService("vmplant-farm", Shutdown(base.shutdown_grace, reactor))
    plants = []
    for n, host in enumerate(addresses(first, count)):
        config = replace(base, name=f"{base.name}-{n}", listen_host=host, listen_port=0, public_url="",
                         state_dir=state / str(n), threads=threads, queue=max(base.queue, 64))
        server = build_plant_server(config, host, 0, reactor)
        server.root.setName(f"vmplant-{n}")
        server.root.setServiceParent(farm)
        plants.append(server)
    return farm, plants


def serve(template: Path, count: int, first: str, state: Path, listing: Path, threads: int) -> int:
    from twisted.internet import reactor

    base = load_config(template)
    farm, plants = build_farm(template, count, first, state, reactor, threads)

    def ready() -> None:
        lines = []
        for server in plants:
            listener = server.listener
            server.runtime.public_url = listener.public_url
            lines.append(f"{listener.host}:{listener.port}\n")
            if base.shops_file is not None:
                runtime = server.runtime
                runtime.notifier = ShopNotifier(listener.public_url, lambda: shop_urls(base), reactor,
                                                tls=server.security.client_policy, offer=runtime.offer_fields)
                runtime.notifier.changed()
        temporary = listing.with_name(listing.name + ".tmp")
        temporary.write_text("".join(lines))
        temporary.replace(listing)
        print(f"vmplant-farm listening: {len(plants)} plants ({plants[0].listener.host} .. "
              f"{plants[-1].listener.host}); list in {listing}", flush=True)

    return run_server(farm, ready=ready, reactor=reactor)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vmplant-farm", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, type=Path, help="the template configuration_vmplant.xml")
    parser.add_argument("--count", required=True, type=int, help=f"plants in this process (1..{MAX_PLANTS})")
    parser.add_argument("--first", default="127.1.0.1", help="the first plant's address (default 127.1.0.1)")
    parser.add_argument("--state", required=True, type=Path, help="the plants' state directories go under it")
    parser.add_argument("--list", required=True, type=Path, dest="listing",
                        help="written when every plant listens: one host:port per line")
    parser.add_argument("--threads", type=int, default=4, help="threads of each plant's pool (default 4)")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.WARNING),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not 1 <= args.count <= MAX_PLANTS:
        parser.error(f"--count must be from 1 to {MAX_PLANTS}")
    return serve(args.config, args.count, args.first, args.state, args.listing, args.threads)


if __name__ == "__main__":
    sys.exit(main())
