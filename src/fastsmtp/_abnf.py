"""The MAIL and RCPT argument grammar: RFC 5321 §4.1.2-§4.1.3, RFC 6531 §3.3.

Rules of this module:
- The grammar is written once, as commented regex strings named after the ABNF
  rules they implement (in the manner of h11's ``_abnf.py``), and compiled
  once, at import.  Everything is bytes: an address is what the client sent.
- The common path (``<user@example.com>`` with or without parameters) costs
  one regex match plus a few C-level ``len``/``isascii`` calls.  No Python
  loop ever walks the octets of an address.
- Only ``LocalProtocolError`` leaves ``parse_mail_argument`` and
  ``parse_rcpt_argument``, and it always carries its reply:
    * 501 5.5.4 for a malformed command (no ``FROM:``/``TO:``, no angle
      brackets, junk after the path, bad parameter syntax, duplicate
      parameters);
    * 553 5.1.7 (sender) / 553 5.1.3 (recipient) for a path whose brackets
      are in place but whose content is not a valid mailbox (grammar, the
      RFC 5321 §4.5.3.1 length limits, control characters, invalid UTF-8).
- What this module does not decide: whether UTF-8 is allowed in this
  transaction (the caller compares ``Address.utf8`` with SMTPUTF8), which
  ESMTP keywords are known, and whether a grammatical local part is safe to
  use as a folder name (``policy.safe_local_part``: ``/`` is valid atext).
"""

from __future__ import annotations

import ipaddress
import re

from .errors import LocalProtocolError
from .events import Address, Params, Reply

__all__ = ["parse_mail_argument", "parse_rcpt_argument", "parse_mailbox", "is_dot_string"]

# The patterns are written as ASCII ``str`` (so they can be composed with
# str.format, as h11 does) and compiled as bytes patterns: in a bytes pattern
# the escape ``\x80`` means the octet 0x80, which is how the RFC 6531
# extensions below admit UTF-8.

# RFC 6531 §3.3: UTF8-non-ascii is admitted in atext, qtextSMTP, sub-domain
# (as U-labels) and esmtp-value.  The regexes accept any octet >= 0x80 there;
# that the octets form valid UTF-8 (RFC 3629) is checked once, on the whole
# path, with the C decoder, and only when the path is not ASCII.
UTF8_non_ascii = r"\x80-\xff"

# RFC 5322 §3.2.3:  atext = ALPHA / DIGIT / "!" / "#" / "$" / "%" / "&" / "'"
#                          / "*" / "+" / "-" / "/" / "=" / "?" / "^" / "_"
#                          / "`" / "{" / "|" / "}" / "~"
# Note what is absent: SP, '"', "(", ")", ",", ".", ":", ";", "<", ">", "@",
# "[", "\", "]" and every control character.
atext = r"[A-Za-z0-9!#$%&'*+\-/=?^_`{{|}}~{UTF8_non_ascii}]".format(**globals())

# RFC 5321 §4.1.2:  Dot-string = Atom *("." Atom);  Atom = 1*atext
# This alone forbids a leading or trailing "." and "..".
Dot_string = r"{atext}+(?:\.{atext}+)*".format(**globals())

# RFC 5321 §4.1.2:  qtextSMTP = %d32-33 / %d35-91 / %d93-126  (+ UTF8-non-ascii)
#                   quoted-pairSMTP = %d92 %d32-126
# A quoted pair of a control character is not in the grammar, so "\<CR>"
# is refused like a bare CR.  RFC 6531 does not extend quoted-pairSMTP.
qtextSMTP = r"[\x20\x21\x23-\x5b\x5d-\x7e{UTF8_non_ascii}]".format(**globals())
quoted_pairSMTP = r"\\[\x20-\x7e]"
Quoted_string = r'"(?:{qtextSMTP}|{quoted_pairSMTP})*"'.format(**globals())

# RFC 5321 §4.1.2:  Local-part = Dot-string / Quoted-string
Local_part = r"(?:{Dot_string}|{Quoted_string})".format(**globals())

