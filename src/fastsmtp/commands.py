"""SMTP command lines into events: pure functions of the line (RFC 5321 §4.1.1).

Rules of this module:
- A parser sees the command's argument and the facts handed to it as
  arguments, never a session: the same line and facts give the same event
  or the same refusal, in any state.  Whether a command is in order is not
  decided here: ``session.TRANSITIONS`` decides that, from ``VERBS[verb]``
  alone.  The facts that are the session's (how many recipients it holds,
  whether SMTPUTF8 was given on MAIL, whether TLS is active or offered) are
  checked by the session around the parser; see ``Session._parse``.
- Every refusal is a ``LocalProtocolError`` carrying its reply, as in
  ``_abnf``, which holds the MAIL and RCPT grammar.
- The common path allocates nothing but the event: the verb is looked up as
  sent and upper-cased only when that misses, and the commands without an
  argument return one shared, immutable event.
"""

from __future__ import annotations

from typing import Callable

from ._abnf import parse_mail_argument, parse_rcpt_argument
from .errors import LocalProtocolError
from .events import (
    Bdat,
    Data,
    Ehlo,
    Event,
    Helo,
    Help,
    MailFrom,
    Noop,
    Quit,
    RcptTo,
    Reply,
    Rset,
    StartTLS,
    Vrfy,
)

__all__ = [
    "VERBS",
    "FORBIDDEN",
    "PARSERS",
    "parse_mail",
    "parse_rcpt",
    "parse_bdat",
    "parse_starttls",
    "UNKNOWN_COMMAND",
    "NOT_SMTP",
    "BDAT_SYNTAX",
    "MESSAGE_TOO_BIG",
    "UNKNOWN_PARAMETER",
    "BAD_PARAMETER",
    "NEED_SMTPUTF8",
    "MAX_HELO",
]

#: The verbs, each naming the event it becomes.  RFC 5321 §2.4: verbs are
#: case-insensitive; the keys are upper case.
VERBS: dict[bytes, type[Event]] = {
    b"HELO": Helo,
    b"EHLO": Ehlo,
    b"MAIL": MailFrom,
    b"RCPT": RcptTo,
    b"DATA": Data,
    b"RSET": Rset,
    b"QUIT": Quit,
    b"NOOP": Noop,
    b"VRFY": Vrfy,
    b"HELP": Help,
    b"BDAT": Bdat,  # RFC 3030
    b"STARTTLS": StartTLS,  # RFC 3207
}
# Another protocol on the SMTP port: a browser or a proxy probe (cross-
# protocol attacks relay these through HTTP clients), or a POP3 client.
# Postfix closes on the same words (smtpd_forbidden_commands); so do we.
FORBIDDEN = frozenset({b"GET", b"POST", b"HEAD", b"PUT", b"CONNECT", b"OPTIONS", b"USER", b"PROXY"})

UNKNOWN_COMMAND = Reply(500, "5.5.2", "Error: command not recognized")
NOT_SMTP = Reply(221, "2.7.0", "Error: not an SMTP command; closing")
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Error: message exceeds fixed maximum message size")
UNKNOWN_PARAMETER = Reply(555, "5.5.4", "Error: unsupported MAIL/RCPT parameter")
BAD_PARAMETER = Reply(501, "5.5.4", "Error: bad parameter value")
# RFC 6531 §3.5: a non-ASCII address needs SMTPUTF8 on MAIL.
NEED_SMTPUTF8 = Reply(553, "5.6.7", "Error: non-ASCII address needs SMTPUTF8")
# RFC 3030 §2: a BDAT whose size cannot be read leaves the byte stream with
# no known boundary; the only safe answer is to close (Postfix does too).
BDAT_SYNTAX = Reply(501, "5.5.4", "Syntax: BDAT size [LAST]")
# RFC 1035 §2.3.4: a domain name is at most 255 octets; an address literal
# is shorter still.  A longer HELO argument is not a name.
MAX_HELO = 255


def _syntax(usage: str) -> Reply:
    return Reply(501, "5.5.4", f"Syntax: {usage}")


_HELO_SYNTAX = _syntax("HELO hostname")
_EHLO_SYNTAX = _syntax("EHLO hostname")
# RFC 6152: 7BIT or 8BITMIME; we store octets as received.
_BODIES = (b"8BITMIME", b"7BIT")

# The arguments below still carry the space after the verb: "HELO x" gives
# b" x".  The events of the commands without an argument are shared.
_DATA, _RSET, _QUIT, _NOOP, _STARTTLS = Data(), Rset(), Quit(), Noop(), StartTLS()


