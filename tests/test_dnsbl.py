"""dnsbl.py: postscreen's site syntax, RFC 5782 query names, scores (sans-IO: a dict of answers)."""

from __future__ import annotations

import asyncio

import pytest

from dkimtools import FakeLookups

from fastsmtp.dns import DNSError, Resolver
from fastsmtp.dnsbl import DNSBL, SiteError, parse_site, parse_sites, query_name


def Answers(addresses: dict[str, tuple[str, ...] | BaseException]) -> FakeLookups:
    """A-record answers from a dict; an exception value is raised."""
    return FakeLookups(addresses=addresses)


@pytest.mark.parametrize(
    "entry, domain, weight, listed, unlisted",
    [
        ("list.example", "list.example", 1, ["127.0.0.2", "127.1.2.3"], ["10.0.0.2", "192.0.2.1"]),
        ("list.example*2", "list.example", 2, ["127.0.0.2"], []),
        ("zen.example=127.0.0.[2..11]*3", "zen.example", 3, ["127.0.0.2", "127.0.0.11"], ["127.0.0.1", "127.0.0.12"]),
        ("white.example=127.0.[0..255].[0..255]*-2", "white.example", -2, ["127.0.9.200"], ["127.1.0.0"]),
        ("l.example=127.0.[0;1].[2..4;10]", "l.example", 1, ["127.0.1.10", "127.0.0.3"], ["127.0.2.3", "127.0.0.5"]),
        ("L.Example.=127.0.0.2*+4", "l.example", 4, ["127.0.0.2"], ["127.0.0.3"]),
    ],
)
def test_sites_in_postscreen_syntax(entry: str, domain: str, weight: int, listed: list[str],
                                    unlisted: list[str]) -> None:
    site = parse_site(entry)
    assert (site.domain, site.weight) == (domain, weight)
    for answer in listed:
        assert site.matches([answer]), answer
    for answer in unlisted:
        assert not site.matches([answer]), answer


@pytest.mark.parametrize(
    "entry",
    ["", "=127.0.0.2", "list.example=127.0.0", "list.example=127.0.0.256", "list.example=127.0.0.[3..2]",
     "list.example=127.0.0.[a]", "list.example*x", "bad domain", "list.example=127.0.0.[1..300]", "-x.example"],
)
def test_malformed_sites_are_refused(entry: str) -> None:
    with pytest.raises(SiteError):
        parse_site(entry)


def test_several_sites_in_one_string() -> None:
    sites = parse_sites(["zen.example=127.0.0.[2..11]*3 list.example*2", "white.example*-2"])
    assert [s.domain for s in sites] == ["zen.example", "list.example", "white.example"]


def test_query_names_rfc5782() -> None:
    # §2.1: octets reversed; §2.4: nibbles reversed.
    assert query_name("192.0.2.99", "list.example") == "99.2.0.192.list.example"
    assert query_name("::ffff:192.0.2.99", "list.example") == "99.2.0.192.list.example"
    assert query_name("2001:db8:1:2:3:4:567:89ab", "list.example") == (
        "b.a.9.8.7.6.5.0.4.0.0.0.3.0.0.0.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2.list.example")
    assert query_name("not-an-address", "list.example") is None


def _run(dnsbl: DNSBL, address: str):  # type: ignore[no-untyped-def]
    return asyncio.run(dnsbl.score(address))


def test_scores_add_up_over_lists_and_the_reply_names_the_heaviest() -> None:
    answers = Answers({
        "2.0.0.127.zen.example": ("127.0.0.4",),
        "2.0.0.127.list.example": ("127.0.0.2",),
        "2.0.0.127.white.example": (),
    })
    dnsbl = DNSBL(parse_sites(["zen.example=127.0.0.[2..11]*3 list.example*2 white.example*-2"]), answers)
    score = _run(dnsbl, "127.0.0.2")
    assert score.total == 5 and score.top == "zen.example"
    assert sorted(answers.asked) == ["2.0.0.127.list.example", "2.0.0.127.white.example", "2.0.0.127.zen.example"]


def test_an_allow_list_makes_the_score_negative() -> None:
    answers = Answers({"9.2.0.192.white.example": ("127.0.0.1",)})
    dnsbl = DNSBL(parse_sites(["list.example white.example*-2"]), answers)
    score = _run(dnsbl, "192.0.2.9")
    assert score.total == -2 and score.top is None


def test_a_failing_list_counts_as_not_listed() -> None:
    answers = Answers({"9.2.0.192.dead.example": DNSError("no answer"), "9.2.0.192.list.example": ("127.0.0.2",)})
    dnsbl = DNSBL(parse_sites(["dead.example*5 list.example"]), answers)
    score = _run(dnsbl, "192.0.2.9")
    assert (score.total, score.failed, score.top) == (1, 1, "list.example")


def test_answers_outside_loopback_never_list() -> None:
    # An NXDOMAIN-rewriting resolver answers its own web server's address.
    dnsbl = DNSBL(parse_sites(["list.example"]), Answers({"9.2.0.192.list.example": ("198.51.100.7",)}))
    assert _run(dnsbl, "192.0.2.9").total == 0


def test_cached_needs_every_answer_warm() -> None:
    resolver = Resolver([("127.0.0.1", 9)], timeout=0.5)
    dnsbl = DNSBL(parse_sites(["a.example*2 b.example"]), resolver)
    assert dnsbl.cached("192.0.2.9") is None
    far = 1e12
    resolver.cache[("9.2.0.192.a.example", 1)] = (far, ("127.0.0.2",))
    assert dnsbl.cached("192.0.2.9") is None  # b.example is not known yet
    resolver.cache[("9.2.0.192.b.example", 1)] = (far, ())
    score = dnsbl.cached("192.0.2.9")
    assert score is not None and score.total == 2 and score.top == "a.example"
