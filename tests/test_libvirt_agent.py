"""The agent transport through libvirt's API against hostile answers and a slow libvirt (no daemon needed).

:class:`LibvirtAgentTransport` keeps the rules of ``vmplant_service/agent/transport.py``; here libvirt's
``qemuAgentCommand`` is a scripted stand-in that answers, fails or hangs the way libvirt 9.0 was measured to
(the real thing is exercised through real guests by the contract and hostile-guest suites).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from vmplant_service.agent.libvirt_transport import LibvirtAgentTransport
from vmplant_service.agent.qga import GuestAgent
from vmplant_service.agent.transport import MAX_ANSWER_BYTES, AgentCommandError, AgentError, AgentTimeout
from vmplant_service.channel import ActionContext, Channel
from vmshop_common.dag import ScriptAction


class FakeLibvirtError(Exception):
    """Looks like libvirt.libvirtError to the transport: a code and a message."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def get_error_code(self) -> int:
        return self.code

    def get_error_message(self) -> str:
        return self.message


@dataclass
class FakeConnection:
    alive: bool = True
    closed: bool = False

    def isAlive(self) -> bool:  # noqa: N802 - libvirt's name
        return self.alive

    def close(self) -> int:
        self.closed = True
        return 0


@dataclass
class FakeDomain:
    connection: FakeConnection = field(default_factory=FakeConnection)

    def connect(self) -> FakeConnection:
        return self.connection


Answer = Callable[[dict[str, Any], int], str]


class FakeLibvirt:
    """Scripted ``qemuAgentCommand``: ``answer(command, seconds)`` says what libvirt returns or raises."""

    def __init__(self, answer: Answer, connected: bool | None = True) -> None:
        self.answer = answer
        self.connected = connected
        self.calls: list[tuple[str, int]] = []
        self.domains: list[FakeDomain] = []
        self.busy = 0
        self.most_busy = 0
        self.checks = 0
        self.lock = threading.Lock()

    def connect(self) -> FakeDomain:
        domain = FakeDomain()
        self.domains.append(domain)
        return domain

    def agent_command(self, domain: FakeDomain, text: str, seconds: int) -> str:
        assert isinstance(seconds, int) and seconds >= 1
        command = json.loads(text)
        with self.lock:
            self.calls.append((command["execute"], seconds))
            self.busy += 1
            self.most_busy = max(self.most_busy, self.busy)
        try:
            return self.answer(command, seconds)
        finally:
            with self.lock:
                self.busy -= 1

    def channel_connected(self, domain: FakeDomain) -> bool | None:
        self.checks += 1
        return self.connected

    def transport(self) -> LibvirtAgentTransport:
        return LibvirtAgentTransport("test", self.connect, self.agent_command, self.channel_connected)


def returns(value: object) -> Answer:
    return lambda command, seconds: json.dumps({"return": value})


def test_a_well_behaved_agent() -> None:
    fake = FakeLibvirt(lambda command, seconds: json.dumps({"return": command.get("arguments", {})}))
    transport = fake.transport()
    assert transport.command("guest-exec", {"path": "/bin/true"}, timeout=2.5) == {"path": "/bin/true"}
    assert transport.command("guest-ping", timeout=0.2) == {}
    assert fake.calls == [("guest-exec", 3), ("guest-ping", 1)]  # whole seconds, at least libvirt's minimum
    assert fake.checks == 1  # the channel's state is asked only until the agent has answered


@pytest.mark.parametrize("text", ['{"return": NaN}', '{"return": 1, "return": 2}', '[1]', '{"return": 1, "x": 2}',
                                  '{"error": "no"}', "not json", ""])
def test_malformed_answers_are_agent_errors(text: str) -> None:
    transport = FakeLibvirt(lambda command, seconds: text).transport()
    with pytest.raises(AgentError) as info:
        transport.command("guest-ping", timeout=2)
    assert type(info.value) is AgentError


def test_an_oversized_answer_is_refused_unparsed() -> None:
    transport = FakeLibvirt(lambda command, seconds: '{"return": "' + "x" * MAX_ANSWER_BYTES + '"}').transport()
    with pytest.raises(AgentError, match="larger than"):
        transport.command("guest-exec-status", {"pid": 1}, timeout=2)


def test_an_error_answer_keeps_the_agents_words_cut_and_printable() -> None:
    def fails(command: dict[str, Any], seconds: int) -> str:
        raise FakeLibvirtError(1, "internal error: unable to execute QEMU agent command 'guest-exec': "
                                  "Guest agent command failed, error was \x1b[31m" + "y" * 1000)

    transport = FakeLibvirt(fails).transport()
    with pytest.raises(AgentCommandError) as info:
        transport.command("guest-exec", {"path": "/nonexistent"}, timeout=2)
    assert info.value.description.startswith("Guest agent command failed, error was ?[31m")
    assert len(info.value.description) <= 300 and info.value.error_class == "GenericError"


