"""The agent's job ledger and result spool on disk."""

from __future__ import annotations

import json
import os

import pytest

from tcm.agent import ledger as ledger_module
from tcm.agent.ledger import ACKED, DECLINED, FINISHED, KEEP_DONE, STARTED, Ledger


@pytest.fixture
def jobs_dir(tmp_path):
    return str(tmp_path / "jobs")


class FakeTime:
    """Replaces time.time() in the ledger module."""

    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = FakeTime(1_000_000.0)
    monkeypatch.setattr(ledger_module, "time", fake)
    return fake


def files(directory: str) -> list[str]:
    return sorted(os.listdir(directory))


def test_directory_is_made_private(jobs_dir):
    Ledger(jobs_dir)
    assert os.path.isdir(jobs_dir)
    assert os.stat(jobs_dir).st_mode & 0o777 == 0o700


def test_record_and_get(jobs_dir, clock):
    ledger = Ledger(jobs_dir, fsync=False)
    assert ledger.get("j1") is None
    entry = ledger.record("j1", STARTED, started=123.5)
    assert entry == {"job": "j1", "state": STARTED, "at": 1_000_000.0, "started": 123.5}
    assert ledger.get("j1") == entry
    clock.now += 1
    ledger.record("j1", FINISHED, outcome={"state": "succeeded", "result": {"x": 1}})
    assert ledger.get("j1")["state"] == FINISHED
    assert "started" not in ledger.get("j1")  # each record replaces the entry


@pytest.mark.parametrize("fsync", [True, False])
def test_write_is_atomic_and_leaves_no_tmp(jobs_dir, fsync):
    ledger = Ledger(jobs_dir, fsync=fsync)
    ledger.record("j1", STARTED)
    ledger.record("j1", FINISHED, outcome={"state": "failed"})
    ledger.record("j2", DECLINED, decision="expired")
    assert files(jobs_dir) == ["j1.json", "j2.json"]
    with open(os.path.join(jobs_dir, "j1.json")) as f:
        assert json.load(f)["state"] == FINISHED
    assert os.stat(os.path.join(jobs_dir, "j1.json")).st_mode & 0o777 == 0o600


def test_reload_from_disk(jobs_dir, clock):
    first = Ledger(jobs_dir, fsync=False)
    first.record("j1", STARTED, started=1.0)
    first.record("j2", FINISHED, outcome={"state": "succeeded", "result": {"pong": True}})
    first.record("j3", DECLINED, decision="expired")
    first.record("j4", ACKED)
    again = Ledger(jobs_dir, fsync=False)
    for job_id in ("j1", "j2", "j3"):
        assert again.get(job_id) == first.get(job_id)
    assert first.get("j4")["state"] == ACKED and again.get("j4") is None  # not kept on disk
    assert again.get("j2")["outcome"]["result"] == {"pong": True}


def test_unacknowledged_interrupted_and_count(jobs_dir, clock):
    ledger = Ledger(jobs_dir, fsync=False)
    clock.now = 300.0
    ledger.record("late", FINISHED, outcome={})
    clock.now = 100.0
    ledger.record("early", FINISHED, outcome={})
    clock.now = 200.0
    ledger.record("middle", FINISHED, outcome={})
    ledger.record("running", STARTED)
    ledger.record("done", ACKED)
    ledger.record("no", DECLINED)
    assert [e["job"] for e in ledger.unacknowledged()] == ["early", "middle", "late"]
    assert [e["job"] for e in ledger.interrupted()] == ["running"]
    assert ledger.count(FINISHED) == 3
    assert ledger.count(STARTED) == 1
    assert ledger.count(ACKED) == 1
    assert ledger.count(DECLINED) == 1
    ledger.record("early", ACKED)
    assert [e["job"] for e in ledger.unacknowledged()] == ["middle", "late"]


def test_leftover_tmp_files_are_removed(jobs_dir):
    ledger = Ledger(jobs_dir, fsync=False)
    ledger.record("j1", STARTED)
    # a crash between writing the temporary file and the rename
    with open(os.path.join(jobs_dir, "j1.json.tmp"), "w") as f:
        f.write('{"job": "j1", "state": "fini')
    with open(os.path.join(jobs_dir, "j9.json.tmp"), "w") as f:
        f.write("{}")
    again = Ledger(jobs_dir, fsync=False)
    assert files(jobs_dir) == ["j1.json"]
    assert again.get("j1")["state"] == STARTED  # the old file stands
    assert again.get("j9") is None


