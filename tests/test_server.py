"""The real server on 127.0.0.1, real clients, real files: the reply table of DESIGN.md.

Each test runs under uvloop and under stdlib asyncio (the ``server``
fixture is parametrized over both loops).
"""

from __future__ import annotations

import asyncio
import mailbox
import os
import shutil
import signal
import smtplib
import socket
import time
from pathlib import Path

import aiosmtplib
import pytest

from helpers import HOSTNAME, MESSAGE, Client, RunningServer, body_of, greeted, never, transaction, wait_for

# -- the greeting and EHLO ---------------------------------------------------------


def test_greeting_and_ehlo(server: RunningServer) -> None:
    c = Client(server.connect())
    assert c.reply() == f"220 {HOSTNAME} ESMTP fastsmtp\r\n".encode()
    c.send(b"EHLO client.example\r\n")
    lines = c.reply().split(b"\r\n")[:-1]
    assert lines[0] == f"250-{HOSTNAME}".encode()
    keywords = {line[4:].split(b" ")[0] for line in lines[1:]}
    assert {b"PIPELINING", b"SIZE", b"8BITMIME", b"SMTPUTF8", b"ENHANCEDSTATUSCODES"} <= keywords
    assert b"250 " in lines[-1][:4] and b"STARTTLS" not in keywords
    assert f"SIZE {25 * 1024 * 1024}".encode() in b"\n".join(lines)
    c.send(b"HELO client.example\r\n")
    assert c.reply() == f"250 {HOSTNAME}\r\n".encode()
    c.close()


# Each row: the commands that bring the session into a state, the command
# under test and its exact reply, then a probe whose reply shows the state
# the session is in afterwards (a refused command changes nothing,
# RFC 5321 §4.1.4).  Without the EHLO the RCPT and DATA rows would test
# GREETED, not READY: both states answer them with the same 503.
GREETED_PROBE = (b"MAIL FROM:<p@example.net>", b"503 5.5.1 Error: send HELO/EHLO first\r\n")
READY_PROBE = (b"MAIL FROM:<p@example.net>", b"250 2.1.0 Ok\r\n")
MAIL_PROBE = (b"MAIL FROM:<p@example.net>", b"503 5.5.1 Error: nested MAIL command\r\n")
NEED_MAIL = b"503 5.5.1 Error: need MAIL command\r\n"


@pytest.mark.parametrize(
    "setup,sent,expected,probe",
    [
        ([], b"HELO", b"501 5.5.4 Syntax: HELO hostname\r\n", GREETED_PROBE),
        ([], b"EHLO", b"501 5.5.4 Syntax: EHLO hostname\r\n", GREETED_PROBE),
        ([], b"MAIL FROM:<a@example.net>", b"503 5.5.1 Error: send HELO/EHLO first\r\n", GREETED_PROBE),
        ([], b"RCPT TO:<alice@example.com>", NEED_MAIL, GREETED_PROBE),  # before HELO
        ([b"EHLO c.example"], b"RCPT TO:<alice@example.com>", NEED_MAIL, READY_PROBE),  # before MAIL
        ([], b"DATA", NEED_MAIL, GREETED_PROBE),
        ([b"EHLO c.example"], b"DATA", NEED_MAIL, READY_PROBE),
        # Out-of-order BDAT octets are read and dropped (RFC 3030 §2): send them.
        ([b"EHLO c.example"], b"BDAT 4 LAST\r\nab", NEED_MAIL, READY_PROBE),
        ([b"EHLO c.example", b"MAIL FROM:<a@example.net>"], b"DATA", b"503 5.5.1 Error: no valid recipients\r\n", MAIL_PROBE),
        ([], b"NOOP", b"250 2.0.0 Ok\r\n", GREETED_PROBE),
        ([], b"RSET", b"250 2.0.0 Ok\r\n", GREETED_PROBE),  # RSET before HELO stays in GREETED
        ([b"EHLO c.example", b"MAIL FROM:<a@example.net>"], b"RSET", b"250 2.0.0 Ok\r\n", READY_PROBE),
        ([], b"VRFY alice", b"252 2.5.0", GREETED_PROBE),
        ([], b"HELP", b"214 ", GREETED_PROBE),
        ([], b"WHATEVER", b"500 5.5.2 Error: command not recognized\r\n", GREETED_PROBE),
        ([b"EHLO c.example"], b"WHATEVER", b"500 5.5.2 Error: command not recognized\r\n", READY_PROBE),
        ([], b"NOOP " + b"x" * 2000, b"500 5.5.2 Error: line too long\r\n", GREETED_PROBE),
    ],
    ids=lambda v: v.decode()[:30] if isinstance(v, bytes) else None,
)
def test_reply_table_outside_a_transaction(
    client: Client, setup: list[bytes], sent: bytes, expected: bytes, probe: tuple[bytes, bytes]
) -> None:
    for cmd in setup:
        client.send(cmd + b"\r\n")
        assert client.reply().startswith(b"250"), cmd
    client.send(sent + b"\r\n")
    reply = client.reply()
    assert reply.startswith(expected), reply
    client.send(probe[0] + b"\r\n")
    assert client.reply() == probe[1]  # the state is what it was
    client.send(b"NOOP\r\n")
    assert client.reply().startswith(b"250")  # the session survives


