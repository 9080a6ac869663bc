"""The IP pool: ip.txt in the original's eight-field format, shared safely by threads and processes."""

from __future__ import annotations

import ipaddress
import os
import re
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmplant_service.ippool import IPPool, PoolEntry, _parse, write_pool
from vmshop_common.errors import ConfigurationError, PoolExhaustedError

NET = ipaddress.IPv4Network("192.168.77.0/24")

HANDWRITTEN = """\
# ip.txt as the original shipped it
192.168.77.1   test  /script/1  /cow/1  0 0 0  unused

# a comment between lines
192.168.77.2   test  /script/2  /cow/2  0 0 0  unused
192.168.77.3   test  /script/3  /cow/3  0 0 0  unused
"""


def pool_file(tmp_path: Path, count: int = 4) -> Path:
    return write_pool(tmp_path / "ip.txt", NET, 10, count, "vmshop0", tmp_path / "shares")


def test_write_pool(tmp_path: Path) -> None:
    path = pool_file(tmp_path, 64)
    pool = IPPool(path)
    entries = pool.entries()
    assert len(entries) == 64 and pool.free_count() == 64 and pool.prefix == 24
    assert entries[0] == PoolEntry("192.168.77.10", "vmshop0", f"{tmp_path}/shares/1", "none", "0", "0", "0",
                                   None, entries[0].line)
    assert entries[-1].address == "192.168.77.73" and entries[-1].share.endswith("/64")
    for line in path.read_text().splitlines():
        assert line.startswith("#") or len(line.split()) == 8


def test_write_pool_refuses(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="do not fit"):
        write_pool(tmp_path / "a.txt", NET, 250, 10, "br", "/s")
    with pytest.raises(ValueError, match="do not fit"):
        write_pool(tmp_path / "a.txt", NET, 0, 2, "br", "/s")  # the network address
    with pytest.raises(ValueError, match="bridge"):
        write_pool(tmp_path / "a.txt", NET, 10, 2, "my bridge", "/s")
    pool_file(tmp_path)
    with pytest.raises(FileExistsError):
        pool_file(tmp_path)
    write_pool(tmp_path / "ip.txt", NET, "192.168.77.100", 2, "br", "/s", overwrite=True)
    assert [e.address for e in IPPool(tmp_path / "ip.txt").entries()] == ["192.168.77.100", "192.168.77.101"]


def test_checkout_release_cycle(tmp_path: Path) -> None:
    pool = IPPool(pool_file(tmp_path, 3))
    a = pool.checkout("vm-a")
    assert a.address == "192.168.77.10" and a.holder == "vm-a"
    assert pool.checkout("vm-a") == a  # idempotent
    b = pool.checkout("vm-b")
    assert b.address == "192.168.77.11"
    assert pool.holder("192.168.77.11") == "vm-b" and pool.holder("192.168.77.12") is None
    with pytest.raises(KeyError):
        pool.holder("10.0.0.1")
    assert pool.held_by("vm-a") == a and pool.held_by("nobody") is None
    released = pool.release("vm-a")
    assert [e.address for e in released] == ["192.168.77.10"] and released[0].holder == "vm-a"
    assert pool.release("vm-a") == []  # safe to repeat
    assert pool.checkout("vm-c").address == "192.168.77.10"  # the first unused in file order
    pool.checkout("vm-d")
    assert pool.free_count() == 0
    with pytest.raises(PoolExhaustedError):
        pool.checkout("vm-e")
    assert pool.checkout("vm-b") == b  # a holder still gets its own


def test_reconcile_releases_addresses_of_vms_that_are_gone(tmp_path: Path) -> None:
    pool = IPPool(pool_file(tmp_path, 4))
    for vm in ("a", "b", "c"):
        pool.checkout(vm)
    released = pool.reconcile({"b", "zzz"})
    assert sorted(e.holder for e in released if e.holder) == ["a", "c"]
    assert [e.holder for e in pool.entries()] == [None, "b", None, None]
    assert pool.reconcile(["b"]) == []


def test_only_the_eighth_field_changes_and_comments_stay(tmp_path: Path) -> None:
    path = tmp_path / "ip.txt"
    path.write_text(HANDWRITTEN)
    pool = IPPool(path)
    assert pool.prefix == 24  # no network comment: the default
    pool.checkout("domU-7")
    assert path.read_text() == HANDWRITTEN.replace("/cow/1  0 0 0  unused", "/cow/1  0 0 0  domU-7")
    pool.release("domU-7")
    assert path.read_text() == HANDWRITTEN


def test_every_change_is_atomic_and_keeps_the_mode(tmp_path: Path) -> None:
    path = pool_file(tmp_path)
    path.chmod(0o640)
    pool = IPPool(path)
    inode = path.stat().st_ino
    pool.checkout("x")
    assert path.stat().st_ino != inode  # replaced, not rewritten in place
    assert path.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ip.txt", "ip.txt.lock"]  # no temporary files left


def test_state_is_in_the_file(tmp_path: Path) -> None:
    path = pool_file(tmp_path)
    IPPool(path).checkout("vm1")
    assert IPPool(path).held_by("vm1") is not None
    other = IPPool(path)
    first = IPPool(path)
    other.checkout("vm2")
    assert first.holder("192.168.77.11") == "vm2"  # each operation re-reads the file


