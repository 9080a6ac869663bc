"""Real shop and plant processes (fake backend) stopped and signalled: SIGTERM within the grace, SIGHUP any time.

A server stopped with SIGTERM stops accepting at once, lets requests in progress finish within its grace
(``<shutdown grace>``, short here), answers the ones left ``Server.ShuttingDown`` and exits, never later
than the grace plus :data:`~vmshop_common.lifecycle.AFTER_GRACE` and some slack for a loaded machine
(:data:`SLACK`). A plant holding a create in the middle of its actions exits on time too (the thread
doing it is abandoned); its guests keep running and the next start re-adopts them. SIGHUP sent the
moment a server says it listens is handled (it re-reads its files), never fatal. One test (``guest``) does
the plant's case with real QEMU guests. Every wait polls with a deadline; nothing sleeps.
"""

from __future__ import annotations

import concurrent.futures
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import zeep.exceptions
from servers import ServerProcess, fault_code, host_port, start_plant, start_shop, wait_for

from vmshop_common.dagxml import DAG_NS
from vmshop_common.lifecycle import AFTER_GRACE

pytestmark = pytest.mark.integration

GRACE = 2.0
#: Seconds a loaded machine may add to a stop (process exit, the test's own polling).
SLACK = 10.0


def image_dag(script: str | None = None, timeout: int = 600) -> str:
    """A VM of the image 'tiny', with one script action if ``script`` is given."""
    action = f'<script id="run" timeout="{timeout}">{script}</script>' if script else ""
    edge = '<edge from="s" to="run"/>' if script else ""
    return f'<vm xmlns="{DAG_NS}"><nodes><image id="s" name="tiny"/>{action}</nodes><edges>{edge}</edges></vm>'


HANGING = image_dag("echo FAKE_HANG")  # the fake guest runs this action until its timeout (600 s)


def stopped_in(server: ServerProcess, sig: int = signal.SIGTERM, limit: float = GRACE + AFTER_GRACE + SLACK) -> float:
    """Send ``sig`` and wait (at most ``limit`` s) for the process to exit with status 0; the seconds it took."""
    process = server.process
    assert process is not None
    started = time.monotonic()
    process.send_signal(sig)
    try:
        status = process.wait(limit)
    except Exception:
        process.kill()
        process.wait(30)
        raise AssertionError(f"no exit within {limit} s of signal {sig}:\n{server.output()[-3000:]}") from None
    server.process = None
    assert status == 0, server.output()[-3000:]
    return time.monotonic() - started


def clean(log: str) -> None:
    assert "Traceback" not in log, log[-3000:]
    assert "Producer was not unregistered" not in log
    assert "Unhandled error" not in log


@pytest.fixture
def plant(tmp_path: Path, warehouse_dir: Path) -> Iterator[ServerProcess]:
    server = start_plant(tmp_path / "plant", warehouse_dir, backend="fake", network="none", shutdown_grace=GRACE)
    try:
        yield server
    finally:
        server.cleanup()


def plant_state(plant: ServerProcess, vm_id: str) -> str | None:
    vms = plant.service.listVMs(include_collected=True) or []
    return next((vm.state for vm in vms if vm.vm_id == vm_id), None)


def test_a_plant_stopped_in_the_middle_of_a_create_exits_within_its_grace_and_readopts_its_guests(
        plant: ServerProcess) -> None:
    kept = plant.service.createVM(dag=image_dag(), owner="alice", vm_id="kept").vm
    assert kept.state == "running"
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        hanging = pool.submit(plant.service_as("admin", timeout=120).createVM, dag=HANGING, owner="alice",
                              vm_id="hanging")
        wait_for(lambda: plant_state(plant, "hanging") == "configuring", 60, "the create to run its action")
        took = stopped_in(plant)
        with pytest.raises(zeep.exceptions.Fault) as info:
            hanging.result(30)
    assert fault_code(info) == "Server.ShuttingDown"
    assert took >= GRACE - 0.5  # it gave the create its grace...
    log = plant.output()
    assert "abandoning createVM 'hanging'" in log  # ...then left it to the process's exit
    clean(log)

    plant.start()  # the same state directory and port
    plant.client()
    assert plant_state(plant, "kept") == "running"  # the guest ran on and was re-adopted
    assert plant.service.describeVM(vm_id="kept").state == "running"
    assert plant_state(plant, "hanging") not in ("booting", "configuring")  # never left half-made
    assert plant.service.collectVM(vm_id="kept").state == "collected"
    clean(plant.output())


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_plant_stopped_while_idle_exits_at_once(plant: ServerProcess, sig: int) -> None:
    assert stopped_in(plant, sig) < GRACE
    assert "vmplant stopped" in plant.output()


