"""The plant's Prometheus metrics (served at ``/metrics``: see :mod:`vmshop_common.metrics`).

Besides every server's requests, faults and request latency by operation
(``vmplant_requests_total``, ``vmplant_faults_total``,
``vmplant_request_seconds``: ``estimateCost`` is the plant's side of a bid
round, ``createVM``, ``configureVM`` and ``collectVM`` its VM work), the
plant has:

- ``vmplant_vms{state}``: the VMs its records hold by state (collected and
  failed ones included), read by a timer on the plant's thread pool every
  ``<metrics refresh>`` seconds;
- ``vmplant_guest_agent_errors_total{reason}``: a guest's agent that failed
  an action (``failed``), gave no result in time (``timeout``), or never
  answered after the boot (``no_answer``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from vmshop_common.metrics import MetricsRefresh, ServerMetrics, new_counter, new_gauge

from .records import VM_STATES, PlantRecords

AGENT_ERROR_REASONS = ("failed", "timeout", "no_answer")


class PlantMetrics(ServerMetrics):
    """The plant's metrics (see the module)."""

    def __init__(self, operations: Iterable[str], records: PlantRecords) -> None:
        super().__init__("vmplant", operations)
        self.records = records
        self.vms = new_gauge(self, "vms", "VMs in the plant's records by state (refreshed every <metrics refresh> s)",
                             ["state"])
        self.agent_errors = new_counter(self, "guest_agent_errors",
                                        "Guest agents that failed an action, timed out, or never answered after boot",
                                        ["reason"])
        for reason in AGENT_ERROR_REASONS:
            self.agent_errors.labels(reason)  # every reason shows, at 0, from the start

    def agent_error(self, reason: str) -> None:
        """The hook :class:`~vmplant_service.plant.Plant` calls (from its worker threads) for each agent error."""
        self.agent_errors.labels(reason if reason in AGENT_ERROR_REASONS else "failed").inc()

    def read(self) -> dict[Any, dict[Any, float]]:
        """The records' counts (blocking: on the thread pool). Every state shows, 0 when no VM is in it."""
        counts = self.records.count_by_state()
        return {self.vms: {state: float(counts.get(state, 0)) for state in VM_STATES}}

    def refresher(self, in_thread: Any) -> MetricsRefresh:
        """What the plant's metrics timer runs: :meth:`read` through ``in_thread`` (the plant's pool)."""
        return MetricsRefresh(self.read, in_thread)


__all__ = ["AGENT_ERROR_REASONS", "PlantMetrics"]
