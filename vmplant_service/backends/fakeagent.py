"""A fake QEMU guest agent on a unix socket: the fake backend's guest, for tests.

It speaks the protocol the plant's :class:`~vmplant_service.agent.transport.SocketTransport`
speaks with a real qemu-ga (JSON lines; a 0xFF byte resets its parser;
``guest-sync-delimited`` answers behind a 0xFF; ``guest-shutdown`` sends no
answer), but runs nothing: a process it "starts" ends at once with the output
``fake: <first line of its standard input>`` (or ``fake: <its arguments>``
when it has none) and status 0, unless what it was given (standard input,
arguments, or a file it was asked to write and is now chmod'ed) holds a
marker: ``FAKE_FAIL`` (status 1), ``FAKE_STATUS=<n>`` (status n), or
``FAKE_HANG`` (it runs until the timeout the plant's wrapper was given, then
ends with 137, as ``timeout -s KILL`` would); ``FAKE_SLEEP=<seconds>`` makes
it run that long (at most its timeout) and then succeed; ``FAKE_AGENT_ERROR``
makes the agent answer that process's status out of shape (an exit code that
is not an integer), as a broken or hostile guest's agent might.

The plant's wait for cloud-init (``vmshop-cloud-init``) is answered as a
cloud-init guest would answer it: with no ``seed`` the guest has no
cloud-init (status 124, no result); with one, a NoCloud result read from the
seed, whose errors list holds ``FAKE_CLOUD_INIT_ERROR`` if its user data does.

``guest-fsfreeze-*`` freeze and thaw one pretended file system, and refuse
to freeze in a guest that was given the file :data:`NO_FREEZE`.

One thread serves one client at a time, as QEMU's chardev does. Commands
before ``ready_at`` (the end of the fake boot) are held, as a real guest's
port holds them until its agent starts.
"""

from __future__ import annotations

import base64
import json
import os
import re
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STATUS_MARKER = re.compile(r"FAKE_STATUS=(\d+)")
SLEEP_MARKER = re.compile(r"FAKE_SLEEP=(\d+(?:\.\d+)?)")
#: A file that, once a guest was given it, makes its guest-fsfreeze-freeze fail.
NO_FREEZE = "/etc/vmshop-fake-no-fsfreeze"
POLL = 0.02
MAX_LINE = 4 * 1024 * 1024


@dataclass
class _Process:
    started: float
    ends: float
    status: int
    output: bytes
    garbled: bool = False


