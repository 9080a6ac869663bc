"""Offers: a shop prices requests from the plants' offers with the plants' own code; the plant confirms.

Unit tests use a real plant object on the fake backend; the integration tests real plant and shop
servers over mutual TLS (fake backend).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import zeep.exceptions
from plant_fixtures import IMAGE, blank, chain, image_start, make_plant, mount, network, script, shutdown_plant
from servers import ServerProcess, fault_code, host_port, start_plant, start_shop, wait_for

from vmshop_common import offers as offers_module
from vmshop_common.cost import Bid, Decline
from vmshop_common.dagxml import DAG_NS, load_dag
from vmshop_common.errors import OfferInvalidError
from vmshop_common.offers import CatalogCache, Pricing, offer_from_wire
from vmshop_common.soap.offer_wire import offer_fields


def _wire(fields: dict[str, Any]) -> Any:
    """Offer fields as attribute objects (what zeep or Spyne hand over)."""
    def wrap(value: Any) -> Any:
        if isinstance(value, dict):
            return SimpleNamespace(**{k: wrap(v) for k, v in value.items()})
        if isinstance(value, list):
            return [wrap(v) for v in value]
        return value
    return wrap(fields)


@pytest.fixture
def plant(tmp_path: Path) -> Iterator[Any]:
    made, parts = make_plant(tmp_path / "plant")
    try:
        yield made
    finally:
        shutdown_plant(parts)


REQUESTS = [
    chain(script("a", "echo a"), script("b", "echo b", cost=7.5)),
    chain(script("a", "echo a"), network()),
    chain(mount()),
    chain(mount(source="absent")),
    chain(script("a"), start=image_start(name="nosuch")),
    chain(script("a"), start=blank(memory=999999)),
    chain(script("a"), start=blank(arch="aarch64")),
    chain(script("long", timeout=86400)),
]


@pytest.mark.parametrize("request_xml", REQUESTS)
def test_the_shop_prices_an_offer_as_the_plant_bids(plant: Any, request_xml: str) -> None:
    plant.records.set_metric("boot_seconds", 2.5)
    plant.records.add_action_run(vm_id="old", node_id="a", digest=_digest_of(request_xml, "a"), kind="script",
                                 started=0.0, seconds=1.25, status=0, output="", ok=True)
    offer = offer_from_wire(_wire(offer_fields(plant.offer("https://p:1/"))), "https://p:1/", CatalogCache(), 0.0)
    dag = load_dag(request_xml)
    at_shop = Pricing(dag).price(offer)
    at_plant = plant.estimate(request_xml)
    assert type(at_shop) is type(at_plant)
    if isinstance(at_plant, Bid):
        assert isinstance(at_shop, Bid)
        assert (at_shop.cost, at_shop.image, at_shop.remaining, at_shop.items) == \
            (at_plant.cost, at_plant.image, at_plant.remaining, at_plant.items)
    else:
        assert isinstance(at_shop, Decline) and at_shop.reason == at_plant.reason


def _digest_of(request_xml: str, node: str) -> str:
    from vmshop_common.steps import step_digest
    dag = load_dag(request_xml)
    action = dag.nodes.get(node)
    return step_digest(action) if action is not None else "0" * 64  # type: ignore[arg-type]


def test_the_offer_version_grows_only_when_it_changes(plant: Any) -> None:
    first = plant.offer()
    assert plant.offer().version == first.version
    plant.records.set_metric("clone_seconds", 0.5)
    assert plant.offer().version > first.version


def test_identical_catalogs_are_matched_once(plant: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = CatalogCache()
    fields = offer_fields(plant.offer())
    offers = [offer_from_wire(_wire({**fields, "clone_seconds": 0.01 * i}), f"https://p{i}:1/", cache, 0.0)
              for i in range(50)]
    assert len(cache) == 1 and len({id(o.catalog) for o in offers}) == 1
    calls = []
    real = offers_module.match_request
    monkeypatch.setattr(offers_module, "match_request", lambda *a: calls.append(1) or real(*a))
    pricing = Pricing(load_dag(REQUESTS[0]))
    costs = [pricing.price(offer).cost for offer in offers]  # type: ignore[union-attr]
    assert len(calls) == 1 and costs == sorted(costs) and costs[0] < costs[-1]


@pytest.mark.parametrize(("change", "words"), [
    (lambda f: f.update(version=-1), "version"),
    (lambda f: f.update(boot_seconds=float("nan")), "boot seconds"),
    (lambda f: f.update(clone_seconds="x"), "clone seconds"),
    (lambda f: f["images"][0].update(dag="<!DOCTYPE x><vm/>"), "image"),
    (lambda f: f["images"][0].update(dag="x" * (300 * 1024)), "longer"),
    (lambda f: f["images"][0].update(name="../etc"), "image name"),
    (lambda f: f.update(images=f["images"] * 2), "unique"),
    (lambda f: f.update(steps=[{"digest": "zz", "seconds": 1.0}]), "digest"),
    (lambda f: f.update(steps=[{"digest": "0" * 64, "seconds": 1.0}] * 5000), "more than"),
    (lambda f: f.update(datasets=["../x"]), "data set"),
    (lambda f: f.update(capacity_vms=None), "VM capacity"),
])
def test_a_bad_offer_is_refused(plant: Any, change: Any, words: str) -> None:
    fields = offer_fields(plant.offer())
    change(fields)
    with pytest.raises(OfferInvalidError) as info:
        offer_from_wire(_wire(fields), "https://p:1/", CatalogCache(), 0.0)
    assert words in info.value.message


# Real servers -------------------------------------------------------------------------------------------------------
def script_dag(body: str = "true") -> str:
    return (f'<vm xmlns="{DAG_NS}"><nodes><image id="s" name="tiny"/><script id="run">{body}</script></nodes>'
            f'<edges><edge from="s" to="run"/></edges></vm>')


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, warehouse_dir: Path) -> Iterator[dict[str, ServerProcess]]:
    base = tmp_path_factory.mktemp("offers")
    made: dict[str, ServerProcess] = {}
    try:
        made["liar"] = start_plant(base / "liar", warehouse_dir, name="liar", backend="fake", network="none",
                                   metrics={"boot_seconds": 1.0, "clone_seconds": 0.01})
        made["honest"] = start_plant(base / "honest", warehouse_dir, name="honest", backend="fake",
                                     network="none", metrics={"boot_seconds": 3.0, "clone_seconds": 0.01})
        listed = [host_port(made["liar"]), host_port(made["honest"])]
        made["shop"] = start_shop(base / "shop", listed, poll_interval=30,
                                  plant_identities={"plant": listed, "plant2": ["127.0.0.1:1"]})
        yield made
    finally:
        for server in made.values():
            server.cleanup()


def _offered(shop: ServerProcess, count: int) -> Any:
    estimate = shop.service.estimateCost(dag=script_dag())
    return estimate if sum(bid.source == "offer" for bid in estimate.bids) == count else None


def test_estimates_come_from_offers_and_say_how_old(pair: dict[str, ServerProcess]) -> None:
    shop = pair["shop"]
    estimate = wait_for(lambda: _offered(shop, 2), what="both offers")
    assert estimate.mode == "offers" and estimate.plant == pair["liar"].url
    for bid in estimate.bids:
        assert bid.status == "bid" and bid.offer_age is not None and bid.offer_age >= 0 and bid.offer_version
    best = next(bid for bid in estimate.bids if bid.plant == estimate.plant)
    assert best.cost == pair["liar"].service.estimateCost(dag=script_dag()).cost  # what the plant says itself


def test_a_plant_whose_offer_lies_loses_the_create_and_is_marked_down(pair: dict[str, ServerProcess]) -> None:
    shop, liar, honest = pair["shop"], pair["liar"], pair["honest"]
    wait_for(lambda: _offered(shop, 2), what="both offers")
    # The liar's real state changes behind its offer's back (no notice: nothing of its VMs changed).
    with sqlite3.connect(liar.state_dir / "records.sqlite3") as db:
        db.execute("UPDATE plant_metrics SET value = 500 WHERE key = 'boot_seconds'")
    made = shop.service.createVM(dag=script_dag(), owner="alice")
    try:
        assert made.plant == honest.url
        assert "Server.OfferExceeded" in made.attempts[0] and made.attempts[0].startswith(liar.url)
        assert liar.service.listVMs(include_collected=True) in (None, [])
        estimate = shop.service.estimateCost(dag=script_dag())
        marked = {bid.plant: bool(bid.marked_down) for bid in estimate.bids}
        assert marked == {liar.url: True, honest.url: False}
    finally:
        shop.service.collectVM(vm=made.vm.epr)


def test_offers_from_another_identity_or_invalid_are_refused(pair: dict[str, ServerProcess]) -> None:
    shop, liar = pair["shop"], pair["liar"]
    fields = offer_fields(_plant_offer(liar))
    with pytest.raises(zeep.exceptions.Fault) as info:
        # plant2 is a plant, but not the one at the liar's address.
        shop.service_as("plant2").plantChanged(plant=liar.url, offer=fields)
    assert fault_code(info) == "Client.NotAuthorized"
    bad = {**fields, "boot_seconds": -1.0}
    with pytest.raises(zeep.exceptions.Fault) as info:
        shop.service_as("plant").plantChanged(plant=liar.url, offer=bad)
    assert fault_code(info) == "Client.OfferInvalid"
    assert "offer from plant" in (shop.directory / "shop.log").read_text()


def _plant_offer(plant: ServerProcess) -> Any:
    data = plant.service.getOffer()
    return offer_from_wire(data, plant.url, CatalogCache(), 0.0)


def test_missing_offers_never_stop_placement(tmp_path: Path, warehouse_dir: Path) -> None:
    """A plant that was down when the shop pulled offers (and tells it nothing) has no offer: it is asked live."""
    plant = start_plant(tmp_path / "p", warehouse_dir, name="p", backend="fake", network="none")
    plant.stop()
    shop = start_shop(tmp_path / "shop", [host_port(plant)], flags=["--offer-refresh", "3600"])
    try:
        wait_for(lambda: shop.service.listPlants()[0].last_error, what="the shop to find the plant down")
        plant.start()  # on the port it had
        made = shop.service.createVM(dag=script_dag(), owner="bob")
        assert made.plant == plant.url and made.vm.state == "running"
        assert [bid.source for bid in made.bids] == ["live"]
        assert made.placement_seconds is not None and made.placement_seconds < 5
        shop.service.collectVM(vm=made.vm.epr)
    finally:
        shop.cleanup()
        plant.cleanup()


def test_a_plant_that_stops_answering_loses_the_create_within_the_bid_timeout(tmp_path: Path,
                                                                            warehouse_dir: Path) -> None:
    import signal
    import time
    hung = start_plant(tmp_path / "hung", warehouse_dir, name="hung", backend="fake", network="none",
                       metrics={"boot_seconds": 1.0, "clone_seconds": 0.02})
    alive = start_plant(tmp_path / "alive", warehouse_dir, name="alive", backend="fake", network="none",
                        metrics={"boot_seconds": 9.0, "clone_seconds": 0.02})
    shop = start_shop(tmp_path / "shop", [host_port(hung), host_port(alive)], bid_timeout=2.0, poll_interval=60)
    try:
        wait_for(lambda: _offered(shop, 2), what="both offers")
        assert hung.process is not None
        hung.process.send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            made = shop.service.createVM(dag=script_dag(), owner="bob")
            took = time.monotonic() - started
            assert made.plant == alive.url and made.vm.state == "running"
            assert made.attempts[0].startswith(hung.url) and "did not answer a check within 2 s" in made.attempts[0]
            assert took < 2.0 + 10.0, took
        finally:
            hung.process.send_signal(signal.SIGCONT)
        # Awake again, the plant may have begun the create it was asked for: it is cancelled (or collected as
        # unwanted by the state poll); nothing of it stays running.
        wait_for(lambda: all(vm.state in ("collected", "failed")
                             for vm in hung.service.listVMs(include_collected=True) or []),
                 what="the hung plant's copy to be cancelled")
        shop.service.collectVM(vm=made.vm.epr)
    finally:
        for server in (shop, hung, alive):
            server.cleanup()


def test_the_shop_configuration_carries_the_bidding_mode(tmp_path: Path) -> None:
    from vmshop_service.config import ShopConfig, load_config, write_config
    config = ShopConfig(database=tmp_path / "r.sqlite3", plants_file=tmp_path / "p.txt", bids="live",
                        offer_margin=0.5, offer_refresh=30.0, offer_penalty=10.0)
    config = replace(config, security=replace(config.security, insecure=True))
    assert load_config(write_config(config, tmp_path / "c.xml")) == config


def test_the_shop_prices_once_per_class_of_alike_offers_and_ranks_every_plant(
        plant: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from vmshop_service.offers import OfferBook
    now = [1000.0]
    book = OfferBook(None, lambda: now[0], penalty=60.0)  # type: ignore[arg-type]
    fields = offer_fields(plant.offer())
    for i in range(300):  # three kinds of plant, 100 of each (boot 1, 2, 3 s)
        book.take(f"https://p{i:03d}:1/", _wire({**fields, "boot_seconds": 1.0 + i % 3, "version": 1}))
    calls = []
    real = offers_module.price
    monkeypatch.setattr(offers_module, "price", lambda *a, **k: calls.append(1) or real(*a, **k))
    handles = [SimpleNamespace(url=f"https://p{i:03d}:1/") for i in range(301)]  # the last one has no offer
    book.mark_down("https://p000:1/", "test")
    book.inflight["https://p003:1/"] = 1
    priced = book.price(load_dag(REQUESTS[0]), handles)  # type: ignore[arg-type]
    assert len(calls) == 4  # three classes, and the plant with a create in flight on its own
    assert [h.url for h in priced.unpriced] == ["https://p300:1/"]
    ranked = list(priced.ranked())
    assert len(ranked) == 300 and priced.bidders == 300
    assert [b.plant for b in ranked[:3]] == ["https://p006:1/", "https://p009:1/", "https://p012:1/"]
    assert ranked[-1].plant == "https://p000:1/" and ranked[-1].marked_down  # marked down: last
    costs = [b.cost for b in ranked[:-1]]
    assert costs == sorted(costs) and "https://p003:1/" in [b.plant for b in ranked]
    now[0] += 61  # the mark wears off
    assert next(book.price(load_dag(REQUESTS[0]), handles).ranked()).plant == "https://p000:1/"  # type: ignore[arg-type]
    # A newer offer moves a plant to another class; an older one is ignored.
    book.take("https://p006:1/", _wire({**fields, "boot_seconds": 0.5, "version": 2}))
    book.take("https://p006:1/", _wire({**fields, "boot_seconds": 9.0, "version": 1}))
    assert next(book.price(load_dag(REQUESTS[0]), handles).ranked()).plant == "https://p006:1/"  # type: ignore[arg-type]


def test_concurrent_creates_on_one_plant_are_priced_with_each_other_in_flight(tmp_path: Path,
                                                                            warehouse_dir: Path) -> None:
    """Creates priced while others are in flight to the same plant count them as its load; in whatever order
    they reach the plant (not always the order priced in), none is declined for exceeding its offer."""
    from concurrent.futures import ThreadPoolExecutor
    plant = start_plant(tmp_path / "p", warehouse_dir, name="p", backend="fake", network="none", capacity_vms=8,
                        backend_options={"boot_seconds": "0.5"}, metrics={"boot_seconds": 20.0})
    shop = start_shop(tmp_path / "shop", [host_port(plant)])
    try:
        wait_for(lambda: _offered(shop, 1), what="the offer")
        services = [shop.service_as("admin") for _ in range(4)]
        with ThreadPoolExecutor(4) as pool:
            made = list(pool.map(lambda s: s.createVM(dag=script_dag("echo together"), owner="bob"), services))
        assert all(m.vm.state == "running" for m in made)
        assert not [a for m in made for a in m.attempts if "OfferExceeded" in a]
        for m in made:
            shop.service.collectVM(vm=m.vm.epr)
    finally:
        shop.cleanup()
        plant.cleanup()


def test_a_shops_own_creates_in_progress_are_not_held_against_its_offer_in_whatever_order_they_arrive(
        plant: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A shop prices its first create with nothing in flight and its second with the first counted; the two can
    reach the plant in the other order (the shop's registry writes and calls overlap), and the first then finds
    the second in progress there. That load is the shop's own, counted by the shop: the first is not declined
    for it. Another shop's create in progress is load the shop could not know of: that still declines."""
    from concurrent.futures import ThreadPoolExecutor
    from threading import Event

    from vmshop_common.errors import OfferExceededError
    plant.records.set_metric("boot_seconds", 20.0)  # a create in progress adds 10 s of load, over the margin
    request_xml = chain(script("a", "echo a"))
    offer = offer_from_wire(_wire(offer_fields(plant.offer("https://p:1/"))), "https://p:1/", CatalogCache(), 0.0)
    priced = Pricing(load_dag(request_xml)).price(offer)  # the first create, nothing in flight
    assert isinstance(priced, Bid)
    max_cost = round(priced.cost * 1.25 + 1e-6, 6)  # what the shop accepts with its default margin
    in_progress, release = Event(), Event()
    real_start = plant.backend.start

    def start(spec: Any) -> None:
        if spec.vm_id == "second":  # held in progress (reserved) until the test lets it go on
            in_progress.set()
            release.wait(60)
        real_start(spec)

    monkeypatch.setattr(plant.backend, "start", start)
    with ThreadPoolExecutor(1) as pool:
        second = pool.submit(plant.create, request_xml, owner="bob", vm_id="second", shop="shop-a")
        try:
            assert in_progress.wait(60)
            live = plant.estimate(request_xml)
            assert isinstance(live, Bid) and live.cost > max_cost  # the second's load alone is over the margin
            with pytest.raises(OfferExceededError):
                plant.create(request_xml, owner="carol", vm_id="other", shop="shop-b", max_cost=max_cost)
            made = plant.create(request_xml, owner="bob", vm_id="first", shop="shop-a", max_cost=max_cost)
            assert made.record.state == "running"
            assert made.bid.cost == live.cost  # the bid it answers still counts the load it was made under
        finally:
            release.set()
        assert second.result(60).record.state == "running"
    assert plant.offer().creating == 0 and {vm.vm_id for vm in plant.records.live_vms()} == {"first", "second"}


