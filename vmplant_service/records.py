"""The plant's durable records: its VMs, the actions it ran, its measurements.

One SQLite database (stdlib :mod:`sqlite3`) in WAL mode with
``synchronous=FULL``: every method that writes has committed, durably,
before it returns, so a record exists before the answer that mentions it
leaves the plant. The schema is created on open and versioned in the
``schema_version`` table; a database written by a newer version is refused.

Thread-safe: the plant calls it from a thread pool. One connection is
shared under a lock (SQLite serialises writers anyway, and this keeps every
read consistent with the last write of any thread).

:class:`PlantRecords` implements :class:`vmshop_common.cost.StepHistory`:
:meth:`~PlantRecords.expected_seconds` is the mean duration of the last
:data:`HISTORY_RUNS` successful runs of a step.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from vmshop_common.errors import ConfigurationError, DeclinedError, NoSuchVMError

SCHEMA_VERSION = 3
#: Schema changes, applied in order to an older database (version -> statements that make it that version).
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    2: ("ALTER TABLE vms ADD COLUMN made INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE vms ADD COLUMN shop TEXT NOT NULL DEFAULT ''",
        # A VM that ever ran had finished its create.
        "UPDATE vms SET made = 1 WHERE state IN ('running', 'collecting', 'collected')"),
    # The step each run ran (dagxml.step_to_xml), so that a publish can write the steps a VM ran into an image's
    # DAG; runs recorded before have none, and their VMs cannot be published.
    3: ("ALTER TABLE action_runs ADD COLUMN step TEXT NOT NULL DEFAULT ''",),
}
HISTORY_RUNS = 5
MAX_OUTPUT_BYTES = 64 * 1024
VM_STATES = ("creating", "booting", "configuring", "running", "collecting", "collected", "failed")
ENDED_STATES = ("collected", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS vms (
    vm_id TEXT PRIMARY KEY,
    owner TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL,
    image TEXT NOT NULL,
    memory INTEGER NOT NULL,
    vcpus INTEGER NOT NULL,
    disk INTEGER NOT NULL,
    arch TEXT NOT NULL,
    address TEXT,
    overlay TEXT NOT NULL DEFAULT '',
    channel_dir TEXT NOT NULL DEFAULT '',  -- unused since the guest agent replaced the shared directory
    run_dir TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    updated REAL NOT NULL,
    collected REAL,
    error TEXT,
    dag_xml TEXT NOT NULL DEFAULT '',
    host_port INTEGER,
    mac TEXT,
    attributes TEXT NOT NULL DEFAULT '{}',
    made INTEGER NOT NULL DEFAULT 0,
    shop TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS vms_state ON vms(state);
CREATE TABLE IF NOT EXISTS action_runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    vm_id TEXT NOT NULL,
    node_id TEXT NOT NULL,
    digest TEXT NOT NULL,
    kind TEXT NOT NULL,
    started REAL NOT NULL,
    seconds REAL NOT NULL,
    status INTEGER,
    output TEXT NOT NULL DEFAULT '',
    ok INTEGER NOT NULL,
    step TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS action_runs_digest ON action_runs(digest);
CREATE INDEX IF NOT EXISTS action_runs_vm ON action_runs(vm_id);
CREATE TABLE IF NOT EXISTS plant_metrics (key TEXT PRIMARY KEY, value REAL NOT NULL);
"""


@dataclass
class VMRecord:
    """What the plant remembers of a VM (one row of ``vms``). Times are wall-clock seconds."""

    vm_id: str
    owner: str
    state: str
    image: str
    memory: int
    vcpus: int
    disk: int
    arch: str
    address: str | None = None
    overlay: str = ""
    run_dir: str = ""
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    collected: float | None = None
    error: str | None = None
    dag_xml: str = ""
    host_port: int | None = None
    mac: str | None = None
    attributes: dict[str, str] = field(default_factory=dict)
    #: True once the create finished (the DAG fully ran): a restart never adopts a VM whose create it cut short.
    made: bool = False
    #: The identity of the shop that asked for the VM (it alone may say the VM is no longer wanted).
    shop: str = ""

    @property
    def live(self) -> bool:
        return self.state not in ENDED_STATES


