"""A VM's configuration channel: DAG actions run inside the guest through its agent.

The channel is a message stream to the guest's QEMU guest agent (qemu-ga
over a virtio-serial port under QEMU and libvirt, over a serial line under
UML; see :mod:`vmplant_service.agent`). There is no shared file system:
nothing the guest writes, names or links ever becomes a path the plant
opens on the host. What the guest answers is bounded and checked by the
agent client.

How each action runs (all inside the guest, never on the host):

- ``script``: its body goes to the guest as the standard input of one
  ``guest-exec`` of ``/bin/sh -c WRAPPER`` (:data:`WRAPPER`), which stores
  it in a fresh ``mktemp`` file and runs ``timeout -s KILL T INTERPRETER
  FILE`` (with as few processes as it can: each costs ~10 ms under TCG)
  with stdin from /dev/null and stdout+stderr merged and cut to
  :data:`MAX_OUTPUT` bytes in the guest (the rest is read and dropped, so a
  flood neither blocks the script nor reaches the host); the wrapper exits
  with the script's status (137 when the timeout killed it);
- ``file``: its parent directory is made (``guest-exec``), the content is
  written with ``guest-file-open``/``guest-file-write``/``guest-file-close``,
  then the mode is set (``guest-exec chmod``);
- ``network`` and ``mount``: a shell program generated here from the
  action (never from guest data) runs like a script.

Bounds: each action has the host-side deadline ``timeout +``
:data:`AGENT_GRACE` seconds; output is at most :data:`MAX_OUTPUT` bytes.
An agent that fails, answers out of shape or too much, fails that action
(``ActionResult.error``); a guest that stops is a :class:`BackendError`.
"""

from __future__ import annotations

import shlex
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vmshop_common.dag import Action, FileAction, MountAction, NetworkAction, ScriptAction
from vmshop_common.errors import BackendError, NotSupportedError
from vmshop_common.steps import normalise_text

from .agent.qga import ExecStatus, GuestAgent
from .agent.transport import AgentError, AgentTimeout

#: Seconds between two ``alive()`` checks while waiting (each may cost the hypervisor a control exchange).
ALIVE_EVERY = 0.5
#: Seconds the plant waits beyond an action's own timeout before it gives up on the agent.
AGENT_GRACE = 15.0
#: Exit statuses that mean the action's timeout killed it (137: SIGKILL from ``timeout -s KILL``).
TIMEOUT_STATUSES = (124, 137, 143)
#: The most output of one action kept (bytes): cut in the guest, checked again on the host.
MAX_OUTPUT = 64 * 1024
#: Seconds one readiness probe may take before it is retried.
PROBE_SECONDS = 1.0
#: The guest program every script runs under (POSIX sh; busybox and Debian alike).
#: $1 interpreter, $2 output cap in bytes, $3 timeout in seconds; the script arrives on stdin.
WRAPPER = (
    'f=$(mktemp) || exit 125\n'
    'cat >"$f" || { rm -f "$f"; exit 125; }\n'
    '{ timeout -s KILL "$3" "$1" "$f" </dev/null 2>&1; echo $? >"$f.status"; } | { head -c "$2"; cat >/dev/null; }\n'
    's=125; read -r s <"$f.status"; rm -f "$f" "$f.status"; exit "$s"\n'
)


@dataclass(frozen=True)
class ActionContext:
    """What the plant decided for a VM that actions need: its pool address and segment NIC."""

    address: str | None = None
    prefix: int = 24
    segment_mac: str | None = None
    datastore: Path | None = None


@dataclass(frozen=True)
class ActionResult:
    """How one action ended. ``error`` is set when the agent failed (then ``status`` means nothing)."""

    name: str
    status: int
    output: str
    elapsed: float
    timed_out: bool
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 0 and self.error is None


