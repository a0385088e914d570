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
