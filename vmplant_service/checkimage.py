"""``vmplant check-image FILE``: boot an image as a plant would, ping its agent, and report.

A site adding an image (a stock Debian or Ubuntu cloud image, say) writes
its image configuration file and runs this before listing it in the
warehouse's ``index.txt``. The check:

1. reads and validates the file (:func:`~.warehouse.load_image_config`);
2. asks the backend whether it can run the image at all (the plant's own
   bid-time rule, :meth:`~.plant.Plant._unfit`);
3. boots one throw-away VM of it (a copy-on-write overlay, a user-mode NIC
   only, a NoCloud seed when the image declares cloud-init), exactly as a
   plant's create does;
4. waits for the guest agent to answer ``guest-sync-delimited`` (the
   plant's readiness test), then, for cloud-init images, for cloud-init's
   result from that seed;
5. runs one probe in the guest through ``guest-exec``: its kernel, its
   OS, its agent, whether it has cloud-init and whether its kernel mounts
   9p; a probe answer that contradicts the file's ``<guest>`` (cloud-init
   declared but absent, ``data-share='9p'`` on a kernel without 9p) fails
   the check and says which attribute to change;
6. destroys the VM and removes every file it made.

Everything the guest prints is hostile data: it is only shown (cut, and
with control characters replaced), never interpreted beyond a
``key=value`` line. Exit status 0 when the image is fit to serve, 1
otherwise (the report says why), 2 for a usage error.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vmshop_common.dag import ScriptAction
from vmshop_common.errors import VMShopError

from .agent.qga import GuestAgent
from .backends import load_backend
from .backends.base import Backend, GuestSpec, Nic, VMState
from .backends.console import console_tail
from .channel import ActionContext, Channel
from .clone import make_overlay
from .plant import BOOT_TIMEOUT, CLOUD_INIT_TIMEOUT, Plant
from .seed import SeedNic, write_seed
from .segment import mac_for
from .warehouse import ImageInfo, load_image_config

log = logging.getLogger("vmplant.check-image")

#: What the probe prints, one ``key=value`` a line (values cut by the guest, and again by us).
PROBE = r"""
v() { printf '%s=%s\n' "$1" "$(printf '%s' "$2" | tr -d '\n' | cut -c1-200)"; }
v kernel "$(uname -sr)"
v os "$( (. /etc/os-release && echo "$PRETTY_NAME") 2>/dev/null)"
v agent "$(qemu-ga -V 2>/dev/null | head -n 1)"
v cloud_init "$(command -v cloud-init >/dev/null && cloud-init --version 2>&1 | head -n 1)"
modprobe -q 9pnet_virtio 2>/dev/null; modprobe -q 9p 2>/dev/null
if grep -qw 9p /proc/filesystems; then v ninep yes; else v ninep no; fi
v init "$(cat /proc/1/comm 2>/dev/null)"
"""
PROBE_TIMEOUT = 60
MAX_VALUE = 200


@dataclass
class CheckReport:
    """What a check found; ``problems`` empty means the image is fit to serve."""

    image: str = ""
    backend: str = ""
    accelerator: str = ""
    agent_seconds: float | None = None
    cloud_init_seconds: float | None = None
    cloud_init_source: str = ""
    probe: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    console: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        out = [f"image:        {self.image or '?'}", f"backend:      {self.backend} ({self.accelerator or '?'})"]
        if self.agent_seconds is not None:
            out.append(f"agent ready:  {self.agent_seconds:.1f} s after start (guest-sync-delimited answered)")
        if self.cloud_init_seconds is not None:
            out.append(f"cloud-init:   finished {self.cloud_init_seconds:.1f} s after start ({self.cloud_init_source})")
        labels = {"kernel": "kernel", "os": "OS", "agent": "qemu-ga", "cloud_init": "cloud-init",
                  "ninep": "9p mounts", "init": "init"}
        out += [f"{labels[key] + ':':<13} {self.probe[key] or '(none)'}" for key in labels if key in self.probe]
        if self.problems:
            out += ["", "NOT FIT TO SERVE:"] + [f"  - {problem}" for problem in self.problems]
            if self.console:
                out += ["", "last lines of its console:"] + [f"  {line}" for line in self.console.splitlines()]
        else:
            out += ["", "OK: a plant can serve this image"]
        return out


def _clean(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in text)[:MAX_VALUE]


def _clean_lines(text: str) -> str:
    return "\n".join("".join(c if c.isprintable() else "?" for c in line) for line in text.splitlines()[-15:])


def parse_probe(text: str) -> dict[str, str]:
    """The probe's ``key=value`` lines (known keys only, values cleaned and cut)."""
    found: dict[str, str] = {}
    for line in text.splitlines()[:50]:
        key, sep, value = line.partition("=")
        if sep and key in ("kernel", "os", "agent", "cloud_init", "ninep", "init") and key not in found:
            found[key] = _clean(value.strip())
    return found


