"""Domain errors: the router answers each with its status, and the composition root hands
every consumer only interface-checked services (never the store)."""

from __future__ import annotations

import json

import pytest
from twisted.internet.defer import fail
from twisted.internet.testing import MemoryReactorClock
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.test.requesthelper import DummyRequest
from zope.interface.verify import verifyObject

from tcm import interfaces
from tcm.protocol import codes
from tcm.server import errors
from tcm.server.roles import Refused, Unauthenticated
from tcm.server.service import ServerConfig, make_server_service
from tcm.server.web import JsonRouter, http_status
from tcm.store import Database

STATUSES = [
    (errors.Invalid("ttl", "'ttl' must be a number"), 400),
    (errors.Unauthenticated("invalid API token"), 401),
    (errors.Forbidden("agent a-1 is revoked"), 403),
    (errors.NotFound("no such job: j"), 404),
    (errors.Conflict("policy p exists; use update"), 409),
    (errors.TooLarge("too much"), 413),
    (errors.Unavailable("switched off"), 503),
    (Refused("viewer may not run jobs", "viewer", "run"), 403),
    (Unauthenticated("API token 'x' expired"), 401),
]


class Open(JsonRouter):
    def authorize(self, request, handler) -> None:
        return


def _answer(router: JsonRouter, path: bytes) -> tuple[int, dict]:
    request = DummyRequest(path.split(b"/")[1:])
    request.path = path
    request.method = b"GET"
    router.render(request)
    assert request.finished
    return request.responseCode, json.loads(b"".join(request.written))


@pytest.mark.parametrize("error,status", STATUSES)
@pytest.mark.parametrize("how", ["raise", "deferred"])
def test_each_domain_error_is_answered_with_its_status_message_and_details(error, status, how):
    router = Open("/api/v1")
    error.details.setdefault("hint", 7)

    def refuse(request):
        if how == "raise":
            raise error
        return fail(error)

    router.route("GET", "/x", refuse)
    assert http_status(error) == status
    assert _answer(router, b"/api/v1/x") == (status, {"error": error.message, **error.details})


def test_invalid_names_its_field():
    e = errors.Invalid("uses", "'uses' must be a positive integer")
    assert (e.field, e.message, str(e)) == ("uses", e.message, e.message)


def test_close_codes_of_domain_errors():
    assert errors.close_code(errors.Forbidden("revoked")) == codes.CLOSE_UNAUTHORIZED
    assert errors.close_code(errors.Unauthenticated("who")) == codes.CLOSE_UNAUTHORIZED
    assert errors.close_code(errors.Unavailable("off")) == codes.CLOSE_PERSISTENT_OFF
    assert errors.close_code(errors.TooLarge("big")) == codes.CLOSE_TOO_BIG
    assert errors.close_code(errors.Invalid(None, "bad")) == codes.CLOSE_PROTOCOL_ERROR


SERVICES = {
    "access": interfaces.IAccessTokens,
    "admission": interfaces.IAgentAdmission,
    "presence": interfaces.IAgentPresence,
    "settings": interfaces.IRuntimeSettings,
    "jobs": interfaces.IJobs,
    "targets": interfaces.ITargets,
    "inventory": interfaces.IInventory,
    "audit": interfaces.IAudit,
    "nodes": interfaces.INodeRegistry,
    "certificates": interfaces.ICertificates,
}


def _collaborators(obj: object) -> list[object]:
    return [v for k, v in vars(obj).items() if not k.startswith("__")]


def test_consumers_get_narrow_services_and_never_the_store(tmp_path):
    top = make_server_service(
        ServerConfig(state_dir=str(tmp_path), port=0), reactor=MemoryReactorClock()
    )
    parts = top.parts
    for name, interface in SERVICES.items():
        assert verifyObject(interface, getattr(parts, name)), name
    assert verifyObject(interfaces.IPolicies, parts.policies)
    assert verifyObject(interfaces.IProfiles, parts.profiles)
    consumers: list[object] = [parts.admin_api, parts.hub]
    site: Site = parts.site
    for path in (b"agent", b"link"):  # the agent and node APIs, and their WebSocket endpoints
        v1: Resource = site.resource.children[path].children[b"v1"]
        consumers += [v1._api, v1._ws._factory]  # type: ignore[attr-defined]
    assert len(consumers) == 6
    for consumer in consumers:
        for value in _collaborators(consumer):
            assert not isinstance(value, Database), (consumer, value)
            assert type(value).__name__ != "ServerParts", consumer
