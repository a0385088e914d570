"""Output only from a current target, capped per target (issue 16.1), against a real
in-process server: forged output is refused (403/404/409) over both transports and never
shows in a job's output; what passes the cap is dropped after one marker line. Results and
accepts from an agent that is not a target stay refused."""

from __future__ import annotations

import os

import pytest
import pytest_twisted

from tcm.server.jobs import DEFAULT_MAX_OUTPUT, OutputAllowance, TargetState, output_admitted
from tests.inproc import start_server

CAPS = [{"name": "ping"}, {"name": "command.run", "streams": True}]
CAP = 64  # bytes of output kept per target in these tests


async def _session(server):
    identity = await server.enroll_identity()
    client = await server.ws_connect(identity)
    assert client.opened_ok, client.close_info
    hello = {
        "id": os.urandom(4).hex(),
        "type": "hello",
        "data": {
            "agent_version": "test",
            "protocol": 1,
            "capabilities": CAPS,
            "hostname": "test-host",
            "platform": "test",
        },
    }
    client.send_json(hello)
    welcome = await client.wait_reply(hello["id"])
    assert welcome["type"] == "welcome", welcome
    return client, identity


async def _job(server, client, action: str, agent_id: str) -> str:
    reply = await server.admin(
        "POST", "/api/v1/jobs", {"action": action, "args": {}, "targets": [agent_id]}
    )
    assert reply.status == 201, reply
    job = reply.body["job"]
    await client.wait_message(lambda m: m.get("type") == "action.request")
    return job


async def _output(client, job: str, seq: int, text: str) -> tuple[int, object]:
    body = {"seq": seq, "stream": "stdout", "text": text}
    reply = await client.request("POST", f"/agent/v1/jobs/{job}/output", body)
    return reply["data"]["status"], reply["data"].get("body")


async def _stored(server, job: str) -> list[str]:
    reply = await server.admin("GET", f"/api/v1/jobs/{job}/output")
    assert reply.status == 200, reply
    return [chunk["text"] for chunk in reply.body["output"]]


@pytest_twisted.ensureDeferred
async def test_output_only_from_a_current_target_and_capped(tmp_path):
    server = await start_server(str(tmp_path / "server"), max_output=CAP)
    try:
        a, a_id = await _session(server)
        b, b_id = await _session(server)
        job = await _job(server, a, "command.run", a_id.agent_id)

        # delivered, not accepted yet (a streaming action): not running here
        status, body = await _output(a, job, 1, "too early\n")
        assert status == 409 and "not running" in body["error"]
        accepted = await a.request("POST", f"/agent/v1/jobs/{job}/accept", {})
        assert accepted["data"]["body"] == {"decision": "run"}

        # another agent's job: 403, over the session and over HTTPS
        assert (await _output(b, job, 1, "forged\n"))[0] == 403
        forged = {"seq": 2, "stream": "stdout", "text": "forged too\n"}
        reply = await server.agent_https(
            "POST", f"/agent/v1/jobs/{job}/output", forged, identity=b_id
        )
        assert reply.status == 403, reply
        # a job that does not exist: 404
        assert (await _output(a, "0123456789abcdef", 1, "nowhere\n"))[0] == 404

        # the target's own output, up to the cap, then one marker line, then nothing
        assert (await _output(a, job, 1, "a" * 40))[0] == 204
        assert (await _output(a, job, 2, "b" * 40))[0] == 204
        assert (await _output(a, job, 3, "c" * 40))[0] == 204
        assert (await _output(a, job, 4, "d" * 40))[0] == 204
        stored = await _stored(server, job)
        assert stored == ["a" * 40, "b" * 24 + "\n[output truncated at 64 bytes]\n"]

        # results and accepts from an agent that is not a target: refused, nothing stored
        other = await b.request(
            "POST", f"/agent/v1/jobs/{job}/result", {"state": "failed", "error": "forged"}
        )
        assert other["data"]["body"] == {"stored": False}
        assert (await b.request("POST", f"/agent/v1/jobs/{job}/accept", {}))["data"]["body"] == {
            "decision": "unknown"
        }

        # finished: output is refused afterwards
        done = await a.request("POST", f"/agent/v1/jobs/{job}/result", {"state": "succeeded"})
        assert done["data"]["body"] == {"stored": True}
        assert (await _output(a, job, 5, "late\n"))[0] == 409
        status_reply = await server.admin("GET", f"/api/v1/jobs/{job}")
        assert [r["agent"] for r in status_reply.body["results"]] == [a_id.agent_id]
        assert status_reply.body["results"][0]["state"] == "succeeded"

        # a quick action (ping) runs without accept: output while delivered is kept,
        # after its result it is refused, and another agent's is refused
        ping = await _job(server, a, "ping", a_id.agent_id)
        assert (await _output(b, ping, 1, "forged\n"))[0] == 403
        assert (await _output(a, ping, 1, "pong\n"))[0] == 204
        await a.request("POST", f"/agent/v1/jobs/{ping}/result", {"state": "succeeded"})
        assert (await _output(a, ping, 2, "after\n"))[0] == 409
        assert await _stored(server, ping) == ["pong\n"]
        assert await _stored(server, job) == stored  # nothing forged reached the real job
        await server.check_serving()
    finally:
        await server.stop()


