"""A private PostgreSQL cluster for tests and benchmarks, from Debian's ``postgresql`` package.

:class:`PgCluster` runs ``initdb`` and ``pg_ctl`` in a temporary directory of
its own, on a port the OS says is free, with its unix socket in that
directory; as root it runs them as the ``postgres`` user (``initdb`` refuses
root). It is stopped by the PID in its own ``postmaster.pid`` (never by name:
other PostgreSQL servers on the machine are not ours) and its directory is
removed. Each user of the cluster gets a database or a schema of its own
(:meth:`PgCluster.new_database`, :meth:`PgCluster.new_schema`).

The role ``vmshop`` is the superuser; over TCP (127.0.0.1) it proves
:data:`PASSWORD` (SCRAM), over the unix socket it is trusted.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

USER = "vmshop"
PASSWORD = "test-registry-secret-7f3a"


def _bin_dir() -> Path:
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    if not versions:
        raise RuntimeError("PostgreSQL is not installed (Debian's postgresql package; scripts/setup_host.sh "
                           "installs it)")
    return versions[-1].parent


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PgCluster:
    """A PostgreSQL server of our own (see the module). ``fsync``: off for fast tests, on for benchmarks."""

    def __init__(self, fsync: bool = False) -> None:
        self.bin = _bin_dir()
        self.root = Path(tempfile.mkdtemp(prefix="vmshop-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = _free_port()
        self.fsync = fsync
        self.pid: int | None = None
        self._serial = 0
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            entry = pwd.getpwnam("postgres")
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        password_file = self.root / "pw"
        password_file.write_text(PASSWORD + "\n")
        if self._as_postgres:
            os.chown(password_file, entry.pw_uid, entry.pw_gid)
        self._run([str(self.bin / "initdb"), "-D", str(self.data), "-U", USER, "--auth-local=trust",
                   "--auth-host=scram-sha-256", f"--pwfile={password_file}", "-E", "UTF8", "--locale=C.UTF-8",
                   "--no-sync"])
        password_file.unlink()
        self.start()

    def _run(self, args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
        extra: dict[str, Any] = {"user": "postgres", "group": "postgres"} if self._as_postgres else {}
        return subprocess.run(args, check=True, capture_output=True, cwd=str(self.root), **extra, **kwargs)

    # The server -----------------------------------------------------------------------------------
    def start(self) -> None:
        fsync = "on" if self.fsync else "off"
        options = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync={fsync}"
                   " -c max_connections=200 -c shared_buffers=128MB")
        self._run([str(self.bin / "pg_ctl"), "start", "-w", "-t", "60", "-D", str(self.data), "-l", str(self.log),
                   "-o", options])
        self.pid = int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30.0) -> None:
        """Stop our postmaster by its PID (SIGINT: a fast shutdown; SIGQUIT: immediate) and wait for it to end."""
        pid, self.pid = self.pid, None
        if pid is None:
            return
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while Path(f"/proc/{pid}").exists():
            if time.monotonic() > deadline:
                if sig != signal.SIGQUIT:
                    os.kill(pid, signal.SIGQUIT)
                    deadline = time.monotonic() + timeout
                    sig = signal.SIGQUIT
                else:
                    raise RuntimeError(f"our PostgreSQL (pid {pid}) did not stop")
            time.sleep(0.02)

    def restart(self) -> None:
        self.stop()
        self.start()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    # Databases ------------------------------------------------------------------------------------
    def conninfo(self, dbname: str = "postgres", **extra: str) -> str:
        """A libpq connection string over the unix socket (trusted)."""
        words = [f"host={self.root}", f"port={self.port}", f"user={USER}", f"dbname={dbname}"]
        words += [f"{key}={value}" for key, value in extra.items()]
        return " ".join(words)

    def tcp_conninfo(self, dbname: str) -> str:
        """A libpq connection string over TCP, without the password (it must be given apart)."""
        return f"host=127.0.0.1 port={self.port} user={USER} dbname={dbname}"

    def execute(self, sql: str, dbname: str = "postgres") -> None:
        import psycopg

        with psycopg.connect(self.conninfo(dbname), autocommit=True) as conn:
            conn.execute(sql)  # type: ignore[arg-type]

    def new_database(self, prefix: str = "registry") -> str:
        """A new empty database; its name."""
        self._serial += 1
        name = f"{prefix}_{os.getpid()}_{self._serial}"
        self.execute(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        self.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def new_schema(self, dbname: str) -> str:
        """A new empty schema in ``dbname``: a connection string whose search path is it."""
        self._serial += 1
        schema = f"s{self._serial}"
        self.execute(f"CREATE SCHEMA {schema}", dbname)
        return self.conninfo(dbname, options=f"'-c search_path={schema}'")

    def drop_schema(self, conninfo: str) -> None:
        schema = conninfo.rsplit("search_path=", 1)[1].rstrip("'")
        dbname = conninfo.split("dbname=", 1)[1].split()[0]
        self.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE", dbname)
