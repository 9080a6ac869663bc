"""How the plant reaches a guest's agent: one command in, one bounded answer out.

The guest agent speaks the QEMU guest agent protocol (qemu-ga): JSON
commands ``{"execute": NAME, "arguments": {...}}``, one JSON answer each,
``{"return": VALUE}`` or ``{"error": {"class": ..., "desc": ...}}``. The
guest is hostile: whatever comes back over this stream is attacker data.

The contract every :class:`AgentTransport` keeps (``tests/test_agent.py``
checks :class:`SocketTransport` against hostile agents; the libvirt
backend's transport keeps the same rules):

1. ``command(name, arguments, timeout)`` sends one command and returns the
   value of its ``return`` member. It never waits past ``timeout`` seconds
   (a monotonic deadline, whatever the guest sends or does not send) and
   never pins the calling thread longer.
2. An answer is at most :data:`MAX_ANSWER_BYTES` bytes; anything longer is
   refused unread (the reader stops at the limit), so a guest cannot make
   the plant hold more than that per VM.
3. The answer is parsed strictly: one JSON object (UTF-8, no NaN or
   Infinity, no duplicate keys, nesting bounded by the size), holding
   exactly ``return`` or exactly ``error``. Anything else, and any I/O
   failure, raises :class:`AgentError` (never another exception type);
   an ``error`` answer raises :class:`AgentCommandError` with the agent's
   (truncated) words.
4. After any failure the transport resynchronises before the next command
   (``guest-sync-delimited`` with a random id: every byte before the
   agent's 0xFF delimiter and any answer with another id are dropped,
   within the same deadline and at most :data:`MAX_SKIP_BYTES`), so a late
   answer to an abandoned command is never taken for the next one.
5. It is safe to call from several threads: commands to one guest are
   serialised by a lock, waited for within the caller's deadline.
6. Nothing a guest sends is ever used as a host path, a file name or a
   command: the transport only hands parsed JSON values to its caller,
   which validates their types and sizes (:mod:`vmplant_service.agent.qga`).
"""

from __future__ import annotations

import abc
import json
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Any

#: The largest answer read from a guest (bytes, JSON text). qemu-ga answers guest-exec-status
#: with base64 output; our actions cap their output in the guest (see qga.py) far below this.
MAX_ANSWER_BYTES = 1024 * 1024
#: The most bytes dropped while resynchronising (stale answers, a flood) before giving up.
MAX_SKIP_BYTES = 4 * 1024 * 1024
#: Characters of an agent's error description kept in exceptions and logs.
MAX_ERROR_CHARS = 300
DELIMITER = b"\xff"
READ_CHUNK = 65536


class AgentError(Exception):
    """The agent could not be reached, did not answer in time, or answered something invalid."""


class AgentTimeout(AgentError):
    """No complete answer within the deadline."""


class AgentCommandError(AgentError):
    """The agent answered ``{"error": ...}``: ``error_class`` and the agent's description."""

    def __init__(self, command: str, error_class: str, description: str) -> None:
        super().__init__(f"{command}: {error_class}: {description}")
        self.command = command
        self.error_class = error_class
        self.description = description


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key[:40]!r}")
        result[key] = value
    return result


def parse_answer(data: bytes, command: str) -> Any:
    """The ``return`` value of one agent answer (rule 3); AgentError / AgentCommandError otherwise."""
    if len(data) > MAX_ANSWER_BYTES:
        raise AgentError(f"{command}: the answer is larger than {MAX_ANSWER_BYTES} bytes")
    try:
        text = data.decode("utf-8")
        answer = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise AgentError(f"{command}: the answer is not valid JSON ({str(exc)[:100]})") from None
    if not isinstance(answer, dict) or len(answer) != 1:
        raise AgentError(f"{command}: the answer is not an object with one member")
    if "return" in answer:
        return answer["return"]
    error = answer.get("error")
    if isinstance(error, dict) and isinstance(error.get("class", ""), str) and isinstance(error.get("desc", ""), str):
        raise AgentCommandError(command, str(error.get("class", ""))[:80],
                                _printable(str(error.get("desc", "")))[:MAX_ERROR_CHARS])
    raise AgentError(f"{command}: the answer has neither 'return' nor a well-formed 'error'")


def _printable(text: str) -> str:
    return "".join(ch if ch.isprintable() else "?" for ch in text)


def encode_command(command: str, arguments: dict[str, Any] | None = None) -> bytes:
    """One command as the agent reads it (JSON, one line)."""
    message: dict[str, Any] = {"execute": command}
    if arguments:
        message["arguments"] = arguments
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


class AgentTransport(abc.ABC):
    """A stream to one guest's agent; see the module docstring for the rules."""

    @abc.abstractmethod
    def command(self, name: str, arguments: dict[str, Any] | None = None, timeout: float = 10.0) -> Any:
        """Send ``name`` and return its answer's ``return`` value (rules 1-5)."""

    def close(self) -> None:
        """Drop the connection (a later command reconnects)."""
        return None


