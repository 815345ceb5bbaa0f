"""Events the session produces, and the Reply it is answered with.

Rules of this module:
- Events are immutable values (frozen, slotted dataclasses).  Bytes stay
  bytes: an address is what the client sent, decoded only at the policy
  boundary.
- A ``Reply`` encodes itself once, at construction, so that the constant
  replies the server sends on the hot path cost one attribute read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = [
    "Address",
    "Params",
    "Reply",
    "Event",
    "Helo",
    "Ehlo",
    "MailFrom",
    "RcptTo",
    "Data",
    "Bdat",
    "EndOfChunk",
    "StartTLS",
    "Rset",
    "Noop",
    "Vrfy",
    "Help",
    "Quit",
    "MessageChunk",
    "EndOfMessage",
    "ConnectionClosed",
]

#: ESMTP parameters as sent: ``((b"SIZE", b"1024"), (b"SMTPUTF8", None))``.
#: Keywords are upper-cased by the parser (RFC 5321 §2.4: they are
#: case-insensitive); values are kept as sent.
Params = tuple[tuple[bytes, "bytes | None"], ...]


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply (RFC 5321 §4.2), with its RFC 3463 enhanced code.

    ``text`` may hold several lines separated by ``\\n``; they become a
    multiline reply (``250-first``, ``250 last``).  ``enhanced`` is the
    enhanced status code without the trailing space, or ``""`` for replies
    that carry none (the greeting and the EHLO response).
    """

    code: int
    enhanced: str
    text: str
    encoded: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        prefix = f"{self.enhanced} " if self.enhanced else ""
        lines = self.text.split("\n")
        out = [f"{self.code}-{prefix}{line}\r\n" for line in lines[:-1]]
        out.append(f"{self.code} {prefix}{lines[-1]}\r\n")
        object.__setattr__(self, "encoded", "".join(out).encode("utf-8"))

    @property
    def positive(self) -> bool:
        """2xx and 3xx: the command was accepted (RFC 5321 §4.2.1)."""
        return self.code < 400


@dataclass(frozen=True, slots=True)
class Address:
    """A mailbox from MAIL FROM or RCPT TO (RFC 5321 §4.1.2).

    ``local`` is the local part as a mailbox folder would be named: quotes
    and quoted-pair backslashes removed.  ``domain`` is as sent (not
    lower-cased; may be empty for ``<postmaster>``, or an address literal
    such as ``[192.0.2.1]``).  ``raw`` is the path exactly as written between
    the angle brackets.  ``utf8`` says whether it holds non-ASCII octets,
    which RFC 6531 allows only in an SMTPUTF8 transaction.
    """

    local: bytes
    domain: bytes
    raw: bytes
    utf8: bool = False


class Event:
    """Base class of everything ``Session.next_event()`` returns."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Helo(Event):
    domain: bytes


@dataclass(frozen=True, slots=True)
class Ehlo(Event):
    domain: bytes


@dataclass(frozen=True, slots=True)
class MailFrom(Event):
    #: None for the null reverse-path ``<>`` (RFC 5321 §4.5.5).
    address: Address | None
    params: Params = ()
    #: SIZE= as the parser read it (RFC 1870; 0: not declared), and whether
    #: SMTPUTF8 was given (RFC 6531): read once, where the parameters are checked.
    size: int = 0
    smtputf8: bool = False


@dataclass(frozen=True, slots=True)
class RcptTo(Event):
    address: Address
    params: Params = ()


@dataclass(frozen=True, slots=True)
class Data(Event):
    pass


@dataclass(frozen=True, slots=True)
class Bdat(Event):
    """``BDAT <size> [LAST]`` (RFC 3030 §2): a chunk of exactly ``size`` octets follows.

    Owes no reply of its own: the reply belongs to the chunk, and comes with
    ``EndOfChunk`` (or ``EndOfMessage`` for the LAST chunk) once its octets
    have arrived.  ``first`` says whether it opens the message.
    """

    size: int
    last: bool
    first: bool


@dataclass(frozen=True, slots=True)
class EndOfChunk(Event):
    """All octets of a non-LAST BDAT chunk arrived; owes its reply.

    ``total`` is the message size so far.  ``refusal`` is set when the running
    total went over the size limit (552 5.3.4); any 4xx/5xx reply ends the
    transaction.
    """

    size: int
    total: int
    refusal: "Reply | None" = None


@dataclass(frozen=True, slots=True)
class StartTLS(Event):
    pass


@dataclass(frozen=True, slots=True)
class Rset(Event):
    pass


@dataclass(frozen=True, slots=True)
class Noop(Event):
    pass


@dataclass(frozen=True, slots=True)
class Vrfy(Event):
    argument: bytes


@dataclass(frozen=True, slots=True)
class Help(Event):
    argument: bytes


@dataclass(frozen=True, slots=True)
class Quit(Event):
    pass


@dataclass(frozen=True, slots=True)
class MessageChunk(Event):
    """Message content, dot-unstuffed, exactly as it will be stored.

    Owes no reply.  Content past the size limit is never delivered as a
    chunk: it is counted and dropped.
    """

    data: bytes


@dataclass(frozen=True, slots=True)
class EndOfMessage(Event):
    """The end of the message content (``<CRLF>.<CRLF>``).

    ``size`` counts every content octet received, including any dropped
    past the limit.  ``refusal`` is set when the session itself already
    knows the answer (too large: 552 5.3.4; bare CR or LF under the
    ``reject`` policy: 550 5.5.2); the server then stores nothing and sends
    that reply.  Any reply to EndOfMessage ends the transaction.
    """

    size: int
    bare_lf: bool = False
    refusal: Reply | None = None


@dataclass(frozen=True, slots=True)
class ConnectionClosed(Event):
    pass
