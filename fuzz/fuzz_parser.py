"""Fuzz the compiled parser against its pure-Python twin.

    python fuzz/fuzz_parser.py /tmp/corpus-parser fuzz/corpus -max_total_time=3600

(atheris: coverage-guided; new inputs go into the first folder.  Without
atheris, or with ``--plain``, the same ``check`` runs under fuzz/_plain.py.)

The compiled extension carries no coverage instrumentation (gcc here has no
``-fsanitize=fuzzer``), so the guidance comes from the twin, which follows
the same states, and from this harness.  The two must agree on every call,
for the same input and the same cuts:

- ``LineReader``: each ``readline()`` result (line and ``bare``, or
  ``LineTooLong``), ``len()``, and what ``take()`` returns, with ``take()``
  called at random points as the session does on DATA, BDAT and STARTTLS;
- ``DataReader``: each ``feed()`` result (content, octets consumed) and
  ``done``, ``size``, ``oversize``, ``bare_lf``, ``bare_cr`` after it, with
  ``reset()`` at random points and feeds continuing after the end;
- and, when nothing was reset, the DataReader agrees with
  ``fastsmtp._testing.expected_data``, the contract over a whole input.

Nothing but ``LineTooLong`` from ``readline()`` may be raised.  Pieces are
passed as bytes, bytearray or memoryview, since both accept any buffer.

Input layout: octet 0 picks the reader and its options, octet 1 the limit,
octet 2 seeds the cuts and the random calls; the rest is the input.
"""

from __future__ import annotations

import os
import random
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _plain  # noqa: E402

try:
    import atheris
except ImportError:
    atheris = None

if atheris is not None and __name__ == "__main__" and "--plain" not in sys.argv:
    with atheris.instrument_imports(include=["fastsmtp"]):
        from fastsmtp import _parser_py as twin
        from fastsmtp._testing import expected_data
else:
    from fastsmtp import _parser_py as twin
    from fastsmtp._testing import expected_data

from fastsmtp import _parser as compiled  # noqa: E402 (never instrumented: C)
from fastsmtp._parser_common import LineTooLong  # noqa: E402

__all__ = ["check"]

BIG = 1 << 40


class Mismatch(AssertionError):
    """The compiled parser and the twin answered differently."""


def _cuts(payload: bytes, rng: random.Random) -> list[Any]:
    out: list[Any] = []
    i = 0
    while i < len(payload):
        n = rng.choice((1, 1, 2, 3, 4, 7, 16, 100))
        piece = payload[i : i + n]
        kind = rng.randrange(4)
        out.append(bytearray(piece) if kind == 1 else memoryview(piece) if kind == 2 else piece)
        i += n
    return out


def _lines(reader: Any) -> list[object]:
    got: list[object] = []
    while True:
        try:
            line = reader.readline()
        except LineTooLong:  # one class for both implementations
            got.append("LineTooLong")
            continue
        if line is None:
            return got
        if type(line) is not bytes:
            raise Mismatch(f"readline() returned {type(line).__name__}")
        got.append((line, reader.bare))


def check_lines(max_length: int, pieces: list[Any], rng: random.Random) -> None:
    readers = compiled.LineReader(max_length), twin.LineReader(max_length)
    for piece in pieces:
        for r in readers:
            r.feed(piece)
        got = [_lines(r) for r in readers]
        if got[0] != got[1]:
            raise Mismatch(f"readline: compiled {got[0]!r}, twin {got[1]!r}")
        if len(readers[0]) != len(readers[1]):
            raise Mismatch(f"len: compiled {len(readers[0])}, twin {len(readers[1])}")
        if rng.random() < 0.1:
            taken = [r.take() for r in readers]
            if taken[0] != taken[1] or type(taken[0]) is not bytes:
                raise Mismatch(f"take: compiled {taken[0]!r}, twin {taken[1]!r}")
    taken = [r.take() for r in readers]
    if taken[0] != taken[1]:
        raise Mismatch(f"final take: compiled {taken[0]!r}, twin {taken[1]!r}")


def _state(reader: Any) -> tuple[object, ...]:
    return reader.done, reader.size, reader.oversize, reader.bare_lf, reader.bare_cr


def check_data(max_size: int, normalize: bool, payload: bytes, pieces: list[Any], rng: random.Random) -> None:
    readers = compiled.DataReader(max_size, normalize), twin.DataReader(max_size, normalize)
    content = bytearray()
    consumed = 0
    was_reset = False
    for piece in pieces:
        got = [(r.feed(piece), _state(r)) for r in readers]
        if got[0] != got[1]:
            raise Mismatch(f"feed({bytes(piece)!r}): compiled {got[0]!r}, twin {got[1]!r}")
        (out, used), _ = got[0]
        if type(out) is not bytes or not 0 <= used <= len(piece):
            raise Mismatch(f"feed returned {(out, used)!r} for {len(piece)} octets")
        content += out
        consumed += used
        if rng.random() < 0.05:
            for r in readers:
                r.reset()
            was_reset = True
    if was_reset:
        return
    expected = expected_data(payload, max_size, normalize)
    if expected is None:
        if readers[0].done:
            raise Mismatch("done, but the input holds no end of data")
        return
    result = (bytes(content), consumed) + _state(readers[0])
    want = (expected.content, expected.consumed, expected.done, expected.size,
            expected.oversize, expected.bare_lf, expected.bare_cr)
    if result != want:
        raise Mismatch(f"against the contract: got {result!r}, want {want!r}")


def check(data: bytes) -> None:
    """The fuzz target: raises on any disagreement, returns otherwise."""
    if len(data) < 3:
        return
    flags, limit, seed, payload = data[0], data[1], data[2], data[3:]
    rng = random.Random(seed)
    pieces = _cuts(payload, rng)
    if flags & 1:
        max_size = BIG if limit == 255 else limit * 3
        check_data(max_size, bool(flags & 2), payload, pieces, rng)
    else:
        check_lines(1024 if limit == 255 else 2 + limit, pieces, rng)


def TestOneInput(data: bytes) -> None:  # noqa: N802 (atheris' name)
    check(data)


if __name__ == "__main__":
    args = [a for a in sys.argv if a != "--plain"]
    if atheris is None or "--plain" in sys.argv:
        _plain.main(check, args[1:])
    else:
        atheris.Setup(args, TestOneInput)
        atheris.Fuzz()
