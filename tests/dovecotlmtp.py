"""A Dovecot of the tests' own that takes mail over LMTP (RFC 2033), and one that proxies LMTP.

``LmtpDovecot`` listens for LMTP on a unix socket in its own run directory
and on a free TCP port of 127.0.0.1, and for IMAP on another free loopback
port (to read back what was delivered).  Users come from a passwd-file
(plaintext passwords, plaintext auth allowed: loopback only); mail is
stored as ``maildir:ROOT/mail/%d/%n``.  Two plugins are on for LMTP:

- quota (``maildir`` backend, ``lmtp_rcpt_check_quota = yes``), with one
  user (``QUOTA_USER``) limited to 1 KiB of storage.  A user already over
  quota is refused at RCPT, a message too large for what is left after
  the final dot.  ``quota_full_tempfail`` picks the reply: ``no`` (the
  default here, and Dovecot's) gives ``552 5.2.2``, ``yes`` gives
  ``452 4.2.2``; the fixtures ``lmtp_dovecot`` and
  ``lmtp_dovecot_tempfail`` start one of each.
- Pigeonhole Sieve: ``SIEVE_USER``'s script files a message with the
  header ``List-Id: <LIST_ID>`` into the folder ``Lists``
  (``fileinto :create``, RFC 5490 §3.2 "mailbox" extension), everything
  else stays in INBOX.

``ProxyDovecot`` is the cluster shape: one Dovecot with ``lmtp_proxy = yes``
whose passdb answers ``proxy host=127.0.0.1 port=...`` per user, in front
of two backend Dovecots, each with its own LMTP TCP port.

Every address is 127.0.0.1; every master is stopped by its PID in the
fixtures' teardown (dovecotrun.py).  The fixtures skip with a reason when
dovecot-lmtpd or dovecot-sieve is not installed.
"""

from __future__ import annotations

import contextlib
import imaplib
import shutil
from dataclasses import dataclass
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
    has_module,
    mail_owner,
    make_root,
    passwd_line,
    start_dovecot,
    wait_banner,
)
from fastsmtp.policy import add_mailbox

__all__ = [
    "USERS", "QUOTA_USER", "FULL_USER", "FULL_SIZE", "SIEVE_USER", "LIST_ID", "HOSTNAME", "LmtpDovecot", "ProxyDovecot",
    "find_lmtp_dovecot", "lmtp_config", "running_lmtp_dovecot", "running_proxy", "imap_messages",
    "lmtp_dovecot", "lmtp_dovecot_tempfail", "proxy_dovecot",
]

HOSTNAME = "lmtp.test.example"
QUOTA_USER = "quota@example.com"
FULL_USER = "full@example.com"
SIEVE_USER = "carol@example.org"
USERS = {
    "alice@example.com": "alice-secret",
    "bob@example.com": "bob-secret",
    SIEVE_USER: "carol-secret",
    QUOTA_USER: "quota-secret",
    FULL_USER: "full-secret",
}
#: userdb fields per user (passwd-file extra fields, space-separated).
USER_FIELDS = {QUOTA_USER: "userdb_quota_rule=*:storage=1k", FULL_USER: "userdb_quota_rule=*:storage=1k"}
#: FULL_USER's mailbox holds this much from the start: over its quota.
FULL_SIZE = 2048
LIST_ID = "fastsmtp-test.lists.example"
SIEVE_SCRIPT = f"""require ["fileinto", "mailbox"];
if header :contains "List-Id" "{LIST_ID}" {{
  fileinto :create "Lists";
}}
"""


def find_lmtp_dovecot() -> str:
    """The dovecot binary with its LMTP and IMAP servers and the Sieve plugin, or skip."""
    binary = find_dovecot("lmtp", "imap", hint="dovecot-lmtpd dovecot-imapd dovecot-sieve")
    if not has_module("lib90_sieve_plugin.so"):
        pytest.skip("dovecot's Sieve plugin is missing (install dovecot-sieve)")
    return binary


