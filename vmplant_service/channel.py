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

import json
import shlex
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vmshop_common.dag import Action, FileAction, MountAction, NetworkAction, ScriptAction
from vmshop_common.errors import ActionFailedError, BackendError, NotSupportedError
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


#: Waits (at most $1 seconds) for cloud-init's result, then prints it (at most $2 bytes).
CLOUD_INIT_WAIT = (
    'end=$(( $(cut -d. -f1 /proc/uptime) + $1 ))\n'
    'until [ -e /run/cloud-init/result.json ]; do\n'
    '  [ "$(cut -d. -f1 /proc/uptime)" -lt "$end" ] || { echo "no /run/cloud-init/result.json yet"; exit 124; }\n'
    '  sleep 0.2\n'
    'done\n'
    'head -c "$2" /run/cloud-init/result.json\n'
)


def cloud_init_result(text: str) -> str:
    """The data source named by cloud-init's ``result.json`` text; ActionFailedError for errors or another source.

    The text is the guest's (hostile): it is only parsed as JSON (at most
    :data:`MAX_OUTPUT` bytes) and read for two fields of the right types.
    """
    try:
        result = json.loads(text)
    except ValueError:
        raise ActionFailedError(f"cloud-init's result is not JSON: {text.strip()[:200]}") from None
    v1 = result.get("v1") if isinstance(result, dict) else None
    if not isinstance(v1, dict) or not isinstance(v1.get("errors", []), list):
        raise ActionFailedError("cloud-init's result is not what cloud-init writes (no v1 with errors)")
    errors = [str(error)[:300] for error in v1.get("errors", [])][:5]
    source = str(v1.get("datasource") or "")[:200]
    if errors:
        raise ActionFailedError(f"cloud-init reported errors in the guest's first boot: {'; '.join(errors)}")
    if not source.startswith("DataSourceNoCloud"):
        raise ActionFailedError(f"cloud-init did not read the VM's seed (its data source: {source or 'none'})")
    return source


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


#: The network program's way of making the address last (chosen in the guest, by what the guest has):
#: systemd-networkd (a .network file matching the NIC's MAC, sorted before cloud-init's own ``10-cloud-init-*``),
#: ifupdown (a stanza in /etc/network/interfaces.d), or, on a guest with neither (tiny), ``ip`` alone.
NETWORK_PROGRAM = """\
dev=
for n in /sys/class/net/*; do [ "$(cat "$n/address")" = "$mac" ] && dev=${n##*/}; done
[ -n "$dev" ] || { echo "no NIC with MAC $mac"; exit 3; }
if [ -d /run/systemd/system ] && command -v networkctl >/dev/null 2>&1 && \\
   systemctl -q is-enabled systemd-networkd.service 2>/dev/null; then
  f=/etc/systemd/network/05-vmshop-segment.network
  mkdir -p /etc/systemd/network
  { printf '[Match]\\nMACAddress=%s\\n\\n[Network]\\nAddress=%s\\n' "$mac" "$address"
    [ -z "$gateway" ] || printf 'Gateway=%s\\n' "$gateway"; } >"$f.new" && mv -f "$f.new" "$f" || exit 4
  ip addr flush dev "$dev"
  # networkctl needs D-Bus, which a minimal image may lack; a restart of networkd reads the file too.
  { networkctl reload && networkctl reconfigure "$dev"; } >/dev/null 2>&1 || \\
    systemctl restart systemd-networkd.service || exit 4
  how="systemd-networkd, $f"
elif [ -f /etc/network/interfaces ] && command -v ifup >/dev/null 2>&1; then
  f=/etc/network/interfaces.d/vmshop-segment
  mkdir -p /etc/network/interfaces.d
  grep -Eqs '^[[:space:]]*source(-directory)?[[:space:]]+/etc/network/interfaces\\.d' /etc/network/interfaces || \\
    echo 'source /etc/network/interfaces.d/*' >>/etc/network/interfaces
  { printf 'auto %s\\niface %s inet static\\n    address %s\\n' "$dev" "$dev" "$address"
    [ -z "$gateway" ] || printf '    gateway %s\\n' "$gateway"; } >"$f.new" && mv -f "$f.new" "$f" || exit 4
  ifdown --force "$dev" >/dev/null 2>&1; ip addr flush dev "$dev"
  ifup "$dev" || exit 4
  how="ifupdown, $f"
else
  ip link set "$dev" up && ip addr flush dev "$dev" && ip addr add "$address" dev "$dev" || exit 4
  [ -z "$gateway" ] || ip route replace default via "$gateway" dev "$dev" || exit 4
  how="ip, until the guest restarts"
fi
i=0
until ip -4 -o addr show dev "$dev" | grep -q " ${address%/*}/"; do
  i=$((i + 1)); [ "$i" -le 150 ] || { echo "$dev did not get $address ($how)"; exit 4; }; sleep 0.1
done
if [ -n "$name" ]; then echo "$name" >/etc/hostname && hostname "$name" || exit 4; fi
echo "$dev $address ($how)"
"""