VM_COLUMNS = tuple(f.name for f in fields(VMRecord))
#: The most action runs a VM's records keep (the latest ones).
MAX_RUNS_PER_VM = 1000


@dataclass(frozen=True)
class ActionRun:
    """One run of an action inside a guest (one row of ``action_runs``)."""

    id: int
    vm_id: str
    node_id: str
    digest: str
    kind: str
    started: float
    seconds: float
    status: int | None
    output: str
    ok: bool
    #: The step it ran, as :func:`vmshop_common.dagxml.step_to_xml` writes it ('' in runs recorded before schema 3).
    step: str = ""


def truncate_output(output: str, limit: int = MAX_OUTPUT_BYTES) -> str:
    """``output`` cut to at most ``limit`` bytes of UTF-8 (at a character boundary), its head kept."""
    data = output.encode("utf-8", "replace")
    if len(data) <= limit:
        return output
    return data[:limit].decode("utf-8", "ignore")


class PlantRecords:
    """The records in the SQLite database ``db_path`` (created with its schema if missing).

    ``clock`` gives the wall-clock seconds stamped into ``updated``.
    Raises ConfigurationError if the database can't be opened or has a newer schema.
    """

    def __init__(self, db_path: str | Path, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(db_path)
        self.clock = clock
        self._lock = threading.RLock()
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:  # made 0600 before SQLite opens it (its journal files take the database file's mode)
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600))
            os.chmod(self.path, 0o600)
        except OSError as exc:
            raise ConfigurationError(f"cannot open the plant's records {self.path}: {exc.strerror or exc}") from None
        try:
            self._db: sqlite3.Connection | None = sqlite3.connect(
                str(self.path), timeout=30.0, isolation_level=None, check_same_thread=False)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._create()
        except sqlite3.Error as exc:
            raise ConfigurationError(f"cannot open the plant's records {self.path}: {exc}") from None

    def _create(self) -> None:
        db = self._conn()
        with self._lock:
            db.execute("BEGIN IMMEDIATE")
            try:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                row = db.execute("SELECT MAX(version) FROM schema_version").fetchone()
                version = row[0]
                if version is None:
                    db.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
                elif version > SCHEMA_VERSION:
                    raise ConfigurationError(f"the plant's records {self.path} have schema version {version}; "
                                             f"this plant knows version {SCHEMA_VERSION} at most")
                else:
                    for target in range(version + 1, SCHEMA_VERSION + 1):
                        for statement in _MIGRATIONS[target]:
                            if not _column_exists_already(db, statement):
                                db.execute(statement)
                        db.execute("INSERT INTO schema_version (version) VALUES (?)", (target,))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError(f"the plant's records {self.path} are closed")
        return self._db

    def _write(self, sql: str, params: tuple[Any, ...] | list[Any] = ()) -> sqlite3.Cursor:
        """Run one statement in its own transaction; committed (durably) on return."""
        with self._lock:
            db = self._conn()
            db.execute("BEGIN IMMEDIATE")
            try:
                cursor = db.execute(sql, params)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            return cursor

    def _read(self, sql: str, params: tuple[Any, ...] | list[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            db = self._conn()
            return db.execute(sql, params).fetchall()

    @property
    def schema_version(self) -> int:
        return int(self._read("SELECT MAX(version) AS v FROM schema_version")[0]["v"])

    # VMs ----------------------------------------------------------------------
    def add_vm(self, record: VMRecord) -> None:
        """Insert ``record``; raises DeclinedError if its id was ever used, ValueError for an unknown state."""
        _check_state(record.state)
        values = [_to_column(name, getattr(record, name)) for name in VM_COLUMNS]
        placeholders = ", ".join("?" for _ in VM_COLUMNS)
        try:
            self._write(f"INSERT INTO vms ({', '.join(VM_COLUMNS)}) VALUES ({placeholders})", values)
        except sqlite3.IntegrityError:
            raise DeclinedError(f"a VM with id '{record.vm_id}' is recorded already") from None

    def update_vm(self, vm_id: str, /, **changes: Any) -> VMRecord:
        """Set the given columns of ``vm_id`` (and ``updated``, unless given); returns the new record.

        Raises NoSuchVMError, or ValueError for an unknown column or state.
        """
        unknown = set(changes) - set(VM_COLUMNS) | ({"vm_id"} & set(changes))
        if unknown:
            raise ValueError(f"cannot update {', '.join(sorted(unknown))} of a VM record")
        if "state" in changes:
            _check_state(changes["state"])
        changes.setdefault("updated", self.clock())
        names = sorted(changes)
        assignments = ", ".join(f"{name} = ?" for name in names)
        values = [_to_column(name, changes[name]) for name in names]
        with self._lock:
            cursor = self._write(f"UPDATE vms SET {assignments} WHERE vm_id = ?", [*values, vm_id])
            if cursor.rowcount == 0:
                raise NoSuchVMError(f"no VM has the id '{vm_id}'")
            return self.get_vm(vm_id)

    def get_vm(self, vm_id: str) -> VMRecord:
        """The record of ``vm_id``; raises NoSuchVMError."""
        rows = self._read("SELECT * FROM vms WHERE vm_id = ?", (vm_id,))
        if not rows:
            raise NoSuchVMError(f"no VM has the id '{vm_id}'")
        return _record(rows[0])

    def list_vms(self, include_collected: bool = False) -> list[VMRecord]:
        """Every VM in creation order; collected ones only with ``include_collected`` (failed ones always)."""
        where = "" if include_collected else "WHERE state != 'collected'"
        return [_record(row) for row in self._read(f"SELECT * FROM vms {where} ORDER BY created, vm_id")]

    def live_vms(self) -> list[VMRecord]:
        """The VMs that are neither collected nor failed, in creation order."""
        marks = ", ".join("?" for _ in ENDED_STATES)
        rows = self._read(f"SELECT * FROM vms WHERE state NOT IN ({marks}) ORDER BY created, vm_id", ENDED_STATES)
        return [_record(row) for row in rows]

    def count_by_state(self) -> dict[str, int]:
        """How many VMs the records hold in each state (collected ones included): for the metrics."""
        return {str(row[0]): int(row[1]) for row in self._read("SELECT state, COUNT(*) FROM vms GROUP BY state")}

    def delete_vm(self, vm_id: str) -> bool:
        """Forget ``vm_id`` and its action runs (a create that failed leaves no record). Returns whether it existed."""
        with self._lock:
            db = self._conn()
            db.execute("BEGIN IMMEDIATE")
            try:
                gone = db.execute("DELETE FROM vms WHERE vm_id = ?", (vm_id,)).rowcount
                db.execute("DELETE FROM action_runs WHERE vm_id = ?", (vm_id,))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            return gone > 0

    # Action runs -------------------------------------------------------------
    def add_action_run(self, vm_id: str, node_id: str, digest: str, kind: str, started: float, seconds: float,
                       status: int | None, output: str, ok: bool, step: str = "") -> int:
        """Record one run of an action (its output cut to 64 KiB; ``step``: the action as
        :func:`~vmshop_common.dagxml.step_to_xml` writes it); returns the run's id.

        A VM keeps its latest :data:`MAX_RUNS_PER_VM` runs: configuring a VM
        over and over cannot grow the records without bound.
        """
        cursor = self._write(
            "INSERT INTO action_runs (vm_id, node_id, digest, kind, started, seconds, status, output, ok, step) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (vm_id, node_id, digest, kind, float(started), float(seconds), status, truncate_output(output or ""),
             1 if ok else 0, step))
        assert cursor.lastrowid is not None
        run_id = int(cursor.lastrowid)
        if run_id % 64 == 0:  # now and then is enough to keep the bound within 64 rows
            self._write("DELETE FROM action_runs WHERE vm_id = ? AND id <= ?",
                        (vm_id, self._nth_latest_run(vm_id, MAX_RUNS_PER_VM)))
        return run_id

    def _nth_latest_run(self, vm_id: str, n: int) -> int:
        rows = self._read("SELECT id FROM action_runs WHERE vm_id = ? ORDER BY id DESC LIMIT 1 OFFSET ?", (vm_id, n))
        return int(rows[0]["id"]) if rows else -1

    def action_runs(self, vm_id: str) -> list[ActionRun]:
        """The action runs of ``vm_id``, in the order they were recorded."""
        rows = self._read("SELECT * FROM action_runs WHERE vm_id = ? ORDER BY id", (vm_id,))
        return [ActionRun(id=row["id"], vm_id=row["vm_id"], node_id=row["node_id"], digest=row["digest"],
                          kind=row["kind"], started=row["started"], seconds=row["seconds"], status=row["status"],
                          output=row["output"], ok=bool(row["ok"]), step=row["step"]) for row in rows]

    def expected_seconds(self, digest: str) -> float | None:
        """Mean seconds of the last 5 successful runs of the step ``digest``; None if it never succeeded here."""
        rows = self._read("SELECT AVG(seconds) AS mean FROM (SELECT seconds FROM action_runs "
                          "WHERE digest = ? AND ok = 1 ORDER BY id DESC LIMIT ?)", (digest, HISTORY_RUNS))
        mean = rows[0]["mean"]
        return None if mean is None else float(mean)

    def step_costs(self, limit: int = 4096) -> dict[str, float]:
        """:meth:`expected_seconds` of every step that ever succeeded here (the ``limit`` most recently run):
        the measured costs a plant's offer carries."""
        rows = self._read("SELECT digest, AVG(seconds) AS mean FROM (SELECT digest, seconds, ROW_NUMBER() OVER "
                          "(PARTITION BY digest ORDER BY id DESC) AS n, MAX(id) OVER (PARTITION BY digest) AS last "
                          "FROM action_runs WHERE ok = 1) WHERE n <= ? GROUP BY digest ORDER BY MAX(last) DESC "
                          "LIMIT ?", (HISTORY_RUNS, limit))
        return {row["digest"]: float(row["mean"]) for row in rows}

    # Metrics -----------------------------------------------------------------
    def set_metric(self, key: str, value: float) -> None:
        """Store a measurement (e.g. 'clone_seconds', 'boot_seconds')."""
        self._write("INSERT INTO plant_metrics (key, value) VALUES (?, ?) "
                    "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, float(value)))

    def metric(self, key: str) -> float | None:
        """The stored measurement ``key``, or None."""
        rows = self._read("SELECT value FROM plant_metrics WHERE key = ?", (key,))
        return float(rows[0]["value"]) if rows else None

    # Life --------------------------------------------------------------------
    def close(self) -> None:
        """Close the database (safe to repeat); later calls raise RuntimeError."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def __enter__(self) -> PlantRecords:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_ADD_COLUMN = re.compile(r"^ALTER TABLE (\w+) ADD COLUMN (\w+) ")


def _column_exists_already(db: sqlite3.Connection, statement: str) -> bool:
    """Whether ``statement`` adds a column that the table has (made by this version's schema: a table that did
    not exist before the migration began)."""
    added = _ADD_COLUMN.match(statement)
    if added is None:
        return False
    table, column = added.groups()
    return any(row[1] == column for row in db.execute(f"PRAGMA table_info({table})"))


def _check_state(state: object) -> None:
    if state not in VM_STATES:
        raise ValueError(f"'{state}' is not a VM state ({', '.join(VM_STATES)})")


def _to_column(name: str, value: Any) -> Any:
    if name == "attributes":
        return json.dumps(dict(value or {}), sort_keys=True)
    if name == "made":
        return 1 if value else 0
    return value


def _record(row: sqlite3.Row) -> VMRecord:
    values = {name: row[name] for name in VM_COLUMNS}
    values["attributes"] = json.loads(values["attributes"] or "{}")
    values["made"] = bool(values["made"])
    return VMRecord(**values)
