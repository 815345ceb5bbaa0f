"""The sans-IO SMTP session: bytes in, events out; replies in, bytes out.

Rule 1: everything that affects the state machine and its transitions lives
in this file, and the transitions themselves are data (``TRANSITIONS``).
The command parsers (commands.py) are pure functions of a line: they make
events and refusals, and never see the state.

Rule 2: no I/O.  This module imports no socket, loop, clock or file module;
``receive_data(b"")`` means end of input.

Theory of operation
-------------------
The server feeds every received chunk to ``receive_data()`` and then calls
``next_event()`` until it returns ``NEED_DATA`` (more bytes are needed) or
``PAUSED`` (a command is still waiting for its reply).  Each command event
owes exactly one reply, given with ``send(reply)``, which returns the bytes
to write.  At most one command awaits its reply at any time, so bytes that a
pipelining client (RFC 2920) sent ahead simply wait in the buffer; the
server still answers a whole batch of them with one write, because it only
writes when ``next_event()`` says ``NEED_DATA``.

The reply decides the transition: a positive reply (2xx, or 354 to DATA)
moves to ``TRANSITIONS[state][type(event)]``; a 4xx/5xx leaves the state
alone, so a refused RCPT does not advance the transaction.  The one
exception is ``EndOfMessage``: any reply to it ends the transaction
(RFC 5321 §4.1.1.4), and the session returns to ``READY``.

Command-order and syntax errors are raised from ``next_event()`` as
``RemoteProtocolError`` carrying the reply to send; the server passes that
reply to ``send()`` like any other.  Any other exception out of
``next_event()`` is a bug.

A command line goes: verb -> event type (``commands.VERBS``); the
transition table says whether that type is in order in this state; then
the pure parser turns the argument into the event.  MAIL and RCPT out of
order are 503 before their argument is read; any other command out of
order has its argument checked first (``DATA now`` is 501 in any state),
and BDAT must be parsed anyway, to skip its octets.

Framing is a reader chosen by state (``READERS[state]``, as in h11): command
lines, DATA content, or (picked by a ``Bdat`` event) a chunk's octets.
Bytes received but not read wait for the current reader, and ``_use()`` is
the one place that hands them to the next one.  After a positive reply to
DATA the content reader (the compiled ``DataReader``) produces
``MessageChunk`` events (already dot-unstuffed, owing no reply), then one
``EndOfMessage``.  Only ``<CRLF>.<CRLF>`` ends the data.  What follows it
goes back to the line reader with the reply to ``EndOfMessage``.

BDAT (RFC 3030) is the one command whose reply follows its payload: the
session yields ``Bdat`` (owing nothing), the chunk's octets as
``MessageChunk`` events, then ``EndOfChunk`` (or ``EndOfMessage`` for LAST),
which owes the reply.  The octets are counted, never parsed, so nothing in
them can end a message early.  A BDAT out of order still has its octets
read and dropped before its 503, or the byte stream would be lost.

STARTTLS (RFC 3207): a 220 to it discards everything the client sent after
the command (CVE-2011-0411) and resets the session to GREETED; the server
then runs the TLS handshake and the client starts over with EHLO.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable

# The replies of command syntax live with their parsers, in commands.py.
from .commands import (
    BDAT_SYNTAX,
    FORBIDDEN,
    MESSAGE_TOO_BIG,
    NEED_SMTPUTF8,
    NOT_SMTP,
    PARSERS,
    UNKNOWN_COMMAND,
    VERBS,
    parse_bdat,
    parse_mail,
    parse_rcpt,
    parse_starttls,
)
from .errors import LocalProtocolError
from .events import (
    Address,
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
    Params,
    Quit,
    RcptTo,
    Reply,
    Rset,
    StartTLS,
    Vrfy,
)
from .parser import DataReader, LineReader, LineTooLong

__all__ = [
    "Session",
    "Limits",
    "Envelope",
    "State",
    "GREETED",
    "READY",
    "MAIL",
    "RCPT",
    "DATA",
    "BDAT",
    "CLOSED",
    "NEED_DATA",
    "PAUSED",
    "TRANSITIONS",
    "READERS",
]


class _SentinelType(type):
    def __repr__(cls) -> str:
        return cls.__name__


class Sentinel(metaclass=_SentinelType):
    """States and markers are classes: compared with ``is``, printing their name."""

    def __init__(self) -> None:
        raise TypeError("sentinels are not instantiated")


class State(Sentinel):
    pass


class GREETED(State):
    """Connected and greeted; no HELO/EHLO yet."""


class READY(State):
    """HELO/EHLO done, no transaction open."""


class MAIL(State):
    """MAIL accepted, no recipient yet."""


class RCPT(State):
    """At least one recipient accepted."""


class DATA(State):
    """Reading message content after 354."""


class BDAT(State):
    """A BDAT transaction between (or inside) chunks, before LAST."""


class CLOSED(State):
    """QUIT answered, or a 421 sent: the server closes the connection."""


class NEED_DATA(Sentinel):
    pass


class PAUSED(Sentinel):
    pass


# What a positive reply to each command does, per state.  A command that is
# not listed for the current state is out of order (503 5.5.1,
# RFC 5321 §4.1.4).  EHLO/HELO in a transaction reset it (§4.1.4), RSET
# leaves GREETED alone (no HELO has happened yet).
_ANYTIME = {Noop: None, Vrfy: None, Help: None, Quit: CLOSED}
_RESET = {Helo: READY, Ehlo: READY, Rset: READY}
TRANSITIONS: dict[type[State], dict[type[Event], type[State] | None]] = {
    GREETED: {Helo: READY, Ehlo: READY, Rset: GREETED, **_ANYTIME},
    # STARTTLS only outside a transaction, and back to GREETED (RFC 3207 §4.2).
    READY: {**_RESET, MailFrom: MAIL, StartTLS: GREETED, **_ANYTIME},
    MAIL: {**_RESET, RcptTo: RCPT, **_ANYTIME},
    RCPT: {**_RESET, RcptTo: RCPT, Data: DATA, Bdat: BDAT, **_ANYTIME},
    DATA: {},
    # RFC 3030 §2: once BDAT has started, only more BDAT (or a reset).
    BDAT: {**_RESET, Bdat: BDAT, **_ANYTIME},
    CLOSED: {},
}
# ``None`` above means "stay in the current state".  Bdat moves when it is
# read, not when answered: its reply comes after its octets.

_NEED_HELO = Reply(503, "5.5.1", "Error: send HELO/EHLO first")
_NESTED_MAIL = Reply(503, "5.5.1", "Error: nested MAIL command")
_NEED_MAIL = Reply(503, "5.5.1", "Error: need MAIL command")
_NEED_RCPT = Reply(503, "5.5.1", "Error: need RCPT command")
_NO_RCPT = Reply(503, "5.5.1", "Error: no valid recipients")
_IN_TRANSACTION = Reply(503, "5.5.1", "Error: MAIL transaction in progress")
_ONLY_BDAT = Reply(503, "5.5.1", "Error: only BDAT may follow BDAT")
ORDER_ERRORS: dict[tuple[type[State], type[Event]], Reply] = {
    (GREETED, MailFrom): _NEED_HELO,
    (GREETED, StartTLS): _NEED_HELO,
    (GREETED, RcptTo): _NEED_MAIL,
    (GREETED, Data): _NEED_MAIL,
    (GREETED, Bdat): _NEED_MAIL,
    (READY, RcptTo): _NEED_MAIL,
    (READY, Data): _NEED_MAIL,
    (READY, Bdat): _NEED_MAIL,
    (MAIL, MailFrom): _NESTED_MAIL,
    (MAIL, Data): _NO_RCPT,
    (MAIL, Bdat): _NO_RCPT,
    (MAIL, StartTLS): _IN_TRANSACTION,
    (RCPT, MailFrom): _NESTED_MAIL,
    (RCPT, StartTLS): _IN_TRANSACTION,
    (BDAT, MailFrom): _NESTED_MAIL,
    (BDAT, RcptTo): _ONLY_BDAT,
    (BDAT, Data): _ONLY_BDAT,
    (BDAT, StartTLS): _IN_TRANSACTION,
}

LINE_TOO_LONG = Reply(500, "5.5.2", "Error: line too long")
#: The longest command line without CRLF for every command but MAIL and
#: RCPT (RFC 5321 §4.5.3.1.4: 512 octets with it).
MAX_PLAIN_LINE = 512 - 2
BARE_NEWLINE = Reply(500, "5.5.2", "Error: bare <CR> or <LF> in command line")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Error: too many errors")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Error: too many recipients")
BARE_LF_REFUSED = Reply(550, "5.5.2", "Error: bare <CR> or <LF> in message content")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Error: command not implemented")
TLS_ACTIVE = Reply(503, "5.5.1", "Error: TLS already active")
# The commands whose order is checked before their argument: a MAIL or RCPT
# argument means nothing outside its transaction, so a nested MAIL is 503
# whatever its syntax.  Every other command out of order has its argument
# read first: a line that is not the command's syntax (``DATA now``) is a
# 501, and an out-of-order BDAT's size is needed to skip its octets.
_ORDER_FIRST = (MailFrom, RcptTo)
# The commands whose positive reply does more than move the state (Session._apply).
_EFFECTS = frozenset({RcptTo, MailFrom, Data, Helo, Ehlo, Rset, StartTLS})


class _Refused(Event):
    """Marks a command answered by a protocol error: its reply changes nothing."""

    __slots__ = ()


class _Fatal(Event):
    """Marks a command whose error reply must also end the session."""

    __slots__ = ()


_REFUSED = _Refused()
_FATAL = _Fatal()


@dataclass(frozen=True, slots=True)
class Limits:
    """The session's share of the configuration (DESIGN principle 5)."""

    max_command_line: int = 1024
    max_message_size: int = 25 * 1024 * 1024
    max_recipients: int = 100
    max_errors: int = 20
    #: "reject": a message with a bare CR or LF is refused after its end
    #: (550 5.5.2); "normalize": stored with CRLF instead.
    bare_lf: str = "reject"
    #: Whether STARTTLS can be offered (a certificate is configured).
    starttls: bool = False


