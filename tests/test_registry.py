"""The VM registry: storage, durability, concurrency, queries and their plans."""

from __future__ import annotations

import math
import os
import re
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmshop_common.errors import ConfigurationError, NoSuchVMError, QueryInvalidError
from vmshop_service import registry as registry_module
from vmshop_service.query import (
    BUILTIN_ATTRIBUTES,
    NUMERIC_ATTRIBUTES,
    STRING_ATTRIBUTES,
    Query,
    Term,
    format_query,
)
from vmshop_service.registry import PostgresRegistry, Registry, VMEntry


def _entry(vm_id: str, **fields: object) -> VMEntry:
    base: dict[str, object] = {"owner": "alice", "state": "running", "created": 1000.0, "updated": 1000.0}
    base.update(fields)
    return VMEntry(vm_id, **base)  # type: ignore[arg-type]


@pytest.fixture(params=["sqlite", "postgresql"])
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], Registry]:
    """Opens a registry on one store of each kind (a file, a PostgreSQL schema): open it again to reopen it."""
    if request.param == "sqlite":
        path = tmp_path / "registry.db"
        return lambda: Registry(path)
    conninfo = request.getfixturevalue("pg_conninfo")
    return lambda: PostgresRegistry(conninfo)


@pytest.fixture
def reg(opener: Callable[[], Registry]) -> Iterator[Registry]:
    registry = opener()
    yield registry
    registry.close()


def _ids(entries: list[VMEntry]) -> list[str]:
    return [e.vm_id for e in entries]


# Storage ------------------------------------------------------------------------------------------------


def test_add_get_round_trip(reg: Registry) -> None:
    entry = VMEntry(
        "vm-1", "alice", "running", plant="plant1:9001", plant_vm_id="p-17", image="base", memory=512, vcpus=2,
        disk=4096, arch="x86_64", address="10.0.0.5", host_port=2222, created=1714564800.25, updated=1714564801.5,
        termination=1714568400.0, collected=None, error=None, cost=12.5, dag_xml="<vm/>", steps=["start", "s1"],
        attributes={"project": "climate", "size": "42"},
    )
    reg.add(entry)
    assert reg.get("vm-1") == entry
    assert reg.count() == 1


def test_defaults_round_trip(reg: Registry) -> None:
    entry = VMEntry("vm-1", "bob", "pending")
    reg.add(entry)
    got = reg.get("vm-1")
    assert got == entry and got.plant is None and got.steps == [] and got.attributes == {}


def test_duplicate_id_is_refused_and_bulk_is_atomic(reg: Registry) -> None:
    reg.add(_entry("vm-1"))
    with pytest.raises(ValueError):
        reg.add(_entry("vm-1"))
    with pytest.raises(ValueError):
        reg.bulk_add([_entry("vm-2", attributes={"p": "1"}), _entry("vm-1")])
    assert reg.count() == 1
    with pytest.raises(NoSuchVMError):
        reg.get("vm-2")


def test_a_large_bulk_add_is_all_or_nothing(reg: Registry) -> None:
    """Hundreds at once (PostgreSQL streams them with COPY): a taken id refuses them all."""
    reg.add(_entry("vm-0007"))
    with pytest.raises(ValueError):
        reg.bulk_add([_entry(f"vm-{i:04d}", attributes={"n": str(i)}) for i in range(200)])
    assert reg.count() == 1 and reg.attribute_names() == set(BUILTIN_ATTRIBUTES)
    reg.bulk_add([_entry(f"x-{i:04d}", memory=i, steps=["a", "b"], attributes={"n": str(i), "t": "x y"})
                  for i in range(200)])
    assert _ids(reg.query("n<3")) == ["x-0000", "x-0001", "x-0002"]
    assert reg.get("x-0150") == _entry("x-0150", memory=150, steps=["a", "b"], attributes={"n": "150", "t": "x y"})


def test_long_attribute_values(reg: Registry) -> None:
    """Values up to the DAG's 1,024 characters of 4 bytes each are stored and compared whole (PostgreSQL
    indexes only their first 200 characters: values alike that far are still told apart)."""
    emoji = "".join(chr(0x1F300 + i % 700) for i in range(1024))
    same = "x" * 200
    values = {"e": emoji, "a": same + "a", "b": same + "b", "ab": same + "ab", "short": "x", "long": same + "c" * 824}
    reg.bulk_add([_entry(key, created=float(i), attributes={"v": value}) for i, (key, value) in
                  enumerate(values.items())])
    for op in ("=", "!=", "<", "<=", ">", ">=", "^="):
        for probe in (emoji, emoji[:300], same, same + "a", same + "ab", same + "b", same + "c" * 10, "x", "y"):
            query = (Term("v", op, probe),)
            expected = [key for key, value in values.items() if _reference_match(
                _entry(key, attributes={"v": value}), query)]
            assert _ids(reg.query(query)) == expected, (op, probe[:5], len(probe))


