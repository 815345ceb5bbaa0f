"""SPF: is this client allowed to send for that domain?  RFC 7208.

Rules of this module:
- ``check_host`` is RFC 7208 §4 as written: record selection (§4.5), the
  whole record parsed before any term is evaluated (§4.6), terms left to
  right with the first match winning (§4.6.2), ``include`` mapped by the
  §5.2 table, ``redirect`` only when nothing matched and there is no
  ``all`` (§6.1), ``exp`` only for a fail (§6.2), the default neutral
  (§4.7).  ``check_mailfrom`` and ``check_helo`` choose the identity and
  the domain (§2.3, §2.4) and answer an ``SPFResult``.
- The only I/O is the ``Lookups`` given (fastsmtp.dns); nothing blocks.
  ``DNSError`` is temperror and ``BadName`` a name that cannot exist,
  except where the RFC says otherwise (ptr §5.5, %{p} §7.3, exp §6.2).
- Every evaluation is bounded whatever the DNS serves: 10 DNS-querying
  terms and 2 void lookups over the whole evaluation, includes and
  redirects counted together (§4.6.4); 10 MX and 10 PTR names per term; a
  record over ``MAX_RECORD_OCTETS`` or ``MAX_TERMS`` is a permerror; an
  include or redirect back into a domain already being evaluated is a
  permerror at once (it could only loop until the limit); past 20 seconds
  (§4.6.4's SHOULD) the next DNS term is a temperror; an explanation is at
  most 1 KiB.
- A record is parsed once: ``_RECORDS`` is an LRU keyed by the record's
  bytes and bounded by memory (about 8 MiB).  What parsing can precompute
  (a static target name, a network as integers, the "matched ..." reason)
  is kept on the parsed term, so a warm check allocates little beyond its
  own small state.
- Nothing raises out of the check functions but a ``ValueError`` for a
  client address that is not an IP address (a bug in the caller), and what
  the ``Lookups`` raises besides ``DNSError`` and ``BadName``.

Where the RFC leaves room, this module chooses:
- A target name that cannot be a DNS name (``BadName``, often after macro
  expansion) is a name without records: a/mx/exists/ptr do not match and
  the lookup is void (§4.3 treats a malformed domain like NXDOMAIN); for
  include and redirect it is check_host's "none", so permerror (§5.2, §6.1).
- An mx term's exchanges are looked up together; any match wins, and a
  DNS error counts only when nothing matched, so the answer never depends
  on which reply came first.
- ptr validates only the names (of the first 10) at or under the target:
  the same answer as validating all, with fewer queries.  The ptr rule is
  §5.5's algorithm (the name under the target), not erratum 4751's bullet.
- %{p} costs no term of its own (the term holding it is counted); its PTR
  answer and validated names are fetched once per check.
- c, r and t are refused in every domain-spec, exp= included: §7.2 allows
  them "only in exp text", the explanation string.
- The time limit is checked before each DNS term, not by a timer.
"""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from typing import Final
from urllib.parse import quote

from ..dns import BadName, DNSError, Lookups

__all__ = ["SPFResult", "check_mailfrom", "check_helo", "check_host", "RESULTS"]

NONE: Final = "none"
NEUTRAL: Final = "neutral"
PASS: Final = "pass"
FAIL: Final = "fail"
SOFTFAIL: Final = "softfail"
TEMPERROR: Final = "temperror"
PERMERROR: Final = "permerror"
#: The seven results of RFC 7208 §2.6.
RESULTS: Final = (NONE, NEUTRAL, PASS, FAIL, SOFTFAIL, TEMPERROR, PERMERROR)

MAX_DNS_TERMS: Final = 10  # §4.6.4: include, a, mx, ptr, exists, redirect
MAX_VOID_LOOKUPS: Final = 2  # §4.6.4: "SHOULD limit void lookups to two"
MAX_MX: Final = 10  # §4.6.4: more MX records than this is a permerror
MAX_PTR_NAMES: Final = 10  # §4.6.4: PTR names past the first 10 are ignored
TIME_LIMIT: Final = 20.0  # §4.6.4: "SHOULD allow at least 20 seconds"
# Not in the RFC: bounds on what one record may cost us to parse.  Real
# records stay under 512 octets (§3.4 advises 450); a few run to 2 KB.
# 16 KiB and 1024 terms parse in about a millisecond, once per text.
MAX_RECORD_OCTETS: Final = 16384
MAX_TERMS: Final = 1024
MAX_EXPLANATION: Final = 1024  # octets of exp= text taken, and given back
MAX_NAME: Final = 253  # §4.3, §7.3: a domain name as text


