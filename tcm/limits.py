"""Process limits that a server or a swarm holding many connections needs."""

from __future__ import annotations

import resource


def raise_descriptor_limit() -> int:
    """Raise this process's open-file soft limit to its hard limit; return the new limit.

    Each TCP connection is one descriptor. The hard limit cannot be raised without privilege
    (20,000 on the machines tcm is measured on): more connections need more processes.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
