"""The benchmark's rows: each function measures one target of the issue and returns its table rows.

Every function registers the undo of whatever it starts on ``ctx.cleanup``
as soon as it exists; ``run.py`` runs the cleanup after each row, whether
the row finished, failed or was interrupted.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import common
from common import (
    Context,
    RawSoap,
    Row,
    at_least,
    at_most,
    envelope,
    log,
    median,
    ms,
    sec,
    spread,
    timed,
    x,
)

from vmshop_common.dagxml import DAG_NS

#: A DAG from the cached image "tiny" with one small script action.
CREATE_DAG = (f'<vm xmlns="{DAG_NS}" name="bench"><attributes><attribute name="project" value="bench"/></attributes>'
              '<nodes><image id="s" name="tiny"/><script id="run" timeout="60">echo configured $(uname -s)</script>'
              '</nodes><edges><edge from="s" to="run"/></edges></vm>')


def _check_created(made: Any, where: str) -> None:
    vm = made.vm
    runs = list(made.runs or [])
    if vm.state != "running" or not runs or not all(run.ok for run in runs) or "configured" not in runs[-1].output:
        raise RuntimeError(f"{where}: the VM is not configured as asked: state {vm.state}, runs {runs!r}")


# --- 1. clones ------------------------------------------------------------------------------------------


def _qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True, timeout=600)


def _sparse_base(path: Path, size_gib: int) -> None:
    """A qcow2 of ``size_gib`` virtual GiB holding 64 MiB of non-zero data at its start, middle and end."""
    _qemu_img("create", "-q", "-f", "qcow2", str(path), f"{size_gib}G")
    size_mib = size_gib * 1024
    commands: list[str] = []
    for index, offset in enumerate((0, size_mib // 3, size_mib // 2, size_mib - 16)):
        commands += ["-c", f"write -P 0x{0x11 * (index + 1):02x} {offset}M 16M"]
    subprocess.run(["qemu-io", "-f", "qcow2", *commands, str(path)], check=True, capture_output=True, timeout=600)


def _full_copy(source: Path, target: Path) -> None:
    """Every byte of the virtual disk written to a raw file, then fsynced (a durable copy).

    Without the fsync the time is mostly the page cache's mood (0.3 s or 2.7 s for the same 1 GiB here).
    """
    _qemu_img("convert", "-S", "0", "-O", "raw", str(source), str(target))
    fd = os.open(target, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def row_clone(ctx: Context) -> list[Row]:
    from vmplant_service.clone import make_overlay

    directory = ctx.directory("clone")
    info = common.tiny_image()
    n = ctx.n(20, 10)
    virtual = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(info.disk)], check=True,
                                        capture_output=True, timeout=60).stdout)["virtual-size"]
    allocated = info.disk.stat().st_size

    def overlay_of(base: Path, fmt: str, name: str) -> float:
        target = directory / name
        seconds = make_overlay(base, fmt, target)
        target.unlink()
        return seconds

    for i in range(2):  # warm-up: qemu-img's binary and libraries in the page cache
        overlay_of(info.disk, info.disk_format, f"warm{i}.qcow2")
    tiny = [overlay_of(info.disk, info.disk_format, f"tiny{i}.qcow2") for i in range(n)]

    log("clone: making sparse 1 GiB and 20 GiB qcow2 bases")
    base1, base20 = directory / "base1g.qcow2", directory / "base20g.qcow2"
    _sparse_base(base1, 1)
    _sparse_base(base20, 20)
    one, twenty = [], []
    for i in range(n):  # alternating, so both see the same machine
        one.append(overlay_of(base1, "qcow2", f"o1-{i}.qcow2"))
        twenty.append(overlay_of(base20, "qcow2", f"o20-{i}.qcow2"))

    copies, tiny_copies = [], []
    for i in range(ctx.n(3, 1)):
        log(f"clone: full copies {i + 1}")
        for source, out, name in ((base1, copies, "full1g.raw"), (info.disk, tiny_copies, "fulltiny.raw")):
            target = directory / name
            os.sync()  # each copy starts with no dirty pages of earlier writes to flush
            seconds, _ = timed(lambda s=source, t=target: _full_copy(s, t))
            out.append(seconds)
            target.unlink()
    common.remove_tree(directory)

    t, o, w, c, tc = median(tiny), median(one), median(twenty), median(copies), median(tiny_copies)
    full = "full copy = `qemu-img convert -S 0 -O raw` (every byte of the virtual disk written) + fsync"
    return [
        Row("1a", f"Clone from a cached image: `make_overlay` of tiny (a {allocated / 2**20:.0f} MiB qcow2 "
                  f"of {virtual / 2**20:.0f} MiB virtual), median", f"{ms(t)} ({spread(tiny, ms)})",
            f"{t / tc:.3f}x of a full copy of it ({sec(tc)})", "<= 50 ms", at_most(t, 0.050, ms),
            [f"tiny {full}: {sec(tc)} median ({spread(tiny_copies, sec)})"]),
        Row("1b", "Clone of a 20 GiB image / clone of a 1 GiB image (sparse qcow2 bases, 64 MiB of data each; "
                  "alternating, medians)", f"20 GiB: {ms(w)}; 1 GiB: {ms(o)}", x(w / o), "<= 1.5x",
            at_most(w / o, 1.5, x), [f"1 GiB: {spread(one, ms)}; 20 GiB: {spread(twenty, ms)}"]),
        Row("1c", "Full copy of the 1 GiB image (reference: what a clone was in the original)",
            f"{sec(c)} ({spread(copies, sec)})", f"{c / o:.0f}x the overlay clone of it", "(reference)", "info",
            [f"1 GiB {full}"]),
    ]


# --- 2. one create vs one bare boot -----------------------------------------------------------------------


def row_create(ctx: Context) -> list[Row]:
    directory = ctx.directory("create")
    switch = common.start_switch(ctx, directory / "sw")
    log("create: starting a qemu plant and a shop")
    plant = common.launch_plant(ctx, directory / "plant", network="vde", capacity_vms=4, pool_count=8)
    shop = common.launch_shop(ctx, directory / "shop", [common.servers.host_port(plant)])
    numbers = iter(range(1, 10_000))
    bare_dir = directory / "bare"

    def bare() -> tuple[float, float]:
        guest = common.prepare_bare(bare_dir, f"b{next(numbers)}", switch, ctx.accelerator)
        ctx.cleanup.push(f"bare guest {guest.spec.vm_id}", lambda: common.kill_bare(guest))
        try:
            common.launch_bare(guest)
            common.wait_bare([guest], timeout=300)
            assert guest.ready is not None
            return guest.ready - guest.launched, guest.clone_seconds
        finally:
            common.kill_bare(guest)
            common.remove_tree(bare_dir / guest.spec.vm_id)

    def via_shop() -> float:
        seconds, made = timed(lambda: shop.service.createVM(dag=CREATE_DAG, owner="bench"))
        try:
            _check_created(made, "shop createVM")
        finally:
            shop.service.collectVM(vm=made.vm.epr)
        return seconds

    def via_plant() -> float:
        seconds, made = timed(lambda: plant.service.createVM(dag=CREATE_DAG, owner="bench"))
        try:
            _check_created(made, "plant createVM")
        finally:
            plant.service.collectVM(vm_id=made.vm.vm_id)
        return seconds

    common.settle()
    log("create: warm-up boot (kernel and image in the page cache)")
    bare()
    bares, clones, shops, plants = [], [], [], []
    kinds = [("bare", bare), ("shop", via_shop), ("plant", via_plant)]
    for i in range(ctx.n(3, 1)):
        order = kinds if i % 2 == 0 else kinds[::-1]  # alternate the order, so each sees similar machine states
        for name, work in order:
            log(f"create: round {i + 1}: {name}")
            if name == "bare":
                boot, clone = bare()  # type: ignore[misc]
                bares.append(boot)
                clones.append(clone)
            elif name == "shop":
                shops.append(work())  # type: ignore[arg-type]
            else:
                plants.append(work())  # type: ignore[arg-type]
    info = plant.service.plantInfo()
    b, s, p = median(bares), median(shops), median(plants)
    left = plant.service.listVMs(include_collected=False) or []
    if left:
        raise RuntimeError(f"VMs left on the plant after collecting: {[v.vm_id for v in left]}")
    return [
        Row("2a", "Create through the shop, request to configured guest (tiny + 1 script action; real shop, real "
                  "qemu plant), vs a bare QEMU boot of the same image until its agent (qemu-ga) answers, medians",
            f"shop create: {sec(s)}; bare boot: {sec(b)}", x(s / b), "<= 1.10x", at_most(s / b, 1.10, x),
            [f"shop create {spread(shops, sec)}; bare boot {spread(bares, sec)}; bare = the qemu backend's "
             "`qemu_command` (overlay, the agent's virtio-serial port, user NIC and VDE NIC, -runas and -sandbox) "
             "started by hand, its clone made before the clock starts, timed from QEMU's launch until qemu-ga "
             "answers guest-sync-delimited (the plant's own readiness probe)"]),
        Row("2b", "Create on the plant directly (createVM on the plant, no shop), median",
            f"plant create: {sec(p)}; clone in it: {ms(info.clone_seconds or 0)}",
            f"{x(p / b)} of the bare boot", "(not a target)", "info",
            [f"plant create {spread(plants, sec)}; bare clones {ms(median(clones))} median; the plant's clone "
             f"figure is its running average (clone_seconds), its boot average {sec(info.boot_seconds or 0)}"]),
    ]


# --- 3. bids from 32 plants vs 1 ---------------------------------------------------------------------------


def row_bids(ctx: Context) -> list[Row]:
    directory = ctx.directory("bids")
    count = 32
    log(f"bids: starting {count} fake-backend plants in parallel")
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=count) as pool:
        futures = [pool.submit(common.launch_plant, ctx, directory / f"p{i}", name=f"p{i}", backend="fake",
                               network="none", client=False) for i in range(count)]
        plants = [future.result() for future in futures]
    start_seconds = time.monotonic() - started
    addresses = [common.servers.host_port(p) for p in plants]
    shop32 = common.launch_shop(ctx, directory / "shop32", addresses, bid_timeout=30)
    shop1 = common.launch_shop(ctx, directory / "shop1", addresses[:1], bid_timeout=30)
    rss = sum(common.rss_mib(p.process.pid) for p in plants if p.process is not None)

    idle = common.settle()
    for shop, expected in ((shop32, count), (shop1, 1)):
        estimate = shop.service.estimateCost(dag=CREATE_DAG)
        statuses = [bid.status for bid in estimate.bids or []]
        if statuses != ["bid"] * expected:
            raise RuntimeError(f"expected {expected} bids, got {statuses}")
    calls = {}
    for shop in (shop32, shop1):
        raw = RawSoap(shop.url)
        body = envelope(shop.service._client, shop.service, "estimateCost", dag=CREATE_DAG)
        calls[shop.url] = (raw, body)
        for _ in range(5):  # warm-up
            raw.post(body, "estimateCost")
    n = ctx.n(20, 8)
    t32, t1 = [], []
    for _ in range(n):  # alternating
        for shop, out in ((shop32, t32), (shop1, t1)):
            raw, body = calls[shop.url]
            out.append(timed(lambda r=raw, b=body: r.post(b, "estimateCost"))[0])
    for raw, _ in calls.values():
        raw.close()
    a, b = median(t32), median(t1)
    return [Row("3", f"estimateCost through the shop with {count} plants vs with 1 (fake backend; real plant "
                     "processes; prebuilt envelope over keep-alive HTTP; medians after warm-up, alternating)",
                f"{count} plants: {ms(a)}; 1 plant: {ms(b)}", x(a / b), "<= 1.5x", at_most(a / b, 1.5, x),
                [f"{count} plants: {spread(t32, ms)}; 1 plant: {spread(t1, ms)}; {count} plants started in "
                 f"{sec(start_seconds)}, {rss:.0f} MiB RSS together; CPU {idle * 100:.0f}% idle before measuring"])]


# --- 4 and 5. registries with many VMs ------------------------------------------------------------------------

STATES = ("running", "collected", "failed", "booting", "configuring")
#: Query texts row 4c takes in turn (more than the shop keeps answers of: vmshop_service.shop.QUERY_CACHE).
QUERY_TEXTS = 300
STATE_WEIGHTS = (60, 25, 5, 5, 5)
IMAGES = ("tiny", "debian12", "ubuntu24", "centos9", "alpine3", "fedora40", "rocky9", "arch", "suse15", "gentoo")
MEMORY = (128, 256, 512, 1024, 2048)


def registry_with(path: Path, count: int) -> float:
    """Fill a Registry at ``path`` with ``count`` varied VMs (one bulk_add); the seconds it took."""
    from vmshop_service.registry import Registry, VMEntry

    rng = random.Random(20240501)
    owners = max(10, count // 100)
    projects = max(10, count // 100)
    now = time.time()
    entries = []
    for i in range(count):
        state = rng.choices(STATES, STATE_WEIGHTS)[0]
        created = now - (count - i) * 3.0
        entries.append(VMEntry(
            vm_id=f"vm-{i:08d}", owner=f"user{i % owners}", state=state,
            plant=f"127.0.0.1:{9100 + rng.randrange(32)}", plant_vm_id=f"vm-{i:08d}", image=rng.choice(IMAGES),
            memory=rng.choice(MEMORY), vcpus=rng.choice((1, 2, 4)), disk=rng.choice((1, 4, 20)), arch="x86_64",
            address=f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}", host_port=None, created=created,
            updated=created, termination=None, collected=created + 60 if state in ("collected", "failed") else None,
            cost=round(rng.uniform(1, 30), 2), steps=["hw", "os", "run"],
            attributes={"project": f"p{rng.randrange(projects)}", "rank": str(i % 1000)}))
    with Registry(path) as registry:
        seconds, _ = timed(lambda: registry.bulk_add(entries))
    return seconds


def row_throughput(ctx: Context) -> list[Row]:
    import soap_harness
    import zeep

    directory = ctx.directory("throughput")
    log("throughput: echo server, a fake plant, a shop with 1,000 VMs")
    echo = soap_harness.start_subprocess_server("bench.echo_server:make_site", timeout=120)
    ctx.cleanup.push("echo server", echo.stop)
    # Plain HTTP (insecure, loopback), as the echo: this row measures the SOAP stack; row 8 what TLS adds.
    plant = common.launch_plant(ctx, directory / "plant", backend="fake", network="none", client=False,
                                insecure=True)
    (directory / "shop").mkdir()
    registry_with(directory / "shop" / "registry.sqlite3", 1000)
    shop = common.launch_shop(ctx, directory / "shop", [common.servers.host_port(plant)], insecure=True)
    query = "owner=user3 rank<50"
    found = shop.service.queryVMs(query=query, limit=None) or []
    if not found:
        raise RuntimeError(f"the query {query!r} found nothing")
    echo_client = zeep.Client(echo.url + "?wsdl")
    targets = {
        "echo": (RawSoap(echo.url), envelope(echo_client, echo_client.service, "echo", text=CREATE_DAG), "echo"),
        "estimate": (RawSoap(shop.url), envelope(shop.service._client, shop.service, "estimateCost", dag=CREATE_DAG),
                     "estimateCost"),
        "query": (RawSoap(shop.url), envelope(shop.service._client, shop.service, "queryVMs", query=query,
                                              limit=None), "queryVMs"),
    }
    # The same query, but never twice the same text in a row of more texts than the shop keeps answers of: each
    # request asks the registry (what a query after a write costs).
    fresh_bodies = [envelope(shop.service._client, shop.service, "queryVMs", query=f"{query} rank<{50 + i}",
                             limit=None) for i in range(QUERY_TEXTS)]
    fresh = itertools.cycle(fresh_bodies)
    targets["query, uncached"] = (RawSoap(shop.url), b"", "queryVMs")
    counts = {name: [0, 0.0] for name in targets}
    seconds = ctx.n(10, 3)
    common.settle()

    def body_of(name: str, body: bytes) -> Callable[[], bytes]:
        return (lambda: next(fresh)) if name == "query, uncached" else (lambda: body)

    for name, (raw, body, action) in targets.items():
        for _ in range(20):  # warm-up
            raw.post(body_of(name, body)(), action)
    for round_ in range(ctx.n(2, 1)):
        for name, (raw, body, action) in targets.items():
            log(f"throughput: round {round_ + 1}: {name} for {seconds} s")
            make = body_of(name, body)
            calls, elapsed = common.rate(lambda r=raw, m=make, a=action: r.post(m(), a), seconds)
            counts[name][0] += calls
            counts[name][1] += elapsed
    for raw, _, _ in targets.values():
        raw.close()
    rates = {name: calls / elapsed for name, (calls, elapsed) in counts.items()}
    q = rates["query, uncached"]
    e = rates["echo"]
    method = ("sequential, one client: prebuilt envelopes (built by zeep) POSTed over one keep-alive HTTP "
              f"connection, {seconds} s x {ctx.n(2, 1)} round(s) each, alternating; echo = a trivial Spyne "
              "service on `build_site` + Twisted in its own process, echoing the same DAG text; plain HTTP "
              "everywhere (shop and plant insecure on loopback), TLS is row 8's")
    return [
        Row("4a", "estimateCost throughput through the shop (1 fake plant) vs a bare Spyne echo",
            f"estimate: {rates['estimate']:.0f} req/s; echo: {e:.0f} req/s", f"{rates['estimate'] / e * 100:.0f}%",
            ">= 60%", at_least(rates["estimate"] / e * 100, 60, lambda v: f"{v:.0f} points"), [method]),
        Row("4b", f"queryVMs throughput (`{query}`, {len(found)} of 1,000 VMs) vs the same echo",
            f"query: {rates['query']:.0f} req/s; echo: {e:.0f} req/s", f"{rates['query'] / e * 100:.0f}%",
            ">= 60%", at_least(rates["query"] / e * 100, 60, lambda v: f"{v:.0f} points"),
            ["4b: the shop keeps a query's answer while its registry (SQLite: the shop is its only writer) has "
             "no write since; 4c: the same query asked with a new text each time"]),
        Row("4c", f"queryVMs throughput, every request asking the registry (the same query in {QUERY_TEXTS} texts in "
                  "turn, more than the shop keeps answers of: what a query after a write costs) vs the same echo",
            f"query: {q:.0f} req/s; echo: {e:.0f} req/s", f"{q / e * 100:.0f}%", "(no target)", "info", []),
    ]


def row_query(ctx: Context) -> list[Row]:
    from vmshop_service.registry import Registry

    directory = ctx.directory("query")
    (directory / "shop").mkdir()
    database = directory / "shop" / "registry.sqlite3"
    count = 100_000
    log(f"query: registering {count:,} VMs")
    fill = registry_with(database, count)
    queries = ["owner=user42 state=running", "project=p17 memory>=512"]
    n = ctx.n(50, 20)
    server: dict[str, list[float]] = {q: [] for q in queries}
    gets: list[float] = []
    found: dict[str, int] = {}
    plans: dict[str, str] = {}
    with Registry(database) as registry:
        for q in queries:
            found[q] = len(registry.query(q))  # warm-up
            sql, params = registry.query_sql(q)
            plans[q] = "; ".join(registry.explain(sql, params))
        registry.get("vm-00050000")
        for i in range(n):  # alternating
            for q in queries:
                server[q].append(timed(lambda q=q: registry.query(q))[0])
            gets.append(timed(lambda i=i: registry.get(f"vm-{(i * 7919) % count:08d}"))[0])
    log("query: a shop on that registry")
    shop = common.launch_shop(ctx, directory / "shop", [])
    common.settle()
    trips: dict[str, list[float]] = {q: [] for q in queries}
    raw = RawSoap(shop.url)
    bodies = {q: envelope(shop.service._client, shop.service, "queryVMs", query=q, limit=None) for q in queries}
    try:
        for q in queries:
            answered = shop.service.queryVMs(query=q, limit=None) or []
            if len(answered) != found[q]:
                raise RuntimeError(f"the shop found {len(answered)} VMs for {q!r}, the registry {found[q]}")
            for _ in range(3):
                raw.post(bodies[q], "queryVMs")
        for _ in range(ctx.n(20, 10)):
            for q in queries:
                trips[q].append(timed(lambda q=q: raw.post(bodies[q], "queryVMs"))[0])
    finally:
        raw.close()
    worst = max(median(v) for v in server.values())
    g = median(gets)
    figures = "; ".join(f"`{q}` ({found[q]} VMs): {ms(median(server[q]))}" for q in queries)
    trip_figures = "; ".join(f"`{q}`: {ms(median(trips[q]))}" for q in queries)
    worst_trip = max(median(trips[q]) / median(server[q]) for q in queries)
    return [
        Row("5a", f"Selective query over {count:,} registered VMs at the server (`Registry.query` itself), "
                  f"median of {n}", figures, f"{worst / g:.0f}x a get by id ({ms(g)})", "<= 20 ms",
            at_most(worst, 0.020, ms),
            [f"bulk_add of {count:,} VMs: {sec(fill)}; " + "; ".join(
                f"`{q}`: {spread(server[q], ms)}, plan: {plans[q]}" for q in queries)]),
        Row("5b", "The same queries, round trip through a shop process on that registry (prebuilt envelope, "
                  "keep-alive HTTP, answer not parsed), median", trip_figures,
            f"up to {worst_trip:.1f}x the at-server time", "(not a target)", "info",
            ["; ".join(f"`{q}`: {spread(trips[q], ms)}" for q in queries)]),
    ]


# --- 6. 16 creates at once vs 16 bare boots at once ----------------------------------------------------------


def row_concurrent(ctx: Context) -> list[Row]:
    import zeep

    count = 16
    directory = ctx.directory("concurrent")
    switch = common.start_switch(ctx, directory / "sw")
    common.settle()
    log(f"concurrent: {count} bare boots at once")
    guests = [common.prepare_bare(directory / "bare", f"c{i}", switch, ctx.accelerator) for i in range(count)]
    for guest in guests:
        ctx.cleanup.push(f"bare guest {guest.spec.vm_id}", lambda g=guest: common.kill_bare(g))
    try:
        start = time.monotonic()
        for guest in guests:
            common.launch_bare(guest)
        common.wait_bare(guests, timeout=900)
        bare_all = max(g.ready for g in guests if g.ready is not None) - start
        bare_first = min(g.ready for g in guests if g.ready is not None) - start
    finally:
        for guest in guests:
            common.kill_bare(guest)
        common.remove_tree(directory / "bare")
    load_after_bare = open("/proc/loadavg").read().split()[0]

    log(f"concurrent: a plant, {count} createVM at once")
    plant = common.launch_plant(ctx, directory / "plant", network="vde", capacity_vms=count,
                                capacity_memory=count * 128, pool_count=count, client=False)
    clients = []
    for _ in range(count):
        client = zeep.Client(str(common.servers.PLANT_WSDL),
                             transport=zeep.Transport(timeout=900, operation_timeout=900))
        clients.append(client.create_service(common.servers.PLANT_BINDING, plant.url))
    common.settle()
    barrier = threading.Barrier(count + 1)
    made: list[Any] = [None] * count
    ends: list[float] = [0.0] * count

    def create(index: int) -> None:
        barrier.wait(60)
        result = clients[index].createVM(dag=CREATE_DAG, owner=f"bench{index}")
        ends[index] = time.monotonic()
        made[index] = result

    def collect(index: int) -> None:
        if made[index] is not None:
            clients[index].collectVM(vm_id=made[index].vm.vm_id)

    pool = ThreadPoolExecutor(max_workers=count)
    try:
        futures = [pool.submit(create, i) for i in range(count)]
        barrier.wait(60)
        start = time.monotonic()
        errors = []
        for future in futures:
            try:
                future.result()
            except Exception as exc:  # noqa: BLE001 - collect what was made, then report
                errors.append(exc)
        plant_all = max(ends) - start if not errors else 0.0
        plant_first = min(e for e in ends if e) - start if not errors else 0.0
        for index in range(count):
            if made[index] is not None:
                _check_created(made[index], f"createVM {index}")
    finally:
        log("concurrent: collecting")
        for future in [pool.submit(collect, i) for i in range(count)]:
            try:
                future.result()
            except Exception as exc:  # noqa: BLE001
                log(f"collect failed: {exc!r}")
        pool.shutdown(wait=False, cancel_futures=True)
    if errors:
        raise RuntimeError(f"{len(errors)} of {count} creates failed: {errors[0]!r}")
    return [Row("6", f"{count} createVM at once on one qemu plant (tiny + 1 script action), until all answered, vs "
                     f"{count} bare QEMU boots started together, until every agent is ready (one run each)",
                f"plant: {sec(plant_all)}; bare: {sec(bare_all)}", x(plant_all / bare_all), "<= 1.2x",
                at_most(plant_all / bare_all, 1.2, x),
                [f"first answer after {sec(plant_first)}, first bare agent ready after {sec(bare_first)}; "
                 f"bare clones made before the clock starts; load average after the bare boots {load_after_bare}"])]


# --- 7. the three real backends side by side (issue 6: reported, no target) ----------------------------------

BACKEND_OPTIONS = {
    "qemu": {},
    "libvirt": {"uri": "qemu:///system", "daemon": "spawn", "daemon_timeout": "10"},
    "uml": {},
}


def row_backends(ctx: Context) -> list[Row]:
    configure_dag = CREATE_DAG
    rows = []
    base_boot: float | None = None
    for index, (backend, options) in enumerate(BACKEND_OPTIONS.items()):
        directory = ctx.directory(f"backend-{backend}")
        log(f"backends: {backend}")
        plant = common.servers.start_plant(directory, common.WAREHOUSE, name=backend, backend=backend, network="none",
                                           capacity_vms=2, backend_options=options)
        ctx.cleanup.push(f"plant {backend}", plant.cleanup)
        creates, configures, collects = [], [], []
        service = plant.service
        for _ in range(ctx.n(3, 1)):
            common.settle()
            seconds, made = timed(lambda: service.createVM(dag=CREATE_DAG, owner="bench"))  # noqa: B023
            _check_created(made, f"{backend} createVM")
            creates.append(seconds)
            key = made.vm.vm_id
            seconds, runs = timed(lambda: service.configureVM(vm_id=key, dag=configure_dag))  # noqa: B023
            if not runs or not runs[0].ok:
                raise RuntimeError(f"{backend}: configure failed: {runs}")
            configures.append(seconds)
            seconds, _ = timed(lambda: service.collectVM(vm_id=key))  # noqa: B023
            collects.append(seconds)
        info = plant.service.plantInfo()
        plant.cleanup()
        boot = float(info.boot_seconds or 0)
        base_boot = base_boot or boot
        rows.append(Row(
            f"7{'abc'[index]}", f"Backend `{backend}`: the plant's measured clone and boot (start to agent ready), "
                                f"create (tiny + 1 action), configure (1 action, SOAP round trip), collect; medians",
            f"clone {ms(info.clone_seconds or 0)}; boot {sec(boot)}; create {sec(median(creates))}; "
            f"configure {sec(median(configures))}; collect {sec(median(collects))}",
            f"boot {x(boot / base_boot)} of qemu's", "(side by side; no target)", "info",
            [f"{backend}: create {spread(creates, sec)}; configure {spread(configures, sec)}; "
             f"collect {spread(collects, sec)}; accelerator {info.accelerator}"]))
    return rows


# --- 8. what mutual TLS costs -----------------------------------------------------------------------------


def row_tls(ctx: Context) -> list[Row]:
    """Create through the shop with and without mutual TLS (same run, alternating); estimate throughput with TLS
    on kept-alive connections vs without, against the same plain echo."""
    import soap_harness
    import zeep

    directory = ctx.directory("tls")
    log("tls: a qemu plant and a shop with mutual TLS, the same without (insecure), an echo server")
    pairs: dict[str, tuple[Any, Any]] = {}
    for name, insecure in (("tls", False), ("plain", True)):
        plant = common.launch_plant(ctx, directory / f"{name}-plant", name=f"{name}-plant", network="none",
                                    capacity_vms=2, insecure=insecure)
        shop = common.launch_shop(ctx, directory / f"{name}-shop", [common.servers.host_port(plant)],
                                  insecure=insecure)
        pairs[name] = (plant, shop)

    def create(name: str) -> float:
        _, shop = pairs[name]
        seconds, made = timed(lambda: shop.service.createVM(dag=CREATE_DAG, owner="bench"))
        try:
            _check_created(made, f"{name} shop createVM")
        finally:
            shop.service.collectVM(vm=made.vm.epr)
        return seconds

    common.settle()
    for name in pairs:  # warm-up: connections, page cache, the plants' first measurements
        create(name)
    creates: dict[str, list[float]] = {"tls": [], "plain": []}
    for i in range(ctx.n(7, 2)):
        for name in (("tls", "plain") if i % 2 == 0 else ("plain", "tls")):
            log(f"tls: create round {i + 1}: {name}")
            common.settle(timeout=15)  # a guest boot is CPU-bound: start each one on an idle machine
            creates[name].append(create(name))
    t, p = median(creates["tls"]), median(creates["plain"])
    # Each round's two creates ran back to back: their ratio is the least disturbed by the machine's load.
    paired = median([a / b for a, b in zip(creates["tls"], creates["plain"], strict=True)])

    log("tls: the same on fake plants (no guest boots): what TLS adds to a create, in milliseconds")
    fake_pairs: dict[str, Any] = {}
    for name, insecure in (("tls", False), ("plain", True)):
        plant = common.launch_plant(ctx, directory / f"{name}-fake", name=f"{name}-fake", backend="fake",
                                    network="none", client=False, insecure=insecure, capacity_vms=8)
        fake_pairs[name] = common.launch_shop(ctx, directory / f"{name}-fake-shop",
                                              [common.servers.host_port(plant)], insecure=insecure)

    def fake_create(name: str) -> float:
        shop = fake_pairs[name]
        seconds, made = timed(lambda: shop.service.createVM(dag=CREATE_DAG, owner="bench"))
        shop.service.collectVM(vm=made.vm.epr)
        return seconds

    for name in fake_pairs:
        fake_create(name)
    fakes_timed: dict[str, list[float]] = {"tls": [], "plain": []}
    for i in range(ctx.n(20, 5)):
        for name in (("tls", "plain") if i % 2 == 0 else ("plain", "tls")):
            fakes_timed[name].append(fake_create(name))
    ft, fp = median(fakes_timed["tls"]), median(fakes_timed["plain"])

    log("tls: estimate throughput over kept-alive connections, with and without TLS, and the echo")
    fakes = fake_pairs
    echo = soap_harness.start_subprocess_server("bench.echo_server:make_site", timeout=120)
    ctx.cleanup.push("echo server", echo.stop)
    pki = common.servers.test_pki()
    echo_tls = soap_harness.start_subprocess_server("bench.echo_server:make_site", timeout=120,
                                                    tls=(pki.cert("shop"), pki.key("shop"), pki.ca),
                                                    args={"public_url": "https://127.0.0.1:{port}/"})
    ctx.cleanup.push("echo server (TLS)", echo_tls.stop)
    echo_client = zeep.Client(echo.url + "?wsdl")
    echo_body = envelope(echo_client, echo_client.service, "echo", text=CREATE_DAG)
    targets: dict[str, tuple[RawSoap, bytes, str]] = {"echo": (RawSoap(echo.url), echo_body, "echo"),
                                                      "echo over TLS": (RawSoap(echo_tls.url), echo_body, "echo")}
    for name, shop in fakes.items():
        targets[f"estimate {name}"] = (RawSoap(shop.url), envelope(shop.service._client, shop.service, "estimateCost",
                                                                   dag=CREATE_DAG), "estimateCost")
    counts = {name: [0, 0.0] for name in targets}
    seconds = ctx.n(10, 3)
    common.settle()
    for raw, body, action in targets.values():
        for _ in range(20):  # warm-up (the TLS handshakes happen here, once per connection)
            raw.post(body, action)
    for round_ in range(ctx.n(2, 1)):
        for name, (raw, body, action) in targets.items():
            log(f"tls: round {round_ + 1}: {name} for {seconds} s")
            calls, elapsed = common.rate(lambda r=raw, b=body, a=action: r.post(b, a), seconds)
            counts[name][0] += calls
            counts[name][1] += elapsed
    for raw, _, _ in targets.values():
        raw.close()
    rates = {name: calls / elapsed for name, (calls, elapsed) in counts.items()}
    e, et, ep = rates["echo"], rates["estimate tls"], rates["estimate plain"]
    lost = (ep - et) / e * 100  # estimate throughput TLS takes away, in points of the echo's throughput
    added = (1 / et - 1 / ep) * 1000  # ms TLS adds to each estimate (client-shop and shop-plant legs)
    return [
        Row("8a", "Create through the shop with mutual TLS (client-shop and shop-plant) vs the same without TLS "
                  "(insecure shop and plant), real qemu plants, same run, alternating; median of each round's "
                  "ratio (the two creates of a round run back to back)",
            f"with TLS: {sec(t)}; without: {sec(p)} (medians)", x(paired), "<= 1.05x", at_most(paired, 1.05, x),
            [f"with TLS {spread(creates['tls'], sec)}; without {spread(creates['plain'], sec)}; ratio of the "
             f"medians {x(t / p)}; tiny + 1 script action, network none; the clients keep their TLS connections "
             "alive (zeep's session, the shop's pool to its plant)"]),
        Row("8a'", "The same on fake plants (no guest boot): what mutual TLS adds to a create, medians",
            f"with TLS: {ms(ft)}; without: {ms(fp)}", f"+{ms(ft - fp)} per create", "(not a target)", "info",
            [f"with TLS {spread(fakes_timed['tls'], ms)}; without {spread(fakes_timed['plain'], ms)}"]),
        Row("8b", "estimateCost throughput with mutual TLS on kept-alive connections vs the same without, "
                  "against the same (plain) echo",
            f"estimate with TLS: {et:.0f} req/s; without: {ep:.0f} req/s; echo: {e:.0f} req/s "
            f"(echo over TLS: {rates['echo over TLS']:.0f} req/s)",
            f"TLS costs {lost:.1f} points of the echo's throughput ({added:.2f} ms/request)",
            "< 15 points", "PASS" if lost < 15 else f"MISS ({lost:.1f} points)",
            ["cost = (estimate without TLS - estimate with TLS) / echo, in percentage points; sequential, one "
             f"client, prebuilt envelopes over one kept-alive connection, {seconds} s x {ctx.n(2, 1)} round(s) "
             "each, alternating; fake plants; with TLS, the shop's call to its plant is TLS too"]),
    ]


def row_memory(ctx: Context) -> list[Row]:
    """A shop and a plant under the stream of large and hostile requests of tests/test_bounded_memory.py, for 10
    minutes (1 in quick mode): each server's RSS over time."""
    import test_bounded_memory as stream

    seconds = float(ctx.n(600, 60))
    directory = ctx.directory("memory")
    log(f"memory: a fake plant and a shop, each under a stream of large and hostile requests for {seconds:.0f} s")
    plant = common.launch_plant(ctx, directory / "plant", backend="fake", network="none")
    shop = common.launch_shop(ctx, directory / "shop", [common.servers.host_port(plant)])
    streams = {"shop": stream.Stream(shop, stream.requests_for(stream.SHOP_NS), "alice"),
               "plant": stream.Stream(plant, stream.requests_for(stream.PLANT_NS), "shop")}
    samples: dict[str, list[int]] = {"shop": [], "plant": []}
    started = time.monotonic()
    with streams["shop"], streams["plant"]:
        while time.monotonic() < started + seconds:
            for name, server in (("shop", shop), ("plant", plant)):
                samples[name].append(stream.rss(server))
            time.sleep(1.0)
    rows = []
    for index, name in enumerate(("shop", "plant")):
        series = [value / 2**20 for value in samples[name]]
        answered = sum(streams[name].answers.values())
        half = len(series) // 2
        growth = max(series[half:]) - max(series[:half])
        rows.append(Row(
            f"9{'ab'[index]}", f"{name.capitalize()} RSS under {seconds / 60:.0f} min of large and hostile requests "
            "(8 clients, kept-alive mutual TLS; 7 kinds of request round-robin)",
            f"start {series[0]:.0f} MiB; max {max(series):.0f} MiB; last {series[-1]:.0f} MiB",
            f"second half's max {growth:+.0f} MiB over the first half's", "bounded (flat after warm-up; < 400 MiB)",
            "PASS" if max(series) < 400 and growth < 64 else f"MISS (max {max(series):.0f} MiB, {growth:+.0f} MiB)",
            [f"{name}: {answered} requests answered ({streams[name].answers}), failures "
             f"{len(streams[name].failures)}; RSS each minute (MiB): "
             f"{[round(v) for v in series[::60]]}"]))
    return rows