@pytest.mark.parametrize(
    "commands,expected",
    [
        ([b"MAIL FROM:<a@example.net>", b"MAIL FROM:<a@example.net>"], b"503 5.5.1"),  # nested
        ([b"MAIL FROM:a@example.net"], b"501 5.5.4"),
        ([b"MAIL FROM:<a..b@example.net>"], b"553 5.1.7"),
        ([b"MAIL FROM:<a@example.net> FOO=1"], b"555 5.5.4"),
        ([b"MAIL FROM:<a@example.net> SIZE=999999999999"], b"552 5.3.4"),
        ([b"MAIL FROM:<a@example.net>", b"RCPT TO:alice@example.com"], b"501 5.5.4"),
        ([b"MAIL FROM:<a@example.net>", b"RCPT TO:<alice@@example.com>"], b"553 5.1.3"),
        ([b"MAIL FROM:<a@example.net>", b"RCPT TO:<nobody@example.com>"], b"550 5.1.1"),
        ([b"MAIL FROM:<a@example.net>", b"RCPT TO:<alice@elsewhere.example>"], b"550 5.7.1"),
        ([b"MAIL FROM:<a@example.net>", b"RCPT TO:<../alice@example.com>"], b"553 5.1.3"),
        ([b"MAIL FROM:<a@example.net>", b'RCPT TO:<"../../etc"@example.com>'], b"553 5.1.3"),
        ([b"MAIL FROM:<a@example.net>", b'RCPT TO:<"a/b"@example.com>'], b"553 5.1.3"),
        ([b"MAIL FROM:<a@example.net>", b"RCPT TO:<.alice@example.com>"], b"553 5.1.3"),
        ([b"MAIL FROM:<a@example.net>", b"RCPT TO:<alice@..>"], b"553 5.1.3"),
        ([b"MAIL FROM:<a@example.net>", b"DATA"], b"503 5.5.1"),  # no valid recipient
        ([b"MAIL FROM:<a@example.net>", b"RCPT TO:<nobody@example.com>", b"DATA"], b"503 5.5.1"),
        ([b"MAIL FROM:<a@example.net>", b"RCPT TO:<alice@example.com> NOTIFY=NEVER"], b"555 5.5.4"),
        ([b"MAIL FROM:<a@example.net>", b"RCPT TO:<alice@example.com>", b"MAIL FROM:<b@example.net>"], b"503 5.5.1"),
    ],
)
def test_reply_table_in_a_transaction(client: Client, commands: list[bytes], expected: bytes) -> None:
    client.send(b"EHLO client.example\r\n")
    assert client.reply().startswith(b"250-")
    # Every command before the last must do what it says, or the last one
    # would be answered in another state than the row means.
    for cmd in commands[:-1]:
        client.send(cmd + b"\r\n")
        reply = client.reply()
        assert reply.startswith(b"550 5.1.1" if b"nobody@" in cmd else b"250 "), (cmd, reply)
    client.send(commands[-1] + b"\r\n")
    last = client.reply()
    assert last.startswith(expected), last


