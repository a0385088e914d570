"""What every benchmark shares: real processes on loopback, bounded waits, figures as a table
and as JSON. Nothing here is a stand-in: the server is `twistd tcm-server`, the agents are
`tcm-agent swarm` processes running the real agent code."""

from __future__ import annotations

import collections
import ctypes
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tcm.cli.admin import Api  # noqa: E402
from tests.harness import PYTHON, Server, free_port, wait_until  # noqa: E402

# Sessions one swarm process holds at most: the descriptor limit (20,000) less headroom.
PER_SWARM = 9000
SOURCES = "127.0.0.2-127.0.0.17"


class _MallInfo2(ctypes.Structure):
    _FIELDS = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
    _fields_ = [(name, ctypes.c_size_t) for name in _FIELDS.split()]


def heap_in_use() -> int:
    """Bytes glibc's malloc has handed out and not had back (brk heap, other arenas, mmapped
    blocks: OpenSSL's allocations and Python's blocks over 512 bytes); 0 elsewhere. What RSS
    holds beyond it is free memory malloc keeps, Python's own arenas, code and stacks."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        return 0
    info = libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)


def type_counts() -> collections.Counter:
    """Python's gc-tracked objects by type, after a full collection."""
    gc.collect()
    return collections.Counter(type(o).__qualname__ for o in gc.get_objects())


def print_growth(
    before: collections.Counter, after: collections.Counter, n: int, unit: str
) -> None:
    """The gc-tracked objects per `unit` (session, agent) that came between the two counts."""
    print(f"Python objects per {unit} by type (gc-tracked, >= 0.5 per {unit}):")
    total = 0
    for name, count in sorted(
        ((k, after[k] - before.get(k, 0)) for k in after), key=lambda kv: -kv[1]
    ):
        if count / n >= 0.5:
            print(f"  {count / n:7.2f}  {name}")
        total += count
    print(f"  {total / n:7.2f}  all gc-tracked objects")


def print_traced(snap0: Any, snap1: Any, n: int, unit: str, frames: int, top: int) -> None:
    """Python's allocations per `unit` between two tracemalloc snapshots, by source line
    (by traceback when `frames` > 1), down to 16 bytes per unit."""
    stats = snap1.compare_to(snap0, "traceback" if frames > 1 else "lineno")
    traced = sum(s.size_diff for s in stats)
    print(f"Python allocations per {unit} (tracemalloc): {traced / n / 1024:.1f} KB")
    for s in stats[:top]:
        if s.size_diff / n < 16:
            break
        print(f"  {s.size_diff / n:8.0f} B  {s.count_diff / n:6.2f} blocks")
        for line in s.traceback.format()[-2 * frames :]:
            print("     ", line)


def memory_arguments(p: Any) -> None:
    """The options the in-process memory benches share (session_memory, swarm_memory)."""
    p.add_argument("--trim", action="store_true", help="also RSS after glibc malloc_trim(0)")
    p.add_argument("--frames", type=int, default=1, help="traceback depth for --tracemalloc")
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--settle", type=float, default=5.0)
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--work", default="/tmp/tcm-bench")


def sleep(seconds: float) -> Any:
    """A Deferred that fires after `seconds` on the global reactor (the in-process benches)."""
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    return deferLater(reactor, seconds, lambda: None)  # type: ignore[arg-type]


def run_async(main: Callable[[], Coroutine[Any, Any, Any]]) -> int:
    """Run the coroutine `main()` as the reactor's one task, then stop: 0, or 1 with its
    traceback printed if it failed (the in-process benches)."""
    from twisted.internet import reactor
    from twisted.internet.defer import ensureDeferred

    failure: list = []

    def go() -> None:
        d = ensureDeferred(main())
        d.addErrback(failure.append)
        d.addBoth(lambda _: reactor.stop())  # type: ignore[attr-defined]

    reactor.callWhenRunning(go)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    if failure:
        failure[0].printTraceback(file=sys.stderr)
        return 1
    return 0


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "mem_gib": round(psutil.virtual_memory().total / 2**30),
        "python": sys.version.split()[0],
    }


