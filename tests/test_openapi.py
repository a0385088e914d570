"""The OpenAPI 3.1 document at GET /api/v1/openapi.json: valid, complete, readable with any
token, and true to a live server: a bounded schemathesis run against a real `twistd
tcm-server` finds no 5xx and no response that breaks its declared schema."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from openapi_spec_validator import validate

from tcm.server.openapi import document
from tcm.tls import pki
from tests.inproc import routers

pytestmark = pytest.mark.integration

# /agent/v1/work holds a poll at most this long: a drawn `wait` cannot stall the run
SERVER_ARGS = ["--long-poll", "1"]
# Cases per operation and mode (at most): ~390 cases for 59 operations. A longer exploratory run:
# TCM_SCHEMATHESIS_EXAMPLES=50,25 (positive,negative; drawn at random instead of derandomized).
_WIDER = os.environ.get("TCM_SCHEMATHESIS_EXAMPLES")
_POSITIVE, _NEGATIVE = map(int, (_WIDER or "6,3").split(","))
EXAMPLES = {"positive": _POSITIVE, "negative": _NEGATIVE}
MAX_WAIT = 0.2  # seconds: the `wait` of a drawn case is cut to this (see _bounded)


def _declared_routes(state_dir: str) -> set[tuple[str, str]]:
    return {(r.method, r.pattern) for router in routers(state_dir) for r in router.routes()}


def test_the_document_is_valid_openapi_3_1():
    doc = document()
    validate(doc)  # openapi-spec-validator: raises on any error
    assert doc["openapi"].startswith("3.1")


def test_the_document_covers_every_route_of_both_apis(tmp_path):
    doc = document()
    published = {(m.upper(), path) for path, ops in doc["paths"].items() for m in ops}
    assert published == _declared_routes(str(tmp_path))
    assert {p for _, p in published if p.startswith("/api/v1/")} >= {"/api/v1/openapi.json"}


# -- against a live server -------------------------------------------------------------------


def _admin_token(server) -> str:
    with open(os.path.join(server.state_dir, "admin.token")) as f:
        return f.read().strip()


def _session(server, token: str | None) -> requests.Session:
    """A requests session that trusts the server's own CA (and nothing from the environment:
    REQUESTS_CA_BUNDLE would replace it), with `token` as its bearer token."""
    s = requests.Session()
    s.trust_env = False
    s.verify = server.ca
    if token is not None:
        s.headers["Authorization"] = f"Bearer {token}"
    return s


@pytest.fixture(scope="module")
def http(server):
    s = _session(server, _admin_token(server))
    yield s
    s.close()


@pytest.fixture(scope="module")
def agent_cert(server, http, tmp_path_factory):
    """An enrolled agent's certificate and key files, for the agent API's operations."""
    token = http.post(f"{server.url}/api/v1/tokens", json={"uses": 1}).json()["token"]
    key = pki.generate_key()
    reply = http.post(
        f"{server.url}/agent/v1/enroll",
        json={"token": token, "csr": pki.make_csr(key).decode(), "hostname": "fuzzed"},
        headers={"Authorization": ""},
    )
    assert reply.status_code == 201, reply.text
    folder = tmp_path_factory.mktemp("agent")
    cert, key_file = folder / "agent.pem", folder / "agent.key"
    cert.write_text(reply.json()["certificate"])
    key_file.write_bytes(pki.key_to_pem(key))
    return str(cert), str(key_file)


def test_the_document_is_served_to_any_valid_token(server, http):
    served = http.get(f"{server.url}/api/v1/openapi.json")
    assert served.status_code == 200
    assert served.json() == json.loads(json.dumps(document()))
    viewer = http.post(f"{server.url}/api/v1/apitokens", json={"name": "v", "role": "viewer"})
    assert viewer.status_code == 201, viewer.text
    with _session(server, viewer.json()["token"]) as as_viewer:
        read = as_viewer.get(f"{server.url}/api/v1/openapi.json")
    assert read.status_code == 200 and read.json() == served.json()
    with _session(server, None) as anonymous:
        refused = anonymous.get(f"{server.url}/api/v1/openapi.json")
    assert refused.status_code == 401 and "bearer" in refused.json()["error"]


def _bounded(case) -> None:
    """Cut a drawn `wait` (job output, policy push, agent long-poll) to MAX_WAIT seconds: the
    value is valid either way, and a run of a few hundred cases must not sit in long-polls."""
    query = case.query or {}
    if case.path == "/api/v1/events":  # a stream: open for `wait` seconds (default an hour)
        case.query = query
        query.setdefault("wait", MAX_WAIT)
    wait = query.get("wait")
    if isinstance(wait, (int, float)) and not isinstance(wait, bool) and wait > MAX_WAIT:
        query["wait"] = MAX_WAIT


class Fuzz:
    """A bounded schemathesis run: each operation's cases drawn by hypothesis, sent to the
    live server, and every response checked; failures are collected, not raised, so one run
    reports them all."""

    def __init__(self, server, http, agent_cert: tuple[str, str]):
        from schemathesis.checks import (
            content_type_conformance,
            not_a_server_error,
            response_schema_conformance,
            status_code_conformance,
        )

        self.server, self.http, self.agent_cert = server, http, agent_cert
        self.checks = [
            not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_schema_conformance,
        ]
        self.figures = {"operations": 0, "cases": 0, "failures": 0}
        self.statuses: dict[int, int] = {}
        self.failures: list[str] = []

    def operation(self, operation) -> None:
        from schemathesis.generation import GenerationMode

        self.figures["operations"] += 1
        for mode_name, examples in EXAMPLES.items():
            mode = GenerationMode(mode_name)
            try:
                self._run(operation, mode, examples)
            except Unsatisfiable:
                # nothing to get wrong (no parameters, no body): no negative case exists
                assert not mode.is_positive, operation.label

    def _run(self, operation, mode, examples: int) -> None:
        from schemathesis.checks import negative_data_rejection
        from schemathesis.core.failures import FailureGroup

        # a negative case (data that breaks the declaration) must not be accepted
        checks = self.checks + ([] if mode.is_positive else [negative_data_rejection])
        transport: dict[str, Any] = {"verify": self.server.ca, "timeout": 30}
        if operation.path.startswith("/agent/v1/"):
            transport["cert"] = self.agent_cert

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            derandomize=_WIDER is None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        def run(case) -> None:
            _bounded(case)
            self.figures["cases"] += 1
            response = case.call(base_url=self.server.url, session=self.http, **transport)
            self.statuses[response.status_code] = self.statuses.get(response.status_code, 0) + 1
            try:
                case.validate_response(response, checks=checks)
            except FailureGroup as e:  # checks failed: collected, all reported at the end
                self.figures["failures"] += 1
                self.failures.append(f"{operation.label} [{mode.value}]: {e}")

        run()


def test_schemathesis_finds_no_server_error_and_no_undeclared_response(
    server, http, agent_cert, tmp_path
):
    import schemathesis

    raw = http.get(f"{server.url}/api/v1/openapi.json").json()
    schema = schemathesis.openapi.from_dict(raw)
    # The run fuzzes what a request carries, not its credentials: every case goes with the
    # admin token (or the agent's certificate), so no case may count as "without the token"
    # (refusals of missing and bad tokens: tests/test_bad_input.py, test_admin_model.py).
    schema.config.generation.update(with_security_parameters=False)
    fuzz = Fuzz(server, http, agent_cert)
    started = time.monotonic()
    for result in schema.get_all_operations():
        fuzz.operation(result.ok())
    elapsed = time.monotonic() - started
    print(
        f"schemathesis: {fuzz.figures} in {elapsed:.1f} s; statuses {sorted(fuzz.statuses.items())}"
    )
    assert fuzz.figures["operations"] == len(_declared_routes(str(tmp_path)))
    assert fuzz.figures["cases"] >= 200
    assert not fuzz.failures, "\n\n".join(fuzz.failures[:20])
    assert server.alive()
