"""The management server: agent endpoint, admin API, certificate authority, store access."""
