"""The admin command line's client of the REST API and its output helpers.

Where to reach the server comes from, in order: --url/--ca-cert/--token, the TCM_URL /
TCM_CA_CERT / TCM_TOKEN environment variables, or --state-dir (TCM_STATE_DIR) on the server
machine, whose server.json, ca.pem and admin.token say it all.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any


class CliError(Exception):
    """A failure to report on stderr with exit status 2."""


# The exit status when the reader of our output went away (`tcm agents | head -1`): what a
# shell reports for a process ended by SIGPIPE, without the traceback.
CLOSED_PIPE = 141


def closed_pipe() -> int:
    """Stop quietly after a BrokenPipeError on stdout: point stdout at /dev/null so that the
    interpreter's last flush does not fail again, and give CLOSED_PIPE."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return CLOSED_PIPE


def tls_context(ca_cert: str | None) -> ssl.SSLContext:
    """A client TLS context trusting `ca_cert` (the system's CAs when None); CliError when
    the file cannot be read or holds no certificate."""
    try:
        return ssl.create_default_context(cafile=ca_cert)
    except OSError as e:
        if isinstance(e, ssl.SSLError):
            raise CliError(f"--ca-cert {ca_cert}: not a PEM CA certificate ({e.reason})") from None
        raise CliError(f"--ca-cert {ca_cert}: cannot read it: {e.strerror or e}") from None


class Api:
    """A tiny JSON client for /api/v1 over HTTPS, trusting the tcm CA."""

    def __init__(self, url: str, ca_cert: str | None, token: str):
        self.url = url.rstrip("/")
        self.token = token
        self.context = tls_context(ca_cert)

    def call(
        self, method: str, path: str, body: Any = None, timeout: float = 60, text: bool = False
    ) -> Any:
        """The JSON answer (with `text`, the answer's text: e.g. CSV); CliError on an error."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.url + "/api/v1" + path,
            data=data,
            method=method,
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, context=self.context, timeout=timeout) as resp:
                body_bytes = resp.read()
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                error = json.loads(raw)
                message = error.get("error", raw.decode())
            except (ValueError, AttributeError):
                error, message = {}, raw.decode("utf-8", "replace")
            position = error.get("position") if isinstance(error, dict) else None
            if (
                isinstance(body, dict)
                and isinstance(body.get("filter"), str)
                and position is not None
            ):
                # point at the error in the filter the user typed
                message += f"\n  {body['filter']}\n  {' ' * int(position)}^"
            raise CliError(f"{method} {path}: {e.code} {message}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise CliError(f"cannot reach {self.url}: {reason}") from None
        if text:
            return body_bytes.decode("utf-8", "replace")
        return json.loads(body_bytes) if body_bytes else None


def connect(args: argparse.Namespace) -> Api:
    state_dir = args.state_dir or os.environ.get("TCM_STATE_DIR")
    url = args.url or os.environ.get("TCM_URL")
    ca = args.ca_cert or os.environ.get("TCM_CA_CERT")
    token = args.token or os.environ.get("TCM_TOKEN")
    if state_dir:
        try:
            with open(os.path.join(state_dir, "server.json")) as f:
                meta = json.load(f)
        except OSError as e:
            raise CliError(f"no server state in {state_dir}: {e.strerror}") from None
        url = url or meta["url"]
        if not ca and meta.get("ca"):
            ca = os.path.join(state_dir, meta["ca"])
        if not token:
            try:
                with open(os.path.join(state_dir, meta.get("token", "admin.token"))) as f:
                    token = f.read().strip()
            except OSError as e:
                raise CliError(f"cannot read the admin token: {e.strerror}") from None
    if not (url and token):
        raise CliError(
            "say where the server is: --state-dir DIR, or --url, --ca-cert and "
            "--token (or TCM_URL, TCM_CA_CERT, TCM_TOKEN)"
        )
    return Api(url, ca, token)


def arg_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_args_kv(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CliError(f"--arg takes KEY=VALUE, not {pair!r}")
        out[key] = arg_value(value)
    return out


def ts(value: float | None) -> str:
    if not value:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))


def table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(str(c))) for w, c in zip(widths, row, strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    for row in rows:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
    return "\n".join(lines)


def dump(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


# -- commands ----------------------------------------------------------------------------


DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*([smhdw]?)\s*$")
UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def duration(text: str) -> float:
    """Seconds from '90', '90s', '15m', '1h', '2d', '1w'."""
    m = DURATION.match(text)
    if m is None:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 90s, 15m, 1h, 2d)")
    return float(m.group(1)) * UNIT_SECONDS[m.group(2)]


def quote(value: str) -> str:
    return urllib.parse.quote(value, safe="")
