"""Maildir delivery before the 250: the store of ``--fsync always`` and ``--fsync off``.

Rules of this module:

- Nothing is acknowledged before it is durable (DESIGN.md, principle 1).
  With "always", a ``submit()`` future resolves only after the message's
  file is fsync'ed, it is linked into every recipient's ``new/`` and each
  such ``new/`` directory is fsync'ed, in that order, one message at a
  time.  Any failure resolves it with ``StorageError`` (451 4.3.0), after
  removing every name the message got, so nothing half-written stays
  visible; it fails that message and no other.  "off" flushes nothing
  (UNSAFE, for benchmarks): its future resolves once the file is linked.
- The event loop never waits for the disk.  Spools append to memory; only a
  message larger than ``spill_threshold`` writes to the page cache on the loop
  thread (never an fsync).  With "always" one committer thread does all the
  rest and hands each result back with one ``call_soon_threadsafe``.  "off"
  waits for nothing: its page-cache writes are made on the loop, once per
  loop iteration for the messages of that iteration, because the hop to a
  thread costs more than they do.
- Delivery follows the Maildir convention (D. J. Bernstein,
  https://cr.yp.to/proto/maildir.html): the file is written and flushed in
  ``tmp/``, then ``link()``-ed into ``new/``, so a reader never sees a partial
  file.  Where the file system has O_TMPFILE (Linux), the file in tmp/ has no
  name at all until that link (open(2)): nothing to unlink, nothing left
  behind by a crash, and no tmp/ entry to create and remove per message,
  which on a busy tmp/ costs more than the write.  Otherwise it is
  ``tmp/<unique>``, created exclusively and unlinked after the link.
  Further recipients get hard links of the same inode.  The stored name
  carries ``,S=<size>``, the size field Dovecot reads so that quota and size
  queries need not stat the file.
- Once submitted, a spool belongs to the writer; the loop thread must not
  touch it again (``discard()`` after ``submit()`` does nothing).

``--fsync batch`` is not served here.  It was, by group commit of per-file
flushes (the files of a batch fdatasync'ed in parallel from a thread pool,
then linked, then each distinct ``new/`` fsync'ed once); the write-ahead
journal (journalstore.py) replaced that: one append and one fdatasync per
batch.  Side by side (bench/bench_journal.py: smtp-source, 20 sessions, one
worker, a fresh ext4), the journal took 3,249 messages/s of 1 KiB against
1,721 for the group-committed files, and 913 against 647 at 100 KiB:
``python bench/bench_journal.py --rounds 3 --fresh-fs --baseline OLD_TREE``.

Each file is flushed on its own, never with syncfs(2) (bench/bench_fsync.py
measured both): syncfs flushes the whole file system, so its latency is set
by everybody's dirty data (one commit took 40 ms against 0.7 ms for a file
and its folder, right after another process left 256 MiB unsynced), it
forces other tenants' writeback, and its error belongs to the file system,
not to a file: it could never be pinned on the message it hit.

Directory durability: a link is durable only once its directory is fsync'ed
(fsync(2): "Calling fsync() does not necessarily ensure that the entry in the
directory containing the file has also reached disk").  Each distinct ``new/``
of a message is fsync'ed once; if that fails, the message fails.  Directory
fds are not cached between commits: a maildir removed and recreated would
leave a cached fd fsyncing the old, unlinked directory.

All maildirs a message goes to must be on one file system (hard links);
``EXDEV`` fails the message like any other storage error.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
import os
import threading
import time
from typing import Any, Callable, Sequence

from . import metrics as counters
from .errors import StorageError
from .spool import (
    FILE_MODE,
    OPEN_FLAGS,
    Spool,
    checked_for_submit,
    close_quiet,
    copy_all,
    encode_host,
    fsync_dir,
    new_name,
    unlink_quiet,
    write_all,
    writev_all,
)
from .store import MessageSpool, Result, settle
from .tmpclean import clean_tmp

__all__ = ["FSYNC_MODES", "Spool", "MaildirWriter", "Delivery", "TmpFiles", "clean_tmp"]

log = logging.getLogger("fastsmtp.maildir")

# The writer's own modes.  The CLI's --fsync has "batch" too (settings.py):
# that one is the journal (journalstore.py), chosen by worker.open_store().
FSYNC_MODES = ("always", "off")

# An unnamed file in tmp/ (Linux 3.11+; ext4, XFS, btrfs, tmpfs), linked
# into new/ once written.
_TMPFILE_FLAGS = getattr(os, "O_TMPFILE", 0) | os.O_WRONLY | os.O_CLOEXEC


class Delivery:
    """A submitted message on its way through the committer."""

    __slots__ = (
        "spool", "maildirs", "future", "stored", "fd", "tmp", "prefix", "content", "links", "error", "posted",
    )

    def __init__(self, spool: Spool, maildirs: list[str], future: asyncio.Future[str]) -> None:
        self.spool = spool
        self.maildirs = maildirs
        self.future = future
        self.stored = f"{spool.name},S={spool.size}"
        # What the spool handed over: a spilled message's open tmp file, or
        # the content in memory; and the header blocks to store above it.
        self.fd, self.tmp, self.prefix, self.content = spool.detach()
        self.links: list[str] = []
        self.error: StorageError | None = None
        self.posted = False

    def write_out(self, tmp_files: "TmpFiles") -> None:
        """Put the content in a file of tmp/ (a spilled message is there already)."""
        spool = self.spool
        if self.fd is not None:  # spilled: complete on disk already
            if self.prefix:
                self._rewrite_with_prefix()
            return
        tmp_dir = os.path.join(spool.maildir, "tmp")
        self.fd = tmp_files.anonymous(tmp_dir)
        if self.fd is None:
            tmp = os.path.join(tmp_dir, spool.name)
            self.fd = os.open(tmp, OPEN_FLAGS, FILE_MODE)
            self.tmp = tmp
        if self.prefix:
            writev_all(self.fd, [*self.prefix, self.content])
        else:
            write_all(self.fd, self.content)
        self.prefix = []
        self.content = bytearray()

    def _rewrite_with_prefix(self) -> None:
        """A spilled message with headers to go above it: a new tmp file
        with the headers, then the old file's octets copied in the kernel."""
        assert self.fd is not None and self.tmp is not None
        old_fd, old_tmp = self.fd, self.tmp
        tmp = old_tmp + ".h"
        self.fd = os.open(tmp, OPEN_FLAGS, FILE_MODE)
        self.tmp = tmp
        try:
            writev_all(self.fd, self.prefix)
            # The spill file was opened write-only: read it through a new fd.
            src = os.open(old_tmp, os.O_RDONLY | os.O_CLOEXEC)
            try:
                copy_all(src, self.fd, os.fstat(src).st_size)
            finally:
                os.close(src)
        finally:
            close_quiet(old_fd)
            unlink_quiet(old_tmp)
        self.prefix = []

    def fsync(self) -> None:
        assert self.fd is not None
        os.fsync(self.fd)

    def close_fd(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)

    def link(self, proc_fd: int | None) -> None:
        """Name the file in every recipient's new/ (the first name, then hard links)."""
        assert self.fd is not None
        first = True
        for md in self.maildirs:
            dst = os.path.join(md, "new", self.stored)
            if self.tmp is not None:
                os.link(self.tmp, dst)
            elif first:
                assert proc_fd is not None  # an unnamed file exists only with it
                # linkat(2) through /proc/self/fd with AT_SYMLINK_FOLLOW
                # gives the unnamed file its first name (open(2), O_TMPFILE).
                os.link(str(self.fd), dst, src_dir_fd=proc_fd, follow_symlinks=True)
            else:
                os.link(self.links[0], dst)
            first = False
            self.links.append(dst)
        if self.tmp is not None:
            os.unlink(self.tmp)
            self.tmp = None

    def cleanup(self) -> None:
        """Remove every name the message got and drop its file and content."""
        for link in self.links:
            unlink_quiet(link)
        self.links = []
        if self.fd is not None:
            close_quiet(self.fd)
            self.fd = None
        if self.tmp is not None:
            unlink_quiet(self.tmp)
            self.tmp = None
        self.prefix = []
        self.content = bytearray()


