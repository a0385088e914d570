"""WebSocket close codes and error codes of the tcm.v1 protocol (docs/protocol.md)."""

SUBPROTOCOL = "tcm.v1"
PROTOCOL_VERSION = 1

# WebSocket close codes. 1000-1011 are RFC 6455; 4000-4999 are tcm's own.
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_SUPERSEDED = 4000
CLOSE_HELLO_TIMEOUT = 4001
CLOSE_PROTOCOL_ERROR = 4002
CLOSE_UNAUTHORIZED = 4003
CLOSE_IN_FLIGHT = 4004
CLOSE_PERSISTENT_OFF = 4005
CLOSE_DRAIN = 4006
CLOSE_REVOKED = 4007
CLOSE_KEEPALIVE = 4008
CLOSE_BY_AGENT_USER = 4009
CLOSE_UPSTREAM_LOST = 4010
CLOSE_BY_PROFILE = 4011
CLOSE_RESTARTING = 4012
CLOSE_CLONED = 4013

CLOSE_REASONS = {
    CLOSE_SUPERSEDED: "superseded by a newer session of the same agent",
    CLOSE_HELLO_TIMEOUT: "no hello within the handshake timeout",
    CLOSE_PROTOCOL_ERROR: "protocol error",
    CLOSE_UNAUTHORIZED: "unauthorized",
    CLOSE_IN_FLIGHT: "too many requests in flight",
    CLOSE_PERSISTENT_OFF: "persistent connections are switched off on the server; use HTTP",
    CLOSE_DRAIN: "server or gateway is draining; reconnect elsewhere",
    CLOSE_REVOKED: "agent certificate revoked",
    CLOSE_KEEPALIVE: "keepalive timeout",
    CLOSE_BY_AGENT_USER: "persistent connection terminated on the agent",
    CLOSE_UPSTREAM_LOST: "the relay lost its link to the server; reconnect",
    CLOSE_BY_PROFILE: "persistent connections are off in the agent's connection profile",
    CLOSE_RESTARTING: "the server is restarting; reconnect in a few seconds",
    CLOSE_CLONED: "identity cloned (two agents, one certificate): re-key (revoke, enroll anew)",
}

# Codes carried in the data of an `error` envelope.
ERR_MALFORMED = "malformed"  # not JSON, or not a JSON object
ERR_SCHEMA = "schema"  # the envelope or its data fails the type's schema
ERR_UNKNOWN_TYPE = "unknown-type"
ERR_TOO_LARGE = "too-large"
ERR_UNEXPECTED = "unexpected"  # a valid message the receiver cannot take now
ERR_IN_FLIGHT = "in-flight-limit"
ERR_INTERNAL = "internal"
