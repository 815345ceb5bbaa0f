"""The write-ahead journal: its records, its recovery, and the store built on it.

The format and recovery are tested on real files in a temporary folder;
the store in-process on a real event loop, with real threads and real
fsyncs.  Fault injection (a write that fails) is the only fake.  At the
end, the journal's folder on a real server.  The crash tests (a real
process killed with SIGKILL, then started again) are in
test_durability.py, power cuts in test_powerloss.py, a full disk in
test_diskfull.py.
"""

from __future__ import annotations

import asyncio
import errno
import os
import smtplib
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from fastsmtp import journal
from fastsmtp import metrics as m
from fastsmtp.errors import StorageError
from fastsmtp.journal import MAILDIR, OwnFolder, encode, scan, segments
from fastsmtp.journalstore import JournalStore
from fastsmtp.recovery import recover
from helpers import start_server


def record(queue_id: str, stored: str, targets: list[str], content: bytes, seq: int = 1) -> bytes:
    head, _ = encode(seq, queue_id, stored, targets, [content])
    return b"".join(head) + content


def make_maildir(root: Path, name: str) -> Path:
    md = root / name
    for sub in ("tmp", "new", "cur"):
        (md / sub).mkdir(parents=True, exist_ok=True)
    return md


# -- the format ---------------------------------------------------------------


def test_a_record_reads_back_exactly() -> None:
    content = b"Return-Path: <a@b>\r\n\r\nbody \x00\xff\r\n"
    data = record("Q1", "1.M2P3Q4.host,S=%d" % len(content), ["maildir:/m/a", "maildir:/m/ü"], content)
    found = scan(data, 1)
    assert found.torn == 0 and found.damaged == []
    (rec,) = found.records
    assert (rec.queue_id, rec.targets, rec.content) == ("Q1", ("maildir:/m/a", "maildir:/m/ü"), content)
    assert rec.offset == 0 and rec.length == len(data)


def test_a_record_with_its_content_in_a_file(tmp_path: Path) -> None:
    spilled = tmp_path / "spill"
    spilled.write_bytes(b"x" * 3_000_001)
    fd = os.open(spilled, os.O_RDONLY)
    try:
        head, length = encode(1, "Q", "n,S=3000005", ["maildir:/m"], [b"Hdr\n"], (fd, 3_000_001))
    finally:
        os.close(fd)
    data = b"".join(head) + b"Hdr\n" + spilled.read_bytes()
    assert len(data) == length
    (rec,) = scan(data, 1).records
    assert rec.content == b"Hdr\n" + b"x" * 3_000_001


def test_every_torn_tail_is_dropped_and_the_records_before_it_kept() -> None:
    first = record("A", "a,S=3", ["maildir:/m"], b"one")
    last = record("B", "b,S=5", ["maildir:/m"], b"three")
    for cut in range(1, len(last)):
        found = scan(first + last[:cut], 1)
        assert [r.queue_id for r in found.records] == ["A"], cut
        assert found.torn == cut and found.damaged == []


def test_damage_before_a_good_record_is_reported_never_dropped() -> None:
    recs = [record(q, f"{q},S=4", ["maildir:/m"], b"body") for q in "ABC"]
    for flip in range(len(recs[1])):
        middle = bytearray(recs[1])
        middle[flip] ^= 0x40
        found = scan(recs[0] + bytes(middle) + recs[2], 1)
        assert [r.queue_id for r in found.records] == ["A", "C"], flip
        (damage,) = found.damaged
        assert damage.offset == len(recs[0]) and damage.data == bytes(middle)
        assert found.torn == 0


def test_a_length_that_lies_is_caught_by_the_header_check() -> None:
    good = record("A", "a,S=4", ["maildir:/m"], b"body")
    bad = bytearray(record("B", "b,S=4", ["maildir:/m"], b"body"))
    struct.pack_into("<I", bad, 16, 10**9)  # a huge length, its CRC left as it was
    found = scan(good + bytes(bad) + good, 1)
    assert len(found.records) == 2 and len(found.damaged) == 1


