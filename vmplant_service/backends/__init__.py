"""Hypervisor backends, loaded by name from the plant's configuration.

:data:`BACKENDS` maps each name to ``module:Class``; only the module asked
for is imported, so a backend whose Python bindings are missing breaks
nothing else. Registering a backend is one line here.
"""

from __future__ import annotations

import importlib

from vmshop_common.errors import ConfigurationError

from .base import Backend

BACKENDS: dict[str, str] = {
    "qemu": "vmplant_service.backends.qemu:QemuBackend",
    "libvirt": "vmplant_service.backends.libvirt:LibvirtBackend",
    "uml": "vmplant_service.backends.uml:UmlBackend",
    "fake": "vmplant_service.backends.fake:FakeBackend",
    "fake-failstart": "vmplant_service.backends.fake:FailingStartBackend",
    "fake-slowbid": "vmplant_service.backends.fake:SlowBidBackend",
}


def backend_class(name: str) -> type[Backend]:
    """The class registered as ``name``; ConfigurationError if there is none or it is no Backend."""
    target = BACKENDS.get(name)
    if target is None:
        raise ConfigurationError(f"unknown backend {name!r} (known: {', '.join(sorted(BACKENDS))})")
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"backend {name!r} cannot be loaded: {exc}") from None
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise ConfigurationError(f"backend {name!r}: {target} is not a Backend")
    return cls


def load_backend(name: str, options: dict[str, str] | None = None) -> Backend:
    """A new backend ``name`` built with ``options`` (strings from the plant's configuration)."""
    return backend_class(name)(dict(options or {}))