# RFC 5321 §4.1.2:  sub-domain = Let-dig [Ldh-str];  Ldh-str = *( ALPHA / DIGIT
# / "-" ) Let-dig.  RFC 1035 §2.3.4 caps a label at 63 octets, written into
# the repetition count so that no label needs a Python-side check.  RFC 6531
# adds U-labels; their octets count the same way (an approximation: the
# 63-octet cap really applies to the A-label, which IDNA, not SMTP, defines).
let_dig = r"[A-Za-z0-9{UTF8_non_ascii}]".format(**globals())
ldh = r"[A-Za-z0-9\-{UTF8_non_ascii}]".format(**globals())
sub_domain = r"{let_dig}(?:{ldh}{{0,61}}{let_dig})?".format(**globals())
Domain = r"{sub_domain}(?:\.{sub_domain})*".format(**globals())

# RFC 5321 §4.1.3:  Snum = 1*3DIGIT ; representing a decimal integer 0..255
Snum = r"(?:25[0-5]|2[0-4][0-9]|[01]?[0-9]?[0-9])"
IPv4_address_literal = r"{Snum}(?:\.{Snum}){{3}}".format(**globals())
# RFC 5321 §4.1.3:  General-address-literal = Standardized-tag ":" 1*dcontent
#                   dcontent = %d33-90 / %d94-126
# IPv6-address-literal ("IPv6:" IPv6-addr) has this shape too; its tag is
# recognised after the match and the address checked with ``ipaddress``.
Standardized_tag = r"[A-Za-z0-9\-]*[A-Za-z0-9]"
dcontent = r"[\x21-\x5a\x5e-\x7e]"
address_literal = r"\[(?:{IPv4_address_literal}|{Standardized_tag}:{dcontent}+)\]".format(
    **globals()
)

# RFC 5321 §4.1.2:  Mailbox = Local-part "@" ( Domain / address-literal )
Mailbox = r"(?P<local>{Local_part})@(?P<domain>{Domain}|{address_literal})".format(**globals())

# RFC 5321 §4.1.2:  A-d-l = At-domain *( "," At-domain );  At-domain = "@" Domain
# Source routes are accepted and ignored (RFC 5321 §4.1.2 and Appendix C:
# "servers MUST ignore" the route, but must accept the syntax).
A_d_l = r"@{Domain}(?:,@{Domain})*".format(**globals())
Path_content = r"(?:{A_d_l}:)?{Mailbox}".format(**globals())

# RFC 5321 §4.1.2:  esmtp-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-")
#                   esmtp-value   = 1*(%d33-60 / %d62-126)   (+ UTF8-non-ascii)
esmtp_keyword = r"[A-Za-z0-9][A-Za-z0-9\-]*"
esmtp_value = r"[\x21-\x3c\x3e-\x7e{UTF8_non_ascii}]+".format(**globals())
esmtp_param = r"{esmtp_keyword}(?:={esmtp_value})?".format(**globals())
# Parameters follow the path, each preceded by one or more SP (Postfix and
# Exim accept runs of SP; RFC 5321 has one).  Trailing SP is tolerated: some
# clients send it and it cannot change the meaning of the command.
Parameters = r"(?:\ +{esmtp_param})*\ *".format(**globals())

# The command lines (RFC 5321 §4.1.1.2, §4.1.1.3), minus the verb:
#   mail = "MAIL FROM:" Reverse-path [SP Mail-parameters] CRLF
#   rcpt = "RCPT TO:" ( "<Postmaster@" Domain ">" / "<Postmaster>" /
#          Forward-path ) [SP Rcpt-parameters] CRLF
# The keyword is case-insensitive (RFC 5321 §2.4).  Like Postfix we accept
# SP between the colon and the "<" ("MAIL FROM: <a@b>"), which old clients
# send; nothing else is loosened: exactly one SP after the verb (a missing SP
# would make "MAILFROM:" a command of its own), no SP before the colon, and
# the path must be in angle brackets.  The tail after ">" is captured loosely
# and checked against Parameters only when not empty (RCPT rarely has any).
mail_prefix = r"\ (?i:FROM):\ *<"
rcpt_prefix = r"\ (?i:TO):\ *<"
# RFC 5321 §4.5.1: "<Postmaster>" without a domain must be accepted.
postmaster = r"(?P<postmaster>(?i:postmaster))"