def row_registry(ctx: Context) -> list[Row]:
    """The registry's share of a create on a registry of 100,000 VMs (10,000 in quick mode): what the shop's create
    does to it, with ANALYZE after the add (what ``Registry.add`` did before) and without (now), alternating."""
    from vmshop_service.registry import Registry, VMEntry

    count = ctx.n(100_000, 10_000)
    creates = ctx.n(100, 20)
    database = ctx.directory("registry") / "registry.sqlite3"
    log(f"registry: {count} VMs, then {creates} creates' registry work each way")
    fill = registry_with(database, count)
    times: dict[bool, list[float]] = {True: [], False: []}
    with Registry(database) as registry:

        def create(key: str, analyze_each: bool) -> None:
            # Shop.create: the quota check and the 'placing' entry, the quota check and the move to 'creating'
            # on the chosen plant, the plant's answer, the entry read back for the reply.
            registry.usage("alice", key)
            registry.add(VMEntry(vm_id=key, owner="alice", state="placing", memory=128, vcpus=1, image="tiny",
                                 attributes={"project": "bench"}))
            if analyze_each:
                registry.analyze()  # what Registry.add did on every create before
            registry.usage("alice", key)
            registry.update(key, state="creating", plant="127.0.0.1:9100", plant_vm_id=key, cost=2.5, image="tiny")
            registry.update(key, state="running", address="10.9.0.2", memory=128, vcpus=1, disk=1, arch="x86_64",
                            steps=["base", "run"])
            registry.get(key)

        create("warm-up", False)
        for i in range(creates):
            for analyze_each in ((True, False) if i % 2 == 0 else (False, True)):
                key = f"bench-{i}-{'a' if analyze_each else 'n'}"
                times[analyze_each].append(timed(lambda k=key, a=analyze_each: create(k, a))[0])
    before, after = median(times[True]), median(times[False])
    return [Row(
        "10", f"The registry's work in one create (quota checks, add, two updates, read back) on a registry of "
        f"{count:,} VMs: ANALYZE on every add (before) vs only after bulk loads (now); medians, alternating",
        f"before: {ms(before)}; now: {ms(after)}", f"{x(after / before)} of before",
        "now < before (no target of its own)", "PASS" if after < before else "MISS",
        [f"before: {spread(times[True], ms)}; now: {spread(times[False], ms)}; bulk_add of {count:,} VMs "
         f"(ANALYZE included): {sec(fill)}; file database, WAL, synchronous=FULL (every change fsynced)"])]


