"""Screening, end to end: trusted networks, the remembered greeting test, DNSBL scores, greylisting.

Real parts: the server as a process, real sockets from loopback addresses
(a client "from 127.0.0.N" binds that source address), a real DNS server
(Knot, tests/dnsserver.py) serving a blocklist zone and an allow-list zone,
and clients whose address a PROXY header from a trusted peer sets.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import time
from pathlib import Path
from typing import Iterator

import aiosmtplib
import pytest

from dnsserver import KnotServer, zone_text
from fakedns import FaultServer
from helpers import Client, RunningServer, metric, start_server, worker_of

pytestmark = pytest.mark.timeout(120)

MESSAGE = b"From: a@example.net\r\nTo: alice@example.com\r\nSubject: screened\r\n\r\nhello\r\n"


def connect_from(srv: RunningServer, source: str, timeout: float = 10.0) -> socket.socket:
    """A connection to the server from the loopback address ``source``."""
    return socket.create_connection((srv.host, srv.port), timeout=timeout, source_address=(source, 0))


def time_to_greeting(srv: RunningServer, source: str) -> tuple[float, bytes, Client]:
    start = time.monotonic()
    c = Client(connect_from(srv, source))
    reply = c.reply()
    return time.monotonic() - start, reply, c


def rcpt_reply(c: Client, sender: str, rcpt: str) -> bytes:
    c.send(b"EHLO client.example\r\n")
    assert c.reply().startswith(b"250")
    c.send(f"MAIL FROM:<{sender}>\r\n".encode())
    assert c.reply().startswith(b"250")
    c.send(f"RCPT TO:<{rcpt}>\r\n".encode())
    return c.reply()


def deliver(c: Client, sender: str = "list@example.net", rcpt: str = "alice@example.com") -> bytes:
    """EHLO, MAIL, RCPT (its reply returned if refused), DATA; the reply to the end of data."""
    reply = rcpt_reply(c, sender, rcpt)
    if not reply.startswith(b"250"):
        return reply
    c.send(b"DATA\r\n")
    assert c.reply().startswith(b"354")
    c.send(MESSAGE + b".\r\n")
    return c.reply()


def decisions(srv: RunningServer, decision: str) -> int:
    return metric(srv, f'fastsmtp_screen_decisions_total{{decision="{decision}"}}')


# -- trusted networks and the per-address limit -------------------------------------


def test_200_concurrent_clients_from_loopback_each_deliver_one_message_on_the_defaults(tmp_path: Path) -> None:
    # The defaults: 50 connections per address and a 0.5 s greeting delay,
    # neither of which applies to the trusted loopback networks.
    srv = start_server(tmp_path / "mail", "--greeting-delay", "0.5")
    try:
        async def one(i: int) -> str:
            async with aiosmtplib.SMTP(hostname=srv.host, port=srv.port, timeout=30) as smtp:
                await asyncio.sleep(0.5)  # hold the connection while the others open theirs
                await smtp.sendmail("sender@example.net", ["alice@example.com"], MESSAGE + b"X-N: %d\r\n" % i)
                return "ok"

        async def all_of_them() -> list[object]:
            return await asyncio.gather(*(one(i) for i in range(200)), return_exceptions=True)

        results = asyncio.run(all_of_them())
        failures = [r for r in results if r != "ok"]
        assert not failures, failures[:3]
        assert len(srv.messages("alice@example.com", 200)) == 200
    finally:
        srv.stop()


def test_an_untrusted_address_still_meets_the_per_address_limit(tmp_path: Path) -> None:
    srv = start_server(tmp_path / "mail", "--trusted-networks", "127.0.0.1/32", "--max-connections-per-ip", "5",
                       "--metrics", "127.0.0.1:0")
    held: list[Client] = []
    try:
        for _ in range(5):
            c = Client(connect_from(srv, "127.0.0.2"))
            assert c.reply().startswith(b"220 ")
            held.append(c)
        c = Client(connect_from(srv, "127.0.0.2"))
        assert c.reply() == b"421 4.7.0 Error: too many connections from 127.0.0.2\r\n"
        assert c.closed()
        # The trusted address beside it is not limited.
        for _ in range(8):
            t = Client(connect_from(srv, "127.0.0.1"))
            assert t.reply().startswith(b"220 ")
            held.append(t)
        assert decisions(srv, "limit") == 1
        srv.wait_output("screen: 127.0.0.2 over the limit of 5 connections")
    finally:
        for c in held:
            c.close()
        srv.stop()


# -- the remembered greeting test ---------------------------------------------------

DELAY = 1.5  # long enough that "waited" and "greeted at once" cannot be confused on a busy machine


def test_a_returning_client_is_greeted_at_once_and_a_new_one_waits(tmp_path: Path) -> None:
    root = tmp_path / "mail"
    args = ("--trusted-networks", "127.0.0.1/32", "--greeting-delay", str(DELAY), "--metrics", "127.0.0.1:0")
    srv = start_server(root, *args, "--workers", "2")
    try:
        waited, greeting, c = time_to_greeting(srv, "127.0.0.3")
        assert greeting.startswith(b"220 ")
        assert deliver(c).startswith(b"250")
        c.close()
        # Each connection lands on either worker (SO_REUSEPORT): both find
        # the pass the first one recorded.
        again: list[float] = []
        served: set[int | None] = set()
        workers = srv.workers()
        while len(again) < 8 or (len(served) < 2 and len(again) < 40):
            seconds, greeting, c = time_to_greeting(srv, "127.0.0.3")
            assert greeting.startswith(b"220 ")
            again.append(seconds)
            served.add(worker_of(c.sock, workers))
            c.close()
        assert served == set(workers), "both workers greeted the returning client"
        newcomer, greeting, c = time_to_greeting(srv, "127.0.0.4")
        c.close()
        print(f"\ntime to greeting: new client {waited * 1000:.0f} ms, returning client median "
              f"{sorted(again)[len(again) // 2] * 1000:.1f} ms (max {max(again) * 1000:.1f}, {len(again)} "
              "connections over both workers), another new one "
              f"{newcomer * 1000:.0f} ms; delay {DELAY} s")
        assert waited >= DELAY and newcomer >= DELAY
        assert max(again) < DELAY / 2
        assert decisions(srv, "remembered") == len(again)
        assert decisions(srv, "pass") == 2
    finally:
        srv.stop()
    # A restart keeps the memory (the SQLite file under the mail root).
    srv = start_server(root, *args)
    try:
        seconds, greeting, c = time_to_greeting(srv, "127.0.0.3")
        c.close()
        assert greeting.startswith(b"220 ") and seconds < DELAY / 2
        assert metric(srv, 'fastsmtp_screen_greeting_memory_total{result="hit"}') == 1
    finally:
        srv.stop()


def test_an_early_talker_is_refused_and_then_refused_at_once(tmp_path: Path) -> None:
    srv = start_server(tmp_path / "mail", "--trusted-networks", "127.0.0.1/32", "--greeting-delay", str(DELAY),
                       "--metrics", "127.0.0.1:0")
    try:
        c = Client(connect_from(srv, "127.0.0.5"))
        c.send(b"EHLO spam.example\r\n")  # before the greeting
        assert c.reply().startswith(b"554 5.5.0")
        assert c.closed()
        seconds, reply, c = time_to_greeting(srv, "127.0.0.5")
        assert reply.startswith(b"554 5.5.0") and seconds < DELAY / 2
        assert c.closed()
        assert decisions(srv, "early_talker") == 1
        assert decisions(srv, "early_talker_remembered") == 1
        # Another address is not tainted by it.
        seconds, reply, c = time_to_greeting(srv, "127.0.0.6")
        c.close()
        assert reply.startswith(b"220 ") and seconds >= DELAY
    finally:
        srv.stop()


# -- DNSBL and DNSWL scores ----------------------------------------------------------

SITES = "bl.example=127.0.0.[2..11]*3 bl2.example*2 bl3.example white.example=127.0.[0..255].[0..255]*-2"


def _list_zone(origin: str, listed: dict[str, str]) -> str:
    records = [(f"{'.'.join(reversed(ip.split('.')))}", "A", answer) for ip, answer in listed.items()]
    return zone_text(origin, records)


@pytest.fixture(scope="module")
def lists() -> Iterator[KnotServer]:
    zones = {
        "bl.example": _list_zone("bl.example", {"192.0.2.10": "127.0.0.2", "192.0.2.15": "127.0.0.4"}),
        "bl2.example": _list_zone("bl2.example", {"192.0.2.11": "127.0.0.2", "192.0.2.13": "127.0.0.2"}),
        "bl3.example": _list_zone("bl3.example", {"192.0.2.11": "127.0.0.2", "192.0.2.14": "127.0.0.2"}),
        "white.example": _list_zone("white.example", {"192.0.2.12": "127.0.9.1", "192.0.2.15": "127.0.9.1"}),
    }
    with KnotServer(zones) as server:
        yield server


def proxied(srv: RunningServer, ip: str) -> tuple[float, bytes, Client]:
    """A session as ``ip`` (a PROXY v1 header from the trusted 127.0.0.1); its first reply and its time."""
    start = time.monotonic()
    sock = srv.connect()
    sock.sendall(f"PROXY TCP4 {ip} 192.0.2.25 40000 25\r\n".encode())
    c = Client(sock)
    reply = c.reply()
    return time.monotonic() - start, reply, c


@pytest.fixture(scope="module")
def screening(lists: KnotServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    srv = start_server(tmp_path_factory.mktemp("dnsbl") / "mail", "--proxy-trusted", "127.0.0.1/32",
                       "--dns-server", f"127.0.0.1:{lists.port}", "--dnsbl-sites", SITES, "--dnsbl-threshold", "3",
                       "--greylist", "--greylist-delay", "30", "--greeting-delay", "0.3",
                       "--spf", "off", "--dkim", "off", "--dmarc", "off", "--arc", "off", "--metrics", "127.0.0.1:0")
    try:
        yield srv
    finally:
        srv.stop()


@pytest.mark.parametrize(
    "ip, verdict",
    [
        ("192.0.2.20", None),  # on no list
        ("192.0.2.10", "bl.example"),  # 3 on one list
        ("192.0.2.11", "bl2.example"),  # 2 + 1 over two lists: the heavier named
        ("192.0.2.13", None),  # 2 on one list: under the threshold
        ("192.0.2.14", None),  # 1
        ("192.0.2.15", None),  # 3 - 2: the allow-list outweighs the block
    ],
)
def test_dnsbl_scores(screening: RunningServer, ip: str, verdict: str | None) -> None:
    _, reply, c = proxied(screening, ip)
    try:
        if verdict is None:
            assert reply.startswith(b"220 "), reply
        else:
            assert reply == f"554 5.7.1 Service unavailable; client [{ip}] blocked using {verdict}\r\n".encode()
            assert c.closed()
    finally:
        c.close()


def test_an_allow_listed_client_is_never_greylisted(screening: RunningServer) -> None:
    _, reply, c = proxied(screening, "192.0.2.12")
    try:
        assert reply.startswith(b"220 ")
        assert deliver(c, "someone@example.net").startswith(b"250")
    finally:
        c.close()
    # An unlisted client of the same server is greylisted.
    _, reply, c = proxied(screening, "192.0.2.20")
    try:
        assert rcpt_reply(c, "someone@example.net", "alice@example.com") == b"451 4.7.1 Greylisted, try again later\r\n"
    finally:
        c.close()
    assert decisions(screening, "dnsbl_allowlisted") >= 1


def test_a_list_that_times_out_counts_as_not_listed(tmp_path: Path) -> None:
    with FaultServer("silent") as silent:
        srv = start_server(tmp_path / "mail", "--proxy-trusted", "127.0.0.1/32",
                           "--dns-server", f"127.0.0.1:{silent.port}", "--dns-timeout", "1",
                           "--dnsbl-sites", "bl.example*5 bl2.example*5", "--greeting-delay", "0",
                           "--spf", "off", "--dkim", "off", "--dmarc", "off", "--arc", "off",
                           "--metrics", "127.0.0.1:0")
        try:
            seconds, reply, c = proxied(srv, "192.0.2.10")
            try:
                assert reply.startswith(b"220 "), reply
                assert deliver(c).startswith(b"250")
            finally:
                c.close()
            print(f"\ntwo silent lists cost the greeting {seconds * 1000:.0f} ms (--dns-timeout 1)")
            assert seconds >= 1.0
            assert metric(srv, "fastsmtp_dnsbl_lookup_failures_total") == 2
        finally:
            srv.stop()


# -- greylisting ---------------------------------------------------------------------


def test_greylisting_first_early_and_late_attempts_across_workers_and_a_restart(tmp_path: Path) -> None:
    root = tmp_path / "mail"
    delay = 2.0
    args = ("--trusted-networks", "127.0.0.1/32", "--greylist", "--greylist-delay", str(delay),
            "--metrics", "127.0.0.1:0")
    srv = start_server(root, *args, "--workers", "2")
    try:
        c = Client(connect_from(srv, "127.0.0.7"))
        assert c.reply().startswith(b"220 ")
        first = time.monotonic()
        assert rcpt_reply(c, "list@example.net", "alice@example.com") == b"451 4.7.1 Greylisted, try again later\r\n"
        # An unknown user is told so at once, greylisted or not.
        c.send(b"RCPT TO:<nobody@example.com>\r\n")
        assert c.reply().startswith(b"550 5.1.1")
        c.close()
        # An early retry, from another address of the same /24 (the triplet's network).
        c = Client(connect_from(srv, "127.0.0.8"))
        assert c.reply().startswith(b"220 ")
        assert deliver(c) == b"451 4.7.1 Greylisted, try again later\r\n"
        c.close()
        time.sleep(max(0.0, first + delay + 0.2 - time.monotonic()))
        for _ in range(6):  # the retry passes, and so does every later one, on either worker
            c = Client(connect_from(srv, "127.0.0.7"))
            assert c.reply().startswith(b"220 ")
            assert deliver(c).startswith(b"250")
            c.close()
        # The trusted address is never greylisted.
        c = Client(connect_from(srv, "127.0.0.1"))
        assert c.reply().startswith(b"220 ")
        assert deliver(c, "new@example.net", "bob@example.com").startswith(b"250")
        c.close()
        assert decisions(srv, "greylisted") == 2
        srv.wait_output("screen: greylisting passed for 127.0.0.7")
    finally:
        srv.stop()
    srv = start_server(root, *args)
    try:
        c = Client(connect_from(srv, "127.0.0.7"))
        assert c.reply().startswith(b"220 ")
        assert deliver(c).startswith(b"250")  # remembered across the restart
        c.close()
        c = Client(connect_from(srv, "127.0.0.7"))
        assert c.reply().startswith(b"220 ")
        # A new recipient is a new triplet.
        assert rcpt_reply(c, "list@example.net", "bob@example.com").startswith(b"451 4.7.1")
        c.close()
        assert len(srv.messages("alice@example.com", 7)) == 7
    finally:
        srv.stop()


# -- command lines (RFC 5321 §4.5.3.1.4) ---------------------------------------------


def test_long_command_lines(tmp_path: Path) -> None:
    srv = start_server(tmp_path / "mail")
    try:
        c = Client(srv.connect())
        assert c.reply().startswith(b"220 ")
        c.send(b"NOOP " + b"x" * 600 + b"\r\n")
        assert c.reply() == b"500 5.5.2 Error: line too long\r\n"
        c.send(b"NOOP\r\n")
        assert c.reply().startswith(b"250")  # the session goes on
        c.send(b"EHLO client.example\r\n")
        assert c.reply().startswith(b"250")
        sender = "s" * 64 + "@" + ("d" * 60 + ".") * 3 + "e" * 6  # RFC 5321 §4.5.3.1.3's 254 octets at most
        assert len(sender) == 254
        c.send(f"MAIL FROM:<{sender}> SIZE=1000 BODY=8BITMIME SMTPUTF8\r\n".encode())
        assert c.reply().startswith(b"250"), "a MAIL line over 300 octets with its parameters is accepted"
        c.close()
    finally:
        srv.stop()


def test_the_screen_database_is_under_the_mail_root(tmp_path: Path) -> None:
    # Where the greeting memory lives by default, so that an operator finds it.
    root = tmp_path / "mail"
    srv = start_server(root, "--trusted-networks", "127.0.0.1/32", "--greeting-delay", "0.2")
    try:
        _, reply, c = time_to_greeting(srv, "127.0.0.9")
        c.close()
        assert reply.startswith(b"220 ")
        assert (root / ".screen" / "screen.db").is_file()
    finally:
        srv.stop()
    shutil.rmtree(root)