@pytest.mark.parametrize("name", ["", "has space", "-lead", "a=b", "é"])
def test_bad_attribute_names_are_refused(reg: Registry, name: str) -> None:
    with pytest.raises(ValueError):
        reg.add(_entry("vm-1", attributes={name: "x"}))
    reg.add(_entry("vm-2"))
    with pytest.raises(ValueError):
        reg.set_attributes("vm-2", {name: "x"})
    assert reg.get("vm-2").attributes == {}


def test_get_unknown(reg: Registry) -> None:
    with pytest.raises(NoSuchVMError) as info:
        reg.get("nope")
    assert info.value.code == "Client.NoSuchVM"


def test_update(reg: Registry) -> None:
    reg.add(_entry("vm-1", attributes={"a": "1"}))
    reg.update("vm-1", state="collected", collected=2000.0, steps=["x"], updated=1500.0)
    got = reg.get("vm-1")
    assert (got.state, got.collected, got.steps, got.updated) == ("collected", 2000.0, ["x"], 1500.0)
    reg.update("vm-1", address="10.0.0.9")
    assert reg.get("vm-1").updated > 1500.0
    reg.update("vm-1", attributes={"b": "2"})
    assert reg.get("vm-1").attributes == {"b": "2"}
    with pytest.raises(NoSuchVMError):
        reg.update("nope", state="x")
    with pytest.raises(TypeError):
        reg.update("vm-1", colour="red")
    with pytest.raises(ValueError):
        reg.update("vm-1", owner=None)
    assert reg.get("vm-1").owner == "alice"


def test_set_attributes_merges_or_replaces(reg: Registry) -> None:
    reg.add(_entry("vm-1", attributes={"a": "1", "b": "2"}))
    reg.set_attributes("vm-1", {"b": "3", "c": "x"})
    assert reg.get("vm-1").attributes == {"a": "1", "b": "3", "c": "x"}
    reg.set_attributes("vm-1", {"z": "9"}, replace=True)
    assert reg.get("vm-1").attributes == {"z": "9"}
    assert reg.query("b=3") == []
    with pytest.raises(NoSuchVMError):
        reg.set_attributes("nope", {"a": "1"})


def test_delete(reg: Registry) -> None:
    reg.add(_entry("vm-1", attributes={"project": "x"}))
    reg.delete("vm-1")
    assert reg.count() == 0
    with pytest.raises(NoSuchVMError):
        reg.delete("vm-1")
    # A name once stored stays queryable (an empty answer, not an error).
    assert "project" in reg.attribute_names()
    assert reg.query("project=x") == []


def test_all_and_collected(reg: Registry) -> None:
    reg.bulk_add([_entry("b", created=2.0), _entry("a", created=1.0, collected=5.0), _entry("c", created=2.0)])
    assert _ids(reg.all()) == ["a", "b", "c"]
    assert _ids(reg.all(include_collected=False)) == ["b", "c"]


def test_attribute_names(reg: Registry) -> None:
    assert reg.attribute_names() == set(BUILTIN_ATTRIBUTES)
    reg.add(_entry("vm-1", attributes={"project": "x", "size": "1"}))
    assert reg.attribute_names() == set(BUILTIN_ATTRIBUTES) | {"project", "size"}


def test_due_terminations(reg: Registry) -> None:
    reg.bulk_add([
        _entry("late", termination=300.0),
        _entry("due2", termination=200.0),
        _entry("due1", termination=100.0),
        _entry("exact", termination=250.0),
        _entry("gone", termination=50.0, collected=60.0),
        _entry("forever"),
    ])
    assert _ids(reg.due_terminations(250.0)) == ["due1", "due2", "exact"]
    assert reg.due_terminations(0.0) == []


def test_closed_registry(reg: Registry) -> None:
    reg.close()
    reg.close()
    with pytest.raises(ValueError):
        reg.count()


# Durability ---------------------------------------------------------------------------------------------


def test_close_and_reopen_keeps_rows(opener: Callable[[], Registry]) -> None:
    with opener() as first:
        first.add(_entry("vm-1", attributes={"project": "climate"}, steps=["a"]))
        first.update("vm-1", state="configured")
        if not isinstance(first, PostgresRegistry):
            assert first._connection().execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
            assert first._connection().execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        else:
            with first._reading() as conn:
                assert conn.execute("SHOW synchronous_commit").fetchone()[0] == "on"
    with opener() as second:
        got = second.get("vm-1")
        assert (got.state, got.attributes, got.steps) == ("configured", {"project": "climate"}, ["a"])
        assert _ids(second.query("project=climate")) == ["vm-1"]


