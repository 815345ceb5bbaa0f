"""asyncio glue: sockets in, ``Session`` events through policy and writer, replies out.

Rules of this module:
- The glue is short and boring.  ``NEED_DATA`` ends a round and flushes
  every reply of that round in one write (RFC 2920 pipelining); ``PAUSED``
  means a reply waits for slow work (a group commit), and reading pauses
  until it comes.
- Nothing here blocks the loop.  Durable I/O belongs to ``MaildirWriter``'s
  thread; ``250`` after end-of-data is sent only when its future resolves.
- Protocol decisions belong to the session; recipient decisions to the
  policy; this module only connects them.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import time
from email.utils import formatdate
from typing import Callable, cast

from .config import Config
from .errors import RemoteProtocolError, StorageError
from .events import (
    ConnectionClosed,
    Data,
    Ehlo,
    EndOfMessage,
    Event,
    Helo,
    Help,
    MailFrom,
    MessageChunk,
    Noop,
    Quit,
    RcptTo,
    Reply,
    Rset,
    Vrfy,
)
from .maildir import MaildirWriter, Spool
from .policy import FolderRecipients
from .session import CLOSED, DATA, NEED_DATA, PAUSED, Limits, Session

__all__ = ["Server", "SMTPProtocol", "trace_headers"]

log = logging.getLogger("fastsmtp")

OK = Reply(250, "2.0.0", "Ok")
MAIL_OK = Reply(250, "2.1.0", "Ok")
RCPT_OK = Reply(250, "2.1.5", "Ok")
START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
VRFY_REPLY = Reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")
HELP_REPLY = Reply(214, "2.0.0", "Commands: HELO EHLO MAIL RCPT DATA RSET NOOP VRFY HELP QUIT")
BYE = Reply(221, "2.0.0", "Bye")
STORAGE_FAILED = Reply(451, "4.3.0", "Error: local storage failure, try again later")
IDLE_TIMEOUT = Reply(421, "4.4.2", "Error: timeout exceeded")
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, try again later")


class Server:
    """What all connections of one worker share: config, replies, policy, writer."""

    def __init__(self, config: Config, writer: MaildirWriter) -> None:
        self.config = config
        self.writer = writer
        self.recipients = FolderRecipients(config.mail_root, config.recipient_delimiter)
        self.limits = Limits(
            max_command_line=config.max_command_line,
            max_message_size=config.max_message_size,
            max_recipients=config.max_recipients,
            max_errors=config.max_errors,
            bare_lf=config.bare_lf,
        )
        name = config.hostname
        self.greeting = Reply(220, "", f"{name} ESMTP fastsmtp")
        self.helo_reply = Reply(250, "", name)
        # RFC 1869 §4.3: keywords after the greeting line; RFC 1870 SIZE,
        # RFC 2920 PIPELINING, RFC 6152 8BITMIME, RFC 6531 SMTPUTF8,
        # RFC 2034 ENHANCEDSTATUSCODES.
        self.ehlo_reply = Reply(
            250,
            "",
            "\n".join(
                [
                    name,
                    "PIPELINING",
                    f"SIZE {config.max_message_size}",
                    "8BITMIME",
                    "SMTPUTF8",
                    "ENHANCEDSTATUSCODES",
                ]
            ),
        )
        self.hostname = name.encode("ascii", "replace")
        self.connections: set[SMTPProtocol] = set()
        self.closing = False

    def protocol_factory(self) -> "SMTPProtocol":
        return SMTPProtocol(self)

    def begin_shutdown(self) -> None:
        """Say 421 to idle sessions; transactions in progress finish first."""
        self.closing = True
        for conn in list(self.connections):
            conn.shutdown()


class SMTPProtocol(asyncio.Protocol):
    """One SMTP connection."""

    def __init__(self, server: Server) -> None:
        self._server = server
        self._loop = asyncio.get_running_loop()
        self._session = Session(server.limits)
        self._handlers: dict[type[Event], Callable[..., Reply | None]] = {
            Helo: self._on_helo,
            Ehlo: self._on_ehlo,
            MailFrom: self._on_mail,
            RcptTo: self._on_rcpt,
            Data: self._on_data,
            EndOfMessage: self._on_end_of_message,
            Rset: _constant(OK),
            Noop: _constant(OK),
            Vrfy: _constant(VRFY_REPLY),
            Help: _constant(HELP_REPLY),
            Quit: _constant(BYE),
        }
        self._transport: asyncio.Transport | None = None
        self._peer = "unknown"
        # The current transaction's Maildirs, in RCPT order; a new list at
        # each accepted MAIL (a transaction always starts there).
        self._maildirs: list[str] = []
        self._spool: Spool | None = None
        self._committing = False
        self._write_paused = False
        self._read_paused = False
        self._last_read = 0.0
        self._timer: asyncio.TimerHandle | None = None

    # -- connection lifecycle ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        peer = transport.get_extra_info("peername")
        if peer:
            self._peer = str(peer[0])
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Replies are small and already batched: send them at once.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._server.connections.add(self)
        if self._server.closing:
            transport.write(SHUTTING_DOWN.encoded)
            transport.close()
            return
        transport.write(self._server.greeting.encoded)
        self._last_read = self._loop.time()
        self._timer = self._loop.call_later(self._server.config.idle_timeout, self._on_timer)

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        # A message already submitted still commits; its 250 is lost and the
        # client may send it again (a duplicate, never a loss: RFC 1047).
        if self._spool is not None and not self._committing:
            self._spool.discard()
        self._spool = None
        self._transport = None

    def data_received(self, data: bytes) -> None:
        self._last_read = self._loop.time()
        self._session.receive_data(data)
        self._process()

    def eof_received(self) -> bool:
        self._session.receive_data(b"")
        self._process()
        return False

    # -- flow control (idempotent, as uvicorn's FlowControl) ----------------

    def pause_writing(self) -> None:
        self._write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._update_reading()

    def _update_reading(self) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        want_pause = self._write_paused or self._committing
        if want_pause and not self._read_paused:
            self._read_paused = True
            transport.pause_reading()
        elif not want_pause and self._read_paused:
            self._read_paused = False
            transport.resume_reading()

    # -- the event loop of one connection -------------------------------------

    def _process(self, out: list[bytes] | None = None) -> None:
        session = self._session
        if out is None:
            out = []
        handlers = self._handlers
        while True:
            try:
                event = session.next_event()
            except RemoteProtocolError as exc:
                out.append(session.send(exc.reply))
                if session.state is CLOSED:
                    break
                continue
            if event is NEED_DATA or event is PAUSED:
                break
            kind = type(event)
            if kind is MessageChunk:
                assert self._spool is not None
                self._spool.write(event.data)  # type: ignore[union-attr]
                continue
            if kind is ConnectionClosed:
                self._close()
                break
            reply = handlers[kind](event)
            if reply is None:
                break  # the reply comes when the commit does
            out.append(session.send(reply))
            if session.state is CLOSED:
                break
        transport = self._transport
        if transport is None:
            return
        if out:
            transport.write(b"".join(out))
        if session.state is CLOSED:
            self._close()
        elif self._server.closing and self._idle():
            self._say_goodbye(SHUTTING_DOWN)

    def _close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def _idle(self) -> bool:
        return not self._committing and self._session.state is not DATA and self._spool is None

    # -- handlers: each returns the reply, or None when it comes later ----------

    def _on_helo(self, event: Helo) -> Reply:
        return self._server.helo_reply

    def _on_ehlo(self, event: Ehlo) -> Reply:
        return self._server.ehlo_reply

    def _on_mail(self, event: MailFrom) -> Reply:
        self._maildirs = []
        return MAIL_OK

    def _on_rcpt(self, event: RcptTo) -> Reply:
        found = self._server.recipients.resolve(event.address)
        if isinstance(found, Reply):
            return found
        if found not in self._maildirs:
            # user+a and user+b are one mailbox: one copy (RFC 5321 §3.3 allows it).
            self._maildirs.append(found)
        return RCPT_OK

    def _on_data(self, event: Data) -> Reply:
        spool = self._server.writer.open_spool(self._maildirs[0])
        spool.write(trace_headers(self._server, self._session, self._peer, spool.queue_id))
        self._spool = spool
        return START_DATA

    def _on_end_of_message(self, event: EndOfMessage) -> Reply | None:
        spool, self._spool = self._spool, None
        assert spool is not None
        if event.refusal is not None:
            spool.discard()
            return event.refusal
        future = self._server.writer.submit(spool, self._maildirs)
        self._committing = True
        self._update_reading()
        future.add_done_callback(lambda f: self._on_committed(f, spool))
        return None

    def _on_committed(self, future: asyncio.Future[str], spool: Spool) -> None:
        self._committing = False
        if future.cancelled():
            reply = STORAGE_FAILED
        else:
            exc = future.exception()
            if exc is None:
                reply = Reply(250, "2.0.0", f"Ok: queued as {spool.queue_id}")
            else:
                if not isinstance(exc, StorageError):
                    log.error("commit failed unexpectedly: %r", exc)
                reply = STORAGE_FAILED
        if self._transport is None:
            return  # the client left; the message (if stored) stays stored
        out = [self._session.send(reply)]
        self._update_reading()
        self._process(out)

    # -- timeouts and shutdown ------------------------------------------------

    def _on_timer(self) -> None:
        # Reads only store a timestamp; the timer re-arms for what is left
        # rather than being rescheduled on every chunk.
        timeout = self._server.config.idle_timeout
        left = self._last_read + timeout - self._loop.time()
        if self._committing or left > 0:
            self._timer = self._loop.call_later(max(left, 1.0), self._on_timer)
            return
        self._timer = None
        self._say_goodbye(IDLE_TIMEOUT)

    def shutdown(self) -> None:
        if self._idle():
            self._say_goodbye(SHUTTING_DOWN)
        # Otherwise _process says goodbye once the transaction has ended.

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _say_goodbye(self, reply: Reply) -> None:
        if self._transport is None or self._transport.is_closing():
            return
        self._transport.write(self._session.send(reply))
        self._close()


def _constant(reply: Reply) -> Callable[[Event], Reply]:
    return lambda event: reply


# A HELO argument goes into the Received header: keep it to the characters
# of a domain or address literal, so that nothing a client says can start a
# new header line or break the comment syntax (RFC 5322 §3.6.7).
_UNSAFE_HELO = re.compile(rb"[^A-Za-z0-9.\-_:\[\]]")


def trace_headers(server: Server, session: Session, peer: str, queue_id: str) -> bytes:
    """``Return-Path:`` and ``Received:`` for the message (RFC 5321 §4.4)."""
    env = session.envelope
    sender = env.mail_from.raw if env.mail_from is not None else b""
    helo = _UNSAFE_HELO.sub(b"?", (session.helo or b"unknown")[:255])
    if env.smtputf8:
        protocol = b"UTF8SMTP"  # RFC 6531 §3.7.3
    else:
        protocol = b"ESMTP" if session.esmtp else b"SMTP"
    rcpts = env.rcpt_to
    for_clause = b"\r\n\tfor <" + rcpts[0].raw + b">" if len(rcpts) == 1 else b""
    date = formatdate(time.time(), localtime=True).encode("ascii")
    return b"".join(
        (
            b"Return-Path: <", sender, b">\r\n",
            b"Received: from ", helo, b" ([", peer.encode("ascii", "replace"), b"])\r\n",
            b"\tby ", server.hostname, b" (fastsmtp) with ", protocol,
            b" id ", queue_id.encode("ascii"), for_clause, b";\r\n\t", date, b"\r\n",
        )
    )
