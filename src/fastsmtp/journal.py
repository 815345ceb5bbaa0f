"""The write-ahead journal on disk: records, segments, and the folder of one worker.

Rules of this module:
- A journal is a folder of append-only segment files, ``<seq>.seg`` (16 hex
  digits, in the order written).  A record is only ever appended; a segment
  is only ever retired whole, once every message in it is durable where it
  goes (journalstore.py says when).  A retired segment's file may be reused
  for a later one, overwritten from its start: each record carries its
  segment's number, so what is left of the earlier life reads as the end.
- A record is self-describing and checked twice: a 20-octet header with
  its own CRC (so a torn or damaged length is never trusted), then the body
  with its CRC.  The body holds the queue id, the stored name, the targets
  and the exact octets to store, trace headers included, so that recovery
  needs nothing but the record.
- Targets are ``scheme:rest`` strings.  ``maildir:<path>``: the
  message goes to ``<path>/new/<stored name>``, the path being relative to
  the mail root (absolute only for a Maildir outside it), so that a mail
  root restored under another mount point still gets its journal.
  ``lmtp:<recipient>``: the message goes to the LMTP backends of
  ``--deliver`` for that recipient, from the sender of the record's one
  ``lmtp-from:<sender>`` target; the backends are not in the record, so a
  message waiting for them follows a change of ``--deliver``.  The same
  retirement rule holds for both.
- Reading tells three outcomes apart (``scan``): records, a torn tail (a
  crash in the middle of an append: never acknowledged, since a 250 follows
  the flush of its whole batch, so it is dropped), and damage before the
  last good record, which a crash cannot make: it is returned to be set
  aside for the operator, never silently dropped.
- Each worker process owns one folder, ``w-<pid>-<n>``, held by an
  exclusive ``flock`` on the folder for the life of the process.  The
  kernel drops the lock when the process dies, SIGKILL included, so a
  folder whose lock can be taken is an orphan, to be recovered
  (recovery.py).  A folder is made under a dot-name, locked, then renamed,
  so that no other process can take the lock of a new folder first.

CRC-32 (zlib's, which releases the GIL above a few KiB) is a check against
torn and damaged writes, not against an adversary: the journal folder is
the server's own.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import os
import struct
import zlib
from dataclasses import dataclass
from typing import Iterator, Sequence

from .spool import fsync_dir

__all__ = [
    "MAGIC", "HEADER", "Record", "Damage", "Scan", "encode", "scan", "read_segment", "segment_name",
    "segments", "segment_seq", "OwnFolder", "try_lock", "MAILDIR", "LMTP", "LMTP_FROM", "read_record",
    "DONE", "DONE_MARK", "done_marks", "pid_alive",
]

#: Beside a segment, ``<segment>.done``: the offsets (8 octets each, little
#: endian) of its records the LMTP backends took, so that a crash before
#: the segment is retired does not deliver them again.  Written without a
#: flush: a power cut may lose the last of them, and those messages are
#: delivered twice (at least once, never lost); a torn last mark is ignored.
DONE = ".done"
DONE_MARK = struct.Struct("<Q")

MAGIC = b"FSJ1"
KIND_MESSAGE = 1
MAILDIR = "maildir:"
LMTP = "lmtp:"
LMTP_FROM = "lmtp-from:"

# magic, kind, 3 pad, the segment's sequence number, body length, body
# CRC; then the CRC of those 24 octets.
HEADER = struct.Struct("<4sB3xQIII")
_HEAD24 = struct.Struct("<4sB3xQII")
# queue id, stored name, targets: lengths; then each target's length.
_META = struct.Struct("<HHH")
_LEN = struct.Struct("<H")

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_SEG_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC


@dataclass(frozen=True, slots=True)
class Record:
    """One message as the journal holds it."""

    queue_id: str
    stored: str  # the file name in new/, "<name>,S=<size>"
    targets: tuple[str, ...]
    content: bytes  # the exact octets to store
    offset: int  # where its header starts in the segment
    length: int  # header and body

    def lmtp_envelope(self) -> tuple[bytes, list[bytes]]:
        """Its sender and recipients for the LMTP backends (no recipients: it is not for them)."""
        sender = b""
        recipients = []
        for target in self.targets:
            if target.startswith(LMTP_FROM):
                sender = os.fsencode(target[len(LMTP_FROM):])
            elif target.startswith(LMTP):
                recipients.append(os.fsencode(target[len(LMTP):]))
        return sender, recipients


@dataclass(frozen=True, slots=True)
class Damage:
    """Octets of a segment that are no record, followed by good records."""

    offset: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Scan:
    records: list[Record]
    damaged: list[Damage]
    torn: int  # octets dropped at the end (0: the segment ends cleanly)


def encode(seq: int, queue_id: str, stored: str, targets: Sequence[str], parts: Sequence[bytes | bytearray],
           spilled: tuple[int, int] | None = None) -> tuple[list[bytes], int]:
    """The header and meta of a record: (buffers to write first, record length).

    ``seq`` is the sequence number of the segment it goes into.  The
    content follows them as it is, with no copy: ``parts`` (memory),
    then, for a message that spilled to a file, ``spilled`` = (fd open for
    reading, length): its octets are checksummed here in one pass of
    ``pread`` and copied by the caller in the kernel.
    """
    name = stored.encode()
    meta = [_META.pack(len(queue_id), len(name), len(targets)), queue_id.encode(), name]
    for target in targets:
        raw = os.fsencode(target)
        meta.append(_LEN.pack(len(raw)))
        meta.append(raw)
    head = b"".join(meta)
    crc = zlib.crc32(head)
    size = 0
    for part in parts:
        crc = zlib.crc32(part, crc)
        size += len(part)
    if spilled is not None:
        fd, length = spilled
        done = 0
        while done < length:
            chunk = os.pread(fd, min(_CHUNK, length - done), done)
            if not chunk:
                raise OSError(errno.EIO, "spilled message shorter than its size")
            crc = zlib.crc32(chunk, crc)
            done += len(chunk)
        size += length
    body_len = len(head) + size
    start = _HEAD24.pack(MAGIC, KIND_MESSAGE, seq, body_len, crc)
    header = start + struct.pack("<I", zlib.crc32(start))
    return [header, head], HEADER.size + body_len


_CHUNK = 1 << 20


def _parse(data: bytes | memoryview, offset: int) -> tuple[int, Record] | None:
    """(segment sequence number, record) at ``offset`` if both its checks pass, else None."""
    end = offset + HEADER.size
    if end > len(data):
        return None
    magic, kind, seq, body_len, body_crc, head_crc = HEADER.unpack_from(data, offset)
    if magic != MAGIC or zlib.crc32(data[offset:offset + 24]) != head_crc or kind != KIND_MESSAGE:
        return None
    body_end = end + body_len
    if body_end > len(data) or zlib.crc32(data[end:body_end]) != body_crc:
        return None
    try:
        qlen, slen, count = _META.unpack_from(data, end)
        pos = end + _META.size
        queue_id = bytes(data[pos:pos + qlen]).decode()
        pos += qlen
        stored = bytes(data[pos:pos + slen]).decode()
        pos += slen
        targets = []
        for _ in range(count):
            (tlen,) = _LEN.unpack_from(data, pos)
            pos += _LEN.size
            targets.append(os.fsdecode(bytes(data[pos:pos + tlen])))
            pos += tlen
    except (struct.error, UnicodeDecodeError):
        return None  # a body that passed its CRC but is not ours: damage
    if pos > body_end:
        return None
    return seq, Record(queue_id, stored, tuple(targets), bytes(data[pos:body_end]), offset, body_end - offset)


def done_marks(segment_path: str) -> set[int]:
    """The offsets of a segment's records marked delivered (its ``.done`` file; none if it has none)."""
    try:
        with open(segment_path + DONE, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return set()
    whole = len(data) - len(data) % DONE_MARK.size
    return {DONE_MARK.unpack_from(data, i)[0] for i in range(0, whole, DONE_MARK.size)}


def read_record(path: str, seq: int, offset: int) -> Record | None:
    """The record at ``offset`` of one segment, read with two preads (not the whole segment); None if damaged."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        header = os.pread(fd, HEADER.size, offset)
        if len(header) < HEADER.size or zlib.crc32(header[:24]) != HEADER.unpack_from(header)[5]:
            return None  # a length not checked is never trusted (no 4 GiB read)
        body_len = HEADER.unpack_from(header)[3]
        body = os.pread(fd, body_len, offset + HEADER.size)
    finally:
        os.close(fd)
    found = _parse(header + body, 0)
    if found is None or found[0] != seq:
        return None
    record = found[1]
    return Record(record.queue_id, record.stored, record.targets, record.content, offset, record.length)


def scan(data: bytes, seq: int) -> Scan:
    """Every record of segment ``seq``'s octets, the damage between them, the torn tail.

    A segment file is reused once retired (journalstore.py): what follows
    its last record may be records of its earlier life, each carrying the
    old sequence number, or the zeros it was made with.  Either is a clean
    end.  Anything else at the end is a torn record.
    """
    records: list[Record] = []
    damaged: list[Damage] = []
    offset = 0
    while offset < len(data):
        found = _parse(data, offset)
        if found is not None and found[0] == seq:
            records.append(found[1])
            offset += found[1].length
            continue
        # Not a record of ours here: the next place one of ours parses, if
        # any, ends the damage.  Else this is the end: clean if it is an
        # earlier life's record or unused zeros, a torn record otherwise.
        nxt = data.find(MAGIC, offset + 1)
        stale = offset if found is not None else -1
        while nxt != -1:
            later = _parse(data, nxt)
            if later is not None:
                if later[0] == seq:
                    break
                if stale == -1:
                    stale = nxt
            nxt = data.find(MAGIC, nxt + 1)
        if nxt != -1:
            damaged.append(Damage(offset, data[offset:nxt]))
            offset = nxt
            continue
        head = data[offset:min(len(data), offset + 4096)]
        if stale == offset or head.count(0) == len(head):
            return Scan(records, damaged, 0)
        return Scan(records, damaged, (stale if stale != -1 else len(data)) - offset)
    return Scan(records, damaged, 0)


def read_segment(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def segment_name(seq: int) -> str:
    return f"{seq:016x}.seg"


def segments(folder: str) -> list[str]:
    """The segment files of a folder, oldest first."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.endswith(".seg") and len(n) == 20)


def try_lock(path: str) -> int | None:
    """An fd holding the exclusive lock of folder ``path``, or None if a live process holds it."""
    try:
        fd = os.open(path, _DIR_FLAGS)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return None
        raise
    return fd


_folder_seq = itertools.count()


class OwnFolder:
    """This process's journal folder: locked for its life, segments appended in turn."""

    def __init__(self, root: str) -> None:
        os.makedirs(root, mode=0o700, exist_ok=True)
        self.root = root
        # A name no folder has: a dead process with this pid (pids repeat,
        # in a container at every start) may have left w-<pid>-0 behind,
        # kept for adoption, or a .new- one.
        while True:
            tag = f"{os.getpid()}-{next(_folder_seq)}"
            hidden = os.path.join(root, f".new-{tag}")
            if os.path.lexists(os.path.join(root, f"w-{tag}")):
                continue
            try:
                os.mkdir(hidden, 0o700)
            except FileExistsError:
                continue
            break
        lock = try_lock(hidden)
        if lock is None:
            raise OSError(errno.EBUSY, "could not lock a journal folder just made", hidden)
        self._lock: int | None = lock
        self.path = os.path.join(root, f"w-{tag}")
        os.rename(hidden, self.path)
        fsync_dir(root)  # the folder's name is durable before any record in it
        self._seq = 0

    def new_segment(self, spare: str | None = None) -> tuple[int, int, str]:
        """The next segment, its name durable (fsync of the folder): (seq, fd, path).

        ``spare`` is a file of this folder to reuse (a retired segment, or
        one written with zeros): its blocks are allocated and written
        already, so an fdatasync after a write in it flushes the data
        alone, with no change of size or extents to write too (half the
        time of an append here, bench/RESULTS.md).
        """
        self._seq += 1
        path = os.path.join(self.path, segment_name(self._seq))
        if spare is not None:
            os.rename(spare, path)
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        else:
            fd = os.open(path, _SEG_FLAGS, 0o600)
        try:
            fsync_dir(self.path)
        except BaseException:
            os.close(fd)
            raise
        return self._seq, fd, path

    def remove(self) -> None:
        """Everything in it is retired: remove the folder and drop the lock."""
        for name in os.listdir(self.path):
            os.unlink(os.path.join(self.path, name))
        try:
            os.rmdir(self.path)
        except OSError:
            pass  # something unexpected in it: recovery looks at it next time
        self.release()

    def release(self) -> None:
        fd, self._lock = self._lock, None
        if fd is not None:
            os.close(fd)


def segment_seq(name: str) -> int:
    return int(name[:16], 16)


def pid_alive(pid_text: str) -> bool:
    try:
        os.kill(int(pid_text), 0)
    except ValueError:
        return False
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def orphans(root: str, mine: str | None = None) -> Iterator[tuple[str, int]]:
    """(folder, lock fd) for each journal folder of ``root`` no live process holds."""
    try:
        names = sorted(os.listdir(root))
    except FileNotFoundError:
        return
    for name in names:
        if name.startswith(".new-"):
            # Being made by a live process, which locks it next: taking its
            # lock first would fail that process's start.  A dead one's is
            # empty (its records go to w-*): recover (remove) it.
            if pid_alive(name[len(".new-"):].partition("-")[0]):
                continue
        elif not name.startswith("w-"):
            continue
        path = os.path.join(root, name)
        if path == mine or not os.path.isdir(path):
            continue
        fd = try_lock(path)
        if fd is not None:
            yield path, fd
