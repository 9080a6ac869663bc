"""Boot the real tiny guest image and talk to its QEMU guest agent (qemu-ga).

The image is built by ``scripts/build_guest_image.sh WAREHOUSE`` into
``${VMSHOP_WAREHOUSE:-<repo>/var/warehouse}``. Two guests are booted, each
shared by the tests of its kind and powered off by the agent at the end:

- a QEMU guest (TCG, a qcow2 overlay of the base in a temporary directory),
  wired as docs/guest-image.md tells the backends: the agent on a
  virtio-serial port named ``org.qemu.guest_agent.0`` whose chardev is a unix
  socket QEMU listens on; a read-only 9p data share (``vmdata``); a user-mode
  NIC with a hostfwd port on 127.0.0.1 (``restrict=on``);
- a User-Mode Linux guest (Debian's ``linux.uml``; skipped if it is not
  installed) whose serial line ``ssl0`` is one end of a socketpair the test
  holds (``ssl0=fd:N``): the same agent, on ``/dev/ttyS0`` in the guest.

The agent is spoken to in raw JSON by :class:`Agent` (a minimal, bounded
client; the plant has its own). The tests run in file order: the power-off
tests and the base-image check come last. Only loopback traffic.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.guest

REPO = Path(__file__).resolve().parents[1]
WAREHOUSE = Path(os.environ.get("VMSHOP_WAREHOUSE", str(REPO / "var" / "warehouse")))
IMAGE_NS = "urn:vmshop:image:1"
AGENT_PORT_NAME = "org.qemu.guest_agent.0"
BOOT_DEADLINE = 120.0  # seconds; a TCG boot takes ~3-8 s, more when the host is busy
CALL_DEADLINE = 60.0
PROBE_DEADLINE = 5.0  # seconds; one probe of an agent that may have just died
#: The longest answer line the test accepts: qemu-ga caps each captured stream
#: at 16 MiB (GUEST_EXEC_MAX_OUTPUT) and answers it in base64 (4/3), both streams in one line.
MAX_LINE = 48 * 1024 * 1024
#: qemu-ga's own cap on each captured output stream of guest-exec (qga/commands.c).
QGA_EXEC_OUTPUT_CAP = 16 * 1024 * 1024
#: The QEMU guest's memory: qemu-ga needs ~4x the captured output while it answers
#: (buffer, base64, JSON), so a 16 MiB flood needs more than the image's 128 MiB
#: (there the guest kernel kills qemu-ga and init starts it again; see docs/guest-image.md).
QEMU_TEST_MEMORY = 256
SENTINEL = b"\xff"
DATA_FILE_TEXT = "application data from the host\n"


# --- the agent protocol, raw ---------------------------------------------------------------------


class AgentError(Exception):
    """The agent answered an error, or did not answer in time."""


@dataclass
class ExecResult:
    exitcode: int | None
    signal: int | None
    out: bytes
    err: bytes
    out_truncated: bool
    err_truncated: bool


class Agent:
    """A minimal client of the QEMU guest agent protocol over a connected stream socket.

    Every read has a deadline and every answer line is bounded (``MAX_LINE``).
    Answers are newline-terminated JSON objects; the answer to
    ``guest-sync-delimited`` is preceded by a 0xFF byte.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def close(self) -> None:
        self.sock.close()

    def _fill(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AgentError("no answer before the deadline")
        self.sock.settimeout(left)
        try:
            data = self.sock.recv(1 << 16)
        except TimeoutError:
            raise AgentError("no answer before the deadline") from None
        if not data:
            raise EOFError("the agent's channel was closed")
        self.buf += data

    def _line(self, deadline: float) -> bytes:
        while b"\n" not in self.buf:
            if len(self.buf) > MAX_LINE:
                raise AgentError(f"answer longer than {MAX_LINE} bytes")
            self._fill(deadline)
        line, _, self.buf = self.buf.partition(b"\n")
        return line

    def send(self, message: dict[str, Any], prefix: bytes = b"") -> None:
        self.sock.settimeout(CALL_DEADLINE)
        self.sock.sendall(prefix + json.dumps(message).encode() + b"\n")

    def sync(self, timeout: float) -> int:
        """guest-sync-delimited with a random id; skips everything until that id comes back.

        The request is preceded by 0xFF, which makes qemu-ga drop any partial
        input (it answers that byte with a "JSON parse error" that is skipped
        like any stale answer).
        """
        sync_id = random.randrange(1, 2**53)
        deadline = time.monotonic() + timeout
        self.send({"execute": "guest-sync-delimited", "arguments": {"id": sync_id}}, prefix=SENTINEL)
        while True:
            while SENTINEL not in self.buf:
                self.buf = b""
                self._fill(deadline)
            self.buf = self.buf.partition(SENTINEL)[2]
            try:
                answer = json.loads(self._line(deadline))
            except ValueError:
                continue
            if isinstance(answer, dict) and answer.get("return") == sync_id:
                return sync_id

    def wait_ready(self, deadline: float, attempt: float = 1.0) -> int:
        """Sync until the agent answers (a new id per attempt: stale answers are skipped)."""
        while True:
            try:
                return self.sync(min(attempt, max(deadline - time.monotonic(), 0.01)))
            except AgentError:
                if time.monotonic() > deadline:
                    raise

    def call(self, command: str, args: dict[str, Any] | None = None, *, timeout: float = CALL_DEADLINE,
             **arguments: Any) -> Any:
        """One command and its answer (``args`` for names that are not Python identifiers)."""
        message: dict[str, Any] = {"execute": command}
        arguments = {**(args or {}), **arguments}
        if arguments:
            message["arguments"] = arguments
        self.send(message)
        answer = json.loads(self._line(time.monotonic() + timeout))
        if not isinstance(answer, dict):
            raise AgentError(f"{command}: not an object: {answer!r}")
        if "error" in answer:
            raise AgentError(f"{command}: {answer['error']}")
        return answer["return"]

    def exec(self, path: str, *args: str, input_data: bytes | None = None,
             timeout: float = CALL_DEADLINE) -> ExecResult:
        """guest-exec with captured output, then guest-exec-status until it exited."""
        arguments: dict[str, Any] = {"path": path, "arg": list(args), "capture-output": True}
        if input_data is not None:
            arguments["input-data"] = base64.b64encode(input_data).decode()
        pid = self.call("guest-exec", arguments, timeout=min(timeout, CALL_DEADLINE))["pid"]
        deadline = time.monotonic() + timeout
        while True:
            status = self.call("guest-exec-status", timeout=max(deadline - time.monotonic(), 1.0), pid=pid)
            if status["exited"]:
                return ExecResult(
                    exitcode=status.get("exitcode"), signal=status.get("signal"),
                    out=base64.b64decode(status.get("out-data", "")),
                    err=base64.b64decode(status.get("err-data", "")),
                    out_truncated=bool(status.get("out-truncated", False)),
                    err_truncated=bool(status.get("err-truncated", False)))
            if time.monotonic() > deadline:
                raise AgentError(f"{path} {args} still runs after {timeout} s")
            time.sleep(0.05)

    def sh(self, script: str, timeout: float = CALL_DEADLINE) -> ExecResult:
        return self.exec("/bin/sh", "-c", script, timeout=timeout)


def run_ok(agent: Agent, script: str) -> str:
    result = agent.sh(script)
    assert result.exitcode == 0, (script, result)
    return result.out.decode()


# --- the image and the guests -----------------------------------------------------------------------


@dataclass
class Image:
    xml: Path
    disk: Path
    kernel: Path
    initrd: Path
    cmdline: str
    machine: str
    memory: int
    vcpus: int


@dataclass
class Guest:
    image: Image
    workdir: Path
    agent: Agent
    console: Path
    process: subprocess.Popen[bytes]
    base_sha256: str
    booted_in: float
    http_port: int = 0
    qmp_socket: Path | None = None
    data_dir: Path | None = None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _load_image() -> Image:
    xml = WAREHOUSE / "tiny" / "image.xml"
    hint = (
        f"the guest image is missing: expected {xml}. Build it with "
        f"'scripts/build_guest_image.sh {WAREHOUSE}' (or set VMSHOP_WAREHOUSE)"
    )
    if not xml.is_file():
        pytest.fail(hint, pytrace=False)
    index = WAREHOUSE / "index.txt"
    if not index.is_file() or str(xml) not in index.read_text().splitlines():
        pytest.fail(f"{xml} is not listed in {index}; {hint}", pytrace=False)
    root = ET.parse(xml).getroot()
    ns = {"i": IMAGE_NS}
    assert root.tag == f"{{{IMAGE_NS}}}image", root.tag
    disk = root.find("i:disk", ns)
    boot = root.find("i:boot", ns)
    hw = root.find("i:hardware", ns)
    assert disk is not None and boot is not None and hw is not None
    image = Image(
        xml=xml,
        disk=(xml.parent / disk.attrib["file"]).resolve(),
        kernel=(xml.parent / boot.attrib["kernel"]).resolve(),
        initrd=(xml.parent / boot.attrib["initrd"]).resolve(),
        cmdline=boot.attrib["cmdline"],
        machine=boot.attrib.get("machine", "pc"),
        memory=int(hw.attrib["memory"]),
        vcpus=int(hw.attrib["vcpus"]),
    )
    for p in (image.disk, image.kernel, image.initrd):
        if not p.is_file():
            pytest.fail(f"{p} (named by {xml}) is missing; {hint}", pytrace=False)
    if shutil.which("qemu-system-x86_64") is None or shutil.which("qemu-img") is None:
        pytest.fail("qemu-system-x86_64 and qemu-img are needed (apt-get install "
                    "qemu-system-x86 qemu-utils)", pytrace=False)
    return image


def _console_tail(console: Path, lines: int = 30) -> str:
    try:
        text = console.read_text(errors="replace")
    except OSError:
        return "(no console log)"
    return "\n".join(text.splitlines()[-lines:])


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL the guest's process group (it was started in a session of its own) and reap it."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def _connect_unix(path: Path, process: subprocess.Popen[bytes], deadline: float) -> socket.socket:
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
            return sock
        except OSError:
            sock.close()
            if process.poll() is not None or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _wait_for_agent(agent: Agent, process: subprocess.Popen[bytes], console: Path, what: str) -> None:
    try:
        agent.wait_ready(time.monotonic() + BOOT_DEADLINE)
    except (AgentError, EOFError, OSError) as exc:
        status = process.poll()
        pytest.fail(f"{what}: the agent did not answer guest-sync-delimited ({exc}; "
                    f"exit status {status})\nconsole:\n{_console_tail(console)}")


def qemu_command(image: Image, workdir: Path, data_dir: Path, http_port: int) -> list[str]:
    return [
        "qemu-system-x86_64",
        "-accel", "tcg",
        "-M", image.machine,
        "-m", str(max(image.memory, QEMU_TEST_MEMORY)),
        "-smp", str(image.vcpus),
        "-nodefaults", "-no-user-config",
        "-kernel", str(image.kernel),
        "-initrd", str(image.initrd),
        "-append", image.cmdline,
        "-drive", f"file={workdir / 'clone.qcow2'},format=qcow2,if=virtio",
        # The guest agent: a virtio-serial port named org.qemu.guest_agent.0 on a unix socket
        # that QEMU listens on (the guest finds the port by its name).
        "-chardev", f"socket,id=qga0,path={workdir / 'qga.sock'},server=on,wait=off",
        "-device", "virtio-serial-pci,id=vser0",
        "-device", f"virtserialport,bus=vser0.0,chardev=qga0,name={AGENT_PORT_NAME}",
        # Application data, read-only from the guest's side.
        "-fsdev", f"local,id=data,path={data_dir},security_model=none,readonly=on",
        "-device", "virtio-9p-pci,fsdev=data,mount_tag=vmdata",
        "-netdev", f"user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{http_port}-:80",
        "-device", "virtio-net-pci,netdev=n0,romfile=",
        "-qmp", f"unix:{workdir / 'qmp.sock'},server=on,wait=off",
        "-serial", f"file:{workdir / 'console.log'}",
        "-display", "none",
        "-no-reboot",
    ]


@pytest.fixture(scope="module")
def image() -> Image:
    return _load_image()


@pytest.fixture(scope="module")
def guest(image: Image, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    base_sha = _sha256(image.disk)
    workdir = tmp_path_factory.mktemp("guest")
    data_dir = workdir / "data"
    data_dir.mkdir()
    (data_dir / "input.txt").write_text(DATA_FILE_TEXT)
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(image.disk),
         "-F", "qcow2", str(workdir / "clone.qcow2")],
        check=True,
    )
    port = _free_port()
    with (workdir / "qemu.log").open("wb") as qemu_log:
        start = time.monotonic()
        proc = subprocess.Popen(
            qemu_command(image, workdir, data_dir, port), stdin=subprocess.DEVNULL,
            stdout=qemu_log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    console = workdir / "console.log"
    agent = None
    try:
        try:
            sock = _connect_unix(workdir / "qga.sock", proc, time.monotonic() + 30)
        except OSError as exc:
            pytest.fail(f"cannot connect to QEMU's agent socket: {exc}\n"
                        f"{(workdir / 'qemu.log').read_text(errors='replace')}")
        agent = Agent(sock)
        _wait_for_agent(agent, proc, console, "QEMU")
        yield Guest(image, workdir, agent, console, proc, base_sha, time.monotonic() - start,
                    http_port=port, qmp_socket=workdir / "qmp.sock", data_dir=data_dir)
    finally:
        if agent is not None:
            agent.close()
        _stop(proc)
        shutil.rmtree(workdir, ignore_errors=True)


# --- QEMU: the agent ------------------------------------------------------------------------------


def test_agent_answers_sync_with_the_id_it_was_sent(guest: Guest) -> None:
    ids = {guest.agent.sync(timeout=CALL_DEADLINE) for _ in range(3)}
    assert len(ids) == 3  # fresh random ids, each answered with itself
    assert guest.agent.call("guest-ping") == {}
    info = guest.agent.call("guest-info")
    assert info["version"].startswith("7.2")
    enabled = {c["name"] for c in info["supported_commands"] if c["enabled"]}
    assert {"guest-exec", "guest-exec-status", "guest-file-open", "guest-file-write",
            "guest-file-close", "guest-shutdown", "guest-sync-delimited"} <= enabled


def test_agent_resynchronises_after_garbage(guest: Guest) -> None:
    # Partial JSON and stray bytes (as a dead client could leave) answer errors; a 0xFF and
    # guest-sync-delimited get the stream back in step.
    guest.agent.sock.sendall(b'\x00{"execute": "guest-pi')
    guest.agent.sync(timeout=CALL_DEADLINE)
    assert guest.agent.call("guest-ping") == {}


def test_exec_captures_output_and_status(guest: Guest) -> None:
    r = guest.agent.sh("echo hello; uname -r; echo oops >&2; exit 3")
    assert r.exitcode == 3 and r.signal is None
    lines = r.out.decode().splitlines()
    assert lines[0] == "hello" and lines[1].endswith("-amd64")
    assert r.err == b"oops\n"
    assert not r.out_truncated and not r.err_truncated


def test_exec_environment_and_input(guest: Guest) -> None:
    r = guest.agent.sh('echo "$PATH|$HOME|$(id -u)|$(pwd)"')
    assert r.out.decode().strip() == "/sbin:/bin:/usr/sbin:/usr/bin|/|0|/"
    r = guest.agent.exec("/bin/cat", input_data=b"fed on stdin")
    assert r.exitcode == 0 and r.out == b"fed on stdin"


def test_exec_reports_signals(guest: Guest) -> None:
    r = guest.agent.sh("kill -KILL $$")
    assert r.exitcode is None and r.signal == 9
    r = guest.agent.sh("kill -TERM $$")
    assert r.exitcode is None and r.signal == 15


def test_exec_failures_are_errors(guest: Guest) -> None:
    with pytest.raises(AgentError, match="No such file"):
        guest.agent.call("guest-exec", {"path": "/nonexistent", "capture-output": True})
    with pytest.raises(AgentError, match="pid"):
        guest.agent.call("guest-exec-status", pid=999999)


def test_exec_status_is_given_once(guest: Guest) -> None:
    pid = guest.agent.call("guest-exec", path="/bin/true")["pid"]
    deadline = time.monotonic() + CALL_DEADLINE
    while not guest.agent.call("guest-exec-status", pid=pid)["exited"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # qemu-ga forgets a process once it reported it as exited.
    with pytest.raises(AgentError, match="pid"):
        guest.agent.call("guest-exec-status", pid=pid)


def test_file_write_then_read_back(guest: Guest) -> None:
    handle = guest.agent.call("guest-file-open", path="/tmp/from-host", mode="w")
    written = guest.agent.call("guest-file-write", {"handle": handle,
                               "buf-b64": base64.b64encode(b"written by the host\n").decode()})
    assert written["count"] == len(b"written by the host\n")
    guest.agent.call("guest-file-close", handle=handle)
    assert run_ok(guest.agent, "cat /tmp/from-host") == "written by the host\n"
    handle = guest.agent.call("guest-file-open", path="/tmp/from-host", mode="r")
    read = guest.agent.call("guest-file-read", handle=handle, count=4096)
    guest.agent.call("guest-file-close", handle=handle)
    assert base64.b64decode(read["buf-b64"]) == b"written by the host\n"


def test_megabyte_flood_comes_back_whole(guest: Guest) -> None:
    r = guest.agent.sh("head -c 1048576 /dev/zero | tr '\\0' x", timeout=120)
    assert r.exitcode == 0
    assert r.out == b"x" * 1048576 and not r.out_truncated


def test_flood_beyond_16_mib_is_truncated_by_qemu_ga(guest: Guest) -> None:
    # qemu-ga keeps the first 16 MiB of each stream, reads and drops the rest (so the
    # process does not block), and says out-truncated.
    r = guest.agent.sh(f"head -c {QGA_EXEC_OUTPUT_CAP + 1048576} /dev/zero | tr '\\0' y; echo fine >&2",
                       timeout=300)
    assert r.exitcode == 0
    assert len(r.out) == QGA_EXEC_OUTPUT_CAP and r.out_truncated
    assert set(r.out) == {ord("y")}
    assert r.err == b"fine\n" and not r.err_truncated


def test_no_configuration_share(guest: Guest) -> None:
    mounts = run_ok(guest.agent, "cat /proc/mounts")
    assert " 9p " not in mounts and "hostfs" not in mounts and "/vmshop" not in mounts
    assert guest.agent.sh("test -e /sbin/vmshop-agent || test -e /vmshop").exitcode == 1
    release = run_ok(guest.agent, "cat /etc/vmshop-release")
    assert "AGENT=qemu-ga" in release and "AGENT_PACKAGE=qemu-guest-agent_" in release
    # The agent runs on the virtio-serial port that carries the name.
    ps = run_ok(guest.agent, "cat /sys/class/virtio-ports/*/name; ps -o args | grep '[q]emu-ga'")
    assert AGENT_PORT_NAME in ps
    assert "/usr/sbin/qemu-ga -m virtio-serial -p /dev/vport" in ps


def test_data_share_mounts_read_only(guest: Guest) -> None:
    assert guest.data_dir is not None
    before = sorted(p.name for p in guest.data_dir.iterdir())
    mode = (guest.data_dir / "input.txt").stat().st_mode
    # Even mounted read-write by the guest, the export refuses every change (readonly=on).
    out = run_ok(guest.agent, (
        "mkdir -p /mnt/data && mount -t 9p -o trans=virtio,version=9p2000.L vmdata /mnt/data && "
        "cat /mnt/data/input.txt; "
        "touch /mnt/data/new 2>/dev/null; echo touch=$?; "
        "ln -s /etc/passwd /mnt/data/link 2>/dev/null; echo ln=$?; "
        "chmod 4755 /mnt/data/input.txt 2>/dev/null; echo chmod=$?; "
        "echo more >> /mnt/data/input.txt 2>/dev/null; echo append=$?; "
        "umount /mnt/data"))
    assert out.startswith(DATA_FILE_TEXT)
    for op in ("touch", "ln", "chmod", "append"):
        assert f"{op}=0" not in out, out
    assert sorted(p.name for p in guest.data_dir.iterdir()) == before
    assert (guest.data_dir / "input.txt").read_text() == DATA_FILE_TEXT
    assert (guest.data_dir / "input.txt").stat().st_mode == mode


def test_httpd_answers_through_hostfwd(guest: Guest) -> None:
    url = f"http://127.0.0.1:{guest.http_port}/"
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                body = resp.read().decode()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    assert "vmshop-guest" in body


def test_nics_identified_by_mac(guest: Guest) -> None:
    out = run_ok(guest.agent, "for n in /sys/class/net/eth*; do echo ${n##*/} $(cat $n/address); done; "
                              "ip -o -4 addr show")
    # QEMU's default MAC for the first NIC; the user-mode NIC got its address by DHCP.
    assert "eth0 52:54:00:12:34:56" in out
    assert "10.0.2.15/24" in out


def test_agent_is_respawned(guest: Guest) -> None:
    before = run_ok(guest.agent, "pidof qemu-ga").split()
    assert len(before) == 1
    # The child kills its parent, qemu-ga, after qemu-ga answered guest-exec.
    guest.agent.call("guest-exec", path="/bin/sh", arg=["-c", "sleep 0.5; kill -KILL $PPID"])
    deadline = time.monotonic() + BOOT_DEADLINE
    while True:
        # A request that reaches the old qemu-ga as it dies is never answered (the host's end of the
        # channel stays open): each probe has a short deadline, and one that got no answer is tried
        # again (a probe that waited 60 s for the dead agent failed a CI run).
        try:
            guest.agent.wait_ready(deadline)
            probe = guest.agent.sh("pidof qemu-ga", timeout=PROBE_DEADLINE)
        except AgentError:
            after = before
        else:
            assert probe.exitcode == 0, probe
            after = probe.out.decode().split()
        if after != before:
            break
        assert time.monotonic() < deadline, "qemu-ga was not killed, or not started again"
        time.sleep(0.2)
    assert len(after) == 1


def test_guest_shutdown_powers_qemu_off(guest: Guest) -> None:
    console_before = guest.console.read_text(errors="replace")
    assert "vmshop-guest: system started" in console_before
    # guest-shutdown has no answer on success: the channel closes when QEMU exits.
    guest.agent.send({"execute": "guest-shutdown", "arguments": {"mode": "powerdown"}})
    try:
        code = guest.process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("QEMU still running 60 s after guest-shutdown\nconsole:\n" + _console_tail(guest.console))
    assert code == 0
    console = guest.console.read_text(errors="replace")
    assert "shutdown -h -P +0 hypervisor initiated shutdown -> poweroff" in console
    assert "reboot: Power down" in console
    with pytest.raises(EOFError):
        guest.agent._line(time.monotonic() + 10)


def test_base_image_unchanged(guest: Guest) -> None:
    assert _sha256(guest.image.disk) == guest.base_sha256


# --- User-Mode Linux: the same agent on a serial line ---------------------------------------------


def uml_command(binary: str, workdir: Path, base: Path, agent_fd: int, cmdline: str) -> list[str]:
    """UML on the image's root disk with ssl0 (the guest's /dev/ttyS0) on the host's fd ``agent_fd``."""
    words = [w for w in cmdline.split() if w.split("=", 1)[0] not in (
        "root", "console", "clocksource", "no_timer_check") and not w.startswith("i8042.")]
    return [
        binary, "mem=128M", f"ubd0={workdir / 'disk.cow'},{base}", "umid=uml", f"uml_dir={workdir / 'ctl'}/",
        "con0=null,fd:1", "con=null", "ssl=null", f"ssl0=fd:{agent_fd}",
        "root=/dev/ubda", *words,
    ]


@pytest.fixture(scope="module")
def uml_guest(image: Image, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    binary = shutil.which("linux.uml")
    if binary is None:
        pytest.skip("linux.uml is not installed (Debian package user-mode-linux)")
    workdir = tmp_path_factory.mktemp("uml")
    (workdir / "ctl").mkdir()
    base = workdir / "base.raw"
    subprocess.run(["qemu-img", "convert", "-q", "-f", "qcow2", "-O", "raw", str(image.disk), str(base)], check=True)
    host_end, guest_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    # UML's memory is a file in TMPDIR: a tmpfs if there is one.
    tmpdir = "/dev/shm" if os.access("/dev/shm", os.W_OK) else str(workdir)
    console = workdir / "console.log"
    with console.open("wb") as out, (workdir / "uml.err").open("wb") as err:
        start = time.monotonic()
        proc = subprocess.Popen(
            uml_command(binary, workdir, base, guest_end.fileno(), image.cmdline),
            stdin=subprocess.DEVNULL, stdout=out, stderr=err, pass_fds=(guest_end.fileno(),),
            cwd=workdir, start_new_session=True, env={"PATH": "/usr/bin:/bin", "TMPDIR": tmpdir},
        )
    guest_end.close()
    agent = Agent(host_end)
    try:
        _wait_for_agent(agent, proc, console, "UML")
        yield Guest(image, workdir, agent, console, proc, "", time.monotonic() - start)
    finally:
        agent.close()
        _stop(proc)
        shutil.rmtree(workdir, ignore_errors=True)


def test_uml_agent_on_the_serial_line(uml_guest: Guest) -> None:
    agent = uml_guest.agent
    agent.sync(timeout=CALL_DEADLINE)
    assert agent.call("guest-ping") == {}
    out = run_ok(agent, "grep -m1 vendor_id /proc/cpuinfo; ps -o args | grep '[q]emu-ga'")
    assert "User Mode Linux" in out
    assert "/usr/sbin/qemu-ga -m isa-serial -p /dev/ttyS0" in out
    r = agent.sh("echo hello; echo oops >&2; exit 4")
    assert (r.exitcode, r.out, r.err) == (4, b"hello\n", b"oops\n")
    assert agent.sh("kill -KILL $$").signal == 9


def test_uml_file_write(uml_guest: Guest) -> None:
    agent = uml_guest.agent
    handle = agent.call("guest-file-open", path="/tmp/from-host", mode="w")
    agent.call("guest-file-write", {"handle": handle, "buf-b64": base64.b64encode(b"over ssl0\n").decode()})
    agent.call("guest-file-close", handle=handle)
    assert run_ok(agent, "cat /tmp/from-host") == "over ssl0\n"


def test_uml_megabyte_flood_comes_back_whole(uml_guest: Guest) -> None:
    # Catches corrupted guest FPU/SSE state too (16-byte blocks of zeros in copied memory).
    r = uml_guest.agent.sh("head -c 1048576 /dev/zero | tr '\\0' x", timeout=120)
    assert r.exitcode == 0 and r.out == b"x" * 1048576


def test_uml_guest_shutdown_halts_uml(uml_guest: Guest) -> None:
    uml_guest.agent.send({"execute": "guest-shutdown", "arguments": {"mode": "powerdown"}})
    try:
        code = uml_guest.process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("UML still running 60 s after guest-shutdown\nconsole:\n" + _console_tail(uml_guest.console))
    assert code == 0
    console = uml_guest.console.read_text(errors="replace")
    assert "shutdown -h -P +0 hypervisor initiated shutdown -> poweroff" in console
    assert "reboot: System halted" in console
