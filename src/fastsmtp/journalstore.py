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
- Retirement.  A segment is closed when it reaches ``segment_size`` (or
  has been idle a second); once every message in a closed segment is in
  ``new/``, one ``syncfs(2)`` per file system delivered to makes those
  files durable and the segment is retired: kept as the spare for a later
  segment (an overwrite needs no new blocks, so its flushes write data
  only), or deleted.  syncfs was ruled out for the 250 because
  its latency belongs to everybody's dirty data (maildir.py); here nothing
  waits for it, and it is one call for thousands of files where per-file
  flushes would be thousands of calls.  Its error is the file system's,
  not a file's: on failure nothing is retired and the next checkpoint
  tries again (a crash meanwhile is repaired by recovery, which checks
  every file byte for byte).
- A delivery that fails (a full disk, a Maildir removed after its RCPT) is
  logged, counted and retried with backoff, from the record in the journal
  (the content is not kept in memory).  Its segment stays until it
  succeeds.  The journal is sized by the ``--min-free`` reserve, not by
  memory.
- Threads: the loop queues, answers and delivers; the flusher owns the
  active segment; the retirer makes delivered files durable, retires
  segments, prepares spares and retries failed deliveries.  The segment
  list and the spares are shared under one lock; per batch no lock is
  taken beyond the queue's: each count on a segment has a single writer
  (flushed: the flusher; delivered: the loop; redelivered: the retirer).
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import ctypes.util
import errno
import itertools
import logging
import os
import threading
import time
from typing import Any, Sequence

from . import metrics as counters
from .errors import StorageError
from .journal import MAILDIR, OwnFolder, encode, read_segment, scan
from .maildir import Delivery, TmpFiles, fdatasync
from .recovery import deliver_to_maildir, set_aside
from .spool import Spool, checked_for_submit, close_quiet, encode_host, new_name, unlink_quiet
from .store import MessageSpool

__all__ = ["JournalStore"]

log = logging.getLogger("fastsmtp.journal")

# Linux limits one writev to IOV_MAX (1024) buffers.
_IOV_MAX = 1024
# Octets written into a new (growing) segment after which a spare is made:
# the load is steady then.
_WARM = 1 << 20
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
# pwritev2(2) flag (Linux 4.7+): the write is durable when it returns.
_DSYNC = getattr(os, "RWF_DSYNC", 0)


def _load_syncfs() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    return fn


_syncfs = _load_syncfs()


def syncfs(fd: int) -> None:
    """Flush the file system that ``fd`` is on (syncfs(2); sync(2) where there is none)."""
    if _syncfs is None:
        os.sync()
        return
    if _syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class _Segment:
    """One segment file and what in it is not yet delivered."""

    __slots__ = ("seq", "path", "fd", "size", "flushed", "delivered", "redelivered", "closed", "touched", "growing")

    def __init__(self, seq: int, fd: int, path: str, growing: bool) -> None:
        self.seq = seq
        self.path = path
        # A new file, not a spare: each flush also writes its new size.
        self.growing = growing
        self.fd: int | None = fd
        self.size = 0
        # Messages flushed into it, delivered by the loop, delivered again by
        # the retirer: each count has one writer (the flusher, the loop, the
        # retirer), so no lock is taken per batch; ``pending`` is read from them.
        self.flushed = 0
        self.delivered = 0
        self.redelivered = 0
        self.closed = False
        self.touched = time.monotonic()


    @property
    def pending(self) -> int:
        """Messages flushed into it and not yet in every new/."""
        return self.flushed - self.delivered - self.redelivered


class _Entry(Delivery):
    """A message on its way: into the journal, then into its Maildirs."""

    __slots__ = ("segment", "offset", "flushed", "attempts", "retry_at")

    def __init__(self, spool: Spool, maildirs: list[str], future: "asyncio.Future[str]") -> None:
        super().__init__(spool, maildirs, future)
        self.segment: _Segment | None = None
        self.offset = 0
        self.flushed = 0.0
        self.attempts = 0
        self.retry_at = 0.0


