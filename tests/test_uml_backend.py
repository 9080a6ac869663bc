"""The User-Mode Linux backend's own parts: its command line, its state table, the mconsole protocol,
the disk it gives UML, failures that leave nothing behind, and real UML guests (marked ``guest``):
start -> agent ready -> actions -> adopt -> graceful stop, the user network, the host-only segment with
pool addresses, the jail, and a guest kernel panic read as CRASHED."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from conftest import SpecFactory, processes_naming

from vmplant_service.backends import load_backend
from vmplant_service.backends.base import GuestSpec, Nic, VMState
from vmplant_service.backends.uml import (
    GUEST_GLIBC_TUNABLES,
    UML_STATES,
    MconsoleError,
    RunPaths,
    UmlBackend,
    guest_cmdline,
    mconsole,
    translate_condition,
    uml_command,
)
from vmplant_service.channel import ActionContext, ActionResult, Channel
from vmplant_service.segment import VdeSegment, mac_for
from vmshop_common.dag import NetworkAction, ScriptAction
from vmshop_common.errors import BackendError, ConfigurationError

BOOT_TIMEOUT = 120.0
ACTION_TIMEOUT = 30
HAVE_UML = shutil.which("linux.uml") is not None

#: Every condition the backend can observe and what it must become.
EXPECTED_STATES = {
    "running": VMState.RUNNING, "paused": VMState.PAUSED, "mute": VMState.UNKNOWN, "halted": VMState.STOPPED,
    "killed": VMState.STOPPED, "gone": VMState.STOPPED, "panicked": VMState.CRASHED, "failed": VMState.CRASHED,
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def spec_on_paper(tmp_path: Path, **changes: object) -> GuestSpec:
    """A spec whose files need not exist (for the command line only)."""
    spec = GuestSpec(vm_id="paper", disk=tmp_path / "disk.qcow2", memory=128, vcpus=1, run_dir=tmp_path / "run",
                     channel_dir=tmp_path / "channel", kernel=tmp_path / "vmlinux", initrd=tmp_path / "initrd.img",
                     cmdline="console=ttyS0 root=/dev/vda rootfstype=ext4 rw panic=-1 quiet clocksource=hpet "
                             "i8042.noaux vmshop.poll=0.5", machine="q35")
    return replace(spec, **changes)  # type: ignore[arg-type]


def leftovers(spec: GuestSpec) -> list[str]:
    found = processes_naming(str(Path(spec.run_dir).absolute()))
    found += processes_naming(str(Path(spec.channel_dir).absolute()))
    return [args for _, args in found]


def files_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def run(channel: Channel, body: str, node_id: str = "a", context: ActionContext | None = None,
        timeout: int = ACTION_TIMEOUT) -> ActionResult:
    name = channel.submit(ScriptAction(id=node_id, body=body, script_timeout=timeout), context or ActionContext())
    return channel.wait(name, timeout)


# The command line ------------------------------------------------------------------------------------
def test_command_line(tmp_path: Path) -> None:
    from vmplant_service.backends.uml import DiskPlan

    spec = spec_on_paper(tmp_path, data_dir=tmp_path / "data", nics=(
        Nic("user", "52:54:00:00:00:01", host_port=8080),
        Nic("segment", "52:54:00:00:00:02", switch=str(tmp_path / "sw.ctl"))))
    paths = RunPaths.of(spec.run_dir)
    disk = DiskPlan(ubd=f"{paths.cow},/cache/base.raw", base=Path("/cache/base.raw"), writable=paths.disk_dir)
    command = uml_command(spec, "/usr/bin/linux.uml", disk, fpu_workaround=True)
    assert command[0] == "/usr/bin/linux.uml"
    assert "mem=128M" in command
    assert f"ubd0={tmp_path}/run/disk/disk.cow,/cache/base.raw" in command
    assert "umid=uml" in command and f"uml_dir={tmp_path}/run/ctl/" in command
    assert ["con0=null,fd:1", "con=null", "ssl=null"] == [a for a in command if a.startswith(("con", "ssl"))]
    assert ("eth0=vde,slirp:///v4/restricted/tcpfwd=127.0.0.1:8080:10.0.2.15:80,52:54:00:00:00:01" in command)
    assert f"eth1=vde,{tmp_path}/run/net/nic1,52:54:00:00:00:02" in command  # a private switch, linked
    # The image's command line, made for QEMU, is translated: root on ubd, machine-only words dropped.
    assert "root=/dev/ubda" in command and "root=/dev/vda" not in command
    assert {"rootfstype=ext4", "rw", "panic=-1", "quiet", "vmshop.poll=0.5"} <= set(command)
    assert not [a for a in command if a.startswith(("console=", "clocksource=", "i8042."))]
    assert f"vmshop.hostfs={tmp_path}/channel" in command
    assert f"vmshop.data={tmp_path}/data" in command
    assert f"GLIBC_TUNABLES={GUEST_GLIBC_TUNABLES}" in command
    assert not [a for a in command if a.startswith(("initrd=", "hostfs="))]  # no initramfs, no hostfs prefix
    plain = uml_command(replace(spec, nics=(), data_dir=None), "/usr/bin/linux.uml", disk, fpu_workaround=False)
    assert not [a for a in plain if a.startswith(("eth", "vmshop.data", "GLIBC_TUNABLES"))]


def test_image_command_line_cannot_reach_the_host() -> None:
    """UML reads its host options from the kernel command line: the image's may not set any."""
    words = guest_cmdline("root=/dev/vdb2 mem=64G hostfs=/ eth0=tuntap,tap0 ubd1=/etc/shadow con0=fd:0,fd:1 "
                          "umid=x uml_dir=/tmp initrd=/x vmshop.hostfs=/ GLIBC_TUNABLES=x quiet loglevel=4")
    assert words == ["root=/dev/ubdb2", "quiet", "loglevel=4"]
    assert guest_cmdline("quiet") == ["root=/dev/ubda", "quiet"]
    assert guest_cmdline("root=LABEL=vmshop-root")[0] == "root=LABEL=vmshop-root"


