"""DKIM canonicalisation (RFC 6376 §3.4): header fields, and streaming body hashes.

Rules of this module:
- Header fields are canonicalised whole (they are small and already split
  by the lead's parser): ``header_simple`` / ``header_relaxed`` take the raw
  field (name, colon, folded value, final CRLF) and give the bytes that go
  into the header hash, final CRLF included (§3.4.1, §3.4.2);
  ``headers_relaxed`` does a signature's fields together, with the same
  result as one ``header_relaxed`` each.
- The body is never joined.  ``BodyHashes`` streams it: one canonicaliser
  per body canonicalisation ("simple", "relaxed") actually asked for, each
  feeding one running hash per (algorithm, l=) key.  Every signature (DKIM,
  and ARC's newest AMS) that names the same key shares the same hash, so a
  25 MB body is canonicalised once per c= and hashed once per key.
- ``write(chunk)`` takes bytes, bytearray or memoryview split anywhere.
  What a chunk's end leaves undecided (a run of CRLFs that may turn out to
  be the body's trailing empty lines, a run of WSP that may precede a CRLF,
  a CR that may start a CRLF) is kept as counts and flags, never as bytes,
  so the state stays a few integers for any input (25 MB of spaces or of
  CRLFs included).
- Fast path: a chunk that needs no rewriting (no TAB, no two SP in a row,
  no SP before CRLF) is hashed as is, through a memoryview, without a copy
  (a part under 4 KiB is copied: that costs less than a memoryview).  The
  check and the rewrite are one pass of the compiled parser
  (``parser.relaxed_wsp``; its pure-Python twin gives the same octets).  The result is byte-identical to a whole-body canonicalisation for any
  split; tests/test_canon.py proves it against a whole-string reference.
- Bare CR and bare LF are refused before storage, but if they come they are
  ordinary octets here: only CRLF ends a line (RFC 5322 §2.1).  Nothing in
  this module raises on any input.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Final, NamedTuple

from ..parser import relaxed_headers, relaxed_wsp

__all__ = [
    "SIMPLE",
    "RELAXED",
    "header_simple",
    "header_relaxed",
    "headers_relaxed",
    "canon_header",
    "BodyKey",
    "BodyCanon",
    "BodyHashes",
]

SIMPLE: Final = "simple"
RELAXED: Final = "relaxed"

_CRLF: Final = b"\r\n"
# Held CRLFs are emitted from this block, so a long run costs a few updates
# and no allocation proportional to the run.
_CRLF_BLOCK: Final = b"\r\n" * 4096
_WSP_RUN: Final = re.compile(rb"[ \t]+")
# The direct constructors: hashlib.new(name) looks the name up each time.
_HASHES: Final[dict[str, Callable[[], Any]]] = {"sha256": hashlib.sha256, "sha1": hashlib.sha1}


# -- header fields ----------------------------------------------------------


def header_simple(field: bytes) -> bytes:
    """§3.4.1: the field exactly as it is, final CRLF included."""
    return field


def header_relaxed(field: bytes) -> bytes:
    """§3.4.2: lower-case name, unfolded, WSP runs as one SP, no WSP at the ends of the value."""
    name, _, value = field.partition(b":")
    # Unfold (remove every CRLF of the value, its final one included), then
    # WSP runs become one SP and the value's ends lose theirs.  A CRLF not
    # followed by WSP cannot be inside a parsed field; removing it too keeps
    # odd input harmless.
    value = value.replace(b"\r\n", b"")
    if b"\r" in value or b"\n" in value or b"\x0b" in value or b"\x0c" in value:
        # bytes.split() would cut at these too, but only SP and HTAB are WSP.
        value = _WSP_RUN.sub(b" ", value).strip(b" ")
    else:
        # Left with SP and HTAB as the only whitespace: split() and join
        # make each run one SP and drop the ends' runs, in C.
        value = b" ".join(value.split())
    return name.rstrip(b" \t").lower() + b":" + value + _CRLF


#: The fields' ``header_relaxed`` forms, concatenated: the same octets, in
#: one pass of the compiled parser (its twin: the same rule in bytes
#: methods).  A signature's hash input is a handful of short fields, where
#: the work per call, not per octet, is the cost, so no wrapper either;
#: tests/test_canon.py holds it to ``header_relaxed``.
headers_relaxed: Final = relaxed_headers


def canon_header(field: bytes, canon: str) -> bytes:
    """The field in the named header canonicalisation ("simple" or "relaxed")."""
    return header_relaxed(field) if canon == RELAXED else field


# -- body -------------------------------------------------------------------


class BodyKey(NamedTuple):
    """What a body hash depends on: c= (body part), the hash of a=, and l=.

    A tuple, so hashing and comparing it (a dict key per message) is C work.
    """

    canon: str  # "simple" | "relaxed"
    algorithm: str  # a hashlib name: "sha256" (or "sha1", which RFC 8301 refuses upstream)
    limit: int | None  # l=, None for the whole body


@dataclass(slots=True)
class _Sink:
    """One running hash, and how many canonical octets it may still take (l=)."""

    hash: Any
    left: int | None


@dataclass(slots=True)
class BodyCanon:
    """One body canonicalisation, streaming into its sinks.

    State between chunks (the only state): ``held`` CRLFs seen after the
    last content octet (trailing empty lines are dropped at the end, §3.4.3,
    §3.4.4), ``wsp`` (relaxed: a WSP run is pending, it becomes one SP unless
    a CRLF follows), ``cr`` (the chunk ended in CR, which may start a CRLF),
    and ``length``, the canonical octets emitted so far.
    """

    relaxed: bool
    sinks: list[_Sink] = field(default_factory=list)
    held: int = 0
    wsp: bool = False
    cr: bool = False
    length: int = 0
    content: bool = False  # a content octet was emitted (relaxed: an empty body is empty)
    ended: bool = False

    def _emit(self, data: bytes | memoryview) -> None:
        n = len(data)
        if not n:
            return
        self.length += n
        for sink in self.sinks:
            if sink.left is None:
                sink.hash.update(data)
            else:
                self._emit_limited(sink, data, n)

    def _flush_held(self) -> None:
        held = self.held
        self.held = 0
        while held > 4096:
            self._emit(_CRLF_BLOCK)
            held -= 4096
        if held:
            self._emit(_CRLF_BLOCK[: 2 * held])

    def _content(self, data: bytes | memoryview) -> None:
        """Emit content: the held CRLFs were not trailing after all."""
        if self.held:
            self._flush_held()
        self._emit(data)
        self.content = True

    def write(self, chunk: bytes | bytearray | memoryview) -> None:
        """Canonicalise the next piece of the body into every sink."""
        if self.ended or not len(chunk):
            return
        data = chunk if isinstance(chunk, bytes) else bytes(chunk)
        if self.wsp or self.cr:
            # At most two octets of state go back in front: the pending WSP
            # (as one SP) and the pending CR.  Only chunks after a split
            # inside "WSP CRLF" or "CR LF" pay this copy.
            data = (b" " if self.wsp else b"") + (b"\r" if self.cr else b"") + data
            self.wsp = self.cr = False
        end = len(data)
        # The undecided tail: a final CR, and (relaxed) a WSP run before it.
        if data[end - 1] == 13:
            self.cr = True
            end -= 1
        if self.relaxed and end and data[end - 1] in (32, 9):
            stop = end
            while end and data[end - 1] in (32, 9):
                end -= 1
                if stop - end > 64:
                    # A long run: measure it in C, not octet by octet.
                    end = len(data[:end].rstrip(b" \t"))
                    break
            self.wsp = True
        if not end:
            return
        if self.relaxed:
            # §3.4.4 a: TABs to SP, SP runs to one, none before CRLF: one
            # pass in the compiled parser (its twin: a few passes of
            # bytes methods).  None: nothing to rewrite.
            out = relaxed_wsp(data, end)
            if out is not None:
                data, end = out, len(out)
        # Emit data[:end] (canonical now), holding back its trailing CRLFs:
        # inline, since a 1 KiB body is one chunk and each call layer here
        # cost as much as hashing it.
        k = 0
        if end >= 2 and data[end - 2] == 13 and data[end - 1] == 10:
            # A chunk ending at a line's end holds one CRLF; a run of empty
            # lines is measured in C by _trailing_crlfs.
            k = 1 if end < 4 or data[end - 4] != 13 or data[end - 3] != 10 else _trailing_crlfs(data, end)
        body = end - 2 * k
        if body:
            if self.held:
                self._flush_held()  # the held CRLFs were not trailing after all
            part: bytes | memoryview = data
            if body < len(data):
                # A small copy costs less than a memoryview; a big one is not made.
                part = data[:body] if body <= 4096 else memoryview(data)[:body]
            self.length += body
            for sink in self.sinks:
                if sink.left is None:
                    sink.hash.update(part)
                else:
                    self._emit_limited(sink, part, body)
            self.content = True
        self.held += k

    @staticmethod
    def _emit_limited(sink: _Sink, data: bytes | memoryview, n: int) -> None:
        # l= counts canonical octets (§3.5): hash the first `left` only.
        left = sink.left
        assert left is not None
        if left > 0:
            sink.hash.update(data[:left] if n > left else data)
            sink.left = left - n if n < left else 0

    def end(self) -> None:
        """The body is over: settle the pending state and the final CRLF."""
        if self.ended:
            return
        self.ended = True
        if self.cr:
            # A CR at the very end is content (no LF can follow); in relaxed
            # a WSP run before it stays as one SP.
            self._content(b" \r" if self.wsp else b"\r")
        # A WSP run with no CRLF after it ends the last (unterminated) line:
        # dropped as trailing WSP (§3.4.4 a).  Our choice for input SMTP cannot
        # carry; see the module tests.
        self.wsp = self.cr = False
        self.held = 0  # trailing empty lines are ignored (§3.4.3, §3.4.4 b)
        if self.relaxed:
            # §3.4.4 b: an empty body stays empty; otherwise it ends in one CRLF.
            if self.content:
                self._emit(_CRLF)
        else:
            # §3.4.3: the body ends in exactly one CRLF; an empty body is CRLF.
            self._emit(_CRLF)


def _trailing_crlfs(data: bytes, end: int) -> int:
    """How many whole CRLF pairs end data[:end]."""
    if end < 2 or data[end - 2] != 13 or data[end - 1] != 10:
        return 0
    if end < 4 or data[end - 4] != 13 or data[end - 3] != 10:
        return 1  # the common case: a chunk ending at a line's end
    # A run of empty lines: find it in C.  The tail of CR and LF octets ends
    # in pairs from the last break of the CR/LF alternation onwards.
    head = len(data[:end].rstrip(b"\r\n"))
    tail = data[head:end]
    start = max(tail.rfind(b"\r\r"), tail.rfind(b"\n\n")) + 1
    if tail[start : start + 1] == b"\n":
        start += 1
    return (len(tail) - start) // 2


class BodyHashes:
    """The body hashes one message needs, shared by key (see the module rules)."""

    __slots__ = ("_canons", "_sinks")

    def __init__(self) -> None:
        self._canons: dict[str, BodyCanon] = {}
        self._sinks: dict[BodyKey, _Sink] = {}

    def need(self, key: BodyKey) -> None:
        """Ask for a body hash (before the body starts); asking twice shares it."""
        if key in self._sinks:
            return
        canon = self._canons.get(key.canon)
        if canon is None:
            canon = self._canons[key.canon] = BodyCanon(relaxed=key.canon == RELAXED)
        new = _HASHES.get(key.algorithm)
        sink = _Sink(new() if new is not None else hashlib.new(key.algorithm), key.limit)
        canon.sinks.append(sink)
        self._sinks[key] = sink

    def __len__(self) -> int:
        """The number of running hashes."""
        return len(self._sinks)

    @property
    def canonicalisers(self) -> int:
        """The number of body canonicalisations running (at most two)."""
        return len(self._canons)

    def write(self, chunk: bytes | bytearray | memoryview) -> None:
        for canon in self._canons.values():
            canon.write(chunk)  # BodyCanon.write does not modify chunk: both may share it

    def end(self) -> None:
        for canon in self._canons.values():
            canon.end()

    def digest(self, key: BodyKey) -> bytes | None:
        """The finished digest for key (None if it was never asked for)."""
        sink = self._sinks.get(key)
        return None if sink is None else sink.hash.digest()

    def length(self, canon: str) -> int:
        """The whole canonical body length in that canonicalisation (for l= checks)."""
        c = self._canons.get(canon)
        return 0 if c is None else c.length
