"""Step identity (vmshop_common.steps): same kind and content, same digest; nothing else counts."""

from __future__ import annotations

import hashlib
import json

import pytest

from vmshop_common.dag import Action, FileAction, MountAction, NetworkAction, ScriptAction
from vmshop_common.dagxml import load_dag
from vmshop_common.steps import DIGEST_VERSION, normalise_text, step_content, step_digest


def digest_in(document_nodes: str, node_id: str = "s") -> str:
    dag = load_dag('<vm xmlns="urn:vmshop:dag:1"><nodes><blank id="hw" memory="128" disk="1"/>'
                   f'{document_nodes}</nodes><edges><edge from="hw" to="{node_id}"/></edges></vm>')
    action = dag.nodes[node_id]
    assert isinstance(action, Action)
    return step_digest(action)


# Normalising bodies -------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, normal", [
    ("echo hi", "echo hi"),
    ("\n    echo a\n    echo b\n  ", "echo a\necho b"),
    ("\r\n  a\r\n    b\r\n", "a\n  b"),
    ("a\rb", "a\nb"),
    ("a   \nb\t\n", "a\nb"),
    ("\n\n\na\n\n\nb\n\n\n", "a\n\n\nb"),
    ("   \n\t\n", ""),
    ("", ""),
    ("  if x:\n      y\n  z", "if x:\n    y\nz"),
    ("\ta\n\tb", "a\nb"),
    ("  a\n\tb", "  a\n\tb"),  # no common indentation between spaces and a tab
])
def test_normalise_text(raw: str, normal: str) -> None:
    assert normalise_text(raw) == normal
    assert normalise_text(normal) == normal  # idempotent


# What the digest covers ------------------------------------------------------------------------------

def test_digest_is_a_sha256_over_a_versioned_canonical_form() -> None:
    action = ScriptAction("s", body="echo hi")
    canonical = json.dumps([DIGEST_VERSION, "script", {"body": "echo hi", "interpreter": "/bin/sh"}],
                           sort_keys=True, separators=(",", ":"))
    assert step_digest(action) == hashlib.sha256(canonical.encode()).hexdigest()
    assert DIGEST_VERSION == "vmshop-step-1"


def test_digest_is_stable_across_releases() -> None:
    # A cached image's history is keyed by these: a change here needs a new DIGEST_VERSION.
    assert step_digest(ScriptAction("s", body="echo hi")) == \
        hashlib.sha256(b'["vmshop-step-1","script",{"body":"echo hi","interpreter":"/bin/sh"}]').hexdigest()


@pytest.mark.parametrize("a, b", [
    (ScriptAction("a", 1, body="x"), ScriptAction("b", 2, body="x")),
    (ScriptAction("a", cost=1.0, body="x"), ScriptAction("a", cost=99.0, body="x")),
    (ScriptAction("a", body="x", script_timeout=5), ScriptAction("a", body="x", script_timeout=500)),
    (ScriptAction("a", body="  x\n  y\n"), ScriptAction("a", body="x\ny")),
    (FileAction("a", path="/etc/./x", content="c"), FileAction("b", path="/etc/x", content="c")),
    (FileAction("a", path="/etc/x/", content="c"), FileAction("b", path="/etc/x", content="c")),
    (FileAction("a", path="/x", content="\n  c\n"), FileAction("b", path="/x", content="c")),
    (NetworkAction("a", cost=3.0, mode="pool"), NetworkAction("b", mode="pool")),
    (MountAction("a", source="d", target="/mnt/d/"), MountAction("b", source="d", target="/mnt/d")),
], ids=["id-and-line", "cost", "timeout", "indentation", "dot-segment", "trailing-slash", "content-indent",
        "network-cost", "mount-slash"])
def test_same_step(a: Action, b: Action) -> None:
    assert step_digest(a) == step_digest(b)


