"""VMShop's performance targets, measured: ``python bench/run.py [--quick] [--only NAME[,NAME]] [--out FILE]``.

Rows (names for ``--only``; numbers work too):

1. ``clone``       clone from a cached image; 20 GiB vs 1 GiB clone; a full copy for reference
2. ``create``      create through the shop vs a bare QEMU boot of the same image (and plant-only create)
3. ``bids``        estimateCost through a shop with 32 plants vs with 1
4. ``throughput``  estimate and query throughput vs a bare Spyne echo on the same stack
5. ``query``       a selective query over 100,000 registered VMs (at the server, and round trip)
6. ``concurrent``  16 creates at once on one plant vs 16 bare QEMU boots at once
7. ``backends``    the qemu, libvirt and uml backends side by side
8. ``tls``         create through the shop with mutual TLS vs without; estimate throughput with TLS vs without,
                   against the same echo
9. ``memory``      shop and plant RSS under 10 minutes of large and hostile requests
10. ``registry``   the registry's work in one create on a registry of 100,000 VMs: ANALYZE on every add vs not
11. ``images``     tiny and debian12 side by side: boot to agent ready, create, size on disk; debian12 through GRUB
12. ``queries``    a selective query over 100,000 and 1,000,000 VMs at the server, on SQLite and on PostgreSQL
13. ``shops``      2 and 4 shops on one PostgreSQL registry under a mixed create/query/collect load
                   (bench/rows_registry.py)
14. ``farm``       one shop over 1, 32, 256 and 1,000 plants of the plant farm (125 per process): bid rounds and
                   estimate round trips in offers mode (14a, 14b), 100 creates' placement (14c), the shop's memory
                   (14e), the farm's RSS per plant (14f); the same bid rounds in live mode up to 256 plants (15)
                   (printed as 12 and 13 before renumbering)
16. ``publish``    create from the base vs from a published image (3 actions of ~1 s left vs none); the time to
                   publish a VM with 64 MiB of changes (bench/rows_images.py)
17. ``resume``     create from an image's saved running state (restore + identity reset) vs a bare boot of the
                   same image, no actions: tiny (17) and debian12 (17b) (bench/rows_images.py)
18. ``transfer``   a create on a plant that lacks an image its peer holds (fetched), then a second (cloned), against
                   the same create on the peer (bench/rows_images.py)

Servers speak mutual TLS with a test PKI made for the run (tests/pki.py), as
in production, except where a row says it compares without.

Every ratio is measured in the same run against its baseline. The table
(markdown) is printed and written to ``--out`` (default bench/RESULTS.md)
with the date, the machine, QEMU, the accelerator and the git commit.
Everything the run starts or makes (servers, guests, switches, files) lives
under one temporary directory and is removed at the end of each row, also
on failure, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import common
from common import Context, Row, log
from rows import ROWS as BASE_ROWS
from rows_images import ROWS as IMAGE_ROWS
from rows_registry import ROWS as REGISTRY_ROWS

ROWS = {**BASE_ROWS, **REGISTRY_ROWS, **IMAGE_ROWS}

BENCH = Path(__file__).resolve().parent


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", "--no-optional-locks", *args], cwd=common.ROOT, capture_output=True, text=True,
                              timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine() -> dict[str, str]:
    from vmplant_service.backends.qemu import QemuBackend

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = int(line.split()[1]) // 1024
    except OSError:
        pass
    backend = QemuBackend({})
    try:
        qemu = backend.qemu_version()
        accelerator = backend.accelerator_for(common.tiny_spec_for_probe())
    except Exception as exc:  # noqa: BLE001 - a machine without QEMU still runs the other rows
        qemu, accelerator = f"unavailable ({exc})", "none"
    commit = _git("rev-parse", "HEAD") or "unknown"
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "cpu": cpu,
        "cores": str(len(os.sched_getaffinity(0))),
        "memory": f"{memory / 1024:.1f} GiB",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "qemu": qemu,
        "accelerator": accelerator,
        "commit": commit + (" (work tree has uncommitted changes)" if dirty else ""),
    }


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(rows: list[Row], info: dict[str, str], args: argparse.Namespace, started: float, load: str) -> str:
    lines = [
        "# VMShop benchmark results",
        "",
        f"- Date: {time.strftime('%Y-%m-%d %H:%M:%S %Z', time.localtime(started))}; took "
        f"{(time.time() - started) / 60:.1f} min; mode: {'quick' if args.quick else 'full'}"
        + (f"; rows: {args.only}" if args.only else ""),
        f"- Machine: {info['cpu']}, {info['cores']} cores, {info['memory']} memory; kernel {info['kernel']}; "
        f"Python {info['python']}; load average at start {load}",
        f"- QEMU: {info['qemu']}; accelerator: {info['accelerator']}",
        f"- Commit: {info['commit']}",
        f"- Command: `python bench/run.py{' --quick' if args.quick else ''}"
        f"{' --only ' + args.only if args.only else ''}`",
        "",
        "| # | What is measured | Figures | Ratio (same run) | Target | Result |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append(f"| {row.key} | {cell(row.measured)} | {cell(row.figures)} | {cell(row.ratio)} | "
                     f"{cell(row.target)} | {cell(row.result)} |")
    notes = [(row.key, note) for row in rows for note in row.notes]
    if notes:
        lines += ["", "Notes:", ""]
        lines += [f"- {key}: {note}" for key, note in notes]
    return "\n".join(lines) + "\n"


def selected(only: str | None) -> list[str]:
    if not only:
        return list(ROWS)
    by_number = {number: name for name, (number, _) in ROWS.items()}
    names = []
    for word in only.split(","):
        word = word.strip().lower()
        name = by_number.get(word, word)
        if name not in ROWS:
            raise SystemExit(f"unknown row {word!r}: choose from {', '.join(ROWS)} (or 1-{len(ROWS)})")
        if name not in names:
            names.append(name)
    return sorted(names, key=lambda n: int(ROWS[n][0]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small repetition counts (a few minutes in all)")
    parser.add_argument("--only", help=f"run only these rows, comma-separated: {', '.join(ROWS)} (or numbers)")
    parser.add_argument("--out", default=str(BENCH / "RESULTS.md"), help="where to write the table")
    args = parser.parse_args()
    names = selected(args.only)
    # Ctrl-C, SIGTERM and SIGHUP all end the run through the cleanup (also when started with SIGINT ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    started = time.time()
    load = open("/proc/loadavg").read().split()[0]
    root = Path(tempfile.mkdtemp(prefix="vmb-", dir="/tmp"))
    results: list[Row] = []
    interrupted = False
    try:
        log("machine facts (an accelerator probe boot may run once)")
        info = machine()
        log(f"{info['cpu']}; {info['cores']} cores; {info['memory']}; {info['qemu']}; {info['accelerator']}")
        for name in names:
            number, function = ROWS[name]
            ctx = Context(quick=args.quick, root=root, cleanup=common.Cleanup(), accelerator=info["accelerator"])
            log(f"row {number} ({name}) ...")
            row_started = time.monotonic()
            try:
                results += function(ctx)
            except KeyboardInterrupt:
                results.append(Row(number, name, "", "", "", "INTERRUPTED"))
                interrupted = True
            except Exception as exc:  # noqa: BLE001 - one failing row does not stop the others
                traceback.print_exc()
                results.append(Row(number, name, "", "", "", f"ERROR: {type(exc).__name__}: {exc}"[:400]))
            finally:
                ctx.cleanup.run()
                log(f"row {number} ({name}) took {time.monotonic() - row_started:.0f} s")
            if interrupted:
                break
        table = render(results, info, args, started, load)
        print(table)
        if interrupted:
            log(f"interrupted: {args.out} left as it was")
        else:
            Path(args.out).write_text(table)
            log(f"written to {args.out}")
    finally:
        left = common.kill_processes_under(root)
        if left:
            log(f"killed {len(left)} leftover process(es): {left}")
        common.remove_tree(root)
    failed = any(r.result.startswith(("ERROR", "INTERRUPTED")) for r in results)
    return 130 if interrupted else 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