class BenchServer(Server):
    """A twistd tcm-server for a benchmark, with its API at hand: on an admin listener of
    its own (`--admin-listen`), outside the agents' handshake gate, so that the bench's own
    calls are not queued behind ten thousand agents reconnecting (as an admin's would not)."""

    def __init__(self, *args: Any, admin: bool = True, **kw: Any):
        super().__init__(*args, **kw)
        self.admin_port = free_port() if admin else None
        if self.admin_port is not None:
            self.extra = [
                *self.extra,
                "--admin-listen",
                f"tcm:{self.admin_port}:interface=127.0.0.1",
            ]
            self._set_args()

    @property
    def admin_url(self) -> str:
        return f"https://127.0.0.1:{self.admin_port}" if self.admin_port else self.url

    def api(self) -> Api:
        with open(os.path.join(self.state_dir, "admin.token")) as f:
            return Api(self.admin_url, self.ca, f.read().strip())

    def status(self) -> dict[str, Any]:
        return self.api().call("GET", "/status")

    def ps(self) -> psutil.Process:
        assert self.proc is not None
        return psutil.Process(self.proc.pid)

    def wait_sessions(self, n: int, timeout: float) -> float:
        t0 = time.monotonic()
        wait_until(lambda: self.status()["sessions"] >= n, timeout, 0.25, f"{n} sessions")
        return time.monotonic() - t0


def swarm_state_dir(base: str) -> str:
    """The swarms' state directory under `base`: a link into memory (/dev/shm) where there is
    one. Ten thousand agents' ledgers are ten thousand disks in real life; in a swarm they are
    one, here ext4 mounted with `discard`, where the unlink of each acknowledged job's file
    took a third of a swarm's CPU in a push (py-spy). Identities kept there survive until the
    machine restarts; when they are gone, the server's state under `base` goes too (its
    database would list agents that never come back)."""
    path = os.path.join(base, "swarm")
    shm = "/dev/shm"
    if not (os.path.isdir(shm) and os.access(shm, os.W_OK)):
        return path
    target = os.path.join(shm, "tcm-bench" + os.path.abspath(base).replace("/", "_"), "swarm")
    if os.path.islink(path) and not os.path.isdir(target):
        os.unlink(path)
        shutil.rmtree(os.path.join(base, "server"), ignore_errors=True)
    if not os.path.lexists(path):
        os.makedirs(target, exist_ok=True)  # the link must not dangle: the swarms makedirs it
        os.makedirs(base, exist_ok=True)
        os.symlink(target, path)
    elif not os.path.islink(path):  # identities of an earlier run on disk: move them
        shutil.rmtree(target, ignore_errors=True)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.move(path, target)
        os.symlink(target, path)
    return path


