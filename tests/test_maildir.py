"""MaildirWriter ("always" and "off"): durable delivery, system-call order, faults.

Every test runs a real event loop (asyncio.run) and real maildirs under
tmp_path.  Faults are injected by wrapping functions of the ``os`` module,
which maildir.py looks up at call time.  To have several messages waiting
together deterministically, a test holds the writer's condition (an RLock,
so ``submit`` may still take it) while it submits: with "always" the
committer cannot take anything until all of them are queued, and must still
commit them one at a time.  With "off", whatever is submitted in one loop
iteration is committed together on the loop, so submitting without an
``await`` in between makes one such commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import pytest

from fastsmtp.errors import StorageError
from fastsmtp.maildir import FSYNC_MODES, MaildirWriter, Spool, clean_tmp

HOST = "mx.example.net"
MSG = b"Return-Path: <a@b.example>\r\nSubject: hi\r\n\r\nbody line\r\n"


def make_maildir(root: Path, user: str = "alice", domain: str = "example.org") -> str:
    md = root / domain / user
    for sub in ("tmp", "new", "cur"):
        (md / sub).mkdir(parents=True)
    return str(md)


def ls(md: str, sub: str) -> list[str]:
    return sorted(os.listdir(os.path.join(md, sub)))


def fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def run(coro_fn: Callable[..., Any], *, loop: str = "asyncio", **writer_kw: Any) -> Any:
    """Run coro_fn(writer) on a fresh loop with a started writer; close it after."""

    # The tests below follow files by their tmp/ names: named files, unless a
    # test asks for the unnamed (O_TMPFILE) ones the server uses by default
    # (their own tests are at the end of this module).
    writer_kw.setdefault("anonymous_tmp", False)

    async def main() -> Any:
        writer = MaildirWriter(hostname=HOST, **writer_kw)
        writer.start(asyncio.get_running_loop())
        try:
            return await coro_fn(writer)
        finally:
            writer.close()
            await asyncio.sleep(0)  # let the last results land

    if loop == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main())
    return asyncio.run(main())


def submit(writer: MaildirWriter, maildirs: Sequence[str], data: bytes = MSG) -> tuple[Spool, "asyncio.Future[str]"]:
    spool = writer.open_spool(maildirs[0])
    spool.write(data)
    return spool, writer.submit(spool, maildirs)


@contextlib.contextmanager
def queued_together(writer: MaildirWriter) -> Iterator[None]:
    """Everything submitted inside waits in the queue until the block ends."""
    with writer._cv:
        yield


async def settle(futs: Sequence["asyncio.Future[str]"]) -> list[Any]:
    return await asyncio.gather(*futs, return_exceptions=True)


# -- delivery --------------------------------------------------------------


LOOPS = ["asyncio", "uvloop"]


@pytest.mark.parametrize("loop", LOOPS)
def test_message_lands_in_new_byte_exact(tmp_path: Path, loop: str) -> None:
    md = make_maildir(tmp_path)

    async def go(w: MaildirWriter) -> tuple[Spool, str]:
        spool, fut = submit(w, [md])
        return spool, await fut

    spool, stored = run(go, loop=loop)
    assert stored == f"{spool.name},S={len(MSG)}"
    assert ls(md, "new") == [stored]
    assert ls(md, "tmp") == [] and ls(md, "cur") == []
    path = os.path.join(md, "new", stored)
    assert Path(path).read_bytes() == MSG
    assert os.stat(path).st_mode & 0o777 == 0o600


def test_several_recipients_share_one_inode(tmp_path: Path) -> None:
    mds = [make_maildir(tmp_path, u) for u in ("alice", "bob", "carol")]

    async def go(w: MaildirWriter) -> str:
        return await submit(w, mds)[1]

    stored = run(go)
    stats = [os.stat(os.path.join(md, "new", stored)) for md in mds]
    assert len({st.st_ino for st in stats}) == 1
    assert all(st.st_nlink == 3 for st in stats)
    assert all(ls(md, "tmp") == [] for md in mds)


def test_recipient_named_twice_is_stored_once(tmp_path: Path) -> None:
    md = make_maildir(tmp_path)

    async def go(w: MaildirWriter) -> str:
        return await submit(w, [md, md])[1]

    stored = run(go)
    assert ls(md, "new") == [stored]
    assert os.stat(os.path.join(md, "new", stored)).st_nlink == 1


@pytest.mark.parametrize("mode", FSYNC_MODES)
@pytest.mark.parametrize("loop", LOOPS)
def test_100_concurrent_submits_all_land(tmp_path: Path, loop: str, mode: str) -> None:
    mds = [make_maildir(tmp_path, f"u{i}") for i in range(10)]

    async def go(w: MaildirWriter) -> tuple[list[str], dict]:
        async def one(i: int) -> str:
            return await submit(w, [mds[i % 10]], MSG + str(i).encode())[1]

        return await asyncio.gather(*(one(i) for i in range(100))), w.stats

    names, stats = run(go, loop=loop, fsync=mode)
    assert len(set(names)) == 100
    assert sum(len(ls(md, "new")) for md in mds) == 100
    assert stats["messages"] == 100 and stats["failed"] == 0
    assert sum(n * c for n, c in stats["batch_sizes"].items()) == 100
    assert sum(stats["batch_sizes"].values()) == stats["batches"]
    if mode == "always":  # one commit, with its flushes, per message
        assert stats["batch_sizes"] == {1: 100}
    else:  # the tasks that submit in one loop iteration share its commit
        assert stats["max_batch"] > 1 and stats["batches"] < 100


@pytest.mark.parametrize("mode", FSYNC_MODES)
def test_cancelled_future_still_commits(tmp_path: Path, mode: str) -> None:
    md = make_maildir(tmp_path)

    async def go(w: MaildirWriter) -> None:
        with queued_together(w):
            _, lost = submit(w, [md])
            lost.cancel()  # the client went away; the message still commits
            _, fut = submit(w, [md])
        await fut

    run(go, fsync=mode)
    assert len(ls(md, "new")) == 2


@pytest.mark.parametrize("mode", FSYNC_MODES)
def test_close_commits_what_is_queued(tmp_path: Path, mode: str) -> None:
    md = make_maildir(tmp_path)

    async def go(w: MaildirWriter) -> tuple[list[Any], Any]:
        with queued_together(w):
            futs = [submit(w, [md], MSG + bytes([65 + i]))[1] for i in range(20)]
        w.close()  # blocking: everything queued is committed before it returns
        assert len(ls(md, "new")) == 20
        late = submit(w, [md])[1]
        return await settle(futs), await settle([late])

    results, (late,) = run(go, fsync=mode)
    assert all(isinstance(r, str) for r in results)
    assert isinstance(late, StorageError)
    assert len(ls(md, "new")) == 20 and ls(md, "tmp") == []


@pytest.mark.parametrize("mode", FSYNC_MODES)
def test_every_fsync_mode_delivers(tmp_path: Path, mode: str) -> None:
    mds = [make_maildir(tmp_path, u) for u in ("alice", "bob")]

    async def go(w: MaildirWriter) -> tuple[list[str], dict]:
        return await asyncio.gather(*(submit(w, mds, MSG + bytes([65 + i]))[1] for i in range(10))), w.stats

    names, stats = run(go, fsync=mode)
    for md in mds:
        assert ls(md, "new") == sorted(names) and ls(md, "tmp") == []
    if mode == "always":  # no batching: one commit per message
        assert set(stats["batch_sizes"]) == {1} and stats["batches"] == 10


def test_fsync_off_never_syncs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    md = make_maildir(tmp_path)

    def forbidden(fd: int) -> None:
        raise AssertionError("fsync in mode off")

    monkeypatch.setattr(os, "fsync", forbidden)
    monkeypatch.setattr(os, "fdatasync", forbidden)

    async def go(w: MaildirWriter) -> str:
        return await submit(w, [md])[1]

    stored = run(go, fsync="off")
    assert ls(md, "new") == [stored] and ls(md, "tmp") == []


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        MaildirWriter(hostname=HOST, fsync="sometimes")
    with pytest.raises(ValueError):
        MaildirWriter(hostname=HOST, spill_threshold=-1)
    w = MaildirWriter(hostname=HOST)
    with pytest.raises(RuntimeError):
        w.submit(w.open_spool("/nonexistent"), ["/nonexistent"])
    w.close()  # never started: nothing to join


def test_batch_is_the_journal_not_this_writer() -> None:
    assert FSYNC_MODES == ("always", "off")
    with pytest.raises(ValueError, match="JournalStore"):
        MaildirWriter(hostname=HOST, fsync="batch")


# -- system-call order -----------------------------------------------------


class Recorder:
    """Wrap os.open/write/fdatasync/fsync/link and log (call, path) in order."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.events: list[tuple[str, str]] = []
        self.paths: dict[int, str] = {}
        real = {n: getattr(os, n) for n in ("open", "write", "fdatasync", "fsync", "link")}

        def open_(path: Any, flags: int, mode: int = 0o777, *, dir_fd: Any = None) -> int:
            fd = real["open"](path, flags, mode, dir_fd=dir_fd)
            self.paths[fd] = os.fspath(path)
            return fd

        def write(fd: int, data: Any) -> int:
            self.events.append(("write", self.paths.get(fd, "?")))
            return real["write"](fd, data)

        def sync(name: str) -> Callable[[int], None]:
            def f(fd: int) -> None:
                real[name](fd)
                self.events.append((name + " returned", self.paths.get(fd, "?")))

            return f

        def link(src: Any, dst: Any, **kw: Any) -> None:
            real["link"](src, dst, **kw)
            self.events.append(("link", os.fspath(dst)))

        monkeypatch.setattr(os, "open", open_)
        monkeypatch.setattr(os, "write", write)
        monkeypatch.setattr(os, "fdatasync", sync("fdatasync"))
        monkeypatch.setattr(os, "fsync", sync("fsync"))
        monkeypatch.setattr(os, "link", link)

    def index(self, call: str, path: str) -> int:
        return self.events.index((call, path))


