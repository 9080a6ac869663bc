"""Real VMPlant server processes for integration tests.

:func:`start_plant` writes a configuration with ``scripts/configure_vmplant.py``
(as an operator would), starts ``python -m vmplant_service.main`` on a port
the OS picks, and waits (polling, with a deadline) until it listens.
:meth:`PlantProcess.cleanup` leaves nothing behind: the server, every QEMU
whose files live in the plant's state directory, and the VDE switch.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import zeep

ROOT = Path(__file__).resolve().parent.parent
PLANT_WSDL = ROOT / "wsdl" / "vmplant.wsdl"
PLANT_BINDING = "{urn:vmshop:vmplant:1}VMPlant"


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
class PlantProcess:
    directory: Path
    config: Path
    state_dir: Path
    log: Path
    extra_args: list[str] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None
    url: str = ""

    def start(self, timeout: float = 60.0) -> None:
        offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "vmplant_service.main", "--config", str(self.config), "--port", "0",
                 *self.extra_args],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=str(self.directory))
        deadline = time.monotonic() + timeout
        while True:
            text = self.log.read_bytes()[offset:].decode(errors="replace")
            found = re.search(r"listening on (http://127\.0\.0\.1:\d+/)", text)
            if found:
                self.url = found.group(1)
                return
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the plant did not start:\n{text}")
            time.sleep(0.05)

    def client(self, timeout: float = 300) -> zeep.Client:
        """A zeep client built from the checked-in WSDL, pointed at this plant."""
        client = zeep.Client(str(PLANT_WSDL), transport=zeep.Transport(timeout=timeout, operation_timeout=timeout))
        self.service = client.create_service(PLANT_BINDING, self.url)
        return client

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
        """Stop the server and kill anything of this plant's that still runs."""
        self.stop()
        marker = str(self.state_dir)
        deadline = time.monotonic() + 10
        while True:
            pids = processes_mentioning(marker)
            if not pids or time.monotonic() > deadline:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)


def start_plant(directory: Path, warehouse: Path, *, name: str = "plant1", capacity_vms: int = 4,
                capacity_memory: int = 2048, network: str = "vde", backend: str = "qemu",
                public_url: str | None = None, datastore: Path | None = None, pool_count: int = 8,
                backend_options: dict[str, str] | None = None) -> PlantProcess:
    """Configure (with scripts/configure_vmplant.py) and start a plant in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    state = directory / "state"
    config = directory / "configuration_vmplant.xml"
    args = [sys.executable, str(ROOT / "scripts" / "configure_vmplant.py"), "--yes", "--name", name,
            "--port", "0", "--warehouse", str(warehouse), "--state-dir", str(state), "--backend", backend,
            "--network", network, "--capacity-vms", str(capacity_vms), "--capacity-memory", str(capacity_memory),
            "--pool-count", str(pool_count), "--shops-file", str(directory / "vmshop_addresses.txt"),
            "--output", str(config)]
    if public_url:
        args += ["--public-url", public_url]
    if datastore:
        args += ["--datastore", str(datastore)]
    for key, value in (backend_options or {}).items():
        args += ["--backend-option", f"{key}={value}"]
    subprocess.run(args, check=True, capture_output=True, cwd=str(directory))
    plant = PlantProcess(directory=directory, config=config, state_dir=state, log=directory / "plant.log")
    try:
        plant.start()
    except BaseException:
        plant.cleanup()
        raise
    return plant
