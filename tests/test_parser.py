"""Examples for every rule of the parser, run on both implementations.

Each DATA example goes through ``feed_every_way`` (whole, octet by octet, and
with pipelined data after the end), and is checked against ``expected_data``,
the contract written over whole inputs.  The compiled module is required:
only FASTSMTP_PUREPYTHON=1 excuses its absence.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from dataclasses import replace
from types import ModuleType

import pytest

from fastsmtp import _parser_common, _parser_py, parser
from fastsmtp._testing import (
    TOO_LONG,
    DataResult,
    expected_data,
    feed_every_way,
    lines_every_way,
    read_data,
    read_lines,
    stuff,
)

PURE = os.environ.get("FASTSMTP_PUREPYTHON", "") not in ("", "0")
BIG = 1 << 40


@pytest.fixture(params=["cython", "python"])
def impl(request: pytest.FixtureRequest) -> ModuleType:
    if request.param == "python":
        return _parser_py
    if PURE:
        pytest.skip("FASTSMTP_PUREPYTHON=1: the compiled parser is not required")
    return importlib.import_module("fastsmtp._parser")


def data(
    impl: ModuleType, payload: bytes, max_size: int = BIG, normalize: bool = False
) -> DataResult:
    """Every way of feeding gives one answer, and it is the contract's."""
    result = feed_every_way(lambda: impl.DataReader(max_size, normalize), payload)
    expected = expected_data(payload, max_size, normalize)
    if expected is not None:
        assert replace(result, pieces=()) == expected
    else:
        assert not result.done and result.consumed == len(payload)
    return result


# -- selector ---------------------------------------------------------------


def test_selector_picks_the_implementation() -> None:
    if PURE:
        assert parser.IMPLEMENTATION == "python"
        assert parser.DataReader.__module__ == parser.LineReader.__module__ == "fastsmtp._parser_py"
    else:
        compiled = importlib.import_module("fastsmtp._parser")
        assert parser.IMPLEMENTATION == "cython"
        assert parser.DataReader is compiled.DataReader
        assert parser.LineReader is compiled.LineReader
        assert parser.LineTooLong is compiled.LineTooLong


