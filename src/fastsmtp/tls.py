"""TLS contexts from configuration, and the STARTTLS handshake; no SMTP logic lives here.

RFC 8314 §4.1 and RFC 7525 §3.1.1: TLS 1.2 is the floor.  The ciphers are
Python's defaults (they follow OpenSSL's secure set); we do not second-guess
them.
"""

from __future__ import annotations

import asyncio
import logging
import ssl

__all__ = ["server_context", "describe", "handshake", "HandshakeFailed", "milter_macros"]

log = logging.getLogger("fastsmtp")

#: How long a client may take over its STARTTLS handshake.
HANDSHAKE_TIMEOUT = 30.0


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


def milter_macros(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> list[tuple[str, str]]:
    """The TLS macros as Postfix gives them to milters: {tls_version}, {cipher}, {cipher_bits}."""
    if ssl_object is None:
        return []
    version = ssl_object.version() or ""
    cipher = ssl_object.cipher()
    if cipher is None:
        return [("{tls_version}", version)]
    name, _, bits = cipher
    return [("{tls_version}", version), ("{cipher}", name), ("{cipher_bits}", str(bits))]


async def handshake(
    loop: asyncio.AbstractEventLoop, transport: asyncio.Transport, protocol: asyncio.BaseProtocol,
    context: ssl.SSLContext, peer: str,
) -> asyncio.Transport | None:
    """Upgrade ``transport`` in place (RFC 3207): the new one, or None.

    A failed handshake or a garbage ClientHello is one log line, no
    traceback, and the connection is aborted (its descriptor released).
    None also when the peer left during the handshake.
    """
    try:
        return await loop.start_tls(
            transport, protocol, context, server_side=True, ssl_handshake_timeout=HANDSHAKE_TIMEOUT
        )
    except (OSError, ssl.SSLError, asyncio.TimeoutError, ConnectionError) as exc:
        log.info("TLS handshake with %s failed: %s", peer, exc or type(exc).__name__)
        transport.abort()
        raise HandshakeFailed from exc


class HandshakeFailed(Exception):
    """The STARTTLS handshake did not complete (already logged; connection aborted)."""
