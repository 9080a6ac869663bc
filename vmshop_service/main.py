"""``vmshop-server``: run a VMShop server from its ``configuration_vmshop.xml``.

Start-up: open the registry, read the plant list (the plants' WSDL is parsed
once, here), then start the service tree (:func:`build_shop`), in this order:
the registry's closer, the thread pool (registry and DAG work, each piece
within :data:`WORK_DEADLINE`), the shop (once the reactor runs it checks the
plants, reconciles creates a previous run left unfinished and enforces the
leases; a plant that does not answer is marked down, not fatal), the lease
and state timers, the metrics' refresh (with ``<metrics>``: the registry's
counts read on the pool; see :mod:`vmshop_service.metrics`), and the
listener (last: nothing is served before the rest runs). It serves over
TLS with its own certificate (which it also presents to its plants) and
knows its callers from its authorisation file; or, configured insecure,
plain HTTP on loopback. With ``<wsse users=...>`` it also takes TLS callers
without a certificate who prove a user of that file with a WS-Security
UsernameToken.

Signals (handled from before the server listens): SIGHUP re-reads the
authorisation file, the users file and the plant list, each on a thread;
SIGTERM/SIGINT stop the tree in reverse order within ``<shutdown grace>``
(see :mod:`vmshop_common.lifecycle`): no new request, requests in progress
finish or are cancelled (a cancelled create removes its entry, as a failed
one does), then the process exits. The registry is durable, so a restarted
shop knows every VM it had.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vmshop_common.soap import compat  # noqa: F401  (before spyne)

# isort: split
from twisted.application.service import Service
from twisted.internet import defer

from vmshop_common.errors import ConfigurationError, VMShopError
from vmshop_common.lifecycle import AFTER_GRACE, Closing, RoundTimer, ServerService, Shutdown, run_server, within
from vmshop_common.metrics import MetricsResource, operation_names
from vmshop_common.security import PORT_PLACEHOLDER, StartedSecurity, is_loopback, start_security, url
from vmshop_common.servermain import server_main
from vmshop_common.soap.listener import SoapListener
from vmshop_common.soap.server import SoapSite, build_site
from vmshop_common.threads import ThreadPoolService, in_thread
from vmshop_common.wsse import UsernameTokens

from .config import ShopConfig, load_config
from .metrics import ShopMetrics
from .plants import PlantDirectory
from .registry import open_registry
from .service import APP_NAME, ShopOperations, VMShopService
from .shop import Shop
from .wire import TNS

log = logging.getLogger("vmshop")

THREADS = 16
"""Threads for the shop's blocking work (registry, DAG validation)."""

WORK_DEADLINE = 60.0
"""Seconds one piece of the shop's blocking work may take before its request is answered
``Server.DeadlineExceeded`` (SQLite waits up to 30 s for a lock)."""

RELOAD_DEADLINE = 30.0
"""Seconds re-reading the authorisation or users file may take (SIGHUP)."""


class ShopService(Service):
    """The shop itself in the tree: its start-up round once the reactor runs, its plant clients closed at stop
    (a start-up round still running then is cancelled)."""

    def __init__(self, shop: Shop, reactor: Any) -> None:
        self.setName("shop")
        self.shop = shop
        self.reactor = reactor
        self.starting: defer.Deferred[Any] | None = None

    def startService(self) -> None:  # noqa: N802 - Twisted's name
        Service.startService(self)
        self.reactor.callWhenRunning(self._start)

    def _start(self) -> None:
        def failed(failure: Any) -> None:
            if failure.check(defer.CancelledError):
                return
            if failure.check(VMShopError):  # a known condition (the registry unreachable, ...): the timers go on
                log.warning("start-up round failed: %s", failure.getErrorMessage())
            else:
                log.error("start-up: %s", failure.getTraceback())

        self.starting = self.shop.start().addErrback(failed)

    def stopService(self) -> defer.Deferred[Any]:  # noqa: N802 - Twisted's name
        Service.stopService(self)
        if self.starting is not None and not self.starting.called:
            self.starting.cancel()
        return within(self.reactor, AFTER_GRACE, self.shop.stop())  # a plant that never closes is not waited for


@dataclass
class ShopServer:
    """A shop's service tree and the parts :func:`serve` and tests reach."""

    root: ServerService
    shop: Shop
    listener: SoapListener
    pool: ThreadPoolService
    security: StartedSecurity
    tokens: UsernameTokens | None
    metrics: ShopMetrics | None = None

    def reload(self) -> defer.Deferred[None]:
        """SIGHUP: re-read the authorisation file, the users file and the plant list (each on a thread; a bad
        file keeps the old one in force and is logged)."""
        reactor = self.shop.reactor

        def logged(what: str) -> Any:
            return lambda failure: log.error("%s not reloaded (the old one stays in force): %s", what,
                                             failure.getErrorMessage())

        steps = [in_thread(reactor, self.security.identities.reload, timeout=RELOAD_DEADLINE,
                           what="re-reading the authorisation file").addErrback(logged("authorisation file"))]
        if self.tokens is not None:
            steps.append(in_thread(reactor, self.tokens.reload, timeout=RELOAD_DEADLINE,
                                   what="re-reading the users file").addErrback(logged("users file")))
        steps.append(self.shop.reload_plant_list().addErrback(logged("plant list")))
        return defer.gatherResults(steps).addCallback(lambda _: None)


