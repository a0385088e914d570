"""Shared pytest setup. pytest-twisted runs the real reactor for tests that need sockets."""

import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def stack(tmp_path):
    """(tmp_path, add): `add(process)` registers a harness process to stop at teardown,
    last added first."""
    procs: list = []

    def add(p):
        procs.append(p)
        return p

    yield tmp_path, add
    for p in reversed(procs):
        p.stop()


# -- one server and its agents per test module (real processes) -------------------------------
# A module sets SERVER_ARGS / SERVER_ENV / AGENT_ARGS / AGENT_COUNT to shape them.


@pytest.fixture(scope="module")
def base(request, tmp_path_factory):
    return str(tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1]))


@pytest.fixture(scope="module")
def server(request, base):
    from tests.harness import Server

    s = Server(base, extra=list(getattr(request.module, "SERVER_ARGS", [])))
    s.env = getattr(request.module, "SERVER_ENV", None)
    s.start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def agents(request, base, server):
    from tests.harness import start_agents

    procs = start_agents(
        base,
        server,
        getattr(request.module, "AGENT_COUNT", 3),
        extra=list(getattr(request.module, "AGENT_ARGS", [])),
    )
    yield procs
    for p in procs:
        p.stop()