def check_image(config: str | Path, backend_name: str = "qemu", options: dict[str, str] | None = None,
                work_dir: Path | None = None, boot_timeout: float = BOOT_TIMEOUT,
                cloud_init_timeout: float = CLOUD_INIT_TIMEOUT) -> CheckReport:
    """Check the image of configuration file ``config`` on backend ``backend_name``; see the module docstring."""
    report = CheckReport(backend=backend_name)
    try:
        info = load_image_config(config)
    except VMShopError as exc:
        report.problems.append(f"[{exc.code}] {exc}")
        return report
    report.image = info.name
    try:
        backend = load_backend(backend_name, options)
    except VMShopError as exc:
        report.problems.append(f"backend {backend_name}: [{exc.code}] {exc}")
        return report
    try:
        caps = backend.capabilities()
        report.accelerator = caps.accelerator
        if not caps.available:
            report.problems.append(f"backend {backend_name} is not available here: {caps.reason}")
            return report
        unfit = Plant._unfit(info, info.dag, caps)
        if unfit:
            report.problems.append(f"a plant on {backend_name} declines this image: {unfit}")
            return report
        root = Path(tempfile.mkdtemp(prefix="vmck-", dir=str(work_dir) if work_dir else "/tmp"))
        try:
            _boot_and_probe(info, backend, root, report, boot_timeout, cloud_init_timeout)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    finally:
        backend.close()
    return report


def _boot_and_probe(info: ImageInfo, backend: Backend, root: Path, report: CheckReport, boot_timeout: float,
                    cloud_init_timeout: float) -> None:
    vm_id = f"check-{secrets.token_hex(4)}"
    os.chmod(root, 0o700)
    overlay, run_dir = root / "disk.qcow2", root / "run"
    make_overlay(info.disk, info.disk_format, overlay)
    nic = Nic("user", mac_for(vm_id, 0))
    seed = None
    if info.guest.cloud_init:
        seed = root / "seed.iso"
        write_seed(seed, vm_id, "vmshop-check", [SeedNic("user0", nic.mac)], None)
    spec = GuestSpec(vm_id=vm_id, disk=overlay, memory=info.hardware.memory, vcpus=info.hardware.vcpus,
                     run_dir=run_dir, kernel=info.kernel, initrd=info.initrd, cmdline=info.cmdline,
                     machine=info.machine, arch=info.hardware.arch, nics=(nic,), seed=seed)
    started = time.monotonic()
    try:
        backend.start(spec)
        report.accelerator = backend.capabilities().accelerator or report.accelerator
        channel = Channel(GuestAgent(backend.agent(vm_id)))
        alive = lambda: backend.state(vm_id) not in (VMState.STOPPED, VMState.CRASHED)  # noqa: E731
        channel.wait_agent(boot_timeout, alive=alive)
        report.agent_seconds = time.monotonic() - started
        if info.guest.cloud_init:
            report.cloud_init_source = _clean(channel.wait_cloud_init(cloud_init_timeout, alive=alive))
            report.cloud_init_seconds = time.monotonic() - started
        probe = ScriptAction(id="probe", body=PROBE, interpreter="/bin/sh", script_timeout=PROBE_TIMEOUT)
        result = channel.run("probe", probe, ActionContext(), alive=alive)
        if not result.ok:
            report.problems.append(f"the probe failed in the guest (status {result.status}"
                                   f"{', ' + result.error if result.error else ''}): {_clean(result.output)}")
            return
        report.probe = parse_probe(result.output)
        if info.guest.cloud_init and not report.probe.get("cloud_init"):
            report.problems.append("the file says contextualization='cloud-init', and the guest has no cloud-init")
        if info.guest.data_share == "9p" and report.probe.get("ninep") != "yes":
            report.problems.append("the file says data-share='9p', and the guest's kernel cannot mount 9p: "
                                   "say data-share='none' (mount actions are then declined)")
    except VMShopError as exc:
        report.problems.append(f"[{exc.code}] {exc}")
        report.console = _clean_lines(console_tail(run_dir / "console.log", 1500))
    finally:
        try:
            backend.destroy(vm_id)
        except VMShopError as exc:
            report.problems.append(f"destroying the check's VM: [{exc.code}] {exc}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vmplant check-image",
                                     description="Boot the image of an image configuration file as a plant would, "
                                                 "ping its guest agent, and report whether a plant can serve it.")
    parser.add_argument("file", help="the image configuration file (image.xml)")
    parser.add_argument("--backend", default="qemu", help="the backend to boot it with (default: qemu)")
    parser.add_argument("--backend-option", action="append", default=[], metavar="KEY=VALUE",
                        help="a backend option, as in a plant's configuration (repeatable)")
    parser.add_argument("--boot-timeout", type=float, default=BOOT_TIMEOUT,
                        help=f"seconds the agent may take to answer (default {BOOT_TIMEOUT:g})")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    options = {}
    for option in args.backend_option:
        key, sep, value = option.partition("=")
        if not sep or not key:
            parser.error(f"--backend-option wants KEY=VALUE, not {option!r}")
        options[key] = value
    os.umask(0o077)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    print(f"checking {args.file} on backend {args.backend} (a real boot: this takes a while under TCG)...",
          flush=True)
    report = check_image(args.file, args.backend, options, boot_timeout=args.boot_timeout)
    print("\n".join(report.lines()))
    return 0 if report.ok else 1


__all__ = ["PROBE", "CheckReport", "check_image", "main", "parse_probe"]


if __name__ == "__main__":
    sys.exit(main())
