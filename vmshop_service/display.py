"""Human-readable rendering for the ``vmshop`` command: aligned tables, VM details, live progress.

Everything returns text (no trailing newline) except :class:`Progress`,
which writes to a stream. Text that came from the shop (names, reasons,
the output of actions run in a guest) is made safe to print: control
characters other than newline and tab are shown as ``\\xNN`` escapes (so a
guest cannot send escape sequences to the user's terminal), and inside a
table cell newlines and tabs become spaces. A missing value prints as ``-``.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import TextIO

from .client import VM, ActionRun, Bid, CostItem, CreateOutcome, Estimate, PlantHealth

MISSING = "-"
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def clean(text: str) -> str:
    """``text`` with control characters (but newline and tab) escaped as ``\\xNN``."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def cell(value: object) -> str:
    """One table cell: ``-`` for ``None`` or ``""``, otherwise the value on one safe line."""
    if value is None or value == "":
        return MISSING
    text = clean(str(value))
    return " ".join(text.split()) if ("\n" in text or "\t" in text or "\r" in text) else text


def fmt_time(epoch: float | None) -> str:
    """``2024-05-01T12:00:00Z`` (UTC, whole seconds), ``-`` for ``None``."""
    if epoch is None or not math.isfinite(epoch):
        return MISSING
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def fmt_duration(seconds: float) -> str:
    """``45s``, ``12m 5s``, ``3h 20m``, ``2d 4h`` (rounded down to whole seconds)."""
    total = max(0, int(seconds))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def fmt_cost(cost: float | None) -> str:
    return MISSING if cost is None else f"{cost:.2f}"


def fmt_seconds(seconds: float | None) -> str:
    return MISSING if seconds is None else f"{seconds:.2f}"


def fmt_memory(mib: int | None) -> str:
    return MISSING if mib is None else f"{mib} MiB"


def table(headers: Sequence[str], rows: Iterable[Sequence[object]], *, right: Iterable[int] = (),
          indent: str = "") -> str:
    """Rows under headers in columns two spaces apart; columns in ``right`` are right-aligned.

    Cells go through :func:`cell`; trailing blanks are removed from every line.
    """
    text_rows = [[cell(value) for value in row] for row in rows]
    all_rows = [list(headers), *text_rows]
    widths = [max(len(row[i]) for row in all_rows) for i in range(len(headers))]
    right_set = set(right)
    lines = []
    for row in all_rows:
        parts = [value.rjust(widths[i]) if i in right_set else value.ljust(widths[i]) for i, value in enumerate(row)]
        lines.append((indent + "  ".join(parts)).rstrip())
    return "\n".join(lines)


def lease_text(termination: float | None, now: float) -> str:
    """``until 2024-05-01T13:00:00Z (in 59m 59s)``, ``until ... (passed)``, or ``none``."""
    if termination is None:
        return "none"
    if termination > now:
        return f"until {fmt_time(termination)} (in {fmt_duration(termination - now)})"
    return f"until {fmt_time(termination)} (passed)"


# Whole answers ---------------------------------------------------------------------------------------------

VM_HEADERS = ("KEY", "STATE", "OWNER", "PLANT", "IMAGE", "MEMORY", "ADDRESS")


def vm_table(vms: Sequence[VM]) -> str:
    """The ``query`` table: KEY STATE OWNER PLANT IMAGE MEMORY ADDRESS, one VM a row."""
    rows = [(vm.key, vm.state, vm.owner, vm.plant, vm.image, fmt_memory(vm.memory), vm.address) for vm in vms]
    return table(VM_HEADERS, rows, right=(5,))


def vm_details(vm: VM, now: float | None = None) -> str:
    """Every field of a VM, one ``name  value`` line each (``show``)."""
    now = time.time() if now is None else now
    plant = cell(vm.plant)
    if vm.plant_vm_id and vm.plant_vm_id != vm.key:
        plant += f" (its id there: {cell(vm.plant_vm_id)})"
    fields: list[tuple[str, str]] = [
        ("key", cell(vm.key)),
        ("shop", cell(vm.epr.address)),
        ("state", cell(vm.state)),
        ("owner", cell(vm.owner)),
        ("plant", plant),
        ("image", cell(vm.image)),
        ("memory", fmt_memory(vm.memory)),
        ("vcpus", cell(vm.vcpus)),
        ("disk", MISSING if vm.disk is None else f"{vm.disk} GiB"),  # the DAG's unit (hardware disk in GiB)
        ("arch", cell(vm.arch)),
        ("address", cell(vm.address)),
        ("host port", cell(vm.host_port)),
        ("cost", fmt_cost(vm.cost)),
        ("created", fmt_time(vm.created)),
        ("updated", fmt_time(vm.updated)),
        ("lease", lease_text(vm.termination, now) if vm.collected is None or vm.termination is None
         else f"until {fmt_time(vm.termination)}"),
        ("collected", fmt_time(vm.collected)),
        ("error", cell(vm.error)),
        ("steps", ", ".join(cell(s) for s in vm.steps) or MISSING),
    ]
    for name in sorted(vm.attributes):
        fields.append((f"@{cell(name)}", cell(vm.attributes[name])))
    width = max(len(name) for name, _ in fields)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in fields)


BID_HEADERS = (" ", "PLANT", "STATUS", "COST", "IMAGE", "REASON")


def bids_table(bids: Sequence[Bid], winner: str | None) -> str:
    """PLANT STATUS COST IMAGE REASON, cheapest-first as the shop sent them; ``*`` marks ``winner``."""
    rows = [("*" if winner and bid.plant == winner else " ", bid.plant, bid.status, fmt_cost(bid.cost), bid.image,
             bid.reason) for bid in bids]
    return table(BID_HEADERS, rows, right=(3,))


