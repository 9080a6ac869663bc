"""Where the published contracts live: ``wsdl/`` and ``xsd/`` at the project's top.

``VMSHOP_WSDL_DIR`` overrides the WSDL directory (as ``VMSHOP_XSD_DIR``
overrides the schemas', see :func:`vmshop_common.dagxml.xsd_dir`).
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def wsdl_path(name: str) -> Path:
    """The checked-in WSDL file ``name`` (``vmplant.wsdl`` or ``vmshop.wsdl``)."""
    override = os.environ.get("VMSHOP_WSDL_DIR")
    return (Path(override) if override else ROOT / "wsdl") / name
