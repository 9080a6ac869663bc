"""The host side of a VM's configuration channel.

Every VM has its own directory on the host, shared into the guest over 9p
(tag ``vmshop``, mounted at ``/vmshop``): the modern form of the original's
NFS export per domain. The protocol (the guest side is ``guest/`` and
``docs/guest-image.md``):

- the guest's agent writes ``agent/ready`` once it runs;
- the plant puts each action in ``actions/NNNN/``: a shell program ``run``
  (generated here from the DAG action; the agent never interprets actions
  itself), ``timeout`` (seconds) and any files ``run`` reads, then creates
  ``ready`` last;
- the agent runs ready actions one at a time in name order, inside the
  guest, and writes ``output`` (stdout and stderr), ``status`` (exit
  status), ``elapsed`` (seconds) and finally ``done``.

Nothing here runs an action on the host: this module only writes files and
reads results. Waiting polls with a deadline.
"""

from __future__ import annotations

import os
import shlex
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vmshop_common.dag import Action, FileAction, MountAction, NetworkAction, ScriptAction
from vmshop_common.errors import BackendError, NotSupportedError
from vmshop_common.steps import normalise_text

POLL_SECONDS = 0.05
#: Seconds between two ``alive()`` checks while waiting (each may cost the
#: hypervisor a control-socket exchange; the files are looked at every POLL_SECONDS).
ALIVE_EVERY = 0.5
#: Seconds the plant waits beyond an action's own timeout before it gives up on the agent.
AGENT_GRACE = 15.0
#: Exit statuses the agent reports when ``timeout`` killed an action.
TIMEOUT_STATUSES = (124, 137, 143)
MAX_OUTPUT = 64 * 1024


@dataclass(frozen=True)
class ActionContext:
    """What the plant decided for a VM that actions need: its pool address and segment NIC."""

    address: str | None = None
    prefix: int = 24
    segment_mac: str | None = None
    datastore: Path | None = None


@dataclass(frozen=True)
class ActionResult:
    """What the agent reported for one action."""

    name: str
    status: int
    output: str
    elapsed: float
    timed_out: bool

    @property
    def ok(self) -> bool:
        return self.status == 0


def render(action: Action, context: ActionContext) -> tuple[str, dict[str, str]]:
    """The guest shell program for ``action`` and the files it reads (name -> content)."""
    if isinstance(action, ScriptAction):
        body = textwrap.dedent(action.body.replace("\r\n", "\n")).strip("\n") + "\n"
        return f"exec {shlex.quote(action.interpreter)} ./body\n", {"body": body}
    if isinstance(action, FileAction):
        text = normalise_text(action.content)
        content = text + "\n" if text else ""
        path = shlex.quote(action.path)
        run = (f"mkdir -p \"$(dirname {path})\"\n"
               f"cp ./content {path}\n"
               f"chmod {action.mode:o} {path}\n"
               f"echo \"wrote {action.path} ($(wc -c < {path}) bytes)\"\n")
        return run, {"content": content}
    if isinstance(action, NetworkAction):
        return _network(action, context), {}
    if isinstance(action, MountAction):
        return _mount(action, context), {}
    raise NotSupportedError(f"no channel rendering for a {action.kind} action")


def _network(action: NetworkAction, context: ActionContext) -> str:
    if context.segment_mac is None:
        raise NotSupportedError("this plant has no host-only network for network actions")
    address = action.address if action.mode == "static" else context.address
    prefix = action.prefix if action.mode == "static" else context.prefix
    if address is None:
        raise NotSupportedError("no pool address was checked out for this VM")
    lines = [
        f"mac={shlex.quote(context.segment_mac)}",
        "dev=",
        "for n in /sys/class/net/*; do [ \"$(cat \"$n/address\")\" = \"$mac\" ] && dev=${n##*/}; done",
        "[ -n \"$dev\" ] || { echo \"no NIC with MAC $mac\"; exit 3; }",
        "ip link set \"$dev\" up",
        "ip addr flush dev \"$dev\"",
        f"ip addr add {address}/{prefix} dev \"$dev\"",
    ]
    if action.gateway:
        lines.append(f"ip route replace default via {action.gateway} dev \"$dev\"")
    if action.hostname:
        lines.append(f"hostname {shlex.quote(action.hostname)}")
    lines.append(f"echo \"$dev {address}/{prefix}\"")
    return "\n".join(lines) + "\n"


