"""Guests are hostile: real guests whose own scripts attack the plant, its host and their neighbours.

One plant (qemu backend, a pool, a data store) and three real guests for
the module: ``m1`` is mallory's (the attacker), ``a1`` and ``a2`` are
alice's. Every attack goes only through the plant's SOAP API and the
guests' own scripts, as a hostile owner's would. After each attack
(:func:`unharmed`):

- no canary file on the host changed, and no file appeared next to one
  (the data store, the warehouse, the plant's configuration, a root-only
  directory holding a secret);
- the secret never left the host (not in any action's output, the plant's
  answers or its log);
- no set-uid or set-gid file, and no world-writable directory, under the
  plant's state directory;
- while the attack ran, the plant answered ``plantInfo`` within 1 s every
  time, and its resident memory grew by less than 100 MiB.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import stat
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import pytest
import zeep
import zeep.exceptions
from servers import PlantProcess, fault_code, processes_mentioning, start_plant, wait_for

from vmshop_common.dagxml import DAG_NS

pytestmark = [pytest.mark.guest, pytest.mark.integration]

MAX_RSS_GROWTH = 100 * 1024 * 1024
MAX_INFO_SECONDS = 1.0


def dag(*nodes: str, network: bool = False, image: str = "tiny") -> str:
    """A DAG from ``image`` whose nodes (XML without ids) run in a chain, after a pool address if ``network``.

    (For configure, the start node stands for the VM as it is, whatever its image.)
    """
    chain = (['<network mode="pool"/>'] if network else []) + list(nodes)
    ids = ["s"] + [f"n{i}" for i in range(len(chain))]
    rendered = [node.replace(" ", f' id="{ids[index + 1]}" ', 1) for index, node in enumerate(chain)]
    edges = "".join(f'<edge from="{a}" to="{b}"/>' for a, b in zip(ids, ids[1:], strict=False))
    return (f'<vm xmlns="{DAG_NS}"><nodes><image id="s" name="{image}"/>{"".join(rendered)}</nodes>'
            f"<edges>{edges}</edges></vm>")


def script(body: str, timeout: int = 60) -> str:
    return f'<script timeout="{timeout}">{escape(body)}</script>'


def configure(plant: PlantProcess, vm_id: str, *bodies: str, timeout: int = 60) -> list[Any]:
    """Run ``bodies`` as scripts on ``vm_id``; their runs."""
    return list(plant.service.configureVM(vm_id=vm_id, dag=dag(*(script(b, timeout) for b in bodies))))


#: ``reach ADDRESS COUNT``: ping where the guest has it (tiny's busybox); elsewhere (a minimal Debian has no ping)
#: COUNT TCP connection attempts from python3, an answer (even a refusal) counting as a reply; the same summary.
REACH = r"""reach() {
if command -v ping >/dev/null 2>&1; then ping -c "$2" -W 3 "$1"; else python3 - "$1" "$2" <<'EOF'
import socket, sys
host, count = sys.argv[1], int(sys.argv[2])
answered = 0
for _ in range(count):
    probe = socket.socket()
    probe.settimeout(3)
    try:
        probe.connect((host, 9))
        answered += 1
    except ConnectionRefusedError:
        answered += 1
    except OSError:
        pass
    finally:
        probe.close()
print(f"{count} probes, {answered} answered, {100 * (count - answered) // count}% packet loss (TCP, no ping here)")
EOF
fi
}
"""
#: Sends a signal (``$1``) to every qemu-ga of the guest, with neither killall nor pkill (busybox and Debian alike).
SIGNAL_AGENT = r"""signal_agent() {
for p in /proc/[0-9]*; do [ "$(cat "$p/comm" 2>/dev/null)" = qemu-ga ] && kill "$1" "${p#/proc/}"; done; :
}
"""


def digest(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        return f"unreadable: {exc.strerror}"


@dataclass
class Host:
    """What the attacks must not touch: canary files (and the directories holding them) and a secret."""

    secret: str
    secret_dir: Path
    canaries: list[Path]
    before: dict[str, str] = field(default_factory=dict)

    def snapshot(self) -> dict[str, str]:
        found = {str(path): digest(path) for path in self.canaries}
        for directory in {path.parent for path in self.canaries} | {self.secret_dir}:
            found[f"{directory}/"] = " ".join(sorted(p.name for p in directory.iterdir()))
        return found


@dataclass
class Lab:
    plant: PlantProcess
    host: Host
    vms: dict[str, Any]
    outputs: list[str] = field(default_factory=list)

    def rss(self) -> int:
        assert self.plant.process is not None
        for line in Path(f"/proc/{self.plant.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")


class Watch:
    """Asks the plant for plantInfo over and over while an attack runs; the slowest answer and any failure."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.slowest = 0.0
        self.errors: list[str] = []
        self.asked = 0
        self.stopping = threading.Event()
        self.rss_before = lab.rss()
        self.rss_most = self.rss_before
        # A client of its own (zeep clients are not shared across threads), with a short timeout (and, where the
        # plant speaks TLS, the tests' admin certificate).
        self.service = lab.plant.service_as("admin", timeout=10)
        self.thread = threading.Thread(target=self._ask, daemon=True)

    def _ask(self) -> None:
        while not self.stopping.is_set():
            started = time.monotonic()
            try:
                self.service.plantInfo()
            except Exception as exc:  # noqa: BLE001 - reported by the test
                self.errors.append(repr(exc)[:200])
            self.slowest = max(self.slowest, time.monotonic() - started)
            self.asked += 1
            self.rss_most = max(self.rss_most, self.lab.rss())
            self.stopping.wait(0.2)

    def __enter__(self) -> Watch:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.thread.join(30)


