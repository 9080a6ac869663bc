"""What the benchmark rows share: the run's context and cleanup, server processes, a raw SOAP client,
bare QEMU guests, statistics and verdicts.

Everything a run makes lives under one short temporary directory (unix socket
paths are limited to 107 bytes); every process it starts names that
directory on its command line, so a last sweep can find (and kill, by pid)
whatever a failure left behind.
"""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import servers  # noqa: E402  (tests/servers.py: start_plant, start_shop, ServerProcess)

WAREHOUSE = Path(os.environ.get("VMSHOP_WAREHOUSE") or ROOT / "var" / "warehouse")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- the run: options, temporary directory, cleanup --------------------------------------------------


@dataclass
class Row:
    """One line of the results table (``result``: PASS, MISS ..., info, ERROR ...)."""

    key: str
    measured: str
    figures: str
    ratio: str
    target: str
    result: str
    notes: list[str] = field(default_factory=list)


class Cleanup:
    """A stack of undo steps; ``run()`` calls them newest first and never raises."""

    def __init__(self) -> None:
        self._steps: list[tuple[str, Callable[[], Any]]] = []

    def push(self, label: str, step: Callable[[], Any]) -> Callable[[], Any]:
        self._steps.append((label, step))
        return step

    def run(self) -> None:
        while self._steps:
            label, step = self._steps.pop()
            try:
                step()
            except BaseException as exc:  # noqa: BLE001 - cleanup goes on whatever one step does
                log(f"cleanup of {label} failed: {exc!r}")


@dataclass
class Context:
    quick: bool
    root: Path
    cleanup: Cleanup
    accelerator: str = "?"

    def n(self, full: int, quick: int) -> int:
        return quick if self.quick else full

    def directory(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=False)
        return path


def kill_processes_under(root: Path) -> list[int]:
    """SIGKILL every live process whose command line names ``root`` (all of them ours); their pids."""
    marker = str(root)
    killed: list[int] = []
    deadline = time.monotonic() + 15
    while True:
        pids = servers.processes_mentioning(marker)
        if not pids or time.monotonic() > deadline:
            return killed
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


# --- server processes ------------------------------------------------------------------------------


def launch_plant(ctx: Context, directory: Path, *, name: str = "plant1", backend: str = "qemu", network: str = "vde",
                 capacity_vms: int = 4, capacity_memory: int = 2048, pool_count: int = 8,
                 start_timeout: float = 300.0, client: bool = True, insecure: bool = False,
                 warehouse: Path | None = None, identity: str = "plant", flags: list[str] | None = None,
                 mapfile_extra: list[str] | None = None) -> servers.ServerProcess:
    """tests/servers.py's start_plant, with a longer start deadline (many plants start at once on 2 cores).

    Registers the plant's cleanup (the server, its guests, its switch) at once. Its shop list is
    empty: the shops of a run find out by asking, as the rows measure. Mutual TLS with the test PKI
    (tests/pki.py), as in production; ``insecure``: plain HTTP on loopback. ``warehouse``: its own (default:
    the shared one, which a row that publishes must not use). ``identity``: the certificate it presents;
    ``flags``: more configure flags; ``mapfile_extra``: more lines of its authorisation file (its peers).
    """
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vmshop_addresses.txt").write_text("# no shop is told of changes in a benchmark run\n")
    state = directory / "state"
    config = directory / "configuration_vmplant.xml"
    args = [sys.executable, str(ROOT / "scripts" / "configure_vmplant.py"), "--yes", "--name", name,
            "--port", "0", "--warehouse", str(warehouse or WAREHOUSE), "--state-dir", str(state), "--backend", backend,
            "--network", network, "--capacity-vms", str(capacity_vms), "--capacity-memory", str(capacity_memory),
            "--pool-count", str(pool_count), "--shops-file", str(directory / "vmshop_addresses.txt"),
            "--output", str(config)]
    pki = servers.test_pki()
    mapfile = pki.plant_mapfile(directory / "vmplant-mapfile", mapfile_extra)
    args += ["--insecure"] if insecure else pki.tls_flags(identity) + ["--authorization", str(mapfile)]
    args += list(flags or [])
    subprocess.run(args, check=True, capture_output=True, cwd=str(directory), timeout=start_timeout)
    plant = servers.ServerProcess(directory=directory, config=config, state_dir=state, log=directory / "plant.log",
                                  mapfile=mapfile)
    ctx.cleanup.push(f"plant {name}", plant.cleanup)
    plant.start(timeout=start_timeout)
    if client:
        plant.client()
    return plant


