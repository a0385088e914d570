"""The endpoint agent. It ships without server code: never import tcm.server or tcm.store."""
