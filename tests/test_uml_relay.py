"""The UML backend's two stdlib programs, run as the backend runs them (``python -I -S FILE``), without UML.

- :mod:`vmplant_service.backends.uml.relay` with a fake "UML" (a Python
  program on the agent's line and the console) in place of UML: the
  socket, one client at a time, bounded buffers, dropping while no client
  is connected, the console's rotation, the exit record, the report, the
  lifetimes (UML dies with its relay; UML's process group dies with UML);
- :mod:`vmplant_service.backends.uml.launcher`: the jail (only the binds,
  a read-only root, a private tmpfs), the user switch, the file-size limit.
"""

from __future__ import annotations

import json
import os
import pwd
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import processes_naming

from vmplant_service.backends.uml import launcher, relay
from vmplant_service.backends.uml.command import AGENT_FD, CONSOLE_FD, STATUS_FD
from vmplant_service.backends.uml.states import read_exit_record
from vmplant_service.processes import pid_alive

RELAY = str(Path(relay.__file__).absolute())
LAUNCHER = str(Path(launcher.__file__).absolute())

#: A stand-in for UML: a session leader (as UML makes itself) with the agent's line on fd 4 and the console on 5.
FAKE_UML = r"""
import os, signal, sys, time
os.setsid()
mode, token = sys.argv[1], sys.argv[2]
agent, console = 4, 5
def echo():
    while True:
        data = os.read(agent, 65536)
        if not data:
            return
        os.write(agent, data)
if mode == "echo":
    echo()
elif mode == "flood":
    os.write(1, b"flooding\n")
    chunk = b"g" * 65536
    for _ in range(int(sys.argv[3])):
        os.write(agent, chunk)
    os.write(agent, b"\nEND\n")
    echo()
elif mode == "console":
    os.write(1, b"on stdout " + token.encode() + b"\n")
    os.write(2, b"on stderr\n")
    chunk = b"c" * 4096
    for _ in range(int(sys.argv[3]) // 4096):
        os.write(console, chunk)
    os.write(console, b"console-end\n")
    sys.exit(int(sys.argv[4]))
elif mode == "signal":
    os.write(2, b"dying\n")
    os.kill(os.getpid(), int(sys.argv[3]))
elif mode == "orphan":
    if os.fork() == 0:
        os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(120)", token])
    time.sleep(0.5)
    sys.exit(0)
elif mode == "late":  # opens "its line" late: reads what waited, shows it on the console
    time.sleep(float(sys.argv[3]))
    os.set_blocking(agent, False)
    waited = b""
    try:
        while True:
            waited += os.read(agent, 65536)
    except BlockingIOError:
        pass
    os.write(console, b"WAITED:" + waited.hex().encode() + b"\n")
    sys.exit(0)
elif mode == "exit-now":
    sys.exit(5)
else:
    time.sleep(300)
"""


@dataclass
class Relayed:
    run_dir: Path
    report: dict[str, object]
    token: str

    @property
    def relay_pid(self) -> int:
        return int(self.report["relay"])  # type: ignore[arg-type]

    @property
    def uml_pid(self) -> int:
        return int(self.report["uml"])  # type: ignore[arg-type]

    def connect(self, timeout: float = 5.0) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(str(self.run_dir / "qga.sock"))
        return sock

    def console(self) -> bytes:
        parts = [self.run_dir / "console.log.1", self.run_dir / "console.log"]
        return b"".join(path.read_bytes() for path in parts if path.exists())


def launch_config(**changes: object) -> dict[str, object]:
    config: dict[str, object] = {
        "jail": None, "binds": [], "private": None, "size_mib": 1, "cwd": "/", "env": {"PATH": "/usr/bin:/bin"},
        "user": None, "fsize": None, "fpu_workaround": False, "status_fd": STATUS_FD, "parent": None}
    config.update(changes)
    return config


