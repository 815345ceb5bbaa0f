"""The journaled store: a 250 after one flush of a sequential log, delivery into new/ after it.

Rules of this module:
- A message is safe once its record is in the journal (journal.py) and
  the journal is fdatasync'ed: that is when ``submit()``'s future
  resolves and the client gets its 250.  A 250 means the message is on
  stable storage and will be in every recipient's ``new/``, also after a
  crash or a power cut (DESIGN.md, principle 1).
- Group commit.  One flusher thread takes as one batch whatever was
  submitted while its previous flush ran, or, when it was idle, in the
  loop iteration that woke it (up to ``max_batch`` messages and
  ``max_batch_bytes``), writes it with one ``pwritev`` (a spilled message's
  file is copied in the kernel, ``copy_file_range``) and flushes it: by the
  write itself (``RWF_DSYNC``) when it was one call, else with one
  ``fdatasync``.  No timer: a lone message is flushed at once.  Appending
  to one file is the disk's fastest durable write (bench/RESULTS.md: one
  append and fdatasync of 1 KiB takes 0.26 ms here, a file and its folder
  0.7 ms), and the cost is paid per batch, not per message.
- Delivery is off the path to the reply.  Once a batch is flushed, the
  loop writes its 250s, then writes each message into its Maildir exactly
  as ``MaildirWriter`` does (an unnamed file in ``tmp/``, linked into each
  ``new/``; maildir.py) but flushes nothing: the journal holds the message
  meanwhile.  A file is visible in ``new/`` within a few milliseconds of
  its 250 (``fastsmtp_delivery_lag_seconds``).  Why on the loop and not in
  a thread: ``_flushed``.
- With ``--deliver lmtp:...`` the targets are ``lmtp:<recipient>``: a
  flushed message becomes a job of the LMTP queue (lmtp/queue.py) instead
  of files, and its segment waits for the job.  Each job done is marked in
  ``<segment>.done`` (journal.py) before it counts as delivered, so a
  worker that dies leaves its successor only what the backends did not
  take (recovery.py adopts it).  Such messages spill, when large, into
  this worker's ``spool-<pid>/tmp/``.
- A segment is closed when it reaches ``segment_size`` (or has been idle
  a second); the retirer (retirer.py) makes its files durable and retires
  it, and retries a delivery that failed (a full disk, a Maildir removed
  after its RCPT) from the record in the journal.  The journal is sized by
  the ``--min-free`` reserve, not by memory.
- Threads: the loop queues, answers and delivers; the flusher owns the
  active segment; the retirer owns checkpoints, spares and retries.  Per
  batch no lock is taken beyond the queue's: each count on a segment has a
  single writer (flushed: the flusher; delivered: the loop; redelivered:
  the retirer).
"""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
import os
import shutil
import threading
import time
from typing import Any, Sequence

from . import metrics as counters
from .errors import StorageError
from .journal import DONE, DONE_MARK, LMTP, LMTP_FROM, MAILDIR, OwnFolder, encode, pid_alive, read_record
from .lmtp.queue import Job, LmtpQueue
from .maildir import Delivery, TmpFiles
from .recovery import Recovered
from .retirer import Segment, Segments
from .spool import Spool, checked_for_submit, close_quiet, encode_host, fdatasync, new_name
from .store import MessageSpool, Result, settle

__all__ = ["JournalStore", "Entry"]

log = logging.getLogger("fastsmtp.journal")

# Linux limits one writev to IOV_MAX (1024) buffers.
_IOV_MAX = 1024
# Octets written into a new (growing) segment after which a spare is made:
# the load is steady then.
_WARM = 1 << 20
# Records adopted from a dead worker's journal, read and journaled at a time.
_ADOPT_BATCH = 256
# pwritev2(2) flag (Linux 4.7+): the write is durable when it returns.
_DSYNC = getattr(os, "RWF_DSYNC", 0)


