"""--deliver lmtp:...: the server hands mail to a real Dovecot over LMTP, from its journal, after the 250.

Dovecot (tests/dovecotlmtp.py) is the tests' own: LMTP and IMAP on
loopback ports, quota and Sieve on.  What Dovecot stored is read back
over IMAP.
"""

from __future__ import annotations

import re
import smtplib
import time
from pathlib import Path

import pytest

from dovecotlmtp import FULL_USER, LIST_ID, SIEVE_USER, LmtpDovecot, imap_messages
from helpers import RunningServer, kill_tree, metric, start_server

pytestmark = pytest.mark.timeout(180)

SENDER = "sender@example.net"
MESSAGE = (
    b"From: Sender <sender@example.net>\r\nTo: Alice <alice@example.com>\r\nSubject: over LMTP\r\n"
    b"Message-ID: <lmtp-1@example.net>\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n\r\nHello over LMTP.\r\n.a line that starts with a dot\r\n"
    b"Gr\xc3\xbc\xc3\x9fe.\r\n" + b"".join(b"line %05d of the body\r\n" % i for i in range(3000))
)


def serve(tmp: Path, dc: LmtpDovecot, *extra: str) -> RunningServer:
    return start_server(tmp / "mail", "--deliver", dc.tcp_target, "--metrics", "127.0.0.1:0", *extra)


def wait_imap(dc: LmtpDovecot, user: str, count: int, folder: str = "INBOX", timeout: float = 30.0) -> list[bytes]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            found = imap_messages(dc, user, folder)
        except AssertionError:  # the folder is made by the first delivery into it, after the 250
            if time.monotonic() > deadline:
                raise
            found = []
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def test_delivery_is_byte_exact_and_read_back_over_imap(tmp_path: Path, lmtp_dovecot: LmtpDovecot) -> None:
    srv = serve(tmp_path, lmtp_dovecot)
    try:
        with smtplib.SMTP(srv.host, srv.port, timeout=30) as client:
            client.sendmail(SENDER, ["alice@example.com", "bob@example.com"], MESSAGE)
        alice, bob = (wait_imap(lmtp_dovecot, u, 1) for u in ("alice@example.com", "bob@example.com"))
        assert metric(srv, "fastsmtp_lmtp_delivered_total") == 2
        assert metric(srv, "fastsmtp_lmtp_pending") == 0
    finally:
        srv.stop()
    assert len(alice) == len(bob) == 1 and not list((tmp_path / "mail" / "example.com" / "alice" / "new").iterdir())
    for got in (alice[0], bob[0]):
        # Dovecot's own Return-Path (from our MAIL FROM) and Received; then
        # ours, and the message byte for byte.
        head, _, rest = got.partition(b"Received: from ")
        assert head.startswith(b"Return-Path: <sender@example.net>\r\n") and got.count(b"Return-Path:") == 1
        ours = got[got.index(b"Received: from [127.0.0.1]"):]
        trace = re.match(rb"Received: from [^\r\n]*\r\n(?:\t[^\r\n]*\r\n)+", ours)
        assert trace is not None and b"by mx.test.example (fastsmtp) with ESMTP id " in trace.group()
        assert ours[trace.end():] == MESSAGE  # byte for byte, dot line and 8-bit text included


def test_the_backend_answers_for_its_recipients_at_rcpt(tmp_path: Path, lmtp_dovecot: LmtpDovecot) -> None:
    srv = serve(tmp_path, lmtp_dovecot)
    try:
        with smtplib.SMTP(srv.host, srv.port, timeout=30) as client:
            client.ehlo()
            client.mail(SENDER)
            code, text = client.rcpt("nobody@example.com")
            assert (code, text[:5]) == (550, b"5.1.1"), text
            code, text = client.rcpt(FULL_USER)  # over quota already
            assert (code, text[:5]) == (552, b"5.2.2"), text
            code, text = client.rcpt("someone@[127.0.0.1]")
            assert code == 550 and b"Relay access denied" in text
            assert client.rcpt("alice@example.com")[0] == 250
        assert metric(srv, 'fastsmtp_recipients_refused_total{code="550"}') == 2
    finally:
        srv.stop()


def test_over_quota_is_a_tempfail_where_dovecot_says_so(tmp_path: Path, lmtp_dovecot_tempfail: LmtpDovecot) -> None:
    srv = serve(tmp_path, lmtp_dovecot_tempfail)
    try:
        with smtplib.SMTP(srv.host, srv.port, timeout=30) as client:
            client.ehlo()
            client.mail(SENDER)
            code, text = client.rcpt(FULL_USER)
            assert (code, text[:5]) == (452, b"4.2.2"), text
    finally:
        srv.stop()