# --- 11. images: tiny and a real distribution side by side ----------------------------------------------------

#: The images compared, in the warehouse; debian12 is built by scripts/build_debian_image.sh.
IMAGES = ("tiny", "debian12")


def _mib(size: float) -> str:
    return f"{size / 2**20:.0f} MiB"


def _image_sizes(config: Path) -> tuple[int, int, int]:
    """Bytes on disk of the image's directory (allocated blocks), of its disk file, and the disk's virtual size."""
    directory = config.parent
    allocated = sum(path.stat().st_blocks * 512 for path in directory.iterdir() if path.is_file())
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(directory / "disk.qcow2")],
                                     check=True, capture_output=True, text=True, timeout=60).stdout)
    return allocated, (directory / "disk.qcow2").stat().st_blocks * 512, int(info["virtual-size"])


def _grub_variant(config: Path, directory: Path) -> Path:
    """The image's file without <boot>, its disk by absolute path: the guest boots through its own GRUB."""
    from lxml import etree

    tree = etree.parse(str(config))
    root = tree.getroot()
    ns = "{urn:vmshop:image:1}"
    disk = root.find(f"{ns}disk")
    boot = root.find(f"{ns}boot")
    assert disk is not None and boot is not None
    disk.set("file", str(config.parent / disk.get("file", "")))
    root.remove(boot)
    variant = directory / "image.xml"
    tree.write(str(variant), xml_declaration=True, encoding="UTF-8")
    return variant


