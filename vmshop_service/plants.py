"""The plants a shop knows: their SOAP clients and their health.

The list comes from the plant list file (``addresses/vmplant_addresses.txt``:
one ``host:port`` per line). At start-up :meth:`PlantDirectory.load` reads
it; on SIGHUP or the ``reloadPlants`` operation the shop reads it again with
:meth:`~PlantDirectory.read_urls` on a thread and hands the result to
:meth:`~PlantDirectory.apply`. The plants' WSDL is parsed once, when the
directory is made, and shared by every plant's client, so a new plant's
client costs no blocking work. A plant that does not answer is marked down,
never fatal; it is marked up again when it answers. All methods but
:meth:`~PlantDirectory.read_urls` run in the reactor thread; calls to plants
never block it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zeep.exceptions
from twisted.internet import defer

from vmshop_common.contracts import wsdl_path
from vmshop_common.errors import PlantGoneError, VMShopError
from vmshop_common.soap.client import AsyncSoapClient, SoapCallTimeout, fault_code, load_wsdl
from vmshop_common.tls import describe_tls_failure

log = logging.getLogger(__name__)
PLANT_BINDING = "{urn:vmshop:vmplant:1}VMPlant"


@dataclass
class PlantHandle:
    """One plant: its endpoint URL, client and last known health."""

    url: str
    client: AsyncSoapClient
    up: bool = False
    checked: bool = False
    info: Any = None
    last_error: str | None = None
    last_seen: float | None = None
    load: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def describe_failure(failure: Any) -> tuple[str, str]:
    """(status, reason) for a failed call: 'timeout', 'fault' (with its code) or 'down'."""
    error = failure.value if hasattr(failure, "value") else failure
    if isinstance(error, (SoapCallTimeout, defer.TimeoutError)):
        return "timeout", "no answer in time"
    if isinstance(error, VMShopError):
        return "fault", f"[{error.code}] {error.message}"
    if isinstance(error, zeep.exceptions.Fault):
        return "fault", f"[{fault_code(error)}] {error.message}"
    tls = describe_tls_failure(error, "plant")
    if tls is not None:
        return "down", f"TLS: {tls}"
    return "down", f"{type(error).__name__}: {error}"


class PlantDirectory:
    """The plants of the plant list file, with a non-blocking SOAP client each."""

    def __init__(self, plants_file: Path | None, call_timeout: float, reactor: Any,
                 clock: Callable[[], float], urls: list[str] | None = None, *, tls: Any = None) -> None:
        """``tls``: the shop's :class:`~vmshop_common.tls.ClientPolicy` (plants are https, verified against the
        shop's CA bundle, and see the shop's own certificate); ``None``: an insecure shop (plants are http)."""
        self.plants_file = plants_file
        self.tls = tls
        self.call_timeout = call_timeout
        self.reactor = reactor
        self.clock = clock
        self._plants: dict[str, PlantHandle] = {}
        self._static = urls
        self._wsdl = load_wsdl(wsdl_path("vmplant.wsdl"), tls=tls)

    def load(self) -> list[str]:
        """Read the plant list and follow it (blocking: at start-up); returns the plants' URLs. A bad file keeps
        the old list and raises."""
        return self.apply(self.read_urls())

    def read_urls(self) -> list[str]:
        """The plants' URLs from the plant list file (blocking; any thread). ConfigurationError if it is bad."""
        if self._static is not None:
            return list(self._static)
        from .config import plant_urls
        assert self.plants_file is not None
        return plant_urls(self.plants_file, "https" if self.tls is not None else "http")

    def apply(self, urls: list[str]) -> list[str]:
        """Follow a plant list read by :meth:`read_urls`: a client for each new plant, none for plants no longer
        listed (no blocking work). Returns ``urls``."""
        for url in list(self._plants):
            if url not in urls:
                handle = self._plants.pop(url)
                handle.client.close()
        for url in urls:
            if url not in self._plants:
                client = AsyncSoapClient(self._wsdl, url, self.call_timeout, binding=PLANT_BINDING,
                                         reactor=self.reactor, tls=self.tls)
                self._plants[url] = PlantHandle(url=url, client=client)
        log.info("plants: %s", ", ".join(urls) or "none")
        return urls

    def all(self) -> list[PlantHandle]:
        return list(self._plants.values())

    def get(self, url: str) -> PlantHandle:
        handle = self._plants.get(url)
        if handle is None:
            raise PlantGoneError(f"plant {url} is no longer in this shop's plant list")
        return handle

    def mark(self, handle: PlantHandle, up: bool, error: str | None = None) -> None:
        if handle.up != up or not handle.checked:
            log.log(logging.INFO if up else logging.WARNING, "plant %s is %s%s", handle.url,
                    "up" if up else "down", f": {error}" if error else "")
        handle.up, handle.checked = up, True
        if up:
            handle.last_seen, handle.last_error = self.clock(), None
        else:
            handle.last_error = error

    def check(self, handle: PlantHandle, timeout: float | None = None) -> defer.Deferred[PlantHandle]:
        """Ask the plant for its info; marks it up or down. Never fails."""
        d = handle.client.call_with_timeout(timeout or self.call_timeout, "plantInfo")

        def ok(info: Any) -> PlantHandle:
            handle.info = info
            handle.load = int(getattr(info, "running_vms", 0) or 0)
            self.mark(handle, True)
            return handle

        def bad(failure: Any) -> PlantHandle:
            self.mark(handle, False, describe_failure(failure)[1])
            return handle

        return d.addCallbacks(ok, bad)

    def check_all(self, timeout: float | None = None) -> defer.Deferred[list[PlantHandle]]:
        return defer.gatherResults([self.check(handle, timeout) for handle in self.all()])

    def close(self) -> defer.Deferred[Any]:
        return defer.gatherResults([handle.client.close() for handle in self._plants.values()])
