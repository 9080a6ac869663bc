"""The User-Mode Linux backend's own parts: its command line, its state table and exit records, the disk it
gives UML (the COW header UML itself would write), failures that leave nothing behind, the FPU probe, and real
UML guests (marked ``guest``): start -> agent ready (through the relay) -> actions, large answers intact, the
jail as the guest sees it through hostfs, the console kept and bounded, adopt by a new backend instance, the
unprivileged UML, the user network, the host-only segment with pool addresses, guest-shutdown, and a guest
kernel panic read as CRASHED. The relay and the launcher alone: ``tests/test_uml_relay.py``."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import socket
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

from vmplant_service.agent.qga import ExecStatus, GuestAgent
from vmplant_service.agent.transport import AgentError
from vmplant_service.backends import load_backend
from vmplant_service.backends.base import GuestSpec, Nic, VMState
from vmplant_service.backends.uml import UML_STATES, RunPaths, UmlBackend, guest_cmdline, translate_condition
from vmplant_service.backends.uml import fpu as uml_fpu
from vmplant_service.backends.uml.agent import MAX_REQUEST, STDIN_FROM_FILE, SerialLineTransport
from vmplant_service.backends.uml.command import GUEST_GLIBC_TUNABLES, DiskPlan, uml_command
from vmplant_service.backends.uml.disk import cow_layout, prepare_disk, write_cow_header
from vmplant_service.backends.uml.jail import launch_config, uml_dir
from vmplant_service.backends.uml.states import ended_condition, read_exit_record
from vmplant_service.channel import MAX_OUTPUT, ActionContext, ActionResult, Channel
from vmplant_service.segment import VdeSegment, mac_for
from vmshop_common.dag import FileAction, MountAction, NetworkAction, ScriptAction
from vmshop_common.errors import BackendError, ConfigurationError

BOOT_TIMEOUT = 120.0
ACTION_TIMEOUT = 30
CONSOLE_LIMIT = 65536
HAVE_UML = shutil.which("linux.uml") is not None

#: Every condition the backend can observe and what it must become.
EXPECTED_STATES = {
    "running": VMState.RUNNING, "paused": VMState.PAUSED, "mute": VMState.UNKNOWN, "ending": VMState.UNKNOWN,
    "halted": VMState.STOPPED, "killed": VMState.STOPPED, "gone": VMState.STOPPED, "panicked": VMState.CRASHED,
    "failed": VMState.CRASHED,
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def spec_on_paper(tmp_path: Path, **changes: object) -> GuestSpec:
    """A spec whose files need not exist (for the command line only)."""
    spec = GuestSpec(vm_id="paper", disk=tmp_path / "disk.qcow2", memory=128, vcpus=1, run_dir=tmp_path / "run",
                     kernel=tmp_path / "vmlinux", initrd=tmp_path / "initrd.img",
                     cmdline="console=ttyS0 root=/dev/vda rootfstype=ext4 rw panic=-1 quiet clocksource=hpet "
                             "i8042.noaux vmshop.poll=0.5", machine="q35")
    return replace(spec, **changes)  # type: ignore[arg-type]


def leftovers(spec: GuestSpec) -> list[str]:
    return [args for _, args in processes_naming(str(Path(spec.run_dir).absolute()))]


def files_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def run(channel: Channel, body: str, node_id: str = "a", context: ActionContext | None = None,
        timeout: int = ACTION_TIMEOUT) -> ActionResult:
    return channel.run(f"0001-{node_id}", ScriptAction(id=node_id, body=body, script_timeout=timeout),
                       context or ActionContext())


# The command line ------------------------------------------------------------------------------------
def test_command_line(tmp_path: Path) -> None:
    spec = spec_on_paper(tmp_path, data_dir=tmp_path / "data", nics=(
        Nic("user", "52:54:00:00:00:01", host_port=8080),
        Nic("segment", "52:54:00:00:00:02", switch=str(tmp_path / "sw.ctl"))))
    paths = RunPaths.of(spec.run_dir)
    disk = DiskPlan(ubd=f"{paths.cow},/cache/base.raw", file=paths.cow, base=Path("/cache/base.raw"), limit=1 << 29)
    command = uml_command(spec, "/usr/bin/linux.uml", disk, True, uml_dir(paths, True))
    assert command[0] == "/usr/bin/linux.uml"
    assert "mem=128M" in command
    assert f"ubd0={tmp_path}/run/disk.cow,/cache/base.raw" in command
    assert "umid=vmshop" in command and "uml_dir=/.vmshop-uml/" in command  # jail-private, never the run dir
    # The agent on ssl0 (the guest's /dev/ttyS0) and the console on con0: the relay's descriptors.
    assert [a for a in command if a.startswith(("con", "ssl"))] == ["con0=fd:5", "con=null", "ssl0=fd:4",
                                                                    "ssl=null"]
    assert "eth0=vde,slirp:///v4/restricted/tcpfwd=127.0.0.1:8080:10.0.2.15:80,52:54:00:00:00:01" in command
    assert "eth1=vde,seqpacket://7,52:54:00:00:00:02" in command  # the relay's plug joins the owner's switch
    # The image's command line, made for QEMU, is translated: root on ubd, machine-only words dropped.
    assert "root=/dev/ubda" in command and "root=/dev/vda" not in command
    assert {"rootfstype=ext4", "rw", "panic=-1", "quiet", "vmshop.poll=0.5"} <= set(command)
    assert not [a for a in command if a.startswith(("console=", "clocksource=", "i8042."))]
    assert f"vmshop.data={tmp_path}/data" in command
    assert f"GLIBC_TUNABLES={GUEST_GLIBC_TUNABLES}" in command
    assert not [a for a in command if a.startswith(("initrd=", "hostfs=", "vmshop.hostfs", "mconsole"))]
    assert not [a for a in command if str(paths.run_dir) in a and not a.startswith("ubd0=")]
    plain = uml_command(replace(spec, nics=(), data_dir=None), "/usr/bin/linux.uml", disk, False,
                        uml_dir(paths, True))
    assert not [a for a in plain if a.startswith(("eth", "vmshop.data", "GLIBC_TUNABLES"))]


def test_image_command_line_cannot_reach_the_host() -> None:
    """UML reads its host options from the kernel command line: the image's may not set any."""
    words = guest_cmdline("root=/dev/vdb2 mem=64G hostfs=/ eth0=tuntap,tap0 ubd1=/etc/shadow con0=fd:0,fd:1 "
                          "ssl1=fd:3 umid=x uml_dir=/tmp mconsole=notify:/x initrd=/x vmshop.hostfs=/ "
                          "vmshop.agent=isa-serial:/dev/tty1 GLIBC_TUNABLES=x quiet loglevel=4")
    assert words == ["root=/dev/ubdb2", "quiet", "loglevel=4"]
    assert guest_cmdline("quiet") == ["root=/dev/ubda", "quiet"]
    assert guest_cmdline("root=LABEL=vmshop-root")[0] == "root=LABEL=vmshop-root"


