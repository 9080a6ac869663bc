"""The guest agent's transport under UML: the relay's socket, with every request small enough for the line.

UML's serial line is a tty, and UML 6.1 loses it for good once the guest's
tty buffer fills (4 KiB unread: the tty throttles the line and UML never
re-enables its host descriptor; see :mod:`.relay`). The transport waits for
each answer before it sends the next request, so the line holds at most
one request at a time: keeping each request under :data:`MAX_REQUEST`
bytes keeps the line alive. :class:`SerialLineTransport` is the plant's
:class:`~vmplant_service.agent.transport.SocketTransport` with that one
rule, and carries the two large requests the plant sends as several small
ones, with the same results and within the same deadline:

- ``guest-file-write``: its ``buf-b64`` is written in pieces of at most
  :data:`WRITE_PIECE` base64 characters; the answer is the sum of their
  counts (``{"count": n, "eof": false}``);
- ``guest-exec`` with a large ``input-data`` (a script's body): the input
  is first written to a fresh file in the guest's ``/run`` (guest-file-*,
  in pieces), then the command runs under ``/bin/sh``, which takes its
  standard input from that file, removes it, and ``exec``s the original
  program with its arguments.

Any other request over the limit fails with an :class:`AgentError` before
it is sent. Everything else (deadlines, bounded answers, strict parsing,
resynchronisation, one command at a time per caller) is the base class's.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from ...agent.transport import AgentError, AgentTimeout, SocketTransport, encode_command

#: The largest request written to UML's serial line (bytes of JSON, with its newline): well under the
#: tty's 4 KiB, so that the request and a stale one (an abandoned command, the next sync) fit.
MAX_REQUEST = 2048
#: base64 characters of one guest-file-write piece (a multiple of 4: each piece decodes on its own).
WRITE_PIECE = 1536
#: The guest program that runs a command with its standard input from a file, which it removes first.
STDIN_FROM_FILE = 'f=$1; shift; exec <"$f" || exit 127; rm -f "$f"; exec "$@"'


class SerialLineTransport(SocketTransport):
    """A :class:`SocketTransport` whose requests never exceed :data:`MAX_REQUEST` bytes (module docstring)."""

    max_request = MAX_REQUEST

    def command(self, name: str, arguments: dict[str, Any] | None = None, timeout: float = 10.0) -> Any:
        if len(encode_command(name, arguments)) <= self.max_request:
            return super().command(name, arguments, timeout)
        deadline = time.monotonic() + timeout
        if name == "guest-file-write" and arguments is not None and isinstance(arguments.get("buf-b64"), str):
            return self._write_in_pieces(arguments, deadline)
        if name == "guest-exec" and arguments is not None and isinstance(arguments.get("input-data"), str):
            return self._exec_with_input_file(arguments, deadline)
        raise AgentError(f"{name}: the request is larger than UML's serial line takes ({self.max_request} bytes)")

    def _left(self, deadline: float, what: str) -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AgentTimeout(f"{what}: no answer in time")
        return left

    def _write_in_pieces(self, arguments: dict[str, Any], deadline: float) -> dict[str, Any]:
        data: str = arguments["buf-b64"]
        rest = {key: value for key, value in arguments.items() if key != "buf-b64"}
        total = 0
        for start in range(0, len(data), WRITE_PIECE):
            answer = super().command("guest-file-write", {**rest, "buf-b64": data[start:start + WRITE_PIECE]},
                                     self._left(deadline, "guest-file-write"))
            count = answer.get("count") if isinstance(answer, dict) else None
            if type(count) is not int or count < 0:
                raise AgentError("the agent's answer to guest-file-write has no count")
            total += count
        return {"count": total, "eof": False}

    def _exec_with_input_file(self, arguments: dict[str, Any], deadline: float) -> Any:
        path = f"/run/vmshop-stdin-{secrets.token_hex(8)}"
        handle = super().command("guest-file-open", {"path": path, "mode": "w"}, self._left(deadline, "guest-exec"))
        if type(handle) is not int:
            raise AgentError("the agent's answer to guest-file-open is not a handle")
        try:
            self._write_in_pieces({"handle": handle, "buf-b64": arguments["input-data"]}, deadline)
        finally:
            try:
                super().command("guest-file-close", {"handle": handle}, max(deadline - time.monotonic(), 1.0))
            except AgentError:
                pass  # the write's own error (if any) is what the caller hears
        original = [arguments.get("path", ""), *arguments.get("arg", [])]
        rewritten = {key: value for key, value in arguments.items() if key not in ("input-data", "path", "arg")}
        rewritten.update(path="/bin/sh", arg=["-c", STDIN_FROM_FILE, "vmshop-stdin", path, *original])
        if len(encode_command("guest-exec", rewritten)) > self.max_request:
            raise AgentError(f"guest-exec: the command is larger than UML's serial line takes ({self.max_request} "
                             "bytes)")
        return super().command("guest-exec", rewritten, self._left(deadline, "guest-exec"))


__all__ = ["MAX_REQUEST", "STDIN_FROM_FILE", "WRITE_PIECE", "SerialLineTransport"]