def test_a_second_sigterm_ends_the_grace_at_once(tmp_path: Path, warehouse_dir: Path) -> None:
    plant = start_plant(tmp_path / "plant", warehouse_dir, backend="fake", network="none", shutdown_grace=600)
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            hanging = pool.submit(plant.service_as("admin", timeout=120).createVM, dag=HANGING, owner="alice",
                                  vm_id="hanging")
            wait_for(lambda: plant_state(plant, "hanging") == "configuring", 60, "the create to run its action")
            process = plant.process
            assert process is not None
            process.send_signal(signal.SIGTERM)
            wait_for(lambda: "stopping (requests in progress have 600 s)" in plant.output(), 30, "the stop to begin")
            took = stopped_in(plant, limit=AFTER_GRACE * 2 + SLACK)  # not the 600 s
            with pytest.raises(zeep.exceptions.Fault) as info:
                hanging.result(30)
        assert fault_code(info) == "Server.ShuttingDown" and took < AFTER_GRACE * 2 + SLACK
        assert "again: the grace ends now" in plant.output()
    finally:
        plant.cleanup()


@pytest.fixture
def shop_and_plant(tmp_path: Path, warehouse_dir: Path) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    plant = start_plant(tmp_path / "plant", warehouse_dir, backend="fake", network="none",
                        backend_options={"boot_seconds": "1"}, shutdown_grace=GRACE, capacity_vms=16)
    shop = None
    try:
        shop = start_shop(tmp_path / "shop", [host_port(plant)], flags=["--shutdown-grace", str(GRACE * 4)])
        yield shop, plant
    finally:
        for server in (shop, plant):
            if server is not None:
                server.cleanup()


def registry_states(shop: ServerProcess) -> dict[str, str]:
    return {vm.vm_id: vm.state for vm in shop.service.queryVMs(query="") or []}


def test_a_shop_stopped_during_a_create_lets_it_finish_within_the_grace(
        shop_and_plant: tuple[ServerProcess, ServerProcess]) -> None:
    shop, plant = shop_and_plant
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        made = pool.submit(shop.service_as("alice", timeout=120).createVM, dag=image_dag(), vm_key="finishing")
        wait_for(lambda: plant_state(plant, "finishing") == "booting", 60, "the create to reach the plant")
        took = stopped_in(shop)
        assert made.result(30).vm.state == "running"  # answered, not cancelled
    assert took < GRACE * 4  # it did not wait for the whole grace once nothing was left
    clean(shop.output())
    shop.start()
    shop.client()
    assert registry_states(shop)["finishing"] == "running"


def test_a_shop_stopped_during_a_long_create_cancels_it_at_the_end_of_its_grace_and_takes_nothing_new(
        tmp_path: Path, warehouse_dir: Path) -> None:
    plant = start_plant(tmp_path / "plant", warehouse_dir, backend="fake", network="none", shutdown_grace=GRACE)
    shop = None
    try:
        shop = start_shop(tmp_path / "shop", [host_port(plant)], flags=["--shutdown-grace", str(GRACE)])
        url = shop.url
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            made = pool.submit(shop.service_as("alice", timeout=120).createVM, dag=HANGING, vm_key="long")
            wait_for(lambda: plant_state(plant, "long") == "configuring", 60, "the create to run its action")
            process = shop.process
            assert process is not None
            started = time.monotonic()
            process.send_signal(signal.SIGTERM)
            # At once: no new connection is taken.
            wait_for(lambda: refused(url), GRACE, "the shop to stop accepting")
            with pytest.raises(zeep.exceptions.Fault) as info:
                made.result(GRACE + AFTER_GRACE + SLACK)
            assert fault_code(info) == "Server.ShuttingDown"
            assert time.monotonic() - started >= GRACE - 0.5
            process.wait(AFTER_GRACE + SLACK)
            assert process.returncode == 0
            shop.process = None
        clean(shop.output())
        shop.start()
        shop.client()
        # The cancelled create left no entry being made behind it.
        wait_for(lambda: registry_states(shop).get("long") not in ("placing", "creating"), 30,
                 "the entry to be resolved")
        clean(shop.output())
    finally:
        for server in (shop, plant):
            if server is not None:
                server.cleanup()


def refused(url: str) -> bool:
    """Whether a new TCP connection to the server at ``url`` is refused."""
    host, _, port = url.split("://", 1)[1].rstrip("/").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
    except (ConnectionRefusedError, ConnectionResetError):
        return True  # reset: the connection reached the backlog of a listener that closed meanwhile
    return False


def test_a_shop_stopped_during_a_collect_burst_logs_no_error(
        shop_and_plant: tuple[ServerProcess, ServerProcess]) -> None:
    """The issue's 'RuntimeError: Producer was not unregistered' came from a shop stopped in a collect burst."""
    shop, _ = shop_and_plant
    keys = [f"burst-{i}" for i in range(12)]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        for made in pool.map(lambda k: shop.service_as("alice", timeout=120).createVM(dag=image_dag(), vm_key=k),
                             keys):
            assert made.vm.state == "running"
        service = shop.service_as("alice", timeout=120)
        collects = [pool.submit(service.collectVM, vm={"Address": shop.url, "VMKey": key}) for key in keys]
        wait_for(lambda: any(c.done() for c in collects), 60, "the first collect")
        stopped_in(shop, limit=GRACE * 4 + AFTER_GRACE + SLACK)
        outcomes = [outcome(c) for c in collects]
    assert set(outcomes) <= {"collected", "Server.ShuttingDown", "connection"}, outcomes
    clean(shop.output())


