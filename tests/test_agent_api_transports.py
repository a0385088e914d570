"""One agent API, two transports: the same resource answers a request whether it came over
HTTPS or as a `request` envelope on the session, and the caller cannot tell the difference
but for the transport it asked about."""

from __future__ import annotations

import pytest_twisted
from twisted.web.server import Request

from tcm.server.web import DirectCall
from tests.inproc import inproc_server  # noqa: F401  (fixture)


def _spy(router, name: str, calls: list):
    """Record each call of the route handler `name` (the real one is still called)."""
    for i, (method, regex, handler) in enumerate(router._routes):
        if getattr(handler, "__name__", "") == name:

            def recording(request, _h=handler, **params):
                calls.append((type(request), request.agent_id, _h))
                return _h(request, **params)

            router._routes[i] = (method, regex, recording)


@pytest_twisted.ensureDeferred
async def test_one_handler_answers_both_transports(inproc_server):  # noqa: F811
    server = inproc_server
    api = server.parts.agent_api
    calls: list = []
    _spy(api, "whoami", calls)
    _spy(api, "settings", calls)
    client, _welcome, identity = await server.session()

    over_https = await server.agent_https("GET", "/agent/v1/whoami", identity=identity)
    over_ws = await client.request("GET", "/agent/v1/whoami")
    assert over_https.status == over_ws["data"]["status"] == 200
    assert over_https.body == {"agent_id": identity.agent_id, "transport": "https"}
    assert over_ws["data"]["body"] == {"agent_id": identity.agent_id, "transport": "websocket"}

    s_https = await server.agent_https("GET", "/agent/v1/settings", identity=identity)
    s_ws = await client.request("GET", "/agent/v1/settings")
    assert s_https.body == s_ws["data"]["body"]  # identical answers, byte for byte as JSON

    # every call went through the same handler objects, over HTTPS as real twisted.web
    # Requests, over the session called directly (no HTTP request built: issue 17), with
    # the agent identified from the same client certificate
    assert len(calls) == 4
    assert calls[0][2] is calls[1][2] and calls[0][2].__name__ == "whoami"
    assert calls[2][2] is calls[3][2] and calls[2][2].__name__ == "settings"
    assert [issubclass(c[0], Request) for c in calls] == [True, False, True, False]
    assert [c[0] is DirectCall for c in calls] == [False, True, False, True]
    assert {c[1] for c in calls} == {identity.agent_id}
    await client.shut()


@pytest_twisted.ensureDeferred
async def test_job_result_over_either_transport_is_stored_once(inproc_server):  # noqa: F811
    server = inproc_server
    client, _welcome, identity = await server.session()
    reply = await server.admin(
        "POST", "/api/v1/jobs", {"action": "ping", "targets": [identity.agent_id]}
    )
    job = reply.body["job"]
    pushed = await client.wait_message(lambda m: m.get("type") == "action.request")
    assert pushed["data"]["job"] == job
    accept = await client.request("POST", f"/agent/v1/jobs/{job}/accept", {})
    assert accept["data"]["body"] == {"decision": "run"}
    outcome = {"state": "succeeded", "result": {"pong": True}}
    first = await server.agent_https(
        "POST", f"/agent/v1/jobs/{job}/result", outcome, identity=identity
    )
    again = await client.request("POST", f"/agent/v1/jobs/{job}/result", outcome)
    assert first.body == {"stored": True}
    assert again["data"]["body"] == {"stored": False}  # a redelivery is acknowledged, not stored
    status = await server.admin("GET", f"/api/v1/jobs/{job}")
    assert status.body["counts"]["succeeded"] == 1
    assert status.body["results"][0]["result"] == {"pong": True}
    await client.shut()


