#!/usr/bin/env python3
"""Write the published WSDL files in wsdl/ from the services' code.

The checked-in files name the default public addresses below; a running
server serves the same document for its own configured public address
(tests/test_wsdl.py checks that they are equal). Run this after changing a
service's operations or types, and commit the result.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PLANT_URL = "https://localhost:8090/"
SHOP_URL = "https://localhost:8080/"


def documents() -> dict[str, bytes]:
    """File name -> WSDL bytes, for every published service."""
    from vmshop_common.soap.server import build_application, wsdl_document

    out: dict[str, bytes] = {}
    from vmplant_service import service as plant_service
    from vmplant_service import wire as plant_wire

    app = build_application([plant_service.VMPlantService], plant_wire.TNS, name=plant_service.APP_NAME)
    out["vmplant.wsdl"] = wsdl_document(app, PLANT_URL)
    try:
        from vmshop_service import service as shop_service
        from vmshop_service import wire as shop_wire
    except ImportError:
        return out
    app = build_application([shop_service.VMShopService], shop_wire.TNS, name=shop_service.APP_NAME)
    out["vmshop.wsdl"] = wsdl_document(app, SHOP_URL)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a checked-in file differs")
    args = parser.parse_args(argv)
    status = 0
    for name, document in documents().items():
        path = ROOT / "wsdl" / name
        if args.check:
            if not path.exists() or path.read_bytes() != document:
                print(f"{path} is out of date: run scripts/generate_wsdl.py")
                status = 1
            continue
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(document)
        print(f"wrote {path}")
    return status


if __name__ == "__main__":
    sys.exit(main())