def test_a_sieve_rule_files_the_message(tmp_path: Path, lmtp_dovecot: LmtpDovecot) -> None:
    srv = serve(tmp_path, lmtp_dovecot)
    listed = MESSAGE.replace(b"Subject: over LMTP\r\n", f"Subject: a list\r\nList-Id: <{LIST_ID}>\r\n".encode())
    try:
        with smtplib.SMTP(srv.host, srv.port, timeout=30) as client:
            client.sendmail(SENDER, [SIEVE_USER], listed)
            client.sendmail(SENDER, [SIEVE_USER], MESSAGE)
        (filed,) = wait_imap(lmtp_dovecot, SIEVE_USER, 1, folder="Lists")
        (inbox,) = wait_imap(lmtp_dovecot, SIEVE_USER, 1)
    finally:
        srv.stop()
    assert b"Subject: a list" in filed and b"Subject: over LMTP" in inbox


def _send(srv: RunningServer, first: int, count: int, sessions: int = 4) -> None:
    """``count`` messages numbered from ``first`` to alice, over ``sessions`` connections; each must get 250."""
    clients = [smtplib.SMTP(srv.host, srv.port, timeout=30) for _ in range(sessions)]
    try:
        for n in range(first, first + count):
            message = MESSAGE.replace(b"<lmtp-1@example.net>", b"<load-%d@example.net>" % n)
            assert clients[n % sessions].sendmail(SENDER, ["alice@example.com"], message) == {}
    finally:
        for c in clients:
            c.quit()


def _ids(messages: list[bytes]) -> list[bytes]:
    return [re.search(rb"Message-ID: <(load-\d+)@", m).group(1) for m in messages]  # type: ignore[union-attr]


def test_dovecot_stopped_under_load(tmp_path: Path, lmtp_dovecot: LmtpDovecot) -> None:
    srv = serve(tmp_path, lmtp_dovecot)
    try:
        _send(srv, 0, 20)
        assert len(wait_imap(lmtp_dovecot, "alice@example.com", 20)) == 20
        lmtp_dovecot.stop()
        # The MX goes on answering 250: the journal holds what Dovecot cannot take.
        _send(srv, 20, 30)
        time.sleep(0.5)
        assert metric(srv, "fastsmtp_lmtp_pending") == 30
        assert metric(srv, 'fastsmtp_lmtp_pending_by_target{target="0"}') == 30
        assert metric(srv, "fastsmtp_lmtp_oldest_pending_seconds") > 0
        assert metric(srv, "fastsmtp_lmtp_retries_total") >= 30
        lmtp_dovecot.restart()
        got = wait_imap(lmtp_dovecot, "alice@example.com", 50, timeout=60)
        deadline = time.monotonic() + 10
        while metric(srv, "fastsmtp_lmtp_pending") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert metric(srv, "fastsmtp_lmtp_pending") == 0
    finally:
        srv.stop()
    ids = _ids(got)
    assert sorted(set(ids)) == sorted(b"load-%d" % n for n in range(50))
    assert len(ids) - len(set(ids)) == 0  # delivered twice: none


@pytest.mark.parametrize("how", ["graceful", "sigkill"])
def test_a_restart_with_mail_waiting_delivers_it(tmp_path: Path, lmtp_dovecot: LmtpDovecot, how: str) -> None:
    lmtp_dovecot.stop()
    srv = serve(tmp_path, lmtp_dovecot)
    try:
        _send(srv, 0, 25)
        if how == "graceful":
            srv.stop()
        else:
            kill_tree(srv)
    finally:
        srv.stop()
    journal = tmp_path / "mail" / ".journal"
    assert any(p.name.startswith("w-") for p in journal.iterdir())  # kept: nothing was delivered
    lmtp_dovecot.restart()
    srv = serve(tmp_path, lmtp_dovecot)
    try:
        srv.wait_output("adopted")
        got = wait_imap(lmtp_dovecot, "alice@example.com", 25, timeout=60)
    finally:
        srv.stop()
    ids = _ids(got)
    assert sorted(set(ids)) == sorted(b"load-%d" % n for n in range(25)) and len(ids) == 25
    assert not [p for p in journal.iterdir() if p.name.startswith("w-")]  # all retired


