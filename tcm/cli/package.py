"""`tcm package build --profile NAME --out FILE`: a self-contained agent install package.

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

The enrollment token is created through the API for the package: scoped to the profile (an
agent enrolling with it gets that profile), with the expiry and use count given here.

Wheels: `pip wheel` of the tcm source tree (found beside the installed tcm package, or
--source) into a temporary directory; the build machine needs an index (PyPI or a mirror)
or a pip cache. `--wheels DIR` takes prebuilt wheels from DIR instead (a CI cache).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from typing import Any

from tcm.cli.api import Api, CliError

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
    import tcm

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


def build_wheels(source: str, dest: str, timeout: float | None = None) -> None:
    """`pip wheel` the tcm source (alone) and the agent's requirements with theirs into
    dest: what an agent install needs (`AGENT_REQUIREMENTS`), not the server's."""
    pip = [sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", dest]
    for cmd in ([*pip, "--no-deps", source], [*pip, *AGENT_REQUIREMENTS]):
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise CliError(f"pip wheel took over {timeout} s") from None
        if done.returncode != 0:
            raise CliError(f"pip wheel failed ({done.returncode}):\n{done.stderr[-3000:]}")


def _add(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    info.mtime = int(time.time())
    tar.addfile(info, io.BytesIO(data))


def build_package(
    api: Api,
    profile_name: str,
    out: str,
    uses: int,
    ttl: float,
    wheels: str | None = None,
    source: str | None = None,
    server: str | None = None,
) -> dict[str, Any]:
    """Build the package; returns what went in (without the token's secret)."""
    profile = api.call("GET", f"/profiles/{profile_name}")
    ca_pem = api.call("GET", "/ca")["ca"]
    settings = profile["settings"]
    url = server or (settings.get("servers") or [api.url])[0]
    with tempfile.TemporaryDirectory(prefix="tcm-package-") as tmp:
        wheel_dir = os.path.join(tmp, "wheels")
        os.makedirs(wheel_dir)
        if wheels:
            found = [f for f in os.listdir(wheels) if f.endswith(".whl")]
            if not any(f.startswith("tcm-") for f in found):
                raise CliError(f"no tcm wheel in {wheels}")
            for f in found:
                shutil.copy(os.path.join(wheels, f), wheel_dir)
        else:
            tree = source or source_tree()
            if tree is None:
                raise CliError("cannot find the tcm source tree: give --source DIR or --wheels")
            build_wheels(tree, wheel_dir)
        # The token last: a failed wheel build does not leave a live token behind.
        token = api.call(
            "POST",
            "/tokens",
            {
                "uses": uses,
                "ttl": ttl,
                "profile": profile_name,
                "description": f"install package for profile {profile_name}",
            },
        )["token"]
        expires = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(time.time() + ttl))
        top = f"tcm-agent-{profile_name}"
        package_profile = {
            "name": profile["name"],
            "version": profile["version"],
            "settings": settings,
        }
        env = f"TCM_SERVER='{url}'\nTCM_TOKEN='{token}'\n"
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with tarfile.open(out, "w:gz") as tar:
            _add(tar, f"{top}/install.sh", INSTALL_SH.encode(), 0o755)
            _add(tar, f"{top}/ca.pem", ca_pem.encode())
            _add(tar, f"{top}/profile.json", json.dumps(package_profile, indent=1).encode())
            _add(tar, f"{top}/agent.env", env.encode(), 0o600)
            _add(tar, f"{top}/tcm-agent.service", UNIT.encode())
            _add(tar, f"{top}/agent-requirements.txt", "\n".join(AGENT_REQUIREMENTS).encode())
            readme = README.format(
                profile=profile_name,
                version=profile["version"],
                server=url,
                expires=expires,
                uses=uses,
            )
            _add(tar, f"{top}/README", readme.encode())
            names = sorted(os.listdir(wheel_dir))
            for name in names:
                tar.add(os.path.join(wheel_dir, name), f"{top}/wheels/{name}")
    return {
        "out": out,
        "profile": profile_name,
        "profile_version": profile["version"],
        "server": url,
        "token_id": token.partition(".")[0],
        "token_uses": uses,
        "token_expires": expires,
        "wheels": names,
    }


def cmd_package_build(api: Api, args) -> int:
    info = build_package(
        api, args.profile, args.out, args.uses, args.ttl, args.wheels, args.source, args.server
    )
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
    else:
        print(
            f"{info['out']}: agent package for profile {info['profile']} "
            f"v{info['profile_version']}, {len(info['wheels'])} wheels, server {info['server']}, "
            f"token {info['token_id']} ({info['token_uses']} uses, expires "
            f"{info['token_expires']})"
        )
    return 0


def add_package_command(sub: Any) -> None:
    pkg = sub.add_parser("package", help="agent install packages")
    psub = pkg.add_subparsers(dest="subcmd", required=True)
    s = psub.add_parser("build", help="build a self-contained agent install package (.tar.gz)")
    s.add_argument("--profile", required=True, help="the connection profile it installs")
    s.add_argument("--out", required=True, help="the package file to write (.tar.gz)")
    s.add_argument("--uses", type=int, default=100, help="enrollments its token allows")
    s.add_argument("--ttl", type=float, default=30 * 86400, help="seconds its token is valid")
    s.add_argument("--server", help="the URL agents use (default: the profile's, or --url)")
    s.add_argument("--wheels", help="take prebuilt wheels (tcm + dependencies) from DIR")
    s.add_argument("--source", help="the tcm source tree to build the wheel from")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_package_build)
