"""LMTP (RFC 2033), the client's side, sans-IO: commands out, replies in, one state machine.

Rule 1: everything that affects the conversation's state lives in this
file, and the transitions made by what the client sends are data
(``SEND``); those made by replies are in ``_answered``, in one place.

Rule 2: no I/O.  No socket, loop or clock: ``receive_data(bytes)`` takes
what the server sent (``b""`` means it closed), ``next_event()`` gives the
replies back one at a time as ``Answer``s, and every ``send_*`` returns
the octets to write.

Rule 3: the server is a peer we do not trust.  A reply line is at most
``max_line`` octets and a whole reply at most ``max_reply``; a line that
is not ``DDD[-| ]text<CRLF>``, a multi-line reply that changes its code, a
reply nobody asked for, a ``354`` to DATA without an accepted recipient
(RFC 2033 §4.2 says that DATA MUST then fail with 503), or the connection
closing while replies are owed, is an ``LMTPProtocolError``, never another
exception, and the conversation is then in ``ERROR``.  Memory is bounded
by those limits whatever the server sends.

Theory of operation
-------------------
Replies come in the order of the commands (RFC 2920 §3), so the
conversation keeps a queue of what is owed, ``(step, recipient)``, and
gives each reply to the head of that queue.  The client may pipeline a
whole transaction, MAIL, its RCPTs and DATA, in one write when the server
advertised PIPELINING; it learns the fate of each from the answers, and
the state follows the replies: a refused MAIL ends the transaction (the
RCPTs and DATA after it get their 503s), a ``354`` opens the body, any
other reply to DATA ends the transaction.

The one LMTP difference from SMTP (RFC 2033 §4.2): after the final dot the
server sends one reply per RCPT it accepted, in the order of the RCPTs,
each the delivery status of that recipient.  The conversation therefore
remembers the accepted recipients and, after ``end_body()``, owes one
``Step.DELIVERY`` answer per recipient, carrying the recipient it is for.

A new transaction (MAIL) starts only when no reply is owed: at most one
transaction is in flight, so a reply always belongs to the current one.
A ``421`` answer to anything means the server is closing (RFC 5321 §3.8):
nothing more is owed, and the state is ``CLOSED``.

Dot-stuffing: fastsmtp's parser (parser.py, ``DataReader``) only undoes
it, so the stuffing for sending lives here (``DotStuffer``).  A dot after
*every* LF is doubled, not only after CRLF: Dovecot's LMTP reader takes a
bare LF as the end of a line, so an unstuffed ``<LF>.<CRLF>`` would end the
message early there (SMTP smuggling, one hop further); content with bare
LFs does not reach this module from fastsmtp's store by default
(DESIGN.md: refused, or normalized to CRLF).
"""

from __future__ import annotations

import enum
import re
from collections import deque
from dataclasses import dataclass

from ..events import Reply

__all__ = [
    "LMTPProtocolError", "CommandError", "State", "Step", "Answer", "SEND", "MAX_LINE", "MAX_REPLY",
    "ReplyReader", "DotStuffer", "dot_stuff", "encode_address", "Conversation",
]

#: The longest reply line we read, CRLF included.  RFC 5321 §4.5.3.1.5
#: allows 512; Dovecot stays well inside it, and the slack costs nothing.
MAX_LINE = 2048
#: The largest whole reply (a multi-line LHLO answer is the largest one).
MAX_REPLY = 16384


class LMTPProtocolError(Exception):
    """The server said something LMTP does not allow (or closed early): the conversation is over."""


class CommandError(ValueError):
    """The caller asked for a command that cannot be sent now, or an argument that cannot be sent at all."""


