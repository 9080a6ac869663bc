"""Every patch of third-party code in VMShop, in one list, guarded by the versions it was written for.

A "patch" is anything that depends on another project's code being exactly
as it is: a change to its modules or classes at run time (``apply`` below
makes the only three), a subclass that replaces one of its methods to fix
it, or a use of its private names. Each is one :class:`Patch` in
:data:`PATCHES`, saying where our code does it, which upstream objects it
touches or relies on (``upstream``, dotted names), and why.

The guard: :func:`check_versions` compares the installed versions of the
patched distributions with :data:`WRITTEN_FOR` and raises
:class:`UnsupportedVersionError` (an ``ImportError`` naming the package, both
versions and the patches at stake) on any other version. It runs when
:mod:`vmshop_common.soap.compat` (imported by every module that touches
spyne) or :mod:`vmshop_common.soap.client` is imported, so a shop, a plant
or the CLI refuses to start instead of breaking silently.

The tests (``tests/test_patches.py``) hold each patch to its reason: every
upstream name still resolves, its source still has the fingerprint it had
when the patch was written (:attr:`Patch.fingerprint`: a changed upstream
fails the test, which says which patch to re-check), and, for the fixes, the
unpatched upstream behaviour is still broken (the test fails once upstream
fixes it: the patch can then go).

Moving to another version: change :data:`WRITTEN_FOR` and the pin in
``setup.py``, run ``tests/test_patches.py``, re-check each patch it names,
then record the new fingerprints (:func:`fingerprint` prints them).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import sys
import warnings
from dataclasses import dataclass
from importlib import metadata
from typing import Any

WRITTEN_FOR: dict[str, str] = {
    "spyne": "2.14.0",
    "Twisted": "26.10.0",
    "zeep": "4.3.3",
}
"""The only versions of the patched distributions the patches were written (and are tested) for."""


@dataclass(frozen=True)
class Patch:
    """One dependency on another project's code being as it is."""

    name: str
    package: str  #: the distribution (a key of WRITTEN_FOR)
    where: str  #: our module and object that does it
    upstream: tuple[str, ...]  #: the upstream objects patched, replaced or relied on (dotted names)
    why: str
    fingerprint: str  #: :func:`fingerprint` of ``upstream`` when the patch was written
    kind: str = "fix"  #: 'fix' (works around an upstream bug), 'private' (uses private API), 'speed'


_HTTP = "spyne.server.twisted.http"
_COMPAT = "vmshop_common.soap.compat"

