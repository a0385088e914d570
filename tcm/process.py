"""Process-level concerns of the daemons: the descriptor limit, exiting on a failed start."""

from __future__ import annotations

import os
import resource
from typing import Any


def raise_descriptor_limit() -> int:
    """Raise this process's open-file soft limit to its hard limit; return the new limit.

    Each TCP connection is one descriptor. The hard limit cannot be raised without privilege
    (20,000 on the machines tcm is measured on): more connections need more processes.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def stop_with_failure(reactor: Any) -> None:
    """Stop the reactor (now, or as soon as it runs) and exit with status 1 afterwards:
    a daemon that cannot start must not linger, nor report success to its supervisor."""
    reactor.addSystemEventTrigger("after", "shutdown", os._exit, 1)
    if reactor.running:
        reactor.stop()
    else:
        reactor.callWhenRunning(reactor.stop)


def _load_malloc_trim() -> Any:
    """glibc's malloc_trim, or None elsewhere (musl, macOS, a libc without it)."""
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_malloc_trim: Any = None
_malloc_trim_loaded = False


def release_memory() -> bool:
    """Give memory that Python freed back to the system (glibc's malloc_trim): after a large
    batch (a fleet's inventory parsed, stored and dropped), glibc keeps the freed arenas and
    the process's RSS stays at its peak. True when trimmed, False where there is no such
    call (nothing to do there)."""
    global _malloc_trim, _malloc_trim_loaded
    if not _malloc_trim_loaded:
        _malloc_trim, _malloc_trim_loaded = _load_malloc_trim(), True
    if _malloc_trim is None:
        return False
    _malloc_trim(0)
    return True


class MemoryReleaser:
    """Calls `release` (release_memory) once `threshold` bytes of transient data were
    handled since the last call, at most once per `interval` seconds and only once the
    batch is over (no more data for `interval` seconds): trimming costs a walk of the heap,
    so it is done after a batch, not during it."""

    def __init__(
        self,
        clock: Any,
        threshold: int = 64 * 1024 * 1024,
        interval: float = 2.0,
        release: Any = release_memory,
    ):
        self.clock = clock
        self.threshold = threshold
        self.interval = interval
        self.release = release
        self.pending = 0
        self.releases = 0
        self._call: Any = None

    def handled(self, size: int) -> None:
        """`size` bytes of transient data were handled and dropped."""
        self.pending += size
        if self.pending < self.threshold:
            return
        if self._call is not None and self._call.active():
            self._call.reset(self.interval)  # still busy: after the batch
        else:
            self._call = self.clock.callLater(self.interval, self._release)

    def _release(self) -> None:
        self._call = None
        self.pending = 0
        if self.release():
            self.releases += 1

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