def unharmed(lab: Lab, watch: Watch | None = None) -> None:
    """The promises of the module docstring."""
    assert lab.host.snapshot() == lab.host.before, "a host file outside the VM's run directory changed"
    log = lab.plant.output()
    for text in [*lab.outputs, log]:
        assert lab.host.secret not in text, "the host's secret reached a guest or the plant's log"
    assert "Traceback" not in log, log[-3000:]
    for path in lab.plant.state_dir.rglob("*"):
        try:
            mode = path.lstat().st_mode
        except FileNotFoundError:
            continue
        assert not mode & (stat.S_ISUID | stat.S_ISGID) or stat.S_ISDIR(mode), f"{path} is set-uid/gid"
        assert not (stat.S_ISDIR(mode) and mode & stat.S_IWOTH), f"{path} is a world-writable directory"
    if watch is not None:
        assert watch.errors == [], watch.errors
        assert watch.asked > 0
        assert watch.slowest < MAX_INFO_SECONDS, f"plantInfo took {watch.slowest:.2f} s during the attack"
        grown = watch.rss_most - watch.rss_before
        assert grown < MAX_RSS_GROWTH, f"the plant's RSS grew by {grown / 2**20:.0f} MiB"


@contextlib.contextmanager
def hostile_lab(base: Path, warehouse_dir: Path, guests: tuple[tuple[str, ...], ...], datastore: Path,
                backend: str = "qemu", backend_options: dict[str, str] | None = None,
                capacity_memory: int = 1024) -> Iterator[Lab]:
    """A plant on ``backend`` with a data store in ``datastore`` and one real guest per (name, owner[, image]) of
    ``guests`` (image "tiny" unless named), created at once.

    Shared by this module and its siblings for other backends (``test_hostile_guest_libvirt.py``) and
    images (``test_hostile_guest_debian.py``).
    """
    data = datastore / "appdata"
    data.mkdir(parents=True)
    (data / "input.txt").write_text("application data\n")
    os.chmod(datastore, 0o755)
    os.chmod(data, 0o755)
    os.chmod(data / "input.txt", 0o644)
    secret = "vmshop-secret-" + secrets.token_hex(16)
    secret_dir = Path("/root") / f".vmshop-hostile-{secrets.token_hex(4)}"
    secret_dir.mkdir(mode=0o700)
    (secret_dir / "secret").write_text(secret + "\n")
    plant = start_plant(base / "plant", warehouse_dir, capacity_vms=3, capacity_memory=capacity_memory,
                        datastore=datastore, watch_interval=1, backend=backend, backend_options=backend_options)
    images = sorted({guest[2] if len(guest) > 2 else "tiny" for guest in guests})
    canaries = [secret_dir / "secret", data / "input.txt", plant.config, warehouse_dir / "index.txt",
                *(path for image in images for path in sorted((warehouse_dir / image).glob("*"))), Path("/etc/passwd")]
    host = Host(secret, secret_dir, [path for path in canaries if path.is_file()])
    host.before = host.snapshot()
    made: dict[str, Any] = {}
    try:
        def create(guest: tuple[str, ...]) -> Any:
            name, owner, image = guest[0], guest[1], guest[2] if len(guest) > 2 else "tiny"
            # A Debian guest's first boot under TCG takes minutes on a host busy with other work.
            return plant.service_as("admin", timeout=900).createVM(
                dag=dag(script("true"), network=True, image=image), owner=owner, vm_id=f"hg-{name}").vm

        # At once: a Debian guest's first boot is long, and the guests' boots overlap.
        with ThreadPoolExecutor(len(guests)) as pool:
            for guest, vm in zip(guests, pool.map(create, guests), strict=True):
                made[guest[0]] = vm
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


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, warehouse_dir: Path) -> Iterator[Lab]:
    base = tmp_path_factory.mktemp("hostile-guest")
    with hostile_lab(base, warehouse_dir, (("m1", "mallory"), ("a1", "alice"), ("a2", "alice")),
                     base / "data") as made:
        yield made