_mail_re = re.compile(
    r"{mail_prefix}(?P<path>{Path_content})?>(?P<params>.*)".format(**globals()).encode(),
    re.DOTALL,
)
_rcpt_re = re.compile(
    r"{rcpt_prefix}(?P<path>{postmaster}|{Path_content})>(?P<params>.*)".format(
        **globals()
    ).encode(),
    re.DOTALL,
)
_mail_prefix_re = re.compile(mail_prefix.encode())
_rcpt_prefix_re = re.compile(rcpt_prefix.encode())
_params_re = re.compile(Parameters.encode())
_mailbox_re = re.compile(Mailbox.encode())
_dot_string_re = re.compile(Dot_string.encode())
_quoted_pair_re = re.compile(quoted_pairSMTP.encode())

# RFC 5321 §4.5.3.1.1-3.  The local part is measured as sent (quotes and
# backslashes included): that is what travels and what other MTAs measure.
# "Path" includes its punctuation, so the angle brackets count towards 256.
MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256
_FAST_PATH_MAX = MAX_LOCAL_PART + 2

_SYNTAX_MAIL = Reply(501, "5.5.4", "Syntax: MAIL FROM:<address>")
_SYNTAX_RCPT = Reply(501, "5.5.4", "Syntax: RCPT TO:<address>")
_SYNTAX_PARAMS = Reply(501, "5.5.4", "Syntax error in parameters")
_BAD_SENDER = Reply(553, "5.1.7", "Bad sender address syntax")
_BAD_RECIPIENT = Reply(553, "5.1.3", "Bad recipient address syntax")


class _BadAddress(ValueError):
    """The path is in its brackets but is not a valid mailbox."""


def _address(raw: bytes, local: bytes, domain: bytes) -> Address:
    """Check what the regex cannot (limits, UTF-8, literals) and build the Address."""
    # The most specific limit first, so that the message names the culprit.
    if len(local) > MAX_LOCAL_PART:
        raise _BadAddress(f"local part longer than {MAX_LOCAL_PART} octets")
    if len(domain) > MAX_DOMAIN:
        raise _BadAddress(f"domain longer than {MAX_DOMAIN} octets")
    if len(raw) + 2 > MAX_PATH:
        raise _BadAddress(f"path longer than {MAX_PATH} octets")
    utf8 = not raw.isascii()
    if utf8:
        # Every non-ASCII octet sits in atext, qtext or a label, all of which
        # RFC 6531 extends with UTF8-non-ascii only, i.e. valid UTF-8.  The
        # separators are ASCII, so checking the whole path checks each part.
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _BadAddress("path is not valid UTF-8") from None
    if domain[:1] == b"[":
        _check_literal(domain)
    if local[:1] == b'"':
        local = _quoted_pair_re.sub(lambda m: m.group()[1:], local[1:-1])
    return Address(local, domain, raw, utf8)


def _check_literal(domain: bytes) -> None:
    """RFC 5321 §4.1.3: the tag "IPv6" (case-insensitive) must carry an IPv6 address."""
    tag, colon, value = domain[1:-1].partition(b":")
    if colon and tag.lower() == b"ipv6":
        # RFC 5321 §4.1.3 IPv6-addr is hex, ":" and a dotted IPv4 tail only;
        # ipaddress would also take a "%scope" zone (RFC 4007), which is not.
        if value.translate(None, b"0123456789abcdefABCDEF:."):
            raise _BadAddress("invalid IPv6 address literal")
        try:
            ipaddress.IPv6Address(value.decode("ascii"))
        except ValueError:
            raise _BadAddress("invalid IPv6 address literal") from None


def _params(tail: bytes) -> Params:
    """Split and check the ESMTP parameters after the path (RFC 5321 §4.1.2)."""
    if _params_re.fullmatch(tail) is None:
        raise LocalProtocolError("malformed ESMTP parameters", _SYNTAX_PARAMS)
    out: list[tuple[bytes, bytes | None]] = []
    seen: set[bytes] = set()
    for param in tail.split():
        keyword, eq, value = param.partition(b"=")
        keyword = keyword.upper()
        if keyword in seen:
            # RFC 5321 §4.1.2 gives each keyword one meaning; a repeated one
            # (two SIZE= values) would leave the server to guess which counts.
            raise LocalProtocolError(f"duplicate ESMTP parameter {keyword!r}", _SYNTAX_PARAMS)
        seen.add(keyword)
        if eq and not value.isascii():
            try:
                value.decode("utf-8")
            except UnicodeDecodeError:
                raise LocalProtocolError("ESMTP value is not valid UTF-8", _SYNTAX_PARAMS) from None
        out.append((keyword, value if eq else None))
    return tuple(out)