def test_the_jail_holds_no_directory_the_plant_opens(tmp_path: Path) -> None:
    """What the launcher binds: programs, devices, the base and the data read-only, the disk FILE writable."""
    data = tmp_path / "data"
    data.mkdir()
    spec = spec_on_paper(tmp_path, data_dir=data, nics=(Nic("user", "52:54:00:00:00:01"),
                                                        Nic("segment", "52:54:00:00:00:02", switch="/x/sw.ctl")))
    paths = RunPaths.of(spec.run_dir)
    disk = DiskPlan(ubd=f"{paths.cow},/cache/base.raw", file=paths.cow, base=Path("/cache/base.raw"), limit=1)
    config = launch_config(spec, paths, disk, shutil.which("linux.uml") or "/usr/bin/linux.uml", jailed=True,
                           user=(995, 993), fsize=1 << 30, fpu_workaround=False)
    writable = [bind[0] for bind in config["binds"] if bind[2]]
    assert writable == ["/dev/null", str(paths.cow)]
    sources = [bind[0] for bind in config["binds"]]
    assert str(data) in sources and "/cache/base.raw" in sources
    # Beyond those three: programs, their libraries and vdeplug modules, devices. No switch, no state directory.
    others = set(sources) - {str(data), str(paths.cow), "/cache/base.raw"}
    assert others and all(source.startswith(("/usr/", "/lib/", "/lib64/", "/dev/")) for source in others), others
    assert config["private"] == "/.vmshop-uml" and config["env"]["TMPDIR"] == "/.vmshop-uml"
    assert config["size_mib"] == 128 + 16 and config["user"] == [995, 993] and config["fsize"] == 1 << 30


# States --------------------------------------------------------------------------------------------
def test_state_table() -> None:
    assert UML_STATES == EXPECTED_STATES
    for condition, state in EXPECTED_STATES.items():
        assert translate_condition(condition) == state
    assert translate_condition("something new") == VMState.UNKNOWN
    assert set(UML_STATES.values()) == set(VMState)


def test_exit_records_decide_how_a_vm_ended(tmp_path: Path) -> None:
    record = tmp_path / "uml.exit"
    for text, expected in [('{"pid": 5, "exitcode": 0}', {"pid": 5, "exitcode": 0}),
                           ('{"pid": 5, "signal": 6}', {"pid": 5, "signal": 6}),
                           ('{"pid": 5, "exitcode": 0, "signal": 9}', None), ('{"pid": "5", "exitcode": 0}', None),
                           ('{"pid": 5, "exitcode": 999}', None), ("[]", None), ("x" * 5000, None)]:
        record.write_text(text)
        assert read_exit_record(record) == expected, text
    assert read_exit_record(tmp_path / "none") is None
    assert ended_condition({"pid": 1, "exitcode": 0}, killed=False) == "halted"
    assert ended_condition({"pid": 1, "exitcode": 1}, killed=False) == "failed"
    assert ended_condition({"pid": 1, "signal": 9}, killed=True) == "killed"
    assert ended_condition({"pid": 1, "signal": 9}, killed=False) == "failed"  # the OOM killer, say
    assert ended_condition({"pid": 1, "signal": 6}, killed=False) == "panicked"
    assert ended_condition(None, killed=False) == "gone"


