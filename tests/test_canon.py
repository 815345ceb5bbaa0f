"""DKIM canonicalisation: RFC 6376 §3.4's examples, edge cases, and streaming = whole."""

from __future__ import annotations

import hashlib
import random
import re
import sys

from hypothesis import given, settings
from hypothesis import strategies as st

from fastsmtp.auth.canon import (
    RELAXED,
    SIMPLE,
    BodyCanon,
    BodyHashes,
    BodyKey,
    header_relaxed,
    header_simple,
)

# -- whole-string references, written straight from the RFC's words ---------


def ref_simple(body: bytes) -> bytes:
    """§3.4.3: drop all empty lines at the end; the body ends in one CRLF."""
    while body.endswith(b"\r\n"):
        body = body[:-2]
    return body + b"\r\n"


def ref_relaxed(body: bytes) -> bytes:
    """§3.4.4, line by line (lines end at CRLF only; a bare CR/LF is an octet)."""
    parts = body.split(b"\r\n")
    # The last part is the unterminated rest of the body (b"" if it ended in CRLF).
    lines = []
    for part in parts:
        part = re.sub(rb"[ \t]+", b" ", part)  # WSP runs -> one SP
        lines.append(part.rstrip(b" "))  # no WSP at the end of a line
    last = lines.pop()
    if last:
        lines.append(last)  # a non-empty unterminated line gets its CRLF
    while lines and lines[-1] == b"":
        lines.pop()  # trailing empty lines are ignored
    return b"".join(line + b"\r\n" for line in lines)


def stream(body: bytes, relaxed: bool, cuts: list[int]) -> bytes:
    """Feed body split at the given sizes into a BodyCanon that records its output."""

    class Rec:
        def __init__(self) -> None:
            self.out = bytearray()

        def update(self, data: bytes) -> None:
            self.out += data

    canon = BodyCanon(relaxed=relaxed)
    rec = Rec()
    from fastsmtp.auth.canon import _Sink

    canon.sinks.append(_Sink(rec, None))
    pos = 0
    for size in cuts:
        canon.write(memoryview(body)[pos : pos + size])
        pos += size
    canon.write(body[pos:])
    canon.end()
    return bytes(rec.out)


# -- RFC 6376 §3.4.5 examples -------------------------------------------------

EX_HEADERS = [b"A: X\r\n", b"B : Y\t\r\n\tZ  \r\n"]
EX_BODY = b" C \r\nD \t E\r\n\r\n\r\n"


def test_rfc_example_relaxed() -> None:
    assert [header_relaxed(h) for h in EX_HEADERS] == [b"a:X\r\n", b"b:Y Z\r\n"]
    assert ref_relaxed(EX_BODY) == b" C\r\nD E\r\n"
    assert stream(EX_BODY, True, []) == b" C\r\nD E\r\n"


def test_rfc_example_simple() -> None:
    assert [header_simple(h) for h in EX_HEADERS] == EX_HEADERS
    assert stream(EX_BODY, False, []) == b" C \r\nD \t E\r\n"


def test_empty_bodies() -> None:
    # §3.4.3: simple makes an empty body one CRLF; §3.4.4: relaxed leaves it empty.
    for body in (b"", b"\r\n", b"\r\n\r\n", b" \r\n\t\r\n"):
        assert stream(body, True, [1]) == b""
    assert stream(b"", False, []) == b"\r\n"
    assert stream(b"\r\n\r\n\r\n", False, [1, 1]) == b"\r\n"
    assert stream(b" \r\n", False, []) == b" \r\n"


def test_edges() -> None:
    assert stream(b"abc", False, []) == b"abc\r\n"  # no final CRLF: one is added
    assert stream(b"abc", True, []) == b"abc\r\n"
    assert stream(b"a \r", True, [2]) == b"a \r\r\n"  # a bare CR is an octet
    assert stream(b"a\n \r\n", True, [1, 1]) == b"a\n\r\n"
    assert stream(b"a\r\n\r\nb\r\n", False, [3]) == b"a\r\n\r\nb\r\n"  # inner empty lines stay
    assert stream(b"a   ", True, [2]) == b"a\r\n"  # choice: unterminated WSP is trailing WSP


def test_header_relaxed_edges() -> None:
    assert header_relaxed(b"SUBJect:\t  hello \r\n  world\t\r\n") == b"subject:hello world\r\n"
    assert header_relaxed(b"X-Empty:\r\n") == b"x-empty:\r\n"
    assert header_relaxed(b"To: a\r\n\tb\r\n") == b"to:a b\r\n"


# -- streaming equals whole ---------------------------------------------------

ALPHABET = st.sampled_from([b" ", b"\t", b"\r", b"\n", b"\r\n", b"a", b"b", b"  ", b"\r\n\r\n", b".", b"\xff"])


