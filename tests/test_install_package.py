"""`tcm package build`: the package installs on a clean environment, enrolls, runs a job.

The agent is installed from the package into a fresh venv and state directory with no index
(`--no-index` in install.sh, PIP_NO_INDEX=1 and no proxy here): only the bundled wheels.
Its agent then reaches nothing but the test server on loopback.

Building the wheels (tcm + every dependency, `pip wheel`) is done once per test session
(`package_wheels`), from a copy of the source tree; it needs the index or pip's cache, like
any package build. The install itself takes a venv and ~30 wheels: tens of seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile

import pytest

from tcm.cli.package import build_wheels
from tests.conftest import ROOT
from tests.harness import AgentProc, Process, Server, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def package_wheels(tmp_path_factory):
    """tcm and all its dependencies as wheels, built once per test session."""
    base = tmp_path_factory.mktemp("wheels")
    src = base / "src"
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(
            ".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", ".hypothesis",
            ".mypy_cache", ".ruff_cache", "dropin.cache",
        ),
    )  # fmt: skip
    wheels = base / "wheels"
    build_wheels(str(src), str(wheels), timeout=900)
    return str(wheels)


def offline_env(**extra: str) -> dict[str, str]:
    """The environment of the install: no index, no proxy, no extra find-links."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.lower().endswith("_proxy")
        and not k.startswith("PIP_")
        and k not in ("PYTHONPATH", "VIRTUAL_ENV")
    }
    env.update(PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", **extra)
    return env


def test_package_installs_offline_enrolls_and_runs_a_job(tmp_path, package_wheels):
    server = Server(str(tmp_path))
    server.start()
    agent = None
    try:
        server.cli("profiles", "create", "branch", "--set", "keepalive=30", "--set",
                   "gateways=[\"wss://127.0.0.1:9/agent/v1/ws\"]")  # fmt: skip
        out = tmp_path / "agent-branch.tar.gz"
        built = server.cli_json(
            "package", "build", "--profile", "branch", "--out", str(out), "--uses", "1",
            "--ttl", "600", "--wheels", package_wheels,
        )  # fmt: skip
        assert built["profile"] == "branch" and built["token_uses"] == 1
        tokens = server.cli_json("token", "list")
        token = next(t for t in tokens if t["id"] == built["token_id"])
        assert token["profile"] == "branch" and token["uses_left"] == 1
        assert token["expires_at"] is not None

        unpacked = tmp_path / "unpacked"
        with tarfile.open(out) as tar:
            tar.extractall(unpacked, filter="data")
        top = unpacked / "tcm-agent-branch"
        names = sorted(os.listdir(top))
        assert names == [
            "README", "agent-requirements.txt", "agent.env", "ca.pem", "install.sh",
            "profile.json", "tcm-agent.service", "wheels",
        ]  # fmt: skip
        # what the agent runs on, none of the server's (issue 17)
        carried = " ".join(os.listdir(top / "wheels")).lower()
        for server_side in ("sqlalchemy", "alembic", "mako", "prometheus"):
            assert server_side not in carried
        assert any(w.startswith("tcm-") for w in os.listdir(top / "wheels"))

        prefix, state = tmp_path / "opt", tmp_path / "agent-state"
        installed = subprocess.run(
            ["sh", str(top / "install.sh"), "--prefix", str(prefix), "--state-dir", str(state),
             "--no-systemd"],
            capture_output=True, text=True, timeout=600, cwd=str(tmp_path),
            env=offline_env(PYTHON=sys.executable),
        )  # fmt: skip
        assert installed.returncode == 0, installed.stdout + installed.stderr
        run_script = prefix / "bin" / "tcm-agent-run"
        assert str(run_script) in installed.stdout  # it says how to start the agent
        unit = (prefix / "etc" / "tcm-agent.service").read_text()
        assert "ExecStart=" + str(run_script) in unit
        assert "KillMode=control-group" in unit.splitlines()
        # the venv holds tcm from the package, not the checkout
        venv_python = prefix / "venv" / "bin" / "python"
        where = subprocess.run(
            [str(venv_python), "-c", "import tcm; print(tcm.__file__)"],
            capture_output=True, text=True, timeout=60, cwd=str(tmp_path), env=offline_env(),
        )  # fmt: skip
        assert where.stdout.strip().startswith(str(prefix / "venv")), where

        agent = Process(
            "pkg-agent", [], str(tmp_path / "pkg-agent.log"), executable=str(run_script)
        )
        agent.env = offline_env(PYTHONPATH="")
        agent.start()
        wait_until(
            lambda: agent.count(AgentProc.SESSION_OPEN) >= 1 or not agent.alive(),
            60, 0.1, "the installed agent's session",
        )  # fmt: skip
        assert agent.alive(), agent.log()[-3000:]
        agent_id = json.loads((state / "agent.json").read_text())["agent_id"]

        job = server.cli_json(
            "run", "ping", "--targets", agent_id, "--wait", "--wait-timeout", "60"
        )
        assert job["counts"]["succeeded"] == job["counts"]["total"] == 1, job
        assert job["results"][0]["result"]["pong"] is True

        # It enrolled into the package's profile and says so (its gateways are applied).
        view = wait_until(
            lambda: next(a for a in server.agents() if a["id"] == agent_id)["profile"],
            30, 0.1, "the agent's profile report",
        )  # fmt: skip
        assert view == {"name": "branch", "version": 1}
        status = json.loads(
            subprocess.run(
                [str(venv_python), "-m", "tcm.cli.agent", "--state-dir", str(state), "status",
                 "--json"],
                capture_output=True, text=True, timeout=60, env=offline_env(),
            ).stdout
        )  # fmt: skip
        assert status["profile"]["stored_only"] == []
        assert status["profile"]["applied"] == ["gateways", "keepalive"]
        # the token was good for one enrollment
        token = next(t for t in server.cli_json("token", "list") if t["id"] == built["token_id"])
        assert token["uses_left"] == 0
    finally:
        if agent is not None:
            agent.stop()
        server.stop()