def test_options() -> None:
    with pytest.raises(ConfigurationError, match="confine"):
        UmlBackend({"confine": "chroot"})
    with pytest.raises(ConfigurationError, match="fpu_workaround"):
        UmlBackend({"fpu_workaround": "maybe"})
    with pytest.raises(ConfigurationError, match="start_timeout"):
        UmlBackend({"start_timeout": "soon"})
    with pytest.raises(ConfigurationError, match="runas"):
        UmlBackend({"runas": "Bad User"})
    with pytest.raises(ConfigurationError, match="unknown option.*mconsole_timeout"):
        UmlBackend({"mconsole_timeout": "5"})  # the plant no longer uses the mconsole
    assert UmlBackend({"fpu_workaround": "yes"}).fpu_workaround_for(spec_on_paper(Path("/x")), "/bin/true")
    assert not UmlBackend({"fpu_workaround": "no"}).fpu_workaround_for(spec_on_paper(Path("/x")), "/bin/true")


def test_capabilities_are_honest() -> None:
    caps = UmlBackend({"uml_binary": "/nonexistent/linux.uml"}).capabilities()
    assert not caps.available and "user-mode-linux" in caps.reason
    caps = load_backend("uml", {}).capabilities()
    assert caps.name == "uml" and caps.channel == "serial" and caps.accelerator == "ptrace"
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
    spec = replace(fake_specs.new("uml-comma"), data_dir=odd)
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


def test_agent_of_a_vm_not_controlled() -> None:
    with pytest.raises(BackendError):
        UmlBackend({}).agent("nobody")


# The agent's transport: requests small enough for UML's serial line ---------------------------------
class RecordingAgent:
    """A qemu-ga stand-in on a unix socket that records every request line (and answers like qemu-ga)."""

    def __init__(self, path: Path) -> None:
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(1)
        self.lines: list[bytes] = []
        self.files: dict[int, tuple[str, bytearray]] = {}
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        try:
            client, _ = self.server.accept()
        except OSError:
            return
        buffer = b""
        with client:
            while True:
                data = client.recv(65536)
                if not data:
                    return
                buffer += data
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    line = line.lstrip(b"\xff")
                    self.lines.append(line)
                    client.sendall(self.answer(json.loads(line)))

    def answer(self, request: dict[str, object]) -> bytes:
        name, args = request["execute"], request.get("arguments") or {}
        assert isinstance(args, dict)
        value: object = {}
        if name == "guest-sync-delimited":
            return b"\xff" + json.dumps({"return": args["id"]}).encode() + b"\n"
        if name == "guest-file-open":
            value = 1000 + len(self.files)
            self.files[value] = (str(args["path"]), bytearray())
        elif name == "guest-file-write":
            piece = base64.b64decode(str(args["buf-b64"]))
            self.files.setdefault(int(args["handle"]), ("", bytearray()))[1].extend(piece)  # type: ignore[call-overload]
            value = {"count": len(piece), "eof": False}
        elif name == "guest-exec":
            value = {"pid": 42}
        return json.dumps({"return": value}).encode() + b"\n"

    def close(self) -> None:
        self.server.close()


def test_large_requests_go_to_uml_in_pieces(guest_tmp: Path) -> None:
    path = guest_tmp / f"qga-{time.monotonic_ns()}.sock"
    agent = RecordingAgent(path)
    transport = SerialLineTransport(path)
    try:
        content = bytes(range(256)) * 400  # 100 KiB
        assert transport.command("guest-file-write", {"handle": 7, "buf-b64": base64.b64encode(content).decode()}
                                 ) == {"count": len(content), "eof": False}
        script = b"echo " + b"x" * 20000 + b"\n"
        assert transport.command("guest-exec", {"path": "/bin/sh", "arg": ["-c", "WRAPPER", "a"],
                                                "input-data": base64.b64encode(script).decode(),
                                                "capture-output": True}) == {"pid": 42}
        assert transport.command("guest-exec", {"path": "/bin/true", "arg": [], "input-data": "eA=="}) == {"pid": 42}
        with pytest.raises(AgentError, match="larger than UML's serial line"):
            transport.command("guest-exec", {"path": "/bin/echo", "arg": ["y" * 5000]})
    finally:
        transport.close()
        agent.close()
    assert max(len(line) + 1 for line in agent.lines) <= MAX_REQUEST
    (name, written), = [(name, data) for name, data in agent.files.values() if name.startswith("/run/")]
    assert written == script and re.fullmatch(r"/run/vmshop-stdin-[0-9a-f]{16}", name)
    execs = [json.loads(line)["arguments"] for line in agent.lines if b'"guest-exec"' in line]
    assert execs[0]["path"] == "/bin/sh" and "input-data" not in execs[0]
    assert execs[0]["arg"][:4] == ["-c", STDIN_FROM_FILE, "vmshop-stdin", name]
    assert execs[0]["arg"][4:] == ["/bin/sh", "-c", "WRAPPER", "a"] and execs[0]["capture-output"] is True
    assert execs[1] == {"path": "/bin/true", "arg": [], "input-data": "eA=="}  # small: sent as it is


def test_stdin_from_file_runs_the_command_with_its_input(tmp_path: Path) -> None:
    """The guest-side program of a large guest-exec, run here by a POSIX shell as the guest's busybox would."""
    data = tmp_path / "stdin"
    data.write_bytes(b"line one\nline two\n")
    done = subprocess.run(["/bin/sh", "-c", STDIN_FROM_FILE, "vmshop-stdin", str(data), "/bin/sh", "-c",
                           'cat; echo "args: $0 $1"', "zero", "one"], capture_output=True, timeout=30)
    assert done.stdout == b"line one\nline two\nargs: zero one\n" and not data.exists()


