"""The shop's VM registry: every VM the shop created, durable and queryable (SQLite or PostgreSQL).

One row per VM in ``vms`` (the built-in attributes, each queryable column
indexed) and the DAG's user attributes in ``vm_attributes(vm_id, name,
value, num)`` (``num`` is ``value`` as a number when it is one), indexed on
``(name, value)`` and ``(name, num)``. ``attribute_names`` is the set of user
attribute names ever stored (insert-only, so a query that was valid stays
valid after the last VM carrying a name is deleted). ``shops`` names every
shop that uses the registry (several may share one on PostgreSQL), with its
certificate subject and a heartbeat.

:class:`Registry` keeps it in SQLite (the embedded default, one shop);
:class:`PostgresRegistry` in a PostgreSQL database that several shops share
(:func:`open_registry` picks by configuration). Both pass the same contract
tests (``tests/test_registry.py``).

Contracts:

- Durability: every mutating method has committed before it returns (SQLite:
  WAL with ``synchronous=FULL``; PostgreSQL: a commit waits for its WAL
  flush), so the shop may answer its client as soon as the call returns.
  A transaction is all or nothing: a crash, or a lost connection, leaves no
  half-written record.
- Thread safety: any method may be called from any thread (the reactor and a
  thread pool). SQLite: one connection serialized by a lock; PostgreSQL: a
  pool of connections, one per call in progress.
- Time: ``updated`` stamps (and shop heartbeats) come from the clock given
  at construction (the shop's; ``time.time`` by default), never from the
  system clock directly.
- Planner statistics: :meth:`bulk_add` refreshes them after its load (on
  PostgreSQL only for loads of :attr:`PostgresRegistry.BULK` VMs or more;
  autovacuum does the rest); a single :meth:`add` (the create path) does
  not; the shop runs :meth:`analyze` once at start-up.
- Collected VMs stay in the registry (``collected`` set) until ``delete``.
- User attribute names must match :data:`~vmshop_service.query.ATTRIBUTE_NAME`
  (the DAG's alphabet, so every stored name can be queried); a name equal to
  a built-in is stored but queries on that name mean the built-in.
- Ownership of creates: an entry in ``placing``/``creating`` names the shop
  that places it (``shop``). :meth:`update_owned` and :meth:`delete_owned`
  change it only while it is still that shop's create (not collected, still
  placing or creating); :meth:`cancel_create` (a collect during the create,
  from any shop) ends it for good. See docs/consistency.md.
- Leases: :meth:`claim_due` hands each due VM to one shop at a time (a row
  claim, taken with ``FOR UPDATE SKIP LOCKED`` on PostgreSQL), so a lease is
  enforced once however many shops look; a claim older than its expiry (its
  shop died) may be taken again.
- One SQLite file, one registry object: :class:`Registry` holds an exclusive
  lock (``flock``) on ``PATH.lock`` while it is open, so a second shop (or a
  second registry object) on the same file is refused with
  :class:`~vmshop_common.errors.ConfigurationError` naming the holder's pid.
  The shop keeps query answers while the registry's :attr:`Registry.generation`
  is unchanged, which is only right while nothing else writes the file. The
  kernel drops the lock when its holder dies, so a shop killed by SIGKILL
  restarts on its file at once.
- Errors: an unknown VM id raises :class:`NoSuchVMError`; a malformed query
  :class:`QueryInvalidError`; a database that cannot be reached (or a
  connection lost during the call) :class:`RegistryUnavailableError`, after
  which the call's transaction is known to be rolled back unless the loss
  came during its commit (then it may have committed: the caller treats the
  outcome as unknown); programming errors (duplicate id, unknown field, bad
  attribute name, a value a column refuses) ``ValueError``/``TypeError``.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from vmshop_common.errors import ConfigurationError, NoSuchVMError, QueryInvalidError, RegistryUnavailableError

from .query import ATTRIBUTE_NAME, BUILTIN_ATTRIBUTES, Query, compile_query, parse_number, parse_query

#: The schema this code reads and writes. 1: the first; 2: ``vms.shop``, the lease claim, ``shops``.
SCHEMA_VERSION = 2
#: The largest query limit (SQLite's integers are 64-bit; a larger one would overflow).
MAX_LIMIT = 2**63 - 1
CREATING_STATES = ("placing", "creating")


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
    shop: str | None = None  # the shop that placed it (its configured name)


@dataclass(frozen=True)
class ShopRecord:
    """A shop that uses the registry: its configured name, certificate subject, and last heartbeat."""

    name: str
    identity: str
    heartbeat: float


_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(VMEntry) if f.name != "attributes")
_UPDATABLE: frozenset[str] = frozenset(_COLUMNS) - {"vm_id"}
_SELECT = "SELECT " + ", ".join(f"vms.{c}" for c in _COLUMNS) + " FROM vms"
_INSERT = f"INSERT INTO vms ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' for _ in _COLUMNS)})"
# Served by the partial index vms_due (termination, only rows not collected).
_DUE_WHERE = "vms.termination <= ? AND vms.collected IS NULL"
_DUE_SQL = f"{_SELECT} WHERE {_DUE_WHERE} ORDER BY vms.termination, vms.vm_id"
_CHUNK = 500  # vm ids per IN (...) when loading attributes
_INSERT_ATTRIBUTE = ("INSERT INTO vm_attributes (vm_id, name, value, num) VALUES (?, ?, ?, ?) "
                     "ON CONFLICT (vm_id, name) DO UPDATE SET value = excluded.value, num = excluded.num")
_INSERT_NAME = "INSERT INTO attribute_names (name) VALUES (?) ON CONFLICT DO NOTHING"
_OWNED = "vm_id = ? AND shop = ? AND collected IS NULL AND state IN ('placing', 'creating')"

_SQLITE_SCHEMA_1 = """
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

