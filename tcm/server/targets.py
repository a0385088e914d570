"""Targets: saved selections of agents, and the filter language they are written in.

Pure domain code, no I/O: `parse(text)` turns a filter expression into a `Filter`, a
predicate over an *agent view* (a plain dict, built by the server from the store and the
live sessions). The grammar, in order of increasing precedence::

    expr       := or_expr
    or_expr    := and_expr ("or" and_expr)*
    and_expr   := not_expr ("and" not_expr)*
    not_expr   := "not" not_expr | primary
    primary    := "(" expr ")" | field [op value | "in" list]
    op         := "==" | "!=" | "<" | "<=" | ">" | ">=" | "~" | "!~"
    field      := NAME ("." NAME)*          e.g. os.family, memory.total, group, online
    value      := STRING | NUMBER [UNIT] | "true" | "false" | "null"
    list       := "[" [value ("," value)*] "]"

Strings are quoted with `"` or `'` (backslash escapes the next character). Numbers may carry a
size unit: B, kB/KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024), so
`memory.total > 8GiB`. `~` and `!~` match a glob pattern (fnmatch, case-sensitive). A field
alone is true when it is present and truthy (`online`, `not online`).

A field path walks dicts; on a list it walks every element, so a path names a *set* of values
(`group`, `disks.partitions.fstype`, `software.packages.name`). `==`, `~`, `<`, ... and `in`
are true when *some* value satisfies them; `!=` and `!~` are their negations (true when *no*
value equals / matches; so also true when the field is missing). Comparing values of different
kinds (a string with a number) is false, never an error.

Precedence of targets ("most specific wins"): among the targets an agent is a member of, the
one with the fewest members is the most specific; equal sizes are broken by name (the smaller
name in code point order wins). See `most_specific`.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs

MAX_LENGTH = 4096  # characters in one filter expression
MAX_DEPTH = 32  # nesting of parentheses and `not`

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # target and group names

UNITS: dict[str, int] = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}

KEYWORDS = frozenset({"and", "or", "not", "in", "true", "false", "null"})
COMPARISONS = ("==", "!=", "<=", ">=", "<", ">", "!~", "~")


class FilterError(ValueError):
    """A filter expression that does not parse, or names a field no agent view has;
    `position` is the 0-based character offset, `suggestion` a known field it may mean."""

    def __init__(self, message: str, position: int, suggestion: str | None = None):
        hint = f" \N{EM DASH} did you mean {suggestion!r}?" if suggestion else ""
        super().__init__(f"{message} at position {position}{hint}")
        self.message = message
        self.position = position
        self.suggestion = suggestion


class UnknownTarget(LookupError):
    """A target name with no saved target."""


# -- tokens ------------------------------------------------------------------------------


@attrs.frozen
class Token:
    kind: str  # "name", "string", "number", "op", "punct", "keyword", "end"
    value: Any
    position: int
    text: str


_NUMBER = re.compile(r"-?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?([A-Za-z]*)")
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")


def tokenize(text: str) -> list[Token]:
    """The tokens of `text`, ending with an "end" token; FilterError on a bad character."""
    tokens: list[Token] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
            continue
        if c in "()[],":
            tokens.append(Token("punct", c, i, c))
            i += 1
            continue
        op = next((o for o in COMPARISONS if text.startswith(o, i)), None)
        if op is not None:
            tokens.append(Token("op", op, i, op))
            i += len(op)
            continue
        if c in "\"'":
            value, end = _string(text, i)
            tokens.append(Token("string", value, i, text[i:end]))
            i = end
            continue
        m = _NUMBER.match(text, i)
        if m is not None and (c.isdigit() or c in "-."):
            tokens.append(Token("number", _number(m.group(0), m.group(1), i), i, m.group(0)))
            i = m.end()
            continue
        m = _NAME_RE.match(text, i)
        if m is not None:
            word = m.group(0)
            if m.end() < n and (text[m.end()] == "." or text[m.end()].isalnum()):
                raise FilterError(f"bad field name {text[i : m.end() + 1]!r}", i)
            kind = "keyword" if word in KEYWORDS else "name"
            tokens.append(Token(kind, word, i, word))
            i = m.end()
            continue
        raise FilterError(f"unexpected character {c!r}", i)
    tokens.append(Token("end", None, n, ""))
    return tokens


def _string(text: str, start: int) -> tuple[str, int]:
    quote = text[start]
    out = []
    i = start + 1
    while i < len(text):
        c = text[i]
        if c == "\\":
            if i + 1 >= len(text):
                break
            out.append(text[i + 1])
            i += 2
            continue
        if c == quote:
            return "".join(out), i + 1
        out.append(c)
        i += 1
    raise FilterError("unterminated string", start)


def _number(literal: str, unit: str, position: int) -> int | float:
    digits = literal[: len(literal) - len(unit)] if unit else literal
    value: int | float
    try:
        value = int(digits)
    except ValueError:
        value = float(digits)
    if value != value or value in (float("inf"), float("-inf")):
        raise FilterError(f"number out of range: {digits!r}", position)
    if unit:
        factor = UNITS.get(unit.lower())
        if factor is None:
            raise FilterError(
                f"unknown size unit {unit!r} (use B, kB, MB, GB, TB, KiB, MiB, GiB, TiB)",
                position + len(digits),
            )
        value = value * factor
        if value in (float("inf"), float("-inf")):
            raise FilterError(f"number out of range: {literal!r}", position)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
    return value


# -- the tree ----------------------------------------------------------------------------

View = Mapping[str, Any]


def values_at(view: Any, path: tuple[str, ...]) -> list[Any]:
    """Every value a field path names in a view: dicts are walked, lists fanned out."""
    current = [view]
    for segment in path:
        step: list[Any] = []
        for value in _flatten(current):
            if isinstance(value, Mapping) and segment in value:
                step.append(value[segment])
        current = step
    return list(_flatten(current))


def _flatten(values: Iterable[Any]) -> Iterable[Any]:
    for value in values:
        if isinstance(value, list | tuple):
            yield from _flatten(value)
        else:
            yield value


def _kind(value: Any) -> str | None:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return None


def _equal(a: Any, b: Any) -> bool:
    return _kind(a) is not None and _kind(a) == _kind(b) and a == b


_ORDER: dict[str, Callable[[Any, Any], bool]] = {
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
}


@attrs.frozen
class Compare:
    path: tuple[str, ...]
    op: str
    value: Any
    position: int = attrs.field(default=0, eq=False)

    def __call__(self, view: View) -> bool:
        values = values_at(view, self.path)
        op, lit = self.op, self.value
        if op == "==":
            return any(_equal(v, lit) for v in values)
        if op == "!=":
            return not any(_equal(v, lit) for v in values)
        if op == "~":
            return any(isinstance(v, str) and fnmatch.fnmatchcase(v, lit) for v in values)
        if op == "!~":
            return not any(isinstance(v, str) and fnmatch.fnmatchcase(v, lit) for v in values)
        if op == "in":
            return any(_equal(v, item) for v in values for item in lit)
        order = _ORDER[op]
        kind = _kind(lit)
        return any(
            _kind(v) == kind and kind in ("number", "string") and order(v, lit) for v in values
        )

    def fields(self) -> set[tuple[str, ...]]:
        return {self.path}

    def references(self) -> list[tuple[tuple[str, ...], int]]:
        return [(self.path, self.position)]


@attrs.frozen
class Present:
    path: tuple[str, ...]
    position: int = attrs.field(default=0, eq=False)

    def __call__(self, view: View) -> bool:
        return any(bool(v) for v in values_at(view, self.path))

    def fields(self) -> set[tuple[str, ...]]:
        return {self.path}

    def references(self) -> list[tuple[tuple[str, ...], int]]:
        return [(self.path, self.position)]


@attrs.frozen
class Not:
    operand: Any

    def __call__(self, view: View) -> bool:
        return not self.operand(view)

    def fields(self) -> set[tuple[str, ...]]:
        return self.operand.fields()

    def references(self) -> list[tuple[tuple[str, ...], int]]:
        return self.operand.references()


@attrs.frozen
class And:
    operands: tuple[Any, ...]

    def __call__(self, view: View) -> bool:
        return all(o(view) for o in self.operands)

    def fields(self) -> set[tuple[str, ...]]:
        return set().union(*(o.fields() for o in self.operands))

    def references(self) -> list[tuple[tuple[str, ...], int]]:
        return [r for o in self.operands for r in o.references()]


@attrs.frozen
class Or:
    operands: tuple[Any, ...]

    def __call__(self, view: View) -> bool:
        return any(o(view) for o in self.operands)

    def fields(self) -> set[tuple[str, ...]]:
        return set().union(*(o.fields() for o in self.operands))

    def references(self) -> list[tuple[tuple[str, ...], int]]:
        return [r for o in self.operands for r in o.references()]


@attrs.frozen
class Filter:
    """A parsed filter expression: call it with an agent view."""

    text: str
    root: Any

    def __call__(self, view: View) -> bool:
        return bool(self.root(view))

    def select(self, views: Iterable[View]) -> set[str]:
        """The ids of the views that match."""
        return {v["id"] for v in views if self(v)}

    @property
    def roots(self) -> frozenset[str]:
        """The first segment of every field read (the inventory classes it needs)."""
        return frozenset(path[0] for path in self.root.fields())


# -- the parser --------------------------------------------------------------------------


class _Parser:
    def __init__(self, text: str):
        self.tokens = tokenize(text)
        self.i = 0
        self.depth = 0

    @property
    def tok(self) -> Token:
        return self.tokens[self.i]

    def advance(self) -> Token:
        tok = self.tokens[self.i]
        if tok.kind != "end":
            self.i += 1
        return tok

    def is_(self, kind: str, value: Any = None) -> bool:
        tok = self.tok
        return tok.kind == kind and (value is None or tok.value == value)

    def expect(self, kind: str, value: Any, what: str) -> Token:
        if not self.is_(kind, value):
            raise FilterError(f"expected {what}, found {_describe(self.tok)}", self.tok.position)
        return self.advance()

    def parse(self) -> Any:
        node = self.or_expr()
        if not self.is_("end"):
            raise FilterError(
                f"expected 'and', 'or' or the end, found {_describe(self.tok)}",
                self.tok.position,
            )
        return node

    def nest(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise FilterError(f"nested deeper than {MAX_DEPTH} levels", self.tok.position)

    def or_expr(self) -> Any:
        operands = [self.and_expr()]
        while self.is_("keyword", "or"):
            self.advance()
            operands.append(self.and_expr())
        return operands[0] if len(operands) == 1 else Or(tuple(operands))

    def and_expr(self) -> Any:
        operands = [self.not_expr()]
        while self.is_("keyword", "and"):
            self.advance()
            operands.append(self.not_expr())
        return operands[0] if len(operands) == 1 else And(tuple(operands))

    def not_expr(self) -> Any:
        if self.is_("keyword", "not"):
            self.advance()
            self.nest()
            node = Not(self.not_expr())
            self.depth -= 1
            return node
        return self.primary()

    def primary(self) -> Any:
        tok = self.tok
        if self.is_("punct", "("):
            self.advance()
            self.nest()
            node = self.or_expr()
            self.depth -= 1
            self.expect("punct", ")", "')'")
            return node
        if tok.kind != "name":
            raise FilterError(
                f"expected a field name, 'not' or '(', found {_describe(tok)}", tok.position
            )
        self.advance()
        path = tuple(tok.value.split("."))
        if self.is_("op"):
            op = self.advance().value
            value_tok = self.tok
            value = self.value()
            if op in ("~", "!~") and not isinstance(value, str):
                raise FilterError(f"{op} needs a quoted glob pattern", value_tok.position)
            return Compare(path, op, value, tok.position)
        if self.is_("keyword", "in"):
            self.advance()
            return Compare(path, "in", self.list_value(), tok.position)
        return Present(path, tok.position)

    def value(self) -> Any:
        tok = self.tok
        if tok.kind in ("string", "number"):
            self.advance()
            return tok.value
        if tok.kind == "keyword" and tok.value in ("true", "false", "null"):
            self.advance()
            return {"true": True, "false": False, "null": None}[tok.value]
        raise FilterError(
            f"expected a value (a quoted string, a number, true, false or null), "
            f"found {_describe(tok)}",
            tok.position,
        )

    def list_value(self) -> tuple[Any, ...]:
        self.expect("punct", "[", "'[' opening a list")
        items: list[Any] = []
        if not self.is_("punct", "]"):
            items.append(self.value())
            while self.is_("punct", ","):
                self.advance()
                items.append(self.value())
        self.expect("punct", "]", "',' or ']'")
        return tuple(items)


def _describe(tok: Token) -> str:
    return "the end" if tok.kind == "end" else repr(tok.text)


@attrs.frozen
class FieldSet:
    """The fields agent views have, as dotted paths (`os.family`, `online`).

    A path is known when it is one of `paths` or leads to one (`os`, `disks.partitions`); a
    path ending in `.*` (`tags.*`) admits anything below its prefix."""

    paths: frozenset[str]

    @classmethod
    def of(cls, top: Iterable[str], nested: Mapping[str, Iterable[str]]) -> FieldSet:
        """Top-level fields plus each class's fields below it (`{"os": ["family"]}`)."""
        paths = set(top)
        for root, below in nested.items():
            paths.add(root)
            paths.update(f"{root}.{p}" for p in below)
        return cls(frozenset(paths))

    @property
    def names(self) -> frozenset[str]:
        """Every known path and every prefix of one (what a filter may name exactly)."""
        out: set[str] = set()
        for path in self.paths:
            parts = path.removesuffix(".*").split(".")
            out.update(".".join(parts[: i + 1]) for i in range(len(parts)))
        return frozenset(out)

    def __contains__(self, path: object) -> bool:
        if not isinstance(path, str):
            return False
        if path in self.names:
            return True
        return any(
            p.endswith(".*") and path.startswith(p[:-1]) and len(path) > len(p) - 1
            for p in self.paths
        )

    def suggest(self, path: str) -> str | None:
        """The known field closest to a misspelt one (difflib), or None."""
        close = difflib.get_close_matches(path, sorted(self.names), n=1, cutoff=0.6)
        return close[0] if close else None


