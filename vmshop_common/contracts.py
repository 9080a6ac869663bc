"""Where the published contracts live: the WSDL (``wsdl/``) and the schemas (``xsd/``).

In a checkout they are the top-level ``wsdl/`` and ``xsd/`` folders, the
ones the design card names and the ones people edit. A built package (a
wheel, or ``pip install .``) carries a copy of them as package data of
``vmshop_common`` under ``published/wsdl`` and ``published/xsd``: the build
copies them in (``setup.py``'s ``build_py``), so git holds each file once.
:func:`contract_dir` finds them through :mod:`importlib.resources`, and
falls back to the checkout's folders when no copy is installed (an
editable install, or running from the source tree).

``VMSHOP_WSDL_DIR`` and ``VMSHOP_XSD_DIR`` override either directory.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
"""The checkout's top (where ``wsdl/`` and ``xsd/`` are when the code runs from the source tree)."""

PUBLISHED = "published"
"""The folder of ``vmshop_common`` that holds the contracts in a built package."""

_OVERRIDES = {"wsdl": "VMSHOP_WSDL_DIR", "xsd": "VMSHOP_XSD_DIR"}


def contract_dir(kind: str) -> Path:
    """The directory of the ``kind`` contracts (``"wsdl"`` or ``"xsd"``): the environment's override, else the
    installed package data, else the checkout's top-level folder."""
    variable = _OVERRIDES[kind]
    override = os.environ.get(variable)
    if override:
        return Path(override)
    installed = resources.files("vmshop_common").joinpath(PUBLISHED, kind)
    if installed.is_dir():
        # A package installed as files (pip never installs ours zipped): a Traversable that is a real path.
        return Path(str(installed))
    return ROOT / kind


def wsdl_path(name: str) -> Path:
    """The published WSDL file ``name`` (``vmplant.wsdl`` or ``vmshop.wsdl``)."""
    return contract_dir("wsdl") / name


def xsd_path(name: str) -> Path:
    """The published schema ``name`` (e.g. ``vmdag-1.0.xsd``)."""
    return contract_dir("xsd") / name
