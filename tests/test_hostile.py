"""Floods and slow clients: early talkers, the error tarpit, slow-drip DATA,
oversized lines, recipient floods, probes from other protocols."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from helpers import MESSAGE, Client, RunningServer, wait_for


def test_early_talker_gets_554_and_is_closed(server_factory) -> None:  # type: ignore[no-untyped-def]
    # Loopback is trusted by default, and trusted clients are not delayed.
    srv = server_factory("--greeting-delay", "1", "--greeting-pass-ttl", "0", "--trusted-networks", "192.0.2.0/24")
    c = Client(srv.connect())
    c.send(b"EHLO hasty.example\r\n")  # before the greeting
    assert c.reply().startswith(b"554 5.5.0")
    assert c.closed()
    # A patient client is greeted after the delay and served.
    p = Client(srv.connect())
    start = time.monotonic()
    assert p.reply().startswith(b"220 ")
    assert time.monotonic() - start >= 0.8
    p.send(b"EHLO patient.example\r\n")
    assert p.reply().startswith(b"250-")


def test_errors_past_the_soft_limit_are_delayed(server_factory) -> None:  # type: ignore[no-untyped-def]
    srv = server_factory("--soft-error-limit", "2", "--error-delay", "0.4", "--max-errors", "6")
    c = Client(srv.connect())
    c.reply()
    stamps = []
    for _ in range(5):
        c.send(b"BOGUS\r\n")
        sent = time.monotonic()
        assert c.reply().startswith(b"500 5.5.2")
        stamps.append(time.monotonic() - sent)
    # Errors 1 and 2 come at once; error 3 waits ~0.4 s, 4 ~0.8 s, 5 ~1.2 s.
    assert stamps[0] < 0.3 and stamps[1] < 0.3
    assert stamps[2] >= 0.35 and stamps[3] >= 0.75 and stamps[4] >= 1.1
    c.send(b"BOGUS\r\n")
    assert c.reply().startswith(b"500")
    assert c.reply().startswith(b"421 4.7.0")  # the hard limit closes at once


def test_slow_drip_data_is_cut_off_without_hurting_others(server_factory) -> None:  # type: ignore[no-untyped-def]
    srv = server_factory("--min-data-rate", "8192")  # 16 KiB allowance: ~2 s
    slow = Client(srv.connect())
    slow.reply()
    slow.send(b"EHLO slow.example\r\nMAIL FROM:<s@example.net>\r\nRCPT TO:<alice@example.com>\r\nDATA\r\n")
    assert [r[:3] for r in slow.replies(4)] == [b"250", b"250", b"250", b"354"]
    result: list[bytes] = []

    def drip() -> None:
        try:
            for _ in range(40):
                slow.send(b"x")
                time.sleep(0.25)  # the thing under test: a client that drips
        except OSError:
            pass

    t = threading.Thread(target=drip)
    t.start()
    # Meanwhile another client delivers normally.
    fast = Client(srv.connect())
    fast.reply()
    fast.send(b"EHLO fast.example\r\nMAIL FROM:<f@example.net>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n")
    fast.replies(4)
    fast.send(MESSAGE + b".\r\n")
    assert fast.reply().startswith(b"250 2.0.0")
    slow.sock.settimeout(15)
    result.append(slow.reply())
    t.join(15)
    assert result[0].startswith(b"421 4.4.2")
    assert srv.messages("alice@example.com", count=0) == []
    assert len(srv.messages("bob@example.com")) == 1


def test_ten_megabyte_line_without_crlf(server: RunningServer) -> None:
    c = Client(server.connect(timeout=60))
    c.reply()
    chunk = b"A" * 65536
    try:
        for _ in range(160):  # 10 MiB
            c.send(chunk)
    except OSError:
        pass  # the server may close before we finish
    c.send(b"\r\nNOOP\r\n")
    assert c.reply().startswith(b"500 5.5.2")
    assert c.reply().startswith(b"250")  # the line was skipped, the session goes on


def test_recipient_flood_hits_the_limit_cleanly(server_factory) -> None:  # type: ignore[no-untyped-def]
    # No tarpit here (it would stretch the 20 refusals over a minute; the
    # tarpit has its own test).
    server = server_factory("--error-delay", "0")
    c = Client(server.connect(timeout=60))
    c.reply()
    c.send(b"EHLO flood.example\r\nMAIL FROM:<s@example.net>\r\n")
    c.replies(2)
    c.send(b"".join(b"RCPT TO:<alice+%d@example.com>\r\n" % i for i in range(100_000)))
    codes = []
    while True:
        try:
            reply = c.reply()
        except ConnectionError:
            break
        codes.append(reply[:9])
        if reply.startswith(b"421"):
            break
    assert codes[:100] == [b"250 2.1.5"] * 100
    assert codes[100] == b"452 4.5.3"
    assert codes[-1] == b"421 4.7.0"  # the error budget ends the session
    assert len(codes) <= 121


@pytest.mark.parametrize("probe", [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"CONNECT mx:25 HTTP/1.1\r\n\r\n", b"USER root\r\n"])
def test_other_protocols_are_closed(client: Client, probe: bytes) -> None:
    client.send(probe)
    assert client.reply().startswith(b"221 2.7.0")
    assert client.closed()


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_five_thousand_idle_connections_do_not_block_delivery(server_factory) -> None:  # type: ignore[no-untyped-def]
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 12_000:
        pytest.skip(f"the file-descriptor limit ({hard}) is too low for 5,000 connections")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the server inherits it
    try:
        srv = server_factory(
            "--workers", "0", "--max-connections", "6000", "--max-connections-per-ip", "0"
        )
        before = _rss_kb(srv.proc.pid)
        idle = []
        for _ in range(5000):
            s = socket.create_connection((srv.host, srv.port), timeout=30)
            idle.append(s)
        for s in idle[-50:]:  # the last ones were accepted and greeted too
            assert s.recv(100).startswith(b"220 ")
        # Every connection accepted: the server holds a descriptor for each.
        wait_for(lambda: _open_fds(srv.proc.pid) >= 5000, what="5,000 accepted connections")
        grown = _rss_kb(srv.proc.pid) - before
        c = Client(srv.connect())
        assert c.reply().startswith(b"220")
        c.send(b"EHLO new.example\r\nMAIL FROM:<n@example.net>\r\nRCPT TO:<alice@example.com>\r\nDATA\r\n")
        assert [r[:3] for r in c.replies(4)] == [b"250", b"250", b"250", b"354"]
        c.send(MESSAGE + b".\r\n")
        assert c.reply().startswith(b"250 2.0.0")
        print(f"\n5,000 idle connections: worker RSS grew {grown / 1024:.1f} MB, {grown * 1024 / 5000:.0f} bytes each")
        # A generous bound, to catch a per-connection leak, not to benchmark.
        assert grown / 5000 < 64, f"{grown / 5000:.1f} KB per idle connection"
        for s in idle:
            s.close()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