def _mount(action: MountAction, context: ActionContext) -> str:
    if context.datastore is None:
        raise NotSupportedError("this plant has no data store for mount actions")
    source = shlex.quote(action.source)
    target = shlex.quote(action.target)
    lines = [
        "mkdir -p /mnt/.vmdata",
        # The data share: 9p (tag vmdata) under QEMU, hostfs (vmshop.data=PATH on the kernel line) under UML.
        "grep -q ' /mnt/.vmdata ' /proc/mounts || { "
        "d=$(sed -n 's/.*vmshop\\.data=\\([^ ]*\\).*/\\1/p' /proc/cmdline); "
        "if [ -n \"$d\" ]; then mount -t hostfs -o ro,\"$d\" vmdata /mnt/.vmdata; "
        "else mount -t 9p -o trans=virtio,version=9p2000.L,ro vmdata /mnt/.vmdata; fi; }",
        f"[ -d /mnt/.vmdata/{source} ] || {{ echo \"no data named {action.source}\"; exit 3; }}",
        f"mkdir -p {target}",
        f"mount --bind /mnt/.vmdata/{source} {target}",
    ]
    if action.readonly:
        lines.append(f"mount -o remount,bind,ro {target}")
    lines.append(f"echo \"mounted {action.source} on {action.target}\"")
    return "\n".join(lines) + "\n"


class Channel:
    """One VM's channel directory on the host."""

    def __init__(self, directory: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self.directory = Path(directory)
        self.clock = clock

    @property
    def actions_dir(self) -> Path:
        return self.directory / "actions"

    def create(self) -> None:
        """Make the directory tree the guest will see (the guest runs as root; 0777 lets it write)."""
        for path in (self.directory, self.actions_dir, self.directory / "agent"):
            path.mkdir(parents=True, exist_ok=True)
            os.chmod(path, 0o777)

    def agent_ready(self) -> bool:
        return (self.directory / "agent" / "ready").exists()

    def wait_agent(self, timeout: float, alive: Callable[[], bool] = lambda: True) -> float:
        """Wait until the guest's agent is up; return the seconds waited.

        Raises BackendError when ``timeout`` passes or ``alive()`` turns False.
        """
        started = self.clock()
        deadline = started + timeout
        checked = started
        while not self.agent_ready():
            if self.clock() - checked >= ALIVE_EVERY:
                checked = self.clock()
                if not alive() and not self.agent_ready():
                    raise BackendError("the guest stopped before its agent started")
            if self.clock() > deadline:
                raise BackendError(f"the guest's agent did not start within {timeout:.0f} s")
            time.sleep(POLL_SECONDS)
        return self.clock() - started

    def submit(self, action: Action, context: ActionContext) -> str:
        """Write ``action`` for the agent; returns its name (the directory under ``actions``)."""
        run, files = render(action, context)
        existing = [p.name for p in self.actions_dir.iterdir() if p.is_dir()] if self.actions_dir.exists() else []
        name = f"{len(existing) + 1:04d}-{action.id}"
        target = self.actions_dir / name
        target.mkdir(parents=True)
        os.chmod(target, 0o777)
        for filename, content in files.items():
            (target / filename).write_text(content)
        (target / "run").write_text(run)
        (target / "timeout").write_text(f"{action.timeout}\n")
        (target / "ready").write_text("")
        return name

    def wait(self, name: str, timeout: float, alive: Callable[[], bool] = lambda: True) -> ActionResult:
        """Wait for the agent's result of action ``name``; BackendError if it never comes."""
        target = self.actions_dir / name
        checked = self.clock()
        deadline = checked + timeout + AGENT_GRACE
        while not (target / "done").exists():
            if self.clock() - checked >= ALIVE_EVERY:
                checked = self.clock()
                if not alive() and not (target / "done").exists():
                    raise BackendError(f"the guest stopped while running action {name}")
            if self.clock() > deadline:
                raise BackendError(f"the guest's agent gave no result for action {name} within {timeout:.0f} s")
            time.sleep(POLL_SECONDS)
        status = int(_read(target / "status") or "255")
        elapsed = float(_read(target / "elapsed") or "0")
        with open(target / "output", "rb") as handle:
            output = handle.read(MAX_OUTPUT).decode("utf-8", "replace")
        return ActionResult(name, status, output, elapsed, status in TIMEOUT_STATUSES and elapsed >= timeout - 0.5)


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""
