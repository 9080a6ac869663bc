"""Guest consoles kept on the host with a hard size bound.

A hypervisor writes a guest's serial console to a unix socket it serves
(QEMU: ``-chardev socket,server=on,wait=off``); a :class:`ConsoleKeeper`
thread connects to it and appends what it reads to ``console.log``. When
that file reaches ``limit`` bytes it is renamed ``console.log.1`` (replacing
the previous one) and a new one is begun: a guest's console never holds
more than ``2 * limit`` bytes of the host's disk, however much it writes.
While nobody reads the socket (the plant is down), QEMU drops the console's
output instead of blocking the guest.

The keeper only ever opens paths the backend gave it (in a VM's run
directory, which no guest can write); what the guest writes is data,
never a name. One thread serves every console of a backend.
"""

from __future__ import annotations

import logging
import os
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

#: Default size at which a console log is rotated (bytes).
DEFAULT_LIMIT = 256 * 1024
#: Seconds between attempts to connect to a console socket that is not there (yet).
RETRY = 0.5
READ_CHUNK = 65536


@dataclass
class _Console:
    socket_path: Path
    log_path: Path
    sock: socket.socket | None = None
    next_try: float = 0.0
    written: int = 0
    closed: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


class ConsoleKeeper:
    """Reads guest consoles into size-bounded logs (see the module docstring)."""

    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        self.limit = limit
        self._consoles: dict[str, _Console] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Made with the thread, on the first keep(): a backend that keeps no console holds no descriptors.
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._selector: selectors.BaseSelector | None = None

    def keep(self, key: str, socket_path: Path, log_path: Path) -> None:
        """Start keeping the console behind ``socket_path`` in ``log_path`` (replacing any for ``key``)."""
        self.forget(key)
        console = _Console(Path(socket_path), Path(log_path))
        try:
            console.written = os.stat(log_path).st_size
        except OSError:
            console.written = 0
        with self._lock:
            self._consoles[key] = console
            if self._thread is None or not self._thread.is_alive():
                if self._selector is None:
                    self._wake_r, self._wake_w = socket.socketpair()
                    self._selector = selectors.DefaultSelector()
                    self._selector.register(self._wake_r, selectors.EVENT_READ, None)
                self._stop.clear()
                self._thread = threading.Thread(target=self._run, daemon=True, name="console-keeper")
                self._thread.start()
        self._wake()

    def forget(self, key: str) -> None:
        """Stop keeping ``key``'s console (its log files stay)."""
        with self._lock:
            console = self._consoles.pop(key, None)
        if console is not None:
            with console.lock:
                console.closed = True
                self._close(console)

    def close(self) -> None:
        """Stop the thread and every console."""
        with self._lock:
            keys = list(self._consoles)
        for key in keys:
            self.forget(key)
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(5)
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                if self._selector is not None:
                    self._selector.close()
                for sock in (self._wake_r, self._wake_w):
                    if sock is not None:
                        sock.close()
                self._selector = self._wake_r = self._wake_w = None
                self._thread = None

    # The thread ----------------------------------------------------------------------
    def _wake(self) -> None:
        if self._wake_w is not None:
            try:
                self._wake_w.send(b"x")
            except OSError:
                pass

    def _close(self, console: _Console) -> None:
        if console.sock is not None:
            try:
                if self._selector is not None:
                    self._selector.unregister(console.sock)
            except (KeyError, ValueError):
                pass
            console.sock.close()
            console.sock = None

    def _run(self) -> None:
        selector, wake = self._selector, self._wake_r
        assert selector is not None and wake is not None
        while not self._stop.is_set():
            now = time.monotonic()
            with self._lock:
                consoles = list(self._consoles.values())
            for console in consoles:
                if console.sock is None and now >= console.next_try:
                    self._connect(console)
            try:
                events = selector.select(RETRY)
            except (OSError, ValueError):
                events = []
            for key, _ in events:
                if key.data is None:
                    try:
                        wake.recv(4096)
                    except OSError:
                        pass
                    continue
                self._read(key.data)

    def _connect(self, console: _Console) -> None:
        with console.lock:
            if console.closed:
                return
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                sock.connect(str(console.socket_path))
            except OSError:
                sock.close()
                console.next_try = time.monotonic() + RETRY
                return
            if self._selector is None:
                sock.close()
                return
            console.sock = sock
            self._selector.register(sock, selectors.EVENT_READ, console)

    def _read(self, console: _Console) -> None:
        with console.lock:
            if console.sock is None:
                return
            try:
                data = console.sock.recv(READ_CHUNK)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:  # the hypervisor went away: try again later (an adopted VM's QEMU may still be there)
                self._close(console)
                console.next_try = time.monotonic() + RETRY
                return
            self._append(console, data)

    def _append(self, console: _Console, data: bytes) -> None:
        while data:
            room = self.limit - console.written
            if room <= 0:
                try:
                    os.replace(console.log_path, console.log_path.with_name(console.log_path.name + ".1"))
                except OSError:
                    pass
                console.written = 0
                room = self.limit
            part, data = data[:room], data[room:]
            try:
                fd = os.open(console.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
                try:
                    os.write(fd, part)
                finally:
                    os.close(fd)
            except OSError as exc:
                log.warning("cannot write the console log %s: %s", console.log_path, exc)
                return
            console.written += len(part)


def console_tail(log_path: Path, limit: int = 2000) -> str:
    """The last ``limit`` bytes of a kept console (its rotated part included), as text."""
    parts = []
    for path in (log_path.with_name(log_path.name + ".1"), log_path):
        try:
            with open(path, "rb") as handle:
                handle.seek(0, os.SEEK_END)
                handle.seek(max(handle.tell() - limit, 0))
                parts.append(handle.read())
        except OSError:
            continue
    return b"".join(parts)[-limit:].decode(errors="replace").strip()


__all__ = ["DEFAULT_LIMIT", "ConsoleKeeper", "console_tail"]