# The FPU probe -------------------------------------------------------------------------------------
class FakeAgent(GuestAgent):
    """Answers the probe's programs with their expected output, or with a block of zeros in it."""

    def __init__(self, corrupt: bool) -> None:
        self.corrupt = corrupt
        self.calls = 0

    def run(self, path, args, input_data, deadline, output_limit, alive=lambda: True,  # type: ignore[override]
            alive_every=0.5) -> tuple[ExecStatus, float]:
        expected = next(out for argv, out in uml_fpu.PROBE_CHECKS if list(argv[1:]) == list(args))
        self.calls += 1
        if self.corrupt and self.calls == 2:
            expected = expected[:40000] + bytes(16) + expected[40016:]
        return ExecStatus(0, None, expected, False), 0.1


def test_fpu_probe_checks_every_byte() -> None:
    assert uml_fpu.probe_agent(FakeAgent(corrupt=False), time.monotonic() + 10) is True
    assert uml_fpu.probe_agent(FakeAgent(corrupt=True), time.monotonic() + 10) is False
    assert all(len(out) > 100000 for _, out in uml_fpu.PROBE_CHECKS)  # the corruption shows above ~20-100 KB


def test_fpu_verdict_is_cached_per_binary_kernel_and_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = spec_on_paper(tmp_path)
    for verdicts, workaround in (((False, True), True), ((False, False), False), ((True,), False)):
        state = tmp_path / f"state-{len(list(tmp_path.iterdir()))}"
        backend = UmlBackend({"state_dir": str(state)})
        answers = list(verdicts)
        probes: list[bool] = []
        monkeypatch.setattr(backend, "_probe", lambda spec, binary, with_filter, answers=answers, probes=probes:
                            probes.append(with_filter) or answers.pop(0))
        assert backend.fpu_workaround_for(spec, "/bin/true") is workaround
        assert probes == [False, True][:len(verdicts)]  # plain first; the workaround only if plain fails
        again = UmlBackend({"state_dir": str(state)})
        monkeypatch.setattr(again, "_probe", lambda *a: pytest.fail("probed again"))
        assert again.fpu_workaround_for(spec, "/bin/true") is workaround
        cached = json.loads((state / "uml-fpu-probe.json").read_text())
        assert list(cached) == [uml_fpu.probe_key("/bin/true")] and os.uname().release in list(cached)[0]
    # No agent answered at all (the image's fault, not the host's): nothing is cached.
    backend = UmlBackend({"state_dir": str(tmp_path / "state-none")})
    monkeypatch.setattr(backend, "_probe", lambda *a: None)
    assert backend.fpu_workaround_for(spec, "/bin/true") is False
    assert not (tmp_path / "state-none" / "uml-fpu-probe.json").exists()


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

    state = guest_tmp / "state-cow"
    before = _sha256(small_image)
    plans = []
    for n in (1, 2):
        overlay = guest_tmp / f"cow-{n}.qcow2"
        make_overlay(small_image, "qcow2", overlay)
        spec = replace(spec_on_paper(guest_tmp), vm_id=f"cow-{n}", disk=overlay, run_dir=guest_tmp / f"cow-run-{n}")
        RunPaths.of(spec.run_dir).run_dir.mkdir()
        plans.append(prepare_disk(spec, RunPaths.of(spec.run_dir), state, 993))
    assert plans[0].base == plans[1].base and plans[0].base is not None  # converted once, shared
    base = plans[0].base
    assert base.parent == state / "uml-bases"
    assert plans[0].ubd == f"{guest_tmp}/cow-run-1/disk.cow,{base}"
    assert plans[0].file == guest_tmp / "cow-run-1/disk.cow"
    assert base.read_bytes() == PATTERN + bytes(1 << 20)
    assert oct(base.stat().st_mode & 0o777) == "0o444"
    cow = plans[0].file.stat()
    assert (cow.st_uid, cow.st_gid, oct(cow.st_mode & 0o777)) == (0, 993, "0o660")
    assert plans[0].limit == cow.st_size == cow_layout(base.stat().st_size)[1] + base.stat().st_size
    assert cow.st_blocks * 512 < 64 * 1024  # sparse: nothing copied yet
    assert _sha256(small_image) == before  # the warehouse image is never written


@pytest.mark.skipif(not HAVE_UML, reason="needs linux.uml")
def test_cow_header_is_the_one_uml_writes(guest_tmp: Path) -> None:
    """UML itself makes a COW file over a base (it boots nothing: the base is not a file system); ours must
    have the same header and size, since UML checks the base's size and mtime at every open."""
    where = guest_tmp / f"cowcheck-{time.monotonic_ns()}"
    where.mkdir()
    base = where / "base.raw"
    base.write_bytes(bytes(3 << 20))
    theirs, ours = where / "theirs.cow", where / "ours.cow"
    made = subprocess.run(["linux.uml", "mem=96M", f"ubd0={theirs},{base}", f"uml_dir={where}/", "umid=cowcheck",
                    "con=null", "ssl=null", "root=/dev/ubda", "panic=-1", "quiet"], timeout=60, capture_output=True,
                   env={"PATH": "/usr/bin:/bin", "TMPDIR": str(where)})
    assert theirs.exists(), made.stdout.decode(errors="replace")[-2000:] + made.stderr.decode(errors="replace")
    size = write_cow_header(ours, base)
    header = 32 + len(str(base))
    assert theirs.read_bytes()[:header] == ours.read_bytes()[:header]
    assert theirs.stat().st_size == ours.stat().st_size == size


