"""Telling the shops that a plant's VMs changed.

The plant's ``vmshop_addresses.txt`` names the shops it works for (read
again, on a thread, at every change, so an edit takes effect without a
restart; the shops' WSDL is parsed once, when the notifier is made, so a
new shop's client costs no blocking work). When a
VM of this plant is made, configured, collected, or found dead by the
watch, :meth:`ShopNotifier.changed` sends each of those shops
``plantChanged(plant=<this plant's public URL>, offer=<its offer>)``
(the offer only when its version is not the one that shop took last), over TLS with the plant's
own certificate (a shop hears a notice only from the identity its
authorisation file lists for that plant's address). The notice carries no
VM state: a shop that hears it asks this plant for its VMs (``listVMs``), so a
forged notice can make a shop look, never make it believe anything. The
offer it carries is what the plant offers (the shop validates it, and the
plant re-prices every create it is asked for). Shops
also poll, so a lost notice only delays what a shop sees.

Rules:

* :meth:`changed` is called in the reactor thread (from a thread, use
  ``reactor.callFromThread``); it never blocks and never raises. The notices
  go once the shop list has been read (changes while it is read make one
  round of notices after it).
* Notices coalesce per shop: while one is in flight to a shop, any number of
  further changes make exactly one more notice after it.
* Each notice has a timeout; a shop that does not answer is logged once
  when it stops answering and once when it answers again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from twisted.internet import defer

from vmshop_common.contracts import wsdl_path
from vmshop_common.soap.client import AsyncSoapClient, load_wsdl
from vmshop_common.threads import in_thread

log = logging.getLogger(__name__)

#: Seconds a shop has to answer a notice.
NOTICE_TIMEOUT = 5.0
#: Seconds reading the shop list may take.
READ_DEADLINE = 10.0


class _Shop:
    def __init__(self, client: AsyncSoapClient) -> None:
        self.client = client
        self.in_flight = False
        self.again = False
        self.answering = True
        self.offered = -1  # the version of the offer this shop took last
        self.sent = 0
        self.answered = 0


class ShopNotifier:
    """Notices to the shops at ``shop_urls`` on behalf of the plant at ``plant_url`` (see the module).

    Made at start-up (it reads the shop list and parses the WSDL there). ``run_blocking(f)`` runs the
    blocking ``f`` off the reactor thread and returns a Deferred of its result (default: a thread of its
    own with a deadline of :data:`READ_DEADLINE`).
    """

    def __init__(self, plant_url: str, shop_urls: Callable[[], list[str]], reactor: Any,
                 timeout: float = NOTICE_TIMEOUT, tls: Any = None,
                 run_blocking: Callable[[Callable[[], Any]], defer.Deferred[Any]] | None = None,
                 offer: Callable[[], dict[str, Any]] | None = None) -> None:
        self.plant_url = plant_url
        self.offer = offer  # blocking: the plant's offer now (wire fields), taken with every read of the shop list
        self._offer: dict[str, Any] | None = None
        self.tls = tls  # the plant's ClientPolicy: shops see the plant's own certificate
        self.shop_urls = shop_urls
        self.reactor = reactor
        self.timeout = timeout
        self._run_blocking = run_blocking or (
            lambda read: in_thread(reactor, read, timeout=READ_DEADLINE, what="reading the shop list"))
        self._wsdl = load_wsdl(wsdl_path("vmshop.wsdl"), tls=tls)
        self._shops: dict[str, _Shop] = {}
        self._offer_next: dict[str, Any] | None = None
        self._reading = False
        self._changes = False
        self._closed = False
        self._follow(self._read())

    @property
    def shops(self) -> list[str]:
        return list(self._shops)

    def _read_with_offer(self) -> list[str] | None:
        """:meth:`_read`, and the plant's offer (blocking; kept in ``_offer_next`` until the reactor thread
        takes it)."""
        if self.offer is not None:
            try:
                self._offer_next = self.offer()
            except Exception as exc:  # noqa: BLE001 - a notice without an offer still goes
                log.warning("the plant's offer could not be made (%s); the notice goes without it", exc)
        return self._read()

    def _read(self) -> list[str] | None:
        """The shop list, or None (logged) when it cannot be read: the shops named before are kept."""
        try:
            return self.shop_urls()
        except Exception as exc:  # noqa: BLE001 - a bad list keeps the shops we had
            log.warning("the shop list cannot be read (%s); notifying the shops it named before", exc)
            return None

    def _follow(self, wanted: list[str] | None) -> None:
        """Follow the shop list: clients for new shops, none for shops no longer listed."""
        if wanted is None or self._closed:
            return
        for url in [u for u in self._shops if u not in wanted]:
            self._shops.pop(url).client.close()
        for url in wanted:
            if url not in self._shops:
                self._shops[url] = _Shop(AsyncSoapClient(self._wsdl, url, self.timeout, reactor=self.reactor,
                                                         tls=self.tls))

    def counts(self) -> dict[str, tuple[int, int]]:
        """Per shop: (notices sent, notices answered)."""
        return {url: (shop.sent, shop.answered) for url, shop in self._shops.items()}

    def changed(self) -> None:
        """Some VMs of this plant changed: read the shop list again, then tell every shop (coalesced per shop)."""
        self._changes = True
        if self._reading:
            return  # the read in progress ends with notices for this change too
        self._reading = True

        def unreadable(failure: Any) -> None:
            log.warning("the shop list was not read (%s); notifying the shops it named before",
                        failure.getErrorMessage())

        def read(_: Any) -> None:
            self._reading = False
            if self._offer_next is not None:
                self._offer, self._offer_next = self._offer_next, None
            if self._changes:
                self._changes = False
                self._tell_all()

        self._run_blocking(self._read_with_offer).addCallbacks(self._follow, unreadable).addBoth(read)

    def _tell_all(self) -> None:
        if self._closed:
            return
        for url, shop in self._shops.items():
            if shop.in_flight:
                shop.again = True
            else:
                self._send(url, shop)

    def _send(self, url: str, shop: _Shop) -> None:
        shop.in_flight = True
        shop.again = False
        shop.sent += 1
        offer = self._offer if self._offer is not None and self._offer["version"] != shop.offered else None
        d = shop.client.call("plantChanged", plant=self.plant_url, **({"offer": offer} if offer is not None else {}))

        def answered(_: Any) -> None:
            shop.answered += 1
            if offer is not None:
                shop.offered = offer["version"]
            if not shop.answering:
                log.info("shop %s takes notices again", url)
            shop.answering = True

        def failed(failure: Any) -> None:
            if shop.answering:
                log.warning("shop %s did not take a notice of changes (%s); it will see them when it polls",
                            url, failure.getErrorMessage())
            shop.answering = False

        def done(_: Any) -> None:
            shop.in_flight = False
            if shop.again and self._shops.get(url) is shop:
                self._send(url, shop)

        d.addCallbacks(answered, failed).addBoth(done)

    def close(self) -> defer.Deferred[Any]:
        """Close the connections to the shops; no notice goes out after this."""
        self._closed = True
        return defer.gatherResults([shop.client.close() for shop in self._shops.values()])


__all__ = ["NOTICE_TIMEOUT", "ShopNotifier"]
