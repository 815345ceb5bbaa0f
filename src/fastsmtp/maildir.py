"""Durable Maildir delivery with group commit.

Rules of this module:

- Nothing is acknowledged before it is durable (DESIGN.md, principle 1).  A
  ``submit()`` future resolves only after the message's data is flushed, it is
  linked into every recipient's ``new/`` and each such ``new/`` directory is
  fsync'ed.  Any failure resolves it with ``StorageError`` (451 4.3.0), after
  removing every name the message got, so nothing half-written stays visible.
- The event loop never waits for the disk.  Spools append to memory; only a
  message larger than ``spill_threshold`` writes to the page cache on the loop
  thread (never an fsync).  One committer thread does all the rest, and hands
  results back with one ``call_soon_threadsafe`` per batch.  The exception is
  ``--fsync off``, which waits for nothing: its page-cache writes are made on
  the loop, once per loop iteration for the messages of that iteration,
  because the hop to a thread costs more than they do.
- Delivery follows the Maildir convention (D. J. Bernstein,
  https://cr.yp.to/proto/maildir.html): the file is written and flushed in
  ``tmp/``, then ``link()``-ed into ``new/``, so a reader never sees a partial
  file.  Where the file system has O_TMPFILE (Linux), the file in tmp/ has no
  name at all until that link (open(2)): nothing to unlink, nothing left
  behind by a crash, and no tmp/ entry to create and remove per message,
  which on a busy tmp/ costs more than the write.  Otherwise it is
  ``tmp/<unique>``, created exclusively and unlinked after the link.  Further recipients get hard links of the
  same inode.  The stored name carries ``,S=<size>``, the size field Dovecot
  reads so that quota and size queries need not stat the file.
- Once submitted, a spool belongs to the committer thread; the loop thread must
  not touch it again (``discard()`` after ``submit()`` does nothing).

Group commit, as databases do it: the committer takes as one batch whatever was
queued while its previous flush ran (capped by ``max_batch`` and
``max_batch_bytes``) and pays for one round of flushes for all of it.  There is
no timer: an idle server commits a lone message at once, a busy one batches
more because each flush takes longer than the arrivals between flushes.

How the batch is flushed was chosen by measurement (bench/bench_fsync.py;
numbers, command and date in bench/RESULTS.md).  On the reference VM (2
cores, ext4 without journal, virtio disk with a write-back cache), 1 KiB
messages, median of 3 interleaved rounds:

    one fsync(file) + fsync(dir) per message             ~1.8k msg/s
    (a) fsync per file, in turn, batch of 100            ~3.8k msg/s
    (b) fdatasync per file from 8 threads, batch of 100  ~7.4k msg/s
    (c) syncfs(2) before and after linking, batch of 100 ~14k msg/s

"batch" uses (b).  syncfs is about twice as fast, but it flushes the whole
file system, so:
- its latency is set by everybody's dirty data: one commit took 40 ms with
  syncfs against 0.7 ms with (b) right after another process left 256 MiB
  unsynced, and that scales with the neighbour (a cp of gigabytes holds every
  250 we owe for seconds), while the cost of (b) scales with our data only;
- it forces other tenants' writeback on a shared machine;
- its error belongs to the file system, not to a file (and is reported at all
  only since Linux 5.8): one bad block anywhere, even in another program's
  file, would fail whole batches, and an error could never be pinned on the
  message it hit.  (b) fails exactly the affected message.
(b) is portable too (fsync where there is no fdatasync), and the parallel
calls let the block layer merge their cache flushes.  fdatasync is enough for
the file: it writes the data and the metadata needed to read it back (the
size); the link count and times do not matter, the name becomes durable
through the fsync of ``new/``.  A batch of one is flushed inline, without a
hop through the pool.

Directory durability: a link is durable only once its directory is fsync'ed
(fsync(2): "Calling fsync() does not necessarily ensure that the entry in the
directory containing the file has also reached disk").  Each distinct ``new/``
of a batch is fsync'ed once, in parallel too.  If that fails, every message
linked there in this batch fails.  Directory fds are not cached between
batches: a maildir removed and recreated would leave a cached fd fsyncing the
old, unlinked directory.

All maildirs a message goes to must be on one file system (hard links);
``EXDEV`` fails the message like any other storage error.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import errno
import itertools
import logging
import os
import re
import socket
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

from . import metrics as counters
from .errors import StorageError
from .store import MessageSpool

__all__ = ["FSYNC_MODES", "Spool", "MaildirWriter", "clean_tmp"]

log = logging.getLogger("fastsmtp.maildir")

FSYNC_MODES = ("batch", "always", "off")

_OPEN_FLAGS = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC
# An unnamed file in tmp/ (Linux 3.11+; ext4, XFS, btrfs, tmpfs), linked
# into new/ once written.
_TMPFILE_FLAGS = getattr(os, "O_TMPFILE", 0) | os.O_WRONLY | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_FILE_MODE = 0o600

# Threads that issue the parallel flushes of one batch.  They spend their time
# blocked in the kernel, so more threads than cores is fine.  Measured with
# bench/bench_fsync.py --pools 4,8,16,32 (batch of 100, one run): 4 threads
# 5.5k msg/s, 8 threads 6.3k, 16 and 32 no better than 8 within the noise.
_SYNC_THREADS = 8


def _fdatasync(fd: int) -> None:
    """The data flush.  fdatasync is not everywhere (macOS); fsync then."""
    if hasattr(os, "fdatasync"):
        os.fdatasync(fd)
    else:
        os.fsync(fd)


# Q<n> of the Maildir name.  A process-wide counter: next() on
# itertools.count is atomic under the GIL, and a forked worker keeps counting
# but has another PID, so (PID, n) never repeats on a host.
_seq = itertools.count()

# Crockford's base 32: no I, L, O, U, so a queue id read aloud or retyped from
# a log survives.
_B32 = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def encode_host(hostname: str) -> str:
    """The host part of a Maildir name.

    The Maildir convention replaces '/' with \\057 and ':' with \\072: '/'
    cannot appear in a file name and ':' separates the info (flags) suffix.
    """
    return hostname.replace("/", "\\057").replace(":", "\\072")


def _queue_id(secs: int, pid: int, n: int) -> str:
    """16 characters of base 32 = 80 bits: 32 of seconds, 22 of PID, 26 of Q.

    Unique on a host without coordination: the same PID in the same second is
    the same process (PIDs are below 2**22, Linux's PID_MAX_LIMIT, and Linux
    hands them out in turn, so one comes back only after pid_max others), and
    one process cannot take 2**26 numbers in one second.  Ids sort by time,
    like Postfix's long queue ids.
    """
    v = (secs & 0xFFFFFFFF) << 48 | (pid & 0x3FFFFF) << 26 | (n & 0x3FFFFFF)
    # Two digits (10 bits) per table lookup, most significant first.
    pairs = _B32_PAIRS
    return "".join((pairs[v >> 70], pairs[v >> 60 & 1023], pairs[v >> 50 & 1023], pairs[v >> 40 & 1023],
                    pairs[v >> 30 & 1023], pairs[v >> 20 & 1023], pairs[v >> 10 & 1023], pairs[v & 1023]))


_B32_PAIRS = [a + b for a in _B32 for b in _B32]

# This process's PID, read once (os.getpid() is a system call) and again in
# a forked child.
_pid = os.getpid()


def _forked() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


def _new_name(host: str) -> tuple[str, str]:
    """Return (Maildir base name, queue id) for a new message."""
    usecs = time.time_ns() // 1000
    secs, usec = divmod(usecs, 1_000_000)
    pid = _pid
    n = next(_seq)
    return f"{secs}.M{usec}P{pid}Q{n}.{host}", _queue_id(secs, pid, n)


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """os.write until everything is written: a regular file may take less."""
    n = os.write(fd, data)
    if n == len(data):
        return
    view = memoryview(data)
    while n < len(view):
        k = os.write(fd, view[n:])
        if k <= 0:  # never for a regular file; do not spin if it happens
            raise OSError(errno.EIO, "write made no progress")
        n += k


def _writev_all(fd: int, parts: Sequence[bytes | bytearray]) -> None:
    """os.writev until everything is written (one call in the usual case)."""
    total = sum(len(p) for p in parts)
    n = os.writev(fd, parts)
    if n < total:
        _write_all(fd, b"".join(parts)[n:])


def _copy_all(src: int, dst: int, count: int) -> None:
    """Copy ``count`` octets from the start of ``src`` to ``dst``'s position."""
    offset = 0
    while offset < count:
        k = os.copy_file_range(src, dst, count - offset, offset)
        if k <= 0:
            raise OSError(errno.EIO, "copy made no progress")
        offset += k


