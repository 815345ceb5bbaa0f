"""fastsmtp's LMTP client against a real Dovecot (dovecotlmtp.py): delivery, Sieve, quota, failures, proxy.

Every Dovecot here is one of the tests' own, on 127.0.0.1 and a unix
socket in its own temporary root; every client call has its timeouts, and
the tests that wait for a failure assert how long it took.  The tests skip
when dovecot-lmtpd, dovecot-imapd or dovecot-sieve is not installed.

What Dovecot adds to a delivered message, and nothing else: ``Return-Path``
(the MAIL FROM), ``Delivered-To`` (only when the transaction had one
recipient) and its ``Received`` (RFC 5321 §4.4); below them every octet is
what was sent.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator, Coroutine, TypeVar

import pytest

from dovecotlmtp import (
    FULL_USER,
    LIST_ID,
    QUOTA_USER,
    SIEVE_USER,
    LmtpDovecot,
    ProxyDovecot,
    imap_messages,
)
from dovecotrun import free_port
from fastsmtp.lmtp.client import (
    LMTPClient,
    LMTPTemporaryError,
    RecipientResult,
    is_over_quota,
    is_unknown_user,
)

# Lines that start with dots (stuffed on the wire), 8-bit text, a long body.
MESSAGE = (
    b"From: Sender <sender@example.net>\r\n"
    b"To: Alice <alice@example.com>\r\n"
    b"Subject: delivered over LMTP\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"Hello Alice.\r\n"
    b".a line that starts with a dot\r\n"
    b"..and one with two\r\n"
    b".\r\n"
    b"Gr\xc3\xbc\xc3\x9fe aus K\xc3\xb6ln.\r\n"
    + b"".join(b"line %05d of a longer body\r\n" % i for i in range(3000))
)
SENDER = "sender@example.net"
T = TypeVar("T")
TIMEOUTS = {"connect_timeout": 5.0, "command_timeout": 10.0, "data_timeout": 20.0}


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run one test's client side, bounded as a whole too."""
    return asyncio.run(asyncio.wait_for(coro, 60))


def header_names(stored: bytes, sent: bytes) -> list[str]:
    """The fields Dovecot put above what was sent (continuation lines folded in)."""
    assert stored.endswith(sent), stored[:400]
    added = stored[: len(stored) - len(sent)]
    assert added.endswith(b"\r\n") or not added
    return [line.split(b":", 1)[0].decode() for line in added.split(b"\r\n")[:-1] if line[:1] not in (b" ", b"\t")]


def added_fields(stored: bytes, sent: bytes) -> dict[str, str]:
    added = stored[: len(stored) - len(sent)].decode()
    unfolded = added.replace("\r\n\t", " ").replace("\r\n ", " ")
    return dict(line.split(": ", 1) for line in unfolded.split("\r\n") if line)


def test_delivery_over_the_unix_socket_is_byte_exact(lmtp_dovecot: LmtpDovecot) -> None:
    async def go() -> list[RecipientResult]:
        async with LMTPClient([lmtp_dovecot.unix_target], lhlo_name="mx.test.example", **TIMEOUTS) as client:
            return await client.deliver(SENDER, ["alice@example.com"], MESSAGE)

    [result] = run(go())
    assert result.delivered and (result.code, result.enhanced) == (250, "2.0.0"), result
    assert result.recipient == b"alice@example.com"
    [stored] = imap_messages(lmtp_dovecot, "alice@example.com")
    assert header_names(stored, MESSAGE) == ["Return-Path", "Delivered-To", "Received"]
    fields = added_fields(stored, MESSAGE)
    assert fields["Return-Path"] == f"<{SENDER}>"
    assert fields["Delivered-To"] == "alice@example.com"
    # Over the unix socket there is no client address to write.
    assert fields["Received"].startswith("from mx.test.example by lmtp.test.example with LMTP id ")
    assert f"(envelope-from <{SENDER}>) for <alice@example.com>;" in fields["Received"]
    assert lmtp_dovecot.problems() == [], lmtp_dovecot.log_text()


