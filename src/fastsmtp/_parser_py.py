"""The SMTP parser in plain Python: the fallback and the oracle.

Rules of this module:
- Same API and the same answers as the compiled ``_parser`` for every input
  and every way of cutting it into feeds, down to which octets each feed
  returns.  The differential tests hold the two to that.
- It is written to be read: one line per loop turn, ``bytes.find`` for the
  searching, no cleverness.  Speed is the compiled module's job.

The contract (both implementations)
-----------------------------------
``LineReader`` splits command lines at CRLF and only at CRLF (RFC 5321
§2.3.8): a bare LF or bare CR is content, and ``bare`` reports it (1 = a bare
LF, 2 = a bare CR) for the line just returned.  A line longer than
``max_length`` (CRLF included; RFC 5321 §4.5.3.1.4 gives 512 for commands and
the caller adds an allowance for extensions) raises ``LineTooLong`` once.  If
its CRLF has not arrived yet, everything up to and including that CRLF is then
dropped as it comes in, never buffered, so memory stays bounded by
``max_length`` plus one feed.  The search for CRLF resumes where it stopped,
so input arriving one octet at a time costs O(n) in all (h11's
``ReceiveBuffer``).

``DataReader`` reads what follows the 354 reply to DATA:

- The end of data is ``<CRLF>.<CRLF>`` (RFC 5321 §4.1.1.4) and nothing else.
  The reader starts at a line start, because the CRLF that ended the DATA
  command counts, so ``.<CRLF>`` alone is an empty message.  A line start is
  the start of data or the octet after a real CRLF; a bare LF or bare CR does
  not start a line.  So ``<LF>.<LF>``, ``<CR>.<CR>``, ``<CRLF>.<LF>``,
  ``<CRLF>.<CR><CRLF>`` and the like are content (SMTP smuggling,
  CVE-2023-51764).
- The CRLF in front of the terminating dot is content: ``Hello<CRLF>.<CRLF>``
  is the message ``Hello<CRLF>``.
- A dot at line start that is not the terminator is stuffing and is removed
  (RFC 5321 §4.5.2): ``..x`` -> ``.x``, ``.x`` -> ``x``.
- ``bare_lf`` / ``bare_cr`` report an LF not preceded by CR and a CR not
  followed by LF in the content.  With ``normalize`` each of them is stored as
  CRLF (Postfix 3.9's ``smtpd_forbid_bare_newline = normalize``).  This never
  moves the end of data, and a normalized line break is no line start for dot
  handling: ``a<LF>.<CRLF>`` is ``a<CRLF>.<CRLF>`` in the output, not an end.
- ``size`` counts content octets (after unstuffing and normalizing).  The
  first ``max_size`` octets are returned; past that ``oversize`` is set and
  the rest is counted but dropped, while the scan for the end goes on (RFC
  1870 §6.3: the 552 comes after the end of data).

Octets are emitted as soon as they are known to be content, with one
exception: after ``<CRLF>.<CR>`` at the end of a feed, that CR is held back
until the next octet shows whether it ends the data.  A dot at line start is
never content, and a mid-line CR at the end of a feed is emitted at once (it
is content whatever follows; only its flag, and with ``normalize`` its added
LF, wait for the next octet).
"""

from __future__ import annotations

import re
from typing import Sequence

from ._parser_common import LineTooLong  # the one class, shared with _parser

__all__ = ["LineTooLong", "LineReader", "DataReader", "relaxed_wsp", "tag_list", "relaxed_headers", "header_fields", "DEBUG"]

#: The pure-Python twin has no debug counters.
DEBUG = False

_CR, _LF, _DOT = 13, 10, 46

# Where the DATA scanner stands between feeds (_parser.pxd: DataState).
_LINE_START = 0  # at the start of data or right after a real CRLF
_MID = 1  # inside a line; the previous octet is not a pending CR
_CR_SEEN = 2  # inside a line; the last octet was a CR (already emitted)
_DOT_SEEN = 3  # a '.' at line start (never emitted: end or unstuffed)
_DOT_CR = 4  # '.' CR at line start; the CR is held back


def _as_bytes(data: bytes | bytearray | memoryview) -> bytes:
    # Any buffer, as the compiled module takes; unlike bytes(), never an int.
    return data if type(data) is bytes else memoryview(data).tobytes()


