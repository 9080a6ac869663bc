"""The backend contract (rules 1-9 of ``vmplant_service/backends/base.py``), checked on every backend.

Each backend is one line of :data:`CASES`. Real guests are shared: the
class-scoped :class:`GuestPool` boots a guest only when the previous one
was stopped or destroyed, so the whole class boots two per real backend.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
from conftest import SpecFactory, processes_naming

from vmplant_service.agent.qga import GuestAgent
from vmplant_service.backends import BACKENDS, backend_class, load_backend
from vmplant_service.backends.base import Backend, GuestSpec, Nic, VMState
from vmplant_service.channel import MAX_OUTPUT, ActionContext, ActionResult, Channel
from vmplant_service.clone import make_overlay
from vmplant_service.segment import mac_for
from vmshop_common.dag import ScriptAction
from vmshop_common.errors import BackendError, ConfigurationError, NotSupportedError

#: Seconds a guest may take to boot to its agent (TCG on a loaded 2-core host included).
BOOT_TIMEOUT = 120.0
ACTION_TIMEOUT = 30


def _garbage_kernel(spec: GuestSpec, where: Path) -> GuestSpec:
    """A spec QEMU accepts at first and fails on late: its kernel is not a kernel."""
    kernel = where / "not-a-kernel"
    kernel.write_bytes(b"this is not a kernel\n" * 100)
    return replace(spec, kernel=kernel)


@dataclass(frozen=True)
class Case:
    """How to run the contract on one backend."""

    name: str
    #: Options for the backend, given the session's accelerator-probe directory.
    options: Callable[[Path], dict[str, str]]
    #: The registered backend that fails ``start`` with ``break_spec(spec)``.
    failing: str
    break_spec: Callable[[GuestSpec, Path], GuestSpec] = lambda spec, where: spec
    #: Whether actions really run (so their output is the program's own).
    real_actions: bool = False
    #: Whether it boots real guests (marked ``guest``, needs the image).
    guest: bool = False


CASES = [
    Case("fake", lambda state: {"boot_seconds": "0.05"}, failing="fake-failstart"),
    Case("qemu", lambda state: {"accel": "auto", "state_dir": str(state)}, failing="qemu",
         break_spec=_garbage_kernel, real_actions=True, guest=True),
    Case("libvirt", lambda state: {"uri": "qemu:///system", "daemon": "spawn", "daemon_timeout": "10"},
         failing="libvirt", break_spec=_garbage_kernel, real_actions=True, guest=True),
    Case("uml", lambda state: {"state_dir": str(state)}, failing="uml", real_actions=True, guest=True,
         break_spec=lambda spec, where: (Path(spec.disk).write_bytes(b"QFI\xfb" + bytes(508)), spec)[1]),
]


def leftovers(spec: GuestSpec, settle: float = 5.0) -> list[str]:
    """Whatever still runs for ``spec``: processes naming its disk or run directory, fake agent threads.

    Fake guests of another backend instance (a "plant restart" in a test) notice within a moment that
    they were taken over and end on their own: they get ``settle`` seconds to do so.
    """
    deadline = time.monotonic() + settle
    while True:
        found = [args for _, args in processes_naming(str(Path(spec.disk).absolute()))]
        found += [args for _, args in processes_naming(str(Path(spec.run_dir).absolute()))]
        found += [t.name for t in threading.enumerate()
                  if t.name.startswith((f"fake-guest-{spec.vm_id}-", f"fake-qga-{spec.vm_id}-"))]
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def files_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


@dataclass
class GuestPool:
    """Running guests of one backend, shared by the tests of a class."""

    case: Case
    backend: Backend
    specs: SpecFactory
    started: list[GuestSpec] = field(default_factory=list)
    boot_seconds: list[float] = field(default_factory=list)

    def new_spec(self) -> GuestSpec:
        return self.specs.new(self.case.name, nics=(Nic("user", mac_for(f"{self.case.name}-x", 0)),))

    def running(self) -> tuple[GuestSpec, Channel]:
        """A guest that runs and whose agent is ready (booting one only if none does)."""
        for spec in reversed(self.started):
            if self.backend.state(spec.vm_id) == VMState.RUNNING:
                return spec, channel_of(self.backend, spec)
        spec = self.new_spec()
        started = time.monotonic()
        self.backend.start(spec)
        self.started.append(spec)
        channel = channel_of(self.backend, spec)
        channel.wait_agent(BOOT_TIMEOUT, alive=lambda: self.backend.state(spec.vm_id) == VMState.RUNNING)
        self.boot_seconds.append(time.monotonic() - started)
        return spec, channel

    def take(self) -> tuple[GuestSpec, Channel]:
        """A running guest that the caller will stop or destroy (the next test boots another)."""
        return self.running()

    def cleanup(self) -> None:
        for spec in self.started:
            self.backend.destroy(spec.vm_id)


def channel_of(backend: Backend, spec: GuestSpec) -> Channel:
    return Channel(GuestAgent(backend.agent(spec.vm_id)))


def run(channel: Channel, body: str, node_id: str = "a", timeout: int = ACTION_TIMEOUT) -> ActionResult:
    return channel.run(f"0001-{node_id}", ScriptAction(id=node_id, body=body, script_timeout=timeout),
                       ActionContext())


@pytest.fixture(scope="class", params=[
    pytest.param(case, id=case.name, marks=[pytest.mark.guest] if case.guest else []) for case in CASES])
def case(request: pytest.FixtureRequest) -> Case:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture(scope="class")
def specs(case: Case, request: pytest.FixtureRequest) -> SpecFactory:
    return request.getfixturevalue("guest_specs" if case.guest else "fake_specs")  # type: ignore[no-any-return]


@pytest.fixture(scope="class")
def options(case: Case, request: pytest.FixtureRequest) -> dict[str, str]:
    state = request.getfixturevalue("accel_state_dir") if case.guest else Path("/nonexistent")
    return case.options(state)


@pytest.fixture(scope="class")
def backend(case: Case, options: dict[str, str]) -> Iterator[Backend]:
    instance = load_backend(case.name, options)
    yield instance
    instance.close()


@pytest.fixture(scope="class")
def pool(case: Case, backend: Backend, specs: SpecFactory) -> Iterator[GuestPool]:
    guests = GuestPool(case, backend, specs)
    try:
        yield guests
    finally:
        guests.cleanup()
        left = [item for spec in guests.started for item in leftovers(spec)]
        assert not left, f"left running after the class: {left}"


class TestContract:
    def test_capabilities(self, backend: Backend, case: Case) -> None:
        caps = backend.capabilities()
        assert caps.name == case.name and caps.available, caps.reason
        assert "x86_64" in caps.architectures
        assert {"user", "segment"} <= set(caps.networks)
        assert caps.max_memory >= 128 and caps.max_vcpus >= 1
        assert caps.channel

    def test_saved_states(self, backend: Backend, pool: GuestPool, tmp_path: Path) -> None:
        """Rule 12: a backend that resumes saves a paused guest's state into a file the caller opened, lets the
        guest run on, and starts a clone from that state (an overlay of the saved disk); one that cannot says so
        in its capabilities and refuses each call."""
        if not backend.capabilities().resume:
            spec = pool.new_spec()
            for call in (lambda: backend.machine_model(spec), lambda: backend.save_state(spec.vm_id, 0),
                         lambda: backend.restore(spec, 0)):
                with pytest.raises(NotSupportedError):
                    call()
            return
        spec, channel = pool.running()
        model = backend.machine_model(spec)
        assert backend.machine_model(replace(spec, memory=spec.memory * 2)) != model
        state = tmp_path / "state.bin"
        backend.pause(spec.vm_id)
        try:
            fd = os.open(state, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                backend.save_state(spec.vm_id, fd, 60)
            finally:
                os.close(fd)
            saved_disk = tmp_path / "saved.qcow2"  # the disk of that instant (the guest is still paused)
            shutil.copyfile(spec.disk, saved_disk)
        finally:
            backend.resume(spec.vm_id)
        assert backend.state(spec.vm_id) == VMState.RUNNING
        channel.agent.ping(10)  # the source runs on
        clone = pool.new_spec()
        assert backend.machine_model(clone) == model
        if pool.specs.image is not None:  # (the fake's disks are empty files)
            Path(clone.disk).unlink()
            make_overlay(saved_disk, "qcow2", Path(clone.disk))
        fd = os.open(state, os.O_RDONLY)
        try:
            backend.restore(clone, fd, 60)
        finally:
            os.close(fd)
        try:
            assert backend.state(clone.vm_id) == VMState.RUNNING
            channel_of(backend, clone).wait_agent(30)
        finally:
            backend.destroy(clone.vm_id)
        assert leftovers(clone) == []

    def test_start_runs_and_agent_is_ready(self, pool: GuestPool) -> None:
        spec, channel = pool.running()
        assert pool.backend.state(spec.vm_id) == VMState.RUNNING
        channel.agent.ping(timeout=10)
        assert spec.vm_id in pool.backend.running()

    def test_run_dir_is_private(self, pool: GuestPool) -> None:
        """Rule 9: the VM's run directory is the plant's alone, and nothing in it is readable by others."""
        spec, _ = pool.running()
        run_dir = Path(spec.run_dir)
        assert run_dir.stat().st_mode & 0o077 == 0, oct(run_dir.stat().st_mode)
        for path in run_dir.rglob("*"):
            if not path.is_symlink():
                assert path.stat().st_mode & 0o007 == 0, f"{path} is {oct(path.stat().st_mode)}"

    def test_agent_of_an_unknown_vm(self, backend: Backend) -> None:
        with pytest.raises(BackendError):
            backend.agent("never-heard-of")

    def test_output_flood_is_capped(self, pool: GuestPool, case: Case) -> None:
        """An action printing far more than the cap gets its first MAX_OUTPUT bytes and its own status."""
        _, channel = pool.running()
        result = run(channel, "i=0; while [ $i -lt 40 ]; do head -c 65536 /dev/zero | tr '\\0' x; "
                              "i=$((i+1)); done; exit 7 # FAKE_STATUS=7", "flood")
        assert result.status == 7 and result.error is None
        if case.real_actions:
            assert result.output.startswith("x" * MAX_OUTPUT) and "output cut" in result.output

    def test_starting_a_running_id_again_fails(self, pool: GuestPool) -> None:
        spec, _ = pool.running()
        with pytest.raises(BackendError):
            pool.backend.start(spec)
        assert pool.backend.state(spec.vm_id) == VMState.RUNNING

    def test_action_comes_back_with_output(self, pool: GuestPool, case: Case) -> None:
        _, channel = pool.running()
        result = run(channel, "echo hello", "hello")
        assert result.status == 0 and not result.timed_out
        if case.real_actions:
            assert result.output == "hello\n"
        else:
            assert result.output.startswith("fake: ") and "echo hello" in result.output

    def test_failing_action_reports_its_status(self, pool: GuestPool) -> None:
        _, channel = pool.running()
        result = run(channel, "# FAKE_STATUS=3\nexit 3", "fails")
        assert result.status == 3 and not result.ok

    def test_actions_see_each_others_effects(self, pool: GuestPool, case: Case) -> None:
        _, channel = pool.running()
        first = run(channel, "sleep 0.3; echo first > /tmp/order; echo one", "one")
        second = run(channel, "cat /tmp/order; echo two", "two")
        assert [first.status, second.status] == [0, 0]
        if case.real_actions:
            assert first.output == "one\n" and second.output == "first\ntwo\n"

    def test_unknown_vm(self, backend: Backend) -> None:
        assert backend.state("never-heard-of") in (VMState.UNKNOWN, VMState.STOPPED)
        backend.stop("never-heard-of", timeout=1)
        backend.destroy("never-heard-of")
        backend.destroy("never-heard-of")
        assert "never-heard-of" not in backend.running()

    def test_adopt_from_a_new_instance(self, pool: GuestPool, case: Case, options: dict[str, str]) -> None:
        spec, channel = pool.running()
        restarted = load_backend(case.name, options)  # a plant restart: a new backend, same run dirs
        try:
            assert restarted.running() == []
            assert restarted.adopt(spec) is True
            assert restarted.running() == [spec.vm_id]
            assert restarted.state(spec.vm_id) == VMState.RUNNING
            assert run(channel, "echo adopted", "adopted").status == 0
        finally:
            restarted.close()
        assert pool.backend.adopt(spec) is True  # and back: the original instance controls it again
        assert run(channel_of(pool.backend, spec), "echo back", "back").status == 0

    def test_failed_start_leaves_nothing(self, case: Case, options: dict[str, str], specs: SpecFactory,
                                         guest_tmp: Path) -> None:
        failing = load_backend(case.failing, options)
        spec = case.break_spec(specs.new(f"{case.name}-fail"), guest_tmp)
        with pytest.raises(BackendError):
            failing.start(spec)
        assert leftovers(spec) == []
        assert files_in(spec.run_dir) == []
        assert failing.running() == []
        assert failing.state(spec.vm_id) in (VMState.UNKNOWN, VMState.STOPPED)
        failing.destroy(spec.vm_id)

    def test_start_without_disk_fails_cleanly(self, backend: Backend, specs: SpecFactory, case: Case) -> None:
        spec = specs.new(f"{case.name}-nodisk")
        Path(spec.disk).unlink()
        with pytest.raises(BackendError, match="disk"):
            backend.start(spec)
        assert files_in(spec.run_dir) == [] and leftovers(spec) == []
        assert spec.vm_id not in backend.running()

    def test_pause_and_resume(self, pool: GuestPool, case: Case, options: dict[str, str]) -> None:
        """Rule 11: a backend that can publish pauses a guest (its disk still) and resumes it; a paused guest that a
        new instance adopts (a plant restart cut a publish short) is resumed; the others say they cannot."""
        spec, channel = pool.running()
        if not pool.backend.capabilities().publish:
            with pytest.raises(NotSupportedError):
                pool.backend.pause(spec.vm_id, 10)
            assert pool.backend.state(spec.vm_id) == VMState.RUNNING
            return
        with pytest.raises(BackendError):
            pool.backend.pause("never-heard-of", 5)
        disk = Path(spec.disk)
        pool.backend.pause(spec.vm_id, 10)
        try:
            assert pool.backend.state(spec.vm_id) == VMState.PAUSED
            assert spec.vm_id in pool.backend.running()
            before = disk.read_bytes()
            time.sleep(0.5)
            assert disk.read_bytes() == before, "the disk changed while the guest was paused"
        finally:
            pool.backend.resume(spec.vm_id, 10)
        assert pool.backend.state(spec.vm_id) == VMState.RUNNING
        pool.backend.resume(spec.vm_id, 10)  # again: nothing to do
        assert run(channel, "echo resumed", "resumed").status == 0
        pool.backend.pause(spec.vm_id, 10)
        restarted = load_backend(case.name, options)
        try:
            assert restarted.adopt(spec) is True
            assert restarted.state(spec.vm_id) == VMState.RUNNING
        finally:
            restarted.close()
        assert pool.backend.adopt(spec) is True
        assert run(channel_of(pool.backend, spec), "echo running", "running").status == 0

    def test_stop(self, pool: GuestPool, case: Case, options: dict[str, str]) -> None:
        spec, _ = pool.take()
        started = time.monotonic()
        pool.backend.stop(spec.vm_id, timeout=30)
        took = time.monotonic() - started
        assert took < 30, "the guest ignored the ACPI power-down and had to be killed"
        state = pool.backend.state(spec.vm_id)
        assert state == VMState.STOPPED, (f"{state} after an orderly stop; "
                                          f"{getattr(pool.backend, 'condition', lambda _: '')(spec.vm_id)}; console: "
                                          f"{getattr(pool.backend, 'ex_console', lambda _: '')(spec.vm_id)[-2000:]}")
        assert leftovers(spec) == []
        assert spec.vm_id not in pool.backend.running()
        pool.backend.stop(spec.vm_id, timeout=1)  # again: fine
        assert load_backend(case.name, options).adopt(spec) is False

    def test_destroy(self, pool: GuestPool, case: Case, options: dict[str, str]) -> None:
        spec, _ = pool.take()
        started = time.monotonic()
        pool.backend.destroy(spec.vm_id)
        assert time.monotonic() - started < 10
        assert leftovers(spec) == []
        assert files_in(spec.run_dir) == []
        assert pool.backend.state(spec.vm_id) in (VMState.STOPPED, VMState.UNKNOWN)
        assert spec.vm_id not in pool.backend.running()
        pool.backend.destroy(spec.vm_id)
        assert load_backend(case.name, options).adopt(spec) is False


# The registry ------------------------------------------------------------------------
def test_registered_backends_are_backends() -> None:
    for name in BACKENDS:
        assert issubclass(backend_class(name), Backend)
    assert {case.name for case in CASES} <= set(BACKENDS)


def test_unknown_backend_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="unknown backend 'xen'"):
        load_backend("xen", {})


def test_registered_non_backend_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(BACKENDS, "bogus", "pathlib:Path")
    with pytest.raises(ConfigurationError, match="not a Backend"):
        load_backend("bogus", {})
    monkeypatch.setitem(BACKENDS, "missing", "vmplant_service.backends.no_such_module:X")
    with pytest.raises(ConfigurationError, match="cannot be loaded"):
        load_backend("missing", {})


def test_only_the_backend_asked_for_is_imported() -> None:
    code = ("import sys; from vmplant_service.backends import load_backend; load_backend('fake', {}); "
            "assert 'vmplant_service.backends.qemu' not in sys.modules, 'qemu imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_bad_options_are_configuration_errors() -> None:
    with pytest.raises(ConfigurationError):
        load_backend("qemu", {"accel": "xen"})
    with pytest.raises(ConfigurationError):
        load_backend("fake", {"boot_seconds": "soon"})


# The fake's own behaviour (it stands in for QEMU in the plant's tests) -------------------
class TestFakeAgent:
    @pytest.fixture()
    def fake(self, fake_specs: SpecFactory) -> Iterator[tuple[Backend, GuestSpec, Channel]]:
        backend = load_backend("fake", {"boot_seconds": "0"})
        spec = fake_specs.new("fake-agent")
        backend.start(spec)
        channel = channel_of(backend, spec)
        channel.wait_agent(5)
        yield backend, spec, channel
        backend.destroy(spec.vm_id)
        assert leftovers(spec) == []

    def test_fail_marker(self, fake: tuple[Backend, GuestSpec, Channel]) -> None:
        result = run(fake[2], "echo FAKE_FAIL")
        assert result.status == 1

    def test_hang_marker_times_out(self, fake: tuple[Backend, GuestSpec, Channel]) -> None:
        started = time.monotonic()
        result = run(fake[2], "sleep 100 # FAKE_HANG", timeout=1)
        assert result.status == 137 and result.timed_out
        assert 1 <= time.monotonic() - started < 5

    def test_nothing_runs_on_the_host(self, fake: tuple[Backend, GuestSpec, Channel], guest_tmp: Path) -> None:
        witness = guest_tmp / "must-not-exist"
        result = run(fake[2], f"touch {witness}")
        assert result.status == 0 and not witness.exists()

    def test_stop_ends_a_hanging_action(self, fake: tuple[Backend, GuestSpec, Channel]) -> None:
        backend, spec, channel = fake
        results: list[object] = []
        alive = lambda: backend.state(spec.vm_id) == VMState.RUNNING  # noqa: E731

        def hang() -> None:
            try:
                results.append(channel.run("0001-hang", ScriptAction(id="hang", body="FAKE_HANG", script_timeout=100),
                                           ActionContext(), alive))
            except BackendError as exc:
                results.append(exc)

        worker = threading.Thread(target=hang)
        try:
            worker.start()
            time.sleep(0.2)
            started = time.monotonic()
            backend.stop(spec.vm_id)
            assert time.monotonic() - started < 2
            assert backend.state(spec.vm_id) == VMState.STOPPED
        finally:
            worker.join(10)
        assert not worker.is_alive()
        assert len(results) == 1 and isinstance(results[0], BackendError) and "stopped" in str(results[0])

    def test_guest_shutdown_powers_off(self, fake: tuple[Backend, GuestSpec, Channel]) -> None:
        backend, spec, channel = fake
        channel.agent.shutdown(timeout=1)
        assert backend.state(spec.vm_id) == VMState.STOPPED

    def test_crash(self, fake: tuple[Backend, GuestSpec, Channel]) -> None:
        backend, spec, _ = fake
        backend.ex_crash(spec.vm_id)  # type: ignore[attr-defined]
        assert backend.state(spec.vm_id) == VMState.CRASHED
        assert backend.running() == []

    def test_memory_is_accounted(self, fake_specs: SpecFactory) -> None:
        backend = load_backend("fake", {"max_memory": "200"})
        first, second = fake_specs.new("fake-mem"), fake_specs.new("fake-mem")
        backend.start(first)
        try:
            with pytest.raises(BackendError, match="MiB"):
                backend.start(second)
            assert files_in(second.run_dir) == []
        finally:
            backend.destroy(first.vm_id)
        backend.start(second)
        backend.destroy(second.vm_id)