def test_several_recipients_get_one_result_each_over_tcp(lmtp_dovecot: LmtpDovecot) -> None:
    recipients = ["alice@example.com", "nobody@example.com", "bob@example.com", "alice@example.com"]

    async def go() -> list[RecipientResult]:
        async with LMTPClient([lmtp_dovecot.tcp_target], lhlo_name="mx.test.example", **TIMEOUTS) as client:
            return await client.deliver(SENDER, recipients, MESSAGE)

    results = run(go())
    assert [(r.recipient, r.code, r.enhanced) for r in results] == [
        (b"alice@example.com", 250, "2.0.0"),
        (b"nobody@example.com", 550, "5.1.1"),
        (b"bob@example.com", 250, "2.0.0"),
        # The same recipient twice: Dovecot answers each RCPT, and stores one copy.
        (b"alice@example.com", 250, "2.0.0"),
    ]
    assert is_unknown_user(results[1])
    for user in ("alice@example.com", "bob@example.com"):
        stored = imap_messages(lmtp_dovecot, user)
        assert len(stored) == 1
        for message in stored:
            # More than one recipient: no Delivered-To, and no "for <...>" in Received.
            assert header_names(message, MESSAGE) == ["Return-Path", "Received"]


def test_a_message_in_chunks_and_dots_after_bare_line_ends(lmtp_dovecot: LmtpDovecot) -> None:
    """Streamed content arrives whole; a dot after a bare LF is content, not the end (it is stuffed)."""
    tricky = b"Subject: dots\r\n\r\nbare LF then a dot:\n.\r\nbare CR then a dot:\r.\r\nstill here\r\n"

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(MESSAGE), 1000):
            yield MESSAGE[i : i + 1000]

    async def go() -> tuple[list[RecipientResult], list[RecipientResult]]:
        async with LMTPClient([lmtp_dovecot.tcp_target], lhlo_name="mx.test.example", **TIMEOUTS) as client:
            streamed = await client.deliver(SENDER, ["alice@example.com"], chunks())
            odd = await client.deliver(SENDER, ["bob@example.com"], tricky)
            return streamed, odd

    streamed, odd = run(go())
    assert [r.code for r in streamed + odd] == [250, 250]
    [stored] = imap_messages(lmtp_dovecot, "alice@example.com")
    assert stored.endswith(b"\r\n" + MESSAGE)
    [stored] = imap_messages(lmtp_dovecot, "bob@example.com")
    # Dovecot ends a line at a bare LF (and stores CRLF); the dot survives, nothing is cut.
    assert stored.endswith(b"\r\n\r\nbare LF then a dot:\r\n.\r\nbare CR then a dot:\r.\r\nstill here\r\n")


def test_sieve_fileinto_puts_the_message_in_its_folder(lmtp_dovecot: LmtpDovecot) -> None:
    listed = b"List-Id: Test list <" + LIST_ID.encode() + b">\r\n" + MESSAGE
    plain = MESSAGE

    async def go() -> list[RecipientResult]:
        async with LMTPClient([lmtp_dovecot.unix_target], lhlo_name="mx.test.example", **TIMEOUTS) as client:
            return await client.deliver(SENDER, [SIEVE_USER], listed) + await client.deliver(
                SENDER, [SIEVE_USER], plain)

    assert [r.code for r in run(go())] == [250, 250]
    [filed] = imap_messages(lmtp_dovecot, SIEVE_USER, "Lists")
    assert filed.endswith(b"\r\n" + listed)
    [kept] = imap_messages(lmtp_dovecot, SIEVE_USER)
    assert kept.endswith(b"\r\n" + plain) and b"List-Id" not in kept
    assert "fileinto action: stored mail into mailbox 'Lists'" in lmtp_dovecot.log_text()


def probes(dc: LmtpDovecot, recipients: list[str]) -> list[tuple[int, str]]:
    async def go() -> list[tuple[int, str]]:
        async with LMTPClient([dc.tcp_target], lhlo_name="mx.test.example", **TIMEOUTS) as client:
            out = []
            for r in recipients:
                reply = await client.probe(r)
                out.append((reply.code, reply.enhanced))
            return out

    return run(go())


def test_probe_over_quota_552_and_unknown_user_550_at_rcpt(lmtp_dovecot: LmtpDovecot) -> None:
    """quota_full_tempfail = no (Dovecot's default): a full mailbox is 552 5.2.2 at RCPT."""
    assert probes(lmtp_dovecot, [FULL_USER, "nobody@example.com", "alice@example.com", QUOTA_USER]) == [
        (552, "5.2.2"), (550, "5.1.1"), (250, "2.1.5"), (250, "2.1.5")]
    # Four probes, one connection (LHLO once; MAIL, RCPT, RSET each).
    assert lmtp_dovecot.log_text().count("Connect from 127.0.0.1") == 2  # the fixture's banner check + ours