class SwarmProcs:
    """`tcm-agent swarm` processes sharing one state directory, PER_SWARM agents each."""

    def __init__(
        self,
        base: str,
        server: BenchServer,
        count: int,
        token: str,
        extra: list[str] | None = None,
        url: str | None = None,
        nice: int = 0,
        rate: float = 1500.0,
        processes: int | None = None,
    ):
        self.nice = nice  # the agents' machines run below the server's priority here
        self.rate = rate  # agents started per second by each process (enrolled ones)
        self.processes = processes  # default: as few as the descriptor limit allows
        self.base = base
        self.server = server
        self.url = url or server.url  # where the agents connect (a gateway, a proxy)
        self.count = count
        self.token = token
        self.extra = extra or []
        self.state_dir = swarm_state_dir(base)
        self.procs: list[subprocess.Popen] = []

    def start(self) -> None:
        # As few processes as the descriptor limit allows, with the agents spread evenly over
        # them: 10,000 as 2 x 5,000 rather than 9,000 + 1,000, so that neither process is the
        # one every other waits for.
        processes = self.processes or -(-self.count // PER_SWARM)
        per = -(-self.count // processes) if processes else 0
        first = 0
        while first < self.count:
            n = min(per, self.count - first)
            for stale in ("swarm", "enroll"):  # an earlier run's status, maybe other counts
                try:
                    os.unlink(os.path.join(self.state_dir, f"{stale}-{first}.json"))
                except FileNotFoundError:
                    pass
            log = open(os.path.join(self.base, f"swarm-{first}.log"), "ab")
            self.procs.append(
                subprocess.Popen(
                    [
                        PYTHON,
                        "-m",
                        "tcm.cli.agent",
                        "swarm",
                        "--count",
                        str(n),
                        "--first",
                        str(first),
                        "--server",
                        self.url,
                        "--ca-cert",
                        self.server.ca,
                        "--token",
                        self.token,
                        "--source-addresses",
                        SOURCES,
                        "--state-dir",
                        self.state_dir,
                        "--rate",
                        str(self.rate),
                        *self.extra,
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    preexec_fn=(lambda: os.nice(self.nice)) if self.nice else None,
                )
            )
            log.close()
            first += n

    def rss(self) -> int:
        """The swarm processes' resident memory, each process's own share included."""
        return sum(psutil.Process(p.pid).memory_info().rss for p in self.procs)

    def rss_at_start(self) -> int:
        """What the swarm processes held before their first agent (interpreter, modules,
        handlers), from their status files: paid once per process, not per agent."""
        total = 0
        first = 0
        per = -(-self.count // len(self.procs)) if self.procs else 0
        for _ in self.procs:
            path = os.path.join(self.state_dir, f"swarm-{first}.json")
            with open(path) as f:
                total += json.load(f).get("rss_at_start") or 0
            first += per
        return total

    def rss_per_agent(self, agents: int) -> dict[str, float]:
        """KB per agent: `total` (the processes' RSS / agents) and `marginal` (less what
        each process held before its first agent: what one more agent costs), and
        `state_kb` (the agents' state directories, in memory where /dev/shm holds them:
        tmpfs pages are the machine's memory but no process's RSS)."""
        rss = self.rss()
        row = {
            "total_kb": round(rss / agents / 1024, 1),
            "marginal_kb": round((rss - self.rss_at_start()) / agents / 1024, 1),
        }
        if os.path.realpath(self.state_dir).startswith("/dev/shm"):
            row["state_kb"] = round(disk_usage(self.state_dir) / agents / 1024, 1)
        return row

    def statuses(self, prefix: str = "swarm") -> list[dict[str, Any]]:
        """Each process's last status file (`swarm-<first>.json`; `enroll-<first>.json` for
        --enroll-only), those not written yet left out."""
        out = []
        per = -(-self.count // len(self.procs)) if self.procs else 0
        for k in range(len(self.procs)):
            try:
                with open(os.path.join(self.state_dir, f"{prefix}-{k * per}.json")) as f:
                    out.append(json.load(f))
            except (OSError, ValueError):
                pass
        return out

    def wait(self, timeout: float) -> list[int | None]:
        """Wait (bounded) for every process to exit; their exit codes (None: still running)."""
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        return [p.poll() for p in self.procs]

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        self.procs = []


def disk_usage(path: str) -> int:
    """Bytes of storage the files and directories under `path` take (as du counts)."""
    total = 0
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return total


def cpu_percent(proc: psutil.Process, seconds: float) -> float:
    """CPU use of a process over `seconds`, in % of one core."""
    before = proc.cpu_times()
    time.sleep(seconds)
    after = proc.cpu_times()
    used = (after.user - before.user) + (after.system - before.system)
    return 100.0 * used / seconds


def cpu_seconds(proc: psutil.Process) -> float:
    """User + system CPU seconds a process used so far."""
    t = proc.cpu_times()
    return t.user + t.system


class KeptApi:
    """The admin API over one kept-alive HTTPS connection: a poll for a job's counts costs
    the server a request, not a TLS handshake (which would count in `server_cpu_s`)."""

    def __init__(self, api: Api):
        import http.client
        import urllib.parse

        u = urllib.parse.urlsplit(api.url)
        self._api = api
        self._conn = http.client.HTTPSConnection(
            u.hostname, u.port, context=api.context, timeout=60
        )

    def call(self, method: str, path: str, body: Any = None) -> Any:
        headers = {"Authorization": f"Bearer {self._api.token}"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        for attempt in (0, 1):
            try:
                self._conn.request(method, "/api/v1" + path, body=data, headers=headers)
                resp = self._conn.getresponse()
                raw = resp.read()
                break
            except (OSError, ConnectionError):
                self._conn.close()  # the server closed an idle connection: once more
                if attempt:
                    raise
        if resp.status >= 400:
            raise AssertionError(f"{method} {path}: {resp.status} {raw[:300]!r}")
        return json.loads(raw) if raw else None

    def close(self) -> None:
        self._conn.close()


def run_job(
    api: Api,
    body: dict[str, Any],
    total: int,
    timeout: float,
    cpu_of: psutil.Process | None = None,
) -> dict[str, Any]:
    """Create a job; wait until every target finished; per-target times (server clock).

    With `cpu_of` (the server process), also the CPU seconds it used from just before the
    job's creation until every result was stored (`server_cpu_s`): the polls for the counts
    are in it (one small GET every 0.2 s), the final GET of every result is not."""
    kept = KeptApi(api)
    kept.call("GET", "/status")  # the connection's handshake before the clock starts
    cpu0 = cpu_seconds(cpu_of) if cpu_of is not None else 0.0
    created = kept.call("POST", "/jobs", body)["job"]
    deadline = time.monotonic() + timeout
    polls = 0
    while True:
        job = kept.call("GET", f"/jobs/{created}?results=false")  # counts only: cheap
        polls += 1
        if job["counts"]["completed"] >= total or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    cpu_s = cpu_seconds(cpu_of) - cpu0 if cpu_of is not None else None
    kept.close()
    job = api.call("GET", f"/jobs/{created}")  # every target, once, at the end
    t0 = job["created_at"]
    results = job["results"]
    return {
        "job": created,
        "counts": job["counts"],
        "server_cpu_s": cpu_s,
        "polls": polls,
        # server clock: written to the agent's session; agent clock (same machine): the
        # agent had the request; server clock: its result stored
        "sent": sorted(r["delivered_at"] - t0 for r in results if r["delivered_at"]),
        "received": sorted(r["received_at"] - t0 for r in results if r["received_at"]),
        "stored": sorted(r["stored_at"] - t0 for r in results if r["stored_at"]),
    }


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    k = min(len(values) - 1, max(0, round(p / 100 * (len(values) - 1))))
    return sorted(values)[k]


def summary(values: list[float]) -> dict[str, float | None]:
    return {
        "p50": pct(values, 50),
        "p99": pct(values, 99),
        "last": max(values) if values else None,
        "n": len(values),
    }


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    head = [c[1] for c in columns]
    body = []
    for r in rows:
        line = []
        for key, _ in columns:
            v: Any = r
            for part in key.split("."):
                v = v.get(part) if isinstance(v, dict) else None
            line.append(f"{v:.3f}" if isinstance(v, float) else str(v))
        body.append(line)
    widths = [
        max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)
    ]
    out = ["  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True))]
    out += ["  ".join(c.rjust(w) for c, w in zip(b, widths, strict=True)) for b in body]
    return "\n".join(out)


def emit(
    name: str,
    rows: list[dict[str, Any]],
    columns: list[tuple[str, str]],
    notes: list[str] | None = None,
) -> None:
    print(table(rows, columns))
    for n in notes or []:
        print(n)
    print(json.dumps({"bench": name, "machine": machine(), "rows": rows}, default=str))


__all__ = ["Api", "BenchServer", "SwarmProcs", "free_port", "wait_until", "PYTHON", "ROOT"]
