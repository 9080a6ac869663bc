"""The list of third-party patches (vmshop_common.patches): guarded by version, each held to its reason.

- The version guard refuses any other version of a patched distribution
  with a message naming it, both versions and the patches at stake.
- Every upstream object a patch touches still exists and still has the
  source it had when the patch was written (a changed upstream fails here,
  naming the patch to re-check).
- For the fixes, the unpatched upstream behaviour is still broken: once
  upstream fixes it this fails, and the patch can go.
"""

from __future__ import annotations

import inspect
import types
import warnings
from pathlib import Path

import pytest

from vmshop_common import patches
from vmshop_common.soap import compat

# isort: split
from spyne.server.twisted import http as spyne_http
from twisted.web.resource import Resource
from twisted.web.server import Request
from twisted.web.test.requesthelper import DummyChannel

REPO = Path(__file__).resolve().parent.parent


def test_the_installed_versions_are_the_ones_written_for() -> None:
    patches.check_versions()
    assert compat.SPYNE_VERSION == patches.WRITTEN_FOR["spyne"]


@pytest.mark.parametrize("package", sorted(patches.WRITTEN_FOR))
def test_another_version_is_refused_with_a_clear_message(package: str, monkeypatch: pytest.MonkeyPatch) -> None:
    real = patches._installed_version
    monkeypatch.setattr(patches, "_installed_version", lambda name: "99.0" if name == package else real(name))
    with pytest.raises(patches.UnsupportedVersionError) as caught:
        patches.check_versions()
    message = str(caught.value)
    assert f"{package} 99.0 is installed" in message
    assert f"written for {package} {patches.WRITTEN_FOR[package]}" in message
    for patch in patches.PATCHES:
        if patch.package == package:
            assert patch.name in message
    assert isinstance(caught.value, ImportError)  # raised while the servers' modules are imported: start-up


def test_a_missing_distribution_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(patches, "_installed_version", lambda name: None)
    with pytest.raises(patches.UnsupportedVersionError, match=r"zeep \(not installed\)"):
        patches.check_versions(("zeep",))


def test_every_patch_names_a_guarded_package_and_our_code() -> None:
    names = [patch.name for patch in patches.PATCHES]
    assert len(names) == len(set(names))
    for patch in patches.PATCHES:
        assert patch.package in patches.WRITTEN_FOR, patch.name
        assert patch.kind in ("fix", "private", "speed"), patch.name
        assert patches.resolve(patch.where) is not None, patch.name


@pytest.mark.parametrize("patch", patches.PATCHES, ids=lambda patch: patch.name)
def test_upstream_is_still_what_the_patch_was_written_against(patch: patches.Patch) -> None:
    for dotted in patch.upstream:
        patches.resolve(dotted)  # AttributeError/ImportError: upstream removed or renamed it
    assert patches.fingerprint(patch.upstream) == patch.fingerprint, (
        f"upstream code that patch {patch.name!r} ({patch.where}) relies on has changed: re-check the patch "
        f"against {', '.join(patch.upstream)}, then record the new fingerprint")


def test_every_module_that_patches_or_reads_private_names_is_listed() -> None:
    """The modules known to touch other projects' internals are each named by some patch."""
    listed = {patch.where.rsplit(".", 1)[0] for patch in patches.PATCHES} | {patch.where for patch in patches.PATCHES}
    for module in ("vmshop_common.patches", "vmshop_common.soap.compat", "vmshop_common.soap.client",
                   "vmshop_common.soap.fastxml"):
        assert any(name == module or name.startswith(module + ".") for name in listed), module
    # No other module of ours assigns into sys.modules or imports a private module of spyne, Twisted or zeep.
    for path in sorted((REPO / "vmshop_common").rglob("*.py")) + sorted((REPO / "vmshop_service").rglob("*.py")) \
            + sorted((REPO / "vmplant_service").rglob("*.py")):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts)
        if module in ("vmshop_common.patches", "vmshop_common.soap.compat", "vmshop_common.soap.fastxml",
                      "vmshop_common.soap.client"):
            continue
        text = path.read_text()
        assert "sys.modules[" not in text, module
        for package in ("spyne", "twisted", "zeep"):
            assert f"from {package}._" not in text and f"import {package}._" not in text, module


# --- the fixes: upstream is still broken --------------------------------------------------------------------


def _request(method: bytes = b"POST", uri: bytes = b"/?wsdl") -> Request:
    request = Request(DummyChannel())
    request.method, request.uri, request.path = method, uri, uri.split(b"?")[0]
    request.requestHeaders.setRawHeaders(b"Host", [b"example.org:8080"])
    request.requestHeaders.setRawHeaders(b"Content-Type", [b"text/xml"])
    return request


def test_twisted_still_lacks_twisted_python_constants() -> None:
    import constantly
    import twisted.python

    assert not (Path(twisted.python.__file__).parent / "constants.py").exists()
    assert patches.applied["twisted-python-constants"] is True
    from twisted.python import constants

    assert constants is constantly


def test_spyne_six_importer_still_lacks_find_spec() -> None:
    assert patches.applied["six-importer-find-spec"] is True  # apply() found find_spec missing and added it


def test_spyne_still_forces_gc_on_its_request_path() -> None:
    from spyne.context import MethodContext

    assert patches.applied["spyne-no-forced-gc"] is True  # its interval was finite
    assert "gc.collect()" in inspect.getsource(MethodContext.close)


def test_spyne_still_hands_on_the_request_method_as_bytes() -> None:
    transport = types.SimpleNamespace(app=None)
    upstream = spyne_http.TwistedHttpTransportContext(None, transport, _request(), "text/xml")
    assert upstream.get_request_method() == b"POST"  # spyne compares it with "POST": every POST was a 405
    fixed = compat.CompatTransportContext(None, transport, _request(), "text/xml")
    assert fixed.get_request_method() == "POST"


def test_spyne_still_mixes_str_and_bytes_when_it_rebuilds_the_url() -> None:
    with pytest.raises(TypeError):
        spyne_http._reconstruct_url(_request(b"GET"))
    assert compat.reconstruct_url(_request(b"GET")) == "http://example.org/?wsdl"


def test_spyne_resource_still_builds_a_deprecated_child_per_path() -> None:
    resource = spyne_http.TwistedWebResource.__new__(spyne_http.TwistedWebResource)
    Resource.__init__(resource)
    resource.prepath = None
    request = _request()
    request.prepath, request.postpath = [], [b"x"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spyne_http.TwistedWebResource.getChildWithDefault(resource, b"x", request)
    assert any(issubclass(w.category, DeprecationWarning) for w in caught)
    assert compat.CompatTwistedWebResource.isLeaf  # ours is never asked for children


def test_spyne_transport_still_uses_deferlater_in_its_constructor() -> None:
    assert "deferLater" in inspect.getsource(spyne_http.TwistedHttpTransport.__init__)


def test_spyne_resource_still_maps_spooled_bodies_and_skips_the_limit() -> None:
    source = inspect.getsource(spyne_http.TwistedWebResource.handle_rpc)
    assert "mmap(" in source  # a body Twisted spooled to a file is mmapped (an HTML 500 for >= 100,000 bytes)
    assert "max_content_length" not in source  # the body limit is not enforced


def test_spyne_answers_still_go_through_a_pull_producer() -> None:
    # A producer left registered when the connection was lost: Twisted logged "Producer was not unregistered".
    assert "registerProducer" in inspect.getsource(spyne_http._cb_deferred)