def test_rows_visible_to_another_connection_before_close(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    with Registry(path) as reg:
        reg.add(_entry("vm-1"))
        other = sqlite3.connect(path)
        try:
            assert other.execute("SELECT vm_id FROM vms").fetchall() == [("vm-1",)]
        finally:
            other.close()


def test_schema_version_is_checked(opener: Callable[[], Registry]) -> None:
    with opener() as first:
        assert first.schema_version() == registry_module.SCHEMA_VERSION
        with first._transaction() as conn:
            conn.execute("UPDATE schema_version SET version = 99")
    with pytest.raises(ConfigurationError, match="schema version 99"):
        opener()


def test_a_version_1_registry_is_migrated(opener: Callable[[], Registry]) -> None:
    """A registry written by the first schema is brought to the current one, its rows kept."""
    with opener() as first:
        postgres = isinstance(first, PostgresRegistry)
        with first._transaction() as conn:
            for table in ("shops", "attribute_names", "vm_attributes", "vms", "schema_version"):
                conn.execute(f"DROP TABLE {table}")
            script = registry_module._PG_SCHEMA_1 if postgres else registry_module._SQLITE_SCHEMA_1
            for statement in registry_module._statements(script):
                conn.execute(statement)
            conn.execute("INSERT INTO schema_version (version) VALUES (1)")
            conn.execute("INSERT INTO vms (vm_id, owner, state, created, updated) VALUES ('old', 'alice', "
                         "'running', 1, 1)")
    with opener() as second:
        assert second.schema_version() == registry_module.SCHEMA_VERSION == 2
        assert second.get("old").shop is None
        second.add(_entry("new", shop="s1", state="placing"))
        assert second.update_owned("new", "s1", state="creating")


# Concurrency --------------------------------------------------------------------------------------------


def test_threads_adding_and_updating(reg: Registry) -> None:
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            for i in range(40):
                vm_id = f"w{worker}-{i}"
                reg.add(_entry(vm_id, attributes={"worker": str(worker)}))
                reg.update(vm_id, state="configured", memory=i)
                reg.set_attributes(vm_id, {"i": str(i)})
                reg.query(f"worker={worker} memory>=0", limit=5)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert reg.count() == 160
    assert len(reg.query("state=configured")) == 160
    for worker in range(4):
        assert len(reg.query(f"worker={worker} i<10")) == 10


# Several shops: ownership of creates, leases, shop names ---------------------------------------------------


def test_a_create_is_changed_only_by_the_shop_that_places_it(reg: Registry) -> None:
    reg.add(_entry("vm-1", state="placing", shop="east"))
    assert not reg.update_owned("vm-1", "west", state="creating")
    assert reg.update_owned("vm-1", "east", state="creating", plant="p1:9000")
    assert not reg.delete_owned("vm-1", "west")
    assert reg.update_owned("vm-1", "east", state="running")
    # Once it runs it is nobody's create any more: neither changed nor deleted as one.
    assert not reg.update_owned("vm-1", "east", state="creating")
    assert not reg.delete_owned("vm-1", "east")
    assert reg.get("vm-1").state == "running"
    reg.add(_entry("vm-2", state="creating", shop="east"))
    assert reg.delete_owned("vm-2", "east")
    assert not reg.update_owned("nope", "east", state="x")


def test_a_collect_during_a_create_ends_it_for_every_shop(reg: Registry) -> None:
    reg.add(_entry("vm-1", state="creating", shop="east", plant="p1:9000", attributes={"a": "1"}))
    before = reg.cancel_create("vm-1", 2000.0, "collected while it was being created")
    assert before is not None and before.plant == "p1:9000" and before.state == "creating"
    assert before.attributes == {"a": "1"}
    got = reg.get("vm-1")
    assert (got.state, got.collected) == ("collected", 2000.0)
    assert reg.cancel_create("vm-1", 2001.0, "again") is None  # once
    assert not reg.update_owned("vm-1", "east", state="running")  # the placing shop goes no further
    assert not reg.delete_owned("vm-1", "east")  # and keeps the (collected) entry
    reg.add(_entry("vm-2"))
    assert reg.cancel_create("vm-2", 2000.0, "x") is None  # a running VM is collected at its plant instead


def test_update_if_unchanged_loses_to_a_later_change(reg: Registry) -> None:
    reg.add(_entry("vm-1", updated=1000.0))
    assert not reg.update_if_unchanged("vm-1", 999.0, state="failed")
    assert reg.update_if_unchanged("vm-1", 1000.0, state="stopped", updated=1001.0)
    assert reg.get("vm-1").state == "stopped"
    reg.update("vm-1", collected=5.0)
    assert not reg.update_if_unchanged("vm-1", 9e9, state="x")
    assert not reg.update_if_unchanged("nope", 9e9, state="x")


def test_shops_and_their_heartbeats(reg: Registry) -> None:
    assert reg.shops() == []
    reg.register_shop("east", "CN=east", "i1", now=100.0)
    reg.register_shop("west", "CN=west", "i2", now=100.0)
    reg.heartbeat("east", now=150.0)
    shops = reg.shops()
    assert [(s.name, s.identity, s.heartbeat) for s in shops] == [("east", "CN=east", 150.0),
                                                                   ("west", "CN=west", 100.0)]
    assert registry_module.shops_alive(shops, now=170.0, dead_after=30.0) == {"east"}


def test_a_lease_is_claimed_by_one_shop_at_a_time(opener: Callable[[], Registry]) -> None:
    """Two shops (two registries on one store) claim due leases from many threads: each VM goes to one. An
    SQLite file belongs to one registry object (a second is refused), so there both names claim through one."""
    first = opener()
    second = opener() if isinstance(first, PostgresRegistry) else first
    try:
        first.bulk_add([_entry(f"vm-{i}", termination=float(i)) for i in range(60)]
                       + [_entry("placing", state="placing", termination=1.0),
                          _entry("gone", termination=1.0, collected=2.0), _entry("later", termination=500.0)])
        claims: dict[str, list[str]] = {}
        lock = threading.Lock()

        def claim(registry: Registry, shop: str) -> None:
            while True:
                got = registry.claim_due(100.0, shop, stale_before=0.0, limit=7)
                if not got:
                    return
                with lock:
                    for entry in got:
                        claims.setdefault(entry.vm_id, []).append(shop)

        threads = [threading.Thread(target=claim, args=(registry, f"{name}{n}"))
                   for n in range(3) for registry, name in ((first, "east"), (second, "west"))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(claims) == sorted(f"vm-{i}" for i in range(60))
        assert all(len(shops) == 1 for shops in claims.values()), claims
        # A claim given up, or gone stale (its shop died), is taken again.
        first.release_claim("vm-3", claims["vm-3"][0])
        assert [e.vm_id for e in second.claim_due(100.0, "west9", stale_before=0.0)] == ["vm-3"]
        assert len(second.claim_due(200.0, "west9", stale_before=150.0, limit=1000)) == 60
        assert [e.vm_id for e in first.claim_due(100.0, "x", stale_before=0.0)] == []
    finally:
        first.close()
        second.close()


def test_text_postgresql_cannot_hold_is_a_value_error(pg_conninfo: str) -> None:
    with PostgresRegistry(pg_conninfo) as registry:
        with pytest.raises(ValueError):
            registry.add(_entry("vm-1", owner="a\x00b"))
        with pytest.raises(ValueError):
            registry.add(_entry("vm-2", attributes={"a": "x\x00"}))
        assert registry.count() == 0
        registry.add(_entry("vm-3"))  # the connection is still good


def test_shops_starting_at_once_on_an_empty_database(pg_conninfo: str) -> None:
    """Several registries opened at once on an empty PostgreSQL schema: one creates it, none fails."""
    opened: list[Registry] = []
    errors: list[BaseException] = []

    def open_one() -> None:
        try:
            opened.append(PostgresRegistry(pg_conninfo))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert errors == [] and len(opened) == 4
        assert {registry.schema_version() for registry in opened} == {registry_module.SCHEMA_VERSION}
    finally:
        for registry in opened:
            registry.close()


def test_a_shop_name_is_held_by_one_live_shop(pg_conninfo: str) -> None:
    first, second = PostgresRegistry(pg_conninfo), PostgresRegistry(pg_conninfo)
    try:
        first.register_shop("east", "CN=east", "i1")
        with pytest.raises(ConfigurationError, match="another live shop uses the name 'east'"):
            second.register_shop("east", "CN=east", "i2")
        second.register_shop("west", "CN=west", "i2")
        first.close()  # the shop stops (or dies): its name is free at once
        second.register_shop("east", "CN=east", "i3")
    finally:
        first.close()
        second.close()


def test_postgresql_restarted_under_a_registry(pg_cluster: object, pg_conninfo: str) -> None:
    """While the server is down every call fails with RegistryUnavailable; once it is back, calls succeed on
    new connections (the pooled ones the restart closed are noticed before use); nothing is half-written."""
    from vmshop_common.errors import RegistryUnavailableError

    registry = PostgresRegistry(pg_conninfo)
    try:
        registry.add(_entry("before", attributes={"a": "1"}))
        registry.register_shop("east", "CN=east", "i1")
        pg_cluster.stop()  # type: ignore[attr-defined]
        try:
            with pytest.raises(RegistryUnavailableError) as info:
                registry.add(_entry("during", attributes={"a": "2"}))
            assert info.value.code == "Server.RegistryUnavailable"
            with pytest.raises(RegistryUnavailableError):
                registry.get("before")
        finally:
            pg_cluster.start()  # type: ignore[attr-defined]
        registry.add(_entry("after", attributes={"a": "3"}))
        assert _ids(registry.query('a^=""')) == ["after", "before"]
        registry.heartbeat("east")  # takes the name back (the restart ended its hold)
        other = PostgresRegistry(pg_conninfo)
        try:
            with pytest.raises(ConfigurationError):
                other.register_shop("east", "CN=east", "i2")
        finally:
            other.close()
    finally:
        registry.close()


def test_credentials_stay_out_of_messages(pg_cluster: object, pg_database: str, tmp_path: Path) -> None:
    from pgcluster import PASSWORD

    from vmshop_common.errors import RegistryUnavailableError

    conninfo = pg_cluster.tcp_conninfo(pg_database)  # type: ignore[attr-defined]
    secret = tmp_path / "password"
    secret.write_text(PASSWORD + "\n")
    registry = registry_module.open_registry(None, conninfo, secret)
    try:
        assert isinstance(registry, PostgresRegistry) and registry.count() >= 0
        assert PASSWORD not in registry.describe()
    finally:
        registry.close()
    secret.write_text("wrong-password-123\n")
    with pytest.raises(RegistryUnavailableError) as info:
        registry_module.open_registry(None, conninfo, secret)
    assert "wrong-password-123" not in str(info.value) and "password authentication failed" in str(info.value)
    redacted = registry_module.redacted(conninfo + f" password={PASSWORD}")
    assert PASSWORD not in redacted and "dbname=" in redacted


# Query semantics ----------------------------------------------------------------------------------------


@pytest.fixture
def sample(reg: Registry) -> Registry:
    reg.bulk_add([
        _entry("vm-a", owner="alice", memory=256, cost=1.5, plant="p1:9000", created=1.0,
               attributes={"project": "climate model", "size": "10", "tag": "50%_off"}),
        _entry("vm-b", owner="alicia", memory=512, cost=2.0, plant="p2:9000", created=2.0, termination=500.0,
               attributes={"project": "climate", "size": "9", "tag": "50xoff"}),
        _entry("vm-c", owner="bob", memory=1024, state="collected", created=3.0, termination=100.0,
               attributes={"project": "genome", "size": "big"}),
        _entry("vm-d", owner="carol", memory=128, created=4.0),
    ])
    return reg


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", ["vm-a", "vm-b", "vm-c", "vm-d"]),
        ("owner=alice", ["vm-a"]),
        ("owner!=alice", ["vm-b", "vm-c", "vm-d"]),
        ("owner<b", ["vm-a", "vm-b"]),
        ("owner<=bob", ["vm-a", "vm-b", "vm-c"]),
        ("owner>bob", ["vm-d"]),
        ("owner>=bob", ["vm-c", "vm-d"]),
        ("owner^=ali", ["vm-a", "vm-b"]),
        ("owner^=alic state=running", ["vm-a", "vm-b"]),
        ("memory=512", ["vm-b"]),
        ("memory=512.0", ["vm-b"]),
        ("memory!=512", ["vm-a", "vm-c", "vm-d"]),
        ("memory<512", ["vm-a", "vm-d"]),
        ("memory<=512", ["vm-a", "vm-b", "vm-d"]),
        ("memory>256", ["vm-b", "vm-c"]),
        ("memory>=256 state=running", ["vm-a", "vm-b"]),
        ("memory>=2.56e2 and memory<1e3", ["vm-a", "vm-b"]),
        ("cost>1", ["vm-a", "vm-b"]),  # no cost: no match
        ("cost!=2", ["vm-a"]),
        ("termination<=500", ["vm-b", "vm-c"]),
        ("termination>=1970-01-01T00:05:00Z", ["vm-b"]),
        ("plant^=p1:", ["vm-a"]),
        ("state=collected", ["vm-c"]),
        ("vm_id^=vm-", ["vm-a", "vm-b", "vm-c", "vm-d"]),
        # user attributes: strings for = and !=
        ('project="climate model"', ["vm-a"]),
        ("project=climate", ["vm-b"]),
        ("project!=climate", ["vm-a", "vm-c"]),  # only VMs that have the attribute
        ("project^=climate", ["vm-a", "vm-b"]),
        ('project^="climate "', ["vm-a"]),
        ("size=10", ["vm-a"]),
        ("size=10.0", []),
        # numbers against numbers, strings against the rest
        ("size<10", ["vm-b"]),  # 9 < 10; "big" < "10" is false as strings
        ("size>9", ["vm-a", "vm-c"]),  # 10 > 9; "big" > "9" as strings
        ("size>=10", ["vm-a", "vm-c"]),
        ("size<=9.0", ["vm-b"]),
        ("size>a", ["vm-c"]),  # a string value: string comparison for all ("10" < "9" < "a" < "big")
        ("size<a", ["vm-a", "vm-b"]),
        # prefix with LIKE wildcards in the value matches them literally
        ("tag^=50%", ["vm-a"]),
        ("tag^=50%_", ["vm-a"]),
        ("tag^=50_", []),
        ("tag^=50", ["vm-a", "vm-b"]),
        ('tag^=""', ["vm-a", "vm-b"]),
        ("project=climate size<10 owner^=ali", ["vm-b"]),
    ],
)
def test_query_operators(sample: Registry, text: str, expected: list[str]) -> None:
    assert _ids(sample.query(text)) == expected