class State(enum.Enum):
    GREETING = "GREETING"  # connected; the server's greeting is owed
    HELLO = "HELLO"  # greeted with 220: LHLO may be sent
    REFUSED = "REFUSED"  # greeted with something else: only QUIT is left (RFC 5321 §3.1)
    LHLO = "LHLO"  # LHLO sent, its reply owed
    READY = "READY"  # LHLO accepted: MAIL, RSET or QUIT
    MAIL = "MAIL"  # MAIL sent (and maybe RCPTs): RCPT, DATA, RSET or QUIT
    DATA = "DATA"  # DATA sent: its 354 is owed
    BODY = "BODY"  # 354 read: the message is to be sent now
    DELIVERY = "DELIVERY"  # final dot sent: one reply per accepted RCPT is owed
    QUIT = "QUIT"  # QUIT sent
    CLOSED = "CLOSED"  # QUIT answered, a 421, or the server closed with nothing owed
    ERROR = "ERROR"  # the server broke the protocol


class Step(enum.Enum):
    """What a reply answers."""

    GREETING = "GREETING"
    LHLO = "LHLO"
    MAIL = "MAIL"
    RCPT = "RCPT"
    DATA = "DATA"
    DELIVERY = "DELIVERY"  # one recipient's status after the final dot (RFC 2033 §4.2)
    RSET = "RSET"
    QUIT = "QUIT"


#: What the client may send in each state, and the state sending it leads to.
SEND: dict[State, dict[Step, State]] = {
    State.HELLO: {Step.LHLO: State.LHLO, Step.QUIT: State.QUIT},
    State.REFUSED: {Step.QUIT: State.QUIT},
    State.READY: {Step.MAIL: State.MAIL, Step.RSET: State.READY, Step.QUIT: State.QUIT},
    State.MAIL: {Step.RCPT: State.MAIL, Step.DATA: State.DATA, Step.RSET: State.READY, Step.QUIT: State.QUIT},
    State.BODY: {Step.DELIVERY: State.DELIVERY},
}


@dataclass(frozen=True, slots=True)
class Answer:
    """One reply, what it answers, and for RCPT and DELIVERY the recipient it is about."""

    step: Step
    reply: Reply
    recipient: bytes | None = None


# -- replies -----------------------------------------------------------------------

# RFC 3463 §2: class.subject.detail; RFC 2034 §3: it starts the text of
# every line, and its class is the reply code's first digit.
_ENHANCED = re.compile(rb"([245])\.(?:0|[1-9][0-9]{0,2})\.(?:0|[1-9][0-9]{0,2})(?: |\Z)")


class ReplyReader:
    """Octets in, whole replies out (RFC 5321 §4.2), within ``max_line`` and ``max_reply``.

    ``feed`` then ``next`` until None.  The search for the end of a line
    resumes where it stopped, so a reply that arrives one octet at a time
    costs no more than one that arrives whole.
    """

    def __init__(self, max_line: int = MAX_LINE, max_reply: int = MAX_REPLY) -> None:
        self._buf = bytearray()
        self._scanned = 0  # octets of _buf already searched for LF
        self._lines: list[bytes] = []  # the lines of the reply being read, without CRLF
        self._size = 0  # octets of those lines
        self._max_line = max_line
        self._max_reply = max_reply

    @property
    def buffered(self) -> int:
        """Octets held that are not yet a whole reply."""
        return len(self._buf) + self._size

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._buf += data

    def next(self) -> Reply | None:
        while True:
            end = self._buf.find(b"\n", self._scanned)
            if end < 0:
                self._scanned = len(self._buf)
                if self._scanned > self._max_line:
                    raise LMTPProtocolError(f"a reply line longer than {self._max_line} octets")
                return None
            if end + 1 > self._max_line:
                raise LMTPProtocolError(f"a reply line longer than {self._max_line} octets")
            if end == 0 or self._buf[end - 1] != 0x0D:
                raise LMTPProtocolError("a reply line ended by a bare LF")
            line = bytes(self._buf[: end - 1])
            del self._buf[: end + 1]
            self._scanned = 0
            reply = self._line(line)
            if reply is not None:
                return reply

    def _line(self, line: bytes) -> Reply | None:
        if len(line) < 3 or not line[:3].isdigit() or line[0] not in b"2345" or line[3:4] not in (b"", b"-", b" "):
            raise LMTPProtocolError(f"not a reply line: {line[:80]!r}")
        if b"\r" in line or b"\0" in line:
            raise LMTPProtocolError(f"a bare CR or a NUL in a reply line: {line[:80]!r}")
        if self._lines and self._lines[0][:3] != line[:3]:
            raise LMTPProtocolError(f"a multi-line reply changed its code: {self._lines[0][:3]!r} then {line[:3]!r}")
        self._size += len(line) + 2
        if self._size > self._max_reply:
            raise LMTPProtocolError(f"a reply longer than {self._max_reply} octets")
        self._lines.append(line)
        if line[3:4] == b"-":
            return None
        lines, self._lines, self._size = self._lines, [], 0
        return _reply(lines)


