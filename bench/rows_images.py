"""Benchmark rows of images that grow with use (issue 14, parts 1 and 2: publish, resume).

14. ``publish``: "publish pays off": a DAG of the tiny image plus 3 script
    actions of about 1 s each, created from the base image, against the same
    create once a VM made from it was published (0 actions left), through a
    real shop and a real qemu plant, medians; and "publish time": publishing
    a running VM holding 64 MiB of changes (random bytes, which no copy can
    skip), from the request to the answer.
18. ``transfer``: "images move between plants": a shop whose only plant (p2)
    lacks a public image that its peer p1 published; the first create needs
    the image fetched from p1 (over mutual TLS, checked, stored), the second
    clones it at clone speed: both through the shop, against the same create
    through another shop whose only plant is p1 (which held the image from
    the start).

17. ``resume``: a create through the shop from an image published with its
    running state (it resumes, then its identity is reset through its
    agent), against a create of the same image published without its state
    (a bare boot until the agent answers), both with no action left,
    medians; 17b: the same for the Debian 12 image ``debian12`` (a boot
    there also waits for cloud-init's end), fewer rounds (a boot takes a
    minute or more under TCG).

The plant has a warehouse of its own (its index lists the real tiny or
debian12 image's file), so what the row publishes never reaches the shared
warehouse.
"""

from __future__ import annotations

import json
from xml.sax.saxutils import escape

import common
from common import Context, Row, at_most, log, median, sec, spread, timed, x

from vmshop_common.dagxml import DAG_NS

#: The 3 steps of about 1 s each.
STEPS = ("sleep 1; echo one > /srv-one", "sleep 1; echo two > /srv-two", "sleep 1; echo three > /srv-three")
#: 64 MiB of random bytes written to the guest's disk (then synced).
BIG = "dd if=/dev/urandom of=/big bs=1M count=64 2>/dev/null && sync && ls -l /big"


def _dag(*bodies: str, image: str = "tiny") -> str:
    nodes = "".join(f'<script id="s{n}" timeout="120">{escape(body)}</script>'
                    for n, body in enumerate(bodies, start=1))
    ids = ["start"] + [f"s{n}" for n in range(1, len(bodies) + 1)]
    edges = "".join(f'<edge from="{a}" to="{b}"/>' for a, b in zip(ids, ids[1:], strict=False))
    return f'<vm xmlns="{DAG_NS}"><nodes><image id="start" name="{image}"/>{nodes}</nodes><edges>{edges}</edges></vm>'


