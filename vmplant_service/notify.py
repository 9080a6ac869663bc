"""Telling the shops that a plant's VMs changed.

The plant's ``vmshop_addresses.txt`` names the shops it works for (read
again at every change, so an edit takes effect without a restart). When a
VM of this plant is made, configured, collected, or found dead by the
watch, :meth:`ShopNotifier.changed` sends each of those shops
``plantChanged(plant=<this plant's public URL>)``, over TLS with the plant's
own certificate (a shop hears a notice only from the identity its
authorisation file lists for that plant's address). The notice carries no
state: a shop that hears it asks this plant for its VMs (``listVMs``), so a
forged notice can make a shop look, never make it believe anything. Shops
also poll, so a lost notice only delays what a shop sees.

Rules:

* :meth:`changed` is called in the reactor thread (from a thread, use
  ``reactor.callFromThread``); it never blocks and never raises.
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
from vmshop_common.soap.client import AsyncSoapClient

log = logging.getLogger(__name__)

#: Seconds a shop has to answer a notice.
NOTICE_TIMEOUT = 5.0


class _Shop:
    def __init__(self, client: AsyncSoapClient) -> None:
        self.client = client
        self.in_flight = False
        self.again = False
        self.answering = True
        self.sent = 0
        self.answered = 0


class ShopNotifier:
    """Notices to the shops at ``shop_urls`` on behalf of the plant at ``plant_url`` (see the module)."""

    def __init__(self, plant_url: str, shop_urls: Callable[[], list[str]], reactor: Any,
                 timeout: float = NOTICE_TIMEOUT, tls: Any = None) -> None:
        self.plant_url = plant_url
        self.tls = tls  # the plant's ClientPolicy: shops see the plant's own certificate
        self.shop_urls = shop_urls
        self.reactor = reactor
        self.timeout = timeout
        self._wsdl = str(wsdl_path("vmshop.wsdl"))
        self._shops: dict[str, _Shop] = {}
        self._update()

    @property
    def shops(self) -> list[str]:
        return list(self._shops)

    def _update(self) -> None:
        """Follow the shop list: clients for new shops, none for shops no longer listed."""
        try:
            wanted = self.shop_urls()
        except Exception as exc:  # noqa: BLE001 - a bad list keeps the shops we had
            log.warning("the shop list cannot be read (%s); notifying the shops it named before", exc)
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
        """Some VMs of this plant changed: tell every shop (coalesced per shop)."""
        self._update()
        for url, shop in self._shops.items():
            if shop.in_flight:
                shop.again = True
            else:
                self._send(url, shop)

    def _send(self, url: str, shop: _Shop) -> None:
        shop.in_flight = True
        shop.again = False
        shop.sent += 1
        d = shop.client.call("plantChanged", plant=self.plant_url)

        def answered(_: Any) -> None:
            shop.answered += 1
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
        return defer.gatherResults([shop.client.close() for shop in self._shops.values()])


__all__ = ["NOTICE_TIMEOUT", "ShopNotifier"]
