"""DNS for the checks that need it: one shared async resolver per worker.

Rules of this module:
- Every DNS question the server asks goes through a ``Lookups``: SPF, DKIM,
  DMARC and ARC (auth/), and later the screening.  The auth modules know
  only this interface, so their unit tests use a dict-backed fake.
- An empty answer means NXDOMAIN or no data of the type (a "void" lookup,
  RFC 7208 §4.6.4); trouble that may pass (a timeout, SERVFAIL, garbage) is
  ``DNSError``; a name that cannot be asked is ``BadName``, raised before
  any query is sent.  No other exception leaves a lookup (cancellation of
  the caller's own task aside).
- ``Resolver`` is the one implementation.  dnspython's asyncio resolver does
  the wire work (retries over the servers, TCP after a truncated UDP answer,
  RFC 7766); we keep what it does not do the way we need it: a cache of the
  *converted* answers, one in-flight query per question, and the mapping of
  its many exceptions onto the two above.
- The warm path is a dict lookup and a clock read: the cache holds the
  tuples the methods return, keyed by (lower-cased name, type), and touches
  no dnspython object.
- ``timeout`` bounds a whole lookup, retries and TCP included; errors are
  never cached, so the next message asks again.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import time
from collections import OrderedDict
from typing import Any, Callable, Protocol, Sequence

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
import dns.reversename

__all__ = ["DNSError", "BadName", "Lookups", "Resolver", "parse_server"]


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


_A = int(dns.rdatatype.A)
_AAAA = int(dns.rdatatype.AAAA)
_MX = int(dns.rdatatype.MX)
_TXT = int(dns.rdatatype.TXT)
_PTR = int(dns.rdatatype.PTR)
_SOA = int(dns.rdatatype.SOA)

#: How long a negative answer without an SOA is kept.  RFC 2308 §5 says not
#: to cache those at all, for fear of two caches feeding each other forever;
#: we are the last consumer and serve no one, so a short while is harmless
#: and spares the servers a storm of repeats from one message's checks.
NO_SOA_NEGATIVE_TTL = 60

#: EDNS(0) with the 2020 DNS flag day's payload size: DKIM keys of 2048 bits
#: and up exceed the 512 octets of plain DNS (RFC 1035 §4.2.1), and 1232
#: stays under common path MTUs without fragmenting (RFC 6891 §6.2.5).
EDNS_PAYLOAD = 1232

_now = time.monotonic


def _name_text(name: dns.name.Name) -> str:
    """A target name as the interface gives it: no trailing dot; the root is ''."""
    # RFC 7505: a null MX's exchange is the root; "" says so without a dot.
    return "" if name == dns.name.root else name.to_text(omit_final_dot=True)


def _txt(rrset: Any) -> tuple[bytes, ...]:
    # RFC 7208 §3.3 and RFC 6376 §3.6.2.2: a record's strings are joined
    # with nothing between them; each RR stays one item.
    return tuple(b"".join(rd.strings) for rd in rrset)


def _address(rrset: Any) -> tuple[str, ...]:
    return tuple(rd.address for rd in rrset)


def _mx(rrset: Any) -> tuple[tuple[int, str], ...]:
    return tuple((int(rd.preference), _name_text(rd.exchange)) for rd in rrset)


def _ptr(rrset: Any) -> tuple[str, ...]:
    return tuple(_name_text(rd.target) for rd in rrset)


_CONVERT: dict[int, Callable[[Any], tuple[Any, ...]]] = {
    _A: _address, _AAAA: _address, _MX: _mx, _TXT: _txt, _PTR: _ptr,
}


def _negative_ttl(responses: Sequence[dns.message.Message]) -> int:
    """RFC 2308 §5: a negative answer lives min(SOA TTL, SOA MINIMUM) seconds."""
    for response in responses:
        for rrset in response.authority:
            if rrset.rdtype == _SOA and len(rrset):
                return min(int(rrset.ttl), int(rrset[0].minimum))
    return NO_SOA_NEGATIVE_TTL


def _why(exc: dns.resolver.NoNameservers) -> str:
    """What the last server did wrong, in a word: "SERVFAIL", "REFUSED", "ChainTooLong"."""
    errors = exc.kwargs.get("errors") or []
    for error in reversed(errors):
        # dnspython records (server, tcp, port, exception or rcode text, answer).
        if len(error) > 3 and error[3] is not None:
            what = error[3]
            return what if isinstance(what, str) else type(what).__name__
    return "no usable answer"


def _qname(text: str) -> dns.name.Name:
    """The absolute name for a key, or BadName; never a query."""
    try:
        name = dns.name.from_text(text)   # absolute: no search list applies
    except (dns.exception.DNSException, UnicodeError, ValueError) as exc:
        # LabelTooLong (> 63 octets), NameTooLong (> 255 on the wire, so
        # > 253 as text, RFC 1035 §2.3.4), EmptyLabel, BadEscape, IDNA.
        raise BadName(f"not a DNS name: {text[:80]!r} ({type(exc).__name__})") from None
    if name == dns.name.root:
        raise BadName("empty name")
    return name


def _reverse_name(address: str) -> dns.name.Name:
    try:
        return dns.reversename.from_address(address)
    except (dns.exception.DNSException, ValueError) as exc:
        raise BadName(f"not an IP address: {address[:80]!r} ({type(exc).__name__})") from None


def parse_server(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT``, ``V6`` or ``HOST`` (port 53) as (address, port).

    HOST must be an IP address: the resolver cannot resolve its own server.
    """
    t = text.strip()
    host, port_text = t, "53"
    if t.startswith("["):
        end = t.find("]")
        if end < 0 or (t[end + 1:] and not t[end + 1:].startswith(":")):
            raise ValueError(f"bad DNS server {text!r}: expected [IPv6]:PORT.")
        host, port_text = t[1:end], t[end + 2:] or "53"
    elif t.count(":") == 1:
        host, port_text = t.split(":")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"bad DNS server {text!r}: the host must be an IP address.") from None
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad DNS server {text!r}: the port must be 1 to 65535.")
    return str(address), int(port_text)


