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
import dataclasses
import ipaddress
import logging
import re
import socket
import ssl
import time
from email.utils import formatdate
from typing import Callable, cast

from .config import Config
from .errors import RemoteProtocolError, StorageError
from .events import (
    Bdat,
    ConnectionClosed,
    Data,
    Ehlo,
    EndOfChunk,
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
    StartTLS,
    Vrfy,
)
from . import metrics as counters
from .anvil import AnvilRow, client_key
from .maildir import MaildirWriter, Spool
from .hooks import HOOK_FAILED, NO_HOOKS, Hook, MessageInfo, SessionInfo, load_policy, resolve_hooks
from .policy import FolderRecipients
from .proxy import ProxyHeaderError, looks_like_proxy_header, parse_proxy_header
from .tls import describe, server_context
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
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Error: too many connections, try again later")
READY_FOR_TLS = Reply(220, "2.0.0", "Ready to start TLS")
UNTRUSTED_PROXY = Reply(554, "5.7.0", "Error: PROXY header from an untrusted address")
EARLY_TALKER = Reply(554, "5.5.0", "Error: SMTP protocol synchronization, talking before the greeting")
TOO_SLOW = Reply(421, "4.4.2", "Error: message data arriving too slowly")
# Data a client may send before its rate is judged (smtpd_min_data_rate
# works on the same idea): 16 KiB is a header block and the start of a body.
DATA_RATE_ALLOWANCE = 16 * 1024


class Server:
    """What all connections of one worker share: config, replies, policy, writer."""

    def __init__(
        self, config: Config, writer: MaildirWriter, clients: AnvilRow | None = None, metrics: memoryview | None = None
    ) -> None:
        self.config = config
        self.writer = writer
        # This worker's row of the shared counters (metrics.py), or None: off.
        self.metrics = metrics
        # Connections per client address, summed over all workers (anvil.py).
        self.clients = clients if config.max_connections_per_ip else None
        self.recipients = FolderRecipients(config.mail_root, config.recipient_delimiter)
        # The operator's hooks (hooks.py): one policy object per worker,
        # its methods looked up once here, not per connection.
        self.hooks = resolve_hooks(load_policy(config.policy)) if config.policy else NO_HOOKS
        self.limits = Limits(
            max_command_line=config.max_command_line,
            max_message_size=config.max_message_size,
            max_recipients=config.max_recipients,
            max_errors=config.max_errors,
            bare_lf=config.bare_lf,
            starttls=bool(config.tls_cert),
        )
        self.tls_context: ssl.SSLContext | None = None
        if config.tls_cert:
            self.tls_context = server_context(config.tls_cert, config.tls_key)
        self.proxy_trusted = [ipaddress.ip_network(n, strict=False) for n in config.proxy_trusted]
        name = config.hostname
        self.greeting = Reply(220, "", f"{name} ESMTP fastsmtp")
        self.helo_reply = Reply(250, "", name)
        # RFC 1869 §4.3: keywords after the greeting line; RFC 1870 SIZE,
        # RFC 2920 PIPELINING, RFC 6152 8BITMIME, RFC 6531 SMTPUTF8,
        # RFC 2034 ENHANCEDSTATUSCODES, RFC 3030 CHUNKING, RFC 3207 STARTTLS
        # (offered only outside TLS, and only with a certificate).
        keywords = [
            name,
            "PIPELINING",
            f"SIZE {config.max_message_size}",
            "8BITMIME",
            "SMTPUTF8",
            "ENHANCEDSTATUSCODES",
            "CHUNKING",
        ]
        self.ehlo_reply_tls = Reply(250, "", "\n".join(keywords))
        if self.tls_context is not None:
            keywords.append("STARTTLS")
        self.ehlo_reply = Reply(250, "", "\n".join(keywords))
        self.hostname = name.encode("ascii", "replace")
        self.connections: set[SMTPProtocol] = set()
        self.closing = False

    def protocol_factory(self) -> "SMTPProtocol":
        return SMTPProtocol(self)

    def implicit_tls_factory(self) -> "SMTPProtocol":
        return SMTPProtocol(self, implicit_tls=True)

    def trusts_proxy(self, peer: str) -> bool:
        if not self.proxy_trusted:
            return False
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return any(address in net for net in self.proxy_trusted)

    def admit(self, peer: str) -> tuple[Reply | None, bytes | None]:
        """Count a connection from ``peer``: (refusal or None, key to release later).

        Postfix's anvil limit and reply: "421 4.7.0 Error: too many
        connections from ADDRESS".  The count goes up before the check so
        that workers admitting one client at the same instant see each other.
        """
        clients = self.clients
        key = client_key(peer) if clients is not None else None
        if clients is None or key is None:
            return None, None
        if clients.connect(key) > self.config.max_connections_per_ip:
            clients.disconnect(key)
            return Reply(421, "4.7.0", f"Error: too many connections from {peer}"), None
        return None, key

    def release(self, key: bytes) -> None:
        if self.clients is not None:
            self.clients.disconnect(key)

    def begin_shutdown(self) -> None:
        """Say 421 to idle sessions; transactions in progress finish first."""
        self.closing = True
        for conn in list(self.connections):
            conn.shutdown()


