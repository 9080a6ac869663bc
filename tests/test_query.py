"""The query language: parsing, error positions, compilation to parameterized SQL."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmshop_common.errors import QueryInvalidError
from vmshop_service.query import (
    MAX_LENGTH,
    MAX_TERMS,
    OPERATORS,
    Term,
    compile_query,
    format_query,
    parse_number,
    parse_query,
    parse_time,
    quote_value,
)

# Parsing -----------------------------------------------------------------------------------------------


def test_parse_simple_terms() -> None:
    assert parse_query("memory>=256 state=running") == (Term("memory", ">=", "256"), Term("state", "=", "running"))


def test_parse_every_operator() -> None:
    for op in sorted(OPERATORS):
        assert parse_query(f"x{op}5") == (Term("x", op, "5"),)


def test_parse_quoted_values_and_escapes() -> None:
    assert parse_query('project="climate model" owner^=ali') == (
        Term("project", "=", "climate model"), Term("owner", "^=", "ali"))
    assert parse_query(r'note="say \"hi\" \\o/"') == (Term("note", "=", 'say "hi" \\o/'),)
    assert parse_query('a=""') == (Term("a", "=", ""),)
    assert parse_query('a="x=1 AND y<2"') == (Term("a", "=", "x=1 AND y<2"),)


def test_parse_optional_and() -> None:
    expected = (Term("a", "=", "1"), Term("b", "=", "two words"), Term("c", "^=", "x"))
    assert parse_query('a=1 and b="two words" AND c^=x') == expected
    assert parse_query('a=1 b="two words" c^=x') == expected


def test_and_as_an_attribute_name() -> None:
    assert parse_query("and=1 and and=2") == (Term("and", "=", "1"), Term("and", "=", "2"))


def test_parse_whitespace_and_empty() -> None:
    assert parse_query("") == ()
    assert parse_query("  \t\n ") == ()
    assert parse_query("\ta=1\n\nb<2  ") == (Term("a", "=", "1"), Term("b", "<", "2"))


def test_bare_value_characters() -> None:
    assert parse_query("address^=10.0.% plant=host-1:9000 x=a\\b") == (
        Term("address", "^=", "10.0.%"), Term("plant", "=", "host-1:9000"), Term("x", "=", "a\\b"))


def _error(text: str) -> str:
    with pytest.raises(QueryInvalidError) as info:
        parse_query(text)
    assert info.value.code == "Client.QueryInvalid"
    return str(info.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("memory>=256 memory>>3", "term 2 'memory>>3' at column 19: unknown operator '>>'"),
        ("a==1", "term 1 'a==1' at column 2: unknown operator '=='"),
        ("a=<1", "term 1 'a=<1' at column 2: unknown operator '=<'"),
        ("a!1", "term 1 'a!1' at column 2: unknown operator '!'"),
        ("memory", "term 1 'memory' at column 7: missing operator"),
        ("memory 256", "term 1 'memory' at column 7: missing operator"),
        ("=5", "term 1 '=5' at column 1: missing attribute name"),
        ("a=1 =5", "term 2 '=5' at column 5: missing attribute name"),
        ('"a"=1', "term 1 '\"a\"=1' at column 1: expected an attribute name"),
        ("a=", "term 1 'a=' at column 3: missing value"),
        ("a=1 b= c=3", "term 2 'b=' at column 7: missing value"),
        ('a="abc', "term 1 'a=\"abc' at column 3: unterminated quoted value"),
        (r'a="x\q"', "term 1 'a=\"x\\q\"' at column 5: bad escape '\\q'"),
        ('a="x\\', "at column 5: bad escape"),
        ('a="x"b', "term 1 'a=\"x\"b' at column 6: unexpected text after the value"),
        ("a=b'c", "term 1 'a=b'c' at column 4: a quote inside a bare value"),
        ("a=' OR 1=1 --", "term 1 'a='' at column 3: a quote inside a bare value"),
        ("a=b=c", "term 1 'a=b=c' at column 4: operator character '=' inside a bare value"),
        ("a$=1", "term 1 'a$=1' at column 2: unexpected character '$' after the attribute name"),
        ("and a=1", "'and' at column 1 must stand between two terms"),
        ("a=1 and", "'and' at column 5 must stand between two terms"),
        ("a=1 and and b=2", "'and' at column 9 must stand between two terms"),
        ("a=\x00", "term 1 'a=\ufffd' at column 3: the value contains a NUL character"),
        ("a=\ud800", "term 1 'a=\ufffd' at column 3: the value is not valid Unicode"),
    ],
)
def test_parse_errors_name_term_and_column(text: str, message: str) -> None:
    assert message in _error(text)


def test_limits() -> None:
    assert len(parse_query(" ".join(f"a{i}={i}" for i in range(MAX_TERMS)))) == MAX_TERMS
    assert f"the limit is {MAX_TERMS}" in _error(" ".join(f"a{i}={i}" for i in range(MAX_TERMS + 1)))
    assert f"the limit is {MAX_LENGTH}" in _error("a=" + "x" * (MAX_LENGTH - 1))
    assert len(parse_query("a=" + "x" * (MAX_LENGTH - 2))) == 1


def test_not_text() -> None:
    with pytest.raises(QueryInvalidError):
        parse_query(b"a=1")  # type: ignore[arg-type]


# Numbers and times --------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["0", "-3", "+4.5", ".5", "5.", "1e3", "1E-2", "256"])
def test_numbers(text: str) -> None:
    assert parse_number(text) == float(text)


@pytest.mark.parametrize("text", ["", "inf", "nan", "Infinity", "1_000", "0x10", " 1", "1 ", "1e999", "abc", "1.2.3"])
def test_not_numbers(text: str) -> None:
    assert parse_number(text) is None


def test_times() -> None:
    assert parse_time("1714564800") == 1714564800.0
    assert parse_time("2024-05-01T12:00:00Z") == 1714564800.0
    assert parse_time("2024-05-01T12:00:00") == 1714564800.0
    assert parse_time("2024-05-01T14:00:00+02:00") == 1714564800.0
    assert parse_time("yesterday") is None


# Round trip ---------------------------------------------------------------------------------------------

_NAMES = st.from_regex(re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,10}", re.ASCII), fullmatch=True)
_VALUES = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12)


@given(st.lists(st.tuples(_NAMES, st.sampled_from(sorted(OPERATORS)), _VALUES), max_size=8))
def test_format_then_parse_round_trips(terms: list[tuple[str, str, str]]) -> None:
    query = tuple(Term(*t) for t in terms)
    text = format_query(query)
    if len(text) <= MAX_LENGTH:
        assert parse_query(text) == query


def test_quote_value() -> None:
    assert quote_value("abc") == "abc"
    assert quote_value("a b") == '"a b"'
    assert quote_value("") == '""'
    assert quote_value('x"y\\') == '"x\\"y\\\\"'


# Compilation --------------------------------------------------------------------------------------------


def _known(name: str) -> bool:
    return name in {"project", "n"}


def test_compile_is_parameterized() -> None:
    evil = "' OR 1=1 --"
    sql, params = compile_query(parse_query(f'owner="{evil}" project="{evil}"'), _known)
    assert evil not in sql and "OR 1=1" not in sql
    assert params.count(evil) == 2
    assert sql.count("?") == len(params)


def test_compile_empty_query() -> None:
    assert compile_query((), _known) == ("1", [])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("colour=red", "term 1 'colour=red': unknown attribute 'colour'"),
        ("memory=1 plant_vm_id=x", "term 2 'plant_vm_id=x': unknown attribute 'plant_vm_id'"),
        ("memory<lots", "term 1 'memory<lots': 'memory' is numeric; the value must be a number"),
        ("memory=abc", "'memory' is numeric"),
        ("cost>=inf", "'cost' is numeric"),
        ("termination<soon", "a number or an ISO 8601 date-time"),
        ("memory^=25", "term 1 'memory^=25': '^=' needs a string attribute"),
    ],
)
def test_compile_errors(text: str, message: str) -> None:
    with pytest.raises(QueryInvalidError) as info:
        compile_query(parse_query(text), _known)
    assert message in str(info.value)


def test_compile_rejects_forged_terms() -> None:
    with pytest.raises(QueryInvalidError):
        compile_query((Term("owner; DROP TABLE vms", "=", "x"),), _known)
    with pytest.raises(QueryInvalidError):
        compile_query((Term("owner", "LIKE", "x"),), _known)
    with pytest.raises(QueryInvalidError):
        compile_query(tuple(Term("owner", "=", str(i)) for i in range(MAX_TERMS + 1)), _known)


def test_compile_prefix_is_a_range() -> None:
    sql, params = compile_query(parse_query("owner^=ab%_"), _known)
    assert "LIKE" not in sql
    assert params == ["ab%_", "ab%`"]
    # The last character at U+10FFFF is dropped before incrementing; surrogates are skipped.
    _, params = compile_query((Term("owner", "^=", "a\U0010ffff"),), _known)
    assert params == ["a\U0010ffff", "b"]
    _, params = compile_query((Term("owner", "^=", "a\ud7ff"),), _known)
    assert params == ["a\ud7ff", "a\ue000"]
    sql, params = compile_query((Term("owner", "^=", ""),), _known)
    assert params == [""] and "<" not in sql
