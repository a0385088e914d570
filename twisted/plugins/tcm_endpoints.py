"""twisted dropin: the `tcm:` server endpoint type (tcm's TLS over any other endpoint)."""

from tcm.tls.endpoints import TLSEndpointParser

tcmEndpointParser = TLSEndpointParser()
