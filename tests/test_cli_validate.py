"""``vmshop validate FILE...`` (vmshop_service.cli): a verdict per file, documented exit statuses,
errors with line and node, and never a traceback, whatever the files hold."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vmshop_service import cli
from vmshop_service.cli import EXIT_INTERNAL, EXIT_INVALID, EXIT_IO, EXIT_OK, EXIT_USAGE, main

TESTS = Path(__file__).resolve().parent
DAGS = TESTS / "dags"
REPO = TESTS.parent
SAMPLES = sorted((REPO / "scripts").glob("sample_*.xml"))
GOOD = DAGS / "good_all_actions.xml"


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    status = main(["validate", *args])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return status, out, err


def test_exit_statuses_are_the_documented_ones() -> None:
    assert (EXIT_OK, EXIT_INVALID, EXIT_USAGE, EXIT_IO, EXIT_INTERNAL) == (0, 1, 2, 3, 4)
    doc = cli.__doc__ or ""
    for text in ("0 success", "1 a document is invalid", "2 usage error", "3 a file could not be read",
                 "4 internal error"):
        assert text in doc


# Valid files ------------------------------------------------------------------------------------------

def test_samples_in_scripts_validate(capsys: pytest.CaptureFixture[str]) -> None:
    assert [p.name for p in SAMPLES] == ["sample_blank.xml", "sample_debian.xml", "sample_image.xml",
                                         "sample_workflow.xml"]
    status, out, err = run(capsys, *map(str, SAMPLES))
    assert status == EXIT_OK
    assert err == ""
    lines = out.splitlines()
    assert [line.split(": ", 1)[0] for line in lines] == [str(p) for p in SAMPLES]
    assert lines[0].endswith("sample_blank.xml: valid: start 'hw' from blank hardware, 2 action(s), 2 edge(s), "
                             "1 attribute(s)")
    by_name = {Path(line.split(": ", 1)[0]).name: line.split(": ", 1)[1] for line in lines}
    assert by_name["sample_image.xml"] == ("valid: start 'base' from image 'tiny', 4 action(s), 6 edge(s), "
                                           "2 attribute(s)")
    assert by_name["sample_debian.xml"] == ("valid: start 'os' from image 'debian12', 6 action(s), 8 edge(s), "
                                            "2 attribute(s)")


def test_good_examples_validate(capsys: pytest.CaptureFixture[str]) -> None:
    good = sorted(DAGS.glob("good_*.xml"))
    status, out, _ = run(capsys, *map(str, good))
    assert status == EXIT_OK
    assert out.count(": valid: ") == len(good)


# Invalid files -------------------------------------------------------------------------------------------

def test_readme_example_output(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    status, out, _ = run(capsys, "tests/dags/cycle.xml")
    assert status == EXIT_INVALID
    assert out == ("tests/dags/cycle.xml: INVALID [Client.DagInvalid] tests/dags/cycle.xml is invalid: "
                   "cycle: a -> b -> a\n"
                   "  line 9, node 'a': cycle: a -> b -> a\n")


@pytest.mark.parametrize("path", sorted(p for p in DAGS.iterdir() if not p.name.startswith("good_")),
                         ids=lambda p: p.name)
def test_every_broken_example_is_invalid_with_a_clear_verdict(capsys: pytest.CaptureFixture[str], path: Path) -> None:
    status, out, err = run(capsys, str(path))
    assert status == EXIT_INVALID
    assert err == ""
    head, *details = out.splitlines()
    assert head.startswith(f"{path}: INVALID [Client.")
    assert details, "the problems are listed under the verdict"
    for line in details:
        assert line.startswith("  ")


def test_problems_show_line_and_node(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, str(DAGS / "unreachable.xml"), str(DAGS / "duplicate_id.xml"),
                         str(DAGS / "no_start.xml"), str(DAGS / "xxe.xml"))
    assert status == EXIT_INVALID
    assert "  line 7, node 'island': node is not reachable from start node 'hw'\n" in out
    assert "  line 7, node 'a': Element 'script': Duplicate key-sequence ['a']" in out
    assert "  the DAG has no start node (a <blank> or an <image>)\n" in out  # neither line nor node
    assert "  line 2: a DOCTYPE is not allowed\n" in out  # a line, no node


def test_one_verdict_per_file_in_order_and_the_worst_status(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    missing = tmp_path / "missing.xml"
    files = [GOOD, DAGS / "cycle.xml", missing, SAMPLES[0]]
    status, out, _ = run(capsys, *map(str, files))
    assert status == EXIT_IO  # 3 beats 1 beats 0
    verdicts = [line for line in out.splitlines() if not line.startswith("  ")]
    assert [v.split(": ", 1)[0] for v in verdicts] == [str(f) for f in files]
    assert ["INVALID" in v for v in verdicts] == [False, True, True, False]
    assert run(capsys, str(GOOD), str(DAGS / "cycle.xml"))[0] == EXIT_INVALID
    assert run(capsys, str(GOOD), str(GOOD))[0] == EXIT_OK


def test_json_output(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    status, out, _ = run(capsys, "--json", str(GOOD), str(DAGS / "cycle.xml"), str(tmp_path / "none.xml"))
    assert status == EXIT_IO
    good, cycle, none = json.loads(out)
    assert good == {"file": str(GOOD), "valid": True, "problems": [],
                    "summary": "valid: start 'hw' from blank hardware, 5 action(s), 7 edge(s), 2 attribute(s)"}
    assert cycle["valid"] is False and cycle["code"] == "Client.DagInvalid"
    assert cycle["problems"] == [{"line": 9, "node": "a", "message": "cycle: a -> b -> a"}]
    assert none["code"] == "Client.Unreadable" and none["problems"] == []


# Files that are not DAGs at all ----------------------------------------------------------------------------

def test_missing_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    status, out, _ = run(capsys, str(tmp_path / "nope.xml"))
    assert status == EXIT_IO
    assert out == f"{tmp_path / 'nope.xml'}: INVALID [Client.Unreadable] No such file or directory\n"


def test_directory(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    status, out, _ = run(capsys, str(tmp_path))
    assert status == EXIT_IO
    assert "[Client.Unreadable] Is a directory" in out


def test_unreadable_file(capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "secret.xml"
    secret.write_bytes(GOOD.read_bytes())
    real_open = open

    def deny(path: object, *args: object, **kwargs: object) -> object:
        if str(path) == str(secret):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr("builtins.open", deny)
    status, out, _ = run(capsys, str(secret))
    assert status == EXIT_IO
    assert "[Client.Unreadable] Permission denied" in out


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_file_without_read_permission(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    secret = tmp_path / "secret.xml"
    secret.write_bytes(GOOD.read_bytes())
    secret.chmod(0)
    try:
        status, out, _ = run(capsys, str(secret))
    finally:
        secret.chmod(0o600)
    assert status == EXIT_IO and "Permission denied" in out


@pytest.mark.skipif(not os.path.exists("/proc/self/mem"), reason="needs Linux /proc")
def test_file_whose_read_fails(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "/proc/self/mem")  # open works, read fails with EIO
    assert status == EXIT_IO
    assert "[Client.Unreadable]" in out


def test_path_with_a_nul_byte_is_unreadable_not_internal(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "bad\x00name.xml", str(GOOD))
    assert status == EXIT_IO
    assert out.count("\n") == 2  # and the next file still gets its verdict


@pytest.mark.parametrize("content, code", [
    (b"", "Client.XMLSyntax"),
    (b"\n\n   \n", "Client.XMLSyntax"),
    (bytes((i * 7919 + 13) % 256 for i in range(8192)), "Client.XMLSyntax"),
    (b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 8, "Client.XMLSyntax"),
    (b"\x00" * 4096, "Client.XMLSyntax"),
    ('<vm xmlns="urn:vmshop:dag:1"/>'.encode("utf-16"), "Client.XMLSyntax"),
    (b"<vm>" * 100_000 + b"</vm>" * 100_000, "Client.DocumentTooLarge"),
    (b"<r>" + b"x" * (10 * 1024 * 1024) + b"</r>", "Client.DocumentTooLarge"),
    (b'<?xml version="1.0"?>\n<!DOCTYPE vm [<!ENTITY x SYSTEM "file:///etc/shadow">]>\n<vm>&x;</vm>',
     "Client.DoctypeRefused"),
    (b"<html><body>not a vm</body></html>", "Client.WrongRoot"),
    (b'{"json": "instead"}', "Client.XMLSyntax"),
], ids=["empty", "blank", "junk", "elf", "nul", "utf16", "deep", "huge", "xxe", "html", "json"])
def test_any_content_gets_a_verdict_not_a_traceback(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                    content: bytes, code: str) -> None:
    path = tmp_path / "input.xml"
    path.write_bytes(content)
    status, out, err = run(capsys, str(path))
    assert status == EXIT_INVALID
    assert out.startswith(f"{path}: INVALID [{code}] ")
    assert err == ""


# Usage and internal errors ----------------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [[], ["validate"], ["frobnicate"], ["validate", "--bogus", "x.xml"]],
                         ids=["nothing", "no-files", "unknown-command", "unknown-option"])
def test_usage_errors(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    assert main(argv) == EXIT_USAGE
    out, err = capsys.readouterr()
    assert "usage: vmshop" in err
    assert "Traceback" not in out + err


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "--help"]) == EXIT_OK
    assert "FILE" in capsys.readouterr().out


def test_unexpected_error_in_loading_is_reported_per_file(capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(data: bytes, what: str = "DAG") -> object:
        raise RuntimeError("kaboom")

    monkeypatch.setattr(cli, "load_dag", explode)
    status, out, _ = run(capsys, str(GOOD), str(DAGS / "cycle.xml"))
    assert status == EXIT_INTERNAL
    assert out.count("INVALID [Server.InternalError] RuntimeError: kaboom") == 2


def test_unexpected_error_anywhere_is_reported_without_traceback(capsys: pytest.CaptureFixture[str],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(path: str) -> object:
        raise RuntimeError("kaboom")

    monkeypatch.setattr(cli, "validate_file", explode)
    status, out, err = run(capsys, str(GOOD))
    assert status == EXIT_INTERNAL
    assert err == "vmshop: internal error: RuntimeError: kaboom\n"


def test_interrupt_is_an_internal_exit(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupt(path: str) -> object:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "validate_file", interrupt)
    assert run(capsys, str(GOOD))[0] == EXIT_INTERNAL


# The installed command ---------------------------------------------------------------------------------------

def vmshop_command() -> str:
    beside = Path(sys.executable).with_name("vmshop")
    found = str(beside) if beside.exists() else shutil.which("vmshop")
    if not found:
        pytest.skip("the vmshop console script is not installed")
    return found


def test_installed_console_script(tmp_path: Path) -> None:
    junk = tmp_path / "junk.bin"
    junk.write_bytes(bytes(range(256)) * 64)
    files = [str(SAMPLES[0]), str(DAGS / "cycle.xml"), str(junk), str(tmp_path / "missing.xml"), str(tmp_path)]
    done = subprocess.run([vmshop_command(), "validate", *files], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, check=False)
    assert done.returncode == EXIT_IO
    assert "Traceback" not in done.stdout + done.stderr
    assert done.stderr == ""
    verdicts = [line for line in done.stdout.splitlines() if not line.startswith("  ")]
    assert len(verdicts) == len(files)
    assert verdicts[0].endswith(": valid: start 'hw' from blank hardware, 2 action(s), 2 edge(s), 1 attribute(s)")
    assert "INVALID [Client.DagInvalid]" in verdicts[1]
    assert "  line 9, node 'a': cycle: a -> b -> a" in done.stdout
    assert "INVALID [Client.XMLSyntax]" in verdicts[2]
    assert verdicts[3].endswith("INVALID [Client.Unreadable] No such file or directory")
    assert verdicts[4].endswith("INVALID [Client.Unreadable] Is a directory")
    valid = subprocess.run([vmshop_command(), "validate", *map(str, SAMPLES)], capture_output=True, text=True,
                           timeout=120, check=False)
    assert (valid.returncode, valid.stderr) == (EXIT_OK, "")
    usage = subprocess.run([vmshop_command()], capture_output=True, text=True, timeout=120, check=False)
    assert usage.returncode == EXIT_USAGE and "Traceback" not in usage.stderr
