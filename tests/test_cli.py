"""The ``vmshop`` command's shop subcommands (vmshop_service.cli) against the fake shop over real SOAP:
human and JSON output, live progress for create, the documented exit statuses, errors without
tracebacks; and the installed console script once. ``vmshop validate`` is tested in test_cli_validate.py."""

from __future__ import annotations

import io
import json
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

# fake_shop and soap_harness live next to this file; import them whatever pytest's import mode.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import fake_shop  # noqa: E402

from vmshop_common.errors import BackendError  # noqa: E402
from vmshop_service import cli, display  # noqa: E402
from vmshop_service.client import VMShopClient, dag_from_file  # noqa: E402

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
BLANK = str(REPO / "scripts" / "sample_blank.xml")
IMAGE = str(REPO / "scripts" / "sample_image.xml")
MINIMAL = str(TESTS / "dags" / "good_minimal.xml")
CYCLE = str(TESTS / "dags" / "cycle.xml")


@pytest.fixture(scope="module")
def server(client_env: object) -> Iterator[fake_shop.FakeShopServer]:
    served = fake_shop.serve_fake_shop(fake_shop.FakeShop(create_seconds=0.3))
    with VMShopClient(served.url, timeout=10) as client:  # two VMs every test can rely on
        client.create(dag_from_file(BLANK), owner="alice", key="vm-alice")
        client.create(dag_from_file(IMAGE), owner="bob", key="vm-bob")
    yield served
    served.stop()


@pytest.fixture
def shop(server: fake_shop.FakeShopServer) -> Iterator[fake_shop.FakeShop]:
    yield server.shop
    server.shop.fail_create = None
    server.shop.create_seconds = 0.3
    server.shop.plant_list = fake_shop.default_plants()


Run = tuple[int, str, str]


@pytest.fixture
def run(server: fake_shop.FakeShopServer, capsys: pytest.CaptureFixture[str]):  # type: ignore[no-untyped-def]
    """``run(*args)``: ``vmshop --shop <fake> args...`` in-process: (status, stdout, stderr), never a traceback."""

    def go(*args: str, shop: bool = True) -> Run:
        status = cli.main((["--shop", server.url] if shop else []) + list(args))
        out, err = capsys.readouterr()
        assert "Traceback" not in out + err
        return status, out, err

    return go


def closed_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/"


pytestmark = pytest.mark.usefixtures("client_env")


def test_exit_statuses_are_documented() -> None:
    assert (cli.EXIT_OK, cli.EXIT_INVALID, cli.EXIT_USAGE, cli.EXIT_IO, cli.EXIT_INTERNAL, cli.EXIT_UNREACHABLE,
            cli.EXIT_FAILED) == (0, 1, 2, 3, 4, 5, 6)
    doc = " ".join((cli.__doc__ or "").split())
    for text in ("0 success", "1 a document is invalid or a request was refused", "2 usage error",
                 "3 a file could not be read", "4 internal error", "5 the shop is unreachable",
                 "6 the shop or its plants failed"):
        assert text in doc


# create ----------------------------------------------------------------------------------------------------


def test_create_human_with_progress(run, shop: fake_shop.FakeShop, monkeypatch: pytest.MonkeyPatch) -> None:
    shop.create_seconds = 1.0
    monkeypatch.setattr(cli, "POLL_INTERVAL", 0.2)
    status, out, err = run("create", "--dag", BLANK, "--owner", "carol")
    assert status == cli.EXIT_OK
    key = re.match(r"(vm-[0-9a-f]{10}): running on 127\.0\.0\.1:9001 \(cost 2\.50\)\n", out)
    assert key, out
    assert shop.calls[-1] == ("create", ("carol", None, key.group(1)))
    # progress: one line per state change on stderr (not a terminal), ending with the final state
    lines = err.splitlines()
    assert lines and all(re.fullmatch(rf"{key.group(1)}: [a-z:]+ after \d+\.\d s", line) for line in lines), err
    states = [line.split(": ", 1)[1].rsplit(" after", 1)[0] for line in lines]
    assert "creating" in states and states[-1] == "running"
    assert len(states) == len(set(states))
    assert "  address 10.0.0." in out and "memory 192 MiB, lease none" in out
    assert "\nbids:\n   PLANT           STATUS  COST  IMAGE  REASON\n" in out
    assert "*  127.0.0.1:9001  bid     2.50  tiny   -\n" in out
    assert "   127.0.0.1:9002  down       -  -      connection refused\n" in out
    assert out.endswith("actions:\n"
                        "  NODE    STATUS  SECONDS\n"
                        "  os      ok         0.05\n"
                        "      + #vmshop-os: tiny busybox linux 1\n"
                        "      done os\n"
                        "  report  ok         0.05\n"
                        "      + uname -sr\n"
                        "      done report\n")


