"""Results that a gateway carries in one `batch` link message, against a real in-process
server (issue 17): each is stored and acknowledged after its commit, the acknowledgements
of one commit go back together in one link message, and a bad result among them gets its
own error answer without keeping the others from being stored."""

from __future__ import annotations

import json
from typing import Any

import pytest_twisted

from tcm.protocol import link
from tests.inproc import TIMEOUT, hello_envelope, start_server, wait_for
from tests.test_fuzz_agent_api import _gateway_identity, _link


def _server_parts(client) -> list[list[tuple[dict[str, Any], bytes]]]:
    """The link messages the server sent so far, each as its parts (a batch: several)."""
    out = []
    for message in client.messages:
        if isinstance(message, bytes):
            header, payload = link.decode(message, link.SERVER_SENDS)
            out.append(list(link.unbatch(header, payload, link.SERVER_SENDS)))
    return out


def _replies(client) -> dict[str, tuple[int, dict[str, Any]]]:
    """in_reply_to -> (index of the server's link message it came in, the envelope)."""
    found = {}
    for i, parts in enumerate(_server_parts(client)):
        for header, payload in parts:
            if header["t"] == "frame" and payload:
                env = json.loads(payload)
                if env.get("in_reply_to"):
                    found[env["in_reply_to"]] = (i, env)
    return found


def _result(msg_id: str, job: str, state: str) -> bytes:
    body = {"state": state, "result": {"pong": True}, "started": 1.0, "finished": 2.0}
    return json.dumps(
        {
            "id": msg_id,
            "type": "request",
            "data": {"method": "POST", "path": f"/agent/v1/jobs/{job}/result", "body": body},
        }
    ).encode()


def _batch(messages: list[bytes]) -> bytes:
    return link.encode({"t": "batch", "n": [len(m) for m in messages]}, b"".join(messages))


@pytest_twisted.ensureDeferred
async def test_a_batch_of_results_with_a_bad_one_stores_and_acknowledges_the_others(tmp_path):
    server = await start_server(str(tmp_path / "server"))
    try:
        agents = [(await server.enroll_identity()).agent_id for _ in range(3)]
        node = await _link(server, await _gateway_identity(server))
        hellos = []
        for c, agent in enumerate(agents):
            hello = hello_envelope()
            hellos.append(hello["id"])
            node.send_raw(link.encode({"t": "open", "c": c, "agent": agent}), binary=True)
            node.send_raw(link.encode({"t": "frame", "c": c}, json.dumps(hello).encode()), True)
        await wait_for(lambda: set(hellos) <= set(_replies(node)), TIMEOUT, what="welcomes")
        created = await server.admin("POST", "/api/v1/jobs", {"action": "ping", "targets": agents})
        assert created.status in (200, 201), created
        job = created.body["job"]

        good, bad, other = "r-good", "r-bad", "r-other"
        node.send_raw(
            _batch(
                [
                    link.encode({"t": "frame", "c": 0}, _result(good, job, "succeeded")),
                    link.encode({"t": "frame", "c": 1}, _result(bad, job, "bogus")),
                    link.encode({"t": "frame", "c": 2}, _result(other, job, "failed")),
                ]
            ),
            binary=True,
        )
        await wait_for(lambda: {good, bad, other} <= set(_replies(node)), what="the answers")
        replies = _replies(node)
        for msg_id in (good, other):
            assert replies[msg_id][1]["data"] == {"status": 200, "body": {"stored": True}}
        # the acknowledgements of one commit leave in one link message (a batch)
        assert replies[good][0] == replies[other][0]
        refused = replies[bad][1]["data"]
        assert refused["status"] == 400
        assert "state" in refused["body"]["error"]

        status = await server.admin("GET", f"/api/v1/jobs/{job}")
        states = {r["agent"]: r["state"] for r in status.body["results"]}
        assert states[agents[0]] == "succeeded" and states[agents[2]] == "failed"
        assert states[agents[1]] not in ("succeeded", "failed")  # still waiting for its result

        # the bad one, sent again right, is stored then: nothing was lost with it
        node.send_raw(
            link.encode({"t": "frame", "c": 1}, _result("r-again", job, "succeeded")), True
        )
        await wait_for(lambda: "r-again" in _replies(node), what="the answer")
        assert _replies(node)["r-again"][1]["data"] == {"status": 200, "body": {"stored": True}}
        await node.shut()
    finally:
        await server.stop()
