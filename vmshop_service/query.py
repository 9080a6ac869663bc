"""Attribute-value queries over the VM registry (the shop's *Query* operation).

Syntax
======

A query is a conjunction of terms separated by whitespace; an optional
literal ``and`` (any case) may stand between two terms. A term is::

    name OP value

with no spaces inside it (unless inside a quoted value).

- ``name``: an attribute name, ``[A-Za-z0-9_][A-Za-z0-9_.-]*`` (the DAG's
  attribute-name alphabet). Built-in names are listed in
  :data:`BUILTIN_ATTRIBUTES`; any other name is a user attribute, one the
  VMs' DAGs declared.
- ``OP``: ``=``, ``!=``, ``<``, ``<=``, ``>``, ``>=``, or ``^=`` (prefix
  match: the VM's value starts with the query's value).
- ``value``: a bare word (any characters but whitespace, quotes and the
  operator characters ``= < > ! ^``) or a double-quoted string in which
  ``\\"`` stands for ``"`` and ``\\\\`` for ``\\`` (no other escapes).

Examples::

    memory>=256 state=running
    project="climate model" owner^=ali
    owner=alice and arch=x86_64 and cost<10.5
    created>=2024-05-01T00:00:00Z            (times: epoch seconds or ISO 8601, UTC if no zone)
    note="say \\"hi\\""

The empty query (only whitespace) has no terms and matches every VM.
Limits: at most :data:`MAX_TERMS` terms and :data:`MAX_LENGTH` characters.

Semantics
=========

- Numeric built-ins (:data:`NUMERIC_ATTRIBUTES`) are compared as numbers by
  every operator but ``^=``, which they refuse; their value must be a number
  (time attributes also take an ISO 8601 date-time), else the query is invalid.
- String built-ins are compared as strings (code point order) by every
  operator; ``^=`` is a prefix match.
- User attributes: ``=`` and ``!=`` compare strings (``project=1`` does not
  match ``1.0``); ``<``, ``<=``, ``>``, ``>=`` compare numerically when both the
  query's value and the VM's stored value are numbers, else as strings;
  ``^=`` is a string prefix match.
- ``!=`` on a user attribute matches the VMs that *have* the attribute with
  another value; a VM without the attribute matches no term on it.
  Likewise a VM with no value (NULL) for a built-in (e.g. no termination time
  yet) matches no term on that attribute, ``!=`` included.
- A name that is neither built-in nor was ever stored as a user attribute
  makes the query invalid ("unknown attribute"). Built-in names take
  precedence over user attributes of the same name.
- "Number" means a finite decimal literal: ``[+-]?(D+[.D*]|.D+)([eE][+-]?D+)?``
  (no ``inf``, ``nan``, hex, or underscores).

Every error is a :class:`~vmshop_common.errors.QueryInvalidError` whose
message names the term (its index and text) and the column (1-based), e.g.
``term 2 'memory>>3' at column 14: unknown operator '>>'``.

Compilation (:func:`compile_query`) produces parameterized SQL: values are
always bound parameters, names come only from the known set, and each
user-attribute term is an ``IN`` subquery on the indexed ``vm_attributes``
table, so selective queries are answered from indexes.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import NamedTuple

from vmshop_common.errors import QueryInvalidError
from vmshop_common.vmfields import QUERYABLE

MAX_TERMS = 32
MAX_LENGTH = 4096

OPERATORS: frozenset[str] = frozenset({"=", "!=", "<", "<=", ">", ">=", "^="})

# The built-in attributes are the VM fields declared queryable (vmshop_common.vmfields), by kind.
NUMERIC_ATTRIBUTES: frozenset[str] = frozenset(f.name for f in QUERYABLE if f.kind in ("int", "float"))
TIME_ATTRIBUTES: frozenset[str] = frozenset({"created", "updated", "termination"})
STRING_ATTRIBUTES: frozenset[str] = frozenset(f.name for f in QUERYABLE if f.kind == "str")
#: Queryable built-in attributes: each is a column of the ``vms`` table with its own index.
BUILTIN_ATTRIBUTES: frozenset[str] = NUMERIC_ATTRIBUTES | STRING_ATTRIBUTES

#: What an attribute name is (the DAG's attribute-name alphabet, any length).
ATTRIBUTE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")
_NAME = ATTRIBUTE_NAME
_OPERATOR_CHARS = "=<>!^"
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_SURROGATE = re.compile("[\ud800-\udfff]")
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f\ud800-\udfff]")
_MAX_CHAR = 0x10FFFF


class Term(NamedTuple):
    """One comparison ``name op value``; ``value`` is the unquoted text."""

    name: str
    op: str
    value: str

    def __str__(self) -> str:
        return f"{self.name}{self.op}{quote_value(self.value)}"


#: A parsed query: the conjunction of its terms (the empty tuple matches everything).
Query = tuple[Term, ...]


def quote_value(value: str) -> str:
    """Render ``value`` as query text: bare when it can be, else double-quoted with escapes."""
    if value and not any(c.isspace() or c in _OPERATOR_CHARS or c in "\"'" for c in value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def format_query(query: Query) -> str:
    """Render a parsed query as text that :func:`parse_query` reads back to the same terms."""
    return " ".join(str(term) for term in query)


def parse_number(text: str) -> float | None:
    """The value of ``text`` when it is a finite decimal number literal, else ``None``."""
    if len(text) > 400 or not _NUMBER.fullmatch(text):
        return None
    value = float(text)
    return value if math.isfinite(value) else None


def parse_time(text: str) -> float | None:
    """Epoch seconds from a number or an ISO 8601 date-time (UTC when it has no zone); else ``None``."""
    number = parse_number(text)
    if number is not None:
        return number
    if not text[:1].isdigit() or len(text) > 64:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


# Parsing ----------------------------------------------------------------------------------------------


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.terms: list[Term] = []

    def error(self, start: int, at: int, reason: str) -> QueryInvalidError:
        excerpt = self._term_text(start)
        return QueryInvalidError(f"term {len(self.terms) + 1} '{excerpt}' at column {at + 1}: {reason}")

    def _term_text(self, start: int) -> str:
        """The raw text of the term that starts at ``start`` (up to whitespace outside quotes), shortened."""
        text, i, quoted = self.text, start, False
        while i < len(text):
            c = text[i]
            if quoted and c == "\\":
                i += 2
                continue
            if c == '"':
                quoted = not quoted
            elif c.isspace() and not quoted:
                break
            i += 1
        return _shorten(text[start:i])

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def at_connective(self) -> bool:
        """True when ``and`` (any case) stands at pos followed by whitespace or the end."""
        text, pos = self.text, self.pos
        if text[pos:pos + 3].lower() != "and":
            return False
        return pos + 3 == len(text) or text[pos + 3].isspace()

    def parse(self) -> Query:
        if len(self.text) > MAX_LENGTH:
            raise QueryInvalidError(f"query is {len(self.text)} characters long; the limit is {MAX_LENGTH}")
        pending_and: int | None = None  # column of an 'and' still waiting for its right-hand term
        self.skip_space()
        while self.pos < len(self.text):
            if self.at_connective():
                if not self.terms or pending_and is not None:
                    raise QueryInvalidError(
                        f"'and' at column {self.pos + 1} must stand between two terms"
                    )
                pending_and = self.pos
                self.pos += 3
                self.skip_space()
                continue
            if len(self.terms) == MAX_TERMS:
                raise QueryInvalidError(f"query has more than {MAX_TERMS} terms; the limit is {MAX_TERMS}")
            term_start = self.pos
            term = self.parse_term()
            if self.pos < len(self.text) and not self.text[self.pos].isspace():
                raise self.error(term_start, self.pos, "unexpected text after the value; "
                                 "terms must be separated by whitespace")
            self.terms.append(term)
            pending_and = None
            self.skip_space()
        if pending_and is not None:
            raise QueryInvalidError(f"'and' at column {pending_and + 1} must stand between two terms")
        return tuple(self.terms)

    def parse_term(self) -> Term:
        text, start = self.text, self.pos
        match = _NAME.match(text, start)
        if match is None:
            if text[start] in _OPERATOR_CHARS:
                raise self.error(start, start, "missing attribute name before the operator")
            raise self.error(start, start, f"expected an attribute name, found {text[start]!r}")
        name = match.group()
        self.pos = match.end()
        op_start = self.pos
        while self.pos < len(text) and text[self.pos] in _OPERATOR_CHARS:
            self.pos += 1
        op = text[op_start:self.pos]
        if not op:
            if self.pos == len(text) or text[self.pos].isspace():
                raise self.error(start, op_start,
                                 "missing operator (one of = != < <= > >= ^=; no spaces inside a term)")
            raise self.error(start, op_start, f"unexpected character {text[op_start]!r} after the attribute name")
        if op not in OPERATORS:
            raise self.error(start, op_start, f"unknown operator '{op}'")
        value_start = self.pos
        value = self.parse_value(start)
        if "\x00" in value:
            raise self.error(start, value_start, "the value contains a NUL character")
        if _SURROGATE.search(value):
            raise self.error(start, value_start, "the value is not valid Unicode (lone surrogate)")
        return Term(name, op, value)

    def parse_value(self, start: int) -> str:
        text = self.text
        value_start = self.pos
        if self.pos == len(text) or text[self.pos].isspace():
            raise self.error(start, value_start, 'missing value (use "" for the empty string)')
        if text[self.pos] == '"':
            return self.parse_quoted(start)
        while self.pos < len(text) and not text[self.pos].isspace():
            c = text[self.pos]
            if c == '"' or c == "'":
                raise self.error(start, self.pos,
                                 "a quote inside a bare value; quote the whole value with double quotes")
            if c in _OPERATOR_CHARS:
                raise self.error(start, self.pos,
                                 f"operator character {c!r} inside a bare value; quote the value")
            self.pos += 1
        return text[value_start:self.pos]

    def parse_quoted(self, start: int) -> str:
        text = self.text
        open_quote = self.pos
        self.pos += 1
        out: list[str] = []
        while True:
            if self.pos >= len(text):
                raise self.error(start, open_quote, "unterminated quoted value")
            c = text[self.pos]
            if c == '"':
                self.pos += 1
                return "".join(out)
            if c == "\\":
                escaped = text[self.pos + 1:self.pos + 2]
                if escaped not in ('"', "\\"):
                    shown = "\\" + escaped if escaped else "\\ at the end"
                    raise self.error(start, self.pos, f"bad escape '{shown}' (only \\\" and \\\\ are allowed)")
                out.append(escaped)
                self.pos += 2
                continue
            out.append(c)
            self.pos += 1


#: How many query texts :func:`parse_query` keeps parsed (at most :data:`MAX_LENGTH` characters each).
PARSED_QUERIES = 256


def parse_query(text: str) -> Query:
    """Parse query text into its terms.

    Checks the syntax only (attribute names are checked against a registry
    by :func:`compile_query`). Raises :class:`QueryInvalidError` naming the
    term and the column of the first problem.
    """
    if not isinstance(text, str):
        raise QueryInvalidError(f"a query is text, not {type(text).__name__}")
    return _parsed(str(text))


@functools.lru_cache(maxsize=PARSED_QUERIES)
def _parsed(text: str) -> Query:
    """The terms of ``text``, kept for the last :data:`PARSED_QUERIES` texts (clients repeat their queries;
    a :data:`Query` is immutable). A text that does not parse raises each time."""
    return _Parser(text).parse()


# Compilation ------------------------------------------------------------------------------------------


def _prefix_successor(prefix: str) -> str | None:
    """The least string greater than every string that starts with ``prefix`` (None: no such bound)."""
    chars = list(prefix)
    while chars and ord(chars[-1]) == _MAX_CHAR:
        chars.pop()
    if not chars:
        return None
    nxt = ord(chars[-1]) + 1
    if 0xD800 <= nxt <= 0xDFFF:
        nxt = 0xE000
    chars[-1] = chr(nxt)
    return "".join(chars)


def _shorten(text: str) -> str:
    """``text`` fit for an error message: at most 60 characters, control characters and surrogates as U+FFFD."""
    text = _UNPRINTABLE.sub("\ufffd", text)
    return text if len(text) <= 60 else text[:57] + "..."


def _describe(index: int, term: Term) -> str:
    return f"term {index} '{_shorten(str(term))}'"


def _prefix_sql(column: str, prefix: str, params: list[object]) -> str:
    """A range on ``column`` equal to "starts with ``prefix``" that an index on it can serve."""
    upper = _prefix_successor(prefix)
    params.append(prefix)
    if upper is None:
        return f"{column} >= ?"
    params.append(upper)
    return f"({column} >= ? AND {column} < ?)"


_SQL_OP = {"=": "=", "!=": "!=", "<": "<", "<=": "<=", ">": ">", ">=": ">="}


def _check_term(index: int, term: Term) -> None:
    if not isinstance(term, Term) or not _NAME.fullmatch(term.name) or term.op not in OPERATORS:
        raise QueryInvalidError(f"term {index} is not a valid term: {term!r}")
    if not isinstance(term.value, str) or "\x00" in term.value or _SURROGATE.search(term.value):
        raise QueryInvalidError(f"{_describe(index, term)}: the value is not valid text")


def compile_query(query: Query, is_user_attribute: Callable[[str], bool],
                  column: Callable[[str], str] | None = None,
                  value_prefix: int | None = None) -> tuple[str, list[object]]:
    """Translate ``query`` into a SQL condition on table ``vms`` and its bound parameters.

    ``is_user_attribute(name)`` tells whether a user attribute of that name was
    ever stored. The condition references ``vms.<column>`` for built-ins and
    ``vm_attributes(vm_id, name, value, num)`` for user attributes; the
    empty query gives ``"1"``. Values only ever appear as parameters; column
    names only from :data:`BUILTIN_ATTRIBUTES`.

    ``column(name)`` writes a numeric built-in column (default ``vms.<name>``; PostgreSQL casts its
    integer columns to doubles, as their indexes are). ``value_prefix``: see :func:`_user_term_sql`.

    Raises :class:`QueryInvalidError` for an unknown attribute, a non-number
    value for a numeric attribute, ``^=`` on a numeric attribute, or too many terms.
    """
    if len(query) > MAX_TERMS:
        raise QueryInvalidError(f"query has {len(query)} terms; the limit is {MAX_TERMS}")
    clauses: list[str] = []
    params: list[object] = []
    for index, term in enumerate(query, start=1):
        _check_term(index, term)
        name, op, value = term
        if name in NUMERIC_ATTRIBUTES:
            if op == "^=":
                raise QueryInvalidError(f"{_describe(index, term)}: '^=' needs a string attribute; "
                                        f"'{name}' is numeric")
            number = parse_time(value) if name in TIME_ATTRIBUTES else parse_number(value)
            if number is None:
                kind = "a number or an ISO 8601 date-time" if name in TIME_ATTRIBUTES else "a number"
                raise QueryInvalidError(f"{_describe(index, term)}: '{name}' is numeric; the value must be {kind}")
            clauses.append(f"{column(name) if column else f'vms.{name}'} {_SQL_OP[op]} ?")
            params.append(number)
        elif name in STRING_ATTRIBUTES:
            if op == "^=":
                clauses.append(_prefix_sql(f"vms.{name}", value, params))
            else:
                clauses.append(f"vms.{name} {_SQL_OP[op]} ?")
                params.append(value)
        else:
            if not is_user_attribute(name):
                raise QueryInvalidError(f"{_describe(index, term)}: unknown attribute '{name}'")
            clauses.append(_user_term_sql(name, op, value, params, value_prefix))
    if not clauses:
        return "1", params
    return " AND ".join(clauses), params


def _user_term_sql(name: str, op: str, value: str, params: list[object], value_prefix: int | None = None) -> str:
    """An ``IN`` subquery on ``vm_attributes`` served by index (name, value) or (name, num).

    ``value_prefix``: the index holds only the first that many characters of each value (PostgreSQL: a
    B-tree entry has a size limit a 1024-character value may pass); each string comparison then also
    states what it implies for those characters, which the index serves, and the full comparison decides.
    """
    select = "SELECT a.vm_id FROM vm_attributes AS a WHERE a.name = ?"

    def compare(op: str, value: str) -> str:
        """``a.value OP ?`` (its parameters added), with the prefix condition it implies."""
        if op == "^=":
            if value_prefix is None:
                return _prefix_sql("a.value", value, params)
            short = f"left(a.value, {value_prefix})"
            if len(value) <= value_prefix:
                implied = _prefix_sql(short, value, params)
            else:
                params.append(value[:value_prefix])
                implied = f"{short} = ?"
            return f"{implied} AND {_prefix_sql('a.value', value, params)}"
        if value_prefix is None or op == "!=":
            params.append(value)
            return f"a.value {_SQL_OP[op]} ?"
        # a = b, a < b, a <= b, ... imply the same (or the non-strict) order of their first N characters.
        implied_op = {"=": "=", "<": "<=", "<=": "<=", ">": ">=", ">=": ">="}[op]
        params.extend((value[:value_prefix], value))
        return f"left(a.value, {value_prefix}) {implied_op} ? AND a.value {_SQL_OP[op]} ?"

    if op == "^=" or op in ("=", "!="):
        params.append(name)
        return f"vms.vm_id IN ({select} AND {compare(op, value)})"
    number = parse_number(value)
    if number is None:
        params.append(name)
        return f"vms.vm_id IN ({select} AND {compare(op, value)})"
    # Numbers against numbers through (name, num); the non-numeric stored values as strings through (name, value).
    params.extend((name, number, name))
    return (f"vms.vm_id IN ({select} AND a.num {_SQL_OP[op]} ? "
            f"UNION ALL {select} AND {compare(op, value)} AND a.num IS NULL)")
