"""The plant's own end of a VDE plug: a port on a switch, as two descriptors to hand to a hypervisor.

A hypervisor that runs as an unprivileged user from the start (QEMU under
libvirt) cannot open the plant's switches itself: their directories are
0700 (see :mod:`vmplant_service.segment`). So the backend, which can,
plugs into the switch and passes the hypervisor the result; the
hypervisor then reaches exactly that one port and nothing else.

This is the handshake of VDE's ``libvdeplug`` (vdeplug4's ``vde`` module,
spoken by ``vde_switch`` 2.3): connect a stream socket to the switch's
``ctl`` socket; bind a datagram socket to a fresh name; send a request
(magic ``0xfeedface``, version 3, type "new port", that name, a
description); the switch answers the name of the port's own datagram
socket, which the datagram socket connects to. The bound name (in a
private directory of this process, as unix socket paths must be short) is
removed at once: the switch's socket is connected to it, and a connected
datagram socket takes datagrams from its peer only. The control socket is
reached through ``/proc/self/fd`` (a descriptor of the switch's
directory), so a switch deep in the plant's state directory is no problem
for the 107-byte limit either.
From then on each datagram is one Ethernet frame, and the port lives as
long as the stream socket stays open: whoever holds both descriptors owns
the port.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import tempfile
from pathlib import Path

from vmshop_common.errors import BackendError

SWITCH_MAGIC = 0xFEEDFACE
REQUEST_VERSION = 3
REQ_NEW_CONTROL = 0
#: sizeof(struct sockaddr_un) on Linux: sa_family (2 bytes) and sun_path (108).
SOCKADDR_UN = struct.Struct("=H108s")
REQUEST_HEADER = struct.Struct("=III")
MAX_DESCRIPTION = 127
SECONDS = 5.0


def plug(control: Path | str, description: str = "vmshop") -> tuple[socket.socket, socket.socket]:
    """A new port on the switch whose control directory is ``control``: (stream, datagram) sockets.

    The caller owns both (close them, or hand them on). BackendError if the
    switch is not there or refuses.
    """
    control = Path(control)
    ctl = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    data = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    private: str | None = None
    try:
        ctl.settimeout(SECONDS)
        directory = os.open(control, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            ctl.connect(f"/proc/self/fd/{directory}/ctl")
        finally:
            os.close(directory)
        private = tempfile.mkdtemp(prefix="vmshop-vde-", dir="/tmp")
        bound = os.path.join(private, "plug")
        data.bind(bound)
        request = (REQUEST_HEADER.pack(SWITCH_MAGIC, REQUEST_VERSION, REQ_NEW_CONTROL)
                   + SOCKADDR_UN.pack(socket.AF_UNIX, bound.encode())
                   + description.encode()[:MAX_DESCRIPTION])
        ctl.sendall(request)
        reply = ctl.recv(SOCKADDR_UN.size)
        if len(reply) < 3:
            raise BackendError(f"the switch at {control} refused a new port")
        family, path = SOCKADDR_UN.unpack(reply.ljust(SOCKADDR_UN.size, b"\0"))
        port = path.split(b"\0", 1)[0].decode(errors="replace")
        if family != socket.AF_UNIX or not port:
            raise BackendError(f"the switch at {control} answered no port")
        data.connect(port)
        ctl.settimeout(None)
        return ctl, data
    except (OSError, BackendError) as exc:
        ctl.close()
        data.close()
        if isinstance(exc, BackendError):
            raise
        raise BackendError(f"cannot plug into the switch at {control}: {exc.strerror or exc}") from None
    finally:
        if private is not None:
            shutil.rmtree(private, ignore_errors=True)

__all__ = ["plug"]