@pytest.mark.parametrize("writer_kw", [{}, {"fsync": "always"}], ids=["default", "always"])
def test_always_mode_commits_each_message_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writer_kw: dict[str, str]
) -> None:
    # Queued together, committed one by one in order: write, fsync(file),
    # link, fsync(new/), resolve; the next message only after that fsync.
    mds = [make_maildir(tmp_path, u) for u in ("alice", "bob")]
    rec = Recorder(monkeypatch)

    async def go(w: MaildirWriter) -> list[tuple[Spool, str]]:
        with queued_together(w):
            pairs = [submit(w, [mds[i % 2]], MSG + bytes([65 + i])) for i in range(4)]
        for _, fut in pairs:
            fut.add_done_callback(lambda f: rec.events.append(("resolved", f.result())))
        return [(s, await f) for s, f in pairs]

    done = run(go, **writer_kw)
    # The committer thread goes on while the loop resolves: resolutions are
    # checked apart from the system calls.
    calls = [c for c in rec.events if c[0] != "resolved"]
    expected = []
    for (spool, stored), md in zip(done, [mds[0], mds[1], mds[0], mds[1]]):
        tmp, new = os.path.join(md, "tmp", spool.name), os.path.join(md, "new")
        expected += [("write", tmp), ("fsync returned", tmp), ("link", os.path.join(new, stored)), ("fsync returned", new)]
        link = rec.index("link", os.path.join(new, stored))
        dirsync = rec.events.index(("fsync returned", new), link)  # this message's own fsync of new/
        assert dirsync < rec.index("resolved", stored)
    assert calls == expected
    assert not any(call.startswith("fdatasync") for call, _ in rec.events)