#: Version 1 -> 2 (both databases): who places a create, the lease claim, the shops sharing the registry.
_MIGRATION_2 = """
ALTER TABLE vms ADD COLUMN shop TEXT;
ALTER TABLE vms ADD COLUMN lease_claim TEXT;
ALTER TABLE vms ADD COLUMN lease_claimed REAL;
CREATE INDEX vms_creating ON vms(shop) WHERE state IN ('placing', 'creating');
CREATE TABLE shops (name TEXT PRIMARY KEY NOT NULL, identity TEXT NOT NULL, instance TEXT NOT NULL,
                    started REAL NOT NULL, heartbeat REAL NOT NULL);
"""

# PostgreSQL: text compares in code point order ("C" collation, as SQLite does), whatever the database's
# locale; integers are 64-bit; numbers are doubles.
_C = 'COLLATE "C"'
#: PostgreSQL indexes the first 200 characters of an attribute value (at most 800 bytes: a B-tree entry may
#: hold about 2,700, and a value may be 1,024 characters of up to 4 bytes each).
_PG_VALUE_PREFIX = 200
_PG_SCHEMA_1 = f"""
CREATE TABLE schema_version (version INTEGER NOT NULL);
CREATE TABLE vms (
    vm_id       TEXT {_C} PRIMARY KEY NOT NULL,
    owner       TEXT {_C} NOT NULL,
    state       TEXT {_C} NOT NULL,
    plant       TEXT {_C},
    plant_vm_id TEXT {_C},
    image       TEXT {_C},
    memory      BIGINT,
    vcpus       BIGINT,
    disk        BIGINT,
    arch        TEXT {_C},
    address     TEXT {_C},
    host_port   BIGINT,
    created     DOUBLE PRECISION NOT NULL,
    updated     DOUBLE PRECISION NOT NULL,
    termination DOUBLE PRECISION,
    collected   DOUBLE PRECISION,
    error       TEXT,
    cost        DOUBLE PRECISION,
    dag_xml     TEXT,
    steps       TEXT NOT NULL DEFAULT '[]'
);
CREATE TABLE vm_attributes (
    vm_id TEXT {_C} NOT NULL REFERENCES vms(vm_id) ON DELETE CASCADE,
    name  TEXT {_C} NOT NULL,
    value TEXT {_C} NOT NULL,
    num   DOUBLE PRECISION,
    PRIMARY KEY (vm_id, name)
);
CREATE INDEX vm_attributes_name_value ON vm_attributes(name, left(value, {_PG_VALUE_PREFIX}));
CREATE INDEX vm_attributes_name_num ON vm_attributes(name, num);
CREATE TABLE attribute_names (name TEXT {_C} PRIMARY KEY NOT NULL);
CREATE INDEX vms_due ON vms(termination) WHERE collected IS NULL
"""
_PG_MIGRATION_2 = _MIGRATION_2.replace("shop TEXT", f"shop TEXT {_C}").replace("REAL", "DOUBLE PRECISION")

#: PostgreSQL compares an integer column with a double parameter by casting the column: its index is on that.
_PG_INTEGER_COLUMNS = frozenset({"memory", "vcpus", "disk", "host_port"})


def _statements(script: str) -> list[str]:
    return [statement.strip() for statement in script.split(";") if statement.strip()]


def _index_statements(integer_expression: bool = False) -> list[str]:
    statements = []
    for name in sorted(BUILTIN_ATTRIBUTES - {"vm_id"}):
        column = f"(({name})::float8)" if integer_expression and name in _PG_INTEGER_COLUMNS else name
        statements.append(f"CREATE INDEX vms_{name} ON vms({column})")
    return statements


def _attribute_rows(vm_id: str, attributes: dict[str, str]) -> list[tuple[str, str, str, float | None]]:
    rows = []
    for name, value in attributes.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise TypeError(f"attribute names and values are strings: {name!r}={value!r}")
        if not ATTRIBUTE_NAME.fullmatch(name):
            raise ValueError(f"attribute name {name!r} is not [A-Za-z0-9_][A-Za-z0-9_.-]*")
        rows.append((vm_id, name, value, parse_number(value)))
    return rows


