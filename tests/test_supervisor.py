"""The supervisor with real worker processes on 127.0.0.1.

Every server is started by the test and stopped by its PID (workers are
the server's own children, signalled by their PIDs); every wait is
bounded.  Which worker holds a connection is read from /proc: the
server-side socket of the connection in /proc/net/tcp, then the worker
whose file descriptors include that socket.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import pytest

from helpers import (
    MESSAGE, Client, RunningServer, greeted, start_server, stored, transaction, wait_for, wait_gone, worker_of,
)

from fastsmtp.policy import add_mailbox
from fastsmtp.supervisor import MAX_BACKOFF, backoff

RECIPIENTS = ["alice@example.com", "bob@example.com"]


def proc_title(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()


def output_after_exit(srv: RunningServer) -> str:
    """All the server printed (stdout and stderr); call once it has exited."""
    assert srv.proc.stdout is not None
    return "".join(srv.output) + srv.proc.stdout.read()


# -- the shape ---------------------------------------------------------------------


def test_two_workers_share_one_port(tmp_path: Path) -> None:
    srv = start_server(tmp_path / "mail", "--workers", "2")
    try:
        workers = srv.workers()
        assert len(workers) == 2
        assert "fastsmtp: supervisor" in proc_title(srv.proc.pid)
        assert {proc_title(pid).split(" 127.0.0.1")[0] for pid in workers} == {
            "fastsmtp: worker 1",
            "fastsmtp: worker 2",
        }
        # The kernel spreads connections by their addresses: with enough
        # of them both workers answer.
        clients = [greeted(srv) for _ in range(40)]
        owners = {worker_of(c.sock, workers) for c in clients}
        assert owners == set(workers)
        # Both deliver.
        for c in clients[:10]:
            assert transaction(c, [b"alice@example.com"], MESSAGE).startswith(b"250 2.0.0")
            c.close()
        assert len(srv.wait_messages("alice@example.com", 10)) == 10
        for c in clients[10:]:
            c.close()
    finally:
        assert srv.stop() == 0
    # Log lines name the worker that wrote them.
    text = "".join(srv.output)
    assert "worker 1: INFO serving 127.0.0.1:" in text and "worker 2: INFO serving" in text
    assert text.count("listening on") == 1


def test_workers_0_serves_in_the_foreground(tmp_path: Path) -> None:
    srv = start_server(tmp_path / "mail", "--workers", "0")
    try:
        assert srv.workers() == []
        c = greeted(srv)
        assert transaction(c, [b"bob@example.com"], MESSAGE).startswith(b"250 2.0.0")
        c.close()
    finally:
        assert srv.stop() == 0


# -- a worker dies -----------------------------------------------------------------


async def _sender(port: int, conn: int, acked: dict[bytes, bytes], stop: asyncio.Event, after: list[int]) -> None:
    """Send until told to stop, reconnecting whenever the server side goes away."""
    n = 0
    while not stop.is_set():
        writer = None
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
            await asyncio.wait_for(reader.readuntil(b"\r\n"), 5)
            writer.write(b"EHLO load.test\r\n")
            while (await asyncio.wait_for(reader.readuntil(b"\r\n"), 5))[3:4] != b" ":
                pass
            while not stop.is_set():
                rcpt = RECIPIENTS[n % 2].encode()
                body = b"Message-ID: <%d.%d@crash.test>\r\nSubject: crash %d %d\r\n\r\n" % (conn, n, conn, n)
                body += (b"line %d %d\r\n" % (conn, n)) * 20
                n += 1
                writer.write(b"MAIL FROM:<c@load.test>\r\nRCPT TO:<" + rcpt + b">\r\nDATA\r\n")
                replies = [await asyncio.wait_for(reader.readuntil(b"\r\n"), 5) for _ in range(3)]
                if [r[:3] for r in replies] != [b"250", b"250", b"354"]:
                    break
                writer.write(body + b".\r\n")
                reply = await asyncio.wait_for(reader.readuntil(b"\r\n"), 10)
                if reply.startswith(b"250 "):
                    acked[body] = rcpt
                    after[0] += 1
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError):
            await asyncio.sleep(0.01)  # a pause before reconnecting, not a wait for something
        finally:
            if writer is not None:
                writer.close()


async def _until(check: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    """``wait_for`` for a coroutine: poll without blocking the loop the senders run on."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def test_sigkill_of_a_worker_under_load_loses_nothing(tmp_path: Path) -> None:
    srv = start_server(tmp_path / "mail", "--workers", "2", "--fsync", "batch")
    try:
        before = srv.workers()
        assert len(before) == 2
        victim, survivor = before

        async def run() -> tuple[dict[bytes, bytes], int, int]:
            acked: dict[bytes, bytes] = {}
            count = [0]
            stop = asyncio.Event()
            tasks = [asyncio.create_task(_sender(srv.port, i, acked, stop, count)) for i in range(8)]
            await _until(lambda: count[0] >= 50, "messages before the kill")
            at_kill = count[0]
            os.kill(victim, signal.SIGKILL)  # a worker of our server, by its PID
            # The survivor keeps serving while the victim is replaced, and
            # the replacement serves too: load goes on until both are seen.
            await _until(lambda: len(srv.workers()) == 2 and victim not in srv.workers(), "the replacement")
            mark = count[0]
            await _until(lambda: count[0] >= mark + 50, "messages after the replacement")
            after_kill = count[0] - at_kill
            stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)
            return acked, at_kill, after_kill

        acked, at_kill, after_kill = asyncio.run(run())
        assert at_kill > 0 and after_kill > 0
        now = srv.workers()
        assert survivor in now and victim not in now and len(now) == 2
        # The replacement serves too.
        replacement = (set(now) - {survivor}).pop()
        clients = [greeted(srv) for _ in range(30)]
        assert replacement in {worker_of(c.sock, now) for c in clients}
        for c in clients:
            c.close()
    finally:
        assert srv.stop() == 0
    found = stored(srv, RECIPIENTS)
    for body, rcpt in acked.items():
        assert body in found, f"acknowledged message lost: {body[:60]!r}"
        assert found[body] == [rcpt.decode()]
    for address in RECIPIENTS:
        assert os.listdir(srv.maildir(address) / "tmp") == []
    assert "was killed by SIGKILL" in "".join(srv.output) + (srv.proc.stdout.read() if srv.proc.stdout else "")