class Envelope:
    """The transaction being assembled; a new one after each transaction ends.

    Outside a transaction (GREETED, READY) the envelope is always a fresh
    one: MAIL fills it in place, and only the end of a transaction (end of
    data, RSET, HELO/EHLO, a refused chunk) replaces it.  Whoever kept the
    envelope of a transaction that ended keeps it unchanged.
    """

    __slots__ = ("mail_from", "mail_params", "rcpt_to", "smtputf8", "declared_size")

    def __init__(self) -> None:
        self.mail_from: Address | None = None
        self.mail_params: Params = ()
        self.rcpt_to: list[Address] = []
        self.smtputf8 = False
        self.declared_size = 0


#: A reader takes the session's buffered input and returns the next event.
Reader = Callable[["Session"], "Event | type[NEED_DATA] | type[PAUSED]"]


class Session:
    """One SMTP server session, without I/O.  See the module docstring."""

    def __init__(self, limits: Limits = Limits()) -> None:
        self.limits = limits
        self.state: type[State] = GREETED
        #: The HELO/EHLO argument, and whether it was EHLO.
        self.helo: bytes | None = None
        self.esmtp = False
        self.envelope = Envelope()
        #: Error replies sent so far (RFC 5321 §4.5.3.2 leaves the policy to
        #: the server; Postfix counts every 4xx/5xx).
        self.errors = 0
        #: Set once STARTTLS has been answered 220 (or the listener is
        #: implicit TLS): the server owns the handshake.
        self.tls = False
        # Input not read yet waits in one of two places: command lines in
        # the LineReader (its CRLF search resumes where it stopped), content
        # and chunk octets in _pending, whole as received, so that each
        # network read becomes at most one MessageChunk.  _use() moves it.
        self._lines = LineReader(limits.max_command_line)
        self._pending: deque[bytes] = deque()
        self._reader: Reader = _read_command
        self._data: DataReader | None = None  # made at the first DATA
        self._owed: Event | None = None
        self._eom: EndOfMessage | None = None
        self._eof = False
        # The BDAT chunk being read: octets still to come, its size, whether
        # it is LAST, the message size so far, and the reply it will get if
        # it was out of order (its octets are read and dropped first).
        self._chunk_left = 0
        self._chunk_size = 0
        self._chunk_last = False
        self._chunk_error: Reply | None = None
        self._bdat_total = 0

    # -- input ---------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Add received bytes; ``b""`` means the peer closed its side."""
        if not data:
            self._eof = True
        elif self._reader is _read_command:
            self._lines.feed(data)
        elif self._reader is not _read_nothing:
            self._pending.append(data)

    def next_event(self) -> Event | type[NEED_DATA] | type[PAUSED]:
        """The next event, ``NEED_DATA``, or ``PAUSED`` while a reply is owed.

        Raises:
            RemoteProtocolError: the peer's input is wrong; send its ``reply``.
        """
        if self._owed is not None:
            return PAUSED
        reader = self._reader
        try:
            # A call site of its own for the hot readers: one that always
            # calls the same function stays specialized (CPython 3.11+).
            if reader is _read_command:
                return _read_command(self)
            return reader(self)
        except LocalProtocolError as exc:
            reply = exc.reply
            self._owed = _FATAL if reply is BDAT_SYNTAX or reply is NOT_SMTP else _REFUSED
            raise exc._reraise_as_remote() from None

    def _use(self, reader: Reader) -> None:
        """Make ``reader`` the reader, handing it the input not read yet.

        The one place where leftover bytes pass from one reader to the next:
        the readers themselves only ever put back, at the front of
        ``_pending``, what they took from it and did not consume.
        """
        old = self._reader
        self._reader = reader
        if (old is _read_command) is (reader is _read_command):
            return  # the same buffer: content and chunks never meet
        if reader is _read_command:
            lines, pending = self._lines, self._pending
            while pending:
                lines.feed(pending.popleft())
        else:
            # Content a client sent before our 354 (or a chunk's octets
            # pipelined with its BDAT) is content all the same.
            rest = self._lines.take()
            if rest:
                self._pending.append(rest)

    def _discard_input(self) -> None:
        self._lines.take()
        self._pending.clear()

    # -- commands --------------------------------------------------------------

    def _out_of_order(self, kind: type[Event], arg: bytes) -> Event | type[NEED_DATA] | type[PAUSED]:
        reply = ORDER_ERRORS.get((self.state, kind), _NEED_MAIL)
        if kind not in _ORDER_FIRST:
            parse = PARSERS.get(kind)
            event = parse(arg) if parse is not None else self._parse(kind, arg)  # syntax first
            if kind is Bdat:
                # RFC 3030 §2: the octets follow whatever the answer; read
                # and drop them, then answer 503.
                self._begin_chunk(event, reply)  # type: ignore[arg-type]
                return _read_chunk(self)
        raise LocalProtocolError("command out of order", reply)

    def _parse(self, kind: type[Event], arg: bytes) -> Event:
        """A command not in ``PARSERS``: its pure parser, and around it the session's facts.

        The size limit is passed to MAIL's parser (its SIZE check sits among
        the parameter checks); the recipient count is checked before RCPT's
        argument (452 whatever the syntax, RFC 5321 §4.5.3.1.10), SMTPUTF8
        after it; TLS after STARTTLS's, TLS active coming first.
        """
        if kind is MailFrom:
            return parse_mail(arg, self.limits.max_message_size)
        if kind is Bdat:
            return parse_bdat(arg, self.state is not BDAT)
        if kind is RcptTo:
            envelope = self.envelope
            if len(envelope.rcpt_to) >= self.limits.max_recipients:
                raise LocalProtocolError("too many recipients", TOO_MANY_RECIPIENTS)
            event = parse_rcpt(arg)
            if event.address.utf8 and not envelope.smtputf8:
                # RFC 6531 §3.5: only in a transaction that gave SMTPUTF8.
                raise LocalProtocolError("non-ASCII recipient without SMTPUTF8", NEED_SMTPUTF8)
            return event
        starttls = parse_starttls(arg)
        if self.tls:
            raise LocalProtocolError("STARTTLS inside TLS", TLS_ACTIVE)
        if not self.limits.starttls:
            raise LocalProtocolError("STARTTLS not configured", NOT_IMPLEMENTED)
        return starttls

    def _start_chunk(self, event: Bdat) -> Bdat:
        """Enter a BDAT chunk: its octets are content, whatever they contain."""
        if event.first:
            self._bdat_total = 0
        self.state = BDAT  # Bdat moves when read: its reply follows its octets
        self._begin_chunk(event, None)
        return event

    def _begin_chunk(self, event: Bdat, error: Reply | None) -> None:
        self._chunk_left = self._chunk_size = event.size
        self._chunk_last = event.last
        self._chunk_error = error
        self._use(_read_chunk)

    def _end_of_message(self, reader: DataReader) -> EndOfMessage:
        bare = reader.bare_lf or reader.bare_cr
        refusal = None
        if reader.oversize:
            # RFC 5321 §4.2.5 / RFC 1870 §6: the data was read to its end and
            # dropped; the answer comes now.
            refusal = MESSAGE_TOO_BIG
        elif bare and self.limits.bare_lf == "reject":
            refusal = BARE_LF_REFUSED
        return EndOfMessage(reader.size, bare, refusal)

    # -- output --------------------------------------------------------------

    def send(self, reply: Reply) -> bytes:
        """Answer the owed command (or send an unsolicited 421); return the bytes to write.

        A 421 always closes the session (RFC 5321 §3.8).
        """
        event = self._owed
        self._owed = None
        code = reply.code
        if code == 421:
            self._close()
            return reply.encoded
        if event is None:
            raise RuntimeError(f"no command is waiting for a reply; cannot send {reply}")
        if event is _FATAL:
            self.errors += code >= 400
            self._close()
            return reply.encoded
        kind = type(event)
        if code < 400:
            if kind is EndOfMessage:
                self._end_transaction()
            elif kind is EndOfChunk:
                self._use(_read_command)  # the BDAT transaction stays open
            elif event is _REFUSED:
                # A refusal answered positively changes nothing, but a chunk
                # read to be refused still hands over what follows it.
                self._use(READERS[self.state])
            else:
                # The transition, as TRANSITIONS says; then what the command
                # does, for the commands that do something.
                target = TRANSITIONS[self.state][kind]
                if kind in _EFFECTS:
                    self._apply(event, kind)
                if target is not None:
                    self.state = target
                    reader = READERS[target]
                    if reader is not self._reader:
                        self._use(reader)
            return reply.encoded
        self.errors += 1
        # Any reply to the end of a message ends its transaction; a refused
        # chunk ends it too (its data is gone).
        if kind is EndOfMessage or kind is EndOfChunk:
            self._end_transaction()
        if self.errors >= self.limits.max_errors:
            self._close()
            return reply.encoded + TOO_MANY_ERRORS.encoded
        if self._reader is not _read_command:
            self._use(READERS[self.state])  # after a chunk read to be refused
        return reply.encoded

    def _end_transaction(self) -> None:
        self.envelope = Envelope()
        self.state = READY
        self._use(_read_command)

    def _close(self) -> None:
        # Nothing is read after this, so nothing is kept either.
        self.state = CLOSED
        self._discard_input()
        self._reader = _read_nothing

    def _apply(self, event: Event, kind: type[Event]) -> None:
        """A positive reply: what the command does, before its transition."""
        state = self.state
        if kind is RcptTo:
            self.envelope.rcpt_to.append(event.address)  # type: ignore[attr-defined]
        elif kind is MailFrom:
            self._start_transaction(event)  # type: ignore[arg-type]
        elif kind is Data:
            if self._data is None:
                limits = self.limits
                self._data = DataReader(limits.max_message_size, limits.bare_lf == "normalize")
            else:
                self._data.reset()
        elif kind is Helo or kind is Ehlo:
            self.helo = event.domain  # type: ignore[attr-defined]
            self.esmtp = kind is Ehlo
            if state is not GREETED and state is not READY:
                self.envelope = Envelope()  # RFC 5321 §4.1.4: a reset
        elif kind is Rset:
            if state is not GREETED and state is not READY:
                self.envelope = Envelope()
        elif kind is StartTLS:
            # RFC 3207 §4.2: forget everything, including what the client
            # pipelined after STARTTLS in plaintext (CVE-2011-0411): none of
            # it may be executed inside the TLS session.  STARTTLS is only
            # in order in READY, so the envelope is a fresh one already.
            self._discard_input()
            self.tls = True
            self.helo = None
            self.esmtp = False

    def _start_transaction(self, event: MailFrom) -> None:
        # MAIL is only in order in READY, where the envelope is a fresh one.
        env = self.envelope
        env.mail_from = event.address
        env.mail_params = event.params
        env.declared_size = event.size
        env.smtputf8 = event.smtputf8