class LineReader:
    """Split input at CRLF, and only at CRLF (RFC 5321 §2.3.8)."""

    __slots__ = ("_buf", "_scan", "_max", "_discarding", "_discard_cr", "_bare")

    def __init__(self, max_length: int = 1024) -> None:
        if max_length < 2:
            raise ValueError("max_length must leave room for the CRLF")
        self._max = max_length
        self._buf = bytearray()
        self._scan = 0  # where the CRLF search resumes
        self._discarding = False  # dropping an overlong line up to its CRLF
        self._discard_cr = False  # ... and the last dropped octet was a CR
        self._bare = 0

    @property
    def bare(self) -> int:
        """Bit 1: the last line had a bare LF; bit 2: it had a bare CR."""
        return self._bare

    def __len__(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        data = _as_bytes(data)
        if self._discarding:
            if not data:
                return
            if self._discard_cr and data[0] == _LF:
                end = 1
            else:
                i = data.find(b"\r\n")
                if i < 0:
                    self._discard_cr = data[-1] == _CR
                    return
                end = i + 2
            self._discarding = self._discard_cr = False
            data = data[end:]
        self._buf += data

    def readline(self) -> bytes | None:
        buf = self._buf
        i = buf.find(b"\r\n", self._scan)
        if i < 0:
            if len(buf) > self._max:
                # Drop what we hold and, in feed(), the rest of the line up
                # to its CRLF: memory stays bounded however long the line is.
                self._discard_cr = buf[-1] == _CR
                self._discarding = True
                self._clear()
                raise LineTooLong(f"line of more than {self._max} octets")
            # A CR at the end may be the first half of a CRLF: look again.
            self._scan = max(len(buf) - 1, 0)
            return None
        line = bytes(buf[:i])
        del buf[: i + 2]
        self._scan = 0
        if i + 2 > self._max:
            raise LineTooLong(f"line of {i + 2} octets, limit {self._max}")
        self._bare = (1 if b"\n" in line else 0) | (2 if b"\r" in line else 0)
        return line

    def take(self) -> bytes:
        rest = bytes(self._buf)
        self._clear()
        self._discarding = self._discard_cr = False
        return rest

    def _clear(self) -> None:
        self._buf = bytearray()
        self._scan = 0


class DataReader:
    """Find the end of DATA (RFC 5321 §4.1.1.4) and undo dot-stuffing (§4.5.2)."""

    __slots__ = (
        "_max_size",
        "_normalize",
        "_state",
        "_out",
        "done",
        "size",
        "oversize",
        "bare_lf",
        "bare_cr",
    )

    def __init__(self, max_size: int, normalize: bool = False) -> None:
        if max_size < 0:
            raise ValueError("max_size must not be negative")
        self._max_size = max_size
        self._normalize = bool(normalize)
        self._out: list[bytes] = []
        self.reset()

    def reset(self) -> None:
        self.done = False
        self.size = 0
        self.oversize = False
        self.bare_lf = False
        self.bare_cr = False
        self._state = _LINE_START

    def feed(self, data: bytes | bytearray | memoryview) -> tuple[bytes, int]:
        if self.done:
            return b"", 0
        data = _as_bytes(data)
        if not data:
            return b"", 0
        self._out = []
        consumed = self._scan(data)
        out, self._out = self._out, []
        return b"".join(out), consumed

    def _scan(self, data: bytes) -> int:
        n = len(data)
        i = 0
        state = self._state
        # 1. Settle the state the previous feed ended in.
        if state == _CR_SEEN:
            if data[0] == _LF:
                self._emit(b"\n")
                i = 1
                state = _LINE_START
            else:
                self.bare_cr = True
                if self._normalize:
                    self._emit(b"\n")
                state = _MID
        elif state == _DOT_SEEN:
            if data[0] == _CR:
                if n == 1:
                    self._state = _DOT_CR
                    return 1
                if data[1] == _LF:
                    self.done = True
                    return 2
            state = _MID  # the dot was stuffing: dropped
        elif state == _DOT_CR:
            if data[0] == _LF:
                self.done = True
                return 1
            self.bare_cr = True
            self._emit(b"\r\n" if self._normalize else b"\r")
            state = _MID
        # 2. One line per turn.
        while i < n:
            if state == _LINE_START:
                if data[i] == _DOT:
                    if i + 1 == n:
                        self._state = _DOT_SEEN
                        return n
                    if data[i + 1] == _CR:
                        if i + 2 == n:
                            self._state = _DOT_CR
                            return n
                        if data[i + 2] == _LF:
                            self.done = True
                            return i + 3
                    i += 1  # RFC 5321 §4.5.2: drop the stuffed dot
                state = _MID
            j = data.find(b"\n", i)
            if j < 0:
                self._content(data[i : n - 1])
                self._emit(data[n - 1 :])
                state = _CR_SEEN if data[n - 1] == _CR else _MID
                break
            if j > i and data[j - 1] == _CR:
                self._content(data[i : j - 1])
                self._emit(b"\r\n")
                state = _LINE_START
            else:
                self._content(data[i:j])
                self.bare_lf = True
                self._emit(b"\r\n" if self._normalize else b"\n")
                state = _MID
            i = j + 1
        self._state = state
        return n

    def _content(self, chunk: bytes) -> None:
        # Emit content that holds no LF and is followed by no LF: any CR in
        # it is bare.
        if b"\r" in chunk:
            self.bare_cr = True
            if self._normalize:
                chunk = chunk.replace(b"\r", b"\r\n")
        self._emit(chunk)

    def _emit(self, chunk: bytes) -> None:
        # Count the octets; keep those that still fit under max_size.
        m = len(chunk)
        if not self.oversize:
            room = self._max_size - self.size
            if m > room:
                self.oversize = True  # RFC 1870 §6.3: refused with 552 at the end
                chunk = chunk[:room]
            if chunk:
                self._out.append(chunk)
        self.size += m


# -- DKIM's relaxed body whitespace (RFC 6376 §3.4.4 a) --------------------------

_MULTI_SP = re.compile(rb"  +")


def relaxed_wsp(data: bytes, end: int) -> bytes | None:
    """data[:end] with TABs as SP, SP runs as one, and no SP before a CRLF; None if unchanged.

    Only data[:end] is looked at: a CRLF that ``end`` splits is not seen.
    Each rewrite runs only where its pattern was found, since every pass
    over a 100 KB chunk costs.
    """
    if end < 0 or end > len(data):
        raise ValueError("end is outside data")
    tabs = data.find(b"\t", 0, end) >= 0
    runs = tabs or data.find(b"  ", 0, end) >= 0
    trailing = data.find(b" \r\n", 0, end) >= 0
    if not (tabs or runs or trailing):
        return None
    out = data[:end]
    if tabs:
        out = out.replace(b"\t", b" ")
    if runs:
        out = _MULTI_SP.sub(b" ", out)
    if trailing or tabs:
        out = out.replace(b" \r\n", b"\r\n")
    return out



# -- DKIM's tag lists (RFC 6376 §3.2) and relaxed header fields (§3.4.2) -----------

# The octets no tag value may hold (§3.2 tval: VCHAR and WSP, FWS between).
_CONTROL = bytes([*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F])
_FWS = " \t\r\n"
_WSP_RUN = re.compile(rb"[ \t]+")


def tag_list(data: bytes) -> dict[str, str] | None:
    """The common tag-list as {name: value}, FWS stripped from both; None where the caller must look closer.

    None: an octet outside ASCII or a control octet other than HTAB, CR
    and LF; a spec without "=" that is not an empty last one (after a
    final ";"); a name that is not ALPHA *ALNUM; a name twice.
    """
    if not data.isascii() or len(data.translate(None, _CONTROL)) != len(data):
        return None
    tags: dict[str, str] = {}
    specs = data.decode("ascii").split(";")
    last = len(specs) - 1
    for n, spec in enumerate(specs):
        name, eq, value = spec.partition("=")
        name = name.strip(_FWS)
        # ASCII isalnum with a letter first (digits sort below "A").
        if not (eq and name.isalnum() and name[0] > "@"):
            return tags if n == last and not spec.strip(_FWS) else None
        if name in tags:
            return None
        tags[name] = value.strip(_FWS)
    return tags


def relaxed_headers(fields: Sequence[bytes]) -> bytes:
    """Each field in the relaxed header canonicalisation (RFC 6376 §3.4.2), concatenated.

    Per field: the name (up to the first ":") lower-cased and without WSP
    at its end; the value with every CRLF removed (unfolding), each run of
    SP and HTAB as one SP and none at its ends; then CRLF.  A field with no
    colon is all name.
    """
    out = []
    for field in fields:
        name, _, value = field.partition(b":")
        value = _WSP_RUN.sub(b" ", value.replace(b"\r\n", b"")).strip(b" ")
        out.append(name.rstrip(b" \t").lower() + b":" + value + b"\r\n")
    return b"".join(out)


#: One field: its name (ftext, RFC 5322 §3.6.8; "name :" is obsolete, §4.5),
#: the colon, its first line and its folded continuation lines (§2.2.3).
#: The one grammar of a field: header_fields (both) and the milter stage.
FIELD = re.compile(rb"([!-9;-~]+)[ \t]*:[^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*")


def header_fields(data: bytes, end: int) -> list[tuple[bytes, bytes]] | None:
    """data[:end], a whole header section without its empty line, as [(name, raw field)]; None if a line is no field.

    One regex match per field; a line it does not match, or a field cut by
    ``end``: None.
    """
    if end < 0 or end > len(data):
        raise ValueError("end is outside data")
    fields = []
    pos = 0
    match = FIELD.match
    while pos < end:
        m = match(data, pos, end)
        if m is None:
            return None
        fields.append((m.group(1), m.group()))
        pos = m.end()
    return fields