def test_hung_worker_is_killed_and_replaced(tmp_path: Path) -> None:
    srv = start_server(tmp_path / "mail", "--workers", "2", "--worker-timeout", "1")
    try:
        victim, survivor = srv.workers()
        os.kill(victim, signal.SIGSTOP)  # a stopped loop sends no heartbeat
        wait_for(lambda: victim not in srv.workers() and len(srv.workers()) == 2, what="the replacement")
        assert survivor in srv.workers()
        c = greeted(srv)
        assert transaction(c, [b"alice@example.com"], MESSAGE).startswith(b"250 2.0.0")
        c.close()
    finally:
        assert srv.stop() == 0
    assert "sent no heartbeat for 1 s; killing it" in output_after_exit(srv)


# -- stopping ---------------------------------------------------------------------


def test_sigterm_during_data_lets_the_message_finish(tmp_path: Path) -> None:
    srv = start_server(tmp_path / "mail", "--workers", "2")
    workers = srv.workers()
    c = greeted(srv)
    c.send(b"EHLO c.example\r\nMAIL FROM:<s@example.net>\r\nRCPT TO:<alice@example.com>\r\nDATA\r\n")
    c.replies(4)
    c.send(b"Subject: half\r\n\r\nfirst half\r\n")
    srv.proc.send_signal(signal.SIGTERM)
    # A new connection is refused now (other MXs take it) ...
    wait_for(lambda: _refused(srv), timeout=10, what="new connections to be refused")
    # ... while the transaction in progress completes.
    c.send(b"second half\r\n.\r\n")
    assert c.reply().startswith(b"250 2.0.0")
    assert c.reply().startswith(b"421 4.3.2")
    assert srv.proc.wait(15) == 0
    wait_gone(workers)
    assert all(not os.path.exists(f"/proc/{pid}") for pid in workers)
    (path,) = srv.messages("alice@example.com")
    assert path.read_bytes().endswith(b"first half\r\nsecond half\r\n")


