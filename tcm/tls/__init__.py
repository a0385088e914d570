"""The TLS layer every tcm process stands on: keys and certificates (``pki``), the server's
TLS options (``server``), logging and admission of handshakes (``handshake``), the release
of the handshake's buffers on idle connections (``buffers``) and the resumption tokens that
resume handshakes across a server's restart (``resumption``).

Used by the server, the task server, the gateway and the agent; imports no other tcm package
but ``tcm.protocol`` (and ``tcm.compat``, the one module that reaches library internals).
The certificate authority, which is server state, lives in ``tcm.server.ca``.
"""
