"""Several server nodes on one PostgreSQL and one Redis (tcm/server/cluster): real twistd
node processes and real agents spread over them, against the local PostgreSQL (a fresh
database per test) and Redis (keys and channels under the cluster's own id; the Redis restart
test runs a redis-server of its own on a free port, never the machine's shared one)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from tests.harness import AgentProc, Server, free_port, wait_until
from tests.storedb import POSTGRES

REDIS = os.environ.get("TCM_TEST_REDIS", "redis://127.0.0.1:6379/0")

pytestmark = pytest.mark.integration


@pytest.fixture
def database() -> Iterator[str]:
    """A fresh PostgreSQL database for one cluster, dropped after the test."""
    admin = sa.create_engine(
        POSTGRES, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3}
    )
    name = "tcm_cluster_test_" + uuid.uuid4().hex[:10]
    try:
        with admin.connect() as c:
            c.execute(sa.text(f"CREATE DATABASE {name}"))
    except sa.exc.OperationalError as e:
        admin.dispose()
        pytest.skip(f"PostgreSQL at {POSTGRES} unreachable: {e.orig}")
    yield admin.url.set(database=name).render_as_string(hide_password=False)
    with admin.connect() as c:
        c.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    admin.dispose()


def _redis_reachable(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=2).ping())
    except redis.RedisError:
        return False


@pytest.fixture
def redis_url() -> str:
    if not _redis_reachable(REDIS):
        pytest.skip(f"Redis at {REDIS} unreachable")
    return REDIS


class Cluster:
    """Nodes n1..nN on one database and one Redis, sharing one cluster key file."""

    def __init__(self, base: str, database: str, redis_url: str):
        self.base = base
        self.database = database
        self.redis = redis_url
        self.key = os.path.join(base, "cluster.key")
        self.nodes: list[Server] = []
        self.agents: list[AgentProc] = []

    def node(self, name: str, start: bool = True, extra: list[str] | None = None) -> Server:
        server = Server(
            self.base,
            name=name,
            extra=[
                "--database",
                self.database,
                "--redis",
                self.redis,
                "--node-name",
                name,
                "--cluster-key",
                self.key,
                *(extra or []),
            ],
        )
        self.nodes.append(server)
        if start:
            server.start()
        return server

    def agent(self, name: str, first: Server, token: str, start: bool = True) -> AgentProc:
        """An agent preferring `first`, with every other node as a further --server."""
        others = [n for n in self.nodes if n is not first]
        extra = ["--server", first.url, "--ca-cert", first.ca, "--token", token]
        extra += [a for n in others for a in ("--server", n.url)]
        agent = AgentProc(self.base, name, extra=extra)
        agent.env = {"TCM_TEST_AGENT": name}
        self.agents.append(agent)
        if start:
            agent.start(wait=False)
        return agent

    def stop(self) -> None:
        for p in [*self.agents, *self.nodes]:
            p.stop()


@pytest.fixture
def cluster(tmp_path: Any, database: str, redis_url: str) -> Iterator[Cluster]:
    c = Cluster(str(tmp_path), database, redis_url)
    try:
        yield c
    finally:
        c.stop()


def _nodes(server: Server) -> dict[str, dict[str, Any]]:
    return {n["node"]: n for n in server.cli_json("nodes")["nodes"]}


def _runs(path: str) -> Counter:
    """Each agent's runs of the job (one line per start, written by the job itself)."""
    if not os.path.exists(path):
        return Counter()
    with open(path) as f:
        return Counter(line.strip() for line in f if line.strip())


def _gated_job(server: Server, runs: str, gate: str) -> str:
    """A job every agent runs until `gate` exists; each start appends the agent's name to
    `runs` (so a second run of one target shows)."""
    script = (
        f'echo "$TCM_TEST_AGENT" >> "{runs}"; echo started; '
        f'while [ ! -e "{gate}" ]; do sleep 0.05; done; echo finished'
    )
    args = json.dumps({"argv": ["sh", "-c", script]})
    out = server.cli("run", "command.run", "--args-json", args, "--targets", "all", "--json")
    return json.loads(out)["job"]


def _metrics(port: int) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def _states(server: Server, job_id: str) -> Counter:
    return Counter(r["state"] for r in server.job(job_id)["results"])


