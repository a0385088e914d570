"""The agent's connection lifecycle (tcm/agent/connection.py) in a wired agent on a fake clock:
what its subscribers are told when a session opens, is lost or is switched off."""

from __future__ import annotations

import datetime
import json
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tcm.agent.config import AgentConfig
from tcm.agent.enrollment import AgentState
from tcm.agent.link import Identity
from tcm.agent.modes import HTTP, PERSISTENT
from tcm.agent.policies import load_policy_handlers
from tcm.agent.runner import load_handlers
from tcm.agent.service import Agent, make_agent
from tcm.agent.session import AgentClientFactory
from tcm.interfaces import ISessionObserver
from tcm.protocol import codes


@implementer(ISessionObserver)
class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def session_opened(self, welcome: dict) -> None:
        self.events.append(("opened", welcome.get("session")))

    def session_lost(self, reason: str, switched_off: bool) -> None:
        self.events.append(("lost", reason, switched_off))

    def polling_started(self) -> None:
        self.events.append(("polling",))


class FakeProtocol:
    """What the connection uses of a session's protocol."""

    def __init__(self, welcome: dict) -> None:
        self.connection = self
        self.protocol = self
        self.welcome = welcome
        self.welcomed: Deferred = Deferred()
        self.closes: list[tuple[int, str]] = []

    def sendClose(self, code: int, reason: str) -> None:
        self.closes.append((code, reason))

    def tls_info(self) -> dict:
        return {"version": "TLSv1.3"}


