"""The ``vmshop`` command: ask a VMShop for virtual machines (and check DAG files offline).

Usage::

    vmshop [--shop URL] [--cert PEM --key PEM | --user NAME] [--ca PEM] [--json] [--timeout SECONDS] COMMAND ...

    create --dag FILE [--owner O] [--lease DURATION | --until ISO8601] [--vm-key K]
                                  make a VM (live progress on stderr)
    estimate --dag FILE           every plant's bid, nothing is made
    configure VM --dag FILE       run the DAG's actions inside the VM
    query ['memory>=256 state=running'] [--limit N]
                                  the VMs matching every term (no terms: all)
    show VM [--properties | --property NAME | --xpath EXPR]
                                  a VM; or its WSRF resource properties
    collect VM                    destroy the VM (its record stays)
    lease VM DURATION|none        the VM is collected DURATION from now; none: never
    publish VM IMAGE [--public] [--with-state]
                                  make the VM's disk a cached image named IMAGE (its changes,
                                  its steps); --public (admins): it serves every owner;
                                  --with-state: its running state too (clones resume)
    unpublish IMAGE               remove your published image (once no VM uses it as a base)
    public IMAGE yes|no           (admins) a published image serves every owner, or its own only
    movable IMAGE yes|no          your private image may move between the site's plants that agree
                                  (for your requests only), or not
    plants [--reload]             the shop's plants and their health
    validate FILE...              check DAG files against the language (offline)

``--shop`` defaults to ``$VMSHOP_URL``, else ``https://127.0.0.1:8080/``.
``--cert``/``--key`` (the user's certificate and key, default
``$VMSHOP_CERT``/``$VMSHOP_KEY``) say who is calling; ``--ca`` (default
``$VMSHOP_CA``) is the CA that signs the shop's certificate, needed for
an https shop (the command never talks to an unverified shop). Bad
credentials (an unknown CA, an expired certificate, a key that does not
match, a subject the shop does not know) are one line with the code
``Client.BadCredentials`` or ``Client.AuthenticationFailed``. Without a
certificate, ``--user NAME`` (default ``$VMSHOP_USER``) signs each request
with a WS-Security UsernameToken, for shops that take them; the password
comes from ``$VMSHOP_PASSWORD``, or is asked on a terminal (never a flag).
A DURATION is seconds, or a number with ``s``, ``m``, ``h`` or ``d``
(``90``, ``30m``, ``2h``). ``VM`` is a VM's key. The global options may also
follow the command (``vmshop query --json``).

Output: human tables on stdout by default; with ``--json`` one JSON document
on stdout (on an error: ``{"error": {"code": ..., "message": ...}}``) and
nothing else there. Errors are reported on stderr as ``vmshop: [CODE]
message``, never with a traceback. ``create`` shows the VM's state while it
is made on stderr: one updating line on a terminal, otherwise a line per
state change (not in ``--json`` mode).

Exit statuses scripts can rely on:

- 0 success;
- 1 a document is invalid or a request was refused (by the shop: any
  ``Client.*`` fault, e.g. ``Client.DagInvalid``, ``Client.NoSuchVM``);
- 2 usage error;
- 3 a file could not be read;
- 4 internal error (reported without a traceback);
- 5 the shop is unreachable (nothing answered as a VMShop at the URL, or
  no answer within the timeout);
- 6 the shop or its plants failed (any ``Server.*`` fault, e.g.
  ``Server.NoPlantAvailable``, ``Server.ActionFailed``; also ``configure``
  when an action reports a failure).
"""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import json
import math
import os
import re
import secrets
import sys
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

from vmshop_common.dag import Dag
from vmshop_common.dagxml import load_dag
from vmshop_common.errors import VMShopError
from vmshop_common.xmlload import MAX_BYTES

from . import display
from .client import DEFAULT_URL, CreateOutcome, ShopUnreachableError, VMShopClient, dag_from_file

EXIT_OK = 0
EXIT_INVALID = 1
EXIT_USAGE = 2
EXIT_IO = 3
EXIT_INTERNAL = 4
EXIT_UNREACHABLE = 5
EXIT_FAILED = 6

#: Seconds between two looks at a VM being made (``create``'s progress).
POLL_INTERVAL = 0.5
#: Longest wait for one of those looks.
POLL_TIMEOUT = 10.0


class UsageError(Exception):
    """A wrong argument value found after parsing (exit status 2)."""


class FileUnreadableError(VMShopError):
    """A file named on the command line could not be read (exit status 3)."""

    CODE = "Client.Unreadable"


