"""The milter wire format, sans-IO: commands out, replies in (libmilter's protocol version 6).

Rules of this module:
- A packet is a 32-bit big-endian length, then one command or reply
  octet, then its data; the length counts the octet and the data.
  Strings are NUL-terminated.  This is the format of Sendmail's libmilter
  (mfdef.h) as Postfix's milter client and every milter speak it; there is
  no RFC.
- The MTA side only: ``encode_*`` build what we send, ``Replies`` parses
  what a milter sends back.  No socket, loop or clock here.
- A milter is a peer we do not trust: every reply is checked (its length
  against ``MAX_PACKET``, its fields against its code) and anything wrong
  is a ``MilterProtocolError``, never another exception, so the caller can
  apply ``--milter-default-action``.
- Body chunks are at most ``MAX_BODY_CHUNK`` octets (65,535), the size
  every milter accepts without the larger sizes of SMFIP_MDS_*.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Iterable, Sequence

__all__ = [
    "MilterProtocolError", "VERSION", "MAX_BODY_CHUNK", "MAX_PACKET", "Command", "Action", "Flag",
    "Negotiated", "Reply", "Modification", "Replies", "encode", "encode_optneg", "encode_connect",
    "encode_macros", "encode_strings", "encode_header", "body_chunks",
]

VERSION = 6
MAX_BODY_CHUNK = 65535
#: The largest reply we read: a replaced-body chunk of the largest size a
#: milter may use (SMFIP_MDS_1M) and its header.  Anything longer is a
#: broken or hostile milter.
MAX_PACKET = 1024 * 1024 + 64


class MilterProtocolError(Exception):
    """The milter said something the protocol does not allow."""


class Command:
    """What the MTA sends (SMFIC_*)."""

    ABORT = b"A"
    BODY = b"B"
    CONNECT = b"C"
    MACRO = b"D"
    END_OF_BODY = b"E"
    HELO = b"H"
    QUIT_NEW_CONNECTION = b"K"
    HEADER = b"L"
    MAIL = b"M"
    END_OF_HEADERS = b"N"
    OPTNEG = b"O"
    QUIT = b"Q"
    RCPT = b"R"
    DATA = b"T"
    UNKNOWN = b"U"


class Action:
    """What the MTA allows the milter to do (SMFIF_*), offered at negotiation."""

    ADD_HEADERS = 0x01
    CHANGE_BODY = 0x02
    ADD_RCPT = 0x04
    DELETE_RCPT = 0x08
    CHANGE_HEADERS = 0x10
    QUARANTINE = 0x20
    CHANGE_FROM = 0x40
    ADD_RCPT_PAR = 0x80
    SET_SYMLIST = 0x100
    ALL = 0x1FF


class Flag:
    """Protocol steps (SMFIP_*): what the milter does not want, and where it will not reply."""

    NO_CONNECT = 0x01
    NO_HELO = 0x02
    NO_MAIL = 0x04
    NO_RCPT = 0x08
    NO_BODY = 0x10
    NO_HEADERS = 0x20
    NO_EOH = 0x40
    NR_HEADER = 0x80
    NO_UNKNOWN = 0x100
    NO_DATA = 0x200
    SKIP = 0x400
    RCPT_REJ = 0x800
    NR_CONNECT = 0x1000
    NR_HELO = 0x2000
    NR_MAIL = 0x4000
    NR_RCPT = 0x8000
    NR_DATA = 0x10000
    NR_UNKNOWN = 0x20000
    NR_EOH = 0x40000
    NR_BODY = 0x80000
    HEADER_LEADING_SPACE = 0x100000
    #: What we can do: every step may be left out or left unanswered, and
    #: we understand SMFIR_SKIP.  Not RCPT_REJ (rejected recipients are not
    #: shown to milters), not the larger body sizes.
    OFFERED = 0x1FFFFF & ~RCPT_REJ & ~HEADER_LEADING_SPACE


# -- replies -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Negotiated:
    """The milter's answer to OPTNEG: its version, the actions and steps it wants, macros per stage."""

    version: int
    actions: int
    flags: int
    #: Stage number (0 connect, 1 helo, 2 mail, 3 rcpt, 4 data, 5 eom, 6 eoh) -> macro names.
    macros: dict[int, tuple[str, ...]]


