"""TLS contexts from configuration; no protocol logic lives here.

RFC 8314 §4.1 and RFC 7525 §3.1.1: TLS 1.2 is the floor.  The ciphers are
Python's defaults (they follow OpenSSL's secure set); we do not second-guess
them.
"""

from __future__ import annotations

import ssl

__all__ = ["server_context", "describe"]


def server_context(cert: str, key: str) -> ssl.SSLContext:
    """A server-side context for STARTTLS and implicit TLS.

    Raises:
        OSError, ssl.SSLError: the certificate or key cannot be loaded.
    """
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # Mail clients rarely present certificates, and an MX must accept mail
    # from senders without one (RFC 3207 §4.1).
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(cert, key)
    return ctx


def describe(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str | None:
    """Postfix-style "(using TLSv1.3 with cipher X (256/256 bits))" words for Received."""
    if ssl_object is None:
        return None
    cipher = ssl_object.cipher()
    version = ssl_object.version() or "TLS"
    if cipher is None:
        return f"using {version}"
    name, _, bits = cipher
    return f"using {version} with cipher {name} ({bits}/{bits} bits)"
