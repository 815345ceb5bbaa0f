"""Log lines of the real server: one per message and per connection, text or JSON, rotation."""

from __future__ import annotations

import asyncio
import json
import logging
import logging.handlers
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import RunningServer
from helpers import Client, greeted, transaction
from fastsmtp.logs import EventLog, _field, event_log, reopen_logs, sanitize, set_role, setup_logging


def wait_lines(path: Path, word: str, count: int, timeout: float = 10.0) -> list[str]:
    """The lines of ``path`` containing ``word``, once there are ``count`` of them."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [line for line in path.read_text().splitlines() if word in line] if path.exists() else []
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def send(srv: RunningServer, helo: bytes, sender: bytes, rcpts: list[bytes], body: bytes) -> bytes:
    c = greeted(srv)
    reply = transaction(c, rcpts, body, sender, helo)
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


# ------------------------------------------------------------ the fast path
#
# event_log() writes the per-message and per-connection lines without a
# LogRecord.  What it writes must be exactly what the formatters write for
# the record the server used to log, so every test below compares the two.

STAMP_TEXT = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ")
STAMP_JSON = re.compile(r'^\{"time": "\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}", ')
HOSTILE_HELO = b"evil\x0b\x0c\x1b[31m\xe2\x80\xa8fake queued id=X code=250 ms=0 \\x41 \x7f\xc2\x85\xff\xed\xa0\x80"


@contextmanager
def logging_to(path: Path, kind: str, role: str = "", level: str = "info") -> Iterator[EventLog]:
    """setup_logging as the CLI does, undone afterwards (pytest keeps its own handlers on root)."""
    root = logging.getLogger()
    saved, saved_level = root.handlers[:], root.level
    try:
        setup_logging(level, kind, str(path), role)
        yield event_log()
    finally:
        event_log().flush()
        for handler in root.handlers[:]:
            root.removeHandler(handler)
            handler.close()
        for handler in saved:
            root.addHandler(handler)
        root.setLevel(saved_level)
        event_log().bind()


def old_message(
    word: str, queue_id: str, client: str, helo: bytes, sender: bytes, rcpts: list[bytes], size: int, code: int, ms: int
) -> None:
    """The record the server logged before the fast path (server.py's _log_message)."""
    fields = {
        "id": queue_id, "client": client, "helo": helo, "from": b"<" + sender + b">",
        "to": [b"<" + r + b">" for r in rcpts], "size": size, "code": code, "ms": ms,
    }  # fmt: skip
    logging.getLogger("fastsmtp").info(word, extra={"fields": fields})


def old_disconnect(client: str, helo: bytes, tls: bool, messages: int, ms: int) -> None:
    fields = {"client": client, "helo": helo, "tls": "yes" if tls else "no", "messages": messages, "ms": ms}
    logging.getLogger("fastsmtp").info("disconnect", extra={"fields": fields})


def without_stamp(line: str, kind: str) -> str:
    stamp = STAMP_JSON if kind == "json" else STAMP_TEXT
    assert stamp.match(line), line
    return stamp.sub("", line)


def pairs(path: Path, kind: str) -> list[tuple[str, str]]:
    """The file's lines two by two (new path, old path), time stamps removed."""
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n")
    lines = [without_stamp(line, kind) for line in text.split("\n")[:-1]]
    assert len(lines) % 2 == 0, lines
    return list(zip(lines[::2], lines[1::2]))


MESSAGE_CASES = [
    ("queued", "4Xc9a1", "127.0.0.1", b"client.example", b"s@example.net",
     [b"alice@example.com", b"bob@example.com"], 1234, 250, 3),
    ("refused", "4Xc9a2", "2001:db8::1", b"", b"", [b"a@b"], 0, 552, 0),
    ("queued", "4Xc9a3", "192.0.2.1", HOSTILE_HELO, b"\"a b\\\\c\"@ex\xc3\xa9.example",
     [b"\xff@x", b"a\x00b@c", b"x\xe2\x80\xa9y"], 9, 250, 12345),
    ("refused", "4Xc9a4", "10.0.0.1", b"[192.0.2.1]", b"bounce\x1b@x", [], 1, 451, 1),
]  # fmt: skip


@pytest.mark.parametrize("kind", ["text", "json"])
@pytest.mark.parametrize("role", ["", "worker 3", "supervisor"])
def test_fast_lines_are_the_formatters_lines(tmp_path: Path, kind: str, role: str) -> None:
    log = tmp_path / "fastsmtp.log"
    with logging_to(log, kind, role) as events:
        assert events.enabled
        for case in MESSAGE_CASES:
            events.message(*case)
            old_message(*case)
        for disconnect in [("127.0.0.1", b"client.example", True, 2, 15), ("::1", HOSTILE_HELO, False, 0, 0)]:
            events.disconnect(*disconnect)
            old_disconnect(*disconnect)
    found = pairs(log, kind)
    assert len(found) == len(MESSAGE_CASES) + 2
    for new, old in found:
        assert new == old
    text = log.read_text(encoding="utf-8")
    assert f"fastsmtp[{os.getpid()}]{' ' + role + ':' if role else ''} INFO queued id=4Xc9a1 " in text or kind == "json"
    assert "\x1b" not in text and "\u2028" not in text and "\u2029" not in text and "\x85" not in text


def test_a_hostile_helo_stays_in_its_field(tmp_path: Path) -> None:
    log = tmp_path / "fastsmtp.log"
    with logging_to(log, "text", "worker 1") as events:
        events.message("queued", "Q1", "127.0.0.1", HOSTILE_HELO, b"s@x", [b"r@y"], 1, 250, 2)
    (line,) = log.read_text(encoding="utf-8").splitlines()
    shape = r"^\S+ \S+ fastsmtp\[\d+\] worker 1: INFO queued id=Q1 client=127\.0\.0\.1 helo=\S+ from=<s@x> to=<r@y>"
    assert re.match(shape + r" size=1 code=250 ms=2$", line), line
    escaped = "evil\\x0b\\x0c\\x1b[31m\\u2028fake\\x20queued\\x20id=X\\x20code=250\\x20ms=0\\x20\\x5cx41"
    assert f" helo={escaped}\\x20\\x7f\\x85\\xff\\xed\\xa0\\x80 " in line


@pytest.mark.parametrize("kind", ["text", "json"])
@settings(max_examples=150, deadline=None)
@given(
    helo=st.binary(max_size=40),
    sender=st.binary(max_size=40),
    rcpts=st.lists(st.binary(max_size=20), max_size=3),
    client=st.text(max_size=20),
)
def test_fast_lines_match_for_any_bytes(kind: str, helo: bytes, sender: bytes, rcpts: list[bytes], client: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "fastsmtp.log"
        with logging_to(log, kind, "worker 1") as events:
            events.message("queued", "Q", client, helo, sender, rcpts, 1, 250, 0)
            old_message("queued", "Q", client, helo, sender, rcpts, 1, 250, 0)
            events.disconnect(client, helo, False, 1, 0)
            old_disconnect(client, helo, False, 1, 0)
        for new, old in pairs(log, kind):
            assert new == old
        if kind == "json":
            for line in log.read_text(encoding="utf-8").splitlines():
                json.loads(line)


def test_field_fast_path_agrees_with_sanitize() -> None:
    values: list[str | bytes] = [b"", b"plain", b"a b", b"a\\b", b"\x7f", b"~!", "ok", "é", "a\u2028", b"\x80"]
    values.append("\udcff")
    for value in values:
        assert _field(value) == sanitize(value)
    for byte in range(256):
        assert _field(bytes([byte])) == sanitize(bytes([byte]))


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_lines_of_one_iteration_are_written_at_its_end(tmp_path: Path, loop_kind: str) -> None:
    log = tmp_path / "fastsmtp.log"
    writes: list[str] = []

    async def main() -> tuple[str, str]:
        events.message(*MESSAGE_CASES[0])
        events.disconnect("127.0.0.1", b"x", False, 1, 1)
        during = log.read_text()  # nothing yet: held for the end of the iteration
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return during, log.read_text()

    with logging_to(log, "text") as events:
        handler = logging.getLogger().handlers[0]
        assert isinstance(handler, logging.StreamHandler)
        real_write = handler.stream.write

        def write(text: str) -> int:
            writes.append(text)
            return int(real_write(text))

        handler.stream.write = write
        if loop_kind == "uvloop":
            import uvloop

            during, after = uvloop.run(main())
        else:
            during, after = asyncio.run(main())
    assert during == ""
    assert after.count("\n") == 2 and " queued " in after and " disconnect " in after
    assert len(writes) == 1  # both lines in one write


def test_other_records_keep_their_order(tmp_path: Path) -> None:
    log = tmp_path / "fastsmtp.log"

    async def main() -> None:
        events.message(*MESSAGE_CASES[0])
        logging.getLogger("fastsmtp.maildir").warning("after the message")
        events.disconnect("127.0.0.1", b"x", False, 1, 1)

    with logging_to(log, "text") as events:
        asyncio.run(main())
    lines = log.read_text().splitlines()
    words = [line.split(" INFO ")[-1].split(" WARNING ")[-1].split()[0] for line in lines]
    assert words == ["queued", "after", "disconnect"]


def test_disabled_below_info_writes_nothing(tmp_path: Path) -> None:
    log = tmp_path / "fastsmtp.log"
    with logging_to(log, "text", level="warning") as events:
        assert not events.enabled
        events.message(*MESSAGE_CASES[0])
        events.disconnect("127.0.0.1", b"x", False, 1, 1)
    assert log.read_text() == ""


def test_without_setup_logging_lines_go_through_the_logger(caplog: pytest.LogCaptureFixture) -> None:
    # In-process servers (tests, embedding) keep logging's own handlers.
    caplog.set_level(logging.INFO, logger="fastsmtp")
    event_log().message(*MESSAGE_CASES[0])
    event_log().disconnect("127.0.0.1", b"x", True, 1, 1)
    records = [r for r in caplog.records if r.name == "fastsmtp"]
    assert [r.getMessage() for r in records] == ["queued", "disconnect"]
    assert records[0].fields["to"] == [b"<alice@example.com>", b"<bob@example.com>"]  # type: ignore[attr-defined]
    assert records[1].fields["tls"] == "yes"  # type: ignore[attr-defined]


def test_an_added_handler_gets_the_lines_too(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    log = tmp_path / "fastsmtp.log"
    with logging_to(log, "json") as events:
        extra = logging.handlers.MemoryHandler(100)
        logging.getLogger().addHandler(extra)
        try:
            events.message(*MESSAGE_CASES[0])
        finally:
            logging.getLogger().removeHandler(extra)
    assert [r.getMessage() for r in extra.buffer] == ["queued"]
    assert json.loads(log.read_text())["msg"] == "queued"


def test_set_role_renames_and_reopen_follows_rotation(tmp_path: Path) -> None:
    log = tmp_path / "fastsmtp.log"

    async def main() -> None:
        events.message(*MESSAGE_CASES[0])  # pending when the reopen comes: goes to the old file
        os.rename(log, tmp_path / "fastsmtp.log.1")
        reopen_logs()
        events.message(*MESSAGE_CASES[1])

    with logging_to(log, "text", "supervisor") as events:
        events.disconnect("127.0.0.1", b"before", False, 0, 0)
        set_role("worker 7")
        asyncio.run(main())
    rotated = (tmp_path / "fastsmtp.log.1").read_text().splitlines()
    assert len(rotated) == 2
    assert " supervisor: INFO disconnect " in rotated[0] and " worker 7: INFO queued " in rotated[1]
    (line,) = log.read_text().splitlines()
    assert " worker 7: INFO refused id=4Xc9a2 " in line


def run_python(code: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )


def test_nothing_is_lost_at_exit_or_fork(tmp_path: Path) -> None:
    # The worker's own shape: lines written in the last iteration of a loop
    # run by asyncio.run, in a forked child that then calls os._exit; and a
    # line pending in the parent when it forks is written once, not twice.
    code = """
import asyncio, os, sys
from fastsmtp.logs import event_log, setup_logging, set_role
setup_logging("info", "text", "fastsmtp.log", "supervisor")
events = event_log()

async def last_words(who):
    events.disconnect("127.0.0.1", who.encode(), False, 0, 0)

async def forks():
    events.disconnect("127.0.0.1", b"parent-pending", False, 0, 0)
    pid = os.fork()
    if pid == 0:
        set_role("worker 1")
        asyncio.run(last_words("child"))
        os._exit(0)
    os.waitpid(pid, 0)

asyncio.run(forks())
asyncio.run(last_words("parent-at-exit"))

async def exit_inside():
    events.disconnect("127.0.0.1", b"sys-exit", False, 0, 0)
    sys.exit(0)

try:
    asyncio.run(exit_inside())
except SystemExit:
    pass

# A loop that stops in the very iteration a line is written, and never
# runs again: only the atexit hook can write it.
loop = asyncio.new_event_loop()
loop.call_soon(loop.stop)
loop.call_soon(events.disconnect, "127.0.0.1", b"loop-stopped", False, 0, 0)
loop.run_forever()
"""
    done = run_python(code, tmp_path)
    assert done.returncode == 0, done.stderr
    lines = (tmp_path / "fastsmtp.log").read_text().splitlines()
    helos = [line.split(" helo=")[1].split()[0] for line in lines]
    assert sorted(helos) == sorted(["parent-pending", "child", "parent-at-exit", "sys-exit", "loop-stopped"]), lines
    assert helos.index("parent-pending") < helos.index("child")
    child = [line for line in lines if "helo=child" in line][0]
    assert " worker 1: INFO " in child and f"fastsmtp[{os.getpid()}]" not in child
