"""The phases of one connection, and the moves between them.

Rule of this module: a connection is in exactly one ``Phase``, and changes
it only along ``MOVES`` (protocol.py's ``enter`` checks every move, as
uvloop's sslproto checks its state changes in one ``_set_state``).  Each
phase owns at most one timer, armed on entry and cancelled on exit, so no
timer outlives the phase that wanted it.
"""

from __future__ import annotations

import enum

__all__ = ["Phase", "MOVES"]


class Phase(enum.Enum):
    #: Accepted; nothing decided yet.
    NEW = "new"
    #: A trusted balancer's PROXY header is awaited (timer: --proxy-timeout).
    PROXY = "proxy"
    #: The on_connect stages think, or, after the screening, the milters'
    #: connect; the client's octets are held.
    CONNECT = "connect"
    #: The greeting is delayed; talking now is refused (timer: --greeting-delay).
    GREETING = "greeting"
    #: The SMTP session runs (timer: --idle-timeout).
    COMMANDS = "commands"
    #: An error reply is being delayed (timer: the delay, then the reply).
    TARPIT = "tarpit"
    #: The STARTTLS handshake owns the socket; octets are held (its timeout
    #: is the handshake's own).
    TLS = "tls"
    #: Closed by us or by the peer: nothing more is read or written.
    CLOSED = "closed"


_OPENING = {Phase.PROXY, Phase.CONNECT, Phase.GREETING, Phase.COMMANDS, Phase.CLOSED}
MOVES: dict[Phase, frozenset[Phase]] = {
    Phase.NEW: frozenset(_OPENING),
    Phase.PROXY: frozenset(_OPENING - {Phase.PROXY}),
    Phase.CONNECT: frozenset({Phase.CONNECT, Phase.GREETING, Phase.COMMANDS, Phase.CLOSED}),
    Phase.GREETING: frozenset({Phase.CONNECT, Phase.COMMANDS, Phase.CLOSED}),
    Phase.COMMANDS: frozenset({Phase.TARPIT, Phase.TLS, Phase.CLOSED}),
    Phase.TARPIT: frozenset({Phase.COMMANDS, Phase.CLOSED}),
    Phase.TLS: frozenset({Phase.COMMANDS, Phase.CLOSED}),
    Phase.CLOSED: frozenset({Phase.CLOSED}),
}
