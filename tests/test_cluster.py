"""Several hosts: HAProxy in front of two fastsmtp "hosts", LMTP behind them to a Dovecot proxy and two backends.

The topology of the README's "Several hosts", on one machine:

    senders -> HAProxy 127.0.0.10 (PROXY v2, SMTP health checks)
                 -> fastsmtp A on 127.0.0.11, its own mail root and journal
                 -> fastsmtp B on 127.0.0.12, its own mail root and journal
                      -> LMTP -> Dovecot proxy -> backend 0 (alice) / backend 1 (bob)

Under load, host A's whole process tree is killed with SIGKILL and started
again.  The senders retry what was not acknowledged (as any MTA does with
a 4xx or a lost connection); every message acknowledged reaches its user's
backend.  How many arrived twice is printed (at least once: a message
delivered but not yet marked in the journal when the host died).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from dovecotlmtp import ProxyDovecot
from helpers import RunningServer, children, start_server, stop_process, wait_for, wait_gone

pytestmark = pytest.mark.timeout(300)

USERS = ("alice@example.com", "bob@example.com")  # backend 0 and backend 1
MESSAGES = 400


def _port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _host(tmp: Path, name: str, address: str, port: int, proxy: ProxyDovecot) -> RunningServer:
    return start_server(tmp / name, "--listen", f"{address}:{port}", "--workers", "1",
                        "--deliver", proxy.proxy.tcp_target, "--proxy-trusted", "127.0.0.1/32",
                        "--metrics", "127.0.0.1:0")


def _haproxy(tmp: Path, port: int, hosts: list[tuple[str, int]]) -> subprocess.Popen[bytes]:
    servers = "\n".join(
        f"    server h{i} {a}:{p} send-proxy-v2 check check-send-proxy inter 300ms fall 1 rise 1"
        for i, (a, p) in enumerate(hosts))
    cfg = tmp / "haproxy.cfg"
    cfg.write_text(f"""
global
    maxconn 200
defaults
    mode tcp
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    retries 2
    option redispatch
frontend mx
    bind 127.0.0.10:{port}
    default_backend hosts
backend hosts
    balance roundrobin
    option smtpchk EHLO check.example
    source 127.0.0.1
{servers}
""")
    proc = subprocess.Popen(["haproxy", "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)

    def listening() -> bool:
        try:
            socket.create_connection(("127.0.0.10", port), timeout=1).close()
            return True
        except OSError:
            return False

    wait_for(listening, 10, "haproxy to listen")
    return proc


class Senders:
    """Threads sending numbered messages through HAProxy, each retried until a 250 (bounded)."""

    def __init__(self, port: int, count: int, threads: int = 6, mark: int = 0) -> None:
        self.port = port
        #: Set once ``mark`` messages are acknowledged.
        self.marked = threading.Event()
        self._mark = mark
        self.todo = list(range(count))
        self.acked: set[int] = set()
        self.retries = 0
        self.failed: list[int] = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def join(self, timeout: float) -> None:
        for t in self._threads:
            t.join(timeout)

    def _next(self) -> int | None:
        with self._lock:
            return self.todo.pop(0) if self.todo else None

    def _run(self) -> None:
        while (n := self._next()) is not None:
            message = (f"From: s@example.net\r\nTo: {USERS[n % 2]}\r\nSubject: cluster {n}\r\n"
                       f"Message-ID: <cluster-{n}@example.net>\r\n\r\n" + "body line\r\n" * 40).encode()
            for attempt in range(40):
                try:
                    with smtplib.SMTP("127.0.0.10", self.port, timeout=15) as c:
                        c.sendmail("s@example.net", [USERS[n % 2]], message)
                    with self._lock:
                        self.acked.add(n)
                        if len(self.acked) >= self._mark:
                            self.marked.set()
                    break
                except (smtplib.SMTPException, OSError):
                    with self._lock:
                        self.retries += 1
                    time.sleep(0.2)
            else:
                self.failed.append(n)


def _delivered(proxy: ProxyDovecot, user: str) -> list[int]:
    ids = []
    for path in proxy.backend_of(user).files(user):
        m = re.search(rb"Message-ID: <cluster-(\d+)@", path.read_bytes())
        if m:
            ids.append(int(m.group(1)))
    return ids


def test_a_host_killed_under_load_loses_nothing(tmp_path: Path, proxy_dovecot: ProxyDovecot) -> None:
    if shutil.which("haproxy") is None:
        pytest.skip("haproxy is not installed (CI installs it)")
    addresses = ["127.0.0.11", "127.0.0.12"]
    ports = [_port(a) for a in addresses]
    hosts = [_host(tmp_path, f"host{i}", a, p, proxy_dovecot) for i, (a, p) in enumerate(zip(addresses, ports))]
    front = _port("127.0.0.10")
    haproxy = _haproxy(tmp_path, front, list(zip(addresses, ports)))
    try:
        senders = Senders(front, MESSAGES, mark=MESSAGES // 4)
        senders.start()
        assert senders.marked.wait(60), "a quarter of the messages"
        # Host A dies at once, supervisor and worker, mid-session for some senders.
        victim = hosts[0]
        tree = [victim.proc.pid, *children(victim.proc.pid)]
        for pid in tree:
            os.kill(pid, signal.SIGKILL)
        killed_at = len(senders.acked)
        victim.proc.wait(10)
        wait_gone(tree)
        time.sleep(1.0)
        # Started again on its address, mail root and journal: recovery adopts what it owed the backends.
        hosts[0] = _host(tmp_path, "host0", addresses[0], ports[0], proxy_dovecot)
        senders.join(120)
        assert not senders.todo and not senders.failed, (senders.todo, senders.failed)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            got = {u: _delivered(proxy_dovecot, u) for u in USERS}
            if set(got[USERS[0]]) | set(got[USERS[1]]) >= senders.acked:
                break
            time.sleep(0.2)
    finally:
        stop_process(haproxy)
        for h in hosts:
            h.stop()
    for user in USERS:
        # Each user's mail is on its own backend, and only there.
        other = proxy_dovecot.backends[1 - proxy_dovecot.routes[user]]
        assert other.files(user) == []
    delivered = got[USERS[0]] + got[USERS[1]]
    assert set(delivered) >= senders.acked  # every acknowledged message, nothing lost
    assert all(n % 2 == 0 for n in got[USERS[0]]) and all(n % 2 == 1 for n in got[USERS[1]])
    twice = len(delivered) - len(set(delivered))
    print(f"\ncluster: {MESSAGES} messages, {killed_at} acknowledged when host A was killed, "
          f"{senders.retries} sender retries, {twice} delivered twice")
