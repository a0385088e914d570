"""Policies and connection profiles: the pure parts (precedence, checks) and the agent's
policy engine and profile keeper on a fake clock, in a real agent (`make_agent`)."""

from __future__ import annotations

import json
import os

import pytest
from twisted.internet.task import Clock
from twisted.python.filepath import FilePath
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tcm.agent.config import AgentConfig
from tcm.agent.enrollment import AgentState
from tcm.agent.link import Identity
from tcm.agent.policies import APPLIED, FAILED, PolicyContext, load_policy_handlers
from tcm.agent.runner import load_handlers
from tcm.agent.service import Agent, make_agent
from tcm.interfaces import IAppliedPolicy, IPolicyContext, IPolicyHandler
from tcm.server.agentconfig import check_profile_settings, choose_profile
from tcm.server.errors import Invalid
from tcm.server.web import http_status

# -- precedence ------------------------------------------------------------------------


def test_highest_priority_wins_then_fewest_members_then_name():
    assert choose_profile([("wide", 0, 100), ("narrow", 0, 3)], None) == "narrow"
    assert choose_profile([("wide", 5, 100), ("narrow", 0, 3)], None) == "wide"
    assert choose_profile([("b", 1, 3), ("a", 1, 3)], None) == "a"
    assert choose_profile([], "from-token") == "from-token"
    assert choose_profile([("t", 0, 10)], "from-token") == "t"
    assert choose_profile([], None) is None


# -- profile checks -----------------------------------------------------------------------


def test_good_profile_settings_pass():
    settings = {
        "servers": ["https://tcm.example:8443"],
        "gateways": ["wss://gw.example:443"],
        "task_servers": [],
        "proxy": "http://user:pw@proxy.example:3128",
        "persistent_connections": False,
        "keepalive": 30,
        "poll_interval": 120,
        "long_poll": True,
        "backoff_initial": 0.5,
        "backoff_max": 300,
        "fallback_delay": 10,
    }
    assert check_profile_settings(settings) == settings


@pytest.mark.parametrize(
    ("settings", "says"),
    [
        ({"colour": "blue"}, "unknown profile setting(s) colour"),
        ({"keepalive": 1}, "keepalive"),
        ({"keepalive": True}, "keepalive must be number"),  # a boolean is no number
        ({"servers": []}, "servers"),
        ({"servers": ["ftp://x"]}, "servers"),
        ({"proxy": "socks5://p:1080"}, "proxy"),
        ({"persistent_connections": "no"}, "persistent_connections"),
        ({"backoff_initial": 10, "backoff_max": 5}, "backoff_initial is above backoff_max"),
        ([], "must be a JSON object"),
    ],
)
def test_bad_profile_settings_are_400_with_the_reason(settings, says):
    with pytest.raises(Invalid) as e:
        check_profile_settings(settings)
    assert http_status(e.value) == 400 and says in e.value.message


# -- built-in policy handlers -------------------------------------------------------------


def test_builtin_policy_handlers_are_discovered_and_verified():
    handlers = load_policy_handlers()
    assert {"inventory.schedule", "command.schedule", "agent.settings"} <= set(handlers)
    for handler in handlers.values():
        assert verifyObject(IPolicyHandler, handler)


# -- the agent's policy engine --------------------------------------------------------------


@implementer(IAppliedPolicy)
class Running:
    def __init__(self, log: list, name: str):
        self.log, self.name = log, name

    def stop(self) -> None:
        self.log.append(("stop", self.name))


@implementer(IPolicyHandler)
class Recorder:
    """A real policy handler of its own type: records what it is asked and runs `ping`."""

    type = "test.recorder"
    schema = {"type": "object", "properties": {"every": {"type": "number"}}}

    def __init__(self) -> None:
        self.log: list = []

    def apply(self, context, document):
        assert verifyObject(IPolicyContext, context)
        self.log.append(("apply", context.policy, context.version, context.restored))

        def run():
            d = context.run_action("ping", {"echo": context.policy})
            return d.addCallback(lambda result: context.report(result))

        context.schedule(document, run, now=not context.restored)
        return Running(self.log, context.policy)


