"""Agent install packages, built by `tcm package build` and by the server's route (the
console's download, POST /api/v1/profiles/{name}/package): the package installs on a clean
environment, enrolls, runs a job; the route answers with the archive, refuses a role that may
not make enrollment tokens, and says why when the wheels cannot be had.

The agent is installed from the package into a fresh venv and state directory with no index
(`--no-index` in install.sh, PIP_NO_INDEX=1 and no proxy here): only the bundled wheels.
Its agent then reaches nothing but the test server on loopback.

The wheels (tcm + the agent's dependencies, `pip wheel`) are built once per test session
into a `WheelCache` (`wheel_cache`), the server's own cache code; it needs the index or pip's
cache, like any package build. Servers that build packages are given that cache
(`--package-wheels`); one test starts from an empty cache to see the server build and then
reuse it. The install itself takes a venv and ~25 wheels: tens of seconds.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

import pytest
import requests

from tcm.installpackage import WheelCache
from tests.harness import AgentProc, Process, Server, wait_until

pytestmark = pytest.mark.integration

PACKAGE_FILES = [
    "README", "agent-requirements.txt", "agent.env", "ca.pem", "install.sh", "profile.json",
    "tcm-agent.service", "wheels",
]  # fmt: skip


@pytest.fixture(scope="session")
def wheel_cache(tmp_path_factory):
    """A wheel cache holding tcm's and the agent's dependencies' wheels, built once per test
    session with the server's own code (tcm/installpackage.py WheelCache)."""
    root = tmp_path_factory.mktemp("wheel-cache")
    WheelCache(str(root), timeout=900).wheels()
    return str(root)


@pytest.fixture(scope="session")
def package_wheels(wheel_cache, tmp_path_factory):
    """Those wheels in one directory, as `tcm package build --wheels DIR` takes them."""
    flat = tmp_path_factory.mktemp("wheels")
    for path in WheelCache(wheel_cache).wheels().paths:
        shutil.copy(path, flat)
    return str(flat)


def admin_session(server: Server, token: str | None = None) -> requests.Session:
    """requests with the server's CA and a bearer token (the admin token by default)."""
    if token is None:
        with open(os.path.join(server.state_dir, "admin.token")) as f:
            token = f.read().strip()
    s = requests.Session()
    s.trust_env = False
    s.verify = server.ca
    s.headers["Authorization"] = f"Bearer {token}"
    return s


