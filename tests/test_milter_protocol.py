"""The milter codec and one conversation: unit tests, faults from a fake milter, and real OpenDKIM.

OpenDKIM (Debian's opendkim) runs as a signing milter started by the test;
the conversation signs a message through it, and dkimpy verifies the
signature against the key OpenDKIM's own genkey made.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Awaitable, Callable, Iterator

import pytest

from dnsserver import free_port
from opendkimd import signing_opendkim

from fastsmtp.milter.client import MilterConnection, MilterError, parse_endpoint
from fastsmtp.milter.protocol import (
    MAX_BODY_CHUNK,
    Action,
    Flag,
    MilterProtocolError,
    Modification,
    Negotiated,
    Replies,
    Reply,
    body_chunks,
    encode,
    encode_connect,
    encode_macros,
    encode_strings,
)


def packet(code: bytes, data: bytes = b"") -> bytes:
    return struct.pack("!I", 1 + len(data)) + code + data


# -- the codec -----------------------------------------------------------------------


def test_commands_on_the_wire() -> None:
    assert encode(b"N") == b"\0\0\0\x01N"
    assert encode_strings(b"M", [b"<a@example.net>", b"SIZE=10"]) == packet(b"M", b"<a@example.net>\0SIZE=10\0")
    assert encode_connect(b"client.example", "192.0.2.1", 25) == packet(
        b"C", b"client.example\x004\x00\x19192.0.2.1\0")
    assert encode_connect(b"h", "2001:db8::1", 2525)[5:] == b"h\x006\x09\xdd2001:db8::1\0"
    assert encode_connect(b"h", "unknown", 0) == packet(b"C", b"h\0U")
    assert encode_macros(b"C", [("j", "mx.example"), ("{daemon_name}", "fastsmtp")]) == packet(
        b"D", b"Cj\0mx.example\0{daemon_name}\0fastsmtp\0")
    # A NUL from a client never shifts the fields.
    assert encode_strings(b"H", [b"evil\0name"]) == packet(b"H", b"evilname\0")


def test_body_goes_in_chunks_of_at_most_65535() -> None:
    body = bytes(range(256)) * 600  # 153,600 octets
    chunks = list(body_chunks(body))
    sizes = [struct.unpack("!I", c[:4])[0] - 1 for c in chunks]
    assert sizes == [MAX_BODY_CHUNK, MAX_BODY_CHUNK, len(body) - 2 * MAX_BODY_CHUNK]
    assert b"".join(c[5:] for c in chunks) == body


@pytest.mark.parametrize(
    "wire, expected",
    [
        (packet(b"a"), Reply("a")),
        (packet(b"c"), Reply("c")),
        (packet(b"d"), Reply("d")),
        (packet(b"r"), Reply("r")),
        (packet(b"t"), Reply("t")),
        (packet(b"y", b"550 5.7.1 go away\0"), Reply("y", 550, "5.7.1 go away")),
        (packet(b"y", b"451-4.7.1 first\r\n451 4.7.1 second\0"), Reply("y", 451, "4.7.1 first\r\n451 4.7.1 second")),
        (packet(b"h", b"X-Spam\0yes\0"), Modification("h", "X-Spam", b"yes")),
        (packet(b"i", b"\0\0\0\x01X-First\0v\0"), Modification("i", "X-First", b"v", 1)),
        (packet(b"m", b"\0\0\0\x02Subject\0\0"), Modification("m", "Subject", b"", 2)),
        (packet(b"b", b"new body\r\n"), Modification("b", value=b"new body\r\n")),
        (packet(b"+", b"<bob@example.com>\0"), Modification("+", "<bob@example.com>")),
        (packet(b"2", b"<bob@example.com>\0NOTIFY=NEVER\0"), Modification("2", "<bob@example.com>", args="NOTIFY=NEVER")),
        (packet(b"-", b"<alice@example.com>\0"), Modification("-", "<alice@example.com>")),
        (packet(b"e", b"<new@example.net>\0"), Modification("e", "<new@example.net>")),
        (packet(b"q", b"spam\0"), Modification("q", "spam")),
        (packet(b"O", struct.pack("!III", 6, 0x1, 0x80) + struct.pack("!I", 2) + b"{mail_addr} i\0"),
         Negotiated(6, 1, 0x80, {2: ("{mail_addr}", "i")})),
    ],
)
def test_every_reply_parses(wire: bytes, expected: object) -> None:
    replies = Replies()
    for i in range(len(wire)):  # one octet at a time: a packet split anywhere
        assert replies.next() is None
        replies.feed(wire[i : i + 1])
    assert replies.next() == expected
    assert replies.next() is None and replies.buffered == 0


@pytest.mark.parametrize(
    "wire",
    [
        b"\0\0\0\0",  # no code
        struct.pack("!I", 2 << 20) + b"b",  # a packet too big to take
        packet(b"Z"),  # no such reply
        packet(b"a", b"x"),  # a verdict with data
        packet(b"y", b"250 ok\0"),  # a replycode must refuse
        packet(b"y", b"55\0"),
        packet(b"h", b"X-No-Value\0"),
        packet(b"h", b"Bad Name\0v\0"),
        packet(b"i", b"\0\0"),
        packet(b"O", b"\0\0\0\x06"),
        packet(b"O", struct.pack("!III", 1, 0, 0)),
        packet(b"O", struct.pack("!III", 6, 0, 0) + b"\0\0\0\x09x\0"),
    ],
)
def test_garbage_is_a_protocol_error(wire: bytes) -> None:
    replies = Replies()
    replies.feed(wire)
    with pytest.raises(MilterProtocolError):
        replies.next()


def test_endpoints() -> None:
    assert parse_endpoint("inet:127.0.0.1:8891") == ("127.0.0.1", 8891)
    assert parse_endpoint("inet:8891@127.0.0.1") == ("127.0.0.1", 8891)
    assert parse_endpoint("inet:[::1]:8891") == ("::1", 8891)
    assert parse_endpoint("unix:/run/milter.sock") == ("unix", "/run/milter.sock")
    for bad in ("8891", "inet:", "inet:host", "inet:host:99999", "tcp:1.2.3.4:5"):
        with pytest.raises(ValueError):
            parse_endpoint(bad)


# -- faults, from a fake milter (fault injection only) -------------------------------


def run_with_fake(behaviour: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
                  conversation: Callable[[str], Awaitable[object]]) -> object:
    async def main() -> object:
        server = await asyncio.start_server(behaviour, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            async with asyncio.timeout(20):
                return await conversation(f"inet:127.0.0.1:{port}")
        finally:
            server.close()

    return asyncio.run(main())


async def _read_packet(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    (size,) = struct.unpack("!I", await reader.readexactly(4))
    data = await reader.readexactly(size)
    return data[:1], data[1:]


def _negotiating(then: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]], flags: int = 0):  # type: ignore[no-untyped-def]
    async def behaviour(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        code, _ = await _read_packet(reader)
        assert code == b"O"
        writer.write(packet(b"O", struct.pack("!III", 6, Action.ADD_HEADERS, flags)))
        try:
            await then(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    return behaviour


@pytest.mark.parametrize("fault", ["dies", "sleeps", "garbage", "modifies too early"])
def test_a_broken_milter_ends_the_conversation_with_a_milter_error(fault: str) -> None:
    async def then(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_packet(reader)  # connect
        if fault == "dies":
            return
        if fault == "sleeps":
            await asyncio.sleep(5)
        elif fault == "garbage":
            writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        else:
            writer.write(packet(b"h", b"X-Early\0v\0"))
        await asyncio.sleep(5)

    async def conversation(endpoint: str) -> object:
        conn = await MilterConnection.open(endpoint, Action.ALL, command_timeout=0.5)
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(MilterError):
            await conn.connect(b"client.example", "192.0.2.1", 40000)
        assert conn.closed
        return loop.time() - start

    took = run_with_fake(_negotiating(then), conversation)
    assert isinstance(took, float) and took < 3, "bounded by the command timeout"


def test_a_milter_that_is_down_is_a_milter_error() -> None:
    port = free_port()

    async def main() -> None:
        with pytest.raises(MilterError):
            await MilterConnection.open(f"inet:127.0.0.1:{port}", Action.ALL, connect_timeout=2)

    asyncio.run(main())


def test_steps_the_milter_does_not_want_are_not_sent() -> None:
    seen: list[bytes] = []

    async def then(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            code, _ = await _read_packet(reader)
            seen.append(code)
            if code == b"E":
                writer.write(packet(b"a"))
            elif code == b"R":
                writer.write(packet(b"y", b"550 5.1.1 no such user\0"))
            elif code in (b"M",):
                writer.write(packet(b"c"))

    async def conversation(endpoint: str) -> object:
        conn = await MilterConnection.open(endpoint, Action.ALL)
        assert await conn.connect(b"h", "192.0.2.1", 1) is None  # NO_CONNECT
        assert await conn.helo(b"client.example") is None  # NO_HELO
        assert await conn.mail(b"a@example.net") == Reply("c")
        assert await conn.rcpt(b"x@example.com") == Reply("y", 550, "5.1.1 no such user")
        assert await conn.header(b"Subject", b"hi") is None  # NR_HEADER: sent, not awaited
        assert await conn.body(b"text\r\n") is None  # NO_BODY
        verdict, changes = await conn.end_of_body()
        conn.quit()
        return verdict, changes

    flags = Flag.NO_CONNECT | Flag.NO_HELO | Flag.NR_HEADER | Flag.NO_BODY
    assert run_with_fake(_negotiating(then, flags), conversation) == (Reply("a"), [])
    assert seen[:4] == [b"M", b"R", b"L", b"E"]


# -- real OpenDKIM --------------------------------------------------------------------


@pytest.fixture(scope="module")
def opendkim_signer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, str]]:
    """OpenDKIM in sign mode for signed.example on a loopback port: (port, its DNS key record)."""
    with signing_opendkim(tmp_path_factory.mktemp("opendkim-milter")) as started:
        yield started


MESSAGE = (b"From: Alice <alice@signed.example>\r\nTo: bob@example.com\r\nSubject: through a milter\r\n"
           b"Date: Wed, 02 Dec 2026 10:00:00 +0000\r\nMessage-ID: <m1@signed.example>\r\n\r\n")


def test_opendkim_signs_through_the_conversation(opendkim_signer: tuple[int, str]) -> None:
    dkim = pytest.importorskip("dkim")
    port, record = opendkim_signer
    head, _, _ = MESSAGE.partition(b"\r\n\r\n")
    body = b"A body line.\r\n" * 10000  # 140,000 octets: three body packets

    async def conversation(endpoint: str) -> tuple[Reply, list[Modification], Negotiated]:
        conn = await MilterConnection.open(endpoint, Action.ALL)
        try:
            macros = [("j", "mx.signed.example"), ("{daemon_name}", "fastsmtp")]
            assert (await conn.connect(b"localhost", "127.0.0.1", 40000, macros)) in (None, Reply("c"))
            assert (await conn.helo(b"client.example")) in (None, Reply("c"))
            assert (await conn.mail(b"alice@signed.example", macros=[("i", "Q1"), ("{mail_addr}",
                                                                                "alice@signed.example")]))\
                in (None, Reply("c"))
            assert (await conn.rcpt(b"bob@example.com", macros=[("{rcpt_addr}", "bob@example.com")])) in (
                None, Reply("c"))
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                assert (await conn.header(name, value.strip())) in (None, Reply("c"))
            assert (await conn.end_of_headers()) in (None, Reply("c"))
            assert await conn.body(body) is None
            verdict, changes = await conn.end_of_body()
            return verdict, changes, conn.negotiated
        finally:
            conn.quit()

    verdict, changes, negotiated = asyncio.run(asyncio.wait_for(conversation(f"inet:127.0.0.1:{port}"), 30))
    assert verdict.code in ("a", "c")
    added = [c for c in changes if c.code in ("h", "i") and c.name == "DKIM-Signature"]
    assert len(added) == 1, changes
    signed = b"DKIM-Signature: " + added[0].value.replace(b"\n", b"\r\n").replace(b"\r\r\n", b"\r\n").lstrip() \
        + b"\r\n" + MESSAGE + body
    assert dkim.verify(signed, dnsfunc=lambda name, timeout=5: record.encode())
    print(f"\nOpenDKIM negotiated version {negotiated.version}, actions 0x{negotiated.actions:x}, "
          f"steps 0x{negotiated.flags:x}")