@pytest.mark.parametrize("failure, kind, words", [
    (SystemError("returned a result with an exception set"), AgentError, "not valid UTF-8"),
    (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), AgentError, "not valid UTF-8"),
    (FakeLibvirtError(86, "Guest agent is not responding: QEMU guest agent is not available due to an error"),
     AgentError, "stopped talking to this guest's agent"),
    (FakeLibvirtError(38, "No complete agent response found in 10485760 bytes: Numerical result out of range"),
     AgentError, "10 MiB"),
    (FakeLibvirtError(39, "Unable to encode message payload"), AgentError, "4 MiB"),
    (FakeLibvirtError(86, "Guest agent is not responding: Guest agent not available for now"), AgentTimeout,
     "in time"),
    (FakeLibvirtError(86, "Guest agent is not responding: QEMU guest agent is not connected"), AgentError,
     "not connected"),
    (FakeLibvirtError(55, "Requested operation is not valid: domain is not running"), AgentError, "not running"),
    (FakeLibvirtError(1, "internal error: cannot parse json \ufffd{\"return\": 1}: lexical error\n" + "z" * 5000),
     AgentError, "cannot parse json"),
    (MemoryError(), AgentError, "MemoryError"),
])
def test_every_libvirt_failure_is_an_agent_error(failure: BaseException, kind: type, words: str) -> None:
    def fails(command: dict[str, Any], seconds: int) -> str:
        raise failure

    transport = FakeLibvirt(fails).transport()
    with pytest.raises(AgentError) as info:
        transport.command("guest-ping", timeout=2)
    assert type(info.value) is kind and words in str(info.value)
    assert len(str(info.value)) < 600 and "\n" not in str(info.value)


@pytest.mark.parametrize("failure", [
    FakeLibvirtError(86, "Guest agent is not responding: QEMU guest agent is not available due to an error"),
    FakeLibvirtError(38, "No complete agent response found in 10485760 bytes: Numerical result out of range"),
    FakeLibvirtError(1, "internal error: cannot parse json xxxx: lexical error: invalid char in json text."),
    FakeLibvirtError(1, "internal error: Unknown JSON reply '{\"x\": 1}'"),
    SystemError("returned a result with an exception set"),
])
def test_a_guest_that_breaks_the_protocol_is_not_talked_to_again(failure: Exception) -> None:
    """libvirtd logs what it could not parse, in full: the plant sends such a guest nothing more."""
    outcomes: list[Exception | str] = [failure, json.dumps({"return": {}})]

    def answer(command: dict[str, Any], seconds: int) -> str:
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    fake = FakeLibvirt(answer)
    transport = fake.transport()
    with pytest.raises(AgentError):
        transport.command("guest-exec-status", {"pid": 1}, timeout=2)
    started = time.monotonic()
    with pytest.raises(AgentError, match="no longer sends commands to this guest's agent"):
        transport.command("guest-ping", timeout=2)
    assert time.monotonic() - started < 0.5 and len(fake.calls) == 1
    fresh = fake.transport()  # what a plant restart makes when it adopts the VM: one more chance
    assert fresh.command("guest-ping", timeout=2) == {}


@pytest.mark.parametrize("failure", [
    FakeLibvirtError(86, "Guest agent is not responding: QEMU guest agent is not connected"),
    FakeLibvirtError(86, "Guest agent is not responding: Guest agent not available for now"),
    FakeLibvirtError(39, "Unable to encode message payload"),
    FakeLibvirtError(1, "internal error: unable to execute QEMU agent command 'guest-ping': no"),
])
def test_failures_a_good_agent_may_cause_do_not_end_the_conversation(failure: Exception) -> None:
    outcomes: list[Exception | str] = [failure, json.dumps({"return": {}})]

    def answer(command: dict[str, Any], seconds: int) -> str:
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    transport = FakeLibvirt(answer).transport()
    with pytest.raises(AgentError):
        transport.command("guest-ping", timeout=2)
    assert transport.command("guest-ping", timeout=2) == {}


def test_guest_sync_delimited_never_reaches_libvirt() -> None:
    fake = FakeLibvirt(returns(1))
    with pytest.raises(AgentError, match="libvirt synchronises by itself"):
        fake.transport().command("guest-sync-delimited", {"id": 1}, timeout=2)
    assert fake.calls == []


def test_a_slow_libvirt_cannot_stretch_the_deadline() -> None:
    """libvirt's own sync may outlast the command's timeout: the caller still returns at its deadline."""
    release = threading.Event()

    def slow(command: dict[str, Any], seconds: int) -> str:
        if command["execute"] == "guest-exec-status":
            release.wait(10)
        return json.dumps({"return": {}})

    fake = FakeLibvirt(slow)
    transport = fake.transport()
    started = time.monotonic()
    with pytest.raises(AgentTimeout):
        transport.command("guest-exec-status", {"pid": 1}, timeout=0.4)
    assert 0.35 < time.monotonic() - started < 1.5
    # libvirt still has the first command: the next one waits for it, within its own deadline, and never overlaps.
    started = time.monotonic()
    with pytest.raises(AgentTimeout, match="still busy"):
        transport.command("guest-ping", timeout=0.3)
    assert time.monotonic() - started < 1.0
    release.set()
    assert transport.command("guest-ping", timeout=5) == {}
    assert fake.most_busy == 1 and [name for name, _ in fake.calls] == ["guest-exec-status", "guest-ping"]


