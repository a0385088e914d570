"""The swarm's process-level tuning: full garbage collections kept off settled agents."""

from __future__ import annotations

import gc

from twisted.internet.task import Clock

from tcm.agent.swarm import Swarm, parse_sources


def _counts(started: int, persistent: int) -> dict:
    return {"started": started, "persistent": persistent}


def test_agents_frozen_once_all_have_sessions_and_given_back_when_one_is_lost(tmp_path):
    swarm = Swarm(Clock(), 3, str(tmp_path), None, None, None, parse_sources(None))
    try:
        swarm._tune_gc(_counts(2, 2))  # still starting: nothing frozen
        assert not swarm.gc_frozen and gc.get_freeze_count() == 0
        swarm._tune_gc(_counts(3, 3))
        assert swarm.gc_frozen and gc.get_freeze_count() > 0
        frozen = gc.get_freeze_count()
        swarm._tune_gc(_counts(3, 3))  # settled still: not frozen again
        assert gc.get_freeze_count() == frozen
        swarm._tune_gc(_counts(3, 2))  # a session lost: everything back to the collector
        assert not swarm.gc_frozen and gc.get_freeze_count() == 0
    finally:
        gc.unfreeze()


def test_swarm_members_have_inventories_of_their_own(tmp_path):
    import json

    from tcm.agent.swarm import CHANGES_FILE, SwarmInventory

    action = SwarmInventory(300, str(tmp_path))
    first = action._collect(1, {})
    other = action._collect(2, {})
    assert set(first["classes"]) == set(SwarmInventory.make_classes())
    assert 290 < first["classes"]["software"]["count"] < 300  # some not installed
    assert first["digests"]["software"] != other["digests"]["software"]
    known = {cls: d[:16] for cls, d in first["digests"].items()}
    again = action._collect(1, {"known": known})
    assert again["classes"] == {} and sorted(again["unchanged"]) == sorted(known)
    (tmp_path / CHANGES_FILE).write_text(json.dumps({"software": {"1": 1}}))
    changed = action._collect(1, {"known": known})
    assert list(changed["classes"]) == ["software"]
    assert action._collect(2, {"known": {}})["digests"] == other["digests"]