class TmpFiles:
    """Unnamed tmp/ files (O_TMPFILE) and /proc/self/fd, through which they get a name."""

    __slots__ = ("_wanted", "proc_fd", "_named_dirs")

    def __init__(self, wanted: bool) -> None:
        self._wanted = wanted and bool(getattr(os, "O_TMPFILE", 0))
        self.proc_fd: int | None = None
        # tmp/ folders on file systems without O_TMPFILE.
        self._named_dirs: set[str] = set()

    def open(self) -> None:
        if self._wanted and self.proc_fd is None:
            try:
                self.proc_fd = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError:
                self.proc_fd = None

    def close(self) -> None:
        fd, self.proc_fd = self.proc_fd, None
        if fd is not None:
            close_quiet(fd)

    def anonymous(self, tmp_dir: str) -> int | None:
        """An unnamed file in ``tmp_dir`` (O_TMPFILE), or None where there is none.

        It has no name until it is linked into new/, so a reader can never
        see it half written, a crash leaves nothing to clean, and tmp/ gets
        no entry to create and remove: a tmp/ that has seen millions of
        names come and go makes each new one slow to create (ext4 searches
        its directory blocks), and that cost was most of a small message's
        (bench/RESULTS.md).  A tmp/ whose file system has no O_TMPFILE gets
        named files from then on; other folders keep the unnamed ones.
        """
        if self.proc_fd is None or tmp_dir in self._named_dirs:
            return None
        try:
            return os.open(tmp_dir, _TMPFILE_FLAGS, FILE_MODE)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
            # This folder's file system has none; others may: remember the
            # folder (bounded), and keep /proc/self/fd open for the rest of
            # the batch and for them.
            log.info("%s: no O_TMPFILE (%s); named files in this tmp/ from now on", tmp_dir, exc.strerror)
            if len(self._named_dirs) >= 4096:
                self._named_dirs.clear()
            self._named_dirs.add(tmp_dir)
            return None


