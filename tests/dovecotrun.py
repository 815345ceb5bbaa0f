"""Running a Dovecot of the tests' own: the binary, the mail owner, ports, start, wait, stop.

What test_dovecot.py (IMAP/POP3 reading what fastsmtp stored) and
dovecotlmtp.py (LMTP delivery into Dovecot) share.  Every instance gets a
configuration of its own, with its own instance name, base, state and log
paths under one temporary root, and listens on 127.0.0.1 only, so it never
meets a system Dovecot.  Every instance started here is stopped by the PID
of its master, which stops its own children; every wait has a deadline.

Dovecot refuses mail access as root (hard-coded), so when the tests run as
root the mail belongs to the unprivileged ``mail`` user and Dovecot
switches to it; otherwise the mail belongs to the current user and Dovecot
runs without root (``rootless``).
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from helpers import children, wait_gone

__all__ = [
    "LIBEXEC_DIRS", "MODULE_DIRS", "MailOwner", "Dovecot", "find_dovecot", "has_module", "free_port",
    "wait_banner", "read_log", "chown_tree", "base_config", "passwd_line", "start_dovecot", "mail_owner",
    "make_root", "mail_user", "root_dir",
]

LIBEXEC_DIRS = ["/usr/lib/dovecot", "/usr/libexec/dovecot", "/usr/local/libexec/dovecot"]
MODULE_DIRS = ["/usr/lib/dovecot/modules", "/usr/lib64/dovecot", "/usr/local/lib/dovecot"]


@dataclass(frozen=True)
class MailOwner:
    """Who owns the mail, and the fastsmtp flags that make it serve as that user."""

    uid: int
    gid: int
    server_flags: tuple[str, ...]

    @property
    def rootless(self) -> bool:
        return os.geteuid() != 0


def find_dovecot(*programs: str, hint: str = "dovecot-imapd dovecot-pop3d") -> str:
    """The dovecot binary, or skip the test when it or one of its ``programs`` is missing."""
    # /usr/sbin is not on every PATH (a non-root shell on Debian).
    path = shutil.which("dovecot") or next(
        (p for p in ("/usr/sbin/dovecot", "/usr/local/sbin/dovecot") if os.access(p, os.X_OK)), None
    )
    if path is None:
        pytest.skip(f"dovecot is not installed (apt-get install {hint}; .ci/run does it)")
    libexec = [d for d in LIBEXEC_DIRS if os.path.isdir(d)]
    for program in programs:
        if libexec and not any(os.access(os.path.join(d, program), os.X_OK) for d in libexec):
            pytest.skip(f"dovecot's {program} server is missing (install {hint})")
    return path


def has_module(name: str) -> bool:
    """Whether a Dovecot plugin (``lib90_sieve_plugin.so``) is installed."""
    return any(os.path.exists(os.path.join(d, name)) for d in MODULE_DIRS)


def free_port() -> int:
    # Dovecot takes a port number, not a socket: there is a short window in
    # which another process could take the port; wait_banner() then fails loudly.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def read_log(log: Path) -> str:
    return log.read_text(errors="replace") if log.exists() else "(no log)"


def chown_tree(top: Path, uid: int, gid: int) -> None:
    for dirpath, dirnames, filenames in os.walk(top):
        for name in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
            os.chown(name, uid, gid)


def passwd_line(user: str, password: str | None, extra: str = "") -> str:
    """One passwd-file line: user:password:uid:gid:gecos:home:shell:extra.

    Empty uid/gid take mail_uid/mail_gid.  ``password`` None leaves the
    password empty (a proxy's passdb, which says ``nopassword`` instead).
    """
    secret = "" if password is None else f"{{PLAIN}}{password}"
    return f"{user}:{secret}::::::{extra}\n"


def base_config(root: Path, name: str, protocols: str, owner: MailOwner) -> list[str]:
    """What every test instance has: its own paths, loopback only, plaintext auth, maildir, passwd-file."""
    lines = [
        # Its own name, run and state directories: nothing shared with a system Dovecot.
        f"instance_name = {name}",
        f"base_dir = {root}/run",
        f"state_dir = {root}/state",
        f"log_path = {root}/dovecot.log",
        f"protocols = {protocols}",
        "listen = 127.0.0.1",
        "ssl = no",
        # Dovecot 2.3 spelling; 2.4 renamed it auth_allow_cleartext.
        "disable_plaintext_auth = no",
        "auth_mechanisms = plain login",
        f"mail_location = maildir:{root}/mail/%d/%n",
        f"mail_uid = {owner.uid}",
        f"mail_gid = {owner.gid}",
        # The default (500) refuses system users such as mail (uid 8).
        f"first_valid_uid = {owner.uid}",
        f"first_valid_gid = {owner.gid}",
        "passdb {",
        "  driver = passwd-file",
        f"  args = {root}/passwd",
        "}",
        "userdb {",
        "  driver = passwd-file",
        f"  args = {root}/passwd",
        "}",
    ]
    if owner.rootless:
        # Without root Dovecot can neither switch users nor chroot.
        user = pwd.getpwuid(owner.uid).pw_name
        group = grp.getgrgid(owner.gid).gr_name
        lines += [
            f"default_login_user = {user}",
            f"default_internal_user = {user}",
            f"default_internal_group = {group}",
            "service anvil {\n  chroot =\n}",
        ]
        lines += [f"service {p}-login {{\n  chroot =\n}}" for p in protocols.split() if p in ("imap", "pop3")]
    return lines


def wait_banner(where: int | Path, banner: bytes, dc: "Dovecot", timeout: float = 20.0) -> None:
    """Wait until a TCP port on 127.0.0.1 (or a unix socket) greets with ``banner``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if dc.proc.poll() is not None:
            break
        try:
            if isinstance(where, Path):
                s = socket.socket(socket.AF_UNIX)
                s.settimeout(2)
                s.connect(str(where))
            else:
                s = socket.create_connection(("127.0.0.1", where), timeout=2)
            with s:
                if s.recv(512).startswith(banner):
                    return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"dovecot did not answer on {where}:\n{dc.log_text()}")


