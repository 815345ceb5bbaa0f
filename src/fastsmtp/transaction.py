"""One mail transaction: a message from its MAIL command to its final reply.

Rules of this module:
- A ``Transaction`` owns everything of one message: the recipients'
  mailboxes (in RCPT order, each once), the spool its content goes to, its
  clocks (started, data started, data ended, the minimum-rate check), its
  log line and its counters.  The connection (protocol.py) makes a new one
  at each MAIL and asks it questions; it never reaches into its fields.
- The message goes to the store (store.py) and the transaction awaits its
  future; ``250`` is built only from a future that resolved (DESIGN.md
  principle 1).  A failed or cancelled future is ``451 4.3.0``.
- Once submitted, the message belongs to the store: a client that leaves
  does not undo it (a duplicate, never a loss: RFC 1047).  Before that,
  ``discard()`` drops it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import TYPE_CHECKING, Callable

from ._abnf import parse_mail_argument, parse_rcpt_argument
from .errors import LocalProtocolError, StorageError
from .events import Address, Reply
from .hooks import MessageInfo
from .policy import is_maildir, no_domain_name, relay_denied
from .store import MessageSpool
from .trace import return_path

if TYPE_CHECKING:
    from .auth.stage import MessageAuth
    from .milter.edits import Edited
    from .server import Server
    from .session import Session

__all__ = ["Transaction", "RCPT_OK", "STORAGE_FAILED", "DATA_RATE_ALLOWANCE"]

log = logging.getLogger("fastsmtp")

RCPT_OK = Reply(250, "2.1.5", "Ok")
STORAGE_FAILED = Reply(451, "4.3.0", "Error: local storage failure, try again later")
# Data a client may send before its rate is judged (smtpd_min_data_rate
# works on the same idea): 16 KiB is a header block and the start of a body.
DATA_RATE_ALLOWANCE = 16 * 1024


class Transaction:
    """The message of one MAIL ... end-of-data (or BDAT LAST) exchange."""

    __slots__ = (
        "_server", "_loop", "_session", "_peer", "_too_slow", "mailboxes", "spool", "started",
        "data_started", "data_ended", "_octets", "size", "_rate_timer", "auth", "_sink", "greylisted",
        "_sender",
    )

    def __init__(
        self, server: Server, loop: asyncio.AbstractEventLoop, session: Session, peer: str,
        too_slow: Callable[[], None],
    ) -> None:
        self._server = server
        self._loop = loop
        self._session = session
        self._peer = peer
        # Called when the data trickles in below --min-data-rate: the
        # connection says 421 and closes.
        self._too_slow = too_slow
        self.mailboxes: list[str] = []
        self.spool: MessageSpool | None = None
        self.started = loop.time()
        self.data_started = 0.0
        self.data_ended = 0.0
        # Octets received from the network since the content began.
        self._octets = 0
        #: Content octets of the finished message, as the session counted them.
        self.size = 0
        self._rate_timer: asyncio.TimerHandle | None = None
        #: The authentication checks (auth/stage.py), None when none run.
        self.auth: MessageAuth | None = None
        # Where content goes: the spool, or the checks' tap in front of it.
        self._sink: Callable[[bytes], None] | None = None
        #: Whether its recipients are greylisted (screen.py): set at MAIL for
        #: a client that is neither trusted nor allow-listed.
        self.greylisted = False
        # A milter's new sender (SMFIR_CHGFROM); None: the client's.
        self._sender: bytes | None = None

    # -- recipients ---------------------------------------------------------------

    def check_recipient(self, address: Address) -> str | Reply:
        """The folder check (and greylisting) for one RCPT: its mailbox, or its refusal."""
        return self.screened_recipient(address, self._server.recipients.resolve(address))

    def screened_recipient(self, address: Address, found: str | Reply) -> str | Reply:
        """After the check of the store (a folder, or the LMTP backend): greylisting, and the counts."""
        if isinstance(found, Reply):
            self._server.meter.recipient_refused(found.code)
            return found
        if self.greylisted:
            # After the folder check: an unknown user is told 550 at once
            # and leaves no triplet behind.
            sender = self._session.envelope.mail_from
            refusal = self._server.screen.greylist(
                self._peer, _address_text(sender.raw) if sender is not None else "", _address_text(address.raw))
            if refusal is not None:
                self._server.meter.recipient_refused(refusal.code)
                return refusal
        return found

    def take_recipient(self, mailbox: str) -> Reply:
        """A recipient that passed every check: its mailbox gets the message."""
        self._server.meter.recipient_accepted()
        if mailbox not in self.mailboxes:
            # user+a and user+b are one mailbox: one copy (RFC 5321 §3.3 allows it).
            self.mailboxes.append(mailbox)
        return RCPT_OK

    # -- content ------------------------------------------------------------------

    def open(self, tls: str | None) -> None:
        """The content begins (354 sent, or the first BDAT): a spool with the trace headers."""
        self.data_started = self._loop.time()
        self._octets = 0
        if self._server.config.min_data_rate:
            self._rate_timer = self._loop.call_later(1.0, self._check_rate)
        spool = self._server.store.open_spool(self.mailboxes[0])
        session = self._session
        env = session.envelope
        spool.write(
            self._server.trace.render(
                sender=env.mail_from.raw if env.mail_from is not None else b"",
                helo=session.helo,
                peer=self._peer,
                esmtp=session.esmtp,
                smtputf8=env.smtputf8,
                tls=tls,
                queue_id=spool.queue_id,
                recipients=[r.raw for r in env.rcpt_to],
            )
        )
        self.spool = spool
        self._sink = self.auth.tap(spool.write).write if self.auth is not None else spool.write

    @property
    def receiving(self) -> bool:
        """Whether the content has begun and not ended (a spool is open)."""
        return self.spool is not None

    def received(self, n: int) -> None:
        """``n`` octets arrived from the network (the minimum-rate check counts them)."""
        if self.spool is not None:
            self._octets += n

    def write(self, content: bytes) -> None:
        """Unstuffed content for the spool (through the checks' tap, when they run)."""
        assert self._sink is not None
        self._sink(content)

    def discard(self) -> None:
        """Drop the content (RSET between BDAT chunks, a refused chunk, a lost client)."""
        self._stop_clock()
        if self.auth is not None:
            self.auth.abandon()
        if self.spool is not None:
            self.spool.discard()
            self.spool = None

    def _check_rate(self) -> None:
        """Cut off a message whose data trickles in (a slow-drip attack holds
        a connection for hours within any idle timeout): Postfix's
        smtpd_min_data_rate."""
        elapsed = self._loop.time() - self.data_started
        allowed = (self._octets + DATA_RATE_ALLOWANCE) / self._server.config.min_data_rate
        if elapsed > allowed:
            self._rate_timer = None
            log.info("%s: message data too slow (%d octets in %.0f s)", self._peer, self._octets, elapsed)
            self.discard()
            self._too_slow()
            return
        self._rate_timer = self._loop.call_later(1.0, self._check_rate)

    def _stop_clock(self) -> None:
        if self._rate_timer is not None:
            self._rate_timer.cancel()
            self._rate_timer = None

    # -- the end ------------------------------------------------------------------

    def info(self, size: int) -> MessageInfo:
        """What the message stages see: the envelope and size, never the content."""
        assert self.spool is not None
        env = self._session.envelope
        auth = self.auth.results if self.auth is not None else None
        return MessageInfo(self.spool.queue_id, env.mail_from, tuple(env.rcpt_to), size, auth)

    def quarantine(self) -> None:
        """Deliver into each mailbox's ``.Junk`` folder, where it has one (Maildir++)."""
        self.mailboxes = [_junk(m) for m in self.mailboxes]

    def rewrite(self, edited: Edited) -> bool:
        """A milter's changes, made to what will be stored (and journaled) before the 250.

        The recipients first: removed ones leave; added ones are looked up
        as a RCPT would be, and only a local mailbox can take one (we relay
        for no one: any other is logged and not delivered).  Then, when a
        field, the body or the sender changed, the message is copied into a
        new spool: the Return-Path of the sender, the edited fields and the
        body (the milter's, or the original read back in 64 KiB pieces; a
        message is never held whole).  False when no recipient is left.
        """
        if edited.changes_recipients:
            self.mailboxes = self._recipients_after(edited)
            if not self.mailboxes:
                return False
        env = self._session.envelope
        original = env.mail_from.raw if env.mail_from is not None else b""
        sender = self._sender_after(*edited.sender) if edited.sender is not None else None
        if sender is not None:
            self._sender = sender
        spool = self.spool
        if spool is None or not (edited.header_changed or edited.body is not None or sender is not None):
            return True
        new = self._server.store.open_spool(self.mailboxes[0])
        new.write(return_path(original if sender is None else sender))
        if edited.header_changed or edited.body is not None:
            new.write(edited.header_section() + b"\r\n")
            if edited.body is not None:
                for chunk in edited.body:
                    new.write(chunk)
            else:
                _copy(spool, new, edited.body_at)
        else:
            # Only the sender: our first line is its Return-Path; the rest stays as it is.
            _copy(spool, new, len(return_path(original)))
        spool.discard()
        self.spool = new
        return True

    def _recipients_after(self, edited: Edited) -> list[str]:
        backend = self._server.backend
        # With LMTP the backend answers at delivery for a recipient a milter added.
        resolve = backend.target if backend is not None else self._server.recipients.resolve
        removed = set(edited.removed)
        mailboxes: list[str] = []
        for address in self._session.envelope.rcpt_to:
            if _address_text(address.raw).lower() in removed:
                continue
            found = resolve(address)
            if isinstance(found, str) and found not in mailboxes:
                mailboxes.append(found)
        for text, _params in edited.added:
            try:
                address, _ = parse_rcpt_argument(b" TO:<" + text.encode("utf-8") + b">")
            except LocalProtocolError:
                log.warning("%s: a milter added the recipient %r, not an address: not delivered", self._peer, text)
                continue
            found = relay_denied(address) if no_domain_name(address.domain) else resolve(address)
            if isinstance(found, Reply):
                log.warning("%s: a milter added the recipient <%s>, which is not local (%d %s): not delivered",
                            self._peer, text, found.code, found.enhanced)
            elif found not in mailboxes:
                mailboxes.append(found)
        if edited.removed or edited.added:
            log.info("%s: a milter changed the recipients: %d mailbox(es) now", self._peer, len(mailboxes))
        return mailboxes

    def _sender_after(self, text: str, params: str) -> bytes | None:
        """The reverse-path a milter gave (SMFIR_CHGFROM), or None when it is no address."""
        try:
            address, _ = parse_mail_argument(b" FROM:<" + text.encode("utf-8") + b">")
        except LocalProtocolError:
            log.warning("%s: a milter gave the sender %r, not an address: kept the client's", self._peer, text)
            return None
        sender = address.raw if address is not None else b""
        log.info("%s: a milter changed the sender to <%s>", self._peer, _address_text(sender))
        return sender

    def refuse(self, reply: Reply, size: int) -> Reply:
        """The end of data, refused (too big, bare LF, a stage): nothing is stored."""
        self.size = size
        self._stop_clock()
        spool, self.spool = self.spool, None
        queue_id = ""
        if spool is not None:
            queue_id = spool.queue_id
            spool.discard()
        if self.auth is not None:
            self.auth.abandon()
        self.log(queue_id, reply.code)
        self._server.meter.message_refused(reply.code)
        return reply

    def discarded(self, size: int, why: str = "discarded by a milter") -> Reply:
        """A milter's discard: the client hears 250 as for any message, and nothing is stored."""
        self.size = size
        self._stop_clock()
        spool, self.spool = self.spool, None
        queue_id = spool.queue_id if spool is not None else ""
        if spool is not None:
            spool.discard()
        if self.auth is not None:
            self.auth.abandon()
        log.info("message %s from %s %s", queue_id, self._peer, why)
        self.log(queue_id, 250)
        return Reply(250, "2.0.0", f"Ok: queued as {queue_id}")

    def submit(self, size: int, headers: bytes) -> tuple[str, "asyncio.Future[str]"]:
        """Hand the finished message to the store: (queue id, its future)."""
        self.size = size
        self._stop_clock()
        spool, self.spool = self.spool, None
        assert spool is not None
        if headers:
            spool.prepend(headers)
        self.data_ended = self._loop.time()
        sender = self._sender
        if sender is None:
            mail_from = self._session.envelope.mail_from
            sender = mail_from.raw if mail_from is not None else b""
        return spool.queue_id, self._server.store.submit(spool, self.mailboxes, sender)

    def committed(self, queue_id: str, future: "asyncio.Future[str]") -> Reply:
        """The store's answer as the reply to the end of data; counted and logged."""
        reply = STORAGE_FAILED
        if not future.cancelled():
            exc = future.exception()
            if exc is None:
                reply = Reply(250, "2.0.0", f"Ok: queued as {queue_id}")
            elif not isinstance(exc, StorageError):
                log.error("commit failed unexpectedly: %r", exc)
        # A message counts as accepted once stored, even when its client
        # has left and never reads the 250.
        if reply is STORAGE_FAILED:
            self._server.meter.message_refused(reply.code)
        else:
            self._server.meter.message_accepted(self.size)
        self.log(queue_id, reply.code)
        return reply

    def log(self, queue_id: str, code: int) -> None:
        """One line per message, accepted or refused at its end; never its content."""
        events = self._server.log
        if not events.enabled:
            return
        session = self._session
        env = session.envelope
        events.message(
            "queued" if code < 400 else "refused",
            queue_id,
            self._peer,
            session.helo or b"",
            env.mail_from.raw if env.mail_from is not None else b"",
            [r.raw for r in env.rcpt_to],
            self.size,
            code,
            round((self._loop.time() - self.started) * 1000),
            self.auth.summary if self.auth is not None else (),
        )


def _copy(source: MessageSpool, target: MessageSpool, offset: int) -> None:
    """What ``source`` holds from ``offset`` on, appended to ``target`` in 64 KiB pieces."""
    while True:
        piece = source.read(offset, 65536)
        if not piece:
            return
        target.write(piece)
        offset += len(piece)


def _junk(maildir: str) -> str:
    """``MAILDIR/.Junk`` when it is a Maildir (Maildir++ subfolder), else ``maildir``."""
    junk = os.path.join(maildir, ".Junk")
    return junk if is_maildir(junk) else maildir


def _address_text(raw: bytes) -> str:
    # SMTPUTF8 addresses are UTF-8 (RFC 6531).  Invalid octets become
    # U+FFFD: a stable key that SQLite can store (a lone surrogate could
    # not be encoded).
    return raw.decode("utf-8", "replace")
