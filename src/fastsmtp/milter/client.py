"""One conversation with one milter, over a stream: negotiate, then the steps of a session.

Rules of this module:
- ``MilterConnection.open`` connects (``inet:HOST:PORT``, Sendmail's
  ``inet:PORT@HOST``, ``unix:/path``) and negotiates options at once.  What
  the milter asked not to see is never sent (SMFIP_NO*); where it said it
  will not reply, nothing is awaited (SMFIP_NR_*).  A step it skipped
  answers None, which means continue.
- Every wait is bounded: ``connect_timeout`` for the connection and the
  negotiation, ``command_timeout`` per step, ``content_timeout`` for the
  body and its end (Postfix's milter_connect_timeout, _command_timeout,
  _content_timeout).  A milter that runs past one, closes, or says
  something the protocol does not allow raises ``MilterError``; its
  conversation is over, and the caller applies the default action.
- A progress reply (``p``) restarts the wait, as libmilter's MTAs do.
  Modifications are only allowed in answer to the end of the body; one
  anywhere else is a protocol error.
"""

from __future__ import annotations

import asyncio
from typing import Sequence

from .protocol import (
    Command,
    Flag,
    MilterProtocolError,
    Modification,
    Negotiated,
    Reply,
    Replies,
    body_chunks,
    encode,
    encode_connect,
    encode_header,
    encode_macros,
    encode_optneg,
    encode_strings,
)

__all__ = ["MilterConnection", "MilterError", "parse_endpoint"]

Macros = Sequence[tuple[str, str]]

# The octets of changes one end of body may bring when the caller sets no
# bound: a 25 MiB body (the default message size) and room for its fields.
DEFAULT_CHANGE_LIMIT = 26 * 1024 * 1024


class MilterError(Exception):
    """The milter is down, timed out, or broke the protocol: its conversation is over."""


def parse_endpoint(endpoint: str) -> tuple[str, str | int]:
    """("unix", path) or (host, port) from ``unix:/path``, ``inet:HOST:PORT`` or ``inet:PORT@HOST``."""
    kind, _, rest = endpoint.partition(":")
    if kind in ("unix", "local") and rest:
        return "unix", rest
    if kind in ("inet", "inet6") and rest:
        if "@" in rest:
            port, _, host = rest.partition("@")
        else:
            host, _, port = rest.rpartition(":")
            host = host.strip("[]")
        if host and port.isdigit() and 0 < int(port) < 65536:
            return host, int(port)
    raise ValueError(f"milter {endpoint!r} is not inet:HOST:PORT, inet:PORT@HOST or unix:/path")