def _reply(lines: list[bytes]) -> Reply:
    code = int(lines[0][:3])
    enhanced = ""
    texts = []
    for i, line in enumerate(lines):
        text = line[4:]
        m = _ENHANCED.match(text)
        if m is not None and m.group(1)[0] == line[0]:
            if i == 0:
                enhanced = text[: m.end()].strip().decode("ascii")
            text = text[m.end():]
        texts.append(text.decode("utf-8", "replace"))
    return Reply(code, enhanced, "\n".join(texts))


def _extensions(reply: Reply) -> dict[str, str]:
    """The service extensions of a LHLO reply (RFC 5321 §4.1.1.1): keyword, upper-cased, to its parameters."""
    found = {}
    for line in reply.text.split("\n")[1:]:
        keyword, _, params = line.strip().partition(" ")
        if keyword:
            found[keyword.upper()] = params.strip()
    return found


# -- the message -------------------------------------------------------------------


class DotStuffer:
    """Dot-stuffing (RFC 5321 §4.5.2) across chunks, then the end of data (§4.1.1.4).

    A dot that starts a line gets a second one; a line starts after any LF
    (see the module's notes on bare LF).  ``end()`` appends ``.<CRLF>``,
    after a CRLF of its own when the content does not end with one, as
    every SMTP client does, so content that ends with CRLF arrives exactly.
    """

    def __init__(self) -> None:
        self._tail = b""  # the last two octets sent, across chunks
        self._empty = True

    def feed(self, chunk: bytes | bytearray | memoryview) -> bytes:
        data = bytes(chunk)
        if not data:
            return b""
        out = data.replace(b"\n.", b"\n..")
        if data[:1] == b"." and (self._empty or self._tail.endswith(b"\n")):
            out = b"." + out
        self._tail = (self._tail + data[-2:])[-2:]
        self._empty = False
        return out

    def end(self) -> bytes:
        if self._empty or self._tail == b"\r\n":
            return b".\r\n"
        return b"\r\n.\r\n"


def dot_stuff(message: bytes | bytearray | memoryview) -> bytes:
    """The whole message as it is sent after DATA's 354, final dot included."""
    stuffer = DotStuffer()
    return stuffer.feed(message) + stuffer.end()


# -- the conversation --------------------------------------------------------------


def encode_address(value: str | bytes, what: str = "address", allow_empty: bool = False) -> bytes:
    """An address as it goes between the angle brackets; ``CommandError`` if it cannot go there."""
    raw = value.encode("utf-8") if isinstance(value, str) else bytes(value)
    if not raw and not allow_empty:
        raise CommandError(f"an empty {what}")
    # CR/LF would end the command early and start another one of the
    # caller's choosing; an angle bracket would end the path early, except
    # inside a quoted local part, where RFC 5321 §4.1.2's qtextSMTP has them.
    if any(c in raw for c in (b"\r", b"\n", b"\0")) or len(raw) > 1000 or _bracket_outside_quotes(raw):
        raise CommandError(f"a {what} that cannot be sent: {raw[:80]!r}")
    return raw


def _bracket_outside_quotes(raw: bytes) -> bool:
    quoted = escaped = False
    for c in raw:
        if escaped:
            escaped = False
        elif quoted and c == 0x5C:  # quoted-pairSMTP: a backslash and the octet after it
            escaped = True
        elif c == 0x22:
            quoted = not quoted
        elif not quoted and c in (0x3C, 0x3E):
            return True
    return quoted  # an unclosed quote would carry the closing bracket with it


