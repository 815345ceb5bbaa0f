"""What each SMTP command does: its reply, now or once its work is done.

Rules of this module:
- A handler gets one event that the session has already vetted (order and
  syntax) and answers its ``Reply``, or ``None`` when the reply waits for
  slow work: an async stage, or the store's commit.  The connection then
  holds reading under that work's name ("stage", "commit") and the late
  reply goes out through ``SMTPProtocol.answer``.
- The current message is a ``Transaction`` (transaction.py), made at each
  MAIL and ended by its final reply, RSET, or an accepted HELO/EHLO.
- The stages (stages.py) are asked at HELO/EHLO, MAIL, RCPT and the end of
  data, in that order of the session; a stage's refusal is the reply, its
  "continue" lets the server's own check decide (a recipient still needs
  a Maildir).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Callable

from .events import (
    Data,
    Ehlo,
    EndOfChunk,
    EndOfMessage,
    Event,
    Helo,
    Help,
    MailFrom,
    Noop,
    Quit,
    RcptTo,
    Reply,
    Rset,
    StartTLS,
    Vrfy,
)
from .hooks import SessionInfo
from .stages import StepCall, StepRun, Verdict
from .transaction import STORAGE_FAILED, Transaction

if TYPE_CHECKING:
    from .protocol import SMTPProtocol

__all__ = ["Handlers", "OK", "BYE"]

OK = Reply(250, "2.0.0", "Ok")
MAIL_OK = Reply(250, "2.1.0", "Ok")
START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
VRFY_REPLY = Reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")
HELP_REPLY = Reply(214, "2.0.0", "Commands: HELO EHLO MAIL RCPT DATA RSET NOOP VRFY HELP QUIT")
BYE = Reply(221, "2.0.0", "Bye")
READY_FOR_TLS = Reply(220, "2.0.0", "Ready to start TLS")

Then = Callable[[Verdict], "Reply | None"]


class Handlers:
    """The command handlers of one connection, and the message in progress."""

    __slots__ = ("_conn", "_server", "_loop", "table", "txn", "step", "committing", "messages")

    def __init__(self, conn: SMTPProtocol, loop: asyncio.AbstractEventLoop) -> None:
        self._conn = conn
        self._server = conn.server
        self._loop = loop
        #: Event type -> handler; MessageChunk, Bdat and ConnectionClosed owe
        #: no reply and are routed by the connection itself.
        self.table: dict[type[Event], Callable[..., Reply | None]] = {
            Helo: self._on_helo, Ehlo: self._on_ehlo, MailFrom: self._on_mail, RcptTo: self._on_rcpt,
            Data: self._on_data, EndOfMessage: self._on_end_of_message, EndOfChunk: self._on_end_of_chunk,
            StartTLS: self._on_starttls, Rset: self._on_rset,
            Noop: lambda e: OK, Vrfy: lambda e: VRFY_REPLY, Help: lambda e: HELP_REPLY, Quit: lambda e: BYE,
        }
        #: The message in progress, the stage step being awaited, whether a
        #: commit is being awaited, and the messages stored so far.
        self.txn: Transaction | None = None
        self.step: StepRun | None = None
        self.committing = False
        self.messages = 0

    @property
    def busy(self) -> bool:
        """Whether a transaction has started its content, or work is awaited."""
        return self.committing or self.step is not None or (self.txn is not None and self.txn.receiving)

    def begin_content(self) -> None:
        """DATA's 354, or the first BDAT chunk: the content goes to a spool now."""
        assert self.txn is not None
        self.txn.open(self._conn.tls_info)

    def end_transaction(self) -> None:
        if self.txn is not None:
            self.txn.discard()
            self.txn = None
            if self._conn.milters is not None:
                self._conn.milters.abort()

    def lost(self) -> None:
        """The client is gone: stop asking, and drop a message not yet submitted."""
        if self.step is not None:
            self.step.cancel()
            self.step = None
        if self.txn is not None and not self.committing:
            self.txn.discard()

    # -- stages ------------------------------------------------------------------

    def _info(self) -> SessionInfo:
        session = self._conn.session
        env = session.envelope
        helo = _text(session.helo or b"")
        return SessionInfo(self._conn.peer, helo, session.tls, env.mail_from, tuple(env.rcpt_to))

    def _ask(self, calls: tuple[StepCall, ...], args: tuple[object, ...], then: Then) -> Reply | None:
        """Run one step's stages, then ``then`` with the verdict; None: the reply comes later.

        While an async stage thinks, reading is held under "stage": the
        session owes its reply meanwhile, so pipelined commands wait in the
        buffer, in order.
        """
        run = StepRun(calls, args, self._conn.peer, lambda verdict: self._answered(then, verdict))
        verdict = run.start()
        if verdict is not None:
            return then(verdict)
        self.step = run
        self._conn.flow.hold("stage")
        return None

    def _answered(self, then: Then, verdict: Verdict) -> None:
        self.step = None
        if not self._conn.is_open():
            return  # the client was told 421 (idle timeout, shutdown) meanwhile
        reply = then(verdict)
        if self.step is None:  # else ``then`` asked the next step's stages: still held
            self._conn.flow.release("stage")
        if reply is not None:
            self._conn.answer(reply)

    # -- commands ----------------------------------------------------------------

    def _on_helo(self, event: Helo) -> Reply | None:
        return self._hello(event.domain, self._server.helo_reply)

    def _on_ehlo(self, event: Ehlo) -> Reply | None:
        server = self._server
        return self._hello(event.domain, server.ehlo_reply_tls if self._conn.session.tls else server.ehlo_reply)

    def _hello(self, domain: bytes, reply: Reply) -> Reply | None:
        calls = self._server.stages.on_helo
        milters = self._conn.milters
        if milters is not None:
            calls = calls + (StepCall("milter on_helo", milters.helo, True, None),)
        if not calls:
            return self._hello_accepted(reply)
        return self._ask(calls, (self._info(), _text(domain)), lambda v: v.reply or self._hello_accepted(reply))

    def _hello_accepted(self, reply: Reply) -> Reply:
        self.end_transaction()  # HELO/EHLO reset the transaction (RFC 5321 §4.1.4)
        return reply

    def _on_mail(self, event: MailFrom) -> Reply | None:
        conn = self._conn
        # Before any content is sent (RFC 1870 §6.1; space.py).
        no_room = self._server.free_space.refusal(event.size)
        if no_room is not None:
            return no_room
        server = self._server
        txn = self.txn = Transaction(server, self._loop, conn.session, conn.peer, conn.too_slow)
        txn.greylisted = server.screen.greylisting and not conn.trusted and not conn.allowlisted
        calls = server.stages.on_mail
        auth = server.auth.begin(conn.peer, conn.session.helo or b"", event.address)
        if auth is not None:
            txn.auth = auth
            if server.auth.spf_at_mail:
                calls = (StepCall("spf on_mail", auth.at_mail, True, None),) + calls
        if conn.milters is not None:
            calls = calls + (StepCall("milter on_mail", conn.milters.mail, True, None),)
        if not calls:
            return MAIL_OK
        return self._ask(calls, (self._info(), event.address), lambda v: self._mail_answered(txn, v))

    def _mail_answered(self, txn: Transaction, verdict: Verdict) -> Reply:
        if verdict.reply is None:
            return MAIL_OK
        if self.txn is txn:
            self.txn = None
        txn.discard()  # stops its checks
        return verdict.reply

    def _on_rcpt(self, event: RcptTo) -> Reply | None:
        txn = self.txn
        assert txn is not None
        calls = self._server.stages.on_rcpt
        if not calls:
            return self._rcpt_checked(txn, event)
        return self._ask(calls, (self._info(), event.address), lambda v: v.reply or self._rcpt_checked(txn, event))

    def _rcpt_checked(self, txn: Transaction, event: RcptTo) -> Reply | None:
        """The store's check (a folder, or the LMTP backend's word), then greylisting, then the milters."""
        backend = self._server.backend
        if backend is None:
            return self._rcpt_found(txn, event, self._server.recipients.resolve(event.address))
        call = (StepCall("lmtp recipient check", backend.check, True, None),)
        return self._ask(call, (event.address,),
                         lambda v: self._rcpt_found(txn, event, v.reply or backend.target(event.address)))

    def _rcpt_found(self, txn: Transaction, event: RcptTo, found: str | Reply) -> Reply | None:
        """As in Postfix, a milter hears only of recipients we would take."""
        found = txn.screened_recipient(event.address, found)
        if isinstance(found, Reply):
            return found
        milters = self._conn.milters
        if milters is None:
            return txn.take_recipient(found)
        call = (StepCall("milter on_rcpt", milters.rcpt, True, None),)
        return self._ask(call, (self._info(), event.address), lambda v: v.reply or txn.take_recipient(found))

    def _on_data(self, event: Data) -> Reply:
        self.begin_content()
        return START_DATA

    def _on_rset(self, event: Rset) -> Reply:
        self.end_transaction()  # RSET between BDAT chunks abandons the message
        return OK

    def _on_starttls(self, event: StartTLS) -> Reply:
        self._conn.upgrade_after_reply()
        return READY_FOR_TLS

    def _on_end_of_chunk(self, event: EndOfChunk) -> Reply:
        if event.refusal is not None:
            self.end_transaction()
            self._server.meter.message_refused(event.refusal.code)
            return event.refusal
        return Reply(250, "2.0.0", f"{event.size} octets received")

    # -- the end of a message ------------------------------------------------------

    def _on_end_of_message(self, event: EndOfMessage) -> Reply | None:
        txn = self.txn
        assert txn is not None
        if event.refusal is not None or not txn.receiving:
            return self._end_message(txn, event, None)
        auth = txn.auth
        if auth is not None:
            # Authentication first: its results are what the later stages
            # (the policy's on_message) see.
            # Bounded by --auth-timeout; inline (no task) when every answer is cached.
            call = StepCall("authentication", auth.finish, True, None, eager=auth.ready())
            return self._ask((call,), (), lambda v: self._authenticated(txn, event, v))
        return self._stages_at_end(txn, event, None)

    def _authenticated(self, txn: Transaction, event: EndOfMessage, verdict: Verdict) -> Reply | None:
        if verdict.reply is not None:
            return self._end_message(txn, event, verdict)
        if txn.auth is not None and txn.auth.quarantine:
            txn.quarantine()
        return self._stages_at_end(txn, event, verdict)

    def _stages_at_end(self, txn: Transaction, event: EndOfMessage, before: Verdict | None) -> Reply | None:
        calls = self._server.stages.on_message
        milters = self._conn.milters
        if milters is not None and txn.spool is not None and event.refusal is None:
            spool = txn.spool
            calls = calls + (StepCall("milter on_message", lambda info, message: milters.message(spool), True,
                                      None),)
        if not calls:
            return self._end_message(txn, event, before)
        # The spool stays ours while the stages think: a client leaving
        # meanwhile has it discarded (lost()).
        return self._ask(
            calls, (self._info(), txn.info(event.size)), lambda v: self._end_message(txn, event, _above(v, before))
        )

    def _end_message(self, txn: Transaction, event: EndOfMessage, verdict: Verdict | None) -> Reply | None:
        refusal = event.refusal or (verdict.reply if verdict is not None else None)
        if refusal is None and not txn.receiving:
            refusal = STORAGE_FAILED  # its content was dropped on the way (never expected)
        milters = self._conn.milters
        if refusal is not None:
            self.txn = None
            if milters is not None:
                milters.abort()
            return txn.refuse(refusal, event.size)
        if milters is not None and milters.discard:
            # A milter's discard: the client is told it is queued; nothing is stored.
            self.txn = None
            return txn.discarded(event.size)
        if milters is not None and milters.rewrite is not None and not txn.rewrite(milters.rewrite):
            self.txn = None
            return txn.discarded(event.size, "left without recipients by a milter")
        if milters is not None and milters.quarantine is not None:
            txn.quarantine()
            verdict = Verdict(None, _quarantined(milters.quarantine) + (verdict.headers if verdict else b""))
        queue_id, future = txn.submit(event.size, verdict.headers if verdict is not None else b"")
        self.committing = True
        self._conn.flow.hold("commit")
        future.add_done_callback(lambda f: self._committed(txn, queue_id, f))
        return None

    def _committed(self, txn: Transaction, queue_id: str, future: "asyncio.Future[str]") -> None:
        self.committing = False
        if self.txn is txn:
            self.txn = None
        reply = txn.committed(queue_id, future)
        if reply.code < 400:
            self.messages += 1
        conn = self._conn
        if not conn.attached():
            return  # the client left; the message (if stored) stays stored
        if reply is not STORAGE_FAILED:
            # The reply is written in this same callback.
            self._server.meter.time_to_250(self._loop.time() - txn.data_ended)
        conn.flow.release("commit")
        conn.answer(reply)


def _above(later: Verdict, earlier: Verdict | None) -> Verdict:
    """A later stage's verdict, with an earlier one's headers below its own."""
    if earlier is None or not earlier.headers or later.reply is not None:
        return later
    return Verdict(None, later.headers + earlier.headers)


def _quarantined(reason: str) -> bytes:
    clean = "".join(c if " " <= c <= "~" else " " for c in reason)[:200]
    return f"X-Quarantine: {clean} (milter)\r\n".encode()


def _text(raw: bytes) -> str:
    """Client octets for a stage: UTF-8 (RFC 6531), anything else replaced."""
    return raw.decode("utf-8", "replace")
