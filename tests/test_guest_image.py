"""Boot the real tiny guest image and drive its agent through the 9p channel.

The image is built by ``scripts/build_guest_image.sh WAREHOUSE`` into
``${VMSHOP_WAREHOUSE:-<repo>/var/warehouse}``.  One guest is booted for the
whole module (TCG, a qcow2 overlay of the base in a temporary directory, a 9p
share with mount_tag ``vmshop``); the tests then talk to its agent the way the
plant does (docs/guest-image.md), and finally power it off over QMP.

The tests run in file order: the power-off test and the base-image check come
last.  Only loopback traffic: the guest's user-mode NIC uses restrict=on and a
hostfwd port on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import json
import os
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

import pytest

pytestmark = pytest.mark.guest

REPO = Path(__file__).resolve().parents[1]
WAREHOUSE = Path(os.environ.get("VMSHOP_WAREHOUSE", str(REPO / "var" / "warehouse")))
IMAGE_NS = "urn:vmshop:image:1"
BOOT_DEADLINE = 90.0  # seconds; a TCG boot takes ~3-10 s
ACTION_DEADLINE = 60.0


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
    share: Path
    qmp_socket: Path
    pidfile: Path
    console: Path
    http_port: int
    process: subprocess.Popen[bytes]
    base_sha256: str


@dataclass
class Result:
    status: int
    output: str
    elapsed: float
    path: Path


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


def _console_tail(guest_console: Path, lines: int = 30) -> str:
    try:
        text = guest_console.read_text(errors="replace")
    except OSError:
        return "(no console log)"
    return "\n".join(text.splitlines()[-lines:])


def _kill_pid(pid: int, marker: str) -> None:
    """SIGKILL pid if it is still a QEMU whose command line names marker."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return
    if marker.encode() in cmdline:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def qemu_command(image: Image, workdir: Path, share: Path, http_port: int) -> list[str]:
    return [
        "qemu-system-x86_64",
        "-accel", "tcg",
        "-M", image.machine,
        "-m", str(image.memory),
        "-smp", str(image.vcpus),
        "-nodefaults", "-no-user-config",
        "-kernel", str(image.kernel),
        "-initrd", str(image.initrd),
        "-append", image.cmdline,
        "-drive", f"file={workdir / 'clone.qcow2'},format=qcow2,if=virtio",
        "-fsdev", f"local,id=cfg,path={share},security_model=none",
        "-device", "virtio-9p-pci,fsdev=cfg,mount_tag=vmshop",
        "-netdev", f"user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{http_port}-:80",
        "-device", "virtio-net-pci,netdev=n0,romfile=",
        "-qmp", f"unix:{workdir / 'qmp.sock'},server=on,wait=off",
        "-pidfile", str(workdir / "qemu.pid"),
        "-serial", f"file:{workdir / 'console.log'}",
        "-display", "none",
        "-no-reboot",
    ]


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    image = _load_image()
    base_sha = _sha256(image.disk)
    workdir = tmp_path_factory.mktemp("guest")
    share = workdir / "share"
    share.mkdir()
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(image.disk),
         "-F", "qcow2", str(workdir / "clone.qcow2")],
        check=True,
    )
    port = _free_port()
    cmd = qemu_command(image, workdir, share, port)
    qemu_log = (workdir / "qemu.log").open("wb")
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=qemu_log,
        stderr=subprocess.STDOUT, start_new_session=True,
    )
    qemu_log.close()
    g = Guest(image, workdir, share, workdir / "qmp.sock", workdir / "qemu.pid",
              workdir / "console.log", port, proc, base_sha)
    try:
        ready = share / "agent" / "ready"
        deadline = time.monotonic() + BOOT_DEADLINE
        while not ready.exists():
            if proc.poll() is not None:
                out = (workdir / "qemu.log").read_text(errors="replace")
                pytest.fail(f"QEMU exited with {proc.returncode} before the agent was "
                            f"ready: {out}\nconsole:\n{_console_tail(g.console)}")
            if time.monotonic() > deadline:
                pytest.fail(f"agent not ready after {BOOT_DEADLINE} s\nconsole:\n"
                            f"{_console_tail(g.console)}")
            time.sleep(0.05)
        yield g
    finally:
        if proc.poll() is None:
            proc.kill()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        try:
            _kill_pid(int(g.pidfile.read_text().strip()), str(workdir))
        except (OSError, ValueError):
            pass
        shutil.rmtree(workdir, ignore_errors=True)


