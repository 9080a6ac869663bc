"""UML's command line: its host options (memory, disk, lines, NICs), then the image's kernel words.

UML reads its host-side options from the same command line as the guest
kernel's, so the image's words are filtered (:func:`guest_cmdline`): a word
that would give the guest a host resource (``hostfs=``, ``ubd1=``,
``eth0=``, ``con0=``, ``mconsole``...) is never passed.

The lines and NICs are host descriptors that the relay gives UML at fixed
numbers (:data:`AGENT_FD`, :data:`CONSOLE_FD`, ``NIC_FD_BASE + N``):

- ``ssl0=fd:AGENT_FD``: the guest's ``/dev/ttyS0``, where qemu-ga runs
  (``-m isa-serial``); every other serial line is ``null``;
- ``con0=fd:CONSOLE_FD``: the guest's console; every other console is ``null``;
- a 'segment' NIC is ``ethN=vde,seqpacket://FD,MAC``: UML's vde transport
  runs ``vde_plug seqpacket://X seqpacket://FD`` in the jail, and the relay's
  ``vde_plug`` joins the descriptor's other end to the owner's switch outside;
- a 'user' NIC is vdeplug4's restricted libslirp (:func:`nic_plug_url`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..base import GuestSpec, Nic

#: The descriptor numbers UML gets from its relay (0-2 are stdin, and stdout/stderr into the console log).
STATUS_FD = 3
AGENT_FD = 4
CONSOLE_FD = 5
NIC_FD_BASE = 6
#: UML's ``umid`` (its ``uml_dir`` subdirectory: jail-private, never opened by the plant).
UMID = "vmshop"
#: The jail-private tmpfs holding UML's TMPDIR (its memory file) and uml_dir.
PRIVATE_DIR = "/.vmshop-uml"
#: The guest's address on a 'user' NIC (libslirp's first DHCP address) and the forwarded port.
USER_GUEST_ADDRESS = "10.0.2.15"
GUEST_HTTP_PORT = 80
#: glibc in the guest must not use AVX when UML keeps only the legacy FPU state (the FPU workaround).
GUEST_GLIBC_TUNABLES = "glibc.cpu.hwcaps=-AVX,-AVX2,-AVX512F,-AVX512VL,-AVX512BW,-AVX512DQ,-AVX512CD,-AVX_VNNI"
#: Kernel command line words of the image that are for QEMU's machine or would give the guest
#: host resources (UML reads its host-side options from the same command line): never passed.
DROPPED_WORDS = re.compile(
    r"^(console|clocksource|i8042\.[a-z_]+|no_timer_check|initrd|rdinit|"
    r"mem|umid|uml_dir|hostfs|iomem|mconsole|xterm|hostname|debug|noprocmm|nosysemu|skas0|mode|dsp|mixer|"
    r"tty_log_dir|aio|ptrace|fake_ide|fakehd|watchdog|pci|noxsave|vde|virtio_uml\.[a-z_]+|"
    r"ubd\d*[a-z]*|con\d*|ssl\d*|eth\d+|vec\d+|GLIBC_TUNABLES|vmshop\.hostfs|vmshop\.data|vmshop\.agent)(=|$)")


@dataclass(frozen=True)
class DiskPlan:
    """How the VM's disk is given to UML.

    ``ubd`` is the ``ubd0=`` value; ``file`` the VM's own (writable) disk
    file in its run directory, ``base`` the cached read-only raw image under
    a COW file (None for a raw copy of its own); ``limit`` the largest size
    ``file`` may legitimately reach (bytes).
    """

    ubd: str
    file: Path
    base: Path | None
    limit: int


def nic_fd(index: int) -> int:
    """The descriptor number UML gets segment NIC ``index``'s line at."""
    return NIC_FD_BASE + index


def uml_command(spec: GuestSpec, binary: str, disk: DiskPlan, fpu_workaround: bool, uml_dir: str) -> list[str]:
    """The UML command line for ``spec`` (its host options, then the guest kernel's words)."""
    command = [
        binary,
        f"mem={spec.memory}M",
        f"ubd0={disk.ubd}",
        f"umid={UMID}",
        f"uml_dir={uml_dir}",
        f"con0=fd:{CONSOLE_FD}", "con=null",
        f"ssl0=fd:{AGENT_FD}", "ssl=null",
    ]
    for index, nic in enumerate(spec.nics):
        url = f"seqpacket://{nic_fd(index)}" if nic.kind == "segment" else nic_plug_url(nic)
        command.append(f"eth{index}=vde,{url},{nic.mac}")
    command += guest_cmdline(spec.cmdline)
    if spec.data_dir is not None:
        command.append(f"vmshop.data={Path(os.path.abspath(spec.data_dir))}")
    if fpu_workaround:
        command.append(f"GLIBC_TUNABLES={GUEST_GLIBC_TUNABLES}")
    return command


def guest_cmdline(cmdline: str) -> list[str]:
    """The image's kernel command line for UML: root on ``/dev/ubdX``, QEMU-only and host options dropped."""
    words: list[str] = []
    root = "/dev/ubda"
    for word in cmdline.split():
        if word.startswith("root="):
            value = word[len("root="):]
            match = re.fullmatch(r"/dev/(?:vd|sd|hd|xvd)([a-z])(\d*)", value)
            root = f"/dev/ubd{match.group(1)}{match.group(2)}" if match else value
            continue
        if DROPPED_WORDS.match(word):
            continue
        words.append(word)
    return [f"root={root}", *words]


def nic_plug_url(nic: Nic) -> str:
    """The vdeplug URL of a 'user' NIC: libslirp, restricted.

    The guest reaches nothing (not the host, not any other address), gets
    10.0.2.15 by DHCP, and the host reaches its port 80 on 127.0.0.1:host_port.
    """
    url = "slirp:///v4/restricted"
    if nic.host_port:
        url += f"/tcpfwd=127.0.0.1:{nic.host_port}:{USER_GUEST_ADDRESS}:{GUEST_HTTP_PORT}"
    return url


__all__ = ["AGENT_FD", "CONSOLE_FD", "DROPPED_WORDS", "GUEST_GLIBC_TUNABLES", "NIC_FD_BASE", "PRIVATE_DIR",
           "STATUS_FD", "UMID", "DiskPlan", "guest_cmdline", "nic_fd", "nic_plug_url", "uml_command"]
