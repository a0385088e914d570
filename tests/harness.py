"""Real processes for integration tests: twistd tcm-server / tcm-agent on loopback, and the CLI.

Every wait is bounded; every process is killed at teardown.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

PYTHON = sys.executable


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def tls_exchange(
    port: int, ca_pem: bytes, parts: list[bytes], patience: float = 5.0, host: str = "127.0.0.1"
) -> tuple[bytes, bool]:
    """Send `parts` over TLS (trusting `ca_pem`, no name check), then read until the peer
    closes or `patience` passes: (what was read, whether it closed within `patience`)."""
    context = ssl.create_default_context(cadata=ca_pem.decode())
    context.check_hostname = False
    raw = socket.create_connection((host, port), timeout=patience)
    with context.wrap_socket(raw) as conn:
        conn.settimeout(patience)
        deadline = time.monotonic() + patience
        try:
            for part in parts:
                conn.sendall(part)
        except OSError:
            pass  # the peer answered and closed while we were still sending
        received = b""
        while time.monotonic() < deadline:
            try:
                data = conn.recv(65536)
            except TimeoutError:
                return received, False
            except (OSError, ssl.SSLError):
                return received, True
            if not data:
                return received, True
            received += data
        return received, False


def wait_until(
    predicate: Callable[[], Any],
    timeout: float = 20.0,
    interval: float = 0.05,
    what: str = "condition",
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class Process:
    """A twistd service in the foreground, its output in a log file."""

    def __init__(
        self,
        name: str,
        args: list[str],
        log_path: str,
        env: dict | None = None,
        executable: str | None = None,
    ):
        self.name = name
        self.args = args
        self.log_path = log_path
        self.env = env
        self.executable = executable  # a program to run with `args` instead of twistd
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.log_path, "ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(self.env or {})}
        twistd = [PYTHON, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile="]
        self.proc = subprocess.Popen(
            [self.executable, *self.args] if self.executable else [*twistd, *self.args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=os.path.dirname(self.log_path),
        )
        log.close()

    def log(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def count(self, text: str) -> int:
        return self.log().count(text)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL: no cleanup, as a crash."""
        if self.alive():
            self.proc.kill()  # type: ignore[union-attr]
            self.proc.wait(10)  # type: ignore[union-attr]

    def stop(self, timeout: float = 10.0) -> None:
        if not self.alive():
            return
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


