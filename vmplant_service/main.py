"""``vmplant``: run a VMPlant server from its ``configuration_vmplant.xml``.

Start-up order: load the configuration, open the records, read the
warehouse (bad entries are logged and skipped), start the host-only segment,
reconcile records with the guests that still run (re-adopt or reclaim),
then listen: over TLS with its certificate (also presented to the shops it
notifies), taking calls only from the identities its authorisation file
gives the shop or admin role (SIGHUP re-reads that file); or, configured
insecure, plain HTTP on loopback. On SIGTERM/SIGINT the server stops listening; guests keep
running and are re-adopted by the next start. The segment is stopped only
when no VM is left on it.
"""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vmshop_common.soap import compat  # noqa: F401  (before spyne)

# isort: split
from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from vmshop_common.errors import ConfigurationError, VMShopError
from vmshop_common.security import PORT_PLACEHOLDER, is_loopback, start_security, url
from vmshop_common.servermain import server_main
from vmshop_common.soap.server import bound_port, build_site, listen

from .backends import load_backend
from .config import PlantConfig, load_config
from .ippool import IPPool
from .notify import ShopNotifier
from .plant import Plant
from .records import PlantRecords
from .segment import OwnerSegments, default_switch_dir
from .service import APP_NAME, PlantRuntime, VMPlantService
from .warehouse import Warehouse
from .wire import TNS

log = logging.getLogger("vmplant")
#: Threads for plant work: every create holds one for its whole duration.
MAX_THREADS = 64


def build_plant(config: PlantConfig) -> Plant:
    """Every part of the plant, from its configuration (nothing listens yet)."""
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
    return Plant(config, backend, records, warehouse, pool, segments)


def serve(config: PlantConfig, host: str | None = None, port: int | None = None) -> int:
    """Run the plant until the reactor stops."""
    from twisted.internet import reactor

    host = host or config.listen_host
    if config.security.insecure and not is_loopback(host):
        raise ConfigurationError(f"insecure (plain HTTP) is refused on {host}: only on a loopback address")
    security = start_security(config.security, "plant")
    plant = build_plant(config)
    report = plant.recover()
    if any(report.values()):
        log.info("recovered: adopted %s, failed %s, collected %s", report["adopted"], report["failed"],
                 report["collected"])
    pool = ThreadPool(minthreads=2, maxthreads=MAX_THREADS, name="vmplant")
    pool.start()
    port = config.listen_port if port is None else port
    scheme = config.security.scheme
    public = config.public_url or url(scheme, host, PORT_PLACEHOLDER)
    site = build_site([VMPlantService], TNS, public, name=APP_NAME)
    runtime = PlantRuntime(plant, reactor, pool)
    site.app.vmplant = runtime
    site.identities = security.identities
    listening = listen(site, host, port, tls=security.credentials, insecure=security.insecure)
    public_url = site.public_url.replace("{port}", str(bound_port(listening)))
    if config.shops_file is not None:
        runtime.notifier = ShopNotifier(public_url, lambda: shop_urls(config), reactor, tls=security.client_policy)
        log.info("notifying of changes: %s", ", ".join(runtime.notifier.shops) or "no shop yet")
    watch = task.LoopingCall(_watch_round, runtime)
    watch.clock = reactor
    watch.start(config.watch_interval, now=False)
    print(f"vmplant {config.name} listening on {url(scheme, host, bound_port(listening))} (public {public_url})",
          flush=True)

    def reload_authorization(*_: object) -> None:
        def work() -> None:
            try:
                security.identities.reload()
            except VMShopError as exc:
                log.error("authorisation file not reloaded (the old one stays in force): %s", exc)
        reactor.callFromThread(work)  # type: ignore[attr-defined]

    signal.signal(signal.SIGHUP, reload_authorization)

    def shutdown() -> None:
        if watch.running:
            watch.stop()
        pool.stop()
        plant.release_segments()
        plant.backend.close()
        plant.records.close()

    reactor.addSystemEventTrigger("before", "shutdown", shutdown)  # type: ignore[attr-defined,arg-type]
    reactor.run()  # type: ignore[attr-defined,misc]
    return 0


def shop_urls(config: PlantConfig) -> list[str]:
    """The endpoint URLs of the shops in the plant's shop list (ConfigurationError if it is bad): https, or
    http for an insecure plant."""
    return [url(config.security.scheme, h, p) for h, p in config.shops()]


def _watch_round(runtime: PlantRuntime) -> Deferred[Any]:
    """One look at the running guests (on the plant's pool); shops hear of the ones found dead."""
    def looked(ended: list[str]) -> None:
        if ended and runtime.notifier is not None:
            runtime.notifier.changed()

    def failed(failure: Any) -> None:  # a LoopingCall stops at a failure: log it and go on
        log.error("watch round failed: %s", failure.getTraceback())

    return deferToThreadPool(runtime.reactor, runtime.pool, runtime.plant.check_guests).addCallbacks(looked, failed)


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