def start_relay(where: Path, *args: str, console_limit: int = 262144, settle: float = 0.2,
                uml: list[str] | None = None, launch: dict[str, object] | None = None) -> Relayed:
    run_dir = where / f"r{time.monotonic_ns()}"
    run_dir.mkdir(mode=0o700)
    token = f"vmshop-relay-test-{time.monotonic_ns()}"
    config = {
        "run_dir": str(run_dir), "python": sys.executable, "launcher": LAUNCHER,
        "launch": launch or launch_config(),
        "uml": uml or [sys.executable, "-I", "-S", "-c", FAKE_UML, args[0], token, *args[1:], str(run_dir) + "/"],
        "fds": {"status": STATUS_FD, "agent": AGENT_FD, "console": CONSOLE_FD}, "nics": [],
        "console_limit": console_limit, "settle": settle, "timeout": 20,
    }
    with open(run_dir / "relay.err", "wb") as err:
        done = subprocess.run([sys.executable, "-I", "-S", RELAY, f"{run_dir}/"], input=json.dumps(config).encode(),
                              stdout=subprocess.PIPE, stderr=err, timeout=60, start_new_session=True)
    return Relayed(run_dir, json.loads(done.stdout.decode().strip().splitlines()[-1]), token)


def wait_for(condition: object, timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def kill(relayed: Relayed) -> None:
    for pid in (relayed.uml_pid, relayed.relay_pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, TypeError, ValueError):
            pass
    wait_for(lambda: not processes_naming(str(relayed.run_dir)), what="the relay and its fake UML to end")


@pytest.fixture()
def where(guest_tmp: Path) -> Iterator[Path]:
    path = guest_tmp / f"relay-{time.monotonic_ns()}"
    path.mkdir()
    yield path
    left = processes_naming(str(path))
    assert not left, f"left running: {left}"


# The agent's socket ----------------------------------------------------------------------------
def test_the_agents_socket_passes_bytes_both_ways_and_is_private(where: Path) -> None:
    relayed = start_relay(where, "echo")
    try:
        assert relayed.report["ok"] is True
        sock_path = relayed.run_dir / "qga.sock"
        assert stat.S_ISSOCK(sock_path.stat().st_mode) and sock_path.stat().st_mode & 0o777 == 0o600
        for name in ("relay.pid", "uml.pid"):
            assert (relayed.run_dir / name).stat().st_mode & 0o777 == 0o600
        with relayed.connect() as client:
            client.sendall(b"\xff{\"execute\": \"guest-ping\"}\n" * 100)
            received = b""
            while len(received) < 2700:
                received += client.recv(65536)
            assert received == b"\xff{\"execute\": \"guest-ping\"}\n" * 100
    finally:
        kill(relayed)


def test_one_client_at_a_time(where: Path) -> None:
    relayed = start_relay(where, "echo")
    try:
        first = relayed.connect()
        second = relayed.connect()  # accepted by the kernel, not served
        second.settimeout(0.5)
        second.sendall(b"second\n")
        first.sendall(b"first\n")
        assert first.recv(100) == b"first\n"
        with pytest.raises(TimeoutError):
            second.recv(100)
        first.close()
        second.settimeout(5)
        assert second.recv(100) == b"second\n"  # served once the first left; what it sent waited
        second.close()
    finally:
        kill(relayed)


def test_what_the_guest_writes_with_no_client_is_dropped_not_kept(where: Path) -> None:
    """80 MiB on the agent's line while nobody is connected: the relay reads and drops it, its memory stays small."""
    relayed = start_relay(where, "flood", "1280")
    try:
        wait_for(lambda: "flooding" in relayed.console().decode(), what="the flood to begin")
        time.sleep(1.0)
        rss = int(next(line.split()[1] for line in Path(f"/proc/{relayed.relay_pid}/status").read_text().splitlines()
                       if line.startswith("VmRSS:")))
        assert rss < 64 * 1024, f"the relay holds {rss} KiB"
        with relayed.connect(timeout=60) as client:
            client.sendall(b"after\n")
            received = b""
            while b"after\n" not in received:
                chunk = client.recv(65536)
                assert chunk, "the relay closed the connection"
                received += chunk
                received = received[-100000:]
    finally:
        kill(relayed)


def test_a_client_that_does_not_read_stops_the_guest_not_the_relay(where: Path) -> None:
    """With a client connected that never reads, at most BUFFER bytes wait in the relay; the guest's writes block."""
    relayed = start_relay(where, "echo")
    try:
        with relayed.connect() as client:
            client.setblocking(False)
            sent = 0
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline:  # the echo sends it all back to a client that does not read
                try:
                    sent += client.send(b"z" * 65536)
                except BlockingIOError:
                    time.sleep(0.05)
            rss = int(next(line.split()[1] for line in
                           Path(f"/proc/{relayed.relay_pid}/status").read_text().splitlines()
                           if line.startswith("VmRSS:")))
            assert sent < 16 * 1024 * 1024, f"{sent} bytes went in without anyone reading"
            assert rss < 64 * 1024
    finally:
        kill(relayed)


def test_a_line_opened_late_gets_one_request_and_newlines_only(where: Path) -> None:
    """While UML leaves its line unread, the relay gives it no second request (stale probes are dropped with their
    clients) and only bounded newlines, which qemu-ga skips without answering."""
    relayed = start_relay(where, "late", "2.5")
    try:
        first = relayed.connect()
        first.sendall(b"\xff{\"execute\":\"guest-sync-delimited\",\"arguments\":{\"id\":1}}\n")
        time.sleep(0.5)
        first.close()  # a readiness probe that gave up
        with relayed.connect() as second:
            second.sendall(b"\xff{\"execute\":\"guest-sync-delimited\",\"arguments\":{\"id\":2}}\n")
            wait_for(lambda: b"WAITED:" in relayed.console(), timeout=20, what="the late reader")
    finally:
        kill(relayed)
    waited = bytes.fromhex(relayed.console().split(b"WAITED:")[1].split(b"\n")[0].decode())
    request = b"\xff{\"execute\":\"guest-sync-delimited\",\"arguments\":{\"id\":1}}\n"
    assert waited.startswith(request) and b'"id":2' not in waited
    pokes = waited[len(request):]
    assert pokes == b"\n" * len(pokes) and 1 <= len(pokes) <= relay.POKE_LIMIT


# The console ------------------------------------------------------------------------------------
def test_the_console_and_umls_output_are_kept_and_bounded(where: Path) -> None:
    relayed = start_relay(where, "console", str(3 * 1024 * 1024), "3", console_limit=65536, settle=0.0)
    wait_for(lambda: read_exit_record(relayed.run_dir / "uml.exit") is not None, what="the exit record")
    wait_for(lambda: not pid_alive(relayed.relay_pid), what="the relay to end after UML")
    logs = [relayed.run_dir / "console.log", relayed.run_dir / "console.log.1"]
    assert sum(path.stat().st_size for path in logs) <= 2 * 65536
    assert all(path.stat().st_mode & 0o777 == 0o600 for path in logs)
    assert relayed.console().endswith(b"console-end\n")
    assert read_exit_record(relayed.run_dir / "uml.exit") == {"pid": relayed.uml_pid, "exitcode": 3}


def test_stdout_and_stderr_reach_the_console(where: Path) -> None:
    relayed = start_relay(where, "console", "0", "0", settle=0.0)
    wait_for(lambda: not pid_alive(relayed.relay_pid), what="the relay to end after UML")
    text = relayed.console().decode()
    assert f"on stdout {relayed.token}" in text and "on stderr" in text


# Starting and ending -----------------------------------------------------------------------------
def test_a_uml_that_dies_at_once_is_reported_with_its_words(where: Path) -> None:
    relayed = start_relay(where, "signal", str(int(signal.SIGABRT)), settle=1.0)
    assert relayed.report["ok"] is False
    assert "killed by signal 6" in str(relayed.report["error"]) and "dying" in str(relayed.report["error"])
    wait_for(lambda: not pid_alive(relayed.relay_pid), what="the relay to end")
    assert read_exit_record(relayed.run_dir / "uml.exit") == {"pid": relayed.uml_pid, "signal": 6}


def test_a_launch_failure_is_reported_with_the_launchers_words(where: Path) -> None:
    relayed = start_relay(where, uml=["/nonexistent/linux.uml", "mem=64M"])
    assert relayed.report["ok"] is False
    assert "cannot run /nonexistent/linux.uml: No such file or directory" in str(relayed.report["error"])
    wait_for(lambda: not pid_alive(relayed.relay_pid), what="the relay to end")


def test_uml_dies_with_its_relay(where: Path) -> None:
    relayed = start_relay(where, "sleep")
    assert relayed.report["ok"] is True
    os.kill(relayed.relay_pid, signal.SIGKILL)
    wait_for(lambda: not pid_alive(relayed.uml_pid), what="UML to follow its relay (parent-death signal)")


def test_umls_process_group_dies_with_uml(where: Path) -> None:
    relayed = start_relay(where, "orphan", settle=0.0)
    wait_for(lambda: read_exit_record(relayed.run_dir / "uml.exit") is not None, what="the fake UML to end")
    wait_for(lambda: not processes_naming(relayed.token), what="its child to be killed with its group")
    wait_for(lambda: not pid_alive(relayed.relay_pid), what="the relay to end")


def test_sigterm_ends_uml_and_the_relay(where: Path) -> None:
    relayed = start_relay(where, "sleep")
    os.kill(relayed.relay_pid, signal.SIGTERM)
    wait_for(lambda: not pid_alive(relayed.relay_pid) and not pid_alive(relayed.uml_pid), what="both to end")
    assert read_exit_record(relayed.run_dir / "uml.exit") == {"pid": relayed.uml_pid, "signal": 9}


def test_the_relay_refuses_a_configuration_for_another_directory(where: Path) -> None:
    done = subprocess.run([sys.executable, "-I", "-S", RELAY, f"{where}/other/"],
                          input=json.dumps({"run_dir": str(where)}).encode(), capture_output=True, timeout=30)
    assert done.returncode == 2 and b"not for this run directory" in done.stderr


# The launcher ------------------------------------------------------------------------------------
def test_launcher_configuration_is_checked() -> None:
    with pytest.raises(launcher.LaunchError, match="not JSON"):
        launcher.parse_config("{")
    with pytest.raises(launcher.LaunchError, match="'binds'"):
        launcher.parse_config(json.dumps({**launch_config(), "binds": "x"}))
    with pytest.raises(launcher.LaunchError, match="bad bind"):
        launcher.parse_config(json.dumps({**launch_config(), "binds": [["/etc", "/../etc", False, False]]}))
    with pytest.raises(launcher.LaunchError, match="unprivileged"):
        launcher.parse_config(json.dumps({**launch_config(), "user": [0, 0]}))
    assert launcher.parse_config(json.dumps(launch_config()))["status_fd"] == STATUS_FD


def test_fpu_filter_is_a_whole_bpf_program() -> None:
    program = launcher.fpu_filter()
    assert len(program) % 8 == 0 and len(program) // 8 == 11


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the jail's user switch needs a root plant")


@needs_root
def test_the_jail_holds_only_its_binds_and_drops_to_the_hypervisor_user(where: Path) -> None:
    """The launcher, as the relay runs it, with busybox (static) in a jail of its own."""
    user = pwd.getpwnam("vmshop-qemu")
    busybox = "/bin/busybox"
    jail = where / "root"
    jail.mkdir(mode=0o700)
    readonly = where / "data"
    readonly.mkdir()
    (readonly / "in.txt").write_text("data\n")
    disk = where / "disk.raw"
    disk.write_bytes(bytes(4096))
    os.chown(disk, 0, user.pw_gid)
    disk.chmod(0o660)
    config = launch_config(
        jail=str(jail), private="/.private", size_mib=4, user=[user.pw_uid, user.pw_gid], fsize=8192,
        binds=[[busybox, busybox, False, True], ["/dev/null", "/dev/null", True, False],
               [str(readonly), str(readonly), False, False], [str(disk), str(disk), True, False]])
    script = (f"id; {busybox} ls -a / /.private; echo x > /x 2>&1; echo w=$?; echo x > {readonly}/new 2>&1; "
              f"echo r=$?; {busybox} yes x | {busybox} head -c 16384 >{disk}; ls -l {disk}; "
              f"chmod 4755 {disk} 2>&1; echo c=$?; echo p > /.private/f && echo private-ok")
    status_r, status_w = os.pipe()
    try:
        done = subprocess.run([sys.executable, "-I", "-S", LAUNCHER, json.dumps({**config, "status_fd": status_w}),
                               busybox, "sh", "-c", script], pass_fds=(status_w,), capture_output=True, timeout=60,
                              env={"PATH": "/usr/bin:/bin"})
    finally:
        os.close(status_w)
        launch_error = os.read(status_r, 4000)
        os.close(status_r)
    out = done.stdout.decode() + done.stderr.decode()
    assert launch_error == b"" and done.returncode == 0, (launch_error, out)
    assert f"uid={user.pw_uid} gid={user.pw_gid}" in out
    listing = out.split("\n", 2)[1:]
    assert ".private" in out and "etc" not in listing[0].split() and "root" not in listing[0].split()
    assert "w=0" not in out and "Read-only file system" in out  # the jail's own root
    assert "r=0" not in out  # the read-only bind
    assert "File too large" in out or "head: standard output: I/O error" in out  # RLIMIT_FSIZE: 8192 bytes
    assert "c=0" not in out and "Operation not permitted" in out  # it does not own its disk file
    assert "private-ok" in out
    assert disk.stat().st_size <= 8192 and not disk.stat().st_mode & stat.S_ISUID
