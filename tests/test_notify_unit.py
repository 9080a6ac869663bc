"""ShopNotifier's rules without a network: coalescing per shop, following the shop list, never raising."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import defer

from vmplant_service import notify


class FakeClient:
    """Stands in for AsyncSoapClient: each call returns a Deferred the test fires."""

    made: list[FakeClient] = []

    def __init__(self, wsdl: str, url: str, timeout: float, reactor: Any = None, tls: Any = None) -> None:
        self.url = url
        self.tls = tls
        self.calls: list[defer.Deferred[Any]] = []
        self.offers: list[Any] = []
        self.closed = False
        FakeClient.made.append(self)

    def call(self, operation: str, **kwargs: Any) -> defer.Deferred[Any]:
        assert operation == "plantChanged" and kwargs.get("plant") == "http://plant:1/"
        assert set(kwargs) <= {"plant", "offer"}
        self.offers.append(kwargs.get("offer"))
        d: defer.Deferred[Any] = defer.Deferred()
        self.calls.append(d)
        return d

    def close(self) -> defer.Deferred[None]:
        self.closed = True
        return defer.succeed(None)


def notifier_of(shops: Any, **kwargs: Any) -> notify.ShopNotifier:
    """A notifier for the plant http://plant:1/ that reads its shop list at once (no thread, no reactor)."""
    return notify.ShopNotifier("http://plant:1/", shops, reactor=None, run_blocking=defer.maybeDeferred, **kwargs)


@pytest.fixture(autouse=True)
def fake_clients(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeClient.made = []
    monkeypatch.setattr(notify, "AsyncSoapClient", FakeClient)


def test_changes_while_a_notice_is_in_flight_make_exactly_one_more() -> None:
    notifier = notifier_of(lambda: ["http://shop:2/"])
    (client,) = FakeClient.made
    notifier.changed()
    notifier.changed()
    notifier.changed()
    assert len(client.calls) == 1
    client.calls[0].callback(True)
    assert len(client.calls) == 2  # the changes made meanwhile, in one notice
    client.calls[1].callback(True)
    assert len(client.calls) == 2 and notifier.counts() == {"http://shop:2/": (2, 2)}


def test_the_offer_goes_with_a_notice_until_the_shop_took_that_version() -> None:
    versions = iter([1, 1, 1, 2])
    notifier = notifier_of(lambda: ["http://shop:2/"], offer=lambda: {"version": next(versions)})
    (client,) = FakeClient.made
    notifier.changed()
    client.calls[0].errback(ConnectionRefusedError())  # not taken: it goes again
    notifier.changed()
    client.calls[1].callback(True)
    notifier.changed()  # the same version: the notice goes without it
    client.calls[2].callback(True)
    notifier.changed()
    client.calls[3].callback(True)
    assert client.offers == [{"version": 1}, {"version": 1}, None, {"version": 2}]


def test_a_shop_that_fails_is_tried_again_at_the_next_change() -> None:
    notifier = notifier_of(lambda: ["http://shop:2/"])
    (client,) = FakeClient.made
    notifier.changed()
    client.calls[0].errback(ConnectionRefusedError())
    notifier.changed()
    client.calls[1].callback(True)
    assert notifier.counts() == {"http://shop:2/": (2, 1)}


def test_the_shop_list_is_followed_and_a_bad_one_keeps_the_last() -> None:
    shops = ["http://a:1/", "http://b:2/"]

    def listed() -> list[str]:
        if shops == ["broken"]:
            raise OSError("unreadable")
        return list(shops)

    notifier = notifier_of(listed)
    a, b = FakeClient.made
    shops[:] = ["http://b:2/", "http://c:3/"]
    notifier.changed()
    assert a.closed and notifier.shops == ["http://b:2/", "http://c:3/"]
    assert len(b.calls) == 1 and len(FakeClient.made[2].calls) == 1
    shops[:] = ["broken"]
    b.calls[0].callback(True)
    notifier.changed()  # the list cannot be read: the shops it had are told
    assert notifier.shops == ["http://b:2/", "http://c:3/"] and len(b.calls) == 2


def test_notices_go_out_with_the_plants_own_credentials() -> None:
    policy = object()
    notifier = notifier_of(lambda: ["https://shop:2/"], tls=policy)
    notifier.changed()
    assert [client.tls for client in FakeClient.made] == [policy]
