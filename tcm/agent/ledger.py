"""The agent's job ledger and result spool, on disk.

One small JSON file per job under `jobs/` in the state directory records how far the job got:

    started   the server allowed it to run and the handler was started
    finished  the handler ended; the file holds the result until the server acknowledges it
    acked     the server stored the result: the file is removed (the server never sends a
              stored job again); the agent remembers the id while it runs
    declined  the server said not to run it (expired, already finished)

Each state is written atomically (temporary file + rename) *before* the step it guards, so a
crash at any point leaves the agent knowing whether the job ran: a job is never run twice and a
finished result survives a dropped connection, an agent restart and a server restart.
"""

from __future__ import annotations

import json
import os
import time
from collections import OrderedDict
from typing import Any

from twisted.logger import Logger

STARTED, FINISHED, ACKED, DECLINED = "started", "finished", "acked", "declined"
KEEP_DONE = 7 * 24 * 3600.0
RECENT = 1024  # acknowledged job ids remembered in memory


class Ledger:
    """Job states and spooled results, one file per job."""

    _log = Logger()

    def __init__(self, directory: str, fsync: bool = True):
        self.directory = directory
        self.fsync = fsync
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self._entries: dict[str, dict[str, Any]] = {}
        self._acked: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._load()

    def _path(self, job_id: str) -> str:
        return os.path.join(self.directory, f"{job_id}.json")

    def _load(self) -> None:
        now = time.time()
        for name in os.listdir(self.directory):
            path = os.path.join(self.directory, name)
            if name.endswith(".tmp"):
                os.unlink(path)  # a write that a crash interrupted: the old file stands
                continue
            if not name.endswith(".json"):
                continue
            try:
                with open(path) as f:
                    entry = json.load(f)
                if not (
                    isinstance(entry, dict)
                    and isinstance(entry.get("job"), str)
                    and isinstance(entry.get("state"), str)
                ):
                    raise ValueError("not a ledger entry")
            except (OSError, ValueError) as e:
                self._log.warn("unreadable ledger entry {path}: {e}; moved aside", path=path, e=e)
                os.replace(path, path + ".bad")
                continue
            if entry.get("state") in (ACKED, DECLINED) and now - entry.get("at", 0) > KEEP_DONE:
                os.unlink(path)
                continue
            self._entries[entry["job"]] = entry

    def get(self, job_id: str) -> dict[str, Any] | None:
        return self._entries.get(job_id) or self._acked.get(job_id)

    def record(self, job_id: str, state: str, **fields: Any) -> dict[str, Any]:
        entry = {"job": job_id, "state": state, "at": time.time(), **fields}
        if state == ACKED:
            # Stored on the server: nothing on disk is needed any more. Removing the file is
            # one system call where rewriting it is four, at every job of every agent. The id
            # is remembered among the last RECENT acknowledged jobs only: the server never
            # sends a stored job again, so memory need not grow with every job ever run.
            try:
                os.unlink(self._path(job_id))
            except FileNotFoundError:
                pass
            self._entries.pop(job_id, None)
            self._acked[job_id] = entry
            while len(self._acked) > RECENT:
                self._acked.popitem(last=False)
            return entry
        data = json.dumps(entry, separators=(",", ":")).encode()
        path = self._path(job_id)
        tmp = path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        if self.fsync:  # the rename itself must reach the disk before the step it guards
            dir_fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        self._entries[job_id] = entry
        return entry

    def unacknowledged(self) -> list[dict[str, Any]]:
        """Finished results the server has not acknowledged yet, oldest first."""
        out = [e for e in self._entries.values() if e["state"] == FINISHED]
        out.sort(key=lambda e: e["at"])
        return out

    def interrupted(self) -> list[dict[str, Any]]:
        """Jobs started by an earlier run of the agent that never finished."""
        return [e for e in self._entries.values() if e["state"] == STARTED]

    def count(self, state: str) -> int:
        if state == ACKED:
            return len(self._acked)  # the recently acknowledged ones it remembers
        return sum(1 for e in self._entries.values() if e["state"] == state)