def test_a_worker_killed_after_delivering_does_not_deliver_again(tmp_path: Path, lmtp_dovecot: LmtpDovecot) -> None:
    srv = serve(tmp_path, lmtp_dovecot)
    try:
        _send(srv, 0, 40)
        assert len(wait_imap(lmtp_dovecot, "alice@example.com", 40)) == 40
        # At once: the segments are not retired yet (closed after a second
        # idle, then checkpointed), so the journal still holds all 40.
        kill_tree(srv)
    finally:
        srv.stop()
    journal = tmp_path / "mail" / ".journal"
    assert any(p.name.endswith(".seg.done") for p in journal.rglob("*"))
    srv = serve(tmp_path, lmtp_dovecot)
    try:
        time.sleep(2)
        got = imap_messages(lmtp_dovecot, "alice@example.com")
    finally:
        srv.stop()
    ids = _ids(got)
    # Every message once: the successor read the .done marks and adopted nothing.
    assert sorted(ids) == sorted(b"load-%d" % n for n in range(40))


def test_a_refusal_after_the_250_goes_to_the_dead_letter_maildir(tmp_path: Path, lmtp_dovecot: LmtpDovecot) -> None:
    from dovecotlmtp import QUOTA_USER

    srv = serve(tmp_path, lmtp_dovecot)
    try:
        with smtplib.SMTP(srv.host, srv.port, timeout=30) as client:
            # Under its 1 KiB quota at RCPT; this 60 KB message is over it
            # after the final dot (552 5.2.2), when the client has its 250.
            assert client.sendmail(SENDER, [QUOTA_USER, "alice@example.com"], MESSAGE) == {}
        assert len(wait_imap(lmtp_dovecot, "alice@example.com", 1)) == 1
        dead = tmp_path / "mail" / ".dead-letter" / "new"
        deadline = time.monotonic() + 20
        while not (dead.is_dir() and list(dead.iterdir())) and time.monotonic() < deadline:
            time.sleep(0.05)
        (letter,) = list(dead.iterdir())
        srv.wait_output("refused for good by the LMTP backend")
        assert metric(srv, "fastsmtp_lmtp_dead_letters_total") == 1
        assert metric(srv, "fastsmtp_lmtp_delivered_total") == 1
    finally:
        srv.stop()
    data = letter.read_bytes()
    assert data.startswith(b"X-Fastsmtp-Dead-Letter: <quota@example.com> 552 5.2.2 ")
    assert data.endswith(MESSAGE) and f",S={len(data)}" in letter.name
    assert imap_messages(lmtp_dovecot, QUOTA_USER) == []


def _cli(tmp: Path, dc: LmtpDovecot, *args: str) -> tuple[int, str]:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "fastsmtp", "journal", *args, "--mail-root", str(tmp / "mail"),
                           "--deliver", dc.tcp_target, "--hostname", "mx.test.example"],
                          capture_output=True, text=True, timeout=60)
    return proc.returncode, proc.stdout + proc.stderr


def test_the_journal_commands(tmp_path: Path, lmtp_dovecot: LmtpDovecot) -> None:
    from dovecotrun import chown_tree, passwd_line
    from fastsmtp.policy import add_mailbox

    lmtp_dovecot.stop()
    srv = serve(tmp_path, lmtp_dovecot)
    try:
        # Dovecot is down: dave is taken unverified; alice's two wait.
        _send(srv, 0, 2, sessions=1)
        with smtplib.SMTP(srv.host, srv.port, timeout=30) as client:
            assert client.sendmail(SENDER, ["dave@example.com"], MESSAGE) == {}
        code, out = _cli(tmp_path, lmtp_dovecot, "list")
        assert code == 0 and "3 waiting for the LMTP backends, 0 dead letter(s)" in out, out
        assert out.count("<sender@example.net> -> <alice@example.com>") == 2 and "(worker " in out
        lmtp_dovecot.restart()
        code, out = _cli(tmp_path, lmtp_dovecot, "retry")  # now, not after the backoff
        assert code == 0 and "told" in out, out
        assert len(wait_imap(lmtp_dovecot, "alice@example.com", 2, timeout=10)) == 2
        # dave does not exist (yet): his message is a dead letter now.
        srv.wait_output("refused for good by the LMTP backend")
        code, out = _cli(tmp_path, lmtp_dovecot, "list")
        assert "0 waiting" in out and "1 dead letter(s)" in out and "<dave@example.com> 550 5.1.1" in out, out
        # The operator makes the user; the dead letter goes to him.
        root = lmtp_dovecot.root
        add_mailbox(str(root / "mail"), "dave@example.com")
        chown_tree(root / "mail", lmtp_dovecot.owner.uid, lmtp_dovecot.owner.gid)
        with open(root / "passwd", "a") as f:
            f.write(passwd_line("dave@example.com", "dave-secret"))
        time.sleep(1.5)  # Dovecot looks at a changed passwd-file once a second
        code, out = _cli(tmp_path, lmtp_dovecot, "redeliver")
        assert code == 0 and "delivered to dave@example.com" in out, out
        assert not list((tmp_path / "mail" / ".dead-letter" / "new").iterdir())
    finally:
        srv.stop()
    assert len(lmtp_dovecot.files("dave@example.com")) == 1
    # Dovecot's Maildir files hold LF line ends (IMAP gives CRLF back).
    assert lmtp_dovecot.files("dave@example.com")[0].read_bytes().endswith(MESSAGE.replace(b"\r\n", b"\n"))