def _network(action: NetworkAction, context: ActionContext) -> str:
    """The network program (:data:`NETWORK_PROGRAM`) for ``action``: the address on the segment NIC, made to last."""
    if context.segment_mac is None:
        raise NotSupportedError("this plant has no host-only network for network actions")
    address = action.address if action.mode == "static" else context.address
    prefix = action.prefix if action.mode == "static" else context.prefix
    if address is None:
        raise NotSupportedError("no pool address was checked out for this VM")
    settings = [f"mac={shlex.quote(context.segment_mac)}", f"address={shlex.quote(f'{address}/{prefix}')}",
                f"gateway={shlex.quote(action.gateway or '')}", f"name={shlex.quote(action.hostname or '')}"]
    return "\n".join(settings) + "\n" + NETWORK_PROGRAM


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
        # A kernel without 9p (an image whose <guest data-share> should say "none") fails here, saying so.
        "else { grep -qw 9p /proc/filesystems || modprobe 9p 2>/dev/null; } || "
        "{ echo \"this guest's kernel has no 9p file system: it cannot mount the data share\"; exit 3; }; "
        "mount -t 9p -o trans=virtio,version=9p2000.L,ro vmdata /mnt/.vmdata; fi; } || exit 3",
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

    def wait_cloud_init(self, timeout: float, alive: Callable[[], bool] = lambda: True) -> str:
        """Wait until cloud-init has finished the guest's first boot; return its data source.

        One ``guest-exec`` of :data:`CLOUD_INIT_WAIT` waits in the guest for
        cloud-init's ``result.json`` (written when its last stage ends) and
        prints it (cut at 64 KiB). Raises ActionFailedError when cloud-init
        reports errors, used another data source than the VM's NoCloud seed,
        or did not finish within ``timeout`` seconds; BackendError when the
        guest stops.
        """
        deadline = self.clock() + timeout + AGENT_GRACE
        try:
            status, _ = self.agent.run("/bin/sh", ["-c", CLOUD_INIT_WAIT, "vmshop-cloud-init", str(int(timeout)),
                                                   str(MAX_OUTPUT)], None, deadline, MAX_OUTPUT, alive, ALIVE_EVERY)
        except AgentTimeout:
            raise ActionFailedError(f"cloud-init did not finish the guest's first boot within {timeout:g} s") \
                from None
        except AgentError as exc:
            if not alive():
                raise BackendError("the guest stopped while cloud-init ran") from None
            raise ActionFailedError(f"waiting for cloud-init: the guest's agent failed: {exc}") from None
        text = status.output[:MAX_OUTPUT].decode("utf-8", "replace")
        if status.exitcode != 0:
            raise ActionFailedError(f"cloud-init did not finish the guest's first boot within {timeout:g} s: "
                                    f"{text.strip()[-300:]}")
        return cloud_init_result(text)

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


__all__ = ["AGENT_GRACE", "CLOUD_INIT_WAIT", "MAX_OUTPUT", "NETWORK_PROGRAM", "TIMEOUT_STATUSES", "WRAPPER",
           "ActionContext", "ActionResult", "Channel", "cloud_init_result", "render"]
