"""Inventory freshness, the pure part (tcm/server/inventory.py)."""

from __future__ import annotations

from tcm.server.inventory import Staleness, digest, read_result, refresh_plan, stale


def test_read_result_splits_sent_and_unchanged_classes():
    got = read_result(
        {
            "classes": {"os": {"family": "debian"}},
            "digests": {"os": "ignored-recomputed", "cpu": "d-cpu", 3: "x", "big": "y" * 65},
            "collected_at": 50.0,
        },
        now=100.0,
    )
    assert got is not None
    assert got.changed == {"os": ({"family": "debian"}, digest({"family": "debian"}))}
    assert got.unchanged == {"cpu": "d-cpu"}
    assert got.collected_at == 50.0
    assert read_result({"classes": {}, "collected_at": 500.0}, now=100.0).collected_at == 100.0
    assert read_result({"pong": True}, 1.0) is None
    assert read_result(None, 1.0) is None
    assert read_result({"classes": {}, "collected_at": True}, 7.0).collected_at == 7.0


def test_stale_lists_old_and_missing_pairs():
    times = {("a", "os"): 10.0, ("a", "cpu"): 95.0, ("b", "os"): 99.0}
    got = stale(times, ["b", "a"], ["os", "cpu"], now=100.0, older_than=10.0)
    assert got == [Staleness("a", "os", 10.0), Staleness("b", "cpu", None)]


def test_refresh_plan_groups_agents_by_class_set_with_known_digests():
    items = [
        Staleness("a", "os", 1.0),
        Staleness("a", "cpu", None),
        Staleness("b", "cpu", None),
        Staleness("b", "os", 2.0),
        Staleness("c", "memory", 3.0),
    ]
    digests = {("a", "os"): "d1", ("b", "os"): "d2", ("c", "memory"): "d3", ("x", "os"): "dx"}
    plan = refresh_plan(items, digests)
    assert [(j.classes, j.agents) for j in plan] == [  # ordered by class set
        (("memory",), ("c",)),
        (("os", "cpu"), ("a", "b")),
    ]
    assert plan[0].args() == {"classes": ["memory"], "known": {"memory": ["d3"]}}
    assert plan[1].args() == {"classes": ["os", "cpu"], "known": {"os": ["d1", "d2"]}}
