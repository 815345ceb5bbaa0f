"""Delivery over LMTP (RFC 2033) to a mail store such as Dovecot, on asyncio streams.

Rules of this module:
- ``protocol.Conversation`` decides what may be sent and what each reply
  means; this module only moves octets and keeps time.  Addresses are
  bytes as they go on the wire (a ``str`` is encoded as UTF-8).
- A target is ``lmtp:unix:/path``, ``lmtp:HOST:PORT`` or
  ``lmtp:[IPv6]:PORT`` (``parse_target``).  Several targets are tried in
  order: one that cannot be reached or fails temporarily is passed over
  for the next, and is tried after the others for ``retry_after`` seconds.
- Every wait is bounded: ``connect_timeout`` for the connection, the
  greeting and LHLO; ``command_timeout`` for each reply to MAIL, RCPT,
  DATA, RSET; ``data_timeout`` for sending the message and for each
  recipient's reply after the final dot (a delivery may run Sieve).
- Two kinds of outcome.  A recipient's reply, positive or not, is a
  ``RecipientResult`` (the server said it).  A target that is down, times
  out, talks garbage, says 421 or drops the connection (also in the middle
  of DATA) is an ``LMTPTemporaryError`` when no target is left: nothing
  is known about the recipients without a result, and the message is to
  be delivered again later (``partial`` holds the results that did come).
- When a target fails in the middle of a transaction, the recipients that
  already have a result keep it and only the others go to the next
  target.  A recipient whose delivery reply was lost may so be delivered
  twice, never lost (DESIGN.md: delivery after the 250 is at least once).
- PIPELINING (RFC 2920): when the target offers it, MAIL, the RCPTs and
  DATA go in one write, and a probe's MAIL, RCPT and RSET in another.
- Connections are kept for reuse, a few per target (``pool_size``), each
  for at most ``pool_idle`` seconds; one found closed by the server is
  replaced by a fresh one before anything is reported.
"""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import AsyncIterable, Iterable, Sequence
from dataclasses import dataclass, field

from ..events import Reply
from .protocol import (
    MAX_LINE,
    MAX_REPLY,
    Answer,
    CommandError,
    Conversation,
    LMTPProtocolError,
    State,
    Step,
    encode_address,
)

__all__ = [
    "Target", "parse_target", "RecipientResult", "LMTPTemporaryError", "LMTPConnection", "LMTPClient",
    "Message", "NOT_UTF8", "is_over_quota", "is_unknown_user",
]

#: A message to deliver: its octets, or chunks of them as they are read.
Message = bytes | bytearray | memoryview | Iterable[bytes] | AsyncIterable[bytes]

#: What a recipient gets when its envelope needs SMTPUTF8 (RFC 6531) and
#: the target does not offer it (Dovecot 2.3 does not): such a message can
#: never be delivered there, so it is a permanent refusal (RFC 6531's
#: enhanced code X.6.7, "non-ASCII addresses not permitted").
NOT_UTF8 = Reply(553, "5.6.7", "The mail store does not accept non-ASCII addresses (no SMTPUTF8)")

_CHUNK = 65536


@dataclass(frozen=True, slots=True)
class Target:
    """Where an LMTP server listens: a unix socket (``path``) or ``host`` and ``port``."""

    spec: str
    path: str | None = None
    host: str | None = None
    port: int = 0

    def __str__(self) -> str:
        return self.spec


_HOST_PORT = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^\[\]:]+)):(?P<port>[0-9]{1,5})")


def parse_target(spec: str) -> Target:
    """``lmtp:unix:/path``, ``lmtp:HOST:PORT`` or ``lmtp:[IPv6]:PORT`` (as Postfix writes them)."""
    kind, sep, rest = spec.partition(":")
    if kind.lower() == "lmtp" and sep:
        if rest.startswith("unix:") and len(rest) > 5:
            return Target(spec, path=rest[5:])
        m = _HOST_PORT.fullmatch(rest)
        if m is not None and 0 < int(m["port"]) < 65536:
            return Target(spec, host=m["v6"] or m["host"], port=int(m["port"]))
    raise ValueError(f"LMTP target {spec!r} is not lmtp:unix:/path, lmtp:HOST:PORT or lmtp:[IPv6]:PORT")