@dataclass(frozen=True, slots=True)
class SPFResult:
    """The outcome of one SPF check, for DMARC, the A-R header and the logs."""

    result: str  # one of RESULTS
    identity: str  # "mailfrom" | "helo"
    domain: str  # the domain checked (lower case, no trailing dot)
    reason: str = ""  # short, for logs and the A-R comment
    explanation: str = ""  # for fail: the exp= text, macro-expanded (§6.2)


class _Stop(Exception):
    """Ends the whole evaluation with a temperror or permerror (§4.6.2, §5)."""

    def __init__(self, result: str, reason: str) -> None:
        self.result = result
        self.reason = reason


# ---------------------------------------------------------------------------
# Macros, RFC 7208 §7.  A macro-string is parsed once into a tuple whose items
# are literal text or a _Macro; expanding it is a join over that tuple.


@dataclass(frozen=True, slots=True)
class _Macro:
    letter: str  # lower case: s l o d i p h c r t v
    escape: bool  # upper-case letter: URL-escape the value (§7.3)
    keep: int  # keep this many right-hand parts; 0 = all (§7.3)
    reverse: bool
    split: dict[int, int] | None  # str.translate table: delimiters -> "."


#   macro-expand = ( "%{" macro-letter transformers *delimiter "}" ) / "%%" / "%_" / "%-"
#   transformers = *DIGIT [ "r" ]                       (§7.1; ABNF is case-blind)
#   delimiter    = "." / "-" / "+" / "," / "/" / "_" / "="
_MACRO_RE: Final = re.compile(r"%\{([slodiphcrtvSLODIPHCRTV])([0-9]*)([rR]?)([.\-+,/_=]*)\}")
#   domain-end = ( "." toplabel [ "." ] ) / macro-expand
#   toplabel   = ( *alphanum ALPHA *alphanum ) / ( 1*alphanum "-" *( alphanum / "-" ) alphanum )
_TOPLABEL_RE: Final = re.compile(
    r"[A-Za-z0-9]*[A-Za-z][A-Za-z0-9]*|[A-Za-z0-9]+-[A-Za-z0-9-]*[A-Za-z0-9]"
)
_EXP_ONLY: Final = frozenset("crt")  # §7.2: c, r and t only in explanation text
_SPLITTERS: dict[str, dict[int, int]] = {}


class _MacroString:
    """A parsed macro-string; ``static`` is its value when it has no macros."""

    __slots__ = ("parts", "static", "needs_p")

    def __init__(self, parts: tuple[str | _Macro, ...], static: str | None) -> None:
        self.parts = parts
        self.static = static
        self.needs_p = static is None and _uses_p(parts)


def _uses_p(parts: tuple[str | _Macro, ...]) -> bool:
    return any(isinstance(p, _Macro) and p.letter == "p" for p in parts)


def _parse_macros(text: str, *, explanation: bool) -> tuple[tuple[str | _Macro, ...], bool]:
    """Parse a macro-string (§7.1); answer its parts and whether it ends in a macro-expand.

    Raises ValueError on a "%" not starting a valid macro, a zero digit
    transformer (§7.3 "MUST be nonzero"), or c/r/t outside an explanation.
    The caller has already checked the text is visible ASCII (and SP only
    where an explain-string allows it).
    """
    parts: list[str | _Macro] = []
    literal: list[str] = []
    i, n, ends_in_macro = 0, len(text), False
    while i < n:
        j = text.find("%", i)
        if j < 0:
            literal.append(text[i:])
            ends_in_macro = False
            break
        if j > i:
            literal.append(text[i:j])
        c = text[j + 1 : j + 2]
        if c in ("%", "_", "-"):  # §7.1: "%%" is "%", "%_" a space, "%-" "%20"
            literal.append({"%": "%", "_": " ", "-": "%20"}[c])
            i = j + 2
        else:
            m = _MACRO_RE.match(text, j)
            if m is None:
                raise ValueError(f"bad macro at {text[j:j + 12]!r}")
            letter, digits, rev, delims = m.groups()
            low = letter.lower()
            if low in _EXP_ONLY and not explanation:
                raise ValueError(f"%{{{letter}}} is allowed only in exp text")
            keep = int(digits) if digits else 0
            if digits and keep == 0:
                raise ValueError("macro digit transformer must be nonzero")
            split = None
            if delims and delims != ".":
                # At most 2**7 keys whatever the records say: a set of delimiters.
                key = "".join(sorted(set(delims)))
                split = _SPLITTERS.get(key)
                if split is None:
                    split = _SPLITTERS[key] = str.maketrans(key, "." * len(key))
            if literal:
                parts.append("".join(literal))
                literal = []
            parts.append(_Macro(low, letter.isupper(), keep, bool(rev), split))
            i = m.end()
        ends_in_macro = True
    if literal:
        parts.append("".join(literal))
    return tuple(parts), ends_in_macro


