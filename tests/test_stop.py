"""The server's stop: every session told 4012, recorded as seen in one store write and
logged in one line for all (not one line and one write per session as each closes)."""

from __future__ import annotations

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.error import ConnectionRefusedError
from twisted.logger import capturedLogs, formatEvent

from tcm.protocol import codes
from tcm.store import Database
from tests.inproc import start_server, wait_for, within


@pytest_twisted.inlineCallbacks
def test_a_stop_closes_every_session_with_one_line_and_one_write(tmp_path):
    server = yield start_server(str(tmp_path / "server"))
    parts = server.parts
    stopped = False
    try:
        clients = []
        for _ in range(3):
            client, welcome, identity = yield server.session()
            clients.append(client)
        yield wait_for(lambda: len(parts.presence.registry) == 3, what="three sessions")
        # each session's open was recorded; wait for those writes to be committed
        yield within(parts.db.writes.flushed())
        stop_at = parts.clock.seconds()
        with capturedLogs() as events:
            stopped = True
            yield within(server.service.stopService(), 10)
        for client in clients:
            yield within(client.closed)
            assert client.close_code == codes.CLOSE_RESTARTING
        lines = [formatEvent(e) for e in events]
        assert [line for line in lines if "closing" in line] == [
            f"closing 3 sessions: {codes.CLOSE_REASONS[codes.CLOSE_RESTARTING]}"
        ]
        assert "3 sessions closed, 0 left to the reactor's shutdown" in lines
        assert not [line for line in lines if " session closed" in line]  # none per agent
    finally:
        if not stopped:
            yield server.stop()
    # the store (closed by the stop) has every agent seen at the stop, not at its open
    db = Database(parts.config.database_url, reactor)
    db.open()
    try:
        rows = yield db.agents.list_agents()
    finally:
        db.close()
    assert len(rows) == 3
    assert all(r["last_seen"] >= stop_at for r in rows)


@pytest_twisted.inlineCallbacks
def test_sessions_that_close_outside_a_stop_are_logged_and_recorded_each(tmp_path):
    server = yield start_server(str(tmp_path / "server"))
    parts = server.parts
    try:
        client, welcome, identity = yield server.session()
        yield wait_for(lambda: len(parts.presence.registry) == 1, what="the session")
        with capturedLogs() as events:
            yield client.shut()
            yield wait_for(lambda: len(parts.presence.registry) == 0, what="the close")
        lines = [formatEvent(e) for e in events]
        assert f"agent {identity.agent_id} session closed" in lines
        assert not parts.presence.closing_everything
    finally:
        yield server.stop()


@pytest_twisted.inlineCallbacks
def test_no_connection_is_accepted_once_the_stop_began(tmp_path):
    server = yield start_server(str(tmp_path / "server"))
    parts = server.parts
    stopping = None
    try:
        client, welcome, identity = yield server.session()
        yield wait_for(lambda: len(parts.presence.registry) == 1, what="the session")
        # The agent holds its session through the stop's grace (it has not yet answered
        # the 4012); meanwhile another connection, as an agent told 4012 earlier would
        # make, must be refused, not served by the server that is going away.
        stopping = server.service.stopService()
        try:
            late = yield server.ws_connect(identity)
        except ConnectionRefusedError:
            pass
        else:  # reached the backlog of a port that is closing: reset, never served
            assert not late.opened_ok, late.close_info
        assert [s.agent_id for s in parts.presence.registry.all()] in ([], [identity.agent_id])
        yield within(stopping, 10)
        yield within(client.closed)
        assert client.close_code == codes.CLOSE_RESTARTING
    finally:
        if stopping is None:
            yield server.stop()
