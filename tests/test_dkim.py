"""DKIM verification against real signers: dkimpy and OpenDKIM; failures; several signatures."""

from __future__ import annotations

import asyncio
import base64
import re
import shutil
import subprocess
import time
from pathlib import Path

import dkim as dkimpy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from cryptography.hazmat.primitives import serialization

from dkimtools import FakeLookups, KeyPair, craft, ed_key, rsa_key, split_message, verify
from fastsmtp.auth.dkim import DKIMResult, Verifier
from fastsmtp.auth.dkimsig import KeyCache, Problem, b_span, parse_key, parse_tags, parse_tags_careful
from fastsmtp.dns import BadName, DNSError

MSG = (
    b"Received: from client.example.com by mx.example.net; Mon, 1 Dec 2026 10:00:01 +0000\r\n"
    b"From: Alice Example <alice@example.com>\r\n"
    b"To: bob@example.net\r\n"
    b"Subject: Lunch  on\r\n\tThursday?\r\n"
    b"Date: Mon, 1 Dec 2026 10:00:00 +0000\r\n"
    b"Message-ID: <1@example.com>\r\n"
    b"\r\n"
    b"Hi Bob,\r\n\r\nShall we   meet at noon? \t\r\n\r\n-- \r\nAlice\r\n\r\n\r\n"
)
HEADERS = [b"from", b"to", b"subject", b"date", b"message-id"]
CANONS = [(b"relaxed", b"relaxed"), (b"relaxed", b"simple"), (b"simple", b"relaxed"), (b"simple", b"simple")]


def sign(msg: bytes, key: KeyPair, selector: bytes = b"sel", domain: bytes = b"example.com", **kw: object) -> bytes:
    kw.setdefault("include_headers", HEADERS)
    sig = dkimpy.sign(msg, selector, domain, key.private, signature_algorithm=key.algorithm, **kw)  # type: ignore[arg-type]
    return sig + msg


def lookups_for(key: KeyPair, selector: str = "sel", domain: str = "example.com") -> FakeLookups:
    lk = FakeLookups()
    lk.add(f"{selector}._domainkey.{domain}", key.record)
    return lk


def one(msg: bytes, lk: FakeLookups, **kw: object) -> DKIMResult:
    results, _ = verify(msg, lk, **kw)  # type: ignore[arg-type]
    assert len(results) == 1
    return results[0]


KEYS = {"rsa1024": lambda: rsa_key(1024), "rsa2048": lambda: rsa_key(2048), "ed25519": ed_key}


@pytest.mark.parametrize("canon", CANONS, ids=lambda c: b"/".join(c).decode())
@pytest.mark.parametrize("kind", list(KEYS))
def test_dkimpy_signatures_pass(kind: str, canon: tuple[bytes, bytes]) -> None:
    key = KEYS[kind]()
    signed = sign(MSG, key, canonicalize=canon)
    for seed in range(3):  # three different chunkings of the body
        r = one(signed, lookups_for(key), seed=seed)
        assert (r.result, r.reason) == ("pass", ""), r
    assert r.domain == "example.com" and r.selector == "sel" and r.identity == "@example.com"
    assert r.algorithm == key.algorithm.decode()
    field = split_message(signed)[0][0][1]
    sigb = re.search(rb";\s*b=([^;]+)", field)
    assert sigb is not None and r.b == b"".join(sigb.group(1).split())[:12].decode()


@pytest.fixture(scope="module")
def opendkim_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    if not (shutil.which("opendkim-genkey", path="/usr/sbin:/usr/bin") and Path("/usr/sbin/opendkim-testmsg").exists()):
        pytest.skip("opendkim-tools not installed")
    d = tmp_path_factory.mktemp("opendkim")
    subprocess.run(["/usr/sbin/opendkim-genkey", "-b", "2048", "-D", str(d), "-d", "example.org", "-s", "od"],
                   check=True, timeout=60)  # fmt: skip
    # The zone-file snippet: its quoted strings, concatenated, are the TXT record.
    record = "".join(re.findall(r'"([^"]*)"', (d / "od.txt").read_text())).encode()
    return d / "od.private", record