# Links, devices and FIFOs wherever the guest can write --------------------------------------
def test_links_devices_and_fifos_lead_nowhere(lab: Lab) -> None:
    secret_path = lab.host.secret_dir / "secret"
    attack = f"""
for d in / /tmp /run /root /mnt /var/log; do
  ln -sf {secret_path} "$d/output" 2>/dev/null; ln -sf /dev/zero "$d/status" 2>/dev/null
  ln -sf /dev/ptmx "$d/done" 2>/dev/null; mkfifo "$d/ready" 2>/dev/null; ln -sfn / "$d/actions" 2>/dev/null
done
mkdir -p /mnt/d; mount -t 9p -o trans=virtio,version=9p2000.L,ro vmdata /mnt/d 2>&1
ln -s {secret_path} /mnt/d/appdata/leak 2>&1; echo planted > /mnt/d/appdata/input.txt 2>&1
mkfifo /mnt/d/appdata/fifo 2>&1; umount /mnt/d
cat {secret_path} 2>&1; ls {lab.host.secret_dir} 2>&1
# the old channel's names, in the place the old share was mounted
mkdir -p /vmshop/actions /vmshop/agent; ln -sf {secret_path} /vmshop/agent/ready; echo done
"""
    with Watch(lab) as watch:
        runs = configure(lab.plant, lab.vms["m1"].vm_id, attack)
        # The next actions, on the attacker and on its neighbour, run as usual: nothing the guest made is followed.
        runs += configure(lab.plant, lab.vms["m1"].vm_id, "echo after")
        runs += configure(lab.plant, lab.vms["a1"].vm_id, "echo neighbour")
    lab.outputs += [run.output for run in runs]
    assert runs[0].ok and "Read-only file system" in runs[0].output and "No such file" in runs[0].output
    assert [run.output for run in runs[1:]] == ["after\n", "neighbour\n"]
    unharmed(lab, watch)


# Set-uid files ---------------------------------------------------------------------------------
def test_set_uid_files_stay_in_the_guest(lab: Lab) -> None:
    runs = configure(lab.plant, lab.vms["m1"].vm_id,
                     "cp \"$(readlink -f /bin/sh)\" /tmp/rootsh && chmod 4755 /tmp/rootsh && ls -l /tmp/rootsh; "
                     "mkdir -p /mnt/d; mount -t 9p -o trans=virtio,version=9p2000.L,ro vmdata /mnt/d; "
                     "chmod 4755 /mnt/d/appdata/input.txt 2>&1; cp /tmp/rootsh /mnt/d/appdata/ 2>&1; umount /mnt/d")
    lab.outputs += [run.output for run in runs]
    assert runs[0].ok and "rwsr-xr-x" in runs[0].output and "Read-only" in runs[0].output
    unharmed(lab)