def test_state_table() -> None:
    assert UML_STATES == EXPECTED_STATES
    for condition, state in EXPECTED_STATES.items():
        assert translate_condition(condition) == state
    assert translate_condition("something new") == VMState.UNKNOWN
    assert set(UML_STATES.values()) == set(VMState)


def test_options() -> None:
    with pytest.raises(ConfigurationError, match="confine"):
        UmlBackend({"confine": "chroot"})
    with pytest.raises(ConfigurationError, match="fpu_workaround"):
        UmlBackend({"fpu_workaround": "maybe"})
    with pytest.raises(ConfigurationError, match="start_timeout"):
        UmlBackend({"start_timeout": "soon"})
    with pytest.raises(ConfigurationError, match="unknown option"):
        UmlBackend({"accel": "kvm"})
    assert UmlBackend({"fpu_workaround": "yes"}).fpu_workaround
    assert not UmlBackend({"fpu_workaround": "no"}).fpu_workaround


def test_capabilities_are_honest() -> None:
    caps = UmlBackend({"uml_binary": "/nonexistent/linux.uml"}).capabilities()
    assert not caps.available and "user-mode-linux" in caps.reason
    caps = load_backend("uml", {}).capabilities()
    assert caps.name == "uml" and caps.channel == "hostfs" and caps.accelerator == "ptrace"
    assert caps.max_vcpus == 1 and caps.architectures == ("x86_64",)
    assert caps.max_memory > 0 and caps.available == HAVE_UML
    assert set(caps.networks) <= {"user", "segment"}


@pytest.mark.parametrize("change, message", [
    ({"vcpus": 2}, "1 vCPU"),
    ({"arch": "aarch64"}, "aarch64"),
    ({"memory": 16}, "at least"),
    ({"vm_id": "../x"}, "usable VM id"),
    ({"nics": (Nic("segment", "52:54:00:00:00:01", switch="/nonexistent/sw.ctl"),)}, "switch"),
    ({"nics": (Nic("user", "52:54:00:00:00:0G"),)}, "MAC"),
    ({"nics": (Nic("tap", "52:54:00:00:00:01"),)}, "tap"),
])
def test_refused_specs_make_nothing(fake_specs: SpecFactory, change: dict[str, object], message: str) -> None:
    spec = replace(fake_specs.new("uml-refused"), **change)  # type: ignore[arg-type]
    backend = UmlBackend({})
    with pytest.raises(BackendError, match=message):
        backend.start(spec)
    assert files_in(spec.run_dir) == [] and backend.running() == []


