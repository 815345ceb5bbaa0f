"""Accepted mail on its way to the LMTP backends, after the 250, from the journal.

Rules of this module:
- A ``Job`` is one acknowledged message whose record is in the journal
  (journalstore.py): its sender, the recipients still owed a result, and
  where its record is.  The queue lives on the worker's loop; the journal
  keeps the message's segment until the job is done, so the journal is the
  queue on disk and a crash loses nothing (a job in flight is delivered
  again: at least once, RFC 5321 §6.1's duplicates rather than losses).
- One delivery attempt gives each recipient its result (RFC 2033 §4.2):
  2xx delivered; 5xx refused for good: the message goes to the dead-letter
  Maildir with the backend's reply above it, logged and counted; 4xx, a
  backend down, a timeout, or a connection lost mid-DATA: that recipient is
  tried again, with backoff (1 s, doubling, at most 5 minutes), for as long
  as it takes, as Postfix's queue does.  Meanwhile the MX keeps accepting.
  The first delivery that goes through after an outage sends every job
  the outage deferred at once, rather than at its backoff's time (those
  deferred by a recipient's own 4xx keep theirs).
- The content is read once more from the journal for each retry (two
  preads of its record): a backlog costs a few dozen octets of memory per
  message, not the message.  The first attempt uses the octets still in
  memory.
- At most ``concurrency`` transactions run at once per worker; the rest
  wait in order.
- What is delivered is the stored message without our ``Return-Path:``
  line (the backend writes its own from the sender, RFC 5321 §4.4); our
  Received and every field above it stay.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable

from .. import metrics as counters
from ..journal import read_record
from ..recovery import deliver_to_maildir
from ..spool import fsync_dir
from ..trace import return_path
from .client import LMTPClient, LMTPTemporaryError, RecipientResult
from .protocol import CommandError, encode_address

__all__ = ["Job", "LmtpQueue", "without_return_path", "dead_letter_fields", "store_dead_letter", "DEAD_FIELD"]

log = logging.getLogger("fastsmtp.lmtp")

#: The field above a dead letter, one per refusal (``fastsmtp journal`` reads them back).
DEAD_FIELD = b"X-Fastsmtp-Dead-Letter: "


@dataclass(slots=True, eq=False)
class Job:
    """One acknowledged message owed to the LMTP backends."""

    queue_id: str
    stored: str
    sender: bytes
    #: The recipients still owed a result, in RCPT order.
    recipients: list[bytes]
    #: Where its record is: the segment's path and number, and the offset.
    path: str
    seq: int
    offset: int
    #: The stored octets, for the first attempt only (None: read the journal).
    content: bytes | None
    #: Called once, on the loop, when every recipient has its final result.
    done: Callable[["Job"], None]
    accepted_at: float = field(default_factory=time.time)
    attempts: int = 0
    #: Deferred because no backend could be reached (not by a recipient's 4xx).
    outage: bool = False
    #: The place in --deliver of the target that last failed it (0: none yet).
    target: int = 0


def _sendable(address: bytes, allow_empty: bool = False) -> bool:
    try:
        encode_address(address, "address", allow_empty)
    except CommandError:
        return False
    return True


def without_return_path(content: bytes, sender: bytes) -> bytes:
    """The message for an LMTP backend: the stored octets less our Return-Path line.

    That line is the first of our trace fields; only the fields of the
    stages (Authentication-Results, a milter's) can be above it.
    """
    line = return_path(sender)
    if content.startswith(line):
        return content[len(line):]
    at = content.find(b"\r\n" + line)
    head_end = content.find(b"\r\n\r\n")
    if at < 0 or (0 <= head_end < at):
        return content
    return content[:at + 2] + content[at + 2 + len(line):]


class LmtpQueue:
    """The worker's LMTP deliveries: run, retried with backoff, dead-lettered."""

    def __init__(self, client: LMTPClient, dead_letter: str, *, metrics: memoryview | None = None,
                 concurrency: int = 8, retry_base: float = 1.0, retry_max: float = 300.0) -> None:
        self.client = client
        self.dead_letter = dead_letter
        self._metrics = metrics
        self.concurrency = concurrency
        self.retry_base = retry_base
        self.retry_max = retry_max
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiting: collections.deque[Job] = collections.deque()
        self._running: set[asyncio.Task[None]] = set()
        self._later: dict[Job, asyncio.TimerHandle] = {}
        # How many of _later an outage deferred (kept, so that a delivery never scans them).
        self._outages = 0
        # The jobs by the target that last failed them (counts kept, not counted).
        self._by_target = [0] * counters.LMTP_TARGETS
        #: Every job not done yet (waiting, running or to be retried), oldest first.
        self._jobs: dict[Job, None] = {}
        self._closed = False

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    @property
    def pending(self) -> int:
        return len(self._jobs)

    def add(self, job: Job) -> None:
        """(Loop) a message whose record is flushed: deliver it."""
        self._jobs[job] = None
        self._by_target[self._slot(job)] += 1
        if len(self._running) >= self.concurrency:
            job.content = None  # it waits: the journal has it, memory need not
        self._waiting.append(job)
        self._gauges()
        self._pump()

    def close(self) -> None:
        """(Loop) stop: what is not delivered stays in the journal for the next start."""
        self._closed = True
        for handle in self._later.values():
            handle.cancel()
        self._later.clear()
        self._outages = 0
        for task in list(self._running):
            task.cancel()
        self._waiting.clear()

    def retry_now(self, outage_only: bool = False) -> None:
        """(Loop) the deferred deliveries, now: all (``fastsmtp journal retry``: SIGWINCH), or those of an outage."""
        now = [job for job in self._later if job.outage or not outage_only]
        for job in now:
            self._later.pop(job).cancel()
            self._outages -= job.outage
            self._waiting.append(job)
        if now:
            log.info("lmtp: %d deferred deliveries tried now", len(now))
        self._pump()

    async def drain(self, timeout: float) -> None:
        """Give the deliveries under way (and those waiting) up to ``timeout`` to finish."""
        assert self._loop is not None
        deadline = self._loop.time() + timeout
        while (self._running or self._waiting) and self._loop.time() < deadline:
            await asyncio.sleep(0.02)

    async def aclose(self) -> None:
        self.close()
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        await self.client.close()

    # -- inside --------------------------------------------------------------------------

    def _pump(self) -> None:
        assert self._loop is not None
        while self._waiting and len(self._running) < self.concurrency and not self._closed:
            job = self._waiting.popleft()
            task = self._loop.create_task(self._attempt(job))
            self._running.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("lmtp: delivery failed unexpectedly: %r", task.exception())
        self._pump()

    async def _attempt(self, job: Job) -> None:
        """One attempt; whatever goes wrong, the job is tried again or done, never left stuck."""
        try:
            await self._try(job)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug, or the disk: logged, and tried again later
            log.exception("%s: LMTP delivery failed unexpectedly", job.queue_id)
            self._retry(job, f"{type(exc).__name__}: {exc}")

    async def _try(self, job: Job) -> None:
        job.attempts += 1
        content = job.content
        job.content = None  # a retry reads the journal: a backlog holds no messages in memory
        if content is None:
            assert self._loop is not None
            record = await self._loop.run_in_executor(None, read_record, job.path, job.seq, job.offset)
            if record is None:
                # Not what was flushed: kept in the journal, tried again, never silently dropped.
                self._retry(job, f"its journal record at {job.path}:{job.offset} cannot be read")
                return
            content = record.content
        # An address the LMTP command line cannot carry (a quoted "<" or ">"
        # in a local part, RFC 5321 §4.1.2 allows them) is refused for good
        # here, not sent: the backend could never take it.
        bad_sender = not _sendable(job.sender, allow_empty=True)
        refused = [RecipientResult(r, 553, "5.1.7" if bad_sender else "5.1.3", "the mail store cannot take this address")
                   for r in job.recipients if bad_sender or not _sendable(r)]
        unsendable = {x.recipient for x in refused}
        sendable = [r for r in job.recipients if r not in unsendable]
        message = without_return_path(content, job.sender)
        started = time.perf_counter()
        failure: str | None = None
        results: list[RecipientResult] = []
        try:
            if sendable:
                results = await self.client.deliver(job.sender, sendable, message)
        except LMTPTemporaryError as exc:
            results, failure = exc.partial, str(exc)
            if exc.target is not None and exc.target in self.client.targets:
                self._by_target[self._slot(job)] -= 1
                job.target = self.client.targets.index(exc.target)
                self._by_target[self._slot(job)] += 1
        self._observe(time.perf_counter() - started)
        await self._settle(job, content, refused + results, failure)

    async def _settle(self, job: Job, content: bytes, results: list[RecipientResult], failure: str | None) -> None:
        by_recipient = {r.recipient: r for r in results}
        later: list[bytes] = []
        dead: list[RecipientResult] = []
        delivered = 0
        for rcpt in job.recipients:
            result = by_recipient.get(rcpt)
            if result is None or result.temporary:
                later.append(rcpt)
            elif result.delivered:
                delivered += 1
            else:
                dead.append(result)
        if dead:
            try:
                await self._dead_letter(job, content, dead)
            except OSError as exc:
                # Not kept anywhere yet: those recipients are tried again,
                # and their refusal is written when it can be.
                log.error("%s: could not write the dead letter into %s: %s", job.queue_id, self.dead_letter, exc)
                later += [r.recipient for r in dead]
                failure = failure or f"the dead letter could not be written: {exc}"
                dead = []
        row = self._metrics
        if row is not None:
            row[counters.LMTP_DELIVERED] += delivered
            row[counters.LMTP_DEAD] += len(dead)
        if delivered and self._outages:
            self.retry_now(outage_only=True)  # the backends are back
        if later:
            job.recipients = later
            job.outage = failure is not None
            self._retry(job, failure or "; ".join(
                f"<{r.decode('utf-8', 'replace')}>: {by_recipient[r].code} {by_recipient[r].text}"
                for r in later if r in by_recipient))
            return
        log.info("%s: delivered over LMTP (%d recipient(s), %d refused, attempt %d)", job.queue_id, delivered,
                 len(dead), job.attempts)
        del self._jobs[job]
        self._by_target[self._slot(job)] -= 1
        self._gauges()
        job.done(job)

    def _retry(self, job: Job, why: str) -> None:
        if self._closed:
            return
        delay = min(self.retry_max, self.retry_base * 2 ** min(job.attempts - 1, 16))
        log.warning("%s: LMTP delivery to %d recipient(s) deferred (attempt %d), again in %.0f s: %s",
                    job.queue_id, len(job.recipients), job.attempts, delay, why)
        row = self._metrics
        if row is not None:
            row[counters.LMTP_RETRIES] += 1
        assert self._loop is not None
        self._later[job] = self._loop.call_later(delay, self._again, job)
        self._outages += job.outage

    def _again(self, job: Job) -> None:
        if self._later.pop(job, None) is not None:
            self._outages -= job.outage
        self._waiting.append(job)
        self._pump()

    async def _dead_letter(self, job: Job, content: bytes, dead: list[RecipientResult]) -> None:
        """Into the dead-letter Maildir, durably, with each refusal in a field above the message."""
        for r in dead:
            log.error("%s: <%s> refused for good by the LMTP backend after the 250 (%d %s %s); message kept in %s",
                      job.queue_id, r.recipient.decode("utf-8", "replace"), r.code, r.enhanced, r.text,
                      self.dead_letter)
        assert self._loop is not None
        # One file per refusal: a message refused for one recipient now and
        # another later (or after a restart) is two dead letters.
        name = f"{job.stored.partition(',S=')[0]}-{time.time_ns()}"
        await self._loop.run_in_executor(None, store_dead_letter, self.dead_letter,
                                         dead_letter_fields(dead) + content, name)

    @staticmethod
    def _slot(job: Job) -> int:
        return min(job.target, counters.LMTP_TARGETS - 1)

    def _observe(self, seconds: float) -> None:
        row = self._metrics
        if row is not None:
            counters.observe(row, counters.LMTP_SECONDS, seconds)

    def _gauges(self) -> None:
        row = self._metrics
        if row is not None:
            row[counters.LMTP_PENDING] = len(self._jobs)
            oldest = next(iter(self._jobs), None)
            row[counters.LMTP_OLDEST_MS] = int(oldest.accepted_at * 1000) if oldest is not None else 0
            for i, count in enumerate(self._by_target):
                row[counters.LMTP_PENDING_BY + i] = count


def dead_letter_fields(refusals: list[RecipientResult]) -> bytes:
    """One ``X-Fastsmtp-Dead-Letter:`` field per refusal: the recipient, the backend's code and words."""
    return b"".join(DEAD_FIELD + b"<" + r.recipient + b"> " + f"{r.code} {r.enhanced} ".encode()
                    + " ".join(r.text.split()).encode("utf-8", "replace") + b"\r\n" for r in refusals)


def store_dead_letter(maildir: str, data: bytes, name: str) -> None:
    """``data`` into the dead-letter Maildir's new/ as ``<name>,S=<size>``, durably (file and folder)."""
    for sub in ("tmp", "new", "cur"):
        os.makedirs(os.path.join(maildir, sub), exist_ok=True)
    deliver_to_maildir(data, maildir, f"{name},S={len(data)}")
    fsync_dir(os.path.join(maildir, "new"))