def build_shop(config: ShopConfig, host: str | None = None, port: int | None = None, reactor: Any = None) -> ShopServer:
    """Every part of the shop and its service tree, not started (see the module for the order)."""
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    host = host or config.listen_host
    if config.security.insecure and not is_loopback(host):
        raise ConfigurationError(f"insecure (plain HTTP) is refused on {host}: only on a loopback address")
    security = start_security(config.security, "shop")
    tokens = UsernameTokens(config.wsse_users, config.wsse_window) if config.wsse_users is not None else None
    shutdown = Shutdown(config.shutdown_grace, reactor)
    clock = time.time  # one wall clock for the registry's stamps, the shop's leases and the plants' health
    registry = open_registry(config.database, config.postgresql, config.database_password_file, clock)
    registry.analyze()  # planner statistics for the registry as it is now (before the reactor runs)
    log.info("registry: %s", registry.describe())  # never a password
    pool = ThreadPoolService(THREADS, name="vmshop-pool", deadline=WORK_DEADLINE, grace=shutdown, reactor=reactor)
    plants = PlantDirectory(config.plants_file, config.call_timeout, reactor, clock=clock,
                            tls=security.client_policy)
    plants.load()
    shop = Shop(config, registry, plants, reactor, clock, pool=pool)
    try:
        shop.register()  # a second live shop of the same name on a shared registry is refused here
    except BaseException:
        registry.close()
        raise
    public = config.public_url or url(config.security.scheme, host, PORT_PLACEHOLDER)
    site = build_site([VMShopService], TNS, public, name=APP_NAME)
    operations: ShopOperations = shop  # mypy holds Shop to the service's contract
    site.app.vmshop = operations
    site.identities = security.identities
    site.tokens = tokens  # a second way in: TLS without a certificate, a UsernameToken in the header
    metrics = attach_metrics(site, shop, reactor) if config.metrics else None
    listener = SoapListener(site, host, config.listen_port if port is None else port, shutdown=shutdown,
                            tls=security.credentials, insecure=security.insecure,
                            require_client_certificate=tokens is None, reactor=reactor)
    root = ServerService("vmshop", shutdown)
    for child in (Closing("closing the registry", registry.close, skip=lambda: bool(pool.abandoned), reactor=reactor),
                  pool,
                  ShopService(shop, reactor),
                  RoundTimer(config.lease_interval, shop.enforce_leases, name="lease timer", shutdown=shutdown,
                             clock=reactor),
                  RoundTimer(config.poll_interval, shop.refresh, name="state poll", shutdown=shutdown, clock=reactor),
                  *([RoundTimer(config.metrics_refresh, metrics.refresher(pool.run).run, name="metrics refresh",
                                shutdown=shutdown, now=True, clock=reactor)] if metrics is not None else []),
                  RoundTimer(config.offer_refresh, shop.refresh_offers, name="offer pull", shutdown=shutdown,
                             clock=reactor),
                  listener):
        child.setServiceParent(root)
    return ShopServer(root, shop, listener, pool, security, tokens, metrics)


def attach_metrics(site: SoapSite, shop: Shop, reactor: Any) -> ShopMetrics:
    """The shop's metrics, told of every SOAP answer and bid round, served at ``/metrics`` by ``site``."""
    metrics = ShopMetrics(operation_names(site.app), shop.plants, shop.registry)
    site.soap_resource.observer = metrics
    site.metrics_resource = MetricsResource(metrics, site, reactor)
    shop.observe_bid_round = metrics.observe_bid_round
    return metrics


def serve(config: ShopConfig, host: str | None = None, port: int | None = None) -> int:
    """Run the shop until SIGTERM or SIGINT."""
    from twisted.internet import reactor

    server = build_shop(config, host, port, reactor)
    listener = server.listener

    def ready() -> None:
        server.shop.public_url = listener.public_url
        print(f"vmshop {config.name} listening on {url(config.security.scheme, listener.host, listener.port)} "
              f"(public {server.shop.public_url})", flush=True)

    return run_server(server.root, reload=server.reload, ready=ready, reactor=reactor)


def main(argv: Sequence[str] | None = None) -> int:
    return server_main(argv, prog="vmshop-server", description="Run a VMShop server.",
                       default_config="configuration_vmshop.xml",
                       serve=lambda path, host, port: serve(load_config(path), host, port))

if __name__ == "__main__":
    sys.exit(main())