def test_commands_from_many_threads_are_serialised() -> None:
    def answer(command: dict[str, Any], seconds: int) -> str:
        time.sleep(0.01)
        return json.dumps({"return": command["arguments"]["n"]})

    fake = FakeLibvirt(answer)
    transport = fake.transport()
    results: dict[int, object] = {}

    def worker(n: int) -> None:
        results[n] = transport.command("guest-echo", {"n": n}, timeout=10)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert results == {n: n for n in range(12)} and fake.most_busy == 1


def test_an_agent_that_is_not_up_fails_fast_without_asking_libvirt() -> None:
    fake = FakeLibvirt(returns({}), connected=False)
    transport = fake.transport()
    started = time.monotonic()
    with pytest.raises(AgentError, match="has not opened its channel"):
        transport.command("guest-ping", timeout=5)
    assert time.monotonic() - started < 0.5 and fake.calls == []
    fake.connected = True
    assert transport.command("guest-ping", timeout=5) == {}


def test_the_readiness_probe_waits_for_the_channel() -> None:
    fake = FakeLibvirt(returns({}), connected=False)
    timer = threading.Timer(0.5, lambda: setattr(fake, "connected", True))
    timer.start()
    waited = Channel(GuestAgent(fake.transport())).wait_agent(10)
    assert 0.4 < waited < 5 and [name for name, _ in fake.calls] == ["guest-ping"]


def test_a_dead_connection_is_made_again() -> None:
    outcomes: list[Exception | str] = [FakeLibvirtError(38, "Cannot recv data: Connection reset by peer"),
                                       json.dumps({"return": {}})]

    def answer(command: dict[str, Any], seconds: int) -> str:
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            fake.domains[-1].connection.alive = False
            raise outcome
        return outcome

    fake = FakeLibvirt(answer)
    transport = fake.transport()
    with pytest.raises(AgentError, match="Cannot recv data"):
        transport.command("guest-ping", timeout=2)
    assert transport.command("guest-ping", timeout=2) == {}
    assert len(fake.domains) == 2 and fake.domains[0].connection.closed


def test_no_libvirt_at_all() -> None:
    def refuses() -> Any:
        raise FakeLibvirtError(38, "Failed to connect socket to '/run/libvirt/libvirt-sock': No such file")

    transport = LibvirtAgentTransport("test", refuses, lambda d, t, s: "")
    with pytest.raises(AgentError, match="cannot reach the guest through libvirt"):
        transport.command("guest-ping", timeout=2)


def test_close_ends_a_command_in_progress() -> None:
    release = threading.Event()
    fake = FakeLibvirt(lambda command, seconds: (release.wait(10), json.dumps({"return": {}}))[1])
    transport = fake.transport()
    threading.Timer(0.3, transport.close).start()
    started = time.monotonic()
    with pytest.raises(AgentError, match="closed"):
        transport.command("guest-ping", timeout=5)
    assert time.monotonic() - started < 2
    release.set()
    assert transport.command("guest-ping", timeout=5) == {}
    assert fake.domains[0].connection.closed and len(fake.domains) == 2


def test_a_failing_agent_fails_the_action_not_the_plant() -> None:
    def answer(command: dict[str, Any], seconds: int) -> str:
        if command["execute"] == "guest-exec":
            return json.dumps({"return": {"pid": 7}})
        raise FakeLibvirtError(86, "Guest agent is not responding: QEMU guest agent is not available due to an "
                                   "error")

    channel = Channel(GuestAgent(FakeLibvirt(answer).transport()))
    result = channel.run("0001-a", ScriptAction(id="a", body="echo hi", script_timeout=5), ActionContext())
    assert not result.ok and result.error is not None and "stopped talking" in result.error


def test_a_closed_transport_holds_no_connection_even_after_errors() -> None:
    """A libvirt connection is a client of the daemon (a spawned one exits only when none is left): errors
    handed to the caller must not keep the domain, and with it the connection, alive until a GC pass."""
    import gc
    import weakref

    def fails(command: dict[str, Any], seconds: int) -> str:
        raise FakeLibvirtError(86, "Guest agent is not responding: Guest agent not available for now")

    domains: list[weakref.ref[FakeDomain]] = []

    def connect() -> FakeDomain:
        domain = FakeDomain()
        domains.append(weakref.ref(domain))
        return domain

    transport = LibvirtAgentTransport("test", connect, FakeLibvirt(fails).agent_command)
    gc.disable()
    try:
        for _ in range(2):
            with pytest.raises(AgentTimeout):
                transport.command("guest-ping", timeout=2)
        transport.close()
        assert [ref() for ref in domains] == [None]
    finally:
        gc.enable()