def _discard_job(job: "_Job") -> None:
    """A job that never reached the committer: drop what its spool handed over."""
    if job.fd is not None:
        _close_quiet(job.fd)
    if job.tmp is not None:
        _unlink_quiet(job.tmp)
    job.fd = job.tmp = None


def _unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _close_quiet(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _fsync_dir(path: str) -> None:
    fd = os.open(path, _DIR_FLAGS)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """One message being received. Lives on the event loop thread.

    Small messages stay in memory and are written by the committer; once a
    message would exceed ``spill_threshold`` it goes to ``<maildir>/tmp/<name>``
    chunk by chunk (page cache only), so memory stays bounded for any size.

    The spool owns its buffer and its file; the committer takes both over
    with ``detach()``, and nothing else reads them.
    """

    __slots__ = (
        "queue_id", "name", "size", "failed", "_maildir", "_threshold", "_buf", "_fd", "_path", "_submitted",
        "_prefix",
    )

    def __init__(self, maildir: str, name: str, queue_id: str, spill_threshold: int) -> None:
        self.queue_id = queue_id
        self.name = name
        #: Octets of the stored message so far, prepended headers included.
        self.size = 0
        self.failed: OSError | None = None
        self._maildir = maildir
        self._threshold = spill_threshold
        self._buf = bytearray()
        self._fd: int | None = None
        self._path: str | None = None
        self._submitted = False
        # Header blocks to store in front of everything written (stages'
        # verdicts, decided after the content has arrived), top one first.
        self._prefix: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append ``data``.  Never raises: an OSError is kept in ``failed``."""
        if self.failed is not None or self._submitted:
            return
        n = len(data)
        try:
            if self._fd is None:
                if len(self._buf) + n <= self._threshold:
                    self._buf += data
                    self.size += n
                    return
                self._spill()
            assert self._fd is not None
            _write_all(self._fd, data)
        except OSError as exc:
            self.failed = exc
            self._release()
            return
        self.size += n

    def prepend(self, headers: bytes) -> None:
        """Store ``headers`` above everything so far (RFC 5321 §4.4: trace
        fields are prepended); a later call goes above an earlier one."""
        if self.failed is None and not self._submitted and headers:
            self._prefix.insert(0, headers)
            self.size += len(headers)

    @property
    def submitted(self) -> bool:
        """Whether the committer owns the message now (``detach()`` was called)."""
        return self._submitted

    @property
    def maildir(self) -> str:
        """The Maildir whose tmp/ the message is written in."""
        return self._maildir

    def detach(self) -> tuple[int | None, str | None, list[bytes], bytearray]:
        """Hand the message over to the committer: (fd, tmp path, prefix, buffer).

        With a spilled message, fd and path are its tmp file (the content is
        there, the buffer is empty); otherwise both are None and the buffer
        holds the content.  The spool forgets all four and owns nothing
        afterwards: ``discard()`` becomes a no-op.
        """
        taken = (self._fd, self._path, self._prefix, self._buf)
        self._fd = self._path = None
        self._prefix = []
        self._buf = bytearray()
        self._submitted = True
        return taken

    def _spill(self) -> None:
        path = os.path.join(self._maildir, "tmp", self.name)
        self._fd = os.open(path, _OPEN_FLAGS, _FILE_MODE)
        self._path = path
        _write_all(self._fd, self._buf)
        self._buf = bytearray()  # a new object: give the memory back

    def discard(self) -> None:
        """Drop the message: close and unlink any tmp file.  Idempotent.

        After ``submit()`` the committer owns the spool and this does nothing:
        a submitted message is committed even if its client has gone (its 250
        is lost and the client may send it again; RFC 1047).
        """
        if not self._submitted:
            self._release()

    def _release(self) -> None:
        self._buf = bytearray()
        self._prefix = []
        if self._fd is not None:
            _close_quiet(self._fd)
            self._fd = None
        if self._path is not None:
            _unlink_quiet(self._path)
            self._path = None


class _Job:
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


_Result = tuple["asyncio.Future[str]", "str | BaseException"]


def _resolve(results: list[_Result]) -> None:
    """On the loop: settle a batch's futures (those still wanted)."""
    for fut, res in results:
        if fut.done():  # cancelled: the session has gone
            continue
        if isinstance(res, BaseException):
            fut.set_exception(res)
        else:
            fut.set_result(res)


class MaildirWriter:
    """Writes messages into Maildirs; one committer thread does the disk work.

    The ``Store`` of store.py: ``open_spool``, ``submit``, ``start``, ``close``.
    """

    def __init__(
        self,
        *,
        hostname: str,
        fsync: str = "batch",
        spill_threshold: int = 256 * 1024,
        max_batch: int = 512,
        max_batch_bytes: int = 64 * 1024 * 1024,
        metrics: memoryview | None = None,
        anonymous_tmp: bool = True,
    ) -> None:
        if fsync not in FSYNC_MODES:
            raise ValueError(f"fsync must be one of {FSYNC_MODES}, not {fsync!r}")
        if max_batch < 1 or max_batch_bytes < 1 or spill_threshold < 0:
            raise ValueError("max_batch, max_batch_bytes must be positive, spill_threshold >= 0")
        self._host = encode_host(hostname)
        self._mode = fsync
        self._spill_threshold = spill_threshold
        self._max_batch = max_batch
        self._max_batch_bytes = max_batch_bytes
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._cv = threading.Condition()
        self._queue: collections.deque[_Job] = collections.deque()
        # "off": nothing waits for the disk, so the page-cache writes are
        # made on the loop, once per loop iteration for what was submitted
        # in it; a hop to the committer thread would cost more CPU than the
        # writes (bench/RESULTS.md: 140 against 67 µs for a lone 1 KiB
        # message).  The thread then only finishes what close() finds.
        self._inline: list[_Job] = []
        # /proc/self/fd, through which an unnamed tmp/ file gets its name.
        self._anonymous = anonymous_tmp
        self._proc_fd: int | None = None
        self._closing = False
        # This worker's row of the shared counters (metrics.py); this thread
        # is the only writer of the commit slots.
        self._metrics = metrics
        # Written by the committer thread only, except "refused" (loop only).
        self.stats: dict[str, Any] = {
            "batches": 0,  # flushes (in "always" mode, one per message)
            "messages": 0,  # messages committed
            "failed": 0,  # messages the committer answered with StorageError
            "refused": 0,  # failed at submit(): the spool had failed, or closed
            "max_batch": 0,
            "batch_sizes": collections.Counter(),  # batch size -> how many batches
        }

    # -- loop side ---------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the committer thread; futures will belong to ``loop``."""
        if self._thread is not None or self._closing:
            raise RuntimeError("MaildirWriter.start() called twice or after close()")
        self._loop = loop
        if _TMPFILE_FLAGS & getattr(os, "O_TMPFILE", 0) and self._anonymous:
            try:
                # /proc/self is this process's own: opened after the fork.
                self._proc_fd = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError:
                self._proc_fd = None
        if self._mode == "batch":
            self._pool = ThreadPoolExecutor(max_workers=_SYNC_THREADS, thread_name_prefix="fastsmtp-fsync")
        self._thread = threading.Thread(target=self._run, name="fastsmtp-maildir", daemon=False)
        self._thread.start()

    def open_spool(self, maildir: str) -> Spool:
        """A spool for a message whose first recipient's Maildir is ``maildir``."""
        name, queue_id = _new_name(self._host)
        return Spool(maildir, name, queue_id, self._spill_threshold)

    def submit(self, spool: MessageSpool, maildirs: Sequence[str]) -> asyncio.Future[str]:
        """Queue the complete message for the next commit.

        Returns a future of the start() loop.  It resolves with the stored file
        name ("<name>,S=<size>") once the message is durable in every maildir's
        ``new/`` (per the fsync mode), or fails with ``StorageError``.
        """
        if self._loop is None:
            raise RuntimeError("MaildirWriter.submit() before start()")
        if not maildirs:
            raise ValueError("submit() needs at least one maildir")
        if not isinstance(spool, Spool):
            raise TypeError(f"not a spool of this writer: {spool!r}")
        if spool.submitted:
            raise RuntimeError(f"spool {spool.queue_id} submitted twice")
        fut: asyncio.Future[str] = self._loop.create_future()
        if spool.failed is not None:
            spool.discard()
            fut.set_exception(self._error(spool, spool.failed))
            self.stats["refused"] += 1
            return fut
        # A recipient named twice must not make the second link fail with EEXIST.
        job = _Job(spool, list(dict.fromkeys(maildirs)), fut)
        if self._mode == "off" and not self._closing:
            self._inline.append(job)
            if len(self._inline) == 1:
                self._loop.call_soon(self._commit_inline)
            return fut
        with self._cv:
            if self._closing:
                _discard_job(job)
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
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        self._close_proc()

    def _close_proc(self) -> None:
        fd, self._proc_fd = self._proc_fd, None
        if fd is not None:
            _close_quiet(fd)

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
        while True:
            with self._cv:
                while not self._queue and not self._closing:
                    self._cv.wait()
                if not self._queue:
                    return  # closing, and everything queued is committed
                batch = self._take()
            try:
                if self._mode == "always":
                    for job in batch:
                        self._commit([job])
                else:
                    self._commit(batch)
            except Exception as exc:  # a bug: fail the batch, keep the thread alive
                log.exception("maildir committer: unexpected error, failing %d message(s)", len(batch))
                self._abandon(batch, exc)

    def _take(self) -> list[_Job]:
        """Everything queued, up to max_batch messages and max_batch_bytes."""
        batch = [self._queue.popleft()]
        nbytes = batch[0].spool.size
        while self._queue and len(batch) < self._max_batch:
            size = self._queue[0].spool.size
            if nbytes + size > self._max_batch_bytes:
                break
            batch.append(self._queue.popleft())
            nbytes += size
        return batch

    def _commit(self, jobs: list[_Job], on_loop: bool = False) -> None:
        """Write, flush, link, fsync new/, then resolve: DESIGN.md step 6."""
        started = time.perf_counter()
        durable = self._mode != "off"
        for job in jobs:
            self._step(job, self._write_out)
        live = [j for j in jobs if j.error is None]
        if durable:
            self._flush_files(live)
        for job in live:
            if job.error is None:
                self._step(job, self._link)
        for job in live:
            if job.error is None:
                self._step(job, self._close_fd)
        if durable:
            self._sync_dirs([j for j in live if j.error is None])
        self._account(jobs)
        if self._metrics is not None:
            self._count(jobs, time.perf_counter() - started)
        self._post(jobs, on_loop)

    def _step(self, job: _Job, fn: Callable[[_Job], None]) -> None:
        try:
            fn(job)
        except OSError as exc:
            self._fail(job, exc)

    def _write_out(self, job: _Job) -> None:
        spool = job.spool
        if job.fd is not None:  # spilled: complete on disk already
            if job.prefix:
                self._rewrite_with_prefix(job)
            return
        tmp_dir = os.path.join(spool.maildir, "tmp")
        job.fd = self._anonymous_file(tmp_dir)
        if job.fd is None:
            tmp = os.path.join(tmp_dir, spool.name)
            job.fd = os.open(tmp, _OPEN_FLAGS, _FILE_MODE)
            job.tmp = tmp
        if job.prefix:
            _writev_all(job.fd, [*job.prefix, job.content])
        else:
            _write_all(job.fd, job.content)
        job.prefix = []
        job.content = bytearray()

    def _rewrite_with_prefix(self, job: _Job) -> None:
        """A spilled message with headers to go above it: a new tmp file
        with the headers, then the old file's octets copied in the kernel."""
        assert job.fd is not None and job.tmp is not None
        old_fd, old_tmp = job.fd, job.tmp
        tmp = old_tmp + ".h"
        job.fd = os.open(tmp, _OPEN_FLAGS, _FILE_MODE)
        job.tmp = tmp
        try:
            _writev_all(job.fd, job.prefix)
            # The spill file was opened write-only: read it through a new fd.
            src = os.open(old_tmp, os.O_RDONLY | os.O_CLOEXEC)
            try:
                _copy_all(src, job.fd, os.fstat(src).st_size)
            finally:
                os.close(src)
        finally:
            _close_quiet(old_fd)
            _unlink_quiet(old_tmp)
        job.prefix = []

    def _fsync_file(self, job: _Job) -> None:
        assert job.fd is not None
        os.fsync(job.fd)

    def _close_fd(self, job: _Job) -> None:
        fd, job.fd = job.fd, None
        if fd is not None:
            os.close(fd)

    def _anonymous_file(self, tmp_dir: str) -> int | None:
        """An unnamed file in ``tmp_dir`` (O_TMPFILE), or None where there is none.

        It has no name until it is linked into new/, so a reader can never
        see it half written, a crash leaves nothing to clean, and tmp/ gets
        no entry to create and remove: a tmp/ that has seen millions of
        names come and go makes each new one slow to create (ext4 searches
        its directory blocks), and that cost was most of a small message's
        (bench/RESULTS.md).  A file system without O_TMPFILE falls back to
        named files, once and for good.
        """
        if self._proc_fd is None:
            return None
        try:
            return os.open(tmp_dir, _TMPFILE_FLAGS, _FILE_MODE)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
            log.info("%s: no O_TMPFILE (%s); named files in tmp/ from now on", tmp_dir, exc.strerror)
            self._close_proc()
            return None

    def _link(self, job: _Job) -> None:
        assert job.fd is not None
        first = True
        for md in job.maildirs:
            dst = os.path.join(md, "new", job.stored)
            if job.tmp is not None:
                os.link(job.tmp, dst)
            elif first:
                # linkat(2) through /proc/self/fd with AT_SYMLINK_FOLLOW
                # gives the unnamed file its first name (open(2), O_TMPFILE).
                os.link(str(job.fd), dst, src_dir_fd=self._proc_fd, follow_symlinks=True)
            else:
                os.link(job.links[0], dst)
            first = False
            job.links.append(dst)
        if job.tmp is not None:
            os.unlink(job.tmp)
            job.tmp = None

    def _flush_files(self, jobs: list[_Job]) -> None:
        if self._mode == "always":
            for job in jobs:
                self._step(job, self._fsync_file)
            return
        errors = self._parallel(_fdatasync, [j.fd for j in jobs])
        for job, exc in zip(jobs, errors):
            if exc is not None:
                self._fail(job, exc)

    def _sync_dirs(self, jobs: list[_Job]) -> None:
        """fsync each distinct new/ once; a failure fails all linked there."""
        by_dir: dict[str, list[_Job]] = {}
        for job in jobs:
            for link in job.links:
                by_dir.setdefault(os.path.dirname(link), []).append(job)
        dirs = list(by_dir)
        if self._mode == "always":
            errors = [self._try(_fsync_dir, d) for d in dirs]
        else:
            errors = self._parallel(_fsync_dir, dirs)
        for d, exc in zip(dirs, errors):
            if exc is not None:
                for job in by_dir[d]:
                    if job.error is None:
                        self._fail(job, exc)

    @staticmethod
    def _try(fn: Callable[[Any], None], arg: Any) -> OSError | None:
        try:
            fn(arg)
        except OSError as exc:
            return exc
        return None

    def _parallel(self, fn: Callable[[Any], None], args: list[Any]) -> list[OSError | None]:
        """Call fn on every arg, the first here and the rest in the pool."""
        if not args:
            return []
        assert self._pool is not None
        futs = [self._pool.submit(self._try, fn, a) for a in args[1:]]
        try:
            first = self._try(fn, args[0])
        finally:
            # Even if something unexpected is raised, no call may still be
            # running on an fd that the cleanup is about to close.
            concurrent.futures.wait(futs)
        return [first] + [f.result() for f in futs]

    def _fail(self, job: _Job, exc: BaseException) -> None:
        """Answer 451 for this message and remove every name it got."""
        if job.error is not None:
            return
        job.error = self._error(job.spool, exc)
        if isinstance(exc, OSError):
            log.warning("%s: not stored: %s", job.spool.queue_id, exc)
        self._cleanup(job)

    def _cleanup(self, job: _Job) -> None:
        for link in job.links:
            _unlink_quiet(link)
        job.links = []
        if job.fd is not None:
            _close_quiet(job.fd)
            job.fd = None
        if job.tmp is not None:
            _unlink_quiet(job.tmp)
            job.tmp = None
        job.prefix = []
        job.content = bytearray()

    @staticmethod
    def _error(spool: Spool, exc: BaseException) -> StorageError:
        err = StorageError(f"{spool.queue_id}: could not store the message: {exc}")
        err.__cause__ = exc
        return err

    def _account(self, jobs: list[_Job]) -> None:
        ok = sum(1 for j in jobs if j.error is None)
        st = self.stats
        st["batches"] += 1
        st["messages"] += ok
        st["failed"] += len(jobs) - ok
        st["max_batch"] = max(st["max_batch"], len(jobs))
        st["batch_sizes"][len(jobs)] += 1

    def _count(self, jobs: list[_Job], seconds: float) -> None:
        row = self._metrics
        assert row is not None
        row[counters.COMMIT_BATCHES] += 1
        counters.observe(row, counters.BATCH_SIZE, len(jobs))
        counters.observe(row, counters.COMMIT_SECONDS, seconds)

    def _post(self, jobs: list[_Job], on_loop: bool = False) -> None:
        """Hand the results to the loop: one call_soon_threadsafe per batch
        (or at once, when this already is the loop's thread)."""
        results: list[_Result] = []
        for job in jobs:
            if not job.posted:
                job.posted = True
                results.append((job.future, job.error if job.error is not None else job.stored))
        if not results:
            return
        if on_loop:
            _resolve(results)
            return
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(_resolve, results)
        except RuntimeError:  # the loop is closed: nobody waits for these any more
            pass

    def _abandon(self, jobs: list[_Job], exc: BaseException, on_loop: bool = False) -> None:
        """After an unexpected error: fail and clean up what was not answered."""
        for job in jobs:
            if job.posted:
                continue
            try:
                job.error = job.error or self._error(job.spool, exc)
                self._cleanup(job)
            except Exception:
                log.exception("maildir committer: cleanup of %s failed", job.spool.queue_id)
        try:
            self._account([j for j in jobs if not j.posted])
            self._post(jobs, on_loop)
        except Exception:
            log.exception("maildir committer: could not report a failed batch")


# -- start-up cleaning -----------------------------------------------------

_NAME_RE = re.compile(r"\d+\.M\d+P(\d+)(?:Q\d+)?\.(.+)")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _subdirs(dir_fd: int) -> list[str]:
    with os.scandir(dir_fd) as it:
        return [e.name for e in it if e.is_dir(follow_symlinks=False)]


def _open_dir(name: str, dir_fd: int | None = None) -> int:
    # O_NOFOLLOW: a symlink swapped in after scandir() still cannot lead out.
    return os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=dir_fd)


