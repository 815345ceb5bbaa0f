"""Milters through the real server: our own test milter's every verdict and fault, and real OpenDKIM."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Iterator

import pytest

from helpers import Client, RunningServer, body_of, metric, start_server
from opendkimd import signing_opendkim, verifying_opendkim
from rspamdd import GTUBE, log_of, running_rspamd
from testmilter import TestMilter, body_change, change

pytestmark = pytest.mark.timeout(180)

MESSAGE = (b"From: a@example.net\r\nTo: alice@example.com\r\nSubject: filtered\r\n"
           b"Message-ID: <f1@example.net>\r\n\r\n")


def session(srv: RunningServer) -> Client:
    c = Client(srv.connect())
    assert c.reply().startswith(b"220 ")
    c.send(b"EHLO client.example\r\n")
    assert c.reply().startswith(b"250")
    return c


def send(c: Client, body: bytes = b"hello\r\n", sender: bytes = b"s@example.net",
         rcpts: tuple[bytes, ...] = (b"alice@example.com",), content: bytes = MESSAGE) -> bytes:
    c.send(b"MAIL FROM:<" + sender + b">\r\n")
    reply = c.reply()
    if not reply.startswith(b"250"):
        return reply
    for r in rcpts:
        c.send(b"RCPT TO:<" + r + b">\r\n")
        reply = c.reply()
        if not reply.startswith(b"250"):
            return reply
    c.send(b"DATA\r\n")
    assert c.reply().startswith(b"354")
    c.send(content + body + b".\r\n")
    return c.reply()


def serve(tmp: Path, *endpoints: str, default: str = "tempfail", extra: tuple[str, ...] = ()) -> RunningServer:
    args = [a for e in endpoints for a in ("--milter", e)]
    return start_server(tmp / "mail", *args, "--milter-default-action", default, "--milter-command-timeout", "1",
                        "--milter-content-timeout", "2", "--metrics", "127.0.0.1:0", *extra)


def test_every_step_reaches_the_milter_and_the_body_comes_in_packets(tmp_path: Path) -> None:
    body = b"".join(b"line %06d of the body\r\n" % i for i in range(8000))  # 200,000 octets
    with TestMilter("accept") as milter:
        srv = serve(tmp_path, milter.endpoint)
        try:
            c = session(srv)
            assert send(c, body).startswith(b"250 2.0.0 Ok: queued as")
            c.close()
            stored = srv.messages("alice@example.com", 1)
            assert len(stored) == 1 and body_of(stored[0]).endswith(body)
            # Connect, HELO, MAIL and RCPT continue; the message (DATA to its end, one answer) is accepted.
            assert metric(srv, 'fastsmtp_milter_verdicts_total{milter="0",verdict="continue"}') == 4
            assert metric(srv, 'fastsmtp_milter_verdicts_total{milter="0",verdict="accept"}') == 1
            assert metric(srv, 'fastsmtp_milter_answer_seconds_count{milter="0"}') == 5
        finally:
            srv.stop()
    seen = milter.seen
    assert [c for c in seen.commands if c not in (b"D", b"L", b"B")][:6] == [b"C", b"H", b"M", b"R", b"T", b"N"]
    assert bytes(seen.body) == body and seen.body_packets == [65535, 65535, 65535, len(body) - 3 * 65535]
    names = [n for n, _ in seen.headers]
    assert b"Subject" in names and b"Received" in names and b"Return-Path" not in names
    assert seen.macros["{rcpt_addr}"] == "alice@example.com" and seen.macros["j"] == "mx.test.example"
    assert seen.macros["{client_addr}"] == "127.0.0.1" and "i" in seen.macros
    assert seen.macros["{mail_addr}"] == "s@example.net"
    # Defined by Postfix only after SASL AUTH (rspamd takes an empty one for a logged-in user).
    assert "{auth_authen}" not in seen.macros and "{tls_version}" not in seen.macros


def test_several_milters_are_asked_in_order_and_the_first_refusal_decides(tmp_path: Path) -> None:
    with TestMilter("reject-rcpt") as first, TestMilter("edit") as second:
        second.changes = [change(b"h", b"X-Second", b"was asked")]
        srv = serve(tmp_path, first.endpoint, second.endpoint)
        try:
            c = session(srv)
            c.send(b"MAIL FROM:<s@example.net>\r\n")
            assert c.reply().startswith(b"250")
            c.send(b"RCPT TO:<bob@example.com>\r\n")
            assert c.reply() == b"550 5.7.1 Command rejected\r\n"  # the first milter's
            c.send(b"RCPT TO:<alice@example.com>\r\nDATA\r\n")
            assert c.reply().startswith(b"250") and c.reply().startswith(b"354")
            c.send(MESSAGE + b"hello\r\n.\r\n")
            assert c.reply().startswith(b"250 2.0.0")
            c.close()
            data = srv.messages("alice@example.com", 1)[0].read_bytes()
        finally:
            srv.stop()
    # The second never heard of the refused recipient; both saw the message.
    assert first.seen.commands.count(b"R") == 2 and second.seen.commands.count(b"R") == 1
    assert b"X-Second: was asked\r\n" in data and first.seen.commands.count(b"E") == 1


def test_the_milter_hears_only_of_recipients_that_exist(tmp_path: Path) -> None:
    with TestMilter("accept") as milter:
        srv = serve(tmp_path, milter.endpoint)
        try:
            c = session(srv)
            c.send(b"MAIL FROM:<s@example.net>\r\n")
            assert c.reply().startswith(b"250")
            c.send(b"RCPT TO:<nobody@example.com>\r\n")
            assert c.reply().startswith(b"550 5.1.1")
            c.send(b"RCPT TO:<alice@example.com>\r\n")
            assert c.reply().startswith(b"250")
            c.close()
        finally:
            srv.stop()
    assert milter.seen.commands.count(b"R") == 1  # as in Postfix: after our own recipient check


def test_a_client_the_screening_refuses_costs_no_milter_conversation(tmp_path: Path) -> None:
    with TestMilter("accept") as milter:
        # 127.0.0.2 is not trusted: it has the greeting test to pass.
        srv = serve(tmp_path, milter.endpoint, extra=("--trusted-networks", "127.0.0.1/32", "--greeting-delay", "0.5"))
        try:
            import socket

            early = socket.create_connection((srv.host, srv.port), timeout=10, source_address=("127.0.0.2", 0))
            early.sendall(b"EHLO too.early.example\r\n")
            assert Client(early).reply().startswith(b"554 5.5.0")
            early.close()
            assert milter.connections == 0
            patient = Client(socket.create_connection((srv.host, srv.port), timeout=10,
                                                      source_address=("127.0.0.3", 0)))
            assert patient.reply().startswith(b"220 ")  # after the delay, then the milter's connect
            patient.close()
            assert milter.connections == 1 and milter.seen.macros["{client_addr}"] == "127.0.0.3"
        finally:
            srv.stop()


def test_the_tls_macros_after_starttls(tmp_path: Path) -> None:
    import smtplib
    import ssl
    import subprocess

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                    "/CN=mx.test.example", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    with TestMilter("accept") as milter:
        srv = serve(tmp_path, milter.endpoint, extra=("--tls-cert", str(cert), "--tls-key", str(key)))
        try:
            ctx = ssl.create_default_context()
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
            with smtplib.SMTP(srv.host, srv.port, timeout=10) as client:
                client.starttls(context=ctx)
                version, (cipher, _, bits) = client.sock.version(), client.sock.cipher()
                client.sendmail("s@example.net", ["alice@example.com"], MESSAGE + b"hello\r\n")
        finally:
            srv.stop()
    assert milter.seen.macros["{tls_version}"] == version and milter.seen.macros["{cipher}"] == cipher
    assert milter.seen.macros["{cipher_bits}"] == str(bits)


@pytest.mark.parametrize("mode, expected", [
    ("reject-rcpt", b"550 5.7.1 Command rejected\r\n"),
    ("tempfail-mail", b"451 4.7.1 Service unavailable - try again later\r\n"),
    ("replycode", b"550-5.7.1 first line\r\n550 5.7.1 second line\r\n"),
    ("reject", b"550 5.7.1 Command rejected\r\n"),
])
def test_a_milters_refusal_takes_effect_at_its_step(tmp_path: Path, mode: str, expected: bytes) -> None:
    with TestMilter(mode) as milter:
        srv = serve(tmp_path, milter.endpoint)
        try:
            c = session(srv)
            assert send(c, rcpts=(b"alice@example.com", b"bob@example.com")) == expected
            c.send(b"RSET\r\nNOOP\r\n")
            assert c.reply().startswith(b"250") and c.reply().startswith(b"250")  # the session goes on
            c.close()
            assert srv.messages("alice@example.com", 0) == []
        finally:
            srv.stop()


def test_added_fields_are_stored(tmp_path: Path) -> None:
    with TestMilter("add-header") as milter:
        srv = serve(tmp_path, milter.endpoint)
        try:
            c = session(srv)
            assert send(c).startswith(b"250")
            c.close()
            data = srv.messages("alice@example.com", 1)[0].read_bytes()
            assert b"X-Test-Milter: yes\r\n" in data and b"X-Top: first\r\n" in data
        finally:
            srv.stop()


def test_discard_acknowledges_and_stores_nothing(tmp_path: Path) -> None:
    with TestMilter("discard") as milter:
        srv = serve(tmp_path, milter.endpoint)
        try:
            c = session(srv)
            assert send(c).startswith(b"250 2.0.0 Ok: queued as")
            assert send(c).startswith(b"250")  # the next message of the session too
            c.close()
            srv.wait_output("discarded by a milter")
            assert srv.messages("alice@example.com", 0) == []
        finally:
            srv.stop()


def test_quarantine_goes_into_junk_with_a_field(tmp_path: Path) -> None:
    with TestMilter("quarantine") as milter:
        srv = serve(tmp_path, milter.endpoint)
        junk = srv.maildir("alice@example.com") / ".Junk"
        for sub in ("tmp", "new", "cur"):
            (junk / sub).mkdir(parents=True)
        try:
            c = session(srv)
            assert send(c).startswith(b"250")
            c.close()
            deadline = time.monotonic() + 10
            while not list((junk / "new").iterdir()) and time.monotonic() < deadline:
                time.sleep(0.02)
            (stored,) = list((junk / "new").iterdir())
            assert b"X-Quarantine: looks suspicious (milter)\r\n" in stored.read_bytes()
            assert srv.messages("alice@example.com", 0) == []
        finally:
            srv.stop()


def stored_after(tmp: Path, changes: list[bytes], body: bytes = b"hello\r\n", fsync: str = "batch",
                 rcpts: tuple[bytes, ...] = (b"alice@example.com",), extra: tuple[str, ...] = (),
                 expect: tuple[tuple[str, int], ...] = (("alice@example.com", 1),)) -> dict[str, list[bytes]]:
    """Send one message past a milter that asks for ``changes``; what each mailbox in ``expect`` then holds."""
    with TestMilter("edit") as milter:
        milter.changes = changes
        srv = serve(tmp, milter.endpoint, extra=("--fsync", fsync, *extra))
        for who, _ in expect:
            for sub in ("tmp", "new", "cur"):
                (srv.maildir(who) / sub).mkdir(parents=True, exist_ok=True)
        try:
            c = session(srv)
            reply = send(c, body, rcpts=rcpts)
            assert reply.startswith(b"250 2.0.0 Ok: queued as"), reply
            c.close()
            found = {who: [p.read_bytes() for p in srv.messages(who, n)] for who, n in expect}
            for who, n in expect:
                assert len(found[who]) == n, (who, srv.drain.text() if srv.drain else "")
            assert metric(srv, 'fastsmtp_milter_unapplied_total{milter="0"}') == 0
            return found
        finally:
            srv.stop()


def trace_and_rest(data: bytes) -> tuple[bytes, bytes]:
    """(the Return-Path line, the rest) of a stored message."""
    first, rest = data.split(b"\r\n", 1)
    return first + b"\r\n", rest


@pytest.mark.parametrize("fsync", ["batch", "always"])
def test_changed_and_deleted_fields_are_what_is_stored(tmp_path: Path, fsync: str) -> None:
    changes = [change(b"m", b"Subject", b"[filtered] was: filtered", index=1),
               change(b"m", b"Message-ID", b"", index=1),  # an empty value deletes
               change(b"m", b"X-Absent", b"added at the end", index=1),
               change(b"m", b"X-Absent-Too", b"", index=1)]  # nothing to delete: nothing happens
    body = b"".join(b"body line %05d\r\n" % i for i in range(20000))  # 320 KB: spilled to a file
    (data,) = stored_after(tmp_path, changes, body, fsync)["alice@example.com"]
    head, _, stored_body = data.partition(b"\r\n\r\n")
    assert stored_body == body
    fields = [line.split(b":", 1)[0] for line in head.split(b"\r\n") if line[:1] not in (b" ", b"\t")]
    # The order of the fields is kept; the changed one stays in its place.
    assert fields == [b"Return-Path", b"Received", b"From", b"To", b"Subject", b"X-Absent"]
    assert b"\r\nSubject: [filtered] was: filtered\r\n" in head and b"Message-ID" not in head
    assert b"X-Absent-Too" not in head
    assert f",S={len(data)}".encode() in b"".join(  # the Maildir size in the name is the edited one
        p.name.encode() for p in (tmp_path / "mail" / "example.com" / "alice" / "new").iterdir())


@pytest.mark.parametrize("fsync", ["batch", "always"])
@pytest.mark.parametrize("old, new", [(b"short\r\n", 70000), (b"x" * 998 + b"\r\n" * 300, 10)])
def test_a_replaced_body_is_what_is_stored(tmp_path: Path, fsync: str, old: bytes, new: int) -> None:
    replacement = b"".join(b"replaced line %06d\r\n" % i for i in range(new))
    pieces = [replacement[i:i + 65535] for i in range(0, len(replacement), 65535)]
    (data,) = stored_after(tmp_path, [body_change(p) for p in pieces], old, fsync)["alice@example.com"]
    head, _, stored_body = data.partition(b"\r\n\r\n")
    assert stored_body == replacement
    assert head.endswith(b"Message-ID: <f1@example.net>") and b"\r\nSubject: filtered\r\n" in head


def test_a_changed_sender_is_the_return_path(tmp_path: Path) -> None:
    before = stored_after(tmp_path / "a", [])["alice@example.com"][0]
    after = stored_after(tmp_path / "b", [change(b"e", b"<bounces+x=y@lists.example>")])["alice@example.com"][0]
    assert trace_and_rest(after)[0] == b"Return-Path: <bounces+x=y@lists.example>\r\n"
    assert trace_and_rest(before)[0] == b"Return-Path: <s@example.net>\r\n"
    # Only the Return-Path changed (the Received lines differ in queue id and time only).
    strip = lambda d: trace_and_rest(d)[1].split(b"\r\nFrom: ", 1)[1]  # noqa: E731
    assert strip(after) == strip(before)


def test_recipients_added_and_removed(tmp_path: Path) -> None:
    changes = [change(b"-", b"<alice@example.com>"), change(b"+", b"<bob@example.com>"),
               change(b"2", b"<carol@example.com>", b"NOTIFY=NEVER")]
    found = stored_after(tmp_path, changes, expect=(("bob@example.com", 1), ("carol@example.com", 1),
                                                    ("alice@example.com", 0)))
    assert found["bob@example.com"] == found["carol@example.com"]
    assert found["alice@example.com"] == []


def test_a_recipient_that_is_not_local_is_not_delivered(tmp_path: Path) -> None:
    with TestMilter("edit") as milter:
        milter.changes = [change(b"+", b"<someone@elsewhere.example>"), change(b"+", b"<nobody@example.com>")]
        srv = serve(tmp_path, milter.endpoint)
        try:
            c = session(srv)
            assert send(c).startswith(b"250 2.0.0")
            c.close()
            assert len(srv.messages("alice@example.com", 1)) == 1
            srv.wait_output("someone@elsewhere.example>, which is not local (550 5.7.1)")
            srv.wait_output("nobody@example.com>, which is not local (550 5.1.1)")
        finally:
            srv.stop()


def test_every_recipient_removed_is_a_discard(tmp_path: Path) -> None:
    with TestMilter("edit") as milter:
        milter.changes = [change(b"-", b"<Alice@Example.COM>")]  # compared without regard to case
        srv = serve(tmp_path, milter.endpoint)
        try:
            c = session(srv)
            assert send(c).startswith(b"250 2.0.0 Ok: queued as")
            c.close()
            srv.wait_output("left without recipients by a milter")
            assert srv.messages("alice@example.com", 0) == []
        finally:
            srv.stop()


def test_a_new_body_past_the_message_size_is_the_milters_failure(tmp_path: Path) -> None:
    # --max-message-size 10000: the changes may bring 10,000 octets and a
    # header section's 512 KiB, no more; 16 packets of 64 KiB are past that.
    with TestMilter("edit") as milter:
        milter.changes = [body_change(b"y" * 65535)] * 16
        srv = serve(tmp_path, milter.endpoint, extra=("--max-message-size", "10000"))
        try:
            c = session(srv)
            assert send(c).startswith(b"451 4.7.1")
            c.close()
            srv.wait_output("changes over")
            assert srv.messages("alice@example.com", 0) == []
        finally:
            srv.stop()


FAULTS = ["die-at-connect", "die-at-rcpt", "sleep-at-mail", "garbage-at-helo", "sleep-at-eom", "die-at-eom"]


@pytest.mark.parametrize("default", ["tempfail", "accept", "reject"])
@pytest.mark.parametrize("fault", FAULTS)
def test_a_broken_milter_gets_the_default_action(tmp_path: Path, fault: str, default: str) -> None:
    with TestMilter(fault) as milter:
        srv = serve(tmp_path, milter.endpoint, default=default)
        try:
            c = Client(srv.connect())
            first = c.reply()
            if fault == "die-at-connect" and default != "accept":
                # The connection itself is refused instead of greeted.
                assert first.startswith(b"451 4.7.1" if default == "tempfail" else b"550 5.7.1"), first
                return
            assert first.startswith(b"220 ")
            c.send(b"EHLO client.example\r\n")
            helo = c.reply()
            if fault == "garbage-at-helo" and default != "accept":
                assert helo.startswith(b"451 4.7.1" if default == "tempfail" else b"550 5.7.1"), helo
                return
            assert helo.startswith(b"250")
            reply = send(c)
            if default == "accept":
                assert reply.startswith(b"250 2.0.0 Ok: queued as"), reply
                assert len(srv.messages("alice@example.com", 1)) == 1
            else:
                assert reply.startswith(b"451 4.7.1" if default == "tempfail" else b"550 5.7.1"), reply
                assert srv.messages("alice@example.com", 0) == []
            c.close()
            srv.wait_output("milter inet:127.0.0.1")
            assert metric(srv, 'fastsmtp_milter_failures_total{milter="0"}') == 1
        finally:
            srv.stop()


def test_a_milter_that_is_down(tmp_path: Path) -> None:
    from dnsserver import free_port

    srv = serve(tmp_path, f"inet:127.0.0.1:{free_port()}", default="tempfail")
    try:
        c = Client(srv.connect())
        assert c.reply().startswith(b"451 4.7.1")
    finally:
        srv.stop()


def test_opendkim_signs_mail_from_a_local_domain(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    dkim = pytest.importorskip("dkim")
    with signing_opendkim(tmp_path_factory.mktemp("opendkim-server")) as (port, record):
        srv = serve(tmp_path, f"inet:{port}@127.0.0.1")
        try:
            c = session(srv)
            content = (b"From: Alice <alice@signed.example>\r\nTo: alice@example.com\r\nSubject: signed here\r\n"
                       b"Date: Wed, 02 Dec 2026 10:00:00 +0000\r\nMessage-ID: <s1@signed.example>\r\n\r\n")
            assert send(c, b"Signed by the milter.\r\n", sender=b"alice@signed.example", content=content
                        ).startswith(b"250")
            c.close()
            data = srv.messages("alice@example.com", 1)[0].read_bytes()
        finally:
            srv.stop()
    assert b"DKIM-Signature:" in data
    # What the receiver of this message will check: the stored message as sent on.
    message = data.split(b"\r\n", 1)[1] if data.startswith(b"Return-Path:") else data
    assert dkim.verify(message, dnsfunc=lambda name, timeout=5: record.encode())


@pytest.fixture(scope="module")
def rspamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    home = tmp_path_factory.mktemp("rspamd")
    with running_rspamd(home) as (port, _):
        yield port, home


def test_rspamd_rejects_gtube_and_tags_a_clean_message(tmp_path: Path, rspamd: tuple[int, Path]) -> None:
    port, home = rspamd
    srv = serve(tmp_path, f"inet:127.0.0.1:{port}", extra=("--milter-content-timeout", "60"))
    try:
        c = session(srv)
        clean = send(c, b"A clean message, nothing to see.\r\n",
                     content=MESSAGE.replace(b"\r\n\r\n", b"\r\nDate: Wed, 02 Dec 2026 10:00:00 +0000\r\n\r\n"))
        assert clean.startswith(b"250 2.0.0 Ok: queued as"), (clean, log_of(home))
        queue_id = clean.split()[-1].decode()
        spam = send(c, b"Buy now.\r\n" + GTUBE + b"\r\n")
        assert spam == b"554 5.7.1 Gtube pattern\r\n", log_of(home)
        c.close()
        (stored,) = srv.messages("alice@example.com", 1)
        data = stored.read_bytes()
        # rspamd's fields, for the message we stored (its queue id is ours: the i macro).
        assert f"X-Rspamd-Queue-Id: {queue_id}\r\n".encode() in data
        assert b"\r\nX-Spamd-Result: default: False [" in b"\r\n" + data
        assert b"X-Spam-Status: No, score=" in data
        # Not taken for a logged-in user: no {auth_authen} was sent.
        assert b"auth=pass" not in data
        assert data.endswith(b"\r\n\r\nA clean message, nothing to see.\r\n")
        # Its time is in the metrics: every step of two messages, the scans among them.
        assert metric(srv, 'fastsmtp_milter_verdicts_total{milter="0",verdict="replycode"}') == 1
        assert metric(srv, 'fastsmtp_milter_answer_seconds_count{milter="0"}') >= 2
        assert metric(srv, 'fastsmtp_milter_answer_seconds_sum{milter="0"}') > 0
    finally:
        srv.stop()


def test_opendkim_verifies_and_adds_its_authentication_results(tmp_path: Path,
                                                                tmp_path_factory: pytest.TempPathFactory) -> None:
    dkim = pytest.importorskip("dkim")
    from dkimtools import rsa_key
    from dnsserver import KnotServer, zone_text

    key = rsa_key(2048)
    zone = zone_text("sender.example", [("sel._domainkey", "TXT", key.record.decode())])
    content = (b"From: Sender <s@sender.example>\r\nTo: alice@example.com\r\nSubject: verify me\r\n"
               b"Date: Wed, 02 Dec 2026 10:00:00 +0000\r\nMessage-ID: <v1@sender.example>\r\n\r\n"
               b"Signed by the sender.\r\n")
    signed = dkim.sign(content, b"sel", b"sender.example", key.private, include_headers=[b"from", b"to", b"subject"])
    head, _, body = (signed + content).partition(b"\r\n\r\n")
    with KnotServer({"sender.example": zone}) as dns, \
            verifying_opendkim(tmp_path_factory.mktemp("opendkim-verify"), dns.port) as port:
        srv = serve(tmp_path, f"inet:{port}@127.0.0.1")
        try:
            c = session(srv)
            assert send(c, body, sender=b"s@sender.example", content=head + b"\r\n\r\n").startswith(b"250")
            tampered = body.replace(b"sender", b"someone else")
            assert send(c, tampered, sender=b"s@sender.example", content=head + b"\r\n\r\n").startswith(b"250")
            c.close()
            good, bad = (p.read_bytes() for p in srv.messages("alice@example.com", 2))
        finally:
            srv.stop()
    ar = re.compile(rb"Authentication-Results: verifier\.test\.example;\s+dkim=(\w+)[^\r\n]*(?:\r\n\s[^\r\n]*)*"
                    rb"header\.d=sender\.example")
    results = sorted(m.group(1) for d in (good, bad) for m in ar.finditer(d))
    assert results == [b"fail", b"pass"], (good[:600], bad[:600])
