"""Image names: the one rule the shop, the plants and the CLI check them by.

An image name is hostile input (a publish names the image to make): the
pattern keeps it a single path component that is never '.', '..', hidden or
an option, and the same in an image configuration file's ``name``
(``xsd/vmimage-1.1.xsd``).
"""

from __future__ import annotations

import re

from .errors import ImageNameInvalidError

IMAGE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")


def check_image_name(name: object) -> str:
    """``name`` if it can name an image (``[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}``); else ImageNameInvalidError."""
    if not isinstance(name, str) or not IMAGE_NAME.fullmatch(name):
        shown = repr(name)[:80] if isinstance(name, str) else type(name).__name__
        raise ImageNameInvalidError(f"{shown} is not an image name: 1 to 64 letters, digits, '_', '.' or '-', "
                                    "not starting with '.' or '-'")
    return name
