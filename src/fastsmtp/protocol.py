"""One SMTP connection: bytes in, ``Session`` events to their handlers, replies out.

Rules of this module:
- The protocol only routes.  Protocol decisions belong to the session
  (session.py), the life of a message to its transaction (transaction.py),
  the checks to the stages (stages.py), storage to the store (store.py),
  what happens before the greeting to the opening (opening.py).
- ``NEED_DATA`` ends a round and flushes every reply of that round in one
  write (RFC 2920 pipelining); ``PAUSED`` means a reply waits for slow
  work, and reading is held (flow.py) under that work's name until it
  comes.
- The connection is in one ``Phase`` (phase.py); ``enter`` is the only
  place it changes, and each phase's timer is armed and cancelled there.
- Nothing here blocks the loop, and ``250`` after the end of data is sent
  only when the store's future has resolved.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Callable, cast

from .errors import RemoteProtocolError
from .events import Bdat, ConnectionClosed, Event, MessageChunk, Reply
from .flow import FlowControl
from .handlers import Handlers
from .metrics import REFUSED_MAX_CONNECTIONS, REFUSED_SHUTDOWN
from .milter.stage import MilterSession
from .opening import Opening
from .phase import MOVES, Phase
from .server import Server
from .session import CLOSED, DATA, NEED_DATA, PAUSED, Session
from .tls import HandshakeFailed, describe, handshake, milter_macros

__all__ = ["SMTPProtocol"]

log = logging.getLogger("fastsmtp")

IDLE_TIMEOUT = Reply(421, "4.4.2", "Error: timeout exceeded")
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, try again later")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Error: too many connections, try again later")
TOO_SLOW = Reply(421, "4.4.2", "Error: message data arriving too slowly")


class SMTPProtocol(asyncio.Protocol):
    """One SMTP connection."""

    def __init__(self, server: Server, implicit_tls: bool = False) -> None:
        self.server = server
        self.implicit_tls = implicit_tls
        self.peer = "unknown"
        #: The anvil key this connection counts under, until it closes.
        self.client_key: bytes | None = None
        #: The client is in --trusted-networks (screened and checked by
        #: nothing), or a DNSWL vouched for it (not greylisted).
        self.trusted = False
        self.allowlisted = False
        #: This connection's milter conversations (milter/stage.py), if any.
        self.milters: MilterSession | None = None
        #: The Received header's words once a TLS handshake is done.
        self.tls_info: str | None = None
        #: The TLS macros for milters ({tls_version}, {cipher}, {cipher_bits}); none before TLS.
        self.tls_macros: list[tuple[str, str]] = []
        self.session = Session(server.limits)
        self._loop = asyncio.get_running_loop()
        self._opening = Opening(self)
        self._handlers = Handlers(self, self._loop)
        # The connection: its transport and flow, its phase and that phase's
        # one timer, and when it last read (the idle timer re-arms from it).
        self._transport: asyncio.Transport | None = None
        self.flow: FlowControl = FlowControl(None)
        self._phase = Phase.NEW
        self._timer: asyncio.TimerHandle | None = None
        self._last_read = self._loop.time()
        self._connected_at = self._last_read
        # Octets that arrive while the phase cannot read them (CONNECT, TLS),
        # and whether a STARTTLS handshake follows this round's write.
        self._held: list[bytes] = []
        self._upgrade = False
        # Read once per connection, not once per round.
        self._soft_limit = server.config.soft_error_limit

    # -- phases -----------------------------------------------------------------

    @property
    def phase(self) -> Phase:
        return self._phase

    def enter(self, phase: Phase, delay: float = 0.0, on_timer: Callable[[], None] | None = None) -> None:
        """Move to ``phase`` (checked against MOVES), with its own timer if it has one."""
        if phase not in MOVES[self._phase]:
            raise RuntimeError(f"connection cannot move from {self._phase.name} to {phase.name}")
        self._phase = phase
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if on_timer is not None:
            self._timer = self._loop.call_later(delay, on_timer)

    # -- connection lifecycle ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = self._transport = cast(asyncio.Transport, transport)
        self.flow.retarget(transport)
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer = str(peer[0])
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Replies are small and already batched: send them at once.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        server = self.server
        server.connections.add(self)
        if server.closing or len(server.connections) > server.config.max_connections:
            shutdown = server.closing
            server.meter.connection_refused(REFUSED_SHUTDOWN if shutdown else REFUSED_MAX_CONNECTIONS)
            self.refuse(SHUTTING_DOWN if shutdown else TOO_MANY_CONNECTIONS)
            return
        if self.implicit_tls:
            # The loop ran the handshake before connection_made: uvloop's
            # start_tls() hangs when called before any data has flowed, so
            # the implicit-TLS listener is a TLS server (and takes no PROXY
            # header).
            self.session.tls = True
            self.tls_info = describe(transport.get_extra_info("ssl_object"))
            self.tls_macros = milter_macros(transport.get_extra_info("ssl_object"))
            server.meter.tls(True)
        self._opening.start()

    def greet(self) -> None:
        """The opening is done: 220, and the session reads commands."""
        self.enter(Phase.COMMANDS, self.server.config.idle_timeout, self._on_idle)
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(self.server.greeting.encoded)

    def refuse(self, reply: Reply | None) -> None:
        """Say ``reply`` (if any) instead of going on, and close."""
        if self._transport is not None and not self._transport.is_closing() and reply is not None:
            self._transport.write(reply.encoded)
        self._close()

    def release_held(self) -> None:
        """Read what arrived while the phase could not."""
        held, self._held = self._held, []
        for data in held:
            self.data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self._release_client()
        self._close_milters()
        self._opening.cancel()
        self._handlers.lost()
        if self.server.log.enabled:
            session = self.session
            self.server.log.disconnect(
                self.peer, session.helo or b"", session.tls, self._handlers.messages,
                round((self._loop.time() - self._connected_at) * 1000),
            )
        if self._phase is not Phase.CLOSED:
            self.enter(Phase.CLOSED)
        self._transport = None

    def data_received(self, data: bytes) -> None:
        self._last_read = self._loop.time()
        phase = self._phase
        if phase is Phase.COMMANDS:
            txn = self._handlers.txn
            if txn is not None:
                txn.received(len(data))
            if self._opening.check_proxy and self._opening.refuses_proxy_header(data):
                return
            self.session.receive_data(data)
            self._process()
        elif phase is Phase.TARPIT:
            self.session.receive_data(data)  # read when the delayed reply has gone
        elif phase is Phase.PROXY:
            self._opening.proxy_data(data)
        elif phase is Phase.GREETING:
            self._opening.early_talker()
        elif phase is Phase.CONNECT or phase is Phase.TLS:
            # Decrypted data can arrive before start_tls() has returned the
            # new transport; pause_reading() in connection_made does not hold
            # under every loop either.  Keep it until the phase can read it.
            self._held.append(data)

    def eof_received(self) -> bool:
        if self._phase is Phase.COMMANDS:
            self.session.receive_data(b"")
            self._process()
        else:
            self._close()
        return False

    # -- flow control -----------------------------------------------------------

    def pause_writing(self) -> None:
        self.flow.hold("write")

    def resume_writing(self) -> None:
        self.flow.release("write")

    # -- what the handlers and the opening use -----------------------------------

    def attached(self) -> bool:
        """Whether the client is still connected (its reply can be written)."""
        return self._transport is not None

    def is_open(self) -> bool:
        """Attached and not being closed by us (no 421 said yet)."""
        return self._transport is not None and not self._transport.is_closing()

    def answer(self, reply: Reply) -> None:
        """The late reply to the command whose work has finished; then read on."""
        self._process([self.session.send(reply)])

    def upgrade_after_reply(self) -> None:
        """STARTTLS was answered 220: the handshake starts once it is written."""
        self._upgrade = True

    def too_slow(self) -> None:
        """The message data trickles in below --min-data-rate (transaction.py)."""
        self._handlers.txn = None
        self._say_goodbye(TOO_SLOW)

    # -- the event loop of one connection -------------------------------------

    def _process(self, out: list[bytes] | None = None) -> None:
        session = self.session
        if out is None:
            out = []
        handlers = self._handlers.table
        soft_limit = self._soft_limit
        next_event = session.next_event
        held: bytes | None = None
        while True:
            errors = session.errors
            try:
                event = next_event()
            except RemoteProtocolError as exc:
                out.append(session.send(exc.reply))
            else:
                if event is NEED_DATA or event is PAUSED:
                    break
                kind: type[Event] = type(event)  # type: ignore[assignment]
                if kind is MessageChunk:
                    txn = self._handlers.txn
                    assert txn is not None
                    txn.write(event.data)  # type: ignore[union-attr]
                    continue
                if kind is Bdat:
                    if event.first:  # type: ignore[union-attr]
                        self._handlers.begin_content()
                    continue  # a chunk's reply comes with EndOfChunk
                if kind is ConnectionClosed:
                    self._close()
                    break
                reply = handlers[kind](event)
                if reply is None:
                    break  # the reply comes when the work it waits for is done
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
        elif self._upgrade:
            self._upgrade = False
            self._start_tls()
        elif self.server.closing and self._idle():
            self._say_goodbye(SHUTTING_DOWN)

    def _tarpit(self, reply: bytes) -> None:
        """Delay an error reply past the soft limit, more for each error (Postfix's
        smtpd_soft_error_limit): a dictionary attack slows to a crawl, a
        client with a typo or two is not slowed at all."""
        over = self.session.errors - self.server.config.soft_error_limit
        self.flow.hold("tarpit")
        self.enter(Phase.TARPIT, over * self.server.config.error_delay, lambda: self._end_tarpit(reply))

    def _end_tarpit(self, reply: bytes) -> None:
        self.enter(Phase.COMMANDS, self.server.config.idle_timeout, self._on_idle)
        self.flow.release("tarpit")
        self._process([reply])

    def _close(self) -> None:
        self._release_client()
        self._opening.cancel()  # an on_connect answer has no one to greet now
        if not self._handlers.committing:
            self._close_milters()
        if self._phase is not Phase.CLOSED:
            self.enter(Phase.CLOSED)  # and the phase's timer goes with it
        if self._transport is not None:
            self._transport.close()

    def _close_milters(self) -> None:
        if self.milters is not None:
            self.milters.close()
            self.milters = None

    def _release_client(self) -> None:
        # At our own close, not only in connection_lost: a client that gets
        # 221 and reconnects at once must not find its old session counted.
        if self.client_key is not None:
            self.server.release(self.client_key)
            self.client_key = None

    def _idle(self) -> bool:
        return (
            self._phase is not Phase.TLS
            and self._phase is not Phase.CONNECT
            and self.session.state is not DATA
            and not self._handlers.busy
        )

    # -- TLS ------------------------------------------------------------------

    def _start_tls(self) -> None:
        """Run the STARTTLS handshake; the session already forgot everything before it."""
        # Stop reading now, not when the handshake task first runs: the
        # ClientHello may arrive in between, and would reach data_received()
        # as a plaintext command.
        self.flow.hold("tls")
        self.enter(Phase.TLS)
        self._loop.create_task(self._handshake())

    async def _handshake(self) -> None:
        transport, context = self._transport, self.server.tls_context
        assert transport is not None and context is not None
        try:
            new = await handshake(self._loop, transport, self, context, self.peer)
        except HandshakeFailed:
            self.server.meter.tls(False)
            return
        self.server.meter.tls(True)
        if new is None or self._transport is None:
            return  # the peer left during the handshake
        self._transport = new
        self.tls_info = describe(new.get_extra_info("ssl_object"))
        self.tls_macros = milter_macros(new.get_extra_info("ssl_object"))
        if self.milters is not None:
            self.milters.tls = self.tls_macros
        self.enter(Phase.COMMANDS, self.server.config.idle_timeout, self._on_idle)
        self.flow.retarget(new)
        self.flow.release("tls")
        self.release_held()

    # -- timeouts and shutdown ------------------------------------------------

    def _on_idle(self) -> None:
        # Reads only store a timestamp; the timer re-arms for what is left
        # rather than being rescheduled on every chunk.
        self._timer = None
        left = self._last_read + self.server.config.idle_timeout - self._loop.time()
        if self._handlers.committing or left > 0:
            self._timer = self._loop.call_later(max(left, 1.0), self._on_idle)
            return
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
        self._transport.write(self.session.send(reply))
        self._close()

