"""Inventory freshness, the pure part (tcm/server/inventory.py)."""

from __future__ import annotations

from tcm.protocol.canonical import JSONText, canonical
from tcm.server.inventory import (
    CLASSES,
    KnownDigests,
    Staleness,
    collect_args,
    digest,
    read_result,
    refresh_plan,
    shown_result,
    stale,
    stored_summary,
)


def test_read_result_splits_sent_and_unchanged_classes():
    data = {"family": "debian"}
    got = read_result(
        {
            "classes": {"os": data},
            "digests": {"os": digest(data), "cpu": "ab" * 8},
            "collected_at": 50.0,
        },
        now=100.0,
    )
    assert got is not None
    assert got.changed == {"os": (canonical(data), digest(data))}
    assert isinstance(got.changed["os"][0], JSONText)  # kept as text, not as parsed objects
    assert got.unchanged == {"cpu": "ab" * 8}
    assert got.rejected == {}
    assert got.collected_at == 50.0
    assert got.summary() == {"changed": {"os": digest(data)[:16]}, "unchanged": {"cpu": "ab" * 8}}
    assert read_result({"classes": {}, "collected_at": 500.0}, now=100.0).collected_at == 100.0
    assert read_result({"pong": True}, 1.0) is None
    assert read_result(None, 1.0) is None
    assert read_result({"classes": {}, "collected_at": True}, 7.0).collected_at == 7.0


def test_read_result_refuses_bad_classes_one_by_one_and_keeps_the_rest():
    good = {"name": "debian"}
    got = read_result(
        {
            "classes": {
                "os": good,
                "cpu": [4],  # its digest is not the data's
                "gpu": {"x": 1},  # not a class the server knows
                "software": {"packages": ["p" * 100]},  # over the size
            },
            "digests": {
                "cpu": "0" * 64,
                "memory": "not-hex",  # unchanged, but no digest
                "disks": "a" * 8,  # unchanged, digest too short to name a version
                "users": "c" * 16,
            },
        },
        now=10.0,
        max_class_bytes=64,
        classes=CLASSES,
    )
    assert list(got.changed) == ["os"]
    assert got.unchanged == {"users": "c" * 16}
    assert set(got.rejected) == {"cpu", "gpu", "software", "memory", "disks"}
    assert "not the digest of the data sent" in got.rejected["cpu"]
    assert got.rejected["gpu"].startswith("unknown class; known classes: cpu, disks")
    assert "over the 64 bytes a class may have" in got.rejected["software"]
    assert "needs its digest" in got.rejected["memory"]
    problem = got.problem()
    assert problem.startswith("inventory refused: cpu: digest")
    assert got.summary()["rejected"] == got.rejected


def test_known_digests_per_agent_go_into_each_agents_request():
    known = KnownDigests()
    known.load({("a", "os"): "1" * 64, ("a", "cpu"): "2" * 64, ("b", "os"): "3" * 64})
    assert known.known("a") == {"os": "1" * 16, "cpu": "2" * 16}
    assert collect_args({}, known.known("a")) == {"known": {"cpu": "2" * 16, "os": "1" * 16}}
    assert collect_args({"classes": ["os"]}, known.known("a")) == {
        "classes": ["os"],
        "known": {"os": "1" * 16},
    }
    assert collect_args({"classes": ["users"]}, known.known("a")) == {"classes": ["users"]}
    assert collect_args({}, known.known("nobody")) == {}
    # arguments that name `known` themselves are the admin's: left alone
    assert collect_args({"known": {"os": "x"}}, known.known("a")) == {"known": {"os": "x"}}
    collected = read_result({"classes": {"os": "new"}}, 5.0)
    known.stored("a", collected)
    assert known.known("a")["os"] == digest("new")[:16]
    known.forget("a", "cpu")
    assert known.known("a") == {"os": digest("new")[:16]}
    known.forget("b")
    assert len(known) == 1


def test_a_target_result_shows_data_read_back_from_the_store():
    stored = {
        "inventory": {"changed": {"os": "1" * 16, "cpu": "2" * 16}, "unchanged": {"users": "3"}},
        "collected_at": 4.0,
    }
    summary = stored_summary(stored)
    shown = shown_result(stored, summary, {"os": {"name": "debian"}})
    assert shown["classes"] == {"os": {"name": "debian"}, "cpu": None}
    assert shown["purged"] == ["cpu"]  # that version is no longer kept
    assert shown["digests"] == {"os": "1" * 16, "cpu": "2" * 16, "users": "3"}
    assert shown["unchanged"] == ["users"]
    assert shown["collected_at"] == 4.0
    # past the status's budget: left out and named so, not taken for purged
    shown = shown_result(stored, summary, {}, ["os"])
    assert shown["omitted"] == ["os"] and shown["purged"] == ["cpu"]
    assert stored_summary({"classes": {}}) is None
    assert stored_summary(None) is None


def test_stale_lists_old_and_missing_pairs():
    times = {("a", "os"): 10.0, ("a", "cpu"): 95.0, ("b", "os"): 99.0}
    got = stale(times, ["b", "a"], ["os", "cpu"], now=100.0, older_than=10.0)
    assert got == [Staleness("a", "os", 10.0), Staleness("b", "cpu", None)]


def test_refresh_plan_groups_agents_by_class_set():
    items = [
        Staleness("a", "os", 1.0),
        Staleness("a", "cpu", None),
        Staleness("b", "cpu", None),
        Staleness("b", "os", 2.0),
        Staleness("c", "memory", 3.0),
    ]
    plan = refresh_plan(items)
    assert [(j.classes, j.agents) for j in plan] == [  # ordered by class set
        (("memory",), ("c",)),
        (("os", "cpu"), ("a", "b")),
    ]
    # each agent's known digests are added at dispatch (collect_args), not to the job
    assert plan[0].args() == {"classes": ["memory"]}
    assert plan[1].args() == {"classes": ["os", "cpu"]}


def test_an_unchanged_class_named_only_is_the_version_the_server_named():
    got = read_result(
        {"classes": {}, "digests": {}, "unchanged": ["os", "cpu", 7]},
        now=5.0,
        known={"os": "a" * 16},
    )
    assert got.unchanged == {"os": "a" * 16}
    assert got.rejected == {
        "cpu": "said unchanged, but the server named no version of it",
        "7": "not a class name (1..64 characters)",
    }
