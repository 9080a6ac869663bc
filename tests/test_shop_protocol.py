"""The real Shop and the tests' FakeShop satisfy one contract: ``vmshop_service.service.ShopOperations``.

Checked at run time (every operation exists and takes the arguments the
service passes) and with mypy (the protocol's types, on both classes), so
the fake cannot drift from the shop the service really calls.
"""

from __future__ import annotations

import inspect
import re
import sys
import textwrap
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fake_shop import FakeShop  # noqa: E402

from vmshop_service import service  # noqa: E402
from vmshop_service.service import SHOP_OPERATIONS, ShopOperations  # noqa: E402
from vmshop_service.shop import Shop  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def _protocol_methods() -> dict[str, inspect.Signature]:
    return {name: inspect.signature(getattr(ShopOperations, name)) for name in dir(ShopOperations)
            if not name.startswith("_") and callable(getattr(ShopOperations, name))}


def test_the_operation_list_is_the_protocol_and_what_the_service_calls() -> None:
    assert set(_protocol_methods()) == set(SHOP_OPERATIONS)
    called = set(re.findall(r'_call\(ctx, "(\w+)"', Path(service.__file__).read_text()))
    assert called == set(SHOP_OPERATIONS)


@pytest.mark.parametrize("cls", [Shop, FakeShop], ids=["Shop", "FakeShop"])
def test_both_satisfy_the_protocol_at_run_time(cls: type) -> None:
    assert issubclass(cls, ShopOperations)
    for name, wanted in _protocol_methods().items():
        positional = [p for p in wanted.parameters.values() if p.kind is inspect.Parameter.POSITIONAL_ONLY]
        got = inspect.signature(getattr(cls, name))  # follows inlineCallbacks' __wrapped__
        got.bind(*(object() for _ in positional))  # self and the values, as the service passes them
        too_many = list(positional) + [None]
        with pytest.raises(TypeError):
            got.bind(*(object() for _ in too_many))


def test_both_satisfy_the_protocol_for_mypy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mypy import api

    monkeypatch.setenv("MYPYPATH", str(REPO / "tests"))  # fake_shop and its neighbours

    check = tmp_path / "check_shop_protocol.py"
    check.write_text(textwrap.dedent("""
        from fake_shop import FakeShop
        from vmshop_service.service import ShopOperations
        from vmshop_service.shop import Shop

        def fake(shop: FakeShop) -> ShopOperations:
            return shop

        def real(shop: Shop) -> ShopOperations:
            return shop

        class Drifted:
            def create(self, caller: object) -> None: ...

        def drifted(shop: Drifted) -> ShopOperations:
            return shop  # the check itself works: this must be an error
    """))
    stdout, stderr, status = api.run([
        "--config-file", str(REPO / "pyproject.toml"), "--cache-dir", str(REPO / ".mypy_cache"),
        "--no-error-summary", "--follow-imports=silent", str(check)])
    errors = [line for line in stdout.splitlines() if ": error:" in line]
    assert len(errors) == 1 and "check_shop_protocol.py:16:" in errors[0], stdout + stderr
    assert "Drifted" in errors[0]