def test_overlay_with_data_of_its_own_is_copied_whole(small_image: Path, guest_tmp: Path) -> None:
    from vmplant_service.clone import make_overlay

    overlay = guest_tmp / "own.qcow2"
    make_overlay(small_image, "qcow2", overlay)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x41 0 4096", str(overlay)], check=True,
                   capture_output=True)
    spec = replace(spec_on_paper(guest_tmp), vm_id="own", disk=overlay, run_dir=guest_tmp / "own-run")
    paths = RunPaths.of(spec.run_dir)
    paths.run_dir.mkdir()
    plan = prepare_disk(spec, paths, guest_tmp / "state-own", None)
    assert plan.base is None and plan.ubd == str(paths.raw) and plan.file == paths.raw
    assert paths.raw.read_bytes() == b"A" * 4096 + PATTERN[4096:] + bytes(1 << 20)
    assert oct(paths.raw.stat().st_mode & 0o777) == "0o600" and plan.limit == len(PATTERN) + (1 << 20)
    assert not (guest_tmp / "state-own" / "uml-bases").exists()


def test_a_rebuilt_image_gets_a_new_base_and_the_old_one_goes(small_image: Path, guest_tmp: Path) -> None:
    from vmplant_service.clone import make_overlay

    state = guest_tmp / "state-rebuilt"
    overlay = guest_tmp / "rebuilt-1.qcow2"
    make_overlay(small_image, "qcow2", overlay)
    spec = replace(spec_on_paper(guest_tmp), vm_id="rb", disk=overlay, run_dir=guest_tmp / "rb-run")
    paths = RunPaths.of(spec.run_dir)
    paths.run_dir.mkdir()
    first = prepare_disk(spec, paths, state, None).base
    paths.cow.unlink()
    # "rebuild": a new file renamed over the image, as the build script does
    fresh = small_image.with_name("fresh.qcow2")
    shutil.copyfile(small_image, fresh)
    os.replace(fresh, small_image)
    overlay.unlink()
    make_overlay(small_image, "qcow2", overlay)
    second = prepare_disk(spec, paths, state, None).base
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


def unconfined(guest_tmp: Path, binary: str, **options: str) -> UmlBackend:
    """A backend running a fake UML (a shell script) as the plant's user, without the jail."""
    return UmlBackend({"uml_binary": binary, "confine": "none", "runas": "root", "fpu_workaround": "no",
                       "state_dir": str(guest_tmp / "state-f"), **options})


def test_uml_that_exits_at_once(tiny_overlay: GuestSpec, guest_tmp: Path) -> None:
    binary = fake_uml(guest_tmp, 'echo "linux.uml: cannot do it ($1)" >&2; exit 3')
    backend = unconfined(guest_tmp, binary)
    with pytest.raises(BackendError, match=r"exited with status 3 at once: linux.uml: cannot do it \(mem=128M\)"):
        backend.start(tiny_overlay)
    assert files_in(tiny_overlay.run_dir) == [] and leftovers(tiny_overlay) == []
    assert backend.running() == [] and backend.state(tiny_overlay.vm_id) == VMState.UNKNOWN


def test_jail_launch_failure_is_reported(tiny_overlay: GuestSpec, guest_tmp: Path) -> None:
    # A shell script cannot run inside the jail (no /bin/sh there): the launcher's exec fails, and says so.
    binary = fake_uml(guest_tmp, "exit 0")
    backend = UmlBackend({"uml_binary": binary, "state_dir": str(guest_tmp / "state-j"), "runas": "root",
                          "fpu_workaround": "no"})
    with pytest.raises(BackendError, match="vmshop-uml-launcher: cannot run .*fake-uml"):
        backend.start(tiny_overlay)
    assert files_in(tiny_overlay.run_dir) == [] and leftovers(tiny_overlay) == []


def test_a_uml_that_runs_on_without_an_agent_is_destroyed_whole(tiny_overlay: GuestSpec, guest_tmp: Path) -> None:
    """start() returns once UML runs; a guest that never answers is the plant's deadline, and destroy ends it."""
    binary = fake_uml(guest_tmp, 'exec python3 -c "import time; time.sleep(300)" "$@"')
    backend = unconfined(guest_tmp, binary)
    backend.start(tiny_overlay)
    assert backend.condition(tiny_overlay.vm_id) == "running"
    transport = backend.agent(tiny_overlay.vm_id)
    started = time.monotonic()
    with pytest.raises(AgentError):
        transport.command("guest-ping", None, timeout=1)
    assert time.monotonic() - started < 3
    backend.destroy(tiny_overlay.vm_id)
    assert files_in(tiny_overlay.run_dir) == [] and leftovers(tiny_overlay) == []
    assert backend.state(tiny_overlay.vm_id) == VMState.STOPPED and backend.condition(tiny_overlay.vm_id) == "killed"


