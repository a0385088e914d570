"""The tcm wire protocol, version 1: envelopes, schemas, codec. Pure: no I/O, no reactor."""