def test_query_parsed_and_limit(sample: Registry) -> None:
    assert _ids(sample.query((Term("owner", "^=", "a"),))) == ["vm-a", "vm-b"]
    assert _ids(sample.query("", limit=2)) == ["vm-a", "vm-b"]
    assert sample.query("", limit=0) == []
    with pytest.raises(QueryInvalidError):
        sample.query("", limit=-1)


def test_query_results_carry_attributes(sample: Registry) -> None:
    (got,) = sample.query("owner=bob")
    assert got.attributes == {"project": "genome", "size": "big"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("colour=red", "unknown attribute 'colour'"),
        ("memory>lots", "'memory' is numeric"),
        ("memory^=1", "'^=' needs a string attribute"),
        ("memory>>3", "unknown operator '>>'"),
    ],
)
def test_query_errors(sample: Registry, text: str, message: str) -> None:
    with pytest.raises(QueryInvalidError, match=re.escape(message)) as info:
        sample.query(text)
    assert info.value.code == "Client.QueryInvalid"


@pytest.mark.parametrize(
    "evil",
    ["' OR 1=1 --", "\" OR 1=1 --", "x'; DROP TABLE vms; --", "%", "_", "alice' OR '1'='1", "1) OR (1=1"],
)
def test_injection_attempts_are_plain_values(sample: Registry, evil: str) -> None:
    for name in ("owner", "project", "vm_id"):
        for op in ("=", "^=", "<"):
            results = sample.query((Term(name, op, evil),))
            assert all(getattr(e, name, e.attributes.get(name)) is not None for e in results)
            text = format_query((Term(name, op, evil),))
            assert _ids(sample.query(text)) == _ids(results)
        assert sample.query((Term("owner", "=", evil),)) == []
    assert sample.count() == 4


