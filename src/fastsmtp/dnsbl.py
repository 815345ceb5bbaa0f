"""DNSBL and DNSWL scores of a client address (RFC 5782), in postscreen's syntax.

Rules of this module:
- A site is written as Postfix's ``postscreen_dnsbl_sites`` writes it:
  ``domain[=filter][*weight]``.  The filter is four dot-separated octet
  patterns, each a number or a bracketed list of numbers and ``n..m``
  ranges (``127.0.0.[2..11]``, ``127.0.[0;1].[2..4;10]``).  The weight is
  an integer, 1 if omitted; a negative weight makes the site an allow-list
  (a DNSWL).
- A site counts once when any address it answers matches its filter: its
  weight is added to the score.  The score is the sum over all sites.  The
  reply to a blocked client names the listing site of the highest weight,
  as postscreen's does.
- A site without a filter counts any answer in 127.0.0.0/8, where RFC 5782
  §2.3 puts DNSxL records.  Answers outside it are never a listing: they
  are what a resolver that rewrites NXDOMAIN into an advertising page
  answers (postscreen would count them).
- A list that does not answer in time (or answers nonsense) counts as not
  listed: a dead list must not refuse all mail.  The wait is bounded by the
  resolver's timeout (``--dns-timeout``).
- All sites are asked at once, through the one resolver (dns.py), whose
  cache keeps each answer for its TTL.  A client whose answers are all
  cached is scored without a coroutine (``cached``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
from dataclasses import dataclass
from typing import Sequence

from .dns import BadName, DNSError, Lookups

__all__ = ["Site", "Score", "DNSBL", "parse_site", "parse_sites", "query_name", "SiteError"]


class SiteError(ValueError):
    """A ``--dnsbl-sites`` entry that is not ``domain[=filter][*weight]``."""


#: One octet's pattern: the values it allows, or None for any.
Octets = frozenset[int] | None

_SITE = re.compile(r"(?P<domain>[^=*\s]+)(?:=(?P<filter>[^*\s]+))?(?:\*(?P<weight>[-+]?\d+))?")
_DOMAIN = re.compile(r"(?i)[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?(?:\.[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?)*\.?")


@dataclass(frozen=True, slots=True)
class Site:
    """One list: where to ask, which answers count, and how much."""

    domain: str
    #: Four octet patterns, or None (any answer in 127.0.0.0/8).
    filter: tuple[Octets, Octets, Octets, Octets] | None
    weight: int
    #: The entry as written, for logs.
    text: str

    def matches(self, answers: Sequence[str]) -> bool:
        """Whether any of a lookup's A records is a listing for this site."""
        for answer in answers:
            parts = answer.split(".")
            if len(parts) != 4 or not all(p.isdigit() for p in parts):
                continue
            octets = [int(p) for p in parts]
            if self.filter is None:
                if octets[0] == 127:
                    return True
            elif all(pattern is None or octet in pattern for pattern, octet in zip(self.filter, octets)):
                return True
        return False


def _octet_pattern(text: str, entry: str) -> Octets:
    if text == "*":
        return None
    if text.isdigit():
        value = int(text)
        if value > 255:
            raise SiteError(f"{entry!r}: {text} is not an octet")
        return frozenset((value,))
    if not (text.startswith("[") and text.endswith("]")):
        raise SiteError(f"{entry!r}: {text!r} is not a number or a [list]")
    values: set[int] = set()
    for item in text[1:-1].split(";"):
        low, dots, high = item.partition("..")
        if not low.isdigit() or (dots and not high.isdigit()):
            raise SiteError(f"{entry!r}: {item!r} is not n or n..m")
        start, end = int(low), int(high) if dots else int(low)
        if start > end or end > 255:
            raise SiteError(f"{entry!r}: {item!r} is not a range of octets")
        values.update(range(start, end + 1))
    return frozenset(values)