def test_a_message_that_spilled_to_disk_is_delivered_from_the_journal(tmp_path: Path,
                                                                      lmtp_dovecot: LmtpDovecot) -> None:
    big = MESSAGE + b"".join(b"spilled line %07d, past the 256 KiB kept in memory\r\n" % i for i in range(20000))
    srv = serve(tmp_path, lmtp_dovecot)
    try:
        with smtplib.SMTP(srv.host, srv.port, timeout=30) as client:
            assert client.sendmail(SENDER, ["bob@example.com"], big) == {}
        (got,) = wait_imap(lmtp_dovecot, "bob@example.com", 1)
    finally:
        srv.stop()
    assert len(big) > 1_000_000 and got.endswith(b"\r\n" + big)
    # The spill file went with the delivery; this worker's spool folder is empty.
    spools = list((tmp_path / "mail" / ".journal").glob("spool-*/tmp/*"))
    assert spools == []


def test_a_second_backend_takes_over_from_one_that_is_down(tmp_path: Path, lmtp_dovecot: LmtpDovecot) -> None:
    from dnsserver import free_port

    down = f"lmtp:127.0.0.1:{free_port()}"  # nothing listens there
    srv = start_server(tmp_path / "mail", "--deliver", down, lmtp_dovecot.tcp_target, "--metrics", "127.0.0.1:0")
    try:
        _send(srv, 0, 10, sessions=2)
        assert len(wait_imap(lmtp_dovecot, "alice@example.com", 10)) == 10
        assert metric(srv, "fastsmtp_lmtp_pending") == 0 and metric(srv, "fastsmtp_lmtp_retries_total") == 0
    finally:
        srv.stop()


def test_a_quoted_angle_bracket_in_a_sender_is_carried_over_lmtp(tmp_path: Path, lmtp_dovecot: LmtpDovecot) -> None:
    # RFC 5321 §4.1.2: qtextSMTP includes "<" and ">"; the LMTP command line carries them quoted.
    srv = serve(tmp_path, lmtp_dovecot)
    try:
        with smtplib.SMTP(srv.host, srv.port, timeout=30) as client:
            client.ehlo()
            assert client.mail('"odd<name>"@example.net')[0] == 250
            code, text = client.rcpt('"x<y"@example.com')  # no such user: the backend's own word
            assert code == 550, text
            assert client.rcpt("alice@example.com")[0] == 250
            assert client.data(MESSAGE)[0] == 250
        (got,) = wait_imap(lmtp_dovecot, "alice@example.com", 1)
        assert metric(srv, "fastsmtp_lmtp_pending") == 0 and metric(srv, "fastsmtp_lmtp_dead_letters_total") == 0
    finally:
        srv.stop()
    assert got.startswith(b'Return-Path: <"odd<name>"@example.net>\r\n'), got[:200]


def test_mail_a_worker_left_at_a_reload_is_taken_over(tmp_path: Path, lmtp_dovecot: LmtpDovecot) -> None:
    import signal

    lmtp_dovecot.stop()
    srv = serve(tmp_path, lmtp_dovecot, "--workers", "1", "--lmtp-orphan-scan", "1")
    try:
        _send(srv, 0, 5, sessions=1)
        journal = tmp_path / "mail" / ".journal"
        before = {p.name for p in journal.iterdir() if p.name.startswith("w-")}
        # SIGHUP: a new worker starts (its recovery finds the old folder
        # still locked), then the old one retires with its mail waiting.
        srv.proc.send_signal(signal.SIGHUP)
        srv.wait_output("adopted from")  # a minute at most by default; a second here
        after = {p.name for p in journal.iterdir() if p.name.startswith("w-")}
        assert before and not (before & after)  # the old folder went once its mail was journaled anew
        lmtp_dovecot.restart()
        got = wait_imap(lmtp_dovecot, "alice@example.com", 5, timeout=60)
    finally:
        srv.stop()
    assert sorted(_ids(got)) == sorted(b"load-%d" % n for n in range(5))
