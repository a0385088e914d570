"""The agent install package: what `tcm package build` (tcm/cli/package.py) and the server's
`POST /api/v1/profiles/{name}/package` (tcm/server/packages.py, the console's "install
package" download) both build, with this one code.

The package (a .tar.gz) holds everything an endpoint needs to install and enroll an agent
without network access to anything but its server:

    tcm-agent-NAME/
      install.sh          ./install.sh --prefix DIR [--state-dir DIR] [--no-systemd]
      wheels/*.whl        the tcm wheel and the wheels of what the agent runs on (pip wheel, at
                          build time): AGENT_REQUIREMENTS and theirs, none of the server's
      agent-requirements.txt  those requirements (install.sh installs them, then tcm alone)
      ca.pem              the server's CA certificate
      profile.json        the connection profile (the agent runs it from its first start)
      agent.env           server URL and an enrollment token made for this package
      tcm-agent.service   a systemd unit template (@PREFIX@, @STATE_DIR@ filled in at install)
      README

Wheels: `pip wheel` of the tcm source tree (the one the running tcm was installed from, in
editable mode, or one given) and of AGENT_REQUIREMENTS; that needs an index (PyPI, a mirror,
a local one) or pip's cache. `WheelCache` keeps what it built per tcm version (and source
digest) and per requirement set, so only the first package of a version waits for pip.

No I/O beyond files and `pip` subprocesses, no reactor: the CLI calls it directly, the
server on a thread of its own. It imports no other tcm package (an import contract).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import IO, Any

import attrs

import tcm


class PackageError(Exception):
    """A package cannot be built; the message says why (and what would fix it)."""


INSTALL_SH = r"""#!/bin/sh
# Install the tcm agent from this package: a venv with the bundled wheels (no index, no
# network), the CA, the connection profile and the enrollment token; then start it.
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
PREFIX=/opt/tcm-agent
STATE_DIR=
SYSTEMD=1
PYTHON=${PYTHON:-python3}

usage() {
    echo "usage: $0 [--prefix DIR] [--state-dir DIR] [--no-systemd] [--python PYTHON]"
    echo "  --prefix DIR     where the agent goes (venv, bin, etc); default /opt/tcm-agent"
    echo "  --state-dir DIR  the agent's key, certificate, spool; default PREFIX/state"
    echo "  --no-systemd     do not install a systemd unit; print how to start the agent"
}

while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) PREFIX=$2; shift 2 ;;
        --prefix=*) PREFIX=${1#*=}; shift ;;
        --state-dir) STATE_DIR=$2; shift 2 ;;
        --state-dir=*) STATE_DIR=${1#*=}; shift ;;
        --no-systemd) SYSTEMD=0; shift ;;
        --python) PYTHON=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "install.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
done
mkdir -p "$PREFIX"
PREFIX=$(cd "$PREFIX" && pwd)
[ -n "$STATE_DIR" ] || STATE_DIR=$PREFIX/state
mkdir -p "$STATE_DIR" "$PREFIX/etc" "$PREFIX/bin"
STATE_DIR=$(cd "$STATE_DIR" && pwd)
chmod 700 "$STATE_DIR"

echo "installing the tcm agent into $PREFIX (state in $STATE_DIR)"
"$PYTHON" -m venv "$PREFIX/venv"
# the agent's requirements, then tcm without its own (they are the server's too)
PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 "$PREFIX/venv/bin/python" -m pip install \
    --quiet --no-index --find-links "$HERE/wheels" -r "$HERE/agent-requirements.txt"
PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 "$PREFIX/venv/bin/python" -m pip install \
    --quiet --no-index --find-links "$HERE/wheels" --no-deps tcm

umask 077
cp "$HERE/ca.pem" "$PREFIX/etc/ca.pem"
cp "$HERE/agent.env" "$PREFIX/etc/agent.env"
[ -e "$STATE_DIR/profile.json" ] || cp "$HERE/profile.json" "$STATE_DIR/profile.json"
umask 022

cat > "$PREFIX/bin/tcm-agent-run" <<EOF
#!/bin/sh
# Runs the tcm agent in the foreground (systemd, or by hand). The token is used once.
. "$PREFIX/etc/agent.env"
exec "$PREFIX/venv/bin/twistd" -n --pidfile= tcm-agent --state-dir "$STATE_DIR" \
    --server "\$TCM_SERVER" --ca-cert "$PREFIX/etc/ca.pem" --token "\$TCM_TOKEN"
