"""The sans-IO parts of authentication: the header tap, DMARC, the A-R field.

DNS is a dict-backed fake here (fakes are for the sans-IO core); the
end-to-end tests (test_auth.py) run a real DNS server.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dkimtools import FakeLookups
from fastsmtp.auth import dmarc
from fastsmtp.auth.headers import MAX_HEADER_SECTION, HeaderTap, authserv_id, field_value
from fastsmtp.dns import DNSError

MESSAGE = (
    b"Authentication-Results: mx.test.example; spf=pass smtp.mailfrom=evil.example\r\n"
    b"Received: from a by b;\r\n\tMon, 1 Jan 2026 00:00:00 +0000\r\n"
    b"Authentication-Results: other.example; dkim=pass header.d=example.com\r\n"
    b"From: Alice <alice@example.com>\r\n"
    b"Subject: folded\r\n  subject line\r\n"
    b"\r\n"
    b"Body line 1\r\n"
    b"From: not a header\r\n"
)


def _tap(drop_id: str = "mx.test.example") -> tuple[HeaderTap, bytearray, bytearray, list]:
    out = bytearray()
    body = bytearray()
    seen: list = []

    def done(headers):  # type: ignore[no-untyped-def]
        seen.append(list(headers))
        return body.extend

    def drop(name: bytes, raw: bytes) -> bool:
        return name.lower() == b"authentication-results" and authserv_id(raw) == drop_id

    return HeaderTap(out.extend, drop, done), out, body, seen


def _feed(tap: HeaderTap, data: bytes, cuts: list[int]) -> None:
    last = 0
    for cut in sorted(set(c % (len(data) + 1) for c in cuts)):
        tap.write(data[last:cut])
        last = cut
    tap.write(data[last:])
    tap.end()


def test_tap_drops_only_our_authentication_results() -> None:
    tap, out, body, seen = _tap()
    _feed(tap, MESSAGE, [])
    assert bytes(out) == MESSAGE.replace(
        b"Authentication-Results: mx.test.example; spf=pass smtp.mailfrom=evil.example\r\n", b""
    )
    assert bytes(body) == b"Body line 1\r\nFrom: not a header\r\n"
    names = [name for name, _ in seen[0]]
    assert names == [b"Authentication-Results", b"Received", b"Authentication-Results", b"From", b"Subject"]
    assert seen[0][4][1] == b"Subject: folded\r\n  subject line\r\n"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(MESSAGE)), max_size=12))
def test_tap_gives_the_same_answer_for_any_split(cuts: list[int]) -> None:
    whole, out_whole, body_whole, seen_whole = _tap()
    _feed(whole, MESSAGE, [])
    tap, out, body, seen = _tap()
    _feed(tap, MESSAGE, cuts)
    assert (bytes(out), bytes(body), seen) == (bytes(out_whole), bytes(body_whole), seen_whole)


def test_tap_without_an_empty_line_or_with_a_line_that_is_no_field() -> None:
    tap, out, body, seen = _tap()
    _feed(tap, b"From: a@example.com\r\nSubject: x", [])
    assert bytes(out) == b"From: a@example.com\r\nSubject: x"
    assert [n for n, _ in seen[0]] == [b"From", b"Subject"]
    tap, out, body, seen = _tap()
    _feed(tap, b"From: a@example.com\r\nthis is no field\r\nmore\r\n", [5, 30])
    assert bytes(out) == b"From: a@example.com\r\nthis is no field\r\nmore\r\n"
    assert bytes(body) == b"this is no field\r\nmore\r\n"


def test_tap_gives_up_past_its_bound_and_passes_everything_on() -> None:
    tap, out, body, seen = _tap()
    huge = b"X-Big: " + b"a" * (MAX_HEADER_SECTION + 100_000) + b"\r\n\r\nbody\r\n"
    for i in range(0, len(huge), 65536):
        tap.write(huge[i:i + 65536])
    tap.end()
    assert tap.overflow
    assert bytes(out) == huge
    assert seen == []  # the checks got no header section


@pytest.mark.parametrize("raw, expected", [
    (b"Authentication-Results: mx.test.example; none\r\n", "mx.test.example"),
    (b"Authentication-Results:  (comment (nested)) MX.Test.Example 1; spf=pass\r\n", "mx.test.example"),
    (b'Authentication-Results: "mx.test.example"; none\r\n', "mx.test.example"),
    (b"Authentication-Results:\r\n\tmx.test.example;\r\n\tspf=pass\r\n", "mx.test.example"),
    (b"Authentication-Results: mx.test.example.evil; none\r\n", "mx.test.example.evil"),
])
def test_authserv_id(raw: bytes, expected: str) -> None:
    assert authserv_id(raw) == expected


def test_field_value_unfolds() -> None:
    assert field_value(b"From: A\r\n <a@example.com>\r\n") == b"A <a@example.com>"


# -- DMARC -------------------------------------------------------------------------


class FakeDNS:
    """TXT answers from a dict; a value of DNSError raises it."""

    def __init__(self, txt: dict[str, object]) -> None:
        self._txt = txt
        self.asked: list[str] = []

    async def txt(self, name: str) -> tuple[bytes, ...]:
        self.asked.append(name)
        value = self._txt.get(name.lower(), ())
        if value is DNSError:
            raise DNSError("timeout")
        if isinstance(value, bytes):
            return (value,)
        return tuple(value)  # type: ignore[arg-type]


def _check(txt: dict[str, object], from_: list[bytes], spf_domain: str = "", spf: str = "none",
           dkim: tuple[str, ...] = (), roll: float = 0.0) -> dmarc.DMARCResult:
    return asyncio.run(dmarc.check(FakeDNS(txt), from_, spf_domain, spf, dkim, roll=roll))


POLICIES = {
    "_dmarc.example.com": b"v=DMARC1; p=reject; sp=quarantine; adkim=s",
    "_dmarc.example.org": b"v=DMARC1; p=quarantine; pct=50",
    "_dmarc.example.net": b"v=DMARC1; p=none",
}


def test_dmarc_pass_by_aligned_spf_or_dkim() -> None:
    r = _check(POLICIES, [b" a@example.com"], "bounce.example.com", "pass")
    assert (r.result, r.policy, r.disposition) == ("pass", "reject", "none")  # aspf relaxed
    r = _check(POLICIES, [b" a@example.com"], "", "none", ("example.com",))
    assert r.result == "pass"
    # adkim=s: a subdomain's signature does not align.
    r = _check(POLICIES, [b" a@example.com"], "", "none", ("mail.example.com",))
    assert (r.result, r.disposition) == ("fail", "reject")


def test_dmarc_subdomain_uses_the_organizations_sp() -> None:
    dns = FakeDNS(POLICIES)
    r = asyncio.run(dmarc.check(dns, [b"x@news.example.com"], "other.example", "pass", (), roll=0.0))
    assert (r.result, r.domain, r.policy, r.disposition) == ("fail", "news.example.com", "quarantine", "quarantine")
    assert dns.asked == ["_dmarc.news.example.com", "_dmarc.example.com"]


def test_dmarc_pct_steps_the_policy_down_outside_the_sample() -> None:
    assert _check(POLICIES, [b"a@example.org"], roll=0.2).disposition == "quarantine"
    assert _check(POLICIES, [b"a@example.org"], roll=0.7).disposition == "none"


def test_dmarc_none_temperror_and_unusable_records() -> None:
    assert _check({}, [b"a@example.com"]).result == "none"
    assert _check({"_dmarc.example.com": DNSError}, [b"a@example.com"]).result == "temperror"
    two = {"_dmarc.example.com": [b"v=DMARC1; p=reject", b"v=DMARC1; p=none"]}
    assert _check(two, [b"a@example.com"]).result == "none"  # several records: none (§6.6.3)
    assert _check({"_dmarc.example.com": b"p=reject; v=DMARC1"}, [b"a@example.com"]).result == "none"
    assert dmarc.parse_record(b"v=DMARC1; p=bogus; rua=mailto:a@example.com") == dmarc.Policy("none", "none")
    assert dmarc.parse_record(b"v=DMARC1; p=bogus") is None


def test_dmarc_zero_or_several_from_domains() -> None:
    assert _check(POLICIES, []).result == "permerror"
    assert _check(POLICIES, [b"undisclosed-recipients:;"]).result == "permerror"
    # Several domains: each is checked and the strictest failing policy wins (§6.6.1).
    r = _check(POLICIES, [b"a@example.net, b@example.com"], "example.net", "pass")
    assert (r.result, r.domain, r.disposition) == ("fail", "example.com", "reject")
    r = _check(POLICIES, [b"a@example.net", b"b@example.org"], "", "none", roll=0.1)
    assert (r.result, r.domain, r.disposition) == ("fail", "example.org", "quarantine")
    # The same domain twice is one domain.
    assert _check(POLICIES, [b"a@example.com, b@EXAMPLE.com"], "example.com", "pass").result == "pass"


def test_organizational_domain_from_the_public_suffix_list() -> None:
    assert dmarc.organizational_domain("mail.example.co.uk") == "example.co.uk"
    assert dmarc.organizational_domain("a.b.example.com") == "example.com"
    assert dmarc.organizational_domain("co.uk") == "co.uk"
    assert dmarc.aligned("a.example.co.uk", "b.example.co.uk", "r")
    assert not dmarc.aligned("example.co.uk", "other.co.uk", "r")
    assert not dmarc.aligned("a.example.com", "example.com", "s")


def test_networks_answer_and_remember_within_their_bound() -> None:
    from fastsmtp import networks
    from fastsmtp.networks import Networks

    trusted = Networks(["127.0.0.0/8", "::1/128", "192.0.2.0/28"])
    assert "127.0.0.1" in trusted and "::1" in trusted and "192.0.2.15" in trusted
    assert "192.0.2.16" not in trusted and "2001:db8::1" not in trusted
    assert "/run/fastsmtp.sock" not in trusted and None not in trusted
    assert "127.0.0.1" not in Networks([])
    for i in range(networks.MEMO + 10):
        assert f"10.0.{i // 256}.{i % 256}" not in trusted
    assert len(trusted._known) <= networks.MEMO
    assert "127.0.0.2" in trusted  # still right after the memo was cleared


# -- the end of data inline: MessageAuth.ready() --------------------------------------


@dataclass
class CachedLookups(FakeLookups):
    """FakeLookups with a cache to peek into: names in ``cold`` are not in it, and txt() waits for them."""

    cold: set[str] = field(default_factory=set)

    def peek_txt(self, name: str) -> tuple[bytes, ...] | None:
        name = name.lower()
        value = self.records.get(name, ())
        return None if name in self.cold or isinstance(value, BaseException) else value

    async def txt(self, name: str) -> tuple[bytes, ...]:
        if name.lower() not in self.cold:
            value = self.records.get(name.lower(), ())  # cached: no wait, as Resolver.txt's warm path
            assert not isinstance(value, BaseException)
            return value
        return await super().txt(name)

    async def a(self, name: str) -> tuple[str, ...]:
        if name.lower() not in self.cold:
            value = self.addresses.get(name, ())
            assert not isinstance(value, BaseException)
            return value
        return await super().a(name)


def _signed_message() -> tuple[bytes, dict[str, tuple[bytes, ...]]]:
    import dkim as dkimpy

    from dkimtools import rsa_key

    key = rsa_key(2048)
    plain = (b"From: Alice <alice@example.com>\r\nTo: bob@example.net\r\nSubject: inline\r\n\r\n"
             b"Hello, inline.\r\n")
    sig = dkimpy.sign(plain, b"sel", b"example.com", key.private, canonicalize=(b"relaxed", b"relaxed"),
                      include_headers=[b"from", b"to", b"subject"])
    message = sig.replace(b"\n", b"\r\n").replace(b"\r\r\n", b"\r\n") + plain
    return message, {
        "sel._domainkey.example.com": (key.record,),
        "example.com": (b"v=spf1 ip4:192.0.2.1 -all",),
        "mx.example.com": (b"v=spf1 a -all",),
        "_dmarc.example.com": (b"v=DMARC1; p=reject",),
    }


def _lookups(txt: dict[str, tuple[bytes, ...]], cold: set[str] | None = None) -> CachedLookups:
    return CachedLookups(dict(txt), addresses={"mx.example.com": ("192.0.2.1",)}, cold=cold or set())  # type: ignore[arg-type]


def _checks(lookups: CachedLookups):  # type: ignore[no-untyped-def]
    """One transaction's MessageAuth, begun at MAIL FROM:<alice@example.com> from 192.0.2.1."""
    from fastsmtp.auth.stage import Authenticator
    from fastsmtp.config import Config
    from fastsmtp.events import Address
    from fastsmtp.metrics import NO_METER

    config = Config(hostname="mx.test.example", trusted_networks=("::1/128",)).validate()
    auth = Authenticator(config, NO_METER, lookups)  # type: ignore[arg-type]
    checks = auth.begin("192.0.2.1", b"mx.example.com", Address(b"alice", b"example.com", b"alice@example.com"))
    assert checks is not None
    return checks


