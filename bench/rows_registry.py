"""Benchmark rows of the registry on SQLite and PostgreSQL (issue 13, part 4).

10. ``registry``: a selective query over 100,000 and 1,000,000 registered VMs,
    at the server (``Registry.query`` itself), on SQLite and on PostgreSQL.
11. ``shops``: 2 and 4 shops on one PostgreSQL registry under a mixed
    create/query/collect load (fake plants): aggregate throughput, and a check
    that no VM was lost or doubled.

PostgreSQL is a private cluster of this run (tests/pgcluster.py: Debian's
``postgresql``, ``initdb``/``pg_ctl`` in a temporary directory, fsync on, as
in production), stopped by its own PID at the end of the row.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import common
from common import Context, Row, at_most, log, median, ms, sec, spread, timed

from vmshop_common.dagxml import DAG_NS

STATES = ("running", "collected", "failed", "booting", "configuring")
STATE_WEIGHTS = (60, 25, 5, 5, 5)
IMAGES = ("tiny", "debian12", "ubuntu24", "centos9", "alpine3", "fedora40", "rocky9", "arch", "suse15", "gentoo")
MEMORY = (128, 256, 512, 1024, 2048)
QUERIES = ("owner=user42 state=running", "project=p17 memory>=512")


def _entries(count: int, chunk: int) -> Iterator[list[Any]]:
    """``count`` varied VMs (row 5's distribution: owners and projects of ~100 VMs each), ``chunk`` at a time."""
    from vmshop_service.registry import VMEntry

    rng = random.Random(20240501)
    owners = max(10, count // 100)
    projects = max(10, count // 100)
    now = time.time()
    batch: list[Any] = []
    for i in range(count):
        state = rng.choices(STATES, STATE_WEIGHTS)[0]
        created = now - (count - i) * 3.0
        batch.append(VMEntry(
            vm_id=f"vm-{i:08d}", owner=f"user{i % owners}", state=state,
            plant=f"127.0.0.1:{9100 + rng.randrange(32)}", plant_vm_id=f"vm-{i:08d}", image=rng.choice(IMAGES),
            memory=rng.choice(MEMORY), vcpus=rng.choice((1, 2, 4)), disk=rng.choice((1, 4, 20)), arch="x86_64",
            address=f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}", host_port=None, created=created,
            updated=created, termination=None, collected=created + 60 if state in ("collected", "failed") else None,
            cost=round(rng.uniform(1, 30), 2), steps=["hw", "os", "run"],
            attributes={"project": f"p{rng.randrange(projects)}", "rank": str(i % 1000)}))
        if len(batch) == chunk:
            yield batch
            batch = []
    if batch:
        yield batch


def _fill(registry: Any, count: int) -> float:
    """Register ``count`` VMs in transactions of 100,000, then gather planner statistics; the seconds."""
    started = time.monotonic()
    for batch in _entries(count, 100_000):
        registry._insert(batch)
    registry.analyze()
    return time.monotonic() - started


def _cluster(ctx: Context) -> Any:
    from pgcluster import PgCluster

    cluster = PgCluster(fsync=True)
    ctx.cleanup.push("PostgreSQL cluster", cluster.cleanup)
    return cluster


def row_registry(ctx: Context) -> list[Row]:
    from vmshop_service.registry import PostgresRegistry, Registry

    directory = ctx.directory("registry")
    cluster = _cluster(ctx)
    counts = (20_000, 100_000) if ctx.quick else (100_000, 1_000_000)
    n = ctx.n(50, 20)
    rows: list[Row] = []
    for count in counts:
        for kind in ("SQLite", "PostgreSQL"):
            log(f"registry: {count:,} VMs on {kind}")
            if kind == "SQLite":
                registry: Registry = Registry(directory / f"registry-{count}.sqlite3")
            else:
                registry = PostgresRegistry(cluster.conninfo(cluster.new_database(f"bench{count}")))
            try:
                fill = _fill(registry, count)
                server: dict[str, list[float]] = {q: [] for q in QUERIES}
                found = {q: len(registry.query(q)) for q in QUERIES}  # warm-up
                gets: list[float] = []
                for i in range(n):  # alternating
                    for q in QUERIES:
                        server[q].append(timed(lambda q=q, r=registry: r.query(q))[0])
                    gets.append(timed(lambda i=i, r=registry, c=count: r.get(f"vm-{(i * 7919) % c:08d}"))[0])
            finally:
                registry.close()
            worst = max(median(v) for v in server.values())
            rows.append(Row(
                f"12{'abcd'[len(rows)]}", f"Selective query over {count:,} VMs at the server, {kind} "
                f"(`Registry.query` itself), median of {n}",
                "; ".join(f"`{q}` ({found[q]} VMs): {ms(median(server[q]))}" for q in QUERIES),
                f"{worst / median(gets):.0f}x a get by id ({ms(median(gets))})", "<= 20 ms",
                at_most(worst, 0.020, ms),
                [f"load of {count:,} VMs (transactions of 100,000, then ANALYZE): {sec(fill)}; "
                 + "; ".join(f"`{q}`: {spread(server[q], ms)}" for q in QUERIES)]))
    rows[0].notes.append(f"PostgreSQL {cluster.bin.parent.name} private cluster (fsync on, unix socket, "
                         "shared_buffers 128 MB); SQLite in WAL mode with synchronous=FULL; the same VMs on both")
    return rows


def _dag(index: int) -> str:
    return (f'<vm xmlns="{DAG_NS}" name="mixed"><attributes><attribute name="worker" value="w{index}"/>'
            '</attributes><nodes><image id="s" name="tiny"/><script id="run" timeout="60">echo hi</script>'
            '</nodes><edges><edge from="s" to="run"/></edges></vm>')


def row_shops(ctx: Context) -> list[Row]:
    import servers

    directory = ctx.directory("shops")
    cluster = _cluster(ctx)
    plants = []
    for name in ("a", "b"):
        plant = servers.start_plant(directory / f"plant-{name}", common.WAREHOUSE, name=name, backend="fake",
                                    network="none", capacity_vms=2000, capacity_memory=2000 * 128,
                                    flags=["--max-creates", "64"], backend_options={"boot_seconds": "0.05"})
        ctx.cleanup.push(f"plant {name}", plant.cleanup)
        plants.append(plant)
    addresses = [servers.host_port(p) for p in plants]
    seconds = ctx.n(30, 10)
    clients = 8
    rows: list[Row] = []
    for count in (2, 4):
        database = cluster.new_database(f"shops{count}")
        conninfo = cluster.conninfo(database)
        shops = []
        for index in range(count):
            log(f"shops: starting shop {index + 1} of {count}")
            shop = common.launch_shop(ctx, directory / f"run{count}-shop{index}", addresses, postgresql=conninfo,
                                      flags=["--name", f"shop{index}"])
            shops.append(shop)
        common.settle()
        figures, note = _mixed_load(shops, plants, clients, seconds, count)
        rows.append(Row(f"13{'ab'[len(rows)]}", f"{count} shops on one PostgreSQL registry, mixed create/query/"
                        f"collect from {clients} clients for {seconds} s (2 fake plants)", figures[0], figures[1],
                        "report; no lost or doubled VM", figures[2], [note]))
        for shop in shops:
            shop.cleanup()
    return rows


def _mixed_load(shops: list[Any], plants: list[Any], clients: int, seconds: float,
                count: int) -> tuple[tuple[str, str, str], str]:
    """Each client loops: create through one shop, query its VMs through the next, collect the VM it made
    through the one after (each step goes to the next shop in turn). Returns (figures, ratio, verdict), a note."""
    lock = threading.Lock()
    done = {"create": 0, "query": 0, "collect": 0}
    latencies: dict[str, list[float]] = {name: [] for name in done}
    failures: list[str] = []
    made: list[str] = []
    deadline = time.monotonic() + seconds

    def client(index: int) -> None:
        services = [shop.service_as("admin", 120) for shop in shops]
        previous = None
        turn = index
        while time.monotonic() < deadline:
            for name in ("create", "query", "collect"):
                service = services[turn % count]
                turn += 1
                started = time.monotonic()
                try:
                    if name == "create":
                        answer = service.createVM(dag=_dag(index), owner=f"bench{index}")
                        key = answer.vm.vm_id
                        with lock:
                            made.append(key)
                    elif name == "query":
                        service.queryVMs(query=f"owner=bench{index} state=running", limit=None)
                    elif previous is not None:
                        service.collectVM(vm=previous)
                        previous = None
                    else:
                        continue
                except Exception as exc:  # noqa: BLE001 - counted and reported
                    with lock:
                        failures.append(f"{name}: {str(exc)[:120]}")
                    continue
                with lock:
                    done[name] += 1
                    latencies[name].append(time.monotonic() - started)
                if name == "create":
                    previous = answer.vm.epr
        if previous is not None:
            try:
                services[0].collectVM(vm=previous)
            except Exception as exc:  # noqa: BLE001
                with lock:
                    failures.append(f"final collect: {str(exc)[:120]}")

    started = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    elapsed = time.monotonic() - started
    total = sum(done.values())
    # Nothing lost, nothing doubled: every answered create is one registry entry, collected, made on one plant,
    # and no plant holds a live VM afterwards; nothing is left placing or creating.
    checker = shops[-1].service_as("admin", 300)
    registry = {vm.vm_id: vm for vm in checker.queryVMs(query="", limit=None) or []}
    problems = []
    lost = [key for key in made if key not in registry]
    if lost:
        problems.append(f"{len(lost)} answered creates missing from the registry")
    unfinished = [key for key, vm in registry.items() if vm.state in ("placing", "creating")]
    if unfinished:
        problems.append(f"{len(unfinished)} entries left placing/creating")
    holders: dict[str, int] = {}
    live = 0
    for plant in plants:
        for vm in plant.service_as("admin", 300).listVMs(include_collected=True) or []:
            if vm.made:
                holders[vm.vm_id] = holders.get(vm.vm_id, 0) + 1
            if vm.state in ("booting", "configuring", "running", "collecting"):
                live += 1
    doubled = [key for key in made if holders.get(key, 0) != 1]
    if doubled:
        problems.append(f"{len(doubled)} answered creates made on {{0, 2+}} plants")
    if live:
        problems.append(f"{live} VMs still live on the plants after every collect")
    if len(set(made)) != len(made):
        problems.append("a key answered twice")
    verdict = "PASS: none lost or doubled" if not problems and not failures else \
        f"MISS: {'; '.join(problems) or ''} {len(failures)} failed requests"
    figures = (f"{total / elapsed:.0f} ops/s aggregate ({done['create']} creates, {done['query']} queries, "
               f"{done['collect']} collects in {elapsed:.0f} s)",
               f"{done['create'] / elapsed:.1f} creates/s", verdict)
    note = (f"{count} shops: median latency create {ms(median(latencies['create']) if latencies['create'] else 0)}, "
            f"query {ms(median(latencies['query']) if latencies['query'] else 0)}, collect "
            f"{ms(median(latencies['collect']) if latencies['collect'] else 0)}; {len(made)} VMs made, all "
            f"collected; failed requests: {len(failures)} {failures[:3]}; mutual TLS; shops, plants, PostgreSQL "
            "and the clients share the 2 cores")
    return figures, note


ROWS = {
    "queries": ("12", row_registry),
    "shops": ("13", row_shops),
}
