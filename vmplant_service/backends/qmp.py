"""A tiny QMP client: plain JSON lines over QEMU's unix control socket.

One :class:`QMPClient` is one connection: it reads QEMU's greeting, leaves
capabilities negotiation mode, then runs commands one at a time. Every read
and write has a deadline; asynchronous events that arrive between replies
are skipped. Any failure (no socket, refused, timeout, a QMP error reply,
the connection closing) raises :class:`QMPError`, a ``BackendError``.

QEMU serves one QMP client at a time per socket (others queue in the
listen backlog), so keep connections short: connect, ask, close.
"""

from __future__ import annotations

import itertools
import json
import socket
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from vmshop_common.errors import BackendError

#: Longest line QEMU may send us; anything longer is a broken peer.
MAX_LINE = 1024 * 1024


class QMPError(BackendError):
    """A QMP connection or command failed. ``error_class`` is QMP's ``class`` for error replies."""

    def __init__(self, message: str, error_class: str | None = None) -> None:
        super().__init__(message)
        self.error_class = error_class


class QMPClient:
    """A QMP connection to the unix socket ``path``; ``timeout`` bounds each step in seconds."""

    def __init__(self, path: str | Path, timeout: float = 5.0) -> None:
        self.path = str(path)
        self.timeout = timeout
        self._buffer = b""
        self._ids = itertools.count(1)
        self._sock: socket.socket | None = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            deadline = time.monotonic() + timeout
            self._connect(deadline)
            greeting = self._read_message(deadline)
            if "QMP" not in greeting:
                raise QMPError(f"{self.path} is not a QMP socket (greeting {greeting!r})")
            self.execute("qmp_capabilities")
        except OSError as exc:
            self.close()
            raise QMPError(f"cannot talk QMP on {self.path}: {exc}") from None
        except BaseException:
            self.close()
            raise

    def _connect(self, deadline: float) -> None:
        """Connect before ``deadline``, waiting while QEMU's listen backlog is full.

        QEMU listens with a backlog of one and does not accept while a client
        is connected, so a connect right after another client's (or just
        after our own previous connection closed, before QEMU's main loop saw
        it) can fail at once with EAGAIN: that is "busy", not "gone".
        """
        assert self._sock is not None
        pause = 0.005
        while True:
            self._sock.settimeout(max(deadline - time.monotonic(), 0.001))
            try:
                self._sock.connect(self.path)
                return
            except BlockingIOError:
                if time.monotonic() + pause > deadline:
                    raise QMPError(f"QMP on {self.path} stayed busy (another client) for {self.timeout:g} s") from None
                time.sleep(pause)
                pause = min(pause * 2, 0.1)

    def __enter__(self) -> QMPClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def execute(self, command: str, arguments: dict[str, Any] | None = None, fds: tuple[int, ...] = ()) -> Any:
        """Run ``command`` and return its ``return`` value (a dict for the commands the backend uses).

        ``fds``: file descriptors sent with the command (SCM_RIGHTS), as ``getfd`` wants them."""
        if self._sock is None:
            raise QMPError(f"the QMP connection to {self.path} is closed")
        request_id = next(self._ids)
        request: dict[str, Any] = {"execute": command, "id": request_id}
        if arguments:
            request["arguments"] = arguments
        deadline = time.monotonic() + self.timeout
        try:
            self._sock.settimeout(self.timeout)
            data = json.dumps(request).encode() + b"\n"
            if fds:
                sent = socket.send_fds(self._sock, [data], list(fds))
                if sent < len(data):
                    self._sock.sendall(data[sent:])
            else:
                self._sock.sendall(data)
            while True:
                reply = self._read_message(deadline)
                if "event" in reply:
                    continue
                if reply.get("id") != request_id:
                    continue  # a reply to someone else's request (never ours to read)
                if "error" in reply:
                    error = reply["error"] or {}
                    raise QMPError(f"QMP {command} failed: {error.get('desc', error)}", error.get("class"))
                return reply.get("return", {})
        except OSError as exc:
            self.close()
            raise QMPError(f"QMP {command} on {self.path} failed: {exc}") from None

    def close(self) -> None:
        """Close the connection (safe to repeat)."""
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    def _read_message(self, deadline: float) -> dict[str, Any]:
        """The next JSON object QEMU sends, read before ``deadline``."""
        assert self._sock is not None
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise QMPError(f"QMP on {self.path}: no answer within {self.timeout:g} s")
            self._sock.settimeout(left)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                raise QMPError(f"QMP on {self.path}: no answer within {self.timeout:g} s") from None
            if not chunk:
                raise QMPError(f"QMP on {self.path}: QEMU closed the connection")
            self._buffer += chunk
            if len(self._buffer) > MAX_LINE:
                raise QMPError(f"QMP on {self.path}: a message longer than {MAX_LINE} bytes")
        line, self._buffer = self._buffer.split(b"\n", 1)
        try:
            message = json.loads(line)
        except ValueError:
            raise QMPError(f"QMP on {self.path}: not JSON: {line[:200]!r}") from None
        if not isinstance(message, dict):
            raise QMPError(f"QMP on {self.path}: not a JSON object: {line[:200]!r}")
        return message
