"""Policies and connection profiles: the pure parts (precedence, checks) and the agent's
policy engine and profile keeper on a fake clock, with a real AgentCore."""

from __future__ import annotations

import json
import os

import pytest
from twisted.internet.task import Clock
from twisted.python.filepath import FilePath
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tcm.agent.policies import APPLIED, FAILED, PolicyContext, load_policy_handlers
from tcm.agent.runner import ActionRunner, load_handlers
from tcm.agent.service import AgentConfig, AgentCore
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


def make_core(tmp_path, recorder) -> tuple[AgentCore, Clock]:
    clock = Clock()
    handlers = load_policy_handlers()
    handlers[recorder.type] = recorder
    core = AgentCore(AgentConfig(state_dir=str(tmp_path)), clock, load_handlers(), handlers)
    core.runner = ActionRunner(core.handlers, core.ledger, None, clock, FilePath(str(tmp_path)))
    return core, clock


def test_reconcile_applies_new_versions_stops_removed_and_keeps_them_on_disk(tmp_path):
    recorder = Recorder()
    core, clock = make_core(tmp_path, recorder)
    engine = core.policies
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
    core, clock = make_core(tmp_path, recorder)
    core.policies.reconcile(
        [{"name": "rec", "type": "test.recorder", "version": 3, "document": {"every": 60}}]
    )
    core.policies.stop_all()

    again = Recorder()
    core2, clock2 = make_core(tmp_path, again)  # a new agent process, same state dir
    core2.policies.restore()
    assert again.log == [("apply", "rec", 3, True)]
    clock2.advance(0)
    assert "last_run" not in core2.policies.status["rec"]  # restored: no run at once
    clock2.advance(60)
    assert core2.policies.status["rec"]["last_run"]["ok"] is True


def test_agent_settings_policy_changes_the_agent_and_restores_it(tmp_path):
    core, clock = make_core(tmp_path, Recorder())
    assert core.ledger.fsync is True
    doc = {"flush_interval": 5, "spool_fsync": False}
    core.policies.reconcile(
        [{"name": "s", "type": "agent.settings", "version": 1, "document": doc}]
    )
    assert core.ledger.fsync is False and core.config.flush_interval == 5
    core.policies.reconcile([])
    assert core.ledger.fsync is True and core.config.flush_interval == 30.0


def test_policy_context_is_verified(tmp_path):
    core, _ = make_core(tmp_path, Recorder())
    ctx = PolicyContext("p", 1, False, core.reactor, FilePath(str(tmp_path)), core.policies)
    assert verifyObject(IPolicyContext, ctx)


def test_invalid_document_on_the_agent_fails_with_the_reason(tmp_path):
    core, _ = make_core(tmp_path, Recorder())
    report = core.policies.reconcile(
        [{"name": "i", "type": "inventory.schedule", "version": 1, "document": {"every": "x"}}]
    ).result
    assert report["i"]["state"] == FAILED and "invalid document" in report["i"]["error"]


# -- the agent's profile keeper --------------------------------------------------------------


def test_profile_settings_apply_to_the_agent_and_back_to_defaults(tmp_path):
    core, _ = make_core(tmp_path, Recorder())
    core.server = "https://127.0.0.1:8443"
    core.state.meta = lambda: {"server": "https://127.0.0.1:8443"}  # type: ignore[method-assign]
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
    core.profile.apply(profile, "test")
    assert core.poller.poll_interval == 300 and core.poller.use_long_poll is False
    assert core.config.backoff_max == 120 and core.config.keepalive == 40
    # gateways as the agent's destinations use them (base URLs), tried after the server
    assert core.config.gateways == ["https://127.0.0.1:9", "https://127.0.0.1:10/upstream/a"]
    status = core.profile.status()
    assert status["stored_only"] == ["task_servers"]
    assert status["applied"] == [
        "backoff_max",
        "gateways",
        "keepalive",
        "long_poll",
        "poll_interval",
    ]
    assert json.loads(open(os.path.join(tmp_path, "profile.json")).read()) == profile
    core.profile.apply(None, "test")
    assert core.poller.use_long_poll is True and core.config.backoff_max == 60.0
    assert core.config.gateways == []  # back to the command line's (none here)
    assert core.config.keepalive is None and core.profile.status() is None
    assert not os.path.exists(os.path.join(tmp_path, "profile.json"))


def test_a_bad_profile_from_the_server_is_refused_and_the_old_one_kept(tmp_path):
    core, _ = make_core(tmp_path, Recorder())
    core.server = "https://127.0.0.1:8443"
    core.state.meta = lambda: {"server": "https://127.0.0.1:8443"}  # type: ignore[method-assign]
    core.profile.apply({"name": "ok", "version": 1, "settings": {"poll_interval": 30}})
    core.profile.apply({"name": "bad", "version": 1, "settings": {"poll_interval": "often"}})
    assert core.profile.current["name"] == "ok"
    assert "profile refused" in core.profile.status()["error"]


def test_a_corrupt_or_malformed_policies_file_is_ignored_not_fatal(tmp_path):
    with open(os.path.join(tmp_path, "policies.json"), "w") as f:
        f.write('{"policies": [{"name": "ok", "type": "agent.settings", "version": 1, '
                '"document": {"spool_fsync": false}}, {"name": 3}, "junk"]}')  # fmt: skip
    core, _ = make_core(tmp_path, Recorder())
    core.policies.restore()
    assert sorted(core.policies.policies) == ["ok"] and core.ledger.fsync is False
    with open(os.path.join(tmp_path, "policies.json"), "w") as f:
        f.write("{not json")
    core2, _ = make_core(tmp_path, Recorder())
    core2.policies.restore()
    assert core2.policies.policies == {}


def test_a_handler_that_returns_no_policy_object_fails_the_policy(tmp_path):
    @implementer(IPolicyHandler)
    class Wrong:
        type = "test.wrong"
        schema: dict = {}

        def apply(self, context, document):
            return "started"

    core, _ = make_core(tmp_path, Recorder())
    core.policies.handlers["test.wrong"] = Wrong()
    report = core.policies.reconcile(
        [{"name": "w", "type": "test.wrong", "version": 1, "document": {"x": 1}}]
    ).result
    assert report["w"]["state"] == FAILED and "not a policy" in report["w"]["error"]