def test_create_json_lease_and_key(run, shop: fake_shop.FakeShop) -> None:
    before = time.time()
    status, out, err = run("create", "--dag", MINIMAL, "--lease", "2h", "--vm-key", "vm-json", "--json")
    assert (status, err) == (cli.EXIT_OK, "")  # nothing but the JSON document, and no progress
    made = json.loads(out)
    assert made["vm"]["epr"] == {"address": shop.address, "key": "vm-json"}
    assert made["vm"]["state"] == "running" and made["plant"] == fake_shop.PLANT_UP
    assert made["runs"] == [] and [b["status"] for b in made["bids"]] == ["bid", "down"]
    assert before + 7200 <= made["vm"]["termination"] <= time.time() + 7200
    status, out, _ = run("--json", "create", "--dag", MINIMAL, "--until", "2999-01-01T00:00:00Z")
    assert status == cli.EXIT_OK
    assert json.loads(out)["vm"]["termination"] == 32472144000.0


@pytest.mark.parametrize("args", [["--lease", "0"], ["--lease", "soon"], ["--until", "yesterday"],
                                  ["--until", "2000-01-01T00:00:00"], ["--lease", "1h", "--until", "2999-01-01"],
                                  []], ids=["zero", "word", "not-iso", "past", "both", "no-dag"])
def test_create_usage_errors(run, args: list[str]) -> None:
    dag = [] if not args else ["--dag", MINIMAL]
    status, out, err = run("create", *dag, *args)
    assert status == cli.EXIT_USAGE and out == ""
    assert "vmshop" in err


def test_create_failures(run, shop: fake_shop.FakeShop, tmp_path: Path) -> None:
    nowhere = tmp_path / "nowhere.xml"
    nowhere.write_text('<vm xmlns="urn:vmshop:dag:1"><nodes><image id="base" name="nowhere"/></nodes></vm>')
    status, out, err = run("create", "--dag", str(nowhere), "--vm-key", "vm-nowhere")
    assert status == cli.EXIT_FAILED and out == ""
    assert re.fullmatch(r"vmshop: \[Server\.NoPlantAvailable\] no plant can create the VM: 127\.0\.0\.1:9001: "
                        r"no cached image named 'nowhere'; 127\.0\.0\.1:9002: connection refused\n", err), err
    status, out, err = run("create", "--dag", CYCLE)
    assert status == cli.EXIT_INVALID
    assert "vmshop: [Client.DagInvalid] " in err and "cycle: a -> b -> a" in err
    status, out, err = run("create", "--dag", str(tmp_path / "missing.xml"))
    assert status == cli.EXIT_IO
    assert err == f"vmshop: [Client.Unreadable] {tmp_path / 'missing.xml'}: No such file or directory\n"
    shop.fail_create = BackendError("the hypervisor fell over")
    shop.create_seconds = 1.0  # long enough to be seen creating: then the progress ends 'failed'
    status, out, err = run("create", "--dag", MINIMAL, "--vm-key", "vm-fell")
    assert status == cli.EXIT_FAILED and out == ""
    assert re.fullmatch(r"(vm-fell: [a-z:]+ after \d+\.\d s\n)*vm-fell: creating after \d+\.\d s\n"
                        r"vm-fell: failed after \d+\.\d s\nvmshop: \[Server\.BackendError\] the hypervisor fell over\n",
                        err), err
    shop.create_seconds = 0.3
    status, out, err = run("--json", "create", "--dag", MINIMAL)
    assert status == cli.EXIT_FAILED
    assert json.loads(out) == {"error": {"code": "Server.BackendError", "message": "the hypervisor fell over"}}
    assert err == "vmshop: [Server.BackendError] the hypervisor fell over\n"


# estimate, configure ----------------------------------------------------------------------------------------


