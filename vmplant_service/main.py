"""``vmplant``: run a VMPlant server from its ``configuration_vmplant.xml``.

Start-up order: load the configuration, open the records, read the
warehouse (bad entries are logged and skipped), start the host-only segment,
reconcile records with the guests that still run (re-adopt or reclaim),
then start the service tree (:func:`build_plant_server`), in this order: the
closer of what the plant holds (records, backend, unused switches), the
thread pool every request's work runs on (each kind of work within its
stated deadline, :mod:`vmplant_service.service`), the notifier of its shops,
the watch of the running guests, the metrics' refresh (with ``<metrics>``:
the records' counts read on the pool; see :mod:`vmplant_service.metrics`),
the reading of its peers' catalogs (with ``<peers>``: at once, then every
``<peers refresh>`` seconds, on the pool; :mod:`vmplant_service.transfer`),
and the listener (last: nothing is served before the rest runs; it also
serves the plant's public images at ``/images/`` to plants, shops and
admins): over TLS
with its certificate (also presented to the shops it notifies), taking calls only from the identities its authorisation
file gives the shop or admin role; or, configured insecure, plain HTTP on
loopback.

Signals (handled from before the server listens): SIGHUP re-reads the
authorisation file on a thread. SIGTERM/SIGINT stop the tree in reverse
order within ``<shutdown grace>`` (see :mod:`vmshop_common.lifecycle`): the
plant stops accepting at once, requests in progress may finish until the
grace is over, then they are answered ``Server.ShuttingDown`` and the work
still running (a create in the middle of a boot) is abandoned on its daemon
thread: the process exits on time. Guests keep running and are dealt with
by the next start's reconciliation, as after a crash. The segment is
stopped only when no VM is left on it.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmshop_common.soap import compat  # noqa: F401  (before spyne)

# isort: split
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import Deferred

from vmshop_common.errors import ConfigurationError
from vmshop_common.lifecycle import AFTER_GRACE, Closing, RoundTimer, ServerService, Shutdown, run_server, within
from vmshop_common.metrics import MetricsResource, operation_names
from vmshop_common.security import PORT_PLACEHOLDER, StartedSecurity, is_loopback, start_security, url
from vmshop_common.servermain import server_main
from vmshop_common.soap.listener import SoapListener
from vmshop_common.soap.server import SoapSite, build_site
from vmshop_common.threads import ThreadPoolService, in_thread
from vmshop_common.tls import Credentials

from .backends import load_backend
from .config import PlantConfig, load_config
from .imageserve import HASH_DEADLINE, ImagesResource
from .ippool import IPPool
from .metrics import PlantMetrics
from .notify import ShopNotifier
from .plant import Plant
from .records import PlantRecords
from .segment import OwnerSegments, default_switch_dir
from .service import APP_NAME, PlantRuntime, VMPlantService
from .transfer import CATALOG_TIMEOUT, Transfers
from .warehouse import Warehouse
from .wire import TNS

log = logging.getLogger("vmplant")
#: Threads for plant work: every create holds one for its whole duration.
MAX_THREADS = 64
#: Seconds re-reading the authorisation file may take (SIGHUP).
RELOAD_DEADLINE = 30.0
#: Seconds closing what the plant holds (records, backend, switches) may take at stop.
CLOSE_DEADLINE = 10.0
#: Seconds one look at the running guests may take.
WATCH_DEADLINE = 300.0


def build_plant(config: PlantConfig, credentials: Credentials | None = None) -> Plant:
    """Every part of the plant, from its configuration (nothing listens yet); with ``<peers>``, what fetches
    images from them, presenting ``credentials`` (the plant's own)."""
    state = Path(config.state_dir)
    state.mkdir(parents=True, exist_ok=True)
    # Backend options come from the configuration only: the accelerator probe's cache, for one,
    # is per host (~/.cache/vmshop), not per plant.
    backend = load_backend(config.backend, dict(config.backend_options))
    records = PlantRecords(config.records_path)
    warehouse = Warehouse(Path(config.warehouse_dir))
    for problem in warehouse.problems:
        log.warning("warehouse entry skipped: %s line %s: [%s] %s", problem.path, problem.line, problem.code,
                    problem.message)
    pool = segments = None
    if config.network_mode == "vde":
        if config.ip_file is None:
            raise ConfigurationError("network mode vde needs an ip file (<network ipfile=...>)")
        pool = IPPool(Path(config.ip_file))
        segments = OwnerSegments(Path(config.switch_dir) if config.switch_dir else default_switch_dir(state))
    plant = Plant(config, backend, records, warehouse, pool, segments)
    if config.peers:
        def in_use() -> set[str]:  # called under the plant's lock
            return {r.image for r in plant.records.live_vms()} | set(plant._reserved_images.values())

        transfers = Transfers(warehouse, config.name, config.peers, credentials, records,
                              cache_bytes=config.cache_mib * 2**20, bandwidth=config.bandwidth_mib * 2**20,
                              in_use=in_use, lock=plant._lock, fetch_movable=config.fetch_movable,
                              state_model=plant.clone_model)
        transfers.sweep()
        plant.attach_peers(transfers)
    return plant


class NotifierService(Service):
    """The plant's notifier of its shops in the tree: its connections closed at stop."""

    def __init__(self, runtime: PlantRuntime) -> None:
        self.setName("notifier")
        self.runtime = runtime

    def stopService(self) -> Deferred[Any]:  # noqa: N802 - Twisted's name
        Service.stopService(self)
        notifier, self.runtime.notifier = self.runtime.notifier, None  # nothing is told any more
        if notifier is None:
            return defer.succeed(None)
        return within(self.runtime.reactor, AFTER_GRACE, notifier.close())  # a shop that never closes: not waited for


@dataclass
class PlantServer:
    """A plant's service tree and the parts :func:`serve` and tests reach."""

    root: ServerService
    plant: Plant
    runtime: PlantRuntime
    listener: SoapListener
    pool: ThreadPoolService
    security: StartedSecurity
    metrics: PlantMetrics | None = None

    def reload(self) -> Deferred[None]:
        """SIGHUP: re-read the authorisation file on a thread (a bad one keeps the old in force, logged)."""
        def failed(failure: Any) -> None:
            log.error("authorisation file not reloaded (the old one stays in force): %s", failure.getErrorMessage())

        return in_thread(self.runtime.reactor, self.security.identities.reload, timeout=RELOAD_DEADLINE,
                         what="re-reading the authorisation file").addCallbacks(lambda _: None, failed)


def build_plant_server(config: PlantConfig, host: str | None = None, port: int | None = None,
                       reactor: Any = None) -> PlantServer:
    """The plant (recovered: guests re-adopted or reclaimed) and its service tree, not started."""
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    host = host or config.listen_host
    if config.security.insecure and not is_loopback(host):
        raise ConfigurationError(f"insecure (plain HTTP) is refused on {host}: only on a loopback address")
    security = start_security(config.security, "plant")
    plant = build_plant(config, security.credentials)
    report = plant.recover()
    if any(report.values()):
        log.info("recovered: adopted %s, failed %s, collected %s", report["adopted"], report["failed"],
                 report["collected"])
    shutdown = Shutdown(config.shutdown_grace, reactor)
    # <work threads= queue=>: requests beyond the threads wait, up to queue of them; more get Server.Busy.
    pool = ThreadPoolService(config.threads, name="vmplant-pool", queue=config.queue, grace=shutdown,
                             reactor=reactor)
    scheme = config.security.scheme
    public = config.public_url or url(scheme, host, PORT_PLACEHOLDER)
    site = build_site([VMPlantService], TNS, public, name=APP_NAME)
    runtime = PlantRuntime(plant, reactor, pool)
    site.app.vmplant = runtime
    site.identities = security.identities
    metrics = attach_metrics(site, plant, reactor) if config.metrics else None
    site.images_resource = ImagesResource(
        plant.warehouse, site, reactor,
        run=lambda work, what: pool.run(work, deadline=HASH_DEADLINE, what=what), serve_movable=config.serve_movable)
    listener = SoapListener(site, host, config.listen_port if port is None else port, shutdown=shutdown,
                            tls=security.credentials, insecure=security.insecure, reactor=reactor)

    def close() -> None:
        plant.release_segments()
        plant.backend.close()
        plant.records.close()

    root = ServerService("vmplant", shutdown)
    for child in (Closing("closing the records, backend and switches", close, skip=lambda: bool(pool.abandoned),
                          timeout=CLOSE_DEADLINE, reactor=reactor),
                  pool,
                  NotifierService(runtime),
                  RoundTimer(config.watch_interval, lambda: _watch_round(runtime), name="guest watch",
                             shutdown=shutdown, clock=reactor),
                  *([RoundTimer(config.metrics_refresh,
                                metrics.refresher(lambda read: pool.run(read, what="the metrics' counts")).run,
                                name="metrics refresh", shutdown=shutdown, now=True, clock=reactor)]
                    if metrics is not None else []),
                  *([RoundTimer(config.peers_refresh, lambda: _peers_round(runtime), name="peers' catalogs",
                                shutdown=shutdown, now=True, clock=reactor)] if plant.transfers is not None else []),
                  listener):
        child.setServiceParent(root)
    return PlantServer(root, plant, runtime, listener, pool, security, metrics)


def attach_metrics(site: SoapSite, plant: Plant, reactor: Any) -> PlantMetrics:
    """The plant's metrics, told of every SOAP answer and agent error, served at ``/metrics`` by ``site``."""
    metrics = PlantMetrics(operation_names(site.app), plant.records)
    site.soap_resource.observer = metrics
    site.metrics_resource = MetricsResource(metrics, site, reactor)
    plant.on_agent_error = metrics.agent_error
    return metrics


def serve(config: PlantConfig, host: str | None = None, port: int | None = None) -> int:
    """Run the plant until SIGTERM or SIGINT."""
    from twisted.internet import reactor

    server = build_plant_server(config, host, port, reactor)
    listener = server.listener

    def ready() -> None:
        public_url = listener.public_url
        server.runtime.public_url = public_url
        if config.shops_file is not None:
            runtime = server.runtime
            runtime.notifier = ShopNotifier(public_url, lambda: shop_urls(config), reactor,
                                            tls=server.security.client_policy, offer=runtime.offer_fields)
            log.info("notifying of changes: %s", ", ".join(runtime.notifier.shops) or "no shop yet")
            runtime.notifier.changed()  # the shops hear this plant's offer now
        print(f"vmplant {config.name} listening on {url(config.security.scheme, listener.host, listener.port)} "
              f"(public {public_url})", flush=True)

    return run_server(server.root, reload=server.reload, ready=ready, reactor=reactor)


def shop_urls(config: PlantConfig) -> list[str]:
    """The endpoint URLs of the shops in the plant's shop list (ConfigurationError if it is bad): https, or
    http for an insecure plant."""
    return [url(config.security.scheme, h, p) for h, p in config.shops()]


def _peers_round(runtime: PlantRuntime) -> Deferred[Any]:
    """One read of the peers' catalogs (on the plant's pool, each peer within its deadline); the shops hear of
    this plant's offer when what it could fetch changed."""
    transfers = runtime.plant.transfers
    assert transfers is not None
    before = {name: image.size for name, image in transfers.remote.items()}

    def read() -> bool:
        transfers.refresh()
        return {name: image.size for name, image in transfers.remote.items()} != before

    def told(changed: bool) -> None:
        if changed and runtime.notifier is not None:
            runtime.notifier.changed()

    deadline = CATALOG_TIMEOUT * (len(transfers.peers) + 1)
    return runtime.pool.run(read, deadline=deadline, what="reading the peers' catalogs").addCallback(told)


def _watch_round(runtime: PlantRuntime) -> Deferred[Any]:
    """One look at the running guests (on the plant's pool); shops hear of the ones found dead."""
    def looked(ended: list[str]) -> None:
        if ended and runtime.notifier is not None:
            runtime.notifier.changed()

    return runtime.pool.run(runtime.plant.check_guests, deadline=WATCH_DEADLINE, what="the guest watch").addCallback(
        looked)


def main(argv: Sequence[str] | None = None) -> int:
    """``vmplant [--config FILE] ...`` runs a plant; ``vmplant check-image FILE`` checks an image
    (:mod:`.checkimage`)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["check-image"]:
        from .checkimage import main as check_image_main

        return check_image_main(args[1:])
    description = "Run a VMPlant server. ('vmplant check-image FILE' boots an image and pings its agent.)"
    return server_main(argv, prog="vmplant", description=description,
                       default_config="configuration_vmplant.xml",
                       serve=lambda path, host, port: serve(load_config(path), host, port))

if __name__ == "__main__":
    sys.exit(main())