def test_a_plant_pushes_its_new_offer_with_its_notice(tmp_path: Path, warehouse_dir: Path) -> None:
    from vmplant_service.plant import free_port
    port = free_port()
    plant = start_plant(tmp_path / "p", warehouse_dir, name="p", backend="fake", network="none",
                        shops=[f"127.0.0.1:{port}"])
    shop = start_shop(tmp_path / "shop", [host_port(plant)], port=port, poll_interval=3600,
                      flags=["--offer-refresh", "3600"])
    try:
        first = wait_for(lambda: _offered(shop, 1), what="the offer").bids[0].offer_version
        # A VM made on the plant directly (not by this shop) changes its load: the plant tells the shop, offer and all.
        plant.service.createVM(dag=script_dag("echo pushed"), owner="admin", vm_id="direct")

        def newer() -> Any:
            bid = shop.service.estimateCost(dag=script_dag()).bids[0]
            return bid if bid.offer_version > first else None

        bid = wait_for(newer, what="the pushed offer")
        assert bid.source == "offer" and bid.offer_age < 30
        plant.service.collectVM(vm_id="direct")
    finally:
        shop.cleanup()
        plant.cleanup()


def test_an_offer_carries_each_images_own_boot_and_which_images_the_backend_cannot_run(plant: Any,
                                                                                      monkeypatch: Any) -> None:
    """Issue 12's per-image boot seconds and <guest> fitness (a UML plant declines images that boot their own
    kernel, or need a seed disk) reach the shop through the offer: it prices as the plant bids."""
    plant.records.set_metric("boot_seconds", 2.5)
    plant.records.set_metric(f"boot_seconds:{IMAGE}", 40.0)
    offer = offer_from_wire(_wire(offer_fields(plant.offer("https://p:1/"))), "https://p:1/", CatalogCache(), 0.0)
    assert dict(offer.image_boot_seconds) == {IMAGE: 40.0}
    request_xml = chain(script("a", "echo a"))
    at_shop, at_plant = Pricing(load_dag(request_xml)).price(offer), plant.estimate(request_xml)
    assert isinstance(at_shop, Bid) and isinstance(at_plant, Bid)
    assert ("boot", 40.0) in {(item.label, item.seconds) for item in at_shop.items}
    assert (at_shop.cost, at_shop.items) == (at_plant.cost, at_plant.items)

    caps = plant.backend.capabilities()
    monkeypatch.setattr(plant.backend, "capabilities",
                        lambda: replace(caps, kernel_limit="this backend boots only its own kernel", seed_disk=False))
    guest = plant.warehouse.get(IMAGE).guest
    offer = offer_from_wire(_wire(offer_fields(plant.offer("https://p:1/"))), "https://p:1/", CatalogCache(), 0.0)
    assert offer.terms.kernel_limit == "this backend boots only its own kernel" and not offer.terms.seed_disk
    assert offer.guests.get(IMAGE, type(guest)()) == guest
    at_shop, at_plant = Pricing(load_dag(request_xml)).price(offer), plant.estimate(request_xml)
    assert type(at_shop) is type(at_plant)
    if guest.kernel == "own":
        assert isinstance(at_shop, Decline) and isinstance(at_plant, Decline)
        assert at_shop.reason == at_plant.reason and "boots only its own kernel" in at_shop.reason
    else:
        assert isinstance(at_shop, Bid) and isinstance(at_plant, Bid) and at_shop.cost == at_plant.cost