def _refused(srv: RunningServer) -> bool:
    """True when a new connection is refused (no listener is left)."""
    try:
        socket.create_connection((srv.host, srv.port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def test_second_sigint_stops_at_once(tmp_path: Path) -> None:
    srv = start_server(tmp_path / "mail", "--workers", "2", "--shutdown-timeout", "60")
    c = greeted(srv)
    c.send(b"EHLO c.example\r\nMAIL FROM:<s@example.net>\r\nRCPT TO:<alice@example.com>\r\nDATA\r\n")
    c.replies(4)
    c.send(b"Subject: never finished\r\n\r\n")
    started = time.monotonic()
    srv.proc.send_signal(signal.SIGINT)
    srv.wait_output("stopping gracefully")
    # Graceful: waiting for the transaction.  Its deadline is 60 s away, so
    # an exit within the next 0.3 s would be the first SIGINT's doing.
    with pytest.raises(subprocess.TimeoutExpired):
        srv.proc.wait(0.3)
    srv.proc.send_signal(signal.SIGINT)
    assert srv.proc.wait(10) == 0
    assert time.monotonic() - started < 10
    c.close()
    assert srv.messages("alice@example.com", count=0) == []


# -- reload and resize --------------------------------------------------------------


def test_sighup_reloads_without_refusing_a_connection(tmp_path: Path) -> None:
    args = tmp_path / "fastsmtp.args"
    args.write_text("# read again on SIGHUP\n--max-recipients 2\n")
    srv = start_server(tmp_path / "mail", "--workers", "2", f"@{args}")
    sessions: list[bytes] = []
    failures: list[str] = []
    stop = threading.Event()

    def client_loop() -> None:
        while not stop.is_set():
            try:
                c = Client(srv.connect(timeout=10))
                greeting = c.reply()
                if not greeting.startswith(b"220 "):
                    failures.append(f"greeting {greeting!r}")
                    continue
                c.send(b"EHLO c.example\r\nMAIL FROM:<s@example.net>\r\n")
                c.replies(2)
                c.send(b"RCPT TO:<alice@example.com>\r\nRCPT TO:<bob@example.com>\r\nRCPT TO:<carol@example.org>\r\n")
                third = c.replies(3)[2]
                c.send(b"QUIT\r\n")
                c.reply()
                c.close()
                sessions.append(third[:3])
            except (OSError, ConnectionError) as exc:
                failures.append(repr(exc))

    threads = [threading.Thread(target=client_loop) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: len(sessions) >= 20, what="sessions before the reload")
        assert set(sessions) == {b"452"}
        args.write_text("--max-recipients 3\n")
        # Three reloads in a row, the clients connecting all the while.
        for _ in range(3):
            old = srv.workers()
            srv.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: not set(old) & set(srv.workers()) and len(srv.workers()) == 2, what="new workers")
            mark = len(sessions)
            wait_for(lambda: len(sessions) >= mark + 20, what="sessions after the reload")
    finally:
        stop.set()
        for thread in threads:
            thread.join(20)
        assert srv.stop() == 0
    assert failures == []
    assert sessions[-1] == b"250"
    assert set(sessions[mark:]) == {b"250"}
    assert "reload complete" in output_after_exit(srv)


def test_sighup_with_a_bad_file_keeps_serving(tmp_path: Path) -> None:
    args = tmp_path / "fastsmtp.args"
    args.write_text("--max-recipients 2\n")
    srv = start_server(tmp_path / "mail", "--workers", "1", f"@{args}")
    try:
        old = srv.workers()
        args.write_text("--max-recipients 0\n")
        srv.proc.send_signal(signal.SIGHUP)
        srv.wait_output("reload failed")  # the decision is made; nothing was replaced
        assert srv.workers() == old
        c = greeted(srv)
        c.close()
    finally:
        assert srv.stop() == 0
    assert "reload failed" in output_after_exit(srv)


def test_sigttin_and_sigttou_change_the_worker_count(tmp_path: Path) -> None:
    srv = start_server(tmp_path / "mail", "--workers", "1")
    try:
        (first,) = srv.workers()
        srv.proc.send_signal(signal.SIGTTIN)
        wait_for(lambda: len(srv.workers()) == 2, what="a second worker")
        srv.proc.send_signal(signal.SIGTTIN)
        wait_for(lambda: len(srv.workers()) == 3, what="a third worker")
        three = srv.workers()
        # Seats are bound before the fork, so a connection would only wait;
        # the log line says the new workers accept.
        srv.wait_output("worker 2: INFO serving")
        srv.wait_output("worker 3: INFO serving")
        clients = [greeted(srv) for _ in range(45)]
        assert {worker_of(c.sock, three) for c in clients} == set(three)
        for c in clients:
            c.close()
        srv.proc.send_signal(signal.SIGTTOU)
        wait_for(lambda: len(srv.workers()) == 2, what="one worker fewer")
        assert first in srv.workers()
        srv.proc.send_signal(signal.SIGTTOU)
        srv.proc.send_signal(signal.SIGTTOU)  # never below one
        wait_for(lambda: srv.workers() == [first], what="one worker left")
        c = greeted(srv)
        assert transaction(c, [b"alice@example.com"], MESSAGE).startswith(b"250 2.0.0")
        c.close()
    finally:
        assert srv.stop() == 0


# -- limits across workers -----------------------------------------------------------


def _spread_over_workers(srv: RunningServer, n: int) -> list[Client]:
    """``n`` greeted connections that do not all sit on one worker."""
    workers = srv.workers()
    for _ in range(30):
        # The sessions closed on the last turn may not be counted out yet:
        # wait for each place.
        clients = [wait_for(lambda: _try_greeting(srv), what="a place") for _ in range(n)]
        if len({worker_of(c.sock, workers) for c in clients}) > 1:
            return clients
        for c in clients:
            c.close()
    raise AssertionError("the kernel never spread the connections")


# Loopback is trusted by default, and trusted clients skip the per-address
# limit: these tests trust another network, so that 127.0.0.1 meets it.
UNTRUSTED_LOOPBACK = ("--trusted-networks", "192.0.2.0/24")


def test_per_address_limit_holds_across_workers(tmp_path: Path) -> None:
    srv = start_server(tmp_path / "mail", "--workers", "2", "--max-connections-per-ip", "3", *UNTRUSTED_LOOPBACK)
    try:
        held = _spread_over_workers(srv, 3)
        for _ in range(5):  # wherever the kernel puts the fourth
            extra = Client(srv.connect())
            reply = extra.reply()
            assert reply.startswith(b"421 4.7.0"), reply
            assert b"too many connections from 127.0.0.1" in reply
            assert extra.closed()
            extra.close()
        # A session that ends frees its place.
        held.pop().close()
        c = wait_for(lambda: _try_greeting(srv), what="a free place")
        assert isinstance(c, Client)
        c.close()
        for c in held:
            c.close()
    finally:
        assert srv.stop() == 0


def _try_greeting(srv: RunningServer) -> Client | None:
    c = Client(srv.connect())
    if c.reply().startswith(b"220 "):
        return c
    c.close()
    return None


def test_a_dead_worker_leaks_no_counts(tmp_path: Path) -> None:
    srv = start_server(tmp_path / "mail", "--workers", "2", "--max-connections-per-ip", "3", *UNTRUSTED_LOOPBACK)
    try:
        held = _spread_over_workers(srv, 3)
        workers = srv.workers()
        owners = [worker_of(c.sock, workers) for c in held]
        victim = owners[0]
        lost = owners.count(victim)
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: victim not in srv.workers() and len(srv.workers()) == 2, what="the replacement")
        # The dead worker's connections no longer count: exactly that many fit again.
        new = [wait_for(lambda: _try_greeting(srv), what="a place") for _ in range(lost)]
        extra = Client(srv.connect())
        assert extra.reply().startswith(b"421 4.7.0")
        for c in [*held, *new, extra]:
            assert isinstance(c, Client)
            c.close()
    finally:
        assert srv.stop() == 0