def test_quit(client: Client) -> None:
    client.send(b"QUIT\r\n")
    assert client.reply().startswith(b"221 2.0.0")
    assert client.closed()


def test_send_with_smtplib_and_read_with_mailbox(server: RunningServer) -> None:
    with smtplib.SMTP(server.host, server.port, timeout=10) as smtp:
        smtp.ehlo("client.example")
        code, text = smtp.mail("sender@example.net")
        assert code == 250
        assert smtp.rcpt("alice@example.com")[0] == 250
        code, text = smtp.data(MESSAGE)
        assert code == 250 and text.startswith(b"2.0.0 Ok: queued as ")
    files = server.messages("alice@example.com")
    assert len(files) == 1
    assert body_of(files[0]) == MESSAGE
    data = files[0].read_bytes()
    assert b"Return-Path: <sender@example.net>\r\n" in data
    assert f"by {HOSTNAME} (fastsmtp) with ESMTP id ".encode() in data
    assert b"for <alice@example.com>;" in data
    assert files[0].name.endswith(f",S={len(data)}")
    box = mailbox.Maildir(server.maildir("alice@example.com"), create=False)
    msgs = list(box)
    assert len(msgs) == 1 and msgs[0]["Subject"] == "hello"
    assert not list((server.maildir("alice@example.com") / "tmp").iterdir())


def test_aiosmtplib_client(server: RunningServer) -> None:
    async def go() -> tuple[dict[str, object], str]:
        return await aiosmtplib.send(
            MESSAGE, sender="sender@example.net", recipients=["bob@example.com"],
            hostname=server.host, port=server.port, timeout=10, start_tls=False,
        )

    errors, text = asyncio.run(go())
    assert errors == {} and "queued as" in text
    (path,) = server.messages("bob@example.com")
    assert body_of(path) == MESSAGE


def test_multiple_recipients_one_file_hard_links(server: RunningServer) -> None:
    with smtplib.SMTP(server.host, server.port, timeout=10) as smtp:
        refused = smtp.sendmail(
            "sender@example.net",
            ["alice@example.com", "bob@example.com", "carol@example.org", "alice+news@example.com"],
            MESSAGE,
        )
        assert refused == {}
    paths = [server.messages(a) for a in ("alice@example.com", "bob@example.com", "carol@example.org")]
    assert [len(p) for p in paths] == [1, 1, 1]  # alice+news is alice: one copy
    stats = [p[0].stat() for p in paths]
    assert len({s.st_ino for s in stats}) == 1 and stats[0].st_nlink == 3
    assert b"\tfor <" not in paths[0][0].read_bytes()  # no "for" clause with several recipients


def test_recipient_tag_and_case(server: RunningServer) -> None:
    with smtplib.SMTP(server.host, server.port, timeout=10) as smtp:
        assert smtp.sendmail("s@example.net", ["Alice+Tag@EXAMPLE.com"], MESSAGE) == {}
    assert len(server.messages("alice@example.com")) == 1


def test_mailbox_created_while_running_is_known(server: RunningServer) -> None:
    with smtplib.SMTP(server.host, server.port, timeout=10) as smtp:
        smtp.ehlo()
        smtp.mail("s@example.net")
        assert smtp.rcpt("dave@example.com")[0] == 550
        from fastsmtp.policy import add_mailbox

        add_mailbox(str(server.mail_root), "dave@newdomain.example")
        add_mailbox(str(server.mail_root), "dave@example.com")
        assert smtp.rcpt("dave@example.com")[0] == 250
        assert smtp.rcpt("dave@newdomain.example")[0] == 250