@dataclass(frozen=True, slots=True)
class RecipientResult:
    """One recipient's fate, as the server (or, for ``NOT_UTF8``, this client) said it."""

    recipient: bytes
    code: int
    enhanced: str
    text: str

    @classmethod
    def of(cls, recipient: bytes, reply: Reply) -> "RecipientResult":
        return cls(recipient, reply.code, reply.enhanced, reply.text)

    @property
    def reply(self) -> Reply:
        return Reply(self.code, self.enhanced, self.text)

    @property
    def delivered(self) -> bool:
        return 200 <= self.code < 300

    @property
    def temporary(self) -> bool:
        """4xx: try this recipient again later (RFC 5321 §4.2.1)."""
        return 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        """5xx: do not try again; bounce."""
        return self.code >= 500


def is_unknown_user(reply: Reply | RecipientResult) -> bool:
    """Dovecot's ``550 5.1.1 <x> User doesn't exist`` (RFC 3463 X.1.1: bad destination mailbox)."""
    return reply.code >= 500 and reply.enhanced == "5.1.1"


def is_over_quota(reply: Reply | RecipientResult) -> bool:
    """Dovecot's quota refusal: ``552 5.2.2``, or ``452 4.2.2`` with ``quota_full_tempfail = yes``
    (RFC 3463 X.2.2: mailbox full)."""
    return reply.enhanced in ("5.2.2", "4.2.2")


class LMTPTemporaryError(Exception):
    """No target took the message (or answered the probe): down, timed out, garbage, 421, or gone mid-way.

    ``partial`` holds the recipients' results that did come before the
    failure (in the order of the recipients); the others are unknown.
    """

    def __init__(self, message: str, target: Target | None = None,
                 partial: Sequence[RecipientResult] = ()) -> None:
        super().__init__(message)
        self.target = target
        self.partial = list(partial)


class _Failed(LMTPTemporaryError):
    """One connection failed (what ``LMTPConnection`` raises; the client then tries the next target).

    ``stale``: no reply had been read since it was taken from the pool (the
    server had closed it meanwhile: try a fresh one).  ``partial``: the
    results that came; ``started``: the message was being sent.
    """

    def __init__(self, message: str, stale: bool = False, partial: Sequence[RecipientResult | None] = (),
                 started: bool = False) -> None:
        super().__init__(message)
        self.stale = stale
        self.slots = list(partial)
        self.partial = [r for r in partial if r is not None]
        self.started = started


# -- one connection ----------------------------------------------------------------