@dataclass(frozen=True, slots=True)
class Reply:
    """A milter's verdict for one step: its code letter, and for ``y`` the SMTP reply."""

    code: str  # a accept, c continue, d discard, r reject, t tempfail, y replycode, s skip, p progress
    smtp_code: int = 0
    text: str = ""


@dataclass(frozen=True, slots=True)
class Modification:
    """A change to the message at the end of the body: h, i, m, b, +, 2, -, e, q."""

    code: str
    name: str = ""  # a header's name; a recipient or sender address; the quarantine reason
    value: bytes = b""  # a header's value; the replaced body's chunk
    index: int = 0  # i and m: which header (1-based among those of that name for m)
    args: str = ""  # 2 and e: ESMTP parameters


_VERDICTS = frozenset("acdrtsp")
_U32 = struct.Struct("!I")
_OPTNEG = struct.Struct("!III")


def _strings(data: bytes, count: int, what: str) -> list[bytes]:
    """``count`` NUL-terminated strings that make up all of ``data``."""
    parts = data.split(b"\0")
    if len(parts) != count + 1 or parts[-1] != b"":
        raise MilterProtocolError(f"{what}: expected {count} NUL-terminated string(s)")
    return parts[:-1]


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


def parse_reply(code: str, data: bytes) -> Reply | Modification | Negotiated:
    """One reply packet's content (without the length), checked."""
    if code in _VERDICTS:
        if data:
            raise MilterProtocolError(f"reply {code!r} carries {len(data)} unexpected octet(s)")
        return Reply(code)
    if code == "y":
        (raw,) = _strings(data, 1, "replycode")
        text = _text(raw)
        head = text[:3]
        if len(text) < 3 or not head.isdigit() or head[0] not in "45" or text[3:4] not in ("", " ", "-"):
            raise MilterProtocolError(f"replycode {text[:40]!r} is not a 4xx or 5xx reply")
        return Reply("y", int(head), text[4:])
    if code == "h":
        name, value = _strings(data, 2, "add header")
        return Modification("h", _header_name(name), value)
    if code in ("i", "m"):
        if len(data) < 4:
            raise MilterProtocolError(f"reply {code!r} without its index")
        (index,) = _U32.unpack_from(data)
        name, value = _strings(data[4:], 2, "insert header" if code == "i" else "change header")
        return Modification(code, _header_name(name), value, index)
    if code == "b":
        return Modification("b", value=data)
    if code in ("+", "-"):
        (address,) = _strings(data, 1, "recipient")
        return Modification(code, _text(address))
    if code in ("2", "e"):
        parts = data.split(b"\0")
        if parts[-1] != b"" or len(parts) not in (2, 3):
            raise MilterProtocolError(f"reply {code!r}: expected an address and maybe parameters")
        return Modification(code, _text(parts[0]), args=_text(parts[1]) if len(parts) == 3 else "")
    if code == "q":
        (reason,) = _strings(data, 1, "quarantine")
        return Modification("q", _text(reason))
    if code == "O":
        return _negotiated(data)
    if code in ("4", "f"):
        # Shutdown and connection failure: the milter gives up; a tempfail.
        return Reply("t")
    raise MilterProtocolError(f"unknown reply code {code!r}")


def _header_name(raw: bytes) -> str:
    # RFC 5322 §3.6.8: printable US-ASCII but the colon.
    if not raw or any(c < 33 or c > 126 or c == 58 for c in raw):
        raise MilterProtocolError(f"header name {raw[:40]!r} is not a field name")
    return raw.decode("ascii")


