"""Fixtures that run the real server: a subprocess on 127.0.0.1, a real mail root.

Every server started here is stopped by its own PID, and every client
socket has a timeout, so no test can hang the run.
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

from fastsmtp.policy import add_mailbox

LOOPS = ["uvloop", "asyncio"]
HOSTNAME = "mx.test.example"
MAILBOXES = ["postmaster@localhost", "alice@example.com", "bob@example.com", "carol@example.org"]


@dataclass
class RunningServer:
    host: str
    port: int
    mail_root: Path
    proc: subprocess.Popen[str]
    output: list[str] = field(default_factory=list)
    # Reads the server's output into ``output`` until it ends: a pipe nobody
    # reads fills up (64 KiB of log lines) and then blocks the server.
    drain: threading.Thread | None = None

    def maildir(self, address: str) -> Path:
        user, domain = address.split("@")
        return self.mail_root / domain / user

    def messages(self, address: str) -> list[Path]:
        return sorted((self.maildir(address) / "new").iterdir())

    def wait_messages(self, address: str, count: int, timeout: float = 10.0) -> list[Path]:
        deadline = time.monotonic() + timeout
        while True:
            found = self.messages(address)
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.02)

    def connect(self, timeout: float = 10.0) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout=timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        workers = self.workers()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        wait_gone(workers)
        if self.drain is not None:
            self.drain.join(10)
        return self.proc.returncode

    def workers(self) -> list[int]:
        """The PIDs of the server's worker processes (none with --workers 0)."""
        return children(self.proc.pid)


def children(pid: int) -> list[int]:
    """PIDs whose parent is ``pid``, from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: fields follow the last ")".
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry))
    return sorted(found)


def wait_gone(pids: list[int], timeout: float = 10.0) -> None:
    """Wait until none of ``pids`` runs any more (a killed supervisor's workers die after it)."""
    # Until /proc forgets them: an unreaped zombie still looks alive to the
    # tmp/ cleanup of the next server on the same mail root.
    deadline = time.monotonic() + timeout
    for pid in pids:
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.01)


def start_server(mail_root: Path, *args: str, loop: str = "uvloop", timeout: float = 20.0) -> RunningServer:
    """Start ``fastsmtp serve`` on a free loopback port and wait until it listens."""
    if not mail_root.exists():
        mail_root.mkdir(parents=True)
        for address in MAILBOXES:
            add_mailbox(str(mail_root), address)
    cmd = [
        sys.executable, "-m", "fastsmtp", "serve",
        "--listen", "127.0.0.1:0",
        "--mail-root", str(mail_root),
        "--hostname", HOSTNAME,
        "--loop", loop,
        # No greeting delay unless a test asks for one: most tests connect
        # hundreds of times and only test_hostile.py is about early talkers.
        "--greeting-delay", "0",
        *args,
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    # Read with os.read, not readline(): a buffered reader could hold the
    # "listening on" line while select() reports nothing more to read.
    fd = proc.stdout.fileno()
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    output: list[str] = []
    pending = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not sel.select(timeout=0.5):
                if proc.poll() is not None:
                    break
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                line = raw.decode("utf-8", "replace") + "\n"
                output.append(line)
                if "listening on" in line:
                    port = int(line.split("listening on ")[1].split()[0].rsplit(":", 1)[1])
                    srv = RunningServer("127.0.0.1", port, mail_root, proc, output)
                    srv.drain = threading.Thread(target=_drain, args=(fd, pending, output), daemon=True)
                    srv.drain.start()
                    return srv
    finally:
        sel.close()
    proc.kill()
    proc.wait(5)
    raise RuntimeError("server did not start:\n" + "".join(output))


def _drain(fd: int, pending: bytes, output: list[str]) -> None:
    """Append the rest of the server's output to ``output``, line by line, until EOF."""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        pending += chunk
        *lines, pending = pending.split(b"\n")
        output.extend(raw.decode("utf-8", "replace") + "\n" for raw in lines)
    if pending:
        output.append(pending.decode("utf-8", "replace"))


@pytest.fixture(params=LOOPS)
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RunningServer]:
    """A fresh server per test, under uvloop and under stdlib asyncio."""
    srv = start_server(tmp_path / "mail", loop=request.param)
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[object]:
    """Start servers with extra flags; all are stopped at the end of the test."""
    started: list[RunningServer] = []

    def make(*args: str, loop: str = "uvloop", mail_root: Path | None = None) -> RunningServer:
        srv = start_server(mail_root or tmp_path / "mail", *args, loop=loop)
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.stop()


class Client:
    """A raw line-level SMTP client for tests that need exact bytes on the wire."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> bytes:
        """Read one complete (possibly multiline) reply."""
        lines = []
        while True:
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError(f"closed; got {b''.join(lines) + self.buf!r}")
                self.buf += chunk
            line, self.buf = self.buf.split(b"\r\n", 1)
            lines.append(line + b"\r\n")
            if len(line) < 4 or line[3:4] != b"-":
                return b"".join(lines)

    def replies(self, n: int) -> list[bytes]:
        return [self.reply() for _ in range(n)]

    def closed(self) -> bool:
        """True when the server has closed the connection (and sent nothing more)."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True  # closed with our input unread: a reset is a close too
        except socket.timeout:
            return False

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def client(server: RunningServer) -> Iterator[Client]:
    c = Client(server.connect())
    greeting = c.reply()
    assert greeting.startswith(b"220 ")
    try:
        yield c
    finally:
        c.close()
