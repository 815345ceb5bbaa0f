"""PROXY protocol v1/v2: the sans-IO parser, and a real HAProxy in front of fastsmtp."""

from __future__ import annotations

import shutil
import socket
import struct
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from fastsmtp.proxy import V2_SIGNATURE, ProxyHeaderError, ProxyInfo, parse_proxy_header
from helpers import MESSAGE, Client, RunningServer, stop_process, wait_for


def v2(command: int, family: int, payload: bytes) -> bytes:
    return V2_SIGNATURE + struct.pack("!BBH", 0x20 | command, family, len(payload)) + payload


TCP4 = struct.pack("!4s4sHH", socket.inet_aton("192.0.2.7"), socket.inet_aton("198.51.100.1"), 40000, 25)
TCP6 = struct.pack(
    "!16s16sHH", socket.inet_pton(socket.AF_INET6, "2001:db8::7"), socket.inet_pton(socket.AF_INET6, "2001:db8::1"), 40000, 25
)


@pytest.mark.parametrize(
    "header,info",
    [
        (b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 25\r\n", ProxyInfo("192.0.2.7", 40000, "198.51.100.1", 25)),
        (b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 25\r\n", ProxyInfo("2001:db8::7", 40000, "2001:db8::1", 25)),
        (b"PROXY UNKNOWN\r\n", ProxyInfo(None)),
        (b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n", ProxyInfo(None)),
        (v2(1, 0x11, TCP4), ProxyInfo("192.0.2.7", 40000, "198.51.100.1", 25)),
        (v2(1, 0x21, TCP6), ProxyInfo("2001:db8::7", 40000, "2001:db8::1", 25)),
        (v2(1, 0x11, TCP4 + b"\x04\x00\x03abc" + b"\x01\x00\x00"), ProxyInfo("192.0.2.7", 40000, "198.51.100.1", 25)),
        (v2(0, 0x00, b""), ProxyInfo(None)),  # LOCAL: a health check
    ],
)
def test_valid_headers_whole_and_byte_by_byte(header: bytes, info: ProxyInfo) -> None:
    trailing = b"EHLO x\r\n"
    assert parse_proxy_header(header + trailing) == (info, len(header))
    for i in range(len(header)):
        assert parse_proxy_header(header[:i]) is None, i


@pytest.mark.parametrize(
    "header",
    [
        b"PROXY TCP4 192.0.2.7 198.51.100.1 40000\r\n",
        b"PROXY TCP4 192.0.2.7 198.51.100.1 040000 25\r\n",
        b"PROXY TCP4 192.0.2.7 198.51.100.1 70000 25\r\n",
        b"PROXY TCP4 2001:db8::7 198.51.100.1 1 25\r\n",
        b"PROXY TCP5 192.0.2.7 198.51.100.1 1 25\r\n",
        b"PROXY TCP4 192.0.2.300 198.51.100.1 1 25\r\n",
        b"PROXY " + b"x" * 120,
        b"EHLO example.org\r\n",
        v2(1, 0x11, TCP4[:8]),  # address block shorter than its family
        v2(1, 0x11, TCP4 + b"\x04\x00\x09abc"),  # TLV longer than the header
        v2(1, 0x11, TCP4 + b"\x04\x00"),  # truncated TLV
        v2(2, 0x11, TCP4),  # unknown command
        V2_SIGNATURE[:11] + b"X" + b"\x21\x11\x00\x0c" + TCP4,
        V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x11, 60000),  # over the size limit
    ],
)
def test_malformed_headers_are_errors(header: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        parse_proxy_header(header)


# -- a real HAProxy in front ----------------------------------------------------------


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


@pytest.fixture
def haproxy(tmp_path: Path, server_factory) -> Iterator[tuple[RunningServer, int, int]]:  # type: ignore[no-untyped-def]
    """fastsmtp trusting 127.0.0.1, behind HAProxy with send-proxy (v1) and send-proxy-v2."""
    if shutil.which("haproxy") is None:
        pytest.skip("haproxy is not installed (CI installs it)")
    srv = server_factory("--proxy-trusted", "127.0.0.1/32")
    ports = []
    for _ in range(2):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        ports.append(s.getsockname()[1])
        s.close()
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(
        f"""
global
    maxconn 100
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend v1
    bind 127.0.0.1:{ports[0]}
    default_backend smtp_v1
frontend v2
    bind 127.0.0.1:{ports[1]}
    default_backend smtp_v2
backend smtp_v1
    server fastsmtp 127.0.0.1:{srv.port} send-proxy
backend smtp_v2
    server fastsmtp 127.0.0.1:{srv.port} send-proxy-v2
"""
    )
    proc = subprocess.Popen(["haproxy", "-db", "-f", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: _listening(ports[0]) and _listening(ports[1]), timeout=10, what="haproxy to listen")
        yield srv, ports[0], ports[1]
    finally:
        stop_process(proc)


@pytest.mark.parametrize("version", [1, 2])
def test_received_header_names_the_client_haproxy_saw(haproxy, version: int) -> None:  # type: ignore[no-untyped-def]
    srv, port_v1, port_v2 = haproxy
    # The client comes from 127.0.0.2; HAProxy reaches fastsmtp from
    # 127.0.0.1.  Only the PROXY header can tell fastsmtp about 127.0.0.2.
    sock = socket.create_connection(("127.0.0.1", port_v1 if version == 1 else port_v2), timeout=10, source_address=("127.0.0.2", 0))
    c = Client(sock)
    assert c.reply().startswith(b"220 ")
    c.send(b"EHLO c.example\r\nMAIL FROM:<s@example.net>\r\nRCPT TO:<alice@example.com>\r\nDATA\r\n")
    assert [r[:3] for r in c.replies(4)] == [b"250", b"250", b"250", b"354"]
    c.send(MESSAGE + b".\r\nQUIT\r\n")
    assert c.reply().startswith(b"250 2.0.0")
    (path,) = srv.messages("alice@example.com")
    assert b"Received: from c.example ([127.0.0.2])" in path.read_bytes()


def test_proxy_header_from_untrusted_address_is_refused(server_factory) -> None:  # type: ignore[no-untyped-def]
    srv = server_factory("--proxy-trusted", "127.0.0.1/32")
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=10, source_address=("127.0.0.3", 0))
    c = Client(sock)
    assert c.reply().startswith(b"220 ")  # untrusted: an ordinary client, greeted at once
    c.send(b"PROXY TCP4 203.0.113.9 127.0.0.1 1234 25\r\n")
    assert c.reply().startswith(b"554 5.7.0")
    assert c.closed()


def test_trusted_peer_with_a_malformed_header_is_closed(server_factory) -> None:  # type: ignore[no-untyped-def]
    srv = server_factory("--proxy-trusted", "127.0.0.1/32")
    c = Client(srv.connect())
    c.send(b"EHLO not-a-proxy.example\r\n")
    assert c.closed() or c.closed()


def test_trusted_peer_that_says_nothing_times_out(server_factory) -> None:  # type: ignore[no-untyped-def]
    srv = server_factory("--proxy-trusted", "127.0.0.1/32", "--proxy-timeout", "0.5")
    sock = srv.connect()
    sock.settimeout(10)
    assert sock.recv(100) == b""  # closed, never greeted
