"""A real Dovecot serves what fastsmtp stored: IMAP and POP3 read the same bytes.

DESIGN.md promises that MAIL_ROOT/<domain>/<user>/ is what Dovecot's
``mail_location = maildir:MAIL_ROOT/%d/%n`` reads.  This test holds the code to
it: fastsmtp receives a message over SMTP, Dovecot (with a configuration of its
own, its own run directory and its own loopback ports, so it never meets a
system instance) serves it, and imaplib and poplib must get back exactly the
file fastsmtp wrote, trace headers included.  Dovecot also checks the
``,S=<size>`` in the file name against the file, so a wrong size shows up as
an error in its log.

Dovecot refuses mail access as root (hard-coded), so when the tests run as
root fastsmtp serves mail as the unprivileged ``mail`` user (``--user``, as in
production) and Dovecot reads as that user; otherwise both run as the current
user, and Dovecot runs without root.  Starting and stopping Dovecot is
dovecotrun.py's, shared with the LMTP tests.
"""

from __future__ import annotations

import imaplib
import poplib
import smtplib
from pathlib import Path
from typing import Iterator

import pytest

from dovecotrun import (
    Dovecot,
    MailOwner,
    base_config,
    chown_tree,
    find_dovecot,
    free_port,
    passwd_line,
    start_dovecot,
    wait_banner,
)
from helpers import RunningServer, start_server
from fastsmtp.policy import add_mailbox

USERS = {"alice@example.com": "alice-secret", "bob@example.com": "bob-secret"}

# A line that starts with a dot (dot-stuffed on the wire by SMTP and POP3,
# stored without the extra dot), 8-bit text, and a long body.
MESSAGE = (
    b"From: Sender <sender@example.net>\r\n"
    b"To: Alice <alice@example.com>, Bob <bob@example.com>\r\n"
    b"Subject: read me over IMAP and POP3\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"Hello Alice and Bob.\r\n"
    b".a line that starts with a dot\r\n"
    b"..and one with two\r\n"
    b"Gr\xc3\xbc\xc3\x9fe aus K\xc3\xb6ln.\r\n"
    + b"".join(b"line %05d of a longer body\r\n" % i for i in range(2000))
)

def dovecot_config(root: Path, imap_port: int, pop3_port: int, owner: MailOwner) -> str:
    lines = base_config(root, "fastsmtp-test", "imap pop3", owner)
    for proto, port in (("imap", imap_port), ("pop3", pop3_port)):
        lines += [
            f"service {proto}-login {{",
            f"  inet_listener {proto} {{",
            "    address = 127.0.0.1",
            f"    port = {port}",
            "  }",
            f"  inet_listener {proto}s {{",
            "    port = 0",
            "  }",
            "}",
        ]
    return "\n".join(lines) + "\n"


class ImapPop3(Dovecot):
    imap_port: int
    pop3_port: int


@pytest.fixture
def dovecot(root_dir: Path, mail_user: MailOwner) -> Iterator[ImapPop3]:
    binary = find_dovecot("imap", "pop3")
    mail_root = root_dir / "mail"
    mail_root.mkdir()
    for address in USERS:
        add_mailbox(str(mail_root), address)
    chown_tree(mail_root, mail_user.uid, mail_user.gid)
    (root_dir / "passwd").write_text("".join(passwd_line(u, p) for u, p in USERS.items()))
    (root_dir / "passwd").chmod(0o644)
    imap_port, pop3_port = free_port(), free_port()
    started = start_dovecot(binary, root_dir, dovecot_config(root_dir, imap_port, pop3_port, mail_user))
    dc = ImapPop3(root_dir, started.proc)
    dc.imap_port, dc.pop3_port = imap_port, pop3_port
    try:
        wait_banner(imap_port, b"* OK", dc)
        wait_banner(pop3_port, b"+OK", dc)
        yield dc
    finally:
        dc.stop()


@pytest.fixture
def smtp_server(dovecot: ImapPop3, mail_user: MailOwner) -> Iterator[RunningServer]:
    srv = start_server(dovecot.root / "mail", *mail_user.server_flags)
    try:
        yield srv
    finally:
        srv.stop()


def imap_fetch(dc: ImapPop3, user: str) -> tuple[bytes, int]:
    imap = imaplib.IMAP4("127.0.0.1", dc.imap_port, timeout=10)
    try:
        assert imap.login(user, USERS[user])[0] == "OK", dc.log_text()
        typ, data = imap.select("INBOX")
        assert typ == "OK" and data == [b"1"], (typ, data, dc.log_text())
        typ, data = imap.fetch("1", "(RFC822.SIZE RFC822)")
        assert typ == "OK", (typ, data, dc.log_text())
        head, body = data[0]
        size = int(head.split(b"RFC822.SIZE ")[1].split()[0])
        return body, size
    finally:
        imap.logout()


def pop3_retr(dc: ImapPop3, user: str) -> tuple[bytes, int]:
    pop = poplib.POP3("127.0.0.1", dc.pop3_port, timeout=10)
    try:
        pop.user(user)
        pop.pass_(USERS[user])
        count, _ = pop.stat()
        assert count == 1, dc.log_text()
        _, lines, _ = pop.retr(1)
        size = int(pop.list(1).split()[2])
        # poplib has removed the dot-stuffing and the CRLF of every line.
        return b"".join(line + b"\r\n" for line in lines), size
    finally:
        pop.quit()


def test_imap_and_pop3_read_what_fastsmtp_stored(dovecot: ImapPop3, smtp_server: RunningServer) -> None:
    with smtplib.SMTP(smtp_server.host, smtp_server.port, timeout=10) as smtp:
        refused = smtp.sendmail("sender@example.net", list(USERS), MESSAGE)
    assert refused == {}

    stored = {}
    for user in USERS:
        files = smtp_server.wait_messages(user, 1)
        assert len(files) == 1, files
        stored[user] = files[0].read_bytes()
        # The size in the Maildir name is the file's, as Dovecot reads it.
        assert files[0].name.endswith(f",S={len(stored[user])}")
        assert stored[user].endswith(b"\r\n" + MESSAGE)
    # One file, hard-linked to the second recipient.
    assert stored["alice@example.com"] == stored["bob@example.com"]

    for user in USERS:
        body, size = imap_fetch(dovecot, user)
        assert body == stored[user]
        assert size == len(stored[user])

    body, size = pop3_retr(dovecot, "alice@example.com")
    assert body == stored["alice@example.com"]
    assert size == len(stored["alice@example.com"])

    # Dovecot moved the message from new/ to cur/ and left its bytes alone.
    for user in USERS:
        cur = sorted((smtp_server.maildir(user) / "cur").iterdir())
        assert len(cur) == 1 and cur[0].read_bytes() == stored[user]
        assert smtp_server.messages(user, count=0) == []

    assert dovecot.problems() == [], dovecot.log_text()
