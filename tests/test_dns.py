"""dns.Resolver against a real Knot DNS server on loopback, and against
fault-injecting fakes (fakedns.py) for what a good server never does.

Every test runs under uvloop and under stdlib asyncio, each bounded by
``LIMIT`` seconds; the only timed assertions are generous upper bounds on
timeouts.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, Callable, Iterator

import pytest
import uvloop

import dns.resolver

from dnsserver import SOA_MINIMUM, KnotServer, needs_knot, zone_text
from fakedns import DelayingForwarder, FaultServer
from fastsmtp.dns import BadName, DNSError, Resolver, parse_server
from helpers import LOOPS

LIMIT = 20.0
BIG = bytes(range(ord("a"), ord("z") + 1)) * 2300          # 59,800 octets: one TXT RR, TCP only

ZONES = {
    "example.com": zone_text("example.com", [
        ("@", "MX", "10 mail.example.com."),
        ("@", "MX", "20 backup.example.com."),
        ("@", "TXT", "v=spf1 ip4:192.0.2.0/24 -all"),
        ("mail", "A", "192.0.2.1"),
        ("mail", "A", "192.0.2.2"),
        ("mail", "AAAA", "2001:db8:0:0:0:0:0:1"),
        ("split", "TXT", ["v=spf1 ", "include:a.example ", "-all"]),
        ("two", "TXT", "first"),
        ("two", "TXT", "second"),
        ("long", "TXT", "k=rsa; p=" + "A" * 600),       # split into 255-octet strings
        ("big", "TXT", BIG),
        ("short", "A", "192.0.2.9", 1),
        ("loop1", "CNAME", "loop2"),
        ("loop2", "CNAME", "loop1"),
        ("alias", "CNAME", "mail"),
        ("nullmx", "MX", "0 ."),
    ] + [(f"n{i}", "A", f"192.0.2.{100 + i}") for i in range(6)]),
    "2.0.192.in-addr.arpa": zone_text("2.0.192.in-addr.arpa", [("1", "PTR", "mail.example.com.")]),
    "8.b.d.0.1.0.0.2.ip6.arpa": zone_text("8.b.d.0.1.0.0.2.ip6.arpa", [
        ("1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0", "PTR", "mail.example.com."),
    ]),
}


@pytest.fixture(scope="module")
def knot() -> Iterator[KnotServer]:
    with KnotServer(ZONES) as server:          # skips where knotd is missing
        yield server


Run = Callable[[Callable[[], Awaitable[Any]]], Any]


@pytest.fixture(params=LOOPS)
def run(request: pytest.FixtureRequest) -> Run:
    """Run ``make()`` on a fresh loop of the kind in the test id, bounded by LIMIT."""
    def runner(make: Callable[[], Awaitable[Any]]) -> Any:
        async def bounded() -> Any:
            return await asyncio.wait_for(make(), LIMIT)
        if request.param == "uvloop":
            return uvloop.run(bounded())
        return asyncio.run(bounded())
    return runner


# -- answers from the real server ---------------------------------------------------


@needs_knot
def test_record_types(run: Run, knot: KnotServer) -> None:
    async def main() -> None:
        r = Resolver([knot.server])
        assert sorted(await r.a("mail.example.com")) == ["192.0.2.1", "192.0.2.2"]
        assert await r.aaaa("mail.example.com") == ("2001:db8::1",)
        assert sorted(await r.mx("example.com")) == [(10, "mail.example.com"), (20, "backup.example.com")]
        assert await r.mx("nullmx.example.com") == ((0, ""),)          # RFC 7505
        assert await r.txt("example.com") == (b"v=spf1 ip4:192.0.2.0/24 -all",)
        # One RR's strings are joined; two RRs stay two items.
        assert await r.txt("split.example.com") == (b"v=spf1 include:a.example -all",)
        assert sorted(await r.txt("two.example.com")) == [b"first", b"second"]
        assert await r.txt("long.example.com") == (b"k=rsa; p=" + b"A" * 600,)
        assert sorted(await r.a("alias.example.com")) == ["192.0.2.1", "192.0.2.2"]   # via a CNAME
        assert await r.ptr("192.0.2.1") == ("mail.example.com",)
        assert await r.ptr("2001:db8::1") == ("mail.example.com",)
        assert r.errors == 0
    run(main)


@needs_knot
def test_case_and_trailing_dot_share_one_entry(run: Run, knot: KnotServer) -> None:
    async def main() -> None:
        r = Resolver([knot.server])
        first = await r.a("Mail.Example.COM")
        assert await r.a("mail.example.com.") == first
        assert await r.a("MAIL.EXAMPLE.COM") == first
        assert (r.queries, r.hits, len(r.cache)) == (1, 2, 1)
    run(main)


@needs_knot
def test_nxdomain_and_nodata_are_empty_and_cached_negatively(run: Run, knot: KnotServer) -> None:
    async def main() -> None:
        r = Resolver([knot.server])
        assert await r.a("nowhere.example.com") == ()      # NXDOMAIN
        assert await r.txt("mail.example.com") == ()       # NODATA
        assert r.queries == 2
        assert await r.a("nowhere.example.com") == ()
        assert await r.txt("mail.example.com") == ()
        assert r.queries == 2 and r.hits == 2 and r.errors == 0
        # RFC 2308 §5: kept min(SOA TTL, MINIMUM) seconds, not the records' 300.
        for key in [("nowhere.example.com", 1), ("mail.example.com", 16)]:
            left = r.cache[key][0] - time.monotonic()
            assert SOA_MINIMUM - 5 < left <= SOA_MINIMUM
        capped = Resolver([knot.server], max_negative_ttl=5)
        await capped.a("nowhere.example.com")
        assert capped.cache[("nowhere.example.com", 1)][0] - time.monotonic() <= 5
    run(main)


@needs_knot
def test_positive_ttl_expires(run: Run, knot: KnotServer) -> None:
    async def main() -> None:
        r = Resolver([knot.server])
        assert await r.a("short.example.com") == ("192.0.2.9",)     # TTL 1
        assert await r.a("short.example.com") == ("192.0.2.9",)
        assert r.queries == 1
        await asyncio.sleep(1.1)
        assert await r.a("short.example.com") == ("192.0.2.9",)
        assert r.queries == 2
        capped = Resolver([knot.server], max_ttl=10)
        await capped.a("mail.example.com")                           # TTL 300
        assert capped.cache[("mail.example.com", 1)][0] - time.monotonic() <= 10
    run(main)


@needs_knot
def test_cache_size_bound_evicts_least_recently_used(run: Run, knot: KnotServer) -> None:
    async def main() -> None:
        r = Resolver([knot.server], cache_size=3)
        for i in range(3):
            await r.a(f"n{i}.example.com")
        await r.a("n0.example.com")                    # n0 used again: n1 is the oldest now
        await r.a("n3.example.com")
        assert len(r.cache) == 3
        assert ("n1.example.com", 1) not in r.cache
        queries = r.queries
        await r.a("n0.example.com")
        assert r.queries == queries                    # still cached
        await r.a("n1.example.com")
        assert r.queries == queries + 1                # evicted, asked again
        assert len(r.cache) == 3
    run(main)


@needs_knot
def test_big_txt_comes_over_tcp(run: Run, knot: KnotServer) -> None:
    async def main() -> None:
        r = Resolver([knot.server])
        # ~60 KB cannot fit a UDP answer of 1232 octets: Knot truncates, the
        # resolver asks again over TCP (RFC 7766 §5).
        assert await r.txt("big.example.com") == (BIG,)
    run(main)
    with DelayingForwarder(knot.server, delay=0.005) as fwd:     # TC passes through it, TCP too
        async def via_forwarder() -> None:
            assert await Resolver([fwd.server]).txt("big.example.com") == (BIG,)
        run(via_forwarder)
        assert fwd.queries == 2


def test_truncated_udp_answer_is_retried_over_tcp(run: Run) -> None:
    txt = b"v=DKIM1; p=" + b"B" * 3000
    with FaultServer("truncate", txt=[txt]) as fake:
        async def main() -> None:
            r = Resolver([fake.server], timeout=2.0)
            assert await r.txt("sel._domainkey.example.org") == (txt,)
        run(main)
        assert (fake.udp_queries, fake.tcp_queries) == (1, 1)


@needs_knot
def test_cname_loop_is_an_error_without_hanging(run: Run, knot: KnotServer) -> None:
    async def main() -> None:
        r = Resolver([knot.server], timeout=2.0)
        start = time.monotonic()
        with pytest.raises(DNSError):
            await r.txt("loop1.example.com")
        assert time.monotonic() - start < 3.0
        assert r.errors == 1 and len(r.cache) == 0      # errors are not cached
    run(main)


@needs_knot
def test_reload_serves_the_new_zones(run: Run) -> None:
    with KnotServer({"example.net": zone_text("example.net", [("@", "TXT", "old")])}) as server:
        server.reload({"example.net": zone_text("example.net", [("@", "TXT", "new")], serial=2),
                       "example.org": zone_text("example.org", [("@", "A", "192.0.2.7")], serial=2)}, serial=2)

        async def main() -> None:
            r = Resolver([server.server])
            assert await r.txt("example.net") == (b"new",)
            assert await r.a("example.org") == ("192.0.2.7",)
        run(main)


# -- one query for many askers ------------------------------------------------------


@needs_knot
def test_concurrent_identical_lookups_share_one_query(run: Run, knot: KnotServer) -> None:
    with DelayingForwarder(knot.server, delay=0.05) as fwd:
        async def main() -> None:
            r = Resolver([fwd.server])
            answers = await asyncio.gather(*(r.mx("example.com") for _ in range(50)))
            assert len(set(answers)) == 1 and len(answers[0]) == 2
            assert r.queries == 1 and r.misses == 50
        run(main)
        assert fwd.queries == 1


@needs_knot
def test_a_cancelled_waiter_leaves_the_query_to_the_others(run: Run, knot: KnotServer) -> None:
    with DelayingForwarder(knot.server, delay=0.2) as fwd:
        async def main() -> None:
            r = Resolver([fwd.server])
            tasks = [asyncio.create_task(r.a("mail.example.com")) for _ in range(3)]
            await asyncio.sleep(0.05)
            tasks[0].cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            assert isinstance(results[0], asyncio.CancelledError)
            assert sorted(results[1]) == sorted(results[2]) == ["192.0.2.1", "192.0.2.2"]
            # All waiters gone: the query still finishes and fills the cache.
            lone = asyncio.create_task(r.txt("example.com"))
            await asyncio.sleep(0.05)
            lone.cancel()
            await asyncio.sleep(0.4)
            assert ("example.com", 16) in r.cache
            assert r.queries == 2
        run(main)


# -- faults -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["silent", "garbage", "wrong_id"])
def test_no_usable_answer_times_out(run: Run, mode: str) -> None:
    with FaultServer(mode) as fake:
        async def main() -> None:
            r = Resolver([fake.server], timeout=0.3)
            start = time.monotonic()
            with pytest.raises(DNSError, match="no answer within 0.3 s"):
                await r.txt("example.org")
            assert time.monotonic() - start < 1.0       # generous: the bound is 0.3 s
            with pytest.raises(DNSError):               # not cached: asked again
                await r.txt("example.org")
            assert (r.queries, r.errors, len(r.cache)) == (2, 2, 0)
        run(main)
        assert fake.udp_queries >= 2


def test_a_wrong_id_is_ignored_and_the_right_answer_taken(run: Run) -> None:
    with FaultServer("wrong_id_then_right") as fake:
        async def main() -> None:
            r = Resolver([fake.server], timeout=1.0)
            assert await r.txt("example.org") == (b"v=spf1 -all",)
        run(main)


def test_servfail_is_an_error(run: Run) -> None:
    with FaultServer("servfail") as fake:
        async def main() -> None:
            r = Resolver([fake.server], timeout=2.0)
            with pytest.raises(DNSError, match="SERVFAIL"):
                await r.a("example.org")
            assert r.errors == 1 and len(r.cache) == 0
        run(main)


@needs_knot
@pytest.mark.parametrize("first", ["silent", "servfail", "closed"])
def test_the_next_server_answers_when_the_first_fails(run: Run, knot: KnotServer, first: str) -> None:
    with FaultServer("silent" if first == "closed" else first) as fake:
        dead = fake.server
        if first == "closed":
            fake.__exit__()              # nothing listens there any more
        async def main() -> None:
            r = Resolver([dead, knot.server], timeout=2.0)
            assert await r.mx("example.com")
            assert r.errors == 0
        run(main)


# -- names that cannot be asked ---------------------------------------------------


@pytest.mark.parametrize("name", [
    "a" * 64 + ".example.com",                      # label > 63 octets (RFC 1035 §2.3.4)
    ".".join(["abcdefghi"] * 30),                   # 299 octets > 253
    "a..example.com",                               # empty label
    "",
    ".",
])
def test_bad_names_raise_before_any_query(run: Run, name: str) -> None:
    async def main() -> None:
        r = Resolver([("127.0.0.1", 9)], timeout=0.3)
        for ask in (r.txt, r.a, r.aaaa, r.mx):
            with pytest.raises(BadName):
                await ask(name)
        assert r.queries == 0
    run(main)


def test_ptr_of_something_not_an_address_is_bad_name(run: Run) -> None:
    async def main() -> None:
        r = Resolver([("127.0.0.1", 9)], timeout=0.3)
        for address in ("example.com", "300.1.2.3", "", "1::2::3"):
            with pytest.raises(BadName):
                await r.ptr(address)
        assert r.queries == 0
    run(main)


# -- configuration ------------------------------------------------------------------


def test_parse_server() -> None:
    assert parse_server("127.0.0.1:5353") == ("127.0.0.1", 5353)
    assert parse_server("127.0.0.1") == ("127.0.0.1", 53)
    assert parse_server("[::1]:5300") == ("::1", 5300)
    assert parse_server("[::1]") == ("::1", 53)
    assert parse_server("::1") == ("::1", 53)
    for bad in ("ns.example.com:53", "[::1", "[::1]x", "127.0.0.1:0", "127.0.0.1:x", "127.0.0.1:70000", ""):
        with pytest.raises(ValueError):
            parse_server(bad)


def test_from_config_and_resolv_conf_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    r = Resolver.from_config(("127.0.0.1:5353", "[::1]:53"), 1.5)
    assert r.servers == [("127.0.0.1", 5353), ("::1", 53)] and r.timeout == 1.5

    def unusable(self: Any, f: Any) -> None:
        raise dns.resolver.NoResolverConfiguration("no nameservers")

    monkeypatch.setattr(dns.resolver.BaseResolver, "read_resolv_conf", unusable)
    assert Resolver().servers == [("127.0.0.1", 53)]
    with pytest.raises(ValueError):
        Resolver(timeout=0)


def test_close_cancels_queries_in_flight(run: Run) -> None:
    with FaultServer("silent") as fake:
        async def main() -> None:
            r = Resolver([fake.server], timeout=5.0)
            waiter = asyncio.create_task(r.a("example.org"))
            await asyncio.sleep(0.05)
            r.close()
            with pytest.raises(asyncio.CancelledError):
                await waiter
            assert not r._inflight
        run(main)