@pytest.mark.parametrize(
    "env, compiled_missing, expected",
    [("1", False, "python"), ("1", True, "python"), ("0", True, "python"), ("0", False, "cython")],
)
def test_selector_falls_back(env: str, compiled_missing: bool, expected: str) -> None:
    if expected == "cython" and PURE:
        pytest.skip("FASTSMTP_PUREPYTHON=1: the compiled parser is not required")
    hide = "sys.modules['fastsmtp._parser'] = None; " if compiled_missing else ""
    code = f"import sys; {hide}from fastsmtp import parser; print(parser.IMPLEMENTATION)"
    environ = {**os.environ, "FASTSMTP_PUREPYTHON": env, "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, timeout=60)
    assert run.stdout.decode().strip() == expected, run.stderr.decode()


def test_line_too_long_is_a_value_error(impl: ModuleType) -> None:
    assert issubclass(impl.LineTooLong, ValueError)


def test_one_line_too_long_for_both_implementations(impl: ModuleType) -> None:
    # One class, whichever reader raised it: ``except LineTooLong`` in the
    # session catches both (_parser_common.py).
    assert impl.LineTooLong is parser.LineTooLong is _parser_common.LineTooLong
    reader = impl.LineReader(4)
    reader.feed(b"NOOP\r\n")
    with pytest.raises(_parser_common.LineTooLong):
        reader.readline()


# -- DataReader: the end of data (RFC 5321 §4.1.1.4) ------------------------


def test_dot_alone_is_an_empty_message(impl: ModuleType) -> None:
    r = data(impl, b".\r\n")
    assert (r.content, r.consumed, r.done, r.size) == (b"", 3, True, 0)


def test_crlf_before_the_dot_is_content(impl: ModuleType) -> None:
    r = data(impl, b"Hello\r\n.\r\n")
    assert (r.content, r.consumed, r.size) == (b"Hello\r\n", 10, 7)
    assert not (r.bare_lf or r.bare_cr or r.oversize)


def test_empty_line_then_end(impl: ModuleType) -> None:
    assert data(impl, b"\r\n.\r\n").content == b"\r\n"


def test_first_terminator_wins(impl: ModuleType) -> None:
    r = data(impl, b"a\r\n.\r\nb\r\n.\r\n")
    assert (r.content, r.consumed) == (b"a\r\n", 6)


def test_no_terminator_consumes_everything(impl: ModuleType) -> None:
    r = data(impl, b"Subject: x\r\n\r\nbody\r\n")
    assert (r.content, r.consumed, r.done) == (b"Subject: x\r\n\r\nbody\r\n", 20, False)


# Spellings of an end that are not <CRLF>.<CRLF>: all content (SMTP
# smuggling, CVE-2023-51764), mapped to what they are as content.
SMUGGLING = [
    (b"\n.\n", b"\n.\n", "lf"),
    (b"\n.\r\n", b"\n.\r\n", "lf"),
    (b"\r\n.\n", b"\r\n\n", "lf"),  # a real line start: the dot is stuffing
    (b"\r.\r", b"\r.\r", "cr"),
    (b"\r.\r\n", b"\r.\r\n", "cr"),
    (b"\r\n.\r", b"\r\n\r", "cr"),
    (b"\r\n.\r\r\n", b"\r\n\r\r\n", "cr"),
    (b"\r\r\n.\r\r\n", b"\r\r\n\r\r\n", "cr"),  # '.' starts a line; ".\r\r\n" is not ".\r\n"
    (b"\r\n\x00.\r\n", b"\r\n\x00.\r\n", ""),
    (b"\r\n.\x00\r\n", b"\r\n\x00\r\n", ""),
    (b"\n.\r", b"\n.\r", "lf cr"),
    (b"\r\n \r\n", b"\r\n \r\n", ""),
]


@pytest.mark.parametrize("fake, content, bare", SMUGGLING, ids=[repr(s[0]) for s in SMUGGLING])
def test_smuggled_terminators_are_content(
    impl: ModuleType, fake: bytes, content: bytes, bare: str
) -> None:
    payload = b"Subject: hi" + fake + b"MAIL FROM:<evil@example.org>\r\n.\r\n"
    r = data(impl, payload)
    assert r.done and r.consumed == len(payload)
    assert r.content == b"Subject: hi" + content + b"MAIL FROM:<evil@example.org>\r\n"
    assert (r.bare_lf, r.bare_cr) == ("lf" in bare, "cr" in bare)


@pytest.mark.parametrize("fake", [s[0] for s in SMUGGLING], ids=[repr(s[0]) for s in SMUGGLING])
def test_smuggled_terminators_at_the_start(impl: ModuleType, fake: bytes) -> None:
    # The reader starts at a line start: the fake end comes right after DATA.
    payload = (fake[2:] if fake.startswith(b"\r\n") else fake) + b"x\r\n.\r\n"
    r = data(impl, payload)
    assert r.consumed == len(payload)


@pytest.mark.parametrize("fake", [s[0] for s in SMUGGLING], ids=[repr(s[0]) for s in SMUGGLING])
def test_normalizing_never_moves_the_end(impl: ModuleType, fake: bytes) -> None:
    payload = b"Subject: hi" + fake + b"RCPT TO:<x@example.org>\r\n.\r\n"
    r = data(impl, payload, normalize=True)
    assert r.consumed == len(payload)


# -- DataReader: dot-stuffing (RFC 5321 §4.5.2) -----------------------------


@pytest.mark.parametrize(
    "payload, content",
    [
        (b"..x\r\n.\r\n", b".x\r\n"),
        (b".x\r\n.\r\n", b"x\r\n"),
        (b"a\r\n..\r\n.\r\n", b"a\r\n.\r\n"),
        (b"a\r\n...\r\n.\r\n", b"a\r\n..\r\n"),
        (b"..\r\n.\r\n", b".\r\n"),
        (b"a.b\r\n.c\r\n.\r\n", b"a.b\r\nc\r\n"),
        (b"a\n.b\r\n.\r\n", b"a\n.b\r\n"),  # no line start after a bare LF
        (b"a\r.b\r\n.\r\n", b"a\r.b\r\n"),  # ... nor after a bare CR
    ],
)
def test_unstuffing(impl: ModuleType, payload: bytes, content: bytes) -> None:
    r = data(impl, payload)
    assert r.content == content and r.size == len(content)


def test_dot_then_bare_lf(impl: ModuleType) -> None:
    r = data(impl, b"a\r\n.\nb\r\n.\r\n")
    assert r.content == b"a\r\n\nb\r\n" and r.bare_lf and not r.bare_cr


def test_dot_then_bare_cr(impl: ModuleType) -> None:
    r = data(impl, b"a\r\n.\rx\r\n.\r\n")
    assert r.content == b"a\r\n\rx\r\n" and r.bare_cr and not r.bare_lf


def test_dot_then_crcr_lf(impl: ModuleType) -> None:
    r = data(impl, b".\r\r\n.\r\n")
    assert r.content == b"\r\r\n" and r.bare_cr


# -- DataReader: bare line ends and normalize --------------------------------


@pytest.mark.parametrize(
    "payload, content, normalized, bare_lf, bare_cr",
    [
        (b"a\nb\r\n.\r\n", b"a\nb\r\n", b"a\r\nb\r\n", True, False),
        (b"a\rb\r\n.\r\n", b"a\rb\r\n", b"a\r\nb\r\n", False, True),
        (b"a\r\r\n.\r\n", b"a\r\r\n", b"a\r\n\r\n", False, True),
        (b"\n\n\r\n.\r\n", b"\n\n\r\n", b"\r\n\r\n\r\n", True, False),
        (b"\r\r\r\n.\r\n", b"\r\r\r\n", b"\r\n\r\n\r\n", False, True),
        (b"a\n\rb\r\n.\r\n", b"a\n\rb\r\n", b"a\r\n\r\nb\r\n", True, True),
        (b"clean\r\n.\r\n", b"clean\r\n", b"clean\r\n", False, False),
    ],
)
def test_bare_flags_and_normalize(
    impl: ModuleType,
    payload: bytes,
    content: bytes,
    normalized: bytes,
    bare_lf: bool,
    bare_cr: bool,
) -> None:
    r = data(impl, payload)
    assert (r.content, r.bare_lf, r.bare_cr) == (content, bare_lf, bare_cr)
    n = data(impl, payload, normalize=True)
    assert (n.content, n.bare_lf, n.bare_cr) == (normalized, bare_lf, bare_cr)
    assert n.size == len(normalized) and n.consumed == r.consumed


def test_normalized_breaks_are_not_line_starts(impl: ModuleType) -> None:
    # "a<LF>..<CRLF>": both dots stay (the LF is no line start), though the
    # output has <CRLF>.. once the LF is normalized.
    r = data(impl, b"a\n..\r\n.\r\n", normalize=True)
    assert r.content == b"a\r\n..\r\n"
    r = data(impl, b"a\n.\r\nb\r\n.\r\n", normalize=True)
    assert r.content == b"a\r\n.\r\nb\r\n" and r.consumed == 11


# -- DataReader: chunking and hold-back --------------------------------------


def test_terminator_split_at_every_position(impl: ModuleType) -> None:
    payload = b"ab\r\n..c\r\n.\r\nNEXT"
    whole = read_data(impl.DataReader(BIG), [payload])
    for i in range(len(payload) + 1):
        for j in range(i, len(payload) + 1):
            r = read_data(impl.DataReader(BIG), [payload[:i], payload[i:j], payload[j:]])
            assert (r.content, r.consumed, r.done) == (whole.content, whole.consumed, True)


@pytest.mark.parametrize(
    "feeds, pieces",
    [
        # Only the CR of <CRLF>.<CR> is held back; the dot is never content.
        ([b"a\r\n.\r", b"x\r\n.\r\n"], [b"a\r\n", b"\rx\r\n"]),
        ([b"a\r\n.", b"\r", b"\n"], [b"a\r\n", b"", b""]),
        ([b"a\r\n.", b"\r", b"\r\n.\r\n"], [b"a\r\n", b"", b"\r\r\n"]),
        ([b"a\r\n.", b"\rx\r\n.\r\n"], [b"a\r\n", b"\rx\r\n"]),
        # A mid-line CR is content whatever follows: it goes out at once.
        ([b"a\r", b"\n.\r\n"], [b"a\r", b"\n"]),
        ([b"a\r", b"b\r\n.\r\n"], [b"a\r", b"b\r\n"]),
        ([b"a\r\n", b".", b"x\r\n.\r\n"], [b"a\r\n", b"", b"x\r\n"]),
    ],
)
def test_per_feed_output(impl: ModuleType, feeds: list[bytes], pieces: list[bytes]) -> None:
    assert list(read_data(impl.DataReader(BIG), feeds).pieces) == pieces


def test_normalize_across_feeds(impl: ModuleType) -> None:
    r = read_data(impl.DataReader(BIG, True), [b"a\r", b"b\r", b"\n.\r", b"x\r\n.\r\n"])
    assert list(r.pieces) == [b"a\r", b"\nb\r", b"\n", b"\r\nx\r\n"]
    assert r.bare_cr and not r.bare_lf and r.done


def test_feed_after_done_and_empty_feeds(impl: ModuleType) -> None:
    reader = impl.DataReader(BIG)
    assert reader.feed(b"") == (b"", 0)
    assert reader.feed(b"x\r\n.\r\nQUIT\r\n") == (b"x\r\n", 6)
    assert reader.feed(b"QUIT\r\n") == (b"", 0)
    assert reader.feed(b"") == (b"", 0)


def test_any_buffer(impl: ModuleType) -> None:
    payload = b"..a\r\n.\r\nQUIT\r\n"
    for buf in (payload, bytearray(payload), memoryview(payload), memoryview(b"XX" + payload)[2:]):
        reader = impl.DataReader(BIG)
        assert reader.feed(buf) == (b".a\r\n", 8)
    for wrong in ("text", 5, None):
        with pytest.raises(TypeError):
            impl.DataReader(BIG).feed(wrong)
        with pytest.raises(TypeError):
            impl.LineReader().feed(wrong)


def test_reset_reuses_the_reader(impl: ModuleType) -> None:
    reader = impl.DataReader(4)
    assert reader.feed(b"a\nbcdef\r\n.\r") == (b"a\nbc", 11)
    assert reader.bare_lf and reader.oversize and not reader.done
    reader.reset()
    assert (reader.done, reader.size, reader.oversize, reader.bare_lf, reader.bare_cr) == (
        False,
        0,
        False,
        False,
        False,
    )
    assert reader.feed(b"\nab\r\n.\r\n") == (b"\nab\r", 8)  # a fresh line start: ".\r" is gone
    assert reader.bare_lf and reader.oversize and reader.size == 5 and reader.done


def test_attributes_are_read_only(impl: ModuleType) -> None:
    reader = impl.DataReader(BIG)
    for name in ("done", "size", "oversize", "bare_lf", "bare_cr"):
        if impl is _parser_py:
            continue  # plain attributes in the twin, by design of the oracle
        with pytest.raises(AttributeError):
            setattr(reader, name, 1)
    with pytest.raises(AttributeError):
        impl.LineReader().bare = 1


def test_bad_limits(impl: ModuleType) -> None:
    with pytest.raises(ValueError):
        impl.DataReader(-1)
    with pytest.raises(ValueError):
        impl.LineReader(1)


# -- DataReader: size limit --------------------------------------------------


@pytest.mark.parametrize("max_size", [0, 1, 5, 6, 7, 12, 13])
def test_oversize_is_counted_and_dropped(impl: ModuleType, max_size: int) -> None:
    payload = b"hello\r\n..world\r\n.\r\nQUIT\r\n"
    r = data(impl, payload, max_size)
    full = b"hello\r\n.world\r\n"
    assert r.size == len(full) == 15 and r.done and r.consumed == 19
    assert r.content == full[:max_size]
    assert r.oversize == (max_size < 15)


def test_exactly_max_size_is_not_oversize(impl: ModuleType) -> None:
    r = data(impl, b"abc\r\n.\r\n", 5)
    assert (r.content, r.size, r.oversize) == (b"abc\r\n", 5, False)


def test_oversize_counts_normalized_octets(impl: ModuleType) -> None:
    r = data(impl, b"a\nb\n\r\n.\r\n", 4, normalize=True)
    assert (r.content, r.size, r.oversize) == (b"a\r\nb", 8, True)


def test_oversize_keeps_memory_bounded(impl: ModuleType) -> None:
    reader = impl.DataReader(1000)
    chunk = b"x" * 76 + b"\r\n"
    total = 0
    for _ in range(2000):
        content, used = reader.feed(chunk * 10)
        total += len(content)
        assert used == 780
    assert total == 1000 and reader.oversize and reader.size == 2000 * 780
    assert reader.feed(b".\r\n") == (b"", 3) and reader.done


# -- stuff() -------------------------------------------------------------------


@pytest.mark.parametrize(
    "content, wire",
    [
        (b"", b".\r\n"),
        (b"a\r\n", b"a\r\n.\r\n"),
        (b"a", b"a\r\n.\r\n"),
        (b".a\r\n..b\r\n", b"..a\r\n...b\r\n.\r\n"),
        (b".\r\n.\r\n", b"..\r\n..\r\n.\r\n"),
        (b"a\n.b\r\n", b"a\n.b\r\n.\r\n"),
    ],
)
def test_stuff(impl: ModuleType, content: bytes, wire: bytes) -> None:
    assert stuff(content) == wire
    r = data(impl, wire)
    ending = b"" if not content or content.endswith(b"\r\n") else b"\r\n"
    assert r.content == content + ending and r.consumed == len(wire)


# -- LineReader --------------------------------------------------------------


def lines(impl: ModuleType, payload: bytes, max_length: int = 1024) -> tuple[list[object], bytes]:
    return lines_every_way(lambda: impl.LineReader(max_length), payload)


def test_crlf_splits_lines(impl: ModuleType) -> None:
    got, rest = lines(impl, b"EHLO client.example\r\nMAIL FROM:<a@b.example>\r\n\r\nNOOP")
    assert got == [(b"EHLO client.example", 0), (b"MAIL FROM:<a@b.example>", 0), (b"", 0)]
    assert rest == b"NOOP"


@pytest.mark.parametrize(
    "payload, line, bare",
    [
        (b"a\nb\r\n", b"a\nb", 1),
        (b"a\rb\r\n", b"a\rb", 2),
        (b"a\r\r\n", b"a\r", 2),
        (b"\n\r\r\n", b"\n\r", 3),
        (b"\n\r\n", b"\n", 1),
        (b"ok\r\n", b"ok", 0),
    ],
)
def test_bare_line_ends_are_content(
    impl: ModuleType, payload: bytes, line: bytes, bare: int
) -> None:
    assert lines(impl, payload) == ([(line, bare)], b"")


def test_cr_at_buffer_end_is_not_yet_bare(impl: ModuleType) -> None:
    reader = impl.LineReader()
    reader.feed(b"NOOP\r")
    assert reader.readline() is None and len(reader) == 5
    reader.feed(b"\n")
    assert reader.readline() == b"NOOP" and reader.bare == 0 and len(reader) == 0


def test_line_at_the_limit(impl: ModuleType) -> None:
    assert lines(impl, b"01234567\r\n", 10) == ([(b"01234567", 0)], b"")
    assert lines(impl, b"012345678\r\nNOOP\r\n", 10) == ([TOO_LONG, (b"NOOP", 0)], b"")


def test_overlong_partial_line_is_discarded_to_its_crlf(impl: ModuleType) -> None:
    payload = b"HELO a\r\n" + b"x" * 30 + b"\r\r\nQUIT\r\n"
    assert lines(impl, payload, 10) == ([(b"HELO a", 0), TOO_LONG, (b"QUIT", 0)], b"")
    reader = impl.LineReader(10)
    reader.feed(b"x" * 11)
    with pytest.raises(impl.LineTooLong):
        reader.readline()
    assert len(reader) == 0
    for junk in (b"yyy\n", b"zzz\r", b"\r", b"x"):  # none of these ends the line
        reader.feed(junk)
        assert reader.readline() is None and len(reader) == 0
    reader.feed(b"\r")
    reader.feed(b"")  # keeps the CR in mind
    reader.feed(b"\nNOOP\r\n")
    assert reader.readline() == b"NOOP"


def test_ten_megabyte_line_keeps_memory_bounded(impl: ModuleType) -> None:
    reader = impl.LineReader(1024)
    chunk = b"A" * 65536
    raised = 0
    for _ in range(160):
        reader.feed(chunk)
        try:
            assert reader.readline() is None
        except impl.LineTooLong:
            raised += 1
        assert len(reader) <= 1024
    assert raised == 1
    reader.feed(b"A\r\nNOOP\r\n")
    assert reader.readline() == b"NOOP" and reader.readline() is None


def test_take(impl: ModuleType) -> None:
    reader = impl.LineReader()
    reader.feed(b"DATA\r\nSubject: x\r\n\r\nbody")
    assert reader.readline() == b"DATA"
    assert len(reader) == 18
    assert reader.take() == b"Subject: x\r\n\r\nbody"
    assert len(reader) == 0 and reader.take() == b"" and reader.readline() is None


def test_take_clears_the_discard_state(impl: ModuleType) -> None:
    reader = impl.LineReader(10)
    reader.feed(b"STARTTLS\r\n" + b"x" * 20)
    assert reader.readline() == b"STARTTLS"
    with pytest.raises(impl.LineTooLong):
        reader.readline()
    assert reader.take() == b""
    reader.feed(b"EHLO a\r\n")
    assert reader.readline() == b"EHLO a"


def test_any_buffer_for_lines(impl: ModuleType) -> None:
    reader = impl.LineReader()
    for buf in (b"A\r", bytearray(b"\nB"), memoryview(b"xx\r\n")[:-1]):
        reader.feed(buf)
    assert reader.readline() == b"A" and reader.take() == b"Bxx\r"


def test_byte_at_a_time_is_linear(impl: ModuleType) -> None:
    # 200 000 feeds of one octet, each followed by a readline, on a line that
    # never ends: with a search that restarts from the beginning this is
    # 2e10 octet compares; resuming where it stopped it is 2e5.
    n = 200_000
    reader = impl.LineReader(1 << 20)
    feed, readline = reader.feed, reader.readline
    for _ in range(n):
        feed(b"x")
        assert readline() is None
    feed(b"\r")
    assert readline() is None
    feed(b"\n")
    assert readline() == b"x" * n
    if impl.DEBUG:
        assert reader._debug_scanned <= 2 * n + 2