# -- large messages --------------------------------------------------------


def test_spilled_message_keeps_memory_bounded(tmp_path: Path) -> None:
    md = make_maildir(tmp_path)
    chunk_size, total = 64 * 1024, 20 * 1000 * 1000
    threshold = 256 * 1024

    async def go(w: MaildirWriter) -> tuple[str, str]:
        spool = w.open_spool(md)
        digest = hashlib.sha256()
        block = os.urandom(chunk_size)
        written = 0
        while written < total:
            piece = block[: min(chunk_size, total - written)]
            piece = bytes([written % 251]) + piece[1:]  # no two chunks alike
            spool.write(piece)
            digest.update(piece)
            written += len(piece)
            assert len(spool._buf) <= threshold
            if written > threshold:
                assert ls(md, "tmp") == [spool.name]  # spilled to tmp/, page cache only
        assert spool.size == total and spool.failed is None
        return await w.submit(spool, [md]), digest.hexdigest()

    stored, digest = run(go, spill_threshold=threshold)
    assert stored.endswith(f",S={total}")
    data = Path(md, "new", stored).read_bytes()
    assert len(data) == total and hashlib.sha256(data).hexdigest() == digest
    assert ls(md, "tmp") == []


def test_spill_starts_only_past_the_threshold(tmp_path: Path) -> None:
    md = make_maildir(tmp_path)
    w = MaildirWriter(hostname=HOST, spill_threshold=10)
    spool = w.open_spool(md)
    spool.write(b"0123456789")
    assert ls(md, "tmp") == [] and len(spool._buf) == 10
    spool.write(b"X")
    assert ls(md, "tmp") == [spool.name] and len(spool._buf) == 0
    assert Path(md, "tmp", spool.name).read_bytes() == b"0123456789X"
    spool.discard()
    spool.discard()  # idempotent
    assert ls(md, "tmp") == []


def test_short_writes_are_completed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    md = make_maildir(tmp_path)
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data[:7])))
    body = bytes(range(256)) * 40

    async def go(w: MaildirWriter) -> tuple[str, str]:
        small = await submit(w, [md], body)[1]
        big = await submit(w, [md], body * 3)[1]
        return small, big

    small, big = run(go, spill_threshold=len(body) * 2)
    assert Path(md, "new", small).read_bytes() == body
    assert Path(md, "new", big).read_bytes() == body * 3


# -- faults ----------------------------------------------------------------
#
# Each fault hits one message (the victim) submitted between two others.
# With "always" the three wait in the queue together and are committed one
# by one; with "off" they are submitted in one loop iteration and committed
# together on the loop.  Either way the victim fails alone.