@pytest.mark.parametrize(
    "args, says",
    [
        (["--redis", "redis://127.0.0.1:6379/0"], "--database postgresql"),
        (
            ["--redis", "redis://127.0.0.1:6379/0", "--database", "sqlite:////tmp/x.sqlite"],
            "SQLite serves one node only",
        ),
        (["--cluster-key", "k", "--database", "postgresql://x/y"], "give --redis too"),
        (
            ["--redis", "localhost:6379", "--database", "postgresql+psycopg2://x/y"],
            "--redis wants redis://HOST:PORT/DB",
        ),
        (["--name", "a", "--node-name", "b"], "--name and --node-name name the same"),
    ],
)
def test_cluster_options_refused(tmp_path: Any, args: list[str], says: str) -> None:
    """`--redis` without a PostgreSQL database (and other wrong combinations): a clear
    refusal before anything starts."""
    from twisted.python import usage

    from tcm.server.tap import Options

    with pytest.raises(usage.UsageError) as e:
        Options().parseOptions(["--state-dir", str(tmp_path), *args])
    assert says in str(e.value)


def test_three_nodes_one_cluster(cluster: Cluster) -> None:
    """Three nodes: one CA and one admin token, `tcm nodes` on any node lists all three up,
    and a job created on one node reaches agents on every node."""
    n1 = cluster.node("n1")
    n2, n3 = cluster.node("n2"), cluster.node("n3")
    for n in (n2, n3):
        with open(n.ca, "rb") as a, open(n1.ca, "rb") as b:
            assert a.read() == b.read()
        with open(os.path.join(n.state_dir, "admin.token")) as a:
            with open(os.path.join(n1.state_dir, "admin.token")) as b:
                assert a.read() == b.read()
    assert "made its CA" in n1.log() and "took its CA" in n3.log()

    # agents spread: two prefer each node; the token is made on n1 and used on all
    token = n1.token(uses=6)
    agents = [cluster.agent(f"a{i}", node, token) for i, node in enumerate((n1, n2, n3) * 2)]
    for a in agents:
        a.wait_session(1)

    def spread() -> bool:
        nodes = _nodes(n2)
        return all(nodes[n]["sessions"]["core"] == 2 for n in ("n1", "n2", "n3"))

    wait_until(spread, 20, 0.3, "two sessions on each node")
    nodes = _nodes(n3)
    assert {n: v["state"] for n, v in nodes.items()} == {"n1": "up", "n2": "up", "n3": "up"}
    status = n1.cli_json("nodes")
    assert status["bus"] == "up" and status["node"] == "n1"
    # any node lists every agent online, with the node holding its session
    listed = n1.agents()
    assert all(a["online"] for a in listed)
    assert Counter(a["node"] for a in listed) == {"n1": 2, "n2": 2, "n3": 2}

    job = json.loads(
        n2.cli(
            "run",
            "command.run",
            "--args-json",
            '{"argv": ["echo", "hi"]}',
            "--targets",
            "all",
            "--json",
        )
    )["job"]
    wait_until(lambda: _states(n3, job)["succeeded"] == 6, 30, 0.3, "six results")
    assert all(r["result"]["stdout"] == "hi\n" for r in n1.job(job)["results"])


def test_node_killed_mid_job(cluster: Cluster, tmp_path: Any) -> None:
    """A node SIGKILLed while its agents run a job: they reconnect to the others, every
    result is stored once, none is lost, none runs twice; `tcm nodes` shows it down."""
    n1, n2, n3 = cluster.node("n1"), cluster.node("n2"), cluster.node("n3")
    token = n1.token(uses=6)
    agents = [cluster.agent(f"a{i}", node, token) for i, node in enumerate((n1, n2, n3) * 2)]
    for a in agents:
        a.wait_session(1)
    wait_until(
        lambda: _nodes(n1)["n3"]["sessions"]["core"] == 2, 20, 0.3, "n3 holding two sessions"
    )
    runs, gate = str(tmp_path / "runs.log"), str(tmp_path / "gate")
    job = _gated_job(n1, runs, gate)
    wait_until(lambda: sum(_runs(runs).values()) == 6, 30, 0.2, "six targets started")

    n3.kill()
    on_n3 = {"a2", "a5"}
    for a in agents:
        if a.name in on_n3:
            a.wait_session(2, timeout=40)  # back, on n1 or n2
    with open(gate, "w"):
        pass
    wait_until(lambda: _states(n1, job)["succeeded"] == 6, 60, 0.3, "six results after the kill")
    stored = n2.job(job)
    assert len(stored["results"]) == 6  # targets
    assert Counter(r["state"] for r in stored["results"]) == {"succeeded": 6}  # none lost
    assert _runs(runs) == {f"a{i}": 1 for i in range(6)}  # none ran twice
    assert all("finished" in r["result"]["stdout"] for r in stored["results"])
    wait_until(lambda: _nodes(n1)["n3"]["state"] == "down", 20, 0.5, "n3 shown down")
    assert _nodes(n2)["n1"]["state"] == "up"
    print(f"node kill: targets 6, stored 6, lost 0, twice 0 ({dict(_runs(runs))})")


