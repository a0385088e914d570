"""Command lines: `tcm` (admin, over the REST API) and `tcm-agent` (agent control)."""
