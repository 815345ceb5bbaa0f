"""Nothing acknowledged is ever lost: SIGKILL under load, then count the files.

Clients send on several connections while the server is killed with
SIGKILL at a chosen moment.  After a restart on the same mail root, every
message that got 250 must be in ``new/``, byte-identical after the trace
headers, and ``new/`` must hold nothing but complete messages.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import smtplib
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import RunningServer, start_server, stored, wait_gone

CONNECTIONS = 8
RECIPIENTS = ["alice@example.com", "bob@example.com"]


def make_body(conn: int, n: int, size: int) -> bytes:
    line = (b"%d-%d " % (conn, n)) * 20
    lines = max(1, size // 80)
    return (
        b"Message-ID: <%d.%d@crash.test>\r\nSubject: crash %d %d\r\n\r\n" % (conn, n, conn, n)
        + (line[:76] + b"\r\n") * lines
    )


async def sender(port: int, conn: int, acked: dict[bytes, bytes], stop: asyncio.Event, sizes: list[int]) -> None:
    """Send messages one after another; record the ones answered 250."""
    rng = random.Random(conn)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return
    try:
        await reader.readuntil(b"\r\n")
        writer.write(b"EHLO crash.test\r\n")
        while not (await reader.readuntil(b"\r\n"))[3:4] == b" ":
            pass
        n = 0
        while not stop.is_set():
            rcpt = RECIPIENTS[rng.randrange(len(RECIPIENTS))]
            body = make_body(conn, n, rng.choice(sizes))
            writer.write(b"MAIL FROM:<c%d@crash.test>\r\nRCPT TO:<%s>\r\nDATA\r\n" % (conn, rcpt.encode()))
            replies = [await reader.readuntil(b"\r\n") for _ in range(3)]
            assert [r[:3] for r in replies] == [b"250", b"250", b"354"], replies
            writer.write(body + b".\r\n")
            reply = await reader.readuntil(b"\r\n")
            if reply.startswith(b"250 "):
                acked[body] = rcpt.encode()
            n += 1
    except (OSError, asyncio.IncompleteReadError, ConnectionError):
        pass  # the server died under us: that is the point
    finally:
        writer.close()


async def load_until_killed(srv: RunningServer, kill_after: float, sizes: list[int]) -> dict[bytes, bytes]:
    acked: dict[bytes, bytes] = {}
    stop = asyncio.Event()
    tasks = [asyncio.create_task(sender(srv.port, i, acked, stop, sizes)) for i in range(CONNECTIONS)]
    await asyncio.sleep(kill_after)
    workers = srv.workers()
    # Our own child, by its PID; its workers die with it (PR_SET_PDEATHSIG).
    os.kill(srv.proc.pid, signal.SIGKILL)
    stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)
    srv.proc.wait(10)
    wait_gone(workers)
    return acked


@pytest.mark.parametrize("kill_after", [0.4, 0.9, 1.5, 2.2])
def test_sigkill_under_load_loses_nothing_acknowledged(tmp_path: Path, kill_after: float) -> None:
    root = tmp_path / "mail"
    srv = start_server(root, "--fsync", "batch")
    try:
        acked = asyncio.run(load_until_killed(srv, kill_after, sizes=[1024, 4096, 600_000]))
    finally:
        srv.stop(signal.SIGKILL)
    assert acked, "no message was acknowledged before the kill; the test proves nothing"
    # Restart on the same root: the start-up cleanup removes the dead
    # server's leftovers in tmp/.
    srv2 = start_server(root, "--fsync", "batch")
    try:
        found = stored(srv2, RECIPIENTS)
        for body, rcpt in acked.items():
            assert body in found, f"acknowledged message lost: {body[:60]!r}"
            assert found[body] == [rcpt.decode()]
        # Anything else in new/ is a message whose 250 was lost in the kill:
        # complete, never partial (all bodies we sent are well-formed).
        for body in found:
            assert body.startswith(b"Message-ID: <"), body[:60]
            conn, n = (int(x) for x in body.split(b"<", 1)[1].split(b"@", 1)[0].split(b"."))
            assert _is_complete(body, conn, n), f"partial message in new/: {body[:60]!r}"
        for address in RECIPIENTS:
            assert os.listdir(srv2.maildir(address) / "tmp") == []
    finally:
        srv2.stop()


def _is_complete(body: bytes, conn: int, n: int) -> bool:
    """A body is complete when it is exactly what make_body produced for some size."""
    head = b"Message-ID: <%d.%d@crash.test>\r\nSubject: crash %d %d\r\n\r\n" % (conn, n, conn, n)
    rest = body[len(head):]
    line = ((b"%d-%d " % (conn, n)) * 20)[:76] + b"\r\n"
    return body.startswith(head) and len(rest) % len(line) == 0 and rest == line * (len(rest) // len(line))


def _peak_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


@pytest.mark.parametrize("limit,expect", [("200M", b"250"), ("10M", b"552")])
def test_hundred_megabyte_message_in_bounded_memory(server_factory, limit: str, expect: bytes) -> None:  # type: ignore[no-untyped-def]
    srv = server_factory("--max-message-size", limit)
    sock = srv.connect(timeout=60)
    f = sock.makefile("rb")
    assert f.readline().startswith(b"220")
    sock.sendall(b"EHLO c.example\r\nMAIL FROM:<s@example.net>\r\nRCPT TO:<alice@example.com>\r\nDATA\r\n")
    while not f.readline().startswith(b"354"):
        pass
    # The worker that serves the connection holds the memory, whichever it is.
    pids = srv.workers() or [srv.proc.pid]
    before = {pid: _peak_rss_kb(pid) for pid in pids}
    chunk = (b"x" * 1022 + b"\r\n") * 1024  # 1 MiB of 1 KiB lines
    for _ in range(100):
        sock.sendall(chunk)
    sock.sendall(b".\r\n")
    reply = f.readline()
    assert reply.startswith(expect), reply
    grown_mb = max(_peak_rss_kb(pid) - before[pid] for pid in pids) / 1024
    # Streaming to tmp/ keeps the worker's memory flat whatever the size:
    # a few MB for buffers, never the message.
    assert grown_mb < 16, f"peak RSS grew by {grown_mb:.1f} MB for a 100 MB message"
    sock.close()
    if expect == b"250":
        (path,) = srv.messages("alice@example.com")
        assert path.stat().st_size > 100 * 1024 * 1024
    else:
        assert srv.messages("alice@example.com", count=0) == []
        assert os.listdir(srv.maildir("alice@example.com") / "tmp") == []


# -- the journal's recovery, with a real server killed by SIGKILL ------------------


def _send_many(srv: RunningServer, count: int) -> dict[str, bytes]:
    """``count`` messages to alice on one connection: {queue id: body}, all acknowledged."""
    sent: dict[str, bytes] = {}
    with smtplib.SMTP(srv.host, srv.port, timeout=30) as smtp:
        smtp.ehlo("crash.test")
        for n in range(count):
            body = make_body(99, n, 300 + 37 * (n % 50))
            smtp.mail("s@crash.test")
            smtp.rcpt("alice@example.com")
            code, text = smtp.data(body)
            assert code == 250, text
            sent[text.decode().rsplit(" ", 1)[1]] = body
    return sent


def _kill(srv: RunningServer) -> None:
    workers = srv.workers()
    os.kill(srv.proc.pid, signal.SIGKILL)
    srv.proc.wait(10)
    wait_gone(workers)


def _journal_segments(root: Path) -> list[Path]:
    return sorted((root / ".journal").glob("w-*/*.seg"))


def _lose_the_page_cache(root: Path) -> None:
    """What a power cut does to files delivered after the 250 but not yet synced:
    some are gone from new/, some are there with part of their data."""
    new = root / "example.com" / "alice" / "new"
    for i, path in enumerate(sorted(new.iterdir())):
        if i % 3 == 0:
            path.unlink()
        elif i % 3 == 1:
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])


def _check_all_there_once(srv: RunningServer, sent: dict[str, bytes]) -> None:
    found = stored(srv, ["alice@example.com"])
    for body in sent.values():
        assert found.get(body) == ["alice@example.com"], f"lost or duplicated: {body[:60]!r}"
    assert len(srv.messages("alice@example.com", count=0)) == len(sent)
    assert os.listdir(srv.maildir("alice@example.com") / "tmp") == []
    assert _journal_segments(srv.mail_root) == []


def _sent_then_killed(root: Path, count: int) -> dict[str, bytes]:
    """A server that acknowledged ``count`` messages, killed within a second of the last 250
    (its segment is not retired yet): what it acknowledged."""
    srv = start_server(root, "--workers", "1")
    try:
        sent = _send_many(srv, count)
    finally:
        _kill(srv)
    assert _journal_segments(root), "the segment was retired before the kill; nothing to recover"
    return sent


def test_recovery_puts_back_what_the_disk_lost(tmp_path: Path) -> None:
    root = tmp_path / "mail"
    sent = _sent_then_killed(root, 60)
    _lose_the_page_cache(root)
    srv2 = start_server(root, "--workers", "1")
    try:
        line = srv2.wait_output("journal recovery:")
        assert "60 record(s)" in line and "0 set aside" in line, line
        _check_all_there_once(srv2, sent)
    finally:
        srv2.stop()


def test_sigkill_during_recovery_then_recovery_again(tmp_path: Path) -> None:
    root = tmp_path / "mail"
    sent = _sent_then_killed(root, 400)
    new = root / "example.com" / "alice" / "new"
    for path in new.iterdir():
        path.unlink()  # nothing reached the disk: recovery has 400 files to write, each fsynced
    # A server that is killed while it recovers, before it listens.
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastsmtp", "serve", "--listen", "127.0.0.1:0", "--mail-root", str(root),
         "--hostname", "mx.test", "--workers", "0", "--greeting-delay", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 20
        while len(os.listdir(new)) < 20 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(10)
        assert proc.stdout is not None
        out = proc.stdout.read().decode()
        proc.stdout.close()
    halfway = len(os.listdir(new))
    assert "listening" not in out, "recovery finished before the kill; the test proves nothing"
    assert 0 < halfway < len(sent), halfway
    srv3 = start_server(root, "--workers", "1")
    try:
        _check_all_there_once(srv3, sent)
    finally:
        srv3.stop()