def _ends_in_toplabel(text: str) -> bool:
    """domain-end's first form: "." toplabel [ "." ] closes the text."""
    if text.endswith("."):
        text = text[:-1]
    dot = text.rfind(".")
    return dot >= 0 and _TOPLABEL_RE.fullmatch(text, dot + 1) is not None


def _parse_domain_spec(text: str) -> _MacroString:
    """domain-spec = macro-string domain-end (§7.1); raises ValueError."""
    if "%" not in text:  # the common case: a plain name, its value known now
        if not _ends_in_toplabel(text):
            raise ValueError(f"{text!r} does not end in a top-level label")
        return _MacroString((text,), _finish_name(text))
    parts, ends_in_macro = _parse_macros(text, explanation=False)
    if not ends_in_macro and not _ends_in_toplabel(text):
        raise ValueError(f"{text!r} does not end in a top-level label")
    if all(isinstance(p, str) for p in parts):
        return _MacroString(parts, _finish_name("".join(parts)))  # type: ignore[arg-type]
    return _MacroString(parts, None)


def _finish_name(name: str) -> str:
    """A domain as looked up: no trailing dot, at most 253 octets (§7.3)."""
    if name.endswith("."):
        name = name[:-1]
    # §7.3: too long a name loses labels from the left until it fits.
    while len(name) > MAX_NAME:
        dot = name.find(".")
        if dot < 0:
            break  # one label over 253: lookups() answers BadName
        name = name[dot + 1 :]
    return name


# ---------------------------------------------------------------------------
# Records, RFC 7208 §4.6 and §12.

_ALL, _IP4, _IP6, _A, _MX, _PTR, _EXISTS, _INCLUDE = range(8)
_MECHANISMS: Final = {
    "all": _ALL, "ip4": _IP4, "ip6": _IP6, "a": _A,
    "mx": _MX, "ptr": _PTR, "exists": _EXISTS, "include": _INCLUDE,
}  # fmt: skip
_QUALIFIERS: Final = {"+": PASS, "-": FAIL, "~": SOFTFAIL, "?": NEUTRAL}
#   name = ALPHA *( ALPHA / DIGIT / "-" / "_" / "." )        modifier = name "=" macro-string
_MODIFIER_RE: Final = re.compile(r"([A-Za-z][A-Za-z0-9\-_.]*)=(.*)\Z", re.S)
_MECH_NAME_RE: Final = re.compile(r"[A-Za-z][A-Za-z0-9]*")
#   ip4-network = qnum "." qnum "." qnum "." qnum ; qnum = 0-255, no leading zeros
_QNUM: Final = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9][0-9]|[0-9])"
_IP4_RE: Final = re.compile(rf"{_QNUM}(?:\.{_QNUM}){{3}}(?:/([0-9]+))?\Z")


_FULL4: Final = (1 << 32) - 1
_FULL6: Final = (1 << 128) - 1


class _Term:
    """One directive, ready to evaluate."""

    __slots__ = ("kind", "result", "matched", "target", "net", "mask4", "mask6", "text")

    def __init__(self, kind: int, result: str, text: str) -> None:
        self.kind = kind
        self.result = result  # the qualifier's result (§4.6.2)
        self.matched = "matched " + text  # the reason, built once
        self.target: _MacroString | None = None
        self.net = 0  # ip4/ip6: the network, as an integer
        self.mask4 = _FULL4
        self.mask6 = _FULL6
        self.text = text


class _Record:
    __slots__ = ("terms", "redirect", "exp", "has_all", "error")

    def __init__(self) -> None:
        self.terms: list[_Term] = []
        self.redirect: _MacroString | None = None
        self.exp: _MacroString | None = None
        self.has_all = False
        self.error = ""  # a syntax error: the record is a permerror (§4.6)


def _mask(bits: int, width: int) -> int:
    return ((1 << bits) - 1) << (width - bits)


def _cidr(value: str, top: int) -> int:
    """ip4-cidr-length / ip6-cidr-length (§12): no leading zero, at most top."""
    if not value.isdigit() or (value[0] == "0" and value != "0") or len(value) > 3:
        raise ValueError(f"bad prefix length /{value}")
    bits = int(value)
    if bits > top:
        raise ValueError(f"prefix length /{bits} over {top}")
    return bits