def exit_status(error: VMShopError) -> int:
    """The exit status for a project error, by its code (see the module docstring)."""
    if isinstance(error, ShopUnreachableError):
        return EXIT_UNREACHABLE
    if isinstance(error, FileUnreadableError):
        return EXIT_IO
    if error.code.startswith("Client"):
        return EXIT_INVALID
    if error.code.startswith("Server"):
        return EXIT_FAILED
    return EXIT_INTERNAL


# Offline: validate ---------------------------------------------------------------------------------------

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
    except (OSError, ValueError) as exc:  # ValueError: a path with a NUL byte
        message = getattr(exc, "strerror", None) or str(exc)
        return EXIT_IO, {"file": path, "valid": False, "code": "Client.Unreadable", "message": message,
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


# Arguments -----------------------------------------------------------------------------------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([smhd]?)\s*$", re.IGNORECASE)
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """Seconds from ``90``, ``90s``, ``30m``, ``2h``, ``1d``; must be positive and finite."""
    found = _DURATION.match(text)
    if not found:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (seconds, or a number with s, m, h or d)")
    seconds = float(found.group(1)) * _UNIT_SECONDS[found.group(2).lower()]
    if not (math.isfinite(seconds) and seconds > 0):
        raise argparse.ArgumentTypeError(f"a duration must be more than 0 seconds, not {text!r}")
    return seconds


def parse_lease(text: str) -> float | None:
    """A duration (seconds) or ``none`` (no lease)."""
    if text.strip().lower() == "none":
        return None
    return parse_duration(text)


def parse_time(text: str) -> float:
    """Epoch seconds from an ISO 8601 date-time (``Z`` or an offset; UTC when it has no zone)."""
    value = text.strip()
    if value[-1:] in ("Z", "z"):
        value = value[:-1] + "+00:00"
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 date-time: {text!r} "
                                         "(e.g. 2030-05-01T12:00:00Z)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def parse_timeout(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not (math.isfinite(seconds) and seconds > 0):
        raise argparse.ArgumentTypeError(f"the timeout must be more than 0 seconds, not {text!r}")
    return seconds


def parse_limit(text: str) -> int:
    try:
        limit = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if limit < 0:
        raise argparse.ArgumentTypeError(f"the limit cannot be negative: {text!r}")
    return limit


# Shop commands -------------------------------------------------------------------------------------------


def _client(args: argparse.Namespace) -> VMShopClient:
    url = args.shop or os.environ.get("VMSHOP_URL") or DEFAULT_URL
    user = args.user or os.environ.get("VMSHOP_USER") or None
    password = os.environ.get("VMSHOP_PASSWORD")
    if user and password is None and sys.stdin.isatty():
        password = getpass.getpass(f"password of {user}: ")
    try:
        return VMShopClient(url, timeout=args.timeout, cert=args.cert, key=args.key, ca=args.ca, username=user,
                            password=password)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _read_dag(path: str) -> str:
    try:
        return dag_from_file(path)
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise FileUnreadableError(f"{path}: {reason}") from None


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, list):
        return [_jsonable(item) for item in value]
    return value


def _emit_json(value: Any, out: TextIO) -> None:
    json.dump(_jsonable(value), out, indent=2, ensure_ascii=False)
    out.write("\n")


def _emit(args: argparse.Namespace, value: Any, human: Callable[[], str]) -> None:
    if args.json:
        _emit_json(value, sys.stdout)
    else:
        print(human(), file=sys.stdout)


def _watch(client: VMShopClient, key: str, worker: threading.Thread, progress: display.Progress | None) -> None:
    """Until ``worker`` ends: every :data:`POLL_INTERVAL` s, show the VM's state (describe ``key``)."""
    poller = client.copy(timeout=min(client.timeout, POLL_TIMEOUT)) if progress else None
    try:
        while worker.is_alive():
            if progress is not None and poller is not None:
                state = None
                try:
                    state = poller.describe(key).state
                except VMShopError:
                    pass  # Client.NoSuchVM until the shop registers it; anything else: the create will say
                progress.update(state)
            worker.join(POLL_INTERVAL)
    finally:
        if poller is not None:
            poller.close()