each_mode = pytest.mark.parametrize("mode", FSYNC_MODES)


def fault_trio(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    patch: Callable[[str, list[str]], None],
    *,
    victim_to: Sequence[int] = (1,),
    data_to_victim: bytes = b"VICTIM " + MSG,
    before_submit: Callable[[Spool, list[str]], None] | None = None,
    **writer_kw: Any,
) -> tuple[list[Any], list[str], list[Spool]]:
    """Submit A (to maildir 0), the victim (to victim_to) and C (to maildir 0)
    together with ``patch(victim_name, maildirs)`` applied; then undo the patch
    and check the writer still delivers.  Returns (results, maildirs, spools)."""
    mds = [make_maildir(tmp_path, u) for u in ("alice", "bob", "carol")]

    async def go(w: MaildirWriter) -> tuple[list[Any], list[Spool]]:
        victim = w.open_spool(mds[victim_to[0]])
        victim.write(data_to_victim)
        patch(victim.name, mds)
        if before_submit is not None:
            before_submit(victim, mds)
        with queued_together(w):
            a, fa = submit(w, [mds[0]])
            fv = w.submit(victim, [mds[i] for i in victim_to])
            c, fc = submit(w, [mds[0]])
        results = await settle([fa, fv, fc])
        # "off" committed the three together, "always" one at a time.
        assert w.stats["max_batch"] == (3 if writer_kw.get("fsync") == "off" else 1)
        monkeypatch.undo()
        assert isinstance(await submit(w, [mds[0]])[1], str)  # still working
        assert w._thread is not None and w._thread.is_alive()
        return results, [a, victim, c]

    results, spools = run(go, **writer_kw)
    return results, mds, spools


def assert_only_victim_failed(results: list[Any], mds: list[str], spools: list[Spool], err: int | None) -> None:
    a, v, c = results
    assert isinstance(a, str) and isinstance(c, str)
    assert isinstance(v, StorageError)
    if err is not None:
        assert cause_errno(v) == err
    for md in mds:
        if os.path.isdir(md):
            assert not any(n.startswith(spools[1].name) for n in ls(md, "new")), "failed message visible"
            assert ls(md, "tmp") == [], "tmp leftovers"
    assert set(ls(mds[0], "new")) >= {a, c}


def cause_errno(exc: Any) -> int | None:
    """The errno of the OSError behind a StorageError."""
    assert isinstance(exc, StorageError), exc
    assert isinstance(exc.__cause__, OSError), exc.__cause__
    return exc.__cause__.errno


def failing(real: Callable[..., Any], when: Callable[..., bool], err: int) -> Callable[..., Any]:
    def f(*args: Any, **kw: Any) -> Any:
        if when(*args, **kw):
            raise OSError(err, os.strerror(err))
        return real(*args, **kw)

    return f


@each_mode
def test_enospc_on_write_fails_only_that_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    def patch(victim: str, mds: list[str]) -> None:
        monkeypatch.setattr(os, "write", failing(os.write, lambda fd, data: b"VICTIM" in bytes(data), errno.ENOSPC))

    assert_only_victim_failed(*fault_trio(tmp_path, monkeypatch, patch, fsync=mode), err=errno.ENOSPC)


@each_mode
def test_eacces_on_open_fails_only_that_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    def patch(victim: str, mds: list[str]) -> None:
        monkeypatch.setattr(os, "open", failing(os.open, lambda p, *a, **k: str(p).endswith(victim), errno.EACCES))

    assert_only_victim_failed(*fault_trio(tmp_path, monkeypatch, patch, fsync=mode), err=errno.EACCES)


def test_eio_on_file_fsync_in_always_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def patch(victim: str, mds: list[str]) -> None:
        monkeypatch.setattr(os, "fsync", failing(os.fsync, lambda fd: victim in fd_path(fd), errno.EIO))

    assert_only_victim_failed(*fault_trio(tmp_path, monkeypatch, patch, fsync="always"), err=errno.EIO)


@each_mode
def test_failed_link_to_second_recipient_removes_the_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    def patch(victim: str, mds: list[str]) -> None:
        target = os.path.join(mds[2], "new")
        monkeypatch.setattr(os, "link", failing(os.link, lambda s, d, **k: str(d).startswith(target), errno.EACCES))

    results, mds, spools = fault_trio(tmp_path, monkeypatch, patch, victim_to=(1, 2), fsync=mode)
    assert_only_victim_failed(results, mds, spools, err=errno.EACCES)
    assert ls(mds[1], "new") == []


@each_mode
def test_deleted_maildir_fails_only_that_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    def gone(victim: Spool, mds: list[str]) -> None:
        shutil.rmtree(mds[1])  # the user was removed between RCPT and the commit

    results, mds, spools = fault_trio(tmp_path, monkeypatch, lambda v, m: None, before_submit=gone, fsync=mode)
    assert_only_victim_failed(results, mds, spools, err=errno.ENOENT)