def _parse_term(text: str) -> _Term | tuple[str, _MacroString | None] | None:
    """A directive as a _Term; a modifier as (name, value) or None when unknown."""
    qualifier = text[0]
    body = text[1:] if qualifier in _QUALIFIERS else text
    if body is text and "=" in text:
        mod = _MODIFIER_RE.match(text)
        if mod is not None:
            name, value = mod.group(1).lower(), mod.group(2)
            if name in ("redirect", "exp"):
                return name, _parse_domain_spec(value)
            _parse_macros(value, explanation=True)  # §6: must still be a macro-string
            return None
    m = _MECH_NAME_RE.match(body)
    kind = _MECHANISMS.get(m.group().lower()) if m else None
    if kind is None or m is None:
        raise ValueError("unknown mechanism")
    rest = body[m.end() :]
    term = _Term(kind, _QUALIFIERS.get(qualifier, PASS), text)
    if kind == _ALL:
        if rest:
            raise ValueError("all takes no argument")
    elif kind == _IP4:
        ip = _IP4_RE.match(rest, 1) if rest.startswith(":") else None
        if ip is None:
            raise ValueError("bad ip4 network")
        term.mask4 = _mask(_cidr(ip.group(1), 32) if ip.group(1) else 32, 32)
        addr = rest[1:].partition("/")[0]
        term.net = int.from_bytes(socket.inet_pton(socket.AF_INET, addr), "big") & term.mask4
    elif kind == _IP6:
        if not rest.startswith(":"):
            raise ValueError("bad ip6 network")
        addr, slash, length = rest[1:].rpartition("/") if "/" in rest else (rest[1:], "", "")
        bits = _cidr(length, 128) if slash else 128
        try:
            packed = socket.inet_pton(socket.AF_INET6, addr)  # RFC 4291 §2.2 forms
        except OSError:
            raise ValueError("bad ip6 network") from None
        term.mask6 = _mask(bits, 128)
        term.net = int.from_bytes(packed, "big") & term.mask6
    elif kind in (_A, _MX):
        if "/" in rest:
            # dual-cidr-length closes the term; a domain-spec may hold "/" too.
            cut = rest.rfind("//")
            if cut >= 0 and rest[cut + 2 :].isdigit():
                term.mask6 = _mask(_cidr(rest[cut + 2 :], 128), 128)
                rest = rest[:cut]
            cut = rest.rfind("/")
            if cut >= 0 and rest[cut + 1 :].isdigit():
                term.mask4 = _mask(_cidr(rest[cut + 1 :], 32), 32)
                rest = rest[:cut]
        if rest:
            if not rest.startswith(":"):
                raise ValueError("bad argument")
            term.target = _parse_domain_spec(rest[1:])
    else:  # ptr takes an optional domain-spec; include and exists need one
        if rest:
            if not rest.startswith(":"):
                raise ValueError("bad argument")
            term.target = _parse_domain_spec(rest[1:])
        elif kind != _PTR:
            raise ValueError("needs a domain")
    return term


class _RecordCache:
    """Parsed records by their text, least recently used out first.

    Bounded by an estimate of the memory held (the text plus ~256 octets a
    term) as well as by count, so records of a thousand terms cannot make
    it hold hundreds of megabytes.
    """

    __slots__ = ("_records", "_weight", "max_weight", "max_entries")

    def __init__(self, max_weight: int, max_entries: int) -> None:
        self._records: OrderedDict[bytes, tuple[_Record, int]] = OrderedDict()
        self._weight = 0
        self.max_weight = max_weight
        self.max_entries = max_entries

    def __len__(self) -> int:
        return len(self._records)

    def get(self, raw: bytes) -> _Record:
        hit = self._records.get(raw)
        if hit is not None:
            self._records.move_to_end(raw)
            return hit[0]
        record = _parse_text(raw)
        weight = len(raw) + 256 * len(record.terms)
        self._records[raw] = (record, weight)
        self._weight += weight
        while self._weight > self.max_weight or len(self._records) > self.max_entries:
            _, (_, old) = self._records.popitem(last=False)
            self._weight -= old
        return record


def _parse_record(raw: bytes) -> _Record:
    """The parsed record, from the cache when this text was seen before."""
    return _RECORDS.get(raw)


def _parse_text(raw: bytes) -> _Record:
    """Parse a whole SPF record (§4.6: any syntax error is a permerror)."""
    rec = _Record()
    if len(raw) > MAX_RECORD_OCTETS:
        rec.error = f"record too long ({len(raw)} octets)"
        return rec
    text = raw.decode("latin-1")
    # §12: terms are visible ASCII separated by SP; nothing else is allowed.
    if not (text.isascii() and text.isprintable()):
        rec.error = "syntax error: a character outside visible ASCII"
        return rec
    words = text.split(" ")
    number = 0
    for word in words[1:]:  # words[0] is "v=spf1" (§4.5)
        if not word:
            continue
        number += 1
        if number > MAX_TERMS:
            rec.error = f"too many terms (over {MAX_TERMS})"
            return rec
        try:
            term = _parse_term(word)
        except ValueError:
            rec.error = f"syntax error at term {number} ({word[:40]!r})"
            return rec
        if isinstance(term, _Term):
            rec.terms.append(term)
            rec.has_all = rec.has_all or term.kind == _ALL
        elif term is not None:
            name, spec = term
            # §6: redirect and exp each at most once.
            if getattr(rec, name) is not None:
                rec.error = f"{name}= given twice"
                return rec
            setattr(rec, name, spec)
    return rec


