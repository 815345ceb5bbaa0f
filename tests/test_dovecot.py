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
user, and Dovecot runs without root.
"""

from __future__ import annotations

import grp
import imaplib
import os
import poplib
import pwd
import shutil
import signal
import smtplib
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from helpers import RunningServer, children, start_server, wait_gone
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

LIBEXEC_DIRS = ["/usr/lib/dovecot", "/usr/libexec/dovecot", "/usr/local/libexec/dovecot"]


def find_dovecot() -> str:
    # /usr/sbin is not on every PATH (a non-root shell on Debian).
    path = shutil.which("dovecot") or next(
        (p for p in ("/usr/sbin/dovecot", "/usr/local/sbin/dovecot") if os.access(p, os.X_OK)), None
    )
    if path is None:
        pytest.skip("dovecot is not installed (apt-get install dovecot-imapd dovecot-pop3d; .ci/run does it)")
    libexec = [d for d in LIBEXEC_DIRS if os.path.isdir(d)]
    if libexec and not any(
        os.access(os.path.join(d, "imap"), os.X_OK) and os.access(os.path.join(d, "pop3"), os.X_OK)
        for d in libexec
    ):
        pytest.skip("dovecot's imap or pop3 server is missing (install dovecot-imapd and dovecot-pop3d)")
    return path


def free_port() -> int:
    # Dovecot takes a port number, not a socket: there is a short window in
    # which another process could take the port; wait_banner() then fails loudly.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dovecot_config(root: Path, imap_port: int, pop3_port: int, uid: int, gid: int, rootless: bool) -> str:
    mail_root = root / "mail"
    lines = [
        # Its own name, run and state directories: nothing shared with a system Dovecot.
        "instance_name = fastsmtp-test",
        f"base_dir = {root}/run",
        f"state_dir = {root}/state",
        f"log_path = {root}/dovecot.log",
        "protocols = imap pop3",
        "listen = 127.0.0.1",
        "ssl = no",
        # Dovecot 2.3 spelling; 2.4 renamed it auth_allow_cleartext.
        "disable_plaintext_auth = no",
        "auth_mechanisms = plain login",
        f"mail_location = maildir:{mail_root}/%d/%n",
        f"mail_uid = {uid}",
        f"mail_gid = {gid}",
        # The default (500) refuses system users such as mail (uid 8).
        f"first_valid_uid = {uid}",
        f"first_valid_gid = {gid}",
        "passdb {",
        "  driver = passwd-file",
        f"  args = {root}/passwd",
        "}",
        "userdb {",
        "  driver = passwd-file",
        f"  args = {root}/passwd",
        "}",
        "service imap-login {",
        "  inet_listener imap {",
        "    address = 127.0.0.1",
        f"    port = {imap_port}",
        "  }",
        "  inet_listener imaps {",
        "    port = 0",
        "  }",
        "}",
        "service pop3-login {",
        "  inet_listener pop3 {",
        "    address = 127.0.0.1",
        f"    port = {pop3_port}",
        "  }",
        "  inet_listener pop3s {",
        "    port = 0",
        "  }",
        "}",
    ]
    if rootless:
        # Without root Dovecot can neither switch users nor chroot.
        user = pwd.getpwuid(uid).pw_name
        group = grp.getgrgid(gid).gr_name
        lines += [
            f"default_login_user = {user}",
            f"default_internal_user = {user}",
            f"default_internal_group = {group}",
            "service anvil {\n  chroot =\n}",
            "service imap-login {\n  chroot =\n}",
            "service pop3-login {\n  chroot =\n}",
        ]
    return "\n".join(lines) + "\n"


def wait_banner(port: int, banner: bytes, proc: subprocess.Popen[bytes], log: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                if s.recv(512).startswith(banner):
                    return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"dovecot did not answer on port {port}:\n{read_log(log)}")


def read_log(log: Path) -> str:
    return log.read_text(errors="replace") if log.exists() else "(no log)"


class Dovecot:
    def __init__(self, root: Path, proc: subprocess.Popen[bytes], imap_port: int, pop3_port: int) -> None:
        self.root = root
        self.proc = proc
        self.imap_port = imap_port
        self.pop3_port = pop3_port
        self.log = root / "dovecot.log"

    def log_text(self) -> str:
        # -F keeps the master in the foreground; its own early errors go to stderr.
        stderr = self.root / "stderr"
        early = stderr.read_text(errors="replace") if stderr.exists() else ""
        return early + read_log(self.log)

    def stop(self) -> None:
        # Only the master we started, by its PID; it stops its own children.
        workers = children(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        wait_gone(workers)


@pytest.fixture
def mail_user() -> tuple[int, int, list[str]]:
    """The uid/gid that owns the mail, and the flags that make fastsmtp serve as it."""
    if os.geteuid() != 0:
        return os.getuid(), os.getgid(), []
    try:
        pw = pwd.getpwnam("mail")
    except KeyError:
        pytest.skip("running as root and there is no 'mail' user to read mail as (Dovecot refuses root)")
    return pw.pw_uid, pw.pw_gid, ["--user", "mail", "--group", grp.getgrgid(pw.pw_gid).gr_name]


@pytest.fixture
def root_dir(mail_user: tuple[int, int, list[str]]) -> Iterator[Path]:
    # Not pytest's tmp_path: its parent is 0700 root, which the mail user
    # cannot cross, and Dovecot's unix sockets need a short path.
    root = Path(tempfile.mkdtemp(prefix="fastsmtp-dovecot-"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def dovecot(root_dir: Path, mail_user: tuple[int, int, list[str]]) -> Iterator[Dovecot]:
    binary = find_dovecot()
    uid, gid, _ = mail_user
    mail_root = root_dir / "mail"
    mail_root.mkdir()
    for address in USERS:
        add_mailbox(str(mail_root), address)
    for dirpath, dirnames, filenames in os.walk(mail_root):
        for name in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
            os.chown(name, uid, gid)
    (root_dir / "state").mkdir()
    # passwd-file: user:password:uid:gid:gecos:home:shell:extra; empty uid/gid
    # take mail_uid/mail_gid.
    (root_dir / "passwd").write_text("".join(f"{u}:{{PLAIN}}{p}::::::\n" for u, p in USERS.items()))
    (root_dir / "passwd").chmod(0o644)
    imap_port, pop3_port = free_port(), free_port()
    config = root_dir / "dovecot.conf"
    config.write_text(dovecot_config(root_dir, imap_port, pop3_port, uid, gid, rootless=os.geteuid() != 0))
    with open(root_dir / "stderr", "wb") as err:
        proc = subprocess.Popen([binary, "-F", "-c", str(config)], stdin=subprocess.DEVNULL, stdout=err, stderr=err)
    dc = Dovecot(root_dir, proc, imap_port, pop3_port)
    try:
        wait_banner(imap_port, b"* OK", proc, dc.log)
        wait_banner(pop3_port, b"+OK", proc, dc.log)
        yield dc
    finally:
        dc.stop()


@pytest.fixture
def smtp_server(dovecot: Dovecot, mail_user: tuple[int, int, list[str]]) -> Iterator[RunningServer]:
    srv = start_server(dovecot.root / "mail", *mail_user[2])
    try:
        yield srv
    finally:
        srv.stop()


def imap_fetch(dc: Dovecot, user: str) -> tuple[bytes, int]:
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


def pop3_retr(dc: Dovecot, user: str) -> tuple[bytes, int]:
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


def test_imap_and_pop3_read_what_fastsmtp_stored(dovecot: Dovecot, smtp_server: RunningServer) -> None:
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

    log = dovecot.log_text()
    problems = [line for line in log.splitlines() if any(w in line for w in ("Error:", "Panic:", "Fatal:"))]
    assert problems == [], log