def _refuse(arg: bytes, prefix: re.Pattern[bytes], syntax: Reply, bad: Reply) -> LocalProtocolError:
    """Explain a failed match: a bad address when its brackets are in place."""
    m = prefix.match(arg)
    if m is not None and b">" in arg[m.end() :]:
        return LocalProtocolError("invalid address in path", bad)
    return LocalProtocolError("malformed command", syntax)


def parse_mail_argument(arg: bytes) -> tuple[Address | None, Params]:
    """Parse what follows ``MAIL`` (RFC 5321 §4.1.1.2).

    Args:
        arg: the command line after the verb, without CRLF, for example
            ``b" FROM:<a@b.example> SIZE=10"``.

    Returns:
        The sender (None for the null reverse-path ``<>``) and the parameters,
        keywords upper-cased, in the order sent.

    Raises:
        LocalProtocolError: 501 5.5.4 for a malformed command or parameters,
            553 5.1.7 for an invalid sender address.
    """
    m = _mail_re.match(arg)
    if m is None:
        raise _refuse(arg, _mail_prefix_re, _SYNTAX_MAIL, _BAD_SENDER)
    raw, local, domain, tail = m.group("path", "local", "domain", "params")
    if tail and tail[:1] != b" ":
        raise LocalProtocolError("junk after the path", _SYNTAX_MAIL)
    if raw is None:
        address = None
    elif len(raw) <= _FAST_PATH_MAX and raw.isascii() and local[0] != 34 and domain[0] != 91:
        address = Address(local, domain, raw, False)  # see parse_rcpt_argument
    else:
        try:
            address = _address(raw, local, domain)
        except _BadAddress as exc:
            raise LocalProtocolError(str(exc), _BAD_SENDER) from None
    return address, (_params(tail) if tail else ())


def parse_rcpt_argument(arg: bytes) -> tuple[Address, Params]:
    """Parse what follows ``RCPT`` (RFC 5321 §4.1.1.3).

    Args:
        arg: the command line after the verb, without CRLF, for example
            ``b" TO:<u@d.example>"``.

    Returns:
        The recipient and the parameters, keywords upper-cased.  The bare
        ``<postmaster>`` (any case) comes back with an empty domain.

    Raises:
        LocalProtocolError: 501 5.5.4 for a malformed command or parameters,
            553 5.1.3 for an invalid recipient address.
    """
    m = _rcpt_re.match(arg)
    if m is None:
        raise _refuse(arg, _rcpt_prefix_re, _SYNTAX_RCPT, _BAD_RECIPIENT)
    raw, local, domain, tail = m.group("path", "local", "domain", "params")
    if tail and tail[:1] != b" ":
        raise LocalProtocolError("junk after the path", _SYNTAX_RCPT)
    if local is None:
        address = Address(raw, b"", raw, False)
    elif len(raw) <= _FAST_PATH_MAX and raw.isascii() and local[0] != 34 and domain[0] != 91:
        # The common case needs none of _address's checks: a raw path of at
        # most 66 octets has a local part of at most 64, and no quotes
        # (34 = '"') or literal (91 = '[') means nothing to unquote or verify.
        address = Address(local, domain, raw, False)
    else:
        try:
            address = _address(raw, local, domain)
        except _BadAddress as exc:
            raise LocalProtocolError(str(exc), _BAD_RECIPIENT) from None
    return address, (_params(tail) if tail else ())


def parse_mailbox(mailbox: bytes) -> Address:
    """Parse a bare ``local@domain`` (no brackets, no route), for administration.

    Raises:
        ValueError: with the reason, when it is not a valid RFC 5321 Mailbox.
    """
    m = _mailbox_re.fullmatch(mailbox)
    if m is None:
        raise ValueError(f"{mailbox!r} is not a valid address (RFC 5321 §4.1.2)")
    return _address(mailbox, m.group("local"), m.group("domain"))


def is_dot_string(local: bytes) -> bool:
    """Whether ``local`` can be written unquoted (RFC 5321 §4.1.2 Dot-string)."""
    return _dot_string_re.fullmatch(local) is not None