def submit(guest: Guest, name: str, script: str, timeout: float | str | None = None) -> Path:
    """Create an action directory the way the plant does: ready last."""
    d = guest.share / "actions" / name
    d.mkdir(parents=True)
    (d / "run").write_text(script)
    if timeout is not None:
        (d / "timeout").write_text(f"{timeout}\n")
    (d / "ready").write_text("")
    return d


def collect(guest: Guest, d: Path, deadline: float = ACTION_DEADLINE) -> Result:
    end = time.monotonic() + deadline
    while not (d / "done").exists():
        if guest.process.poll() is not None:
            pytest.fail(f"QEMU exited while waiting for {d.name}\nconsole:\n"
                        f"{_console_tail(guest.console)}")
        if time.monotonic() > end:
            pytest.fail(f"action {d.name} not done after {deadline} s\nconsole:\n"
                        f"{_console_tail(guest.console)}")
        time.sleep(0.05)
    return Result(
        status=int((d / "status").read_text().strip()),
        output=(d / "output").read_text(errors="replace"),
        elapsed=float((d / "elapsed").read_text().strip()),
        path=d,
    )


def run(guest: Guest, name: str, script: str, timeout: float | str | None = None) -> Result:
    return collect(guest, submit(guest, name, script, timeout))


def test_agent_ready_file(guest: Guest) -> None:
    text = (guest.share / "agent" / "ready").read_text()
    assert text.startswith("uptime=")
    assert float(text.strip().split("=", 1)[1]) > 0


def test_action_output_and_status(guest: Guest) -> None:
    r = run(guest, "010-hello", "echo hello; uname -r\n")
    assert r.status == 0
    lines = r.output.splitlines()
    assert lines[0] == "hello"
    assert lines[1].endswith("-amd64")
    assert r.elapsed >= 0
    done = (r.path / "done").read_text()
    assert "status=0" in done
    assert not (r.path / "timedout").exists()


def test_action_runs_in_its_directory(guest: Guest) -> None:
    r = run(guest, "015-cwd", 'pwd; echo "$VMSHOP_ACTION_DIR"; echo err >&2\n')
    assert r.status == 0
    assert r.output.splitlines() == ["/vmshop/actions/015-cwd"] * 2 + ["err"]


def test_failing_action_reports_status(guest: Guest) -> None:
    r = run(guest, "020-fail", "echo about to fail >&2; exit 7\n")
    assert r.status == 7
    assert "about to fail" in r.output


def test_hanging_action_is_killed_by_timeout(guest: Guest) -> None:
    r = run(guest, "030-hang", "echo started; sleep 1000; echo never\n", timeout=1)
    assert r.status == 124
    assert "started" in r.output and "never" not in r.output
    assert 0.9 <= r.elapsed < 20
    assert (r.path / "timedout").read_text().strip() == "1"
    # Everything the action started was killed with it.
    check = run(guest, "031-check", "ps | grep -c '[s]leep 1000' || true\n")
    assert check.output.strip() == "0"


def test_decimal_timeout(guest: Guest) -> None:
    r = run(guest, "035-decimal", "sleep 10\n", timeout="01.5")
    assert r.status == 124
    assert 1.4 <= r.elapsed < 10