_RECORDS: Final = _RecordCache(max_weight=8 << 20, max_entries=4096)


# ---------------------------------------------------------------------------
# Evaluation, RFC 7208 §4.6.2, §5 and §6.


def _ip_parse(ip: str) -> tuple[int, int, str]:
    """(4 or 6, the address as an integer, its text for PTR queries and %{i})."""
    try:
        return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, ip), "big"), ip
    except OSError:
        pass
    try:
        value = int.from_bytes(socket.inet_pton(socket.AF_INET6, ip), "big")
    except OSError:
        raise ValueError(f"not an IP address: {ip!r}") from None
    if value >> 32 == 0xFFFF:  # §5: an IPv4-mapped IPv6 client is an IPv4 client
        v4 = value & 0xFFFFFFFF
        return 4, v4, socket.inet_ntop(socket.AF_INET, v4.to_bytes(4, "big"))
    return 6, value, socket.inet_ntop(socket.AF_INET6, value.to_bytes(16, "big"))


@lru_cache(maxsize=4096)  # the same few domains come back for every message
def _valid_domain(name: str) -> bool:
    """§4.3: a multi-label name whose labels are 1-63 long, 253 in all; no address literal."""
    if name.endswith("."):
        name = name[:-1]
    if not 3 <= len(name) <= MAX_NAME or name[0] == "[":
        return False
    labels = name.split(".")
    if len(labels) < 2 or labels[-1].isdigit():  # an IP address is no domain
        return False
    return all(0 < len(label) <= 63 for label in labels)


def _dns_reason(exc: DNSError, name: str, rtype: str) -> str:
    detail = str(exc)[:120]
    if name in detail:
        return f"DNS error ({detail})"
    return f"DNS error for {name} {rtype}" + (f" ({detail})" if detail else "")


class _Check:
    """The state of one check_host() call, includes and redirects included."""

    __slots__ = (
        "lookups", "version", "ip", "ip_text", "sender", "local", "sender_domain",
        "helo", "receiver", "now", "dns_terms", "voids", "stack", "ptrs", "validated", "deadline",
    )  # fmt: skip

    def __init__(
        self, lookups: Lookups, ip: str, sender: str, helo: str, receiver: str, now: float | None
    ) -> None:
        self.lookups = lookups
        self.version, self.ip, self.ip_text = _ip_parse(ip)
        local, at, domain = sender.rpartition("@")
        if not at:
            domain = sender
        # §4.3: a sender without a local-part is postmaster at its domain.
        self.local = local or "postmaster"
        self.sender_domain = domain
        self.sender = f"{self.local}@{domain}"
        self.helo = helo
        self.receiver = receiver
        self.now = now
        self.dns_terms = 0
        self.voids = 0
        self.deadline = time.monotonic() + TIME_LIMIT
        self.stack: list[str] = []
        self.ptrs: tuple[str, ...] | None | bool = False  # the PTR answer, once per check
        self.validated: tuple[str, ...] | None = None  # %{p}'s names, once per check

    def count_dns_term(self) -> None:
        # §4.6.4: the 11th DNS-querying term is a permerror, counted over
        # the whole evaluation, includes and redirects together.
        self.dns_terms += 1
        if self.dns_terms > MAX_DNS_TERMS:
            raise _Stop(PERMERROR, f"too many DNS lookups ({self.dns_terms} > {MAX_DNS_TERMS})")
        # §4.6.4's elapsed-time limit, checked before each DNS term rather
        # than by a timer per check (a timer costs more than a warm check):
        # each query is bounded by the resolver's own timeout, so the whole
        # is bounded by TIME_LIMIT plus one term's queries.
        if time.monotonic() > self.deadline:
            raise _Stop(TEMPERROR, f"SPF evaluation over {TIME_LIMIT:g} s")

    def void(self) -> None:
        # §4.6.4: a term whose query answered NXDOMAIN or no data.
        self.voids += 1
        if self.voids > MAX_VOID_LOOKUPS:
            raise _Stop(PERMERROR, f"too many void lookups ({self.voids} > {MAX_VOID_LOOKUPS})")

    def in_net(self, addresses: tuple[str, ...], term: _Term) -> bool:
        family = socket.AF_INET if self.version == 4 else socket.AF_INET6
        mask = term.mask4 if self.version == 4 else term.mask6
        want = self.ip & mask
        for text in addresses:
            try:
                value = int.from_bytes(socket.inet_pton(family, text), "big")
            except (OSError, TypeError):
                continue  # not an address of this family: skip it
            if value & mask == want:
                return True
        return False

    # -- macros (§7.3) ---------------------------------------------------

    def macro_value(self, letter: str, domain: str) -> str:
        if letter == "d":
            return domain
        if letter == "i":
            if self.version == 4:
                return self.ip_text
            return ".".join(f"{self.ip:032x}")  # §7.3: dot-format, nibble by nibble
        if letter == "s":
            return self.sender
        if letter == "l":
            return self.local
        if letter == "o":
            return self.sender_domain
        if letter == "v":
            return "in-addr" if self.version == 4 else "ip6"
        if letter == "h":
            return self.helo
        if letter == "p":
            return _choose_p(self.validated or (), domain)
        if letter == "c":
            return self.ip_text
        if letter == "r":
            return self.receiver or "unknown"
        # letter == "t"
        return str(int(self.now if self.now is not None else time.time()))

    def expand(self, parts: tuple[str | _Macro, ...], domain: str) -> str:
        out: list[str] = []
        for part in parts:
            if isinstance(part, str):
                out.append(part)
                continue
            value = self.macro_value(part.letter, domain)
            if part.keep or part.reverse or part.split is not None:
                # §7.3: split on the delimiters, reverse, keep the right-hand
                # parts, rejoin with "."; empty parts are parts too.
                pieces = (value.translate(part.split) if part.split else value).split(".")
                if part.reverse:
                    pieces.reverse()
                if part.keep and part.keep < len(pieces):
                    pieces = pieces[-part.keep :]
                value = ".".join(pieces)
            if part.escape:
                value = quote(value, safe="-._~")  # §7.3: RFC 3986 unreserved stay
            out.append(value)
        return "".join(out)


