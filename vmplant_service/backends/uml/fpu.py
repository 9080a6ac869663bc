"""Whether UML needs its FPU workaround on this host: decided by a probe boot, and remembered.

UML 6.1 saves a guest process's FPU and vector registers with
``PTRACE_[GS]ETREGSET(NT_X86_XSTATE)`` into a buffer sized when it was built.
On some hosts with a larger XSAVE area (AVX-512, AMX) that fails ("ptrace
set fp regs failed, errno = 14") and every guest process dies. The
workaround (:func:`.launcher.fpu_filter`: a seccomp filter refusing those
two requests, so UML falls back to the legacy FXSAVE area, with the guest's
glibc told not to use AVX) was written for that.

On this project's host (an AVX-512 CPU, XSAVE area 2432 bytes) plain UML
works, 1 MiB agent answers included, while the workaround **corrupts** the
guest's memory copies (agent answers above ~20-100 KB came back with
16-byte blocks of zeros; a busybox pipeline of gzip, sort and tr in the
guest did not show it, qemu-ga's answers did). So CPU flags say nothing:
``auto`` boots the image once without the workaround, as a VM (jail, relay,
agent) but with no NIC, and has its qemu-ga run :data:`PROBE_CHECKS`
(:func:`probe_agent`), checking every byte; only if that fails does it try
with the workaround, and uses it only if that passes. The verdict is
cached in ``<state_dir>/uml-fpu-probe.json`` under :func:`probe_key` (UML's
binary, the host's kernel and CPU), like the qemu backend's accelerator
probe.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from ...agent.qga import GuestAgent
from ...agent.transport import AgentError

log = logging.getLogger(__name__)

#: The probe's programs and what each must print, byte for byte: a 210 KB count (seq) and 700 KB of 'x'
#: (tr). qemu-ga captures, base64-encodes and sends them: the copies where lost vector state shows (with
#: the workaround on this host: 16-byte blocks of zeros in answers above ~20-100 KB).
PROBE_CHECKS: tuple[tuple[tuple[str, ...], bytes], ...] = (
    (("/bin/sh", "-c", "seq 100000 130000"), b"".join(b"%d\n" % i for i in range(100000, 130001))),
    (("/bin/sh", "-c", "head -c 700000 /dev/zero | tr '\\0' x"), b"x" * 700000),
)
#: How many times the checks run.
PROBE_ROUNDS = 2


def probe_agent(agent: GuestAgent, deadline: float) -> bool:
    """Run :data:`PROBE_CHECKS` through the guest's agent; True if every answer came back intact.

    An agent that fails or answers garbage (what the corruption looks like
    to the strict transport) is a failed probe, not an error.
    """
    for _ in range(PROBE_ROUNDS):
        for argv, expected in PROBE_CHECKS:
            try:
                status, _ = agent.run(argv[0], list(argv[1:]), None, deadline, len(expected) + 1)
            except AgentError as exc:
                log.info("UML FPU probe: the agent failed (%s)", exc)
                return False
            if status.exitcode != 0 or status.output != expected:
                log.info("UML FPU probe: %s came back altered (%d bytes, status %s)", argv[-1][:40],
                         len(status.output), status.exitcode)
                return False
    return True


def probe_key(binary: str) -> str:
    """What the verdict depends on: UML's binary (path, size, mtime), the host kernel, the CPU."""
    try:
        stat = os.stat(binary)
        stamp = f"{stat.st_size}:{stat.st_mtime_ns}"
    except OSError:
        stamp = "?"
    cpu = ""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith(("model name", "flags")):
                    cpu += line
                if line.startswith("flags"):
                    break
    except OSError:
        pass
    return "|".join((binary, stamp, os.uname().release, hashlib.sha256(cpu.encode()).hexdigest()[:16]))


def read_cache(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_cache(path: Path, key: str, entry: dict[str, object]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = read_cache(path)
        data[key] = entry
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("cannot cache the FPU probe in %s: %s", path, exc)


__all__ = ["PROBE_CHECKS", "PROBE_ROUNDS", "probe_agent", "probe_key", "read_cache", "write_cache"]
