"""SMTPProtocol in-process, on a fake transport, under uvloop and asyncio.

The real session, stages and store run; only the socket is fake,
so writes, pauses and phases are counted exactly (uvloop's Test_UV_* /
Test_AIO_* pattern: every test runs on both loops).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest

from fastsmtp.events import Reply
from fastsmtp.metrics import NO_METER
from fastsmtp.phase import Phase
from fastsmtp.stages import Verdict, resolve

from fakes import Connection, FakeTransport, make_server

LOOPS = ["uvloop", "asyncio"]

MAIL = b"MAIL FROM:<s@example.net>\r\n"
RCPT = b"RCPT TO:<alice@example.com>\r\n"
BODY = b"Subject: hi\r\n\r\nhello\r\n.\r\n"


def run(loop: str, test: Callable[[], Awaitable[Any]]) -> Any:
    if loop == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(test())
    return asyncio.run(test())


@pytest.fixture(params=LOOPS)
def loop(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def new_messages(root: Path, user: str = "alice") -> list[Path]:
    return sorted((root / "example.com" / user / "new").iterdir())


async def greeted(tmp_path: Path, **settings: Any) -> Connection:
    conn = Connection(make_server(tmp_path / "mail", **settings))
    await conn.replies(1)
    return conn


# -- one write per round (RFC 2920) --------------------------------------------------


def test_pipelined_replies_come_in_one_write(tmp_path: Path, loop: str) -> None:
    async def test() -> None:
        conn = await greeted(tmp_path)
        conn.send(b"EHLO c.example\r\n")
        await conn.replies(2)
        before = len(conn.transport.writes)
        conn.send(b"NOOP\r\n" * 5)
        assert conn.transport.writes[before:] == [b"250 2.0.0 Ok\r\n" * 5]
        conn.server.store.close()

    run(loop, test)


def test_a_pipelined_transaction_is_answered_in_one_write(tmp_path: Path, loop: str) -> None:
    async def test() -> None:
        conn = await greeted(tmp_path)
        before = len(conn.transport.writes)
        conn.send(b"EHLO c.example\r\n" + MAIL + RCPT + b"RCPT TO:<bob@example.com>\r\nDATA\r\n")
        (write,) = conn.transport.writes[before:]
        assert write.startswith(b"250-mx.test.example\r\n")
        assert write.endswith(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n")
        conn.server.store.close()

    run(loop, test)


# -- flow control ----------------------------------------------------------------------


def test_reading_is_held_for_the_commit_and_released_by_it(tmp_path: Path, loop: str) -> None:
    async def test() -> None:
        conn = await greeted(tmp_path)
        conn.send(b"EHLO c.example\r\n" + MAIL + RCPT + b"DATA\r\n")
        conn.send(BODY + b"NOOP\r\n")  # the NOOP waits for the 250
        assert conn.protocol.flow.held == {"commit"} and conn.transport.paused
        replies = await conn.replies(7)
        assert replies[-2].startswith(b"250 2.0.0 Ok: queued as ")
        assert replies[-1] == b"250 2.0.0 Ok"
        assert conn.protocol.flow.held == set() and not conn.transport.paused
        assert len(new_messages(tmp_path / "mail")) == 1
        conn.server.store.close()

    run(loop, test)


def test_a_tarpitted_error_holds_reading_until_it_is_sent(tmp_path: Path, loop: str) -> None:
    async def test() -> None:
        conn = await greeted(tmp_path, soft_error_limit=0, error_delay=0.05)
        conn.send(b"BOGUS\r\nNOOP\r\n")
        assert conn.protocol.flow.held == {"tarpit"}
        assert conn.protocol.phase is Phase.TARPIT
        replies = await conn.replies(3)
        assert replies[1:] == [b"500 5.5.2 Error: command not recognized", b"250 2.0.0 Ok"]
        assert conn.protocol.flow.held == set() and conn.protocol.phase is Phase.COMMANDS
        conn.server.store.close()

    run(loop, test)


# -- phases and their timers -----------------------------------------------------------


def test_a_move_the_table_does_not_allow_is_refused(tmp_path: Path, loop: str) -> None:
    async def test() -> None:
        conn = await greeted(tmp_path)
        assert conn.protocol.phase is Phase.COMMANDS
        with pytest.raises(RuntimeError, match="from COMMANDS to GREETING"):
            conn.protocol.enter(Phase.GREETING)
        conn.server.store.close()

    run(loop, test)


def test_the_greeting_timer_dies_with_its_phase(tmp_path: Path, loop: str) -> None:
    async def test() -> None:
        server = make_server(tmp_path / "mail", greeting_delay=0.2)
        conn = Connection(server)
        assert conn.protocol.phase is Phase.GREETING and conn.transport.writes == []
        conn.send(b"EHLO early.example\r\n")  # an early talker
        assert conn.transport.output().startswith(b"554 5.5.0 ")
        assert conn.protocol.phase is Phase.CLOSED and conn.transport.closing
        await asyncio.sleep(0.3)  # the greeting delay has passed: no 220 may follow
        assert b"220" not in conn.transport.output()
        server.store.close()

    run(loop, test)


def test_an_idle_session_is_told_421(tmp_path: Path, loop: str) -> None:
    async def test() -> None:
        conn = await greeted(tmp_path, idle_timeout=0.1)
        await conn.until(lambda: conn.transport.closing, timeout=5)
        assert conn.transport.output().endswith(b"421 4.4.2 Error: timeout exceeded\r\n")
        conn.server.store.close()

    run(loop, test)


# -- stages ------------------------------------------------------------------------------


class HeaderStage:
    def on_message(self, info: Any, message: Any) -> Verdict:
        return Verdict(headers=b"X-Checked: sync\r\n")


class AsyncHeaderStage:
    async def on_message(self, info: Any, message: Any) -> Verdict:
        await asyncio.sleep(0)
        return Verdict(headers=b"X-Checked: async; size=%d\r\n" % message.size)


class RefusingStage:
    def on_rcpt(self, info: Any, address: Any) -> Reply | None:
        return Reply(550, "5.7.1", "No") if address.local == b"bob" else None


class HangingStage:
    async def on_mail(self, info: Any, address: Any) -> None:
        await asyncio.sleep(30)


def test_stage_headers_are_stored_above_the_trace_headers(tmp_path: Path, loop: str) -> None:
    async def test() -> None:
        conn = await greeted(tmp_path)
        conn.server.stages = resolve([("one", HeaderStage(), 1.0), ("two", AsyncHeaderStage(), 1.0)])
        conn.send(b"EHLO c.example\r\n" + MAIL + RCPT + b"DATA\r\n")
        await conn.replies(5)
        conn.send(BODY)
        assert conn.protocol.flow.held == {"stage"}  # the async stage thinks
        replies = await conn.replies(6)
        assert replies[-1].startswith(b"250 2.0.0 Ok: queued as ")
        (path,) = new_messages(tmp_path / "mail")
        stored = path.read_bytes()
        # The later stage's header above the earlier one's, both above the trace.
        assert stored.startswith(b"X-Checked: async; size=22\r\nX-Checked: sync\r\nReturn-Path: <s@example.net>\r\n")
        assert stored.endswith(b"Subject: hi\r\n\r\nhello\r\n")
        assert path.name.endswith(f",S={len(stored)}")
        conn.server.store.close()

    run(loop, test)


def test_a_refusing_stage_refuses_and_a_hanging_one_gets_451(tmp_path: Path, loop: str) -> None:
    async def test() -> None:
        conn = await greeted(tmp_path)
        conn.server.stages = resolve([("refuse", RefusingStage(), 1.0), ("hang", HangingStage(), 0.05)])
        conn.send(b"EHLO c.example\r\n" + MAIL + b"NOOP\r\n")
        replies = await conn.replies(4)
        assert replies[-2] == b"451 4.3.0 Error: temporary policy failure, try again later"
        assert replies[-1] == b"250 2.0.0 Ok"  # the session goes on
        conn.server.stages = resolve([("refuse", RefusingStage(), 1.0)])
        conn.send(MAIL + RCPT + b"RCPT TO:<bob@example.com>\r\n")
        replies = await conn.replies(7)
        assert replies[-3:] == [b"250 2.1.0 Ok", b"250 2.1.5 Ok", b"550 5.7.1 No"]
        conn.server.store.close()

    run(loop, test)


def test_a_client_leaving_while_a_stage_thinks_stores_nothing(tmp_path: Path, loop: str) -> None:
    async def test() -> None:
        conn = await greeted(tmp_path)
        conn.server.stages = resolve([("slow", AsyncHeaderStage(), 1.0)])
        conn.send(b"EHLO c.example\r\n" + MAIL + RCPT + b"DATA\r\n")
        await conn.replies(5)
        conn.send(BODY)
        conn.protocol.connection_lost(None)
        await asyncio.sleep(0.05)
        assert new_messages(tmp_path / "mail") == []
        assert list((tmp_path / "mail" / "example.com" / "alice" / "tmp").iterdir()) == []
        conn.server.store.close()

    run(loop, test)


# -- counters ------------------------------------------------------------------------------


def test_without_metrics_the_meter_does_nothing(tmp_path: Path, loop: str) -> None:
    async def test() -> None:
        conn = await greeted(tmp_path)
        assert conn.server.meter is NO_METER
        conn.send(b"EHLO c.example\r\n" + MAIL + RCPT + b"DATA\r\n" + BODY)
        replies = await conn.replies(6)
        assert replies[-1].startswith(b"250 2.0.0 Ok: queued as ")
        conn.server.store.close()

    run(loop, test)


@pytest.mark.parametrize("fsync", ["off", "always", "batch"])
def test_a_message_is_stored_under_each_fsync_mode(tmp_path: Path, loop: str, fsync: str) -> None:
    # make_server builds the store the worker builds for that mode: the
    # Maildir writer, or for "batch" the journal (delivery after the 250).
    async def test() -> None:
        conn = await greeted(tmp_path, fsync=fsync)
        conn.send(b"EHLO c.example\r\n" + MAIL + RCPT + b"DATA\r\n" + BODY)
        replies = await conn.replies(6)
        assert replies[-1].startswith(b"250 2.0.0 Ok: queued as ")
        await conn.until(lambda: len(new_messages(tmp_path / "mail")) == 1)
        assert new_messages(tmp_path / "mail")[0].read_bytes().endswith(b"Subject: hi\r\n\r\nhello\r\n")
        conn.server.store.close()

    run(loop, test)


def test_the_transport_is_never_written_after_the_client_left(tmp_path: Path, loop: str) -> None:
    async def test() -> None:
        conn = await greeted(tmp_path, fsync="always")
        conn.send(b"EHLO c.example\r\n" + MAIL + RCPT + b"DATA\r\n" + BODY)
        writes = len(conn.transport.writes)
        conn.transport.close()
        conn.protocol.connection_lost(None)
        await conn.until(lambda: len(new_messages(tmp_path / "mail")) == 1)  # still stored (RFC 1047)
        await asyncio.sleep(0.02)
        assert len(conn.transport.writes) == writes
        conn.server.store.close()

    run(loop, test)


def test_a_second_connection_has_its_own_transport(tmp_path: Path, loop: str) -> None:
    async def test() -> None:
        conn = await greeted(tmp_path)
        other = Connection(conn.server, FakeTransport(peer="198.51.100.9"))
        await other.replies(1)
        assert len(conn.server.connections) == 2
        conn.server.store.close()

    run(loop, test)


# -- the opening ---------------------------------------------------------------------------


class SlowConnect:
    async def on_connect(self, peer: str) -> None:
        await asyncio.sleep(0.05)


def _with_connect_stage(tmp_path: Path, **settings: Any) -> Connection:
    server = make_server(tmp_path / "mail", **settings)
    server.stages = resolve([("slow", SlowConnect(), 1.0)])
    return Connection(server)


def test_reading_waits_while_on_connect_thinks(tmp_path: Path, loop: str) -> None:
    async def test() -> None:
        conn = _with_connect_stage(tmp_path)
        assert conn.protocol.phase is Phase.CONNECT
        assert conn.protocol.flow.held == {"stage"} and conn.transport.paused
        conn.send(b"EHLO c.example\r\n")  # held, answered after the greeting
        replies = await conn.replies(2)
        assert replies[0].startswith(b"220 ") and replies[1] == b"250 CHUNKING"
        assert conn.protocol.flow.held == set() and not conn.transport.paused
        conn.server.store.close()

    run(loop, test)


def test_an_answer_after_the_client_left_greets_no_one(tmp_path: Path, loop: str) -> None:
    async def test() -> None:
        errors: list[object] = []
        asyncio.get_running_loop().set_exception_handler(lambda lp, ctx: errors.append(ctx.get("exception")))
        conn = _with_connect_stage(tmp_path)
        conn.protocol.eof_received()  # the client is gone before on_connect answers
        await asyncio.sleep(0.1)
        assert errors == [] and conn.transport.writes == []
        assert conn.protocol.phase is Phase.CLOSED
        conn.server.store.close()

    run(loop, test)