def test_connection_limit_per_worker(tmp_path: Path) -> None:
    srv = start_server(tmp_path / "mail", "--workers", "1", "--max-connections", "2")
    try:
        held = [greeted(srv), greeted(srv)]
        extra = Client(srv.connect())
        assert extra.reply().startswith(b"421 4.7.0")
        assert extra.closed()
        for c in [*held, extra]:
            c.close()
    finally:
        assert srv.stop() == 0


# -- failures to start ---------------------------------------------------------------


def _run_to_exit(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fastsmtp", "serve", "--hostname", "mx.test.example", *args],
        capture_output=True, text=True, timeout=timeout,
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
def test_worker_that_cannot_boot_stops_the_supervisor(tmp_path: Path) -> None:
    root = tmp_path / "mail"
    root.mkdir(mode=0o755)  # root's, not writable by nobody
    result = _run_to_exit("--listen", "127.0.0.1:0", "--mail-root", str(root), "--workers", "2", "--user", "nobody")
    assert result.returncode == 3
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert errors == [f"fastsmtp: error: mail root {root} is not writable by user nobody"]
    assert "listening on" not in result.stdout


def test_busy_port_is_one_clear_error(tmp_path: Path) -> None:
    root = tmp_path / "mail"
    root.mkdir()
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        port = busy.getsockname()[1]
        result = _run_to_exit("--listen", f"127.0.0.1:{port}", "--mail-root", str(root), "--workers", "2")
    finally:
        busy.close()
    assert result.returncode == 2
    assert result.stderr.strip() == f"fastsmtp: error: cannot listen on 127.0.0.1:{port}: Address already in use"


def test_unknown_user_is_a_config_error(tmp_path: Path) -> None:
    root = tmp_path / "mail"
    root.mkdir()
    result = _run_to_exit("--listen", "127.0.0.1:0", "--mail-root", str(root), "--user", "no-such-user-here")
    assert result.returncode == 2
    assert result.stderr.strip() == "fastsmtp: error: user: no user named 'no-such-user-here'"


def test_backoff_grows_and_is_capped() -> None:
    assert backoff(0) == backoff(1) == 0.0
    assert backoff(2) == pytest.approx(0.1)
    assert backoff(3) == pytest.approx(0.2)
    assert backoff(50) == MAX_BACKOFF



@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
def test_workers_serve_mail_as_the_given_user(tmp_path: Path) -> None:
    import pwd
    import tempfile

    nobody = pwd.getpwnam("nobody")
    # pytest's tmp_path sits under a folder only root may enter: use one
    # that the user can reach, and give it the mail root.
    base = Path(tempfile.mkdtemp(prefix="fastsmtp-user-"))
    try:
        base.chmod(0o755)
        root = base / "mail"
        root.mkdir()
        add_mailbox(str(root), "alice@example.com")
        for path in [root, *root.rglob("*")]:
            os.chown(path, nobody.pw_uid, nobody.pw_gid)
        srv = start_server(root, "--workers", "2", "--user", "nobody")
        try:
            for pid in srv.workers():
                uids = Path(f"/proc/{pid}/status").read_text().split("Uid:")[1].split()[:4]
                assert uids == [str(nobody.pw_uid)] * 4
            c = greeted(srv)
            assert transaction(c, [b"alice@example.com"], MESSAGE).startswith(b"250 2.0.0")
            c.close()
            (path,) = srv.messages("alice@example.com")
            assert path.stat().st_uid == nobody.pw_uid
        finally:
            assert srv.stop() == 0
    finally:
        shutil.rmtree(base)


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
def test_reload_whose_workers_cannot_start_goes_back(tmp_path: Path) -> None:
    args = tmp_path / "fastsmtp.args"
    args.write_text("--max-recipients 5\n")
    srv = start_server(tmp_path / "mail", "--workers", "2", f"@{args}")
    try:
        old = srv.workers()
        args.write_text("--user nobody\n")  # the mail root is root's: nobody cannot write it
        srv.proc.send_signal(signal.SIGHUP)
        srv.wait_output("going back to the previous configuration")
        assert srv.proc.poll() is None
        assert srv.workers() == old
        c = greeted(srv)
        assert transaction(c, [b"alice@example.com"], MESSAGE).startswith(b"250 2.0.0")
        c.close()
    finally:
        assert srv.stop() == 0
    text = output_after_exit(srv)
    assert "the new workers cannot start" in text and "going back to the previous configuration" in text
