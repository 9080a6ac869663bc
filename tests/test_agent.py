"""The guest agent channel's host side against hostile agents (rules of vmplant_service/agent/transport.py).

Every test puts a scripted "agent" on a unix socket: a guest that answers
too much, too little, too late, malformed or out of turn. Whatever it does,
the plant's transport returns within its deadline, holds at most its
bound in memory and raises only AgentError; the channel turns that into a
failed action, never an exception out of the plant.
"""

from __future__ import annotations

import json
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vmplant_service.agent.qga import GuestAgent
from vmplant_service.agent.transport import (
    MAX_ANSWER_BYTES,
    AgentCommandError,
    AgentError,
    AgentTimeout,
    SocketTransport,
    parse_answer,
)
from vmplant_service.channel import ActionContext, Channel
from vmshop_common.dag import FileAction, ScriptAction

Handler = Callable[["Conversation"], None]


class Conversation:
    """The agent's side of one connection: read the plant's commands, answer as the test likes."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.buffer = b""

    def command(self, timeout: float = 5.0) -> dict[str, object]:
        """The next command (after the sync prefix's 0xFF, like qemu-ga's parser reset)."""
        self.conn.settimeout(timeout)
        while b"\n" not in self.buffer:
            chunk = self.conn.recv(65536)
            if not chunk:
                raise EOFError
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line.replace(b"\xff", b""))  # type: ignore[no-any-return]

    def sync(self) -> int:
        """Answer the transport's guest-sync-delimited as qemu-ga does; the id."""
        request = self.command()
        assert request["execute"] == "guest-sync-delimited"
        ident = request["arguments"]["id"]  # type: ignore[index]
        self.send(b"\xff" + json.dumps({"return": ident}).encode() + b"\n")
        return int(ident)

    def send(self, data: bytes) -> None:
        self.conn.sendall(data)

    def answer(self, value: object) -> None:
        self.send(json.dumps({"return": value}).encode() + b"\n")


class ScriptedAgent:
    """A unix socket served by ``handler``, one connection after another."""

    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(4)
        self.server.settimeout(0.1)
        self.stopping = threading.Event()
        self.connections = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.server.accept()
            except TimeoutError:
                continue
            self.connections += 1
            threading.Thread(target=self._talk, args=(conn,), daemon=True).start()

    def _talk(self, conn: socket.socket) -> None:
        with conn:
            try:
                self.handler(Conversation(conn))
            except (OSError, EOFError, ValueError):
                pass

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(10)
        self.server.close()


@pytest.fixture
def agent_at() -> Iterator[Callable[[Handler], SocketTransport]]:
    directory = Path(tempfile.mkdtemp(prefix="qga-", dir="/tmp"))
    agents: list[ScriptedAgent] = []
    transports: list[SocketTransport] = []

    def make(handler: Handler) -> SocketTransport:
        path = directory / f"a{len(agents)}.sock"
        agents.append(ScriptedAgent(path, handler))
        transport = SocketTransport(path)
        transports.append(transport)
        return transport

    yield make
    for transport in transports:
        transport.close()
    for agent in agents:
        agent.stop()
    for path in directory.iterdir():
        path.unlink()
    directory.rmdir()


def well_behaved(conversation: Conversation) -> None:
    """Answers the sync, then every command with a fixed value per command name."""
    conversation.sync()
    while True:
        request = conversation.command(30)
        name = request["execute"]
        if name == "guest-ping":
            conversation.answer({})
        elif name == "guest-exec":
            conversation.answer({"pid": 42})
        elif name == "guest-exec-status":
            conversation.answer({"exited": True, "exitcode": 0, "out-data": "aGVsbG8K"})
        else:
            conversation.send(b'{"error": {"class": "CommandNotFound", "desc": "no such command"}}\n')


# Answers that parse, and those that must not -------------------------------------------
@pytest.mark.parametrize("text", [
    b"", b"[]", b"42", b'"x"', b"{}", b'{"return": 1, "error": {}}', b'{"return": NaN}', b'{"return": Infinity}',
    b'{"return": 1, "return": 2}', b'{"return": 1', b"\xff\xfe", b'{"error": "text"}', b'{"error": {"class": 5}}',
    b"[" * 100_000 + b"]" * 100_000, b'{"retur\xc3n": 1}'[:9],
])
def test_malformed_answers_are_agent_errors(text: bytes) -> None:
    with pytest.raises(AgentError):
        parse_answer(text, "test")


def test_an_error_answer_names_the_agents_words_cut_and_printable() -> None:
    desc = "bad\x1b[31m" + "x" * 1000
    with pytest.raises(AgentCommandError) as raised:
        parse_answer(json.dumps({"error": {"class": "GenericError", "desc": desc}}).encode(), "guest-exec")
    assert raised.value.error_class == "GenericError"
    assert "\x1b" not in raised.value.description and len(raised.value.description) <= 300


