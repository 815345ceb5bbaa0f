"""DNS for the checks that need it: one shared async resolver per worker.

Rules of this module:
- Every DNS question the server asks goes through a ``Lookups``: SPF, DKIM,
  DMARC and ARC (auth/), and later the screening.  The auth modules know
  only this interface, so their unit tests use a dict-backed fake.
- An empty answer means NXDOMAIN or no data of the type (a "void" lookup,
  RFC 7208 §4.6.4); trouble that may pass (a timeout, SERVFAIL, garbage) is
  ``DNSError``; a name that cannot be asked is ``BadName``, raised before
  any query is sent.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["DNSError", "BadName", "Lookups"]


class DNSError(Exception):
    """A lookup that could not be answered now: the checks' temperror."""


class BadName(ValueError):
    """A name that cannot be a DNS name (an empty or over-long label, over 253 octets)."""


class Lookups(Protocol):
    """The questions the checks ask; each answers a tuple, empty for none."""

    async def txt(self, name: str) -> tuple[bytes, ...]:
        """Each TXT record's character-strings, concatenated (RFC 7208 §3.3)."""

    async def a(self, name: str) -> tuple[str, ...]:
        """IPv4 addresses, as text."""

    async def aaaa(self, name: str) -> tuple[str, ...]:
        """IPv6 addresses, compressed text."""

    async def mx(self, name: str) -> tuple[tuple[int, str], ...]:
        """(preference, exchange) pairs, the exchange without its trailing dot."""

    async def ptr(self, address: str) -> tuple[str, ...]:
        """The names of an IP address, without trailing dots."""
