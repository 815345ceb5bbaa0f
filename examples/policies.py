"""Example policies for ``fastsmtp serve --policy``.

    fastsmtp serve --policy examples/policies.py:SenderDomainRateLimit
    fastsmtp serve --policy examples/policies.py:DnsBlocklist
    fastsmtp serve --policy examples/policies.py:Combined

Each class is instantiated once per worker process, so its state (the rate
limiter's counts) is per worker: with N workers a sender gets up to N times
the limit.  A hook returns None to let the server decide, or a 4xx/5xx
``Reply`` to refuse.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections import deque
from typing import Awaitable, Callable

from fastsmtp import Address, Reply
from fastsmtp.hooks import SessionInfo

__all__ = ["SenderDomainRateLimit", "DnsBlocklist", "Combined", "dnsbl_name"]


class SenderDomainRateLimit:
    """At most ``limit`` messages per sender domain in any ``window`` seconds (sync).

    Counted at MAIL FROM, so a refused sender costs nothing more.  The null
    sender (bounces) is never limited: refusing bounces only makes more.
    """

    limit = 100
    window = 60.0

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._seen: dict[bytes, deque[float]] = {}

    def on_mail(self, info: SessionInfo, address: Address | None) -> Reply | None:
        if address is None:  # the null sender <>
            return None
        domain = address.domain.lower()
        now = self._clock()
        times = self._seen.setdefault(domain, deque())
        while times and times[0] <= now - self.window:
            times.popleft()
        if len(times) >= self.limit:
            # 4xx: a legitimate burst is delivered later, not bounced.
            return Reply(451, "4.7.1", f"Error: too many messages from {domain.decode('ascii', 'replace')}, slow down")
        times.append(now)
        if len(self._seen) > 100_000:
            # Forget idle domains, so that a flood of random domains cannot
            # grow the table without end.
            self._seen = {d: t for d, t in self._seen.items() if t and t[-1] > now - self.window}
        return None


Resolver = Callable[[str], Awaitable[bool]]


def dnsbl_name(ip: str, zone: str) -> str | None:
    """The DNSBL query name for ``ip``: 1.2.0.192.zone for 192.0.2.1 (RFC 5782 §2.1).

    IPv6 is nibble-reversed (RFC 5782 §2.4); None for what is not an address.
    """
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return None
    return address.reverse_pointer.removesuffix(".in-addr.arpa").removesuffix(".ip6.arpa") + "." + zone


async def _listed(name: str) -> bool:
    """Whether ``name`` resolves (listed) or not (NXDOMAIN: not listed)."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(name, None, family=socket.AF_INET, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return False
    # RFC 5782 §2.1: listings are 127.0.0.0/8; anything else (a wildcard, a
    # resolver redirecting NXDOMAIN to an ad page) is not an answer.
    return any(info[4][0].startswith("127.") for info in infos)


class DnsBlocklist:
    """Refuse clients listed in a DNS blocklist, before the greeting (async).

    ``on_connect`` asks ``loop.getaddrinfo`` for the reversed-IP name in
    ``zone`` (the system resolver: point it at a caching resolver; public
    DNSBLs refuse queries forwarded through large public resolvers).  The
    server bounds the lookup with ``--policy-timeout``; a timeout gives 451,
    so a broken resolver delays mail instead of letting it all through or
    refusing it.  ``resolver`` replaces the DNS query (tests use a fake).
    """

    zone = "zen.spamhaus.org"

    def __init__(self, resolver: Resolver = _listed) -> None:
        self._resolver = resolver

    async def on_connect(self, peer: str) -> Reply | None:
        name = dnsbl_name(peer, self.zone)
        if name is None or ipaddress.ip_address(peer).is_loopback:
            return None
        if await self._resolver(name):
            return Reply(554, "5.7.1", f"Service unavailable; client host [{peer}] blocked using {self.zone}")
        return None


class Combined(DnsBlocklist, SenderDomainRateLimit):
    """Both: the blocklist at connect, the rate limit at MAIL FROM."""

    def __init__(self) -> None:
        DnsBlocklist.__init__(self)
        SenderDomainRateLimit.__init__(self)