def test_paths_with_commas_are_refused(guest_tmp: Path, fake_specs: SpecFactory) -> None:
    odd = guest_tmp / "a,b"
    odd.mkdir()
    spec = replace(fake_specs.new("uml-comma"), channel_dir=odd)
    with pytest.raises(BackendError, match="','"):
        UmlBackend({}).start(spec)


def test_a_taken_port_is_refused(fake_specs: SpecFactory) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        spec = fake_specs.new("uml-port", nics=(Nic("user", "52:54:00:00:00:01", host_port=port),))
        backend = UmlBackend({})
        assert "user" in backend.capabilities().networks, "run 'bash scripts/setup_host.sh' (libvdeplug-slirp)"
        with pytest.raises(BackendError, match="taken"):
            backend.start(spec)


# The mconsole protocol ----------------------------------------------------------------------------
class FakeMconsole:
    """A datagram server speaking UML's mconsole protocol (answers in parts, errors, or nothing)."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.requests: list[tuple[int, int, str]] = []
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while True:
            try:
                data, origin = self.sock.recvfrom(4096)
            except OSError:
                return
            magic, version, length = struct.unpack_from("=III", data)
            command = data[12:12 + length].decode()
            self.requests.append((magic, version, command))
            if command == "silent":
                continue
            parts = [b"part one, ", b"part two\0"] if command == "long" else [b"no such command\0"] \
                if command == "bad" else [b"Linux 6.1.176\0"]
            for index, part in enumerate(parts):
                more = int(index < len(parts) - 1)
                err = int(command == "bad")
                self.sock.sendto(struct.pack("=III512s", err, more, len(part), part), origin)

    def close(self) -> None:
        self.sock.close()


def test_mconsole_protocol(guest_tmp: Path) -> None:
    path = guest_tmp / "fake-mconsole"
    server = FakeMconsole(path)
    try:
        assert mconsole(path, "version") == "Linux 6.1.176"
        assert server.requests[-1] == (0xCAFEBABE, 2, "version")
        assert mconsole(path, "long") == "part one, part two"
        with pytest.raises(MconsoleError, match="no such command"):
            mconsole(path, "bad")
        started = time.monotonic()
        with pytest.raises(MconsoleError):
            mconsole(path, "silent", timeout=0.3)
        assert time.monotonic() - started < 2
        with pytest.raises(MconsoleError):
            mconsole(guest_tmp / "no-such-socket", "version")
    finally:
        server.close()
        path.unlink()


# The disk UML gets ---------------------------------------------------------------------------------
PATTERN = b"vmshop" * 1024  # 6 KiB, a whole number of sectors


@pytest.fixture()
def small_image(guest_tmp: Path) -> Path:
    """A small qcow2 'warehouse image' with some data in it (no guest image needed)."""
    where = guest_tmp / f"wh-{time.monotonic_ns()}"
    where.mkdir()
    raw = where / "base.raw"
    raw.write_bytes(PATTERN + bytes(1 << 20))
    image = where / "base.qcow2"
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(image)], check=True)
    raw.unlink()
    image.chmod(0o444)
    return image


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_fresh_overlay_runs_on_a_cow_over_a_cached_raw_base(small_image: Path, guest_tmp: Path) -> None:
    from vmplant_service.clone import make_overlay

    backend = UmlBackend({"state_dir": str(guest_tmp / "state-cow")})
    before = _sha256(small_image)
    plans = []
    for n in (1, 2):
        overlay = guest_tmp / f"cow-{n}.qcow2"
        make_overlay(small_image, "qcow2", overlay)
        spec = replace(spec_on_paper(guest_tmp), vm_id=f"cow-{n}", disk=overlay, run_dir=guest_tmp / f"cow-run-{n}")
        plans.append(backend._prepare_disk(spec, RunPaths.of(spec.run_dir)))
    assert plans[0].base == plans[1].base and plans[0].base is not None  # converted once, shared
    base = plans[0].base
    assert base.parent == guest_tmp / "state-cow" / "uml-bases"
    assert plans[0].ubd == f"{guest_tmp}/cow-run-1/disk/disk.cow,{base}"
    assert base.read_bytes() == PATTERN + bytes(1 << 20)
    assert oct(base.stat().st_mode & 0o777) == "0o444"
    assert _sha256(small_image) == before  # the warehouse image is never written


def test_overlay_with_data_of_its_own_is_copied_whole(small_image: Path, guest_tmp: Path) -> None:
    from vmplant_service.clone import make_overlay

    overlay = guest_tmp / "own-data.qcow2"
    make_overlay(small_image, "qcow2", overlay)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x41 0 4096", str(overlay)], check=True,
                   capture_output=True)
    backend = UmlBackend({"state_dir": str(guest_tmp / "state-own")})
    spec = replace(spec_on_paper(guest_tmp), vm_id="own", disk=overlay, run_dir=guest_tmp / "own-run")
    paths = RunPaths.of(spec.run_dir)
    paths.disk_dir.mkdir(parents=True)
    plan = backend._prepare_disk(spec, paths)
    assert plan.base is None and plan.ubd == str(paths.raw)
    assert paths.raw.read_bytes() == b"A" * 4096 + PATTERN[4096:] + bytes(1 << 20)
    assert not (guest_tmp / "state-own" / "uml-bases").exists()


def test_a_rebuilt_image_gets_a_new_base_and_the_old_one_goes(small_image: Path, guest_tmp: Path) -> None:
    from vmplant_service.clone import make_overlay

    backend = UmlBackend({"state_dir": str(guest_tmp / "state-rebuilt")})
    overlay = guest_tmp / "rebuilt-1.qcow2"
    make_overlay(small_image, "qcow2", overlay)
    spec = replace(spec_on_paper(guest_tmp), vm_id="rb", disk=overlay, run_dir=guest_tmp / "rb-run")
    first = backend._prepare_disk(spec, RunPaths.of(spec.run_dir)).base
    # "rebuild": a new file renamed over the image, as the build script does
    fresh = small_image.with_name("fresh.qcow2")
    shutil.copyfile(small_image, fresh)
    os.replace(fresh, small_image)
    overlay.unlink()
    make_overlay(small_image, "qcow2", overlay)
    second = backend._prepare_disk(spec, RunPaths.of(spec.run_dir)).base
    assert first is not None and second is not None and first != second
    assert second.exists() and not first.exists()


# Failures leave nothing -------------------------------------------------------------------------
@pytest.fixture()
def tiny_overlay(small_image: Path, fake_specs: SpecFactory) -> GuestSpec:
    from vmplant_service.clone import make_overlay

    spec = fake_specs.new("uml-fail")
    Path(spec.disk).unlink()
    make_overlay(small_image, "qcow2", Path(spec.disk))
    return spec


def fake_uml(where: Path, body: str) -> str:
    script = where / f"fake-uml-{time.monotonic_ns()}"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return str(script)


def test_uml_that_exits_at_once(tiny_overlay: GuestSpec, guest_tmp: Path) -> None:
    binary = fake_uml(guest_tmp, 'echo "linux.uml: cannot do it ($1)" >&2; exit 3')
    backend = UmlBackend({"uml_binary": binary, "confine": "none", "state_dir": str(guest_tmp / "state-f")})
    with pytest.raises(BackendError, match=r"exited at once \(status 3\): linux.uml: cannot do it \(mem=128M\)"):
        backend.start(tiny_overlay)
    assert files_in(tiny_overlay.run_dir) == [] and leftovers(tiny_overlay) == []
    assert backend.running() == [] and backend.state(tiny_overlay.vm_id) == VMState.UNKNOWN


def test_jail_launch_failure_is_reported(tiny_overlay: GuestSpec, guest_tmp: Path) -> None:
    # A shell script cannot run inside the jail (no /bin/sh there): the launcher's exec fails.
    binary = fake_uml(guest_tmp, "exit 0")
    backend = UmlBackend({"uml_binary": binary, "state_dir": str(guest_tmp / "state-j")})
    with pytest.raises(BackendError, match="exited at once"):
        backend.start(tiny_overlay)
    assert files_in(tiny_overlay.run_dir) == [] and leftovers(tiny_overlay) == []


def test_uml_that_never_answers_is_killed(tiny_overlay: GuestSpec, guest_tmp: Path) -> None:
    binary = fake_uml(guest_tmp, "exec sleep 300")
    backend = UmlBackend({"uml_binary": binary, "confine": "none", "start_timeout": "1",
                          "state_dir": str(guest_tmp / "state-t")})
    started = time.monotonic()
    with pytest.raises(BackendError, match="did not answer on its mconsole within 1 s"):
        backend.start(tiny_overlay)
    assert time.monotonic() - started < 10
    assert files_in(tiny_overlay.run_dir) == [] and leftovers(tiny_overlay) == []
    assert not [args for _, args in processes_naming(binary)]


def test_broken_overlay_fails_with_qemu_img_words(tiny_overlay: GuestSpec, guest_tmp: Path) -> None:
    Path(tiny_overlay.disk).write_bytes(b"QFI\xfb" + bytes(508))
    backend = UmlBackend({"state_dir": str(guest_tmp / "state-b")})
    with pytest.raises(BackendError, match="cannot read the disk .*qcow2"):
        backend.start(tiny_overlay)
    assert files_in(tiny_overlay.run_dir) == []


def test_stale_pidfile_with_a_reused_pid_is_not_killed(fake_specs: SpecFactory) -> None:
    spec = fake_specs.new("uml-stale")
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        paths = RunPaths.of(spec.run_dir)
        paths.run_dir.mkdir(parents=True)
        paths.pidfile.write_text(f"{stranger.pid}\n")
        backend = UmlBackend({})
        assert backend.adopt(spec) is False
        assert backend.running() == []
        backend.destroy(spec.vm_id)
        assert stranger.poll() is None, "destroy killed a process that is not the VM's"
        assert not spec.run_dir.exists()
    finally:
        stranger.kill()
        stranger.wait()


# Real UML guests -----------------------------------------------------------------------------------
@dataclass
class Guest:
    spec: GuestSpec
    channel: Channel
    boot_seconds: float


def boot(backend: UmlBackend, spec: GuestSpec) -> Guest:
    started = time.monotonic()
    backend.start(spec)
    channel = Channel(spec.channel_dir)
    channel.wait_agent(BOOT_TIMEOUT, alive=lambda: backend.state(spec.vm_id) == VMState.RUNNING)
    return Guest(spec, channel, time.monotonic() - started)


@pytest.fixture(scope="module")
def uml_state(guest_tmp: Path) -> Path:
    return guest_tmp / "uml-state"


@pytest.fixture(scope="module")
def backend(uml_state: Path) -> Iterator[UmlBackend]:
    if not HAVE_UML:
        pytest.fail("linux.uml is not installed: run 'bash scripts/setup_host.sh'", pytrace=False)
    instance = UmlBackend({"state_dir": str(uml_state)})
    yield instance
    instance.close()


@pytest.fixture(scope="module")
def segment(guest_tmp: Path) -> Iterator[VdeSegment]:
    switch = VdeSegment(guest_tmp / "uml-segment")
    switch.start()
    yield switch
    switch.stop()


@pytest.fixture(scope="module")
def data_dir(guest_tmp: Path) -> Path:
    path = guest_tmp / "uml-data"
    (path / "set1").mkdir(parents=True)
    (path / "set1" / "hello.txt").write_text("hello from the data store\n")
    return path


@pytest.fixture(scope="module")
def guest(backend: UmlBackend, guest_specs: SpecFactory, segment: VdeSegment, data_dir: Path) -> Iterator[Guest]:
    """One UML guest with a user NIC (port forward), a segment NIC and the data directory."""
    vm_id = "uml-main"
    nics = (Nic("user", mac_for(vm_id, 0), host_port=free_port()),
            Nic("segment", mac_for(vm_id, 1), switch=str(segment.control)))
    spec = guest_specs.new(vm_id, nics=nics, data_dir=data_dir)
    try:
        yield boot(backend, spec)
    finally:
        backend.destroy(spec.vm_id)
        assert leftovers(spec) == []


@pytest.mark.guest
def test_guest_boots_and_its_agent_answers(guest: Guest, backend: UmlBackend) -> None:
    assert backend.state(guest.spec.vm_id) == VMState.RUNNING
    assert backend.condition(guest.spec.vm_id) == "running"
    assert backend.running() == [guest.spec.vm_id]
    assert guest.channel.agent_ready()
    print(f"\nUML: start -> agent ready {guest.boot_seconds:.2f} s")
    trips = []
    for n in range(5):
        started = time.monotonic()
        result = run(guest.channel, "echo hello; uname -r", f"hello{n}")
        trips.append(time.monotonic() - started)
        assert result.status == 0 and result.output.startswith("hello\n")
    print(f"UML: action round trips {', '.join(f'{t:.3f}' for t in trips)} s")
    failing = run(guest.channel, "echo nope >&2; exit 3", "fails")
    assert failing.status == 3 and failing.output == "nope\n"
    # the guest kernel is UML's, the disk is the image's root on ubd, the channel is hostfs
    info = run(guest.channel, "cat /proc/cpuinfo; cat /proc/mounts; cat /etc/vmshop-release", "info").output
    assert "User Mode Linux" in info
    assert "/dev/root / ext4" in info or "/dev/ubda / ext4" in info
    assert " /vmshop hostfs rw" in info and "NAME=vmshop-tiny" in info


@pytest.mark.guest
def test_user_network_forwards_port_80_only_from_loopback(guest: Guest) -> None:
    port = next(nic.host_port for nic in guest.spec.nics if nic.kind == "user")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
        assert b"vmshop-guest" in response.read()
    with socket.socket() as listener:  # a host service on loopback the guest must not reach
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        host_port = listener.getsockname()[1]
        result = run(guest.channel, f"ip -o -4 addr show; ip route; timeout 5 nc 10.0.2.2 {host_port} </dev/null; "
                                    "echo nc=$?", "restricted")
    assert "10.0.2.15/24" in result.output
    assert "default" not in result.output  # restricted: no gateway
    assert "nc=0" not in result.output


@pytest.mark.guest
def test_guest_sees_only_its_own_files_of_the_host(guest: Guest, uml_state: Path) -> None:
    body = ("mkdir -p /mnt/h; mount -t hostfs -o / none /mnt/h || exit 9\n"
            "find /mnt/h -maxdepth 3 | sort; echo ---\n"
            "cat /mnt/h/etc/hostname 2>&1; ls /mnt/h/root 2>&1\n"
            "mknod /vmshop/disk b 8 0 2>&1; echo mknod=$?\n"
            f"echo x > /mnt/h{uml_state}/uml-bases/x 2>&1; echo write=$?\n"
            "echo x > /mnt/h/x 2>&1; echo write=$?\n"
            "umount /mnt/h")
    out = run(guest.channel, body, "jail").output
    listing, _, rest = out.partition("---\n")
    seen = {line[len("/mnt/h"):] for line in listing.splitlines()}
    assert "/etc" not in seen and "/root" not in seen and "/home" not in seen
    assert {"/usr", "/dev", "/lib"} <= seen
    assert "mknod=0" not in rest and "write=0" not in rest
    assert "Read-only file system" in rest


@pytest.mark.guest
def test_data_directory_mounts_read_only_through_hostfs(guest: Guest) -> None:
    # What the plant's mount action must do under UML (it mounts 9p 'vmdata' under QEMU).
    body = ("d=$(sed -n 's/.*vmshop\\.data=\\([^ ]*\\).*/\\1/p' /proc/cmdline)\n"
            "mkdir -p /mnt/.vmdata && mount -t hostfs -o ro,\"$d\" vmdata /mnt/.vmdata || exit 9\n"
            "cat /mnt/.vmdata/set1/hello.txt; touch /mnt/.vmdata/set1/new 2>/dev/null; echo touch=$?")
    result = run(guest.channel, body, "data")
    assert result.status == 0, result.output
    assert result.output.startswith("hello from the data store\n") and "touch=0" not in result.output


@pytest.mark.guest
def test_adopt_from_a_new_instance(guest: Guest, backend: UmlBackend, uml_state: Path) -> None:
    restarted = UmlBackend({"state_dir": str(uml_state)})
    assert restarted.running() == []
    assert restarted.adopt(guest.spec) is True
    assert restarted.running() == [guest.spec.vm_id]
    assert restarted.state(guest.spec.vm_id) == VMState.RUNNING
    assert run(guest.channel, "echo adopted", "adopted").output == "adopted\n"
    assert backend.adopt(guest.spec) is True


@pytest.mark.guest
def test_paused_guest_reads_paused(guest: Guest, backend: UmlBackend) -> None:
    pid = int(RunPaths.of(guest.spec.run_dir).pidfile.read_text())
    os.kill(pid, 19)  # SIGSTOP
    try:
        deadline = time.monotonic() + 5
        while backend.state(guest.spec.vm_id) != VMState.PAUSED and time.monotonic() < deadline:
            time.sleep(0.05)
        assert backend.state(guest.spec.vm_id) == VMState.PAUSED
    finally:
        os.kill(pid, 18)  # SIGCONT
    assert backend.state(guest.spec.vm_id) == VMState.RUNNING
    assert run(guest.channel, "echo still here", "cont").status == 0


@pytest.mark.guest
def test_graceful_stop_keeps_files_and_leaves_no_process(guest: Guest, backend: UmlBackend,
                                                         uml_state: Path) -> None:
    spec = guest.spec
    started = time.monotonic()
    backend.stop(spec.vm_id, timeout=30)
    took = time.monotonic() - started
    print(f"\nUML: stop (Ctrl-Alt-Del -> exit) {took:.2f} s")
    assert took < 30, "the guest ignored Ctrl-Alt-Del and was killed"
    assert backend.condition(spec.vm_id) == "halted"
    assert backend.state(spec.vm_id) == VMState.STOPPED
    assert leftovers(spec) == [] and backend.running() == []
    assert "vmshop-guest: shutting down" in backend.ex_console(spec.vm_id)
    assert {"console.log", "disk", "uml.pid"} <= set(files_in(spec.run_dir))  # stop keeps the files
    backend.stop(spec.vm_id, timeout=1)  # again: fine
    assert UmlBackend({"state_dir": str(uml_state)}).adopt(spec) is False
    backend.destroy(spec.vm_id)
    assert files_in(spec.run_dir) == [] and not spec.run_dir.exists()
    assert backend.state(spec.vm_id) == VMState.STOPPED


@pytest.mark.guest
def test_two_guests_on_the_segment_use_pool_addresses(backend: UmlBackend, guest_specs: SpecFactory,
                                                      segment: VdeSegment) -> None:
    specs = [guest_specs.new(f"uml-seg{n}", nics=(Nic("segment", mac_for(f"uml-seg{n}", 0),
                                                      switch=str(segment.control)),))
             for n in (1, 2)]
    try:
        guests = [boot(backend, spec) for spec in specs]
        for n, guest in enumerate(guests, start=1):
            context = ActionContext(address=f"192.168.77.{10 + n}", prefix=24, segment_mac=guest.spec.nics[0].mac)
            name = guest.channel.submit(NetworkAction(id="net", mode="pool"), context)
            result = guest.channel.wait(name, ACTION_TIMEOUT)
            assert result.status == 0 and result.output == f"eth0 192.168.77.{10 + n}/24\n", result.output
        ping = run(guests[0].channel, "ping -c 3 -W 2 192.168.77.12", "ping")
        assert ping.status == 0 and "3 packets received" in ping.output, ping.output
        fetch = run(guests[1].channel, "timeout 10 wget -qO- http://192.168.77.11/", "fetch")
        assert "vmshop-guest" in fetch.output
        # each guest reaches the segment through a private switch and a plug of its own
        links = [args for _, args in processes_naming(f"vde://{segment.control}") if "vde_plug" in args]
        assert len(links) == 2
    finally:
        for spec in specs:
            backend.destroy(spec.vm_id)
    assert [leftovers(spec) for spec in specs] == [[], []]
    assert not processes_naming(f"vde://{segment.control}")


@pytest.mark.guest
def test_guest_kernel_panic_reads_crashed(backend: UmlBackend, guest_specs: SpecFactory) -> None:
    spec = guest_specs.new("uml-panic")
    try:
        boot(backend, spec)
        with pytest.raises(MconsoleError):  # the kernel panics before it can answer
            mconsole(RunPaths.of(spec.run_dir).mconsole, "sysrq c", timeout=2)
        deadline = time.monotonic() + 30
        while backend.running() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert backend.condition(spec.vm_id) == "panicked"
        assert backend.state(spec.vm_id) == VMState.CRASHED
        assert leftovers(spec) == []
    finally:
        backend.destroy(spec.vm_id)
    assert not spec.run_dir.exists()
