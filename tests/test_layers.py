"""The layers hold at run time: each twistd tap, imported in a fresh interpreter, loads only
its own side. The agent, the gateway and the task server load neither the server nor the store,
nor SQLAlchemy and Alembic; the server, for contrast, loads the server, the store and
SQLAlchemy (so the probe sees them when they are there; Alembic only when the server starts and
migrates its database). The import contracts themselves are `lint-imports` in .ci/run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# Modules that belong to the management server and its database only.
SERVER_SIDE = ("sqlalchemy", "alembic", "tcm.server", "tcm.store")


def loaded_after_import(module: str) -> dict[str, bool]:
    """Which of SERVER_SIDE a fresh interpreter holds after `import module`."""
    probe = (
        f"import json, sys, {module}; "
        f"print(json.dumps({{name: name in sys.modules for name in {SERVER_SIDE!r}}}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("tap", ["tcm.agent.tap", "tcm.gateway.tap", "tcm.taskserver.tap"])
def test_node_taps_load_no_server_side(tap):
    loaded = loaded_after_import(tap)
    assert [name for name, present in loaded.items() if present] == [], (
        f"{tap} loads server-side modules: {loaded}"
    )


def test_server_tap_loads_the_store():
    loaded = loaded_after_import("tcm.server.tap")
    assert loaded == {**dict.fromkeys(SERVER_SIDE, True), "alembic": False}
