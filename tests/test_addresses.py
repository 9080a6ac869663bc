"""Address files (vmshop_addresses.txt, vmplant_addresses.txt): one host:port per line."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmshop_common.addresses import format_address, parse_address, read_addresses
from vmshop_common.errors import ConfigurationError

ROOT = Path(__file__).resolve().parent.parent


def test_read_addresses(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("# header\n\n127.0.0.1:8080\n  plant-2.example.org:8090  # the second\n"
                    "[::1]:9000\n127.0.0.1:8080\nlocalhost:1\n")
    assert read_addresses(path) == [("127.0.0.1", 8080), ("plant-2.example.org", 8090), ("::1", 9000),
                                    ("localhost", 1)]


def test_the_shipped_file() -> None:
    assert read_addresses(ROOT / "addresses" / "vmshop_addresses.txt") == [("127.0.0.1", 8080)]


@pytest.mark.parametrize("text", ["127.0.0.1", "127.0.0.1:", ":8080", "127.0.0.1:0", "127.0.0.1:65536",
                                  "127.0.0.1:80x", "256.1.1.1:80", "1.2.3:80", "host name:80", "[::1:80",
                                  "[nope]:80", "::1:80", "-bad.example:80", "a_b:80"])
def test_bad_addresses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_address(text)


def test_bad_lines_are_named(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("# ok\n127.0.0.1:8080\nnonsense\n\n10.0.0.1:99999\n")
    with pytest.raises(ConfigurationError) as caught:
        read_addresses(path)
    assert caught.value.line == 3 and [p.line for p in caught.value.problems] == [3, 5]
    assert "line 3" in str(caught.value) and "line 5" in str(caught.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="cannot read"):
        read_addresses(tmp_path / "none.txt")


@pytest.mark.parametrize(("host", "port"), [("127.0.0.1", 80), ("::1", 8080), ("shop.example.org", 1)])
def test_format_round_trips(host: str, port: int) -> None:
    assert parse_address(format_address(host, port)) == (host, port)