def test_zeros_at_the_end_are_unused_space() -> None:
    # A segment made of zeros ahead of time, written up to its last record.
    found = scan(record("A", "a,S=1", ["maildir:/m"], b"x") + bytes(1 << 20), 1)
    assert len(found.records) == 1 and found.torn == 0 and found.damaged == []


def test_a_reused_segment_ends_where_its_earlier_life_shows() -> None:
    old = b"".join(record(f"O{i}", f"o{i},S=3", ["maildir:/m"], b"old", seq=3) for i in range(50))
    new = record("N1", "n1,S=3", ["maildir:/m"], b"new", seq=7) + record("N2", "n2,S=3", ["maildir:/m"], b"new", seq=7)
    data = new + old[len(new):]  # overwritten from the start
    found = scan(data, 7)
    assert [r.queue_id for r in found.records] == ["N1", "N2"]
    assert found.torn == 0 and found.damaged == []
    # A new record torn in the middle of an old one: a torn tail, up to the
    # first whole old record.
    torn = record("N3", "n3,S=5000", ["maildir:/m"], b"t" * 5000, seq=7)[:100]
    data = new + torn + old[len(new) + 100:]
    found = scan(data, 7)
    assert [r.queue_id for r in found.records] == ["N1", "N2"] and found.damaged == [] and found.torn > 0
    # The old records are never taken for new ones.
    assert scan(old, 7).records == []


# -- recovery -----------------------------------------------------------------


def orphan(root: Path, records: list[bytes]) -> Path:
    """A journal folder as a dead worker leaves it: records in a segment, no lock."""
    folder = OwnFolder(str(root))
    path = Path(folder.path)
    (path / journal.segment_name(1)).write_bytes(b"".join(records))
    folder.release()  # the process "dies": its lock goes
    return path


def test_recovery_delivers_what_is_missing_and_leaves_what_is_there(tmp_path: Path) -> None:
    alice, bob = make_maildir(tmp_path, "alice"), make_maildir(tmp_path, "bob")
    there = b"Subject: there\r\n\r\n1\r\n"
    (alice / "new" / f"1.x,S={len(there)}").write_bytes(there)
    missing = b"Subject: missing\r\n\r\n2\r\n"
    jroot = tmp_path / "journal"
    folder = orphan(jroot, [
        record("Q1", f"1.x,S={len(there)}", [MAILDIR + str(alice)], there),
        record("Q2", f"2.x,S={len(missing)}", [MAILDIR + str(alice), MAILDIR + str(bob)], missing),
    ])
    done = recover(str(jroot), str(tmp_path))
    assert (done.records, done.replayed, done.present, done.set_aside) == (2, 2, 1, 0)
    assert (alice / "new" / f"2.x,S={len(missing)}").read_bytes() == missing
    assert (bob / "new" / f"2.x,S={len(missing)}").read_bytes() == missing
    assert sorted(os.listdir(alice / "new")) == [f"1.x,S={len(there)}", f"2.x,S={len(missing)}"]
    assert not folder.exists()
    assert os.listdir(alice / "tmp") == []


def test_recovery_replaces_a_partial_file_and_respects_cur(tmp_path: Path) -> None:
    box = make_maildir(tmp_path, "box")
    content = b"Subject: s\r\n\r\n" + b"y" * 10000
    partial = box / "new" / f"1.x,S={len(content)}"
    partial.write_bytes(content[:4096])  # linked, data lost in the power cut
    read = b"Subject: r\r\n\r\nread\r\n"
    (box / "cur" / f"2.x,S={len(read)}:2,S").write_bytes(read)  # delivered, then read by IMAP
    jroot = tmp_path / "j"
    orphan(jroot, [record("Q1", partial.name, [MAILDIR + str(box)], content),
                   record("Q2", f"2.x,S={len(read)}", [MAILDIR + str(box)], read)])
    done = recover(str(jroot), str(tmp_path))
    assert partial.read_bytes() == content
    assert (done.replayed, done.present) == (1, 1)
    assert os.listdir(box / "new") == [partial.name]  # nothing read came back to new/