def test_estimate(run, tmp_path: Path) -> None:
    status, out, err = run("estimate", "--dag", IMAGE)
    assert (status, err) == (cli.EXIT_OK, "")
    assert out.startswith("best bid: 127.0.0.1:9001, cost 4.20, cloning image tiny\n"
                          "  STEP         SECONDS  SOURCE\n"
                          "  clone tiny      1.00  default\n"
                          "  network net     1.00  default\n")
    assert "actions to run: net, data, conf, run\n" in out
    assert "*  127.0.0.1:9001  bid     4.20  tiny   -" in out
    status, out, _ = run("estimate", "--dag", IMAGE, "--json")
    assert json.loads(out)["remaining"] == ["net", "data", "conf", "run"]
    nowhere = tmp_path / "nowhere.xml"
    nowhere.write_text('<vm xmlns="urn:vmshop:dag:1"><nodes><image id="base" name="nowhere"/></nodes></vm>')
    status, out, _ = run("estimate", "--dag", str(nowhere))
    assert status == cli.EXIT_OK
    assert out.startswith("no plant bid for this VM\n\nbids:\n")
    assert "   127.0.0.1:9001  declined     -  -      no cached image named 'nowhere'" in out


def test_configure(run, tmp_path: Path) -> None:
    status, out, err = run("configure", "vm-alice", "--dag", IMAGE)
    assert (status, err) == (cli.EXIT_OK, "")
    assert out == ("vm-alice: 4 action(s)\n"
                   "  NODE  STATUS  SECONDS\n"
                   "  net   ok         0.05\n"
                   "  data  ok         0.05\n"
                   "  conf  ok         0.05\n"
                   "  run   ok         0.05\n"
                   "      + . /etc/wordcount.conf\n"
                   "      done run\n")
    status, out, _ = run("--json", "configure", "vm-alice", "--dag", MINIMAL)
    assert (status, json.loads(out)) == (cli.EXIT_OK, [])
    failing = tmp_path / "failing.xml"
    failing.write_text('<vm xmlns="urn:vmshop:dag:1"><nodes><blank id="hw" memory="128" disk="1"/>'
                       '<script id="bad">echo fake:fail</script></nodes>'
                       '<edges><edge from="hw" to="bad"/></edges></vm>')
    status, out, err = run("configure", "vm-alice", "--dag", str(failing))
    assert status == cli.EXIT_FAILED and out == ""
    assert err == "vmshop: [Server.ActionFailed] action 'bad' failed with status 1: fake failure\n"
    exits = tmp_path / "exits.xml"
    exits.write_text('<vm xmlns="urn:vmshop:dag:1"><nodes><blank id="hw" memory="128" disk="1"/>'
                     '<script id="ok">echo fine</script><script id="three">echo fake:status</script></nodes>'
                     '<edges><edge from="hw" to="ok"/><edge from="ok" to="three"/></edges></vm>')
    status, out, err = run("configure", "vm-alice", "--dag", str(exits))
    assert status == cli.EXIT_FAILED
    assert "  three  failed (exit 3)     0.05\n      + echo fake:status\n" in out
    assert err == "vmshop: [Server.ActionFailed] 1 action(s) failed in vm-alice: three\n"
    status, out, err = run("configure", "vm-alice", "--dag", str(exits), "--json")
    assert status == cli.EXIT_FAILED and [r["ok"] for r in json.loads(out)] == [True, False]
    status, _, err = run("configure", "vm-none", "--dag", MINIMAL)
    assert status == cli.EXIT_INVALID and err == "vmshop: [Client.NoSuchVM] no VM has id 'vm-none'\n"


# query, show --------------------------------------------------------------------------------------------------


def test_query_table(run) -> None:
    status, out, err = run("query", "state=running", "memory>=128", "--limit", "2")
    assert (status, err) == (cli.EXIT_OK, "")
    lines = out.splitlines()
    assert re.fullmatch(r"KEY +STATE +OWNER +PLANT +IMAGE +MEMORY +ADDRESS", lines[0])
    assert [line.split()[0] for line in lines[1:]] == ["vm-alice", "vm-bob"]
    assert re.fullmatch(r"vm-alice +running +alice +127\.0\.0\.1:9001 +tiny +192 MiB +10\.0\.0\.\d+", lines[1])
    columns = [lines[0].index(name) for name in ("STATE", "OWNER", "PLANT", "IMAGE")]
    for line in lines[1:]:  # aligned: every value starts under its header
        assert [line[c - 1] == " " and line[c] != " " for c in columns] == [True] * 4
    assert lines[0].index("MEMORY") + len("MEMORY") == lines[1].index("MiB") + 3  # right-aligned


