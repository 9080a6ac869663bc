"""The plant's own VDE plug (vmplant_service/backends/vdeplug.py) against a real vde_switch."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmplant_service.backends.vdeplug import plug
from vmplant_service.segment import VdeSegment
from vmshop_common.errors import BackendError

BROADCAST = bytes.fromhex("ffffffffffff")


@pytest.fixture()
def switch() -> Iterator[VdeSegment]:
    with tempfile.TemporaryDirectory(prefix="vdeplug-", dir="/tmp") as tmp:
        segment = VdeSegment(Path(tmp) / "segment")
        segment.start()
        try:
            yield segment
        finally:
            segment.stop()


def frame(source: int, payload: bytes) -> bytes:
    return BROADCAST + bytes.fromhex(f"5254000000{source:02x}") + b"\x88\xb5" + payload.ljust(46, b"\0")


def test_two_plugs_on_one_switch_exchange_frames(switch: VdeSegment) -> None:
    first, second = plug(switch.control, "test 1"), plug(switch.control, "test 2")
    try:
        first[1].send(frame(1, b"hello"))
        second[1].settimeout(5)
        assert second[1].recv(2048) == frame(1, b"hello")
        second[1].send(frame(2, b"back"))
        first[1].settimeout(5)
        assert first[1].recv(2048) == frame(2, b"back")
        assert [p.name for p in switch.control.iterdir() if p.name.startswith(".")] == []  # nothing left bound
        assert first[0].type == socket.SOCK_STREAM and first[1].type == socket.SOCK_DGRAM
    finally:
        for sock in (*first, *second):
            sock.close()


def test_the_port_ends_with_its_control_socket(switch: VdeSegment) -> None:
    first, second = plug(switch.control), plug(switch.control)
    first[0].close()  # the switch frees the port: frames sent on the segment no longer reach it
    received = []
    try:
        first[1].settimeout(0.5)
        for _ in range(3):
            second[1].send(frame(2, b"anyone"))
            try:
                received.append(first[1].recv(2048))
            except OSError:  # a timeout, or the switch's end gone
                pass
    finally:
        for sock in (first[1], *second):
            sock.close()
    assert received[1:] == []  # (the first frame may have been on its way while the switch noticed)


def test_a_switch_deep_in_a_long_path() -> None:
    """Unix socket paths are at most 107 bytes: a switch whose own sockets just fit must do (the state dir is deep)."""
    root = Path(tempfile.mkdtemp(prefix="vdeplug-", dir="/tmp"))
    filler = 100 - len(str(root / "x" / "segment" / "switch.ctl"))
    segment = VdeSegment(root / ("d" * (filler + 1)) / "segment")
    assert len(str(segment.control)) == 100  # its "ctl" fits; a name bound beside it (".PID-NNNNN") would not
    try:
        segment.start()
        ends = plug(segment.control)
        for sock in ends:
            sock.close()
    finally:
        segment.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_no_switch(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="cannot plug"):
        plug(tmp_path / "nothing")
    assert os.listdir(tmp_path) == []
