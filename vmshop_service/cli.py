"""The ``vmshop`` command.

Exit statuses scripts can rely on:
0 success; 1 a document is invalid or a request was refused; 2 usage error;
3 a file could not be read; 4 internal error (reported without a traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TextIO

from vmshop_common.dag import Dag
from vmshop_common.dagxml import load_dag
from vmshop_common.errors import VMShopError
from vmshop_common.xmlload import MAX_BYTES

EXIT_OK = 0
EXIT_INVALID = 1
EXIT_USAGE = 2
EXIT_IO = 3
EXIT_INTERNAL = 4


def _summary(dag: Dag) -> str:
    start = dag.start
    origin = f"image '{start.name}'" if start.kind == "image" else "blank hardware"  # type: ignore[union-attr]
    return (f"valid: start '{start.id}' from {origin}, {len(dag.actions)} action(s), "
            f"{len(dag.edges)} edge(s), {len(dag.attributes)} attribute(s)")


def validate_file(path: str) -> tuple[int, dict[str, object]]:
    """Validate one DAG file: (exit status, a JSON-able verdict)."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_BYTES + 1)
    except OSError as exc:
        return EXIT_IO, {"file": path, "valid": False, "code": "Client.Unreadable", "message": exc.strerror or str(exc),
                         "problems": []}
    try:
        dag = load_dag(data, what=path)
    except VMShopError as exc:
        problems = [{"line": p.line, "node": p.node, "message": p.message} for p in exc.problems]
        return EXIT_INVALID, {"file": path, "valid": False, "code": exc.code, "message": exc.message,
                              "problems": problems}
    except Exception as exc:  # noqa: BLE001 - the command promises never to show a traceback
        return EXIT_INTERNAL, {"file": path, "valid": False, "code": "Server.InternalError",
                               "message": f"{type(exc).__name__}: {exc}", "problems": []}
    return EXIT_OK, {"file": path, "valid": True, "summary": _summary(dag), "problems": []}


def _print_verdict(verdict: dict[str, object], out: TextIO) -> None:
    if verdict["valid"]:
        print(f"{verdict['file']}: {verdict['summary']}", file=out)
        return
    print(f"{verdict['file']}: INVALID [{verdict['code']}] {verdict['message']}", file=out)
    for problem in verdict["problems"]:  # type: ignore[attr-defined]
        where = ", ".join(part for part in (
            f"line {problem['line']}" if problem["line"] is not None else "",
            f"node '{problem['node']}'" if problem["node"] is not None else "") if part)
        print(f"  {where + ': ' if where else ''}{problem['message']}", file=out)


def cmd_validate(args: argparse.Namespace) -> int:
    status = EXIT_OK
    verdicts = []
    for path in args.files:
        code, verdict = validate_file(path)
        status = max(status, code)
        verdicts.append(verdict)
        if not args.json:
            _print_verdict(verdict, sys.stdout)
    if args.json:
        json.dump(verdicts, sys.stdout, indent=2)
        print()
    return status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vmshop", description="Ask a VMShop for virtual machines.")
    commands = parser.add_subparsers(dest="command", required=True)
    validate = commands.add_parser("validate", help="check DAG files against the VM description language")
    validate.add_argument("files", nargs="+", metavar="FILE")
    validate.add_argument("--json", action="store_true", help="print verdicts as JSON")
    validate.set_defaults(handler=cmd_validate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0) and EXIT_USAGE
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        return EXIT_INTERNAL
    except Exception as exc:  # noqa: BLE001
        print(f"vmshop: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