EOF
chmod 755 "$PREFIX/bin/tcm-agent-run"
sed -e "s|@PREFIX@|$PREFIX|g" -e "s|@STATE_DIR@|$STATE_DIR|g" \
    "$HERE/tcm-agent.service" > "$PREFIX/etc/tcm-agent.service"

if [ "$SYSTEMD" = 1 ] && command -v systemctl >/dev/null 2>&1 && [ "$(id -u)" = 0 ] \
        && [ -d /run/systemd/system ]; then
    cp "$PREFIX/etc/tcm-agent.service" /etc/systemd/system/tcm-agent.service
    systemctl daemon-reload
    systemctl enable --now tcm-agent.service
    echo "started: systemctl status tcm-agent"
else
    echo "installed. Start the agent with:"
    echo "  $PREFIX/bin/tcm-agent-run"
    echo "(or as a service: $PREFIX/etc/tcm-agent.service)"
fi
"""

UNIT = """[Unit]
Description=tcm endpoint agent
After=network-online.target
Wants=network-online.target

[Service]
ExecStart=@PREFIX@/bin/tcm-agent-run
Restart=always
RestartSec=5
# A stop or restart ends everything the agent started (jobs' commands included); the agent
# also ends its commands' process groups itself, even when it is killed.
KillMode=control-group
WorkingDirectory=@STATE_DIR@

[Install]
WantedBy=multi-user.target
"""

README = """tcm agent install package for connection profile {profile} (version {version}).

  ./install.sh --prefix DIR [--state-dir DIR] [--no-systemd]

installs the agent into a virtual environment from the wheels in wheels/ (no network
needed), writes its configuration, and starts it under systemd (as root) or prints how to
start it. The agent enrolls with {server} using the token in agent.env once; the token
expires {expires} and allows {uses} enrollment(s).
"""


def source_tree() -> str | None:
    """The tcm source tree the running tcm was installed from (editable installs)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(tcm.__file__)))
    if os.path.exists(os.path.join(root, "setup.cfg")):
        return root
    return None


#: What the agent runs on, and nothing of the server's (SQLAlchemy, Alembic, Mako,
#: prometheus_client): the install package carries these and the tcm wheel (installed
#: without its own requirements, which are the server's too). Kept with setup.cfg's
#: install_requires (same lower bounds); tests/test_install_package.py checks that every
#: module the agent imports comes from one of these or their dependencies.
AGENT_REQUIREMENTS = (
    "twisted[tls] >= 26.10",
    "autobahn >= 26.10",
    "pyopenssl >= 24.3",
    "service-identity >= 24.1",
    "zope.interface >= 6.0",
    "cryptography >= 42.0",
    "psutil >= 5.9",
    "treq >= 24.9",
    "attrs >= 23.1",
    "fastjsonschema >= 2.19",
)

# What of a source tree goes into the tcm wheel (and so into its digest); the rest of a
# checkout (a venv, .git, build output, caches) is neither copied nor hashed.
_SOURCE_FILES = ("setup.cfg", "setup.py", "pyproject.toml", "MANIFEST.in", "README.md")
_SOURCE_DIRS = ("tcm", os.path.join("twisted", "plugins"))
_SKIP = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo", "dropin.cache")


def _source_paths(tree: str) -> list[str]:
    """The files of `tree` (relative paths, sorted) that the tcm wheel is built from."""
    found = [f for f in _SOURCE_FILES if os.path.isfile(os.path.join(tree, f))]
    for top in _SOURCE_DIRS:
        for folder, dirs, files in os.walk(os.path.join(tree, top)):
            skipped = _SKIP(folder, dirs + files)
            dirs[:] = sorted(d for d in dirs if d not in skipped)
            rel = os.path.relpath(folder, tree)
            found += [os.path.join(rel, f) for f in files if f not in skipped]
    return sorted(found)


def source_digest(tree: str) -> str:
    """A digest of what the tcm wheel is built from: a changed source makes a new wheel even
    when the version did not change (a checkout between releases)."""
    h = hashlib.sha256()
    for rel in _source_paths(tree):
        h.update(rel.encode() + b"\0")
        with open(os.path.join(tree, rel), "rb") as f:
            h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()