class SocketTransport(AgentTransport):
    """The agent behind a unix stream socket (QEMU's ``-chardev socket`` server, UML's relay, the fake agent).

    The connection is kept between commands and re-made (with a
    resynchronisation, rule 4) after any failure. ``path`` is a socket the
    plant's own backend made in a directory no guest can write; it is never
    a name a guest chose.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._buffer = b""

    def command(self, name: str, arguments: dict[str, Any] | None = None, timeout: float = 10.0) -> Any:
        deadline = time.monotonic() + timeout
        if not self._lock.acquire(timeout=max(timeout, 0.0)):
            raise AgentTimeout(f"{name}: another command to this guest's agent did not end within {timeout:g} s")
        try:
            try:
                if self._sock is None:
                    self._connect(deadline)
                self._send(encode_command(name, arguments), deadline)
                return parse_answer(self._read_line(deadline, name), name)
            except AgentCommandError:
                raise  # the stream is still in step: keep it
            except AgentError:
                self._drop()
                raise
            except OSError as exc:
                self._drop()
                raise AgentError(f"{name}: {exc.strerror or exc}") from None
        finally:
            self._lock.release()

    def close(self) -> None:
        """Drop the connection now: a command in progress ends at once with an AgentError."""
        sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._lock.acquire(timeout=5.0):
            try:
                self._drop()
            finally:
                self._lock.release()

    # The stream ---------------------------------------------------------------------
    def _drop(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
        self._sock = None
        self._buffer = b""

    def _connect(self, deadline: float) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(_remaining(deadline, "connect"))
            sock.connect(self.path)
        except (OSError, AgentError) as exc:
            sock.close()
            if isinstance(exc, AgentError):
                raise
            raise AgentError(f"cannot reach the agent: {exc.strerror or exc}") from None
        self._sock = sock
        self._buffer = b""
        self._sync(deadline)

    def _sync(self, deadline: float) -> None:
        """Rule 4: 0xFF (resets the agent's parser), then guest-sync-delimited until our id comes back."""
        ident = secrets.randbelow(2**31 - 1) + 1
        self._send(DELIMITER + encode_command("guest-sync-delimited", {"id": ident}), deadline)
        skipped = 0
        while True:
            skipped += self._skip_to_delimiter(deadline, MAX_SKIP_BYTES - skipped)
            line = self._read_line(deadline, "guest-sync-delimited")
            skipped += len(line)
            try:
                value = parse_answer(line, "guest-sync-delimited")
            except AgentCommandError:
                continue  # e.g. the agent's complaint about the 0xFF itself
            except AgentError:
                value = None
            if value == ident and type(value) is int:
                return
            if skipped > MAX_SKIP_BYTES:
                raise AgentError(f"no answer to guest-sync-delimited in {MAX_SKIP_BYTES} bytes")

    def _send(self, data: bytes, deadline: float) -> None:
        assert self._sock is not None
        self._sock.settimeout(_remaining(deadline, "send"))
        try:
            self._sock.sendall(data)
        except TimeoutError:
            raise AgentTimeout("the agent's channel did not take the command in time") from None

    def _fill(self, deadline: float, what: str) -> None:
        assert self._sock is not None
        self._sock.settimeout(_remaining(deadline, what))
        try:
            chunk = self._sock.recv(READ_CHUNK)
        except TimeoutError:
            raise AgentTimeout(f"{what}: no answer in time") from None
        if not chunk:
            raise AgentError(f"{what}: the agent's channel closed")
        self._buffer += chunk

    def _skip_to_delimiter(self, deadline: float, budget: int) -> int:
        """Drop bytes up to and including the next 0xFF; returns how many were dropped."""
        dropped = 0
        while True:
            index = self._buffer.find(DELIMITER)
            if index >= 0:
                self._buffer = self._buffer[index + 1:]
                return dropped + index + 1
            dropped += len(self._buffer)
            self._buffer = b""
            if dropped > budget:
                raise AgentError(f"no answer to guest-sync-delimited in {MAX_SKIP_BYTES} bytes")
            self._fill(deadline, "guest-sync-delimited")

    def _read_line(self, deadline: float, what: str) -> bytes:
        """The next line (without its newline), at most MAX_ANSWER_BYTES (rule 2)."""
        start = 0
        while True:
            index = self._buffer.find(b"\n", start)
            if index >= 0:
                line, self._buffer = self._buffer[:index], self._buffer[index + 1:]
                return line.strip(b" \t\r")
            if len(self._buffer) > MAX_ANSWER_BYTES:
                raise AgentError(f"{what}: the answer is larger than {MAX_ANSWER_BYTES} bytes")
            start = len(self._buffer)
            self._fill(deadline, what)


def _remaining(deadline: float, what: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise AgentTimeout(f"{what}: no answer in time")
    return left


__all__ = [
    "MAX_ANSWER_BYTES",
    "MAX_SKIP_BYTES",
    "AgentCommandError",
    "AgentError",
    "AgentTimeout",
    "AgentTransport",
    "SocketTransport",
    "encode_command",
    "parse_answer",
]