def _choose_p(names: tuple[str, ...], domain: str) -> str:
    """§7.3: <domain> itself, else a subdomain of it, else any validated name."""
    domain = domain.lower().rstrip(".")
    tail = "." + domain
    for name in names:
        if name == domain:
            return name
    for name in names:
        if name.endswith(tail):
            return name
    return names[0] if names else "unknown"


async def _addresses(check: _Check, name: str) -> tuple[str, ...]:
    """The A or AAAA records of name, as fits the client (§5); BadName is none."""
    try:
        if check.version == 4:
            return await check.lookups.a(name)
        return await check.lookups.aaaa(name)
    except BadName:
        return ()


async def _validate(check: _Check, names: list[str]) -> list[str]:
    """§5.5: the names among these whose addresses include the client."""
    if not names:
        return []
    answers = await asyncio.gather(*(_addresses(check, n) for n in names), return_exceptions=True)
    ok = []
    for name, found in zip(names, answers):
        if isinstance(found, DNSError):
            continue  # §5.5: "that domain name is skipped and the search continues"
        if isinstance(found, BaseException):
            raise found
        if check.ip_text in found or check.in_net(found, _EXACT):
            ok.append(name)
    return ok


_EXACT: Final = _Term(_ALL, PASS, "")  # full masks: "is the client among these?"


async def _ptr_names(check: _Check) -> tuple[str, ...] | None:
    """The client's first 10 PTR names (§4.6.4), lower case; None on a DNS error.

    Asked once per check: the ptr mechanism and %{p} share the answer.
    """
    if check.ptrs is not False:
        return check.ptrs  # type: ignore[return-value]
    try:
        names: tuple[str, ...] | None = await check.lookups.ptr(check.ip_text)
    except (DNSError, BadName):
        names = None  # §5.5: a DNS error on the PTR lookup is no match
    if names:
        names = tuple(n.lower().rstrip(".") for n in names[:MAX_PTR_NAMES])
    check.ptrs = names
    return names


async def _expand_target(check: _Check, spec: _MacroString, domain: str) -> str:
    if spec.needs_p and check.validated is None:
        names = await _ptr_names(check)
        # §7.3: no validated name, or a DNS error, is "unknown".
        check.validated = tuple(await _validate(check, list(names or ())))
    return _finish_name(check.expand(spec.parts, domain))