def launch_shop(ctx: Context, directory: Path, plants: list[str], **kwargs: Any) -> servers.ServerProcess:
    """tests/servers.py's start_shop with the production defaults for its timers and bid timeout
    (the tests' 0.5 s state refresh would poll every plant twice a second), its cleanup registered."""
    kwargs.setdefault("bid_timeout", 10.0)
    kwargs.setdefault("poll_interval", 5.0)
    kwargs.setdefault("lease_interval", 1.0)
    shop = servers.start_shop(directory, plants, **kwargs)
    ctx.cleanup.push(f"shop {directory.name}", shop.cleanup)
    return shop


def rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


# --- a raw SOAP client: prebuilt envelopes over one keep-alive connection ---------------------------


def envelope(client: Any, service: Any, operation: str, **kwargs: Any) -> bytes:
    """The request zeep would send for ``operation`` (built once, posted many times)."""
    from lxml import etree

    return bytes(etree.tostring(client.create_message(service, operation, **kwargs), xml_declaration=True,
                                encoding="utf-8"))


class RawSoap:
    """POSTs prebuilt SOAP envelopes over one HTTP/1.1 keep-alive connection (no client-side parsing).

    An https URL is reached over mutual TLS as ``identity`` of the test PKI (the handshake once, then the
    connection is kept alive like the plain one).
    """

    def __init__(self, url: str, timeout: float = 120.0, identity: str = "admin") -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.tls = parts.scheme == "https"
        self.port = parts.port or (443 if self.tls else 80)
        self.path = parts.path or "/"
        self.timeout = timeout
        self.context = servers.test_pki().ssl_context(identity) if self.tls else None
        self.conn: http.client.HTTPConnection | None = None

    def post(self, body: bytes, action: str = "") -> bytes:
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = (http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout,
                                                         context=self.context) if self.tls
                             else http.client.HTTPConnection(self.host, self.port, timeout=self.timeout))
            try:
                self.conn.request("POST", self.path, body, {"Content-Type": "text/xml; charset=utf-8",
                                                             "SOAPAction": f'"{action}"'})
                answer = self.conn.getresponse()
                data = answer.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.close()
                if attempt:
                    raise
                continue
            if answer.will_close:
                self.close()
            if answer.status != 200 or b"Fault>" in data[:2000]:
                raise RuntimeError(f"SOAP {action} answered HTTP {answer.status}: {data[:600]!r}")
            return data
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def rate(call: Callable[[], Any], seconds: float) -> tuple[int, float]:
    """Call ``call`` back to back for ``seconds``; (calls, elapsed seconds)."""
    count = 0
    started = time.perf_counter()
    end = started + seconds
    while True:
        call()
        count += 1
        now = time.perf_counter()
        if now >= end:
            return count, now - started


