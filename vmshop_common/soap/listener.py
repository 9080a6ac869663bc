"""A SOAP site as a Twisted service: it listens when started and drains when stopped.

Starting listens on the configured address with :func:`~vmshop_common.soap.server.listen` (TLS with the
server's credentials, or plain HTTP on loopback when insecure; a failure to bind raises out of
``startService``). Stopping, within the server's grace (:class:`~vmshop_common.lifecycle.Shutdown`):

1. at once: the port stops listening, every new request (also on a kept-alive connection) is answered
   ``Server.ShuttingDown`` (HTTP 503) and its connection closed, and idle kept-alive connections are
   closed;
2. requests in progress (a method's Deferred that has not fired: a shop waiting on its plants, a
   plant's work on its pool) may finish until the grace is over;
3. then the ones left are cancelled: each is answered ``Server.ShuttingDown`` once its method's chain has
   run its clean-up (the shop deletes the entry of a create it gave up), waited for at most
   ``after_grace`` seconds, and every connection still open is closed, its last answers sent (waited
   for at most ``after_grace`` seconds more).

The returned Deferred fires when that is done; it never waits longer than the grace plus twice
``after_grace``.
"""

from __future__ import annotations

import logging
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import Deferred

from vmshop_common.lifecycle import AFTER_GRACE, Shutdown, first_of, within
from vmshop_common.soap.server import SoapSite, bound_port, listen
from vmshop_common.tls import Credentials

log = logging.getLogger("vmshop_common.soap")


class SoapListener(Service):
    """``site`` on ``host:port`` (``port`` 0: any free one; see :attr:`port`), as a service (see the module)."""

    def __init__(self, site: SoapSite, host: str, port: int, *, shutdown: Shutdown, tls: Credentials | None = None,
                 insecure: bool = False, require_client_certificate: bool = True, reactor: Any = None,
                 after_grace: float = AFTER_GRACE) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.setName("listener")
        self.site = site
        self.host = host
        self.requested_port = port
        self.shutdown = shutdown
        self.tls = tls
        self.insecure = insecure
        self.require_client_certificate = require_client_certificate
        self.reactor = reactor
        self.after_grace = after_grace
        self.listening: Any = None

    @property
    def port(self) -> int:
        """The port listened on (once started)."""
        return bound_port(self.listening)

    @property
    def public_url(self) -> str:
        """The site's public URL, ``{port}`` completed (once started)."""
        return str(self.site.public_url).replace("{port}", str(self.port))

    def startService(self) -> None:  # noqa: N802 - Twisted's name
        self.listening = listen(self.site, self.host, self.requested_port, tls=self.tls, insecure=self.insecure,
                                require_client_certificate=self.require_client_certificate, reactor=self.reactor)
        Service.startService(self)

    def stopService(self) -> Deferred[None]:  # noqa: N802 - Twisted's name
        Service.stopService(self)
        resource = self.site.soap_resource
        resource.stop_accepting()
        stopped: Deferred[Any] = defer.maybeDeferred(self.listening.stopListening) if self.listening else \
            defer.succeed(None)
        self.site.close_connections(idle_only=True)
        if resource.pending:
            log.info("stopping: %d request(s) in progress may finish within %.1f s", len(resource.pending),
                     self.shutdown.remaining())
        d = first_of(resource.when_idle(), self.shutdown.over())

        def cancel_the_rest(_: Any) -> Deferred[None]:
            if not resource.pending:
                return defer.succeed(None)
            log.warning("stopping: the grace is over, cancelling %d request(s) in progress",
                        resource.cancel_pending())
            return self._within_after_grace(resource.when_idle())

        def close(_: Any) -> Deferred[None]:
            if resource.pending:
                log.warning("stopping: %d cancelled request(s) did not end within %g s; closing their connections",
                            len(resource.pending), self.after_grace)
            self.site.close_connections()
            # The answers written last go out before the reactor stops (a peer that reads nothing is dropped).
            return self._within_after_grace(self.site.when_no_connections())

        return d.addCallback(cancel_the_rest).addCallback(close).addCallback(lambda _: stopped).addCallback(
            lambda _: None)

    def _within_after_grace(self, d: Deferred[Any]) -> Deferred[None]:
        """``d``, or ``after_grace`` seconds, whichever comes first."""
        return within(self.reactor, self.after_grace, d)


__all__ = ["SoapListener"]