def test_null_sender(server: RunningServer) -> None:
    with smtplib.SMTP(server.host, server.port, timeout=10) as smtp:
        assert smtp.sendmail("<>", ["alice@example.com"], MESSAGE) == {}
    (path,) = server.messages("alice@example.com")
    assert path.read_bytes().startswith(b"Return-Path: <>\r\n")


def test_pipelined_batch_answered_in_order(client: Client, server: RunningServer) -> None:
    client.send(
        b"EHLO client.example\r\nMAIL FROM:<s@example.net>\r\nRCPT TO:<alice@example.com>\r\n"
        b"RCPT TO:<nobody@example.com>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n"
    )
    replies = client.replies(6)
    assert [r[:3] for r in replies] == [b"250", b"250", b"250", b"550", b"250", b"354"]
    client.send(MESSAGE + b".\r\nMAIL FROM:<t@example.net>\r\nRCPT TO:<carol@example.org>\r\nDATA\r\n")
    replies = client.replies(4)
    assert [r[:3] for r in replies] == [b"250", b"250", b"250", b"354"]
    client.send(MESSAGE + b".\r\nQUIT\r\n")
    assert client.reply().startswith(b"250 2.0.0 Ok: queued as")
    assert client.reply().startswith(b"221")
    assert len(server.messages("alice@example.com")) == 1
    assert len(server.messages("carol@example.org")) == 1


def test_pipelined_replies_come_in_one_write(client: Client) -> None:
    # Five pipelined NOOPs: the server answers them all with one write, so
    # one recv sees all five (loopback delivers one write in one segment).
    client.send(b"EHLO c.example\r\n")
    client.reply()
    client.send(b"NOOP\r\n" * 5)
    time.sleep(0.2)
    data = client.sock.recv(65536)
    assert data == b"250 2.0.0 Ok\r\n" * 5


