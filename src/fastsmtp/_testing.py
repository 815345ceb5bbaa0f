"""Test helpers shared by the test suite; internal, not part of the API.

Rules of this module:
- Every parser behaviour is checked three ways (h11's ``tr()``): fed whole,
  fed one octet at a time, and followed by trailing data that the reader must
  leave alone.  ``feed_every_way`` and ``lines_every_way`` do that and return
  the one answer all ways agree on.
- ``expected_data`` is the DATA contract written as plainly as possible, over
  a whole input at once; the readers must agree with it.  ``stuff`` is its
  inverse, the client's side: content as sent after DATA.
- Nothing in the server imports this module; helpers live here, not in the
  production parsers.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from ._parser_common import LineTooLong

__all__ = [
    "DataResult",
    "TOO_LONG",
    "chunked",
    "expected_data",
    "feed_every_way",
    "lines_every_way",
    "read_data",
    "read_lines",
    "stuff",
]

#: What a pipelining client may send after the end of data.
TRAILING = b"MAIL FROM:<next@example.org>\r\n.\r\n"

#: ``read_lines`` records a LineTooLong as this item.
TOO_LONG = "LineTooLong"


@dataclass(frozen=True)
class DataResult:
    content: bytes  # everything the feeds returned, joined
    consumed: int  # octets of the input the reader took (all, unless done)
    done: bool
    size: int
    oversize: bool
    bare_lf: bool
    bare_cr: bool
    pieces: tuple[bytes, ...] = ()  # what each feed returned


def chunked(data: bytes, sizes: Iterable[int]) -> list[bytes]:
    """Cut ``data`` into pieces of the given sizes, cycling through them."""
    sizes = [s for s in sizes if s > 0] or [len(data) or 1]
    out, i, k = [], 0, 0
    while i < len(data):
        out.append(data[i : i + sizes[k % len(sizes)]])
        i += sizes[k % len(sizes)]
        k += 1
    return out


def read_data(reader: Any, chunks: Iterable[bytes]) -> DataResult:
    """Feed ``chunks`` to a DataReader the way the session does."""
    pieces: list[bytes] = []
    consumed = 0
    for chunk in chunks:
        content, used = reader.feed(chunk)
        assert type(content) is bytes
        assert used == len(chunk) or (reader.done and 0 <= used <= len(chunk))
        pieces.append(content)
        consumed += used
    return DataResult(
        b"".join(pieces),
        consumed,
        reader.done,
        reader.size,
        reader.oversize,
        reader.bare_lf,
        reader.bare_cr,
        tuple(pieces),
    )


def _without_pieces(result: DataResult) -> DataResult:
    return dataclasses.replace(result, pieces=())


def feed_every_way(
    factory: Callable[[], Any], payload: bytes, trailing: bytes = TRAILING
) -> DataResult:
    """Feed ``payload`` whole, octet by octet and with trailing data.

    Asserts that all ways give the same answer, that trailing data after the
    end is left to the caller untouched, and returns the answer (``pieces``
    as from the whole feed).
    """
    whole = read_data(factory(), [payload])
    octets = [payload[i : i + 1] for i in range(len(payload))]
    assert _without_pieces(read_data(factory(), octets)) == _without_pieces(whole)
    if whole.done:
        ways = ([payload + trailing], octets + [trailing], [payload[:-1], payload[-1:] + trailing])
        for chunks in ways:
            reader = factory()
            result = read_data(reader, chunks)
            assert _without_pieces(result) == _without_pieces(whole)
            data = b"".join(chunks)
            assert data[result.consumed :] == payload[whole.consumed :] + trailing
            assert reader.feed(b"more") == (b"", 0)
    return whole


def read_lines(reader: Any, chunks: Iterable[bytes]) -> list[Any]:
    """Feed ``chunks`` to a LineReader, reading every line after each feed.

    Returns ``(line, bare)`` per line and ``TOO_LONG`` per LineTooLong.
    """
    out: list[Any] = []
    for chunk in chunks:
        reader.feed(chunk)
        while True:
            try:
                line = reader.readline()
            except LineTooLong:
                out.append(TOO_LONG)
                continue
            if line is None:
                break
            assert type(line) is bytes
            out.append((line, reader.bare))
    return out


def lines_every_way(factory: Callable[[], Any], payload: bytes) -> tuple[list[Any], bytes]:
    """Read ``payload`` whole and octet by octet; return (lines, leftover).

    When ``payload`` ends with CRLF, also check that trailing data stays in
    the buffer for ``take()``.
    """
    reader = factory()
    whole = read_lines(reader, [payload])
    rest = reader.take()
    reader = factory()
    assert read_lines(reader, [payload[i : i + 1] for i in range(len(payload))]) == whole
    assert reader.take() == rest
    if payload.endswith(b"\r\n"):
        reader = factory()
        assert read_lines(reader, [payload + b"RSET"]) == whole
        assert len(reader) == 4 and reader.take() == b"RSET"
    return whole, rest


def stuff(content: bytes) -> bytes:
    """Return ``content`` as a client sends it after DATA (RFC 5321 §4.5.2).

    Every line that starts with '.' gets one more '.', and the terminator
    ``.<CRLF>`` is appended.  Non-empty content that does not end with CRLF
    gets a CRLF first, as clients do, so the result then decodes to
    ``content + b"\\r\\n"``.  Only CRLF ends a line here, exactly as in the
    readers: a '.' after a bare LF is not stuffed.
    """
    if content and not content.endswith(b"\r\n"):
        content += b"\r\n"
    out = content.replace(b"\r\n.", b"\r\n..")
    if out.startswith(b"."):
        out = b"." + out
    return out + b".\r\n"


_STUFFING = re.compile(rb"(\A|\r\n)\.")
_BARE_LF = re.compile(rb"(?<!\r)\n")
_BARE_CR = re.compile(rb"\r(?!\n)")
_ANY_BREAK = re.compile(rb"\r\n|\r|\n")


def expected_data(data: bytes, max_size: int, normalize: bool = False) -> DataResult | None:
    """The DATA contract over a whole input; None if the data does not end.

    RFC 5321 §4.1.1.4: the data ends at the first <CRLF>.<CRLF> (or at
    .<CRLF> at the very start); the CRLF is content.  §4.5.2: a dot after
    each real CRLF (or at the start) is removed.
    """
    if data.startswith(b".\r\n"):
        raw, consumed = b"", 3
    else:
        end = data.find(b"\r\n.\r\n")
        if end < 0:
            return None
        raw, consumed = data[: end + 2], end + 5
    content = _STUFFING.sub(rb"\1", raw)
    bare_lf = _BARE_LF.search(content) is not None
    bare_cr = _BARE_CR.search(content) is not None
    if normalize:
        content = _ANY_BREAK.sub(b"\r\n", content)
    size = len(content)
    return DataResult(content[:max_size], consumed, True, size, size > max_size, bare_lf, bare_cr)
