"""STARTTLS (RFC 3207) and implicit TLS with real peers: smtplib, swaks, openssl s_client."""

from __future__ import annotations

import os
import re
import shutil
import smtplib
import socket
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from helpers import LOOPS, MESSAGE, Client, RunningServer, body_of, start_server, wait_for


@pytest.fixture(scope="session")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A throw-away self-signed certificate for mx.test.example."""
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=mx.test.example", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )
    return str(cert), str(key)


@pytest.fixture(params=LOOPS)
def tls_server(request: pytest.FixtureRequest, tmp_path: Path, certificate: tuple[str, str]) -> Iterator[RunningServer]:
    cert, key = certificate
    srv = start_server(
        tmp_path / "mail", "--tls-cert", cert, "--tls-key", key, "--tls-listen", "127.0.0.1:0",
        loop=request.param,
    )
    try:
        yield srv
    finally:
        srv.stop()


def client_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def implicit_port(srv: RunningServer) -> int:
    line = srv.wait_output("implicit TLS on 127.0.0.1:", timeout=5)
    m = re.search(r"implicit TLS on 127\.0\.0\.1:(\d+)", line)
    assert m is not None, line
    return int(m.group(1))


def test_starttls_with_smtplib(tls_server: RunningServer) -> None:
    with smtplib.SMTP(tls_server.host, tls_server.port, timeout=10) as smtp:
        smtp.ehlo("client.example")
        assert smtp.has_extn("starttls")
        code, _ = smtp.starttls(context=client_context())
        assert code == 220
        smtp.ehlo("client.example")
        assert not smtp.has_extn("starttls")  # not offered inside TLS
        assert smtp.sendmail("s@example.net", ["alice@example.com"], MESSAGE) == {}
    (path,) = tls_server.messages("alice@example.com")
    data = path.read_bytes()
    assert body_of(path) == MESSAGE
    assert b" with ESMTPS id " in data
    assert re.search(rb"\(using TLSv1\.[23] with cipher \S+ \(\d+/\d+ bits\)\)", data)


def test_no_starttls_without_certificate(server: RunningServer) -> None:
    c = Client(server.connect())
    c.reply()
    c.send(b"EHLO c.example\r\n")
    assert b"STARTTLS" not in c.reply()
    c.send(b"STARTTLS\r\n")
    assert c.reply().startswith(b"502 5.5.1")


def test_pipelined_command_after_starttls_is_discarded(tls_server: RunningServer) -> None:
    sock = tls_server.connect()
    c = Client(sock)
    c.reply()
    c.send(b"EHLO c.example\r\n")
    c.reply()
    # CVE-2011-0411: the NOOP rides in the same write as STARTTLS.
    c.send(b"STARTTLS\r\nNOOP\r\n")
    assert c.reply() == b"220 2.0.0 Ready to start TLS\r\n"
    assert c.buf == b""
    tls = client_context().wrap_socket(sock, server_hostname="mx.test.example")
    t = Client(tls)
    t.send(b"EHLO c.example\r\n")
    first = t.reply()
    assert first.startswith(b"250-mx.test.example"), first  # not the NOOP's "250 2.0.0 Ok"
    t.send(b"MAIL FROM:<a@example.net>\r\n")
    assert t.reply().startswith(b"250 2.1.0")  # a fresh session, EHLO done inside TLS
    t.send(b"STARTTLS\r\n")
    assert t.reply().startswith(b"503 5.5.1")
    t.close()


def test_session_state_is_reset_by_starttls(tls_server: RunningServer) -> None:
    sock = tls_server.connect()
    c = Client(sock)
    c.reply()
    c.send(b"EHLO c.example\r\nSTARTTLS\r\n")
    c.replies(2)
    t = Client(client_context().wrap_socket(sock, server_hostname="mx.test.example"))
    t.send(b"MAIL FROM:<a@example.net>\r\n")
    assert t.reply().startswith(b"503 5.5.1")  # EHLO again first
    t.close()


@pytest.mark.parametrize("line,code", [(b"STARTTLS now\r\n", b"501 5.5.4"), (b"STARTTLS\r\n", b"503 5.5.1")])
def test_starttls_refusals(tls_server: RunningServer, line: bytes, code: bytes) -> None:
    c = Client(tls_server.connect())
    c.reply()
    if code == b"503 5.5.1":
        c.send(b"EHLO c.example\r\nMAIL FROM:<a@example.net>\r\n")  # inside a transaction
        c.replies(2)
    else:
        c.send(b"EHLO c.example\r\n")
        c.reply()
    c.send(line)
    assert c.reply().startswith(code)


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_garbage_client_hello_closes_cleanly(tls_server: RunningServer) -> None:
    # The sessions' sockets are the workers', not the supervisor's.
    workers = tls_server.workers()
    before = sum(map(_open_fds, workers))
    for _ in range(5):
        c = Client(tls_server.connect())
        c.reply()
        c.send(b"EHLO c.example\r\nSTARTTLS\r\n")
        c.replies(2)
        c.send(b"\x16\x03\x01\x00\x10this is not a ClientHello at all" * 4)
        assert c.closed() or c.closed()
        c.close()
    # Implicit TLS listener too.
    s = socket.create_connection(("127.0.0.1", implicit_port(tls_server)), timeout=10)
    s.sendall(b"EHLO plaintext.example\r\n")
    answer = b""
    while chunk := s.recv(4096):  # a TLS alert at most, then EOF (the socket has a timeout)
        answer += chunk
    assert b"250" not in answer
    s.close()
    # Nothing leaked: the server closes each socket once it has seen our close.
    wait_for(lambda: sum(map(_open_fds, workers)) <= before, timeout=5, what="the sockets to be closed")
    out = "".join(tls_server.output)
    assert "Traceback" not in out
    with smtplib.SMTP(tls_server.host, tls_server.port, timeout=10) as smtp:  # still serving
        assert smtp.noop()[0] == 250


def test_implicit_tls_listener(tls_server: RunningServer) -> None:
    port = implicit_port(tls_server)
    with smtplib.SMTP_SSL(tls_server.host, port, timeout=10, context=client_context()) as smtp:
        smtp.ehlo("client.example")
        assert not smtp.has_extn("starttls")
        assert smtp.sendmail("s@example.net", ["bob@example.com"], MESSAGE) == {}
    (path,) = tls_server.messages("bob@example.com")
    assert b" with ESMTPS id " in path.read_bytes()


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed (CI installs it)")
def test_swaks_tls(tls_server: RunningServer) -> None:
    result = subprocess.run(
        ["swaks", "--server", f"{tls_server.host}:{tls_server.port}", "--to", "postmaster@localhost",
         "--from", "s@example.net", "--tls", "--timeout", "10"],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "TLS started" in result.stdout
    (path,) = tls_server.messages("postmaster@localhost")
    assert b"with ESMTPS" in path.read_bytes()


def test_openssl_s_client_starttls(tls_server: RunningServer) -> None:
    result = subprocess.run(
        ["openssl", "s_client", "-starttls", "smtp", "-connect", f"{tls_server.host}:{tls_server.port}",
         "-servername", "mx.test.example", "-quiet"],
        input=b"EHLO openssl.example\r\nQUIT\r\n", capture_output=True, timeout=30,
    )
    assert b"250-mx.test.example" in result.stdout, result.stdout + result.stderr
    assert b"221 2.0.0" in result.stdout


def test_bad_certificate_is_one_clear_error(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.pem"
    bogus.write_text("not a certificate\n")
    (tmp_path / "mail").mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "fastsmtp", "serve", "--mail-root", str(tmp_path / "mail"),
         "--listen", "127.0.0.1:0", "--tls-cert", str(bogus), "--tls-key", str(bogus)],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("fastsmtp: error: tls-cert/tls-key: cannot load")
    assert "Traceback" not in result.stderr