def row_publish(ctx: Context) -> list[Row]:
    directory = ctx.directory("publish")
    warehouse = directory / "warehouse"
    warehouse.mkdir()
    (warehouse / "index.txt").write_text(f"{(common.WAREHOUSE / 'tiny' / 'image.xml').resolve()}\n")
    log("publish: starting a qemu plant (its own warehouse) and a shop")
    plant = common.launch_plant(ctx, directory / "plant", network="none", capacity_vms=3, warehouse=warehouse)
    shop = common.launch_shop(ctx, directory / "shop", [common.servers.host_port(plant)])
    request = _dag(*STEPS)

    def create(expect_image: str, expect_runs: int) -> float:
        seconds, made = timed(lambda: shop.service.createVM(dag=request, owner="bench"))
        try:
            if made.vm.image != expect_image or len(made.runs or []) != expect_runs:
                raise RuntimeError(f"created from {made.vm.image} with {len(made.runs or [])} actions run; "
                                   f"expected {expect_image} with {expect_runs}")
        finally:
            shop.service.collectVM(vm=made.vm.epr)
        return seconds

    common.settle()
    log("publish: warm-up create (kernel and image in the page cache)")
    create("tiny", 3)
    source = shop.service.createVM(dag=request, owner="bench").vm
    publish_seconds, image = timed(lambda: shop.service.publishVM(vm=source.epr, image="bench-app"))
    shop.service.collectVM(vm=source.epr)
    # The same, published with its running state by another owner (bob): bob's creates resume from it.
    bob = shop.service_as("bob")
    saved_source = bob.createVM(dag=request).vm
    saved_seconds, _ = timed(lambda: bob.publishVM(vm=saved_source.epr, image="bench-app-saved", with_state=True))
    bob.collectVM(vm=saved_source.epr)

    def create_saved() -> float:
        seconds, made = timed(lambda: bob.createVM(dag=request))
        try:
            if made.vm.image != "bench-app-saved" or len(made.runs or []) != 0:
                raise RuntimeError(f"bob's create used {made.vm.image} with {len(made.runs or [])} actions run")
        finally:
            bob.collectVM(vm=made.vm.epr)
        return seconds

    create_saved()  # warm-up: its state in the page cache, the resume measured once
    from_base, from_image, from_saved = [], [], []
    for i in range(ctx.n(3, 1)):
        order = [("base", from_base), ("image", from_image), ("saved", from_saved)]
        for name, into in order if i % 2 == 0 else order[::-1]:
            common.settle()
            log(f"publish: round {i + 1}: create from the {name}")
            if name == "base":
                # The published image serves this owner; another owner's request is made from the base.
                seconds, made = timed(lambda: shop.service_as("alice").createVM(dag=request))
                try:
                    if made.vm.image != "tiny" or len(made.runs or []) != 3:
                        raise RuntimeError(f"alice's create used {made.vm.image}")
                finally:
                    shop.service_as("alice").collectVM(vm=made.vm.epr)
                into.append(seconds)
            elif name == "saved":
                into.append(create_saved())
            else:
                into.append(create("bench-app", 0))
    log("publish: a VM with 64 MiB of changes")
    big = shop.service.createVM(dag=_dag(BIG), owner="bench").vm
    big_seconds, big_image = timed(lambda: shop.service.publishVM(vm=big.epr, image="bench-big"))
    shop.service.collectVM(vm=big.epr)
    for name in ("bench-app", "bench-big"):
        shop.service.unpublishImage(image=name)
    bob.unpublishImage(image="bench-app-saved")
    base, published, saved = median(from_base), median(from_image), median(from_saved)
    return [
        Row("16a", "Publish pays off: create through the shop of tiny + 3 script actions of ~1 s each, from the base "
                   "image (another owner's request) vs from the image published from such a VM (0 actions left), "
                   "medians",
            f"from the base: {sec(base)}; from the published image: {sec(published)}", x(published / base),
            "<= 0.5x", at_most(published / base, 0.5, x),
            [f"from the base {spread(from_base, sec)}; from the image {spread(from_image, sec)}; the published "
             f"image held {image.size / 2**20:.1f} MiB of changes (publish took {sec(publish_seconds)})"]),
        Row("16c", "The same, published with its running state (publishVM with_state, by another owner): create "
                   "through the shop from the base vs resumed from that image (0 actions left; restore and identity "
                   "reset), medians",
            f"from the base: {sec(base)}; resumed from the image: {sec(saved)}", x(saved / base),
            "<= 0.5x", at_most(saved / base, 0.5, x),
            [f"resumed {spread(from_saved, sec)}; publishing with the state took {sec(saved_seconds)}"]),
        Row("16b", "Publish time: publishVM through the shop of a running VM holding 64 MiB of changes (random "
                   "bytes): freeze, pause, qemu-img convert -B, resume, thaw, index",
            f"{sec(big_seconds)} for {big_image.size / 2**20:.1f} MiB", "-", "(state it)", "info",
            ["the guest is paused only for the copy; its file systems are frozen from before the pause to after "
             "the resume"]),
    ]


def _image_only(image: str) -> str:
    return f'<vm xmlns="{DAG_NS}"><nodes><image id="start" name="{image}"/></nodes><edges/></vm>'


