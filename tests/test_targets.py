"""The filter language of targets (tcm/server/targets.py): parsing, errors, evaluation."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tcm.server.targets import FilterError, Target, most_specific, parse

DEBIAN = {
    "id": "a-1",
    "name": "web-01",
    "online": True,
    "group": ["web", "prod"],
    "os": {"family": "debian", "name": "Debian GNU/Linux 12", "version": "12"},
    "memory": {"total": 16 * 1024**3},
    "disks": {"partitions": [{"fstype": "ext4"}, {"fstype": "vfat"}]},
}
RHEL = {
    "id": "a-2",
    "name": "db-01",
    "online": False,
    "group": [],
    "os": {"family": "rhel", "version": "9"},
    "memory": {"total": 4 * 1024**3},
}
BARE = {"id": "a-3", "name": "new", "online": True, "group": []}  # no inventory yet
VIEWS = [DEBIAN, RHEL, BARE]


def select(expr: str) -> set[str]:
    return parse(expr).select(VIEWS)


@pytest.mark.parametrize(
    "expr, members",
    [
        ('os.family == "debian"', {"a-1"}),
        ("os.family == 'rhel'", {"a-2"}),
        ('os.family != "debian"', {"a-2", "a-3"}),  # != is `not ==`: missing counts
        ("memory.total > 8GiB", {"a-1"}),
        ("memory.total <= 4GiB", {"a-2"}),
        ("memory.total >= 4294967296", {"a-1", "a-2"}),
        ("memory.total < 17.2GB", {"a-1", "a-2"}),
        ('name ~ "web-*"', {"a-1"}),
        ('name !~ "web-*"', {"a-2", "a-3"}),
        ('name ~ "*-0[0-9]"', {"a-1", "a-2"}),
        ('group == "web"', {"a-1"}),
        ('not group == "web"', {"a-2", "a-3"}),
        ("online", {"a-1", "a-3"}),
        ("not online", {"a-2"}),
        ("online == false", {"a-2"}),
        ('online and os.family == "debian"', {"a-1"}),
        ('os.family == "rhel" or name == "new"', {"a-2", "a-3"}),
        ('not (os.family == "rhel" or name == "new")', {"a-1"}),
        ('disks.partitions.fstype == "vfat"', {"a-1"}),
        ('os.family in ["debian", "rhel"]', {"a-1", "a-2"}),
        ("os.family in []", set()),
        ("os", {"a-1", "a-2"}),
        ('os.version > "5"', {"a-2"}),  # strings compare as strings: "12" < "5" < "9"
        ('os.version >= "12"', {"a-1", "a-2"}),
        ("os.family == 1", set()),  # a string is never equal to a number
        ('memory.total > "8"', set()),  # nor ordered against one
        ("online == 1", set()),  # a boolean is not the number 1
        ("os.family == null", set()),
        ('a and b or os.family == "rhel"', {"a-2"}),  # and binds tighter than or
        ('id == "a-3"', {"a-3"}),
    ],
)
def test_filters_select(expr, members):
    assert select(expr) == members


def test_sizes():
    assert parse("x == 1KiB")({"x": 1024})
    assert parse("x == 1kB")({"x": 1000})
    assert parse("x == 1.5MiB")({"x": 1572864})
    assert parse("x == 2TB")({"x": 2 * 10**12})
    assert parse("x == 3b")({"x": 3})
    assert parse("x == -2")({"x": -2})


def test_roots_name_the_fields_read():
    f = parse('os.family == "debian" and (memory.total > 1GiB or not online)')
    assert f.roots == {"os", "memory", "online"}


@pytest.mark.parametrize(
    "expr, position, words",
    [
        ('os.family = "debian"', 10, "unexpected character"),
        ('os.family == "debian', 13, "unterminated string"),
        ("memory.total > 8XB", 16, "unknown size unit"),
        ('os.family == "a" and', 20, "expected a field name"),
        ("(online", 7, "expected ')'"),
        ("online online", 7, "expected 'and', 'or' or the end"),
        ("os.family == debian", 13, "expected a value"),
        ("name ~ 3", 7, "glob pattern"),
        ("os. == 1", 0, "bad field name"),
        ("", 0, "empty filter"),
        ("x in [1, ", 9, "expected a value"),
        ("x in 1", 5, "'[' opening a list"),
        ("== 1", 0, "expected a field name"),
    ],
)
def test_errors_say_where(expr, position, words):
    with pytest.raises(FilterError) as info:
        parse(expr)
    assert info.value.position == position, str(info.value)
    assert words in info.value.message
    assert str(info.value).endswith(f"at position {position}")


def test_nesting_and_length_are_bounded():
    with pytest.raises(FilterError, match="nested deeper"):
        parse("(" * 100 + "online" + ")" * 100)
    with pytest.raises(FilterError, match="nested deeper"):
        parse("not " * 100 + "online")
    with pytest.raises(FilterError, match="longer than"):
        parse("online or " * 1000 + "online")
    assert parse("(" * 10 + "online" + ")" * 10)(BARE)


def test_static_and_filter_targets():
    static = Target("picked", agents=("a-2", "a-9"))
    assert static.members(VIEWS) == {"a-2"}  # an agent gone is not a member
    assert static.roots() == frozenset()
    dynamic = Target("debian", filter='os.family == "debian"')
    assert dynamic.members(VIEWS) == {"a-1"}
    assert dynamic.roots() == {"os"}


def test_most_specific_is_the_smallest_then_the_first_name():
    memberships = {"all": {"a", "b", "c"}, "web": {"a", "b"}, "pair": {"a", "c"}}
    assert most_specific(memberships, "a") == "pair"  # two members each: name decides
    assert most_specific(memberships, "c") == "pair"
    assert most_specific(memberships, "b") == "web"
    assert most_specific(memberships, "z") is None


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_text_raises_only_the_parse_error(text):
    try:
        f = parse(text)
    except FilterError as e:
        assert 0 <= e.position <= len(text)
    else:
        for view in VIEWS:
            assert f(view) in (True, False)


ALPHABET = list("abos.()\"' =!<>~-019GiBkM[],\\ ") + ["and ", "or ", "not ", "in ", "true"]


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(ALPHABET), max_size=40).map("".join))
def test_filter_like_text_raises_only_the_parse_error(text):
    try:
        f = parse(text)
    except FilterError as e:
        assert 0 <= e.position <= len(text)
    else:
        for view in VIEWS:
            assert f(view) in (True, False)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from("abos"), inner),
    max_leaves=10,
)
_field = st.lists(st.sampled_from(["a", "b", "os", "s"]), min_size=1, max_size=3).map(".".join)
_literal = st.sampled_from(['"x*"', "1", "8GiB", "true", "null", "'a'", "-2.5"])


@st.composite
def _exprs(draw, depth=0):
    if depth > 3 or draw(st.booleans()):
        field = draw(_field)
        op = draw(st.sampled_from(["==", "!=", "<", "<=", ">", ">=", "~", "!~", "in", ""]))
        if op == "":
            return field
        if op == "in":
            return f"{field} in [{', '.join(draw(st.lists(_literal, max_size=3)))}]"
        value = '"g?*"' if op in ("~", "!~") else draw(_literal)
        return f"{field} {op} {value}"
    kind = draw(st.sampled_from(["and", "or", "not", "()"]))
    if kind == "not":
        return f"not {draw(_exprs(depth + 1))}"
    if kind == "()":
        return f"({draw(_exprs(depth + 1))})"
    return f"{draw(_exprs(depth + 1))} {kind} {draw(_exprs(depth + 1))}"


@settings(max_examples=300, deadline=None)
@given(_exprs(), st.dictionaries(st.sampled_from(["a", "b", "os", "s"]), _json))
def test_valid_filters_parse_and_evaluate_on_any_view(expr, view):
    f = parse(expr)
    assert f({**view, "id": "x"}) in (True, False)
    assert parse(f"not ({expr})")(view) is not f(view)


# -- known fields (issue 15.1) ----------------------------------------------------------------

from tcm.server.selection import KNOWN_FIELDS, VIEW_FIELDS  # noqa: E402
from tcm.server.targets import FieldSet  # noqa: E402


@pytest.mark.parametrize(
    "expr, position, suggestion",
    [
        ('os.famly != "debian"', 0, "os.family"),
        ('os.famly == "debian"', 0, "os.family"),
        ("online and memory.totl > 8GiB", 11, "memory.total"),
        ("not aproved", 4, "approved"),
        ('name == "x" or (grup == "web")', 16, "group"),
        ("nosuchthing_at_all", 0, None),
    ],
)
def test_an_unknown_field_is_refused_with_its_position_and_a_suggestion(expr, position, suggestion):
    with pytest.raises(FilterError) as e:
        parse(expr, KNOWN_FIELDS)
    assert e.value.position == position
    assert e.value.suggestion == suggestion
    assert str(e.value).startswith("unknown field")
    if suggestion:
        assert str(e.value).endswith(f"\N{EM DASH} did you mean {suggestion!r}?")
    parse(expr)  # without a field set, the language alone accepts it


def test_the_documented_message():
    with pytest.raises(FilterError) as e:
        parse('os.famly == "debian"', KNOWN_FIELDS)
    assert str(e.value) == (
        "unknown field 'os.famly' at position 0 \N{EM DASH} did you mean 'os.family'?"
    )


DOCUMENTED = [
    # every field docs/operating.md names in the filter section
    "id", "name", "platform", "online", "mode", "group", "approved", "enrolled_at", "last_seen",
    "os.family", "os.version", "hostname.fqdn", "cpu.logical", "memory.total",
    "disks.partitions.fstype", "disks.partitions.free", "network.interfaces.addresses.address",
    "software.packages.name", "users.users.name", "os",
]  # fmt: skip


@pytest.mark.parametrize("field", DOCUMENTED)
def test_every_documented_field_is_known(field):
    assert field in KNOWN_FIELDS
    parse(f"{field} == 1 or not {field}", KNOWN_FIELDS)


def test_documented_fields_are_the_ones_in_operating_md():
    import os
    import re

    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "operating.md")).read()
    section = doc.split("### The filter language", 1)[1].split("\n## ", 1)[0]
    fields = section.split("- **Fields**", 1)[1].split("\n- ", 1)[0]
    named = set(re.findall(r"`([a-z_]+(?:\.[a-z_]+)*)`", fields))
    assert named <= KNOWN_FIELDS.names  # the documentation names no field the server refuses
    assert VIEW_FIELDS <= named  # and it names every field of the agent's own


def test_not_approved_selects_agents_awaiting_approval():
    views = [{**DEBIAN, "approved": True}, {**RHEL, "approved": False}]
    assert parse("not approved", KNOWN_FIELDS).select(views) == {"a-2"}
    assert parse("approved", KNOWN_FIELDS).select(views) == {"a-1"}


def test_field_set_prefixes_and_open_subtrees():
    known = FieldSet.of({"online"}, {"os": ["family"], "tags": ["*"]})
    assert "os" in known and "os.family" in known and "online" in known
    assert "os.fam" not in known and "os.family.x" not in known
    assert "tags.owner" in known and "tags.a.b" in known
    assert "tags" in known
    assert known.suggest("onlin") == "online"


def test_a_saved_target_with_an_unknown_field_has_no_members_only_when_checked():
    target = Target("t", filter='os.famly != "debian"')
    assert target.members(VIEWS) == {"a-1", "a-2", "a-3"}  # the silent selection of issue 15
    with pytest.raises(FilterError):
        target.members(VIEWS, KNOWN_FIELDS)


def _paths(value, prefix: str = ""):
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, f"{prefix}.{k}" if prefix else k)
    elif isinstance(value, list):
        for item in value:
            yield from _paths(item, prefix)
    else:
        yield prefix


def test_the_builtin_collectors_produce_only_known_fields():
    from tcm.plugins import builtin_inventory
    from tcm.server import inventory

    assert set(inventory.FIELDS) == set(inventory.CLASSES)
    sample = {
        "users": {"users": [{"name": "u", "terminal": "t", "host": "h", "started": 1, "pid": 2}]},
        "disks": {"partitions": [{"device": "d", "mountpoint": "/", "fstype": "ext4",
                                  "total": 1, "used": 1, "free": 0}]},
    }  # fmt: skip
    for cls, collect in builtin_inventory.COLLECTORS.items():
        data = collect()
        for path in _paths({cls: data}):
            assert path in KNOWN_FIELDS, path
    for cls, data in sample.items():
        for path in _paths({cls: data}):
            assert path in KNOWN_FIELDS, path
        assert set(_paths({cls: builtin_inventory.COLLECTORS[cls]()})) <= set(_paths({cls: data}))