class MaildirWriter:
    """Writes messages into Maildirs: the ``Store`` of ``--fsync always`` and ``off``.

    The ``Store`` of store.py: ``open_spool``, ``submit``, ``start``, ``close``.
    """

    def __init__(
        self,
        *,
        hostname: str,
        fsync: str = "always",
        spill_threshold: int = 256 * 1024,
        metrics: memoryview | None = None,
        anonymous_tmp: bool = True,
    ) -> None:
        if fsync == "batch":
            raise ValueError(
                'fsync="batch" is the write-ahead journal, not this writer: use '
                "fastsmtp.journalstore.JournalStore (worker.open_store picks the store of each --fsync)"
            )
        if fsync not in FSYNC_MODES:
            raise ValueError(f"fsync must be one of {FSYNC_MODES}, not {fsync!r}")
        if spill_threshold < 0:
            raise ValueError("spill_threshold must be >= 0")
        self._host = encode_host(hostname)
        self._mode = fsync
        self._spill_threshold = spill_threshold
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._cv = threading.Condition()
        self._queue: collections.deque[Delivery] = collections.deque()
        # "off": nothing waits for the disk, so the page-cache writes are
        # made on the loop, once per loop iteration for what was submitted
        # in it; a hop to the committer thread would cost more CPU than the
        # writes (bench/RESULTS.md: 140 against 67 µs for a lone 1 KiB
        # message).  The thread then only finishes what close() finds.
        self._inline: list[Delivery] = []
        self._tmp_files = TmpFiles(anonymous_tmp)
        self._closing = False
        # This worker's row of the shared counters (metrics.py); this thread
        # is the only writer of the commit slots.
        self._metrics = metrics
        # Written by the committer thread only, except "refused" (loop only).
        self.stats: dict[str, Any] = {
            "batches": 0,  # commits: one per message ("always"), per loop iteration ("off")
            "messages": 0,  # messages committed
            "failed": 0,  # messages the committer answered with StorageError
            "refused": 0,  # failed at submit(): the spool had failed, or closed
            "max_batch": 0,
            "batch_sizes": collections.Counter(),  # messages per commit -> how many commits
        }

    # -- loop side ---------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the committer thread; futures will belong to ``loop``."""
        if self._thread is not None or self._closing:
            raise RuntimeError("MaildirWriter.start() called twice or after close()")
        self._loop = loop
        self._tmp_files.open()  # /proc/self is this process's own: after the fork
        self._thread = threading.Thread(target=self._run, name="fastsmtp-maildir", daemon=False)
        self._thread.start()

    def open_spool(self, maildir: str) -> Spool:
        """A spool for a message whose first recipient's Maildir is ``maildir``."""
        name, queue_id = new_name(self._host)
        return Spool(maildir, name, queue_id, self._spill_threshold)

    def submit(self, spool: MessageSpool, maildirs: Sequence[str], sender: bytes = b"") -> asyncio.Future[str]:
        """Queue the complete message for its commit.

        Returns a future of the start() loop.  It resolves with the stored file
        name ("<name>,S=<size>") once the message is durable in every maildir's
        ``new/`` (per the fsync mode), or fails with ``StorageError``.
        """
        if self._loop is None:
            raise RuntimeError("MaildirWriter.submit() before start()")
        spool = checked_for_submit(spool, maildirs, "writer")
        fut: asyncio.Future[str] = self._loop.create_future()
        if spool.failed is not None:
            spool.discard()
            fut.set_exception(self._error(spool, spool.failed))
            self.stats["refused"] += 1
            return fut
        # A recipient named twice must not make the second link fail with EEXIST.
        job = Delivery(spool, list(dict.fromkeys(maildirs)), fut)
        if self._mode == "off" and not self._closing:
            self._inline.append(job)
            if len(self._inline) == 1:
                self._loop.call_soon(self._commit_inline)
            return fut
        with self._cv:
            if self._closing:
                job.cleanup()  # it never reached the committer
                fut.set_exception(StorageError(f"{spool.queue_id}: the maildir writer is closed"))
                self.stats["refused"] += 1
                return fut
            self._queue.append(job)
            self._cv.notify()
        return fut

    def close(self) -> None:
        """Commit everything queued, then stop and join the thread (blocking)."""
        with self._cv:
            self._closing = True
            # What the loop has not committed inline yet goes to the thread.
            inline, self._inline = self._inline, []
            self._queue.extend(inline)
            self._cv.notify()
        if self._thread is not None:
            self._thread.join()
        # With --fsync off the loop may still be linking through
        # /proc/self/fd while this runs in another thread: close it there.
        if self._mode == "off" and self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._tmp_files.close)
            except RuntimeError:  # the loop is closed: nothing links any more
                self._tmp_files.close()
        else:
            self._tmp_files.close()

    def _commit_inline(self) -> None:
        """On the loop ("off"): commit what was submitted in this iteration."""
        with self._cv:
            jobs, self._inline = self._inline, []
        if not jobs:
            return
        try:
            self._commit(jobs, on_loop=True)
        except Exception as exc:  # a bug: fail these messages, keep serving
            log.exception("maildir writer: unexpected error, failing %d message(s)", len(jobs))
            self._abandon(jobs, exc, on_loop=True)

    # -- committer thread --------------------------------------------------

    def _run(self) -> None:
        """Commit queued messages one at a time, in order, until closed and empty."""
        while True:
            with self._cv:
                while not self._queue and not self._closing:
                    self._cv.wait()
                if not self._queue:
                    return  # closing, and everything queued is committed
                job = self._queue.popleft()
            try:
                self._commit([job])
            except Exception as exc:  # a bug: fail the message, keep the thread alive
                log.exception("maildir committer: unexpected error, failing %s", job.spool.queue_id)
                self._abandon([job], exc)

    def _commit(self, jobs: list[Delivery], on_loop: bool = False) -> None:
        """Write, flush, link, fsync new/, then resolve: DESIGN.md step 6.

        "always" commits one message per call; "off" the messages of one loop
        iteration (or those close() found), and flushes nothing.
        """
        started = time.perf_counter()
        durable = self._mode == "always"
        for job in jobs:
            self._step(job, self._write_out)
            if durable and job.error is None:
                self._step(job, Delivery.fsync)
        for job in jobs:
            if job.error is None:
                self._step(job, self._link)
        for job in jobs:
            if job.error is None:
                self._step(job, Delivery.close_fd)
        if durable:
            self._sync_dirs([j for j in jobs if j.error is None])
        self._account(jobs)
        if self._metrics is not None:
            self._count(jobs, time.perf_counter() - started)
        self._post(jobs, on_loop)

    def _step(self, job: Delivery, fn: Callable[[Delivery], None]) -> None:
        try:
            fn(job)
        except OSError as exc:
            self._fail(job, exc)

    def _write_out(self, job: Delivery) -> None:
        job.write_out(self._tmp_files)

    def _link(self, job: Delivery) -> None:
        job.link(self._tmp_files.proc_fd)

    def _sync_dirs(self, jobs: list[Delivery]) -> None:
        """fsync each distinct new/ once; a failure fails all linked there."""
        by_dir: dict[str, list[Delivery]] = {}
        for job in jobs:
            for link in job.links:
                by_dir.setdefault(os.path.dirname(link), []).append(job)
        for d, linked in by_dir.items():
            try:
                fsync_dir(d)
            except OSError as exc:
                for job in linked:
                    self._fail(job, exc)

    def _fail(self, job: Delivery, exc: BaseException) -> None:
        """Answer 451 for this message and remove every name it got."""
        if job.error is not None:
            return
        job.error = self._error(job.spool, exc)
        if isinstance(exc, OSError):
            log.warning("%s: not stored: %s", job.spool.queue_id, exc)
        job.cleanup()

    @staticmethod
    def _error(spool: Spool, exc: BaseException) -> StorageError:
        err = StorageError(f"{spool.queue_id}: could not store the message: {exc}")
        err.__cause__ = exc
        return err

    def _account(self, jobs: list[Delivery]) -> None:
        ok = sum(1 for j in jobs if j.error is None)
        st = self.stats
        st["batches"] += 1
        st["messages"] += ok
        st["failed"] += len(jobs) - ok
        st["max_batch"] = max(st["max_batch"], len(jobs))
        st["batch_sizes"][len(jobs)] += 1

    def _count(self, jobs: list[Delivery], seconds: float) -> None:
        row = self._metrics
        assert row is not None
        row[counters.COMMIT_BATCHES] += 1
        counters.observe(row, counters.BATCH_SIZE, len(jobs))
        counters.observe(row, counters.COMMIT_SECONDS, seconds)

    def _post(self, jobs: list[Delivery], on_loop: bool = False) -> None:
        """Hand the results to the loop: one call_soon_threadsafe per commit
        (or at once, when this already is the loop's thread)."""
        results: list[Result] = []
        for job in jobs:
            if not job.posted:
                job.posted = True
                results.append((job.future, job.error if job.error is not None else job.stored))
        if not results:
            return
        if on_loop:
            settle(results)
            return
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(settle, results)
        except RuntimeError:  # the loop is closed: nobody waits for these any more
            pass

    def _abandon(self, jobs: list[Delivery], exc: BaseException, on_loop: bool = False) -> None:
        """After an unexpected error: fail and clean up what was not answered."""
        for job in jobs:
            if job.posted:
                continue
            try:
                job.error = job.error or self._error(job.spool, exc)
                job.cleanup()
            except Exception:
                log.exception("maildir committer: cleanup of %s failed", job.spool.queue_id)
        try:
            self._account([j for j in jobs if not j.posted])
            self._post(jobs, on_loop)
        except Exception:
            log.exception("maildir committer: could not report a failed commit")
