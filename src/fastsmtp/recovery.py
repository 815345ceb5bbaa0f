"""Recovery at start: every acknowledged message of a dead worker's journal into new/.

Rules of this module:
- It runs before the port opens (worker.py), over every journal folder
  whose lock no live process holds (journal.py): those of workers that
  died, by SIGKILL, a crash or a power cut.  A replacement worker recovers
  its predecessor's folder before it listens; siblings serve meanwhile.
- It is idempotent.  Each record names its file (``new/<stored>``), so a
  message that is there already, byte for byte, is left alone; one that
  is missing is written; one that is there but differs (a file linked into
  new/ whose data never reached the disk before the power went) is
  replaced.  A file the user already moved to ``cur/`` (``<stored>:2,…``)
  counts as delivered.  A recovery that is itself killed is simply run
  again by the next start: the segments are removed only once everything
  they hold is flushed where it goes.
- Every file it writes is made durable before the segments go: the file
  is written under ``tmp/``, fsynced, renamed into place, and each new/
  touched is fsynced.  Recovery is rare and small (a few segments), so it
  takes the simple, exact path rather than the fast one.
- A record for the LMTP backends (``lmtp:`` targets) cannot be delivered
  before the port opens: the backend may be down, and the MX must serve
  meanwhile.  It is adopted instead (``adopt``): handed to this worker's
  journal, which takes it as a new submission (flushed, then delivered
  and retried like any other), and its old folder stays, locked, until
  those records are flushed (``Recovered.release``).  A crash in between
  adopts them again: at least once, never lost.  Only where the records
  are is kept, not their octets, so a backlog of any size can be adopted.
- Nothing is silently dropped.  A torn tail (a crash in the middle of an
  append, never acknowledged) is dropped and logged.  Damage before the
  last good record, and a message whose Maildir is gone, are set aside as
  files under ``<journal root>/aside/`` for the operator, logged and counted.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from .journal import LMTP, LMTP_FROM, MAILDIR, Record, done_marks, orphans, read_segment, scan, segment_seq, segments
from .spool import FILE_MODE, OPEN_FLAGS, fsync_dir, unlink_quiet, write_all

__all__ = ["Recovered", "recover", "deliver_to_maildir", "set_aside"]

log = logging.getLogger("fastsmtp.recovery")


@dataclass
class Recovered:
    """What one recovery did."""

    folders: int = 0
    segments: int = 0
    records: int = 0
    replayed: int = 0  # files written into new/ (missing, or replaced)
    present: int = 0  # files already there, byte for byte
    set_aside: int = 0  # damaged stretches and undeliverable messages
    torn: int = 0  # octets of torn tails dropped
    failed: list[str] = field(default_factory=list)  # folders kept for the next start
    #: Per folder kept (still locked: its lock fd), where its records for the
    #: LMTP backends are: (segment path, sequence number, offset).  Only
    #: where they are, not their octets: a backlog need not fit in memory.
    adopted: dict[str, tuple[int, list[tuple[str, int, int]]]] = field(default_factory=dict)

    def release(self, folder: str, journaled: bool) -> None:
        """``folder``'s adopted records are in this worker's journal now (``journaled``): it goes.

        Otherwise it is left as it is, unlocked, for the next recovery.
        """
        lock, _ = self.adopted.pop(folder)
        try:
            if journaled:
                _remove_folder(folder)
        except OSError as exc:
            log.error("journal recovery: could not remove %s (adopted; it is recovered again, its messages "
                      "delivered twice): %s", folder, exc)
        finally:
            os.close(lock)

    def line(self) -> str:
        return (f"journal recovery: {self.folders} folder(s), {self.segments} segment(s), {self.records} record(s): "
                f"{self.replayed} replayed, {self.present} already in place, {self.set_aside} set aside, "
                f"{self.torn} torn octet(s) dropped")


def recover(root: str, mail_root: str, mine: str | None = None, adopt: bool = False) -> Recovered:
    """Recover every orphaned journal folder under ``root`` (not ``mine``) into ``mail_root``.

    With ``adopt``, records for the LMTP backends come back in ``adopted``
    (their folders in ``kept``, still locked); without, they are set aside.
    """
    done = Recovered()
    for folder, lock in orphans(root, mine):
        found: list[tuple[str, int, int]] = []
        try:
            _recover_folder(root, mail_root, folder, done, found if adopt else None)
        except OSError as exc:
            # Kept as it is (nothing of it adopted): the next start tries again.
            # Serving meanwhile is right: new mail goes to a new folder.
            log.error("journal recovery of %s failed, kept for the next start: %s", folder, exc)
            done.failed.append(folder)
            found = []
        if found:
            done.adopted[folder] = (lock, found)
        else:
            os.close(lock)
    if done.folders:
        # A warning when it had work: something did not reach the disk in time.
        level = logging.WARNING if done.replayed or done.set_aside or done.torn else logging.INFO
        log.log(level, done.line())
    return done


def _recover_folder(root: str, mail_root: str, folder: str, done: Recovered,
                    adopt: list[tuple[str, int, int]] | None) -> None:
    """Recover one folder: its Maildir records replayed, where its LMTP ones are put in ``adopt``.

    The folder is removed unless it has records to adopt (it then stays
    until they are journaled again, ``Recovered.release``).
    """
    done.folders += 1
    names = segments(folder)
    touched: set[str] = set()
    cur_index: dict[str, dict[str, str]] = {}
    for name in names:
        path = os.path.join(folder, name)
        seq = segment_seq(name)
        found = scan(read_segment(path), seq)
        done.segments += 1
        for damage in found.damaged:
            where = set_aside(root, f"{os.path.basename(folder)}-{name}-{damage.offset}.damaged", damage.data)
            log.error("journal %s: %d damaged octet(s) at offset %d set aside in %s",
                      path, len(damage.data), damage.offset, where)
            done.set_aside += 1
        if found.torn:
            log.warning("journal %s: torn last record (%d octet(s), never acknowledged) dropped", path, found.torn)
            done.torn += found.torn
        delivered = done_marks(path)
        for record in found.records:
            done.records += 1
            lmtp = bool(record.lmtp_envelope()[1])
            if lmtp and record.offset in delivered:
                done.present += 1  # the backends took it before the crash
                continue
            if adopt is not None and lmtp:
                adopt.append((path, seq, record.offset))
            _replay(root, mail_root, record, done, touched, cur_index, adopt is not None)
    for new_dir in touched:
        fsync_dir(new_dir)
    if adopt:
        log.warning("journal %s: %d message(s) for the LMTP backends adopted by this worker", folder, len(adopt))
        return
    _remove_folder(folder)


def _remove_folder(folder: str) -> None:
    for name in segments(folder):
        os.unlink(os.path.join(folder, name))
    for leftover in os.listdir(folder):
        unlink_quiet(os.path.join(folder, leftover))
    os.rmdir(folder)


def _replay(root: str, mail_root: str, record: Record, done: Recovered, touched: set[str],
            cur_index: dict[str, dict[str, str]], adopt: bool = False) -> None:
    lmtp_set_aside = False
    for target in record.targets:
        if target.startswith(LMTP_FROM):
            continue
        if target.startswith(LMTP):
            if not adopt and not lmtp_set_aside:
                # Journaled for LMTP backends that are no longer configured.
                where = set_aside(root, f"{record.stored}.lmtp", record.content)
                log.error("%s: for LMTP, but --deliver has no LMTP backend now; message set aside in %s",
                          record.queue_id, where)
                done.set_aside += 1
                lmtp_set_aside = True
            continue
        if not target.startswith(MAILDIR):
            where = set_aside(root, f"{record.stored}.unknown-target", record.content)
            log.error("%s: unknown target %r, message set aside in %s", record.queue_id, target, where)
            done.set_aside += 1
            continue
        maildir = os.path.join(mail_root, target[len(MAILDIR):])  # relative to the mail root, or absolute
        outcome = deliver_to_maildir(record.content, maildir, record.stored, cur_index)
        if outcome == "missing":
            where = set_aside(root, record.stored, record.content)
            log.error("%s: Maildir %s is gone; message set aside in %s", record.queue_id, maildir, where)
            done.set_aside += 1
        elif outcome == "present":
            done.present += 1
        else:
            done.replayed += 1
            touched.add(os.path.join(maildir, "new" if outcome != "repaired-cur" else "cur"))


def deliver_to_maildir(content: bytes, maildir: str, stored: str,
                       cur_index: dict[str, dict[str, str]] | None = None) -> str:
    """Make ``maildir/new/<stored>`` hold ``content``, durably; say what it took.

    "present" (there already, byte for byte, in new/ or cur/), "written",
    "repaired" / "repaired-cur" (there but different: replaced), or
    "missing" (the Maildir is gone).  The new/ folder is not fsynced here:
    the caller does that once per folder.  ``cur_index`` caches each
    Maildir's cur/ listing across calls.
    """
    new_dir = os.path.join(maildir, "new")
    if not os.path.isdir(new_dir):
        return "missing"
    path = os.path.join(new_dir, stored)
    outcome = "written"
    if _holds(path, content):
        return "present"
    if os.path.lexists(path):
        outcome = "repaired"
    else:
        moved = _in_cur(maildir, stored, {} if cur_index is None else cur_index)
        if moved is not None:
            if _holds(moved, content):
                return "present"
            path, outcome = moved, "repaired-cur"
    tmp = os.path.join(maildir, "tmp", f"{stored}.recovered")
    unlink_quiet(tmp)
    _write_durably(tmp, content)
    os.rename(tmp, path)
    return outcome


def _write_durably(path: str, data: bytes) -> None:
    """A new file ``path`` holding ``data``, flushed (its name is the caller's to flush)."""
    fd = os.open(path, OPEN_FLAGS, FILE_MODE)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _holds(path: str, content: bytes) -> bool:
    try:
        if os.stat(path).st_size != len(content):
            return False
        with open(path, "rb") as f:
            return f.read() == content
    except OSError:
        return False


def _in_cur(maildir: str, stored: str, index: dict[str, dict[str, str]]) -> str | None:
    """The cur/ file of a message read since its delivery (``<stored>:2,<flags>``)."""
    names = index.get(maildir)
    if names is None:
        names = index[maildir] = {}
        try:
            with os.scandir(os.path.join(maildir, "cur")) as entries:
                for entry in entries:
                    names[entry.name.partition(":")[0]] = entry.path
        except OSError:
            pass
    return names.get(stored)


def set_aside(root: str, name: str, data: bytes) -> str:
    """Keep ``data`` for the operator as ``<root>/aside/<name>`` (durably); its path."""
    aside = os.path.join(root, "aside")
    os.makedirs(aside, mode=0o700, exist_ok=True)
    path = os.path.join(aside, name.replace("/", "_"))
    base, n = path, 0
    while os.path.lexists(path):
        n += 1
        path = f"{base}.{n}"
    _write_durably(path, data)
    fsync_dir(aside)
    return path