@pytest_twisted.ensureDeferred
async def test_direct_calls_answer_as_http_does(inproc_server):  # noqa: F811
    """Over a session the routes marked `direct` are served without an HTTP request; every
    answer, refusals included, is the one HTTPS gives for the same call."""
    server = inproc_server
    client, _welcome, identity = await server.session()
    reply = await server.admin(
        "POST", "/api/v1/jobs", {"action": "ping", "targets": [identity.agent_id]}
    )
    job = reply.body["job"]
    cases = [
        ("POST", f"/agent/v1/jobs/{job}/result", {"state": "done"}),  # 400: not a state
        ("POST", f"/agent/v1/jobs/{job}/result", None),  # 400: no body
        ("POST", f"/agent/v1/jobs/{job}/result", [1, 2]),  # 400: not an object
        ("POST", f"/agent/v1/jobs/{job}/result", {"state": "failed", "error": 3}),  # 400
        ("POST", "/agent/v1/jobs/nosuchjob/accept", {}),  # refused by the job service
        ("POST", f"/agent/v1/jobs/{job}/output", {"seq": "x"}),  # 400
        ("GET", "/agent/v1/nosuchroute", None),  # 404: no route, rendered the HTTP way
        ("DELETE", "/agent/v1/settings", None),  # 405
        ("GET", "/agent/v1/settings?x=1", None),  # a query the declaration does not know
        ("GET", "/agent/v1/profile", None),
        ("GET", "/agent/v1/policies", None),
    ]
    for method, path, body in cases:
        over_https = await server.agent_https(method, path, body, identity=identity)
        over_ws = await client.request(method, path, body)
        assert over_ws["type"] == "response", (method, path)
        assert over_ws["data"]["status"] == over_https.status, (method, path, over_ws)
        assert over_ws["data"].get("body") == over_https.body, (method, path)
    await client.shut()


def test_direct_call_body_rules():
    """A direct call's body is read as `json_body` reads an HTTP body."""
    import pytest

    from tcm.server.web import ApiError, json_body

    assert json_body(DirectCall("POST", "/a", {"k": 1}, None, "websocket")) == {"k": 1}
    assert json_body(DirectCall("GET", "/a", None, None, "websocket"), required=False) == {}
    with pytest.raises(ApiError) as e:
        json_body(DirectCall("POST", "/a", None, None, "websocket"))
    assert e.value.status == 400
    with pytest.raises(ApiError) as e:
        json_body(DirectCall("POST", "/a", {"t": ["ok", "\ud800"]}, None, "websocket"))
    assert "lone surrogate" in e.value.message
    # a body whose text had no \ud escape holds no lone surrogate: not walked
    assert DirectCall("POST", "/a", {"t": "\ud800"}, None, "websocket", escapes=False).json(True)

    call = DirectCall("GET", "/agent/v1/work?wait=5&x=", None, None, "websocket")
    assert call.path == "/agent/v1/work"
    assert call.args == {b"wait": [b"5"], b"x": [b""]}


def test_an_envelope_knows_whether_its_text_could_hold_a_lone_surrogate():
    """Only a \\ud escape makes one (UTF-8 text cannot): a session's request whose text had
    none is not walked for them, one that had is, and refused as over HTTPS."""
    import pytest

    from tcm.protocol.envelope import decode
    from tcm.server.web import ApiError

    frame = b'{"id":"m","type":"request","data":{"method":"POST","path":"/a","body":"%s"}}'
    plain, escaped = decode(frame % b"\\u00e9"), decode(frame % b"\\uD800")
    assert not plain.escapes and escaped.escapes
    body = escaped.data["body"]
    with pytest.raises(ApiError, match="lone surrogate"):
        DirectCall("POST", "/a", body, None, "websocket", escaped.escapes).json(True)


def test_direct_calls_are_routed_by_path_each_with_its_own_parameters():
    """The routing of a direct call is kept per path (ten thousand results of one job are
    one path): each path still gets its own parameters, a non-direct route still refuses
    the direct way, and past the bound the routing is found again."""
    from twisted.internet.defer import Deferred

    from tcm.server import web

    router = web.JsonRouter("/x/v1")
    router.route("GET", "/jobs/{job}/result", lambda request, job: {"get": job})
    router.direct_route("POST", "/jobs/{job}/result", lambda request, job: {"job": job})

    def answer(method: str, path: str):
        d = router.serve_direct(DirectCall(method, path, {}, None, "websocket"))
        if d is None:
            return None
        out: list = []
        assert isinstance(d, Deferred)
        d.addCallback(out.append)
        return out[0]

    for _ in range(2):
        assert answer("POST", "/x/v1/jobs/a/result") == (200, {"job": "a"})
        assert answer("POST", "/x/v1/jobs/b/result") == (200, {"job": "b"})
        assert answer("GET", "/x/v1/jobs/a/result") is None  # not direct: rendered instead
        assert answer("POST", "/x/v1/nothing") is None
    for i in range(web.DIRECT_PATHS_KEPT + 5):
        assert answer("POST", f"/x/v1/jobs/j{i}/result") == (200, {"job": f"j{i}"})
    assert len(router._direct_paths) <= web.DIRECT_PATHS_KEPT
