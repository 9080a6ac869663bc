"""Hostile guests under User-Mode Linux: what hostfs, UML's own sockets and its lines give an attacker.

hostfs lets a UML guest's root mount any path its UML process can see, and
act there with that process's rights; the old UML backend lost a neighbour
that way (a guest re-pointed its mconsole socket at another VM's, so that
collecting the attacker powered the neighbour off). One plant (uml backend,
a pool, a data store) and three real UML guests for the module: ``m1`` and
``m2`` are mallory's, ``a1`` is alice's. Every attack goes only through the
plant's SOAP API and the guests' own scripts. After each one, the promises
of ``tests/test_hostile_guest.py`` hold (:func:`unharmed`: canaries unchanged,
the secret never out, ``plantInfo`` within 1 s and the plant's RSS growth
under 100 MiB while the attack ran, no set-uid file and no world-writable
directory under the state directory), and so do UML's own: the neighbour's
files and processes are untouched, and collecting the attacker leaves the
neighbour running.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zeep.exceptions
from servers import processes_mentioning, start_plant, wait_for
from test_hostile_guest import Host, Lab, Watch, configure, dag, script, unharmed

from vmplant_service.backends.uml.paths import RunPaths

pytestmark = [pytest.mark.guest, pytest.mark.integration]

CONSOLE_LIMIT = 256 * 1024


def run_dir(lab: Lab, name: str) -> RunPaths:
    return RunPaths.of(lab.plant.state_dir / "run" / lab.vms[name].vm_id)


def files_of(paths: RunPaths) -> dict[str, tuple[int, int]]:
    """The names in a run directory with their inode and type bits (console logs aside: they grow)."""
    found = {}
    for path in paths.run_dir.iterdir():
        if path.name.startswith("console.log"):
            continue
        info = path.lstat()
        found[path.name] = (info.st_ino, info.st_mode & 0o170000)
    return found


def uml_pid(paths: RunPaths) -> int:
    return int(paths.uml_pidfile.read_text())


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, warehouse_dir: Path, accel_state_dir: Path) -> Iterator[Lab]:
    base = tmp_path_factory.mktemp("hostile-uml")
    data = base / "data" / "appdata"
    data.mkdir(parents=True)
    (data / "input.txt").write_text("application data\n")
    os.chmod(base / "data", 0o755)
    os.chmod(data, 0o755)
    secret = "vmshop-secret-" + secrets.token_hex(16)
    secret_dir = Path("/root") / f".vmshop-hostile-{secrets.token_hex(4)}"
    secret_dir.mkdir(mode=0o700)
    (secret_dir / "secret").write_text(secret + "\n")
    plant = start_plant(base / "plant", warehouse_dir, backend="uml", capacity_vms=3, capacity_memory=1024,
                        datastore=base / "data", watch_interval=1,
                        backend_options={"state_dir": str(accel_state_dir), "console_limit": str(CONSOLE_LIMIT)})
    canaries = [secret_dir / "secret", data / "input.txt", plant.config, warehouse_dir / "index.txt",
                *sorted((warehouse_dir / "tiny").glob("*")), Path("/etc/passwd")]
    host = Host(secret, secret_dir, [path for path in canaries if path.is_file()])
    host.before = host.snapshot()
    made: dict[str, Any] = {}
    try:
        for name, owner in (("m1", "mallory"), ("m2", "mallory"), ("a1", "alice")):
            made[name] = plant.service.createVM(
                dag=dag(script("true"), network=True), owner=owner, vm_id=f"hu-{name}").vm
        yield Lab(plant, host, made)
    finally:
        try:
            for vm in plant.service.listVMs(include_collected=False) or []:
                plant.service.collectVM(vm_id=vm.vm_id)
        except Exception:  # noqa: BLE001 - cleanup goes on
            pass
        plant.cleanup()
        shutil.rmtree(secret_dir, ignore_errors=True)
        assert processes_mentioning(str(plant.state_dir)) == []


# hostfs: every path it can think of ------------------------------------------------------------
def test_hostfs_reaches_nothing_of_the_host_nor_of_a_neighbour(lab: Lab) -> None:
    state = lab.plant.state_dir
    own, neighbour = run_dir(lab, "m1"), run_dir(lab, "a1")
    secret_path = lab.host.secret_dir / "secret"
    targets = ["/", str(state), str(state / "run"), str(own.run_dir), str(neighbour.run_dir), str(state / "overlays"),
               "/proc/self/root", "/proc/1/root", "/root", str(lab.host.secret_dir), "/etc", "/tmp", "/dev/shm",
               "/run", str(lab.plant.directory), "/../../etc", "/.vmshop-uml"]
    lines = ["mkdir -p /mnt/h", "i=0"]
    for target in targets:
        lines += [
            f"echo \"== {target}\"",
            f"if mount -t hostfs -o {target} none /mnt/h 2>&1; then",
            "  ls -a /mnt/h 2>&1 | head -50",
            "  for n in qga.sock console.log uml.pid relay.pid uml.exit records.sqlite3 x; do",
            f"    ln -sf {neighbour.agent} /mnt/h/$n 2>&1; rm -f /mnt/h/$n.new 2>&1",
            "    echo planted > /mnt/h/$n.new 2>&1 && mv -f /mnt/h/$n.new /mnt/h/$n 2>&1",
            "  done",
            f"  ln -s {secret_path} /mnt/h/leak 2>&1; mkfifo /mnt/h/fifo 2>&1; mknod /mnt/h/dev b 8 0 2>&1",
            "  mkdir /mnt/h/ctl 2>&1; cat /mnt/h/secret /mnt/h/root/secret 2>&1",
            "  umount /mnt/h",
            "fi"]
    lines += [f"cat {secret_path} 2>&1", "echo done"]
    before = {name: files_of(run_dir(lab, name)) for name in ("m1", "a1")}
    pid_before = uml_pid(neighbour)
    with Watch(lab) as watch:
        runs = configure(lab.plant, lab.vms["m1"].vm_id, "\n".join(lines), timeout=120)
        runs += configure(lab.plant, lab.vms["m1"].vm_id, "echo after")
        runs += configure(lab.plant, lab.vms["a1"].vm_id, "echo neighbour")
    lab.outputs += [run.output for run in runs]
    out = runs[0].output
    assert runs[0].ok and out.rstrip().endswith("done"), out[-2000:]
    assert "Read-only file system" in out and "No such file or directory" in out
    assert "planted" not in out.replace("echo planted", "")
    assert [run.output for run in runs[1:]] == ["after\n", "neighbour\n"]
    assert {name: files_of(run_dir(lab, name)) for name in ("m1", "a1")} == before  # nothing made, moved, linked
    assert uml_pid(neighbour) == pid_before
    unharmed(lab, watch)


# UML's own sockets: the mconsole, re-pointed --------------------------------------------------------
def test_repointing_its_mconsole_then_being_collected_leaves_the_neighbour_running(lab: Lab) -> None:
    """m2 replaces its mconsole socket (in its jail-private uml_dir) with links to alice's sockets, old
    and new places; the plant never uses the mconsole, so collecting m2 touches nothing of a1."""
    state = lab.plant.state_dir
    neighbour = run_dir(lab, "a1")
    old_place = state / "run" / lab.vms["a1"].vm_id / "ctl" / "uml" / "mconsole"
    body = (
        "mkdir -p /mnt/p; mount -t hostfs -o /.vmshop-uml none /mnt/p || exit 9\n"
        "ls -la /mnt/p /mnt/p/vmshop 2>&1\n"
        f"rm -f /mnt/p/vmshop/mconsole; ln -s {old_place} /mnt/p/vmshop/mconsole && echo relinked\n"
        f"ln -sf {neighbour.agent} /mnt/p/vmshop/notify 2>&1\n"
        f"mkdir -p /mnt/p/{state}/run 2>&1; ln -sf {neighbour.run_dir} /mnt/p/vmshop/pid 2>&1\n"
        "ls -la /mnt/p/vmshop; umount /mnt/p")
    runs = configure(lab.plant, lab.vms["m2"].vm_id, body)
    lab.outputs += [run.output for run in runs]
    assert "relinked" in runs[0].output, runs[0].output
    files_before, pid_before = files_of(neighbour), uml_pid(neighbour)
    with Watch(lab) as watch:
        collected = lab.plant.service.collectVM(vm_id=lab.vms["m2"].vm_id)
    assert collected.state == "collected"
    assert not (state / "run" / lab.vms["m2"].vm_id).exists()
    assert lab.plant.service.describeVM(vm_id=lab.vms["a1"].vm_id).state == "running"
    assert uml_pid(neighbour) == pid_before and os.path.exists(f"/proc/{pid_before}")
    assert files_of(neighbour) == files_before
    assert configure(lab.plant, lab.vms["a1"].vm_id, "echo still here")[0].output == "still here\n"
    unharmed(lab, watch)


# Its own disk file: the one writable host file in its jail -------------------------------------------
def test_its_disk_file_neither_grows_nor_turns_set_uid(lab: Lab) -> None:
    own = run_dir(lab, "m1")
    disk = own.cow if own.cow.exists() else own.raw
    limit = int(next(line for line in Path(f"/proc/{uml_pid(own)}/limits").read_text().splitlines()
                     if line.startswith("Max file size")).split()[3])
    size_before = disk.stat().st_size
    body = (f"mkdir -p /mnt/d; mount -t hostfs -o {own.run_dir} none /mnt/d || exit 9\n"
            "ls -la /mnt/d\n"
            f"chmod 4755 /mnt/d/{disk.name} 2>&1; echo chmod=$?\n"
            f"chown 0:0 /mnt/d/{disk.name} 2>&1; echo chown=$?\n"
            f"truncate -s 100G /mnt/d/{disk.name} 2>&1; echo truncate=$?\n"
            f"s=$(stat -c %s /mnt/d/{disk.name}); dd if=/dev/zero bs=1M count=64 seek=$((s / 1048576)) "
            f"of=/mnt/d/{disk.name} conv=notrunc 2>&1; echo grow=$?\n"
            f"rm -f /mnt/d/{disk.name} 2>&1; echo rm=$?; mv /mnt/d/{disk.name} /mnt/d/x 2>&1; echo mv=$?\n"
            "umount /mnt/d")
    with Watch(lab) as watch:
        runs = configure(lab.plant, lab.vms["m1"].vm_id, body, timeout=120)
    lab.outputs += [run.output for run in runs]
    out = runs[0].output
    for word in ("chmod", "chown", "truncate", "grow", "rm", "mv"):
        assert f"{word}=0" not in out, out
    assert size_before <= disk.stat().st_size <= limit
    assert not disk.stat().st_mode & 0o7000 and disk.stat().st_uid == 0
    assert configure(lab.plant, lab.vms["m1"].vm_id, "echo x > /root/still-writable && cat /root/still-writable"
                     )[0].output == "x\n"
    unharmed(lab, watch)


# Floods -------------------------------------------------------------------------------------------
def test_a_flood_on_the_console_is_bounded(lab: Lab) -> None:
    own = run_dir(lab, "m1")
    with Watch(lab) as watch:
        configure(lab.plant, lab.vms["m1"].vm_id, "head -c 3000000 /dev/zero | tr '\\0' c > /dev/console; echo ok",
                  timeout=300)
    logs = [own.console, own.console.with_name("console.log.1")]
    assert sum(path.stat().st_size for path in logs if path.exists()) <= 2 * CONSOLE_LIMIT
    unharmed(lab, watch)


def test_a_flood_on_the_agents_line_fails_that_vms_actions_only(lab: Lab) -> None:
    """The guest writes 20 MB of random bytes straight onto its agent's serial line, around qemu-ga."""
    own = run_dir(lab, "m1")
    relay = int(own.relay_pidfile.read_text())
    flood = "(sleep 1; head -c 20000000 /dev/urandom > /dev/ttyS0) </dev/null >/dev/null 2>&1 &"
    most = 0
    with Watch(lab) as watch:
        configure(lab.plant, lab.vms["m1"].vm_id, flood)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            rss = int(next(line.split()[1] for line in Path(f"/proc/{relay}/status").read_text().splitlines()
                           if line.startswith("VmRSS:")))
            most = max(most, rss)
            time.sleep(0.2)
        neighbour = configure(lab.plant, lab.vms["a1"].vm_id, "echo fine")
        try:
            configure(lab.plant, lab.vms["m1"].vm_id, "echo during", timeout=10)
        except zeep.exceptions.Fault as exc:  # its own actions may fail while it floods: a clear fault
            assert str(exc.code).split(":", 1)[-1] == "Server.ActionFailed", exc.message
    assert neighbour[0].output == "fine\n"
    assert most < 64 * 1024, f"the relay grew to {most} KiB"
    assert lab.plant.service.describeVM(vm_id=lab.vms["m1"].vm_id).state == "running"
    # Once the flood is over the agent is heard again (the transport resynchronises past the garbage).
    wait_for(lambda: _answers(lab, "m1"), timeout=180, what="m1's agent to answer again after its flood")
    unharmed(lab, watch)


