"""No network in unit tests unless marked: a test that opens a non-loopback socket fails.

While a test runs (``conftest.py``'s autouse fixture), ``connect``,
``connect_ex``, ``bind`` and ``sendto`` of every ``socket.socket`` of the
test process check the address: an IPv4/IPv6 address that is not loopback,
the wildcard address (``""``, ``0.0.0.0``, ``::``: every interface) or a
host name other than ``localhost`` raises :class:`NonLoopbackSocketError`
(an ``OSError``, so nothing leaves) and is recorded; the test then fails
at teardown even if the code under test swallowed the error (a shop would
take it for a plant that is down). Unix, netlink and other families are
not network and pass. A test marked ``@pytest.mark.network`` is not
guarded.

Only this process is guarded: servers, QEMUs and clients the tests start as
subprocesses are held to loopback by the addresses the tests give them.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from typing import Any

MARKER = "network"


class NonLoopbackSocketError(OSError):
    """A unit test tried to use a non-loopback address (see the module)."""


def is_loopback(address: Any) -> bool:
    """Whether an AF_INET/AF_INET6 socket address is on the loopback interface (the wildcard is not)."""
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    if not isinstance(host, str):
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False  # another host name, or "" (every interface)


class SocketGuard:
    """Installs the checks on ``socket.socket`` and records what they refused."""

    METHODS = ("connect", "connect_ex", "bind")

    def __init__(self) -> None:
        self.violations: list[str] = []
        self._saved: dict[str, Any] = {}

    def _check(self, sock: socket.socket, what: str, address: Any) -> None:
        if sock.family not in (socket.AF_INET, socket.AF_INET6) or is_loopback(address):
            return
        message = f"{what}({address!r}) on a non-loopback address in a unit test (mark it @pytest.mark.{MARKER})"
        self.violations.append(message)
        sock.close()  # the test fails anyway: its socket must not outlive it (a later test's GC would report it)
        raise NonLoopbackSocketError(message)

    def _wrap(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        guard = self

        def guarded(sock: socket.socket, address: Any, *args: Any) -> Any:
            guard._check(sock, name, address)
            return original(sock, address, *args)

        guarded.__name__ = name
        return guarded

    def _sendto(self, original: Callable[..., Any]) -> Callable[..., Any]:
        guard = self

        def sendto(sock: socket.socket, data: Any, *args: Any) -> Any:
            if args:
                guard._check(sock, "sendto", args[-1])
            return original(sock, data, *args)

        return sendto

    def install(self) -> None:
        for name in self.METHODS:
            self._saved[name] = socket.socket.__dict__.get(name)
            setattr(socket.socket, name, self._wrap(name, getattr(socket.socket, name)))
        self._saved["sendto"] = socket.socket.__dict__.get("sendto")
        socket.socket.sendto = self._sendto(socket.socket.sendto)  # type: ignore[method-assign]

    def uninstall(self) -> None:
        for name, saved in self._saved.items():
            if saved is None:
                delattr(socket.socket, name)  # the C method of _socket.socket shows through again
            else:
                setattr(socket.socket, name, saved)
        self._saved.clear()