def timed(call: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = call()
    return time.perf_counter() - started, result


# --- bare QEMU guests: the qemu backend's own command line, started by hand ------------------------


@dataclass
class BareGuest:
    """One guest started with ``qemu_command`` (as the qemu backend would), outside any plant."""

    spec: Any
    command: list[str]
    clone_seconds: float
    proc: subprocess.Popen[bytes] | None = None
    launched: float = 0.0
    ready: float | None = None

    @property
    def paths(self) -> Any:
        from vmplant_service.backends.qemu import RunPaths

        return RunPaths.of(self.spec.run_dir)

    def agent(self) -> Any:
        """The guest's agent, reached as the plant reaches it (a SocketTransport on the backend's socket)."""
        from vmplant_service.agent.qga import GuestAgent
        from vmplant_service.agent.transport import SocketTransport

        return GuestAgent(SocketTransport(self.paths.agent))


def tiny_image() -> Any:
    """The warehouse's 'tiny' image as the plant reads it (ImageInfo)."""
    from vmplant_service.warehouse import Warehouse

    return Warehouse(WAREHOUSE).get("tiny")


def tiny_spec_for_probe() -> Any:
    from vmplant_service.backends.base import GuestSpec

    info = tiny_image()
    return GuestSpec(vm_id="probe", disk=info.disk, memory=info.hardware.memory, vcpus=info.hardware.vcpus,
                     run_dir=Path("/nonexistent"), kernel=info.kernel,
                     initrd=info.initrd, cmdline=info.cmdline, machine=info.machine)


def prepare_bare(directory: Path, vm_id: str, switch: Any, accelerator: str) -> BareGuest:
    """Clone the tiny image, make the run directory, build the command the qemu backend would (nothing runs)."""
    from vmplant_service.backends.base import GuestSpec, Nic
    from vmplant_service.backends.qemu import QemuBackend, qemu_command
    from vmplant_service.clone import make_overlay
    from vmplant_service.plant import free_port
    from vmplant_service.segment import mac_for

    info = tiny_image()
    base = directory / vm_id
    base.mkdir(parents=True)
    overlay = base / "disk.qcow2"
    clone_seconds = make_overlay(info.disk, info.disk_format, overlay)
    (base / "run").mkdir(mode=0o700)
    # The NICs a plant with a host-only segment gives each VM (plant.Plant._spec).
    nics = [Nic("user", mac_for(vm_id, 0), host_port=free_port())]
    if switch is not None:
        nics.append(Nic("segment", mac_for(vm_id, 1), switch=str(switch.control)))
    spec = GuestSpec(vm_id=vm_id, disk=overlay, memory=info.hardware.memory, vcpus=info.hardware.vcpus,
                     run_dir=base / "run", kernel=info.kernel, initrd=info.initrd,
                     cmdline=info.cmdline, machine=info.machine, arch=info.hardware.arch, nics=tuple(nics))
    backend = QemuBackend({})
    binary = shutil.which(backend.binary) or backend.binary
    command = qemu_command(spec, binary, accelerator, backend.disk_cache, backend._runas_user(), backend.sandbox)
    return BareGuest(spec, command, clone_seconds)


def launch_bare(guest: BareGuest) -> None:
    paths = guest.paths
    with open(paths.stderr, "wb") as err:
        guest.launched = time.monotonic()
        guest.proc = subprocess.Popen(guest.command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=err, start_new_session=True)


def wait_bare(guests: list[BareGuest], timeout: float = 600.0) -> None:
    """Wait until every guest's agent answers (as the plant waits: ``Channel.wait_agent``); RuntimeError otherwise.

    One thread per guest, so guests booting together are each timed when their own agent answers.
    """
    from vmplant_service.channel import Channel

    errors: list[str] = []

    def wait(guest: BareGuest) -> None:
        assert guest.proc is not None
        proc = guest.proc
        try:
            Channel(guest.agent()).wait_agent(timeout, alive=lambda: proc.poll() is None)
            guest.ready = time.monotonic()
        except Exception as exc:  # noqa: BLE001 - reported below
            stderr = guest.paths.stderr.read_text(errors="replace")[-300:]
            errors.append(f"{guest.spec.vm_id}: {exc} (stderr: {stderr})")

    threads = [threading.Thread(target=wait, args=(guest,)) for guest in guests]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError("; ".join(errors))


def _tail(path: Path, limit: int = 600) -> str:
    try:
        return path.read_bytes()[-limit:].decode(errors="replace")
    except OSError:
        return ""


def kill_bare(guest: BareGuest) -> None:
    """SIGKILL the guest's QEMU (by its pidfile, only if that pid really is it) and wait until it is gone."""
    from vmplant_service.backends.qemu import qemu_pid

    paths = guest.paths
    pid = qemu_pid(paths)
    if pid is not None:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 10
        while qemu_pid(paths) is not None and time.monotonic() < deadline:
            time.sleep(0.02)
    if guest.proc is not None:
        try:
            guest.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
    if guest.proc is not None and guest.proc.poll() is None:
        # Still in front of -daemonize (killed early): it is our child.
        guest.proc.kill()
    if guest.proc is not None:
        try:
            guest.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass


def start_switch(ctx: Context, directory: Path) -> Any:
    """A VDE switch like a plant's segment (for bare guests' second NIC); stopped at cleanup."""
    from vmplant_service.segment import VdeSegment

    segment = VdeSegment(directory)
    ctx.cleanup.push("vde switch", segment.stop)
    segment.start()
    return segment


def _cpu_times() -> tuple[int, int]:
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return fields[3] + fields[4], sum(fields)  # idle + iowait, total


def settle(min_idle: float = 0.6, timeout: float = 30.0) -> float:
    """Wait (up to ``timeout``) until the CPUs were at least ``min_idle`` idle over half a second.

    Servers that just started (imports, first refreshes) or guests just killed should not weigh on the
    next measurement. Returns the last idle fraction seen.
    """
    deadline = time.monotonic() + timeout
    while True:
        idle0, total0 = _cpu_times()
        time.sleep(0.5)
        idle1, total1 = _cpu_times()
        idle = (idle1 - idle0) / max(1, total1 - total0)
        if idle >= min_idle or time.monotonic() > deadline:
            return idle


# --- statistics, formatting, verdicts --------------------------------------------------------------


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def ms(seconds: float) -> str:
    value = seconds * 1000
    return f"{value:.2f} ms" if value < 10 else f"{value:.1f} ms" if value < 100 else f"{value:.0f} ms"


def sec(seconds: float) -> str:
    return f"{seconds:.2f} s"


def spread(values: list[float], unit: Callable[[float], str]) -> str:
    return f"{unit(min(values))}..{unit(max(values))}, n={len(values)}" if len(values) > 1 else "n=1"


def at_most(value: float, limit: float, show: Callable[[float], str]) -> str:
    """PASS if value <= limit, else MISS with the excess (absolute and relative)."""
    if value <= limit:
        return "PASS"
    return f"MISS by {show(value - limit)} (+{(value / limit - 1) * 100:.0f}% over the limit)"


def at_least(value: float, limit: float, show: Callable[[float], str]) -> str:
    if value >= limit:
        return "PASS"
    return f"MISS by {show(limit - value)}"


def x(value: float) -> str:
    return f"{value:.2f}x"


# --- the plant farm: many real plant services per process ---------------------------------------------------


@dataclass
class Farm:
    """Plant farm processes (vmplant_service.farm): their processes and the plants' ``host:port``."""

    processes: list[subprocess.Popen[bytes]]
    addresses: list[str]
    shops_file: Path
    started_seconds: float

    def rss_mib(self) -> float:
        return sum(rss_mib(p.pid) for p in self.processes)


def launch_farm(ctx: Context, directory: Path, count: int, per_process: int = 125, timeout: float = 900.0) -> Farm:
    """``count`` fake-backend plants, ``per_process`` to a farm process, each on its own 127.x.y.z address (farm
    process k uses 127.(20+k).0.1 ...). Plain HTTP on loopback (insecure): TLS is row 8's subject. Their shop
    list is ``shops_file`` (empty until a shop of the row writes itself into it)."""
    directory.mkdir(parents=True, exist_ok=True)
    shops_file = directory / "vmshop_addresses.txt"
    shops_file.write_text("# the shops of this run\n")
    template = directory / "template.xml"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "configure_vmplant.py"), "--yes", "--name", "farm",
                    "--port", "0", "--warehouse", str(WAREHOUSE), "--state-dir", str(directory / "unused"),
                    "--backend", "fake", "--network", "none", "--capacity-vms", "1000", "--capacity-memory",
                    "1048576", "--shops-file", str(shops_file), "--insecure", "--output", str(template)],
                   check=True, capture_output=True, cwd=str(directory), timeout=120)
    processes = []
    lists = []
    started = time.monotonic()
    for k in range((count + per_process - 1) // per_process):
        size = min(per_process, count - k * per_process)
        listing = directory / f"farm{k}.txt"
        logfile = open(directory / f"farm{k}.log", "wb")  # noqa: SIM115 - the process keeps it
        process = subprocess.Popen(
            [sys.executable, "-m", "vmplant_service.farm", "--config", str(template), "--count", str(size),
             "--first", f"127.{20 + k}.0.1", "--state", str(directory / f"farm{k}"), "--list", str(listing)],
            cwd=str(ROOT), stdout=logfile, stderr=subprocess.STDOUT, start_new_session=True)
        logfile.close()
        processes.append(process)
        lists.append(listing)

        def stop(process: subprocess.Popen[bytes] = process) -> None:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(10)

        ctx.cleanup.push(f"farm process {k}", stop)
    deadline = time.monotonic() + timeout
    while not all(listing.exists() for listing in lists):
        for k, process in enumerate(processes):
            if process.poll() is not None:
                raise RuntimeError(f"farm process {k} ended: {(directory / f'farm{k}.log').read_text()[-2000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError("the farm did not start in time")
        time.sleep(0.5)
    addresses = [line.strip() for listing in lists for line in listing.read_text().splitlines() if line.strip()]
    return Farm(processes, addresses, shops_file, time.monotonic() - started)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))]