def copy_source(tree: str, dest: str) -> str:
    """Copy what the tcm wheel is built from to `dest` (pip builds there, and leaves its
    build/ and egg-info there, not in the checkout)."""
    for rel in _source_paths(tree):
        target = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(os.path.join(tree, rel), target)
    return dest


def _pip_wheel(args: list[str], dest: str, timeout: float | None, what: str) -> None:
    cmd = [sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", dest, *args]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise PackageError(f"pip wheel ({what}) took over {timeout} s") from None
    if done.returncode != 0:
        raise PackageError(f"pip wheel ({what}) failed ({done.returncode}):\n{done.stderr[-3000:]}")


def build_wheels(
    source: str,
    dest: str,
    timeout: float | None = None,
    requirements: Sequence[str] = AGENT_REQUIREMENTS,
) -> None:
    """`pip wheel` the tcm source (alone) and the agent's requirements with theirs into
    dest: what an agent install needs (`AGENT_REQUIREMENTS`), not the server's."""
    _pip_wheel(["--no-deps", source], dest, timeout, "tcm")
    _pip_wheel(list(requirements), dest, timeout, "the agent's requirements")


@attrs.frozen
class Wheels:
    """The wheels of one package: their paths, and whether they were built now (False:
    found in the cache, or prebuilt)."""

    paths: tuple[str, ...]
    built: bool


class WheelCache:
    """The wheels of install packages, kept in `root` so that only the first package of a
    tcm version waits for `pip wheel`:

        root/tcm-VERSION-DIGEST/tcm-*.whl   the tcm wheel of a version and source digest
        root/deps-DIGEST/*.whl              AGENT_REQUIREMENTS and theirs, per requirement
                                            set, Python version and platform
        root/*.whl                          prebuilt wheels an operator put there: when a
                                            tcm wheel is among them, they are the set used

    A set is built in a temporary directory inside root and renamed into place, so a failed
    or interrupted build leaves nothing half made, and two processes sharing root both end
    with a whole set. Blocking (pip runs as a subprocess): the server calls `wheels()` on a
    thread; calls in one process run one at a time."""

    def __init__(
        self,
        root: str,
        source: str | None = None,
        requirements: Sequence[str] = AGENT_REQUIREMENTS,
        timeout: float = 600.0,
    ):
        self.root = root
        self.source = source
        self.requirements = tuple(requirements)
        self.timeout = timeout
        self._lock = threading.Lock()

    def prebuilt(self) -> list[str]:
        """The wheels put straight into root (all of them when a tcm wheel is among them)."""
        try:
            found = sorted(f for f in os.listdir(self.root) if f.endswith(".whl"))
        except FileNotFoundError:
            return []
        if not any(f.startswith("tcm-") for f in found):
            return []
        return [os.path.join(self.root, f) for f in found]

    def deps_key(self) -> str:
        text = json.dumps([self.requirements, sys.implementation.cache_tag, sys.platform])
        return "deps-" + hashlib.sha256(text.encode()).hexdigest()[:16]

    def wheels(self) -> Wheels:
        """The wheels of a package now: prebuilt ones, else the cached sets (built first
        when missing). PackageError when they cannot be had."""
        with self._lock:
            prebuilt = self.prebuilt()
            if prebuilt:
                return Wheels(tuple(prebuilt), built=False)
            tree = self.source or source_tree()
            if tree is None:
                raise PackageError(
                    f"no tcm wheel in {self.root} and no tcm source tree to build one from "
                    "(this tcm was not installed from a checkout): put the tcm wheel and the "
                    "agent's dependency wheels there (pip wheel --wheel-dir DIR tcm "
                    "AGENT_REQUIREMENTS...)"
                )
            tcm_key = f"tcm-{tcm.__version__}-{source_digest(tree)[:16]}"
            built = False
            for key, build in (
                (tcm_key, lambda d: self._build_tcm(tree, d)),
                (self.deps_key(), self._build_deps),
            ):
                if not os.path.isdir(os.path.join(self.root, key)):
                    self._build_set(key, build)
                    built = True
            paths = [
                os.path.join(self.root, key, f)
                for key in (tcm_key, self.deps_key())
                for f in sorted(os.listdir(os.path.join(self.root, key)))
                if f.endswith(".whl")
            ]
            return Wheels(tuple(paths), built)

    def _build_tcm(self, tree: str, dest: str) -> None:
        with tempfile.TemporaryDirectory(prefix="tcm-source-") as tmp:
            _pip_wheel(
                ["--no-deps", copy_source(tree, tmp)], dest, self.timeout, "tcm from " + tree
            )

    def _build_deps(self, dest: str) -> None:
        _pip_wheel(list(self.requirements), dest, self.timeout, "the agent's requirements")

    def _build_set(self, key: str, build) -> None:
        os.makedirs(self.root, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{key}.", dir=self.root)
        try:
            build(tmp)
            try:
                os.rename(tmp, os.path.join(self.root, key))
            except OSError:
                if not os.path.isdir(os.path.join(self.root, key)):
                    raise
                # another process sharing root made the same set meanwhile: theirs is kept
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


# The server URL goes into agent.env, which install.sh and tcm-agent-run source as shell:
# only characters that need no quoting in a URL of a host, a port and a path.
SERVER_URL_PATTERN = r"^https://[A-Za-z0-9._~\[\]:-]{1,255}(/[A-Za-z0-9._~/%-]{0,255})?$"
_SERVER_URL = re.compile(SERVER_URL_PATTERN)


def check_server_url(url: str) -> str:
    """`url` if it is an https:// URL an agent can take (and agent.env can hold as is)."""
    if not isinstance(url, str) or not _SERVER_URL.fullmatch(url):
        raise PackageError(
            f"the server URL must be https://HOST[:PORT] (no quotes, spaces or query), not {url!r}"
        )
    return url


def agent_server(settings: dict[str, Any], fallback: str) -> str:
    """The URL the package's agent enrolls with: the profile's first https:// server, else
    `fallback` (the URL the package was asked from)."""
    for url in settings.get("servers") or []:
        if isinstance(url, str) and url.startswith("https://"):
            return url
    return fallback


# Wheels are zip files already: gzip's best effort over them saves 1 % and costs seconds
COMPRESSLEVEL = 1


def _add(tar: tarfile.TarFile, name: str, data: bytes, mode: int, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    info.mtime = int(mtime)
    tar.addfile(info, io.BytesIO(data))


def package_name(profile_name: str) -> str:
    """The package's top directory (and file name without .tar.gz)."""
    return f"tcm-agent-{profile_name}"


def write_package(
    out: str | IO[bytes],
    profile: dict[str, Any],
    ca_pem: str,
    server: str,
    token: str,
    uses: int | None,
    expires: str,
    wheels: Sequence[str],
    now: float | None = None,
) -> list[str]:
    """Write the package (.tar.gz) to `out` (a path or a binary file); `profile` is the
    profile's view (name, version, settings). Returns the wheels' file names."""
    check_server_url(server)
    if "'" in token or "\n" in token:
        raise PackageError("an enrollment token holds no quote or newline")
    mtime = time.time() if now is None else now
    name = profile["name"]
    top = package_name(name)
    package_profile = {
        "name": name,
        "version": profile["version"],
        "settings": profile["settings"],
    }
    env = f"TCM_SERVER='{server}'\nTCM_TOKEN='{token}'\n"
    readme = README.format(
        profile=name,
        version=profile["version"],
        server=server,
        expires=expires,
        uses=uses if uses is not None else "any number of",
    )
    files = [
        ("install.sh", INSTALL_SH.encode(), 0o755),
        ("ca.pem", ca_pem.encode(), 0o644),
        ("profile.json", json.dumps(package_profile, indent=1).encode(), 0o644),
        ("agent.env", env.encode(), 0o600),
        ("tcm-agent.service", UNIT.encode(), 0o644),
        ("agent-requirements.txt", "\n".join(AGENT_REQUIREMENTS).encode(), 0o644),
        ("README", readme.encode(), 0o644),
    ]
    if isinstance(out, str):
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        tar = tarfile.open(out, "w:gz", compresslevel=COMPRESSLEVEL)
    else:
        tar = tarfile.open(fileobj=out, mode="w:gz", compresslevel=COMPRESSLEVEL)
    names = sorted(os.path.basename(w) for w in wheels)
    with tar:
        for rel, data, mode in files:
            _add(tar, f"{top}/{rel}", data, mode, mtime)
        for path in sorted(wheels, key=os.path.basename):
            tar.add(path, f"{top}/wheels/{os.path.basename(path)}")
    return names