class Server(Process):
    def __init__(
        self,
        base: str,
        port: int | None = None,
        extra: list[str] | None = None,
        name: str = "server",
        plugin: str = "tcm-server",
    ):
        self.plugin = plugin  # "tcm": the all-in-one service
        self.state_dir = os.path.join(base, name)
        os.makedirs(self.state_dir, exist_ok=True)
        self.port = port or free_port()
        self.extra = extra or []
        super().__init__(name, [], os.path.join(base, f"{name}.log"))
        self._set_args()

    def _set_args(self) -> None:
        self.args = [
            self.plugin,
            "--state-dir",
            self.state_dir,
            "--port",
            str(self.port),
            *self.extra,
        ]

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca(self) -> str:
        return os.path.join(self.state_dir, "ca.pem")

    def start(self) -> None:
        super().start()
        self.wait_ready()

    def wait_ready(self, timeout: float = 30.0) -> None:
        def ready() -> bool:
            if not self.alive():
                raise AssertionError(f"server exited:\n{self.log()[-3000:]}")
            if not os.path.exists(os.path.join(self.state_dir, "server.json")):
                return False
            return self.cli_result("status").returncode == 0

        wait_until(ready, timeout, 0.1, "server to answer")

    def cli_result(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [PYTHON, "-m", "tcm.cli.admin", "--state-dir", self.state_dir, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def cli(self, *args: str, timeout: float = 120) -> str:
        r = self.cli_result(*args, timeout=timeout)
        if r.returncode not in (0, 1):
            raise AssertionError(
                f"tcm {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
            )
        return r.stdout

    def cli_json(self, *args: str, timeout: float = 120) -> Any:
        return json.loads(self.cli(*args, "--json", timeout=timeout))

    def token(self, uses: int | None = None, ttl: float | None = None) -> str:
        args = ["token", "create"]
        if uses is not None:
            args += ["--uses", str(uses)]
        if ttl is not None:
            args += ["--ttl", str(ttl)]
        return self.cli(*args).strip()

    def gated_task(self, gate: Any, first: str = "started", last: str = "finished") -> str:
        """A `command.run` job to every agent that prints `first`, waits until the file
        `gate` exists, prints `last` and ends: a task that runs as long as the test wants."""
        script = f'echo {first}; while [ ! -e "{gate}" ]; do sleep 0.05; done; echo {last}'
        args = json.dumps({"argv": ["sh", "-c", script]})
        out = self.cli("run", "command.run", "--args-json", args, "--targets", "all", "--json")
        return json.loads(out)["job"]

    def job(self, job_id: str) -> dict[str, Any]:
        return json.loads(self.cli("jobs", "show", job_id, "--json"))

    def agents(self) -> list[dict[str, Any]]:
        return json.loads(self.cli("agents", "--json"))


class AgentProc(Process):
    SESSION_OPEN = "persistent session open"

    def __init__(
        self,
        base: str,
        name: str,
        server: Server | None = None,
        token: str | None = None,
        extra: list[str] | None = None,
    ):
        self.state_dir = os.path.join(base, name)
        os.makedirs(self.state_dir, exist_ok=True)
        args = [
            "tcm-agent",
            "--state-dir",
            self.state_dir,
            "--backoff-max",
            "2",
            "--backoff-initial",
            "0.2",
            *(extra or []),
        ]
        if server is not None and token is not None:
            args += ["--server", server.url, "--ca-cert", server.ca, "--token", token]
        super().__init__(name, args, os.path.join(base, f"{name}.log"))

    @property
    def agent_id(self) -> str:
        with open(os.path.join(self.state_dir, "agent.json")) as f:
            return json.load(f)["agent_id"]

    def start(self, wait: bool = True, sessions: int | None = None) -> None:
        before = self.count(self.SESSION_OPEN)
        super().start()
        if wait:
            self.wait_session(before + 1 if sessions is None else sessions)

    def wait_session(self, n: int, timeout: float = 30.0) -> None:
        def opened() -> bool:
            if not self.alive():
                raise AssertionError(f"agent {self.name} exited:\n{self.log()[-3000:]}")
            return self.count(self.SESSION_OPEN) >= n

        wait_until(opened, timeout, 0.05, f"agent {self.name} session #{n}")

    def ledger(self) -> dict[str, dict[str, Any]]:
        out = {}
        d = os.path.join(self.state_dir, "jobs")
        if os.path.isdir(d):
            for name in os.listdir(d):
                if name.endswith(".json"):
                    with open(os.path.join(d, name)) as f:
                        entry = json.load(f)
                    out[entry["job"]] = entry
        return out


class TaskServerProc(Process):
    """twistd tcm-taskserver, enrolled with `server` on its first start."""

    LINK_UP = "link to "

    def __init__(
        self,
        base: str,
        name: str,
        server: Server,
        port: int | None = None,
        max_clients: int | None = None,
        extra: list[str] | None = None,
    ):
        self.node = name
        self.server = server
        self.state_dir = os.path.join(base, name)
        os.makedirs(self.state_dir, exist_ok=True)
        self.port = port or free_port()
        self.max_clients = max_clients
        super().__init__(name, [], os.path.join(base, f"{name}.log"))
        self.extra = extra or []

    def start(self, wait: bool = True) -> None:
        args = [
            "tcm-taskserver",
            "--server",
            self.server.url,
            "--state-dir",
            self.state_dir,
            "--port",
            str(self.port),
            *self.extra,
        ]
        if not os.path.exists(os.path.join(self.state_dir, "node.json")):
            enroll = ["taskservers", "enroll", self.node]
            if self.max_clients is not None:
                enroll += ["--max-clients", str(self.max_clients)]
            token = self.server.cli(*enroll).strip()
            args += ["--ca-cert", self.server.ca, "--token", token]
        self.args = args
        super().start()
        if wait:
            wait_until(
                lambda: self._check_alive() and self._up(),
                30,
                0.05,
                f"task server {self.node} link",
            )

    def _check_alive(self) -> bool:
        if not self.alive():
            raise AssertionError(f"task server {self.node} exited:\n{self.log()[-3000:]}")
        return True

    def _up(self) -> bool:
        listing = self.server.cli_json("taskservers")
        return any(t["name"] == self.node and t["state"] in ("up", "full") for t in listing)


def agent_status(agent: AgentProc) -> dict[str, Any]:
    """`tcm-agent status --json` of a running agent (its control socket)."""
    done = subprocess.run(
        [PYTHON, "-m", "tcm.cli.agent", "--state-dir", agent.state_dir, "status", "--json"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def start_agents(
    base: str, server: Server, n: int, prefix: str = "agent", extra: list[str] | None = None
) -> list[AgentProc]:
    """`n` agents enrolled with one token, started together, each with its session open."""
    token = server.token(uses=n)
    procs = [AgentProc(base, f"{prefix}{i}", server, token, extra=extra) for i in range(n)]
    try:
        for p in procs:
            p.start(wait=False)
        for p in procs:
            p.wait_session(1)
    except BaseException:
        for p in procs:
            p.stop()
        raise
    return procs


def share_ca(source: Server, target: Server) -> None:
    """Give `target` the tcm CA of `source` (before its first start): servers behind one
    gateway share one CA, so agents of each trust the gateway (docs/operating.md)."""
    import shutil

    for name in ("ca.pem", "ca.key"):
        shutil.copy2(os.path.join(source.state_dir, name), os.path.join(target.state_dir, name))


class GatewayProc(Process):
    """twistd tcm-gateway with one upstream per server, enrolled on its first start."""

    def __init__(
        self,
        base: str,
        name: str,
        servers: dict[str, Server],
        port: int | None = None,
        extra: list[str] | None = None,
        nodes: dict[str, list[Server]] | None = None,
    ):
        self.node = name
        self.servers = servers
        self.nodes = nodes or {}  # upstream -> further nodes of its cluster (NAME=URL1,URL2)
        self.state_dir = os.path.join(base, name)
        os.makedirs(self.state_dir, exist_ok=True)
        self.port = port or free_port()
        self.extra = extra or []
        super().__init__(name, [], os.path.join(base, f"{name}.log"))

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self, wait: bool = True) -> None:
        args = ["tcm-gateway", "--state-dir", self.state_dir, "--port", str(self.port)]
        first = next(iter(self.servers.values()))
        for upstream, server in self.servers.items():
            urls = [server.url, *(n.url for n in self.nodes.get(upstream, []))]
            args += ["--upstream", f"{upstream}={','.join(urls)}"]
            if not os.path.exists(os.path.join(self.state_dir, "upstreams", upstream, "cert.pem")):
                token = server.cli("gateways", "enroll", self.node).strip()
                args += ["--upstream-token", f"{upstream}={token}"]
        args += ["--ca-cert", first.ca, *self.extra]
        self.args = args
        super().start()
        if wait:
            self.wait_links()

    def wait_links(self, timeout: float = 30.0) -> None:
        def up() -> bool:
            if not self.alive():
                raise AssertionError(f"gateway {self.node} exited:\n{self.log()[-3000:]}")
            return all(
                any(g["name"] == self.node and g["state"] == "up" for g in s.cli_json("gateways"))
                for s in self.servers.values()
            )

        wait_until(up, timeout, 0.1, f"gateway {self.node} links")


# Debian's chromium as this machine runs it headless: no sandbox as root, no GPU, and none of
# its background connections (refused by the closed network, many at a time).
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def launch_chromium(playwright: Any) -> Any:
    """Debian's chromium under Playwright (`executable_path=shutil.which("chromium")`:
    Playwright's own browser download is not reachable here)."""
    import shutil

    return playwright.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS)