def cmd_create(args: argparse.Namespace) -> int:
    dag = _read_dag(args.dag)
    termination = None
    if args.lease is not None:
        termination = time.time() + args.lease
    elif args.until is not None:
        termination = args.until
        if termination <= time.time():
            raise UsageError(f"--until {display.fmt_time(termination)} is in the past")
    key = args.vm_key or "vm-" + secrets.token_hex(5)
    client = _client(args)
    box: dict[str, Any] = {}

    def make() -> None:
        try:
            box["made"] = client.create(dag, owner=args.owner, termination_time=termination, key=key)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            box["error"] = exc

    progress = None if args.json else display.Progress(sys.stderr, key)
    worker = threading.Thread(target=make, name=f"vmshop-create-{key}", daemon=True)
    worker.start()
    try:
        _watch(client, key, worker, progress)
    except KeyboardInterrupt:
        if progress is not None:
            progress.finish("interrupted")
        print(f"vmshop: interrupted; the shop may still be making {key}: see 'vmshop show {key}', "
              f"'vmshop collect {key}'", file=sys.stderr)
        raise
    finally:
        client.close()
    if "error" in box:
        if progress is not None:
            progress.fail()
        raise box["error"]
    made: CreateOutcome = box["made"]
    if progress is not None:
        progress.finish(made.vm.state)
    _emit(args, made, lambda: display.create_text(made))
    return EXIT_OK


def cmd_estimate(args: argparse.Namespace) -> int:
    dag = _read_dag(args.dag)
    with _client(args) as client:
        estimate = client.estimate(dag)
    _emit(args, estimate, lambda: display.estimate_text(estimate))
    return EXIT_OK