def lmtp_config(root: Path, name: str, owner: MailOwner, lmtp_port: int, imap_port: int | None,
                quota_full_tempfail: bool = False) -> str:
    """One instance: LMTP on ROOT/run/lmtp and 127.0.0.1:lmtp_port, IMAP (if a port), quota and Sieve."""
    protocols = "lmtp imap" if imap_port else "lmtp"
    lines = base_config(root, name, protocols, owner)
    lines += [
        f"hostname = {HOSTNAME}",
        # Dovecot's LMTP wants it for the bounces Sieve may send (none here).
        "postmaster_address = postmaster@example.com",
        # A home per user, for Dovecot's duplicate database (Sieve's, LMTP's).
        f"mail_home = {root}/home/%d/%n",
        "mail_plugins = $mail_plugins quota",
        # Refuse at RCPT a user already over quota (the default refuses only after DATA).
        "lmtp_rcpt_check_quota = yes",
        f"quota_full_tempfail = {'yes' if quota_full_tempfail else 'no'}",
        "protocol lmtp {",
        "  mail_plugins = $mail_plugins sieve",
        "}",
        "plugin {",
        "  quota = maildir:User quota",
        # A user without a script here keeps every message in INBOX.
        f"  sieve = {root}/sieve/%u.sieve",
        "}",
        "service lmtp {",
        # Relative to base_dir: ROOT/run/lmtp.
        "  unix_listener lmtp {",
        "    mode = 0666",
        "  }",
        "  inet_listener lmtp {",
        "    address = 127.0.0.1",
        f"    port = {lmtp_port}",
        "  }",
        "}",
    ]
    if imap_port:
        lines += [
            "service imap-login {",
            "  inet_listener imap {",
            "    address = 127.0.0.1",
            f"    port = {imap_port}",
            "  }",
            "  inet_listener imaps {",
            "    port = 0",
            "  }",
            "}",
        ]
    return "\n".join(lines) + "\n"


class LmtpDovecot(Dovecot):
    """A running instance: where its LMTP and IMAP listen, and its users' Maildirs."""

    def __init__(self, dc: Dovecot, lmtp_port: int, imap_port: int | None, owner: MailOwner) -> None:
        super().__init__(dc.root, dc.proc)
        self.lmtp_port = lmtp_port
        self.imap_port = imap_port
        self.owner = owner

    @property
    def lmtp_socket(self) -> Path:
        return self.root / "run" / "lmtp"

    @property
    def unix_target(self) -> str:
        return f"lmtp:unix:{self.lmtp_socket}"

    @property
    def tcp_target(self) -> str:
        return f"lmtp:127.0.0.1:{self.lmtp_port}"

    def maildir(self, user: str) -> Path:
        local, _, domain = user.partition("@")
        return self.root / "mail" / domain / local

    def restart(self) -> None:
        """Start the master again on the same configuration, ports and mail (after ``stop()``)."""
        self.proc = start_dovecot(find_lmtp_dovecot(), self.root, (self.root / "dovecot.conf").read_text()).proc
        wait_banner(self.lmtp_port, b"220 ", self)

    def files(self, user: str, folder: str = "") -> list[Path]:
        """The message files of ``user``'s INBOX (or ``folder``), new/ and cur/."""
        top = self.maildir(user) / (f".{folder}" if folder else "")
        return sorted(p for sub in ("new", "cur") if (top / sub).is_dir() for p in (top / sub).iterdir())


def _prepare(root: Path, owner: MailOwner, users: dict[str, str], fields: dict[str, str]) -> None:
    mail_root = root / "mail"
    mail_root.mkdir()
    for address in users:
        add_mailbox(str(mail_root), address)
    if FULL_USER in users:
        # There before Dovecot first counts the usage (maildirsize), so it is counted.
        local, _, domain = FULL_USER.partition("@")
        body = b"Subject: filler\r\n\r\n"
        body += b"x" * (FULL_SIZE - len(body))
        (mail_root / domain / local / "cur" / f"1000000000.M1P1.filler,S={FULL_SIZE}:2,S").write_bytes(body)
    (root / "home").mkdir()
    chown_tree(root / "home", owner.uid, owner.gid)
    sieve = root / "sieve"
    sieve.mkdir()
    (sieve / f"{SIEVE_USER}.sieve").write_text(SIEVE_SCRIPT)
    # Sieve compiles the script next to it (.svbin) as the mail user.
    chown_tree(mail_root, owner.uid, owner.gid)
    chown_tree(sieve, owner.uid, owner.gid)
    (root / "passwd").write_text("".join(passwd_line(u, p, fields.get(u, "")) for u, p in users.items()))
    (root / "passwd").chmod(0o644)