def test_broken_overlay_fails_with_qemu_img_words(tiny_overlay: GuestSpec, guest_tmp: Path) -> None:
    Path(tiny_overlay.disk).write_bytes(b"QFI\xfb" + bytes(508))
    backend = UmlBackend({"state_dir": str(guest_tmp / "state-b"), "fpu_workaround": "no"})
    with pytest.raises(BackendError, match="cannot read the disk .*qcow2"):
        backend.start(tiny_overlay)
    assert files_in(tiny_overlay.run_dir) == []


def test_stale_pidfiles_with_reused_pids_are_not_killed(fake_specs: SpecFactory) -> None:
    spec = fake_specs.new("uml-stale")
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        paths = RunPaths.of(spec.run_dir)
        paths.run_dir.mkdir(parents=True)
        for pidfile in (paths.relay_pidfile, paths.uml_pidfile, paths.plug_pidfile(1)):
            pidfile.write_text(f"{stranger.pid}\n")
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
    backend: UmlBackend
    spec: GuestSpec
    boot_seconds: float

    @property
    def channel(self) -> Channel:
        """Through the backend's own transport (the relay serves one client at a time; adopt replaces it)."""
        return Channel(GuestAgent(self.backend.agent(self.spec.vm_id)))


def boot(backend: UmlBackend, spec: GuestSpec) -> Guest:
    started = time.monotonic()
    backend.start(spec)
    guest = Guest(backend, spec, 0.0)
    guest.channel.wait_agent(BOOT_TIMEOUT, alive=lambda: backend.state(spec.vm_id) == VMState.RUNNING)
    guest.boot_seconds = time.monotonic() - started
    return guest


@pytest.fixture(scope="module")
def uml_state(accel_state_dir: Path) -> Path:
    """The session's cache (the FPU probe's verdict and the raw bases, shared with the contract suite)."""
    return accel_state_dir


@pytest.fixture(scope="module")
def backend(uml_state: Path) -> Iterator[UmlBackend]:
    if not HAVE_UML:
        pytest.fail("linux.uml is not installed: run 'bash scripts/setup_host.sh'", pytrace=False)
    instance = UmlBackend({"state_dir": str(uml_state), "console_limit": str(CONSOLE_LIMIT)})
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
    for part in (path, path / "set1"):
        part.chmod(0o755)
    (path / "set1" / "hello.txt").chmod(0o644)
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
    # the guest kernel is UML's, the disk is the image's root on ubd, qemu-ga runs on the serial line
    info = run(guest.channel, "cat /proc/cpuinfo; cat /proc/mounts; cat /etc/vmshop-release; ps -o args", "info")
    assert "User Mode Linux" in info.output
    assert "/dev/root / ext4 rw" in info.output or "/dev/ubda / ext4 rw" in info.output
    assert "qemu-ga -m isa-serial -p /dev/ttyS0" in info.output
    assert "hostfs" not in info.output and "/vmshop " not in info.output  # no share of any kind


@pytest.mark.guest
def test_large_answers_come_back_intact(guest: Guest, backend: UmlBackend, uml_state: Path) -> None:
    """A 60 KB action output checked byte for byte, and 700 KB straight through the agent (the FPU check)."""
    expected = "".join(f"{i:09d}\n" for i in range(6000))
    result = run(guest.channel, "i=0; while [ $i -lt 6000 ]; do printf '%09d\\n' $i; i=$((i+1)); done", "count",
                 timeout=120)
    assert result.status == 0 and result.output == expected
    assert len(expected) == 60000 <= MAX_OUTPUT
    agent = GuestAgent(backend.agent(guest.spec.vm_id))
    status, _ = agent.run("/bin/sh", ["-c", "head -c 700000 /dev/zero | tr '\\0' x"], None, time.monotonic() + 120,
                          1 << 20)
    assert status.output == b"x" * 700000
    cached = json.loads((uml_state / "uml-fpu-probe.json").read_text())
    verdict = cached[uml_fpu.probe_key(os.path.realpath(shutil.which("linux.uml") or ""))]
    print(f"\nUML FPU probe here: plain UML {'passes' if verdict['plain'] else 'fails'}, "
          f"workaround {'on' if verdict['workaround'] else 'off'}")


@pytest.mark.guest
def test_large_scripts_and_files_reach_the_guest(guest: Guest) -> None:
    """Requests far over the serial line's 4 KiB tty buffer (which would kill the line for good) go in pieces."""
    body = "cat <<'EOF' | md5sum\n" + "".join(f"line {i:06d} of a long here-document\n" for i in range(1000)) + "EOF\n"
    expected = hashlib.md5("".join(f"line {i:06d} of a long here-document\n" for i in range(1000)).encode())
    result = run(guest.channel, body, "long")
    assert result.status == 0 and result.output.startswith(expected.hexdigest()), result.output
    content = "".join(f"{i:07d}\n" for i in range(12500))  # 100 KB
    done = guest.channel.run("0001-file", FileAction(id="f", path="/root/big.txt", content=content, mode=0o600),
                             ActionContext())
    assert done.status == 0, done.output
    check = run(guest.channel, "md5sum /root/big.txt; ls /run | grep -c vmshop-stdin", "check")
    assert check.output.split()[0] == hashlib.md5((content.strip() + "\n").encode()).hexdigest()
    assert check.output.split()[-1] == "0"  # the stdin files are gone
    assert run(guest.channel, "echo still alive", "alive").output == "still alive\n"


