"""The agent's HTTP client machinery (treq on `twisted.web.client`), apart from link.py.

An agent that holds its persistent session makes no HTTPS call: it needs this module only to
enroll, to poll when it falls back to HTTPS, and for a call sent while the session is down.
`HttpsClient` (link.py) and `enroll` (enrollment.py) import it on their first request, so
that an agent on its WebSocket never loads treq, `twisted.web` and what they bring (issue 17:
an idle agent's memory; tests/test_agent_imports.py keeps it so).
"""

from __future__ import annotations

from typing import Any

import treq
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from tcm.agent.link import Identity, Traffic, server_endpoint


@implementer(IAgentEndpointFactory)
class EndpointFactory:
    """The TLS endpoint (through the proxy, from the source address) for each request's URI."""

    def __init__(
        self,
        reactor: Any,
        identity: Identity,
        proxy: Any,
        bind: str | None = None,
        traffic: Traffic | None = None,
    ):
        self._reactor = reactor
        self._identity = identity
        self._proxy = proxy
        self._bind = bind
        self._traffic = traffic

    def endpointForURI(self, uri):
        url = f"https://{uri.host.decode()}:{uri.port}"
        return server_endpoint(
            self._reactor,
            url,
            self._identity,
            self._proxy,
            bind=self._bind,
            traffic=self._traffic,
        )


def persistent_pool(reactor: Any) -> HTTPConnectionPool:
    """Keep-alive connections for the agent API: two at most, closed after a minute idle."""
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 2
    pool.cachedConnectionTimeout = 60
    return pool


def http_client(
    reactor: Any, endpoints: EndpointFactory, pool: HTTPConnectionPool | None = None
) -> treq.client.HTTPClient:
    """A treq client whose connections come from `endpoints`."""
    return treq.client.HTTPClient(Agent.usingEndpointFactory(reactor, endpoints, pool=pool))