# -- readers: READERS[state] reads the input -----------------------------------
# Plain functions of the session: it keeps the current one in _reader, calls
# it from next_event() and compares it by identity.


def _read_command(session: Session) -> Event | type[NEED_DATA] | type[PAUSED]:
    lines = session._lines
    try:
        line = lines.readline()
    except LineTooLong:
        raise LocalProtocolError("command line too long", LINE_TOO_LONG) from None
    if line is None:
        return ConnectionClosed() if session._eof else NEED_DATA
    if lines.bare:
        # RFC 5321 §2.3.8: lines end with CRLF only.  Accepting a bare
        # LF here would let a command hide inside another one.
        raise LocalProtocolError("bare CR or LF in a command", BARE_NEWLINE)
    space = line.find(b" ")
    word = line if space < 0 else line[:space]
    kind = VERBS.get(word)
    if kind is None:  # RFC 5321 §2.4: verbs are case-insensitive
        upper = word.upper()
        kind = VERBS.get(upper)
        if kind is None:
            if upper in FORBIDDEN:
                raise LocalProtocolError(f"not SMTP: {upper!r}", NOT_SMTP)
            raise LocalProtocolError(f"unknown command {line[:16]!r}", UNKNOWN_COMMAND)
    if len(line) > MAX_PLAIN_LINE and kind is not MailFrom and kind is not RcptTo:
        # RFC 5321 §4.5.3.1.4: a command line is at most 512 octets, CRLF
        # included.  Only MAIL and RCPT take extension parameters, and with
        # them the allowance of §4.5.3.1 (--max-command-line); the rest
        # have no reason to be longer.
        raise LocalProtocolError(f"{kind.__name__} line of {len(line) + 2} octets", LINE_TOO_LONG)
    arg = b"" if space < 0 else line[space:]
    # The transition table alone says whether the command is in order.
    if kind not in TRANSITIONS[session.state]:
        return session._out_of_order(kind, arg)
    parse = PARSERS.get(kind)
    if parse is not None:
        event = parse(arg)
    else:
        event = session._parse(kind, arg)
        if kind is Bdat:
            return session._start_chunk(event)  # type: ignore[arg-type]
    session._owed = event
    return event