class Conversation:
    """The client's side of one LMTP conversation (RFC 2033), from the greeting to QUIT."""

    def __init__(self, max_line: int = MAX_LINE, max_reply: int = MAX_REPLY) -> None:
        self.state = State.GREETING
        #: The LHLO reply's service extensions: keyword (upper case) to parameters.
        self.extensions: dict[str, str] = {}
        self._reader = ReplyReader(max_line, max_reply)
        self._owed: deque[tuple[Step, bytes | None]] = deque([(Step.GREETING, None)])
        self._eof = False
        # The current transaction: its MAIL's fate, and the RCPTs accepted, in order.
        self._mail_refused = False
        self._smtputf8 = False
        self._accepted: list[bytes] = []
        self._stuffer = DotStuffer()

    # -- what the server offers --------------------------------------------------------

    @property
    def owed(self) -> int:
        """How many replies the server still owes."""
        return len(self._owed)

    @property
    def accepted(self) -> list[bytes]:
        """The recipients of the current transaction accepted so far, in the order of their RCPTs."""
        return list(self._accepted)

    def offers(self, keyword: str) -> bool:
        return keyword.upper() in self.extensions

    @property
    def size_limit(self) -> int | None:
        """SIZE's limit (RFC 1870 §4), None when not advertised or 0 (no limit)."""
        value = self.extensions.get("SIZE", "")
        return int(value) if value.isdigit() and int(value) > 0 else None

    # -- commands ------------------------------------------------------------------------

    def _send(self, step: Step, line: bytes, owed: list[tuple[Step, bytes | None]] | None = None) -> bytes:
        moves = SEND.get(self.state, {})
        if step not in moves:
            raise CommandError(f"cannot send {step.name} in state {self.state.name}")
        self.state = moves[step]
        self._owed.extend(owed if owed is not None else [(step, None)])
        return line

    def send_lhlo(self, name: str) -> bytes:
        """LHLO (RFC 2033 §4.1): our name, a domain or an address literal."""
        if not name or any(c.isspace() for c in name) or not name.isascii():
            raise CommandError(f"LHLO needs a domain or address literal, not {name!r}")
        return self._send(Step.LHLO, b"LHLO " + name.encode("ascii") + b"\r\n")

    def send_mail(self, sender: str | bytes, *, size: int | None = None, eight_bit: bool = False,
                  smtputf8: bool = False) -> bytes:
        """MAIL FROM:<sender>, with SIZE= (RFC 1870), BODY=8BITMIME (RFC 6152) and SMTPUTF8 (RFC 6531)
        where the server advertised them and the message needs them.

        Raises ``CommandError`` when a reply is still owed (one transaction at
        a time), or when the envelope needs SMTPUTF8 and the server did not
        offer it: such a message cannot be delivered there at all.
        """
        raw = encode_address(sender, "sender", allow_empty=True)
        if self._owed:
            raise CommandError("MAIL while replies of the last transaction are owed")
        if not raw.isascii() and not smtputf8:
            raise CommandError("a non-ASCII sender needs SMTPUTF8")
        if smtputf8 and not self.offers("SMTPUTF8"):
            raise CommandError("the envelope needs SMTPUTF8 and the server does not offer it")
        params = b""
        if size is not None and self.offers("SIZE"):
            params += b" SIZE=%d" % size
        if eight_bit and self.offers("8BITMIME"):
            params += b" BODY=8BITMIME"
        if smtputf8:
            params += b" SMTPUTF8"
        line = self._send(Step.MAIL, b"MAIL FROM:<" + raw + b">" + params + b"\r\n")
        self._mail_refused, self._smtputf8, self._accepted = False, smtputf8, []
        self._stuffer = DotStuffer()
        return line

    def send_rcpt(self, recipient: str | bytes) -> bytes:
        """RCPT TO:<recipient>; its answer carries the recipient."""
        raw = encode_address(recipient, "recipient")
        if not raw.isascii() and not self._smtputf8:
            raise CommandError("a non-ASCII recipient needs MAIL with SMTPUTF8")
        return self._send(Step.RCPT, b"RCPT TO:<" + raw + b">\r\n", [(Step.RCPT, raw)])

    def send_data(self) -> bytes:
        return self._send(Step.DATA, b"DATA\r\n")

    def body(self, chunk: bytes | bytearray | memoryview) -> bytes:
        """Message content after the 354, dot-stuffed; as many chunks as it takes."""
        if self.state is not State.BODY:
            raise CommandError(f"message content in state {self.state.name}")
        return self._stuffer.feed(chunk)

    def end_body(self) -> bytes:
        """The final dot: then one DELIVERY answer per accepted recipient is owed (RFC 2033 §4.2)."""
        if self.state is not State.BODY:
            raise CommandError(f"the end of the message in state {self.state.name}")
        return self._send(Step.DELIVERY, self._stuffer.end(), [(Step.DELIVERY, r) for r in self._accepted])

    def send_body(self, message: bytes | bytearray | memoryview) -> bytes:
        """The whole message and its final dot."""
        return self.body(message) + self.end_body()

    def send_rset(self) -> bytes:
        return self._send(Step.RSET, b"RSET\r\n")

    def send_quit(self) -> bytes:
        return self._send(Step.QUIT, b"QUIT\r\n")

    # -- replies -------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """What the server sent; ``b""`` when it closed the connection."""
        if not data:
            self._eof = True
        else:
            self._reader.feed(data)

    def next_event(self) -> Answer | None:
        """The next answer, or None until more data arrives.

        Raises ``LMTPProtocolError`` when the server broke the protocol, or
        closed the connection while replies were owed; the state is then
        ``ERROR``.
        """
        if self.state is State.ERROR:
            raise LMTPProtocolError("the conversation is over (an earlier protocol error)")
        try:
            reply = self._reader.next()
            if reply is None:
                if self._eof:
                    self._closed()
                return None
            if not self._owed:
                if reply.code == 421:
                    # RFC 5321 §3.8: a server about to close may say so unasked.
                    self._close()
                    return None
                raise LMTPProtocolError(f"a reply nobody asked for: {reply.code} {reply.text[:80]!r}")
            step, recipient = self._owed.popleft()
            self._answered(step, reply, recipient)
        except LMTPProtocolError:
            self.state = State.ERROR
            raise
        return Answer(step, reply, recipient)

    def _closed(self) -> None:
        if self._owed or self._reader.buffered:
            raise LMTPProtocolError(
                f"the server closed the connection with {len(self._owed)} replies owed ({self.state.name})"
            )
        self._close()

    def _close(self) -> None:
        self._owed.clear()
        self.state = State.CLOSED

    def _answered(self, step: Step, reply: Reply, recipient: bytes | None) -> None:
        """Every transition that a reply makes."""
        code = reply.code
        if code == 421 and step is not Step.QUIT:
            self._close()
        elif step is Step.GREETING:
            self.state = State.HELLO if code == 220 else State.REFUSED
        elif step is Step.LHLO:
            if code == 250:
                self.extensions = _extensions(reply)
                self.state = State.READY
            else:
                self.state = State.HELLO
        elif step is Step.MAIL:
            if code >= 300:
                self._mail_refused = True
                if self.state is State.MAIL:
                    self.state = State.READY
        elif step is Step.RCPT:
            if code < 300 and not self._mail_refused and recipient is not None:
                self._accepted.append(recipient)
        elif step is Step.DATA:
            if code == 354:
                if not self._accepted:
                    raise LMTPProtocolError("354 to DATA without an accepted recipient (RFC 2033 §4.2: 503)")
                self.state = State.BODY
            elif code < 400:
                raise LMTPProtocolError(f"{code} to DATA")
            else:
                self.state = State.READY
        elif step is Step.DELIVERY:
            # Nothing else can be sent meanwhile (SEND[DELIVERY] is empty).
            if not self._owed:
                self._accepted = []
                self.state = State.READY
        elif step is Step.QUIT:
            self._close()