async def _match_dns_term(check: _Check, term: _Term, domain: str) -> bool:
    """a, mx, ptr, exists and include: one counted term (§4.6.4)."""
    check.count_dns_term()
    spec = term.target
    if spec is None:
        name = domain
    elif spec.static is not None:
        name = spec.static
    else:
        name = await _expand_target(check, spec, domain)
    kind = term.kind
    if kind == _INCLUDE:
        return await _include(check, name)
    try:
        if kind == _A:  # §5.3
            found = await _addresses(check, name)
            if not found:
                check.void()
                return False
            return check.in_net(found, term)
        if kind == _EXISTS:  # §5.7: an A query, whatever the client's family
            try:
                found = await check.lookups.a(name)
            except BadName:
                found = ()
            if not found:
                check.void()
            return bool(found)
        if kind == _MX:
            return await _match_mx(check, term, name)
    except DNSError as exc:
        rtype = "MX" if kind == _MX else "A" if kind == _EXISTS or check.version == 4 else "AAAA"
        raise _Stop(TEMPERROR, _dns_reason(exc, name, rtype)) from None
    return await _match_ptr(check, name)


async def _match_mx(check: _Check, term: _Term, name: str) -> bool:
    """§5.4: the client is among the addresses of the MX hosts (no implicit MX)."""
    try:
        records = await check.lookups.mx(name)
    except BadName:
        records = ()
    if not records:
        check.void()
        return False
    if len(records) > MAX_MX:
        raise _Stop(PERMERROR, f"too many MX records for {name} ({len(records)} > {MAX_MX})")
    hosts = [host for _, host in records if host and host != "."]  # RFC 7505 null MX
    if len(hosts) == 1:
        return check.in_net(await _addresses(check, hosts[0]), term)
    # The exchanges' lookups run together.  A match anywhere wins; only
    # without one does a DNS error stand, so the result never depends on
    # which answer came first.
    answers = await asyncio.gather(*(_addresses(check, h) for h in hosts), return_exceptions=True)
    error: DNSError | None = None
    for found in answers:
        if isinstance(found, DNSError):
            error = error or found
        elif isinstance(found, BaseException):
            raise found
        elif check.in_net(found, term):
            return True
    if error is not None:
        raise error
    return False


async def _match_ptr(check: _Check, target: str) -> bool:
    """§5.5: a validated name of the client is target or below it."""
    names = await _ptr_names(check)
    if names is None:
        return False
    if not names:
        check.void()
        return False
    target = target.lower()
    tail = "." + target
    # Only names under the target could match, so only they are validated:
    # the same answer as validating all ten, with fewer queries.
    wanted = [n for n in names if n == target or n.endswith(tail)]
    return bool(await _validate(check, wanted))


async def _include(check: _Check, name: str) -> bool:
    """§5.2: pass matches; fail, softfail, neutral do not; the rest end it."""
    key = name.lower()
    if key in check.stack:
        raise _Stop(PERMERROR, f"include loop at {name}")
    check.stack.append(key)
    result, reason, _ = await _evaluate(check, name, False)
    check.stack.pop()
    if result == PASS:
        return True
    if result in (FAIL, SOFTFAIL, NEUTRAL):
        return False
    if result == TEMPERROR:
        raise _Stop(TEMPERROR, reason)
    if result == NONE:
        raise _Stop(PERMERROR, f"include:{name} has no SPF record")
    raise _Stop(PERMERROR, reason)


async def _evaluate(check: _Check, domain: str, want_exp: bool) -> tuple[str, str, str]:
    """check_host() for one domain: (result, reason, explanation)."""
    if not _valid_domain(domain):
        return NONE, f"{domain[:60]!r} is not a domain name", ""  # §4.3
    try:
        answers = await check.lookups.txt(domain)
    except DNSError as exc:
        return TEMPERROR, _dns_reason(exc, domain, "TXT"), ""  # §4.4
    except BadName:
        return NONE, f"{domain[:60]!r} is not a domain name", ""  # §4.3
    raw = None
    for txt in answers:
        # §4.5: "v=spf1" (case-blind, §12's ABNF) then SP or the end.
        if txt[:6].lower() == b"v=spf1" and (len(txt) == 6 or txt[6] == 0x20):
            if raw is not None:
                return PERMERROR, f"several SPF records for {domain}", ""
            raw = txt
    if raw is None:
        return NONE, f"no SPF record for {domain}", ""
    record = _parse_record(raw)
    if record.error:
        return PERMERROR, f"{record.error} in {domain}", ""
    ip, v4 = check.ip, check.version == 4
    for term in record.terms:
        kind = term.kind
        if kind == _IP4:  # §5.6: ip4 never matches an IPv6 client, nor ip6 an IPv4 one
            hit = v4 and ip & term.mask4 == term.net
        elif kind == _IP6:
            hit = not v4 and ip & term.mask6 == term.net
        elif kind == _ALL:
            hit = True
        else:
            hit = await _match_dns_term(check, term, domain)
        if hit:
            explanation = ""
            if term.result == FAIL and want_exp and record.exp is not None:
                explanation = await _explain(check, record.exp, domain)
            return term.result, term.matched, explanation
    if record.redirect is not None and not record.has_all:
        return await _redirect(check, record.redirect, domain, want_exp)
    return NEUTRAL, "no match, default neutral", ""  # §4.7


