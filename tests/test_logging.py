"""Log lines of the real server: one per message and per connection, text or JSON, rotation."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from conftest import Client, RunningServer
from fastsmtp.logs import sanitize


def wait_lines(path: Path, word: str, count: int, timeout: float = 10.0) -> list[str]:
    """The lines of ``path`` containing ``word``, once there are ``count`` of them."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [line for line in path.read_text().splitlines() if word in line] if path.exists() else []
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def send(srv: RunningServer, helo: bytes, sender: bytes, rcpts: list[bytes], body: bytes) -> bytes:
    c = Client(srv.connect())
    assert c.reply().startswith(b"220 ")
    c.send(b"EHLO " + helo + b"\r\n")
    assert c.reply().startswith(b"250")
    c.send(b"MAIL FROM:<" + sender + b">\r\n")
    assert c.reply().startswith(b"250 ")
    for r in rcpts:
        c.send(b"RCPT TO:<" + r + b">\r\n")
        assert c.reply().startswith(b"250 ")
    c.send(b"DATA\r\n")
    assert c.reply().startswith(b"354 ")
    c.send(body + b".\r\n")
    reply = c.reply()
    c.send(b"QUIT\r\n")
    assert c.reply().startswith(b"221 ")
    c.close()
    return reply


BODY = b"Subject: secret-subject\r\n\r\nsecret-body\r\n"
BIG = b"Subject: big\r\n\r\n" + b"x" * 2000 + b"\r\n"


@pytest.mark.parametrize("workers", ["0", "2"])
def test_text_lines_per_message_and_connection(server_factory, tmp_path: Path, workers: str) -> None:  # type: ignore[no-untyped-def]
    log = tmp_path / "fastsmtp.log"
    srv = server_factory("--log-file", str(log), "--workers", workers, "--max-message-size", "1000")
    reply = send(srv, b"client.example", b"s@example.net", [b"alice@example.com", b"bob@example.com"], BODY)
    queue_id = reply.split()[-1].decode()
    assert send(srv, b"client.example", b"t@example.net", [b"alice@example.com"], BIG).startswith(b"552 ")
    queued = wait_lines(log, " queued ", 1)
    refused = wait_lines(log, " refused ", 1)
    assert len(wait_lines(log, " disconnect ", 2)) == 2
    assert len(queued) == 1 and len(refused) == 1
    line = queued[0]
    assert re.search(r"fastsmtp\[\d+\]( worker \d:)? INFO queued ", line), line
    assert f" id={queue_id} " in line
    assert " client=127.0.0.1 helo=client.example from=<s@example.net> " in line
    assert " to=<alice@example.com>,<bob@example.com> " in line
    assert re.search(r" size=\d+ code=250 ms=\d+$", line), line
    assert " from=<t@example.net> " in refused[0] and " code=552 " in refused[0]
    text = log.read_text()
    assert "secret" not in text  # never the content
    srv.stop()


def test_json_lines(server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    log = tmp_path / "fastsmtp.log"
    srv = server_factory("--log-file", str(log), "--log-format", "json", "--workers", "1")
    send(srv, b"client.example", b"s@example.net", [b"alice@example.com"], BODY)
    wait_lines(log, '"disconnect"', 1)
    records = [json.loads(line) for line in log.read_text().splitlines()]  # every line parses
    queued = [r for r in records if r["msg"] == "queued"]
    assert len(queued) == 1
    q = queued[0]
    assert q["client"] == "127.0.0.1" and q["helo"] == "client.example"
    assert q["from"] == "<s@example.net>" and q["to"] == ["<alice@example.com>"]
    assert q["code"] == 250 and isinstance(q["ms"], int) and q["role"] == "worker 1"


@pytest.mark.parametrize("kind", ["text", "json"])
def test_a_crlf_laden_helo_cannot_forge_a_line(server_factory, tmp_path: Path, kind: str) -> None:  # type: ignore[no-untyped-def]
    log = tmp_path / "fastsmtp.log"
    srv = server_factory("--log-file", str(log), "--log-format", kind, "--workers", "0")
    c = Client(srv.connect())
    assert c.reply().startswith(b"220 ")
    # A bare CR inside the line is refused by the session (500), but the
    # HELO below carries control characters that do reach the log.
    c.send(b"EHLO evil\x0b\x0c\x1b[31m\xe2\x80\xa8fake queued id=X code=250 ms=0\r\n")
    assert c.reply().startswith(b"250")
    c.send(b"MAIL FROM:<s@example.net>\r\nRCPT TO:<alice@example.com>\r\nDATA\r\n")
    assert [c.reply()[:3] for _ in range(3)] == [b"250", b"250", b"354"]
    c.send(BODY + b".\r\nQUIT\r\n")
    assert c.reply().startswith(b"250 ")
    c.close()
    lines = wait_lines(log, "disconnect", 1)
    text = log.read_text()
    assert "\x1b" not in text and "\x0b" not in text and "\u2028" not in text
    # Exactly two lines: the message and the disconnect; none forged.
    assert len(text.splitlines()) == 2
    if kind == "json":
        records = [json.loads(line) for line in text.splitlines()]
        assert [r["msg"] for r in records] == ["queued", "disconnect"]
        assert records[0]["helo"].startswith("evil\x0b")
    else:
        assert " helo=evil\\x0b\\x0c\\x1b[31m\\u2028fake\\x20queued\\x20id=X" in lines[0]


def test_sanitize() -> None:
    assert sanitize(b"a\r\nb c\\d") == "a\\x0d\\x0ab\\x20c\\x5cd"
    assert sanitize("ok.example") == "ok.example"
    assert sanitize([b"<a>", b"<b\n>"]) == "<a>,<b\\x0a>"
    assert sanitize(b"\xff") == "\\xff"  # invalid UTF-8 shows as an escape too


@pytest.mark.parametrize("workers", ["0", "2"])
def test_rotation_on_sigusr2(server_factory, tmp_path: Path, workers: str) -> None:  # type: ignore[no-untyped-def]
    log = tmp_path / "fastsmtp.log"
    srv = server_factory("--log-file", str(log), "--workers", workers)
    send(srv, b"one.example", b"s@example.net", [b"alice@example.com"], BODY)
    assert len(wait_lines(log, "helo=one.example", 2)) == 2  # queued and disconnect
    os.rename(log, tmp_path / "fastsmtp.log.1")
    os.kill(srv.proc.pid, signal.SIGUSR2)
    deadline = time.monotonic() + 10
    while not log.exists() and time.monotonic() < deadline:  # the supervisor reopens first
        time.sleep(0.05)
    time.sleep(0.3)  # the workers get the forwarded signal
    # Every worker must have reopened: send enough that each one serves some.
    for _ in range(6):
        send(srv, b"two.example", b"s@example.net", [b"alice@example.com"], BODY)
    assert len(wait_lines(log, "helo=two.example", 12)) == 12
    assert "two.example" not in (tmp_path / "fastsmtp.log.1").read_text()
    assert srv.proc.poll() is None  # the signal did not stop anything
    assert srv.stop() == 0
