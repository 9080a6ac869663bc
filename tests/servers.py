"""Real VMPlant and VMShop server processes for integration tests.

:func:`start_plant` and :func:`start_shop` write a configuration with
``scripts/configure_vmplant.py`` / ``scripts/configure_vmshop.py`` (as an
operator would), start the server on a port the OS picks, and wait
(polling, with a deadline) until it listens. ``cleanup()`` leaves nothing
behind: the server, and for a plant every QEMU whose files live in its state
directory and its VDE switch.

Servers speak mutual TLS with the session's PKI (``tests/pki.py``): a plant
presents the ``plant`` certificate and obeys ``shop`` and ``admin``; a shop
presents ``shop`` and maps the users, the admin and its plants (``plant``,
listed for every plant address it is given). Clients made by
:meth:`ServerProcess.client` are ``admin`` unless told otherwise.
``insecure=True`` starts plain-HTTP servers (for comparisons).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import pytest
import zeep
import zeep.exceptions

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pki import test_pki  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PLANT_WSDL = ROOT / "wsdl" / "vmplant.wsdl"
PLANT_BINDING = "{urn:vmshop:vmplant:1}VMPlant"
SHOP_WSDL = ROOT / "wsdl" / "vmshop.wsdl"
SHOP_BINDING = "{urn:vmshop:vmshop:1}VMShop"

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float = 60.0, what: str = "condition") -> T:
    """Poll ``predicate`` until it returns something true (and return that); fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def fault_code(info: pytest.ExceptionInfo[zeep.exceptions.Fault]) -> str:
    """The code of a zeep fault without its namespace prefix (``Client.NoSuchVM``)."""
    return str(info.value.code).split(":", 1)[-1]


def processes_mentioning(text: str) -> list[int]:
    """Pids of live processes whose command line contains ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            args = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if text in args and state != "Z":
            found.append(int(entry.name))
    return found


@dataclass
class ServerProcess:
    """A server started from its configuration file; ``url`` is where it listens."""

    directory: Path
    config: Path
    state_dir: Path
    log: Path
    module: str = "vmplant_service.main"
    wsdl: Path = PLANT_WSDL
    binding: str = PLANT_BINDING
    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    url: str = ""
    service: Any = None
    mapfile: Path | None = None
    clients: list[zeep.Client] = field(default_factory=list)  # every client made, closed by cleanup()
    program: list[str] | None = None  # what starts it (default: this Python's -m module), before --config ...
    prefix: list[str] = field(default_factory=list)  # a command the server runs under (ip netns exec NS)

    def start(self, timeout: float = 60.0,
              on_listening: Callable[[subprocess.Popen[bytes]], None] | None = None) -> None:
        """Start the server (on the port it had before, if it ran already) and wait until it listens;
        ``on_listening(process)`` is called the moment it says so (the log is then watched every millisecond)."""
        offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                [*self.prefix, *(self.program or [sys.executable, "-m", self.module]), "--config",
                 str(self.config), "--port", str(self.port)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=str(self.directory))
        deadline = time.monotonic() + timeout
        while True:
            text = self.log.read_bytes()[offset:].decode(errors="replace")
            found = re.search(r"listening on (https?://[0-9A-Za-z.:\[\]-]+?:(\d+)/)", text)
            if found:
                self.url, self.port = found.group(1), int(found.group(2))
                if on_listening is not None:
                    on_listening(self.process)
                return
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start:\n{text}")
            time.sleep(0.001 if on_listening is not None else 0.05)

    def client(self, timeout: float = 300, identity: str | None = "admin", keep: bool = True) -> zeep.Client:
        """A zeep client built from the checked-in WSDL, pointed at this server, presenting ``identity``'s
        certificate (the default one is also kept as ``service``)."""
        transport = test_pki().zeep_transport(identity, timeout) if self.url.startswith("https:") else \
            zeep.Transport(timeout=timeout, operation_timeout=timeout)
        client = zeep.Client(str(self.wsdl), transport=transport)
        self.clients.append(client)
        service = client.create_service(self.binding, self.url)
        if keep:
            self.service = service
        return client

    def close_clients(self) -> None:
        """Close the connections of every client made so far (a socket left to the garbage collector warns)."""
        for client in self.clients:
            client.transport.session.close()
        self.clients.clear()

    def service_as(self, identity: str | None, timeout: float = 300) -> Any:
        """The service proxy of a zeep client presenting ``identity``'s certificate (``None``: none)."""
        return self.client(timeout, identity, keep=False).create_service(self.binding, self.url)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        self.process = None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def cleanup(self) -> None:
        """Stop the server and kill anything of its own that still runs (a plant's guests, its switch)."""
        self.stop()
        self.close_clients()
        markers = [str(self.state_dir)]
        if self.module == "vmplant_service.main":  # its owners' switches live outside its state directory
            from vmplant_service.config import load_config

            switch_dir = load_config(self.config).switch_dir
            if switch_dir is not None:
                markers.append(str(switch_dir))
        deadline = time.monotonic() + 10
        while True:
            pids = [pid for marker in markers for pid in processes_mentioning(marker)]
            if not pids or time.monotonic() > deadline:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)
        if len(markers) > 1:
            import shutil

            shutil.rmtree(markers[1], ignore_errors=True)


PlantProcess = ServerProcess


