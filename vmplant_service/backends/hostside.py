"""What every backend reads on the host side: its options, the host's memory, the end of a log.

* :func:`positive_number` and :func:`choice` read one backend option from
  the plant configuration's ``<backend>`` options; a bad value is a
  ``ConfigurationError`` that names the backend and the option.
* :func:`host_memory_mib` is the host's total memory (0 when unknown).
* :func:`tail` is the last bytes of a file (a guest console, a hypervisor's
  stderr) as text, reading only that end; '' when the file cannot be read.
"""

from __future__ import annotations

import os

from vmshop_common.errors import ConfigurationError


def positive_number(options: dict[str, str], name: str, default: float, backend: str) -> float:
    """Option ``name`` as a number > 0, or ``default`` when it is not set."""
    value = options.get(name)
    if value is None:
        return default
    try:
        number = float(value)
    except ValueError:
        raise ConfigurationError(f"{backend} backend: option {name} must be a number, not {value!r}") from None
    if number <= 0:
        raise ConfigurationError(f"{backend} backend: option {name} must be positive")
    return number


def choice(options: dict[str, str], name: str, allowed: tuple[str, ...], default: str, backend: str) -> str:
    """Option ``name``, one of ``allowed`` (``default`` when it is not set)."""
    value = options.get(name, default)
    if value not in allowed:
        raise ConfigurationError(f"{backend} backend: {name} must be one of {', '.join(allowed)}, not {value!r}")
    return value


def host_memory_mib() -> int:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def tail(path: str | os.PathLike[str], limit: int = 2000) -> str:
    """The last ``limit`` bytes of ``path``, decoded (bad bytes replaced) and stripped."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(handle.tell() - limit, 0))
            data = handle.read()
    except OSError:
        return ""
    return data.decode(errors="replace").strip()


__all__ = ["choice", "host_memory_mib", "positive_number", "tail"]

