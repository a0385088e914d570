"""Relay nodes: processes that hold agents' sessions and carry them to a server over one link.

A task server is a relay node (tcm/taskserver); so is the internet gateway. `edge` accepts the
agents, `upstream` is the node's link to its server, `node` is the node's identity.
"""
