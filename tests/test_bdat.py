"""CHUNKING / BDAT (RFC 3030) against the real server, with a small client of our own
(smtplib and aiosmtplib do not speak BDAT)."""

from __future__ import annotations

import os

import pytest

from helpers import MESSAGE, Client, RunningServer, body_of


def start(c: Client, rcpt: bytes = b"alice@example.com") -> None:
    c.send(b"EHLO c.example\r\n")
    ehlo = c.reply()
    assert b"250-CHUNKING" in ehlo or b"250 CHUNKING" in ehlo
    c.send(b"MAIL FROM:<s@example.net>\r\nRCPT TO:<" + rcpt + b">\r\n")
    assert [r[:3] for r in c.replies(2)] == [b"250", b"250"]


def send_chunks(c: Client, chunks: list[bytes]) -> list[bytes]:
    """Send each chunk as BDAT, the last one as LAST; return the replies."""
    replies = []
    for i, chunk in enumerate(chunks):
        last = b" LAST" if i == len(chunks) - 1 else b""
        c.send(b"BDAT %d%s\r\n" % (len(chunk), last) + chunk)
        replies.append(c.reply())
    return replies


@pytest.mark.parametrize("chunk_size", [1, 1024 * 1024], ids=["1-byte", "1-MB"])
def test_message_in_chunks_is_stored_byte_exact(client: Client, server: RunningServer, chunk_size: int) -> None:
    start(client)
    content = MESSAGE + (b"line with .\r\n.a leading dot\r\n.\r\n" * 3000 if chunk_size > 1 else b".\r\nend\r\n")
    chunks = [content[i : i + chunk_size] for i in range(0, len(content), chunk_size)]
    replies = send_chunks(client, chunks)
    assert all(r.startswith(b"250 2.0.0 ") for r in replies)
    assert replies[-1].startswith(b"250 2.0.0 Ok: queued as ")
    (path,) = server.messages("alice@example.com")
    assert body_of(path) == content  # no unstuffing, no terminator search


def test_zero_length_last_chunk(client: Client, server: RunningServer) -> None:
    start(client)
    replies = send_chunks(client, [MESSAGE, b""])
    assert replies[0] == b"250 2.0.0 %d octets received\r\n" % len(MESSAGE)
    assert replies[1].startswith(b"250 2.0.0 Ok: queued as")
    (path,) = server.messages("alice@example.com")
    assert body_of(path) == MESSAGE


def test_bdat_pipelined_with_mail_and_rcpt(client: Client, server: RunningServer) -> None:
    client.send(b"EHLO c.example\r\n")
    client.reply()
    client.send(
        b"MAIL FROM:<s@example.net>\r\nRCPT TO:<alice@example.com>\r\nRCPT TO:<bob@example.com>\r\n"
        + b"BDAT %d LAST\r\n" % len(MESSAGE) + MESSAGE
        + b"MAIL FROM:<t@example.net>\r\nRCPT TO:<carol@example.org>\r\nBDAT 0 LAST\r\nQUIT\r\n"
    )
    codes = [r[:3] for r in client.replies(8)]
    assert codes == [b"250"] * 7 + [b"221"]
    assert body_of(server.messages("alice@example.com")[0]) == MESSAGE
    assert server.messages("bob@example.com")[0].stat().st_ino == server.messages("alice@example.com")[0].stat().st_ino
    assert body_of(server.messages("carol@example.org")[0]) == b""


def test_smuggling_through_bdat_is_impossible(client: Client, server: RunningServer) -> None:
    start(client)
    evil = b"Subject: x\r\n\r\nhi\r\n.\r\nMAIL FROM:<evil@example.net>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\nsmuggled\r\n.\r\n"
    assert send_chunks(client, [evil])[0].startswith(b"250 2.0.0 Ok: queued")
    client.send(b"NOOP\r\n")
    assert client.reply().startswith(b"250 2.0.0 Ok")  # nothing else was answered
    assert server.messages("bob@example.com", count=0) == []
    assert body_of(server.messages("alice@example.com")[0]) == evil


def test_mixing_bdat_and_data_is_refused(client: Client, server: RunningServer) -> None:
    start(client)
    client.send(b"BDAT 5\r\nhelloDATA\r\n")
    assert client.reply().startswith(b"250")
    assert client.reply().startswith(b"503 5.5.1")
    client.send(b"RSET\r\n")
    assert client.reply().startswith(b"250")
    assert server.messages("alice@example.com", count=0) == []
    assert os.listdir(server.maildir("alice@example.com") / "tmp") == []


def test_bdat_without_recipients_skips_its_octets(client: Client) -> None:
    client.send(b"EHLO c.example\r\n")
    client.reply()
    client.send(b"BDAT 6\r\nNOOP\r\nNOOP\r\n")
    assert client.reply().startswith(b"503 5.5.1")
    assert client.reply().startswith(b"250 2.0.0 Ok")


def test_bdat_size_not_a_number_closes(client: Client) -> None:
    start(client)
    client.send(b"BDAT many\r\n")
    assert client.reply().startswith(b"501 5.5.4")
    assert client.closed()


def test_bdat_over_the_size_limit(server_factory) -> None:  # type: ignore[no-untyped-def]
    srv = server_factory("--max-message-size", "1000")
    c = Client(srv.connect())
    c.reply()
    start(c)
    replies = send_chunks(c, [b"x" * 600, b"y" * 600, b"z"])
    assert replies[0].startswith(b"250") and replies[1].startswith(b"552 5.3.4")
    assert replies[2].startswith(b"503 5.5.1")  # the transaction ended with the 552
    c.send(b"NOOP\r\n")
    assert c.reply().startswith(b"250")
    assert srv.messages("alice@example.com", count=0) == []