def _read_content(session: Session) -> Event | type[NEED_DATA] | type[PAUSED]:
    # After the 354: content up to <CRLF>.<CRLF>, one MessageChunk per
    # network read, then EndOfMessage.
    if session._eom is not None:
        event, session._eom = session._eom, None
        session._owed = event
        return event
    reader = session._data
    assert reader is not None
    pending = session._pending
    while pending:
        chunk = pending.popleft()
        content, consumed = reader.feed(chunk)
        if reader.done:
            if consumed < len(chunk):
                # What follows the terminator is the next commands; the
                # reply to EndOfMessage hands them to the line reader.
                pending.appendleft(chunk[consumed:] if consumed else chunk)
            eom = session._end_of_message(reader)
            if content:
                session._eom = eom
                return MessageChunk(content)
            session._owed = eom
            return eom
        if content:
            return MessageChunk(content)
    return ConnectionClosed() if session._eof else NEED_DATA


def _read_chunk(session: Session) -> Event | type[NEED_DATA] | type[PAUSED]:
    # A BDAT chunk: exactly its size in octets, counted, never parsed.
    limit = session.limits.max_message_size
    pending = session._pending
    while session._chunk_left and pending:
        piece = pending.popleft()
        if len(piece) > session._chunk_left:
            pending.appendleft(piece[session._chunk_left :])
            piece = piece[: session._chunk_left]
        session._chunk_left -= len(piece)
        if session._chunk_error is not None:
            continue
        room = limit - session._bdat_total
        session._bdat_total += len(piece)
        if room > 0:
            return MessageChunk(piece if len(piece) <= room else piece[:room])
    if session._chunk_left:
        return ConnectionClosed() if session._eof else NEED_DATA
    # The chunk is complete; the reply to it hands what follows to the
    # line reader.
    if session._chunk_error is not None:
        raise LocalProtocolError("BDAT out of order", session._chunk_error)
    refusal = MESSAGE_TOO_BIG if session._bdat_total > limit else None
    event: Event
    if session._chunk_last:
        event = EndOfMessage(session._bdat_total, False, refusal)
    else:
        event = EndOfChunk(session._chunk_size, session._bdat_total, refusal)
    session._owed = event
    return event


def _read_nothing(session: Session) -> type[PAUSED]:
    return PAUSED  # CLOSED: nothing more is read


#: Which reader takes the input in each state (h11's READERS).  DATA reads
#: content up to its end; CLOSED reads nothing; every other state reads
#: command lines.  A BDAT chunk's octets follow the command in any state (an
#: out-of-order chunk is read and dropped), so the Bdat event picks the
#: chunk reader; the reply to the chunk goes back to READERS[state].
READERS: dict[type[State] | type[Event], Reader] = {
    GREETED: _read_command,
    READY: _read_command,
    MAIL: _read_command,
    RCPT: _read_command,
    BDAT: _read_command,
    DATA: _read_content,
    CLOSED: _read_nothing,
    Bdat: _read_chunk,
}