def test_an_offers_guest_traits_are_checked() -> None:
    fields = offer_fields(SimpleNamespace(
        plant="p", version=1, issued=0.0, catalog=SimpleNamespace(images=()), steps={}, clone_seconds=0.1,
        boot_seconds=1.0, live=0, creating=0, free_memory=0, datasets=frozenset(), image_boot_seconds={},
        guests={}, terms=offers_module.Terms(backend="fake", max_disk=1, capacity_memory=1, capacity_vms=1,
                                             max_creates=1, max_action_seconds=1, max_dag_seconds=1)))
    image = {"name": "x", "dag": DAG_IMAGE, "memory": 64, "vcpus": 1, "disk": 1, "arch": "x86_64",
             "boot_seconds": 3.0, "kernel": "any"}
    taken = offer_from_wire(_wire({**fields, "images": [image]}), "p", CatalogCache(), 0.0)
    assert taken.image_boot_seconds == {"x": 3.0} and taken.guests["x"].kernel == "any"
    for bad in ({"kernel": "/etc/passwd"}, {"contextualization": "x" * 40}, {"boot_seconds": -1.0},
                {"data_share": "nfs"}):
        with pytest.raises(OfferInvalidError):
            offer_from_wire(_wire({**fields, "images": [{**image, **bad}]}), "p", CatalogCache(), 0.0)


