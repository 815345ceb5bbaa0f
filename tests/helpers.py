"""What the tests of the real server share: a raw SMTP client, a whole
transaction, the body of a stored message, the server subprocess and the
thread that drains its output, and bounded waits.

Every wait here has a deadline and every socket a timeout, so no test can
hang the run.  conftest.py builds its fixtures from these; test modules
import them from here (``from helpers import ...``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol, Sequence, TypeVar

from fastsmtp.policy import add_mailbox

LOOPS = ["uvloop", "asyncio"]
HOSTNAME = "mx.test.example"
MAILBOXES = ["postmaster@localhost", "alice@example.com", "bob@example.com", "carol@example.org"]

MESSAGE = (
    b"From: Sender <sender@example.net>\r\n"
    b"To: Alice <alice@example.com>\r\n"
    b"Subject: hello\r\n"
    b"\r\n"
    b"Hello Alice.\r\n"
)

T = TypeVar("T")


# -- bounded waits -------------------------------------------------------------------


def wait_for(check: Callable[[], T], timeout: float = 15.0, what: str = "condition", interval: float = 0.02) -> T:
    """Poll ``check`` until it returns something true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def wait_port(proc: "subprocess.Popen[bytes]", port: int, timeout: float, what: str) -> None:
    """Wait until ``proc`` (a daemon a test started) accepts on 127.0.0.1:``port``, or has exited."""

    def listening() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return proc.poll() is not None

    wait_for(listening, timeout, what)


def kill_tree(srv: "RunningServer") -> None:
    """SIGKILL a server's whole process tree (supervisor and workers), by PID, and wait until it is gone."""
    tree = [srv.proc.pid, *children(srv.proc.pid)]
    for pid in tree:
        os.kill(pid, signal.SIGKILL)
    srv.proc.wait(10)
    wait_gone(tree)


def never(check: Callable[[], object], within: float = 0.3, what: str = "it") -> None:
    """A "nothing happened" check: fail as soon as ``check`` turns true within ``within`` seconds.

    It cannot prove that nothing ever happens, only that nothing did in a
    bounded time; each caller says why that time is enough.
    """
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        assert not check(), f"{what} happened"
        time.sleep(0.02)
    assert not check(), f"{what} happened"


# -- a raw SMTP client ---------------------------------------------------------------


class Client:
    """A raw line-level SMTP client for tests that need exact bytes on the wire."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> bytes:
        """Read one complete (possibly multiline) reply (RFC 5321 §4.2.1)."""
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


class Connectable(Protocol):
    def connect(self, timeout: float = 10.0) -> socket.socket: ...


def greeted(srv: Connectable) -> Client:
    """A new session, past its 220 greeting."""
    c = Client(srv.connect())
    greeting = c.reply()
    assert greeting.startswith(b"220 "), greeting
    return c


def ehlo(c: Client, name: bytes = b"client.example") -> bytes:
    c.send(b"EHLO " + name + b"\r\n")
    return c.reply()


def transaction(
    c: Client, rcpts: list[bytes], content: bytes, sender: bytes = b"sender@example.net", helo: bytes = b"client.example"
) -> bytes:
    """EHLO, MAIL, each RCPT (all must be accepted), DATA; return the reply to the end of data."""
    assert ehlo(c, helo).startswith(b"250-")
    c.send(b"MAIL FROM:<" + sender + b">\r\n")
    assert c.reply().startswith(b"250 ")
    for r in rcpts:
        c.send(b"RCPT TO:<" + r + b">\r\n")
        assert c.reply().startswith(b"250 ")
    c.send(b"DATA\r\n")
    assert c.reply().startswith(b"354 ")
    c.send(content + b".\r\n")
    return c.reply()


def body_of(path: Path) -> bytes:
    """The stored message without the trace headers the server prepends."""
    data = path.read_bytes()
    assert data.startswith(b"Return-Path: <")
    # Return-Path line, then a Received header of one line and its
    # continuation lines (they start with a tab).
    lines = data.split(b"\r\n")
    assert lines[1].startswith(b"Received: from ")
    i = 2
    while lines[i].startswith(b"\t"):
        i += 1
    return b"\r\n".join(lines[i:])


def stored(srv: "RunningServer", addresses: Sequence[str]) -> dict[bytes, list[str]]:
    """Every message in the ``new/`` of these mailboxes now, by body, with the mailboxes holding it."""
    found: dict[bytes, list[str]] = {}
    for address in addresses:
        for path in srv.messages(address, count=0):
            found.setdefault(body_of(path), []).append(address)
    return found


# -- processes -----------------------------------------------------------------------


class OutputDrain:
    """Reads a subprocess's output into ``lines`` on a thread, until EOF.

    A pipe nobody reads fills up (64 KiB of log lines) and then blocks the
    writer.  Readers wait for a line with ``wait_line`` (a condition, no
    polling).  ``os.read``, not ``readline()``: a buffered reader could hold
    a line back.
    """

    def __init__(self, fd: int) -> None:
        self.lines: list[str] = []
        self.eof = False
        self._fd = fd
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        pending = b""
        while True:
            try:
                chunk = os.read(self._fd, 65536)
            except OSError:
                chunk = b""
            pending += chunk
            if chunk:
                *done, pending = pending.split(b"\n")
            else:
                done, pending = ([pending] if pending else []), b""
            with self._cond:
                self.lines.extend(raw.decode("utf-8", "replace") + ("\n" if chunk else "") for raw in done)
                self.eof = not chunk
                self._cond.notify_all()
            if not chunk:
                return

    def wait_line(self, needle: str, timeout: float = 15.0, start: int = 0) -> str | None:
        """The first line from index ``start`` on that holds ``needle``; None at EOF or timeout."""
        found: list[str] = []

        def ready() -> bool:
            found[:] = [line for line in self.lines[start:] if needle in line][:1]
            return bool(found) or self.eof

        with self._cond:
            self._cond.wait_for(ready, timeout)
        return found[0] if found else None

    def text(self) -> str:
        with self._cond:
            return "".join(self.lines)

    def join(self, timeout: float = 10.0) -> None:
        self._thread.join(timeout)


def stop_process(proc: subprocess.Popen) -> None:  # type: ignore[type-arg]
    """SIGTERM a peer daemon a test started (by its PID), SIGKILL if it lingers."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


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