class LMTPConnection:
    """One LMTP conversation over a stream, greeted and LHLO'd by ``open``."""

    def __init__(self, target: Target, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 conv: Conversation, command_timeout: float, data_timeout: float) -> None:
        self.target = target
        self.conv = conv
        self._reader = reader
        self._writer = writer
        self.command_timeout = command_timeout
        self.data_timeout = data_timeout
        self.idle_since = 0.0
        #: Some reply was read since the connection was taken from the pool.
        self.used = False
        #: The message of the current transaction is being sent (it cannot be read twice).
        self.started = False

    @classmethod
    async def open(cls, target: Target, lhlo_name: str, *, connect_timeout: float = 10.0,
                   command_timeout: float = 30.0, data_timeout: float = 300.0, max_line: int = MAX_LINE,
                   max_reply: int = MAX_REPLY) -> "LMTPConnection":
        conv = Conversation(max_line, max_reply)
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(connect_timeout):
                if target.path is not None:
                    reader, writer = await asyncio.open_unix_connection(target.path)
                else:
                    reader, writer = await asyncio.open_connection(target.host, target.port)
                conn = cls(target, reader, writer, conv, command_timeout, data_timeout)
                greeting = await conn._answer()
                if conv.state is not State.HELLO:
                    raise _Failed(f"greeted with {_said(greeting)}")
                conn._write(conv.send_lhlo(lhlo_name))
                lhlo = await conn._answer()
                if lhlo.reply.code != 250:
                    raise _Failed(f"LHLO answered {_said(lhlo)}")
        except (OSError, TimeoutError, LMTPProtocolError, _Failed) as exc:
            if writer is not None:
                writer.close()
            raise _Failed(f"{target}: {_why(exc)}") from None
        except BaseException:
            if writer is not None:
                writer.close()
            raise
        return conn

    @property
    def reusable(self) -> bool:
        return (self.conv.state is State.READY and not self.conv.owed and not self._reader.at_eof()
                and not self._writer.is_closing())

    def close(self) -> None:
        if not self._writer.is_closing():
            self._writer.close()

    async def quit(self) -> None:
        """QUIT politely (bounded by ``command_timeout``), then close."""
        try:
            if self.reusable:
                self._write(self.conv.send_quit())
                async with asyncio.timeout(self.command_timeout):
                    await self._answer()
        except (OSError, TimeoutError, LMTPProtocolError, CommandError):
            pass
        finally:
            self.close()

    # -- the steps -----------------------------------------------------------------------

    async def probe(self, recipient: bytes, sender: bytes = b"") -> Reply:
        """MAIL FROM:<sender>, RCPT TO:<recipient>, RSET: the RCPT's reply (or MAIL's, if refused)."""
        conv = self.conv
        smtputf8 = not (recipient.isascii() and sender.isascii())
        if smtputf8 and not conv.offers("SMTPUTF8"):
            return NOT_UTF8
        try:
            return await self._probe(recipient, sender, smtputf8)
        except (OSError, TimeoutError, LMTPProtocolError) as exc:
            self.close()
            raise _Failed(f"{self.target}: {_why(exc)}", stale=not self.used) from None

    async def _probe(self, recipient: bytes, sender: bytes, smtputf8: bool) -> Reply:
        conv = self.conv
        timeout = self.command_timeout
        if conv.offers("PIPELINING"):
            self._write(conv.send_mail(sender, smtputf8=smtputf8) + conv.send_rcpt(recipient) + conv.send_rset())
            mail = await self._answer(timeout)
            rcpt = await self._answer(timeout)
            await self._answer(timeout)
        else:
            self._write(conv.send_mail(sender, smtputf8=smtputf8))
            mail = rcpt = await self._answer(timeout)
            if conv.state is State.MAIL:
                self._write(conv.send_rcpt(recipient))
                rcpt = await self._answer(timeout)
                self._write(conv.send_rset())
                await self._answer(timeout)
        return mail.reply if mail.reply.code >= 300 else rcpt.reply

    async def deliver(self, sender: bytes, recipients: Sequence[bytes], message: Message, *,
                      size: int | None = None, eight_bit: bool = True) -> list[RecipientResult]:
        """One transaction: each recipient's result, in order.

        Raises ``_Failed`` when the connection broke before every recipient
        had its result, with the results that did come.
        """
        results: list[RecipientResult | None] = [None] * len(recipients)
        smtputf8 = not (sender.isascii() and all(r.isascii() for r in recipients))
        if smtputf8 and not self.conv.offers("SMTPUTF8"):
            return [RecipientResult.of(r, NOT_UTF8) for r in recipients]
        self.started = False
        try:
            await self._deliver(sender, recipients, message, size, eight_bit, smtputf8, results)
        except (OSError, TimeoutError, LMTPProtocolError) as exc:
            self.close()
            raise _Failed(f"{self.target}: {_why(exc)}", not self.used, results, self.started) from None
        done = [r for r in results if r is not None]
        if len(done) != len(results):
            raise _Failed(f"{self.target}: a recipient without a reply", False, results, self.started)
        return done

    async def _deliver(self, sender: bytes, recipients: Sequence[bytes], message: Message, size: int | None,
                       eight_bit: bool, smtputf8: bool, results: list[RecipientResult | None]) -> None:
        conv = self.conv
        timeout = self.command_timeout
        pipelining = conv.offers("PIPELINING")
        mail_line = conv.send_mail(sender, size=size, eight_bit=eight_bit, smtputf8=smtputf8)
        if pipelining:
            self._write(mail_line + b"".join(conv.send_rcpt(r) for r in recipients) + conv.send_data())
        else:
            self._write(mail_line)
        mail = await self._answer(timeout)
        accepted: list[int] = []  # indices of the recipients accepted, in the order of their RCPTs
        for i, recipient in enumerate(recipients):
            if not pipelining:
                if conv.state is not State.MAIL:
                    break
                self._write(conv.send_rcpt(recipient))
            rcpt = await self._answer(timeout)
            if rcpt.reply.code < 300 and mail.reply.code < 300:
                accepted.append(i)
            else:
                # A refused MAIL is the reason every RCPT after it fails.
                results[i] = RecipientResult.of(recipient, mail.reply if mail.reply.code >= 300 else rcpt.reply)
        if mail.reply.code >= 300 and not pipelining:
            for i, recipient in enumerate(recipients):
                results[i] = RecipientResult.of(recipient, mail.reply)
            return
        if not pipelining:
            if not accepted:
                self._write(conv.send_rset())
                await self._answer(timeout)
                return
            self._write(conv.send_data())
        data = await self._answer(timeout)
        if conv.state is not State.BODY:
            for i in accepted:
                results[i] = RecipientResult.of(recipients[i], data.reply)
            return
        self.started = True
        async with asyncio.timeout(self.data_timeout):
            await self._send_message(message)
        # RFC 2033 §4.2: one reply per accepted recipient, in order; each
        # has a wait of its own, since each may be a delivery of its own.
        for i in accepted:
            answer = await self._answer(self.data_timeout)
            results[i] = RecipientResult.of(recipients[i], answer.reply)

    async def _send_message(self, message: Message) -> None:
        conv = self.conv
        if isinstance(message, (bytes, bytearray, memoryview)):
            view = memoryview(message)
            for start in range(0, len(view), _CHUNK):
                self._write(conv.body(view[start : start + _CHUNK]))
                await self._writer.drain()
        elif isinstance(message, AsyncIterable):
            async for chunk in message:
                self._write(conv.body(chunk))
                await self._writer.drain()
        else:
            for chunk in message:
                self._write(conv.body(chunk))
                await self._writer.drain()
        self._write(conv.end_body())
        await self._writer.drain()

    # -- the wire ------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if self._writer.is_closing():
            raise ConnectionResetError("the connection is closed")
        self._writer.write(data)

    async def _answer(self, timeout: float | None = None) -> Answer:
        if timeout is None:
            return await self._read_answer()
        async with asyncio.timeout(timeout):
            return await self._read_answer()

    async def _read_answer(self) -> Answer:
        conv = self.conv
        while True:
            answer = conv.next_event()
            if answer is not None:
                self.used = True
                # A 421 (RFC 5321 §3.8) is the target going away, not a recipient's fate.
                if answer.reply.code == 421 and answer.step is not Step.QUIT:
                    raise LMTPProtocolError(f"421 to {answer.step.name}: {answer.reply.text[:200]}")
                return answer
            if conv.state is State.CLOSED:
                raise LMTPProtocolError("the server closed the connection")
            await self._writer.drain()
            data = await self._reader.read(_CHUNK)
            conv.receive_data(data)


