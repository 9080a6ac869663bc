"""The QEMU guest agent's commands the plant uses, with every answer checked.

:class:`GuestAgent` wraps an :class:`~vmplant_service.agent.transport.AgentTransport`
(bounded, with deadlines) and gives typed results. Every value the guest
returns is checked for its type and size before use (an answer of the wrong
shape is an :class:`AgentError`): the guest is hostile, and qemu-ga inside
it may have been replaced by anything.

Commands used (qemu-ga 7.2's QAPI schema, qga/qapi-schema.json):

- ``guest-sync-delimited`` (in the transport), ``guest-ping``;
- ``guest-exec`` (``path``, ``arg``, ``input-data`` base64, ``capture-output``)
  and ``guest-exec-status`` (``exited``, ``exitcode``/``signal``, base64
  ``out-data``, ``out-truncated``);
- ``guest-file-open``/``guest-file-write``/``guest-file-close``;
- ``guest-fsfreeze-freeze``/``-thaw``/``-status`` (a publish quiesces the guest's file systems);
- ``guest-set-time`` (a clone resumed from a saved state gets the host's time);
- ``guest-shutdown`` (``mode``: powerdown).
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .transport import AgentCommandError, AgentError, AgentTimeout, AgentTransport

#: Seconds one exchange may take when the caller has no tighter deadline.
EXCHANGE_TIMEOUT = 10.0
#: Largest chunk written with one guest-file-write (bytes before base64).
WRITE_CHUNK = 256 * 1024
#: guest-exec-status polling: every POLL_FIRST seconds for the first POLL_FAST_FOR seconds (most actions are
#: short, and an answer costs ~1 ms), then doubling up to POLL_LONGEST.
POLL_FIRST = 0.02
POLL_FAST_FOR = 1.0
POLL_LONGEST = 0.5


@dataclass(frozen=True)
class ExecStatus:
    """What ``guest-exec-status`` said of a finished process (``output`` is raw bytes, capped)."""

    exitcode: int | None
    signal: int | None
    output: bytes
    truncated: bool


def _int(value: Any, what: str, low: int = -(2**31), high: int = 2**31) -> int:
    if type(value) is not int or not low <= value <= high:
        raise AgentError(f"the agent's {what} is not an integer in [{low}, {high}]")
    return value


def _bool(value: Any, what: str) -> bool:
    if type(value) is not bool:
        raise AgentError(f"the agent's {what} is not a boolean")
    return value


def _base64(value: Any, what: str, limit: int) -> bytes:
    if not isinstance(value, str) or len(value) > (limit + 2) // 3 * 4 + 4:
        raise AgentError(f"the agent's {what} is not base64 text of at most {limit} bytes")
    try:
        return base64.b64decode(value, validate=True)[:limit]
    except (binascii.Error, ValueError):
        raise AgentError(f"the agent's {what} is not valid base64") from None


class GuestAgent:
    """Typed qemu-ga commands over a transport (see the module docstring)."""

    def __init__(self, transport: AgentTransport, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.transport = transport
        self.clock = clock
        self.sleep = sleep

    def ping(self, timeout: float = EXCHANGE_TIMEOUT) -> None:
        """The agent answers (a fresh transport first resynchronises, which proves the same)."""
        value = self.transport.command("guest-ping", None, timeout)
        if value != {}:
            raise AgentError("the agent's answer to guest-ping is not an empty object")

    def exec(self, path: str, args: Sequence[str], input_data: bytes | None = None,
             capture_output: bool = True, timeout: float = EXCHANGE_TIMEOUT) -> int:
        """Start ``path args...`` in the guest; its guest pid."""
        arguments: dict[str, Any] = {"path": path, "arg": list(args), "capture-output": capture_output}
        if input_data is not None:
            arguments["input-data"] = base64.b64encode(input_data).decode()
        answer = self.transport.command("guest-exec", arguments, timeout)
        if not isinstance(answer, dict):
            raise AgentError("the agent's answer to guest-exec is not an object")
        return _int(answer.get("pid"), "guest-exec pid", 1, 2**31)

    def exec_status(self, pid: int, output_limit: int, timeout: float = EXCHANGE_TIMEOUT) -> ExecStatus | None:
        """None while ``pid`` runs; else how it ended and its output (at most ``output_limit`` bytes)."""
        answer = self.transport.command("guest-exec-status", {"pid": pid}, timeout)
        if not isinstance(answer, dict):
            raise AgentError("the agent's answer to guest-exec-status is not an object")
        if not _bool(answer.get("exited"), "guest-exec-status 'exited'"):
            return None
        exitcode = answer.get("exitcode")
        signal = answer.get("signal")
        output = b""
        if "out-data" in answer:
            output = _base64(answer["out-data"], "output", output_limit)
        if "err-data" in answer:  # we merge stderr into stdout in the guest; anything here is appended
            output = (output + _base64(answer["err-data"], "error output", output_limit))[:output_limit]
        truncated = bool(answer.get("out-truncated") is True or answer.get("err-truncated") is True)
        return ExecStatus(exitcode=None if exitcode is None else _int(exitcode, "exit code", -(2**31), 2**31),
                          signal=None if signal is None else _int(signal, "signal number", 0, 255),
                          output=output, truncated=truncated)

    def run(self, path: str, args: Sequence[str], input_data: bytes | None, deadline: float,
            output_limit: int, alive: Callable[[], bool] = lambda: True,
            alive_every: float = 0.5) -> tuple[ExecStatus, float]:
        """Run a process to its end (guest-exec, then guest-exec-status with back-off) before ``deadline``.

        Returns its status and the seconds it ran. Raises AgentTimeout when
        it has not ended at ``deadline`` (monotonic), AgentError when the
        agent fails or ``alive()`` turns False.
        """
        started = self.clock()
        pid = self.exec(path, args, input_data, True, _left(deadline, self.clock, "guest-exec"))
        interval = POLL_FIRST
        checked = self.clock()
        while True:
            status = self.exec_status(pid, output_limit, min(EXCHANGE_TIMEOUT, _left(deadline, self.clock,
                                                                                     "guest-exec-status")))
            if status is not None:
                return status, self.clock() - started
            if self.clock() - checked >= alive_every:
                checked = self.clock()
                if not alive():
                    raise AgentError("the guest stopped while the process ran")
            if self.clock() + interval > deadline:
                raise AgentTimeout(f"the process (guest pid {pid}) did not end in time")
            self.sleep(interval)
            if self.clock() - started > POLL_FAST_FOR:
                interval = min(interval * 2, POLL_LONGEST)

    def write_file(self, path: str, content: bytes, timeout: float = EXCHANGE_TIMEOUT) -> None:
        """Write ``content`` to the guest file ``path`` (created or truncated), with the guest-file-* commands."""
        deadline = self.clock() + timeout
        handle = self.transport.command("guest-file-open", {"path": path, "mode": "w"},
                                        _left(deadline, self.clock, "guest-file-open"))
        handle = _int(handle, "file handle", 0, 2**62)
        try:
            for start in range(0, len(content), WRITE_CHUNK) if content else ():
                chunk = content[start:start + WRITE_CHUNK]
                answer = self.transport.command(
                    "guest-file-write", {"handle": handle, "buf-b64": base64.b64encode(chunk).decode()},
                    _left(deadline, self.clock, "guest-file-write"))
                if not isinstance(answer, dict) or _int(answer.get("count"), "written count", 0, 2**31) != len(chunk):
                    raise AgentError(f"the agent wrote less than asked to {path}")
        finally:
            try:
                self.transport.command("guest-file-close", {"handle": handle},
                                       max(_left_or_zero(deadline, self.clock), 1.0))
            except AgentError:
                pass  # the write's own error (if any) is what the caller hears

    def fsfreeze_freeze(self, timeout: float = EXCHANGE_TIMEOUT) -> int:
        """Freeze the guest's file systems (each is synced first); how many the guest says it froze."""
        answer = self.transport.command("guest-fsfreeze-freeze", None, timeout)
        return _int(answer, "guest-fsfreeze-freeze count", 0, 2**16)

    def fsfreeze_thaw(self, timeout: float = EXCHANGE_TIMEOUT) -> int:
        """Thaw the guest's file systems (nothing when none is frozen); how many the guest says it thawed."""
        answer = self.transport.command("guest-fsfreeze-thaw", None, timeout)
        return _int(answer, "guest-fsfreeze-thaw count", 0, 2**16)

    def fsfreeze_status(self, timeout: float = EXCHANGE_TIMEOUT) -> str:
        """'thawed' or 'frozen', as the guest says."""
        answer = self.transport.command("guest-fsfreeze-status", None, timeout)
        if answer not in ("thawed", "frozen"):
            raise AgentError("the agent's answer to guest-fsfreeze-status is neither 'thawed' nor 'frozen'")
        return str(answer)

    def set_time(self, nanoseconds: int, timeout: float = EXCHANGE_TIMEOUT) -> None:
        """Set the guest's clock to ``nanoseconds`` since the epoch (``guest-set-time``)."""
        answer = self.transport.command("guest-set-time", {"time": int(nanoseconds)}, timeout)
        if answer != {}:
            raise AgentError("the agent's answer to guest-set-time is not an empty object")

    def shutdown(self, timeout: float = EXCHANGE_TIMEOUT) -> None:
        """Ask the guest to power down. qemu-ga sends no answer to guest-shutdown: silence means it was sent."""
        try:
            self.transport.command("guest-shutdown", {"mode": "powerdown"}, timeout)
        except AgentTimeout:
            pass
        except AgentCommandError:
            raise
        except AgentError:
            pass  # the guest may close the channel as it goes down


def _left(deadline: float, clock: Callable[[], float], what: str) -> float:
    left = deadline - clock()
    if left <= 0:
        raise AgentTimeout(f"{what}: no time left")
    return left


def _left_or_zero(deadline: float, clock: Callable[[], float]) -> float:
    return max(deadline - clock(), 0.0)


__all__ = ["EXCHANGE_TIMEOUT", "ExecStatus", "GuestAgent"]