# Plans and scale ----------------------------------------------------------------------------------------

_SCALE = 20_000


def _scale_entries() -> list[VMEntry]:
    return [
        VMEntry(
            f"vm{i:05d}", f"user{i % 50}", "running" if i % 3 else "collected", plant=f"plant{i % 5}:9000",
            image=f"img{i % 7}", memory=128 * (1 + i % 8), vcpus=1 + i % 4, disk=1024, arch="x86_64",
            address=f"10.{i // 65536}.{(i // 256) % 256}.{i % 256}", created=float(i), updated=float(i),
            termination=100_000.0 + i, cost=float(i % 100),
            attributes={"project": f"proj{i % 100}", "seq": str(i), "tier": "gold" if i % 1000 == 0 else "basic"},
        )
        for i in range(_SCALE)
    ]


@pytest.fixture(scope="module")
def big() -> Iterator[tuple[Registry, list[VMEntry]]]:
    registry = Registry(":memory:")
    entries = _scale_entries()
    registry.bulk_add(entries)
    yield registry, entries
    registry.close()


_SCAN = re.compile(r"^SCAN (vms|a|vm_attributes)\b")


def _plan(registry: Registry, text: str) -> list[str]:
    sql, params = registry.query_sql(text)
    return registry.explain(sql, params)