def test_prefix_from_the_network_comment(tmp_path: Path) -> None:
    path = write_pool(tmp_path / "ip.txt", ipaddress.IPv4Network("10.1.0.0/16"), 5, 3, "br", "/s")
    assert IPPool(path).prefix == 16
    assert IPPool(path, prefix=20).prefix == 20
    (tmp_path / "other.txt").write_text("# network settings follow\n10.0.0.1 b /s n 0 0 0 unused\n")
    assert IPPool(tmp_path / "other.txt").prefix == 24


@pytest.mark.parametrize(("line", "message"), [
    ("192.168.77.9 test /s /c 0 0 0", "7 fields"),
    ("192.168.77.9 test /s /c 0 0 0 unused extra", "9 fields"),
    ("192.168.77.300 test /s /c 0 0 0 unused", "not an IPv4 address"),
    ("192.168.077.9 test /s /c 0 0 0 unused", "not an IPv4 address"),
    ("192.168.77.1 test /s /c 0 0 0 unused", "listed twice (first on line 2)"),
])
def test_bad_lines_name_their_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "ip.txt"
    path.write_text(HANDWRITTEN + line + "\n")
    with pytest.raises(ConfigurationError, match=re.escape(message)) as caught:
        IPPool(path)
    assert caught.value.line == 7 and "line 7" in str(caught.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="cannot read"):
        IPPool(tmp_path / "none.txt")


@pytest.mark.parametrize("vm_id", ["", "two words", "#x", "unused", "a\tb"])
def test_vm_ids_that_cannot_be_a_field(tmp_path: Path, vm_id: str) -> None:
    with pytest.raises(ValueError):
        IPPool(pool_file(tmp_path)).checkout(vm_id)


def test_threads_never_share_an_address(tmp_path: Path) -> None:
    pool = IPPool(pool_file(tmp_path, 40))
    got: dict[str, str] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def worker(n: int) -> None:
        try:
            barrier.wait()
            for i in range(6):
                vm = f"t{n}-{i}"
                got[vm] = pool.checkout(vm).address
        except PoolExhaustedError:
            pass
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(got) == 40 and len(set(got.values())) == 40
    assert {e.holder: e.address for e in pool.entries()} == got


WORKER = """
import sys
from vmplant_service.ippool import IPPool
from vmshop_common.errors import PoolExhaustedError
pool = IPPool(sys.argv[1])
for i in range(int(sys.argv[3])):
    try:
        print(pool.checkout(f"{sys.argv[2]}-{i}").address)
    except PoolExhaustedError:
        print("exhausted")
"""


def test_processes_never_share_an_address(tmp_path: Path) -> None:
    path = pool_file(tmp_path, 30)
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(path), f"p{n}", "10"], stdout=subprocess.PIPE,
                              text=True) for n in range(4)]
    outputs = [proc.communicate(timeout=120)[0].split() for proc in procs]
    assert all(proc.returncode == 0 for proc in procs)
    addresses = [a for out in outputs for a in out if a != "exhausted"]
    assert len(addresses) == 30 and len(set(addresses)) == 30
    assert sum(out.count("exhausted") for out in outputs) == 10
    assert IPPool(path).free_count() == 0


operations = st.lists(st.tuples(st.sampled_from(["checkout", "release", "reconcile"]),
                                st.integers(min_value=0, max_value=7),  # VM number
                                st.integers(min_value=0, max_value=1),  # which of two pool objects
                                st.sets(st.integers(min_value=0, max_value=7))),
                      max_size=40)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=operations)
def test_random_interleavings_never_give_one_address_to_two_vms(tmp_path: Path, ops: list) -> None:
    with tempfile.TemporaryDirectory(dir=tmp_path) as directory:
        path = Path(directory) / "ip.txt"
        path.write_text(HANDWRITTEN + "192.168.77.4 test /script/4 /cow/4 0 0 0 unused\n")
        pools = [IPPool(path), IPPool(path)]  # two users of one file, as two processes would be
        model: dict[str, str] = {}  # vm -> address
        for op, vm_number, which, live in ops:
            pool, vm = pools[which], f"vm{vm_number}"
            if op == "checkout":
                try:
                    entry = pool.checkout(vm)
                except PoolExhaustedError:
                    assert len(model) == 4 and vm not in model
                    continue
                assert model.setdefault(vm, entry.address) == entry.address
            elif op == "release":
                released = pool.release(vm)
                assert [e.address for e in released] == ([model.pop(vm)] if vm in model else [])
            else:
                keep = {f"vm{n}" for n in live}
                released = pool.reconcile(keep)
                gone = {v for v in model if v not in keep}
                assert sorted(e.holder for e in released if e.holder) == sorted(gone)
                model = {v: a for v, a in model.items() if v in keep}
            entries = IPPool(path).entries()
            holders = [e.holder for e in entries if e.holder is not None]
            assert len(holders) == len(set(holders))  # no VM holds two addresses
            assert {e.holder: e.address for e in entries if e.holder} == model  # no address has two VMs
            text = path.read_text()
            assert _parse(text, path).text() == text  # the file round-trips
            assert text.startswith("# ip.txt as the original shipped it\n") and "\n\n# a comment between" in text
        assert not [p for p in os.listdir(directory) if p.endswith(".tmp")]