# Floods ----------------------------------------------------------------------------------------
def test_a_flood_of_output_is_cut_in_the_guest(lab: Lab) -> None:
    with Watch(lab) as watch:
        runs = configure(lab.plant, lab.vms["m1"].vm_id,
                         "head -c 64000000 /dev/zero | tr '\\0' x; echo; echo FLOOD-END; exit 0", timeout=300)
    lab.outputs += [run.output for run in runs]
    assert runs[0].ok and runs[0].output.startswith("x" * 65536) and "output cut" in runs[0].output
    assert len(runs[0].output) < 70000
    unharmed(lab, watch)


def test_a_flood_on_the_console_is_bounded(lab: Lab) -> None:
    run_dir = lab.plant.state_dir / "run" / lab.vms["m1"].vm_id
    with Watch(lab) as watch:
        configure(lab.plant, lab.vms["m1"].vm_id, "head -c 3000000 /dev/zero | tr '\\0' c > /dev/console; echo ok",
                  timeout=300)
    logs = [run_dir / "console.log", run_dir / "console.log.1"]
    assert sum(path.stat().st_size for path in logs if path.exists()) <= 2 * 256 * 1024
    unharmed(lab, watch)


# Renames and links in a tight loop while the plant configures ---------------------------------------
def test_renaming_and_linking_in_a_loop_while_the_plant_configures(lab: Lab) -> None:
    loop = ("(end=$(( $(cut -d. -f1 /proc/uptime) + 20 )); while [ $(cut -d. -f1 /proc/uptime) -lt $end ]; do "
            "for d in /tmp /run /; do mkdir -p $d/x; mv $d/x $d/y 2>/dev/null; ln -sfn / $d/x; ln -sfn /dev/zero "
            "$d/y/status 2>/dev/null; rm -rf $d/y; done; done) </dev/null >/dev/null 2>&1 &")
    file_action = '<file path="/etc/app.conf" mode="0600">key=value</file>'
    vm_id = lab.vms["m1"].vm_id
    with Watch(lab) as watch:
        configure(lab.plant, vm_id, loop)
        for round_ in range(5):
            runs = list(lab.plant.service.configureVM(
                vm_id=vm_id, dag=dag(file_action.replace("value", f"v{round_}"), script("cat /etc/app.conf"))))
            lab.outputs += [run.output for run in runs]
            assert runs[-1].output == f"key=v{round_}\n"
    unharmed(lab, watch)


# Neighbours ------------------------------------------------------------------------------------
def test_another_owners_guest_is_out_of_reach_and_an_owners_own_are_not(lab: Lab) -> None:
    m1, a1, a2 = (lab.vms[name] for name in ("m1", "a1", "a2"))
    assert len({m1.address, a1.address, a2.address}) == 3
    runs = configure(lab.plant, a2.vm_id, f"{REACH}reach {a1.address} 2")
    assert " 0% packet loss" in runs[0].output, runs[0].output  # alice's two guests share her segment
    runs = configure(lab.plant, m1.vm_id, f"{REACH}reach {a1.address} 2; reach {a2.address} 2; exit 0")
    assert runs[0].output.count("100% packet loss") == 2, runs[0].output  # mallory's reaches neither