def row_images(ctx: Context) -> list[Row]:
    """Boot to agent-ready (and to cloud-init's end), create, and size on disk: tiny and debian12 side by side."""
    from vmplant_service.checkimage import check_image

    def boots(config: Path, label: str, count: int) -> tuple[list[float], list[float]]:
        agent, ready = [], []
        for index in range(count):
            common.settle()
            report = check_image(config, "qemu", {}, work_dir=ctx.directory(f"check-{label}-{index}"))
            if not report.ok or report.agent_seconds is None:
                raise RuntimeError(f"{label}: check-image failed: {report.problems}")
            agent.append(report.agent_seconds)
            ready.append(report.cloud_init_seconds or report.agent_seconds)
        return agent, ready

    rows = []
    tiny_agent = tiny_create = 0.0
    for index, name in enumerate(IMAGES):
        config = common.WAREHOUSE / name / "image.xml"
        if not config.is_file():
            raise RuntimeError(f"no image {name} in {common.WAREHOUSE} (scripts/setup_host.sh builds it)")
        log(f"images: {name}")
        allocated, disk, virtual = _image_sizes(config)
        agent, ready = boots(config, name, ctx.n(3, 1) if name == "tiny" else ctx.n(2, 1))
        directory = ctx.directory(f"images-{name}")
        plant = common.launch_plant(ctx, directory, name=name, backend="qemu", network="none", capacity_vms=1)
        dag = CREATE_DAG.replace('name="tiny"', f'name="{name}"')
        creates = []
        for _ in range(ctx.n(2, 1)):
            common.settle()
            seconds, made = timed(lambda: plant.service.createVM(dag=dag, owner="bench"))  # noqa: B023
            _check_created(made, f"{name} createVM")
            creates.append(seconds)
            plant.service.collectVM(vm_id=made.vm.vm_id)
        plant.cleanup()
        if name == "tiny":
            tiny_agent, tiny_create = median(agent), median(creates)
        cloud = f"; cloud-init done {sec(median(ready))}" if ready != agent else ""
        rows.append(Row(
            f"11{'ab'[index]}", f"Image `{name}` (qemu backend, direct kernel boot): boot to agent ready "
                                f"(`vmplant check-image`), create on the plant (image + 1 script action, "
                                f"cloud-init's end included), size on disk; medians",
            f"agent ready {sec(median(agent))}{cloud}; create {sec(median(creates))}; on disk {_mib(allocated)} "
            f"(disk {_mib(disk)} of {_mib(virtual)} virtual)",
            f"agent {x(median(agent) / tiny_agent)}, create {x(median(creates) / tiny_create)} of tiny's",
            "(side by side; no target)", "info",
            [f"{name}: agent ready {spread(agent, sec)}; ready for actions {spread(ready, sec)}; "
             f"create {spread(creates, sec)}; directory {config.parent.name}/ holds "
             + ", ".join(sorted(p.name for p in config.parent.iterdir() if not p.name.startswith(".")))]))
    # The other way to boot debian12: through the GRUB in its disk's MBR gap (what a stock cloud image does).
    log("images: debian12 through its own GRUB")
    variant = _grub_variant(common.WAREHOUSE / "debian12" / "image.xml", ctx.directory("grub"))
    agent, ready = boots(variant, "grub", 1)
    direct = rows[1].figures.split(";")[0]
    rows.append(Row(
        "11c", "Image `debian12` booted through its own boot loader (GRUB from the disk, no <boot> in the image "
               "file) instead of the extracted kernel: boot to agent ready, to cloud-init's end; one run",
        f"agent ready {sec(agent[0])}; cloud-init done {sec(ready[0])}", f"agent {x(agent[0] / tiny_agent)} of tiny's",
        "(compared with 11b's direct boot)", "info",
        [f"direct boot (11b): {direct}; the plant boots debian12 directly (its image file has <boot>)"]))