class Entry(Delivery):
    """A message on its way: into the journal, then into its Maildirs or to the LMTP backends."""

    __slots__ = ("segment", "offset", "flushed", "attempts", "retry_at", "lmtp", "sender")

    def __init__(self, spool: Spool, maildirs: list[str], future: "asyncio.Future[str]",
                 lmtp: list[bytes] | None = None, sender: bytes = b"") -> None:
        super().__init__(spool, maildirs, future)
        self.segment: Segment | None = None
        self.offset = 0
        self.flushed = 0.0
        self.attempts = 0
        self.retry_at = 0.0
        #: The recipients for the LMTP backends (targets ``lmtp:<rcpt>``), and the sender.
        self.lmtp = lmtp or []
        self.sender = sender


class JournalStore:
    """The ``Store`` of ``--fsync batch``: journal flush, then delivery into Maildir."""

    def __init__(
        self,
        *,
        hostname: str,
        journal_dir: str,
        mail_root: str = "",
        spill_threshold: int = 256 * 1024,
        max_batch: int = 512,
        max_batch_bytes: int = 64 * 1024 * 1024,
        segment_size: int = 16 * 1024 * 1024,
        idle_close: float = 1.0,
        metrics: memoryview | None = None,
        anonymous_tmp: bool = True,
        lmtp: LmtpQueue | None = None,
    ) -> None:
        if max_batch < 1 or max_batch_bytes < 1 or spill_threshold < 0 or segment_size < 1:
            raise ValueError("max_batch, max_batch_bytes, segment_size must be positive, spill_threshold >= 0")
        self._host = encode_host(hostname)
        self._root = journal_dir
        # Records name Maildirs relative to the mail root (journal.py), so a
        # mail root restored elsewhere, or named by another relative path,
        # still receives its journal.
        self._under_root = mail_root.rstrip("/") + "/" if mail_root else None
        self._spill_threshold = spill_threshold
        self._max_batch = max_batch
        self._max_batch_bytes = max_batch_bytes
        self._segment_size = segment_size
        self._idle_close = idle_close
        self._metrics = metrics
        # --deliver lmtp:...: the messages go to the backends from here (lmtp/queue.py).
        self._lmtp = lmtp
        #: What the recovery before it found (worker.py adopts its LMTP records).
        self.recovered: Recovered | None = None
        # LMTP deliveries done and not yet marked in their segment's .done file.
        self._done: list[tuple[Segment, int]] = []
        # Where messages for the LMTP backends spill (no Maildir is theirs):
        # this process's, so that a dead one's leftovers can be removed.
        self._spool_dir = os.path.join(journal_dir, f"spool-{os.getpid()}")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._folder: OwnFolder | None = None
        self._tmp_files = TmpFiles(anonymous_tmp)
        # The loop queues for the flusher; the flusher hands flushed batches
        # back to the loop; the loop hands failed deliveries to the retirer.
        self._cv = threading.Condition()
        self._queue: collections.deque[Entry] = collections.deque()
        self._kick_pending = False  # the loop's: a wake-up of the flusher is scheduled
        # Batches handed to the loop (the flusher counts) and delivered by
        # it (the loop counts): close() waits until they are equal.
        self._handed = 0
        self._delivered_batches = 0
        self._delivered_cv = threading.Condition()
        self._closing = False
        self._flusher: threading.Thread | None = None
        # The unretired segments and their retirer (retirer.py); the active
        # one, the flusher's.
        self._segments: Segments | None = None
        self._active: Segment | None = None
        self._dsync = _DSYNC != 0
        self.stats: dict[str, Any] = {
            "batches": 0, "messages": 0, "failed": 0, "refused": 0, "max_batch": 0,
            "batch_sizes": collections.Counter(), "delivered": 0, "delivery_failures": 0, "retired": 0,
            "checkpoints": 0, "reused": 0,
        }

    # -- loop side ---------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is not None or self._closing:
            raise RuntimeError("JournalStore.start() called twice or after close()")
        self._loop = loop
        self._folder = OwnFolder(self._root)
        self._tmp_files.open()
        self._segments = Segments(self._folder, self._root, self._segment_size, self.stats, self._metrics)
        self._segments.start()
        if self._lmtp is not None:
            self._lmtp.start(loop)
            _clear_dead_spools(self._root)
            os.makedirs(os.path.join(self._spool_dir, "tmp"), exist_ok=True)
        self._flusher = threading.Thread(target=self._flush_loop, name="fastsmtp-journal", daemon=False)
        self._flusher.start()

    @property
    def segments(self) -> Segments:
        """The unretired segments and their retirer (after start())."""
        assert self._segments is not None, "JournalStore.start() first"
        return self._segments

    @property
    def folder(self) -> str | None:
        """This process's journal folder (None before start)."""
        return self._folder.path if self._folder is not None else None

    def open_spool(self, maildir: str) -> Spool:
        name, queue_id = new_name(self._host)
        if maildir.startswith(LMTP):
            # A message for the LMTP backends spills into this worker's own
            # spool folder (its content goes into the journal all the same).
            maildir = self._spool_dir
        return Spool(maildir, name, queue_id, self._spill_threshold)

    def submit(self, spool: MessageSpool, maildirs: Sequence[str], sender: bytes = b"") -> "asyncio.Future[str]":
        """Queue the finished message for the next journal flush; the future resolves after it.

        ``maildirs`` are the Maildirs to deliver into, or, with LMTP, the
        targets ``lmtp:<recipient>`` (``sender`` is then the reverse-path).
        """
        if self._loop is None:
            raise RuntimeError("JournalStore.submit() before start()")
        spool = checked_for_submit(spool, maildirs, "store")
        lmtp = [os.fsencode(t[len(LMTP):]) for t in maildirs if t.startswith(LMTP)]
        if lmtp:
            if self._lmtp is None:
                raise ValueError("lmtp: targets without --deliver lmtp:...")
            if len(lmtp) != len(maildirs):
                # One message goes one way: a .done mark covers its whole record.
                raise ValueError("a message for both Maildirs and LMTP backends")
            maildirs = []
        fut: asyncio.Future[str] = self._loop.create_future()
        if spool.failed is not None:
            spool.discard()
            fut.set_exception(_error(spool.queue_id, spool.failed))
            self.stats["refused"] += 1
            return fut
        entry = Entry(spool, list(dict.fromkeys(maildirs)), fut, list(dict.fromkeys(lmtp)), sender)
        with self._cv:
            if self._closing:
                entry.cleanup()
                fut.set_exception(StorageError(f"{spool.queue_id}: the journal is closed"))
                self.stats["refused"] += 1
                return fut
            self._queue.append(entry)
        # The flusher is woken once per loop iteration, after every message
        # that ended in it is queued: one flush for all of them, not one for
        # the first and another for the rest.
        if not self._kick_pending:
            self._kick_pending = True
            self._loop.call_soon(self._kick)
        return fut

    async def adopt(self, where: Sequence[tuple[str, int, int]], seen: set[str]) -> bool:
        """(Loop, after start) a dead worker's records for the LMTP backends, journaled here anew.

        ``where``: (segment path, sequence number, offset) of each record.
        They are read and submitted a few hundred at a time, so memory holds
        a batch, not the backlog.  A queue id in ``seen`` (adopted already,
        from another copy of the same folder's records) is skipped.  True
        once every record is flushed in this journal; False if any could
        not be read or journaled (the caller keeps the old folder).
        """
        assert self._loop is not None
        ok = True
        for start in range(0, len(where), _ADOPT_BATCH):
            futures = []
            for path, seq, offset in where[start:start + _ADOPT_BATCH]:
                record = await self._loop.run_in_executor(None, read_record, path, seq, offset)
                if record is None:
                    log.error("journal: the record at %s:%d cannot be read to be adopted; kept there", path, offset)
                    ok = False
                    continue
                if record.queue_id in seen:
                    continue
                seen.add(record.queue_id)
                sender, recipients = record.lmtp_envelope()
                targets = [LMTP + os.fsdecode(r) for r in recipients]
                # Its own name and queue id (and so its age); two copies of one
                # record never meet in a spill file, ``seen`` saw to that.
                spool = Spool(self._spool_dir, record.stored.partition(",S=")[0], record.queue_id,
                              self._spill_threshold)
                spool.write(record.content)
                futures.append(self.submit(spool, targets, sender))
            results = await asyncio.gather(*futures, return_exceptions=True)
            failed = [r for r in results if isinstance(r, BaseException)]
            if failed:
                log.error("journal: %d adopted message(s) could not be journaled: %s", len(failed), failed[0])
                ok = False
        return ok

    @property
    def lmtp(self) -> LmtpQueue | None:
        return self._lmtp

    def _kick(self) -> None:
        self._kick_pending = False
        with self._cv:
            self._cv.notify()

    def close(self) -> None:
        """Flush and deliver everything submitted, retire the journal, stop (blocking: off the loop)."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        if self._flusher is not None:
            self._flusher.join()
        with self._delivered_cv:
            # The loop delivers what the flusher handed it; then the retirer
            # makes it durable and retires the segments.
            deadline = time.monotonic() + 30.0
            while self._handed != self._delivered_batches and time.monotonic() < deadline:
                self._delivered_cv.wait(0.05)
        self._close_tmp_files()
        if self._segments is None or self._folder is None:
            return
        self._segments.stop()
        left = self._segments.unretired()
        if left:
            # Undelivered messages (a Maildir that kept failing, a loop that
            # stopped): the folder stays for recovery at the next start.
            log.error("journal %s kept: %d segment(s) hold undelivered messages", self._folder.path, len(left))
            self._folder.release()
        else:
            self._folder.remove()

    def _close_tmp_files(self) -> None:
        # The loop may still be linking through /proc/self/fd: close it there.
        try:
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._tmp_files.close)
        except (RuntimeError, AssertionError):  # the loop is closed: nothing links any more
            self._tmp_files.close()

    # -- the flusher thread ------------------------------------------------

    def _flush_loop(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._closing:
                    if not self._cv.wait(self._idle_close):
                        self._close_idle()
                if not self._queue:
                    break
                batch = self._take()
            try:
                self._flush(batch)
            except Exception as exc:  # a bug: fail the batch, keep the thread
                log.exception("journal flusher: unexpected error, failing %d message(s)", len(batch))
                self._fail_batch(batch, exc)
        self._roll()  # the last segment is closed: the retirer may retire it

    def _take(self) -> list[Entry]:
        batch = [self._queue.popleft()]
        nbytes = batch[0].spool.size
        while self._queue and len(batch) < self._max_batch:
            size = self._queue[0].spool.size
            if nbytes + size > self._max_batch_bytes:
                break
            batch.append(self._queue.popleft())
            nbytes += size
        return batch

    def _flush(self, batch: list[Entry]) -> None:
        started = time.perf_counter()
        try:
            segment = self._segment()
        except OSError as exc:  # the journal folder is gone, the disk full: 451, and try again next time
            log.error("journal: could not start a segment for %d message(s): %s", len(batch), exc)
            self._fail_batch(batch, exc)
            return
        good = segment.size
        try:
            if not self._append(segment, batch):
                assert segment.fd is not None
                fdatasync(segment.fd)
        except OSError as exc:
            # Nothing of this batch is acknowledged.  Its octets may be in
            # the segment, partly: cut them off and go on in a new segment,
            # so the bad stretch is at most a torn tail.
            log.error("journal: could not write %d message(s): %s", len(batch), exc)
            self._fail_batch(batch, exc)
            self._cut(segment, good)
            return
        flushed = time.monotonic()
        segment.flushed += len(batch)
        segment.touched = flushed
        # A quiet server never writes segments of zeros; one that has written
        # a MiB since it started is under load.
        if segment.growing and segment.size >= _WARM:
            self.segments.want_spare()
        for entry in batch:
            entry.segment = segment
            entry.flushed = flushed
            entry.posted = True
        self._account(batch, time.perf_counter() - started)
        self._handed += 1
        try:
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._flushed, batch)
        except RuntimeError:  # the loop is closed: nobody waits for a 250; deliver here
            self._deliver(batch)

    def _segment(self) -> Segment:
        """The segment to append to: the active one, or the next one."""
        segments = self.segments
        segment = self._active
        if segment is not None and segment.size < self._segment_size and not (segment.growing and segments.spare_ready):
            return segment
        # Steady load (a segment filled up) wants a spare ready for the next
        # segment; a growing segment moves to a spare as soon as one is
        # ready: an fdatasync in a file whose size changes writes the inode
        # too, and on ext4 commits its journal, which also flushes every
        # Maildir file written since (bench/RESULTS.md).
        self._roll()
        assert self._folder is not None
        spare = segments.take_spare(want_next=segment is not None)
        segment = Segment(*self._folder.new_segment(spare), growing=spare is None)
        self.stats["reused"] += spare is not None
        segments.add(segment)
        self._active = segment
        return segment

    def _append(self, segment: Segment, batch: list[Entry]) -> bool:
        """Write the batch's records at the end of ``segment``; True if that flushed them too.

        One pwritev for the batch, unless a spilled file interrupts it.  A
        batch written by that one call is flushed by it (RWF_DSYNC: the
        write returns once its data is on stable storage, as after an
        fdatasync of its range), which spares the flusher one more wait
        for the GIL on a busy loop; otherwise the caller calls fdatasync.
        """
        assert segment.fd is not None
        fd = segment.fd
        iov: list[bytes | bytearray] = []
        offset = segment.size  # where iov starts
        end = offset
        for entry in batch:
            targets = [MAILDIR + self._target(md) for md in entry.maildirs]
            if entry.lmtp:
                targets.append(LMTP_FROM + os.fsdecode(entry.sender))
                targets += [LMTP + os.fsdecode(r) for r in entry.lmtp]
            entry.offset = end
            if entry.fd is None:
                head, length = encode(segment.seq, entry.spool.queue_id, entry.stored, targets,
                                      [*entry.prefix, entry.content])
                iov += head
                iov += entry.prefix
                iov.append(entry.content)
                end += length
                continue
            # Spilled: the content is in its tmp/ file (opened write-only).
            assert entry.tmp is not None
            src = os.open(entry.tmp, os.O_RDONLY | os.O_CLOEXEC)
            try:
                size = os.fstat(src).st_size
                head, length = encode(segment.seq, entry.spool.queue_id, entry.stored, targets, entry.prefix,
                                      (src, size))
                iov += head
                iov += entry.prefix
                _pwritev_all(fd, iov, offset)
                done = 0
                at = end + length - size
                while done < size:
                    k = os.copy_file_range(src, fd, size - done, done, at + done)
                    if k <= 0:
                        raise OSError(errno.EIO, "copy into the journal made no progress")
                    done += k
            finally:
                os.close(src)
            iov = []
            end += length
            offset = end
        synced = False
        if iov:
            synced = offset == segment.size and len(iov) <= _IOV_MAX and self._dsync
            try:
                _pwritev_all(fd, iov, offset, _DSYNC if synced else 0)
            except OSError as exc:
                if not synced or exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                # A kernel or file system without the flag: fdatasync from now on.
                log.info("journal: pwritev2 with RWF_DSYNC refused (%s); flushing with fdatasync", exc.strerror)
                self._dsync = synced = False
                _pwritev_all(fd, iov, offset)
        segment.size = end
        return synced

    def _target(self, maildir: str) -> str:
        under = self._under_root
        if under is not None and maildir.startswith(under):
            return maildir[len(under):]
        return maildir  # outside the mail root (not made by FolderRecipients): as it is

    def _cut(self, segment: Segment, good: int) -> None:
        """After a failed write: truncate what was not acknowledged, close the segment."""
        segment.size = good
        if segment.fd is not None:
            try:
                os.ftruncate(segment.fd, good)
            except OSError:
                pass  # a torn tail then: recovery drops it
        self._roll()

    def _roll(self) -> None:
        """Close the active segment: no more appends; retired once all of it is delivered."""
        segment = self._active
        if segment is None:
            return
        self._active = None
        segment.closed = True
        fd, segment.fd = segment.fd, None
        if fd is not None:
            close_quiet(fd)
        if segment.size == 0:
            self.segments.discard(segment)
        self.segments.wake()  # something may be retirable now

    def _close_idle(self) -> None:
        segment = self._active
        if segment is not None and segment.size and time.monotonic() - segment.touched >= self._idle_close:
            self._roll()

    def _fail_batch(self, batch: list[Entry], exc: BaseException) -> None:
        results: list[Result] = []
        for entry in batch:
            if entry.posted:
                continue
            entry.posted = True
            results.append((entry.future, _error(entry.spool.queue_id, exc)))
            try:
                entry.cleanup()
            except Exception:
                log.exception("journal: cleanup of %s failed", entry.spool.queue_id)
        self.stats["failed"] += len(results)
        self._post(results)

    def _post(self, results: list[Result]) -> None:
        if not results:
            return
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(settle, results)
        except RuntimeError:  # the loop is closed: nobody waits for these
            pass

    def _account(self, batch: list[Entry], seconds: float) -> None:
        st = self.stats
        st["batches"] += 1
        st["messages"] += len(batch)
        st["max_batch"] = max(st["max_batch"], len(batch))
        st["batch_sizes"][len(batch)] += 1
        row = self._metrics
        if row is not None:
            row[counters.COMMIT_BATCHES] += 1
            counters.observe(row, counters.BATCH_SIZE, len(batch))
            counters.observe(row, counters.COMMIT_SECONDS, seconds)
            self.segments.gauges()

    # -- delivery, on the loop -----------------------------------------------

    def _flushed(self, batch: list[Entry]) -> None:
        """On the loop: the batch is in the journal.  Its 250s first, then its files.

        Delivery runs on the loop thread, after the replies: a thread of its
        own would make several system calls per message, and each one gives
        up the GIL and waits for the busy loop thread to hand it back (up to
        ``sys.getswitchinterval()``, 5 ms, each): measured here, such a
        thread fell seconds behind at 2,000 messages/s (bench/RESULTS.md).
        On the loop the same work is what ``--fsync off`` does, and it paces
        acceptance, so the backlog cannot grow without bound.
        """
        for entry in batch:
            if not entry.future.done():  # cancelled: the session has gone
                entry.future.set_result(entry.stored)
        assert self._loop is not None
        # After the futures' callbacks, which write the 250s.
        self._loop.call_soon(self._deliver, batch)

    def _deliver(self, batch: list[Entry]) -> None:
        """Write each message of a flushed batch into its Maildirs (no flush: the journal has it)."""
        failed: list[tuple[Entry, OSError]] = []
        lags: list[float] = []
        proc_fd = self._tmp_files.proc_fd
        handed = set()
        for entry in batch:
            if entry.lmtp:
                self._hand_to_lmtp(entry)
                handed.add(id(entry))
        for entry in batch:
            if id(entry) in handed:
                continue
            try:
                entry.write_out(self._tmp_files)
                entry.link(proc_fd)
                entry.close_fd()
            except OSError as exc:
                entry.cleanup()
                failed.append((entry, exc))
            else:
                lags.append(time.monotonic() - entry.flushed)
        delivered = len(batch) - len(failed) - len(handed)
        missed = {id(entry) for entry, _ in failed} | handed
        segments = self.segments
        for entry in batch:
            if id(entry) not in missed:
                for md in entry.maildirs:
                    segments.note_file_system(md)
                # After that: a checkpoint that sees this count sees its file system.
                assert entry.segment is not None
                entry.segment.delivered += 1
        self._delivered_batches += 1
        self.stats["delivered"] += delivered
        row = self._metrics
        if row is not None:
            row[counters.DELIVERED] += delivered
            row[counters.DELIVERY_FAILURES] += len(failed)
            for lag in lags:
                counters.observe(row, counters.DELIVERY_LAG, lag)
        # The retirer and close() are woken only for work: a wake-up per
        # batch would cost a context switch per batch.
        if failed:
            segments.retry(failed)
        if self._closing:
            with self._delivered_cv:
                self._delivered_cv.notify_all()

    def _hand_to_lmtp(self, entry: Entry) -> None:
        """(Loop) a flushed message for the LMTP backends: a job of the queue; its segment waits for it.

        The octets in memory serve the first attempt; a spilled message's
        (and every retry's) are read back from its record.  Its spool's
        memory and file are dropped here.
        """
        queue = self._lmtp
        segment = entry.segment
        assert queue is not None and segment is not None
        content = None if entry.fd is not None else b"".join([*entry.prefix, entry.content])
        entry.cleanup()

        def done(job: Job) -> None:
            if not self._done:
                assert self._loop is not None
                self._loop.call_soon(self._mark_done)
            self._done.append((segment, job.offset))

        # Accepted when its name says (Maildir names start with the second:
        # an adopted message keeps its age), else when it was flushed.
        head = entry.stored.partition(".")[0]
        accepted = float(head) if head.isdigit() else time.time() - (time.monotonic() - entry.flushed)
        queue.add(Job(entry.spool.queue_id, entry.stored, entry.sender, list(entry.lmtp), segment.path, segment.seq,
                      entry.offset, content, done, accepted_at=accepted))

    def _mark_done(self) -> None:
        """(Loop) note the LMTP deliveries done in their segments' .done files, then count them delivered.

        In that order: a segment is retired only after its marks are
        written, so no mark outlives its segment.  No flush: the marks
        spare a crashed worker's successor most redeliveries, and one lost
        to a power cut is a duplicate, not a loss.
        """
        done, self._done = self._done, []
        marks: dict[str, list[bytes]] = {}
        for segment, offset in done:
            marks.setdefault(segment.path, []).append(DONE_MARK.pack(offset))
        for path, packed in marks.items():
            try:
                fd = os.open(path + DONE, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
                try:
                    os.write(fd, b"".join(packed))
                finally:
                    os.close(fd)
            except OSError as exc:
                log.warning("journal: could not mark %d LMTP deliveries done in %s (a crash now would deliver "
                            "them again): %s", len(packed), path, exc)
        wake = False
        for segment, _ in done:
            segment.delivered += 1
            wake = wake or (segment.closed and not segment.pending)
        if wake:
            self.segments.wake()  # retirable now


def _clear_dead_spools(root: str) -> None:
    """Remove the LMTP spool folders (``spool-<pid>``) of processes that are gone: spills of messages
    never acknowledged, or already in the journal."""
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return
    for name in names:
        if name.startswith("spool-") and not pid_alive(name[len("spool-"):]):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _pwritev_all(fd: int, parts: list[bytes | bytearray], offset: int, flags: int = 0) -> None:
    """pwritev everything at ``offset``: one call, or one per IOV_MAX buffers, plus any short write's rest.

    A short write is finished with plain writes, and then, with RWF_DSYNC
    in ``flags``, flushed by an fdatasync: the flag covered only the part
    the first call wrote.
    """
    for i in range(0, len(parts), _IOV_MAX):
        chunk = parts[i:i + _IOV_MAX]
        total = sum(len(p) for p in chunk)
        n = os.pwritev(fd, chunk, offset, flags) if flags else os.pwritev(fd, chunk, offset)
        if n < total:
            rest = b"".join(chunk)[n:]
            view = memoryview(rest)
            while view:
                k = os.pwrite(fd, view, offset + n)
                if k <= 0:
                    raise OSError(errno.EIO, "write made no progress")
                n += k
                view = view[k:]
            if flags:
                fdatasync(fd)
        offset += total


def _error(queue_id: str, exc: BaseException) -> StorageError:
    err = StorageError(f"{queue_id}: could not store the message: {exc}")
    err.__cause__ = exc
    return err