def test_opendkim_signature(opendkim_key: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    """Debian's opendkim-testmsg signs rsa-sha1, relaxed/simple, and offers no other algorithm.

    So its signature fails as RFC 8301 requires; with the refusal lifted (test
    only) the same signature verifies, which proves our header selection,
    canonicalisation and hash input agree with OpenDKIM's.
    """
    from fastsmtp.auth import dkimsig

    keyfile, record = opendkim_key
    msg = MSG.replace(b"alice@example.com", b"alice@example.org")
    args = ["/usr/sbin/opendkim-testmsg", "-C", "-d", "example.org", "-s", "od", "-k", str(keyfile)]
    out = subprocess.run(args, input=msg, capture_output=True, check=True, timeout=60).stdout
    assert out.startswith(b"DKIM-Signature:") and out.endswith(msg)
    lk = FakeLookups()
    lk.add("od._domainkey.example.org", record)
    r = one(out, lk)
    assert (r.result, r.algorithm, r.reason) == ("fail", "rsa-sha1", "rsa-sha1 not allowed (RFC 8301)")
    monkeypatch.setattr(dkimsig, "REFUSED", {})
    monkeypatch.setitem(dkimsig.ALGORITHMS, "rsa-sha1", ("rsa", "sha1"))
    lk = FakeLookups()
    lk.add("od._domainkey.example.org", record.replace(b"h=sha256; ", b""))
    r = one(out, lk)
    assert (r.result, r.domain, r.selector) == ("pass", "example.org", "od"), r
    assert one(out.replace(b"noon", b"one"), lk).reason == "body hash mismatch"
    assert one(out.replace(b"Lunch", b"Dinner"), lk).reason == "bad signature"


# -- failures ----------------------------------------------------------------------


def test_tampered_body_fails() -> None:
    key = rsa_key(2048)
    signed = sign(MSG, key, canonicalize=CANONS[0])
    r = one(signed.replace(b"noon", b"nine"), lookups_for(key))
    assert (r.result, r.reason) == ("fail", "body hash mismatch")
    # Relaxed forgives whitespace changes; simple does not.
    assert one(signed.replace(b"meet at", b"meet   at"), lookups_for(key)).result == "pass"
    simple = sign(MSG, key, canonicalize=CANONS[3])
    assert one(simple.replace(b"meet at", b"meet   at"), lookups_for(key)).reason == "body hash mismatch"


def test_tampered_signed_header_fails() -> None:
    for key in (rsa_key(2048), ed_key()):
        signed = sign(MSG, key, canonicalize=CANONS[0])
        r = one(signed.replace(b"Subject: Lunch", b"Subject: Dinner"), lookups_for(key))
        assert (r.result, r.reason) == ("fail", "bad signature")
        # An unsigned header may change; an added From (h= lists it once) is seen.
        assert one(signed.replace(b"Received: from client", b"Received: from other"), lookups_for(key)).result == "pass"
        assert one(signed.replace(b"To: bob", b"From: mallory@evil.example\r\nTo: bob"), lookups_for(key)).result == "fail"


def test_revoked_key_fails() -> None:
    key = rsa_key(2048)
    lk = FakeLookups()
    lk.add("sel._domainkey.example.com", b"v=DKIM1; k=rsa; p=")
    r = one(sign(MSG, key), lk)
    assert (r.result, r.reason) == ("fail", "key revoked")


def _craft(msg: bytes, key: KeyPair, extra: list[tuple[bytes, bytes]], canon: tuple[bytes, bytes] = CANONS[0]) -> bytes:
    return craft(msg, key, extra, canon, headers=HEADERS)


def test_expired_and_future_signatures() -> None:
    key = rsa_key(2048)
    now = time.time()
    lk = lookups_for(key)
    expired = _craft(MSG, key, [(b"t", b"%d" % (now - 7200)), (b"x", b"%d" % (now - 3600))])
    assert (one(expired, lk).result, one(expired, lk).reason) == ("fail", "signature expired")
    within_skew = _craft(MSG, key, [(b"t", b"%d" % (now - 7200)), (b"x", b"%d" % (now - 60))])
    assert one(within_skew, lk).result == "pass"
    future = _craft(MSG, key, [(b"t", b"%d" % (now + 3600))])
    assert (one(future, lk).result, one(future, lk).reason) == ("permerror", "timestamp in the future")
    backwards = _craft(MSG, key, [(b"t", b"%d" % now), (b"x", b"%d" % (now - 10))])
    assert one(backwards, lk).reason == "x= before t="


def test_rsa_sha1_fails() -> None:
    key = rsa_key(2048)
    signed = dkimpy.sign(MSG, b"sel", b"example.com", key.private, signature_algorithm=b"rsa-sha1") + MSG
    r = one(signed, lookups_for(key))
    assert (r.result, r.reason, r.algorithm) == ("fail", "rsa-sha1 not allowed (RFC 8301)", "rsa-sha1")


def test_768_bit_key_fails(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("no openssl")
    pem = subprocess.run(["openssl", "genrsa", "-traditional", "768"], capture_output=True, check=True, timeout=60).stdout
    private = serialization.load_pem_private_key(pem, None)
    der = private.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    key = KeyPair("rsa", pem, b"v=DKIM1; p=" + base64.b64encode(der))
    r = one(sign(MSG, key), lookups_for(key))
    assert (r.result, r.reason) == ("fail", "key too small (768 bits)")


def test_wrong_bh_and_malformed_tags() -> None:
    key = rsa_key(2048)
    signed = sign(MSG, key)
    lk = lookups_for(key)
    head, body = signed.split(b"\r\n\r\n", 1)
    bh = re.search(rb"bh=([^;]+);", head).group(1)  # type: ignore[union-attr]
    wrong = signed.replace(bh, base64.b64encode(b"\0" * 32))
    assert one(wrong, lk).reason == "body hash mismatch"
    cases = [  # (what, its replacement): pairs, as one key may be edited several ways
        (b"v=1; a=rsa-sha256;", b"v=1; v=1; a=rsa-sha256;"),  # duplicate tag
        (b"; s=sel;", b"; s=sel;;"),  # empty tag spec
        (b"v=1;", b"v=2;"),
        (b"a=rsa-sha256;", b"a=rsa-sha512;"),
        (b"d=example.com;", b"d=;"),
        (b"; s=sel;", b"; s=sel; l=12a;"),
        (b"; s=sel;", b"; s=sel; x=soon;"),
        (b"; s=sel;", b"; s=sel; q=http/well-known;"),
        (b"i=@example.com", b"i=@other.example"),
        (b"c=relaxed/simple", b"c=relaxed/fancy"),
        (b"v=1; a=rsa-sha256;", b"v=1; 3a=rsa-sha256;"),
    ]
    for old, new in cases:
        assert old in signed, old
        r = one(signed.replace(old, new, 1), lk)
        assert r.result == "permerror" and r.reason, (new, r)
    missing = one(signed.replace(b"bh=", b"xbh="), lk)
    assert (missing.result, missing.reason) == ("permerror", "missing bh=")
    # h= without From: sign with From unsigned by editing h= (signature unusable anyway).
    no_from = signed.replace(b"h=from : to", b"h=to : to")
    assert one(no_from, lk).reason == "From not signed"


def test_key_problems() -> None:
    key = rsa_key(2048)
    signed = sign(MSG, key)
    name = "sel._domainkey.example.com"
    assert one(signed, FakeLookups()).reason == "no key"
    lk = FakeLookups({name: DNSError("timeout")})
    assert (one(signed, lk).result, one(signed, lk).reason) == ("temperror", "key lookup failed")
    lk = FakeLookups({name: BadName("label too long")})
    assert one(signed, lk).result == "permerror"
    # Several records: the first that parses wins; v= not first is refused.
    lk = FakeLookups({name: (b"v=spf1 -all; junk", b"garbage", key.record)})
    assert one(signed, lk).result == "pass"
    lk = FakeLookups({name: (b"k=rsa; v=DKIM1; " + key.record.split(b"; ", 2)[2],)})
    assert one(signed, lk).reason == "bad v= in key record"
    lk = FakeLookups({name: (key.record + b"; s=tlsrpt",)})
    assert one(signed, lk).reason == "key not for email (s=)"
    lk = FakeLookups({name: (key.record + b"; h=sha1",)})
    assert one(signed, lk).reason == "hash not allowed by key h="
    lk = FakeLookups({name: (ed_key().record,)})
    assert one(signed, lk).reason == "key type does not match a="
    lk = FakeLookups({name: (key.record + b"; t=y",)})
    r = one(signed, lk)
    assert (r.result, r.testing) == ("pass", True)
    # t=s: i= must be d= itself.
    sub = sign(MSG, key, identity=b"alice@mail.example.com")
    assert one(sub, lookups_for(key)).result == "pass"
    lk = FakeLookups({name: (key.record + b"; t=s",)})
    assert one(sub, lk).reason == "i= must equal d= (key t=s)"


def test_pkcs1_key_accepted() -> None:
    key = rsa_key(2048)
    pub = serialization.load_pem_private_key(key.private, None).public_key()
    pkcs1 = pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
    lk = lookups_for(KeyPair("rsa", key.private, b"p=" + base64.b64encode(pkcs1)))
    assert one(sign(MSG, key), lk).result == "pass"


def test_huge_signature_and_key_record_are_clean_permerrors() -> None:
    key = rsa_key(2048)
    huge = b"DKIM-Signature: v=1; a=rsa-sha256; d=example.com; s=sel; h=from; bh=AA==; b=" + b"A" * 100_000 + b"\r\n"
    t0 = time.perf_counter()
    r = one(huge + MSG, lookups_for(key))
    assert (r.result, r.reason) == ("permerror", "signature field too long")
    lk = FakeLookups({"sel._domainkey.example.com": (b"v=DKIM1; p=" + b"A" * 100_000,)})
    r = one(sign(MSG, key), lk)
    assert (r.result, r.reason) == ("permerror", "key record too long")
    assert time.perf_counter() - t0 < 1.0
    for junk in (b"DKIM-Signature: \r\n", b"DKIM-Signature: ;;;===\xff\x00\r\n", b"DKIM-Signature:\r\n"):
        assert one(junk + MSG, lookups_for(key)).result == "permerror"


# -- several signatures, shared hashers, l= ----------------------------------------


def test_several_signatures_each_its_own_result() -> None:
    rsa2048, ed, other = rsa_key(2048), ed_key(), rsa_key(1024)
    msg = sign(MSG, rsa2048, canonicalize=CANONS[0])
    msg = sign(msg, ed, selector=b"ed", canonicalize=CANONS[0])
    msg = sign(msg, other, selector=b"list", domain=b"lists.example.org", canonicalize=CANONS[3])
    msg = sign(msg, rsa2048, selector=b"gone", canonicalize=CANONS[0])
    lk = FakeLookups()
    lk.add("sel._domainkey.example.com", rsa2048.record)
    lk.add("ed._domainkey.example.com", ed.record)
    lk.add("list._domainkey.lists.example.org", other.record)
    results, v = verify(msg, lk)
    assert [(r.result, r.domain, r.selector) for r in results] == [
        ("permerror", "example.com", "gone"),
        ("pass", "lists.example.org", "list"),
        ("pass", "example.com", "ed"),
        ("pass", "example.com", "sel"),
    ]
    # relaxed/sha256 shared by three signatures, simple/sha256 by one: two hashers.
    assert len(v.body_hashes) == 2 and v.body_hashes.canonicalisers == 2


def test_max_signatures_and_concurrent_lookups() -> None:
    key = rsa_key(1024)
    msg = MSG
    for _ in range(4):
        msg = sign(msg, key)
    lk = lookups_for(key)
    results, v = verify(msg, lk, max_signatures=3)
    assert [r.result for r in results] == ["pass", "pass", "pass", "policy"]
    assert results[3].reason == "too many signatures" and results[3].domain == "example.com"
    assert lk.asked == ["sel._domainkey.example.com"]  # one lookup for the shared name
    assert len(v.body_hashes) == 1


def test_length_limit_allows_appended_content() -> None:
    for key in (rsa_key(2048), ed_key()):
        for canon in CANONS:
            signed = sign(MSG, key, canonicalize=canon, length=True)
            assert b" l=" in signed or b";l=" in signed or b"l=" in signed
            appended = signed + b"--\r\nThis list is hosted by lists.example.org\r\n"
            r = one(appended, lookups_for(key))
            assert r.result == "pass", (canon, r)
            assert one(signed.replace(b"Alice\r\n", b"Alicf\r\n"), lookups_for(key)).result == "fail"


def test_length_beyond_body_fails() -> None:
    key = rsa_key(2048)
    signed = sign(MSG, key, canonicalize=CANONS[3], length=True)
    head, _ = signed.split(b"\r\n\r\n", 1)
    shorter = head + b"\r\n\r\nHi Bob,\r\n"
    assert one(shorter, lookups_for(key)).reason == "l= beyond the body"


def test_oversigned_header_names() -> None:
    key = rsa_key(2048)
    signed = sign(MSG, key, include_headers=HEADERS + [b"subject", b"reply-to", b"cc"])
    lk = lookups_for(key)
    assert one(signed, lk).result == "pass"
    # Over-signing means adding the absent header (or a second one) breaks it.
    assert one(signed.replace(b"To: bob", b"Cc: eve@evil.example\r\nTo: bob"), lk).result == "fail"
    assert one(signed.replace(b"To: bob", b"Subject: other\r\nTo: bob"), lk).result == "fail"


def test_no_signatures_needs_no_body() -> None:
    headers, _ = split_message(MSG)
    v = Verifier(headers)
    assert not v.needs_body and len(v.body_hashes) == 0
    assert asyncio.run(v.dkim(FakeLookups(), time.time())) == []


def test_key_cache_by_record_text() -> None:
    key = rsa_key(2048)
    signed = sign(MSG, key)
    headers, body = split_message(signed)
    cache = KeyCache(size=2)
    for _ in range(3):
        v = Verifier(headers, key_cache=cache)
        v.body(body)
        v.end()
        assert asyncio.run(v.dkim(lookups_for(key), time.time()))[0].result == "pass"
    assert len(cache) == 1
    for n in range(5):  # bounded: the oldest goes first
        with pytest.raises(Exception):
            cache.parse(b"v=DKIM1; p=" + base64.b64encode(b"x" * (n + 1)))
    assert len(cache) == 2
    assert parse_key(key.record).bits == 2048


def test_timings_report(capsys: pytest.CaptureFixture[str]) -> None:
    """µs per verify on a 1 KiB message: construct, body, end, dkim(), with warm lookups and key cache."""
    body = (b"Lorem ipsum dolor sit amet, consectetur adipiscing elit.\r\n" * 18)[:1000]
    msg = MSG.split(b"\r\n\r\n")[0] + b"\r\n\r\n" + body
    loop = asyncio.new_event_loop()
    try:
        for name, key in (("rsa-2048", rsa_key(2048)), ("ed25519", ed_key())):
            signed = sign(msg, key, canonicalize=CANONS[0])
            headers, b = split_message(signed)
            lk = lookups_for(key)
            cache = KeyCache()

            def once() -> str:
                v = Verifier(headers, key_cache=cache)
                v.body(b)
                v.end()
                return loop.run_until_complete(v.dkim(lk, time.time()))[0].result

            assert once() == "pass"
            n = 300
            t0 = time.perf_counter()
            for _ in range(n):
                once()
            us = (time.perf_counter() - t0) / n * 1e6
            with capsys.disabled():
                print(f"\n  verify {name} 1 KiB: {us:.0f} µs")
    finally:
        loop.close()


# -- the tag-list fast path equals the careful parser ------------------------------


def _tags_or_problem(parse: object, data: bytes) -> object:
    try:
        return parse(data)  # type: ignore[operator]
    except Problem as p:
        return (p.result, p.reason)


TAG_EDGES = [
    b"",
    b"  \r\n ",
    b"a=1",
    b"a=1;",
    b"a=1; ",
    b"a=1;;",  # an empty spec not at the end
    b";",
    b" ; a=1",
    b"a = 1 ; b\t=\r\n 2\r\n ;\r\n",  # FWS around "=" and ";", folded
    b"a=; b= ;c=",  # empty values
    b"a=1; a=2",  # duplicate
    b"a=1; A=2",  # names are case-sensitive: not a duplicate
    b"a=1; b",  # a spec without "="
    b"3a=1",
    b"_a=1",
    b"a_b=1; a-b=2",
    b"a b=1",
    b"=1",
    b"a==b=c; b=x=",  # "=" inside values
    b"a=\x01",
    b"a=1; b=\x7f; a=1",  # the control octet is after a duplicate-free prefix
    b"a=1; a=2; b=\x00",  # a duplicate before a control octet
    b"a=caf\xc3\xa9; b=\xff",  # non-ASCII values
    b"\xc3\xa9=1",
    b"a=1\x0b",
]


def test_parse_tags_fast_equals_careful() -> None:
    for data in TAG_EDGES:
        assert _tags_or_problem(parse_tags, data) == _tags_or_problem(parse_tags_careful, data), data
    assert parse_tags(b" a = 1 ; b=\r\n 2 ;") == {"a": "1", "b": "2"}
    assert list(parse_tags(b"v=DKIM1; k=rsa; p=")) == ["v", "k", "p"]  # the list's order (§3.6.1 v= first)
    assert _tags_or_problem(parse_tags, b"v=1; v=1") == ("permerror", "duplicate tag v=")
    assert _tags_or_problem(parse_tags, b"a=1;; b=2") == ("permerror", "malformed tag list")


B_SPANS = [
    # (tag list, b='s span: after "=" up to ";" or the end, FWS included)
    (b" a = 1 ; b=\r\n 2 ;", (11, 16)),
    (b"b=x", (2, 3)),
    (b" b = x ; bh=y", (4, 7)),
    (b"bh=y; b =", (9, 9)),
    (b"h=from:b=c; bb=1; b=\r\n\tAB CD\r\n ;c=x", (20, 31)),  # "b=" inside h='s value is not b=
    (b"z=b=1;b=2", (8, 9)),
    (b"a=caf\xc3\xa9; b=\xff ", (11, 13)),  # octet offsets, non-ASCII before
]


def test_b_span() -> None:
    for data, span in B_SPANS:
        assert "b" in parse_tags_careful(data), data
        assert b_span(data) == span, data
        # Within a field: the value's start and end bound the search.
        field = b"DKIM-Signature:" + data + b"\r\n"
        assert b_span(field, 15, len(field) - 2) == (span[0] + 15, span[1] + 15), data


def _b_span_reference(data: bytes) -> tuple[int, int]:
    """Spec by spec (§3.2): the span after b='s "=" up to its ";" or the end."""
    pos = 0
    for spec in data.split(b";"):
        name, _, _ = spec.partition(b"=")
        if name.strip(b" \t\r\n") == b"b":
            return pos + spec.index(b"=") + 1, pos + len(spec)
        pos += len(spec) + 1
    raise AssertionError("no b=")


@settings(max_examples=1500, deadline=None)
@given(st.lists(st.sampled_from([b"a", b"b", b"bh", b"=", b";", b" ", b"\t", b"\r\n", b"\xc3\xa9", b"b=", b"; b="]),
                max_size=30).map(b"".join))
def test_b_span_equals_reference(data: bytes) -> None:
    try:
        tags = parse_tags_careful(data)
    except Problem:
        return
    if "b" in tags:
        assert b_span(data) == _b_span_reference(data)


@settings(max_examples=1500, deadline=None)
@given(st.lists(st.sampled_from([b"a", b"b", b"A", b"1", b"_", b"=", b";", b" ", b"\t", b"\r\n", b"\r", b"\n",
                                 b"\x00", b"\x7f", b"\xc3\xa9", b"\xff", b"v=1", b"bh=", b"; "]),
                max_size=40).map(b"".join))
def test_parse_tags_fast_equals_careful_random(data: bytes) -> None:
    assert _tags_or_problem(parse_tags, data) == _tags_or_problem(parse_tags_careful, data)


# -- at_once: gather's meaning, without a task for one coroutine ---------------------


def test_at_once_order_concurrency_and_no_task_for_one() -> None:
    from fastsmtp.auth.dkim import at_once

    started: list[int] = []

    async def quick(n: int) -> int:
        started.append(n)
        return n

    async def slow(n: int, fut: asyncio.Future[int]) -> int:
        started.append(n)
        await asyncio.sleep(0)  # a bare yield
        return n + await fut  # a future shared by two waiters

    async def main() -> tuple[list[int], list[int]]:
        loop = asyncio.get_running_loop()
        before = len(asyncio.all_tasks())
        one = await at_once([quick(1)])
        assert len(asyncio.all_tasks()) == before  # nothing was scheduled
        fut: asyncio.Future[int] = loop.create_future()
        loop.call_later(0.01, fut.set_result, 100)
        mixed = await at_once([slow(3, fut), quick(4), slow(5, fut)])
        return one, mixed

    assert asyncio.run(asyncio.wait_for(main(), 5)) == ([1], [103, 4, 105])
    assert started == [1, 3, 4, 5]


def test_at_once_errors_and_cancellation() -> None:
    from fastsmtp.auth.dkim import at_once

    async def boom() -> int:
        await asyncio.sleep(0)
        raise ValueError("x")

    async def forever(fut: asyncio.Future[int]) -> int:
        try:
            return await fut
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    cancelled: list[bool] = []

    async def main() -> None:
        with pytest.raises(ValueError):
            await at_once([boom()])
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(at_once([forever(fut), forever(fut)]), 0.01)
        await asyncio.sleep(0)
        assert cancelled == [True, True]  # each waiting coroutine saw the cancellation

    asyncio.run(asyncio.wait_for(main(), 5))


def test_parse_signature_missing_tags_in_order_and_h_lowered() -> None:
    from fastsmtp.auth.dkimsig import parse_signature, split_tags

    full = b"v=1; a=rsa-sha256; d=example.com; s=sel; h=From : TO;\r\n bh=AAAA; b=QUJD"

    def parse(value: bytes) -> object:
        field = b"DKIM-Signature: " + value + b"\r\n"
        tags, offset = split_tags(field)
        try:
            return parse_signature(field, 0, tags, offset)
        except Problem as p:
            return p.reason

    for drop in ([b"a"], [b"b"], [b"d"], [b"s"], [b"s", b"d"], [b"b", b"s", b"d"], [b"a", b"s"], [b"h"], [b"bh"]):
        value = b";".join(spec for spec in full.split(b";") if spec.split(b"=")[0].strip() not in drop)
        first = next(name for name in (b"a", b"b", b"d", b"s", b"bh", b"h") if name in drop)
        assert parse(value) == f"missing {first.decode()}=", drop
    sig = parse(full)
    assert sig.signed == ("from", "to")  # type: ignore[union-attr]
    # Non-ASCII names are lowered one by one (a final sigma depends on its neighbours).
    sig = parse(full.replace(b"TO", "A\u03a3:B".encode()))
    assert sig.signed == ("from", "a\u03c2", "b")  # type: ignore[union-attr]