def test_an_oversized_answer_is_refused_by_size() -> None:
    with pytest.raises(AgentError, match="larger"):
        parse_answer(b'{"return": "' + b"x" * MAX_ANSWER_BYTES + b'"}', "test")


# The stream -----------------------------------------------------------------------------
def test_a_well_behaved_agent(agent_at: Callable[[Handler], SocketTransport]) -> None:
    agent = GuestAgent(agent_at(well_behaved))
    agent.ping(timeout=5)
    status, _ = agent.run("/bin/sh", ["-c", "echo hello"], None, time.monotonic() + 5, 1000)
    assert status.exitcode == 0 and status.output == b"hello\n"
    with pytest.raises(AgentCommandError, match="CommandNotFound"):
        agent.transport.command("guest-unknown", None, 5)
    agent.ping(timeout=5)  # an error answer keeps the stream in step


def test_silence_ends_at_the_deadline(agent_at: Callable[[Handler], SocketTransport]) -> None:
    def mute(conversation: Conversation) -> None:
        conversation.sync()
        time.sleep(30)

    transport = agent_at(mute)
    started = time.monotonic()
    with pytest.raises(AgentTimeout):
        transport.command("guest-ping", None, 1.0)
    assert time.monotonic() - started < 2.0


def test_a_slow_drip_cannot_stretch_the_deadline(agent_at: Callable[[Handler], SocketTransport]) -> None:
    def drip(conversation: Conversation) -> None:
        conversation.sync()
        conversation.command()
        for byte in b'{"return": {}}' * 100:
            conversation.send(bytes([byte]))
            time.sleep(0.05)

    transport = agent_at(drip)
    started = time.monotonic()
    with pytest.raises(AgentTimeout):
        transport.command("guest-ping", None, 1.0)
    assert time.monotonic() - started < 2.0


def test_an_endless_answer_stops_at_the_bound(agent_at: Callable[[Handler], SocketTransport]) -> None:
    sent = []

    def flood(conversation: Conversation) -> None:
        conversation.sync()
        conversation.command()
        chunk = b"x" * 65536
        while True:
            conversation.send(chunk)
            sent.append(len(chunk))

    transport = agent_at(flood)
    with pytest.raises(AgentError, match="larger than"):
        transport.command("guest-ping", None, 20.0)
    # the transport stopped reading at the bound (the kernel's socket buffers hold a little more)
    assert sum(sent) < MAX_ANSWER_BYTES + 8 * 1024 * 1024


def test_garbage_before_the_sync_is_skipped_and_stale_answers_are_not_taken(
        agent_at: Callable[[Handler], SocketTransport]) -> None:
    def confused(conversation: Conversation) -> None:
        request = conversation.command()
        ident = request["arguments"]["id"]  # type: ignore[index]
        conversation.send(b"junk\x00\x01 {not json}\n")
        conversation.send(b'\xff{"return": 12345}\n')  # a stale sync answer
        conversation.send(b'{"return": {"pid": 666}}\n')  # a stale command answer
        conversation.send(b"\xff" + json.dumps({"return": ident}).encode() + b"\n")
        while True:
            conversation.command(30)
            conversation.answer({})

    agent = GuestAgent(agent_at(confused))
    agent.ping(timeout=5)


def test_an_endless_flood_before_the_sync_is_refused(agent_at: Callable[[Handler], SocketTransport]) -> None:
    def flood(conversation: Conversation) -> None:
        conversation.command()
        while True:
            conversation.send(b"\x00" * 65536)

    transport = agent_at(flood)
    started = time.monotonic()
    with pytest.raises(AgentError):
        transport.command("guest-ping", None, 20.0)
    assert time.monotonic() - started < 20.0


def test_after_a_failure_the_next_command_resynchronises(agent_at: Callable[[Handler], SocketTransport]) -> None:
    """A late answer to an abandoned command is never taken for the next one's.

    Under QEMU the guest's side of the stream outlives a host connection: an
    answer the guest sends late arrives on the next connection, before the sync.
    """
    connections: list[int] = []

    def late(conversation: Conversation) -> None:
        connections.append(1)
        if len(connections) == 1:
            conversation.sync()
            conversation.command()
            time.sleep(3)  # never answers on this connection
        request = conversation.command()
        conversation.answer({"pid": 666})  # the abandoned guest-exec's answer, arriving late
        ident = request["arguments"]["id"]  # type: ignore[index]
        conversation.send(b"\xff" + json.dumps({"return": ident}).encode() + b"\n")
        while True:
            conversation.command(30)
            conversation.answer({"pid": 7})

    agent = GuestAgent(agent_at(late))
    with pytest.raises(AgentTimeout):
        agent.exec("/bin/true", [], timeout=1.0)
    assert agent.exec("/bin/true", [], timeout=5.0) == 7


