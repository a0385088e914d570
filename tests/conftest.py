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
