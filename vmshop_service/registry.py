"""The shop's VM registry: every VM the shop created, durable and queryable (SQLite).

One row per VM in ``vms`` (the built-in attributes, each queryable column
indexed) and the DAG's user attributes in ``vm_attributes(vm_id, name,
value, num)`` (``num`` is ``value`` as a number when it is one), indexed on
``(name, value)`` and ``(name, num)``. ``attribute_names`` is the set of user
attribute names ever stored (insert-only, so a query that was valid stays
valid after the last VM carrying a name is deleted).

Contracts:

- Durability: the database runs in WAL mode with ``synchronous=FULL``; every
  mutating method has committed (and fsynced) before it returns, so the
  shop may answer its client as soon as the call returns.
- Thread safety: one connection, shared by all threads, serialized by a lock;
  any method may be called from any thread (the reactor and a thread pool).
- Time: ``updated`` stamps come from the clock given at construction (the
  shop's; ``time.time`` by default), never from the system clock directly.
- Planner statistics: :meth:`bulk_add` runs ``ANALYZE`` after its load; a
  single :meth:`add` (the create path) does not; the shop runs
  :meth:`analyze` once at start-up, and :meth:`close` ``PRAGMA optimize``
  (which refreshes the statistics the session's queries needed).
- Collected VMs stay in the registry (``collected`` set) until ``delete``.
- User attribute names must match :data:`~vmshop_service.query.ATTRIBUTE_NAME`
  (the DAG's alphabet, so every stored name can be queried); a name equal to
  a built-in is stored but queries on that name mean the built-in.
- Errors: an unknown VM id raises :class:`NoSuchVMError`; a malformed query
  :class:`QueryInvalidError`; programming errors (duplicate id, unknown field,
  bad attribute name) ``ValueError``/``TypeError``.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from vmshop_common.errors import ConfigurationError, NoSuchVMError, QueryInvalidError

from .query import ATTRIBUTE_NAME, BUILTIN_ATTRIBUTES, Query, compile_query, parse_number, parse_query

SCHEMA_VERSION = 1
#: The largest query limit (SQLite's integers are 64-bit; a larger one would overflow).
MAX_LIMIT = 2**63 - 1


@dataclass
class VMEntry:
    """What the shop knows about one VM. ``None`` means "no value (yet)"."""

    vm_id: str
    owner: str
    state: str
    plant: str | None = None  # host:port of the plant that holds it
    plant_vm_id: str | None = None  # the plant's own id for it
    image: str | None = None
    memory: int | None = None  # MiB
    vcpus: int | None = None
    disk: int | None = None  # GiB
    arch: str | None = None
    address: str | None = None  # its address from the plant's pool
    host_port: int | None = None
    created: float = field(default_factory=time.time)  # epoch seconds
    updated: float = field(default_factory=time.time)
    termination: float | None = None  # the lease's end (epoch seconds)
    collected: float | None = None  # when it was collected (destroyed)
    error: str | None = None
    cost: float | None = None
    dag_xml: str | None = None
    steps: list[str] = field(default_factory=list)  # applied step node ids / digests, in order
    attributes: dict[str, str] = field(default_factory=dict)  # user attributes from the DAG


_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(VMEntry) if f.name != "attributes")
_UPDATABLE: frozenset[str] = frozenset(_COLUMNS) - {"vm_id"}
_SELECT = "SELECT " + ", ".join(f"vms.{c}" for c in _COLUMNS) + " FROM vms"
_INSERT = f"INSERT INTO vms ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' for _ in _COLUMNS)})"
# Served by the partial index vms_due (termination, only rows not collected).
_DUE_SQL = f"{_SELECT} WHERE vms.termination <= ? AND vms.collected IS NULL ORDER BY vms.termination, vms.vm_id"
_CHUNK = 500  # vm ids per IN (...) when loading attributes

_SCHEMA = """
CREATE TABLE schema_version (version INTEGER NOT NULL);
CREATE TABLE vms (
    vm_id       TEXT PRIMARY KEY NOT NULL,
    owner       TEXT NOT NULL,
    state       TEXT NOT NULL,
    plant       TEXT,
    plant_vm_id TEXT,
    image       TEXT,
    memory      INTEGER,
    vcpus       INTEGER,
    disk        INTEGER,
    arch        TEXT,
    address     TEXT,
    host_port   INTEGER,
    created     REAL NOT NULL,
    updated     REAL NOT NULL,
    termination REAL,
    collected   REAL,
    error       TEXT,
    cost        REAL,
    dag_xml     TEXT,
    steps       TEXT NOT NULL DEFAULT '[]'
);
CREATE TABLE vm_attributes (
    vm_id TEXT NOT NULL REFERENCES vms(vm_id) ON DELETE CASCADE,
    name  TEXT NOT NULL,
    value TEXT NOT NULL,
    num   REAL,
    PRIMARY KEY (vm_id, name)
) WITHOUT ROWID;
CREATE INDEX vm_attributes_name_value ON vm_attributes(name, value);
CREATE INDEX vm_attributes_name_num ON vm_attributes(name, num);
CREATE TABLE attribute_names (name TEXT PRIMARY KEY NOT NULL) WITHOUT ROWID;
CREATE INDEX vms_due ON vms(termination) WHERE collected IS NULL;
"""


def _index_statements() -> list[str]:
    return [f"CREATE INDEX vms_{name} ON vms({name})" for name in sorted(BUILTIN_ATTRIBUTES - {"vm_id"})]


def _attribute_rows(vm_id: str, attributes: dict[str, str]) -> list[tuple[str, str, str, float | None]]:
    rows = []
    for name, value in attributes.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise TypeError(f"attribute names and values are strings: {name!r}={value!r}")
        if not ATTRIBUTE_NAME.fullmatch(name):
            raise ValueError(f"attribute name {name!r} is not [A-Za-z0-9_][A-Za-z0-9_.-]*")
        rows.append((vm_id, name, value, parse_number(value)))
    return rows


class Registry:
    """The VM registry in the SQLite database at ``path`` (``":memory:"`` for a private in-memory one).

    ``clock``: wall-clock epoch seconds for the ``updated`` stamps (the shop's injected clock)."""

    def __init__(self, path: str | Path, clock: Callable[[], float] = time.time) -> None:
        self.path = str(path)
        self.clock = clock
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=30.0
        )
        conn = self._conn
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        self._init_schema()

    # Plumbing -----------------------------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise ValueError("the registry is closed")
        return self._conn

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def _init_schema(self) -> None:
        with self._transaction() as conn:
            exists = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
            ).fetchone()
            if exists is None:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                for statement in _index_statements():
                    conn.execute(statement)
                conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
                return
            row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
            version = row[0] if row else None
            if version != SCHEMA_VERSION:
                raise ConfigurationError(
                    f"registry {self.path} has schema version {version}; this VMShop reads version {SCHEMA_VERSION}"
                )

    def _rows_to_entries(self, conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> list[VMEntry]:
        entries = []
        for row in rows:
            values = dict(zip(_COLUMNS, row, strict=True))
            values["steps"] = json.loads(values["steps"]) if values["steps"] else []
            entries.append(VMEntry(**values))
        by_id = {entry.vm_id: entry for entry in entries}
        ids = list(by_id)
        for start in range(0, len(ids), _CHUNK):
            chunk = ids[start:start + _CHUNK]
            marks = ", ".join("?" for _ in chunk)
            for vm_id, name, value in conn.execute(
                f"SELECT vm_id, name, value FROM vm_attributes WHERE vm_id IN ({marks}) ORDER BY vm_id, name", chunk
            ):
                by_id[vm_id].attributes[name] = value
        return entries

    @staticmethod
    def _row(entry: VMEntry) -> tuple[Any, ...]:
        if not isinstance(entry, VMEntry):
            raise TypeError(f"expected a VMEntry, got {type(entry).__name__}")
        values = []
        for column in _COLUMNS:
            value = getattr(entry, column)
            if column == "steps":
                value = json.dumps(list(value))
            values.append(value)
        return tuple(values)

    @staticmethod
    def _remember_names(conn: sqlite3.Connection, names: Iterable[str]) -> None:
        conn.executemany("INSERT OR IGNORE INTO attribute_names (name) VALUES (?)", ((n,) for n in set(names)))

    # Writing ------------------------------------------------------------------------------------------

    def add(self, entry: VMEntry) -> None:
        """Register a new VM with its attributes; durable on return. ``ValueError`` if the id is taken.

        The create path: no ``ANALYZE`` here (it cost more than the insert itself on a large registry)."""
        self._insert([entry])

    def bulk_add(self, entries: Iterable[VMEntry]) -> None:
        """Register many VMs in one transaction (all or none), then refresh the planner's statistics
        (:meth:`analyze`); durable on return.

        ``ValueError`` (and nothing registered) if an id is taken or repeated.
        """
        self._insert(entries)
        self.analyze()

    def _insert(self, entries: Iterable[VMEntry]) -> None:
        rows: list[tuple[Any, ...]] = []
        attribute_rows: list[tuple[str, str, str, float | None]] = []
        for entry in entries:
            rows.append(self._row(entry))
            attribute_rows.extend(_attribute_rows(entry.vm_id, entry.attributes))
        try:
            with self._transaction() as conn:
                conn.executemany(_INSERT, rows)
                conn.executemany("INSERT INTO vm_attributes (vm_id, name, value, num) VALUES (?, ?, ?, ?)",
                                 attribute_rows)
                self._remember_names(conn, (row[1] for row in attribute_rows))
        except sqlite3.IntegrityError as exc:
            raise ValueError(f"cannot register the VM(s): {exc}") from None

    def analyze(self) -> None:
        """Give the query planner statistics (SQLite's ``ANALYZE``); worth it after a bulk load.

        Without statistics SQLite guesses which index is more selective, and for
        ``owner=x state=running`` it guessed the state index, which reads most rows.
        """
        with self._lock:
            self._connection().execute("ANALYZE")

    def update(self, vm_id: str, **fields: Any) -> None:
        """Change built-in fields of a VM (``updated`` is set to now unless given); durable on return.

        ``attributes=...`` replaces the user attributes. Unknown field names
        raise ``TypeError``; a value a column refuses (``None`` for owner,
        state, created, updated, steps) ``ValueError``; an unknown VM :class:`NoSuchVMError`.
        """
        attributes = fields.pop("attributes", None)
        unknown = set(fields) - _UPDATABLE
        if unknown:
            raise TypeError(f"VMEntry has no updatable field(s) {', '.join(sorted(unknown))}")
        fields.setdefault("updated", self.clock())
        if "steps" in fields:
            fields["steps"] = json.dumps(list(fields["steps"]))
        columns = sorted(fields)
        assignments = ", ".join(f"{column} = ?" for column in columns)
        try:
            with self._transaction() as conn:
                cursor = conn.execute(f"UPDATE vms SET {assignments} WHERE vm_id = ?",
                                      [fields[c] for c in columns] + [vm_id])
                if cursor.rowcount == 0:
                    raise NoSuchVMError(f"no VM has id '{vm_id}'")
                if attributes is not None:
                    self._set_attributes(conn, vm_id, attributes, replace=True)
        except sqlite3.IntegrityError as exc:
            raise ValueError(f"cannot update VM '{vm_id}': {exc}") from None

    def update_if_unchanged(self, vm_id: str, since: float, **fields: Any) -> bool:
        """:meth:`update`, only if the VM is still registered, not collected, and not updated after ``since``.

        For changes computed from an older view (a plant's report taken at
        ``since``, epoch seconds): a change the shop made meanwhile wins.
        Returns whether the VM was changed.
        """
        with self._lock:
            try:
                entry = self.get(vm_id)
            except NoSuchVMError:
                return False
            if entry.collected is not None or entry.updated > since:
                return False
            self.update(vm_id, **fields)
            return True

    def set_attributes(self, vm_id: str, attributes: dict[str, str], *, replace: bool = False) -> None:
        """Set user attributes of a VM: merged into the existing ones, or replacing them all if ``replace``.

        Also sets ``updated`` to now. Durable on return; an unknown VM raises :class:`NoSuchVMError`.
        """
        with self._transaction() as conn:
            if conn.execute("SELECT 1 FROM vms WHERE vm_id = ?", (vm_id,)).fetchone() is None:
                raise NoSuchVMError(f"no VM has id '{vm_id}'")
            self._set_attributes(conn, vm_id, attributes, replace=replace)
            conn.execute("UPDATE vms SET updated = ? WHERE vm_id = ?", (self.clock(), vm_id))

    def _set_attributes(self, conn: sqlite3.Connection, vm_id: str, attributes: dict[str, str],
                        *, replace: bool) -> None:
        rows = _attribute_rows(vm_id, attributes)
        if replace:
            conn.execute("DELETE FROM vm_attributes WHERE vm_id = ?", (vm_id,))
        conn.executemany("INSERT OR REPLACE INTO vm_attributes (vm_id, name, value, num) VALUES (?, ?, ?, ?)", rows)
        self._remember_names(conn, attributes)

    def delete(self, vm_id: str) -> None:
        """Forget a VM entirely (its attributes too); :class:`NoSuchVMError` if unknown. Durable on return."""
        with self._transaction() as conn:
            if conn.execute("DELETE FROM vms WHERE vm_id = ?", (vm_id,)).rowcount == 0:
                raise NoSuchVMError(f"no VM has id '{vm_id}'")

    # Reading ------------------------------------------------------------------------------------------

    def get(self, vm_id: str) -> VMEntry:
        """The VM with that id; :class:`NoSuchVMError` if there is none."""
        with self._lock:
            conn = self._connection()
            rows = conn.execute(f"{_SELECT} WHERE vm_id = ?", (vm_id,)).fetchall()
            if not rows:
                raise NoSuchVMError(f"no VM has id '{vm_id}'")
            return self._rows_to_entries(conn, rows)[0]

    def all(self, include_collected: bool = True) -> list[VMEntry]:
        """Every VM (ordered by creation time, then id), without the collected ones unless asked."""
        where = "" if include_collected else " WHERE collected IS NULL"
        with self._lock:
            conn = self._connection()
            rows = conn.execute(f"{_SELECT}{where} ORDER BY created, vm_id").fetchall()
            return self._rows_to_entries(conn, rows)

    def usage(self, owner: str, exclude: str = "") -> tuple[int, int, int]:
        """(VMs, MiB of memory, vCPUs) that ``owner`` holds: VMs neither collected nor failed, placing and
        creating ones included, the VM ``exclude`` not counted; unknown memory or vCPUs count 0."""
        with self._lock:
            row = self._connection().execute(
                "SELECT COUNT(*), COALESCE(SUM(memory), 0), COALESCE(SUM(vcpus), 0) FROM vms WHERE owner = ? "
                "AND collected IS NULL AND state NOT IN ('collected', 'failed') AND vm_id != ?",
                (owner, exclude)).fetchone()
        return int(row[0]), int(row[1]), int(row[2])

    def count(self) -> int:
        """How many VMs are registered (collected ones included)."""
        with self._lock:
            return int(self._connection().execute("SELECT COUNT(*) FROM vms").fetchone()[0])

    def count_by_state(self) -> dict[str, int]:
        """How many VMs are in each state (collected ones included, under ``collected``): for the metrics."""
        with self._lock:
            rows = self._connection().execute("SELECT state, COUNT(*) FROM vms GROUP BY state").fetchall()
        return {str(state): int(count) for state, count in rows}

    def query_sql(self, q: Query | str, limit: int | None = None) -> tuple[str, list[object]]:
        """The SQL statement and parameters :meth:`query` runs (for ``EXPLAIN QUERY PLAN`` and tests)."""
        query = parse_query(q) if isinstance(q, str) else tuple(q)
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or not 0 <= limit <= MAX_LIMIT):
            raise QueryInvalidError(f"limit must be a non-negative integer of at most {MAX_LIMIT}, not {limit!r}")
        with self._lock:
            conn = self._connection()

            def is_user_attribute(name: str) -> bool:
                return conn.execute("SELECT 1 FROM attribute_names WHERE name = ?", (name,)).fetchone() is not None

            where, params = compile_query(query, is_user_attribute)
        sql = f"{_SELECT} WHERE {where} ORDER BY +vms.created, vms.vm_id"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return sql, params

    def query(self, q: Query | str, limit: int | None = None) -> list[VMEntry]:
        """The VMs matching every term of ``q`` (text or parsed), ordered by creation time then id.

        Collected VMs are included (``state`` tells them apart). At most
        ``limit`` VMs when given. Raises :class:`QueryInvalidError` for a
        malformed query, an unknown attribute or a bad limit.
        See :mod:`vmshop_service.query` for the syntax and semantics.
        """
        sql, params = self.query_sql(q, limit)
        with self._lock:
            conn = self._connection()
            rows = conn.execute(sql, params).fetchall()
            return self._rows_to_entries(conn, rows)

    def due_terminations(self, now: float) -> list[VMEntry]:
        """The VMs not yet collected whose lease ended at or before ``now``, soonest first."""
        with self._lock:
            conn = self._connection()
            rows = conn.execute(_DUE_SQL, (now,)).fetchall()
            return self._rows_to_entries(conn, rows)

    def attribute_names(self) -> set[str]:
        """Every queryable attribute name: the built-ins and each user attribute name ever stored."""
        with self._lock:
            names = {row[0] for row in self._connection().execute("SELECT name FROM attribute_names")}
        return set(BUILTIN_ATTRIBUTES) | names

    def explain(self, sql: str, params: list[object]) -> list[str]:
        """The ``EXPLAIN QUERY PLAN`` lines (their ``detail``) for ``sql`` with ``params``."""
        with self._lock:
            return [row[3] for row in self._connection().execute(f"EXPLAIN QUERY PLAN {sql}", params)]

    def close(self) -> None:
        """Close the database; further calls raise ``ValueError``. Closing twice is harmless."""
        with self._lock:
            if self._conn is not None:
                self._conn.execute("PRAGMA optimize")
                self._conn.close()
                self._conn = None

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
