"""Relay nodes: processes that hold agents' sessions and carry them to a server over one link.

A task server is a relay node (tcm/taskserver); so is the internet gateway (tcm/gateway).

- `edge`: accepts the agents' WebSocket connections; `downstream`: a task server's end of a
  gateway's link; `upstream`: the node's link to its server; `node`: the node's identity.
- `relays`: `GatewayRelay` and `TaskServerRelay`, each composed of the parts:
  `connections` (the numbered agent connections), `routing` (upstream links, and which
  upstream serves an agent at a gateway), `access` (revoked and pending agents per upstream),
  `requests` (agents' HTTPS calls awaiting answers, with their timeout), `counters`
  (for metrics and the status page), `gatewaylinks` (the gateways a task server accepts).
"""