def start_plant(directory: Path, warehouse: Path, *, name: str = "plant1", capacity_vms: int = 4,
                capacity_memory: int = 2048, network: str = "vde", backend: str = "qemu",
                public_url: str | None = None, datastore: Path | None = None, pool_count: int = 8,
                backend_options: dict[str, str] | None = None,
                metrics: dict[str, float] | None = None, shops: list[str] | None = None,
                watch_interval: float | None = None, identity: str = "plant",
                insecure: bool = False, shutdown_grace: float | None = None,
                flags: list[str] | None = None, prefix: list[str] | None = None, port: int = 0) -> ServerProcess:
    """Configure (with scripts/configure_vmplant.py) and start a plant in ``directory``.

    ``shops`` (``host:port`` each) go into its shop list, which is empty by
    default: a test plant tells no shop of its changes unless asked to. It
    presents ``identity``'s certificate (``plant``, or ``plant2``).
    """
    directory.mkdir(parents=True, exist_ok=True)
    pki = test_pki()
    mapfile = pki.plant_mapfile(directory / "vmplant-mapfile")
    (directory / "vmshop_addresses.txt").write_text("# shops of this test\n" + "".join(f"{s}\n" for s in shops or []))
    state = directory / "state"
    config = directory / "configuration_vmplant.xml"
    args = [sys.executable, str(ROOT / "scripts" / "configure_vmplant.py"), "--yes", "--name", name,
            "--port", "0", "--warehouse", str(warehouse), "--state-dir", str(state), "--backend", backend,
            "--network", network, "--capacity-vms", str(capacity_vms), "--capacity-memory", str(capacity_memory),
            "--pool-count", str(pool_count), "--shops-file", str(directory / "vmshop_addresses.txt"),
            "--output", str(config)]
    args += ["--insecure"] if insecure else pki.tls_flags(identity) + ["--authorization", str(mapfile)]
    if public_url:
        args += ["--public-url", public_url]
    if datastore:
        args += ["--datastore", str(datastore)]
    if watch_interval is not None:
        args += ["--watch-interval", str(watch_interval)]
    if shutdown_grace is not None:
        args += ["--shutdown-grace", str(shutdown_grace)]
    for key, value in (backend_options or {}).items():
        args += ["--backend-option", f"{key}={value}"]
    args += list(flags or [])
    subprocess.run(args, check=True, capture_output=True, cwd=str(directory))
    if metrics:
        # What the plant measured on earlier runs (clone and boot seconds) is what it bids with.
        from vmplant_service.records import PlantRecords
        with PlantRecords(state / "records.sqlite3") as records:
            for key, value in metrics.items():
                records.set_metric(key, value)
    plant = ServerProcess(directory=directory, config=config, state_dir=state, log=directory / "plant.log",
                          mapfile=mapfile, prefix=list(prefix or []), port=port)
    return _started(plant)


def start_shop(directory: Path, plants: list[str], *, bid_timeout: float = 5.0, poll_interval: float = 0.5,
               lease_interval: float = 0.2, public_url: str | None = None,
               plant_identities: dict[str, list[str]] | None = None, quotas: list[str] | None = None,
               insecure: bool = False, flags: list[str] | None = None,
               create_timeout: float | None = None, postgresql: str | None = None,
               prefix: list[str] | None = None, port: int = 0) -> ServerProcess:
    """Configure and start a shop whose plant list holds ``plants`` (``host:port`` each).

    Its authorisation file maps the test users and admin, and the plant identities of
    ``plant_identities`` (default: ``plant`` for every address in ``plants``). ``quotas``: configure
    flags (``--default-quota ...``, ``--quota ...``); ``flags``: any other configure flags.
    ``postgresql``: keep the registry in that PostgreSQL database (a connection string) instead of SQLite.
    """
    directory.mkdir(parents=True, exist_ok=True)
    pki = test_pki()
    mapfile = pki.shop_mapfile(directory / "vmshop-mapfile",
                               plant_identities if plant_identities is not None else {"plant": list(plants)})
    plants_file = directory / "vmplant_addresses.txt"
    plants_file.write_text("# plants of this test\n" + "".join(f"{plant}\n" for plant in plants))
    config = directory / "configuration_vmshop.xml"
    database = ["--postgresql", postgresql] if postgresql else ["--database", str(directory / "registry.sqlite3")]
    args = [sys.executable, str(ROOT / "scripts" / "configure_vmshop.py"), "--yes", "--port", "0",
            *database, "--plants-file", str(plants_file),
            "--bid-timeout", str(bid_timeout), "--poll-interval", str(poll_interval), "--output", str(config)]
    args += ["--insecure"] if insecure else pki.tls_flags("shop") + ["--authorization", str(mapfile)]
    args += list(quotas or []) + list(flags or [])
    if public_url:
        args += ["--public-url", public_url]
    subprocess.run(args, check=True, capture_output=True, cwd=str(directory))
    from vmshop_service.config import load_config, write_config
    written = replace(load_config(config), lease_interval=lease_interval)
    if create_timeout is not None:
        written = replace(written, create_timeout=create_timeout)
    write_config(written, config)
    shop = ServerProcess(directory=directory, config=config, state_dir=directory, log=directory / "shop.log",
                         module="vmshop_service.main", wsdl=SHOP_WSDL, binding=SHOP_BINDING, mapfile=mapfile,
                         prefix=list(prefix or []), port=port)
    return _started(shop)


def _started(server: ServerProcess) -> ServerProcess:
    try:
        server.start()
    except BaseException:
        server.cleanup()
        raise
    server.client()
    return server


def switches_of(plant: ServerProcess) -> list[str]:
    """The owners' switches a plant runs now (the segment names under its switch directory)."""
    from vmplant_service.config import load_config
    from vmplant_service.segment import OwnerSegments

    directory = load_config(plant.config).switch_dir
    return OwnerSegments(directory).names() if directory is not None else []


def host_port(server: ServerProcess) -> str:
    """``127.0.0.1:PORT`` of a running server, as a plant list names it."""
    return server.url.split("://", 1)[1].rstrip("/")
