"""SOAP plumbing shared by the VMShop and VMPlant servers.

- :mod:`.compat`: makes Spyne 2.14.0's Twisted transport work on Python 3.11 /
  Twisted 26.10 (import it before ``spyne.server.twisted``; ``server`` does).
- :mod:`.server`: build a Spyne ``Application`` and a Twisted ``Site`` with a
  WSDL fixed at start-up, DOCTYPEs refused, a body size limit; ``listen``.
- :mod:`.client`: call SOAP servers from inside the reactor without blocking
  it (``AsyncSoapClient``), and unwrap ``FirstError`` from ``gatherResults``.

Nothing is imported here, so that importing the package has no side effects.
"""