def make_wired_agent(tmp_path, recorder) -> tuple[Agent, Clock]:
    """An enrolled agent's parts as the daemon wires them, not started (no connection)."""
    clock = Clock()
    handlers = load_policy_handlers()
    handlers[recorder.type] = recorder
    with open(os.path.join(tmp_path, "agent.json"), "w") as f:
        json.dump({"agent_id": "a-test", "server": "https://127.0.0.1:8443"}, f)
    config = AgentConfig(state_dir=str(tmp_path))
    agent = make_agent(
        config, clock, AgentState(str(tmp_path)), Identity(ca_pem=b""), load_handlers(), handlers
    )
    return agent, clock


def test_reconcile_applies_new_versions_stops_removed_and_keeps_them_on_disk(tmp_path):
    recorder = Recorder()
    agent, clock = make_wired_agent(tmp_path, recorder)
    engine = agent.policies
    p1 = {"name": "rec", "type": "test.recorder", "version": 1, "document": {"every": 60}}
    missing = {"name": "other", "type": "no.such", "version": 4, "document": {"x": 1}}
    report = engine.reconcile([p1, missing]).result
    assert report["rec"]["state"] == APPLIED
    assert report["other"] == {
        "version": 4,
        "state": FAILED,
        "error": "no handler for policy type 'no.such'",
        "at": 0.0,
    }
    clock.advance(0)  # a new version runs once at once
    assert engine.status["rec"]["last_run"]["result"]["echo"] == "rec"
    # the same version again: nothing re-applied
    engine.reconcile([p1, missing])
    assert recorder.log == [("apply", "rec", 1, False)]
    # a new version replaces the old one
    engine.reconcile([{**p1, "version": 2}])
    assert recorder.log[1:] == [("stop", "rec"), ("apply", "rec", 2, False)]
    stored = json.loads(open(os.path.join(tmp_path, "policies.json")).read())
    assert [p["version"] for p in stored["policies"]] == [2]
    # removed
    report = engine.reconcile([]).result
    assert report == {"rec": {"version": 2, "state": "removed", "error": None}}
    assert recorder.log[-1] == ("stop", "rec")


def test_stored_policies_run_again_after_a_restart_on_their_schedule(tmp_path):
    recorder = Recorder()
    agent, clock = make_wired_agent(tmp_path, recorder)
    agent.policies.reconcile(
        [{"name": "rec", "type": "test.recorder", "version": 3, "document": {"every": 60}}]
    )
    agent.policies.stop_all()

    again = Recorder()
    agent2, clock2 = make_wired_agent(tmp_path, again)  # a new agent process, same state dir
    agent2.policies.restore()
    assert again.log == [("apply", "rec", 3, True)]
    clock2.advance(0)
    assert "last_run" not in agent2.policies.status["rec"]  # restored: no run at once
    clock2.advance(60)
    assert agent2.policies.status["rec"]["last_run"]["ok"] is True


def test_agent_settings_policy_changes_the_agent_and_restores_it(tmp_path):
    agent, clock = make_wired_agent(tmp_path, Recorder())
    assert agent.ledger.fsync is True
    doc = {"flush_interval": 5, "spool_fsync": False}
    agent.policies.reconcile(
        [{"name": "s", "type": "agent.settings", "version": 1, "document": doc}]
    )
    assert agent.ledger.fsync is False and agent.connection.config.flush_interval == 5
    agent.policies.reconcile([])
    assert agent.ledger.fsync is True and agent.connection.config.flush_interval == 30.0


def test_policy_context_is_verified(tmp_path):
    agent, _ = make_wired_agent(tmp_path, Recorder())
    ctx = PolicyContext(
        "p", 1, False, agent.connection.reactor, FilePath(str(tmp_path)), agent.policies
    )
    assert verifyObject(IPolicyContext, ctx)