PATCHES: tuple[Patch, ...] = (
    # --- run-time changes to other projects' modules (made by apply() below) ---------------------------
    Patch("twisted-python-constants", "Twisted", "vmshop_common.patches._install_twisted_constants",
          ("twisted.python",),
          "Twisted >= 24.11 removed twisted.python.constants, which spyne.server.twisted imports: the "
          "'constantly' package (the same classes) is registered under that name in sys.modules.",
          "880fabed9c405315"),
    Patch("six-importer-find-spec", "spyne", "vmshop_common.patches._fix_six_importer",
          ("spyne.util.six._SixMetaPathImporter",),
          "spyne's bundled six 1.14 meta path importer lacks find_spec: every import of a missing module then "
          "raised ImportWarning (an error under -W error). The class gets six 1.16's three PEP 451 methods.",
          "09a46636a183bd2d"),
    Patch("spyne-no-forced-gc", "spyne", "vmshop_common.patches._no_forced_gc",
          ("spyne.context.MethodContext.close",),
          "MethodContext.close ran a full gc.collect() at most once a second (for file uploads these services "
          "do not take): spyne.const.MIN_GC_INTERVAL is set to infinity.",
          "3495aab97a79adbd", kind="speed"),
    # --- spyne's Twisted transport, fixed by subclasses in vmshop_common.soap.compat --------------------
    Patch("spyne-method-and-content-type-bytes", "spyne", f"{_COMPAT}.CompatTransportContext",
          (f"{_HTTP}.TwistedHttpTransportContext.get_request_method",
           f"{_HTTP}.TwistedHttpTransportContext.get_request_content_type"),
          "Twisted gives the method and headers as bytes: spyne compared b'POST' with 'POST' (every POST "
          "answered 405) and handed cgi.parse_header bytes. Both are returned as str.",
          "0b5fc84dda577964"),
    Patch("spyne-reconstruct-url", "spyne", f"{_COMPAT}.reconstruct_url",
          (f"{_HTTP}._reconstruct_url",),
          "_reconstruct_url mixes str and bytes (?wsdl answered 500); spyne also cached the WSDL built for the "
          "first caller's Host header. The resource serves a WSDL built for the configured URL.",
          "17c0dacecb6e5721"),
    Patch("spyne-twisted-resource", "spyne", f"{_COMPAT}.CompatTwistedWebResource",
          (f"{_HTTP}.TwistedWebResource.handle_rpc", f"{_HTTP}.TwistedWebResource.handle_rpc_error",
           f"{_HTTP}.TwistedWebResource.getChildWithDefault", f"{_HTTP}._cb_deferred"),
          "handle_rpc mmaps a body Twisted spooled to a file (bodies >= 100,000 bytes answered an HTML 500) "
          "and never enforces max_content_length; getChildWithDefault built Twisted's deprecated "
          "_UnsafeNoResource per request; _cb_deferred wrote answers through a pull producer that was left "
          "registered when the connection was lost. The resource is a leaf, reads the body whatever holds "
          "it, limits it, and writes each answer whole with a Content-Length.",
          "a16ed87f62da7391"),
    Patch("spyne-transport-thread-safe", "spyne", f"{_COMPAT}.CompatHttpTransport",
          (f"{_HTTP}.TwistedHttpTransport.__init__",),
          "The transport's constructor called deferLater(reactor, ...), not thread-safe outside the reactor "
          "thread: callFromThread instead, so a site may be built in any thread.",
          "25f3739bacec3ee1"),
    Patch("spyne-generate-contexts", "spyne", f"{_COMPAT}.CompatTwistedWebResource._generate_contexts",
          ("spyne.server._base.ServerBase.generate_contexts",),
          "Re-implemented with a hook between parsing and reading the envelope: spyne took the first Body and "
          "its first element and ignored the rest; server.py checks SOAP 1.1's structure there.",
          "aa43405b22c3a313"),
    Patch("spyne-twisted-private-helpers", "spyne", _COMPAT,
          (f"{_HTTP}._set_response_headers", f"{_HTTP}._get_file_info", f"{_HTTP}._eb_deferred",
           "spyne.auxproc.process_contexts"),
          "The resource reuses spyne 2.14.0's module-level response helpers of its Twisted transport.",
          "221fda8ee2e6b053", kind="private"),
    # --- Twisted private names --------------------------------------------------------------------------
    Patch("twisted-site-channel", "Twisted", f"{_COMPAT}.LimitedSite.close_connections",
          ("twisted.web.http._GenericHTTPChannelProtocol",),
          "Closing a site's connections reads the HTTP/1.1 channel inside Twisted's site protocol through its "
          "private _channel attribute (falling back to the protocol itself).",
          "d40fe372ab7846df", kind="private"),
    Patch("twisted-request-body-hooks", "Twisted", f"{_COMPAT}.BodyLimitRequest",
          ("twisted.web.http.Request.gotLength", "twisted.web.http.Request.handleContentChunk"),
          "The body limit overrides the hooks through which Twisted's channel hands a request its body; "
          "it relies on gotLength making request.content and handleContentChunk writing to it.",
          "29edf3c2495e0aea", kind="private"),
    Patch("twisted-pool-new-connection", "Twisted", "vmshop_common.soap.client.NoDelayConnectionPool",
          ("twisted.web.client.HTTPConnectionPool._newConnection",),
          "Nagle's algorithm off on the client's connections: the pool's private _newConnection is extended.",
          "0cc8f13936a8ab33", kind="private"),
    # --- zeep private names -------------------------------------------------------------------------------
    Patch("zeep-binding-internals", "zeep", "vmshop_common.soap.client.AsyncSoapClient",
          ("zeep.proxy.ServiceProxy.__init__", "zeep.wsdl.bindings.soap.SoapBinding._create",
           "zeep.wsdl.bindings.soap.SoapBinding.process_reply", "zeep.wsdl.definitions.Binding.__init__",
           "zeep.wsdl.utils.etree_to_string"),
          "zeep only builds and parses messages while Twisted's Agent does the I/O: the client reads the "
          "proxy's _binding and _binding_options, builds envelopes with Binding._create, lists "
          "Binding._operations and parses replies with process_reply.",
          "75689e234b52b961", kind="private"),
    # --- spyne's serialiser internals (vmshop_common.soap.fastxml) ----------------------------------------
    Patch("spyne-serialiser-internals", "spyne", "vmshop_common.soap.fastxml.FastSoap11",
          ("spyne.protocol._outbase.OutProtocolBase.__init__",
           "spyne.protocol._outbase.OutProtocolBase.unicode_to_unicode",
           "spyne.protocol._outbase.OutProtocolBase.integer_to_unicode",
           "spyne.protocol._outbase.OutProtocolBase.double_to_unicode",
           "spyne.protocol._outbase.OutProtocolBase.boolean_to_unicode",
           "spyne.protocol.xml.XmlDocument.__init__", "spyne.protocol.xml.XmlDocument.to_parent",
           "spyne.protocol.xml.XmlDocument.complex_to_parent", "spyne.protocol.xml.XmlDocument.modelbase_to_parent",
           "spyne.model.complex.ComplexModelBase.customize"),
          "FastSoap11 compiles, per class, what spyne's XmlDocument would write: it reads serialization_handlers, "
          "_to_unicode_handlers, _type_info and __orig__, and recognises spyne's own handlers by identity.",
          "71349ba674796d44", kind="private"),
    Patch("spyne-record-constructor", "spyne", "vmshop_common.soap.fastxml.spyne_record",
          ("spyne.model.complex.ComplexModelBase.__init__",),
          "Plain records are made by copying the __dict__ of a fresh instance, skipping ComplexModelBase.__init__'s "
          "per-call look-ups: it relies on that constructor only setting attributes.",
          "71d42f3fa57813cf", kind="speed"),
)


