"""Properties of the parser, checked with Hypothesis.

- The compiled module and the pure-Python twin give identical answers, feed
  by feed, for any input and any chunking.
- Chunking never changes the answer.
- Dot-stuffing round-trips: DataReader(stuff(m)) == m, ending exactly at the
  end of stuff(m).
- The readers agree with ``expected_data``, the contract over whole inputs.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import replace
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastsmtp import _parser_py
from fastsmtp._testing import chunked, expected_data, read_data, read_lines, stuff

PURE = os.environ.get("FASTSMTP_PUREPYTHON", "") not in ("", "0")
BIG = 1 << 40
SETTINGS = settings(max_examples=200, deadline=None)


def compiled() -> ModuleType:
    if PURE:
        pytest.skip("FASTSMTP_PUREPYTHON=1: the compiled parser is not required")
    return importlib.import_module("fastsmtp._parser")


@pytest.fixture(scope="module", params=["cython", "python"])
def impl(request: pytest.FixtureRequest) -> ModuleType:
    return _parser_py if request.param == "python" else compiled()


# Inputs rich in the octets that matter, so that terminators, near-misses,
# stuffed dots and bare line ends all turn up often.
PIECES = [b"\r", b"\n", b".", b"\r\n", b"\r\n.", b"\r\n.\r\n", b"..", b"x", b"yz", b"\x00", b"\xff"]
wire = st.one_of(
    st.lists(st.sampled_from(PIECES), max_size=60).map(b"".join),
    st.binary(max_size=200),
)
# Chunk sizes, cycled; one octet at a time is drawn often, because that puts
# a feed boundary at every position, including inside a terminator.
sizes = st.one_of(st.just([1]), st.lists(st.integers(1, 64), min_size=1, max_size=8))
# A line of a message: any octets but CR and LF; it may start with dots.
line = st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
dotted_line = st.tuples(st.sampled_from([b"", b".", b".."]), line).map(b"".join)
message = st.lists(dotted_line, max_size=20).map(lambda ls: b"".join(x + b"\r\n" for x in ls))


@SETTINGS
@given(payload=wire, cuts=sizes, max_size=st.integers(0, 300), normalize=st.booleans())
def test_data_twin_equals_compiled(
    payload: bytes, cuts: list[int], max_size: int, normalize: bool
) -> None:
    c = compiled()
    chunks = chunked(payload, cuts)
    assert read_data(c.DataReader(max_size, normalize), chunks) == read_data(
        _parser_py.DataReader(max_size, normalize), chunks
    )


@SETTINGS
@given(payload=wire, cuts=sizes, normalize=st.booleans())
def test_chunking_never_changes_the_answer(
    impl: ModuleType, payload: bytes, cuts: list[int], normalize: bool
) -> None:
    whole = read_data(impl.DataReader(BIG, normalize), [payload])
    split = read_data(impl.DataReader(BIG, normalize), chunked(payload, cuts))
    assert replace(split, pieces=()) == replace(whole, pieces=())


@SETTINGS
@given(payload=wire, max_size=st.integers(0, 300), normalize=st.booleans())
def test_agrees_with_the_contract(
    impl: ModuleType, payload: bytes, max_size: int, normalize: bool
) -> None:
    payload += b"\r\n.\r\n"  # make sure it ends
    expected = expected_data(payload, max_size, normalize)
    result = read_data(impl.DataReader(max_size, normalize), [payload])
    assert expected is not None and result.done
    assert result == replace(expected, pieces=result.pieces)


@SETTINGS
@given(content=message, cuts=sizes, trailing=wire)
def test_stuffing_round_trips(
    impl: ModuleType, content: bytes, cuts: list[int], trailing: bytes
) -> None:
    sent = stuff(content)
    result = read_data(impl.DataReader(BIG), chunked(sent + trailing, cuts))
    assert result.done and result.content == content and result.consumed == len(sent)
    assert not (result.bare_lf or result.bare_cr or result.oversize)


@SETTINGS
@given(payload=wire, cuts=sizes, max_length=st.integers(2, 40))
def test_lines_twin_equals_compiled(payload: bytes, cuts: list[int], max_length: int) -> None:
    c = compiled()
    chunks = chunked(payload, cuts)
    readers = c.LineReader(max_length), _parser_py.LineReader(max_length)
    got = [read_lines(r, chunks) for r in readers]
    assert got[0] == got[1]
    assert len(readers[0]) == len(readers[1])
    assert readers[0].take() == readers[1].take()


@SETTINGS
@given(payload=wire, cuts=sizes, max_length=st.integers(2, 40))
def test_lines_chunking_never_changes_the_answer(
    impl: ModuleType, payload: bytes, cuts: list[int], max_length: int
) -> None:
    payload += b"\r\n"  # no partial line left: the discard state cannot differ
    whole = impl.LineReader(max_length)
    split = impl.LineReader(max_length)
    assert read_lines(whole, [payload]) == read_lines(split, chunked(payload, cuts))
    assert len(whole) == len(split) == 0


@SETTINGS
@given(lines=st.lists(line, max_size=10), cuts=sizes)
def test_lines_round_trip(impl: ModuleType, lines: list[bytes], cuts: list[int]) -> None:
    payload = b"".join(x + b"\r\n" for x in lines)
    reader = impl.LineReader(1024)
    assert read_lines(reader, chunked(payload, cuts)) == [(x, 0) for x in lines]


# -- relaxed_wsp: DKIM's relaxed body whitespace (RFC 6376 §3.4.4 a) ----------------

WSP_PIECES = [b" ", b"  ", b"\t", b" \t ", b"\r\n", b" \r\n", b"\r", b"\n", b"x", b"yz", b"\xff", b"abcdefghijk"]
wsp_text = st.lists(st.sampled_from(WSP_PIECES), max_size=60).map(b"".join)


def wsp_reference(text: bytes) -> bytes:
    """§3.4.4 a by its words, line by line: WSP runs become one SP, and none ends a line."""
    lines = text.split(b"\r\n")
    out = []
    for i, one in enumerate(lines):
        squeezed = b""
        run = False
        for byte in one:
            if byte in (9, 32):
                run = True
                continue
            if run:
                squeezed += b" "
                run = False
            squeezed += bytes([byte])
        if run and i == len(lines) - 1:
            squeezed += b" "  # a run the input ends in is held back by the caller: kept as one SP here
        out.append(squeezed)
    return b"\r\n".join(out)


@SETTINGS
@given(text=wsp_text, cut=st.integers(0, 400))
def test_relaxed_wsp_twin_equals_compiled_and_the_rule(text: bytes, cut: int) -> None:
    end = min(cut, len(text))
    python = _parser_py.relaxed_wsp(text, end)
    expected = wsp_reference(text[:end])
    assert (python if python is not None else text[:end]) == expected
    assert python is None or python != text[:end]  # None exactly when nothing changes
    if not PURE:
        assert compiled().relaxed_wsp(text, end) == python


def test_relaxed_wsp_bounds(impl: ModuleType) -> None:
    with pytest.raises(ValueError):
        impl.relaxed_wsp(b"ab", 3)
    with pytest.raises(ValueError):
        impl.relaxed_wsp(b"ab", -1)
    assert impl.relaxed_wsp(b"a  b\r\n", 6) == b"a b\r\n"
    assert impl.relaxed_wsp(b"a b \r\n", 4) is None  # the CRLF is beyond end: not seen
    assert impl.relaxed_wsp(b"plain text\r\n", 12) is None


# -- tag_list and relaxed_headers: DKIM's tag lists and relaxed header fields --------

TAG_PIECES = [b"a", b"Z", b"bh", b"x9", b"_", b"9", b"=", b";", b" ", b"\t", b"\r\n", b"\r\n ", b"v=1", b"\x00",
              b"\x7f", b"\xc3\xa9", b"b=abc+/=", b"h=from:to"]
tag_text = st.lists(st.sampled_from(TAG_PIECES), max_size=40).map(b"".join)


@SETTINGS
@given(text=tag_text)
def test_tag_list_twin_equals_compiled(text: bytes) -> None:
    python = _parser_py.tag_list(text)
    if not PURE:
        got = compiled().tag_list(text)
        assert got == python
        assert got is None or list(got) == list(python or {})  # the list's order, too (§3.6.1: v= first)


def test_tag_list_takes_only_what_it_is_sure_of(impl: ModuleType) -> None:
    assert impl.tag_list(b" v = 1 ; b=\r\n ab ;") == {"v": "1", "b": "ab"}
    assert impl.tag_list(b"") == {}
    assert impl.tag_list(b"a=1;; b=2") is None  # an empty spec before the end
    assert impl.tag_list(b"a=1; a=2") is None  # twice: the careful parser names it
    assert impl.tag_list(b"a_b=1") is None and impl.tag_list(b"9a=1") is None
    assert impl.tag_list(b"a=\x01") is None and impl.tag_list("a=é".encode()) is None


HEADER_PIECES = [b" ", b"\t", b"\r", b"\n", b"\r\n", b"\r\n ", b"a", b"B", b"Z", b":", b"\x0b", b"\x0c", b"\xff", b"[",
                 b"@"]
header_field = st.lists(st.sampled_from(HEADER_PIECES), max_size=30).map(b"".join)


@SETTINGS
@given(fields=st.lists(header_field, max_size=6))
def test_relaxed_headers_twin_equals_compiled(fields: list[bytes]) -> None:
    python = _parser_py.relaxed_headers(fields)
    if not PURE:
        assert compiled().relaxed_headers(fields) == python


SECTION_PIECES = [b"From", b"x-y", b":", b" ", b"\t", b"a", b"\r\n", b"\r\n ", b"\r\n\t", b"\r", b"\n", b"\x7f",
                  b"\xff", b"@"]
section = st.lists(st.sampled_from(SECTION_PIECES), max_size=40).map(b"".join)


@SETTINGS
@given(text=section, cut=st.integers(0, 400))
def test_header_fields_twin_equals_compiled(text: bytes, cut: int) -> None:
    end = min(cut, len(text))
    python = _parser_py.header_fields(text, end)
    if python is not None:
        assert b"".join(raw for _, raw in python) == text[:end]  # every octet, in order, in one field
    if not PURE:
        assert compiled().header_fields(text, end) == python


def test_header_fields_edges(impl: ModuleType) -> None:
    section = b"From: a\r\nSubject: b\r\n\tc\r\nX-Obs : d\r\n"
    assert impl.header_fields(section + b"\r\nbody", len(section)) == [
        (b"From", b"From: a\r\n"), (b"Subject", b"Subject: b\r\n\tc\r\n"), (b"X-Obs", b"X-Obs : d\r\n")]
    assert impl.header_fields(b"From: a\r\n", 5) is None  # cut inside its line
    assert impl.header_fields(b"From: a\rb\r\n", 11) is None  # a bare CR
    assert impl.header_fields(b" x: a\r\n", 7) is None  # no name
    assert impl.header_fields(b"", 0) == []
    with pytest.raises(ValueError):
        impl.header_fields(b"ab", 3)


def test_relaxed_headers_takes_any_iterable(impl: ModuleType) -> None:
    fields = [b"From: a\r\n", b"To:  b \r\n"]
    assert impl.relaxed_headers(f for f in fields) == impl.relaxed_headers(fields) == b"from:a\r\nto:b\r\n"