# --- 14 and 15. one shop, up to 1,000 farm plants: offers mode and live bids --------------------------------


def _estimate_seconds(answer: bytes) -> float:
    """The shop's own bid-round seconds in a raw estimateCost answer (Estimate.seconds)."""
    from lxml import etree

    root = etree.fromstring(answer)
    for element in root.iter("{urn:vmshop:vmshop:1}seconds"):
        parent = element.getparent()
        if parent is not None and etree.QName(parent).localname == "estimateCostResult":
            return float(element.text or "nan")
    raise RuntimeError("no Estimate.seconds in the answer")


def _bid_rounds(ctx: Context, shop: Any, count: int) -> tuple[list[float], list[float]]:
    """(round trips, the shop's own bid-round seconds) of estimateCost, prebuilt envelope over keep-alive HTTP."""
    raw = RawSoap(shop.url, timeout=300)
    body = envelope(shop.service._client, shop.service, "estimateCost", dag=CREATE_DAG)
    for _ in range(3):
        raw.post(body, "estimateCost")
    trips, at_shop = [], []
    for _ in range(count):
        took, answer = timed(lambda: raw.post(body, "estimateCost"))
        trips.append(took)
        at_shop.append(_estimate_seconds(answer))
    raw.close()
    return trips, at_shop