def test_a_closed_channel_is_an_agent_error(agent_at: Callable[[Handler], SocketTransport]) -> None:
    def hang_up(conversation: Conversation) -> None:
        conversation.sync()
        conversation.command()

    with pytest.raises(AgentError, match="closed"):
        agent_at(hang_up).command("guest-ping", None, 5.0)


def test_no_agent_at_all(tmp_path: Path) -> None:
    with pytest.raises(AgentError, match="cannot reach"):
        SocketTransport(tmp_path / "nobody.sock").command("guest-ping", None, 1.0)


def test_commands_from_many_threads_are_serialised(agent_at: Callable[[Handler], SocketTransport]) -> None:
    agent = GuestAgent(agent_at(well_behaved))
    errors: list[BaseException] = []

    def ping() -> None:
        try:
            for _ in range(20):
                agent.ping(timeout=10)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=ping) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []


# Answers of the wrong shape --------------------------------------------------------------
@pytest.mark.parametrize("exec_answer, status_answer", [
    ({"pid": "42"}, None),
    ({"pid": -1}, None),
    ({"pid": True}, None),
    ([], None),
    ({"pid": 42}, {"exited": "yes"}),
    ({"pid": 42}, {"exited": True, "exitcode": 1.5}),
    ({"pid": 42}, {"exited": True, "exitcode": 0, "out-data": "not base64!"}),
    ({"pid": 42}, {"exited": True, "exitcode": 0, "out-data": 5}),
    ({"pid": 42}, {"exited": True, "exitcode": 0, "out-data": "eA==" * 100_000}),
    ({"pid": 42}, {"exited": True, "signal": 100000}),
])
def test_answers_of_the_wrong_shape_fail_the_action(agent_at: Callable[[Handler], SocketTransport],
                                                    exec_answer: object, status_answer: object) -> None:
    def odd(conversation: Conversation) -> None:
        conversation.sync()
        while True:
            request = conversation.command(30)
            conversation.answer(exec_answer if request["execute"] == "guest-exec" else status_answer)

    channel = Channel(GuestAgent(agent_at(odd)))
    result = channel.run("0001-x", ScriptAction(id="x", body="true", script_timeout=5), ActionContext())
    assert not result.ok and result.error and "agent" in result.error


def test_a_process_that_never_ends_times_out_the_action(agent_at: Callable[[Handler], SocketTransport]) -> None:
    def forever(conversation: Conversation) -> None:
        conversation.sync()
        while True:
            request = conversation.command(30)
            conversation.answer({"pid": 9} if request["execute"] == "guest-exec" else {"exited": False})

    channel = Channel(GuestAgent(agent_at(forever)))
    import vmplant_service.channel as channel_module

    started = time.monotonic()
    original = channel_module.AGENT_GRACE
    channel_module.AGENT_GRACE = 0.5
    try:
        result = channel.run("0001-x", ScriptAction(id="x", body="true", script_timeout=1), ActionContext())
    finally:
        channel_module.AGENT_GRACE = original
    assert result.timed_out and not result.ok and result.error
    assert time.monotonic() - started < 4


def test_a_file_action_uses_the_file_commands(agent_at: Callable[[Handler], SocketTransport]) -> None:
    seen: list[str] = []
    written: list[bytes] = []

    def files(conversation: Conversation) -> None:
        import base64

        conversation.sync()
        while True:
            request = conversation.command(30)
            name = str(request["execute"])
            seen.append(name)
            arguments = request.get("arguments") or {}
            if name == "guest-exec":
                conversation.answer({"pid": 5})
            elif name == "guest-exec-status":
                conversation.answer({"exited": True, "exitcode": 0, "out-data": ""})
            elif name == "guest-file-open":
                conversation.answer(3)
            elif name == "guest-file-write":
                chunk = base64.b64decode(arguments["buf-b64"])  # type: ignore[index]
                written.append(chunk)
                conversation.answer({"count": len(chunk), "eof": False})
            else:
                conversation.answer({})

    channel = Channel(GuestAgent(agent_at(files)))
    result = channel.run("0001-f", FileAction(id="f", path="/etc/app.conf", content="a=1", mode=0o600),
                         ActionContext())
    assert result.ok, result
    assert seen == ["guest-exec", "guest-exec-status", "guest-file-open", "guest-file-write", "guest-file-close",
                    "guest-exec", "guest-exec-status"]
    assert b"".join(written) == b"a=1\n"
