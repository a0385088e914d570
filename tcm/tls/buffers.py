"""Memory an idle TLS connection need not keep: the buffers of its handshake."""

from __future__ import annotations

from tcm import compat

__all__ = ["release_handshake_buffers"]


def release_handshake_buffers(connection: object) -> bool:
    """Give an established TLS connection fresh, empty memory BIOs.

    Twisted runs OpenSSL over two memory BIOs per connection; each keeps the capacity of the
    largest chunk it ever held (the handshake: certificates, key shares with ML-KEM's
    kilobyte-sized keys), about 5 KB per connection that an idle session never uses again.
    OpenSSL has no call to shrink them, but it frees the old ones when it is given new ones
    (``compat.swap_memory_bios``). Done only when both are empty (nothing received and not
    yet decrypted, nothing encrypted and not yet sent), so no byte is lost; True if it was
    done.
    """
    return compat.swap_memory_bios(connection)