def _wait_offers(shop: Any, count: int, timeout: float = 600.0) -> float:
    """Wait until the shop prices ``count`` plants from their offers; the seconds it took."""
    started = time.monotonic()
    while True:
        estimate = shop.service.estimateCost(dag=CREATE_DAG)
        # The answer lists the best 16 offer-priced bids and counts the others (omitted).
        offered = sum(1 for bid in estimate.bids or [] if bid.source == "offer" and bid.status == "bid")
        offered += estimate.omitted or 0
        if offered == count and all(bid.source == "offer" for bid in estimate.bids or []):
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"the shop prices only {offered} of {count} plants from offers")
        time.sleep(1.0)


def row_farm(ctx: Context) -> list[Row]:
    """One shop over 1, 32, 256 and 1,000 farm plants (8 farm processes of 125): bid rounds in offers mode
    and in live mode, 100 creates at 1,000 plants, the shop's memory with 1,000 offers, the farm's RSS."""
    sizes = [1, 32, 256, 1000] if not ctx.quick else [1, 32, 256]
    live_sizes = [1, 32, 256] if not ctx.quick else [1, 32]
    total = max(sizes)
    directory = ctx.directory("farm")
    log(f"farm: starting {total} fake-backend plants, 125 per process")
    farm = common.launch_farm(ctx, directory / "plants", total)
    plant_rss = farm.rss_mib()
    log(f"farm: {total} plants listening after {sec(farm.started_seconds)}; {plant_rss:.0f} MiB RSS")
    n = ctx.n(60, 20)
    results: dict[tuple[str, int], tuple[list[float], list[float]]] = {}
    notes: list[str] = []
    create_row = memory_row = None
    load_before = os.getloadavg()
    for mode, counts in (("offers", sizes), ("live", live_sizes)):
        for count in counts:
            shop_dir = directory / f"shop-{mode}-{count}"
            shop_dir.mkdir()
            # The state poll asks every plant for its VMs: at 1,000 plants every 5 s that is the shop's whole
            # CPU; notices (pushed with the offers) carry the changes, so the poll is slow here.
            shop = common.launch_shop(ctx, shop_dir, farm.addresses[:count], insecure=True, poll_interval=600.0,
                                      bid_timeout=60.0, flags=["--bids", mode])
            if mode == "offers":
                farm.shops_file.write_text(f"{common.servers.host_port(shop)}\n")
                waited = _wait_offers(shop, count)
                log(f"farm: shop over {count} plants has their offers after {sec(waited)}")
            common.settle(timeout=20)
            results[(mode, count)] = _bid_rounds(ctx, shop, n if count < 1000 or mode == "offers" else n // 2)
            trips, at_shop = results[(mode, count)]
            log(f"farm: {mode} N={count}: round trip p50 {ms(median(trips))}, at the shop p50 {ms(median(at_shop))}")
            if mode == "offers" and count == total:
                rss = common.rss_mib(shop.process.pid) if shop.process is not None else 0.0
                creates = ctx.n(100, 20)
                placement, made = [], []
                for _ in range(creates):
                    result = shop.service.createVM(dag=CREATE_DAG, owner="bench")
                    _check_created(result, "the farm")
                    placement.append(float(result.placement_seconds))
                    made.append(result)
                plants_used = len({result.plant for result in made})
                rss_after = common.rss_mib(shop.process.pid) if shop.process is not None else 0.0
                create_row = Row("14c", f"Create placement at the shop: {creates} creates at N={count} farm plants "
                                 "(offers mode; from the request to asking the plant, per create), median and p95",
                                 f"p50 {ms(median(placement))}; p95 {ms(common.percentile(placement, 0.95))}",
                                 f"{plants_used} plants used", "<= 20 ms", at_most(median(placement), 0.020, ms),
                                 [f"14c: placement {spread(placement, ms)}"])
                memory_row = Row("14e", f"Shop memory with {count} plants' offers (offers mode; one catalog shared)",
                                 f"shop RSS {rss:.0f} MiB with the offers; {rss_after:.0f} MiB after {creates} "
                                 "creates", "-", "(state it)", "info", [])
                for result in made:
                    shop.service.collectVM(vm=result.vm.epr)
                farm.shops_file.write_text("# the shops of this run\n")
            shop.cleanup()
    rows = []
    base_trips, base_shop = results[("offers", 1)]
    figures = "; ".join(f"N={c}: p50 {ms(median(results[('offers', c)][1]))}, p95 "
                        f"{ms(common.percentile(results[('offers', c)][1], 0.95))}" for c in sizes)
    trip_figures = "; ".join(f"N={c}: p50 {ms(median(results[('offers', c)][0]))}, p95 "
                             f"{ms(common.percentile(results[('offers', c)][0], 0.95))}" for c in sizes)
    top = results[("offers", total)]
    ratio = median(top[0]) / median(base_trips)
    rows.append(Row("14a", "Bid round in offers mode at the shop (Estimate.seconds: pricing every offer), "
                    f"N = {', '.join(map(str, sizes))} farm plants", figures,
                    f"N={total}/N=1: {x(median(top[1]) / median(base_shop))}", "(see 14b)", "info", []))
    rows.append(Row("14b", "estimateCost round trip in offers mode (prebuilt envelope, keep-alive HTTP; the answer "
                    f"lists the best 16 bids and counts the rest), N = {', '.join(map(str, sizes))}", trip_figures,
                    f"N={total}/N=1: {x(ratio)}", f"N={total} p50 <= 50 ms; N={total}/N=1 <= 2",
                    "PASS" if median(top[0]) <= 0.050 and ratio <= 2 else
                    f"MISS (p50 {ms(median(top[0]))}, {x(ratio)})", []))
    if create_row is not None:
        rows.append(create_row)
    live_figures = "; ".join(f"N={c}: round trip p50 {ms(median(results[('live', c)][0]))}, p95 "
                             f"{ms(common.percentile(results[('live', c)][0], 0.95))}; at the shop p50 "
                             f"{ms(median(results[('live', c)][1]))}" for c in live_sizes)
    top_live = max(live_sizes)
    rows.append(Row("15", f"The same in live mode (a call for bids to every plant), N = "
                    f"{', '.join(map(str, live_sizes))}", live_figures,
                    f"N={top_live}/N=1: {x(median(results[('live', top_live)][0]) / median(results[('live', 1)][0]))}",
                    "(for comparison; no target)", "info", []))
    if memory_row is not None:
        rows.append(memory_row)
    rows.append(Row("14f", f"Plant farm: {total} real plant services (fake backend), 125 per process, each on its "
                    "own 127.x.y.z address, port and records", f"{plant_rss:.0f} MiB RSS in all; "
                    f"{plant_rss / total:.2f} MiB per plant", f"started in {sec(farm.started_seconds)}",
                    "(state it)", "info",
                    [f"14: load average before the shops {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}; "
                     f"{n} rounds per size after 3 warm-up; shop state poll 600 s; plain HTTP on loopback"]
                    + notes))
    return rows


ROWS = {
    "clone": ("1", row_clone),
    "create": ("2", row_create),
    "bids": ("3", row_bids),
    "throughput": ("4", row_throughput),
    "query": ("5", row_query),
    "concurrent": ("6", row_concurrent),
    "backends": ("7", row_backends),
    "tls": ("8", row_tls),
    "memory": ("9", row_memory),
    "registry": ("10", row_registry),
    "images": ("11", row_images),
    "farm": ("14", row_farm),
}