@pytest.mark.guest
def test_uml_runs_unprivileged_and_confined(guest: Guest, backend: UmlBackend) -> None:
    paths = RunPaths.of(guest.spec.run_dir)
    pid = int(paths.uml_pidfile.read_text())
    status = Path(f"/proc/{pid}/status").read_text()
    fields = {line.split(":")[0]: line.split(":", 1)[1].split() for line in status.splitlines() if ":" in line}
    hypervisor = __import__("pwd").getpwnam("vmshop-qemu")
    assert fields["Uid"] == [str(hypervisor.pw_uid)] * 4 and fields["Gid"] == [str(hypervisor.pw_gid)] * 4
    assert fields["Groups"] == []
    assert int(fields["CapEff"][0], 16) == int(fields["CapPrm"][0], 16) == int(fields["CapBnd"][0], 16) == 0
    assert fields["NoNewPrivs"] == ["1"]
    assert os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
    limits = Path(f"/proc/{pid}/limits").read_text()
    fsize = next(line for line in limits.splitlines() if line.startswith("Max file size")).split()[3]
    assert int(fsize) <= paths.cow.stat().st_size + 2 * 1024 * 1024
    # Rule 9: the run directory is the plant's; the disk file is the hypervisor group's, nobody else's.
    assert paths.run_dir.stat().st_mode & 0o777 == 0o700
    for path in paths.run_dir.iterdir():
        assert path.stat().st_mode & 0o007 == 0, path


@pytest.mark.guest
def test_guest_sees_only_its_own_jail_through_hostfs(guest: Guest, uml_state: Path, guest_specs: SpecFactory) -> None:
    paths = RunPaths.of(guest.spec.run_dir)
    body = (
        "mkdir -p /mnt/h; mount -t hostfs -o / none /mnt/h || exit 9\n"
        "find /mnt/h -maxdepth 6 | sort; echo ---\n"
        "cat /mnt/h/etc/hostname 2>&1; ls /mnt/h/root /mnt/h/proc/self/root 2>&1\n"
        f"ls -la /mnt/h{paths.run_dir} 2>&1\n"
        f"echo x > /mnt/h{paths.run_dir}/qga.sock 2>&1; echo sock=$?\n"
        f"ln -s / /mnt/h{paths.run_dir}/console.log 2>&1; echo link=$?\n"
        f"mknod /mnt/h{paths.run_dir}/dev b 8 0 2>&1; echo mknod=$?\n"
        f"chmod 4755 /mnt/h{paths.cow} 2>&1; echo chmod=$?\n"
        f"echo x > /mnt/h{uml_state}/uml-bases/x 2>&1; echo base=$?\n"
        "echo x > /mnt/h/x 2>&1; echo root=$?\n"
        f"s=$(stat -c %s /mnt/h{paths.cow}); dd if=/dev/zero bs=1M count=8 seek=$((s / 1048576)) "
        f"of=/mnt/h{paths.cow} conv=notrunc 2>&1; echo grow=$?\n"
        "umount /mnt/h")
    out = run(guest.channel, body, "jail").output
    listing, _, rest = out.partition("---\n")
    seen = {line[len("/mnt/h"):] for line in listing.splitlines()}
    assert "/etc" not in seen and "/root" not in seen and "/home" not in seen and "/proc" not in seen
    assert {"/usr", "/dev", "/lib"} <= seen
    own = {p for p in seen if p.startswith(str(paths.run_dir))}
    assert own == {str(paths.run_dir), str(paths.cow)}, own  # of its run directory, its disk file alone
    others = [p for p in seen if p.startswith(f"{guest_specs.root}/") and not p.startswith(str(paths.run_dir))
              and not f"{paths.run_dir}/".startswith(f"{p}/")]
    assert others == []  # no other VM's files, only the way to its own disk file
    for word in ("sock", "link", "mknod", "chmod", "base", "root"):
        assert f"{word}=0" not in rest, rest
    assert "grow=0" not in rest and paths.cow.stat().st_size <= int(  # RLIMIT_FSIZE: it cannot grow its disk file
        next(line for line in Path(f"/proc/{paths.uml_pidfile.read_text().strip()}/limits").read_text().splitlines()
             if line.startswith("Max file size")).split()[3])
    assert not paths.cow.stat().st_mode & 0o7000


@pytest.mark.guest
def test_data_directory_mounts_read_only_through_hostfs(guest: Guest, data_dir: Path) -> None:
    """The plant's own mount action (hostfs under UML), then attempts to write through it."""
    result = guest.channel.run("0001-mount", MountAction(id="m", source="set1", target="/data", readonly=False),
                               ActionContext(datastore=data_dir))
    assert result.status == 0, result.output
    check = run(guest.channel, "cat /data/hello.txt; touch /data/new 2>/dev/null; echo touch=$?; "
                               "touch /mnt/.vmdata/new 2>/dev/null; echo root=$?", "data")
    assert check.output.startswith("hello from the data store\n") and "touch=0" not in check.output
    assert "root=0" not in check.output and sorted(p.name for p in (data_dir / "set1").iterdir()) == ["hello.txt"]