async def _redirect(
    check: _Check, spec: _MacroString, domain: str, want_exp: bool
) -> tuple[str, str, str]:
    """§6.1: the target's result is ours, but none is a permerror."""
    check.count_dns_term()
    name = spec.static if spec.static is not None else await _expand_target(check, spec, domain)
    key = name.lower()
    if key in check.stack:
        raise _Stop(PERMERROR, f"redirect loop at {name}")
    check.stack.append(key)
    # §6.2: the exp= of the record redirected to applies, not ours.
    result, reason, explanation = await _evaluate(check, name, want_exp)
    if result == NONE:
        return PERMERROR, f"redirect={name}: no SPF record", ""
    return result, f"redirect={name}: {reason}", explanation


async def _explain(check: _Check, spec: _MacroString, domain: str) -> str:
    """§6.2: the exp= text, expanded; any trouble is no explanation (uncounted)."""
    try:
        name = await _expand_target(check, spec, domain)
        answers = await check.lookups.txt(name)
    except (DNSError, BadName):
        return ""
    if len(answers) != 1 or len(answers[0]) > MAX_EXPLANATION:
        return ""
    text = answers[0].decode("latin-1")
    if not (text.isascii() and text.isprintable()):
        return ""  # explain-string: macro-literals and SP only (§7.1)
    try:
        parts, _ = _parse_macros(text, explanation=True)
    except ValueError:
        return ""
    if check.validated is None and _uses_p(parts):
        names = await _ptr_names(check)
        check.validated = tuple(await _validate(check, list(names or ())))
    out = check.expand(parts, domain)[:MAX_EXPLANATION]
    # It goes into an SMTP reply and a header: visible ASCII and SP only.
    return out if out.isascii() and out.isprintable() else "".join(
        c if " " <= c <= "~" else "?" for c in out
    )


# ---------------------------------------------------------------------------
# The entry points.


async def check_host(
    lookups: Lookups,
    ip: str,
    domain: str,
    sender: str,
    *,
    helo: str,
    receiver: str,
    now: float | None = None,
) -> tuple[str, str, str]:
    """RFC 7208 §4's check_host(): (result, reason, explanation).

    Args:
        lookups: where every DNS question goes.
        ip: the client's address, IPv4 or IPv6 text (IPv4-mapped is IPv4, §5).
        domain: the domain whose record is evaluated.
        sender: "local@domain" (the MAIL FROM, or postmaster@HELO), for macros.
        helo: the HELO/EHLO name (%{h}); receiver: our name (%{r}).
        now: seconds since the epoch for %{t}; None is the clock.

    Raises:
        ValueError: ip is not an IP address.
    """
    check = _Check(lookups, ip, sender, helo, receiver, now)
    check.stack.append(domain.lower().rstrip("."))
    try:
        return await _evaluate(check, domain, True)
    except _Stop as stop:
        return stop.result, stop.reason, ""


def _norm(domain: str) -> str:
    return domain[:-1].lower() if domain.endswith(".") else domain.lower()


async def check_mailfrom(
    lookups: Lookups, ip: str, sender: str, helo: str, receiver: str, *, now: float | None = None
) -> SPFResult:
    """The MAIL FROM identity (§2.4); the null sender <> is postmaster@HELO."""
    if not sender:
        domain, identity = helo, "postmaster@" + helo
    else:
        local, at, domain = sender.rpartition("@")
        if not at:
            return SPFResult(NONE, "mailfrom", "", "no domain in the sender")
        identity = f"{local or 'postmaster'}@{domain}"  # §4.3
    if not _valid_domain(domain):
        return SPFResult(NONE, "mailfrom", _norm(domain), "not a multi-label domain name")
    result, reason, explanation = await check_host(
        lookups, ip, domain, identity, helo=helo, receiver=receiver, now=now
    )
    return SPFResult(result, "mailfrom", _norm(domain), reason, explanation)


async def check_helo(
    lookups: Lookups, ip: str, helo: str, receiver: str, *, now: float | None = None
) -> SPFResult:
    """The HELO identity (§2.3): an address literal or a one-label name is none."""
    if not _valid_domain(helo):
        return SPFResult(NONE, "helo", _norm(helo), "HELO is not a multi-label domain name")
    result, reason, explanation = await check_host(
        lookups, ip, helo, "postmaster@" + helo, helo=helo, receiver=receiver, now=now
    )
    return SPFResult(result, "helo", _norm(helo), reason, explanation)

