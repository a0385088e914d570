"""The internet gateway: a relay node in the DMZ for agents of several management servers.

It terminates the agents' TLS and WebSocket, routes each agent to the server named in its
certificate, and carries the sessions (and the agents' HTTPS calls) over one node link per
upstream server. It keeps no database. See docs/architecture.md ("The internet gateway").
"""
