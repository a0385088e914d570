"""Packaging: the wheel carries the twistd dropin (and no twisted/plugins/__init__.py), and
twistd lists every tcm service."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from tests.conftest import ROOT

SERVICES = ["tcm-server", "tcm-agent", "tcm-taskserver", "tcm"]


def test_twistd_lists_every_service():
    out = subprocess.run(
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    ).stdout
    for name in SERVICES:
        assert f"\n    {name} " in out, name


def test_every_dropin_imports_its_tap():
    from twisted.application.service import IServiceMaker
    from twisted.plugin import getPlugins

    makers = {m.tapname: m for m in getPlugins(IServiceMaker)}
    for name in SERVICES:
        maker = makers[name]
        options = maker.options()
        assert hasattr(options, "parseOptions")


@pytest.mark.integration
def test_wheel_contains_the_dropin(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(
            ".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", ".hypothesis"
        ),
    )
    out = tmp_path / "dist"
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "build",
            "--wheel",
            "--no-isolation",
            "--outdir",
            str(out),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    wheel = next(p for p in os.listdir(out) if p.endswith(".whl"))
    names = zipfile.ZipFile(out / wheel).namelist()
    assert "twisted/plugins/tcm_plugins.py" in names
    assert "twisted/plugins/tcm_endpoints.py" in names  # the tcm: endpoint type
    assert "twisted/plugins/__init__.py" not in names
    # the web console's static files (tcm/server/console.py serves them from the package)
    for name in ("index.html", "js/app.js", "js/pages/jobs.js", "css/console.css"):
        assert f"tcm/console/static/{name}" in names
    assert "tcm/store/migrations/versions/0001_initial.py" in names
    assert "tcm/store/migrations/env.py" in names
