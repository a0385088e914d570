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


def _requirement_names(requirement: str) -> str:
    import re

    return re.split(r"[\s\[<>=;!~]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _closure(names: set[str]) -> set[str]:
    """The distributions `names` need, themselves included (installed metadata)."""
    from importlib import metadata

    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for req in requires:
            extra = "extra ==" in req
            wanted = name == "twisted" and 'extra == "tls"' in req  # twisted[tls]
            if extra and not wanted:
                continue
            todo.append(_requirement_names(req))
    return seen


def test_agent_install_requirements_cover_what_the_agent_imports():
    """The agent install package carries AGENT_REQUIREMENTS and what they need (issue 17):
    every distribution a running agent's modules come from is among them, and none of the
    server's is."""
    from importlib import metadata

    from tcm.installpackage import AGENT_REQUIREMENTS

    probe = (
        "import json, sys, tcm.agent.tap, tcm.cli.agent, tcm.plugins; "
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    distributions = metadata.packages_distributions()
    carried = _closure({_requirement_names(r) for r in AGENT_REQUIREMENTS})
    # click: autobahn.util imports it if it is there (try/except); _distutils_hack:
    # setuptools' start-up hook of this venv, not the agent's
    optional = {"click", "_distutils_hack"}
    missing = {}
    for top in json.loads(done.stdout.strip().splitlines()[-1]):
        dists = {d.lower().replace("_", "-") for d in distributions.get(top, [])} - {"tcm"}
        # a namespace (zope) maps to several distributions: one carried is enough
        if dists and not dists & carried and top not in optional:
            missing[top] = dists
    assert missing == {}
    assert {"sqlalchemy", "alembic", "mako", "prometheus-client"} & carried == set()
