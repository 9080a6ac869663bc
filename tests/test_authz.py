"""The authorisation file and the rules (vmshop_common/authz.py), without a network."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmshop_common import authz
from vmshop_common.authz import ANONYMOUS, AuthorizationFile, Identity, canonical_dn, parse_line
from vmshop_common.errors import AuthenticationFailedError, ConfigurationError, NotAuthorizedError

ALICE = Identity("alice", frozenset({"user"}), "CN=alice,O=Grid")
ADMIN = Identity("ops", frozenset({"admin", "user"}))
PLANT = Identity("plant1", frozenset({"plant"}), addresses=(("plant1.example.org", 8090), ("10.0.0.5", 8091)))
SHOP = Identity("shop1", frozenset({"shop"}))


@pytest.mark.parametrize(("one", "other"), [
    ("CN=Bob Smith,OU=Example,O=Grid", "/O=Grid/OU=Example/CN=Bob Smith"),
    ("cn=bob,o=Grid", "/O=Grid/CN=bob"),  # attribute types by OID, whatever their case
    ("CN=bob+UID=b7,O=Grid", "/O=Grid/UID=b7+CN=bob"),  # a multi-valued RDN, in any order
    ("emailAddress=b@x.org,CN=bob", "/CN=bob/emailAddress=b@x.org"),
    ("1.2.840.113549.1.9.1=b@x.org,CN=bob", "/CN=bob/E=b@x.org"),
    (r"CN=a\, b,O=Grid", "/O=Grid/CN=a, b"),
    (r"CN=a/b,O=Grid", r"/O=Grid/CN=a\/b"),
])
def test_both_dn_forms_name_the_same_subject(one: str, other: str) -> None:
    assert canonical_dn(one) == canonical_dn(other)


@pytest.mark.parametrize(("one", "other"), [
    ("CN=bob,O=Grid", "CN=Bob,O=Grid"),  # values exactly
    ("CN=bob,O=Grid", "O=Grid,CN=bob"),  # order matters
    ("CN=bob,O=Grid", "CN=bob,O=Grid,C=DE"),
])
def test_different_subjects_differ(one: str, other: str) -> None:
    assert canonical_dn(one) != canonical_dn(other)


@pytest.mark.parametrize(("line", "words"), [
    ('CN=bob bob user', "double quotes"),
    ('"CN=bob bob user', "closing quote"),
    ('"CN=bob"bob user', "a space must follow"),
    ('"CN=bob" bob', "DN\" NAME ROLES"),
    ('"CN=bob" bob wizard', "unknown role(s) wizard"),
    ('"CN=bob" b/b user', "not an identity name"),
    ('"CN=bob" bob user 1.2.3.4:5', "addresses are for plant identities"),
    ('"CN=bob" bob plant nohost', "not host:port"),
    ('"CN=bob" bob plant h:1 extra', "unexpected words"),
    ('"/O=Grid/XX=bob" bob user', "unknown attribute type 'XX'"),
    ('"/O=Grid//CN=bob" bob user', "empty component"),
    ('"" bob user', "empty DN"),
    ('"not a dn" bob user', "not an RFC 4514 DN"),
])
def test_bad_lines_say_why(line: str, words: str) -> None:
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        parse_line(line)


def test_a_line(tmp_path: Path) -> None:
    dn, identity = parse_line('"CN=plant1,O=Grid" plant1 plant,admin plant1.example.org:8090,[::1]:9')
    assert dn == canonical_dn("/O=Grid/CN=plant1")
    assert identity == Identity("plant1", frozenset({"plant", "admin"}), "CN=plant1,O=Grid",
                                (("plant1.example.org", 8090), ("::1", 9)))


def test_the_file(tmp_path: Path) -> None:
    path = tmp_path / "grid-mapfile"
    path.write_text('# who may call\n\n"CN=alice,O=Grid" alice user\n   "/O=Grid/CN=ops" ops admin,user\n'
                    '"CN=alice2,O=Grid" alice user   \n')
    mapfile = AuthorizationFile(path, "shop")
    assert len(mapfile) == 3
    assert mapfile.identify("CN=alice,O=Grid") == Identity("alice", frozenset({"user"}), "CN=alice,O=Grid")
    assert mapfile.identify("CN=alice2,O=Grid").name == "alice"  # two certificates, one identity
    ops = mapfile.identify("CN=ops,O=Grid")
    assert ops.is_admin and ops.subject == "CN=ops,O=Grid"  # the certificate's own form
    with pytest.raises(AuthenticationFailedError, match="'CN=mallory,O=Grid' is not in this shop's"):
        mapfile.identify("CN=mallory,O=Grid")
    with pytest.raises(AuthenticationFailedError, match="none was presented"):
        mapfile.identify(None)
    with pytest.raises(AuthenticationFailedError):
        mapfile.identify("garbage")


def test_a_bad_file_names_its_line_and_reload_keeps_the_old_mapping(tmp_path: Path) -> None:
    path = tmp_path / "grid-mapfile"
    path.write_text('"CN=alice,O=Grid" alice user\n')
    mapfile = AuthorizationFile(path)
    path.write_text('"CN=alice,O=Grid" alice user\n"CN=alice,O=Grid" other user\n')
    with pytest.raises(ConfigurationError, match="line 2: this DN is mapped already") as caught:
        mapfile.reload()
    assert caught.value.line == 2
    assert mapfile.identify("CN=alice,O=Grid").name == "alice"
    path.write_text('"CN=bob,O=Grid" bob user\n')
    assert mapfile.reload() == 1
    with pytest.raises(AuthenticationFailedError):
        mapfile.identify("CN=alice,O=Grid")
    with pytest.raises(ConfigurationError, match="cannot read"):
        AuthorizationFile(tmp_path / "missing")


def test_owners_of_new_vms() -> None:
    assert authz.owner_of_new_vm(ALICE, "") == authz.owner_of_new_vm(ALICE, None) == "alice"
    assert authz.owner_of_new_vm(ALICE, "alice") == "alice"
    with pytest.raises(NotAuthorizedError, match="only an admin names another owner"):
        authz.owner_of_new_vm(ALICE, "bob")
    assert authz.owner_of_new_vm(ADMIN, "bob") == "bob"
    with pytest.raises(NotAuthorizedError, match="not an identity name"):
        authz.owner_of_new_vm(ADMIN, "b o b")
    for caller in (PLANT, SHOP):
        with pytest.raises(NotAuthorizedError, match="needs the role user or admin"):
            authz.owner_of_new_vm(caller, "")


def test_who_manages_and_sees_what() -> None:
    assert authz.may_manage(ALICE, "alice") and not authz.may_manage(ALICE, "bob")
    assert authz.may_manage(ADMIN, "bob")
    assert not authz.may_manage(Identity("alice", frozenset({"plant"})), "alice")  # a name alone is not enough
    assert authz.visible_owner(ALICE) == "alice" and authz.visible_owner(ADMIN) is None
    with pytest.raises(NotAuthorizedError):
        authz.visible_owner(SHOP)


@pytest.mark.parametrize(("caller", "url", "allowed"), [
    (PLANT, "https://plant1.example.org:8090/", True),
    (PLANT, "https://PLANT1.example.org:8090", True),
    (PLANT, "http://10.0.0.5:8091/", True),
    (PLANT, "https://plant2.example.org:8090/", False),
    (PLANT, "https://plant1.example.org:8091/", False),
    (PLANT, "not a url", False),
    (PLANT, "https://plant1.example.org:99999/", False),
    (ADMIN, "https://anywhere:1/", True),
    (ALICE, "https://plant1.example.org:8090/", False),
    (Identity("alice", frozenset({"user"}), addresses=(("plant1.example.org", 8090),)),
     "https://plant1.example.org:8090/", False),  # addresses without the plant role count for nothing
])
def test_plant_notices(caller: Identity, url: str, allowed: bool) -> None:
    assert authz.may_notify(caller, url) is allowed


def test_roles_and_the_insecure_identity() -> None:
    authz.require(SHOP, authz.PLANT_CALLERS, "call this plant")
    authz.require(ADMIN, authz.PLANT_CALLERS, "call this plant")
    with pytest.raises(NotAuthorizedError, match="alice may not call this plant: that needs the role shop or admin"):
        authz.require(ALICE, authz.PLANT_CALLERS, "call this plant")
    assert ANONYMOUS.roles == authz.ROLES and authz.Insecure().identify(None) is ANONYMOUS
