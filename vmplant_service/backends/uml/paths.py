"""The files the UML backend makes in a VM's run directory, and the marker that finds its processes.

Everything here is in ``run_dir`` (0700, the plant's own): no guest can
reach it, since UML's jail holds only the VM's disk *file* from it. The
plant opens these paths; the guest never names, links or replaces any of
them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunPaths:
    """A VM's files (absolute paths)."""

    run_dir: Path

    @classmethod
    def of(cls, run_dir: Path | str) -> RunPaths:
        return cls(Path(os.path.abspath(run_dir)))

    @property
    def marker(self) -> str:
        """What every process of the VM has in its command line: ``RUN_DIR/`` (the relay's argument, UML's
        disk argument, the plugs' description). The trailing slash keeps ``vm-1/`` from matching ``vm-10/``."""
        return f"{self.run_dir}/"

    @property
    def relay_pidfile(self) -> Path:
        return self.run_dir / "relay.pid"

    @property
    def uml_pidfile(self) -> Path:
        return self.run_dir / "uml.pid"

    @property
    def exit_record(self) -> Path:
        """How UML ended (written by the relay, its parent)."""
        return self.run_dir / "uml.exit"

    @property
    def agent(self) -> Path:
        """The relay's socket for the guest agent's line."""
        return self.run_dir / "qga.sock"

    @property
    def console(self) -> Path:
        return self.run_dir / "console.log"

    @property
    def relay_errors(self) -> Path:
        """The relay's own standard error (the plugs' goes to the console log)."""
        return self.run_dir / "relay.err"

    @property
    def cow(self) -> Path:
        return self.run_dir / "disk.cow"

    @property
    def raw(self) -> Path:
        return self.run_dir / "disk.raw"

    @property
    def jail(self) -> Path:
        """The mount point of UML's jail (an empty directory on the host; a tmpfs in UML's namespace)."""
        return self.run_dir / "root"

    @property
    def unconfined_ctl(self) -> Path:
        """UML's ``uml_dir`` when it runs without a jail (``confine=none``); unused by the plant."""
        return self.run_dir / "ctl"

    def plug_pidfile(self, index: int) -> Path:
        return self.run_dir / f"nic{index}.plug.pid"

    def plug_pidfiles(self) -> list[Path]:
        return sorted(self.run_dir.glob("nic*.plug.pid"))

    def files(self) -> tuple[Path, ...]:
        return (self.relay_pidfile, self.uml_pidfile, self.exit_record, self.agent, self.console,
                self.console.with_name("console.log.1"), self.relay_errors, self.cow, self.raw,
                *self.plug_pidfiles())

    def directories(self) -> tuple[Path, ...]:
        return (self.jail, self.unconfined_ctl)


__all__ = ["RunPaths"]