def test_five_megabyte_message(server: RunningServer) -> None:
    line = b"0123456789" * 7 + b"abcdef\r\n"
    content = b"Subject: big\r\n\r\n" + line * (5 * 1024 * 1024 // len(line))
    with smtplib.SMTP(server.host, server.port, timeout=30) as smtp:
        assert smtp.sendmail("s@example.net", ["alice@example.com"], content) == {}
    (path,) = server.messages("alice@example.com")
    assert body_of(path) == content


def test_one_byte_per_write(client: Client, server: RunningServer) -> None:
    client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    script = (
        b"EHLO c.example\r\nMAIL FROM:<s@example.net>\r\nRCPT TO:<alice@example.com>\r\nDATA\r\n"
    )
    for i in range(len(script)):
        client.send(script[i : i + 1])
        time.sleep(0.0005)  # the thing under test: one byte per segment, each read on its own
    assert [r[:3] for r in client.replies(4)] == [b"250", b"250", b"250", b"354"]
    content = b"Subject: slow\r\n\r\n..a stuffed dot\r\nend\r\n"
    for i, byte in enumerate(content + b".\r\n"):
        client.send(bytes([byte]))
        time.sleep(0.0005)  # as above: the pause makes each byte its own read
    assert client.reply().startswith(b"250 2.0.0")
    (path,) = server.messages("alice@example.com")
    assert body_of(path) == b"Subject: slow\r\n\r\n.a stuffed dot\r\nend\r\n"


@pytest.mark.parametrize("cut", [0, 1, 2, 3])
def test_dot_stuffing_at_chunk_edges(client: Client, server: RunningServer, cut: int) -> None:
    client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client.send(b"EHLO c.example\r\nMAIL FROM:<s@example.net>\r\nRCPT TO:<alice@example.com>\r\nDATA\r\n")
    client.replies(4)
    # Cut the stream around "\r\n..x": the CRLF, the dots and the text land in
    # different reads.
    stream = b"first\r\n..second\r\n...third\r\n.\r\n"
    edge = stream.index(b"\r\n..") + cut
    client.send(stream[:edge])
    # The thing under test: a pause between the two halves, so that the
    # server reads them separately (no reply can tell us it has read one).
    time.sleep(0.05)
    client.send(stream[edge:])
    assert client.reply().startswith(b"250 2.0.0")
    (path,) = server.messages("alice@example.com")
    assert body_of(path) == b"first\r\n.second\r\n..third\r\n"


def test_message_over_size_limit(server_factory) -> None:  # type: ignore[no-untyped-def]
    srv = server_factory("--max-message-size", "1000")
    c = Client(srv.connect())
    c.reply()
    reply = transaction(c, [b"alice@example.com"], b"x" * 900 + b"\r\n" + b"y" * 900 + b"\r\n")
    assert reply.startswith(b"552 5.3.4")
    c.send(b"NOOP\r\n")
    assert c.reply().startswith(b"250")  # still usable
    assert srv.messages("alice@example.com", count=0) == []
    assert list((srv.maildir("alice@example.com") / "tmp").iterdir()) == []


def test_too_many_recipients(server_factory) -> None:  # type: ignore[no-untyped-def]
    srv = server_factory("--max-recipients", "2")
    c = Client(srv.connect())
    c.reply()
    c.send(b"EHLO c.example\r\nMAIL FROM:<s@example.net>\r\n")
    c.replies(2)
    c.send(b"RCPT TO:<alice@example.com>\r\nRCPT TO:<bob@example.com>\r\nRCPT TO:<carol@example.org>\r\n")
    assert [r[:9] for r in c.replies(3)] == [b"250 2.1.5", b"250 2.1.5", b"452 4.5.3"]


def test_too_many_errors(server_factory) -> None:  # type: ignore[no-untyped-def]
    srv = server_factory("--max-errors", "3")
    c = Client(srv.connect())
    c.reply()
    c.send(b"BAD\r\n" * 3)
    replies = c.replies(4)
    assert replies[-1].startswith(b"421 4.7.0")
    assert c.closed()


def test_idle_timeout(server_factory) -> None:  # type: ignore[no-untyped-def]
    srv = server_factory("--idle-timeout", "1")
    c = Client(srv.connect())
    c.reply()
    c.sock.settimeout(10)
    assert c.reply().startswith(b"421 4.4.2")
    assert c.closed()


def test_storage_failure_gives_451_and_no_file(server: RunningServer) -> None:
    c = Client(server.connect())
    c.reply()
    c.send(b"EHLO c.example\r\nMAIL FROM:<s@example.net>\r\nRCPT TO:<alice@example.com>\r\nDATA\r\n")
    c.replies(4)
    # The journal cannot be written while the message is in flight: its
    # folders are gone, so its first segment cannot be made.
    shutil.rmtree(server.mail_root / ".journal")
    c.send(MESSAGE + b".\r\n")
    assert c.reply().startswith(b"451 4.3.0")
    c.send(b"NOOP\r\n")
    assert c.reply().startswith(b"250")
    never(lambda: server.messages("alice@example.com", count=0), what="a file in new/")
    assert os.listdir(server.maildir("alice@example.com") / "tmp") == []


def test_a_mailbox_removed_after_its_250_is_set_aside_not_lost(server: RunningServer) -> None:
    c = Client(server.connect())
    c.reply()
    c.send(b"EHLO c.example\r\nMAIL FROM:<s@example.net>\r\nRCPT TO:<alice@example.com>\r\nDATA\r\n")
    c.replies(4)
    # The mailbox disappears while the message is in flight: the message is
    # journaled and acknowledged, its delivery fails, and it is kept for the
    # operator under the journal's aside/ rather than dropped.
    shutil.rmtree(server.maildir("alice@example.com"))
    c.send(MESSAGE + b".\r\n")
    assert c.reply().startswith(b"250 2.0.0")
    aside = server.mail_root / ".journal" / "aside"
    (kept,) = wait_for(lambda: list(aside.glob("*")) if aside.exists() else [], what="a file set aside")
    assert kept.read_bytes().endswith(MESSAGE)
    assert not server.maildir("alice@example.com").exists()


def test_graceful_shutdown_says_421_to_idle_sessions(server_factory) -> None:  # type: ignore[no-untyped-def]
    srv = server_factory()
    c = Client(srv.connect())
    c.reply()
    c.send(b"EHLO c.example\r\n")
    c.reply()
    srv.proc.send_signal(signal.SIGTERM)
    assert c.reply().startswith(b"421 4.3.2")
    assert srv.proc.wait(15) == 0


def test_shutdown_lets_a_transaction_finish(server_factory) -> None:  # type: ignore[no-untyped-def]
    srv = server_factory("--workers", "1")  # one worker: the witness below shares it
    c = Client(srv.connect())
    c.reply()
    c.send(b"EHLO c.example\r\nMAIL FROM:<s@example.net>\r\nRCPT TO:<alice@example.com>\r\nDATA\r\n")
    c.replies(4)
    c.send(b"Subject: half\r\n\r\nfirst half\r\n")
    # An idle session is told 421 when the worker begins to shut down: its
    # reply is the sign that the rest of the message arrives after that.
    witness = greeted(srv)
    srv.proc.send_signal(signal.SIGTERM)
    assert witness.reply().startswith(b"421 4.3.2")
    witness.close()
    c.send(b"second half\r\n.\r\n")
    assert c.reply().startswith(b"250 2.0.0")
    assert c.reply().startswith(b"421 4.3.2")
    assert srv.proc.wait(15) == 0
    (path,) = srv.messages("alice@example.com")
    assert body_of(path) == b"Subject: half\r\n\r\nfirst half\r\nsecond half\r\n"


def test_bare_lf_message_refused_by_default(client: Client, server: RunningServer) -> None:
    reply = transaction(client, [b"alice@example.com"], b"Subject: x\r\n\r\nbare\nline\r\n")
    assert reply.startswith(b"550 5.5.2")
    assert server.messages("alice@example.com", count=0) == []


def test_bare_lf_normalize(server_factory) -> None:  # type: ignore[no-untyped-def]
    srv = server_factory("--bare-lf", "normalize")
    c = Client(srv.connect())
    c.reply()
    assert transaction(c, [b"alice@example.com"], b"Subject: x\r\n\r\nbare\nline\r\n").startswith(b"250")
    (path,) = srv.messages("alice@example.com")
    assert body_of(path) == b"Subject: x\r\n\r\nbare\r\nline\r\n"


def test_smtputf8_address(server: RunningServer) -> None:
    from fastsmtp.policy import add_mailbox

    add_mailbox(str(server.mail_root), "jürgen@example.com")
    c = Client(server.connect())
    c.reply()
    c.send(b"EHLO c.example\r\n")
    c.reply()
    c.send("MAIL FROM:<séverine@example.net> SMTPUTF8\r\n".encode())
    assert c.reply().startswith(b"250")
    c.send("RCPT TO:<jürgen@example.com>\r\n".encode())
    assert c.reply().startswith(b"250")
    c.send(b"DATA\r\n")
    c.reply()
    c.send(MESSAGE + b".\r\n")
    assert c.reply().startswith(b"250")
    (path,) = server.messages("jürgen@example.com")
    assert b"with UTF8SMTP id" in path.read_bytes()


def test_helo_is_sanitized_in_received(client: Client, server: RunningServer) -> None:
    client.send(b"HELO evil\x7f(host)\r\n")  # not a Received header's business
    client.reply()
    client.send(b"MAIL FROM:<s@example.net>\r\nRCPT TO:<alice@example.com>\r\nDATA\r\n")
    client.replies(3)
    client.send(MESSAGE + b".\r\n")
    assert client.reply().startswith(b"250")
    (path,) = server.messages("alice@example.com")
    received = path.read_bytes().split(b"\r\n")[1]
    assert received.startswith(b"Received: from evil??host? ([127.0.0.1])")


def tmp_bytes(maildir: Path) -> int:
    """The bytes in a Maildir's tmp/ (a message being received spills there)."""
    total = 0
    for entry in (maildir / "tmp").iterdir():
        try:
            total += entry.stat().st_size
        except FileNotFoundError:
            pass  # committed meanwhile
    return total


def test_no_partial_file_in_new_while_data_arrives(client: Client, server: RunningServer) -> None:
    client.send(b"EHLO c.example\r\nMAIL FROM:<s@example.net>\r\nRCPT TO:<alice@example.com>\r\nDATA\r\n")
    client.replies(4)
    client.send(b"Subject: x\r\n\r\n" + b"y" * 1_000_000 + b"\r\n")
    # Past the spill threshold the message grows in tmp/: wait until the
    # server holds most of it there, then look in new/.
    wait_for(lambda: tmp_bytes(server.maildir("alice@example.com")) >= 900_000, what="the message in tmp/")
    assert server.messages("alice@example.com", count=0) == []
    client.send(b".\r\n")
    assert client.reply().startswith(b"250")
    assert len(server.messages("alice@example.com")) == 1


def test_client_vanishing_mid_data_leaves_nothing(server: RunningServer) -> None:
    c = Client(server.connect())
    c.reply()
    c.send(b"EHLO c.example\r\nMAIL FROM:<s@example.net>\r\nRCPT TO:<alice@example.com>\r\nDATA\r\n")
    c.replies(4)
    c.send(b"Subject: x\r\n\r\n" + b"z" * 600_000)
    # Vanish only once the server has spilled part of it to tmp/, so that
    # there is something to clean up.
    wait_for(lambda: tmp_bytes(server.maildir("alice@example.com")) > 0, what="the message in tmp/")
    c.close()
    tmp = server.maildir("alice@example.com") / "tmp"
    wait_for(lambda: not list(tmp.iterdir()), timeout=5, what="tmp/ to be cleaned")
    assert server.messages("alice@example.com", count=0) == []


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed (CI installs it)")
def test_swaks(server: RunningServer) -> None:
    import subprocess

    result = subprocess.run(
        ["swaks", "--server", f"{server.host}:{server.port}", "--to", "postmaster@localhost",
         "--from", "sender@example.net", "--timeout", "10"],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "250 2.0.0 Ok: queued as" in result.stdout
    (path,) = server.messages("postmaster@localhost")
    assert b"X-Mailer: swaks" in path.read_bytes()
    assert len(mailbox.Maildir(server.maildir("postmaster@localhost"), create=False)) == 1


def test_many_concurrent_clients(server: RunningServer) -> None:
    async def one(i: int) -> None:
        await aiosmtplib.send(
            MESSAGE.replace(b"hello", b"hello %d" % i), sender=f"s{i}@example.net",
            recipients=["alice@example.com"], hostname=server.host, port=server.port,
            timeout=20, start_tls=False,
        )

    async def all_of_them() -> None:
        await asyncio.gather(*(one(i) for i in range(40)))

    asyncio.run(all_of_them())
    files = server.messages("alice@example.com")
    assert len(files) == 40
    subjects = sorted(body_of(p).split(b"\r\n")[2] for p in files)
    assert subjects == sorted(b"Subject: hello %d" % i for i in range(40))
    assert os.listdir(server.maildir("alice@example.com") / "tmp") == []