DAG_IMAGE = (f'<vm xmlns="{DAG_NS}"><nodes><blank id="hw" memory="64" vcpus="1" disk="1" arch="x86_64"/>'
             '<script id="os">#vmshop-os: x</script></nodes><edges><edge from="hw" to="os"/></edges></vm>')


def test_an_offer_names_private_images_owners_and_is_priced_for_the_requests_owner(plant: Any) -> None:
    """A published private image is in the offer with its owner; the shop prices each owner's request against
    the public images and that owner's own (what the plant bids for that owner), never naming another's."""
    plant.create(chain(script("a", "echo a"), script("b", "echo b")), owner="alice", vm_id="v1")
    plant.publish("v1", "alices-app", owner="alice")
    plant.create(chain(script("a", "echo a"), script("b", "echo b"), script("c", "echo c")), owner="alice",
                 vm_id="v2")
    plant.publish("v2", "alices-app-plus", owner="alice")
    # What the choice below depends on, set: every image boots alike, every step takes 1 s (measured boots and
    # steps of the fake backend vary with the machine's load, and so would the cheapest image).
    for name in (IMAGE, "alices-app", "alices-app-plus"):
        plant.records.set_metric(f"boot_seconds:{name}", 1.0)
    for node in "abcd":
        xml = chain(script(node, f"echo {node}"))
        plant.records.add_action_run(vm_id="old", node_id=node, digest=_digest_of(xml, node), kind="script",
                                     started=0.0, seconds=1.0, status=0, output="", ok=True)
    offer = offer_from_wire(_wire(offer_fields(plant.offer("https://p:1/"))), "https://p:1/", CatalogCache(), 0.0)
    assert offer.catalog.owners == {"alices-app": "alice", "alices-app-plus": "alice"}
    assert {i.name for i in offer.catalog.for_owner("bob").images} == {IMAGE}
    assert offer.catalog.for_owner("").images == offer.catalog.for_owner("bob").images
    requests = [chain(script("a", "echo a"), script("b", "echo b"), script("c", "echo c"), script("d", "echo d")),
                chain(script("x"), start=image_start(name="alices-app")),
                chain(script("x"), start=image_start(name="alices-app-plus"))]
    for request_xml in requests:
        for owner in ("alice", "bob", ""):
            at_shop = Pricing(load_dag(request_xml), owner=owner).price(offer)
            at_plant = plant.estimate(request_xml, owner=owner)
            assert type(at_shop) is type(at_plant), (owner, at_shop, at_plant)
            if isinstance(at_plant, Bid):
                assert (at_shop.cost, at_shop.image, at_shop.remaining) == \
                    (at_plant.cost, at_plant.image, at_plant.remaining)
            else:
                assert isinstance(at_shop, Decline) and at_shop.reason == at_plant.reason
            if owner != "alice" and request_xml is requests[0]:  # (a request that names it gets its name back)
                assert "alices-app" not in repr(at_shop)
    assert Pricing(load_dag(requests[0]), owner="alice").price(offer).image == "alices-app-plus"  # type: ignore[union-attr]
    # One matching per owner's view; the same view for every offer with that catalog.
    cache = CatalogCache()
    fields = offer_fields(plant.offer())
    twins = [offer_from_wire(_wire(fields), f"https://p{i}:1/", cache, 0.0) for i in range(3)]
    assert twins[0].catalog.for_owner("alice") is twins[2].catalog.for_owner("alice")


