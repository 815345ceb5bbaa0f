"""Milters as a stage: each connection talks to every ``--milter``, in order, at each SMTP step.

Rules of this module:
- ``Milters`` is one worker's configuration; ``MilterSession`` is one
  connection's conversations, opened at connect and closed with it
  (Postfix's smtpd_milters).  Each step asks the milters in order; the
  first that refuses decides the reply, and the rest are not asked.
- A milter's verdict takes effect at its step: continue; accept (not asked
  again for this message, or at connect and HELO for the connection);
  reject ``550 5.7.1``; tempfail ``451 4.7.1``; a reply code of its own;
  discard (the message is acknowledged and dropped, logged and counted);
  quarantine (stored with an X-Quarantine field, into the mailbox's
  .Junk folder when it has one).
- At the end of data the message is read back from the spool
  (``MessageSpool.read``), never held twice: the header fields, then the
  body in packets of at most 65,535 octets.  The fields the milters add
  (``h``, ``i``) are stored above the message, with the trace fields: no
  copy of the message is made for them, which is what rspamd and OpenDKIM
  ask for on every message.  Every other change (change or delete a
  field, replace the body, change the sender, add or remove a recipient)
  is gathered, in the order the milters sent them, into ``rewrite``
  (edits.py's ``Edited``); the transaction makes it to the message before
  it is stored and journaled, so the 250 covers the edited message.
- Each milter sees the message as received; their changes apply one
  after the other.  A change the milter was not granted at negotiation
  is not applied, and is logged and counted (``unapplied``).
- A milter that is down, times out or breaks the protocol gets
  ``--milter-default-action`` for that step and every later one of the
  connection: tempfail (the default, Postfix's), accept (it is skipped),
  or reject.  It is logged once per connection.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import TYPE_CHECKING, Awaitable, Callable, TypeVar

from .._parser_py import FIELD  # one field grammar (RFC 5322 §2.2), header_fields' too
from ..auth.headers import MAX_HEADER_SECTION
from ..events import Address, Reply
from ..metrics import NO_METER, Meter
from ..stages import CONTINUE, Verdict
from .client import MilterConnection, MilterError
from .edits import ACTION_OF, Edited, apply
from .protocol import Action, Modification, Reply as MilterReply

if TYPE_CHECKING:
    from ..config import Config
    from ..hooks import SessionInfo
    from ..store import MessageSpool

__all__ = ["Milters", "MilterSession", "REJECTED", "TEMPFAILED"]

log = logging.getLogger("fastsmtp")

T = TypeVar("T")

# Postfix's words for a milter's r and t verdicts.
REJECTED = Reply(550, "5.7.1", "Command rejected")
TEMPFAILED = Reply(451, "4.7.1", "Service unavailable - try again later")
_DEFAULTS = {"tempfail": TEMPFAILED, "reject": REJECTED}
# Offered to every milter, so that one that asks for them (rspamd, OpenDKIM
# ask for several) still negotiates; the ones not applied yet are logged.
ACTIONS = Action.ADD_HEADERS | Action.QUARANTINE | Action.CHANGE_HEADERS | Action.CHANGE_BODY \
    | Action.CHANGE_FROM | Action.ADD_RCPT | Action.ADD_RCPT_PAR | Action.DELETE_RCPT
_VERDICT = {"a": "accept", "r": "reject", "t": "tempfail", "y": "replycode", "d": "discard"}
_STATUS = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}(?= |$)")


class Milters:
    """The milters of one worker: where they are, their timeouts, the default action."""

    def __init__(self, config: Config, meter: Meter = NO_METER) -> None:
        self.endpoints = tuple(config.milter)
        self.meter = meter
        self.active = bool(self.endpoints)
        self.default = config.milter_default_action
        self.hostname = config.hostname
        self.connect_timeout = config.milter_connect_timeout
        self.command_timeout = config.milter_command_timeout
        self.content_timeout = config.milter_content_timeout
        # A replaced body is held to the size a client's message may have.
        self.change_limit = config.max_message_size + MAX_HEADER_SECTION

    def session(self, tls: list[tuple[str, str]] | None = None) -> "MilterSession":
        session = MilterSession(self)
        session.tls = tls or []
        return session


class _Conversation:
    __slots__ = ("index", "endpoint", "conn", "failed", "off", "done")

    def __init__(self, index: int, endpoint: str) -> None:
        self.index = index  # its place in --milter: the metrics' label
        self.endpoint = endpoint
        self.conn: MilterConnection | None = None
        self.failed = False  # down, timed out, or broke the protocol: the default action from now on
        self.off = False  # accepted the connection, or failed under "accept": not asked again
        self.done = False  # accepted this message: not asked again until the next one


class MilterSession:
    """One connection's conversations with the milters."""

    def __init__(self, milters: Milters) -> None:
        self._milters = milters
        self._convs = [_Conversation(i, e) for i, e in enumerate(milters.endpoints)]
        self._clock = time.monotonic
        self._peer = ""
        #: Set by a milter's discard or quarantine at any step of the message.
        self.discard = False
        self.quarantine: str | None = None
        #: The changes to make before the message is stored (set by ``message``).
        self.rewrite: Edited | None = None
        #: The TLS macros, once the session is encrypted (protocol.py sets them).
        self.tls: list[tuple[str, str]] = []

    # -- the steps (StepCall targets) ----------------------------------------------------

    async def connect(self, peer: str) -> Verdict:
        self._peer = peer
        m = self._milters
        for conv in self._convs:
            try:
                conv.conn = await MilterConnection.open(
                    conv.endpoint, ACTIONS, connect_timeout=m.connect_timeout, command_timeout=m.command_timeout,
                    content_timeout=m.content_timeout, change_limit=m.change_limit)
            except MilterError as exc:
                verdict = self._failed(conv, exc)
                if verdict is not None:
                    return verdict
        macros = [("j", m.hostname), ("{daemon_name}", "fastsmtp"), ("_", f"[{peer}] [{peer}]"),
                  ("{client_addr}", peer), ("{client_name}", "unknown")]
        return await self._each(lambda c: c.connect(b"[" + peer.encode() + b"]", peer, 0, macros), connection=True)

    async def helo(self, info: SessionInfo, domain: str) -> Verdict:
        macros = self.tls if info.tls else []
        return await self._each(lambda c: c.helo(domain.encode("utf-8", "replace"), macros), connection=True)

    async def mail(self, info: SessionInfo, address: Address | None) -> Verdict:
        self.discard, self.quarantine, self.rewrite = False, None, None
        for conv in self._convs:
            conv.done = False
        raw = address.raw if address is not None else b""
        # No {auth_authen}: Postfix defines it only after SASL AUTH, which an
        # MX does not offer, and rspamd takes even an empty one for a logged-in
        # user (auth=pass, and its checks for outside senders skipped).
        macros = [("{mail_addr}", raw.decode("utf-8", "replace"))]
        return await self._each(lambda c: c.mail(raw, (), macros))

    async def rcpt(self, info: SessionInfo, address: Address) -> Verdict:
        macros = [("{rcpt_addr}", address.raw.decode("utf-8", "replace"))]
        return await self._each(lambda c: c.rcpt(address.raw, (), macros))

    async def message(self, spool: MessageSpool) -> Verdict:
        """DATA, the fields, the body from the spool, the end: the verdict, with the fields to add."""
        raw_fields, body_at = _fields(spool)
        fields = [_shown(name, raw) for name, raw in raw_fields if name]
        added: list[bytes] = []
        edits: list[Modification] = []
        for conv in self._convs:
            if conv.off or conv.done or self.discard:
                continue
            fallback, got = await self._ask(conv, lambda c: self._content(c, spool, fields, body_at))
            if fallback is not None:
                return fallback
            if got is None:
                continue
            answer, changes = got
            refusal = self._apply_verdict(conv, answer)
            if refusal is not None:
                return Verdict(refusal)
            if changes:
                added.extend(self._changes(conv, changes, edits, body_at >= 0))
        if edits:
            self.rewrite = apply(raw_fields, edits)
            self.rewrite.body_at = body_at
        return Verdict(None, b"".join(reversed(added))) if added else CONTINUE

    def abort(self) -> None:
        """The message ended without its end of data (RSET, a refusal): each milter forgets it."""
        for conv in self._convs:
            conv.done = False
            if conv.conn is not None and not conv.failed and not conv.off:
                _spawn_abort(conv.conn)
        self.discard, self.quarantine, self.rewrite = False, None, None

    def close(self) -> None:
        for conv in self._convs:
            if conv.conn is not None:
                conv.conn.quit()
                conv.conn = None

    # -- inside --------------------------------------------------------------------------

    async def _content(self, conn: MilterConnection, spool: MessageSpool, fields: list[tuple[bytes, bytes]],
                       body_at: int) -> tuple[MilterReply, list[Modification]]:
        answer = await conn.data()
        if answer is not None and answer.code != "c":
            return answer, []
        for name, value in fields:
            answer = await conn.header(name, value)
            if answer is not None and answer.code != "c":
                return answer, []
        answer = await conn.end_of_headers()
        if answer is not None and answer.code != "c":
            return answer, []
        offset = body_at if body_at >= 0 else 0  # no header section: all of it is body
        while True:
            chunk = spool.read(offset, 65535)
            if not chunk:
                break
            offset += len(chunk)
            answer = await conn.body(chunk)
            if answer is not None:
                return answer, []
        return await conn.end_of_body([("i", spool.queue_id)])

    async def _each(self, step: Callable[[MilterConnection], Awaitable[MilterReply | None]],
                    connection: bool = False) -> Verdict:
        for conv in self._convs:
            if conv.off or conv.done:
                continue
            fallback, answer = await self._ask(conv, step)
            if fallback is not None:
                return fallback
            if answer is None:
                continue  # failed under "accept", or a step it does not want or will not answer
            if answer.code == "a" and connection:
                conv.off = True
                continue
            refusal = self._apply_verdict(conv, answer)
            if refusal is not None:
                return Verdict(refusal)
        return CONTINUE

    async def _ask(self, conv: _Conversation, step: Callable[[MilterConnection], Awaitable[T | None]]
                   ) -> tuple[Verdict | None, T | None]:
        """(the default action's refusal, None) for a milter that failed; else (None, its answer), counted."""
        if conv.failed or conv.conn is None:
            return self._default(conv), None
        started = self._clock()
        try:
            answer = await step(conv.conn)
        except MilterError as exc:
            return self._failed(conv, exc), None
        reply = answer[0] if isinstance(answer, tuple) else answer
        if isinstance(reply, MilterReply):
            self._milters.meter.milter(conv.index, _VERDICT.get(reply.code, "continue"), self._clock() - started)
        return None, answer

    def _apply_verdict(self, conv: _Conversation, answer: MilterReply) -> Reply | None:
        code = answer.code
        if code in ("c", "s", "p"):
            return None
        if code == "a":
            conv.done = True
            return None
        if code == "d":
            self.discard = True
            return None
        if code == "r":
            return REJECTED
        if code == "t":
            return TEMPFAILED
        if code == "y":
            return _reply(answer)
        return None

    def _changes(self, conv: _Conversation, changes: list[Modification], edits: list[Modification],
                 has_header: bool) -> list[bytes]:
        """The fields to store above the message; the other changes go to ``edits``, in order."""
        granted = conv.conn.negotiated.actions if conv.conn is not None else 0
        above: list[Modification] = []
        refused: list[str] = []
        for change in changes:
            if not granted & ACTION_OF.get(change.code, 0):
                refused.append(change.code)
            elif change.code in ("h", "i", "q"):
                above.append(change)
            elif change.code in ("m", "b") and not has_header:
                refused.append(change.code)  # no header section we could show it: nothing to edit safely
            else:
                edits.append(change)
        if refused:
            self._milters.meter.milter_unapplied(conv.index, len(refused))
            log.warning("milter %s: changes %s not applied (not granted, or no header section) for %s",
                        conv.endpoint, "".join(refused), self._peer)
        edited = apply([], above)
        if edited.quarantine is not None:
            self.quarantine = edited.quarantine
            self._milters.meter.milter(conv.index, "quarantine", 0.0)
        return [raw for _, raw in edited.fields]

    def _failed(self, conv: _Conversation, exc: MilterError) -> Verdict | None:
        conv.failed = True
        self._milters.meter.milter_failed(conv.index)
        if conv.conn is not None:
            conv.conn.close()
            conv.conn = None
        log.warning("milter %s failed for %s (%s): %s", conv.endpoint, self._peer or "a client", exc,
                    self._milters.default)
        return self._default(conv)

    def _default(self, conv: _Conversation) -> Verdict | None:
        reply = _DEFAULTS.get(self._milters.default)
        if reply is None:  # accept: the milter is skipped for the rest of the connection
            conv.off = True
            return None
        return Verdict(reply)