def test_recovery_twice_changes_nothing(tmp_path: Path) -> None:
    box = make_maildir(tmp_path, "box")
    jroot = tmp_path / "j"
    recs = [record(f"Q{i}", f"{i}.x,S=4", [MAILDIR + str(box)], b"%04d" % i) for i in range(20)]
    folder = orphan(jroot, recs)
    saved = (folder / journal.segment_name(1)).read_bytes()
    assert recover(str(jroot), str(tmp_path)).replayed == 20
    # As if the first recovery died after delivering, before removing the segment.
    orphan(jroot, [saved])
    second = recover(str(jroot), str(tmp_path))
    assert (second.replayed, second.present) == (0, 20)
    assert len(os.listdir(box / "new")) == 20


def test_recovery_sets_aside_damage_and_a_gone_maildir(tmp_path: Path) -> None:
    box = make_maildir(tmp_path, "box")
    jroot = tmp_path / "j"
    damaged = bytearray(record("Q2", "2.x,S=4", [MAILDIR + str(box)], b"lost"))
    damaged[-1] ^= 1
    orphan(jroot, [
        record("Q1", "1.x,S=4", [MAILDIR + str(box)], b"good"),
        bytes(damaged),
        record("Q3", "3.x,S=4", [MAILDIR + str(tmp_path / "removed-user")], b"gone"),
        record("Q4", "4.x,S=4", [MAILDIR + str(box)], b"torn")[:-2],
    ])
    done = recover(str(jroot), str(tmp_path))
    assert (done.replayed, done.set_aside) == (1, 2)
    assert done.torn > 0
    aside = sorted(os.listdir(jroot / "aside"))
    assert len(aside) == 2
    assert (jroot / "aside" / "3.x,S=4").read_bytes() == b"gone"
    assert any(name.endswith(".damaged") for name in aside)
    assert os.listdir(box / "new") == ["1.x,S=4"]


def test_recovery_follows_a_mail_root_that_moved(tmp_path: Path) -> None:
    # Records name Maildirs relative to the mail root: a root restored under
    # another mount point, with its journal, still gets every message.
    moved = tmp_path / "restored"
    box = make_maildir(moved, "example.com/alice")
    jroot = moved / ".journal"
    orphan(jroot, [record("Q1", "1.x,S=2", [MAILDIR + "example.com/alice"], b"hi")])
    done = recover(str(jroot), str(moved))
    assert (done.replayed, done.set_aside) == (1, 0)
    assert (box / "new" / "1.x,S=2").read_bytes() == b"hi"


def test_recovery_skips_the_folder_of_a_live_worker(tmp_path: Path) -> None:
    box = make_maildir(tmp_path, "box")
    jroot = tmp_path / "j"
    live = OwnFolder(str(jroot))  # held: its process is alive
    try:
        (Path(live.path) / journal.segment_name(1)).write_bytes(record("Q", "1.x,S=1", [MAILDIR + str(box)], b"x"))
        assert recover(str(jroot), str(tmp_path)).folders == 0
        assert os.listdir(box / "new") == []
    finally:
        live.release()


# -- the store ----------------------------------------------------------------