class Resolver:
    """``Lookups`` over dnspython's asyncio resolver, with a shared answer cache.

    Counters (plain ints): ``hits`` and ``misses`` of the cache, ``queries``
    (lookups sent to the network: one per miss not joined to one in flight,
    whatever retries dnspython makes inside it), ``errors`` (of those, the
    ones that ended in DNSError).  ``len(resolver.cache)`` is its size.
    """

    def __init__(
        self,
        servers: Sequence[tuple[str, int]] = (),
        *,
        timeout: float = 2.0,
        cache_size: int = 10_000,
        max_ttl: int = 86_400,
        max_negative_ttl: int = 3_600,
    ) -> None:
        if timeout <= 0:
            raise ValueError("the DNS timeout must be positive.")
        self.timeout = float(timeout)
        self.cache_size = int(cache_size)
        self.max_ttl = int(max_ttl)
        self.max_negative_ttl = int(max_negative_ttl)
        #: (key, type) -> (expiry on the monotonic clock, converted answer),
        #: oldest use first, so eviction is popitem(last=False): O(1) LRU.
        self.cache: OrderedDict[tuple[str, int], tuple[float, tuple[Any, ...]]] = OrderedDict()
        self._inflight: dict[tuple[str, int], asyncio.Task[tuple[Any, ...] | str]] = {}
        self.hits = self.misses = self.queries = self.errors = 0
        self._resolver = self._make_resolver(servers)

    @classmethod
    def from_config(cls, servers: tuple[str, ...], timeout: float, **options: Any) -> "Resolver":
        """A resolver for ``--dns-server`` strings (empty: /etc/resolv.conf)."""
        return cls([parse_server(s) for s in servers], timeout=timeout, **options)

    def _make_resolver(self, servers: Sequence[tuple[str, int]]) -> dns.asyncresolver.Resolver:
        if servers:
            res = dns.asyncresolver.Resolver(configure=False)
            res.nameservers = [dns.nameserver.Do53Nameserver(a, p) for a, p in servers]
        else:
            try:
                res = dns.asyncresolver.Resolver(configure=True)
            except (dns.resolver.NoResolverConfiguration, OSError, ValueError):
                # No usable /etc/resolv.conf: the local host, as res_init(3)
                # falls back to it too.
                res = dns.asyncresolver.Resolver(configure=False)
                res.nameservers = [dns.nameserver.Do53Nameserver("127.0.0.1", 53)]
        res.cache = None           # ours holds converted answers; see _fetch
        res.search = []
        res.use_edns(0, 0, EDNS_PAYLOAD)
        # One try per server plus one more round fits the lifetime, so a dead
        # first server still leaves time for the next (dnspython moves on
        # after each try's timeout and drops servers that SERVFAIL/REFUSE).
        res.lifetime = self.timeout
        res.timeout = self.timeout / (len(res.nameservers) + 1)
        return res

    @property
    def servers(self) -> list[tuple[str, int]]:
        """The servers asked, in order, as (address, port)."""
        return [(ns.address, ns.port) for ns in self._resolver.nameservers]  # type: ignore[union-attr]

    # The warm path is a key, one dict probe and a clock read (_warm), with
    # no second coroutine.  Keys are stored without the final dot, so
    # "example.com." finds its entry on the second probe, in _miss.

    def _warm(self, ck: tuple[str, int]) -> tuple[Any, ...] | None:
        entry = self.cache.get(ck)
        if entry is not None and entry[0] > _now():
            self.cache.move_to_end(ck)
            self.hits += 1
            return entry[1]
        return None

    def peek_a(self, name: str) -> tuple[str, ...] | None:
        """The cached A answer for ``name`` (``()`` for a cached NXDOMAIN), or None: no coroutine."""
        return self._warm((name.lower(), _A))

    def peek_txt(self, name: str) -> tuple[bytes, ...] | None:
        """The cached TXT answer for ``name``, or None; no coroutine, and no hit counted (txt() counts its own)."""
        entry = self.cache.get((name.lower(), _TXT))
        return entry[1] if entry is not None and entry[0] > _now() else None

    async def txt(self, name: str) -> tuple[bytes, ...]:
        ck = (name.lower(), _TXT)
        found = self._warm(ck)
        return found if found is not None else await self._miss(ck)

    async def a(self, name: str) -> tuple[str, ...]:
        ck = (name.lower(), _A)
        found = self._warm(ck)
        return found if found is not None else await self._miss(ck)

    async def aaaa(self, name: str) -> tuple[str, ...]:
        ck = (name.lower(), _AAAA)
        found = self._warm(ck)
        return found if found is not None else await self._miss(ck)

    async def mx(self, name: str) -> tuple[tuple[int, str], ...]:
        ck = (name.lower(), _MX)
        found = self._warm(ck)
        return found if found is not None else await self._miss(ck)

    async def ptr(self, address: str) -> tuple[str, ...]:
        ck = (address.lower(), _PTR)
        found = self._warm(ck)
        return found if found is not None else await self._miss(ck)

    # -- the cold path: the shared query -----------------------------------------

    async def _miss(self, ck: tuple[str, int]) -> tuple[Any, ...]:
        key, rdtype = ck
        if key[-1:] == ".":        # one trailing dot is tolerated
            ck = (key[:-1], rdtype)
            entry = self.cache.get(ck)
            if entry is not None and entry[0] > _now():
                self.cache.move_to_end(ck)
                self.hits += 1
                return entry[1]
        self.misses += 1
        task = self._inflight.get(ck)
        if task is None:
            qname = _reverse_name(ck[0]) if rdtype == _PTR else _qname(ck[0] + ".")
            task = asyncio.get_running_loop().create_task(self._fetch(ck, qname))
            self._inflight[ck] = task
            task.add_done_callback(functools.partial(self._forget, ck))
        # shield: a waiter that is cancelled (its message's budget ran out,
        # its client left) leaves the query running for the others.
        result = await asyncio.shield(task)
        if isinstance(result, str):
            raise DNSError(result)  # a fresh exception per waiter, no shared traceback
        return result

    def _forget(self, ck: tuple[str, int], task: asyncio.Task[Any]) -> None:
        # Only this task's own entry: close() may have let a newer one in.
        if self._inflight.get(ck) is task:
            del self._inflight[ck]

    async def _fetch(self, ck: tuple[str, int], qname: dns.name.Name) -> tuple[Any, ...] | str:
        """Ask the network; store and return the converted answer, or an error text.

        An error comes back as text, not raised, so that a query whose
        waiters were all cancelled leaves no "exception never retrieved".
        """
        self.queries += 1
        rdtype = ck[1]
        try:
            result, ttl = await self._ask(qname, rdtype)
        except DNSError as exc:
            self.errors += 1
            return str(exc)
        if ttl > 0 and self.cache_size > 0:
            self.cache[ck] = (_now() + ttl, result)
            self.cache.move_to_end(ck)
            while len(self.cache) > self.cache_size:
                self.cache.popitem(last=False)
        return result

    async def _ask(self, qname: dns.name.Name, rdtype: int) -> tuple[tuple[Any, ...], int]:
        """One lookup: (converted answer, seconds to keep it), or DNSError."""
        # Keys hold plain ints (an IntEnum hashes in Python); dnspython wants its enum.
        rdtype = dns.rdatatype.RdataType(rdtype)
        what = f"{qname.to_text(omit_final_dot=True)[:80]}/{dns.rdatatype.to_text(rdtype)}"
        try:
            # asyncio.timeout is the hard bound: dnspython's lifetime does
            # not count the back-off sleeps between its rounds.
            async with asyncio.timeout(self.timeout):
                answer = await self._resolver.resolve(
                    qname, rdtype, raise_on_no_answer=False, search=False, lifetime=self.timeout)
        except dns.resolver.NXDOMAIN as exc:
            neg = _negative_ttl(list(exc.responses().values()))  # type: ignore[no-untyped-call]
            return (), min(neg, self.max_negative_ttl)
        except (TimeoutError, dns.exception.Timeout):
            raise DNSError(f"{what}: no answer within {self.timeout:g} s") from None
        except dns.resolver.NoNameservers as exc:
            raise DNSError(f"{what}: every server failed ({_why(exc)})") from None
        except dns.message.ChainTooLong:
            raise DNSError(f"{what}: CNAME chain too long or looping") from None
        except dns.resolver.YXDOMAIN:
            raise DNSError(f"{what}: DNAME substitution too long") from None
        except dns.exception.DNSException as exc:
            raise DNSError(f"{what}: bad answer ({type(exc).__name__})") from None
        except OSError as exc:
            raise DNSError(f"{what}: network error ({exc.strerror or type(exc).__name__})") from None
        except Exception as exc:  # nothing else may reach the checks
            raise DNSError(f"{what}: lookup failed ({type(exc).__name__})") from None
        response = answer.response
        if answer.rrset is None:   # NODATA, maybe after a CNAME chain
            ttl = min([_negative_ttl([response])] + [int(r.ttl) for r in response.answer])
            return (), min(ttl, self.max_negative_ttl)
        try:
            result = _CONVERT[rdtype](answer.rrset)
        except Exception as exc:
            raise DNSError(f"{what}: bad record ({type(exc).__name__})") from None
        # The chain and the answer together live as long as their shortest TTL.
        ttl = min(int(r.ttl) for r in response.answer)
        return result, min(ttl, self.max_ttl)

    def close(self) -> None:
        """Drop the cache and cancel the queries in flight (their waiters see CancelledError)."""
        for task in list(self._inflight.values()):
            task.cancel()
        self._inflight.clear()
        self.cache.clear()