def test_actions_run_one_at_a_time_in_name_order(guest: Guest) -> None:
    # A gate action keeps the agent busy while both actions are created, the
    # later name first; after the gate the agent must take the earlier name.
    actions = guest.share / "actions"
    gate = submit(guest, "040-gate",
                  ": > ../040-gate-entered\n"
                  "while [ ! -e ../040-gate-open ]; do sleep 0.05; done\n", timeout=30)
    end = time.monotonic() + ACTION_DEADLINE
    while not (actions / "040-gate-entered").exists():
        assert time.monotonic() < end, "the agent did not start the gate action"
        time.sleep(0.05)
    probe = "cut -d' ' -f1 /proc/uptime; sleep 0.3; cut -d' ' -f1 /proc/uptime\n"
    second = submit(guest, "042-second", probe)
    first = submit(guest, "041-first", probe)
    (actions / "040-gate-open").write_text("")
    assert collect(guest, gate).status == 0
    r2 = collect(guest, second)
    r1 = collect(guest, first)
    assert r1.status == 0 and r2.status == 0
    start1, end1 = map(float, r1.output.split())
    start2, end2 = map(float, r2.output.split())
    assert end1 <= start2, (r1.output, r2.output)
    assert (first / "done").stat().st_mtime <= (second / "done").stat().st_mtime


def test_huge_output(guest: Guest) -> None:
    r = run(guest, "050-huge", "seq 1 100000\n", timeout=120)
    assert r.status == 0
    lines = r.output.splitlines()
    assert len(lines) == 100000 and lines[-1] == "100000"


def test_invalid_timeout_uses_default(guest: Guest) -> None:
    d = guest.share / "actions" / "055-badtimeout"
    d.mkdir()
    (d / "run").write_text("echo ok\n")
    (d / "timeout").write_text("soon\n")
    (d / "ready").write_text("")
    r = collect(guest, d)
    assert r.status == 0 and r.output == "ok\n"


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
    r = run(guest, "060-nics", "for n in /sys/class/net/eth*; do echo ${n##*/} $(cat $n/address); done; "
            "ip -o -4 addr show\n")
    assert r.status == 0
    # QEMU's default MAC for the first NIC; the user-mode NIC got its address by DHCP.
    assert "eth0 52:54:00:12:34:56" in r.output
    assert "10.0.2.15/24" in r.output


def test_agent_is_respawned(guest: Guest) -> None:
    ready = guest.share / "agent" / "ready"
    before = float(ready.read_text().strip().split("=", 1)[1])
    # The action kills the agent (its parent); init starts a new agent, which
    # finishes the interrupted action with status 255 and writes ready again.
    r = run(guest, "070-kill-agent", "kill -KILL $PPID; sleep 30\n", timeout=60)
    assert r.status == 255
    assert "restarted" in r.output
    # The new agent announces itself again (it may do so just after it reported the action).
    deadline = time.monotonic() + 30
    while float(ready.read_text().strip().split("=", 1)[1]) <= before:
        assert time.monotonic() < deadline, "the restarted agent did not write agent/ready again"
        time.sleep(0.05)
    # The interrupted action's watchdog was killed too: only this action's is left.
    r = run(guest, "071-after", "echo alive; ps | grep -c '[w]atchdog'\n")
    assert r.output.split() == ["alive", "1"], r.output


def _qmp(sock_path: Path, *commands: str) -> list[dict[str, object]]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(sock_path))
        f = s.makefile("rw", encoding="utf-8")
        greeting = json.loads(f.readline())
        assert "QMP" in greeting
        answers = []
        for cmd in commands:
            f.write(json.dumps({"execute": cmd}) + "\n")
            f.flush()
            while True:
                msg = json.loads(f.readline())
                if "event" in msg:
                    continue
                answers.append(msg)
                break
        return answers


def test_qmp_system_powerdown_stops_qemu(guest: Guest) -> None:
    answers = _qmp(guest.qmp_socket, "qmp_capabilities", "system_powerdown")
    assert all("return" in a for a in answers), answers
    try:
        code = guest.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("QEMU still running 30 s after system_powerdown\nconsole:\n"
                    + _console_tail(guest.console))
    assert code == 0


def test_base_image_unchanged(guest: Guest) -> None:
    assert _sha256(guest.image.disk) == guest.base_sha256
