"""The QEMU backend's own parts: its command line, its state table, the KVM probe, pid checks,
and real guests on a host-only VDE segment (tests marked ``guest`` boot real guests)."""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from conftest import SpecFactory, processes_naming

from vmplant_service.agent.qga import GuestAgent
from vmplant_service.backends.base import GuestSpec, Nic, VMState
from vmplant_service.backends.qemu import QEMU_STATES, QemuBackend, RunPaths, qemu_command, translate_status
from vmplant_service.backends.qmp import QMPClient, QMPError
from vmplant_service.channel import ActionContext, Channel
from vmplant_service.segment import VdeSegment, mac_for
from vmshop_common.dag import NetworkAction, ScriptAction
from vmshop_common.errors import BackendError

BOOT_TIMEOUT = 120.0
SEGMENT_NET = "192.168.77."

#: Every QEMU RunState (QAPI, QEMU 7.2) and what it must become.
EXPECTED_STATES = {
    "running": VMState.RUNNING, "paused": VMState.PAUSED, "prelaunch": VMState.PAUSED, "debug": VMState.PAUSED,
    "suspended": VMState.PAUSED, "inmigrate": VMState.PAUSED, "postmigrate": VMState.PAUSED,
    "finish-migrate": VMState.PAUSED, "save-vm": VMState.PAUSED, "restore-vm": VMState.PAUSED,
    "shutdown": VMState.STOPPED, "guest-panicked": VMState.CRASHED, "internal-error": VMState.CRASHED,
    "io-error": VMState.CRASHED, "watchdog": VMState.CRASHED, "colo": VMState.UNKNOWN,
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def spec_on_paper(tmp_path: Path, **changes: object) -> GuestSpec:
    """A spec whose files need not exist (for the command line only)."""
    spec = GuestSpec(vm_id="paper", disk=tmp_path / "disk.qcow2", memory=128, vcpus=2, run_dir=tmp_path / "run",
                     kernel=tmp_path / "vmlinux", initrd=tmp_path / "initrd.img",
                     cmdline="console=ttyS0 quiet", machine="q35")
    return replace(spec, **changes)  # type: ignore[arg-type]


def option_values(command: list[str], flag: str) -> list[str]:
    return [command[i + 1] for i, arg in enumerate(command[:-1]) if arg == flag]


# The command line ------------------------------------------------------------------------
def test_command_line(tmp_path: Path) -> None:
    nics = (Nic("user", "52:54:00:00:00:01", host_port=18080), Nic("user", "52:54:00:00:00:02"),
            Nic("segment", "52:54:00:00:00:03", switch="/run/sw.ctl"))
    spec = spec_on_paper(tmp_path, nics=nics, data_dir=tmp_path / "data")
    command = qemu_command(spec, "/usr/bin/qemu-system-x86_64", "tcg", runas="vmshop-qemu")
    paths = RunPaths.of(spec.run_dir)
    assert command[0] == "/usr/bin/qemu-system-x86_64"
    assert option_values(command, "-machine") == ["q35"] and option_values(command, "-accel") == ["tcg"]
    assert option_values(command, "-m") == ["128M"] and option_values(command, "-smp") == ["2"]
    assert option_values(command, "-kernel") == [str(tmp_path / "vmlinux")]
    assert option_values(command, "-append") == ["console=ttyS0 quiet"]
    assert option_values(command, "-drive") == [
        f"file={tmp_path / 'disk.qcow2'},file.auto-read-only=off,if=virtio,format=qcow2,cache=unsafe"]
    # No writable share at all: the data share is read-only; the channel is the agent's virtio-serial port.
    assert option_values(command, "-fsdev") == [
        f"local,id=data,path={tmp_path / 'data'},security_model=none,readonly=on"]
    assert "virtio-9p-pci,fsdev=data,mount_tag=vmdata" in option_values(command, "-device")
    assert option_values(command, "-chardev") == [
        f"socket,id=qga0,path={paths.agent},server=on,wait=off",
        f"socket,id=con0,path={paths.console_socket},server=on,wait=off"]
    assert option_values(command, "-device")[:2] == [
        "virtio-serial-pci,id=vser0", "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0"]
    # Unprivileged and sandboxed once it has opened what it needs.
    assert option_values(command, "-runas") == ["vmshop-qemu"]
    assert option_values(command, "-sandbox") == ["on,obsolete=deny,spawn=deny,resourcecontrol=deny"]
    assert "-daemonize" not in command  # QEMU 7.2's sandbox forbids its fork: the backend detaches QEMU itself
    netdevs = option_values(command, "-netdev")
    assert netdevs == ["user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:18080-:80", "user,id=net1,restrict=on",
                       "vde,id=net2,sock=/run/sw.ctl"]
    assert all("restrict=on" in n for n in netdevs if n.startswith("user,"))
    # A VM generation id (pc and q35): a clone restored from a saved state gets a new one (its kernel reseeds).
    assert option_values(command, "-device")[2] == "vmgenid,id=vmgenid0"
    assert "-incoming" not in command
    assert option_values(command, "-device")[4:] == [
        "virtio-net-pci,netdev=net0,mac=52:54:00:00:00:01,romfile=",
        "virtio-net-pci,netdev=net1,mac=52:54:00:00:00:02,romfile=",
        "virtio-net-pci,netdev=net2,mac=52:54:00:00:00:03,romfile="]
    assert option_values(command, "-qmp") == [f"unix:{paths.qmp},server=on,wait=off"]
    # Restoring a saved state: QEMU waits paused for it (migrate-incoming fd:, given over QMP), never boots.
    restoring = qemu_command(spec, "/usr/bin/qemu-system-x86_64", "tcg", runas="vmshop-qemu", incoming=True)
    assert option_values(restoring, "-incoming") == ["defer"] and "-S" in restoring
    assert [a for a in restoring if a not in ("-incoming", "defer", "-S")] == command
    assert option_values(command, "-pidfile") == [str(paths.pidfile)]
    assert option_values(command, "-serial") == ["chardev:con0"]
    for flag in ("-nodefaults", "-no-reboot", "-no-user-config"):
        assert flag in command
    assert option_values(command, "-display") == ["none"]
    assert not any("0.0.0.0" in arg for arg in command)


def test_command_line_without_data_share_or_initrd(tmp_path: Path) -> None:
    command = qemu_command(spec_on_paper(tmp_path, initrd=None), "qemu-system-x86_64", "kvm", "writeback",
                           sandbox=False)
    assert "-initrd" not in command and "mount_tag=vmdata" not in " ".join(command)
    assert "-runas" not in command and "-sandbox" not in command
    assert option_values(command, "-drive")[0].endswith("cache=writeback")


@pytest.mark.parametrize("change, message", [
    ({"nics": (Nic("tap", "52:54:00:00:00:01"),)}, "kind"),
    ({"nics": (Nic("user", "52:54:00:00:00:0G"),)}, "MAC"),
    ({"nics": (Nic("segment", "52:54:00:00:00:01", switch="/nonexistent/sw.ctl"),)}, "switch"),
    ({"vm_id": "a,b"}, "VM id"),
    ({"arch": "aarch64"}, "x86_64"),
    ({"memory": 0}, "positive"),
    ({"data_dir": Path("/nonexistent/data")}, "data"),
])
def test_refused_specs_make_nothing(tmp_path: Path, change: dict[str, object], message: str) -> None:
    for name in ("disk.qcow2", "vmlinux", "initrd.img"):
        (tmp_path / name).write_bytes(b"x")
    spec = spec_on_paper(tmp_path, **change)
    with pytest.raises(BackendError, match=message):
        QemuBackend({"accel": "tcg"}).start(spec)
    assert not Path(spec.run_dir).exists()


def test_run_dir_too_long_for_a_socket(tmp_path: Path) -> None:
    for name in ("disk.qcow2", "vmlinux", "initrd.img"):
        (tmp_path / name).write_bytes(b"x")
    spec = spec_on_paper(tmp_path, run_dir=tmp_path / ("r" * 120))
    with pytest.raises(BackendError, match="too long"):
        QemuBackend({"accel": "tcg"}).start(spec)


# States ----------------------------------------------------------------------------------
def test_state_table() -> None:
    for status, expected in EXPECTED_STATES.items():
        assert translate_status(status) == expected, status
    assert translate_status("no-such-state") == VMState.UNKNOWN
    assert set(QEMU_STATES) <= set(EXPECTED_STATES)


# The accelerator probe ---------------------------------------------------------------------
def test_accel_probe_is_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    probes: list[str] = []

    def fake_probe(self: QemuBackend, spec: GuestSpec) -> bool:
        probes.append(str(spec.kernel))
        return False

    monkeypatch.setattr(QemuBackend, "probe_kvm", fake_probe)
    monkeypatch.setattr(QemuBackend, "_kvm_usable", staticmethod(lambda: True))
    kernel, other = tmp_path / "vmlinux", tmp_path / "other-vmlinux"
    kernel.write_bytes(b"k")
    other.write_bytes(b"o")
    spec = spec_on_paper(tmp_path, kernel=kernel)
    state = tmp_path / "state"
    first = QemuBackend({"state_dir": str(state)})
    assert first.capabilities().accelerator == "auto"
    assert first.accelerator_for(spec) == "tcg" and first.accelerator_for(spec) == "tcg"
    assert probes == [str(kernel)]
    cache = json.loads((state / "accel-probe.json").read_text())
    [(key, entry)] = cache.items()
    assert entry["accel"] == "tcg" and first.qemu_version() in key and str(kernel) in key
    second = QemuBackend({"state_dir": str(state)})  # another process: the file answers
    assert second.capabilities().accelerator == "tcg"
    assert second.accelerator_for(spec) == "tcg" and probes == [str(kernel)]
    assert second.accelerator_for(replace(spec, kernel=other)) == "tcg"  # another kernel: probed again
    assert probes == [str(kernel), str(other)]
    assert QemuBackend({"accel": "kvm", "state_dir": str(state)}).accelerator_for(spec) == "kvm"
    assert len(probes) == 2


@pytest.mark.guest
def test_accel_probe_boots_for_real(guest_specs: SpecFactory, accel_state_dir: Path) -> None:
    spec = guest_specs.new("probe")
    backend = QemuBackend({"state_dir": str(accel_state_dir)})
    started = time.monotonic()
    decision = backend.accelerator_for(spec)
    assert decision in ("kvm", "tcg")
    assert time.monotonic() - started < backend.probe_timeout + 15
    assert backend.capabilities().accelerator == decision
    assert processes_naming("VMSHOP-ACCEL-PROBE") == []
    cache = json.loads((accel_state_dir / "accel-probe.json").read_text())
    assert any(str(spec.kernel) in key and entry["accel"] == decision for key, entry in cache.items())


# Pids ----------------------------------------------------------------------------------------
def test_stale_pidfile_with_a_reused_pid_is_not_killed(fake_specs: SpecFactory) -> None:
    spec = fake_specs.new("stale")
    paths = RunPaths.of(spec.run_dir)
    paths.run_dir.mkdir()
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        paths.pidfile.write_text(f"{bystander.pid}\n")  # a dead QEMU's pid, now reused by someone else
        backend = QemuBackend({"accel": "tcg"})
        assert backend.adopt(spec) is False
        assert backend.state(spec.vm_id) == VMState.STOPPED
        assert backend.running() == []
        backend.stop(spec.vm_id, timeout=1)
        backend.destroy(spec.vm_id)
        assert bystander.poll() is None, "a process that is not the VM's QEMU was killed"
        assert not paths.pidfile.exists()
    finally:
        bystander.kill()
        bystander.wait()


def test_pidfile_of_a_dead_process(fake_specs: SpecFactory) -> None:
    spec = fake_specs.new("dead")
    paths = RunPaths.of(spec.run_dir)
    paths.run_dir.mkdir()
    gone = subprocess.Popen(["true"])
    gone.wait()
    paths.pidfile.write_text(f"{gone.pid}\n")
    backend = QemuBackend({"accel": "tcg"})
    assert backend.adopt(spec) is False
    backend.destroy(spec.vm_id)
    assert not paths.run_dir.exists()


def test_qmp_errors_are_backend_errors(tmp_path: Path) -> None:
    with pytest.raises(QMPError):
        QMPClient(tmp_path / "no.sock", timeout=1)
    mute = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    mute.bind(str(tmp_path / "mute.sock"))
    mute.listen(1)
    try:
        started = time.monotonic()
        with pytest.raises(BackendError, match="no answer"):
            QMPClient(tmp_path / "mute.sock", timeout=0.3)
        assert time.monotonic() - started < 2
    finally:
        mute.close()


def test_qmp_passes_a_file_descriptor_with_a_command(tmp_path: Path) -> None:
    """getfd: the state file the plant opened reaches QEMU as a descriptor (SCM_RIGHTS), never as a path."""
    path = str(tmp_path / "fd.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    received: list[bytes] = []

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            conn.sendall(b'{"QMP": {"version": {}, "capabilities": []}}\n')
            for _ in range(2):
                data, fds, _, _ = socket.recv_fds(conn, 65536, 4)
                request = json.loads(data.splitlines()[0])
                for fd in fds:
                    with os.fdopen(fd, "rb") as handle:
                        received.append(handle.read())
                conn.sendall(json.dumps({"return": {}, "id": request["id"]}).encode() + b"\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    state = tmp_path / "state.bin"
    state.write_bytes(b"machine state")
    fd = os.open(state, os.O_RDONLY)
    try:
        with QMPClient(path, timeout=5) as qmp:
            assert qmp.execute("getfd", {"fdname": "vmshop-state"}, fds=(fd,)) == {}
    finally:
        os.close(fd)
        thread.join(5)
        server.close()
    assert received == [b"machine state"]


def test_qmp_waits_while_the_listen_backlog_is_full(tmp_path: Path) -> None:
    """QEMU listens with a backlog of one: a full backlog is "busy" (EAGAIN), not a dead guest."""
    path = str(tmp_path / "busy.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    queued = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(2)]
    for sock in queued:
        sock.connect(path)  # the second fills the one-slot backlog
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    with pytest.raises(BlockingIOError):
        probe.connect(path)
    probe.close()

    def serve() -> None:
        for index in range(3):  # drain the two queued clients, then answer ours like QEMU
            conn, _ = server.accept()
            if index < 2:
                conn.close()
                continue
            conn.sendall(b'{"QMP": {"version": {}, "capabilities": []}}\n')
            reader = conn.makefile("rb")
            for line in reader:
                request = json.loads(line)
                reply = {"status": "running"} if request["execute"] == "query-status" else {}
                conn.sendall(json.dumps({"return": reply, "id": request["id"]}).encode() + b"\n")
            conn.close()

    timer = threading.Timer(0.3, serve)
    timer.start()
    try:
        with QMPClient(path, timeout=5) as qmp:
            assert qmp.execute("query-status") == {"status": "running"}
    finally:
        timer.join(10)
        for sock in queued:
            sock.close()
        server.close()


def test_capabilities_from_the_host() -> None:
    caps = QemuBackend({"accel": "tcg"}).capabilities()
    with open("/proc/meminfo") as handle:
        total = int(next(line for line in handle if line.startswith("MemTotal:")).split()[1]) // 1024
    assert caps.available and caps.accelerator == "tcg" and caps.channel == "virtio-serial"
    assert caps.max_memory == int(total * 0.75) and caps.max_vcpus == os.cpu_count()
    missing = QemuBackend({"qemu_binary": "/nonexistent/qemu"}).capabilities()
    assert not missing.available and "not installed" in missing.reason


# Real guests on a host-only segment ----------------------------------------------------------------
@dataclass
class Guest:
    spec: GuestSpec
    port: int
    address: str
    backend: QemuBackend
    ready_seconds: float = 0.0

    @property
    def channel(self) -> Channel:
        return Channel(GuestAgent(self.backend.agent(self.spec.vm_id)))

    @property
    def segment_mac(self) -> str:
        return next(nic.mac for nic in self.spec.nics if nic.kind == "segment")

    def run(self, body: str, timeout: int = 30) -> tuple[int, str]:
        result = self.channel.run("0001-t", ScriptAction(id="t", body=body, script_timeout=timeout), ActionContext())
        return result.status, result.output


def is_running(backend: QemuBackend, vm_id: str) -> bool:
    return backend.state(vm_id) == VMState.RUNNING


@dataclass
class Pair:
    backend: QemuBackend
    guests: list[Guest]


@pytest.fixture(scope="module")
def pair(guest_specs: SpecFactory, guest_tmp: Path, accel_state_dir: Path) -> Iterator[Pair]:
    """Two guests, each with a user NIC (hostfwd to its httpd) and a NIC on one VDE segment."""
    segment = VdeSegment(guest_tmp / "segment")
    segment.start()
    backend = QemuBackend({"state_dir": str(accel_state_dir)})
    guests: list[Guest] = []
    try:
        for index in (1, 2):
            vm_id = f"seg-{index}"
            port = free_port()
            nics = (Nic("user", mac_for(vm_id, 0), host_port=port),
                    Nic("segment", mac_for(vm_id, 1), switch=str(segment.control)))
            spec = guest_specs.new("seg", nics=nics)
            guests.append(Guest(spec, port, f"{SEGMENT_NET}{10 + index}", backend))
        started = time.monotonic()
        for guest in guests:  # both boot at once
            backend.start(guest.spec)
        for guest in guests:
            guest.channel.wait_agent(BOOT_TIMEOUT, alive=functools.partial(is_running, backend, guest.spec.vm_id))
            guest.ready_seconds = time.monotonic() - started
        yield Pair(backend, guests)
    finally:
        for guest in guests:
            backend.destroy(guest.spec.vm_id)
        segment.stop()


@pytest.mark.guest
def test_guests_ping_each_other_on_the_segment(pair: Pair) -> None:
    for guest in pair.guests:
        context = ActionContext(segment_mac=guest.segment_mac)
        result = guest.channel.run("0001-net", NetworkAction(id="net", mode="static", address=guest.address, prefix=24),
                                   context)
        assert result.ok, result.output
        assert result.output.split(" (")[0].strip().endswith(f"{guest.address}/24"), result.output
    first, second = pair.guests
    for source, target in ((first, second), (second, first)):
        status, output = source.run(f"ping -c 3 -W 2 {target.address}")
        assert status == 0 and " 0% packet loss" in output, output


def host_address() -> str | None:
    """The host's own address towards the outside (its source address for a route to 1.1.1.1)."""
    out = subprocess.run(["ip", "-o", "route", "get", "1.1.1.1"], capture_output=True, text=True).stdout.split()
    return out[out.index("src") + 1] if "src" in out else None


@pytest.mark.guest
@pytest.mark.network  # binds a listener on the host's own address (never sends beyond it)
def test_segment_traffic_stays_inside(pair: Pair) -> None:
    addresses = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True, check=True).stdout
    assert SEGMENT_NET not in addresses, "the host has an address on the guests' segment"
    # restrict=on: a guest reaches no server of the host (loopback, seen from the guest as
    # 10.0.2.2, or its own address) nor anything beyond it.
    listeners = []
    for address in filter(None, ("127.0.0.1", host_address())):
        listener = socket.socket()
        listener.bind((address, 0))
        listener.listen(4)
        listener.setblocking(False)
        listeners.append(listener)
    port_loopback = listeners[0].getsockname()[1]
    targets = [f"10.0.2.2:{port_loopback}"] + [":".join(map(str, lst.getsockname())) for lst in listeners[1:]]
    try:
        body = "".join(f"timeout 5 wget -q -O - http://{target}/ && echo REACHED {target}; " for target in targets)
        status, output = pair.guests[0].run(body + "timeout 5 wget -q -O - http://1.1.1.1/ && echo REACHED; exit 0")
        accepted = []
        for listener in listeners:
            try:
                accepted.append(listener.accept())
            except BlockingIOError:
                pass
    finally:
        for listener in listeners:
            listener.close()
    assert status == 0 and "REACHED" not in output, output
    assert accepted == [], f"a guest connected to the host: {accepted}"


@pytest.mark.guest
def test_host_reaches_each_guests_httpd(pair: Pair) -> None:
    for guest in pair.guests:
        with urllib.request.urlopen(f"http://127.0.0.1:{guest.port}/", timeout=10) as reply:
            assert b"vmshop-guest" in reply.read()


@pytest.mark.guest
def test_stop_powers_down_through_acpi(pair: Pair) -> None:
    for guest in pair.guests:
        print(f"{guest.spec.vm_id}: start -> agent ready {guest.ready_seconds:.1f} s (two booting at once)")
    guest = pair.guests[0]
    started = time.monotonic()
    pair.backend.stop(guest.spec.vm_id, timeout=30)
    took = time.monotonic() - started
    print(f"{guest.spec.vm_id}: stop (ACPI power-down) took {took:.1f} s")
    assert took < 30 and pair.backend.state(guest.spec.vm_id) == VMState.STOPPED
    assert "shutting down" in pair.backend.ex_console(guest.spec.vm_id)
    assert processes_naming(str(guest.spec.run_dir)) == []
    assert pair.backend.running() == [pair.guests[1].spec.vm_id]


@pytest.mark.guest
def test_paused_guest_reads_paused_and_is_stopped_at_once(pair: Pair) -> None:
    guest = pair.guests[1]
    with QMPClient(RunPaths.of(guest.spec.run_dir).qmp) as qmp:
        qmp.execute("stop")
    assert pair.backend.state(guest.spec.vm_id) == VMState.PAUSED
    started = time.monotonic()
    pair.backend.stop(guest.spec.vm_id, timeout=30)
    assert time.monotonic() - started < 5, "a paused guest cannot power down: it is killed without waiting"
    assert pair.backend.state(guest.spec.vm_id) == VMState.STOPPED
    assert processes_naming(str(guest.spec.run_dir)) == []