@pytest.mark.parametrize("content", [b"", b'{"job": "j1", "sta', b"\xff\xfe\x00garbage"])
def test_corrupt_file_is_moved_aside(jobs_dir, content):
    os.makedirs(jobs_dir)
    with open(os.path.join(jobs_dir, "j1.json"), "wb") as f:
        f.write(content)
    ledger = Ledger(jobs_dir, fsync=False)
    assert ledger.get("j1") is None
    assert files(jobs_dir) == ["j1.json.bad"]
    with open(os.path.join(jobs_dir, "j1.json.bad"), "rb") as f:
        assert f.read() == content
    # and a later load leaves the .bad file alone
    Ledger(jobs_dir, fsync=False)
    assert files(jobs_dir) == ["j1.json.bad"]


@pytest.mark.parametrize("content", [b"null", b"[]", b'{"state": "finished"}'])
def test_json_that_is_not_an_entry_is_moved_aside(jobs_dir, content):
    os.makedirs(jobs_dir)
    with open(os.path.join(jobs_dir, "j1.json"), "wb") as f:
        f.write(content)
    Ledger(jobs_dir, fsync=False)
    assert files(jobs_dir) == ["j1.json.bad"]


def test_other_files_are_ignored(jobs_dir):
    os.makedirs(jobs_dir)
    with open(os.path.join(jobs_dir, "README"), "w") as f:
        f.write("not a ledger entry")
    Ledger(jobs_dir, fsync=False)
    assert files(jobs_dir) == ["README"]


def test_old_done_entries_are_pruned_at_load(jobs_dir, clock):
    ledger = Ledger(jobs_dir, fsync=False)
    clock.now = 1_000_000.0
    ledger.record("old-acked", ACKED)  # stored on the server: its file goes at once
    assert "old-acked.json" not in files(jobs_dir)
    ledger.record("old-declined", DECLINED, decision="expired")
    ledger.record("old-finished", FINISHED, outcome={})  # never acknowledged: kept
    ledger.record("old-started", STARTED)  # must still be reported: kept
    clock.now = 1_000_000.0 + KEEP_DONE - 10
    ledger.record("recent-acked", ACKED)

    clock.now = 1_000_000.0 + KEEP_DONE  # exactly KEEP_DONE old: kept
    assert Ledger(jobs_dir, fsync=False).get("old-declined") is not None

    clock.now = 1_000_000.0 + KEEP_DONE + 1
    again = Ledger(jobs_dir, fsync=False)
    assert again.get("old-acked") is None
    assert again.get("old-declined") is None
    assert again.get("old-finished")["state"] == FINISHED
    assert again.get("old-started")["state"] == STARTED
    assert again.get("recent-acked") is None
    assert files(jobs_dir) == ["old-finished.json", "old-started.json"]


def test_an_entry_written_long_ago_is_pruned(jobs_dir):
    """Without touching time: an entry whose `at` is far in the past."""
    os.makedirs(jobs_dir)
    with open(os.path.join(jobs_dir, "ancient.json"), "w") as f:
        json.dump({"job": "ancient", "state": ACKED, "at": 1.0}, f)
    with open(os.path.join(jobs_dir, "no-at.json"), "w") as f:
        json.dump({"job": "no-at", "state": DECLINED}, f)
    ledger = Ledger(jobs_dir, fsync=False)
    assert ledger.get("ancient") is None
    assert ledger.get("no-at") is None
    assert files(jobs_dir) == []


def test_acknowledged_jobs_are_remembered_in_a_bounded_set(jobs_dir):
    from tcm.agent.ledger import RECENT

    ledger = Ledger(jobs_dir, fsync=False)
    for i in range(RECENT + 10):
        ledger.record(f"j{i}", FINISHED, outcome={})
        ledger.record(f"j{i}", ACKED)
    assert ledger.get(f"j{RECENT + 9}")["state"] == ACKED  # recent: still known
    assert ledger.get("j0") is None  # the oldest are forgotten: memory does not grow
    assert files(jobs_dir) == []
    assert ledger.count(ACKED) == RECENT and ledger.count(FINISHED) == 0