class UnsupportedVersionError(ImportError):
    """An installed third-party distribution is not the version VMShop's patches were written for."""


def _installed_version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def check_versions(packages: tuple[str, ...] | None = None) -> None:
    """Raise :class:`UnsupportedVersionError` unless each of ``packages`` (default: all of
    :data:`WRITTEN_FOR`) is installed at the version the patches were written for."""
    problems = []
    for package in packages or tuple(WRITTEN_FOR):
        wanted = WRITTEN_FOR[package]
        found = _installed_version(package)
        if found != wanted:
            names = ", ".join(p.name for p in PATCHES if p.package == package)
            problems.append(f"{package} {found or '(not installed)'} is installed, but VMShop's patches of it "
                            f"({names}) were written for {package} {wanted} only")
    if problems:
        raise UnsupportedVersionError(
            "; ".join(problems) + ". Install the pinned versions (pip install -e . in a fresh venv), or re-check "
            "every patch listed in vmshop_common/patches.py against the new version first.")


def resolve(dotted: str) -> Any:
    """The object a dotted name names (the longest importable module prefix, then attributes)."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for part in parts[cut:]:
            obj = getattr(obj, part)
        return obj
    raise ImportError(f"nothing importable in {dotted!r}")


def fingerprint(upstream: tuple[str, ...]) -> str:
    """A short hash of the source code of the ``upstream`` objects (what :attr:`Patch.fingerprint` records)."""
    digest = hashlib.sha256()
    for dotted in upstream:
        digest.update(dotted.encode())
        digest.update(inspect.getsource(resolve(dotted)).encode())
    return digest.hexdigest()[:16]


# --- the run-time changes ----------------------------------------------------------------------------------

#: Which of apply()'s changes found something to change (a change upstream made unnecessary stays False).
applied: dict[str, bool] = {}


def _install_twisted_constants() -> None:
    """Register ``constantly`` as ``twisted.python.constants`` if Twisted lacks it."""
    try:
        import twisted.python.constants  # noqa: F401
    except ImportError:
        import constantly
        import twisted.python

        sys.modules["twisted.python.constants"] = constantly
        twisted.python.constants = constantly  # type: ignore[attr-defined]
        applied["twisted-python-constants"] = True
    else:
        applied.setdefault("twisted-python-constants", False)


def _fix_six_importer() -> None:
    """Give spyne's bundled six 1.14 meta path importer the PEP 451 methods of six 1.16 (only if missing).

    Without ``find_spec`` every later import of a module that does not exist
    (e.g. urllib3 probing for ``brotlicffi``) falls back to ``find_module``
    and emits an ``ImportWarning``, an error under ``-W error``.
    """
    from importlib.util import spec_from_loader

    from spyne.util import six as spyne_six

    cls = spyne_six._SixMetaPathImporter
    if "find_spec" in cls.__dict__:
        applied.setdefault("six-importer-find-spec", False)
        return

    def find_spec(self: Any, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname in self.known_modules:
            return spec_from_loader(fullname, self)
        return None

    def create_module(self: Any, spec: Any) -> Any:
        return self.load_module(spec.name)

    def exec_module(self: Any, module: Any) -> None:
        pass

    cls.find_spec = find_spec
    cls.create_module = create_module
    cls.exec_module = exec_module
    applied["six-importer-find-spec"] = True


def _no_forced_gc() -> None:
    """Stop spyne from running a full ``gc.collect()`` from its request path (Python's own collector is untouched).

    ``MethodContext.close`` collects the whole heap at most once a second "to
    return file descriptors in a timely manner" (for file uploads, which these
    services do not take); in a shop holding a large registry cache that was
    a measurable share of every request.
    """
    from spyne import const as spyne_const

    applied["spyne-no-forced-gc"] = spyne_const.MIN_GC_INTERVAL != float("inf")
    spyne_const.MIN_GC_INTERVAL = float("inf")


_done = False


def apply() -> None:
    """Check the versions, then make the run-time changes, once; before anything imports ``spyne.server.twisted``.

    Spyne's bundled six raises ImportWarning, spyne imports the deprecated cgi
    module and twisted.web.resource's NoResource is deprecated, all at import
    time: spyne is imported here once with exactly those warnings silenced, so
    a test run with ``filterwarnings = error`` does not depend on its ignore list.
    """
    global _done
    if _done:
        return
    check_versions()
    _install_twisted_constants()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=ImportWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=PendingDeprecationWarning)
        import spyne  # noqa: F401
        import spyne.server.twisted  # noqa: F401
        import twisted.web.resource  # noqa: F401
    _fix_six_importer()
    _no_forced_gc()
    _done = True


__all__ = ["PATCHES", "WRITTEN_FOR", "Patch", "UnsupportedVersionError", "apply", "check_versions", "fingerprint",
           "resolve"]