@contextlib.contextmanager
def running_lmtp_dovecot(quota_full_tempfail: bool = False, imap: bool = True,
                         users: dict[str, str] | None = None) -> Iterator[LmtpDovecot]:
    """Start an LMTP (and IMAP) Dovecot in a fresh root; stop it and remove the root at the end."""
    binary = find_lmtp_dovecot()
    owner = mail_owner()
    root = make_root("fastsmtp-lmtp-")
    try:
        _prepare(root, owner, USERS if users is None else users, USER_FIELDS)
        lmtp_port, imap_port = free_port(), free_port() if imap else None
        config = lmtp_config(root, f"fastsmtp-lmtp-{root.name}", owner, lmtp_port, imap_port, quota_full_tempfail)
        dc = LmtpDovecot(start_dovecot(binary, root, config), lmtp_port, imap_port, owner)
        try:
            wait_banner(lmtp_port, b"220 ", dc)
            wait_banner(dc.lmtp_socket, b"220 ", dc)
            if imap_port:
                wait_banner(imap_port, b"* OK", dc)
            yield dc
        finally:
            dc.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class ProxyDovecot:
    """An LMTP proxy in front of two backends; ``routes`` says which user lives on which."""

    proxy: LmtpDovecot
    backends: tuple[LmtpDovecot, LmtpDovecot]
    routes: dict[str, int]

    def backend_of(self, user: str) -> LmtpDovecot:
        return self.backends[self.routes[user]]


def proxy_config(root: Path, owner: MailOwner, lmtp_port: int) -> str:
    lines = base_config(root, f"fastsmtp-lmtp-{root.name}", "lmtp", owner)
    lines += [
        f"hostname = proxy.{HOSTNAME}",
        "postmaster_address = postmaster@example.com",
        # RCPT TO looks the user up in the passdb; its proxy/host/port fields say where to.
        "lmtp_proxy = yes",
        "service lmtp {",
        "  unix_listener lmtp {",
        "    mode = 0666",
        "  }",
        "  inet_listener lmtp {",
        "    address = 127.0.0.1",
        f"    port = {lmtp_port}",
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def running_proxy() -> Iterator[ProxyDovecot]:
    """Two backends (alice and carol on the first, bob and the quota user on the second) and a proxy."""
    binary = find_lmtp_dovecot()
    owner = mail_owner()
    routes = {"alice@example.com": 0, SIEVE_USER: 0, "bob@example.com": 1, QUOTA_USER: 1}
    with contextlib.ExitStack() as stack:
        backends = tuple(
            stack.enter_context(running_lmtp_dovecot(imap=False, users={u: USERS[u] for u, b in routes.items()
                                                                         if b == i}))
            for i in (0, 1)
        )
        root = make_root("fastsmtp-lmtpproxy-")
        stack.callback(shutil.rmtree, root, ignore_errors=True)
        # A proxy's passdb: no password (nopassword), the backend's address per user.
        (root / "passwd").write_text("".join(
            passwd_line(u, None, f"proxy=y host=127.0.0.1 port={backends[b].lmtp_port} nopassword=y")
            for u, b in routes.items()))
        (root / "passwd").chmod(0o644)
        (root / "mail").mkdir()
        lmtp_port = free_port()
        proxy = LmtpDovecot(start_dovecot(binary, root, proxy_config(root, owner, lmtp_port)), lmtp_port, None, owner)
        stack.callback(proxy.stop)
        wait_banner(lmtp_port, b"220 ", proxy)
        yield ProxyDovecot(proxy, (backends[0], backends[1]), routes)


def imap_messages(dc: LmtpDovecot, user: str, folder: str = "INBOX") -> list[bytes]:
    """Every message of ``user``'s ``folder``, as BODY.PEEK[] gives it (the stored octets)."""
    assert dc.imap_port is not None
    imap = imaplib.IMAP4("127.0.0.1", dc.imap_port, timeout=10)
    try:
        assert imap.login(user, USERS[user])[0] == "OK", dc.log_text()
        typ, data = imap.select(folder, readonly=True)
        assert typ == "OK", (typ, data, dc.log_text())
        count = int(data[0] or b"0")
        if count == 0:
            return []
        typ, data = imap.fetch(f"1:{count}", "(BODY.PEEK[])")
        assert typ == "OK", (typ, data, dc.log_text())
        return [item[1] for item in data if isinstance(item, tuple)]
    finally:
        imap.logout()


# -- fixtures (re-exported by conftest.py) -----------------------------------------


@pytest.fixture
def lmtp_dovecot() -> Iterator[LmtpDovecot]:
    """An LMTP Dovecot with ``quota_full_tempfail = no``: over quota is ``552 5.2.2``."""
    with running_lmtp_dovecot(quota_full_tempfail=False) as dc:
        yield dc


@pytest.fixture
def lmtp_dovecot_tempfail() -> Iterator[LmtpDovecot]:
    """An LMTP Dovecot with ``quota_full_tempfail = yes``: over quota is ``452 4.2.2``."""
    with running_lmtp_dovecot(quota_full_tempfail=True) as dc:
        yield dc


@pytest.fixture
def proxy_dovecot() -> Iterator[ProxyDovecot]:
    """An LMTP proxy Dovecot routing users to two backend Dovecots."""
    with running_proxy() as px:
        yield px