def test_query_json_empty_and_invalid(run) -> None:
    status, out, _ = run("query", "owner=bob", "--json")
    vms = json.loads(out)
    assert status == cli.EXIT_OK and [vm["epr"]["key"] for vm in vms] == ["vm-bob"]
    assert vms[0]["attributes"] == {"application": "wordcount", "project": "samples"}
    assert run("query", "owner=nobody") == (cli.EXIT_OK, "no VM matches\n", "")
    assert run("--json", "query", "owner=nobody") == (cli.EXIT_OK, "[]\n", "")
    status, out, err = run("query", "memory>>3")
    assert (status, out) == (cli.EXIT_INVALID, "")
    assert err == "vmshop: [Client.QueryInvalid] term 1 'memory>>3' at column 7: unknown operator '>>'\n"
    assert run("query", "--limit", "-1")[0] == cli.EXIT_USAGE


def test_show(run) -> None:
    status, out, err = run("show", "vm-alice")
    assert (status, err) == (cli.EXIT_OK, "")
    fields = dict(re.split(r"  +", line, maxsplit=1) for line in out.splitlines())
    assert fields["key"] == "vm-alice" and fields["state"] == "running" and fields["memory"] == "192 MiB"
    assert fields["@project"] == "samples" and fields["lease"] == "none" and fields["collected"] == "-"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", fields["created"])
    status, out, _ = run("show", "vm-alice", "--json")
    assert json.loads(out)["epr"]["key"] == "vm-alice"


def test_show_resource_properties(run) -> None:
    status, out, _ = run("show", "vm-alice", "--properties")
    assert status == cli.EXIT_OK
    assert out.startswith('<rp:VMResourceProperties xmlns:rp="urn:vmshop:vm-resource:1">\n'
                          "  <rp:VMId>vm-alice</rp:VMId>\n")
    assert '  <rp:Attribute name="project">samples</rp:Attribute>\n</rp:VMResourceProperties>\n' in out
    assert run("show", "vm-alice", "--xpath", "string(rp:Memory)") == (cli.EXIT_OK, "192\n", "")
    assert run("show", "vm-alice", "--xpath", "rp:Nothing") == (cli.EXIT_OK, "(none)\n", "")
    status, out, _ = run("show", "vm-alice", "--property", "rp:State", "--json")
    assert json.loads(out) == {"key": "vm-alice", "property": "rp:State",
                               "results": ['<rp:State xmlns:rp="urn:vmshop:vm-resource:1">running</rp:State>']}
    status, out, _ = run("--json", "show", "vm-alice", "--properties")
    assert json.loads(out)["document"].startswith("<rp:VMResourceProperties")
    status, _, err = run("show", "vm-alice", "--xpath", "rp:Memory[")
    assert status == cli.EXIT_INVALID and err.startswith("vmshop: [Client.QueryInvalid] ")
    assert run("show", "vm-alice", "--properties", "--xpath", "x")[0] == cli.EXIT_USAGE


# collect, lease, plants ---------------------------------------------------------------------------------------


def test_lease_and_collect(run, server: fake_shop.FakeShopServer) -> None:
    with VMShopClient(server.url, timeout=10) as client:
        client.create(dag_from_file(MINIMAL), key="vm-short")
    before = time.time()
    status, out, _ = run("lease", "vm-short", "90m")
    assert status == cli.EXIT_OK
    assert re.fullmatch(r"vm-short: lease until \S+Z \(in 1h 29m\), state running\n", out)
    status, out, _ = run("--json", "lease", "vm-short", "30")
    assert before + 30 <= json.loads(out)["termination"] <= time.time() + 30
    assert run("lease", "vm-short", "none") == (
        cli.EXIT_OK, "vm-short: no lease (it is not collected automatically)\n", "")
    assert run("lease", "vm-short", "-5")[0] == cli.EXIT_USAGE
    status, out, _ = run("collect", "vm-short")
    assert status == cli.EXIT_OK and re.fullmatch(r"vm-short: collected at \S+Z\n", out)
    status, out, _ = run("collect", "vm-short", "--json")
    assert json.loads(out)["state"] == "collected"


