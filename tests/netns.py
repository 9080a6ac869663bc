"""Test hosts: network namespaces joined by a bridge, so that shop and plants talk across real links.

A :class:`Fabric` is one test network: a fabric namespace holding a bridge, and one namespace per test
host, each joined to the bridge by a veth pair and given an address of ``198.18.0.0/24`` (RFC 2544's
benchmarking range). That range lives only inside these namespaces: nothing is added to the host's own
namespace, so the test's traffic stays on loopback or inside namespaces the test made.

Names carry this process's pid and a random part (``vmst-<pid>-<hex>-<host>``), so runs never collide;
:meth:`Fabric.close` deletes exactly the namespaces it made (deleting a host's namespace deletes its veth
pair). :func:`remove_abandoned` deletes namespaces of this harness whose process is gone (a test process
that was killed), never another live run's.

Servers run inside a host with :meth:`Fabric.prefix` (``ip netns exec NAME``); the test process itself
talks to them from a host of its own with :meth:`Fabric.run_in` (a thread that joins that namespace with
``setns(2)``: sockets made there stay there). Needs root (``ip netns``).
"""

from __future__ import annotations

import ctypes
import os
import re
import secrets
import shutil
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
PREFIX = "vmst"
NETWORK = "198.18.0"
NETNS_DIR = Path("/var/run/netns")
CLONE_NEWNET = 0x40000000
NAME = re.compile(rf"^{PREFIX}-(\d+)-[0-9a-f]+-")


def available() -> str | None:
    """Why the harness cannot run here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is missing"
    return None


def _ip(*args: str, namespace: str | None = None) -> str:
    command = ["ip", *(("-n", namespace) if namespace else ()), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}: {done.stderr.strip()}")
    return done.stdout


@dataclass
class Host:
    """A test host: its namespace and its address on the fabric."""

    name: str
    namespace: str
    address: str


@dataclass
class Fabric:
    """One test network (see the module). Use as a context manager, or call :meth:`close`."""

    tag: str = field(default_factory=lambda: f"{PREFIX}-{os.getpid()}-{secrets.token_hex(3)}")
    hosts: dict[str, Host] = field(default_factory=dict)
    namespaces: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.fabric = f"{self.tag}-fabric"
        self._add_namespace(self.fabric)
        _ip("link", "add", "br0", "type", "bridge", namespace=self.fabric)
        _ip("link", "set", "br0", "up", namespace=self.fabric)

    def _add_namespace(self, name: str) -> None:
        _ip("netns", "add", name)
        self.namespaces.append(name)
        _ip("link", "set", "lo", "up", namespace=name)

    def add_host(self, name: str) -> Host:
        """A new host joined to the fabric, with the next address of the test range."""
        if not re.match(r"^[a-z0-9]{1,12}$", name) or name in self.hosts:
            raise ValueError(f"bad or repeated host name {name!r}")
        index = len(self.hosts) + 1
        namespace = f"{self.tag}-{name}"
        self._add_namespace(namespace)
        outside, inside = f"vf{index}", f"vh{index}"  # made in the fabric namespace: no name clashes elsewhere
        _ip("link", "add", outside, "type", "veth", "peer", "name", inside, namespace=self.fabric)
        _ip("link", "set", inside, "netns", namespace, namespace=self.fabric)
        _ip("link", "set", outside, "master", "br0", "up", namespace=self.fabric)
        address = f"{NETWORK}.{index + 1}"
        _ip("addr", "add", f"{address}/24", "dev", inside, namespace=namespace)
        _ip("link", "set", inside, "up", namespace=namespace)
        host = self.hosts[name] = Host(name, namespace, address)
        return host

    def prefix(self, host: Host) -> list[str]:
        """The command prefix that runs a program inside ``host``."""
        return ["ip", "netns", "exec", host.namespace]

    def run_in(self, host: Host, work: Callable[[], T], timeout: float = 600.0) -> T:
        """``work()`` in a thread that joined ``host``'s network namespace; its result (or its exception)."""
        result: dict[str, Any] = {}

        def inside() -> None:
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                fd = os.open(NETNS_DIR / host.namespace, os.O_RDONLY)
                try:
                    if libc.setns(fd, CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), "setns failed")
                finally:
                    os.close(fd)
                result["value"] = work()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                result["error"] = exc

        thread = threading.Thread(target=inside, name=f"in-{host.name}", daemon=True)
        thread.start()
        thread.join(timeout)
        if thread.is_alive():
            raise TimeoutError(f"work in {host.name} did not end within {timeout} s")
        if "error" in result:
            raise result["error"]
        return result["value"]  # type: ignore[no-any-return]

    def close(self) -> None:
        """Delete every namespace this fabric made (hosts first, then the fabric)."""
        for namespace in reversed(self.namespaces):
            try:
                _ip("netns", "delete", namespace)
            except RuntimeError:
                pass
        self.namespaces.clear()

    def __enter__(self) -> Fabric:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def ours() -> list[str]:
    """Names of this harness's namespaces that exist now."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
    return [line.split()[0] for line in listed.splitlines() if line.strip() and NAME.match(line.split()[0])]


def remove_abandoned() -> list[str]:
    """Delete this harness's namespaces whose test process has ended; their names."""
    removed = []
    for name in ours():
        match = NAME.match(name)
        assert match is not None
        if Path(f"/proc/{match.group(1)}").exists():
            continue
        try:
            _ip("netns", "delete", name)
            removed.append(name)
        except RuntimeError:
            pass
    return removed