def metric(srv: "RunningServer", name: str) -> float:
    """One sample's value from the server's /metrics (started with --metrics 127.0.0.1:0): an int when whole."""
    import re
    import urllib.request

    line = srv.wait_output("/metrics")
    port = int(re.search(r"127\.0\.0\.1:(\d+)/metrics", line).group(1))  # type: ignore[union-attr]
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    found = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    assert found, f"{name} not in the metrics"
    value = float(found.group(1))
    return int(value) if value.is_integer() else value


def worker_of(sock: socket.socket, pids: list[int]) -> int | None:
    """The PID among ``pids`` holding the server side of this IPv4 client connection."""

    def hexed(address: tuple[str, int]) -> str:
        # /proc/net/tcp: the address as a little-endian 32-bit word, then the port.
        packed = socket.inet_aton(address[0])
        return f"{int.from_bytes(packed, 'little'):08X}:{address[1]:04X}"

    local, remote = hexed(sock.getpeername()[:2]), hexed(sock.getsockname()[:2])
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == local and fields[2] == remote:
            inode = fields[9]
            break
    if inode is None:
        return None
    target = f"socket:[{inode}]"
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    return pid
            except OSError:
                continue
    return None


@dataclass
class RunningServer:
    host: str
    port: int
    mail_root: Path
    proc: subprocess.Popen[str]
    output: list[str] = field(default_factory=list)
    drain: OutputDrain | None = None

    def maildir(self, address: str) -> Path:
        user, domain = address.split("@")
        return self.mail_root / domain / user

    def messages(self, address: str, count: int = 1, timeout: float = 10.0) -> list[Path]:
        """The files in the mailbox's new/, once there are ``count`` of them (or ``timeout`` passed).

        With the journal (``--fsync batch``) a message is delivered into new/
        a few milliseconds after its 250, so a test waits for what it
        expects; ``count=0`` looks once (for "nothing was stored").
        """
        deadline = time.monotonic() + timeout
        while True:
            found = sorted((self.maildir(address) / "new").iterdir())
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.005)

    def wait_messages(self, address: str, count: int, timeout: float = 10.0) -> list[Path]:
        return self.messages(address, count, timeout)

    def wait_output(self, needle: str, timeout: float = 15.0, start: int = 0) -> str:
        """The first output line from index ``start`` on that holds ``needle``; fail after ``timeout``."""
        assert self.drain is not None
        line = self.drain.wait_line(needle, timeout, start)
        assert line is not None, f"no {needle!r} in the output:\n{self.drain.text()}"
        return line

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


def start_server(
    mail_root: Path, *args: str, loop: str = "uvloop", timeout: float = 20.0, wrapper: Sequence[str] = ()
) -> RunningServer:
    """Start ``fastsmtp serve`` on a free loopback port and wait until it listens.

    ``wrapper`` runs the server under another command (strace); ``proc`` is
    then that command's process.
    """
    if not mail_root.exists():
        mail_root.mkdir(parents=True)
        for address in MAILBOXES:
            add_mailbox(str(mail_root), address)
    cmd = [
        *wrapper,
        sys.executable, "-m", "fastsmtp", "serve",
        "--listen", "127.0.0.1:0",
        "--mail-root", str(mail_root),
        "--hostname", HOSTNAME,
        "--loop", loop,
        # No greeting delay unless a test asks for one: most tests connect
        # hundreds of times and only test_hostile.py is about early talkers.
        "--greeting-delay", "0",
        # The tests ask no DNS server they did not start: a test that needs
        # one names its own after this, and a client outside the trusted
        # networks (a PROXY header's) meets a port that refuses at once.
        "--dns-server", "127.0.0.1:9",
        *args,
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    drain = OutputDrain(proc.stdout.fileno())
    line = drain.wait_line("listening on", timeout)
    if line is None:
        proc.kill()
        proc.wait(5)
        drain.join(5)
        raise RuntimeError("server did not start:\n" + drain.text())
    host, _, port = line.split("listening on ")[1].split()[0].rpartition(":")
    return RunningServer(host.strip("[]") or "127.0.0.1", int(port), mail_root, proc, drain.lines, drain)