def cmd_configure(args: argparse.Namespace) -> int:
    dag = _read_dag(args.dag)
    with _client(args) as client:
        runs = client.configure(args.vm, dag)
    _emit(args, runs, lambda: f"{display.cell(args.vm)}: {len(runs)} action(s)\n" + display.runs_text(runs))
    failed = [run.node for run in runs if not run.ok]
    if failed:
        print(f"vmshop: [Server.ActionFailed] {len(failed)} action(s) failed in {display.cell(args.vm)}: "
              + ", ".join(display.cell(node) for node in failed), file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def cmd_query(args: argparse.Namespace) -> int:
    text = " ".join(args.query)
    with _client(args) as client:
        vms = client.query(text, args.limit)
    _emit(args, vms, lambda: display.vm_table(vms) if vms else "no VM matches")
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.properties:
            document = client.resource_document(args.vm)
            _emit(args, {"key": args.vm, "document": document}, lambda: _pretty_xml(document))
        elif args.property is not None:
            items = client.get_resource_property(args.vm, args.property)
            _emit(args, {"key": args.vm, "property": args.property, "results": items},
                  lambda: "\n".join(display.clean(i) for i in items) or "(none)")
        elif args.xpath is not None:
            items = client.query_resource_properties(args.vm, args.xpath)
            _emit(args, {"key": args.vm, "xpath": args.xpath, "results": items},
                  lambda: "\n".join(display.clean(i) for i in items) or "(none)")
        else:
            vm = client.describe(args.vm)
            _emit(args, vm, lambda: display.vm_details(vm))
    return EXIT_OK


def _pretty_xml(document: str) -> str:
    """The resource-properties document indented (as received if it does not parse)."""
    from lxml import etree

    from vmshop_common.xmlload import parse_xml

    try:
        root = parse_xml(document, what="resource-properties document")
    except VMShopError:
        return display.clean(document)
    etree.indent(root, space="  ")
    return display.clean(etree.tostring(root, encoding="unicode"))


def cmd_collect(args: argparse.Namespace) -> int:
    with _client(args) as client:
        vm = client.collect(args.vm)
    detail = f" at {display.fmt_time(vm.collected)}" if vm.collected is not None else ""
    error = f" ({display.cell(vm.error)})" if vm.error else ""
    _emit(args, vm, lambda: f"{display.cell(vm.key)}: {display.cell(vm.state)}{detail}{error}")
    return EXIT_OK


def cmd_publish(args: argparse.Namespace) -> int:
    with _client(args) as client:
        image = client.publish(args.vm, args.image, args.public, args.with_state)
    serves = "public" if image.public else f"private to {display.cell(image.owner or '?')}"
    _emit(args, image, lambda: f"{display.cell(args.vm)}: published as image {display.cell(image.name)} on "
          f"{display.cell(image.plant or '?')} ({serves}, base {display.cell(image.base or '?')}, "
          f"{len(image.steps)} step(s): {', '.join(display.cell(step) for step in image.steps) or 'none'}; "
          f"{image.size or 0} bytes{'; with its running state: clones resume' if image.with_state else ''})")
    return EXIT_OK


def cmd_unpublish(args: argparse.Namespace) -> int:
    with _client(args) as client:
        plants = client.unpublish(args.image)
    _emit(args, {"image": args.image, "plants": plants},
          lambda: f"{display.cell(args.image)}: unpublished from {', '.join(display.cell(p) for p in plants)}")
    return EXIT_OK


def cmd_public(args: argparse.Namespace) -> int:
    public = args.setting == "yes"
    with _client(args) as client:
        plants = client.set_image_public(args.image, public)
    _emit(args, {"image": args.image, "public": public, "plants": plants},
          lambda: f"{display.cell(args.image)}: {'public' if public else 'private to its owner'} on "
          f"{', '.join(display.cell(p) for p in plants)}")
    return EXIT_OK


def cmd_movable(args: argparse.Namespace) -> int:
    movable = args.setting == "yes"
    with _client(args) as client:
        plants = client.set_image_movable(args.image, movable)
    _emit(args, {"image": args.image, "movable": movable, "plants": plants},
          lambda: f"{display.cell(args.image)}: {'movable between' if movable else 'kept on'} the plants that agree, "
          f"on {', '.join(display.cell(p) for p in plants)}")
    return EXIT_OK


def cmd_lease(args: argparse.Namespace) -> int:
    termination = None if args.duration is None else time.time() + args.duration
    with _client(args) as client:
        vm = client.set_termination_time(args.vm, termination)

    def human() -> str:
        if vm.termination is None:
            return f"{display.cell(vm.key)}: no lease (it is not collected automatically)"
        return f"{display.cell(vm.key)}: lease {display.lease_text(vm.termination, time.time())}, " \
               f"state {display.cell(vm.state)}"

    _emit(args, vm, human)
    return EXIT_OK


def cmd_plants(args: argparse.Namespace) -> int:
    with _client(args) as client:
        plants = client.reload_plants() if args.reload else client.plants()
    _emit(args, plants, lambda: display.plants_table(plants))
    return EXIT_OK


# The parser ------------------------------------------------------------------------------------------------


def _shop_options(parser: argparse.ArgumentParser, default: Any) -> None:
    """--shop/--cert/--key/--ca/--user/--json/--timeout, before the command (defaults) and after it (SUPPRESS:
    no override)."""
    unset = default if default is argparse.SUPPRESS else None
    parser.add_argument("--shop", metavar="URL", default=unset,
                        help="the shop's URL (default: $VMSHOP_URL, else https://127.0.0.1:8080/)")
    parser.add_argument("--cert", metavar="PEM", default=unset, help="your certificate (default: $VMSHOP_CERT)")
    parser.add_argument("--key", metavar="PEM", default=unset, help="your private key (default: $VMSHOP_KEY)")
    parser.add_argument("--ca", metavar="PEM", default=unset,
                        help="the CA that signs the shop's certificate (default: $VMSHOP_CA)")
    parser.add_argument("--user", metavar="NAME", default=unset,
                        help="without a certificate: sign requests as NAME with a WS-Security UsernameToken "
                             "(password from $VMSHOP_PASSWORD, or asked; default user: $VMSHOP_USER)")
    _json_option(parser, default)
    parser.add_argument("--timeout", metavar="SECONDS", type=parse_timeout,
                        default=default if default is argparse.SUPPRESS else 600.0,
                        help="seconds allowed for each request (default 600)")


def _json_option(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument("--json", action="store_true", default=default if default is argparse.SUPPRESS else False,
                        help="print one JSON document on stdout")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmshop", description="Ask a VMShop for virtual machines.",
        epilog="exit statuses: 0 ok, 1 invalid document or request refused (Client.* fault), 2 usage, "
               "3 file unreadable, 4 internal error, 5 shop unreachable, 6 the shop or its plants failed "
               "(Server.* fault)")
    _shop_options(parser, None)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    _shop_options(common, argparse.SUPPRESS)

    create = commands.add_parser("create", parents=[common], help="make a VM from a DAG on the plant that bids least")
    create.add_argument("--dag", required=True, metavar="FILE", help="the VM's DAG (XML)")
    create.add_argument("--owner", default="", help="who the VM is for (admins only; default: you)")
    lease = create.add_mutually_exclusive_group()
    lease.add_argument("--lease", type=parse_duration, metavar="DURATION",
                       help="collect the VM this long from now (90, 30m, 2h, 1d)")
    lease.add_argument("--until", type=parse_time, metavar="ISO8601", help="collect the VM at this time")
    create.add_argument("--vm-key", metavar="K", help="the VM's key (default: vm- and 10 random hex digits)")
    create.set_defaults(handler=cmd_create)

    estimate = commands.add_parser("estimate", parents=[common], help="every plant's bid for a DAG")
    estimate.add_argument("--dag", required=True, metavar="FILE")
    estimate.set_defaults(handler=cmd_estimate)

    configure = commands.add_parser("configure", parents=[common], help="run a DAG's actions inside a VM")
    configure.add_argument("vm", metavar="VM", help="the VM's key")
    configure.add_argument("--dag", required=True, metavar="FILE")
    configure.set_defaults(handler=cmd_configure)

    query = commands.add_parser("query", parents=[common], help="the VMs matching attribute-value terms",
                                description="Terms: name OP value with OP one of = != < <= > >= ^= "
                                            "(quote the query for the shell), e.g. 'memory>=256 state=running'.")
    query.add_argument("query", nargs="*", metavar="QUERY", help="terms, all of which must hold (none: every VM)")
    query.add_argument("--limit", type=parse_limit, metavar="N", help="at most N VMs")
    query.set_defaults(handler=cmd_query)

    show = commands.add_parser("show", parents=[common], help="a VM's record, or its resource properties")
    show.add_argument("vm", metavar="VM", help="the VM's key")
    which = show.add_mutually_exclusive_group()
    which.add_argument("--properties", action="store_true", help="print its resource-properties document")
    which.add_argument("--property", metavar="NAME", help="GetResourceProperty, e.g. rp:Memory")
    which.add_argument("--xpath", metavar="EXPR", help="QueryResourceProperties, e.g. 'string(rp:State)'")
    show.set_defaults(handler=cmd_show)

    collect = commands.add_parser("collect", parents=[common], help="destroy a VM (its record stays)")
    collect.add_argument("vm", metavar="VM", help="the VM's key")
    collect.set_defaults(handler=cmd_collect)

    lease_cmd = commands.add_parser("lease", parents=[common], help="set when a VM is collected")
    lease_cmd.add_argument("vm", metavar="VM", help="the VM's key")
    lease_cmd.add_argument("duration", type=parse_lease, metavar="DURATION|none",
                           help="from now (90, 30m, 2h, 1d); none: never")
    lease_cmd.set_defaults(handler=cmd_lease)

    publish = commands.add_parser("publish", parents=[common], help="make a VM's disk a new cached image")
    publish.add_argument("vm", metavar="VM", help="the VM's key")
    publish.add_argument("image", metavar="IMAGE", help="the new image's name (unique on its plant)")
    publish.add_argument("--public", action="store_true", help="serve every owner's requests (admins only)")
    publish.add_argument("--with-state", action="store_true",
                         help="save the running guest's state too: clones resume from it instead of booting")
    publish.set_defaults(handler=cmd_publish)

    unpublish = commands.add_parser("unpublish", parents=[common], help="remove a published image")
    unpublish.add_argument("image", metavar="IMAGE", help="the image's name")
    unpublish.set_defaults(handler=cmd_unpublish)

    public = commands.add_parser("public", parents=[common], help="make a published image public or private (admins)")
    public.add_argument("image", metavar="IMAGE", help="the image's name")
    public.add_argument("setting", choices=("yes", "no"), help="yes: it serves every owner; no: its owner only")
    public.set_defaults(handler=cmd_public)

    movable = commands.add_parser("movable", parents=[common],
                                  help="let your private image move between the site's plants that agree, or not")
    movable.add_argument("image", metavar="IMAGE", help="the image's name")
    movable.add_argument("setting", choices=("yes", "no"),
                         help="yes: plants that agree may fetch it for your requests; no: it stays where it is")
    movable.set_defaults(handler=cmd_movable)

    plants = commands.add_parser("plants", parents=[common], help="the shop's plants and their health")
    plants.add_argument("--reload", action="store_true", help="make the shop re-read its plant list first")
    plants.set_defaults(handler=cmd_plants)

    validate = commands.add_parser("validate", help="check DAG files against the VM description language")
    validate.add_argument("files", nargs="+", metavar="FILE")
    _json_option(validate, argparse.SUPPRESS)
    validate.set_defaults(handler=cmd_validate)
    return parser


def _report(error: VMShopError, json_mode: bool) -> int:
    print(f"vmshop: [{error.code}] {error}", file=sys.stderr)
    if json_mode:
        _emit_json({"error": {"code": error.code, "message": str(error)}}, sys.stdout)
    return exit_status(error)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit status (see the module docstring)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0) and EXIT_USAGE
    json_mode = bool(getattr(args, "json", False))
    try:
        return int(args.handler(args))
    except UsageError as exc:
        print(f"vmshop: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except VMShopError as exc:
        return _report(exc, json_mode)
    except KeyboardInterrupt:
        return EXIT_INTERNAL
    except Exception as exc:  # noqa: BLE001
        print(f"vmshop: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