@settings(max_examples=600, deadline=None)
@given(st.lists(ALPHABET, max_size=60).map(b"".join), st.lists(st.integers(0, 9), max_size=30))
def test_split_equivalence(body: bytes, cuts: list[int]) -> None:
    assert stream(body, True, cuts) == ref_relaxed(body)
    assert stream(body, False, cuts) == ref_simple(body)
    assert stream(body, True, [1] * len(body)) == ref_relaxed(body)
    assert stream(body, False, [1] * len(body)) == ref_simple(body)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.lists(st.integers(1, 40), max_size=20))
def test_split_equivalence_binary(body: bytes, cuts: list[int]) -> None:
    assert stream(body, True, cuts) == ref_relaxed(body)
    assert stream(body, False, cuts) == ref_simple(body)


def test_long_runs_across_many_chunks() -> None:
    rnd = random.Random(5)
    body = b"x" + b" " * 5000 + b"\r\n" * 9000 + b"y \t \r\n" + b"\r\n" * 300
    cuts = [rnd.randint(1, 700) for _ in range(200)]
    assert stream(body, True, cuts) == ref_relaxed(body)
    assert stream(body, False, cuts) == ref_simple(body)


# -- l= and sharing ------------------------------------------------------------


def test_limits_and_shared_hashers() -> None:
    body = b"Hello  world \r\nline two\r\n\r\n"
    hashes = BodyHashes()
    keys = [
        BodyKey(RELAXED, "sha256", None),
        BodyKey(RELAXED, "sha256", 5),
        BodyKey(SIMPLE, "sha256", None),
        BodyKey(SIMPLE, "sha256", 0),
    ]
    for k in keys + keys:
        hashes.need(k)
    assert len(hashes) == 4 and hashes.canonicalisers == 2
    for i in range(len(body)):
        hashes.write(body[i : i + 1])
    hashes.end()
    rel, sim = ref_relaxed(body), ref_simple(body)
    assert hashes.digest(keys[0]) == hashlib.sha256(rel).digest()
    assert hashes.digest(keys[1]) == hashlib.sha256(rel[:5]).digest()
    assert hashes.digest(keys[2]) == hashlib.sha256(sim).digest()
    assert hashes.digest(keys[3]) == hashlib.sha256(b"").digest()
    assert hashes.length(RELAXED) == len(rel) and hashes.length(SIMPLE) == len(sim)


# -- bounded state ----------------------------------------------------------------


def _state_size(canon: BodyCanon) -> int:
    return sum(sys.getsizeof(getattr(canon, name)) for name in ("held", "wsp", "cr", "length", "content"))


def test_bounded_state_for_spaces_and_crlfs() -> None:
    for relaxed in (True, False):
        for unit in (b" ", b"\r\n", b"\t "):
            canon = BodyCanon(relaxed=relaxed)
            canon.sinks.append(__import__("fastsmtp.auth.canon", fromlist=["_Sink"])._Sink(hashlib.sha256(), None))
            piece = unit * (1 << 20) if len(unit) == 1 else unit * (1 << 19)
            # 1 MB fed one octet at a time for the first 20 KB, then in pieces.
            for i in range(20000):
                canon.write(piece[i : i + 1])
                assert _state_size(canon) < 200
            for i in range(20000, len(piece), 4093):
                canon.write(piece[i : i + 4093])
                assert _state_size(canon) < 200
            assert set(vars(canon) if hasattr(canon, "__dict__") else ()) == set()  # slots: no stray buffer
            canon.end()


def ref_header_relaxed(field: bytes) -> bytes:
    """§3.4.2 step by step with regexes (the fast path must give the same octets)."""
    name, _, value = field.partition(b":")
    value = re.sub(rb"[ \t]+", b" ", value.replace(b"\r\n", b"")).strip(b" ")
    return name.rstrip(b" \t").lower() + b":" + value + b"\r\n"


HEADER_ALPHABET = st.sampled_from([b" ", b"\t", b"\r", b"\n", b"\r\n", b"\r\n ", b"a", b"B", b":", b"\x0b", b"\x0c", b"\xff"])


@settings(max_examples=800, deadline=None)
@given(st.lists(HEADER_ALPHABET, max_size=30).map(b"".join))
def test_header_relaxed_equals_reference(field: bytes) -> None:
    assert header_relaxed(field) == ref_header_relaxed(field)
    assert header_relaxed(b"Subject:" + field + b"\r\n") == ref_header_relaxed(b"Subject:" + field + b"\r\n")


@settings(max_examples=800, deadline=None)
@given(st.lists(st.lists(HEADER_ALPHABET, max_size=12).map(lambda p: b"X-H:" + b"".join(p) + b"\r\n"), max_size=6),
       st.lists(st.lists(HEADER_ALPHABET, max_size=12).map(b"".join), max_size=3))
def test_headers_relaxed_equals_one_by_one(fields: list[bytes], odd: list[bytes]) -> None:
    from fastsmtp.auth.canon import headers_relaxed

    for batch in (fields, fields + odd, odd + fields, [b"From: a\r\n", b" b: c\r\n"], [b"A: x", b"\r\nB: y\r\n"]):
        assert headers_relaxed(batch) == b"".join(header_relaxed(f) for f in batch)