class SMTPProtocol(asyncio.Protocol):
    """One SMTP connection."""

    def __init__(self, server: Server, implicit_tls: bool = False) -> None:
        self._server = server
        self._loop = asyncio.get_running_loop()
        self._session = Session(server.limits)
        self._implicit_tls = implicit_tls
        self._handlers: dict[type[Event], Callable[..., Reply | None]] = {
            Helo: self._on_helo,
            Ehlo: self._on_ehlo,
            MailFrom: self._on_mail,
            RcptTo: self._on_rcpt,
            Data: self._on_data,
            EndOfMessage: self._on_end_of_message,
            EndOfChunk: self._on_end_of_chunk,
            StartTLS: self._on_starttls,
            Rset: self._on_rset,
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
        # TLS: the Received header's words once a handshake is done, and
        # whether a handshake is owed after the current write.
        self._tls_info: str | None = None
        self._upgrade_pending = False
        self._upgrading = False
        self._held: list[bytes] = []
        # Anti-abuse clocks: the greeting not sent yet (early-talker window),
        # an error reply being delayed (tarpit), and the current message's
        # start time and octets (minimum data rate).
        self._greeting_due = False
        self._tarpitting = False
        self._data_started = 0.0
        self._data_octets = 0
        # PROXY protocol: the header's octets so far while one is expected
        # (None otherwise), and whether to refuse one from this peer.
        self._proxy_buf: bytes | None = None
        self._refuse_proxy = False
        # A policy hook being awaited (reading waits for it), the clocks of
        # the connection and of the transaction, and what the log lines say.
        self._hook_task: asyncio.Task[Reply | None] | None = None
        self._connect_pending = False
        self._connected_at = self._loop.time()
        self._mail_started = self._connected_at
        self._message_size = 0
        self._messages = 0
        # The anvil key this connection counts under, until it is lost.
        self._client_key: bytes | None = None
        # Counters (None: metrics off); when the message being committed
        # ended and its content octets (one commit at a time: reading waits).
        self._metrics = server.metrics
        self._data_ended = 0.0
        self._data_size = 0

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
            self._count_refused(counters.REFUSED_SHUTDOWN)
            transport.write(SHUTTING_DOWN.encoded)
            transport.close()
            return
        if len(self._server.connections) > self._server.config.max_connections:
            self._count_refused(counters.REFUSED_MAX_CONNECTIONS)
            transport.write(TOO_MANY_CONNECTIONS.encoded)
            transport.close()
            return
        self._last_read = self._loop.time()
        if self._implicit_tls:
            # The loop ran the handshake before connection_made: uvloop's
            # start_tls() hangs when called before any data has flowed, so
            # the implicit-TLS listener is a TLS server (and takes no PROXY
            # header).
            self._session.tls = True
            self._tls_info = describe(transport.get_extra_info("ssl_object"))
            if self._metrics is not None:
                self._metrics[counters.TLS_OK] += 1
        elif self._server.trusts_proxy(self._peer):
            # The balancer speaks first; the greeting waits for its header.
            self._proxy_buf = b""
            self._timer = self._loop.call_later(self._server.config.proxy_timeout, self._on_proxy_timeout)
            return
        self._refuse_proxy = bool(self._server.proxy_trusted)
        self._begin()

    def _begin(self) -> None:
        """Admit the client and greet it."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        # The per-client limit, before the greeting, with the client's own
        # address (the one a PROXY header gave, when there was one).
        refusal, self._client_key = self._server.admit(self._peer)
        if refusal is not None:
            self._count_refused(counters.REFUSED_PER_IP)
            assert self._transport is not None
            if not self._implicit_tls:  # a TLS client could not read plain text
                self._transport.write(refusal.encoded)
            self._transport.close()
            return
        if self._metrics is not None:
            self._metrics[counters.CONNECTIONS_ACCEPTED] += 1
        self._timer = self._loop.call_later(self._server.config.idle_timeout, self._on_timer)
        hook = self._server.hooks.on_connect
        if hook is not None:
            self._connect_pending = True
            self._ask(hook, (self._peer,), self._connected)
            return
        self._welcome()

    def _connected(self, refusal: Reply | None) -> None:
        """The on_connect hook's answer: greet, or refuse instead of the greeting."""
        self._connect_pending = False
        held, self._held = self._held, []
        if refusal is None:
            self._welcome()
            for data in held:
                self.data_received(data)
            return
        if self._transport is not None:
            self._transport.write(refusal.encoded)
        self._close()

    def _welcome(self) -> None:
        delay = self._server.config.greeting_delay
        if delay > 0 and not self._implicit_tls:
            self._greeting_due = True
            self._loop.call_later(delay, self._greet)
            return
        self._greet()

    def _count_refused(self, reason: int) -> None:
        if self._metrics is not None:
            self._metrics[counters.CONNECTIONS_REFUSED + reason] += 1

    def _count_refused_message(self, code: int) -> None:
        if self._metrics is not None:
            self._metrics[counters.MESSAGES_REFUSED + counters.CODE_INDEX[code]] += 1

    def _greet(self) -> None:
        self._greeting_due = False
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(self._server.greeting.encoded)

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.connections.discard(self)
        self._release_client()
        if self._hook_task is not None:
            self._hook_task.cancel()
            self._hook_task = None
        self._log_disconnect()
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
        if self._upgrading:
            # Decrypted data can arrive before start_tls() has returned the
            # new transport to us; answering it now would write plaintext on
            # the old one.  Hold it until the handshake task resumes.
            self._held.append(data)
            return
        if self._connect_pending:
            # pause_reading() in connection_made does not hold under every
            # loop (uvloop starts reading after it returns): keep what a
            # client says before on_connect has answered, as the TLS case does.
            self._held.append(data)
            return
        if self._proxy_buf is not None:
            self._proxy_received(data)
            return
        if self._greeting_due:
            log.info("early talker %s refused", self._peer)
            self._greeting_due = False
            assert self._transport is not None
            self._transport.write(EARLY_TALKER.encoded)
            self._close()
            return
        if self._spool is not None:
            self._data_octets += len(data)
        if self._refuse_proxy:
            self._refuse_proxy = False
            if looks_like_proxy_header(data):
                log.warning("PROXY header from untrusted %s refused", self._peer)
                assert self._transport is not None
                self._transport.write(UNTRUSTED_PROXY.encoded)
                self._close()
                return
        self._session.receive_data(data)
        self._process()

    def _proxy_received(self, data: bytes) -> None:
        buf = self._proxy_buf = (self._proxy_buf or b"") + data
        try:
            parsed = parse_proxy_header(buf)
        except ProxyHeaderError as exc:
            log.warning("bad PROXY header from %s: %s", self._peer, exc)
            self.abort()
            return
        if parsed is None:
            return
        info, used = parsed
        self._proxy_buf = None
        if info.source is not None:
            self._peer = info.source
        rest = buf[used:]
        self._begin()
        if rest:
            self._session.receive_data(rest)
            self._process()

    def _on_proxy_timeout(self) -> None:
        self._timer = None
        log.warning("no PROXY header from %s in time", self._peer)
        self.abort()

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
        want_pause = self._write_paused or self._committing or self._tarpitting or self._hook_task is not None
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
        soft_limit = self._server.config.soft_error_limit
        held: bytes | None = None
        while True:
            errors = session.errors
            try:
                event = session.next_event()
            except RemoteProtocolError as exc:
                out.append(session.send(exc.reply))
                if session.state is CLOSED:
                    break
                if session.errors > errors and session.errors > soft_limit:
                    held = out.pop()  # tarpitted: sent after a delay
                    break
                continue
            if event is NEED_DATA or event is PAUSED:
                break
            kind = type(event)
            if kind is MessageChunk:
                assert self._spool is not None
                self._spool.write(event.data)  # type: ignore[union-attr]
                continue
            if kind is Bdat:
                if event.first:  # type: ignore[union-attr]
                    self._open_spool()
                continue  # a chunk's reply comes with EndOfChunk
            if kind is ConnectionClosed:
                self._close()
                break
            reply = handlers[kind](event)
            if reply is None:
                break  # the reply comes when the commit does
            out.append(session.send(reply))
            if session.state is CLOSED:
                break
            if session.errors > errors and session.errors > soft_limit:
                held = out.pop()  # tarpitted: sent after a delay
                break
        transport = self._transport
        if transport is None:
            return
        if out:
            transport.write(b"".join(out))
        if held is not None:
            self._tarpit(held)
        elif session.state is CLOSED:
            self._close()
        elif self._upgrade_pending:
            self._upgrade_pending = False
            self._start_tls()
        elif self._server.closing and self._idle():
            self._say_goodbye(SHUTTING_DOWN)

    def _tarpit(self, reply: bytes) -> None:
        """Delay an error reply past the soft limit, more for each error (Postfix's
        smtpd_soft_error_limit): a dictionary attack slows to a crawl, a
        client with a typo or two is not slowed at all."""
        over = self._session.errors - self._server.config.soft_error_limit
        self._tarpitting = True
        self._update_reading()
        self._loop.call_later(over * self._server.config.error_delay, self._end_tarpit, reply)

    def _end_tarpit(self, reply: bytes) -> None:
        self._tarpitting = False
        if self._transport is None:
            return
        self._update_reading()
        self._process([reply])

    def _close(self) -> None:
        self._release_client()
        if self._transport is not None:
            self._transport.close()

    def _release_client(self) -> None:
        # At our own close, not only in connection_lost: a client that gets
        # 221 and reconnects at once must not find its old session counted.
        if self._client_key is not None:
            self._server.release(self._client_key)
            self._client_key = None

    def _idle(self) -> bool:
        return (
            not self._committing
            and not self._upgrading
            and self._hook_task is None
            and self._session.state is not DATA
            and self._spool is None
        )

    # -- handlers: each returns the reply, or None when it comes later ----------

    def _on_helo(self, event: Helo) -> Reply | None:
        self._drop_spool()
        return self._hello(event.domain, self._server.helo_reply)

    def _on_ehlo(self, event: Ehlo) -> Reply | None:
        self._drop_spool()
        return self._hello(event.domain, self._server.ehlo_reply_tls if self._session.tls else self._server.ehlo_reply)

    def _hello(self, domain: bytes, reply: Reply) -> Reply | None:
        hook = self._server.hooks.on_helo
        if hook is None:
            return reply
        return self._ask(hook, (self._info(), _text(domain)), lambda refusal: refusal or reply)

    def _on_mail(self, event: MailFrom) -> Reply | None:
        self._maildirs = []
        self._mail_started = self._loop.time()
        hook = self._server.hooks.on_mail
        if hook is None:
            return MAIL_OK
        return self._ask(hook, (self._info(), event.address), lambda refusal: refusal or MAIL_OK)

    def _on_rcpt(self, event: RcptTo) -> Reply | None:
        hook = self._server.hooks.on_rcpt
        if hook is None:
            return self._check_rcpt(event)
        # After the hook's None, the folder check still decides: a
        # recipient needs a Maildir to be delivered to.
        return self._ask(hook, (self._info(), event.address), lambda refusal: refusal or self._check_rcpt(event))

    def _check_rcpt(self, event: RcptTo) -> Reply:
        found = self._server.recipients.resolve(event.address)
        metrics = self._metrics
        if isinstance(found, Reply):
            if metrics is not None:
                metrics[counters.RECIPIENTS_REFUSED + counters.CODE_INDEX[found.code]] += 1
            return found
        if metrics is not None:
            metrics[counters.RECIPIENTS_ACCEPTED] += 1
        if found not in self._maildirs:
            # user+a and user+b are one mailbox: one copy (RFC 5321 §3.3 allows it).
            self._maildirs.append(found)
        return RCPT_OK

    def _on_data(self, event: Data) -> Reply:
        self._open_spool()
        return START_DATA

    def _open_spool(self) -> None:
        self._data_started = self._loop.time()
        self._data_octets = 0
        if self._server.config.min_data_rate:
            self._loop.call_later(1.0, self._check_data_rate, self._data_started)
        spool = self._server.writer.open_spool(self._maildirs[0])
        spool.write(trace_headers(self._server, self._session, self._peer, spool.queue_id, self._tls_info))
        self._spool = spool

    def _drop_spool(self) -> None:
        if self._spool is not None:
            self._spool.discard()
            self._spool = None

    def _on_rset(self, event: Rset) -> Reply:
        self._drop_spool()  # RSET between BDAT chunks abandons the message
        return OK

    def _on_end_of_chunk(self, event: EndOfChunk) -> Reply:
        if event.refusal is not None:
            self._drop_spool()
            self._count_refused_message(event.refusal.code)
            return event.refusal
        return Reply(250, "2.0.0", f"{event.size} octets received")

    def _on_starttls(self, event: StartTLS) -> Reply:
        self._upgrade_pending = True
        return READY_FOR_TLS

    def _on_end_of_message(self, event: EndOfMessage) -> Reply | None:
        self._message_size = event.size
        hook = self._server.hooks.on_message
        if hook is None or event.refusal is not None or self._spool is None:
            return self._end_message(event)
        env = self._session.envelope
        message = MessageInfo(self._spool.queue_id, env.mail_from, tuple(env.rcpt_to), event.size)
        # The spool stays ours while the hook thinks: a client leaving
        # meanwhile has it discarded by connection_lost.
        return self._ask(
            hook,
            (self._info(), message),
            lambda refusal: self._end_message(event if refusal is None else dataclasses.replace(event, refusal=refusal)),
        )

    def _end_message(self, event: EndOfMessage) -> Reply | None:
        spool, self._spool = self._spool, None
        assert spool is not None
        if event.refusal is not None:
            spool.discard()
            self._log_message(spool.queue_id, event.refusal.code)
            self._count_refused_message(event.refusal.code)
            return event.refusal
        if self._metrics is not None:
            self._data_ended = self._loop.time()
            self._data_size = event.size
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
        metrics = self._metrics
        if metrics is not None:
            # A message counts as accepted once stored, even when its client
            # has left and never reads the 250.
            if reply is STORAGE_FAILED:
                self._count_refused_message(STORAGE_FAILED.code)
            else:
                metrics[counters.MESSAGES_ACCEPTED] += 1
                metrics[counters.BYTES_ACCEPTED] += self._data_size
        if reply.code < 400:
            self._messages += 1
        self._log_message(spool.queue_id, reply.code)
        if self._transport is None:
            return  # the client left; the message (if stored) stays stored
        out = [self._session.send(reply)]
        if metrics is not None and reply is not STORAGE_FAILED:
            # The reply is written in this same callback, by _process below.
            counters.observe(metrics, counters.TIME_TO_250, self._loop.time() - self._data_ended)
        self._update_reading()
        self._process(out)

    # -- policy hooks (hooks.py) ------------------------------------------------

    def _info(self) -> SessionInfo:
        session = self._session
        env = session.envelope
        return SessionInfo(self._peer, _text(session.helo or b""), session.tls, env.mail_from, tuple(env.rcpt_to))

    def _ask(
        self, hook: Hook, args: tuple[object, ...], then: Callable[[Reply | None], Reply | None]
    ) -> Reply | None:
        """Ask ``hook``, then ``then`` with its refusal (or None); None: the reply comes later.

        A sync hook answers inline.  An async one runs as a task while
        reading stays paused, exactly as a commit does: the session owes its
        reply meanwhile, so pipelined commands wait in the buffer, in order.
        """
        try:
            answer = hook.call(*args)
        except Exception as exc:  # the operator's code: anything, never a crash
            log.error("policy %s failed for %s: %r", hook.name, self._peer, exc)
            return then(HOOK_FAILED)
        if not hook.is_async:
            return then(self._refusal(hook, answer))
        task = self._loop.create_task(asyncio.wait_for(answer, self._server.config.policy_timeout))
        self._hook_task = task
        self._update_reading()
        task.add_done_callback(lambda t: self._on_hook_done(t, hook, then))
        return None

    def _refusal(self, hook: Hook, answer: object) -> Reply | None:
        if answer is None:
            return None
        if isinstance(answer, Reply):
            # Hooks refuse; a positive Reply is "go on" (hooks.py's rules).
            return answer if answer.code >= 400 else None
        log.error("policy %s answered %.80r, not a Reply or None", hook.name, answer)
        return HOOK_FAILED

    def _on_hook_done(
        self, task: "asyncio.Task[Reply | None]", hook: Hook, then: Callable[[Reply | None], Reply | None]
    ) -> None:
        if self._hook_task is task:
            self._hook_task = None
        if task.cancelled() or self._transport is None or self._transport.is_closing():
            return  # the client left, or was told 421 (idle timeout, shutdown) meanwhile
        exc = task.exception()
        if exc is None:
            answer = self._refusal(hook, task.result())
        elif isinstance(exc, asyncio.TimeoutError):
            log.error("policy %s gave no answer for %s in %g s", hook.name, self._peer, self._server.config.policy_timeout)
            answer = HOOK_FAILED
        else:
            log.error("policy %s failed for %s: %r", hook.name, self._peer, exc)
            answer = HOOK_FAILED
        reply = then(answer)
        self._update_reading()
        if reply is not None:
            self._process([self._session.send(reply)])

    # -- log lines (logs.py renders and sanitises them) -------------------------

    def _log_message(self, queue_id: str, code: int) -> None:
        """One line per message, accepted or refused at its end; never its content."""
        if not log.isEnabledFor(logging.INFO):
            return
        env = self._session.envelope
        sender = env.mail_from.raw if env.mail_from is not None else b""
        fields = {
            "id": queue_id,
            "client": self._peer,
            "helo": self._session.helo or b"",
            "from": b"<" + sender + b">",
            "to": [b"<" + rcpt.raw + b">" for rcpt in env.rcpt_to],
            "size": self._message_size,
            "code": code,
            "ms": round((self._loop.time() - self._mail_started) * 1000),
        }
        log.info("queued" if code < 400 else "refused", extra={"fields": fields})

    def _log_disconnect(self) -> None:
        if not log.isEnabledFor(logging.INFO):
            return
        fields = {
            "client": self._peer,
            "helo": self._session.helo or b"",
            "tls": "yes" if self._session.tls else "no",
            "messages": self._messages,
            "ms": round((self._loop.time() - self._connected_at) * 1000),
        }
        log.info("disconnect", extra={"fields": fields})

    # -- TLS ------------------------------------------------------------------

    def _start_tls(self) -> None:
        """Run the STARTTLS handshake; the session already forgot everything before it."""
        self._upgrading = True
        # Stop reading now, not when the handshake task first runs: the
        # ClientHello may arrive in between, and would reach data_received()
        # as a plaintext command.
        assert self._transport is not None
        self._transport.pause_reading()
        self._read_paused = True
        self._loop.create_task(self._handshake())

    async def _handshake(self) -> None:
        transport = self._transport
        context = self._server.tls_context
        assert transport is not None and context is not None
        try:
            new = await self._loop.start_tls(
                transport, self, context, server_side=True, ssl_handshake_timeout=30.0
            )
        except (OSError, ssl.SSLError, asyncio.TimeoutError, ConnectionError) as exc:
            # A failed handshake or a garbage ClientHello: one line, no
            # traceback, and the descriptor is released by abort().
            log.info("TLS handshake with %s failed: %s", self._peer, exc or type(exc).__name__)
            if self._metrics is not None:
                self._metrics[counters.TLS_FAILED] += 1
            self._upgrading = False
            transport.abort()
            return
        self._upgrading = False
        if self._metrics is not None:
            self._metrics[counters.TLS_OK] += 1
        if new is None or self._transport is None:
            return  # the peer left during the handshake
        self._transport = new
        self._read_paused = False
        self._tls_info = describe(new.get_extra_info("ssl_object"))
        self._update_reading()
        held, self._held = self._held, []
        for data in held:
            self.data_received(data)

    def _check_data_rate(self, started: float) -> None:
        """Cut off a message whose data trickles in (a slow-drip attack holds
        a connection for hours within any idle timeout)."""
        if self._spool is None or self._data_started != started or self._transport is None:
            return  # that message has ended
        elapsed = self._loop.time() - started
        allowed = (self._data_octets + DATA_RATE_ALLOWANCE) / self._server.config.min_data_rate
        if elapsed > allowed:
            log.info("%s: message data too slow (%d octets in %.0f s)", self._peer, self._data_octets, elapsed)
            self._drop_spool()
            self._say_goodbye(TOO_SLOW)
            return
        self._loop.call_later(1.0, self._check_data_rate, started)

    # -- timeouts and shutdown ------------------------------------------------

    def _on_timer(self) -> None:
        # Reads only store a timestamp; the timer re-arms for what is left
        # rather than being rescheduled on every chunk.
        timeout = self._server.config.idle_timeout
        left = self._last_read + timeout - self._loop.time()
        if self._committing or self._upgrading or left > 0:
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


def _text(raw: bytes) -> str:
    """Client octets for a hook: UTF-8 (RFC 6531), anything else replaced."""
    return raw.decode("utf-8", "replace")


def _constant(reply: Reply) -> Callable[[Event], Reply]:
    return lambda event: reply


# A HELO argument goes into the Received header: keep it to the characters
# of a domain or address literal, so that nothing a client says can start a
# new header line or break the comment syntax (RFC 5322 §3.6.7).
_UNSAFE_HELO = re.compile(rb"[^A-Za-z0-9.\-_:\[\]]")


def trace_headers(
    server: Server, session: Session, peer: str, queue_id: str, tls: str | None = None
) -> bytes:
    """``Return-Path:`` and ``Received:`` for the message (RFC 5321 §4.4).

    The protocol word follows the IANA "WITH protocol types" registry:
    ESMTP, ESMTPS over TLS (RFC 3848), UTF8SMTP/UTF8SMTPS (RFC 6531 §3.7.3).
    """
    env = session.envelope
    sender = env.mail_from.raw if env.mail_from is not None else b""
    helo = _UNSAFE_HELO.sub(b"?", (session.helo or b"unknown")[:255])
    if env.smtputf8:
        protocol = b"UTF8SMTP"
    else:
        protocol = b"ESMTP" if session.esmtp else b"SMTP"
    if tls is not None and session.esmtp:
        protocol += b"S"
    tls_clause = b"\r\n\t(" + tls.encode("ascii", "replace") + b")" if tls is not None else b""
    rcpts = env.rcpt_to
    for_clause = b"\r\n\tfor <" + rcpts[0].raw + b">" if len(rcpts) == 1 else b""
    date = formatdate(time.time(), localtime=True).encode("ascii")
    return b"".join(
        (
            b"Return-Path: <", sender, b">\r\n",
            b"Received: from ", helo, b" ([", peer.encode("ascii", "replace"), b"])", tls_clause, b"\r\n",
            b"\tby ", server.hostname, b" (fastsmtp) with ", protocol,
            b" id ", queue_id.encode("ascii"), for_clause, b";\r\n\t", date, b"\r\n",
        )
    )
