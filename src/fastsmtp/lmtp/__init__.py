"""LMTP (RFC 2033), the client's side: delivery into a mail store such as Dovecot.

``protocol`` is the sans-IO conversation (commands out, replies in, the
RFC 2033 §4.2 rule of one reply per recipient after the final dot);
``client`` runs it over unix or TCP sockets with timeouts, failover
between targets and a small pool of connections for RCPT-time probes.
"""

__all__: list[str] = []