def parse_site(entry: str) -> Site:
    """``zen.example=127.0.0.[2..11]*3`` as a Site; SiteError if malformed."""
    m = _SITE.fullmatch(entry.strip())
    if m is None:
        raise SiteError(f"{entry!r} is not domain[=filter][*weight]")
    domain = m["domain"].rstrip(".").lower()
    if not _DOMAIN.fullmatch(domain) or len(domain) > 200:
        raise SiteError(f"{entry!r}: {m['domain']!r} is not a domain")
    pattern = None
    if m["filter"] is not None:
        # The brackets may hold dots of their own ("[2..11]"): split only
        # the dots outside them.
        pieces = re.findall(r"\[[^\]]*\]|[^.]+", m["filter"])
        if len(pieces) != 4 or ".".join(pieces) != m["filter"]:
            raise SiteError(f"{entry!r}: the filter must be four octet patterns (d.d.d.d)")
        a, b, c, d = (_octet_pattern(p, entry) for p in pieces)
        pattern = (a, b, c, d)
    weight = int(m["weight"]) if m["weight"] is not None else 1
    return Site(domain, pattern, weight, entry.strip())


def parse_sites(entries: Sequence[str]) -> tuple[Site, ...]:
    """Every entry of ``--dnsbl-sites``; an entry may hold several, space-separated."""
    return tuple(parse_site(word) for entry in entries for word in entry.split())


def query_name(address: str, domain: str) -> str | None:
    """RFC 5782 §2.1 and §2.4: the reversed octets (v4) or nibbles (v6), then the list's domain."""
    try:
        ip = ipaddress.ip_address(address.partition("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # a v4 client on a dual-stack socket is asked as v4
    if isinstance(ip, ipaddress.IPv4Address):
        return ".".join(reversed(str(ip).split("."))) + "." + domain
    return ".".join(reversed(ip.exploded.replace(":", ""))) + "." + domain


@dataclass(frozen=True, slots=True)
class Score:
    """One client's score: the sum, and the listing sites (highest weight first)."""

    total: int
    listed: tuple[Site, ...] = ()
    #: Sites that did not answer (counted as not listing the client).
    failed: int = 0

    @property
    def top(self) -> str | None:
        """The blocking site's domain for the reply: the positive listing of the highest weight."""
        for site in self.listed:
            if site.weight > 0:
                return site.domain
        return None


NOT_LISTED = Score(0)


class DNSBL:
    """The configured sites of one worker, scoring through one resolver."""

    def __init__(self, sites: Sequence[Site], lookups: Lookups) -> None:
        self.sites = tuple(sites)
        self.lookups = lookups

    def cached(self, address: str) -> Score | None:
        """The score from the resolver's cache alone, or None when a lookup is needed."""
        # Resolver.peek_a; a Lookups without a cache of its own (a test's)
        # always goes the async way.
        peek = getattr(self.lookups, "peek_a", None)
        if peek is None:
            return None
        answers = []
        for site in self.sites:
            name = query_name(address, site.domain)
            if name is None:
                return NOT_LISTED
            found = peek(name)
            if found is None:
                return None
            answers.append(found)
        return _score(self.sites, answers)

    async def score(self, address: str) -> Score:
        """Ask every site at once; a site that fails counts as not listed."""
        names = [query_name(address, site.domain) for site in self.sites]
        if not self.sites or None in names:
            return NOT_LISTED
        lookups = self.lookups
        results = await asyncio.gather(*(lookups.a(name) for name in names if name), return_exceptions=True)
        answers: list[Sequence[str]] = []
        failed = 0
        for result in results:
            if isinstance(result, (DNSError, BadName)):
                failed += 1
                answers.append(())
            elif isinstance(result, BaseException):
                raise result
            else:
                answers.append(result)
        return _score(self.sites, answers, failed)


def _score(sites: Sequence[Site], answers: Sequence[Sequence[str]], failed: int = 0) -> Score:
    listed = [site for site, found in zip(sites, answers) if found and site.matches(found)]
    if not listed:
        return Score(0, (), failed) if failed else NOT_LISTED
    listed.sort(key=lambda site: -site.weight)
    return Score(sum(site.weight for site in listed), tuple(listed), failed)
