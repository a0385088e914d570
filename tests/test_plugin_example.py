"""The example third-party plugin (examples/tcm-example-plugin) is found beside tcm and runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "tcm-example-plugin"

# Run in a fresh interpreter: discovery depends on sys.path at the time tcm.plugins is imported.
PROBE = """
import json, sys
import fastjsonschema
import tcm, tcm.plugins
from twisted.plugin import getPlugins
from zope.interface.verify import verifyObject
from tcm.interfaces import IActionHandler, IPolicyHandler

handlers = {h.name: h for h in getPlugins(IActionHandler, tcm.plugins)}
policies = {p.type: p for p in getPlugins(IPolicyHandler, tcm.plugins)}
verifyObject(IPolicyHandler, policies["example.disk_watch"])
fastjsonschema.compile(policies["example.disk_watch"].schema)(
    {"path": sys.argv[1], "min_free": 0, "every": 60}
)
handler = handlers["example.disk_usage"]
verifyObject(IActionHandler, handler)
fastjsonschema.compile(handler.schema)({"path": sys.argv[1]})
print(json.dumps({
    "names": sorted(handlers),
    "policy_types": sorted(policies),
    "module": sys.modules[type(handler).__module__].__file__,
    "tcm": tcm.__file__,
    "result": handler.run(None, {"path": sys.argv[1]}),  # the example ignores its context
}))
"""


def copy_example(tmp_path: Path) -> Path:
    """A clean copy: building writes build/ and *.egg-info, discovery writes dropin.cache."""
    dest = tmp_path / "src"
    shutil.copytree(
        EXAMPLE,
        dest,
        ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", "dropin.cache"),
    )
    return dest


def probe(plugin_root: Path, cwd: Path) -> dict:
    """Run PROBE with `plugin_root` ahead of the tcm checkout on PYTHONPATH."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_root), str(ROOT)])}
    completed = subprocess.run(
        [sys.executable, "-c", PROBE, str(cwd)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout.strip().splitlines()[-1])


def check(found: dict, plugin_root: Path, path: Path) -> None:
    assert {"example.disk_usage", "ping", "inventory.collect", "command.run"} <= set(found["names"])
    assert {"example.disk_watch", "inventory.schedule"} <= set(found["policy_types"])
    assert Path(found["module"]).resolve().is_relative_to(plugin_root.resolve())
    assert Path(found["tcm"]).resolve() == (ROOT / "tcm" / "__init__.py").resolve()
    usage = shutil.disk_usage(path)
    result = found["result"]
    assert result["path"] == str(path)
    assert result["total"] == usage.total
    assert 0 <= result["used"] <= result["total"] and 0 <= result["free"] <= result["total"]


def test_example_has_no_init_in_its_tcm_tree():
    assert (EXAMPLE / "tcm" / "plugins" / "example_disk_usage.py").is_file()
    assert not list((EXAMPLE / "tcm").rglob("__init__.py"))


def test_example_source_tree_on_the_path_is_discovered(tmp_path):
    src = copy_example(tmp_path)
    check(probe(src, tmp_path), src, tmp_path)


def test_pip_installed_example_is_discovered(tmp_path):
    src = copy_example(tmp_path)
    target = tmp_path / "target"
    completed = subprocess.run(
        [
            sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
            "--no-index", "--disable-pip-version-check", "--quiet", "--target", str(target),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout + completed.stderr
    # Only the module: no __init__.py that would overwrite or shadow tcm's own packages.
    assert (target / "tcm" / "plugins" / "example_disk_usage.py").is_file()
    assert not list((target / "tcm").rglob("__init__.py"))
    check(probe(target, tmp_path), target, tmp_path)
