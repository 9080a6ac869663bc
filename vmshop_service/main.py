"""``vmshop-server``: run a VMShop server from its ``configuration_vmshop.xml``.

Start-up: open the registry, read the plant list, check the plants (a plant
that does not answer is marked down, not fatal), reconcile creates a
previous run left unfinished, start the lease and state timers, listen.
SIGHUP re-reads the plant list. SIGTERM/SIGINT stop the server; the
registry is durable, so a restarted shop knows every VM it had.
"""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Sequence
from typing import Any

from vmshop_common.soap import compat  # noqa: F401  (before spyne)

# isort: split
from vmshop_common.errors import VMShopError
from vmshop_common.servermain import server_main
from vmshop_common.soap.server import bound_port, build_site, listen

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
    registry = Registry(config.database)
    registry.analyze()  # planner statistics for the registry as it is now (before the reactor runs)
    plants = PlantDirectory(config.plants_file, config.call_timeout, rx, clock=__import__("time").time)
    plants.load()
    shop = Shop(config, registry, plants, rx)
    host = host or config.listen_host
    port = config.listen_port if port is None else port
    public = config.public_url or f"http://{host}:{{port}}/"
    site = build_site([VMShopService], TNS, public, name=APP_NAME)
    site.app.vmshop = shop
    listening = listen(site, host, port)
    shop.public_url = site.public_url.replace("{port}", str(bound_port(listening)))
    print(f"vmshop {config.name} listening on http://{host}:{bound_port(listening)}/ (public {shop.public_url})",
          flush=True)

    def reload_plants(*_: Any) -> None:
        def work() -> None:
            try:
                shop.reload_plants()
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