def test_plants(run, shop: fake_shop.FakeShop) -> None:
    status, out, err = run("plants")
    assert (status, err) == (cli.EXIT_OK, "")
    lines = out.splitlines()
    assert re.fullmatch(r"ADDRESS +UP +NAME +BACKEND +ACCEL +VMS +FREE +IMAGES +LAST ERROR", lines[0])
    assert re.fullmatch(r"127\.0\.0\.1:9001 +yes +plant1 +fake +none +0/8 +4096 MiB +tiny +-", lines[1])
    assert re.fullmatch(r"127\.0\.0\.1:9002 +no +- +- +- +- +- +- +connection refused", lines[2])
    before = shop.reloads
    status, out, _ = run("plants", "--reload", "--json")
    assert [p["address"] for p in json.loads(out)] == [fake_shop.PLANT_UP, fake_shop.PLANT_DOWN]
    assert shop.reloads == before + 1
    shop.plant_list = []
    assert run("plants") == (cli.EXIT_OK, "the shop knows no plants\n", "")


def test_publish_and_unpublish(run, shop: fake_shop.FakeShop) -> None:
    status, out, err = run("publish", "vm-alice", "alices-app")
    assert (status, err) == (cli.EXIT_OK, "")
    assert re.fullmatch(r"vm-alice: published as image alices-app on 127\.0\.0\.1:9001 \(private to alice, base tiny, "
                        r"\d+ step\(s\): [a-z, ]+; \d+ bytes\)\n", out), out
    status, out, _ = run("publish", "vm-bob", "bobs-app", "--public", "--json")
    assert status == cli.EXIT_OK
    assert {k: json.loads(out)[k] for k in ("name", "owner", "public")} == {"name": "bobs-app", "owner": "bob",
                                                                           "public": True}
    status, _, err = run("publish", "vm-alice", "alices-app")
    assert status == cli.EXIT_INVALID and err.startswith("vmshop: [Client.ImageExists]")
    status, _, err = run("publish", "vm-alice", "../etc")
    assert status == cli.EXIT_INVALID and err.startswith("vmshop: [Client.ImageNameInvalid]")
    assert run("public", "alices-app", "yes") == (cli.EXIT_OK, "alices-app: public on 127.0.0.1:9001\n", "")
    assert shop.images["alices-app"].is_public is True
    assert run("public", "alices-app", "maybe")[0] == cli.EXIT_USAGE
    assert run("movable", "alices-app", "yes") == \
        (cli.EXIT_OK, "alices-app: movable between the plants that agree, on 127.0.0.1:9001\n", "")
    status, out, _ = run("movable", "alices-app", "no", "--json")
    assert json.loads(out) == {"image": "alices-app", "movable": False, "plants": [fake_shop.PLANT_UP]}
    status, _, err = run("movable", "no-such-image", "yes")
    assert status == cli.EXIT_INVALID and err.startswith("vmshop: [Client.NoSuchImage]")
    assert run("movable", "alices-app", "maybe")[0] == cli.EXIT_USAGE
    assert run("unpublish", "alices-app") == (cli.EXIT_OK, "alices-app: unpublished from 127.0.0.1:9001\n", "")
    status, out, _ = run("unpublish", "bobs-app", "--json")
    assert json.loads(out) == {"image": "bobs-app", "plants": [fake_shop.PLANT_UP]}
    status, _, err = run("unpublish", "alices-app")
    assert status == cli.EXIT_INVALID and err.startswith("vmshop: [Client.NoSuchImage]")
    assert shop.images == {}


def test_publish_with_state(run, shop: fake_shop.FakeShop) -> None:
    status, out, err = run("publish", "vm-alice", "alices-saved", "--with-state")
    assert (status, err) == (cli.EXIT_OK, "")
    assert out.endswith("bytes; with its running state: clones resume)\n"), out
    assert shop.images["alices-saved"].with_state is True
    status, out, _ = run("publish", "vm-bob", "bobs-app", "--json")
    assert status == cli.EXIT_OK and json.loads(out)["with_state"] is False


# The shop's address, options, internal errors ---------------------------------------------------------------------


def test_unreachable_shop(run) -> None:
    url = closed_url()
    status, out, err = run("--shop", url, "query", shop=False)
    assert (status, out) == (cli.EXIT_UNREACHABLE, "")
    assert err.startswith(f"vmshop: [Client.ShopUnreachable] cannot reach the shop at {url}: ")
    status, out, err = run("create", "--dag", MINIMAL, "--shop", url, "--json", shop=False)
    assert status == cli.EXIT_UNREACHABLE
    assert json.loads(out)["error"]["code"] == "Client.ShopUnreachable"
    assert err.count("\n") == 1  # no progress in --json mode, just the error


