"""conftest's guard: a unit test that opens a non-loopback socket fails unless it is marked ``network``.

Nothing here sends a packet anywhere: the guard refuses before the system
call, and the marked test only checks that the guard is off.
"""

from __future__ import annotations

import socket

import pytest
from socket_guard import NonLoopbackSocketError, SocketGuard, is_loopback

_C_CONNECT = socket.socket.__mro__[1].__dict__["connect"]  # _socket.socket's own


@pytest.mark.parametrize("address, loopback", [
    (("127.0.0.1", 80), True), (("127.9.9.9", 80), True), (("::1", 80, 0, 0), True), (("localhost", 80), True),
    (("192.0.2.1", 80), False), (("0.0.0.0", 0), False), (("", 0), False), (("::", 0, 0, 0), False),
    (("example.org", 80), False), (("2001:db8::1", 80, 0, 0), False),
])
def test_what_counts_as_loopback(address: tuple[object, ...], loopback: bool) -> None:
    assert is_loopback(address) is loopback


@pytest.mark.parametrize("call", ["connect", "connect_ex", "bind", "sendto"])
def test_non_loopback_is_refused_and_recorded(socket_guard: SocketGuard, call: str) -> None:
    kind = socket.SOCK_DGRAM if call == "sendto" else socket.SOCK_STREAM
    with socket.socket(socket.AF_INET, kind) as sock:
        with pytest.raises(NonLoopbackSocketError, match="mark it @pytest.mark.network"):
            if call == "sendto":
                sock.sendto(b"x", ("192.0.2.1", 9))
            elif call == "bind":
                sock.bind(("0.0.0.0", 0))  # every interface
            else:
                getattr(sock, call)(("192.0.2.1", 9))
    assert len(socket_guard.violations) == 1
    socket_guard.violations.clear()  # this test's own refusal: not a failure of it


def test_swallowed_refusals_still_fail_the_test(socket_guard: SocketGuard) -> None:
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(("2001:db8::1", 9, 0, 0))
        except OSError:
            pass  # what a client that takes it for a host that is down would do
    assert socket_guard.violations  # the fixture fails the test at teardown
    socket_guard.violations.clear()


def test_loopback_and_unix_sockets_pass(socket_guard: SocketGuard, tmp_path: object) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        with socket.create_connection(server.getsockname(), timeout=5):
            pass
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unix:
        unix.bind(f"{tmp_path}/s")
    assert socket_guard.violations == []


@pytest.mark.network
def test_a_marked_test_is_not_guarded(socket_guard: SocketGuard | None) -> None:
    assert socket_guard is None
    assert "connect" not in socket.socket.__dict__
    assert socket.socket.connect is _C_CONNECT