def _resume(ctx: Context, base: str, rounds: int, warm_boot: bool,
            hold: int) -> tuple[list[float], list[float], float]:
    """Row 17's measure for image ``base``: the create times from the image published without its state (a boot)
    and with it (a resume), ``rounds`` of each in alternating order, and the seconds the publish with state took.
    ``warm_boot``: one create of each is made first, unmeasured (else only the resume's: a Debian boot is long, and
    the kernel and disks it reads were just read by the saved guest's own boot). ``hold``: the seconds the saved
    guest's first step takes (see below)."""
    directory = ctx.directory(f"resume-{base}")
    warehouse = directory / "warehouse"
    warehouse.mkdir()
    config = (common.WAREHOUSE / base / "image.xml").resolve()
    if not config.is_file():
        raise RuntimeError(f"no image {base} in {common.WAREHOUSE} (scripts/setup_host.sh builds it)")
    (warehouse / "index.txt").write_text(f"{config}\n")
    log(f"resume ({base}): starting a qemu plant (its own warehouse, owners' segments) and a shop")
    plant = common.launch_plant(ctx, directory / "plant", network="vde", capacity_vms=3, warehouse=warehouse)
    shop = common.launch_shop(ctx, directory / "shop", [common.servers.host_port(plant)])
    common.settle()
    log(f"resume ({base}): a VM published twice: its disk alone, then (one empty step later) with its running state")
    # The first step takes ``hold`` seconds (once): the plant measures it, so that a request for the disk-only
    # image is never served from the base with that step to run instead (the published image's measured boot may
    # exceed the base's by the noise of a loaded machine: for debian12, tens of seconds).
    source = shop.service.createVM(dag=_dag(f"sleep {hold}; echo ready > /srv-ready && sync", image=base),
                                   owner="bench").vm
    shop.service.publishVM(vm=source.epr, image="bench-disk")
    # One more (empty) step, so that a request for either image matches that image alone.
    shop.service.configureVM(vm=source.epr, dag=_dag("true", image=base))
    common.servers.wait_for(lambda: shop.service.describeVM(vm=source.epr).state == "running", 30,
                            "the VM running again")
    save_seconds, saved = timed(lambda: shop.service.publishVM(vm=source.epr, image="bench-saved", with_state=True))
    shop.service.collectVM(vm=source.epr)
    if not saved.with_state:
        raise RuntimeError("the image was published without its state")

    def create(image: str) -> float:
        seconds, made = timed(lambda: shop.service.createVM(dag=_image_only(image), owner="bench"))
        try:
            if made.vm.image != image:
                raise RuntimeError(f"created from {made.vm.image}, not {image}")
        finally:
            shop.service.collectVM(vm=made.vm.epr)
        return seconds

    log(f"resume ({base}): warm-up creates (kernel, image and state in the page cache)")
    if warm_boot:
        create("bench-disk")
    create("bench-saved")
    booted: list[float] = []
    resumed: list[float] = []
    for i in range(rounds):
        order = [("bench-disk", booted), ("bench-saved", resumed)]
        for image, into in order if i % 2 == 0 else order[::-1]:
            common.settle()
            log(f"resume ({base}): round {i + 1}: create from {image}")
            into.append(create(image))
    for name in ("bench-saved", "bench-disk"):
        shop.service.unpublishImage(image=name)
    return booted, resumed, save_seconds


def row_resume(ctx: Context) -> list[Row]:
    rows = []
    for number, base, label, rounds, warm_boot, hold in (
            ("17", "tiny", "the tiny image", ctx.n(5, 2), True, 10),
            ("17b", "debian12", "the Debian 12 image (systemd, cloud-init; systemd-networkd follows the new MACs)",
             ctx.n(3, 1), False, 90)):
        try:
            booted, resumed, save_seconds = _resume(ctx, base, rounds, warm_boot, hold)
        except Exception as exc:  # noqa: BLE001 - the other image's row stands
            log(f"resume ({base}) failed: {type(exc).__name__}: {exc}")
            rows.append(Row(number, f"Resume of {label}", "", "", "", f"ERROR: {type(exc).__name__}: {exc}"[:400]))
            continue
        boot, resume = median(booted), median(resumed)
        rows.append(Row(
            number, f"Resume: create through the shop of {label} from a saved running state (restore, then the "
                    "identity reset: thaw, entropy, clock, MACs, address, host name) vs a bare boot of the same "
                    "image until its agent answers (and cloud-init finished), no actions, medians",
            f"boot: {sec(boot)}; resume: {sec(resume)}", x(resume / boot), "<= 0.3x", at_most(resume / boot, 0.3, x),
            [f"{base}: boot {spread(booted, sec)}; resume {spread(resumed, sec)}; publishing with the state took "
             f"{sec(save_seconds)} ({ctx.accelerator})"]))
    return rows