class Dovecot:
    """One Dovecot master we started (``-F``), and where its log is."""

    def __init__(self, root: Path, proc: subprocess.Popen[bytes]) -> None:
        self.root = root
        self.proc = proc
        self.log = root / "dovecot.log"

    def log_text(self) -> str:
        # -F keeps the master in the foreground; its own early errors go to stderr.
        stderr = self.root / "stderr"
        early = stderr.read_text(errors="replace") if stderr.exists() else ""
        return early + read_log(self.log)

    def problems(self) -> list[str]:
        return [line for line in self.log_text().splitlines()
                if any(w in line for w in ("Error:", "Panic:", "Fatal:"))]

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


def start_dovecot(binary: str, root: Path, config: str) -> Dovecot:
    """Write ``config`` to ``root/dovecot.conf`` and start a master on it in the foreground."""
    (root / "state").mkdir(exist_ok=True)
    path = root / "dovecot.conf"
    path.write_text(config)
    with open(root / "stderr", "wb") as err:
        proc = subprocess.Popen([binary, "-F", "-c", str(path)], stdin=subprocess.DEVNULL, stdout=err, stderr=err)
    return Dovecot(root, proc)


def mail_owner() -> MailOwner:
    """The uid/gid that owns the mail (``mail`` when running as root), or skip."""
    if os.geteuid() != 0:
        return MailOwner(os.getuid(), os.getgid(), ())
    try:
        pw = pwd.getpwnam("mail")
    except KeyError:
        pytest.skip("running as root and there is no 'mail' user to read mail as (Dovecot refuses root)")
    return MailOwner(pw.pw_uid, pw.pw_gid, ("--user", "mail", "--group", grp.getgrgid(pw.pw_gid).gr_name))


def make_root(prefix: str = "fastsmtp-dovecot-") -> Path:
    # Not pytest's tmp_path: its parent is 0700 root, which the mail user
    # cannot cross, and Dovecot's unix sockets need a short path (108 octets).
    root = Path(tempfile.mkdtemp(prefix=prefix))
    root.chmod(0o755)
    return root


@pytest.fixture
def mail_user() -> MailOwner:
    """The uid/gid that owns the mail, and the flags that make fastsmtp serve as it."""
    return mail_owner()


@pytest.fixture
def root_dir() -> Iterator[Path]:
    root = make_root()
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)