async def _through(lookups: CachedLookups, message: bytes) -> tuple[bool, object]:
    """The message through one MessageAuth: (ready() at its end, finish()'s verdict, run as the server runs it)."""
    from fastsmtp.eager import eager

    checks = _checks(lookups)
    await asyncio.sleep(0.01)  # RCPT and DATA: SPF's questions, if any, are answered meanwhile
    tap = checks.tap(lambda data: None)
    tap.write(message)
    ready = checks.ready()
    if ready:
        fut = eager(checks.finish())
        assert fut.done(), "ready() promised an answer without waiting"
        return ready, fut.result()
    return ready, await checks.finish()


def test_the_end_of_data_runs_inline_only_when_every_answer_is_cached() -> None:
    message, txt = _signed_message()
    ready, verdict = asyncio.run(_through(_lookups(txt), message))
    assert ready
    field = verdict.headers.decode()  # type: ignore[attr-defined]
    assert "dkim=pass" in field and "dmarc=pass" in field and "spf=pass" in field, field
    for cold in ("sel._domainkey.example.com", "_dmarc.example.com"):
        ready, slow = asyncio.run(_through(_lookups(txt, {cold}), message))
        assert not ready, cold
        assert slow == verdict  # the task's way gives the same field
    # Two signatures are checked at once (gather's tasks): not inline.
    first = message.index(b"\r\nFrom:") + 2
    twice = message[:first] + message[:first] + message[first:]
    ready, two = asyncio.run(_through(_lookups(txt), twice))
    assert not ready and "dkim=pass" in two.headers.decode()  # type: ignore[attr-defined]
    # SPF still asking at the end of data (no loop turn since MAIL): not inline either.
    async def spf_waits() -> bool:
        checks = _checks(_lookups(txt, {"example.com"}))
        checks.tap(lambda data: None).write(message)
        return bool(checks.ready())

    assert not asyncio.run(spf_waits())


def test_dmarc_answerable_from_the_cache() -> None:
    cached = {"_dmarc.example.com": (b"v=DMARC1; p=none",), "_dmarc.sub.example.org": (), "_dmarc.example.org": ()}
    peek = cached.get
    assert dmarc.answerable(peek, [b"a@example.com"])
    assert dmarc.answerable(peek, [b"a@sub.example.org"])  # no record there: the organization's is cached
    assert not dmarc.answerable(peek, [b"a@sub.example.net"])
    # A record that is no usable one sends discover() on to the organization's, which is not cached.
    for unusable in ((b"v=DMARC1; p=bogus",), (b"v=dmarc1; p=reject",), (b"v=DMARC1; p=none", b"v=DMARC1; p=reject")):
        assert not dmarc.answerable({"_dmarc.mail.example.com": unusable}.get, [b"a@mail.example.com"]), unusable
    assert not dmarc.answerable(peek, [b"a@example.com, b@example.org"])  # several domains: gathered, with tasks
    assert dmarc.answerable(peek, [])  # no From: domain: permerror, nothing asked
