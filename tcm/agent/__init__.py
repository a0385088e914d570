"""The endpoint agent. It ships without server code: never import tcm.server or tcm.store."""

# The control socket's name in the agent's state directory; here, with no imports, so the
# `tcm-agent` command finds it without loading Twisted.
CONTROL_SOCKET = "control.sock"