def render(action: Action, context: ActionContext) -> tuple[str, str]:
    """The interpreter and program that carry out a script, network or mount action in the guest."""
    if isinstance(action, ScriptAction):
        body = textwrap.dedent(action.body.replace("\r\n", "\n")).strip("\n") + "\n"
        return action.interpreter, body
    if isinstance(action, NetworkAction):
        return "/bin/sh", _network(action, context)
    if isinstance(action, MountAction):
        return "/bin/sh", _mount(action, context)
    raise NotSupportedError(f"no program for a {action.kind} action")


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
        # The read-only data share: 9p (tag vmdata) under QEMU and libvirt, hostfs (vmshop.data=PATH on the
        # kernel line, a read-only bind of the data store in the VM's jail) under UML.
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
    """One VM's configuration channel: its guest agent, and the actions run through it."""

    def __init__(self, agent: GuestAgent, clock: Callable[[], float] = time.monotonic) -> None:
        self.agent = agent
        self.clock = clock

    def wait_agent(self, timeout: float, alive: Callable[[], bool] = lambda: True) -> float:
        """Wait until the guest's agent answers; return the seconds waited.

        Raises BackendError when ``timeout`` passes or ``alive()`` turns False.
        """
        started = self.clock()
        deadline = started + timeout
        checked = started
        last = "no answer yet"
        while True:
            tried = self.clock()
            try:
                self.agent.ping(timeout=max(min(PROBE_SECONDS, deadline - tried), 0.05))
                return self.clock() - started
            except AgentError as exc:
                last = str(exc)
            if self.clock() - checked >= ALIVE_EVERY:
                checked = self.clock()
                if not alive():
                    raise BackendError("the guest stopped before its agent started")
            if self.clock() > deadline:
                raise BackendError(f"the guest's agent did not answer within {timeout:.0f} s ({last[:200]})")
            if self.clock() - tried < 0.05:
                time.sleep(0.1)  # a refused connection fails at once: don't spin

    def run(self, name: str, action: Action, context: ActionContext,
            alive: Callable[[], bool] = lambda: True) -> ActionResult:
        """Carry out ``action`` in the guest (see the module docstring); its result, never an AgentError."""
        deadline = self.clock() + action.timeout + AGENT_GRACE
        started = self.clock()
        try:
            if isinstance(action, FileAction):
                status, seconds = self._file(action, deadline, alive)
            else:
                interpreter, program = render(action, context)
                status, seconds = self.agent.run(
                    "/bin/sh", ["-c", WRAPPER, "vmshop-action", interpreter, str(MAX_OUTPUT), str(action.timeout)],
                    program.encode(), deadline, MAX_OUTPUT, alive, ALIVE_EVERY)
        except AgentTimeout:
            return ActionResult(name, 124, "", self.clock() - started, True,
                                error=f"no result from the guest's agent within {action.timeout + AGENT_GRACE:g} s")
        except AgentError as exc:
            if not alive():
                raise BackendError(f"the guest stopped while running action {name}") from None
            return ActionResult(name, 255, "", self.clock() - started, False,
                                error=f"the guest's agent failed: {exc}")
        code = status.exitcode if status.exitcode is not None else 128 + (status.signal or 0)
        output = status.output[:MAX_OUTPUT].decode("utf-8", "replace")
        if len(status.output) >= MAX_OUTPUT or status.truncated:
            output += f"\n[output cut at {MAX_OUTPUT} bytes]"
        timed_out = code in TIMEOUT_STATUSES and seconds >= action.timeout - 0.5
        return ActionResult(name, code, output, seconds, timed_out)

    def _file(self, action: FileAction, deadline: float,
              alive: Callable[[], bool]) -> tuple[ExecStatus, float]:
        started = self.clock()
        text = normalise_text(action.content)
        content = (text + "\n" if text else "").encode()
        prepare, _ = self.agent.run("/bin/sh", ["-c", 'd=${1%/*}; [ -z "$d" ] || mkdir -p "$d"', "vmshop-file",
                                                action.path], None, deadline, MAX_OUTPUT, alive, ALIVE_EVERY)
        if prepare.exitcode != 0:
            return prepare, self.clock() - started
        self.agent.write_file(action.path, content, timeout=max(deadline - self.clock(), 0.001))
        done, _ = self.agent.run(
            "/bin/sh", ["-c", 'chmod "$2" "$1" && echo "wrote $1 ($(wc -c <"$1") bytes)"', "vmshop-file",
                        action.path, f"{action.mode:o}"], None, deadline, MAX_OUTPUT, alive, ALIVE_EVERY)
        return done, self.clock() - started


__all__ = ["AGENT_GRACE", "MAX_OUTPUT", "TIMEOUT_STATUSES", "WRAPPER", "ActionContext", "ActionResult", "Channel",
           "render"]