def test_an_image_a_peer_holds_is_priced_with_its_transfer_by_plant_and_shop_alike(plant: Any) -> None:
    """The plant bids with an image it must fetch (its transfer seconds in the breakdown and in its offer); a shop
    pricing the offer from the wire gets the very same bid."""
    from vmplant_service.transfer import RemoteImage
    from vmshop_common.guest import GuestTraits

    local = plant.warehouse.get(IMAGE)
    remote = RemoteImage(peer="https://peer:1/", name="fetchable", parent=IMAGE, size=10 * 2**20,
                         dag=load_dag(chain(script("a", "echo a"), start=image_start())), hardware=local.hardware,
                         guest=GuestTraits())
    plant._fetchable = lambda images, owner: {"fetchable": (remote, 3.5)}
    plant._catalogs.clear()
    request = chain(script("a", "echo a"), script("b", "echo b"))
    at_plant = plant.estimate(request)
    assert isinstance(at_plant, Bid) and at_plant.image == "fetchable" and at_plant.remaining == ("b",)
    assert [(i.label, i.seconds, i.source) for i in at_plant.items if i.source == "transfer"] == \
        [("fetch fetchable", 3.5, "transfer")]
    fields = offer_fields(plant.offer("https://p:1/"))
    assert {i["name"]: i["transfer_seconds"] for i in fields["images"]} == {IMAGE: None, "fetchable": 3.5}
    offer = offer_from_wire(_wire(fields), "https://p:1/", CatalogCache(), 0.0)
    at_shop = Pricing(load_dag(request)).price(offer)
    assert isinstance(at_shop, Bid)
    assert (at_shop.cost, at_shop.image, at_shop.remaining, at_shop.items) == \
        (at_plant.cost, at_plant.image, at_plant.remaining, at_plant.items)
    # Dearer to fetch than to run the step: the plant's own image wins.
    plant._fetchable = lambda images, owner: {"fetchable": (remote, 60.0)}
    plant._catalogs.clear()
    assert plant.estimate(request).image == IMAGE