def row_transfer(ctx: Context) -> list[Row]:
    directory = ctx.directory("transfer")
    tiny = (common.WAREHOUSE / "tiny" / "image.xml").resolve()
    warehouses = {}
    for name in ("p1", "p2"):
        warehouses[name] = directory / f"{name}-warehouse"
        warehouses[name].mkdir()
        (warehouses[name] / "index.txt").write_text(f"{tiny}\n")
    pki = common.servers.test_pki()
    log("transfer: starting p1 (holds the image) and p2 (its peer), qemu")
    p1 = common.launch_plant(ctx, directory / "p1", name="p1", network="none", capacity_vms=3,
                             warehouse=warehouses["p1"], mapfile_extra=[f'"{pki.subject("plant2")}" plant2 plant'])
    steps = [f'<script id="s1" timeout="120" cost="30">{escape(STEPS[0])}</script>']
    base_dag = (f'<vm xmlns="{DAG_NS}"><nodes><image id="start" name="tiny"/>{steps[0]}</nodes>'
                '<edges><edge from="start" to="s1"/></edges></vm>')
    source = p1.service.createVM(dag=base_dag, owner="bench", vm_id=None, max_cost=None)
    image = p1.service.publishVM(vm_id=source.vm.vm_id, image="bench-shared", owner="bench", is_public=True)
    p1.service.collectVM(vm_id=source.vm.vm_id)
    p2 = common.launch_plant(ctx, directory / "p2", name="p2", network="none", capacity_vms=3,
                             warehouse=warehouses["p2"], identity="plant2", flags=["--peer", p1.url])
    shop = common.launch_shop(ctx, directory / "shop", [common.servers.host_port(p2)])
    holder = common.launch_shop(ctx, directory / "shop-p1", [common.servers.host_port(p1)])
    request = (f'<vm xmlns="{DAG_NS}"><nodes><image id="start" name="tiny"/>{steps[0]}'
               '<script id="s2" timeout="60">echo two</script></nodes>'
               '<edges><edge from="start" to="s1"/><edge from="s1" to="s2"/></edges></vm>')
    for each in (shop, holder):
        common.servers.wait_for(lambda s=each: s.service.estimateCost(dag=request).image == "bench-shared",
                                timeout=120, what="the shops to price their plant's offer with p1's image")

    def create(service: object, **extra: object) -> tuple[float, object]:
        seconds, made = timed(lambda: service.createVM(dag=request, **extra))  # type: ignore[attr-defined]
        return seconds, made

    common.settle()
    log("transfer: warm-up create through a shop of p1 (kernel and image in the page cache)")
    _, warm = create(holder.service, owner="bench")
    holder.service.collectVM(vm=warm.vm.epr)
    common.settle()
    log("transfer: first create through the shop of p2 (p2 fetches the image)")
    first_seconds, first = create(shop.service, owner="bench")
    chosen = next((b for b in first.bids or [] if b.plant == first.plant), None)
    fetch_items = [i for i in (chosen.items or [] if chosen is not None else []) if i.source == "transfer"]
    shop.service.collectVM(vm=first.vm.epr)
    if first.vm.image != "bench-shared":
        raise RuntimeError(f"the first create used {first.vm.image}, not bench-shared")
    held, fetched = [], []
    for i in range(ctx.n(3, 1)):
        order = [("the plant that held it", holder, held), ("the plant that fetched it", shop, fetched)]
        for name, where, into in order if i % 2 == 0 else order[::-1]:
            common.settle()
            log(f"transfer: round {i + 1}: create on {name}")
            seconds, made = create(where.service, owner="bench")
            where.service.collectVM(vm=made.vm.epr)
            if made.vm.image != "bench-shared":
                raise RuntimeError(f"a create on {name} used {made.vm.image}, not bench-shared")
            into.append(seconds)
    local_seconds, second_seconds = median(held), median(fetched)
    fetches = p2.output().count("fetched image bench-shared from")
    if fetches != 1:
        raise RuntimeError(f"p2 fetched the image {fetches} times")
    moved = json.loads((warehouses["p2"] / "fetched" / "p2" / "bench-shared" / "manifest.json").read_text())
    size = sum(f["size"] for f in moved["files"])
    return [
        Row("18", "Images move between plants: create through the shop on a plant that lacks a public image its "
                  "peer published (tiny + 1 step, 1 step left): the first create fetches it over mutual TLS; later "
                  "creates clone it, against the same create through a shop of the plant that held it",
            f"first (fetch + clone + boot + 1 step) {sec(first_seconds)}; then, medians: on the plant that fetched "
            f"it {sec(second_seconds)}, on the plant that held it {sec(local_seconds)}",
            x(second_seconds / local_seconds), "later creates at clone speed (<= 1.25x the holder's)",
            at_most(second_seconds / local_seconds, 1.25, x),
            [f"the fetch moved {size / 2**20:.1f} MiB (disk {image.size / 2**20:.1f} MiB plus kernel, initrd, "
             f"image file); the bid priced it at {sum(i.seconds for i in fetch_items):.2f} s; fetched-plant creates "
             f"{spread(fetched, sec)}, holder creates {spread(held, sec)}; p2 fetched once"]),
    ]


ROWS = {
    "publish": ("16", row_publish),
    "resume": ("17", row_resume),
    "transfer": ("18", row_transfer),
}