class FakeAgent:
    """One fake guest's agent listening on ``path`` (see the module docstring)."""

    def __init__(self, path: Path, ready_at: float, on_shutdown: Callable[[], None] = lambda: None,
                 name: str = "", seed: Path | None = None) -> None:
        self.path = Path(path)
        self.seed = seed
        self.ready_at = ready_at
        self.on_shutdown = on_shutdown
        self._stop = threading.Event()
        self._retired = threading.Event()
        self._processes: dict[int, _Process] = {}
        self._files: dict[int, tuple[str, bytearray]] = {}
        self._written: dict[str, bytes] = {}
        self._next = 1000
        #: Whether the guest's (one, pretended) file system is frozen (guest-fsfreeze-*).
        self.frozen = False
        #: The clock the guest was set to (guest-set-time), in nanoseconds since the epoch.
        self.time_set: int | None = None
        #: The argument lists of the processes it "ran" (the latest 256), and the files it was given.
        self.execs: list[list[str]] = []
        self.path.unlink(missing_ok=True)
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(self.path))
        os.chmod(self.path, 0o600)
        self._inode = os.stat(self.path).st_ino
        self._server.listen(4)
        self._thread = threading.Thread(target=self._serve, daemon=True,
                                        name=f"fake-qga-{name or self.path.parent.name}")
        self._thread.start()

    def retire(self) -> None:
        """Take no new connection; the one being served goes on until its client closes it (or stop())."""
        self._retired.set()

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop serving and remove the socket; False if the thread did not end in time."""
        self._stop.set()
        self._thread.join(timeout)
        try:
            if os.stat(self.path).st_ino == self._inode:  # not the socket of an agent that took over
                self.path.unlink()
        except OSError:
            pass
        return not self._thread.is_alive()

    # Serving ------------------------------------------------------------------------
    def _serve(self) -> None:
        with self._server, selectors.DefaultSelector() as selector:
            selector.register(self._server, selectors.EVENT_READ)
            while not self._stop.is_set() and not self._retired.is_set():
                if not selector.select(POLL):
                    continue
                try:
                    client, _ = self._server.accept()
                except OSError:
                    continue
                with client:
                    self._talk(client)

    def _talk(self, client: socket.socket) -> None:
        buffer = b""
        client.settimeout(POLL)
        while not self._stop.is_set():
            try:
                chunk = client.recv(65536)
            except TimeoutError:
                chunk = None
            except OSError:
                return
            if chunk == b"":
                return
            if chunk:
                buffer += chunk
            while time.monotonic() >= self.ready_at and not self._stop.is_set():
                reset = buffer.rfind(b"\xff")
                if reset >= 0:
                    buffer = buffer[reset + 1:]  # qemu-ga drops a partial command at 0xFF
                index = buffer.find(b"\n")
                if index < 0:
                    if len(buffer) > MAX_LINE:
                        buffer = b""
                    break
                line, buffer = buffer[:index], buffer[index + 1:]
                if not line.strip():
                    continue
                answer = self._answer(line)
                if answer is None:
                    continue
                try:
                    client.sendall(answer)
                except OSError:
                    return

    def _answer(self, line: bytes) -> bytes | None:
        try:
            request = json.loads(line)
            command = request["execute"]
            arguments = request.get("arguments") or {}
        except (ValueError, KeyError, TypeError):
            return _error("GenericError", "JSON parse error")
        if command == "guest-sync-delimited":
            return b"\xff" + _json({"return": arguments.get("id")})
        if command == "guest-shutdown":
            self.on_shutdown()
            return None  # qemu-ga never answers guest-shutdown
        try:
            return _json({"return": self._run(command, arguments)})
        except _Refused as exc:
            return _error("GenericError", str(exc))

    def _run(self, command: str, arguments: dict[str, Any]) -> Any:
        if command == "guest-sync":
            return arguments.get("id")
        if command == "guest-ping":
            return {}
        if command == "guest-exec":
            return {"pid": self._exec(arguments)}
        if command == "guest-exec-status":
            process = self._processes.get(arguments.get("pid", -1))
            if process is None:
                raise _Refused("Invalid parameter 'pid'")
            if time.monotonic() < process.ends:
                return {"exited": False}
            del self._processes[arguments["pid"]]
            return {"exited": True, "exitcode": "garbage" if process.garbled else process.status,
                    "out-data": base64.b64encode(process.output).decode()}
        if command == "guest-file-open":
            handle = self._new_id()
            self._files[handle] = (str(arguments.get("path", "")), bytearray())
            return handle
        if command == "guest-file-write":
            path, data = self._file(arguments)
            chunk = base64.b64decode(arguments.get("buf-b64", ""))
            data += chunk
            return {"count": len(chunk), "eof": False}
        if command == "guest-file-close":
            path, data = self._file(arguments)
            self._written[path] = bytes(data)
            del self._files[arguments["handle"]]
            return {}
        if command in ("guest-fsfreeze-freeze", "guest-fsfreeze-thaw", "guest-fsfreeze-status"):
            return self._fsfreeze(command)
        if command == "guest-set-time":
            if self.frozen:
                raise _Refused("Command guest-set-time has been disabled: file systems are frozen")
            value = arguments.get("time")
            if type(value) is not int:
                raise _Refused("Invalid parameter type for 'time', expected: integer")
            self.time_set = value
            return {}
        raise _Refused(f"The command {command} has not been found")

    def _fsfreeze(self, command: str) -> Any:
        """One file system, frozen and thawed as qemu-ga does it; a guest that was given the file
        :data:`NO_FREEZE` (a ``file`` action) refuses to freeze, as a guest whose agent blocks the command does."""
        if command == "guest-fsfreeze-status":
            return "frozen" if self.frozen else "thawed"
        if command == "guest-fsfreeze-thaw":
            thawed, self.frozen = int(self.frozen), False
            return thawed
        if NO_FREEZE in self._written:
            raise _Refused("Command guest-fsfreeze-freeze has been disabled")
        if self.frozen:
            raise _Refused("The command guest-fsfreeze-freeze has been disabled: file systems are frozen already")
        self.frozen = True
        return 1

    @property
    def files(self) -> dict[str, bytes]:
        """The files the guest was given (guest-file-*), by path."""
        return dict(self._written)

    def _file(self, arguments: dict[str, Any]) -> tuple[str, bytearray]:
        entry = self._files.get(arguments.get("handle", -1))
        if entry is None:
            raise _Refused("Invalid parameter 'handle'")
        return entry

    def _new_id(self) -> int:
        self._next += 1
        return self._next

    def _exec(self, arguments: dict[str, Any]) -> int:
        args = [str(a) for a in arguments.get("arg") or []]
        if self.frozen:  # as qemu-ga: only a few commands run while the file systems are frozen
            raise _Refused("Command guest-exec has been disabled: file systems are frozen")
        self.execs = (self.execs + [args])[-256:]
        given = base64.b64decode(arguments.get("input-data", "") or "").decode(errors="replace")
        # A file action's chmod carries the markers of the content written before it.
        marked = given + "\n".join(args) + "".join(
            self._written.get(a, b"").decode(errors="replace") for a in args)
        first = next((line.strip() for line in given.splitlines() if line.strip()), "")
        output = f"fake: {first or ' '.join(args[2:] if args[:1] == ['-c'] else args)}\n"
        now = time.monotonic()
        ends, status = now, 0
        if args[2:3] == ["vmshop-cloud-init"]:
            output, status = self._cloud_init()
        elif "FAKE_HANG" in marked:
            ends, status = now + _timeout_of(args), 137
            output += "fake: killed after its timeout\n"
        elif "FAKE_FAIL" in marked:
            status = 1
        elif (found := STATUS_MARKER.search(marked)) is not None:
            status = int(found.group(1)) % 256
        if (slept := SLEEP_MARKER.search(marked)) is not None and status == 0:
            ends = now + min(float(slept.group(1)), _timeout_of(args))
        pid = self._new_id()
        self._processes[pid] = _Process(now, ends, status, output.encode(), garbled="FAKE_AGENT_ERROR" in marked)
        return pid


    def _cloud_init(self) -> tuple[str, int]:
        """What the plant's cloud-init wait prints in this fake guest, and its status."""
        if self.seed is None:
            return "no /run/cloud-init/result.json yet\n", 124
        from ..seed import read_seed

        user_data = read_seed(self.seed).get("user-data", b"").decode(errors="replace")
        errors = ["FAKE_CLOUD_INIT_ERROR in the user data"] if "FAKE_CLOUD_INIT_ERROR" in user_data else []
        return json.dumps({"v1": {"datasource": "DataSourceNoCloud [seed=/dev/vdb][dsmode=net]",
                                  "errors": errors}}), 0


class _Refused(Exception):
    pass


def _timeout_of(args: list[str]) -> float:
    """The timeout the plant's wrapper was given (its last argument), else 300 s."""
    try:
        value = float(args[-1])
    except (IndexError, ValueError):
        return 300.0
    return value if value > 0 else 300.0


def _json(value: Any) -> bytes:
    return json.dumps(value).encode() + b"\n"


def _error(error_class: str, description: str) -> bytes:
    return _json({"error": {"class": error_class, "desc": description}})


__all__ = ["FakeAgent"]