def test_probe_over_quota_452_with_quota_full_tempfail(lmtp_dovecot_tempfail: LmtpDovecot) -> None:
    assert probes(lmtp_dovecot_tempfail, [FULL_USER, "alice@example.com"]) == [(452, "4.2.2"), (250, "2.1.5")]


def test_a_message_over_what_is_left_of_the_quota_is_refused_after_data(lmtp_dovecot: LmtpDovecot) -> None:
    big = b"Subject: big\r\n\r\n" + b"x" * 3000 + b"\r\n"
    small = b"Subject: small\r\n\r\nhi\r\n"

    async def go() -> list[RecipientResult]:
        async with LMTPClient([lmtp_dovecot.tcp_target], lhlo_name="mx.test.example", **TIMEOUTS) as client:
            return (await client.deliver(SENDER, [QUOTA_USER, "alice@example.com"], big)
                    + await client.deliver(SENDER, [QUOTA_USER], small))

    over, alice, fits = run(go())
    assert (over.code, over.enhanced) == (552, "5.2.2") and is_over_quota(over) and over.permanent
    assert alice.delivered and fits.delivered
    assert len(imap_messages(lmtp_dovecot, QUOTA_USER)) == 1


def test_dovecot_stopped_is_a_prompt_temporary_failure(lmtp_dovecot: LmtpDovecot) -> None:
    async def go() -> tuple[float, float, float]:
        client = LMTPClient([lmtp_dovecot.tcp_target, lmtp_dovecot.unix_target], lhlo_name="mx.test.example",
                            **TIMEOUTS)
        try:
            assert (await client.probe("alice@example.com")).code == 250  # a connection is kept
            lmtp_dovecot.stop()
            t0 = time.monotonic()
            with pytest.raises(LMTPTemporaryError) as err:
                await client.deliver(SENDER, ["alice@example.com"], MESSAGE)
            assert err.value.partial == []
            t1 = time.monotonic()
            with pytest.raises(LMTPTemporaryError):
                await client.probe("alice@example.com")
            t2 = time.monotonic()
            assert "127.0.0.1" in str(err.value) and "unix:" in str(err.value), str(err.value)
            return t0, t1, t2
        finally:
            await client.close()

    t0, t1, t2 = run(go())
    # Refused at once: well within the 5 s connect timeout.
    assert t1 - t0 < 3 and t2 - t1 < 3, (t1 - t0, t2 - t1)


def test_failover_to_the_second_target(lmtp_dovecot: LmtpDovecot) -> None:
    dead = f"lmtp:127.0.0.1:{free_port()}"  # nothing listens there

    async def go() -> tuple[list[RecipientResult], list[RecipientResult], int]:
        async with LMTPClient([dead, lmtp_dovecot.tcp_target], lhlo_name="mx.test.example",
                              retry_after=60, **TIMEOUTS) as client:
            first = await client.deliver(SENDER, ["alice@example.com"], MESSAGE)
            # The dead one is now tried after the other.
            second = await client.deliver(SENDER, ["bob@example.com"], MESSAGE)
            order = client._order()
            return first, second, [str(t) for t in order].index(dead)

    first, second, where = run(go())
    assert [r.code for r in first + second] == [250, 250]
    assert where == 1
    assert len(imap_messages(lmtp_dovecot, "alice@example.com")) == 1
    assert len(imap_messages(lmtp_dovecot, "bob@example.com")) == 1


def test_the_proxy_routes_each_user_to_its_backend(proxy_dovecot: ProxyDovecot) -> None:
    px = proxy_dovecot
    users = ["alice@example.com", "bob@example.com"]

    async def go() -> list[RecipientResult]:
        async with LMTPClient([px.proxy.tcp_target], lhlo_name="mx.test.example", **TIMEOUTS) as client:
            assert (await client.probe("nobody@example.com")).code == 550
            return await client.deliver(SENDER, users, MESSAGE)

    assert [r.code for r in run(go())] == [250, 250]
    for user in users:
        home, other = px.backend_of(user), px.backends[1 - px.routes[user]]
        [path] = home.files(user)
        assert path.read_bytes().replace(b"\n", b"\r\n").endswith(b"\r\n" + MESSAGE)
        assert other.files(user) == []
    for dc in (px.proxy, *px.backends):
        assert dc.problems() == [], dc.log_text()
