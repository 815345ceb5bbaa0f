"""The message's header fields, split out as the content streams to the spool.

Rules of this module:
- ``HeaderTap`` sits between the transaction and its spool for the
  messages that are authenticated.  It passes every octet on, in order,
  except the header fields its ``drop`` test refuses (the
  Authentication-Results fields that claim our authserv-id, RFC 8601 §5),
  and it hands the header fields (name, raw field with its folding and
  CRLF; RFC 5322 §2.2) to the checks once the header section ends.  After
  that every chunk goes on untouched, to the spool and to the body's
  running hashes: the body is never buffered here.
- A field is complete when the next line does not start with WSP (RFC 5322
  §2.2.3 folding); the section ends at the first empty line (§2.1), or at
  a line that cannot start a field, which then begins the body.
- What is held is bounded: at most ``MAX_HEADER_SECTION`` octets of header
  section.  Past that the tap gives up: everything goes on untouched and
  ``overflow`` says the checks saw no complete header section.
- Nothing here raises on any input.
"""

from __future__ import annotations

from typing import Callable

from ..parser import header_fields

__all__ = ["Header", "HeaderTap", "MAX_HEADER_SECTION", "authserv_id", "field_value"]

#: (name as in the message, the raw field: name, colon, value, folding, CRLF)
Header = tuple[bytes, bytes]

#: Real header sections run to a few tens of KiB (long Received: chains,
#: ARC sets); more than this is not mail worth parsing.
MAX_HEADER_SECTION = 512 * 1024

_WSP = (0x20, 0x09)
# RFC 5322 §3.6.8: ftext is printable US-ASCII except ":".
_FTEXT = frozenset(range(33, 127)) - {ord(":")}


class HeaderTap:
    """Split header fields from the body on their way to ``sink``."""

    __slots__ = ("_sink", "_drop", "_done", "_buf", "_pos", "_start", "headers", "_body", "overflow", "_held")

    def __init__(
        self,
        sink: Callable[[bytes | bytearray | memoryview], None],
        drop: Callable[[bytes, bytes], bool],
        done: Callable[[list[Header]], Callable[[bytes | bytearray | memoryview], None] | None],
    ) -> None:
        self._sink = sink
        self._drop = drop
        # Called with the fields once the section ends; answers who else
        # wants the body (the running hashes), or None.
        self._done = done
        self._buf = bytearray()
        self._pos = 0  # where the next unread line starts in _buf
        self._start = -1  # where the field being read starts, -1: none
        self.headers: list[Header] = []
        #: Once the body has begun: who gets it besides the sink (or a no-op).
        self._body: Callable[[bytes | bytearray | memoryview], None] | None = None
        self.overflow = False
        self._held = 0  # octets of the fields read so far

    def write(self, data: bytes | bytearray | memoryview) -> None:
        body = self._body
        if body is not None:
            self._sink(data)
            body(data)
            return
        if not self._buf and self._whole(data):
            return
        self._buf += data
        self._read_lines()
        if self._body is None and self._held + len(self._buf) > MAX_HEADER_SECTION:
            self._give_up()

    def end(self) -> None:
        """The content is over: a section never ended by an empty line ends here."""
        if self._body is not None:
            return
        buf = self._buf
        pos, end = self._pos, len(buf)
        rest = b""
        if pos < end and not (buf[pos] in _WSP and self._start >= 0):
            # A last line without its CRLF, which is not a continuation.
            if self._start >= 0:
                self._field(bytes(buf[self._start:pos]))
            self._start = pos if _starts_field(buf, pos, end) else -1
            if self._start < 0:
                rest = bytes(buf[pos:])  # not a field: the body's only line
        if self._start >= 0:
            self._field(bytes(buf[self._start:]))
        self._buf = bytearray()
        self._begin_body(rest)

    def _whole(self, data: bytes | bytearray | memoryview) -> bool:
        """The common case, done at C speed: the first chunk holds the whole section.

        The fields are split by one pass of the compiled parser
        (``parser.header_fields``; its twin: one regex per field).  Anything
        it does not take (a bare CR, a line that is no field) leaves the
        line-by-line reader to decide, from the start.  False: nothing was
        consumed.
        """
        data = bytes(data)
        end = data.find(b"\r\n\r\n")
        if end < 0 or end + 2 > MAX_HEADER_SECTION:
            return False
        end += 2  # past the last field's CRLF
        headers = header_fields(data, end)
        if headers is None:
            return False
        kept: list[bytes] | None = None  # made at the first field dropped
        drop = self._drop
        for n, (name, raw) in enumerate(headers):
            if drop(name, raw):
                if kept is None:
                    kept = [raw for _, raw in headers[:n]]
            elif kept is not None:
                kept.append(raw)
        self.headers = headers
        self._held = end
        # One write for the whole section and its empty line.
        self._sink(data[: end + 2] if kept is None else b"".join(kept) + b"\r\n")
        self._begin_body(data[end + 2:])
        return True

    def _read_lines(self) -> None:
        buf = self._buf
        pos = self._pos
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                break
            if eol == pos:  # the empty line: the section is over (RFC 5322 §2.1)
                if self._start >= 0:
                    self._field(bytes(buf[self._start:pos]))
                self._sink(b"\r\n")
                rest = bytes(buf[eol + 2:])
                self._buf = bytearray()
                self._begin_body(rest)
                return
            if buf[pos] in _WSP and self._start >= 0:
                pos = eol + 2  # a folded continuation of the field being read
                continue
            if self._start >= 0:
                self._field(bytes(buf[self._start:pos]))
            if not _starts_field(buf, pos, eol):
                # Not a field: the header section is over and this line is
                # the body's first (a message without the empty line).
                rest = bytes(buf[pos:])
                self._buf = bytearray()
                self._start = -1
                self._begin_body(rest)
                return
            self._start = pos
            pos = eol + 2
        # Drop what is passed on, so that a long section is not rescanned.
        keep = self._start if self._start >= 0 else pos
        if keep:
            del buf[:keep]
            pos -= keep
            if self._start >= 0:
                self._start = 0
        self._pos = pos

    def _field(self, raw: bytes) -> None:
        name = raw[: raw.find(b":")].rstrip(b" \t")
        self._held += len(raw)
        self.headers.append((name, raw))
        if not self._drop(name, raw):
            self._sink(raw)

    def _begin_body(self, rest: bytes) -> None:
        self._start = -1
        self._pos = 0
        body = self._done(self.headers)
        self._body = body if body is not None else _ignore
        if rest:
            self.write(rest)

    def _give_up(self) -> None:
        """Over the bound: pass everything on; the checks get no section."""
        self.overflow = True
        # Fields already read were passed on or dropped, and _read_lines
        # trimmed them: what is left in the buffer goes on as it is.
        self._sink(bytes(self._buf))
        self._buf = bytearray()
        self._start = -1
        self._body = _ignore