def _hold_sqlite_file(path: str) -> int | None:
    """An exclusive, non-blocking ``flock`` on ``PATH.lock`` (made 0600 if missing; the holder's pid written
    in it), or ConfigurationError naming the pid that holds it. None for a private in-memory database."""
    if path == ":memory:" or path.startswith("file:"):
        return None
    lock_path = path + ".lock"
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise ConfigurationError(f"cannot open the registry's lock file {lock_path}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        finally:
            os.close(fd)
        raise ConfigurationError(
            f"the registry {path} is in use by another shop (pid {holder}): an SQLite registry belongs to one "
            f"shop; shops that share a registry use PostgreSQL") from None
    except BaseException:
        os.close(fd)
        raise
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError:
        pass  # the pid is only for the message of a refused second shop
    return fd


class Registry:
    """The VM registry in the SQLite database at ``path`` (``":memory:"`` for a private in-memory one).

    ``clock``: wall-clock epoch seconds for the ``updated`` stamps (the shop's injected clock)."""

    #: What the lease claim adds to its row selection (PostgreSQL: skip rows another shop is claiming).
    _SKIP_LOCKED = ""
    #: Migrations from each older version (the statements that reach the next one).
    _MIGRATIONS: dict[int, list[str]] = {1: _statements(_MIGRATION_2)}
    #: How many leading characters of attribute values the index holds (None: all of them).
    _VALUE_PREFIX: int | None = None

    def __init__(self, path: str | Path, clock: Callable[[], float] = time.time) -> None:
        self.path = str(path)
        self.clock = clock
        self._lock = threading.RLock()
        self._known_names: set[str] = set()  # user attribute names seen in attribute_names (insert-only)
        self._generation = 0  # grows after every write transaction (see generation)
        self._hold: int | None = _hold_sqlite_file(self.path)
        self._conn: sqlite3.Connection | None = None
        try:
            self._conn = conn = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=30.0
            )
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            self._init_schema()
        except BaseException:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            self._release_file()
            raise

    def describe(self) -> str:
        """Where the registry is, fit for logs (never a credential)."""
        return f"SQLite {self.path}"

    # Plumbing -----------------------------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise ValueError("the registry is closed")
        return self._conn

    @contextmanager
    def _transaction(self) -> Iterator[Any]:
        """A connection inside one transaction: committed when the block ends, rolled back if it raises.
        A constraint the data breaks is ``ValueError``."""
        with self._lock:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except sqlite3.IntegrityError as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise ValueError(str(exc)) from None
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            finally:
                self._generation += 1  # still under the lock: a reader sees the data and its generation together

    @property
    def generation(self) -> int | None:
        """A number that grows after every write this registry object makes, or None when others may write
        too (a registry shared by several shops). Equal generations mean equal contents: the shop is the
        only writer of its SQLite registry (it opens the file, and nothing else does)."""
        return self._generation

    @contextmanager
    def _reading(self) -> Iterator[Any]:
        """A connection for reads (statements see committed data)."""
        with self._lock:
            yield self._connection()

    def _schema_exists(self, conn: Any) -> bool:
        return conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'").fetchone() is not None

    def _create_schema(self, conn: Any) -> None:
        for statement in _statements(_SQLITE_SCHEMA_1) + _index_statements():
            conn.execute(statement)
        conn.execute("INSERT INTO schema_version (version) VALUES (?)", (1,))

    def _init_schema(self) -> None:
        """Create the schema in an empty database, or bring an older one up to :data:`SCHEMA_VERSION`
        (in one transaction: a migration is all or nothing); a newer one is refused."""
        with self._transaction() as conn:
            if not self._schema_exists(conn):
                self._create_schema(conn)
            row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
            version = row[0] if row else None
            if not isinstance(version, int) or version > SCHEMA_VERSION or version < 1:
                raise ConfigurationError(
                    f"registry {self.describe()} has schema version {version}; this VMShop reads version "
                    f"{SCHEMA_VERSION} (and migrates older ones)")
            while version < SCHEMA_VERSION:
                for statement in self._MIGRATIONS[version]:
                    conn.execute(statement)
                version += 1
                conn.execute("DELETE FROM schema_version")
                conn.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))

    def schema_version(self) -> int:
        with self._reading() as conn:
            return int(conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0])

    def _rows_to_entries(self, conn: Any, rows: list[tuple[Any, ...]]) -> list[VMEntry]:
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
    def _remember_names(conn: Any, names: Iterable[str]) -> None:
        conn.executemany(_INSERT_NAME, [(n,) for n in sorted(set(names))])

    def _column_sql(self, name: str) -> str:
        """How a query names a built-in column (PostgreSQL: integers as doubles, as their indexes are)."""
        return f"vms.{name}"

    # Writing ------------------------------------------------------------------------------------------

    def add(self, entry: VMEntry) -> None:
        """Register a new VM with its attributes; durable on return. ``ValueError`` if the id is taken.

        The create path: no ``ANALYZE`` here (it cost more than the insert itself on a large registry)."""
        self._insert([entry])

    def bulk_add(self, entries: Iterable[VMEntry]) -> None:
        """Register many VMs in one transaction (all or none); durable on return.

        ``ValueError`` (and nothing registered) if an id is taken or repeated.
        """
        count = self._insert(entries)
        if count and self._analyze_after(count):
            self.analyze()

    def _analyze_after(self, count: int) -> bool:
        """Whether a bulk load of ``count`` VMs calls for new planner statistics (SQLite: always)."""
        return True

    def _insert(self, entries: Iterable[VMEntry]) -> int:
        rows: list[tuple[Any, ...]] = []
        attribute_rows: list[tuple[str, str, str, float | None]] = []
        for entry in entries:
            rows.append(self._row(entry))
            attribute_rows.extend(_attribute_rows(entry.vm_id, entry.attributes))
        if len({row[0] for row in rows}) != len(rows):
            raise ValueError("cannot register the VM(s): an id is repeated")
        try:
            with self._transaction() as conn:
                self._store(conn, rows, attribute_rows)
                self._remember_names(conn, (row[1] for row in attribute_rows))
        except ValueError as exc:
            raise ValueError(f"cannot register the VM(s): {exc}") from None
        return len(rows)

    def _store(self, conn: Any, rows: list[tuple[Any, ...]],
               attribute_rows: list[tuple[str, str, str, float | None]]) -> None:
        conn.executemany(_INSERT, rows)
        conn.executemany("INSERT INTO vm_attributes (vm_id, name, value, num) VALUES (?, ?, ?, ?)", attribute_rows)

    def analyze(self) -> None:
        """Give the query planner statistics (``ANALYZE``); worth it after a bulk load.

        Without statistics SQLite guesses which index is more selective, and for
        ``owner=x state=running`` it guessed the state index, which reads most rows.
        """
        with self._lock:
            self._connection().execute("ANALYZE")

    @staticmethod
    def _assignments(fields: dict[str, Any], now: float) -> tuple[str, list[Any]]:
        unknown = set(fields) - _UPDATABLE
        if unknown:
            raise TypeError(f"VMEntry has no updatable field(s) {', '.join(sorted(unknown))}")
        fields.setdefault("updated", now)
        if "steps" in fields:
            fields["steps"] = json.dumps(list(fields["steps"]))
        columns = sorted(fields)
        return ", ".join(f"{column} = ?" for column in columns), [fields[c] for c in columns]

    def update(self, vm_id: str, **fields: Any) -> None:
        """Change built-in fields of a VM (``updated`` is set to now unless given); durable on return.

        ``attributes=...`` replaces the user attributes. Unknown field names
        raise ``TypeError``; a value a column refuses (``None`` for owner,
        state, created, updated, steps) ``ValueError``; an unknown VM :class:`NoSuchVMError`.
        """
        if not self._update_where("vm_id = ?", [vm_id], fields):
            raise NoSuchVMError(f"no VM has id '{vm_id}'")

    def _update_where(self, where: str, params: list[Any], fields: dict[str, Any]) -> bool:
        """Update the VM ``where`` selects (by its id, first parameter) if it does; whether it did."""
        attributes = fields.pop("attributes", None)
        assignments, values = self._assignments(fields, self.clock())
        vm_id = params[0]
        try:
            with self._transaction() as conn:
                cursor = conn.execute(f"UPDATE vms SET {assignments} WHERE {where}", values + params)
                if cursor.rowcount == 0:
                    return False
                if attributes is not None:
                    self._set_attributes(conn, vm_id, attributes, replace=True)
        except ValueError as exc:
            raise ValueError(f"cannot update VM '{vm_id}': {exc}") from None
        return True

    def update_if_unchanged(self, vm_id: str, since: float, **fields: Any) -> bool:
        """:meth:`update`, only if the VM is still registered, not collected, and not updated after ``since``.

        For changes computed from an older view (a plant's report taken at
        ``since``, epoch seconds): a change a shop made meanwhile wins.
        Returns whether the VM was changed.
        """
        return self._update_where("vm_id = ? AND collected IS NULL AND updated <= ?", [vm_id, since], fields)

    def update_owned(self, vm_id: str, shop: str, **fields: Any) -> bool:
        """:meth:`update`, only while the VM is still ``shop``'s create (``placing`` or ``creating``, placed by
        ``shop``, not collected). False when it is not: a collect ended it, or another shop resolved it."""
        return self._update_where(_OWNED, [vm_id, shop], fields)

    def delete_owned(self, vm_id: str, shop: str) -> bool:
        """Forget a VM that is still ``shop``'s create (see :meth:`update_owned`); whether it was."""
        with self._transaction() as conn:
            return bool(conn.execute(f"DELETE FROM vms WHERE {_OWNED}", (vm_id, shop)).rowcount)

    def cancel_create(self, vm_id: str, now: float, error: str) -> VMEntry | None:
        """End a create that is still placing or creating (not collected): the entry becomes ``collected``
        at ``now``; returns it as it was (its plant is where the create may run), or None if it was not
        such an entry. Any shop may do this; the placing shop's next :meth:`update_owned` then fails."""
        with self._transaction() as conn:
            rows = conn.execute(f"{_SELECT} WHERE vm_id = ? AND collected IS NULL AND "
                                f"state IN ('placing', 'creating')", (vm_id,)).fetchall()
            if not rows:
                return None
            entry = self._rows_to_entries(conn, rows)[0]
            conn.execute("UPDATE vms SET state = 'collected', collected = ?, updated = ?, error = ? "
                         "WHERE vm_id = ?", (now, now, error, vm_id))
            return entry

    def set_attributes(self, vm_id: str, attributes: dict[str, str], *, replace: bool = False) -> None:
        """Set user attributes of a VM: merged into the existing ones, or replacing them all if ``replace``.

        Also sets ``updated`` to now. Durable on return; an unknown VM raises :class:`NoSuchVMError`.
        """
        with self._transaction() as conn:
            if conn.execute("UPDATE vms SET updated = ? WHERE vm_id = ?", (self.clock(), vm_id)).rowcount == 0:
                raise NoSuchVMError(f"no VM has id '{vm_id}'")
            self._set_attributes(conn, vm_id, attributes, replace=replace)

    def _set_attributes(self, conn: Any, vm_id: str, attributes: dict[str, str], *, replace: bool) -> None:
        rows = _attribute_rows(vm_id, attributes)
        if replace:
            conn.execute("DELETE FROM vm_attributes WHERE vm_id = ?", (vm_id,))
        conn.executemany(_INSERT_ATTRIBUTE, rows)
        self._remember_names(conn, attributes)

    def delete(self, vm_id: str) -> None:
        """Forget a VM entirely (its attributes too); :class:`NoSuchVMError` if unknown. Durable on return."""
        with self._transaction() as conn:
            if conn.execute("DELETE FROM vms WHERE vm_id = ?", (vm_id,)).rowcount == 0:
                raise NoSuchVMError(f"no VM has id '{vm_id}'")

    # Shops and leases ---------------------------------------------------------------------------------

    def register_shop(self, name: str, identity: str, instance: str, now: float | None = None) -> None:
        """Say that shop ``name`` (certificate subject ``identity``) uses the registry, as process ``instance``."""
        now = self.clock() if now is None else now
        with self._transaction() as conn:
            conn.execute("INSERT INTO shops (name, identity, instance, started, heartbeat) VALUES (?, ?, ?, ?, ?) "
                         "ON CONFLICT (name) DO UPDATE SET identity = excluded.identity, "
                         "instance = excluded.instance, started = excluded.started, heartbeat = excluded.heartbeat",
                         (name, identity, instance, now, now))

    def heartbeat(self, name: str, now: float | None = None) -> None:
        """Shop ``name`` is alive at ``now`` (the shops that share a registry judge each other by this)."""
        with self._transaction() as conn:
            conn.execute("UPDATE shops SET heartbeat = ? WHERE name = ?", (self.clock() if now is None else now, name))

    def shops(self) -> list[ShopRecord]:
        """Every shop that ever used the registry, by name."""
        with self._reading() as conn:
            rows = conn.execute("SELECT name, identity, heartbeat FROM shops ORDER BY name").fetchall()
        return [ShopRecord(str(name), str(identity), float(heartbeat)) for name, identity, heartbeat in rows]

    def claim_due(self, now: float, shop: str, stale_before: float, limit: int = 100) -> list[VMEntry]:
        """Claim for ``shop`` the VMs whose lease ended by ``now`` (not collected, not being created), soonest
        first, at most ``limit``: each is claimed by one shop at a time; a claim made before ``stale_before``
        (its shop died or gave up) may be taken again. Returns the claimed entries."""
        with self._transaction() as conn:
            rows = conn.execute(
                f"SELECT vm_id FROM vms WHERE {_DUE_WHERE} AND state NOT IN ('placing', 'creating') "
                "AND (lease_claim IS NULL OR lease_claimed < ?) ORDER BY termination, vm_id LIMIT ?"
                f"{self._SKIP_LOCKED}", (now, stale_before, limit)).fetchall()
            ids = [row[0] for row in rows]
            if not ids:
                return []
            marks = ", ".join("?" for _ in ids)
            conn.execute(f"UPDATE vms SET lease_claim = ?, lease_claimed = ? WHERE vm_id IN ({marks})",
                         [shop, now] + ids)
            claimed = conn.execute(f"{_SELECT} WHERE vm_id IN ({marks})", ids).fetchall()
            entries = self._rows_to_entries(conn, claimed)
        order = {vm_id: index for index, vm_id in enumerate(ids)}
        return sorted(entries, key=lambda e: order[e.vm_id])

    def release_claim(self, vm_id: str, shop: str) -> None:
        """Give up ``shop``'s lease claim on a VM (its collect failed: another round, or shop, may try)."""
        with self._transaction() as conn:
            conn.execute("UPDATE vms SET lease_claim = NULL, lease_claimed = NULL WHERE vm_id = ? AND lease_claim = ?",
                         (vm_id, shop))

    # Reading ------------------------------------------------------------------------------------------

    def get(self, vm_id: str) -> VMEntry:
        """The VM with that id; :class:`NoSuchVMError` if there is none."""
        with self._reading() as conn:
            rows = conn.execute(f"{_SELECT} WHERE vm_id = ?", (vm_id,)).fetchall()
            if not rows:
                raise NoSuchVMError(f"no VM has id '{vm_id}'")
            return self._rows_to_entries(conn, rows)[0]

    def all(self, include_collected: bool = True) -> list[VMEntry]:
        """Every VM (ordered by creation time, then id), without the collected ones unless asked."""
        where = "" if include_collected else " WHERE collected IS NULL"
        with self._reading() as conn:
            rows = conn.execute(f"{_SELECT}{where} ORDER BY created, vm_id").fetchall()
            return self._rows_to_entries(conn, rows)

    def usage(self, owner: str, exclude: str = "") -> tuple[int, int, int]:
        """(VMs, MiB of memory, vCPUs) that ``owner`` holds: VMs neither collected nor failed, placing and
        creating ones included, the VM ``exclude`` not counted; unknown memory or vCPUs count 0."""
        with self._reading() as conn:
            row = conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(memory), 0), COALESCE(SUM(vcpus), 0) FROM vms WHERE owner = ? "
                "AND collected IS NULL AND state NOT IN ('collected', 'failed') AND vm_id != ?",
                (owner, exclude)).fetchone()
        return int(row[0]), int(row[1]), int(row[2])

    def count(self) -> int:
        """How many VMs are registered (collected ones included)."""
        with self._reading() as conn:
            return int(conn.execute("SELECT COUNT(*) FROM vms").fetchone()[0])

    def count_by_state(self) -> dict[str, int]:
        """How many VMs are in each state (collected ones included, under ``collected``): for the metrics."""
        with self._reading() as conn:
            rows = conn.execute("SELECT state, COUNT(*) FROM vms GROUP BY state").fetchall()
        return {str(state): int(count) for state, count in rows}

    def query_sql(self, q: Query | str, limit: int | None = None) -> tuple[str, list[object]]:
        """The SQL statement and parameters :meth:`query` runs (for ``EXPLAIN`` and tests)."""
        with self._reading() as conn:
            return self._query_sql(conn, q, limit)

    def _query_sql(self, conn: Any, q: Query | str, limit: int | None) -> tuple[str, list[object]]:
        query = parse_query(q) if isinstance(q, str) else tuple(q)
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or not 0 <= limit <= MAX_LIMIT):
            raise QueryInvalidError(f"limit must be a non-negative integer of at most {MAX_LIMIT}, not {limit!r}")
        known = self._known_names

        def is_user_attribute(name: str) -> bool:
            # attribute_names is insert-only: a name once found stays (and needs no statement again)
            if name in known:
                return True
            if conn.execute("SELECT 1 FROM attribute_names WHERE name = ?", (name,)).fetchone() is None:
                return False
            known.add(name)
            return True

        where, params = compile_query(query, is_user_attribute, column=self._column_sql,
                                      value_prefix=self._VALUE_PREFIX)
        sql = f"{_SELECT} WHERE {where} " if query else f"{_SELECT} "
        sql += "ORDER BY +vms.created, vms.vm_id"
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
        with self._reading() as conn:
            sql, params = self._query_sql(conn, q, limit)
            rows = conn.execute(sql, params).fetchall()
            return self._rows_to_entries(conn, rows)

    def query_with_generation(self, q: Query | str, limit: int | None = None) -> tuple[int | None, list[VMEntry]]:
        """:meth:`query`, with the :attr:`generation` its answer is of (read with the data, under one lock)."""
        with self._reading() as conn:
            generation = self.generation
            sql, params = self._query_sql(conn, q, limit)
            rows = conn.execute(sql, params).fetchall()
            return generation, self._rows_to_entries(conn, rows)

    def due_terminations(self, now: float) -> list[VMEntry]:
        """The VMs not yet collected whose lease ended at or before ``now``, soonest first."""
        with self._reading() as conn:
            rows = conn.execute(_DUE_SQL, (now,)).fetchall()
            return self._rows_to_entries(conn, rows)

    def attribute_names(self) -> set[str]:
        """Every queryable attribute name: the built-ins and each user attribute name ever stored."""
        with self._reading() as conn:
            names = {row[0] for row in conn.execute("SELECT name FROM attribute_names")}
        return set(BUILTIN_ATTRIBUTES) | names

    def explain(self, sql: str, params: list[object]) -> list[str]:
        """The ``EXPLAIN QUERY PLAN`` lines (their ``detail``) for ``sql`` with ``params``."""
        with self._reading() as conn:
            return [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", params)]

    def close(self) -> None:
        """Close the database; further calls raise ``ValueError``. Closing twice is harmless."""
        with self._lock:
            if self._conn is not None:
                try:
                    self._conn.execute("PRAGMA optimize")
                    self._conn.close()
                finally:
                    self._conn = None
                    self._release_file()

    def _release_file(self) -> None:
        if self._hold is not None:
            os.close(self._hold)  # closing the descriptor drops its flock
            self._hold = None

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# PostgreSQL ----------------------------------------------------------------------------------------------

#: Seconds to wait for a connection to PostgreSQL before the call fails with RegistryUnavailableError.
CONNECT_TIMEOUT = 5
#: Seconds one statement may run on PostgreSQL (below the shop's work deadline of 60 s).
STATEMENT_TIMEOUT = 30.0
#: Connections kept open for reuse (more may be open at once, one per call in progress).
POOL_SIZE = 16


def redacted(conninfo: str) -> str:
    """A libpq connection string fit for logs: every parameter but the password (which is never shown)."""
    import psycopg.conninfo

    try:
        parts = psycopg.conninfo.conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError:
        return "(an unreadable connection string)"
    return " ".join(f"{key}={value}" for key, value in sorted(parts.items())
                    if key not in ("password", "passfile", "sslpassword"))


class _PgConnection:
    """A psycopg connection speaking the registry's SQL: ``?`` placeholders (the SQL has no literal ``%``)."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def execute(self, sql: str, params: Iterable[Any] = ()) -> Any:
        return self.conn.execute(sql.replace("?", "%s"), list(params))

    def executemany(self, sql: str, rows: Iterable[Iterable[Any]]) -> Any:
        rows = [list(row) for row in rows]
        cursor = self.conn.cursor()
        if rows:
            cursor.executemany(sql.replace("?", "%s"), rows)
        return cursor


class PostgresRegistry(Registry):
    """The VM registry in a PostgreSQL database (libpq ``conninfo``), shareable by several shops.

    ``password`` (read from the configured password file) is given to libpq
    apart from the connection string and appears in no message. Connections
    are pooled; one that the server closed (a restart) is noticed before use
    and replaced, so the calls after a restart succeed once the server is back.
    """

    _SKIP_LOCKED = " FOR UPDATE SKIP LOCKED"
    _VALUE_PREFIX = _PG_VALUE_PREFIX
    _MIGRATIONS: dict[int, list[str]] = {1: _statements(_PG_MIGRATION_2)}
    #: Fewer new VMs than this leave the statistics to autovacuum's ANALYZE.
    BULK = 1000

    def __init__(self, conninfo: str, password: str | None = None, *, pool_size: int = POOL_SIZE,
                 connect_timeout: float = CONNECT_TIMEOUT, clock: Callable[[], float] = time.time) -> None:
        import psycopg

        self.clock = clock
        self._psycopg = psycopg
        self.conninfo = conninfo
        self.path = redacted(conninfo)
        self._password = password
        self._pool_size = pool_size
        self._connect_timeout = max(1, int(connect_timeout))
        self._lock = threading.RLock()
        self._known_names: set[str] = set()  # user attribute names seen in attribute_names (insert-only)
        self._idle: list[Any] = []
        self._closed = False
        self._name_holder: Any = None  # the connection that holds this shop's name (register_shop)
        try:
            self._init_schema()
        except BaseException:
            self.close()
            raise

    @property
    def generation(self) -> int | None:
        """None: other shops write this registry too, so no answer of it can be kept."""
        return None

    def describe(self) -> str:
        return f"PostgreSQL {self.path}"

    # Plumbing -----------------------------------------------------------------------------------------

    def _connect(self) -> Any:
        # A server that vanishes without closing the connection (a host gone) must not hold a thread for
        # minutes: TCP keepalives and a user timeout end the call, and no statement runs past its timeout.
        kwargs: dict[str, Any] = {"autocommit": True, "connect_timeout": self._connect_timeout,
                                  "application_name": "vmshop", "keepalives": 1, "keepalives_idle": 10,
                                  "keepalives_interval": 5, "keepalives_count": 3, "tcp_user_timeout": 30_000}
        if self._password is not None:
            kwargs["password"] = self._password
        conn = None
        try:
            conn = self._psycopg.connect(self.conninfo, **kwargs)
            conn.execute(f"SET statement_timeout = {int(STATEMENT_TIMEOUT * 1000)}")
            return conn
        except self._psycopg.Error as exc:
            if conn is not None:
                _close_quietly(conn)
            raise RegistryUnavailableError(f"the registry ({self.describe()}) cannot be reached: "
                                           f"{_first_line(exc)}") from None

    @staticmethod
    def _alive(conn: Any) -> bool:
        """Whether an idle pooled connection is still usable: the server sends nothing on an idle connection
        unless it is closing it (a restart or a terminated backend), so anything readable means it is gone."""
        if conn.closed or conn.broken:
            return False
        try:
            readable, _, _ = select.select([conn.fileno()], [], [], 0)
        except (OSError, ValueError):
            return False
        return not readable

    def _acquire(self) -> Any:
        while True:
            with self._lock:
                if self._closed:
                    raise ValueError("the registry is closed")
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                return self._connect()
            if self._alive(conn):
                return conn
            _close_quietly(conn)

    def _release(self, conn: Any) -> None:
        if conn.closed or conn.broken or conn.info.transaction_status != self._psycopg.pq.TransactionStatus.IDLE:
            _close_quietly(conn)
            return
        with self._lock:
            if not self._closed and len(self._idle) < self._pool_size:
                self._idle.append(conn)
                return
        _close_quietly(conn)

    @contextmanager
    def _using(self, transaction: bool) -> Iterator[Any]:
        psycopg = self._psycopg
        conn = self._acquire()
        try:
            if transaction:
                with conn.transaction():
                    yield _PgConnection(conn)
            else:
                yield _PgConnection(conn)
        except psycopg.Error as exc:
            state = (exc.sqlstate or "")[:2]
            if conn.broken or conn.closed or state in _TRANSIENT or (
                    not state and isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError))):
                _close_quietly(conn)
                raise RegistryUnavailableError(f"the registry ({self.describe()}) failed during the call: "
                                               f"{_first_line(exc)}") from None
            self._release(conn)
            if state in ("22", "23", "54") or isinstance(exc, (psycopg.DataError, psycopg.IntegrityError)):
                # data the database refuses: a value (a NUL character), a constraint, a size limit
                raise ValueError(_first_line(exc)) from None
            raise
        except BaseException:
            self._release(conn)
            raise
        else:
            self._release(conn)

    @contextmanager
    def _transaction(self) -> Iterator[Any]:
        with self._using(True) as conn:
            yield conn

    @contextmanager
    def _reading(self) -> Iterator[Any]:
        with self._using(False) as conn:
            yield conn

    def _schema_exists(self, conn: Any) -> bool:
        # Shops starting at once on an empty database: one creates the schema, the others wait for it.
        conn.execute("SELECT pg_advisory_xact_lock(?)", (_SCHEMA_LOCK,))
        return conn.execute("SELECT to_regclass('schema_version') IS NOT NULL").fetchone()[0]

    def _create_schema(self, conn: Any) -> None:
        for statement in _statements(_PG_SCHEMA_1) + _index_statements(integer_expression=True):
            conn.execute(statement)
        conn.execute("INSERT INTO schema_version (version) VALUES (?)", (1,))

    def _column_sql(self, name: str) -> str:
        return f"(vms.{name})::float8" if name in _PG_INTEGER_COLUMNS else f"vms.{name}"

    #: From this many VMs on, a bulk_add streams its rows with COPY (one round trip, not one per row).
    COPY_FROM = 100

    def _store(self, conn: Any, rows: list[tuple[Any, ...]],
               attribute_rows: list[tuple[str, str, str, float | None]]) -> None:
        if len(rows) < self.COPY_FROM:
            super()._store(conn, rows, attribute_rows)
            return
        cursor = conn.conn.cursor()
        with cursor.copy(f"COPY vms ({', '.join(_COLUMNS)}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        with cursor.copy("COPY vm_attributes (vm_id, name, value, num) FROM STDIN") as copy:
            for attribute_row in attribute_rows:
                copy.write_row(attribute_row)

    def _analyze_after(self, count: int) -> bool:
        return count >= self.BULK

    def analyze(self) -> None:
        with self._reading() as conn:
            conn.execute("ANALYZE vms")
            conn.execute("ANALYZE vm_attributes")

    # Shop names ---------------------------------------------------------------------------------------

    def register_shop(self, name: str, identity: str, instance: str, now: float | None = None) -> None:
        """As :meth:`Registry.register_shop`, and hold the name for this process: a second live shop with
        the same name is refused (ConfigurationError). The hold is a session advisory lock on a connection of
        its own, so it ends the moment this process dies, and a restarted shop takes its name back at once."""
        self._hold_name(name)
        super().register_shop(name, identity, instance, now)

    def _hold_name(self, name: str) -> None:
        with self._lock:
            holder = self._name_holder
        if holder is not None and self._alive(holder):
            return
        if holder is not None:
            _close_quietly(holder)
        conn = self._connect()
        try:
            taken = conn.execute("SELECT pg_try_advisory_lock(%s, hashtext(%s))", (_NAME_LOCK, name)).fetchone()[0]
        except self._psycopg.Error as exc:
            _close_quietly(conn)
            raise RegistryUnavailableError(f"the registry ({self.describe()}) failed: {_first_line(exc)}") from None
        if not taken:
            _close_quietly(conn)
            raise ConfigurationError(f"another live shop uses the name '{name}' on the registry {self.describe()}; "
                                     "shops that share a registry need names of their own (<vmshop name=...>)")
        with self._lock:
            self._name_holder = conn

    def heartbeat(self, name: str, now: float | None = None) -> None:
        """As :meth:`Registry.heartbeat`; also takes the name back after the server restarted (which ended
        the hold)."""
        self._hold_name(name)
        super().heartbeat(name, now)

    def explain(self, sql: str, params: list[object]) -> list[str]:
        """The lines of PostgreSQL's ``EXPLAIN`` for ``sql`` with ``params``."""
        with self._reading() as conn:
            return [row[0] for row in conn.execute(f"EXPLAIN {sql}", params)]

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            idle, self._idle = self._idle, []
            holder, self._name_holder = self._name_holder, None
        for conn in idle + ([holder] if holder is not None else []):
            _close_quietly(conn)


#: SQLSTATE classes of a database that cannot serve now (connection, resources, operator intervention or a
#: statement cancelled by its timeout, a transaction rolled back by the server, system errors): the call is
#: answered Server.RegistryUnavailable and may be tried again.
_TRANSIENT = ("08", "40", "53", "57", "58")
_SCHEMA_LOCK = 0x564D5348  # 'VMSH': the advisory lock that serializes schema creation and migration
_NAME_LOCK = 0x564D534E  # 'VMSN': advisory locks (this, hash of the name) hold shop names


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _close_quietly(conn: Any) -> None:
    try:
        conn.close()
    except Exception:  # noqa: BLE001 - a connection already gone closes with an error, harmlessly
        pass


def open_registry(database: Path | str | None, postgresql: str | None = None,
                  password_file: Path | None = None, clock: Callable[[], float] = time.time) -> Registry:
    """The registry a configuration names: PostgreSQL (``postgresql`` conninfo, password from
    ``password_file``) when given, else SQLite at ``database``."""
    if postgresql:
        password = None
        if password_file is not None:
            try:
                password = password_file.read_text().strip("\r\n")
            except OSError as exc:
                raise ConfigurationError(f"cannot read the registry's password file {password_file}: "
                                         f"{exc.strerror or exc}") from None
        return PostgresRegistry(postgresql, password, clock=clock)
    if database is None:
        raise ConfigurationError("the registry is neither an SQLite path nor a PostgreSQL database")
    return Registry(database, clock)


def shops_alive(shops: Iterable[ShopRecord], now: float, dead_after: float) -> set[str]:
    """The names of the shops whose heartbeat is at most ``dead_after`` seconds old at ``now``."""
    return {shop.name for shop in shops if shop.heartbeat >= now - dead_after}


__all__ = ["CREATING_STATES", "MAX_LIMIT", "SCHEMA_VERSION", "PostgresRegistry", "Registry", "ShopRecord", "VMEntry",
           "open_registry", "redacted", "shops_alive"]
