"""The shop's Prometheus metrics (served at ``/metrics``: see :mod:`vmshop_common.metrics`).

Besides every server's requests, faults and request latency by operation
(``vmshop_requests_total``, ``vmshop_faults_total``,
``vmshop_request_seconds``; ``createVM``, ``configureVM`` and ``collectVM``
among the operations), the shop has:

- ``vmshop_bid_round_seconds``: how long each bid round took (offers mode:
  the offers priced at the shop, plants with no offer asked live; live
  mode: every plant asked at once); an estimate or a create makes one
  round, a create whose offer-priced bidders all failed one more (live);
- ``vmshop_vms{state}``: VMs in the registry by state, and
  ``vmshop_registry_vms``: all of them (collected ones included), both read
  by a timer on the shop's thread pool every ``<metrics refresh>`` seconds;
- ``vmshop_plants{state="up"|"down"|"unchecked"}`` and
  ``vmshop_plant_up{plant}``: the plant list's health, read from the plant
  directory (in memory) at each scrape.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from vmshop_common.metrics import ROUND_BUCKETS, MetricsRefresh, ServerMetrics, new_gauge, new_histogram

from .plants import PlantDirectory
from .registry import Registry

#: A state label is kept when it looks like one and fewer than this many were seen; else it counts as 'other'.
MAX_STATES = 32
_STATE = re.compile(r"[a-z][a-z_]{0,31}")


class PlantHealth(Collector):
    """The plant directory's health at scrape time (reactor thread; nothing but memory is read)."""

    def __init__(self, plants: PlantDirectory) -> None:
        self.plants = plants

    def collect(self) -> Iterable[Any]:
        counts = {"up": 0, "down": 0, "unchecked": 0}
        each = GaugeMetricFamily("vmshop_plant_up", "1 when the plant answered its last call, else 0", labels=["plant"])
        for handle in self.plants.all():
            counts["up" if handle.up else "down" if handle.checked else "unchecked"] += 1
            each.add_metric([handle.url], 1.0 if handle.up else 0.0)
        by_state = GaugeMetricFamily("vmshop_plants", "Plants of the plant list, by health", labels=["state"])
        for state, count in counts.items():
            by_state.add_metric([state], float(count))
        return [by_state, each]

    def describe(self) -> Iterable[Any]:
        return []  # names are checked at collect time (auto_describe would call collect at registration)


class ShopMetrics(ServerMetrics):
    """The shop's metrics (see the module)."""

    def __init__(self, operations: Iterable[str], plants: PlantDirectory, registry: Registry) -> None:
        super().__init__("vmshop", operations)
        self.registry_db = registry
        self.bid_round = new_histogram(self, "bid_round_seconds",
                                       "Seconds one bid round took (offers priced here, or every plant asked)",
                                       ROUND_BUCKETS)
        self.vms = new_gauge(self, "vms", "VMs in the registry by state (refreshed every <metrics refresh> s)",
                             ["state"])
        self.registry_size = new_gauge(self, "registry_vms",
                                       "VMs in the registry, collected ones included (refreshed every "
                                       "<metrics refresh> s)")
        self.registry.register(PlantHealth(plants))
        self._states: set[str] = set()

    def observe_bid_round(self, seconds: float) -> None:
        """The hook :class:`~vmshop_service.shop.Shop` calls after each call for bids."""
        self.bid_round.observe(max(seconds, 0.0))

    def read(self) -> dict[Any, dict[Any, float]]:
        """The registry's counts (blocking: on the thread pool, see :class:`MetricsRefresh`)."""
        by_state: dict[Any, float] = {}
        total = 0
        for state, count in self.registry_db.count_by_state().items():
            label = self._state_label(state)
            by_state[label] = by_state.get(label, 0) + count
            total += count
        return {self.vms: by_state, self.registry_size: {(): float(total)}}

    def _state_label(self, state: str) -> str:
        if not _STATE.fullmatch(state):
            return "other"
        if state not in self._states and len(self._states) >= MAX_STATES:
            return "other"
        self._states.add(state)
        return state

    def refresher(self, in_thread: Any) -> MetricsRefresh:
        """What the shop's metrics timer runs: :meth:`read` through ``in_thread`` (the shop's pool)."""
        return MetricsRefresh(self.read, in_thread)


__all__ = ["PlantHealth", "ShopMetrics"]
