"""Before the greeting: the PROXY header, admission, ``on_connect``, the screening.

Rules of this module:
- ``Opening`` runs the connection's first phases (protocol.py's ``Phase``):
  ``PROXY`` (a trusted balancer's header is awaited, within
  ``--proxy-timeout``), ``CONNECT`` (the ``on_connect`` stages think; what
  the client says meanwhile is held, not read), and ``GREETING`` (the
  greeting is delayed; a client that talks now is an early talker, a spam
  engine that does not wait for replies: 554 and close, as postscreen and
  Haraka's early_talker do).  Then it hands over to the session.
- The client's address is settled here (a PROXY header replaces the
  socket's), and with it whether the client is trusted, and admission (the
  per-client limit, which a trusted client skips).
- The screening's decisions are screen.py's; this module carries them out.
  A client whose greeting test passed before is greeted without the delay,
  one that talked early before is refused at once.  The DNSBL lookups run
  during the delay; the greeting waits for them (bounded by the resolver's
  timeout) and a blocked client is refused instead of greeted.
- The milters hear of a client only once it has passed the screening
  (``_greet``), as Postfix's smtpd's milters only see what postscreen let
  through.
- A PROXY header from anyone not trusted is refused: it would let a client
  choose the address it is judged by.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Callable

from .events import Reply
from .phase import Phase
from .metrics import REFUSED_PER_IP
from .proxy import ProxyHeaderError, looks_like_proxy_header, parse_proxy_header
from .dnsbl import Score
from .stages import StepCall, StepRun, Verdict

if TYPE_CHECKING:
    from .protocol import SMTPProtocol

__all__ = ["Opening", "EARLY_TALKER", "UNTRUSTED_PROXY"]

log = logging.getLogger("fastsmtp")

UNTRUSTED_PROXY = Reply(554, "5.7.0", "Error: PROXY header from an untrusted address")
EARLY_TALKER = Reply(554, "5.5.0", "Error: SMTP protocol synchronization, talking before the greeting")


class Opening:
    """The pre-greeting part of one connection."""

    __slots__ = ("_conn", "_proxy_buf", "_step", "check_proxy", "_dnsbl", "_waiting")

    def __init__(self, conn: SMTPProtocol) -> None:
        self._conn = conn
        self._proxy_buf = b""
        self._step: StepRun | None = None
        #: The DNSBL lookups in flight, and whether the delay is over and
        #: only they are awaited.
        self._dnsbl: asyncio.Task[Score] | None = None
        self._waiting = False
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
        conn.server.screen.talked_early(conn.peer)
        self.cancel()
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
        if self._dnsbl is not None:
            self._dnsbl.cancel()
            self._dnsbl = None

    def _proxy_timeout(self) -> None:
        log.warning("no PROXY header from %s in time", self._conn.peer)
        self._conn.abort()

    def _admit(self) -> None:
        """The per-client limit, with the client's own address, then on_connect."""
        conn = self._conn
        server = conn.server
        conn.trusted = conn.peer in server.trusted
        refusal, key = server.admit(conn.peer, conn.trusted)
        if refusal is not None:
            server.meter.connection_refused(REFUSED_PER_IP)
            server.meter.screened("limit")
            log.info("screen: %s over the limit of %d connections", conn.peer, server.config.max_connections_per_ip)
            # A TLS client could not read plain text.
            conn.refuse(None if conn.implicit_tls else refusal)
            return
        conn.client_key = key
        server.meter.connection_accepted()
        calls = server.stages.on_connect
        if calls:
            self._think(calls, self._welcome)
        else:
            self._welcome()

    def _think(self, calls: tuple[StepCall, ...], then: Callable[[], None]) -> None:
        """Stages before the greeting (on_connect, the milters' connect), in the CONNECT phase; on a pass, ``then``.

        What the client says meanwhile is held, as for any stage (bounded),
        and read once they have answered.
        """
        conn = self._conn
        conn.enter(Phase.CONNECT)
        self._step = StepRun(calls, (conn.peer,), conn.peer, lambda verdict: self._thought(verdict, then))
        verdict = self._step.start()
        if verdict is None:
            conn.flow.hold("stage")  # the answer comes to _thought
            return
        self._step = None
        if verdict.reply is not None:
            conn.refuse(verdict.reply)
            return
        then()

    def _thought(self, verdict: Verdict, then: Callable[[], None]) -> None:
        """The stages' late answer: go on, or refuse instead of the greeting."""
        self._step = None
        conn = self._conn
        if not conn.is_open():
            return  # closed meanwhile (the client's EOF, a shutdown)
        conn.flow.release("stage")
        if verdict.reply is not None:
            conn.refuse(verdict.reply)
            return
        then()
        conn.release_held()

    def _welcome(self) -> None:
        conn = self._conn
        screen = conn.server.screen
        if conn.trusted:
            screen.meter.screened("trusted")
            self._greet()
            return
        peer = conn.peer
        test = screen.delay > 0 and not conn.implicit_tls  # a TLS client cannot talk early in plain text
        if test:
            remembered = screen.remembered(peer)
            if remembered == "fail":
                screen.meter.screened("early_talker_remembered")
                log.info("screen: early talker %s refused (remembered)", peer)
                conn.refuse(EARLY_TALKER)
                return
            if remembered == "pass":
                screen.meter.screened("remembered")
                test = False
        if screen.dnsbl is not None:
            score = screen.dnsbl.cached(peer)
            if score is None:
                self._dnsbl = asyncio.get_running_loop().create_task(screen.dnsbl.score(peer))
                self._dnsbl.add_done_callback(self._scored)
            elif self._refused(score):
                return
        if test:
            conn.enter(Phase.GREETING, screen.delay, self._delay_over)
        elif self._dnsbl is not None:
            # Only the lookups are awaited: still no talking before the greeting.
            self._waiting = True
            conn.enter(Phase.GREETING)
        else:
            self._greet()

    def _delay_over(self) -> None:
        """The client waited out the delay: the test is passed; greet, or wait for the DNSBLs."""
        conn = self._conn
        conn.server.screen.greeting_passed(conn.peer)
        if self._dnsbl is not None:
            self._waiting = True
            return
        self._greet()

    def _scored(self, task: asyncio.Task[Score]) -> None:
        if task is not self._dnsbl:
            return  # cancelled: the client talked early or left
        self._dnsbl = None
        conn = self._conn
        if task.cancelled() or not conn.is_open():
            return
        exc = task.exception()
        if exc is not None:
            # score() turns every DNS failure into "not listed"; anything
            # else is a bug, logged, and the client is not held up by it.
            log.error("screen: DNSBL lookup for %s failed: %r", conn.peer, exc)
            score = Score(0)
        else:
            score = task.result()
        if self._refused(score) or not self._waiting:
            return  # refused, or the greeting delay still runs
        self._greet()

    def _greet(self) -> None:
        """The screening is passed: the milters hear of the client, then 220.

        As Postfix's smtpd after postscreen: a client the screening refuses
        never costs a milter conversation.  While the milters think, what
        the client says is held, as for any stage.
        """
        conn = self._conn
        milters = conn.server.milters
        if not milters.active:
            conn.greet()
            return
        conn.milters = milters.session(conn.tls_macros)
        self._think((StepCall("milter on_connect", conn.milters.connect, True, None),), conn.greet)

    def _refused(self, score: Score) -> bool:
        conn = self._conn
        screen = conn.server.screen
        if score.failed:
            screen.meter.dnsbl_failures(score.failed)
        refusal = screen.judge(conn.peer, score)
        if refusal is not None:
            self.cancel()
            conn.refuse(None if conn.implicit_tls else refusal)
            return True
        conn.allowlisted = score.total < 0
        return False