@pytest.mark.parametrize(
    ("text", "index"),
    [
        ("project=proj7", "vm_attributes_name_value"),
        ("tier=gold owner=user0", "vm_attributes_name_value"),
        ("seq<10", "vm_attributes_name_num"),
        ("seq>=19990", "vm_attributes_name_num"),
        ("project^=proj1", "vm_attributes_name_value"),
        ("owner=user3", "vms_owner"),
        ("owner^=user1", "vms_owner"),
        ("address=10.0.1.1", "vms_address"),
        ("termination<=100010", "vms_termination"),
        ("created>19990", "vms_created"),
        ("vm_id=vm00042", "sqlite_autoindex_vms_1"),
        ("image=img3 and memory>=1024", "INDEX"),
    ],
)
def test_selective_queries_use_indexes(big: tuple[Registry, list[VMEntry]], text: str, index: str) -> None:
    registry, _ = big
    plan = _plan(registry, text)
    assert not [line for line in plan if _SCAN.match(line)], plan
    assert any(index in line for line in plan), plan


@pytest.fixture(scope="module")
def big_pg(pg_cluster: object, pg_database: str) -> Iterator[PostgresRegistry]:
    conninfo = pg_cluster.new_schema(pg_database)  # type: ignore[attr-defined]
    registry = PostgresRegistry(conninfo)
    registry.bulk_add(_scale_entries())
    yield registry
    registry.close()
    pg_cluster.drop_schema(conninfo)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("text", "index"),
    [
        ("project=proj7", "vm_attributes_name_value"),
        ("tier=gold owner=user0", "vm_attributes_name_value"),
        ("seq<10", "vm_attributes_name_num"),
        ("project^=proj99", "vm_attributes_name_value"),
        ("owner=user3", "vms_owner"),
        ("address=10.0.1.1", "vms_address"),
        ("termination<=100010", "vms_"),
        ("memory<200", "vms_memory"),
        ("vm_id=vm00042", "vms_pkey"),
    ],
)
def test_selective_queries_use_indexes_on_postgresql(big_pg: PostgresRegistry, text: str, index: str) -> None:
    sql, params = big_pg.query_sql(text)
    plan = big_pg.explain(sql, params)
    assert not [line for line in plan if "Seq Scan on vms" in line], plan
    assert any(index in line for line in plan), plan
    expected = [e.vm_id for e in _scale_entries() if _reference_match(e, _parse(text))]
    assert _ids(big_pg.query(text)) == expected


def test_due_terminations_uses_its_index(big: tuple[Registry, list[VMEntry]]) -> None:
    registry, entries = big
    plan = registry.explain(registry_module._DUE_SQL, [100_010.0])
    # Either index on the termination time will do (which one depends on the planner's statistics).
    assert any("vms_due" in line or "vms_termination" in line for line in plan), plan
    assert not [line for line in plan if _SCAN.match(line)], plan
    expected = [e.vm_id for e in sorted(entries, key=lambda e: (e.termination or 0.0, e.vm_id))
                if e.termination is not None and e.termination <= 100_010.0 and e.collected is None]
    assert _ids(registry.due_terminations(100_010.0)) == expected
    assert len(expected) == 11


