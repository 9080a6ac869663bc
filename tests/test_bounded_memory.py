"""Memory stays bounded under a stream of large and hostile requests (issue 11, part 4).

A shop and a plant (fake backend) each take, from 8 clients at once, for
:data:`SECONDS` seconds: large DAGs to estimate (valid ones and ones over
the schema's limits), bodies over the size limit, DOCTYPEs, deep nesting,
malformed XML and unknown images, each client over its own kept-alive
mutual-TLS connection. Every request gets an answer (a fault for the bad
ones). Each server's resident memory rises while its allocator warms up
(measured: ~25 s to a plateau near 190 MiB), then stays flat: after
:data:`WARM_UP` seconds it rises less than :data:`MAX_GROWTH` above the
warm-up's highest, and it never passes :data:`MAX_RSS`. What a request holds is released when it is
answered, and the work each server takes on at once is bounded (its thread
pool and the queue in front of it).

``bench/run.py --only memory`` runs the same stream for 10 minutes and prints
the figures; this test is the short run.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pki import test_pki
from servers import ServerProcess, host_port, start_plant, start_shop

pytestmark = pytest.mark.integration

SECONDS = float(os.environ.get("VMSHOP_STREAM_SECONDS", "60"))
WARM_UP = 30.0
MAX_GROWTH = 64 * 1024 * 1024
MAX_RSS = 400 * 1024 * 1024
CLIENTS = 8

SHOP_NS = "urn:vmshop:vmshop:1"
PLANT_NS = "urn:vmshop:vmplant:1"


def envelope(namespace: str, operation: str, inner: str) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?><soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/'
            f'envelope/" xmlns:t="{namespace}"><soap:Body><t:{operation}>{inner}</t:{operation}></soap:Body>'
            f"</soap:Envelope>").encode()


def big_dag(size: int) -> str:
    body = "echo " + "x" * size
    return ('&lt;vm xmlns="urn:vmshop:dag:1"&gt;&lt;nodes&gt;&lt;image id="s" name="tiny"/&gt;'
            f'&lt;script id="a"&gt;{body}&lt;/script&gt;&lt;/nodes&gt;&lt;edges&gt;'
            '&lt;edge from="s" to="a"/&gt;&lt;/edges&gt;&lt;/vm&gt;')


def requests_for(namespace: str) -> list[bytes]:
    """One of each kind of request the stream sends to a server."""
    deep = "<a>" * 5000 + "</a>" * 5000
    return [
        envelope(namespace, "estimateCost", f"<t:dag>{big_dag(200_000)}</t:dag>"),  # valid: a bid comes back
        envelope(namespace, "estimateCost", f"<t:dag>{big_dag(900_000)}</t:dag>"),  # a script over the XSD's limit
        envelope(namespace, "estimateCost", f"<t:dag>{big_dag(3_000_000)}</t:dag>"),  # over the body limit
        b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "' + b"a" * 100_000 + b'">]>' + envelope(namespace, "x", ""),
        envelope(namespace, "estimateCost", f"<t:dag>{deep}</t:dag>"),
        envelope(namespace, "estimateCost", "<t:dag>&lt;vm&gt;" + "&lt;unclosed " * 50_000 + "</t:dag>"),
        b"<soap:Envelope " + b"x" * 500_000,
        envelope(namespace, "estimateCost", f"<t:dag>{big_dag(400_000).replace('tiny', 'no such image')}</t:dag>"),
    ]


def rss(server: ServerProcess) -> int:
    assert server.process is not None
    for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class Stream:
    """CLIENTS threads, each POSTing the requests round-robin over its own kept-alive session."""

    def __init__(self, server: ServerProcess, bodies: list[bytes], identity: str) -> None:
        self.server = server
        self.bodies = bodies
        self.identity = identity
        self.stopping = threading.Event()
        self.answers: dict[int, int] = {}
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(CLIENTS)]
        self.lock = threading.Lock()

    def _run(self, index: int) -> None:
        session = test_pki().session(self.identity)
        try:
            number = index
            while not self.stopping.is_set():
                body = self.bodies[number % len(self.bodies)]
                number += 1
                try:
                    answer = session.post(self.server.url, data=body, timeout=60,
                                          headers={"Content-Type": "text/xml; charset=utf-8"})
                    with self.lock:
                        self.answers[answer.status_code] = self.answers.get(answer.status_code, 0) + 1
                    if answer.status_code >= 500 and b"Fault" not in answer.content:
                        self.failures.append(f"{answer.status_code} without a SOAP fault")
                except Exception as exc:  # noqa: BLE001 - counted; a server must answer every request
                    self.failures.append(repr(exc)[:200])
        finally:
            session.close()

    def __enter__(self) -> Stream:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(120)


@pytest.fixture
def servers(tmp_path: Path, warehouse_dir: Path) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    plant = start_plant(tmp_path / "plant", warehouse_dir, backend="fake")
    shop = None
    try:
        shop = start_shop(tmp_path / "shop", [host_port(plant)])
        yield shop, plant
    finally:
        if shop is not None:
            shop.cleanup()
        plant.cleanup()
    for server in (plant, shop):
        if server is not None:
            assert "Traceback" not in server.output(), server.output()[-3000:]


def test_memory_stays_bounded_under_a_stream_of_large_and_hostile_requests(
        servers: tuple[ServerProcess, ServerProcess]) -> None:
    shop, plant = servers
    started = time.monotonic()
    streams = {"shop": Stream(shop, requests_for(SHOP_NS), "alice"),
               "plant": Stream(plant, requests_for(PLANT_NS), "shop")}
    samples: dict[str, list[int]] = {"shop": [], "plant": []}
    with streams["shop"], streams["plant"]:
        while time.monotonic() < started + SECONDS:
            for name, server in (("shop", shop), ("plant", plant)):
                samples[name].append(rss(server))
            time.sleep(1.0)
    warm_samples = int(WARM_UP)
    for name, stream in streams.items():
        series = samples[name]
        growth = max(series[warm_samples:]) - max(series[:warm_samples])
        print(f"{name}: RSS {series[0] / 2**20:.0f} MiB at start, {series[warm_samples - 1] / 2**20:.0f} MiB after "
              f"{WARM_UP:.0f} s, at most {max(series) / 2**20:.0f} MiB in {SECONDS:.0f} s; answers {stream.answers}")
        assert stream.failures == [], stream.failures[:5]
        assert sum(stream.answers.values()) > 50 and stream.answers.get(200, 0) > 0
        assert growth < MAX_GROWTH, f"{name}'s RSS grew by {growth / 2**20:.0f} MiB after the warm-up: {series}"
        assert max(series) < MAX_RSS, f"{name}'s RSS reached {max(series) / 2**20:.0f} MiB: {series}"