def _answers(lab: Lab, name: str) -> bool:
    try:
        return configure(lab.plant, lab.vms[name].vm_id, "echo back", timeout=10)[0].output == "back\n"
    except zeep.exceptions.Fault:
        time.sleep(1)
        return False


def test_a_plant_killed_and_restarted_speaks_to_its_guests_again(lab: Lab) -> None:
    """The relays outlive the plant: a new plant process re-adopts the UML guests and is heard by their agents."""
    pids = {name: uml_pid(run_dir(lab, name)) for name in ("m1", "a1")}
    lab.plant.stop(signal.SIGKILL)
    lab.plant.start()
    lab.plant.client()
    for name in ("m1", "a1"):
        assert lab.plant.service.describeVM(vm_id=lab.vms[name].vm_id).state == "running"
        assert configure(lab.plant, lab.vms[name].vm_id, "echo again")[0].output == "again\n"
        assert uml_pid(run_dir(lab, name)) == pids[name]
    unharmed(lab)


def test_collecting_the_attacker_leaves_nothing_and_the_neighbour_runs(lab: Lab) -> None:
    neighbour = run_dir(lab, "a1")
    pid_before = uml_pid(neighbour)
    vm_id = lab.vms["m1"].vm_id
    assert lab.plant.service.collectVM(vm_id=vm_id).state == "collected"
    assert not (lab.plant.state_dir / "run" / vm_id).exists()
    assert not (lab.plant.state_dir / "overlays" / f"{vm_id}.qcow2").exists()
    assert not processes_mentioning(str(lab.plant.state_dir / "run" / vm_id) + "/")
    assert uml_pid(neighbour) == pid_before
    assert lab.plant.service.describeVM(vm_id=lab.vms["a1"].vm_id).state == "running"
    unharmed(lab)