def package_members(data: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        return {m.name: m for m in tar.getmembers()}


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


@pytest.mark.parametrize("built_by", ["cli", "console route"])
def test_package_installs_offline_enrolls_and_runs_a_job(
    tmp_path, built_by, wheel_cache, package_wheels
):
    server = Server(str(tmp_path), extra=["--package-wheels", wheel_cache])
    server.start()
    agent = None
    try:
        server.cli("profiles", "create", "branch", "--set", "keepalive=30", "--set",
                   "gateways=[\"wss://127.0.0.1:9/agent/v1/ws\"]")  # fmt: skip
        out = tmp_path / "agent-branch.tar.gz"
        if built_by == "cli":
            built = server.cli_json(
                "package", "build", "--profile", "branch", "--out", str(out), "--uses", "1",
                "--ttl", "600", "--wheels", package_wheels,
            )  # fmt: skip
            assert built["profile"] == "branch" and built["token_uses"] == 1
        else:  # what the console's "install package" button asks for
            with admin_session(server) as http:
                r = http.post(
                    f"{server.url}/api/v1/profiles/branch/package",
                    json={"uses": 1, "ttl": 600},
                    timeout=300,
                )
            assert r.status_code == 200, r.text
            assert r.headers["x-tcm-wheels"] == "cached"  # the session's cache
            out.write_bytes(r.content)
            built = {"token_id": r.headers["x-tcm-token-id"]}
        tokens = server.cli_json("token", "list")
        token = next(t for t in tokens if t["id"] == built["token_id"])
        assert token["profile"] == "branch" and token["uses_left"] == 1
        assert token["expires_at"] is not None

        unpacked = tmp_path / "unpacked"
        with tarfile.open(out) as tar:
            tar.extractall(unpacked, filter="data")
        top = unpacked / "tcm-agent-branch"
        names = sorted(os.listdir(top))
        assert names == PACKAGE_FILES
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


def test_the_route_builds_its_wheels_once_and_answers_the_package(tmp_path):
    """POST /api/v1/profiles/{name}/package (the console's download): the server builds the
    wheels into its empty cache the first time, takes them from there the next; the archive
    holds what `tcm package build` puts in it, with a new token scoped to the profile."""
    cache = tmp_path / "cache"
    server = Server(str(tmp_path), extra=["--package-wheels", str(cache)])
    server.start()
    try:
        server.cli("profiles", "create", "kiosk", "--set", "keepalive=40")
        with admin_session(server) as http:
            url = f"{server.url}/api/v1/profiles/kiosk/package"
            first = http.post(url, json={"uses": 5, "ttl": 3600}, timeout=600)
            assert first.status_code == 200, first.text
            assert first.headers["content-type"] == "application/gzip"
            assert first.headers["content-disposition"] == (
                'attachment; filename="tcm-agent-kiosk.tar.gz"'
            )
            assert first.headers["x-tcm-wheels"] == "built"
            assert any(n.startswith("tcm-") for n in os.listdir(cache))  # kept for next time

            members = package_members(first.content)
            top = "tcm-agent-kiosk/"
            assert sorted({n[len(top) :].split("/")[0] for n in members}) == PACKAGE_FILES
            wheels = [n.rsplit("/", 1)[1] for n in members if n.startswith(top + "wheels/")]
            assert any(w.startswith("tcm-") for w in wheels)
            assert any(w.startswith("twisted-") for w in wheels)
            for server_side in ("sqlalchemy", "alembic", "mako", "prometheus"):
                assert server_side not in " ".join(wheels).lower()
            assert members[top + "install.sh"].mode == 0o755
            assert members[top + "agent.env"].mode == 0o600
            with tarfile.open(fileobj=io.BytesIO(first.content), mode="r:gz") as tar:

                def text(name: str) -> str:
                    f = tar.extractfile(top + name)
                    assert f is not None
                    return f.read().decode()

                profile = json.loads(text("profile.json"))
                env = text("agent.env")
                ca = text("ca.pem")
            assert profile == {"name": "kiosk", "version": 1, "settings": {"keepalive": 40}}
            with open(server.ca) as f:
                assert ca == f.read()
            # no https:// server in the profile: the URL the request came to
            token_id = first.headers["x-tcm-token-id"]
            assert f"TCM_SERVER='{server.url}'\n" in env
            assert f"TCM_TOKEN='{token_id}." in env
            token = next(t for t in server.cli_json("token", "list") if t["id"] == token_id)
            assert token["profile"] == "kiosk" and token["uses_left"] == 5
            assert token["expires_at"] is not None

            # the second: from the cache; a new token; the server URL as asked
            second = http.post(url, json={"server": "https://tcm.example:8443"}, timeout=600)
            assert second.status_code == 200, second.text
            assert second.headers["x-tcm-wheels"] == "cached"
            assert second.headers["x-tcm-token-id"] != token_id
            with tarfile.open(fileobj=io.BytesIO(second.content), mode="r:gz") as tar:
                f = tar.extractfile(top + "agent.env")
                assert f is not None
                assert f.read().decode().startswith("TCM_SERVER='https://tcm.example:8443'\n")
            defaults = next(
                t
                for t in server.cli_json("token", "list")
                if t["id"] == second.headers["x-tcm-token-id"]
            )
            assert defaults["uses_left"] == 100  # as `tcm package build`

            # bad input: a clear 400 or 404, and no token made
            tokens = len(server.cli_json("token", "list"))
            for body, status, words in [
                ({"server": "https://x';reboot;'"}, 400, "'server' must be"),
                ({"server": "http://plain:80"}, 400, "'server' must be"),
                ({"uses": 0}, 400, "'uses' must be a positive integer"),
                ({"ttl": -1}, 400, "'ttl' must be a positive number"),
                ({"token": "x"}, 400, "unknown field(s)"),
            ]:
                r = http.post(url, json=body, timeout=30)
                assert r.status_code == status and words in r.json()["error"], (body, r.text)
            r = http.post(f"{server.url}/api/v1/profiles/nosuch/package", json={}, timeout=30)
            assert r.status_code == 404 and "nosuch" in r.json()["error"]
            assert len(server.cli_json("token", "list")) == tokens

            log = http.get(f"{server.url}/api/v1/audit?action=package.", timeout=30).json()
            built = [e for e in log["entries"] if e["action"] == "package.build"]
            assert [e["object"] for e in built] == ["kiosk", "kiosk"]
            assert built[0]["details"]["token"] == token_id
            assert [e["details"]["wheels_built"] for e in built] == [True, False]
    finally:
        server.stop()


def test_the_route_refuses_roles_that_may_not_make_enrollment_tokens(tmp_path):
    server = Server(str(tmp_path), extra=["--package-wheels", str(tmp_path / "cache")])
    server.start()
    try:
        server.cli("profiles", "create", "kiosk")
        for name, role in (("val", "viewer"), ("oscar", "operator")):
            secret = server.cli("apitoken", "create", name, "--role", role).strip()
            with admin_session(server, secret) as http:
                r = http.post(f"{server.url}/api/v1/profiles/kiosk/package", json={}, timeout=30)
            assert r.status_code == 403, r.text
            body = r.json()
            assert body["role"] == role and body["lacks"] == "admin"
            assert f"'{name}' has role '{role}'" in body["error"]
            assert "may not build install packages" in body["error"]
        assert server.cli_json("token", "list") == []
        assert not os.path.exists(tmp_path / "cache")  # nothing was built for them
        with admin_session(server) as http:
            log = http.get(f"{server.url}/api/v1/audit?action=request.", timeout=30).json()
        refused = [e for e in log["entries"] if e["object"].endswith("/kiosk/package")]
        assert [e["actor"] for e in refused] == ["val", "oscar"]
    finally:
        server.stop()


def test_the_route_says_why_when_no_wheels_can_be_had(tmp_path):
    """An offline server with an empty cache and no index: 503 with pip's reason, and no
    token left behind."""
    nothing = tmp_path / "no-wheels"
    nothing.mkdir()
    server = Server(str(tmp_path), extra=["--package-wheels", str(tmp_path / "cache")])
    # pip with no index, no find-links but an empty one, no configuration file
    server.env = {
        "PIP_CONFIG_FILE": os.devnull,
        "PIP_NO_INDEX": "1",
        "PIP_FIND_LINKS": str(nothing),
    }
    server.start()
    try:
        server.cli("profiles", "create", "kiosk")
        with admin_session(server) as http:
            r = http.post(f"{server.url}/api/v1/profiles/kiosk/package", json={}, timeout=600)
            assert r.status_code == 503, r.text
            body = r.json()
            assert body["error"].startswith("cannot build an install package: pip wheel")
            assert body["reason"] in body["error"] and "failed" in body["reason"]
            log = http.get(f"{server.url}/api/v1/audit?action=package.", timeout=30).json()
        assert server.cli_json("token", "list") == []
        assert log["entries"] == []
        assert os.listdir(tmp_path / "cache") == []
        assert server.alive()
    finally:
        server.stop()