def outcome(future: concurrent.futures.Future[Any]) -> str:
    try:
        return str(future.result(60).state)
    except zeep.exceptions.Fault as fault:
        return str(fault.code).split(":", 1)[-1]
    except requests.exceptions.ConnectionError:
        return "connection"


@pytest.mark.parametrize("which", ["shop", "plant"])
def test_sighup_the_moment_a_server_listens_is_handled(tmp_path: Path, warehouse_dir: Path, which: str) -> None:
    """The shop printed 'listening' before it handled SIGHUP, whose default action ended it."""
    plant = start_plant(tmp_path / "plant", warehouse_dir, backend="fake", network="none")
    servers = [plant]
    try:
        server = plant
        if which == "shop":
            server = start_shop(tmp_path / "shop", [host_port(plant)])
            servers.append(server)
        server.stop()
        offset = server.log.stat().st_size
        server.start(on_listening=lambda process: process.send_signal(signal.SIGHUP))
        assert server.process is not None
        for _ in range(3):
            server.process.send_signal(signal.SIGHUP)
        server.client()
        if which == "shop":
            assert server.service.listPlants()[0].up is True
        else:
            assert server.service.plantInfo().name == "plant1"
        reloaded = "authorisation file"
        wait_for(lambda: server.log.read_bytes()[offset:].decode(errors="replace").count(reloaded) >= 1, 30,
                 "the reload to be logged")
        assert server.process.poll() is None
        clean(server.output())
    finally:
        for started in reversed(servers):
            started.cleanup()


@pytest.mark.guest
def test_a_real_plant_stopped_in_the_middle_of_a_create_exits_on_time_and_readopts_its_running_guest(
        guest_tmp: Path, warehouse_dir: Path, tiny_image: Any) -> None:
    """The same with real QEMU guests: the create's thread waits on a guest action of 600 s when SIGTERM comes."""
    plant = start_plant(Path(guest_tmp) / "plant", warehouse_dir, name="real", network="none", shutdown_grace=GRACE)
    try:
        kept = plant.service.createVM(dag=image_dag("echo up"), owner="alice", vm_id="kept").vm
        assert kept.state == "running"
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            hanging = pool.submit(plant.service_as("admin", timeout=600).createVM, dag=image_dag("sleep 600"),
                                  owner="alice", vm_id="hanging")
            wait_for(lambda: plant_state(plant, "hanging") == "configuring", 300, "the create to run its action")
            took = stopped_in(plant)
            with pytest.raises(zeep.exceptions.Fault) as info:
                hanging.result(30)
        assert fault_code(info) == "Server.ShuttingDown" and took < GRACE + AFTER_GRACE + SLACK
        clean(plant.output())

        plant.start()
        plant.client()
        assert plant_state(plant, "kept") == "running"
        runs = plant.service.configureVM(vm_id="kept", dag=image_dag("echo still here"))
        assert [run.output.strip() for run in runs] == ["still here"]  # the same guest, re-adopted
        assert plant_state(plant, "hanging") not in ("booting", "configuring")
        for vm_id in ("kept", "hanging"):
            if plant_state(plant, vm_id) == "running":
                assert plant.service.collectVM(vm_id=vm_id).state == "collected"
        clean(plant.output())
    finally:
        plant.cleanup()


def test_a_second_shop_on_one_sqlite_registry_is_refused_and_a_killed_shop_restarts_on_it(
        tmp_path: Path, plant: ServerProcess) -> None:
    """Two shops on one SQLite file would each keep query answers the other's writes made stale: the second
    one stops at start with a message naming the registry and the first one's pid. SIGKILL drops the hold."""
    shop = start_shop(tmp_path / "shop", [host_port(plant)])
    try:
        assert shop.process is not None
        second = subprocess.run(
            [sys.executable, "-m", "vmshop_service.main", "--config", str(shop.config), "--port", "0"],
            capture_output=True, text=True, timeout=120, cwd=str(shop.directory))
        words = second.stdout + second.stderr
        assert second.returncode != 0, words
        assert f"is in use by another shop (pid {shop.process.pid})" in words, words
        assert "Traceback" not in words, words
        shop.process.kill()
        shop.process.wait(30)
        shop.start()  # the kernel dropped the dead shop's hold
        shop.client()
        assert not shop.service.queryVMs(query="", limit=None)  # it answers, on the same file
    finally:
        shop.cleanup()
