"""lmtp/recipients.py: what an RCPT is told when the store is an LMTP backend (the backend is scripted here;
tests/test_lmtp_delivery.py asks a real Dovecot)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from fastsmtp.events import Address, Reply
from fastsmtp.lmtp.client import LMTPTemporaryError
from fastsmtp.lmtp.recipients import CACHE_SIZE, LmtpRecipients


class Backend:
    """Answers probes from a table; counts them; raises when told it is down."""

    def __init__(self) -> None:
        self.asked: list[bytes] = []
        self.down = False

    async def probe(self, recipient: bytes) -> Reply:
        self.asked.append(recipient)
        if self.down:
            raise LMTPTemporaryError("connection refused")
        if recipient.startswith(b"nobody"):
            return Reply(550, "5.1.1", f"<{recipient.decode()}> User doesn't exist")
        return Reply(250, "2.1.5", "OK")

    async def close(self) -> None:
        pass

    def all_down(self) -> bool:
        return False


def address(text: bytes) -> Address:
    local, _, domain = text.partition(b"@")
    return Address(local, domain, text)


def check(rcpts: LmtpRecipients, text: bytes) -> Reply | None:
    return asyncio.run(rcpts.check(address(text))).reply


def test_a_yes_is_remembered_a_no_is_not() -> None:
    backend = Backend()
    now = [100.0]
    rcpts = LmtpRecipients(backend, remember=30.0)  # type: ignore[arg-type]
    rcpts._clock = lambda: now[0]
    assert check(rcpts, b"alice@example.com") is None
    assert check(rcpts, b"Alice@Example.COM") is None  # one question for both spellings
    refusal = check(rcpts, b"nobody@example.com")
    assert refusal is not None and (refusal.code, refusal.enhanced) == (550, "5.1.1")
    assert check(rcpts, b"nobody@example.com") is not None
    assert backend.asked == [b"alice@example.com", b"nobody@example.com", b"nobody@example.com"]
    now[0] += 31  # past the 30 s: asked again
    assert check(rcpts, b"alice@example.com") is None and backend.asked[-1] == b"alice@example.com"


def test_nothing_is_remembered_with_zero_and_the_memory_is_bounded() -> None:
    backend = Backend()
    rcpts = LmtpRecipients(backend, remember=0)  # type: ignore[arg-type]
    check(rcpts, b"alice@example.com")
    check(rcpts, b"alice@example.com")
    assert len(backend.asked) == 2
    many = LmtpRecipients(backend, remember=60)  # type: ignore[arg-type]
    for i in range(CACHE_SIZE + 5):
        check(many, b"user%d@example.com" % i)
    assert len(many._known) == CACHE_SIZE and b"user0@example.com" not in many._known


def test_a_backend_that_cannot_answer_does_not_stop_the_mx() -> None:
    backend = Backend()
    backend.down = True
    rcpts = LmtpRecipients(backend)  # type: ignore[arg-type]
    assert check(rcpts, b"alice@example.com") is None and rcpts.unverified == 1
    # Not remembered as a yes: asked again once the backend is back.
    backend.down = False
    assert check(rcpts, b"nobody@example.com") is not None


def test_no_relaying_by_another_name() -> None:
    rcpts = LmtpRecipients(Backend())  # type: ignore[arg-type]
    for text in (b"someone@[192.0.2.1]", b"postmaster"):
        refusal = check(rcpts, text)
        assert refusal is not None and refusal.code == 550 and "Relay access denied" in refusal.text


def test_the_backend_gets_the_message_without_our_return_path() -> None:
    from fastsmtp.lmtp.queue import without_return_path

    rest = b"Received: from x\r\n\tby y\r\nSubject: s\r\n\r\nReturn-Path: <s@example.net>\r\n"
    assert without_return_path(b"Return-Path: <s@example.net>\r\n" + rest, b"s@example.net") == rest
    # Fields of the stages go above it (Authentication-Results, a milter's): they stay.
    above = b"Authentication-Results: mx; spf=pass\r\nX-Spam: no\r\n"
    stored = above + b"Return-Path: <s@example.net>\r\n" + rest
    assert without_return_path(stored, b"s@example.net") == above + rest
    # Only in the header section, and only the sender's own line.
    assert without_return_path(b"Subject: s\r\n\r\nReturn-Path: <s@example.net>\r\n", b"s@example.net") \
        == b"Subject: s\r\n\r\nReturn-Path: <s@example.net>\r\n"
    assert without_return_path(b"Return-Path: <>\r\n" + rest, b"") == rest


def test_a_delivery_that_breaks_is_tried_again_never_left_stuck(tmp_path: Path) -> None:
    from fastsmtp.journal import encode
    from fastsmtp.lmtp.client import RecipientResult
    from fastsmtp.lmtp.queue import Job, LmtpQueue

    # The record the retry reads back, as the journal wrote it.
    content = b"Return-Path: <s@example.net>\r\nSubject: x\r\n\r\nbody\r\n"
    head, _ = encode(1, "Q1", "1.M1P1.host,S=10", ["lmtp-from:s@example.net", "lmtp:a@example.com"], [content])
    segment = tmp_path / "0000000000000001.seg"
    segment.write_bytes(b"".join(head) + content)

    class Flaky:
        """Fault injection: a bug on the first attempt, then the backend takes it."""

        targets: list[object] = []

        def __init__(self) -> None:
            self.calls = 0

        async def deliver(self, sender: bytes, rcpts: list[bytes], message: bytes) -> list[RecipientResult]:
            self.calls += 1
            if self.calls == 1:
                raise RuntimeError("a bug")
            return [RecipientResult(r, 250, "2.0.0", "ok") for r in rcpts]

        async def close(self) -> None:
            pass

    async def scenario() -> tuple[int, list[Job], int]:
        client = Flaky()
        queue = LmtpQueue(client, str(tmp_path / "dead"), retry_base=0.01)  # type: ignore[arg-type]
        queue.start(asyncio.get_running_loop())
        done: list[Job] = []
        queue.add(Job("Q1", "1.M1P1.host,S=10", b"s@example.net", [b"a@example.com"], str(segment), 1, 0,
                      content, done.append))
        for _ in range(200):
            await asyncio.sleep(0.01)
            if done:
                break
        return client.calls, done, queue.pending

    calls, done, pending = asyncio.run(scenario())
    assert calls == 2 and len(done) == 1 and pending == 0