def test_unknown_attribute_check_uses_an_index(big: tuple[Registry, list[VMEntry]]) -> None:
    registry, _ = big
    plan = registry.explain("SELECT 1 FROM attribute_names WHERE name = ?", ["project"])
    assert any("PRIMARY KEY" in line or "INDEX" in line for line in plan), plan


@pytest.mark.parametrize(
    "text",
    ["project=proj0 tier=gold", "seq<25", "seq>=19990 owner=user40", "owner=user3 state=collected memory>=1024",
     "project^=proj9 seq<300", "tier=gold", "address^=10.0.1. vcpus=2"],
)
def test_selective_queries_at_scale(big: tuple[Registry, list[VMEntry]], text: str) -> None:
    registry, entries = big
    got = registry.query(text)
    assert _ids(got) == [e.vm_id for e in entries if _reference_match(e, _parse(text))]
    assert 0 < len(got) < 1000


def test_count_at_scale(big: tuple[Registry, list[VMEntry]]) -> None:
    registry, _ = big
    assert registry.count() == _SCALE
    assert len(registry.query("tier=gold")) == _SCALE // 1000


def _parse(text: str) -> Query:
    from vmshop_service.query import parse_query

    return parse_query(text)


# Reference filter (hypothesis) --------------------------------------------------------------------------

_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


def _num(text: str) -> float | None:
    if not _NUMBER.fullmatch(text):
        return None
    value = float(text)
    return value if math.isfinite(value) else None


def _compare(left: object, op: str, right: object) -> bool:
    if op == "=":
        return left == right
    if op == "!=":
        return left != right
    if op == "<":
        return left < right  # type: ignore[operator]
    if op == "<=":
        return left <= right  # type: ignore[operator]
    if op == ">":
        return left > right  # type: ignore[operator]
    return left >= right  # type: ignore[operator]


def _reference_match(entry: VMEntry, query: Query) -> bool:
    """The query's meaning, written independently of the SQL."""
    for name, op, value in query:
        if name in NUMERIC_ATTRIBUTES:
            stored = getattr(entry, name)
            number = _num(value)
            assert number is not None
            if stored is None or not _compare(stored, op, number):
                return False
        elif name in STRING_ATTRIBUTES:
            stored = getattr(entry, name)
            if stored is None:
                return False
            if not (stored.startswith(value) if op == "^=" else _compare(stored, op, value)):
                return False
        else:
            if name not in entry.attributes:
                return False
            stored = entry.attributes[name]
            if op == "^=":
                ok = stored.startswith(value)
            elif op in ("=", "!="):
                ok = _compare(stored, op, value)
            elif _num(value) is not None and _num(stored) is not None:
                ok = _compare(_num(stored), op, _num(value))
            else:
                ok = _compare(stored, op, value)
            if not ok:
                return False
    return True


_TEXT = st.text(st.sampled_from("ab%_\\\"' é\U0001f600\U0010ffff\uffff"), max_size=4)
_NUMERIC_TEXT = st.one_of(
    st.integers(-5, 5).map(str), st.sampled_from(["0.5", "-1.5", "1e1", ".5", "2.", "+3", "1e999", "nan", "inf"])
)
_USER_NAMES = ["p", "q", "r"]
_OPS = ["=", "!=", "<", "<=", ">", ">=", "^="]


@st.composite
def _entries(draw: st.DrawFn) -> list[VMEntry]:
    count = draw(st.integers(0, 8))
    entries = []
    for i in range(count):
        attributes = {name: draw(st.one_of(_TEXT, _NUMERIC_TEXT))
                      for name in _USER_NAMES if draw(st.booleans())}
        entries.append(VMEntry(
            f"vm{i}", draw(_TEXT), draw(st.sampled_from(["running", "collected"])),
            plant=draw(st.one_of(st.none(), _TEXT)),
            memory=draw(st.one_of(st.none(), st.integers(-3, 3))),
            cost=draw(st.one_of(st.none(), st.floats(-3, 3, allow_nan=False))),
            termination=draw(st.one_of(st.none(), st.sampled_from([0.0, 1.0, 2.5]))),
            created=float(draw(st.integers(0, 3))), updated=0.0,
            attributes=attributes,
        ))
    return entries


@st.composite
def _terms(draw: st.DrawFn) -> Query:
    terms = []
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(["owner", "plant", "state", "memory", "cost", "termination", *_USER_NAMES]))
        if name in NUMERIC_ATTRIBUTES:
            op = draw(st.sampled_from(_OPS[:-1]))
            value = draw(st.one_of(st.integers(-4, 4).map(str), st.sampled_from(["0.5", "-1.25", "2.5", "1e0"])))
        else:
            op = draw(st.sampled_from(_OPS))
            value = draw(st.one_of(_TEXT, _NUMERIC_TEXT))
        terms.append(Term(name, op, value))
    return tuple(terms)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def reusable(request: pytest.FixtureRequest) -> Iterator[Registry]:
    """One registry of each kind for every example (emptied before each)."""
    if request.param == "sqlite":
        registry: Registry = Registry(":memory:")
        yield registry
        registry.close()
        return
    cluster = request.getfixturevalue("pg_cluster")
    conninfo = cluster.new_schema(request.getfixturevalue("pg_database"))
    registry = PostgresRegistry(conninfo)
    yield registry
    registry.close()
    cluster.drop_schema(conninfo)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_entries(), _terms())