def _domain(arg: bytes, usage: Reply) -> bytes:
    domain = arg.strip(b" ")
    if not domain or len(domain) > MAX_HELO:
        raise LocalProtocolError("HELO/EHLO needs a domain", usage)
    return domain


def parse_helo(arg: bytes) -> Event:
    return Helo(_domain(arg, _HELO_SYNTAX))


def parse_ehlo(arg: bytes) -> Event:
    return Ehlo(_domain(arg, _EHLO_SYNTAX))


def _no_argument(verb: bytes, event: Event) -> Callable[[bytes], Event]:
    usage = _syntax(verb.decode())

    def parse(arg: bytes) -> Event:
        if arg and arg.strip(b" "):
            raise LocalProtocolError(f"{verb!r} takes no argument", usage)
        return event

    return parse


def parse_noop(arg: bytes) -> Event:
    return _NOOP  # RFC 5321 §4.1.1.9: NOOP may carry a string; ignored.


def parse_vrfy(arg: bytes) -> Event:
    return Vrfy(arg.strip(b" "))


def parse_help(arg: bytes) -> Event:
    return Help(arg.strip(b" "))


def parse_mail(arg: bytes, max_size: int) -> MailFrom:
    """``MAIL FROM:<path> [params]`` (RFC 5321 §4.1.1.2).

    ``max_size`` is passed in because RFC 1870's SIZE check sits among the
    parameter checks: which reply a line with two bad parameters gets
    depends on their order, so the session cannot check SIZE afterwards
    without changing replies.
    """
    address, params = parse_mail_argument(arg)
    smtputf8 = False
    size = 0
    for key, value in params:
        if key == b"SIZE":
            # RFC 1870 §3: SIZE=<digits>; over the limit is 552 now rather
            # than after the data has been sent.
            if value is None or not value.isdigit() or len(value) > 20:
                raise LocalProtocolError("bad SIZE", BAD_PARAMETER)
            size = int(value)
            if size > max_size:
                raise LocalProtocolError("SIZE over the limit", MESSAGE_TOO_BIG)
        elif key == b"BODY":
            if value is None or (value not in _BODIES and value.upper() not in _BODIES):
                raise LocalProtocolError("bad BODY", BAD_PARAMETER)
        elif key == b"SMTPUTF8":
            if value is not None:
                raise LocalProtocolError("SMTPUTF8 takes no value", BAD_PARAMETER)
            smtputf8 = True
        else:
            raise LocalProtocolError(f"unknown parameter {key!r}", UNKNOWN_PARAMETER)
    if address is not None and address.utf8 and not smtputf8:
        raise LocalProtocolError("non-ASCII sender without SMTPUTF8", NEED_SMTPUTF8)
    return MailFrom(address, params, size, smtputf8)


def parse_rcpt(arg: bytes) -> RcptTo:
    """``RCPT TO:<path>`` (RFC 5321 §4.1.1.3); no parameters are offered.

    Whether a non-ASCII recipient is allowed depends on the MAIL of the
    transaction: the session compares ``address.utf8`` with it.
    """
    address, params = parse_rcpt_argument(arg)
    if params:
        raise LocalProtocolError("RCPT takes no parameters here", UNKNOWN_PARAMETER)
    return RcptTo(address, params)


def parse_bdat(arg: bytes, first: bool) -> Bdat:
    """``BDAT <size> [LAST]`` (RFC 3030 §2).

    ``first`` (no BDAT transaction is open yet) is the session's to know.
    """
    parts = arg.split()
    if (
        not 1 <= len(parts) <= 2
        or not parts[0].isdigit()
        or len(parts[0]) > 18
        or (len(parts) == 2 and parts[1].upper() != b"LAST")
    ):
        raise LocalProtocolError("unreadable BDAT size", BDAT_SYNTAX)
    return Bdat(int(parts[0]), len(parts) == 2, first)


#: ``STARTTLS`` (RFC 3207 §4): no argument.  Whether TLS is active or
#: offered is the session's to check, after this.
parse_starttls = _no_argument(b"STARTTLS", _STARTTLS)

#: The commands whose event and refusals depend on nothing but the line.
#: The other four take facts that are the session's (``Session._parse``):
#: MAIL the size limit, BDAT whether it opens the message, RCPT the
#: recipient count and the MAIL's SMTPUTF8, STARTTLS whether TLS is active
#: or offered.
PARSERS: dict[type[Event], Callable[[bytes], Event]] = {
    Helo: parse_helo,
    Ehlo: parse_ehlo,
    Data: _no_argument(b"DATA", _DATA),
    Rset: _no_argument(b"RSET", _RSET),
    Quit: _no_argument(b"QUIT", _QUIT),
    Noop: parse_noop,
    Vrfy: parse_vrfy,
    Help: parse_help,
}