@each_mode
def test_missing_second_maildir_fails_the_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    def gone(victim: Spool, mds: list[str]) -> None:
        shutil.rmtree(mds[2])

    results, mds, spools = fault_trio(
        tmp_path, monkeypatch, lambda v, m: None, victim_to=(1, 2), before_submit=gone, fsync=mode
    )
    assert_only_victim_failed(results, mds, spools, err=errno.ENOENT)
    assert ls(mds[1], "new") == []


@each_mode
def test_existing_tmp_name_is_not_ours_to_remove(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    def squat(victim: Spool, mds: list[str]) -> None:
        Path(mds[1], "tmp", victim.name).write_bytes(b"someone else's")

    results, mds, spools = fault_trio(tmp_path, monkeypatch, lambda v, m: None, before_submit=squat, fsync=mode)
    assert cause_errno(results[1]) == errno.EEXIST
    assert Path(mds[1], "tmp", spools[1].name).read_bytes() == b"someone else's"
    assert ls(mds[1], "new") == [] and isinstance(results[0], str) and isinstance(results[2], str)


@each_mode
def test_existing_new_name_is_not_ours_to_remove(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    def squat(victim: Spool, mds: list[str]) -> None:
        Path(mds[1], "new", f"{victim.name},S={victim.size}").write_bytes(b"someone else's")

    results, mds, spools = fault_trio(tmp_path, monkeypatch, lambda v, m: None, before_submit=squat, fsync=mode)
    assert cause_errno(results[1]) == errno.EEXIST
    assert ls(mds[1], "new") == [f"{spools[1].name},S={spools[1].size}"]
    assert Path(mds[1], "new", ls(mds[1], "new")[0]).read_bytes() == b"someone else's"
    assert ls(mds[1], "tmp") == []


def test_dir_fsync_failure_fails_the_message_linked_there(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # "always", each message on its own: bob's new/ cannot be flushed, so
    # every message linked there fails, and one that went to alice too
    # loses its link there as well.
    mds = [make_maildir(tmp_path, u) for u in ("alice", "bob")]
    bad = os.path.join(mds[1], "new")

    async def go(w: MaildirWriter) -> list[Any]:
        monkeypatch.setattr(os, "fsync", failing(os.fsync, lambda fd: fd_path(fd) == bad, errno.EIO))
        with queued_together(w):
            futs = [
                submit(w, [mds[0]])[1],  # only alice: fine
                submit(w, [mds[1]])[1],  # only bob: fails
                submit(w, [mds[0], mds[1]])[1],  # both: fails, alice's link removed too
            ]
        results = await settle(futs)
        monkeypatch.undo()
        assert isinstance(await submit(w, [mds[1]])[1], str)
        return results

    ok, bob, both = run(go)
    assert isinstance(ok, str)
    assert isinstance(bob, StorageError) and isinstance(both, StorageError)
    assert ls(mds[0], "new") == [ok]
    assert len(ls(mds[1], "new")) == 1  # the message after the fault
    assert ls(mds[0], "tmp") == [] and ls(mds[1], "tmp") == []


@each_mode
def test_unexpected_exception_fails_its_commit_and_the_writer_lives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    def patch(victim: str, mds: list[str]) -> None:
        def boom(src: Any, dst: Any, **kw: Any) -> None:
            if victim in str(src):
                raise RuntimeError("bug")
            real(src, dst, **kw)

        real = os.link
        monkeypatch.setattr(os, "link", boom)

    results, mds, spools = fault_trio(tmp_path, monkeypatch, patch, fsync=mode)
    for md in mds:
        assert ls(md, "tmp") == []
    assert isinstance(results[1].__cause__, RuntimeError)
    if mode == "always":  # the victim's commit is its own
        assert_only_victim_failed(results, mds, spools, err=None)
        assert len(ls(mds[0], "new")) == 3  # A, C and the message after the fault
    else:  # "off": the whole commit of that loop iteration fails, none of it stays
        assert all(isinstance(r, StorageError) for r in results)
        assert len(ls(mds[0], "new")) == 1  # only the later message
    assert ls(mds[1], "new") == []


def test_spool_write_failure_fails_the_submit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    md = make_maildir(tmp_path)

    async def go(w: MaildirWriter) -> list[Any]:
        # The spill file cannot be created.
        monkeypatch.setattr(os, "open", failing(os.open, lambda *a, **k: True, errno.ENOSPC))
        s1 = w.open_spool(md)
        s1.write(b"x" * 100)
        assert s1.failed is not None and s1.failed.errno == errno.ENOSPC
        s1.write(b"more")  # ignored
        monkeypatch.undo()
        # The spill file breaks half-way.
        s2 = w.open_spool(md)
        s2.write(b"y" * 100)
        assert ls(md, "tmp") == [s2.name]
        monkeypatch.setattr(os, "write", failing(os.write, lambda *a: True, errno.EIO))
        s2.write(b"z")
        monkeypatch.undo()
        assert s2.failed is not None and ls(md, "tmp") == []
        return await settle([w.submit(s1, [md]), w.submit(s2, [md])])

    results = run(go, spill_threshold=10)
    assert all(isinstance(r, StorageError) for r in results)
    assert ls(md, "new") == [] and ls(md, "tmp") == []


# -- names -----------------------------------------------------------------


def test_names_and_queue_ids_are_unique_and_well_formed(tmp_path: Path) -> None:
    w = MaildirWriter(hostname="mx/1:25.example")
    spools = [w.open_spool(str(tmp_path)) for _ in range(10_000)]
    assert len({s.name for s in spools}) == 10_000
    assert len({s.queue_id for s in spools}) == 10_000
    name_re = re.compile(rf"(\d+)\.M(\d{{1,6}})P{os.getpid()}Q\d+\.mx\\0571\\07225\.example")
    for s in spools[:100] + spools[-100:]:
        m = name_re.fullmatch(s.name)
        assert m is not None, s.name
        assert abs(int(m.group(1)) - time.time()) < 60
        assert re.fullmatch(r"[0-9A-HJKMNP-TV-Z]{16}", s.queue_id), s.queue_id
    # Queue ids sort by time (the seconds are their leading bits).
    assert spools[0].queue_id[:6] <= spools[-1].queue_id[:6]


def test_queue_ids_differ_across_processes(tmp_path: Path) -> None:
    code = (
        "from fastsmtp.maildir import MaildirWriter\n"
        "w = MaildirWriter(hostname='h')\n"
        "print(' '.join(w.open_spool('/x').queue_id for _ in range(100)))\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    outs = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.split() for _ in range(3)]
    ids = [i for out in outs for i in out]
    assert len(ids) == 300 and len(set(ids)) == 300


# -- clean_tmp -------------------------------------------------------------


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_clean_tmp_removes_old_files_and_orphans_only(tmp_path: Path) -> None:
    root = tmp_path / "mail"
    md = make_maildir(root, "alice", "example.org")
    md2 = make_maildir(root, "bob", "example.com")
    old = time.time() - 40 * 3600
    gone = dead_pid()
    me = os.getpid()
    tmp, tmp2 = Path(md, "tmp"), Path(md2, "tmp")

    def touch(path: Path, when: float | None = None) -> Path:
        path.write_bytes(b"x")
        if when is not None:
            os.utime(path, (when, when))
        return path

    removed = [
        touch(tmp / "1.M1P1Q1.elsewhere", old),  # anyone's, 40 hours old
        touch(tmp / f"{int(time.time())}.M5P{gone}Q3.{HOST}"),  # ours, writer is dead
        touch(tmp2 / f"{int(time.time())}.M5P{gone}.{HOST}"),  # Q is optional
    ]
    kept = [
        touch(tmp / f"{int(time.time())}.M5P{me}Q4.{HOST}"),  # ours, writer alive
        touch(tmp / f"{int(time.time())}.M5P{gone}Q5.other.host"),  # another host's
        touch(tmp / "not-a-maildir-name"),  # fresh, unknown
        touch(Path(md, "new", "1.M1P1Q1.elsewhere,S=1"), old),  # new/ is never touched
    ]
    # A symlinked domain leading out of the root is not followed.
    outside = tmp_path / "outside"
    make_maildir(outside, "eve", "evil.example")
    victim = touch(outside / "evil.example" / "eve" / "tmp" / "1.M1P1Q1.x", old)
    os.symlink(outside / "evil.example", root / "evil.example")
    os.symlink(outside / "evil.example" / "eve", root / "example.org" / "eve")

    assert clean_tmp(str(root), hostname=HOST) == len(removed)
    assert not any(p.exists() for p in removed)
    assert all(p.exists() for p in kept) and victim.exists()
    assert clean_tmp(str(root), hostname=HOST) == 0


def test_clean_tmp_max_age(tmp_path: Path) -> None:
    md = make_maildir(tmp_path)
    p = Path(md, "tmp", "x")
    p.write_bytes(b"x")
    t = time.time() - 100
    os.utime(p, (t, t))
    assert clean_tmp(str(tmp_path), max_age=1000) == 0
    assert clean_tmp(str(tmp_path), max_age=10) == 1


def test_writer_thread_is_not_a_daemon(tmp_path: Path) -> None:
    async def go(w: MaildirWriter) -> threading.Thread:
        assert w._thread is not None
        return w._thread

    thread = run(go)
    assert not thread.daemon and not thread.is_alive()


# -- headers a stage prepends (store.py's MessageSpool.prepend) ----------------


@pytest.mark.parametrize("threshold", [1 << 20, 10], ids=["in-memory", "spilled"])
def test_prepended_headers_go_above_the_content(tmp_path: Path, threshold: int) -> None:
    md = make_maildir(tmp_path)
    first, second = b"X-First: 1\r\n", b"X-Second: 2\r\n"

    async def go(w: MaildirWriter) -> tuple[Spool, str]:
        spool = w.open_spool(md)
        spool.write(MSG[:7])
        spool.write(MSG[7:])
        spool.prepend(first)
        spool.prepend(second)  # a later stage goes above an earlier one
        return spool, await w.submit(spool, [md])

    spool, stored = run(go, spill_threshold=threshold)
    expected = second + first + MSG
    assert stored == f"{spool.name},S={len(expected)}"
    assert Path(md, "new", stored).read_bytes() == expected
    assert ls(md, "tmp") == []


def test_a_submitted_spool_owns_nothing(tmp_path: Path) -> None:
    md = make_maildir(tmp_path)

    async def go(w: MaildirWriter) -> str:
        spool = w.open_spool(md)
        spool.write(MSG * 3)  # spilled (threshold 10): an open tmp file
        fut = w.submit(spool, [md])
        assert spool.submitted
        assert spool.detach() == (None, None, [], bytearray())  # handed over once, to the writer
        spool.discard()  # a no-op now: the writer commits it
        spool.write(b"ignored")
        return await fut

    stored = run(go, spill_threshold=10)
    assert Path(md, "new", stored).read_bytes() == MSG * 3


def test_queue_ids_are_crockford_base32_of_time_pid_and_counter() -> None:
    from fastsmtp.spool import _B32, _queue_id

    def plain(secs: int, pid: int, n: int) -> str:  # the definition, five bits at a time
        v = (secs & 0xFFFFFFFF) << 48 | (pid & 0x3FFFFF) << 26 | (n & 0x3FFFFFF)
        return "".join(_B32[(v >> (5 * i)) & 31] for i in reversed(range(16)))

    for secs, pid, n in [(0, 0, 0), (2**32 - 1, 2**22 - 1, 2**26 - 1), (1_764_633_600, 4321, 77), (1, 2, 3)]:
        assert _queue_id(secs, pid, n) == plain(secs, pid, n)
    assert _queue_id(1_764_633_600, 1, 1) < _queue_id(1_764_633_601, 0, 0)  # ids sort by time


def test_fsync_off_commits_on_the_loop_once_per_iteration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    md = make_maildir(tmp_path)
    linked_on: set[int] = set()
    real_link = os.link

    def link(src: Any, dst: Any, **kw: Any) -> None:
        linked_on.add(threading.get_ident())
        real_link(src, dst, **kw)

    monkeypatch.setattr(os, "link", link)

    async def go(w: MaildirWriter) -> tuple[list[str], dict[str, Any]]:
        futs = [submit(w, [md], MSG + bytes([65 + i]))[1] for i in range(5)]
        return list(await asyncio.gather(*futs)), w.stats

    loop_thread = threading.get_ident()
    stored, stats = run(go, fsync="off")
    assert linked_on == {loop_thread}  # no hop to the committer thread
    assert stats["batches"] == 1 and stats["messages"] == 5  # the five of one iteration together
    assert sorted(ls(md, "new")) == sorted(stored)


def test_fsync_off_close_commits_what_the_loop_has_not(tmp_path: Path) -> None:
    md = make_maildir(tmp_path)

    async def go(w: MaildirWriter) -> str:
        _, fut = submit(w, [md])
        w.close()  # on the loop, before its next turn: the thread commits it
        assert len(ls(md, "new")) == 1  # already, not at the loop's next turn
        return await fut

    stored = run(go, fsync="off")
    assert ls(md, "new") == [stored]


# -- unnamed tmp/ files (O_TMPFILE), the default -------------------------------

needs_tmpfile = pytest.mark.skipif(not hasattr(os, "O_TMPFILE"), reason="no O_TMPFILE here")


@needs_tmpfile
@pytest.mark.parametrize("mode", FSYNC_MODES)
def test_unnamed_tmp_files_land_byte_exact_and_leave_tmp_empty(tmp_path: Path, mode: str) -> None:
    mds = [make_maildir(tmp_path, u) for u in ("alice", "bob")]

    async def go(w: MaildirWriter) -> list[str]:
        return list(await asyncio.gather(*(submit(w, mds, MSG + bytes([65 + i]))[1] for i in range(5))))

    stored = run(go, fsync=mode, anonymous_tmp=True)
    for md in mds:
        assert sorted(ls(md, "new")) == sorted(stored) and ls(md, "tmp") == []
    for i, name in enumerate(stored):
        a, b = (Path(md, "new", name) for md in mds)
        assert a.read_bytes() == MSG + bytes([65 + i])
        assert os.stat(a).st_ino == os.stat(b).st_ino and os.stat(a).st_mode & 0o777 == 0o600


@needs_tmpfile
def test_unnamed_tmp_files_are_flushed_before_their_first_link(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    md = make_maildir(tmp_path)
    new = os.path.join(md, "new")
    events: list[tuple[str, int | str]] = []
    real_link, real_fsync = os.link, os.fsync

    def fsync(fd: int) -> None:
        real_fsync(fd)
        path = os.readlink(f"/proc/self/fd/{fd}")
        events.append(("fsync returned", path if path == new else fd))

    def link(src: Any, dst: Any, **kw: Any) -> None:
        real_link(src, dst, **kw)
        events.append(("link from", int(src) if kw.get("src_dir_fd") is not None else str(src)))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "link", link)

    async def go(w: MaildirWriter) -> list[str]:
        with queued_together(w):
            futs = [submit(w, [md], MSG + bytes([65 + i]))[1] for i in range(3)]
        return list(await asyncio.gather(*futs))

    run(go, anonymous_tmp=True)
    assert len(events) == 9
    for i in range(0, 9, 3):  # per message: that very file flushed, named, then new/ flushed
        (flush, fd), (linked, src), dir_sync = events[i : i + 3]
        assert flush == "fsync returned" and isinstance(fd, int)
        assert linked == "link from" and src == fd  # through /proc/self/fd, before it had a name
        assert dir_sync == ("fsync returned", new)


@needs_tmpfile
def test_a_failed_flush_of_an_unnamed_file_leaves_no_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    md = make_maildir(tmp_path)
    real = os.fsync
    victim: list[int] = []

    def fsync(fd: int) -> None:
        if not victim:  # the first fsync: the first message's file
            victim.append(fd)
            raise OSError(errno.EIO, "injected")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)

    async def go(w: MaildirWriter) -> list[Any]:
        with queued_together(w):
            futs = [submit(w, [md], MSG + bytes([65 + i]))[1] for i in range(3)]
        return await settle(futs)

    results = run(go, anonymous_tmp=True)
    failed = [r for r in results if isinstance(r, BaseException)]
    assert len(failed) == 1 and cause_errno(failed[0]) == errno.EIO
    assert sorted(ls(md, "new")) == sorted(r for r in results if isinstance(r, str))
    assert ls(md, "tmp") == []


def test_without_o_tmpfile_the_writer_names_its_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    md = make_maildir(tmp_path)
    real = os.open

    def open_(path: Any, flags: int, *a: Any, **k: Any) -> int:
        if flags & getattr(os, "O_TMPFILE", 0) == getattr(os, "O_TMPFILE", -1):
            raise OSError(errno.EOPNOTSUPP, "not on this file system")
        return real(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", open_)

    async def go(w: MaildirWriter) -> list[str]:
        return [await submit(w, [md], MSG + bytes([65 + i]))[1] for i in range(2)]

    stored = run(go, anonymous_tmp=True)
    assert sorted(ls(md, "new")) == sorted(stored) and ls(md, "tmp") == []


@needs_tmpfile
@pytest.mark.parametrize("mode", FSYNC_MODES)
def test_a_folder_without_o_tmpfile_leaves_the_others_unnamed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    # Two mailboxes submitted together, one on a file system without
    # O_TMPFILE: the other's unnamed file must still get its own name, not a
    # path relative to the working directory (where a decoy waits).
    a, b = make_maildir(tmp_path, "a"), make_maildir(tmp_path, "b")
    decoys = tmp_path / "cwd"
    decoys.mkdir()
    for i in range(3, 256):
        (decoys / str(i)).write_bytes(b"NOT THIS MESSAGE\n")
    monkeypatch.chdir(decoys)
    real = os.open

    def open_(path: Any, flags: int, *args: Any, **kw: Any) -> int:
        if str(path).startswith(b) and flags & os.O_TMPFILE == os.O_TMPFILE:
            raise OSError(errno.EOPNOTSUPP, "not on this file system")
        return real(path, flags, *args, **kw)

    monkeypatch.setattr(os, "open", open_)

    async def go(w: MaildirWriter) -> list[str]:
        with queued_together(w):
            futs = [submit(w, [md], MSG + md[-1:].encode())[1] for md in (b, a)]
        return list(await asyncio.gather(*futs))

    stored_b, stored_a = run(go, fsync=mode, anonymous_tmp=True)
    assert Path(a, "new", stored_a).read_bytes() == MSG + b"a"
    assert Path(b, "new", stored_b).read_bytes() == MSG + b"b"
    assert ls(a, "tmp") == [] and ls(b, "tmp") == []
