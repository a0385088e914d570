"""tcm/installpackage.py without pip: the server URL check (agent.env is sourced by a shell),
which server a package names, the source digest, prebuilt wheels, the archive's layout."""

from __future__ import annotations

import io
import os
import tarfile

import pytest

from tcm.installpackage import (
    PackageError,
    WheelCache,
    agent_server,
    check_server_url,
    copy_source,
    source_digest,
    write_package,
)
from tests.conftest import ROOT

PROFILE = {"name": "branch", "version": 3, "settings": {"keepalive": 30}}


@pytest.mark.parametrize(
    "url", ["https://tcm.example:8443", "https://127.0.0.1:9", "https://[::1]:8443/tcm"]
)
def test_server_urls_an_agent_takes(url):
    assert check_server_url(url) == url


@pytest.mark.parametrize(
    "url",
    [
        "http://tcm.example:8443",
        "wss://tcm.example:8443",
        "https://x';reboot;'",
        "https://x y",
        "https://x:1\n",
        "https://x:1?q=1",
        "https://",
        "https://$(id)",
    ],
)
def test_server_urls_refused(url):
    with pytest.raises(PackageError, match="must be https://HOST"):
        check_server_url(url)


def test_the_package_names_the_profiles_first_https_server_else_the_fallback():
    servers = {"servers": ["wss://a:1", "https://b:2", "https://c:3"]}
    assert agent_server(servers, "https://here:8443") == "https://b:2"
    assert agent_server({"keepalive": 5}, "https://here:8443") == "https://here:8443"


def test_the_source_digest_is_the_same_for_a_copy_and_changes_with_a_file(tmp_path):
    copy = copy_source(ROOT, str(tmp_path / "src"))
    assert source_digest(copy) == source_digest(ROOT)
    assert not os.path.exists(os.path.join(copy, ".venv"))  # the wheel's sources only
    assert os.path.exists(os.path.join(copy, "twisted", "plugins", "tcm_plugins.py"))
    with open(os.path.join(copy, "tcm", "__init__.py"), "a") as f:
        f.write("# changed\n")
    assert source_digest(copy) != source_digest(ROOT)


def _wheel(folder, name: str) -> str:
    path = os.path.join(folder, name)
    with open(path, "wb") as f:
        f.write(b"PK not really a wheel")
    return path


def test_prebuilt_wheels_in_the_cache_are_the_set_used(tmp_path):
    cache = WheelCache(str(tmp_path), source=str(tmp_path / "nowhere"))
    _wheel(tmp_path, "attrs-1-py3-none-any.whl")
    assert cache.prebuilt() == []  # no tcm wheel among them: not a set
    _wheel(tmp_path, "tcm-0.1.0-py3-none-any.whl")
    got = cache.wheels()
    assert not got.built
    assert [os.path.basename(p) for p in got.paths] == [
        "attrs-1-py3-none-any.whl",
        "tcm-0.1.0-py3-none-any.whl",
    ]


def test_write_package_layout_modes_and_refusals(tmp_path):
    wheels = [_wheel(tmp_path, "tcm-0.1.0-py3-none-any.whl")]
    out = io.BytesIO()
    names = write_package(
        out, PROFILE, "CA", "https://s:1", "tid.secret", 7, "then", wheels, now=1000.0
    )
    assert names == ["tcm-0.1.0-py3-none-any.whl"]
    with tarfile.open(fileobj=io.BytesIO(out.getvalue()), mode="r:gz") as tar:
        members = {m.name: m for m in tar.getmembers()}
        env = tar.extractfile("tcm-agent-branch/agent.env").read().decode()  # type: ignore[union-attr]
        readme = tar.extractfile("tcm-agent-branch/README").read().decode()  # type: ignore[union-attr]
    assert members["tcm-agent-branch/agent.env"].mode == 0o600
    assert members["tcm-agent-branch/install.sh"].mode == 0o755
    assert members["tcm-agent-branch/profile.json"].mtime == 1000
    assert "tcm-agent-branch/wheels/tcm-0.1.0-py3-none-any.whl" in members
    assert env == "TCM_SERVER='https://s:1'\nTCM_TOKEN='tid.secret'\n"
    assert "expires then and allows 7 enrollment(s)" in readme
    with pytest.raises(PackageError):
        write_package(io.BytesIO(), PROFILE, "CA", "https://s:1'", "t.s", 1, "", wheels)
    with pytest.raises(PackageError, match="quote"):
        write_package(io.BytesIO(), PROFILE, "CA", "https://s:1", "t.'s", 1, "", wheels)