def test_spoofing_a_neighbours_address_is_refused_and_harmless(lab: Lab) -> None:
    m1, a1, a2 = (lab.vms[name] for name in ("m1", "a1", "a2"))
    # Through the plant: a static address that is not the VM's lease is refused, and nothing changes.
    spoof = f'<network mode="static" address="{a1.address}"/>'
    with pytest.raises(zeep.exceptions.Fault) as info:
        lab.plant.service.configureVM(vm_id=m1.vm_id, dag=dag(spoof))
    assert fault_code(info) == "Client.AddressNotLeased" and a1.address in info.value.message
    with pytest.raises(zeep.exceptions.Fault) as info:
        lab.plant.service.createVM(dag=dag(spoof), owner="mallory")
    assert fault_code(info) == "Client.AddressNotLeased"
    # By hand, as root in its own guest: mallory takes alice's address and shouts it on her segment...
    configure(lab.plant, m1.vm_id,
              f"{REACH}for n in /sys/class/net/*; do [ ${{n##*/}} = lo ] && continue; "
              f"ip addr add {a1.address}/24 dev ${{n##*/}} 2>/dev/null; "
              f"arping -U -c 3 -I ${{n##*/}} {a1.address} 2>&1; done; reach {a2.address} 2; exit 0")
    # ...and alice's guests still find each other, the real owner of the address answering.
    runs = configure(lab.plant, a2.vm_id, f"{REACH}reach {a1.address} 3")
    assert " 0% packet loss" in runs[0].output, runs[0].output
    unharmed(lab)


# A guest that replaces its agent ------------------------------------------------------------------
#: A script that replaces the guest's qemu-ga by a program answering random bytes (0xFF and newlines among them);
#: the guest's init (tiny's respawn, Debian's systemd Restart=always) starts it in qemu-ga's place.
FLOOD_AGENT = (SIGNAL_AGENT + "printf '#!/bin/sh\\nexec cat /dev/urandom "
               ">\"${4:-/dev/virtio-ports/org.qemu.guest_agent.0}\"\\n' > /usr/sbin/fake-ga && "
               "chmod 755 /usr/sbin/fake-ga && mv /usr/sbin/fake-ga /usr/sbin/qemu-ga && "
               "signal_agent -KILL; sleep 5")


def agent_flood_attack(lab: Lab, attacker: str, neighbour: str) -> None:
    """The attacker's guest replaces its agent with a flood: its own actions fail, in bounded time, and only its."""
    vm_id = lab.vms[attacker].vm_id
    with Watch(lab) as watch:
        started = time.monotonic()
        for body in (FLOOD_AGENT, "echo never"):
            with pytest.raises(zeep.exceptions.Fault) as info:
                configure(lab.plant, vm_id, body, timeout=10)
            assert fault_code(info) == "Server.ActionFailed" and "agent" in info.value.message, info.value.message
        took = time.monotonic() - started
        neighbour_runs = configure(lab.plant, lab.vms[neighbour].vm_id, "echo fine")
    assert took < 2 * (10 + 15) + 10
    assert neighbour_runs[0].output == "fine\n"
    assert lab.plant.service.describeVM(vm_id=vm_id).state == "running"
    unharmed(lab, watch)


def mute_agent_attack(lab: Lab, victim: str) -> None:
    """The guest stops its agent in the middle of an action: the plant waits out the deadline, no longer."""
    vm_id = lab.vms[victim].vm_id
    with Watch(lab) as watch:
        started = time.monotonic()
        with pytest.raises(zeep.exceptions.Fault) as info:
            configure(lab.plant, vm_id, SIGNAL_AGENT + "signal_agent -STOP; sleep 60", timeout=3)
        took = time.monotonic() - started
    assert fault_code(info) == "Server.ActionFailed", info.value.message
    assert took < 3 + 15 + 10, f"the plant waited {took:.0f} s on a mute agent"
    unharmed(lab, watch)


def test_an_agent_that_floods_its_channel_fails_that_vms_actions_only(lab: Lab) -> None:
    agent_flood_attack(lab, "m1", "a1")


def test_a_mute_agent_holds_nothing_past_the_deadline(lab: Lab) -> None:
    mute_agent_attack(lab, "a2")


def test_collecting_the_attackers_leaves_nothing(lab: Lab) -> None:
    for name in ("m1", "a2"):
        vm_id = lab.vms[name].vm_id
        assert lab.plant.service.collectVM(vm_id=vm_id).state == "collected"
        assert not (lab.plant.state_dir / "run" / vm_id).exists()
        assert not (lab.plant.state_dir / "overlays" / f"{vm_id}.qcow2").exists()
    wait_for(lambda: processes_mentioning(str(lab.plant.state_dir / "run")) and
             len(processes_mentioning(str(lab.plant.state_dir / "run"))) == 1, what="only a1's QEMU to be left")
    unharmed(lab)