def run_store(tmp_path: Path, messages: list[tuple[list[Path], list[bytes]]], **kwargs: object
              ) -> tuple[list[str | BaseException], JournalStore]:
    """Submit each (maildirs, chunks) message to a fresh store; the results, after close()."""
    store = JournalStore(hostname="mx.test", journal_dir=str(tmp_path / "journal"), mail_root=str(tmp_path),
                         **kwargs)  # type: ignore[arg-type]

    async def main() -> list[str | BaseException]:
        store.start(asyncio.get_running_loop())
        futures = []
        for maildirs, chunks in messages:
            spool = store.open_spool(str(maildirs[0]))
            for chunk in chunks:
                spool.write(chunk)
            futures.append(store.submit(spool, [str(m) for m in maildirs]))
        results = list(await asyncio.gather(*futures, return_exceptions=True))
        # As the worker does: close off the loop, while the loop runs.
        await asyncio.get_running_loop().run_in_executor(None, store.close)
        return results

    return asyncio.run(main()), store


def test_the_store_delivers_everything_and_leaves_no_journal(tmp_path: Path) -> None:
    a, b = make_maildir(tmp_path, "a"), make_maildir(tmp_path, "b")
    big = [b"z" * 100_000] * 4  # spills past the threshold below
    msgs = [([a], [b"small %d\r\n" % i]) for i in range(50)] + [([a, b], big)]
    results, store = run_store(tmp_path, msgs, spill_threshold=64 * 1024)
    assert all(isinstance(r, str) for r in results)
    assert len(os.listdir(a / "new")) == 51 and len(os.listdir(b / "new")) == 1
    assert (b / "new" / str(results[-1])).read_bytes() == b"".join(big)
    assert os.listdir(tmp_path / "journal") == []  # retired and removed at close
    assert store.stats["delivered"] == 51
    assert sum(n * k for n, k in store.stats["batch_sizes"].items()) == 51


def test_a_segment_is_retired_once_delivered_and_synced(tmp_path: Path) -> None:
    box = make_maildir(tmp_path, "box")
    msgs = [([box], [b"%06d\r\n" % i * 100]) for i in range(200)]
    results, store = run_store(tmp_path, msgs, segment_size=64 * 1024, max_batch=10)
    assert len(os.listdir(box / "new")) == 200
    assert store.stats["retired"] >= 2 and store.stats["checkpoints"] >= 1


def test_retired_segments_are_reused_and_every_message_still_lands(tmp_path: Path) -> None:
    box = make_maildir(tmp_path, "box")
    msgs = [([box], [b"%06d " % i * 200]) for i in range(600)]

    results, store = run_store(tmp_path, msgs, segment_size=32 * 1024, max_batch=8)
    assert all(isinstance(r, str) for r in results)
    names = sorted(os.listdir(box / "new"))
    assert len(names) == 600
    assert store.stats["reused"] >= 1, store.stats
    bodies = {(box / "new" / n).read_bytes() for n in names}
    assert bodies == {b"%06d " % i * 200 for i in range(600)}
    assert os.listdir(tmp_path / "journal") == []


def test_the_gauges_count_what_the_journal_holds(tmp_path: Path) -> None:
    box = make_maildir(tmp_path, "box")
    row = m.Metrics(1).row(0)
    store = JournalStore(hostname="mx.test", journal_dir=str(tmp_path / "journal"), mail_root=str(tmp_path),
                         idle_close=60.0, metrics=row)
    body = b"x" * 5000

    async def main() -> tuple[int, int, int]:
        loop = asyncio.get_running_loop()
        store.start(loop)
        spools = []
        for _ in range(10):
            spool = store.open_spool(str(box))
            spool.write(body)
            spools.append(store.submit(spool, [str(box)]))
        await asyncio.gather(*spools)
        await asyncio.sleep(0)  # their delivery, after the 250s
        held = (row[m.JOURNAL_SEGMENTS], row[m.JOURNAL_BYTES], row[m.DELIVERED])
        await loop.run_in_executor(None, store.close)
        return held

    segments, journal_bytes, delivered = asyncio.run(main())
    assert segments >= 1  # the active segment: not idle for a minute, so not retired
    assert journal_bytes > 10 * len(body)  # every record, with its header
    assert delivered == 10
    assert (row[m.JOURNAL_SEGMENTS], row[m.JOURNAL_BYTES], row[m.DELIVERY_PENDING]) == (0, 0, 0)