def clean_tmp(mail_root: str, max_age: float = 36 * 3600, *, hostname: str | None = None) -> int:
    """Remove stale files from every ``MAIL_ROOT/<domain>/<user>/tmp/``.

    Two kinds go, per the Maildir convention: files not touched for
    ``max_age`` seconds (36 hours, as DJB's spec advises: a delivery never
    takes that long), and files whose name says this host wrote them
    ("...P<pid>Q<n>.<host>") from a process that is not alive now, which
    nobody will ever finish.  ``hostname`` is the one the writer uses
    (default: the system's).  Symbolic links are never followed, so nothing
    outside ``mail_root`` is touched.  Returns the number of files removed.

    The PID test assumes every writer sharing ``mail_root`` under this host
    name runs in this PID namespace: give containers their own host names.
    """
    host = encode_host(hostname if hostname is not None else socket.gethostname())
    now = time.time()
    removed = 0
    root_fd = os.open(mail_root, _DIR_FLAGS)
    try:
        for domain in _subdirs(root_fd):
            try:
                dom_fd = _open_dir(domain, root_fd)
            except OSError:
                continue
            try:
                for user in _subdirs(dom_fd):
                    try:
                        user_fd = _open_dir(user, dom_fd)
                    except OSError:
                        continue
                    try:
                        tmp_fd = _open_dir("tmp", user_fd)
                    except OSError:
                        continue
                    finally:
                        os.close(user_fd)
                    try:
                        removed += _clean_one_tmp(tmp_fd, now - max_age, host)
                    finally:
                        os.close(tmp_fd)
            finally:
                os.close(dom_fd)
    finally:
        os.close(root_fd)
    return removed


def _clean_one_tmp(tmp_fd: int, cutoff: float, host: str) -> int:
    removed = 0
    with os.scandir(tmp_fd) as it:
        entries = list(it)
    for entry in entries:
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        # DJB: remove what "hasn't been accessed in the past 36 hours".  atime
        # is lazy under relatime, so the later of atime and mtime counts.
        stale = max(st.st_atime, st.st_mtime) < cutoff
        if not stale:
            m = _NAME_RE.fullmatch(entry.name)
            stale = m is not None and m.group(2) == host and not _pid_alive(int(m.group(1)))
        if stale:
            try:
                os.unlink(entry.name, dir_fd=tmp_fd)
                removed += 1
            except OSError:
                pass
    return removed