def ca_pem() -> bytes:
    """A CA certificate for the agent to trust (nothing is connected to here)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(datetime.datetime(2020, 1, 1))
        .not_valid_after(datetime.datetime(2040, 1, 1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def wired_agent(tmp_path) -> tuple[Agent, Clock, Recorder]:
    clock = Clock()
    with open(os.path.join(tmp_path, "agent.json"), "w") as f:
        json.dump({"agent_id": "a-test", "server": "https://127.0.0.1:8443"}, f)
    agent = make_agent(
        AgentConfig(state_dir=str(tmp_path), fallback_delay=10.0),
        clock,
        AgentState(str(tmp_path)),
        Identity(ca_pem=ca_pem()),
        load_handlers(),
        load_policy_handlers(),
    )
    recorder = Recorder()
    assert verifyObject(ISessionObserver, recorder)
    agent.connection.subscribe(recorder)
    return agent, clock, recorder


def open_session(agent: Agent, welcome: dict) -> FakeProtocol:
    connection = agent.connection
    connection.make_session_service()
    protocol = FakeProtocol(welcome)
    connection._session_ready(protocol)  # ClientService's prepareConnection
    protocol.welcomed.callback(protocol)
    return protocol


def test_subscribers_are_told_a_session_opened_and_was_lost(tmp_path):
    agent, clock, recorder = wired_agent(tmp_path)
    connection = agent.connection
    protocol = open_session(
        agent, {"session": "s-1", "task_server": None, "profile_count": 0, "policy_count": 0}
    )
    assert recorder.events == [("opened", "s-1")]
    assert connection.mode.state == PERSISTENT and agent.runner.link.session is protocol
    assert agent.task_client.assignment_status == "none"  # the welcome assigned none

    connection.session_lost(protocol, codes.CLOSE_RESTARTING, None)
    assert recorder.events[1][0] == "lost" and recorder.events[1][2] is False
    assert str(codes.CLOSE_RESTARTING) in recorder.events[1][1]
    assert connection.mode.state == HTTP and agent.runner.link.session is None
    assert connection.restart_hint.until > clock.seconds()  # 4012: back in moments
    # the first poll waits (jittered): the session usually comes back first
    assert connection.poller.running and connection.poller.polls == 0
    clock.advance(10.0)
    assert connection.poller.polls == 1


def test_a_drain_is_retried_every_few_seconds_as_a_restart_is(tmp_path):
    """4006: a gateway (or task server) stopping; with no other destination it is the one
    that comes back, so the agent retries every few seconds instead of climbing its
    backoff while it is away."""
    agent, clock, _ = wired_agent(tmp_path)
    connection = agent.connection
    protocol = open_session(
        agent, {"session": "s-1", "task_server": None, "profile_count": 0, "policy_count": 0}
    )
    connection.session_lost(protocol, codes.CLOSE_DRAIN, None)
    assert connection.restart_hint.until > clock.seconds()
    assert 1.0 <= connection.restart_hint.delay(7, lambda attempt: 64.0) <= 4.0
    protocol = open_session(
        agent, {"session": "s-2", "task_server": None, "profile_count": 0, "policy_count": 0}
    )
    connection.session_lost(protocol, codes.CLOSE_NORMAL, None)  # any other end: no hint
    assert connection.restart_hint.until == 0.0
    assert connection.restart_hint.delay(7, lambda attempt: 64.0) == 64.0


def test_switching_persistent_connections_off_tells_subscribers_then_the_close_follows(tmp_path):
    agent, _, recorder = wired_agent(tmp_path)
    connection = agent.connection
    protocol = open_session(agent, {"session": "s-2", "profile_count": 0, "policy_count": 0})
    connection.follow_profile({"persistent_connections": False}, live=True)
    reason = "persistent connections off in the connection profile"
    assert recorder.events[1:] == [("lost", reason, True)]
    assert protocol.closes == [
        (codes.CLOSE_BY_PROFILE, codes.CLOSE_REASONS[codes.CLOSE_BY_PROFILE])
    ]
    assert agent.task_client.assignment_status == reason  # the task session goes too
    assert connection.mode.state == HTTP and connection.poller.running
    connection.session_lost(protocol, codes.CLOSE_BY_PROFILE, None)  # the close completes
    assert recorder.events[2][2] is False
    assert agent.status()["persistent"]["connected"] is False


def test_user_disconnect_and_reconnect(tmp_path):
    agent, _, recorder = wired_agent(tmp_path)
    open_session(agent, {"session": "s-3", "profile_count": 0, "policy_count": 0})
    assert agent.user_disconnect() == {"mode": HTTP, "persistent_disabled": True}
    assert recorder.events[1:] == [("lost", "terminated by tcm-agent disconnect", True)]
    assert agent.status()["persistent"]["disabled_by_user"] is True
    assert agent.user_disconnect() == {"mode": HTTP, "persistent_disabled": True}  # once
    assert len(recorder.events) == 2
    assert agent.user_reconnect() == {"mode": HTTP, "persistent_disabled": False}


def test_the_session_factory_keeps_the_url_host_for_the_handshake(tmp_path):
    agent, _, _ = wired_agent(tmp_path)
    factory = AgentClientFactory(
        object(), agent.connection.session_lost, "wss://127.0.0.1:8443/agent/v1/ws", 50, 20, 1024
    )
    assert factory.host == "127.0.0.1" and factory.port == 8443


def test_a_profile_keepalive_applies_to_the_live_session(tmp_path):
    agent, _, _ = wired_agent(tmp_path)
    protocol = open_session(agent, {"session": "s-4", "profile_count": 0, "policy_count": 0})
    agent.connection.follow_profile({"keepalive": 40}, live=True)
    assert agent.connection.session_keepalive() == 40.0
    factory = agent.connection._session_factory
    assert factory is not None and factory.protocol.autoPingInterval == 40.0  # the next ones
    assert protocol.closes == []  # no reconnect for a keepalive


def test_a_keepalive_learned_after_open_moves_the_first_ping(tmp_path):
    """The first ping was scheduled at open with the old interval: it moves to the new one
    (the check once compared the interval after changing it and never moved the ping)."""
    agent, clock, _ = wired_agent(tmp_path)
    protocol = open_session(agent, {"session": "s-5", "profile_count": 0, "policy_count": 0})

    class Pinging(FakeProtocol):
        autoPingInterval = 30.0

    protocol.__class__ = Pinging
    pings: list[float] = []
    protocol.autoPingPendingCall = clock.callLater(  # type: ignore[attr-defined]
        30.0, lambda: pings.append(clock.seconds())
    )
    protocol._sendAutoPing = lambda: pings.append(clock.seconds())  # type: ignore[attr-defined]
    agent.connection.follow_profile({"keepalive": 50}, live=True)
    clock.advance(30.0)
    assert pings == []  # the ping of the old interval was cancelled
    clock.advance(20.0)
    assert pings == [50.0]


class _ServerTime:
    def learn_server_time(self, t) -> None:
        pass


def test_a_request_the_server_holds_does_not_time_out_while_the_server_pings():
    """A server that holds the session unread (its intake budget) pings it: the agent's
    unanswered request then waits its full timeout again instead of failing over to HTTPS
    (a second copy of a result behind the first); without pings it times out."""
    from tcm.agent.link import CallFailed
    from tcm.agent.session import AgentConnection

    clock = Clock()
    sent: list[bytes] = []
    conn = AgentConnection(_ServerTime(), sent.append, lambda code, reason: None, clock)
    welcome = {"session": "s-1", "keepalive": 50, "poll_interval": 60}
    conn.frame_received(json.dumps({"id": "w", "type": "welcome", "data": welcome}).encode())
    held = conn.request("POST", "/agent/v1/jobs/j/result", {"state": "succeeded"}, timeout=30)
    alone = conn.request("GET", "/agent/v1/settings", timeout=30)
    failures: list[str] = []
    alone.addErrback(lambda f: failures.append(f.trap(CallFailed) and "alone"))
    clock.advance(25)
    conn.server_pinged()
    alone_id = json.loads(sent[-1])["id"]
    conn.frame_received(
        json.dumps(
            {"id": "r", "type": "response", "in_reply_to": alone_id, "data": {"status": 200}}
        ).encode()
    )
    clock.advance(25)  # 50 s after it was sent, 25 after the ping: still waiting
    assert not held.called
    held_id = json.loads(sent[-2])["id"]
    conn.frame_received(
        json.dumps(
            {
                "id": "s",
                "type": "response",
                "in_reply_to": held_id,
                "data": {"status": 200, "body": {"stored": True}},
            }
        ).encode()
    )
    assert held.result.body == {"stored": True}
    late = conn.request("GET", "/agent/v1/settings", timeout=30)
    late.addErrback(lambda f: failures.append(f.trap(CallFailed) and "late"))
    clock.advance(30)  # no ping: timed out
    assert failures == ["late"]


def test_the_mode_keeps_the_last_twenty_changes():
    from tcm.agent.modes import HISTORY, ConnectionMode

    clock = Clock()
    mode = ConnectionMode(clock)
    for i in range(HISTORY + 5):
        clock.advance(1)
        assert mode.event("poll_ok" if i % 2 == 0 else "poll_failed", f"change {i}")
    assert len(mode.history) == HISTORY
    assert mode.history[0]["reason"] == "change 5" and mode.history[-1]["reason"] == "change 24"


def test_the_https_client_is_made_at_the_first_call(tmp_path):
    """An agent whose session stays up never calls over HTTPS: no pool, agent, cookie jar
    (issue 17: a swarm holds thousands of agents); closing it is immediate."""
    agent, _clock, _ = wired_agent(tmp_path)
    https = agent.connection.link.https
    assert https._pool is None and https._http is None
    closed = https.close()
    assert closed.called
    client = https._client()
    assert https._client() is client and https._pool is not None


def test_session_factories_share_the_process_timer_wheel():
    """Autobahn's per-factory timer wheel (about 1.5 KB) is one per process (issue 17)."""
    url = "wss://127.0.0.1:8443/agent/v1/ws"
    a = AgentClientFactory(object(), lambda *_: None, url, 50, 20, 1024)
    b = AgentClientFactory(object(), lambda *_: None, url, 30, 20, 1024)
    assert a._batched_timer is b._batched_timer
    assert a.protocol is not b.protocol  # other options: classes of their own


def test_a_connection_logs_no_factory_lines():
    """Each connection starts and stops its factories: no "Starting factory" line for it (at
    ten thousand reconnects, the log call and its filter were a seventh of a swarm's CPU)."""
    from twisted.internet.protocol import Factory, Protocol
    from twisted.logger import capturedLogs

    from tcm.agent.link import CountingEndpoint

    class _Connects:
        def connect(self, factory):
            factory.doStart()  # as a connector does when it starts and ends
            factory.doStop()
            return Deferred()

    def factory_lines(factory) -> list[str]:
        with capturedLogs() as events:
            CountingEndpoint(_Connects()).connect(factory)
        return [e["log_format"] for e in events if "factory" in (e.get("log_format") or "")]

    url = "wss://127.0.0.1:1/agent/v1/ws"
    assert factory_lines(AgentClientFactory(object(), lambda *_: None, url, 50, 20, 1024)) == []
    # the same path with a factory that is noisy: the lines the test looks for
    assert factory_lines(Factory.forProtocol(Protocol)) == [
        "Starting factory {factory!r}",
        "Stopping factory {factory!r}",
    ]