def _reply(answer: MilterReply) -> Reply:
    """A milter's own reply: its code, the enhanced status if it gave one, its lines."""
    lines = answer.text.split("\r\n")
    rest = [line[4:] if len(line) > 3 and line[:3].isdigit() else line for line in lines[1:]]
    first = lines[0]
    status = _STATUS.match(first)
    enhanced = status.group() if status else ("5.7.1" if answer.smtp_code >= 500 else "4.7.1")
    text = first[status.end():].lstrip() if status else first
    rest = [_STATUS.sub("", line, count=1).lstrip() for line in rest]
    return Reply(answer.smtp_code, enhanced, "\n".join([text or "Command rejected", *rest]))


def _fields(spool: MessageSpool) -> tuple[list[tuple[bytes, bytes]], int]:
    """The message's header fields (name, the field as stored, CRLF included), and where the body starts.

    Our Return-Path, the first line, is left out (it is the mailbox's, not
    the message's); our Received field is in, as Postfix shows its own to
    milters.  A line that is no field (RFC 5322 §2.2) comes with the name
    b"": never shown to a milter, but kept, so that a header rebuilt from
    these fields loses nothing.  Where the message has no header section
    we can show (none, or one over MAX_HEADER_SECTION), there are no fields
    and the body start is -1.
    """
    head = b""
    while b"\r\n\r\n" not in head and len(head) < MAX_HEADER_SECTION:
        piece = spool.read(len(head), 65536)
        if not piece:
            break
        head += piece
    end = head.find(b"\r\n\r\n")
    if end < 0:
        return [], -1
    fields: list[tuple[bytes, bytes]] = []
    pos, stop = 0, end + 2
    while pos < stop:
        m = FIELD.match(head, pos, stop)
        if m is None:
            line_end = head.index(b"\r\n", pos) + 2
            fields.append((b"", head[pos:line_end]))
            pos = line_end
        else:
            if pos or m.group(1).lower() != b"return-path":
                fields.append((m.group(1), m.group()))
            pos = m.end()
    return fields, end + 4


def _shown(name: bytes, raw: bytes) -> tuple[bytes, bytes]:
    """A field as libmilter sends it: its value without the final CRLF or the space after the colon."""
    value = raw[raw.index(b":") + 1 : -2]  # folding kept
    return name, value[1:] if value[:1] == b" " else value


def _spawn_abort(conn: MilterConnection) -> None:
    task = asyncio.get_running_loop().create_task(conn.abort())
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