def test_query_equals_reference_filter(reusable: Registry, entries: list[VMEntry], query: Query) -> None:
    registry = reusable
    with registry._transaction() as conn:
        for table in ("vm_attributes", "vms", "attribute_names"):
            conn.execute(f"DELETE FROM {table}")
    registry.bulk_add(entries)
    # Make every user attribute name known, as a shop that has seen them would.
    registry.bulk_add([VMEntry("names", "x", "x", created=-1.0, attributes={n: "" for n in _USER_NAMES})])
    registry.delete("names")
    expected = [e.vm_id for e in sorted(entries, key=lambda e: (e.created, e.vm_id))
                if _reference_match(e, query)]
    assert _ids(registry.query(query)) == expected
    assert _ids(registry.query(format_query(query))) == expected


def test_changes_are_stamped_with_the_injected_clock(tmp_path: Path) -> None:
    now = [1_000.0]
    with Registry(tmp_path / "r.sqlite3", clock=lambda: now[0]) as registry:
        registry.add(VMEntry(vm_id="a", owner="u", state="placing", created=1.0, updated=1.0))
        now[0] = 2_000.0
        registry.update("a", state="running")
        assert registry.get("a").updated == 2_000.0
        now[0] = 3_000.0
        registry.set_attributes("a", {"project": "x"})
        assert registry.get("a").updated == 3_000.0
        assert registry.update_if_unchanged("a", 2_999.0, state="failed") is False  # changed after that view
        assert registry.update_if_unchanged("a", 3_000.0, state="failed") is True


def _statistics_rows(registry: Registry) -> int:
    conn = registry._connection()
    if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'sqlite_stat1'").fetchone() is None:
        return 0
    return int(conn.execute("SELECT COUNT(*) FROM sqlite_stat1").fetchone()[0])


def test_a_create_does_not_analyze_but_a_bulk_load_does(tmp_path: Path) -> None:
    with Registry(tmp_path / "r.sqlite3") as registry:
        for i in range(50):
            registry.add(VMEntry(vm_id=f"one-{i}", owner="u", state="running"))
        assert _statistics_rows(registry) == 0  # the create path leaves the planner's statistics alone
        registry.bulk_add(VMEntry(vm_id=f"many-{i}", owner=f"u{i % 7}", state="running") for i in range(200))
        assert _statistics_rows(registry) > 0


def test_the_generation_grows_with_every_write_and_is_none_when_others_write(reg: Registry) -> None:
    """A shop may keep a query's answer while the generation is unchanged: every write moves it (SQLite: the
    shop is its only writer); a registry several shops share has none (PostgreSQL)."""
    if isinstance(reg, PostgresRegistry):
        assert reg.generation is None and reg.query_with_generation("state=running")[0] is None
        return
    first = reg.generation
    assert first is not None
    reg.add(_entry("vm-g"))
    second = reg.generation
    assert second is not None and second > first
    generation, entries = reg.query_with_generation("state=running")
    assert generation == second and _ids(entries) == ["vm-g"]
    reg.update("vm-g", memory=1)
    assert reg.generation != second
    with pytest.raises(ValueError):
        reg.add(_entry("vm-g"))  # a refused write moves it too (harmless: a kept answer is asked again)


# One SQLite file, one registry -----------------------------------------------------------------------------

def test_a_second_registry_on_one_sqlite_file_is_refused_until_the_first_is_closed(tmp_path: Path) -> None:
    """The shop keeps query answers while its registry's generation holds, so nothing else may write the file."""
    path = tmp_path / "registry.db"
    first = Registry(path)
    try:
        first.add(_entry("vm-1"))
        with pytest.raises(ConfigurationError, match=rf"in use by another shop \(pid {os.getpid()}\)"):
            Registry(path)
        assert first.get("vm-1").owner == "alice"  # the refused one changed nothing
    finally:
        first.close()
    with Registry(path) as again:
        assert _ids(again.query("owner=alice")) == ["vm-1"]
    assert (path.parent / "registry.db.lock").stat().st_mode & 0o777 == 0o600


def test_a_refused_open_releases_the_file(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    with Registry(path) as reg:
        with reg._transaction() as conn:
            conn.execute("UPDATE schema_version SET version = 99")
    with pytest.raises(ConfigurationError, match="schema version 99"):
        Registry(path)
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE schema_version SET version = ?", (registry_module.SCHEMA_VERSION,))
    conn.close()
    Registry(path).close()  # not held by the refused open


def test_in_memory_registries_hold_no_file(tmp_path: Path) -> None:
    with Registry(":memory:"), Registry(":memory:"):
        pass
    assert list(tmp_path.iterdir()) == []