def _ignore(data: bytes | bytearray | memoryview) -> None:
    return None


def _starts_field(buf: bytearray, start: int, eol: int) -> bool:
    """Whether the line at ``start`` is ``name:`` with a valid field name (RFC 5322 §3.6.8)."""
    colon = buf.find(b":", start, eol)
    if colon <= start:
        return False
    name = buf[start:colon].rstrip(b" \t")  # obsolete "name :" (RFC 5322 §4.5)
    return bool(name) and all(c in _FTEXT for c in name)


def field_value(raw: bytes) -> bytes:
    """The value of a raw field: after the colon, unfolded, without its final CRLF."""
    value = raw[raw.find(b":") + 1:]
    if value.endswith(b"\r\n"):
        value = value[:-2]
    return value.replace(b"\r\n", b"").strip(b" \t")


def _skip_cfws(text: bytes, i: int) -> int:
    """Past folding white space and (nested) comments (RFC 5322 §3.2.2)."""
    depth = 0
    n = len(text)
    while i < n:
        c = text[i]
        if depth:
            if c == 0x5C:  # quoted-pair inside a comment
                i += 2
                continue
            if c == 0x28:
                depth += 1
            elif c == 0x29:
                depth -= 1
        elif c == 0x28:
            depth = 1
        elif c not in (0x20, 0x09, 0x0D, 0x0A):
            return i
        i += 1
    return i


def authserv_id(raw: bytes) -> str:
    """The authserv-id an Authentication-Results field claims (RFC 8601 §2.2), lower-cased."""
    value = raw[raw.find(b":") + 1:]
    i = _skip_cfws(value, 0)
    if i < len(value) and value[i] == 0x22:  # a quoted-string
        end = i + 1
        out = bytearray()
        while end < len(value) and value[end] != 0x22:
            if value[end] == 0x5C and end + 1 < len(value):
                end += 1
            out.append(value[end])
            end += 1
        token = bytes(out)
    else:
        end = i
        while end < len(value) and value[end] not in b" \t\r\n;(":
            end += 1
        token = value[i:end]
    return token.decode("utf-8", "replace").lower()
