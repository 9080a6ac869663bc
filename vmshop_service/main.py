"""``vmshop-server``: run a VMShop server from its ``configuration_vmshop.xml``.

Start-up: open the registry, read the plant list, check the plants (a plant
that does not answer is marked down, not fatal), reconcile creates a
previous run left unfinished, start the lease and state timers, listen.
It serves over TLS with its own certificate (which it also presents to its
plants) and knows its callers from its authorisation file; or, configured
insecure, plain HTTP on loopback. With ``<wsse users=...>`` it also takes TLS
callers without a certificate who prove a user of that file with a
WS-Security UsernameToken. SIGHUP re-reads the authorisation file, the
users file and the plant list. SIGTERM/SIGINT stop the server; the registry is durable, so
a restarted shop knows every VM it had.
"""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Sequence
from typing import Any

from vmshop_common.soap import compat  # noqa: F401  (before spyne)

# isort: split
from vmshop_common.errors import ConfigurationError, VMShopError
from vmshop_common.security import PORT_PLACEHOLDER, is_loopback, start_security, url
from vmshop_common.servermain import server_main
from vmshop_common.soap.server import bound_port, build_site, listen
from vmshop_common.wsse import UsernameTokens

from .config import ShopConfig, load_config
from .plants import PlantDirectory
from .registry import Registry
from .service import APP_NAME, VMShopService
from .shop import Shop
from .wire import TNS

log = logging.getLogger("vmshop")


def serve(config: ShopConfig, host: str | None = None, port: int | None = None) -> int:
    from twisted.internet import reactor

    rx: Any = reactor
    rx.suggestThreadPoolSize(16)
    host = host or config.listen_host
    if config.security.insecure and not is_loopback(host):
        raise ConfigurationError(f"insecure (plain HTTP) is refused on {host}: only on a loopback address")
    security = start_security(config.security, "shop")
    tokens = UsernameTokens(config.wsse_users, config.wsse_window) if config.wsse_users is not None else None
    registry = Registry(config.database)
    registry.analyze()  # planner statistics for the registry as it is now (before the reactor runs)
    plants = PlantDirectory(config.plants_file, config.call_timeout, rx, clock=__import__("time").time,
                            tls=security.client_policy)
    plants.load()
    shop = Shop(config, registry, plants, rx)
    port = config.listen_port if port is None else port
    scheme = config.security.scheme
    public = config.public_url or url(scheme, host, PORT_PLACEHOLDER)
    site = build_site([VMShopService], TNS, public, name=APP_NAME)
    site.app.vmshop = shop
    site.identities = security.identities
    site.tokens = tokens  # a second way in: TLS without a certificate, a UsernameToken in the header
    listening = listen(site, host, port, tls=security.credentials, insecure=security.insecure,
                       require_client_certificate=tokens is None)
    shop.public_url = site.public_url.replace("{port}", str(bound_port(listening)))
    print(f"vmshop {config.name} listening on {url(scheme, host, bound_port(listening))} "
          f"(public {shop.public_url})", flush=True)

    def reload_plants(*_: Any) -> None:
        def work() -> None:
            try:
                security.identities.reload()
            except VMShopError as exc:
                log.error("authorisation file not reloaded (the old one stays in force): %s", exc)
            if tokens is not None:
                try:
                    tokens.reload()
                except VMShopError as exc:
                    log.error("users file not reloaded (the old one stays in force): %s", exc)
            try:
                shop.reload_plant_list()
            except VMShopError as exc:
                log.error("plant list not reloaded: %s", exc)
        rx.callFromThread(work)

    signal.signal(signal.SIGHUP, reload_plants)
    rx.callWhenRunning(lambda: shop.start().addErrback(lambda f: log.error("start-up: %s", f.getTraceback())))

    def shutdown() -> Any:
        d = shop.stop()
        d.addBoth(lambda _: registry.close())
        return d

    rx.addSystemEventTrigger("before", "shutdown", shutdown)
    rx.run()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return server_main(argv, prog="vmshop-server", description="Run a VMShop server.",
                       default_config="configuration_vmshop.xml",
                       serve=lambda path, host, port: serve(load_config(path), host, port))

if __name__ == "__main__":
    sys.exit(main())