def cost_items_table(items: Sequence[CostItem], indent: str = "  ") -> str:
    """STEP SECONDS SOURCE: what a bid's cost is made of."""
    rows = [(item.label, fmt_seconds(item.seconds), item.source) for item in items]
    return table(("STEP", "SECONDS", "SOURCE"), rows, right=(1,), indent=indent)


def run_status(run: ActionRun) -> str:
    """``ok``, ``timed out``, or ``failed (exit N)``."""
    if run.timed_out:
        return "timed out"
    if run.ok:
        return "ok"
    return "failed" if run.status is None else f"failed (exit {run.status})"


def runs_text(runs: Sequence[ActionRun], indent: str = "  ") -> str:
    """Each action's NODE STATUS SECONDS, and under it its output indented four more spaces."""
    if not runs:
        return f"{indent}(no actions ran)"
    rows = [(run.node, run_status(run), fmt_seconds(run.seconds)) for run in runs]
    lines = table(("NODE", "STATUS", "SECONDS"), rows, right=(2,), indent=indent).splitlines()
    out = [lines[0]]
    for line, run in zip(lines[1:], runs, strict=True):
        out.append(line)
        out.extend(f"{indent}    {clean(text)}".rstrip() for text in run.output.rstrip("\n").splitlines())
    return "\n".join(out)


def estimate_text(estimate: Estimate) -> str:
    """The best bid and its cost items, the actions left to run, and every plant's bid."""
    out = []
    if estimate.plant:
        image = f", cloning image {cell(estimate.image)}" if estimate.image else ""
        out.append(f"best bid: {cell(estimate.plant)}, cost {fmt_cost(estimate.cost)}{image}")
        if estimate.items:
            out.append(cost_items_table(estimate.items))
        out.append("actions to run: " + (", ".join(cell(r) for r in estimate.remaining) or "none"))
    else:
        out.append("no plant bid for this VM")
    out.append("")
    out.append("bids:")
    out.append(bids_table(estimate.bids, estimate.plant) if estimate.bids else "  (the shop has no plants)")
    return "\n".join(out)


def create_text(made: CreateOutcome, now: float | None = None) -> str:
    """What ``create`` made: the VM in one line, the lease, the bids (winner marked), the attempts, the runs."""
    now = time.time() if now is None else now
    vm = made.vm
    head = f"{cell(vm.key)}: {cell(vm.state)} on {cell(made.plant)} (cost {fmt_cost(made.cost)})"
    details = [f"address {cell(vm.address)}", f"image {cell(vm.image)}", f"memory {fmt_memory(vm.memory)}",
               f"lease {lease_text(vm.termination, now)}"]
    out = [head, "  " + ", ".join(details), "", "bids:", bids_table(made.bids, made.plant)]
    if len(made.attempts) > 1:
        out += ["", "attempts:"] + [f"  {cell(a)}" for a in made.attempts]
    out += ["", "actions:", runs_text(made.runs)]
    return "\n".join(out)


PLANT_HEADERS = ("ADDRESS", "UP", "NAME", "BACKEND", "ACCEL", "VMS", "FREE", "IMAGES", "LAST ERROR")


def plants_table(plants: Sequence[PlantHealth]) -> str:
    """ADDRESS UP NAME BACKEND ACCEL VMS FREE IMAGES LAST ERROR, one plant a row."""
    if not plants:
        return "the shop knows no plants"

    def vms(p: PlantHealth) -> str:
        if p.running_vms is None:
            return MISSING
        return f"{p.running_vms}/{MISSING if p.capacity_vms is None else p.capacity_vms}"

    rows = [(p.address, "yes" if p.up else "no", p.name, p.backend, p.accelerator, vms(p), fmt_memory(p.free_memory),
             ",".join(p.images), p.last_error) for p in plants]
    return table(PLANT_HEADERS, rows, right=(5, 6))


# Live progress ---------------------------------------------------------------------------------------------


class Progress:
    """Shows a VM's state while it is made, on ``stream`` (stderr).

    On a terminal (``tty``; default: ``stream.isatty()``) one line is
    rewritten in place (``\\r``) at every :meth:`update`: ``vm-1: creating
    (3.5 s)``; :meth:`finish` ends it with a newline. Elsewhere one line is
    written per state change only (``vm-1: creating after 0.5 s``), so logs
    stay short. ``None`` as a state means "not known yet".
    """

    def __init__(self, stream: TextIO, label: str, *, tty: bool | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream
        self.label = label
        self.tty = bool(stream.isatty()) if tty is None else tty
        self.clock = clock
        self.started = clock()
        self.state: str | None = None
        self._width = 0
        self._finished = False

    def _line(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r" + text.ljust(self._width))
            self._width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def update(self, state: str | None) -> None:
        """Show ``state`` (or "waiting for the shop" while it is ``None``) and the seconds elapsed."""
        elapsed = self.clock() - self.started
        changed = state is not None and state != self.state
        if state is not None:
            self.state = state
        if self.tty:
            shown = cell(self.state) if self.state else "waiting for the shop"
            self._line(f"{self.label}: {shown} ({elapsed:.1f} s)")
        elif changed:
            self._line(f"{self.label}: {cell(self.state)} after {elapsed:.1f} s")

    def finish(self, state: str | None) -> None:
        """Show the final state (e.g. ``running`` or ``failed``) and end the line; later calls do nothing."""
        if self._finished:
            return
        self.update(state)
        self._finished = True
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def fail(self) -> None:
        """The request failed: ``failed`` if a state was shown, else the progress vanishes (nothing was made)."""
        if self._finished:
            return
        if self.state is not None:
            self.finish("failed")
            return
        self._finished = True
        if self.tty and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
