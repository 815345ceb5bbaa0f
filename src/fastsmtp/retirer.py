"""The journal's segments, and the thread that retires them.

Rules of this module:
- ``Segments`` holds every unretired segment of one journal folder, the
  spares (files ready to be the next segment) and the file systems
  delivered to.  The flusher adds segments and takes spares; the loop
  notes the file systems of its deliveries; the retirer thread does the
  rest.  The list and the spares are guarded by one lock; the counts on a
  segment are not: each has one writer (``Segment``).
- A segment is retired only once it is closed, every message in it is in
  every recipient's ``new/``, and a ``syncfs(2)`` of each file system
  delivered to has returned after that (the checkpoint).  It becomes the
  spare (a retired file is full size: an overwrite of it needs no new
  blocks, so its flushes write data alone) or is deleted.  syncfs was ruled
  out for the 250 because its latency belongs to everybody's dirty data
  (maildir.py); here nothing waits for it, and it is one call for
  thousands of files.  Its error is the file system's, not a file's: on
  failure nothing is retired and the next checkpoint, a second later, tries
  again (a crash meanwhile is repaired by recovery, which checks every
  file byte for byte).
- Under steady load (the flusher says so) a spare of zeros is written
  ahead of need; a quiet server never writes one.
- A delivery that failed is retried with backoff, from its record in the
  journal (the content is not kept in memory), until it succeeds; a
  message whose Maildir is gone is set aside for the operator.  Its segment
  stays until then.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import itertools
import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any

from . import metrics as counters
from .journal import DONE, OwnFolder, read_segment, scan
from .recovery import deliver_to_maildir, set_aside
from .spool import close_quiet, fdatasync, unlink_quiet

if TYPE_CHECKING:
    from .journalstore import Entry

__all__ = ["Segment", "Segments", "syncfs"]

log = logging.getLogger("fastsmtp.journal")

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


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


class Segment:
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


class Segments:
    """The segments of one journal folder, and the retirer thread that keeps them."""

    def __init__(self, folder: OwnFolder, root: str, segment_size: int, stats: dict[str, Any],
                 metrics: memoryview | None = None) -> None:
        self._folder = folder
        self._root = root  # the journal root: aside/ is there
        self._segment_size = segment_size
        self._stats = stats
        self._metrics = metrics
        self._lock = threading.Lock()
        self._list: list[Segment] = []
        self._spares: list[str] = []
        self._spare_names = itertools.count()
        self._spare_wanted = False  # written by the flusher only
        # The file systems delivered to: device -> an open folder on it (a
        # syncfs through it flushes its file system even if that folder is
        # removed later); and each Maildir's device.  The loop's to add to.
        self._file_systems: dict[int, int] = {}
        self._devices: dict[str, int] = {}
        self._cv = threading.Condition()
        self._retries: list[Entry] = []
        self._stopping = False
        # After a failed checkpoint, none before this (monotonic) time.
        self._checkpoint_after = 0.0
        self._thread = threading.Thread(target=self._run, name="fastsmtp-retire", daemon=False)

    # -- what the flusher, the loop and close() use -----------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Retry what failed once more, retire what can be, and end the thread (blocking)."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread.is_alive():
            self._thread.join()
        for fd in self._file_systems.values():
            close_quiet(fd)
        self._file_systems = {}

    def add(self, segment: Segment) -> None:
        with self._lock:
            self._list.append(segment)

    def discard(self, segment: Segment) -> None:
        """An empty segment, closed: it holds nothing, so it goes at once."""
        with self._lock:
            self._list.remove(segment)
        unlink_quiet(segment.path)

    def unretired(self) -> list[Segment]:
        """What still holds undelivered messages, or is still open."""
        with self._lock:
            return [s for s in self._list if s.pending or not s.closed]

    @property
    def spare_ready(self) -> bool:
        return bool(self._spares)

    def take_spare(self, want_next: bool) -> str | None:
        """(Flusher) a spare to become the next segment, if one is ready; ``want_next``: keep one coming."""
        with self._lock:
            spare = self._spares.pop() if self._spares else None
            self._spare_wanted = want_next
        if want_next:
            self.wake()  # it makes the next one, unless a retired segment becomes it
        return spare

    def want_spare(self) -> None:
        """(Flusher) the load is steady: have a spare ready."""
        if not self._spare_wanted:
            self._spare_wanted = True
            self.wake()

    def wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    def retry(self, failed: list[tuple[Entry, OSError]]) -> None:
        """(Loop) deliveries that failed: try them again later, with backoff."""
        with self._cv:
            for entry, exc in failed:
                self._schedule(entry, exc)
            self._cv.notify_all()

    def note_file_system(self, maildir: str) -> None:
        """(Loop) make sure the file system of a Maildir delivered to is in the checkpoints.

        No lock: only the loop adds to ``_file_systems``, and the retirer
        copies it, which is atomic under the GIL.  Called before the
        delivery is counted, so a checkpoint that sees the count sees it.
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

    def gauges(self) -> None:
        """The journal's gauges: plain stores of what is held now, so two
        threads (flusher, retirer) may both write them; counters have one writer."""
        row = self._metrics
        if row is not None:
            with self._lock:
                row[counters.JOURNAL_BYTES] = sum(s.size for s in self._list)
                row[counters.JOURNAL_SEGMENTS] = len(self._list)
                row[counters.DELIVERY_PENDING] = sum(s.pending for s in self._list)

    # -- the retirer thread -------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not self._retirable() and not self._due() and not self._needs_spare():
                    self._cv.wait(self._next_retry())
                stop = self._stopping
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

    def _schedule(self, entry: Entry, exc: BaseException) -> None:
        """Under _cv: try ``entry`` again later, with backoff."""
        entry.attempts += 1
        delay = min(300.0, 0.5 * 2 ** min(entry.attempts, 10))
        entry.retry_at = time.monotonic() + delay
        log.warning("%s: delivery into new/ failed (attempt %d), retrying in %.0f s: %s",
                    entry.spool.queue_id, entry.attempts, delay, exc)
        self._retries.append(entry)
        self._stats["delivery_failures"] += 1

    def _next_retry(self) -> float | None:
        if not self._retries:
            return None
        return max(0.0, min(e.retry_at for e in self._retries) - time.monotonic())

    def _due(self) -> bool:
        now = time.monotonic()
        return any(e.retry_at <= now for e in self._retries)

    def _redeliver(self, entry: Entry) -> None:
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
            with self._cv:
                self._schedule(entry, exc if isinstance(exc, OSError) else OSError(errno.EIO, "no record"))
            return
        segment.redelivered += 1  # deliver_to_maildir made it durable itself (only this thread counts these)

    def _retirable(self) -> bool:
        if time.monotonic() < self._checkpoint_after:
            return False
        with self._lock:
            return any(s.closed and not s.pending for s in self._list)

    def _checkpoint(self) -> None:
        """syncfs where files were delivered, then retire the segments all delivered before it."""
        with self._lock:
            done = [s for s in self._list if s.closed and not s.pending]
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
                self._list.remove(segment)
        self._stats["checkpoints"] += 1
        self._stats["retired"] += len(done)
        self.gauges()

    def _recycle(self, path: str) -> None:
        """A retired segment's file: the next spare if none is waiting (and it is full size), else deleted.

        Its LMTP marks (journal.py's DONE) go with it.
        """
        unlink_quiet(path + DONE)
        with self._lock:
            keep = not self._spares and not self._stopping
        if keep and os.stat(path).st_size >= self._segment_size:
            spare = os.path.join(self._folder.path, f"{next(self._spare_names)}.spare")
            os.rename(path, spare)
            with self._lock:
                self._spares.append(spare)
            return
        os.unlink(path)

    def _needs_spare(self) -> bool:
        with self._lock:
            return (self._spare_wanted and not self._spares and not self._stopping
                    and time.monotonic() >= self._checkpoint_after)

    def _make_spare(self) -> None:
        """A file of ``segment_size`` zeros, flushed: the next segment's blocks, allocated and written."""
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
