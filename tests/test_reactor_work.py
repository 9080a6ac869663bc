"""What the servers do in the reactor thread does not block: no WSDL is parsed and no file is read there.

A WSDL is parsed once (``load_wsdl``) and every client made from it shares it; re-reading the plant list
(the shop's SIGHUP and ``reloadPlants``) and the shop list (every plant notice) happens on a thread,
the reactor only swaps the result in. Each test makes the blocking calls explode while the reactor's
part runs.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import zeep
from twisted.internet import defer

from vmplant_service import notify
from vmshop_common.contracts import wsdl_path
from vmshop_common.soap.client import AsyncSoapClient, load_wsdl
from vmshop_service import config as shop_config
from vmshop_service.config import ShopConfig
from vmshop_service.plants import PLANT_BINDING, PlantDirectory
from vmshop_service.registry import Registry
from vmshop_service.shop import Shop


class Explodes:
    def __init__(self, what: str) -> None:
        self.what = what

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"{self.what} in the reactor's part")


@pytest.fixture
def no_parsing(monkeypatch: pytest.MonkeyPatch) -> Any:
    """From now on, parsing a WSDL fails the test."""
    def forbid() -> None:
        monkeypatch.setattr(zeep.Client, "__init__", Explodes("a WSDL parsed"))
    return forbid


def test_clients_made_from_one_parsed_wsdl_parse_nothing(no_parsing: Any) -> None:
    parsed = load_wsdl(wsdl_path("vmplant.wsdl"))
    no_parsing()
    clients = [AsyncSoapClient(parsed, f"http://127.0.0.1:{port}/", 5, binding=PLANT_BINDING)
               for port in (9001, 9002)]
    assert [c.address for c in clients] == ["http://127.0.0.1:9001/", "http://127.0.0.1:9002/"]
    assert clients[0].zeep is clients[1].zeep and "createVM" in clients[0].operations


def test_a_shop_rereads_its_plant_list_on_its_pool_and_only_swaps_it_in(
        tmp_path: Path, no_parsing: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    plants_file = tmp_path / "vmplant_addresses.txt"
    plants_file.write_text("127.0.0.1:9001\n")
    directory = PlantDirectory(plants_file, 5, reactor=None, clock=lambda: 0.0)
    directory.load()  # start-up: blocking is fine
    no_parsing()

    ran: list[str] = []

    class Pool:
        def run(self, work: Any, **kwargs: Any) -> defer.Deferred[Any]:
            ran.append(kwargs.get("what") or "")
            return defer.maybeDeferred(work)  # on a thread in a server

    config = ShopConfig(database=tmp_path / "registry.sqlite3", plants_file=plants_file)
    shop = Shop(config, Registry(config.database), directory, reactor=None, pool=Pool())  # type: ignore[arg-type]
    plants_file.write_text("127.0.0.1:9002\n127.0.0.1:9003\n")
    monkeypatch.setattr(directory, "check_all", lambda timeout=None: defer.succeed([]))
    reading = [0]
    real_plant_urls = shop_config.plant_urls

    def counted(*args: Any) -> list[str]:
        reading[0] += 1
        return real_plant_urls(*args)

    monkeypatch.setattr(shop_config, "plant_urls", counted)
    statuses: list[Any] = []
    shop.reload_plant_list().addCallbacks(statuses.append, statuses.append)
    assert [[s.address for s in statuses[0]]] == [["http://127.0.0.1:9002/", "http://127.0.0.1:9003/"]], statuses
    assert ran == ["read_urls"] and reading == [1]  # the file was read by the pool's work
    assert [h.url for h in directory.all()] == ["http://127.0.0.1:9002/", "http://127.0.0.1:9003/"]


def test_a_bad_plant_list_is_a_failure_of_the_reload_and_keeps_the_old_one(tmp_path: Path) -> None:
    plants_file = tmp_path / "vmplant_addresses.txt"
    plants_file.write_text("127.0.0.1:9001\n")
    directory = PlantDirectory(plants_file, 5, reactor=None, clock=lambda: 0.0)
    directory.load()
    plants_file.write_text("not an address\n")
    with pytest.raises(Exception, match="vmplant_addresses.txt"):
        directory.read_urls()
    assert [h.url for h in directory.all()] == ["http://127.0.0.1:9001/"]


class FakeClient:
    made: list[FakeClient] = []

    def __init__(self, wsdl: Any, url: str, timeout: float, reactor: Any = None, tls: Any = None) -> None:
        self.wsdl = wsdl
        self.url = url
        self.calls: list[defer.Deferred[Any]] = []
        FakeClient.made.append(self)

    def call(self, operation: str, **kwargs: Any) -> defer.Deferred[Any]:
        self.calls.append(defer.Deferred())
        return self.calls[-1]

    def close(self) -> defer.Deferred[None]:
        return defer.succeed(None)


def test_the_plant_reads_its_shop_list_off_the_reactor_and_tells_after(
        monkeypatch: pytest.MonkeyPatch, no_parsing: Any) -> None:
    FakeClient.made = []
    monkeypatch.setattr(notify, "AsyncSoapClient", FakeClient)
    shops = ["http://a:1/"]
    reads: list[defer.Deferred[Any]] = []
    readers: list[Any] = []

    def run_blocking(read: Any) -> defer.Deferred[Any]:
        readers.append(read)
        reads.append(defer.Deferred())
        return reads[-1]

    notifier = notify.ShopNotifier("http://plant:1/", lambda: list(shops), reactor=None, run_blocking=run_blocking)
    no_parsing()
    assert reads == []  # the first list was read at start-up
    (a,) = FakeClient.made
    assert isinstance(a.wsdl, zeep.Client)
    shops.append("http://b:2/")
    notifier.changed()
    notifier.changed()  # while the list is read: no second read, one round of notices after it
    assert len(reads) == 1 and a.calls == []
    reads[0].callback(readers[0]())
    b = FakeClient.made[1]
    assert len(a.calls) == 1 and len(b.calls) == 1 and b.wsdl is a.wsdl  # the WSDL parsed once, shared
    assert threading.current_thread() is threading.main_thread()