def test_a_failed_journal_write_is_451_and_nothing_of_it_stays(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    box = make_maildir(tmp_path, "box")
    real = os.pwritev
    calls = {"n": 0}

    def failing(fd: int, buffers: list[bytes], offset: int, *flags: int) -> int:
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, buffers, offset, *flags)

    monkeypatch.setattr(os, "pwritev", failing)
    results, _ = run_store(tmp_path, [([box], [b"first\r\n"])])
    (failed,) = results
    assert isinstance(failed, StorageError) and "No space" in str(failed)
    assert os.listdir(box / "new") == [] and os.listdir(box / "tmp") == []
    results, _ = run_store(tmp_path, [([box], [b"second\r\n"])])
    assert isinstance(results[0], str) and len(os.listdir(box / "new")) == 1


def test_a_failed_delivery_is_retried_from_the_journal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    box = make_maildir(tmp_path, "box")
    real_link = os.link
    calls = {"n": 0}

    def flaky(*args: object, **kwargs: object) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(errno.EIO, "Input/output error")
        real_link(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "link", flaky)
    results, store = run_store(tmp_path, [([box], [b"retried\r\n"])])
    assert isinstance(results[0], str)  # the 250 came before the delivery
    assert store.stats["delivery_failures"] == 1
    (name,) = os.listdir(box / "new")
    assert (box / "new" / name).read_bytes() == b"retried\r\n"
    assert os.listdir(tmp_path / "journal") == []


def test_checksums_cover_the_content(tmp_path: Path) -> None:
    head, length = encode(1, "Q", "n,S=5", ["maildir:/m"], [b"hello"])
    body = head[1] + b"hello"
    assert struct.unpack_from("<I", head[0], 20)[0] == zlib.crc32(body)
    assert length == len(head[0]) + len(body)
    assert segments(str(tmp_path)) == []


def test_a_folder_being_made_by_a_live_process_is_left_alone(tmp_path: Path) -> None:
    # Between its mkdir and its lock, a sibling's new folder has no lock yet.
    root = tmp_path / "j"
    being_made = root / f".new-{os.getpid()}-99"
    being_made.mkdir(parents=True)
    dead = root / ".new-999999999-0"  # no such PID: a start that crashed
    dead.mkdir()
    recover(str(root), str(tmp_path))
    assert being_made.exists() and not dead.exists()


# -- the journal's folder, on a real server ------------------------------------


def test_journal_dir_puts_the_journal_elsewhere(tmp_path: Path) -> None:
    elsewhere = tmp_path / "fast-disk" / "journal"
    srv = start_server(tmp_path / "mail", "--workers", "0", "--journal-dir", str(elsewhere))
    try:
        with smtplib.SMTP(srv.host, srv.port, timeout=10) as smtp:
            smtp.sendmail("s@example.net", ["alice@example.com"], b"Subject: j\r\n\r\nelsewhere\r\n")
        assert len(srv.messages("alice@example.com")) == 1
        assert [p.name.startswith("w-") for p in elsewhere.iterdir()] == [True]  # this process's folder
        assert not (tmp_path / "mail" / ".journal").exists()
    finally:
        srv.stop()
    assert list(elsewhere.iterdir()) == []  # a clean stop retires everything


def test_a_journal_dir_that_cannot_be_made_is_one_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    (tmp_path / "mail").mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "fastsmtp", "serve", "--listen", "127.0.0.1:0", "--mail-root", str(tmp_path / "mail"),
         "--workers", "0", "--journal-dir", str(blocker / "journal")],
        capture_output=True, text=True, timeout=30,
    )
    assert done.returncode != 0
    assert f"journal folder {blocker / 'journal'} cannot be made" in done.stderr, done.stderr