def _negotiated(data: bytes) -> Negotiated:
    if len(data) < _OPTNEG.size:
        raise MilterProtocolError("option negotiation reply too short")
    version, actions, flags = _OPTNEG.unpack_from(data)
    if version < 2:
        raise MilterProtocolError(f"milter protocol version {version} is too old")
    macros: dict[int, tuple[str, ...]] = {}
    rest = data[_OPTNEG.size:]
    # SMFIR_SETSYMLIST inside the reply: (u32 stage, "names\0")*.
    while rest:
        if len(rest) < 5:
            raise MilterProtocolError("a macro list entry is cut short")
        (stage,) = _U32.unpack_from(rest)
        end = rest.find(b"\0", 4)
        if end < 0 or stage > 6:
            raise MilterProtocolError("a malformed macro list entry")
        macros[stage] = tuple(_text(rest[4:end]).split())
        rest = rest[end + 1:]
    return Negotiated(min(version, VERSION), actions, flags, macros)


class Replies:
    """Octets from a milter in, replies out; ``feed`` then ``next`` until None."""

    def __init__(self, max_packet: int = MAX_PACKET) -> None:
        self._buf = bytearray()
        self._max = max_packet

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next(self) -> Reply | Modification | Negotiated | None:
        buf = self._buf
        if len(buf) < 4:
            return None
        (size,) = _U32.unpack_from(buf)
        if size < 1 or size > self._max:
            raise MilterProtocolError(f"a packet of {size} octets")
        if len(buf) < 4 + size:
            return None
        code = chr(buf[4])
        data = bytes(buf[5 : 4 + size])
        del buf[: 4 + size]
        return parse_reply(code, data)

    @property
    def buffered(self) -> int:
        return len(self._buf)


# -- commands ------------------------------------------------------------------------


def encode(command: bytes, data: bytes = b"") -> bytes:
    return _U32.pack(1 + len(data)) + command + data


def encode_strings(command: bytes, strings: Iterable[bytes]) -> bytes:
    return encode(command, b"".join(_nul_free(s) + b"\0" for s in strings))


def _nul_free(value: bytes) -> bytes:
    # A NUL inside a string would end it early on the milter's side and
    # shift every field after it: a client's NUL never gets that far.
    return value.replace(b"\0", b"")


def encode_optneg(actions: int = Action.ALL, flags: int = Flag.OFFERED) -> bytes:
    return encode(Command.OPTNEG, _OPTNEG.pack(VERSION, actions, flags))


def encode_connect(hostname: bytes, address: str, port: int) -> bytes:
    """SMFIC_CONNECT: the client's name, then family '4' or '6' with port and address, or 'U'."""
    if ":" in address:
        family = b"6"
    elif address.count(".") == 3:
        family = b"4"
    else:
        return encode(Command.CONNECT, _nul_free(hostname) + b"\0U")
    return encode(Command.CONNECT, _nul_free(hostname) + b"\0" + family + struct.pack("!H", port & 0xFFFF)
                  + address.encode("ascii") + b"\0")


def encode_macros(stage: bytes, pairs: Sequence[tuple[str, str]]) -> bytes:
    """SMFIC_MACRO for the command ``stage``: name\\0value\\0 pairs."""
    data = stage + b"".join(_nul_free(n.encode()) + b"\0" + _nul_free(v.encode("utf-8", "replace")) + b"\0"
                            for n, v in pairs)
    return encode(Command.MACRO, data)


def encode_header(name: bytes, value: bytes) -> bytes:
    return encode(Command.HEADER, _nul_free(name) + b"\0" + _nul_free(value) + b"\0")


def body_chunks(body: bytes | memoryview, size: int = MAX_BODY_CHUNK) -> Iterable[bytes]:
    """SMFIC_BODY packets of at most ``size`` octets each."""
    view = memoryview(body)
    for start in range(0, len(view), size):
        yield encode(Command.BODY, bytes(view[start : start + size]))
