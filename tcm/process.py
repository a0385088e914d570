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
