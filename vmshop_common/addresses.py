"""Address files: ``vmshop_addresses.txt`` and ``vmplant_addresses.txt``.

As in the original, each names one server per line as ``host:port``. Blank
lines are ignored, and so is everything after a ``#``. A host is a DNS name,
an IPv4 address or a bracketed IPv6 address (``[::1]:8090``). Any other line
raises :class:`~vmshop_common.errors.ConfigurationError`, and the error names
its line.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

from .errors import ConfigurationError, Problem

_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$")


def parse_address(text: str) -> tuple[str, int]:
    """Parse one ``host:port``. Raises ValueError, with the reason, if it is not one.

    For a bracketed IPv6 address the host comes back without its brackets.
    """
    text = text.strip()
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or text[close + 1:close + 2] != ":":
            raise ValueError(f"'{text}' is not [IPv6]:port")
        host, port_text = text[1:close], text[close + 2:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"'{host}' is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"'{text}' is not host:port")
        if not _HOSTNAME.match(host):
            raise ValueError(f"'{host}' is not a host name or an IPv4 address")
        if all(part.isdigit() for part in host.split(".")):
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                raise ValueError(f"'{host}' is not a valid IPv4 address") from None
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"'{port_text}' is not a port (1-65535)")
    return host, int(port_text)


def read_addresses(path: str | Path) -> list[tuple[str, int]]:
    """The ``(host, port)`` pairs that ``path`` lists, in file order, without duplicates.

    Raises ConfigurationError if the file can't be read, or naming each line
    that is not ``host:port``.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"cannot read the address file {path}: {exc}") from None
    result: list[tuple[str, int]] = []
    problems: list[Problem] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            address = parse_address(line)
        except ValueError as exc:
            problems.append(Problem(str(exc), number))
            continue
        if address not in result:
            result.append(address)
    if problems:
        raise ConfigurationError(f"address file {path} has bad lines: line {problems[0].line}: "
                                 f"{problems[0].message}", problems)
    return result


def format_address(host: str, port: int) -> str:
    """``host:port``, with brackets around an IPv6 host (the inverse of :func:`parse_address`)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