@pytest.mark.guest
def test_the_console_is_kept_and_bounded(guest: Guest, backend: UmlBackend) -> None:
    assert "vmshop-guest: system started" in backend.ex_console(guest.spec.vm_id)
    result = run(guest.channel, "head -c 1000000 /dev/zero | tr '\\0' c > /dev/console; echo console-flood-end "
                                "> /dev/console; echo ok", "flood", timeout=120)
    assert result.output == "ok\n"
    paths = RunPaths.of(guest.spec.run_dir)
    deadline = time.monotonic() + 30
    while "console-flood-end" not in backend.ex_console(guest.spec.vm_id) and time.monotonic() < deadline:
        time.sleep(0.1)
    logs = [paths.console, paths.console.with_name("console.log.1")]
    assert "console-flood-end" in backend.ex_console(guest.spec.vm_id)
    assert sum(path.stat().st_size for path in logs) <= 2 * CONSOLE_LIMIT


@pytest.mark.guest
def test_adopt_from_a_new_instance_and_one_client_at_a_time(guest: Guest, backend: UmlBackend,
                                                            uml_state: Path) -> None:
    """A plant restart: a new backend finds the VM by its relay and speaks to the same agent again."""
    restarted = UmlBackend({"state_dir": str(uml_state)})
    try:
        assert restarted.running() == []
        assert restarted.adopt(guest.spec) is True
        assert restarted.running() == [guest.spec.vm_id]
        assert restarted.state(guest.spec.vm_id) == VMState.RUNNING
        # The first backend's connection is still open: the relay serves one client at a time.
        run(guest.channel, "true", "hold")
        with pytest.raises(AgentError):
            restarted.agent(guest.spec.vm_id).command("guest-ping", None, timeout=2)
        backend.agent(guest.spec.vm_id).close()  # the old plant goes away...
        adopted = Channel(GuestAgent(restarted.agent(guest.spec.vm_id)))
        assert run(adopted, "echo adopted", "adopted").output == "adopted\n"  # ...and the new one is heard
    finally:
        restarted.close()
    assert backend.adopt(guest.spec) is True
    assert run(guest.channel, "echo back", "back").output == "back\n"


@pytest.mark.guest
def test_paused_guest_reads_paused(guest: Guest, backend: UmlBackend) -> None:
    pid = int(RunPaths.of(guest.spec.run_dir).uml_pidfile.read_text())
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
def test_graceful_stop_keeps_files_and_leaves_no_process(guest: Guest, backend: UmlBackend,
                                                         uml_state: Path) -> None:
    spec = guest.spec
    paths = RunPaths.of(spec.run_dir)
    started = time.monotonic()
    backend.stop(spec.vm_id, timeout=30)
    took = time.monotonic() - started
    print(f"\nUML: stop (guest-shutdown -> UML's exit) {took:.2f} s")
    assert took < 30, "the guest ignored guest-shutdown and was killed"
    assert backend.condition(spec.vm_id) == "halted"
    assert backend.state(spec.vm_id) == VMState.STOPPED
    assert read_exit_record(paths.exit_record) == {"pid": int(paths.uml_pidfile.read_text()), "exitcode": 0}
    assert leftovers(spec) == [] and backend.running() == []
    assert "hypervisor initiated shutdown -> poweroff" in backend.ex_console(spec.vm_id)
    assert {"console.log", "disk.cow", "uml.exit", "uml.pid", "relay.pid"} <= set(files_in(spec.run_dir))
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
            result = guest.channel.run("0001-net", NetworkAction(id="net", mode="pool"), context)
            assert result.status == 0 and result.output.split(" (")[0] == f"eth0 192.168.77.{10 + n}/24", result.output
        ping = run(guests[0].channel, "ping -c 3 -W 2 192.168.77.12", "ping")
        assert ping.status == 0 and "3 packets received" in ping.output, ping.output
        fetch = run(guests[1].channel, "timeout 10 wget -qO- http://192.168.77.11/", "fetch")
        assert "vmshop-guest" in fetch.output
        # each guest reaches the switch through a plug of its own, started outside its jail by its relay
        links = [args for _, args in processes_naming(f"vde://{segment.control}") if "vde_plug" in args]
        assert len(links) == 2 and all("seqpacket://" in args for args in links)
    finally:
        for spec in specs:
            backend.destroy(spec.vm_id)
    assert [leftovers(spec) for spec in specs] == [[], []]
    assert not processes_naming(f"vde://{segment.control}")


@pytest.mark.guest
def test_guest_kernel_panic_reads_crashed(backend: UmlBackend, guest_specs: SpecFactory) -> None:
    spec = guest_specs.new("uml-panic")
    try:
        guest = boot(backend, spec)
        try:  # the guest's own root panics its kernel (the agent never answers this one)
            GuestAgent(backend.agent(spec.vm_id)).exec("/bin/sh", ["-c", "echo c > /proc/sysrq-trigger"], timeout=5)
        except AgentError:
            pass
        deadline = time.monotonic() + 30
        while backend.running() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert backend.condition(spec.vm_id) == "panicked", backend.ex_console(spec.vm_id)[-2000:]
        assert backend.state(spec.vm_id) == VMState.CRASHED
        assert "Kernel panic" in backend.ex_console(spec.vm_id)
        deadline = time.monotonic() + 10
        while leftovers(spec) and time.monotonic() < deadline:  # the relay ends UML's group, then itself
            time.sleep(0.1)
        assert leftovers(spec) == []
        del guest
    finally:
        backend.destroy(spec.vm_id)
    assert not spec.run_dir.exists()
