"""The sans-IO SMTP session: bytes in, events out; replies in, bytes out.

Rule 1: everything that affects the state machine and its transitions lives
in this file, and the transitions themselves are data (``TRANSITIONS``).

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

After a positive reply to DATA, the session reads message content with the
compiled ``DataReader`` and produces ``MessageChunk`` events (already
dot-unstuffed, owing no reply), then one ``EndOfMessage``.  Only
``<CRLF>.<CRLF>`` ends the data.

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

from ._abnf import parse_mail_argument, parse_rcpt_argument
from .errors import LocalProtocolError, RemoteProtocolError
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

UNKNOWN_COMMAND = Reply(500, "5.5.2", "Error: command not recognized")
LINE_TOO_LONG = Reply(500, "5.5.2", "Error: line too long")
BARE_NEWLINE = Reply(500, "5.5.2", "Error: bare <CR> or <LF> in command line")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Error: too many errors")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Error: too many recipients")
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Error: message exceeds fixed maximum message size")
BARE_LF_REFUSED = Reply(550, "5.5.2", "Error: bare <CR> or <LF> in message content")
UNKNOWN_PARAMETER = Reply(555, "5.5.4", "Error: unsupported MAIL/RCPT parameter")
BAD_PARAMETER = Reply(501, "5.5.4", "Error: bad parameter value")
# RFC 6531 §3.5: a non-ASCII address needs SMTPUTF8 on MAIL.
NEED_SMTPUTF8 = Reply(553, "5.6.7", "Error: non-ASCII address needs SMTPUTF8")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Error: command not implemented")
TLS_ACTIVE = Reply(503, "5.5.1", "Error: TLS already active")
# RFC 3030 §2: a BDAT whose size cannot be read leaves the byte stream with
# no known boundary; the only safe answer is to close (Postfix does too).
BDAT_SYNTAX = Reply(501, "5.5.4", "Syntax: BDAT size [LAST]")
# Another protocol on the SMTP port: a browser or a proxy probe (cross-
# protocol attacks relay these through HTTP clients), or a POP3 client.
# Postfix closes on the same words (smtpd_forbidden_commands); so do we.
NOT_SMTP = Reply(221, "2.7.0", "Error: not an SMTP command; closing")
_FORBIDDEN = frozenset({b"GET", b"POST", b"HEAD", b"PUT", b"CONNECT", b"OPTIONS", b"USER", b"PROXY"})
# RFC 1035 §2.3.4: a domain name is at most 255 octets; an address literal
# is shorter still.  A longer HELO argument is not a name.
MAX_HELO = 255


def _syntax(usage: str) -> Reply:
    return Reply(501, "5.5.4", f"Syntax: {usage}")


_HELO_SYNTAX = _syntax("HELO hostname")
_EHLO_SYNTAX = _syntax("EHLO hostname")
_NO_ARGUMENT = {
    b"DATA": _syntax("DATA"),
    b"RSET": _syntax("RSET"),
    b"QUIT": _syntax("QUIT"),
    b"STARTTLS": _syntax("STARTTLS"),
}


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
    """The transaction being assembled; reset by MAIL, RSET, HELO/EHLO and end of data."""

    __slots__ = ("mail_from", "mail_params", "rcpt_to", "smtputf8", "declared_size")

    def __init__(self) -> None:
        self.mail_from: Address | None = None
        self.mail_params: Params = ()
        self.rcpt_to: list[Address] = []
        self.smtputf8 = False
        self.declared_size = 0


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
        self._lines = LineReader(limits.max_command_line)
        self._data = DataReader(limits.max_message_size, limits.bare_lf == "normalize")
        # Chunks received while in DATA; the reader takes them one per event
        # so that each network read becomes at most one MessageChunk.
        self._data_in: deque[bytes] = deque()
        # True while octets are message content (DATA, or a BDAT chunk)
        # rather than command lines.
        self._raw = False
        self._owed: Event | None = None
        self._eom: EndOfMessage | None = None
        self._eof = False
        #: Set once STARTTLS has been answered 220 (or the listener is
        #: implicit TLS): the server owns the handshake.
        self.tls = False
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
        elif self._raw:
            self._data_in.append(data)
        else:
            self._lines.feed(data)

    def next_event(self) -> Event | type[NEED_DATA] | type[PAUSED]:
        """The next event, ``NEED_DATA``, or ``PAUSED`` while a reply is owed.

        Raises:
            RemoteProtocolError: the peer's input is wrong; send its ``reply``.
        """
        if self._owed is not None or self.state is CLOSED:
            return PAUSED
        if self._raw:
            if self.state is DATA:
                return self._next_data_event()
            return self._next_chunk_event()
        try:
            event = self._next_command()
        except LocalProtocolError as exc:
            self._owed = _FATAL if exc.reply is BDAT_SYNTAX or exc.reply is NOT_SMTP else _REFUSED
            raise exc._reraise_as_remote() from None
        if event is NEED_DATA:
            if self._raw:  # an out-of-order BDAT: its octets come first
                return self._next_chunk_event()
            return ConnectionClosed() if self._eof else NEED_DATA
        if type(event) is Bdat:
            return self._start_chunk(event)  # type: ignore[arg-type]
        self._owed = event  # type: ignore[assignment]
        return event

    def _next_command(self) -> Event | type[NEED_DATA]:
        try:
            line = self._lines.readline()
        except LineTooLong:
            raise LocalProtocolError("command line too long", LINE_TOO_LONG) from None
        if line is None:
            return NEED_DATA
        if self._lines.bare:
            # RFC 5321 §2.3.8: lines end with CRLF only.  Accepting a bare
            # LF here would let a command hide inside another one.
            raise LocalProtocolError("bare CR or LF in a command", BARE_NEWLINE)
        space = line.find(b" ")
        verb = (line if space < 0 else line[:space]).upper()
        parse = _PARSERS.get(verb)
        if parse is None:
            if verb in _FORBIDDEN:
                raise LocalProtocolError(f"not SMTP: {verb!r}", NOT_SMTP)
            raise LocalProtocolError(f"unknown command {line[:16]!r}", UNKNOWN_COMMAND)
        event = parse(self, verb, line[len(verb) :])
        next_state = TRANSITIONS[self.state]
        if type(event) not in next_state:
            reply = ORDER_ERRORS.get((self.state, type(event)), _NEED_MAIL)
            if type(event) is Bdat:
                return self._skip_chunk(event, reply)  # type: ignore[arg-type]
            raise LocalProtocolError("command out of order", reply)
        return event

    def _next_data_event(self) -> Event | type[NEED_DATA]:
        if self._eom is not None:
            event, self._eom = self._eom, None
            self._owed = event
            self._raw = False
            return event
        reader = self._data
        while self._data_in:
            chunk = self._data_in.popleft()
            content, consumed = reader.feed(chunk)
            if reader.done:
                # Whatever follows the terminator is the next commands.
                if consumed < len(chunk):
                    self._lines.feed(chunk[consumed:] if consumed else chunk)
                while self._data_in:
                    self._lines.feed(self._data_in.popleft())
                eom = self._end_of_message()
                if content:
                    self._eom = eom
                    return MessageChunk(content)
                self._owed = eom
                self._raw = False
                return eom
            if content:
                return MessageChunk(content)
        return ConnectionClosed() if self._eof else NEED_DATA

    def _start_chunk(self, event: Bdat) -> Bdat:
        """Enter a BDAT chunk: its octets are content, whatever they contain."""
        if event.first:
            self._bdat_total = 0
        self.state = BDAT
        self._begin_raw(event.size, event.last, None)
        return event

    def _skip_chunk(self, event: Bdat, reply: Reply) -> type[NEED_DATA]:
        """Read and drop an out-of-order chunk, then answer ``reply``."""
        self._begin_raw(event.size, event.last, reply)
        return NEED_DATA  # next_event() continues in _next_chunk_event

    def _begin_raw(self, size: int, last: bool, error: Reply | None) -> None:
        self._chunk_left = self._chunk_size = size
        self._chunk_last = last
        self._chunk_error = error
        self._raw = True
        pending = self._lines.take()
        if pending:
            self._data_in.append(pending)

    def _next_chunk_event(self) -> Event | type[NEED_DATA]:
        limit = self.limits.max_message_size
        while self._chunk_left and self._data_in:
            piece = self._data_in.popleft()
            if len(piece) > self._chunk_left:
                self._data_in.appendleft(piece[self._chunk_left :])
                piece = piece[: self._chunk_left]
            self._chunk_left -= len(piece)
            if self._chunk_error is not None:
                continue
            room = limit - self._bdat_total
            self._bdat_total += len(piece)
            if room > 0:
                return MessageChunk(piece if len(piece) <= room else piece[:room])
        if self._chunk_left:
            return ConnectionClosed() if self._eof else NEED_DATA
        # The chunk is complete; what follows it is command lines again.
        self._raw = False
        while self._data_in:
            self._lines.feed(self._data_in.popleft())
        if self._chunk_error is not None:
            self._owed = _REFUSED
            raise RemoteProtocolError("BDAT out of order", self._chunk_error)
        refusal = MESSAGE_TOO_BIG if self._bdat_total > limit else None
        event: Event
        if self._chunk_last:
            event = EndOfMessage(self._bdat_total, False, refusal)
        else:
            event = EndOfChunk(self._chunk_size, self._bdat_total, refusal)
        self._owed = event
        return event

    def _end_of_message(self) -> EndOfMessage:
        reader = self._data
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
        if reply.code == 421:
            self.state = CLOSED
            return reply.encoded
        if event is None:
            raise RuntimeError(f"no command is waiting for a reply; cannot send {reply}")
        if reply.code >= 400:
            self.errors += 1
        kind = type(event)
        if kind is EndOfMessage or kind is EndOfChunk:
            # The end of a message ends its transaction whatever the reply; a
            # refused chunk ends it too (its data is gone).  An accepted
            # chunk leaves the BDAT transaction open.
            if kind is EndOfMessage or reply.code >= 400:
                self.envelope = Envelope()
                self.state = READY
        elif event is _FATAL:
            self.state = CLOSED
        elif reply.code < 400 and event is not _REFUSED:
            self._apply(event)
        if self.errors >= self.limits.max_errors and self.state is not CLOSED:
            self.state = CLOSED
            return reply.encoded + TOO_MANY_ERRORS.encoded
        return reply.encoded

    def _apply(self, event: Event) -> None:
        kind = type(event)
        target = TRANSITIONS[self.state][kind]
        if kind is RcptTo:
            self.envelope.rcpt_to.append(event.address)  # type: ignore[attr-defined]
        elif kind is MailFrom:
            self._start_transaction(event)  # type: ignore[arg-type]
        elif kind is Data:
            self._data.reset()
            self._raw = True
            pending = self._lines.take()
            if pending:
                # Content a client sent before our 354 is content all the
                # same: the line reader hands over what it had buffered.
                self._data_in.append(pending)
        elif kind is StartTLS:
            # RFC 3207 §4.2: forget everything, including what the client
            # pipelined after STARTTLS in plaintext (CVE-2011-0411): none of
            # it may be executed inside the TLS session.
            self._lines.take()
            self._data_in.clear()
            self.tls = True
            self.helo = None
            self.esmtp = False
            self.envelope = Envelope()
        elif kind is Helo or kind is Ehlo:
            self.helo = event.domain  # type: ignore[attr-defined]
            self.esmtp = kind is Ehlo
            self.envelope = Envelope()
        elif kind is Rset:
            self.envelope = Envelope()
        if target is not None:
            self.state = target

    def _start_transaction(self, event: MailFrom) -> None:
        env = Envelope()
        env.mail_from = event.address
        env.mail_params = event.params
        for key, value in event.params:
            if key == b"SMTPUTF8":
                env.smtputf8 = True
            elif key == b"SIZE":
                env.declared_size = int(value or 0)
        self.envelope = env

    # -- command parsers: each returns an event or raises LocalProtocolError --

    def _parse_helo(self, verb: bytes, arg: bytes) -> Event:
        domain = arg.strip(b" ")
        if not domain or len(domain) > MAX_HELO:
            raise LocalProtocolError("HELO/EHLO needs a domain", _EHLO_SYNTAX if verb == b"EHLO" else _HELO_SYNTAX)
        return Ehlo(domain) if verb == b"EHLO" else Helo(domain)

    def _parse_mail(self, verb: bytes, arg: bytes) -> Event:
        if self.state is not READY:
            # Order first: a nested MAIL is 503 whatever its syntax.
            return MailFrom(None)
        address, params = parse_mail_argument(arg)
        smtputf8 = False
        for key, value in params:
            if key == b"SIZE":
                # RFC 1870 §3: SIZE=<digits>; over the limit is 552 now
                # rather than after the data has been sent.
                if value is None or not value.isdigit() or len(value) > 20:
                    raise LocalProtocolError("bad SIZE", BAD_PARAMETER)
                if int(value) > self.limits.max_message_size:
                    raise LocalProtocolError("SIZE over the limit", MESSAGE_TOO_BIG)
            elif key == b"BODY":
                # RFC 6152: 7BIT or 8BITMIME; we store octets as received.
                if value is None or value.upper() not in (b"7BIT", b"8BITMIME"):
                    raise LocalProtocolError("bad BODY", BAD_PARAMETER)
            elif key == b"SMTPUTF8":
                if value is not None:
                    raise LocalProtocolError("SMTPUTF8 takes no value", BAD_PARAMETER)
                smtputf8 = True
            else:
                raise LocalProtocolError(f"unknown parameter {key!r}", UNKNOWN_PARAMETER)
        if address is not None and address.utf8 and not smtputf8:
            raise LocalProtocolError("non-ASCII sender without SMTPUTF8", NEED_SMTPUTF8)
        return MailFrom(address, params)

    def _parse_rcpt(self, verb: bytes, arg: bytes) -> Event:
        if self.state is not MAIL and self.state is not RCPT:
            return RcptTo(Address(b"", b"", b""))
        if len(self.envelope.rcpt_to) >= self.limits.max_recipients:
            # RFC 5321 §4.5.3.1.10: 452 lets the client send the rest later.
            raise LocalProtocolError("too many recipients", TOO_MANY_RECIPIENTS)
        address, params = parse_rcpt_argument(arg)
        if params:
            raise LocalProtocolError("RCPT takes no parameters here", UNKNOWN_PARAMETER)
        if address.utf8 and not self.envelope.smtputf8:
            raise LocalProtocolError("non-ASCII recipient without SMTPUTF8", NEED_SMTPUTF8)
        return RcptTo(address, params)

    def _parse_bare(self, verb: bytes, arg: bytes) -> Event:
        if arg.strip(b" "):
            raise LocalProtocolError(f"{verb!r} takes no argument", _NO_ARGUMENT[verb])
        return _BARE_EVENTS[verb]

    def _parse_bdat(self, verb: bytes, arg: bytes) -> Event:
        parts = arg.split()
        if (
            not 1 <= len(parts) <= 2
            or not parts[0].isdigit()
            or len(parts[0]) > 18
            or (len(parts) == 2 and parts[1].upper() != b"LAST")
        ):
            raise LocalProtocolError("unreadable BDAT size", BDAT_SYNTAX)
        return Bdat(int(parts[0]), len(parts) == 2, self.state is not BDAT)

    def _parse_starttls(self, verb: bytes, arg: bytes) -> Event:
        if arg.strip(b" "):
            raise LocalProtocolError("STARTTLS takes no argument", _NO_ARGUMENT[b"STARTTLS"])
        if self.tls:
            raise LocalProtocolError("STARTTLS inside TLS", TLS_ACTIVE)
        if not self.limits.starttls:
            raise LocalProtocolError("STARTTLS not configured", NOT_IMPLEMENTED)
        return _STARTTLS

    def _parse_noop(self, verb: bytes, arg: bytes) -> Event:
        return _NOOP  # RFC 5321 §4.1.1.9: NOOP may carry a string; ignored.

    def _parse_vrfy(self, verb: bytes, arg: bytes) -> Event:
        return Vrfy(arg.strip(b" "))

    def _parse_help(self, verb: bytes, arg: bytes) -> Event:
        return Help(arg.strip(b" "))


_NOOP = Noop()
_STARTTLS = StartTLS()
_BARE_EVENTS: dict[bytes, Event] = {b"DATA": Data(), b"RSET": Rset(), b"QUIT": Quit()}
_PARSERS = {
    b"HELO": Session._parse_helo,
    b"EHLO": Session._parse_helo,
    b"MAIL": Session._parse_mail,
    b"RCPT": Session._parse_rcpt,
    b"DATA": Session._parse_bare,
    b"RSET": Session._parse_bare,
    b"QUIT": Session._parse_bare,
    b"NOOP": Session._parse_noop,
    b"VRFY": Session._parse_vrfy,
    b"HELP": Session._parse_help,
    b"BDAT": Session._parse_bdat,
    b"STARTTLS": Session._parse_starttls,
}