def _said(answer: Answer) -> str:
    return f"{answer.reply.code} {answer.reply.enhanced} {answer.reply.text[:200]}".replace("  ", " ")


def _why(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _wire(address: str | bytes, what: str, allow_empty: bool = False) -> bytes:
    # Checked before any connection is touched: an address that cannot be
    # sent is the caller's error (CommandError, a ValueError), not the target's.
    return encode_address(address, what, allow_empty)


# -- several targets, a pool -------------------------------------------------------


@dataclass
class _Pool:
    idle: list[LMTPConnection] = field(default_factory=list)
    down_until: float = 0.0


class LMTPClient:
    """Deliveries and RCPT-time probes over LMTP, with failover between targets and reused connections."""

    def __init__(self, targets: Sequence[str | Target], *, lhlo_name: str | None = None,
                 connect_timeout: float = 10.0, command_timeout: float = 30.0, data_timeout: float = 300.0,
                 pool_size: int = 2, pool_idle: float = 60.0, retry_after: float = 30.0,
                 max_line: int = MAX_LINE, max_reply: int = MAX_REPLY) -> None:
        if not targets:
            raise ValueError("no LMTP target")
        self.targets = [t if isinstance(t, Target) else parse_target(t) for t in targets]
        self.lhlo_name = lhlo_name or socket.getfqdn()
        if not self.lhlo_name.isascii() or any(c.isspace() for c in self.lhlo_name):
            raise ValueError(f"LHLO name {self.lhlo_name!r} is not a domain")
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.data_timeout = data_timeout
        self.pool_size = pool_size
        self.pool_idle = pool_idle
        self.retry_after = retry_after
        self._limits = (max_line, max_reply)
        self._pools = {t: _Pool() for t in self.targets}

    # -- the API -------------------------------------------------------------------------

    async def deliver(self, sender: str | bytes, recipients: Sequence[str | bytes], message: Message, *,
                      size: int | None = None, eight_bit: bool | None = None) -> list[RecipientResult]:
        """Deliver ``message`` to ``recipients``: one result per recipient, in their order.

        ``size`` (SIZE=, RFC 1870) defaults to the length of a bytes
        message; ``eight_bit`` (BODY=8BITMIME) to whether a bytes message
        has 8-bit octets, and to True for a message given in chunks.  A
        message given in chunks can be sent once only: a failover after it
        was partly sent is not possible, and the target's failure is raised.

        Raises ``LMTPTemporaryError`` when no target gave every recipient a
        result; its ``partial`` holds the results that did come.
        """
        rcpts = [_wire(r, "recipient") for r in recipients]
        from_ = _wire(sender, "sender", allow_empty=True)
        if not rcpts:
            return []
        whole = isinstance(message, (bytes, bytearray, memoryview))
        if isinstance(message, (bytes, bytearray, memoryview)):
            size = len(message) if size is None else size
            if eight_bit is None:
                eight_bit = not (message if not isinstance(message, memoryview) else message.tobytes()).isascii()
        results: list[RecipientResult | None] = [None] * len(rcpts)
        errors: list[str] = []
        failed: Target | None = None
        started = False
        for target in self._order():
            todo = [i for i, r in enumerate(results) if r is None]
            if not todo or (started and not whole):
                # A message given in chunks cannot be read a second time.
                break
            try:
                got = await self._deliver_to(target, from_, [rcpts[i] for i in todo], message, size,
                                             True if eight_bit is None else eight_bit)
            except _Failed as exc:
                for i, result in zip(todo, exc.slots):
                    results[i] = result
                started = started or exc.started
                errors.append(str(exc))
                failed = target
                self._mark_down(target)
                continue
            for i, result in zip(todo, got):
                results[i] = result
        done = [r for r in results if r is not None]
        if len(done) != len(results):
            raise LMTPTemporaryError("; ".join(errors) or "no LMTP target", failed, done)
        return done

    async def _deliver_to(self, target: Target, sender: bytes, recipients: list[bytes], message: Message,
                          size: int | None, eight_bit: bool) -> list[RecipientResult]:
        for attempt in (0, 1):
            conn = await self._acquire(target, fresh=attempt > 0)
            try:
                got = await conn.deliver(sender, recipients, message, size=size, eight_bit=eight_bit)
            except _Failed as exc:
                # A kept connection the server had closed meanwhile: once more, on a fresh one.
                if exc.stale and not attempt:
                    continue
                raise
            except BaseException:
                # Cancelled, or the caller's message failed to read: the conversation is lost.
                conn.close()
                raise
            self._release(conn)
            return got
        raise AssertionError("unreachable")

    async def probe(self, recipient: str | bytes, sender: str | bytes = b"") -> Reply:
        """Would ``recipient`` be accepted now?  MAIL FROM:<>, RCPT, RSET on a kept connection.

        The reply to RCPT is the answer (``550 5.1.1`` unknown user, ``552
        5.2.2``/``452 4.2.2`` over quota with Dovecot's
        ``lmtp_rcpt_check_quota``).  Raises ``LMTPTemporaryError`` when no
        target answers.
        """
        rcpt, from_ = _wire(recipient, "recipient"), _wire(sender, "sender", allow_empty=True)
        errors: list[str] = []
        last: Target | None = None
        for target in self._order():
            for attempt in (0, 1):
                conn = None
                try:
                    conn = await self._acquire(target, fresh=attempt > 0)
                    reply = await conn.probe(rcpt, from_)
                except BaseException as exc:
                    if not isinstance(exc, _Failed):
                        if conn is not None:
                            conn.close()
                        raise
                    if exc.stale and not attempt:
                        continue
                    errors.append(str(exc))
                    last = target
                    self._mark_down(target)
                    break
                self._release(conn)
                return reply
        raise LMTPTemporaryError("; ".join(errors) or "no LMTP target", last)

    def all_down(self) -> bool:
        """Whether every target failed within the last ``retry_after`` seconds."""
        now = asyncio.get_running_loop().time()
        return all(pool.down_until > now for pool in self._pools.values())

    async def close(self) -> None:
        """QUIT every kept connection."""
        conns = [c for pool in self._pools.values() for c in pool.idle]
        for pool in self._pools.values():
            pool.idle.clear()
        await asyncio.gather(*(c.quit() for c in conns))

    async def __aenter__(self) -> "LMTPClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- targets and connections ---------------------------------------------------------

    def _order(self) -> list[Target]:
        """The targets in their order, those that failed lately after the others (RFC 5321 §5.1's spirit)."""
        now = asyncio.get_running_loop().time()
        up = [t for t in self.targets if self._pools[t].down_until <= now]
        return up + [t for t in self.targets if t not in up]

    def _mark_down(self, target: Target) -> None:
        pool = self._pools[target]
        pool.down_until = asyncio.get_running_loop().time() + self.retry_after
        for conn in pool.idle:
            conn.close()
        pool.idle.clear()

    async def _acquire(self, target: Target, fresh: bool = False) -> LMTPConnection:
        pool = self._pools[target]
        now = asyncio.get_running_loop().time()
        while pool.idle and not fresh:
            conn = pool.idle.pop()
            if conn.reusable and now - conn.idle_since < self.pool_idle:
                conn.used = False
                return conn
            conn.close()
        return await LMTPConnection.open(
            target, self.lhlo_name, connect_timeout=self.connect_timeout, command_timeout=self.command_timeout,
            data_timeout=self.data_timeout, max_line=self._limits[0], max_reply=self._limits[1])

    def _release(self, conn: LMTPConnection) -> None:
        pool = self._pools[conn.target]
        pool.down_until = 0.0
        if conn.reusable and len(pool.idle) < self.pool_size:
            conn.idle_since = asyncio.get_running_loop().time()
            pool.idle.append(conn)
        else:
            conn.close()
