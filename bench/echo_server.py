"""The throughput baseline: a trivial Spyne service on the project's own SOAP stack.

Served with ``vmshop_common.soap.server.build_site`` (same compat layer,
DOCTYPE check, lxml request validation and Twisted site as the shop and the
plants), in its own process::

    python tests/soap_harness.py serve bench.echo_server:make_site
"""

from __future__ import annotations

from vmshop_common.soap import compat  # noqa: F401  (before spyne)

# isort: split
from spyne import ServiceBase, Unicode, rpc

from vmshop_common.soap.server import build_site

TNS = "urn:vmshop:bench:echo:1"


class EchoService(ServiceBase):
    @rpc(Unicode(max_len=1024 * 1024), _returns=Unicode)
    def echo(ctx, text):  # noqa: N805
        return text


def make_site(public_url: str = "http://127.0.0.1:{port}/") -> object:
    return build_site([EchoService], TNS, public_url, name="Echo")
