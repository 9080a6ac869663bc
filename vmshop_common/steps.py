"""Step identity: two actions with the same kind and content are the same step.

A step's digest is a SHA-256 over a canonical form of its kind and content.
What counts as content: a script's interpreter and body, a file's path, mode
and content, a network action's settings, a mount's source, target and
read-only flag. What does not: the node's id, its line, its cost hint and
its timeout, the order in which XML attributes were written, and the
indentation that XML formatting adds to a text body (bodies are
normalised: CRLF to LF, common indentation removed, trailing spaces and
leading and trailing blank lines dropped). The digest is versioned so that
a change of these rules can never silently match old histories.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import textwrap

from .dag import Action, FileAction, MountAction, NetworkAction, ScriptAction

DIGEST_VERSION = "vmshop-step-1"


def normalise_text(text: str) -> str:
    """The body as it counts for identity (see the module docstring)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = [line.rstrip() for line in textwrap.dedent(text).split("\n")]
    while lines and not lines[0]:
        lines.pop(0)
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines)


def step_content(action: Action) -> dict[str, object]:
    """The canonical content of ``action`` (what its digest covers)."""
    if isinstance(action, ScriptAction):
        return {"interpreter": action.interpreter, "body": normalise_text(action.body)}
    if isinstance(action, FileAction):
        return {"path": posixpath.normpath(action.path), "mode": action.mode,
                "content": normalise_text(action.content)}
    if isinstance(action, NetworkAction):
        return {"mode": action.mode, "address": action.address, "prefix": action.prefix,
                "gateway": action.gateway, "hostname": action.hostname}
    if isinstance(action, MountAction):
        return {"source": action.source, "target": posixpath.normpath(action.target),
                "readonly": action.readonly}
    raise TypeError(f"not an action: {action!r}")


def step_digest(action: Action) -> str:
    """The stable hex digest of ``action``'s step."""
    canonical = json.dumps([DIGEST_VERSION, action.kind, step_content(action)],
                           sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()