@pytest.fixture
def own_redis(tmp_path: Any) -> Iterator[dict[str, Any]]:
    """A redis-server of this test's own on a free port (restarted by the test)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("no redis-server")
    port = free_port()
    state: dict[str, Any] = {"port": port, "url": f"redis://127.0.0.1:{port}/0", "proc": None}
    log = tmp_path / "redis.log"

    def start() -> None:
        state["proc"] = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(tmp_path),
                "--logfile",
                str(log),
            ],
        )
        wait_until(lambda: _redis_reachable(state["url"]), 10, 0.1, "own redis-server up")

    def stop() -> None:
        proc = state["proc"]
        if proc is not None and proc.poll() is None:
            proc.terminate()
            proc.wait(10)

    state["start"], state["stop"] = start, stop
    start()
    try:
        yield state
    finally:
        stop()


def test_redis_restarted(tmp_path: Any, database: str, own_redis: dict[str, Any]) -> None:
    """Redis stopped for a while: each node keeps its sessions, status and /cluster say the
    bus is down, a job created meanwhile still reaches the agents of every node (from
    PostgreSQL), and the bus comes back by itself."""
    cluster = Cluster(str(tmp_path), database, own_redis["url"])
    try:
        metrics_port = free_port()
        n1 = cluster.node("n1")
        n2 = cluster.node("n2", extra=["--metrics-port", str(metrics_port)])
        token = n1.token(uses=2)
        a0, a1 = cluster.agent("a0", n1, token), cluster.agent("a1", n2, token)
        a0.wait_session(1)
        a1.wait_session(1)
        wait_until(lambda: _nodes(n1)["n2"]["sessions"]["core"] == 1, 20, 0.3, "a1 on n2")
        # /metrics on one node gives the whole cluster's sessions, node by node
        wait_until(
            lambda: "tcm_server_cluster_sessions_total 2.0" in _metrics(metrics_port),
            20,
            0.5,
            "the cluster's sessions on n2's /metrics",
        )
        text = _metrics(metrics_port)
        assert 'tcm_server_cluster_sessions{node="n1"} 1.0' in text
        assert "tcm_server_cluster_nodes_up 2.0" in text

        opened = a0.count(a0.SESSION_OPEN), a1.count(a1.SESSION_OPEN)
        own_redis["stop"]()
        wait_until(lambda: n1.cli_json("nodes")["bus"] == "down", 20, 0.3, "n1 seeing the bus down")
        wait_until(lambda: json.loads(n2.cli("status"))["cluster"]["bus"] == "down", 20, 0.3)
        status = json.loads(n2.cli("status"))
        assert "tcm_server_cluster_bus_up 0.0" in _metrics(metrics_port)
        job = json.loads(
            n1.cli(
                "run",
                "command.run",
                "--args-json",
                '{"argv": ["echo", "hi"]}',
                "--targets",
                "all",
                "--json",
            )
        )["job"]
        wait_until(lambda: _states(n1, job)["succeeded"] == 2, 40, 0.3, "both results")
        assert (a0.count(a0.SESSION_OPEN), a1.count(a1.SESSION_OPEN)) == opened  # kept

        own_redis["start"]()
        wait_until(lambda: n2.cli_json("nodes")["bus"] == "up", 20, 0.3, "bus up again")
        assert "tcm_server_cluster_bus_up 1.0" in _metrics(metrics_port)
        job2 = json.loads(
            n2.cli(
                "run",
                "command.run",
                "--args-json",
                '{"argv": ["echo", "again"]}',
                "--targets",
                "all",
                "--json",
            )
        )["job"]
        wait_until(lambda: _states(n1, job2)["succeeded"] == 2, 20, 0.3, "both results again")
        assert status["cluster"]["node"] == "n2"
    finally:
        cluster.stop()


def test_changes_reach_every_node(cluster: Cluster) -> None:
    """A revocation made on one node closes the agent's session on another; a setting
    changed on one node is what every node answers."""
    n1, n2 = cluster.node("n1"), cluster.node("n2")
    token = n1.token(uses=1)
    agent = cluster.agent("a0", n2, token)
    agent.wait_session(1)
    n1.cli("settings", "set", "poll_interval", "77")
    wait_until(
        lambda: json.loads(n2.cli("settings", "get", "--json"))["poll_interval"] == 77,
        10,
        0.2,
        "the setting on n2",
    )
    # PushPolicy from n1 to an agent on n2: notified by n2, its report heard on n1
    wait_until(
        lambda: {a["id"]: a.get("node") for a in n1.agents()} == {agent.agent_id: "n2"},
        10,
        0.2,
        "n1 knowing the agent is on n2",
    )
    from tcm.cli.admin import Api

    with open(os.path.join(n1.state_dir, "admin.token")) as f:
        api = Api(n1.url, n1.ca, f.read().strip())
    api.call("POST", "/targets", {"name": "on-n2", "agents": [agent.agent_id]})
    api.call(
        "POST",
        "/policies",
        {
            "name": "inventory-hourly",
            "type": "inventory.schedule",
            "document": {"every": 3600, "classes": ["hostname"]},
            "targets": ["on-n2"],
        },
    )
    pushed = n1.cli_json("policies", "push", "inventory-hourly", "--wait", "20")
    assert pushed["agents"][agent.agent_id]["status"] == "pushed"

    n1.cli("agents", "revoke", agent.agent_id)
    wait_until(lambda: "revoked" in agent.log(), 10, 0.2, "the agent told it is revoked")
    # a node stopped cleanly is down at once (not after its heartbeat's expiry)
    n2.stop()
    assert _nodes(n1)["n2"]["state"] == "down"


PG_BIN = next(iter(sorted(__import__("glob").glob("/usr/lib/postgresql/*/bin"))), None)


@pytest.fixture
def own_postgres() -> Iterator[dict[str, Any]]:
    """A PostgreSQL server of this test's own (initdb into a temporary directory, a free
    port), stopped and started by the test; never the machine's shared one."""
    import pwd
    import tempfile

    if PG_BIN is None:
        pytest.skip("no PostgreSQL server binaries under /usr/lib/postgresql")
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb and postgres refuse to run as root
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root without a postgres user to run PostgreSQL as")
        as_user = ["runuser", "-u", "postgres", "--"]
    base = tempfile.mkdtemp(prefix="tcm-pg-")
    data, log = os.path.join(base, "data"), os.path.join(base, "pg.log")
    if as_user:
        os.chown(base, user.pw_uid, user.pw_gid)
    port = free_port()
    subprocess.run(
        [*as_user, f"{PG_BIN}/initdb", "-D", data, "-A", "trust", "-U", "postgres"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    options = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off"

    def start() -> None:
        subprocess.run(
            [*as_user, f"{PG_BIN}/pg_ctl", "-D", data, "-o", options, "-l", log, "-w", "start"],
            check=True,
            capture_output=True,
            timeout=60,
        )

    def stop() -> None:
        subprocess.run(
            [*as_user, f"{PG_BIN}/pg_ctl", "-D", data, "-m", "fast", "-w", "stop"],
            capture_output=True,
            timeout=60,
        )

    start()
    url = f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
    try:
        yield {"url": url, "start": start, "stop": stop}
    finally:
        stop()
        shutil.rmtree(base, ignore_errors=True)


def test_postgresql_restarted(tmp_path: Any, own_postgres: dict[str, Any], redis_url: str) -> None:
    """PostgreSQL stopped while agents run a job: sessions stay up, an admin write is a 503
    saying why, results are not acknowledged (the agents keep them) and are stored once
    when it is back; nothing is lost, nothing runs twice."""
    cluster = Cluster(str(tmp_path), own_postgres["url"], redis_url)
    try:
        n1, n2 = cluster.node("n1"), cluster.node("n2")
        token = n1.token(uses=2)
        a0, a1 = cluster.agent("a0", n1, token), cluster.agent("a1", n2, token)
        a0.wait_session(1)
        a1.wait_session(1)
        runs, gate = str(tmp_path / "runs.log"), str(tmp_path / "gate")
        job = _gated_job(n1, runs, gate)
        wait_until(lambda: sum(_runs(runs).values()) == 2, 30, 0.2, "both targets started")
        opened = a0.count(a0.SESSION_OPEN), a1.count(a1.SESSION_OPEN)

        own_postgres["stop"]()
        refused = n2.cli_result("settings", "set", "poll_interval", "70")
        assert refused.returncode != 0
        assert "503" in refused.stderr and "database is unavailable" in refused.stderr
        with open(gate, "w"):
            pass
        # the agents finish; nothing can be stored, so nothing is acknowledged
        wait_until(
            lambda: (
                all(e.get("state") == "finished" for a in (a0, a1) for e in a.ledger().values())
                and all(a.ledger() for a in (a0, a1))
            ),
            30,
            0.2,
            "both results waiting in the agents' spools",
        )
        assert json.loads(n1.cli("status"))["sessions"] == 1  # sessions stay up

        own_postgres["start"]()
        wait_until(lambda: _states(n2, job)["succeeded"] == 2, 90, 0.5, "both results stored")
        assert _runs(runs) == {"a0": 1, "a1": 1}
        assert (a0.count(a0.SESSION_OPEN), a1.count(a1.SESSION_OPEN)) == opened
        n2.cli("settings", "set", "poll_interval", "70")
        print("postgresql restart: targets 2, stored 2, lost 0, twice 0")
    finally:
        cluster.stop()


def test_agent_servers_option() -> None:
    """`--server` more than once: the first is the server, the others its cluster's nodes,
    each once; a URL that is not https is refused."""
    from twisted.python import usage

    from tcm.agent.tap import Options

    o = Options()
    o.parseOptions(
        ["--state-dir", "/tmp/x", "-s", "https://n1:1", "--server", "https://n2:2"]
        + ["--server", "https://n1:1", "--server", "https://n3:3"]
    )
    assert o["server"] == "https://n1:1"
    assert o["servers"] == ["https://n2:2", "https://n3:3"]
    with pytest.raises(usage.UsageError, match="--server wants https://HOST:PORT"):
        Options().parseOptions(["--state-dir", "/tmp/x", "--server", "n1:1"])


def test_an_agent_enrolls_through_any_node_and_keeps_the_list(cluster: Cluster) -> None:
    """The first --server does not answer: the agent enrolls through the next, keeps the
    whole list, and a later start needs only its state directory."""
    n1 = cluster.node("n1")
    dead = f"https://127.0.0.1:{free_port()}"
    token = n1.token(uses=1)
    agent = AgentProc(
        cluster.base,
        "a0",
        extra=["--server", dead, "--server", n1.url, "--ca-cert", n1.ca, "--token", token],
    )
    cluster.agents.append(agent)
    agent.start()
    with open(os.path.join(agent.state_dir, "agent.json")) as f:
        meta = json.load(f)
    assert meta["server"] == dead and meta["servers"] == [dead, n1.url]
    agent.stop()
    agent.args = ["tcm-agent", "--state-dir", agent.state_dir, "--backoff-max", "1"]
    agent.start()  # back, through the second server again
    assert _nodes(n1)["n1"]["state"] == "up"


def test_destinations_move_to_the_next_node_when_one_is_lost() -> None:
    """An agent with several nodes: a session lost without a close (the node killed) goes to
    the next node at once, not to the lost one first; gateways keep their rule (after a
    gateway, the first node is preferred again)."""
    from tcm.agent.gateways import Destinations

    d = Destinations(["https://n1:1", "https://n2:2", "https://n3:3", "https://gw:4"], servers=3)
    d.session_ended(1006)
    assert d.current == "https://n2:2"
    d.session_ended(None)
    assert d.current == "https://n3:3"
    d.session_ended(1006)
    assert d.current == "https://n1:1"  # round the nodes, never to the gateway for a loss
    d.session_ended(4012)  # a node that says it restarts: the first is preferred
    assert d.current == "https://n1:1"
    d.move_on("unreachable")
    d.move_on("unreachable")
    d.move_on("unreachable")
    assert d.current == "https://gw:4"
    d.session_ended(1006)
    assert d.current == "https://n1:1"
    single = Destinations(["https://srv:1", "https://gw:2"])  # one server: as before
    single.session_ended(1006)
    assert single.current == "https://srv:1"