def _resolve(results: list[tuple["asyncio.Future[str]", "str | BaseException"]]) -> None:
    for fut, res in results:
        if fut.done():
            continue
        if isinstance(res, BaseException):
            fut.set_exception(res)
        else:
            fut.set_result(res)


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
        self._loop: asyncio.AbstractEventLoop | None = None
        self._folder: OwnFolder | None = None
        self._tmp_files = TmpFiles(anonymous_tmp)
        # The loop queues for the flusher; the flusher hands flushed batches
        # back to the loop; the loop hands failed deliveries to the retirer.
        self._cv = threading.Condition()
        self._queue: collections.deque[_Entry] = collections.deque()
        self._kick_pending = False  # the loop's: a wake-up of the flusher is scheduled
        self._rcv = threading.Condition()
        self._retries: list[_Entry] = []
        self._retirer_stop = False
        # Batches handed to the loop (the flusher counts) and delivered by
        # it (the loop counts): close() waits until they are equal.
        self._handed = 0
        self._delivered_batches = 0
        self._closing = False
        self._threads: list[threading.Thread] = []
        # Under _lock: every unretired segment, the active one last.
        self._lock = threading.Lock()
        self._segments: list[_Segment] = []
        self._active: _Segment | None = None
        # The file systems delivered to (device -> an open folder on it, for
        # syncfs), and each Maildir's device.
        self._file_systems: dict[int, int] = {}
        self._devices: dict[str, int] = {}
        # After a failed checkpoint, none before this (monotonic) time.
        self._checkpoint_after = 0.0
        # Under _lock: files ready to be the next segment (retired ones, or
        # written with zeros by the retirer), and a count for their names.
        self._spares: list[str] = []
        self._spare_wanted = False
        self._dsync = _DSYNC != 0
        self._spare_names = itertools.count()
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
        for name, target in (("fastsmtp-journal", self._flush_loop), ("fastsmtp-retire", self._retire_loop)):
            thread = threading.Thread(target=target, name=name, daemon=False)
            thread.start()
            self._threads.append(thread)

    @property
    def folder(self) -> str | None:
        """This process's journal folder (None before start)."""
        return self._folder.path if self._folder is not None else None

    def open_spool(self, maildir: str) -> Spool:
        name, queue_id = new_name(self._host)
        return Spool(maildir, name, queue_id, self._spill_threshold)

    def submit(self, spool: MessageSpool, maildirs: Sequence[str]) -> "asyncio.Future[str]":
        """Queue the finished message for the next journal flush; the future resolves after it."""
        if self._loop is None:
            raise RuntimeError("JournalStore.submit() before start()")
        spool = checked_for_submit(spool, maildirs, "store")
        fut: asyncio.Future[str] = self._loop.create_future()
        if spool.failed is not None:
            spool.discard()
            fut.set_exception(_error(spool.queue_id, spool.failed))
            self.stats["refused"] += 1
            return fut
        entry = _Entry(spool, list(dict.fromkeys(maildirs)), fut)
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

    def _kick(self) -> None:
        self._kick_pending = False
        with self._cv:
            self._cv.notify()

    def close(self) -> None:
        """Flush and deliver everything submitted, retire the journal, stop (blocking: off the loop)."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        flusher, retirer = self._threads or (None, None)
        if flusher is not None:
            flusher.join()
        with self._rcv:
            # The loop delivers what the flusher handed it; then the retirer
            # makes it durable and retires the segments.
            deadline = time.monotonic() + 30.0
            while self._handed != self._delivered_batches and time.monotonic() < deadline:
                self._rcv.wait(0.05)
            self._retirer_stop = True
            self._rcv.notify_all()
        if retirer is not None:
            retirer.join()
        self._threads = []
        self._close_tmp_files()
        for fd in self._file_systems.values():
            close_quiet(fd)
        self._file_systems = {}
        if self._folder is not None:
            with self._lock:
                left = [s for s in self._segments if s.pending or not s.closed]
            if left:
                # Undelivered messages (a Maildir that kept failing, a loop
                # that stopped): the folder stays for recovery at the next start.
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

    def _take(self) -> list[_Entry]:
        batch = [self._queue.popleft()]
        nbytes = batch[0].spool.size
        while self._queue and len(batch) < self._max_batch:
            size = self._queue[0].spool.size
            if nbytes + size > self._max_batch_bytes:
                break
            batch.append(self._queue.popleft())
            nbytes += size
        return batch

    def _flush(self, batch: list[_Entry]) -> None:
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
        # a MiB since it started is under load.  (Only this thread writes
        # _spare_wanted.)
        if segment.growing and segment.size >= _WARM and not self._spare_wanted:
            self._spare_wanted = True
            self._wake_retirer()
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

    def _segment(self) -> _Segment:
        """The segment to append to: the active one, or the next one."""
        segment = self._active
        if segment is not None and segment.size < self._segment_size and not (segment.growing and self._spares):
            return segment
        # Steady load (a segment filled up) wants a spare ready for the next
        # segment; a growing segment moves to a spare as soon as one is
        # ready: an fdatasync in a file whose size changes writes the inode
        # too, and on ext4 commits its journal, which also flushes every
        # Maildir file written since (bench/RESULTS.md).
        self._roll()
        assert self._folder is not None
        spare = self._take_spare(want_next=segment is not None)
        segment = _Segment(*self._folder.new_segment(spare), growing=spare is None)
        self.stats["reused"] += spare is not None
        with self._lock:
            self._segments.append(segment)
            self._active = segment
        return segment

    def _append(self, segment: _Segment, batch: list[_Entry]) -> bool:
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

    def _take_spare(self, want_next: bool) -> str | None:
        with self._lock:
            spare = self._spares.pop() if self._spares else None
            self._spare_wanted = want_next
        if want_next:
            self._wake_retirer()  # it makes the next one, unless a retired segment becomes it
        return spare

    def _target(self, maildir: str) -> str:
        under = self._under_root
        if under is not None and maildir.startswith(under):
            return maildir[len(under):]
        return maildir  # outside the mail root (not made by FolderRecipients): as it is

    def _cut(self, segment: _Segment, good: int) -> None:
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
        with self._lock:
            self._active = None
            segment.closed = True
        fd, segment.fd = segment.fd, None
        if fd is not None:
            close_quiet(fd)
        if segment.size == 0:
            with self._lock:
                self._segments.remove(segment)
            try:
                os.unlink(segment.path)
            except OSError:
                pass
        self._wake_retirer()  # something may be retirable now

    def _close_idle(self) -> None:
        segment = self._active
        if segment is not None and segment.size and time.monotonic() - segment.touched >= self._idle_close:
            self._roll()

    def _fail_batch(self, batch: list[_Entry], exc: BaseException) -> None:
        results: list[tuple[asyncio.Future[str], str | BaseException]] = []
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

    def _post(self, results: list[tuple["asyncio.Future[str]", "str | BaseException"]]) -> None:
        if not results:
            return
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(_resolve, results)
        except RuntimeError:  # the loop is closed: nobody waits for these
            pass

    def _account(self, batch: list[_Entry], seconds: float) -> None:
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
        self._gauges()

    def _gauges(self) -> None:
        """The journal's gauges: plain stores of what is held now, so two
        threads (flusher, retirer) may both write them; counters have one writer."""
        row = self._metrics
        if row is not None:
            with self._lock:
                row[counters.JOURNAL_BYTES] = sum(s.size for s in self._segments)
                row[counters.JOURNAL_SEGMENTS] = len(self._segments)
                row[counters.DELIVERY_PENDING] = sum(s.pending for s in self._segments)

    # -- delivery, on the loop -----------------------------------------------

    def _flushed(self, batch: list[_Entry]) -> None:
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

    def _deliver(self, batch: list[_Entry]) -> None:
        """Write each message of a flushed batch into its Maildirs (no flush: the journal has it)."""
        failed: list[tuple[_Entry, OSError]] = []
        lags: list[float] = []
        proc_fd = self._tmp_files.proc_fd
        for entry in batch:
            try:
                entry.write_out(self._tmp_files)
                entry.link(proc_fd)
                entry.close_fd()
            except OSError as exc:
                entry.cleanup()
                failed.append((entry, exc))
            else:
                lags.append(time.monotonic() - entry.flushed)
        delivered = len(batch) - len(failed)
        missed = {id(entry) for entry, _ in failed}
        for entry in batch:
            if id(entry) not in missed:
                for md in entry.maildirs:
                    self._note_file_system(md)
                # After the marks: a checkpoint that sees this count sees them.
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
        if failed or self._closing:
            with self._rcv:
                for entry, error in failed:
                    self._schedule_retry(entry, error)
                # Wake the retirer (and close(), waiting for the last
                # delivery) only for work: a wake-up per batch would cost a
                # context switch per batch.
                self._rcv.notify_all()

    def _note_file_system(self, maildir: str) -> None:
        """On the loop: make sure the file system of a Maildir delivered to is in the checkpoints.

        One open directory fd per file system, kept (a syncfs through it
        flushes its file system even if that folder is removed later).  No
        lock: only the loop adds to ``_file_systems``, and the retirer
        copies it, which is atomic under the GIL.
        """
        dev = self._devices.get(maildir)
        if dev is None:
            try:
                dev = os.stat(maildir).st_dev
            except OSError:
                return  # gone: its delivery failed, and is retried from the journal
            if len(self._devices) >= 65536:
                self._devices.clear()
            self._devices[maildir] = dev
        if dev not in self._file_systems:
            try:
                fd = os.open(maildir, _DIR_FLAGS)
            except OSError:
                return
            if self._file_systems.setdefault(dev, fd) != fd:
                os.close(fd)

    # -- the retirer thread: checkpoints and retries --------------------------

    def _schedule_retry(self, entry: _Entry, exc: BaseException) -> None:
        """Under _rcv: try ``entry`` again later, with backoff."""
        entry.attempts += 1
        delay = min(300.0, 0.5 * 2 ** min(entry.attempts, 10))
        entry.retry_at = time.monotonic() + delay
        log.warning("%s: delivery into new/ failed (attempt %d), retrying in %.0f s: %s",
                    entry.spool.queue_id, entry.attempts, delay, exc)
        self._retries.append(entry)
        self.stats["delivery_failures"] += 1

    def _wake_retirer(self) -> None:
        with self._rcv:
            self._rcv.notify_all()

    def _retire_loop(self) -> None:
        while True:
            with self._rcv:
                while (not self._retirer_stop and not self._retirable() and not self._due_retries()
                       and not self._needs_spare()):
                    self._rcv.wait(self._next_retry())
                stop = self._retirer_stop
                due = [e for e in self._retries if stop or e.retry_at <= time.monotonic()]
                self._retries = [e for e in self._retries if e not in due]
            for entry in due:
                self._redeliver(entry)
            try:
                if self._retirable():
                    self._checkpoint()
                if not stop and self._needs_spare():
                    self._make_spare()
            except Exception:  # a bug: log it, try again in a second
                log.exception("journal: checkpoint failed unexpectedly")
                self._checkpoint_after = time.monotonic() + 1.0
            if stop:
                return

    def _next_retry(self) -> float | None:
        if not self._retries:
            return None
        return max(0.0, min(e.retry_at for e in self._retries) - time.monotonic())

    def _due_retries(self) -> bool:
        now = time.monotonic()
        return any(e.retry_at <= now for e in self._retries)

    def _redeliver(self, entry: _Entry) -> None:
        """Deliver again, from the record in the journal, what failed before."""
        segment = entry.segment
        assert segment is not None
        try:
            found = scan(read_segment(segment.path), segment.seq)
            record = next(r for r in found.records if r.offset == entry.offset)
            outcomes = [deliver_to_maildir(record.content, md, record.stored) for md in entry.maildirs]
            if "missing" in outcomes:
                # The Maildir was removed after the message was accepted for
                # it: keep the message for the operator, not retry forever.
                where = set_aside(self._root, record.stored, record.content)
                log.error("%s: a recipient's Maildir is gone; message set aside in %s", entry.spool.queue_id, where)
        except (OSError, StopIteration) as exc:
            with self._rcv:
                self._schedule_retry(entry, exc if isinstance(exc, OSError) else OSError(errno.EIO, "no record"))
            return
        segment.redelivered += 1  # deliver_to_maildir made it durable itself (only this thread counts these)

    def _recycle(self, path: str) -> None:
        """A retired segment's file: the next spare if none is waiting (and it is full size), else deleted."""
        with self._lock:
            keep = not self._spares and not self._closing
        if keep and os.stat(path).st_size >= self._segment_size:
            assert self._folder is not None
            spare = os.path.join(self._folder.path, f"{next(self._spare_names)}.spare")
            os.rename(path, spare)
            with self._lock:
                self._spares.append(spare)
            return
        os.unlink(path)

    def _make_spare(self) -> None:
        """A file of ``segment_size`` zeros, flushed: the next segment's blocks, allocated and written."""
        assert self._folder is not None
        spare = os.path.join(self._folder.path, f"{next(self._spare_names)}.spare")
        fd = os.open(spare, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            zeros = bytes(1 << 20)
            for offset in range(0, self._segment_size, len(zeros)):
                os.pwrite(fd, zeros[: self._segment_size - offset], offset)
            fdatasync(fd)
        except OSError as exc:
            os.close(fd)
            unlink_quiet(spare)
            log.warning("journal: could not prepare a segment (%s); appending to new ones meanwhile", exc)
            self._checkpoint_after = time.monotonic() + 1.0
            return
        os.close(fd)
        with self._lock:
            self._spares.append(spare)

    def _needs_spare(self) -> bool:
        with self._lock:
            return (self._spare_wanted and not self._spares and not self._closing
                    and time.monotonic() >= self._checkpoint_after)

    def _retirable(self) -> bool:
        if time.monotonic() < self._checkpoint_after:
            return False
        with self._lock:
            return any(s.closed and not s.pending for s in self._segments)

    def _checkpoint(self) -> None:
        """syncfs where files were delivered, then delete the segments all delivered before it."""
        with self._lock:
            done = [s for s in self._segments if s.closed and not s.pending]
        # After ``done``: every file system its messages went to is in here.
        try:
            for fd in list(self._file_systems.values()):
                syncfs(fd)
        except OSError as exc:
            log.error("journal: syncfs failed, segments kept until the next checkpoint: %s", exc)
            self._checkpoint_after = time.monotonic() + 1.0
            return
        for segment in done:
            try:
                self._recycle(segment.path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.error("journal: could not retire %s: %s", segment.path, exc)
                continue
            with self._lock:
                self._segments.remove(segment)
        self.stats["checkpoints"] += 1
        self.stats["retired"] += len(done)
        self._gauges()


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