def test_invalid_document_on_the_agent_fails_with_the_reason(tmp_path):
    agent, _ = make_wired_agent(tmp_path, Recorder())
    report = agent.policies.reconcile(
        [{"name": "i", "type": "inventory.schedule", "version": 1, "document": {"every": "x"}}]
    ).result
    assert report["i"]["state"] == FAILED and "invalid document" in report["i"]["error"]


# -- the agent's profile keeper --------------------------------------------------------------


def test_profile_settings_apply_to_the_agent_and_back_to_defaults(tmp_path):
    agent, _ = make_wired_agent(tmp_path, Recorder())
    profile = {
        "name": "slow",
        "version": 2,
        "settings": {
            "poll_interval": 300,
            "long_poll": False,
            "backoff_max": 120,
            "keepalive": 40,
            "task_servers": ["wss://ts.example:443"],
            "gateways": ["wss://127.0.0.1:9/agent/v1/ws", "https://127.0.0.1:10/upstream/a/"],
        },
    }
    agent.profile.apply(profile, "test")
    assert (
        agent.connection.poller.poll_interval == 300
        and agent.connection.poller.use_long_poll is False
    )
    assert agent.connection.config.backoff_max == 120 and agent.connection.config.keepalive == 40
    # gateways as the agent's destinations use them (base URLs), tried after the server
    assert agent.connection.config.gateways == [
        "https://127.0.0.1:9",
        "https://127.0.0.1:10/upstream/a",
    ]
    status = agent.profile.status()
    assert status["stored_only"] == ["task_servers"]
    assert status["applied"] == [
        "backoff_max",
        "gateways",
        "keepalive",
        "long_poll",
        "poll_interval",
    ]
    assert json.loads(open(os.path.join(tmp_path, "profile.json")).read()) == profile
    agent.profile.apply(None, "test")
    assert (
        agent.connection.poller.use_long_poll is True
        and agent.connection.config.backoff_max == 60.0
    )
    assert agent.connection.config.gateways == []  # back to the command line's (none here)
    assert agent.connection.config.keepalive is None and agent.profile.status() is None
    assert not os.path.exists(os.path.join(tmp_path, "profile.json"))


def test_a_bad_profile_from_the_server_is_refused_and_the_old_one_kept(tmp_path):
    agent, _ = make_wired_agent(tmp_path, Recorder())
    agent.profile.apply({"name": "ok", "version": 1, "settings": {"poll_interval": 30}})
    agent.profile.apply({"name": "bad", "version": 1, "settings": {"poll_interval": "often"}})
    assert agent.profile.current["name"] == "ok"
    assert "profile refused" in agent.profile.status()["error"]


def test_a_corrupt_or_malformed_policies_file_is_ignored_not_fatal(tmp_path):
    with open(os.path.join(tmp_path, "policies.json"), "w") as f:
        f.write('{"policies": [{"name": "ok", "type": "agent.settings", "version": 1, '
                '"document": {"spool_fsync": false}}, {"name": 3}, "junk"]}')  # fmt: skip
    agent, _ = make_wired_agent(tmp_path, Recorder())
    agent.policies.restore()
    assert sorted(agent.policies.policies) == ["ok"] and agent.ledger.fsync is False
    with open(os.path.join(tmp_path, "policies.json"), "w") as f:
        f.write("{not json")
    agent2, _ = make_wired_agent(tmp_path, Recorder())
    agent2.policies.restore()
    assert agent2.policies.policies == {}


def test_a_handler_that_returns_no_policy_object_fails_the_policy(tmp_path):
    @implementer(IPolicyHandler)
    class Wrong:
        type = "test.wrong"
        schema: dict = {}

        def apply(self, context, document):
            return "started"

    agent, _ = make_wired_agent(tmp_path, Recorder())
    agent.policies.handlers["test.wrong"] = Wrong()
    report = agent.policies.reconcile(
        [{"name": "w", "type": "test.wrong", "version": 1, "document": {"x": 1}}]
    ).result
    assert report["w"]["state"] == FAILED and "not a policy" in report["w"]["error"]