def check_fields(f: Filter, known: FieldSet) -> None:
    """FilterError at the first field of `f` that no agent view has, with a suggestion."""
    for path, position in sorted(f.root.references(), key=lambda r: r[1]):
        name = ".".join(path)
        if name not in known:
            raise FilterError(f"unknown field {name!r}", position, known.suggest(name))


def parse(text: str, known: FieldSet | None = None) -> Filter:
    """Parse a filter expression; FilterError (with the position) when it is not one, or
    when it names a field outside `known` (when given)."""
    if not isinstance(text, str):
        raise FilterError("a filter must be a string", 0)
    if len(text) > MAX_LENGTH:
        raise FilterError(f"filter longer than {MAX_LENGTH} characters", MAX_LENGTH)
    if not text.strip():
        raise FilterError("empty filter", 0)
    f = Filter(text, _Parser(text).parse())
    if known is not None:
        check_fields(f, known)
    return f


# -- targets -----------------------------------------------------------------------------


@attrs.frozen
class Target:
    """A saved selection: a filter evaluated live, or a fixed list of agent ids."""

    name: str
    filter: str | None = None
    agents: tuple[str, ...] | None = None
    description: str = ""

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Target:
        """A Target from its stored row (name, filter, agents, description)."""
        agents = row["agents"]
        return cls(
            name=row["name"],
            filter=row["filter"],
            agents=tuple(agents) if agents is not None else None,
            description=row.get("description", ""),
        )

    def members(self, views: Iterable[View], known: FieldSet | None = None) -> set[str]:
        """The ids of the agents (among `views`) that this target selects now; FilterError
        when its filter does not parse or names a field outside `known` (when given)."""
        if self.filter is not None:
            return parse(self.filter, known).select(views)
        chosen = set(self.agents or ())
        return {v["id"] for v in views if v["id"] in chosen}

    def roots(self, known: FieldSet | None = None) -> frozenset[str]:
        """The top-level fields its filter reads (none for a fixed list)."""
        return parse(self.filter, known).roots if self.filter is not None else frozenset()


def most_specific(memberships: Mapping[str, set[str]], agent_id: str) -> str | None:
    """The most specific target holding `agent_id`: fewest members, then smallest name."""
    holding = [(len(m), name) for name, m in memberships.items() if agent_id in m]
    return min(holding)[1] if holding else None
