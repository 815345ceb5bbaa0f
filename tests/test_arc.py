"""ARC validation (RFC 8617 §5.2) against chains sealed by dkimpy."""

from __future__ import annotations

import re

import dkim as dkimpy
import pytest

from dkimtools import FakeLookups, rsa_key, split_message, verify_arc

pytest.importorskip("authres")  # dkimpy's arc_sign reads the A-R it seals through authres

MSG = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: list@lists.example.org\r\n"
    b"Subject: ARC  test\r\n"
    b"Date: Mon, 1 Dec 2026 10:00:00 +0000\r\n"
    b"Message-ID: <arc1@example.com>\r\n"
    b"\r\n"
    b"Hello list,\r\n\r\nthis goes through two hops.\r\n"
)
HEADERS = [b"from", b"to", b"subject", b"date", b"message-id"]


def seal(msg: bytes, srv_id: bytes, domain: bytes, selector: bytes, arc: str | None) -> bytes:
    """One hop: its A-R (with arc= for the chain it found), then dkimpy's ARC set on top."""
    results = b"spf=pass smtp.mailfrom=example.com" + (f"; arc={arc}".encode() if arc else b"")
    msg = b"Authentication-Results: " + srv_id + b"; " + results + b"\r\n" + msg
    key = rsa_key(2048)
    fields = dkimpy.arc_sign(msg, selector, domain, key.private, srv_id, include_headers=HEADERS)
    assert fields, "dkimpy made no ARC set"
    return b"".join(fields) + msg


@pytest.fixture(scope="module")
def lookups() -> FakeLookups:
    lk = FakeLookups()
    rec = rsa_key(2048).record
    lk.add("hop1._domainkey.lists.example.org", rec)
    lk.add("hop2._domainkey.relay.example.net", rec)
    return lk


@pytest.fixture(scope="module")
def one_hop() -> bytes:
    return seal(MSG, b"mx.lists.example.org", b"lists.example.org", b"hop1", None)


@pytest.fixture(scope="module")
def two_hops(one_hop: bytes) -> bytes:
    return seal(one_hop, b"mx.relay.example.net", b"relay.example.net", b"hop2", "pass")


def test_no_arc_headers_is_none(lookups: FakeLookups) -> None:
    r = verify_arc(MSG, lookups)
    assert (r.result, r.instances) == ("none", 0)


def test_one_hop_passes(one_hop: bytes, lookups: FakeLookups) -> None:
    r = verify_arc(one_hop, lookups)
    assert (r.result, r.instances, r.domain, r.reason) == ("pass", 1, "lists.example.org", "")


def test_two_hops_pass(two_hops: bytes, lookups: FakeLookups) -> None:
    for seed in range(3):
        r = verify_arc(two_hops, lookups, seed=seed)
        assert (r.result, r.instances, r.domain) == ("pass", 2, "relay.example.net"), r


def test_body_tampered_after_the_seal_fails(two_hops: bytes, lookups: FakeLookups) -> None:
    r = verify_arc(two_hops.replace(b"two hops", b"three hops"), lookups)
    assert r.result == "fail" and r.reason == "AMS i=2: body hash mismatch"


def test_broken_seal_fails(two_hops: bytes, lookups: FakeLookups) -> None:
    # Change the oldest AAR: AMS i=2 does not sign it, but every later seal does.
    broken = two_hops.replace(b"mx.lists.example.org;", b"mx.lists.example.org ;", 1)
    headers, _ = split_message(broken)
    assert any(n.lower() == b"arc-authentication-results" and b"lists.example.org ;" in f for n, f in headers)
    r = verify_arc(broken, lookups)
    assert r.result == "fail" and r.reason.startswith("AS i=2"), r
    # A seal's own b= damaged.
    m = re.search(rb"(ARC-Seal: i=2;.*?b=)([A-Za-z0-9+/])", two_hops, re.S)
    assert m is not None
    flipped = two_hops[: m.end(1)] + (b"B" if m.group(2) != b"B" else b"C") + two_hops[m.end(2) :]
    assert verify_arc(flipped, lookups).result == "fail"


def _drop(msg: bytes, name: bytes, instance: int) -> bytes:
    headers, body = split_message(msg)
    keep = [f for n, f in headers if not (n.lower() == name and re.match(rb"[^:]*:\s*i=%d;" % instance, f))]
    return b"".join(keep) + b"\r\n" + body


def test_structure_errors_fail(two_hops: bytes, lookups: FakeLookups) -> None:
    missing = _drop(two_hops, b"arc-message-signature", 1)
    assert verify_arc(missing, lookups).reason == "ARC set i=1 incomplete or duplicated"
    headers, body = split_message(two_hops)
    seal1 = next(f for n, f in headers if n.lower() == b"arc-seal" and b"i=1;" in f)
    duplicated = seal1 + two_hops
    assert verify_arc(duplicated, lookups).reason == "ARC set i=1 incomplete or duplicated"
    gap = b"".join(f.replace(b"i=2;", b"i=3;", 1) if n.lower().startswith(b"arc-") and b"i=2;" in f[:40] else f
                   for n, f in headers) + b"\r\n" + body  # fmt: skip
    assert verify_arc(gap, lookups).reason == "ARC instances not contiguous"
    newest_fail = two_hops.replace(b"i=2; cv=pass", b"i=2; cv=fail", 1)
    assert b"i=2; cv=fail" in newest_fail
    assert verify_arc(newest_fail, lookups).reason == "newest ARC-Seal has cv=fail"
    first_pass = two_hops.replace(b"i=1; cv=none", b"i=1; cv=pass", 1)
    assert b"i=1; cv=pass" in first_pass
    assert verify_arc(first_pass, lookups).reason == "ARC-Seal i=1 has cv=pass"
    too_many = two_hops.replace(b"i=2;", b"i=51;")
    assert verify_arc(too_many, lookups).result == "fail"


def test_missing_key_fails(two_hops: bytes) -> None:
    r = verify_arc(two_hops, FakeLookups())
    assert r.result == "fail" and r.reason == "AMS i=2: no key"