def test_the_default_cap_is_8_mib_with_one_marker():
    allowance = OutputAllowance()
    assert allowance.limit == DEFAULT_MAX_OUTPUT == 8 * 1024 * 1024
    chunk = "x" * (1024 * 1024)
    kept = [allowance.take("j", "a", chunk) for _ in range(10)]
    assert kept[:8] == [chunk] * 8
    assert kept[8] == "\n[output truncated at 8 MiB]\n"
    assert kept[9] is None


def test_the_cap_counts_utf8_bytes_and_resumes_from_the_store():
    allowance = OutputAllowance(10)
    allowance.resume("j", "a", 6)  # stored before a restart
    kept = allowance.take("j", "a", "ééé")  # 6 bytes: 4 fit, no half character
    assert kept == "éé\n[output truncated at 10 bytes]\n"
    assert allowance.take("j", "a", "more") is None
    allowance.forget("j", "a")
    assert not allowance.known("j", "a")


def test_who_may_send_output():
    assert output_admitted(TargetState.RUNNING, quick=False)
    assert output_admitted(TargetState.DELIVERED, quick=True)
    assert not output_admitted(TargetState.DELIVERED, quick=False)
    assert not output_admitted(TargetState.PENDING, quick=True)
    assert not output_admitted(None, quick=True)


@pytest_twisted.ensureDeferred
async def test_output_with_a_lone_surrogate_is_a_400_not_a_500(tmp_path):
    server = await start_server(str(tmp_path / "server"))
    try:
        a, a_id = await _session(server)
        job = await _job(server, a, "command.run", a_id.agent_id)
        await a.request("POST", f"/agent/v1/jobs/{job}/accept", {})
        raw = b'{"seq": 1, "stream": "stdout", "text": "half \\ud800 a character"}'
        reply = await server.agent_https(
            "POST", f"/agent/v1/jobs/{job}/output", identity=a_id, raw=raw
        )
        assert reply.status == 400, reply
        assert "surrogate" in reply.body["error"]
        status, _ = await _output(a, job, 2, "whole\n")
        assert status == 204
        assert await _stored(server, job) == ["whole\n"]
    finally:
        await server.stop()


def test_the_cap_is_a_server_option(tmp_path):
    from twisted.python import usage

    from tcm.server.tap import Options, config_from

    options = Options()
    options.parseOptions(["--state-dir", str(tmp_path), "--max-output", "1000"])
    assert config_from(options).max_output == 1000
    with pytest.raises(usage.UsageError, match="--max-output"):
        Options().parseOptions(["--state-dir", str(tmp_path), "--max-output", "0"])
