"""Before the greeting: the PROXY header, admission, ``on_connect``, the early-talker window.

Rules of this module:
- ``Opening`` runs the connection's first phases (protocol.py's ``Phase``):
  ``PROXY`` (a trusted balancer's header is awaited, within
  ``--proxy-timeout``), ``CONNECT`` (the ``on_connect`` stages think; what
  the client says meanwhile is held, not read), and ``GREETING`` (the
  greeting is delayed; a client that talks now is an early talker, a spam
  engine that does not wait for replies: 554 and close, as postscreen and
  Haraka's early_talker do).  Then it hands over to the session.
- The client's address is settled here (a PROXY header replaces the
  socket's), and admission (the per-client limit) is counted with it.
- A PROXY header from anyone not trusted is refused: it would let a client
  choose the address it is judged by.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .events import Reply
from .phase import Phase
from .metrics import REFUSED_PER_IP
from .proxy import ProxyHeaderError, looks_like_proxy_header, parse_proxy_header
from .stages import StepRun, Verdict

if TYPE_CHECKING:
    from .protocol import SMTPProtocol

__all__ = ["Opening", "EARLY_TALKER", "UNTRUSTED_PROXY"]

log = logging.getLogger("fastsmtp")

UNTRUSTED_PROXY = Reply(554, "5.7.0", "Error: PROXY header from an untrusted address")
EARLY_TALKER = Reply(554, "5.5.0", "Error: SMTP protocol synchronization, talking before the greeting")


class Opening:
    """The pre-greeting part of one connection."""

    __slots__ = ("_conn", "_proxy_buf", "_step", "check_proxy")

    def __init__(self, conn: SMTPProtocol) -> None:
        self._conn = conn
        self._proxy_buf = b""
        self._step: StepRun | None = None
        #: The first octets of the session are checked for a PROXY header
        #: nobody asked for (only where some balancer is trusted).
        self.check_proxy = False

    def start(self) -> None:
        """connection_made: wait for a PROXY header, or admit at once."""
        conn = self._conn
        server = conn.server
        if not conn.implicit_tls and server.trusts_proxy(conn.peer):
            # The balancer speaks first; the greeting waits for its header.
            conn.enter(Phase.PROXY, server.config.proxy_timeout, self._proxy_timeout)
            return
        self.check_proxy = bool(server.proxy_trusted)
        self._admit()

    def proxy_data(self, data: bytes) -> None:
        """Octets in the PROXY phase: the header, and maybe the first commands."""
        buf = self._proxy_buf = self._proxy_buf + data
        conn = self._conn
        try:
            parsed = parse_proxy_header(buf)
        except ProxyHeaderError as exc:
            log.warning("bad PROXY header from %s: %s", conn.peer, exc)
            conn.abort()
            return
        if parsed is None:
            return
        info, used = parsed
        self._proxy_buf = b""
        if info.source is not None:
            conn.peer = info.source
        self._admit()
        rest = buf[used:]
        if rest:
            conn.data_received(rest)

    def early_talker(self) -> None:
        """Octets in the GREETING phase: the client did not wait."""
        conn = self._conn
        log.info("early talker %s refused", conn.peer)
        conn.refuse(EARLY_TALKER)

    def refuses_proxy_header(self, data: bytes) -> bool:
        """Whether the session's first octets are a PROXY header from an untrusted peer."""
        self.check_proxy = False
        if not looks_like_proxy_header(data):
            return False
        log.warning("PROXY header from untrusted %s refused", self._conn.peer)
        self._conn.refuse(UNTRUSTED_PROXY)
        return True

    def cancel(self) -> None:
        if self._step is not None:
            self._step.cancel()
            self._step = None

    def _proxy_timeout(self) -> None:
        log.warning("no PROXY header from %s in time", self._conn.peer)
        self._conn.abort()

    def _admit(self) -> None:
        """The per-client limit, with the client's own address, then on_connect."""
        conn = self._conn
        server = conn.server
        refusal, key = server.admit(conn.peer)
        if refusal is not None:
            server.meter.connection_refused(REFUSED_PER_IP)
            # A TLS client could not read plain text.
            conn.refuse(None if conn.implicit_tls else refusal)
            return
        conn.client_key = key
        server.meter.connection_accepted()
        calls = server.stages.on_connect
        if calls:
            conn.enter(Phase.CONNECT)
            self._step = StepRun(calls, (conn.peer,), conn.peer, self._connected)
            verdict = self._step.start()
            if verdict is None:
                # The answer comes to _connected; reading waits for it, as
                # for any stage (what arrives meanwhile is held, bounded).
                conn.flow.hold("stage")
                return
            self._step = None
            if verdict.reply is not None:
                conn.refuse(verdict.reply)
                return
        self._welcome()

    def _connected(self, verdict: Verdict) -> None:
        """The on_connect stages' late answer: greet, or refuse instead of the greeting."""
        self._step = None
        conn = self._conn
        if not conn.is_open():
            return  # closed meanwhile (the client's EOF, a shutdown)
        conn.flow.release("stage")
        if verdict.reply is not None:
            conn.refuse(verdict.reply)
            return
        self._welcome()
        conn.release_held()

    def _welcome(self) -> None:
        conn = self._conn
        delay = conn.server.config.greeting_delay
        if delay > 0 and not conn.implicit_tls:
            conn.enter(Phase.GREETING, delay, self._greet)
            return
        self._greet()

    def _greet(self) -> None:
        self._conn.greet()