def test_shop_from_environment(run, server: fake_shop.FakeShopServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMSHOP_URL", server.url)
    assert run("show", "vm-bob", "--xpath", "string(rp:Owner)", shop=False) == (cli.EXIT_OK, "bob\n", "")
    monkeypatch.setenv("VMSHOP_URL", closed_url())
    assert run("plants", shop=False)[0] == cli.EXIT_UNREACHABLE
    assert run("plants")[0] == cli.EXIT_OK  # --shop wins


@pytest.mark.parametrize("args", [["--shop", "localhost:8080", "plants"], ["--timeout", "0", "plants"],
                                  ["plants", "--timeout", "soon"], ["show"], ["lease", "vm-alice"],
                                  ["plants", "--bogus"]])
def test_usage_errors(run, args: list[str]) -> None:
    status, out, err = run(*args, shop=False)
    assert status == cli.EXIT_USAGE and out == ""
    assert err.startswith("usage: vmshop") or err.startswith("vmshop: error: ")


def test_internal_error_is_reported_without_traceback(run, monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(self: VMShopClient, *args: object) -> object:
        raise RuntimeError("kaboom")

    monkeypatch.setattr(VMShopClient, "plants", explode)
    assert run("plants") == (cli.EXIT_INTERNAL, "", "vmshop: internal error: RuntimeError: kaboom\n")


# Rendering ---------------------------------------------------------------------------------------------------


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_on_a_terminal_rewrites_one_line() -> None:
    now = [100.0]
    stream = Terminal()
    progress = display.Progress(stream, "vm-1", clock=lambda: now[0])
    progress.update(None)
    now[0] += 0.5
    progress.update("creating")
    now[0] += 0.5
    progress.update("creating:booting")
    now[0] += 0.5
    progress.finish("running")
    progress.finish("running")
    assert stream.getvalue() == ("\rvm-1: waiting for the shop (0.0 s)"
                                 "\rvm-1: creating (0.5 s)            "
                                 "\rvm-1: creating:booting (1.0 s)"
                                 "\rvm-1: running (1.5 s)         \n")


def test_progress_elsewhere_writes_a_line_per_state() -> None:
    now = [0.0]
    stream = io.StringIO()
    progress = display.Progress(stream, "vm-1", clock=lambda: now[0])
    for state in (None, "placing", "placing", "creating", None, "creating"):
        now[0] += 0.5
        progress.update(state)
    progress.finish("running")
    assert stream.getvalue() == "vm-1: placing after 1.0 s\nvm-1: creating after 2.0 s\nvm-1: running after 3.0 s\n"


@pytest.mark.parametrize("tty", [True, False])
def test_progress_of_a_refused_request_vanishes(tty: bool) -> None:
    stream = Terminal() if tty else io.StringIO()
    progress = display.Progress(stream, "vm-1", clock=lambda: 0.0)
    progress.update(None)
    progress.fail()
    assert stream.getvalue() == ("\rvm-1: waiting for the shop (0.0 s)\r" + " " * 34 + "\r" if tty else "")
    seen = display.Progress(stream := io.StringIO(), "vm-1", clock=lambda: 0.0)
    seen.update("creating")
    seen.fail()
    assert stream.getvalue() == "vm-1: creating after 0.0 s\nvm-1: failed after 0.0 s\n"


def test_text_from_the_shop_cannot_drive_the_terminal() -> None:
    assert display.clean("ok\x1b[2J\x07\tdone\n") == "ok\\x1b[2J\\x07\tdone\n"
    assert display.cell("two\nlines\x1b") == "two lines\\x1b"
    assert display.cell(None) == display.cell("") == "-"


# The installed command ------------------------------------------------------------------------------------------


def test_installed_console_script(server: fake_shop.FakeShopServer) -> None:
    beside = Path(sys.executable).with_name("vmshop")
    command = str(beside) if beside.exists() else shutil.which("vmshop")
    if not command:
        pytest.skip("the vmshop console script is not installed")
    done = subprocess.run([command, "--shop", server.url, "create", "--dag", BLANK, "--owner", "dave",
                           "--vm-key", "vm-script"], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == cli.EXIT_OK, done.stderr
    assert done.stdout.startswith("vm-script: running on 127.0.0.1:9001 (cost 2.50)\n")
    assert "vm-script: running after " in done.stderr and "Traceback" not in done.stderr
    assert server.shop.registry.get("vm-script").owner == "dave"
