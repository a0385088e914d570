"""`tcm package build --profile NAME --out FILE`: a self-contained agent install package.

What the package holds and how it is made: tcm/installpackage.py (the server builds the same
package for the console, POST /api/v1/profiles/{name}/package). Here the profile, the CA
and a new enrollment token come through the API: the token is scoped to the profile (an
agent enrolling with it gets that profile), with the expiry and use count given here.

Wheels: `pip wheel` of the tcm source tree (found beside the installed tcm package, or
--source) into a temporary directory; the build machine needs an index (PyPI or a mirror)
or a pip cache. `--wheels DIR` takes prebuilt wheels from DIR instead (a CI cache).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any

from tcm.cli.api import Api, CliError
from tcm.installpackage import (  # noqa: F401  (AGENT_REQUIREMENTS, build_wheels: from here too)
    AGENT_REQUIREMENTS,
    PackageError,
    agent_server,
    build_wheels,
    check_server_url,
    copy_source,
    source_tree,
    write_package,
)


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
    url = server or agent_server(profile["settings"], api.url)
    try:
        check_server_url(url)
        with tempfile.TemporaryDirectory(prefix="tcm-package-") as tmp:
            if wheels:
                found = sorted(f for f in os.listdir(wheels) if f.endswith(".whl"))
                if not any(f.startswith("tcm-") for f in found):
                    raise CliError(f"no tcm wheel in {wheels}")
                paths = [os.path.join(wheels, f) for f in found]
            else:
                tree = source or source_tree()
                if tree is None:
                    raise CliError("cannot find the tcm source tree: give --source DIR or --wheels")
                wheel_dir = os.path.join(tmp, "wheels")
                os.makedirs(wheel_dir)
                # built from a copy: pip's build/ and egg-info stay out of the checkout
                build_wheels(copy_source(tree, os.path.join(tmp, "src")), wheel_dir)
                paths = [os.path.join(wheel_dir, f) for f in sorted(os.listdir(wheel_dir))]
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
            names = write_package(out, profile, ca_pem, url, token, uses, expires, paths)
    except PackageError as e:
        raise CliError(str(e)) from None
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