@pytest.mark.parametrize("a, b", [
    (ScriptAction("a", body="x"), ScriptAction("a", body="y")),
    (ScriptAction("a", body="x", interpreter="/bin/sh"), ScriptAction("a", body="x", interpreter="/bin/bash")),
    (ScriptAction("a", body="if a:\n  b"), ScriptAction("a", body="if a:\nb")),  # relative indentation counts
    (ScriptAction("a", body="a\nb"), ScriptAction("a", body="a\n\nb")),
    (FileAction("a", path="/x", content="c"), FileAction("a", path="/y", content="c")),
    (FileAction("a", path="/x", content="c"), FileAction("a", path="/x", content="d")),
    (FileAction("a", path="/x", mode=0o644), FileAction("a", path="/x", mode=0o600)),
    (NetworkAction("a", mode="pool"), NetworkAction("a", mode="pool", hostname="web")),
    (NetworkAction("a", mode="static", address="10.0.0.1"), NetworkAction("a", mode="static", address="10.0.0.2")),
    (NetworkAction("a", mode="static", address="10.0.0.1"),
     NetworkAction("a", mode="static", address="10.0.0.1", prefix=16)),
    (NetworkAction("a", mode="static", address="10.0.0.1"),
     NetworkAction("a", mode="static", address="10.0.0.1", gateway="10.0.0.254")),
    (MountAction("a", source="d", target="/m"), MountAction("a", source="e", target="/m")),
    (MountAction("a", source="d", target="/m"), MountAction("a", source="d", target="/n")),
    (MountAction("a", source="d", target="/m", readonly=True),
     MountAction("a", source="d", target="/m", readonly=False)),
    (ScriptAction("a", body=""), FileAction("a", path="/", content="")),
])
def test_different_steps(a: Action, b: Action) -> None:
    assert step_digest(a) != step_digest(b)


def test_kind_is_part_of_identity_even_with_equal_content() -> None:
    # A script and a file can't have equal content dicts, but the kind is hashed anyway.
    assert '"script"' in json.dumps([DIGEST_VERSION, ScriptAction("a").kind, step_content(ScriptAction("a"))])
    assert step_content(NetworkAction("n")) == {"mode": "pool", "address": None, "prefix": 24, "gateway": None,
                                                "hostname": None}


def test_step_content_of_each_kind() -> None:
    assert step_content(ScriptAction("s", interpreter="/bin/bash", body=" x ")) == {"interpreter": "/bin/bash",
                                                                                     "body": "x"}
    assert step_content(FileAction("f", path="/a/./b", mode=0o600, content="c")) == {"path": "/a/b", "mode": 0o600,
                                                                                      "content": "c"}
    assert step_content(MountAction("m", source="d", target="/t/", readonly=False)) == {
        "source": "d", "target": "/t", "readonly": False}


def test_non_actions_have_no_digest() -> None:
    with pytest.raises(TypeError):
        step_content(Action("a"))
    with pytest.raises(TypeError):
        step_digest(Action("a"))


def test_unicode_content_is_hashed() -> None:
    assert step_digest(ScriptAction("s", body="echo ü")) != step_digest(ScriptAction("s", body="echo u"))
    assert len(step_digest(ScriptAction("s", body="echo 🙂"))) == 64


# From documents: attribute order and whitespace don't count -------------------------------------------

def test_attribute_order_does_not_count() -> None:
    assert digest_in('<file id="s" path="/etc/x" mode="0600" cost="1">c</file>') == \
        digest_in('<file cost="2" mode="0600" path="/etc/x" id="s">c</file>')


def test_mode_spelling_does_not_count() -> None:
    assert digest_in('<file id="s" path="/etc/x" mode="0600">c</file>') == \
        digest_in('<file id="s" path="/etc/x" mode="600">c</file>')


def test_default_written_or_not_is_the_same_step() -> None:
    assert digest_in('<script id="s">echo</script>') == digest_in('<script id="s" interpreter="/bin/sh">echo</script>')
    assert digest_in('<network id="s"/>') == digest_in('<network id="s" mode="pool" prefix="24"/>')
    assert digest_in('<mount id="s" source="d" target="/m"/>') == \
        digest_in('<mount id="s" source="d" target="/m" readonly="true"/>')
    assert digest_in('<mount id="s" source="d" target="/m"/>') == \
        digest_in('<mount id="s" source="d" target="/m" readonly="1"/>')


def test_indentation_of_the_document_does_not_count() -> None:
    flat = digest_in('<script id="s">apt-get update\napt-get install -y nginx</script>')
    indented = digest_in('\n        <script id="s">\n          apt-get update\n          apt-get install -y nginx\n'
                         '        </script>')
    cdata = digest_in('<script id="s"><![CDATA[\r\n    apt-get update   \r\n    apt-get install -y nginx\r\n]]>'
                      "</script>")
    assert flat == indented == cdata

