"""A message on its way in, and the names it will be stored under.

Rules of this module:
- A ``Spool`` lives on the event loop thread.  Small messages stay in
  memory; one that would exceed its ``spill_threshold`` goes to
  ``<maildir>/tmp/<name>`` chunk by chunk (page cache only, never a flush),
  so memory stays bounded for any size.
- The spool owns its buffer and its file.  The store (maildir.py) takes
  both over, once, with ``detach()``; nothing else reads them.
- Names follow the Maildir convention, ``SECS.M<usec>P<pid>Q<n>.<host>``,
  and queue ids are unique on a host without coordination.
"""

from __future__ import annotations

import errno
import itertools
import os
import time
from typing import Sequence

__all__ = ["Spool", "encode_host", "new_name", "OPEN_FLAGS", "FILE_MODE", "write_all", "writev_all", "copy_all",
           "unlink_quiet", "close_quiet", "fsync_dir", "fdatasync", "checked_for_submit"]

OPEN_FLAGS = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC
# A spill file is read back too, by the checks that see a message only at
# its end (a milter's body, from the spool rather than a second copy).
_SPILL_FLAGS = OPEN_FLAGS & ~os.O_WRONLY | os.O_RDWR
FILE_MODE = 0o600

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


def new_name(host: str) -> tuple[str, str]:
    """Return (Maildir base name, queue id) for a new message."""
    usecs = time.time_ns() // 1000
    secs, usec = divmod(usecs, 1_000_000)
    pid = _pid
    n = next(_seq)
    return f"{secs}.M{usec}P{pid}Q{n}.{host}", _queue_id(secs, pid, n)


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
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


def writev_all(fd: int, parts: Sequence[bytes | bytearray]) -> None:
    """os.writev until everything is written (one call in the usual case)."""
    total = sum(len(p) for p in parts)
    n = os.writev(fd, parts)
    if n < total:
        write_all(fd, b"".join(parts)[n:])


def copy_all(src: int, dst: int, count: int) -> None:
    """Copy ``count`` octets from the start of ``src`` to ``dst``'s position."""
    offset = 0
    while offset < count:
        k = os.copy_file_range(src, dst, count - offset, offset)
        if k <= 0:
            raise OSError(errno.EIO, "copy made no progress")
        offset += k



def fdatasync(fd: int) -> None:
    """The data flush.  fdatasync is not everywhere (macOS); fsync then."""
    if hasattr(os, "fdatasync"):
        os.fdatasync(fd)
    else:
        os.fsync(fd)


def fsync_dir(path: str) -> None:
    """Make the names in folder ``path`` durable (fsync(2) of the folder itself)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checked_for_submit(spool: object, maildirs: Sequence[str], owner: str) -> "Spool":
    """``spool`` as a store's ``submit()`` may take it, or the error a caller's bug deserves."""
    if not maildirs:
        raise ValueError("submit() needs at least one maildir")
    if not isinstance(spool, Spool):
        raise TypeError(f"not a spool of this {owner}: {spool!r}")
    if spool.submitted:
        raise RuntimeError(f"spool {spool.queue_id} submitted twice")
    return spool


def unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def close_quiet(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


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
            write_all(self._fd, data)
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

    def read(self, offset: int, size: int) -> bytes:
        """Up to ``size`` octets of what was written, from ``offset`` (the prepended headers not included).

        From memory, or from the spill file with pread(2): a message is
        never held twice to be read again.  b"" past the end, and once the
        spool failed or was handed over.
        """
        if self.failed is not None or self._submitted or offset < 0 or size <= 0:
            return b""
        if self._fd is None:
            return bytes(self._buf[offset : offset + size])
        try:
            return os.pread(self._fd, size, offset)
        except OSError as exc:
            self.failed = exc
            self._release()
            return b""

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
        self._fd = os.open(path, _SPILL_FLAGS, FILE_MODE)
        self._path = path
        write_all(self._fd, self._buf)
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
            close_quiet(self._fd)
            self._fd = None
        if self._path is not None:
            unlink_quiet(self._path)
            self._path = None