class MilterConnection:
    """The MTA's side of one milter conversation."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, negotiated: Negotiated,
                 command_timeout: float, content_timeout: float, change_limit: int = DEFAULT_CHANGE_LIMIT) -> None:
        self._reader = reader
        self._writer = writer
        self.negotiated = negotiated
        self._replies = Replies()
        self.command_timeout = command_timeout
        self.content_timeout = content_timeout
        #: The most octets of changes (a new body, header values) one end of body may bring.
        self.change_limit = change_limit
        self.closed = False
        #: The milter answered "skip" to a body chunk: send no more of it.
        self._skip_body = False

    @classmethod
    async def open(cls, endpoint: str, actions: int, *, connect_timeout: float = 30.0,
                   command_timeout: float = 30.0, content_timeout: float = 300.0,
                   change_limit: int = DEFAULT_CHANGE_LIMIT) -> "MilterConnection":
        where = parse_endpoint(endpoint)
        conn: MilterConnection | None = None
        try:
            async with asyncio.timeout(connect_timeout):
                if where[0] == "unix":
                    reader, writer = await asyncio.open_unix_connection(str(where[1]))
                else:
                    reader, writer = await asyncio.open_connection(where[0], where[1])
                conn = cls(reader, writer, Negotiated(0, 0, 0, {}), command_timeout, content_timeout, change_limit)
                writer.write(encode_optneg(actions))
                answer = await conn._read_one()
        except (OSError, TimeoutError, MilterProtocolError) as exc:
            if conn is not None:
                conn.close()
            raise MilterError(f"{endpoint}: {type(exc).__name__} {exc}".rstrip()) from None
        if not isinstance(answer, Negotiated):
            conn.close()
            raise MilterError(f"{endpoint}: answered option negotiation with {answer!r}")
        # Actions we did not offer are not the milter's to take: kept out of
        # what was agreed (their replies are refused by the stage's checks).
        conn.negotiated = Negotiated(answer.version, answer.actions & actions, answer.flags, answer.macros)
        return conn

    # -- the steps ---------------------------------------------------------------------

    async def connect(self, hostname: bytes, address: str, port: int, macros: Macros = ()) -> Reply | None:
        return await self._step(b"C", encode_connect(hostname, address, port), Flag.NO_CONNECT, Flag.NR_CONNECT,
                                macros)

    async def helo(self, name: bytes, macros: Macros = ()) -> Reply | None:
        return await self._step(b"H", encode_strings(Command.HELO, [name]), Flag.NO_HELO, Flag.NR_HELO, macros)

    async def mail(self, sender: bytes, args: Sequence[bytes] = (), macros: Macros = ()) -> Reply | None:
        packet = encode_strings(Command.MAIL, [b"<" + sender + b">", *args])
        return await self._step(b"M", packet, Flag.NO_MAIL, Flag.NR_MAIL, macros)

    async def rcpt(self, recipient: bytes, args: Sequence[bytes] = (), macros: Macros = ()) -> Reply | None:
        packet = encode_strings(Command.RCPT, [b"<" + recipient + b">", *args])
        return await self._step(b"R", packet, Flag.NO_RCPT, Flag.NR_RCPT, macros)

    async def data(self, macros: Macros = ()) -> Reply | None:
        return await self._step(b"T", encode(Command.DATA), Flag.NO_DATA, Flag.NR_DATA, macros)

    async def header(self, name: bytes, value: bytes) -> Reply | None:
        return await self._step(b"L", encode_header(name, value), Flag.NO_HEADERS, Flag.NR_HEADER, ())

    async def end_of_headers(self, macros: Macros = ()) -> Reply | None:
        return await self._step(b"N", encode(Command.END_OF_HEADERS), Flag.NO_EOH, Flag.NR_EOH, macros)

    async def body(self, chunk: bytes | memoryview) -> Reply | None:
        """Body octets, in packets of at most 65,535; the first verdict that is not continue, or None."""
        if self._skip_body or self.negotiated.flags & Flag.NO_BODY:
            return None
        for packet in body_chunks(chunk):
            answer = await self._send(packet, not self.negotiated.flags & Flag.NR_BODY, self.content_timeout)
            if answer is not None and answer.code == "s":
                self._skip_body = True
                return None
            if answer is not None and answer.code != "c":
                return answer
        return None

    async def end_of_body(self, macros: Macros = ()) -> tuple[Reply, list[Modification]]:
        """The end of the message: the final verdict, and the changes asked for with it."""
        if macros:
            self._writer.write(encode_macros(b"E", macros))
        self._writer.write(encode(Command.END_OF_BODY))
        changes: list[Modification] = []
        octets = 0
        try:
            async with asyncio.timeout(self.content_timeout) as budget:
                while True:
                    answer = await self._read_one()
                    if isinstance(answer, Modification):
                        # A new body comes in packets of up to a MiB each, and
                        # any number of them: bounded, as the message was.
                        octets += len(answer.value) + len(answer.name) + len(answer.args)
                        if octets > self.change_limit:
                            raise MilterProtocolError(f"changes over {self.change_limit} octets")
                        changes.append(answer)
                    elif isinstance(answer, Reply) and answer.code == "p":
                        budget.reschedule(asyncio.get_running_loop().time() + self.content_timeout)
                    elif isinstance(answer, Reply) and answer.code not in ("s",):
                        return answer, changes
                    else:
                        raise MilterProtocolError(f"{answer!r} at the end of the body")
        except (OSError, TimeoutError, MilterProtocolError) as exc:
            self.close()
            raise MilterError(f"end of body: {type(exc).__name__} {exc}".rstrip()) from None

    async def abort(self) -> None:
        """SMFIC_ABORT: the message is over without an end (RSET, a refusal); the conversation goes on."""
        if not self.closed:
            self._writer.write(encode(Command.ABORT))
            self._skip_body = False

    def quit(self) -> None:
        if not self.closed:
            self._writer.write(encode(Command.QUIT))
            self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._writer.close()

    # -- the wire ----------------------------------------------------------------------

    async def _step(self, stage: bytes, packet: bytes, never: int, unanswered: int, macros: Macros) -> Reply | None:
        flags = self.negotiated.flags
        if flags & never:
            return None
        if macros:
            self._writer.write(encode_macros(stage, macros))
        return await self._send(packet, not flags & unanswered, self.command_timeout)

    async def _send(self, packet: bytes, answered: bool, timeout: float) -> Reply | None:
        if self.closed:
            raise MilterError("the conversation is over")
        self._writer.write(packet)
        if not answered:
            return None
        try:
            async with asyncio.timeout(timeout) as budget:
                await self._writer.drain()
                while True:
                    answer = await self._read_one()
                    if isinstance(answer, Reply) and answer.code == "p":
                        budget.reschedule(asyncio.get_running_loop().time() + timeout)
                        continue
                    if not isinstance(answer, Reply):
                        raise MilterProtocolError(f"{answer!r} before the end of the body")
                    return answer
        except (OSError, TimeoutError, MilterProtocolError) as exc:
            self.close()
            raise MilterError(f"{type(exc).__name__} {exc}".rstrip()) from None

    async def _read_one(self) -> Reply | Modification | Negotiated:
        while True:
            answer = self._replies.next()
            if answer is not None:
                return answer
            data = await self._reader.read(65536)
            if not data:
                raise MilterProtocolError("the milter closed the connection")
            self._replies.feed(data)
