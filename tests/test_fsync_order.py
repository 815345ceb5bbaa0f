"""The order of a commit on the real server, read from strace.

DESIGN.md step 6 and maildir.py's rules: a message's data is flushed
(fdatasync, or fsync with ``--fsync always``), then its tmp/ file (named,
or unnamed with O_TMPFILE and linked through /proc/self/fd) is linked into
new/, then new/ is fsync'ed, and only then is "250 2.0.0 Ok:
queued" written to the client.  A SIGKILL test cannot see a missing flush
(the page cache survives the kill), and the fake-os tests of
test_maildir.py see the calls, not the real server's order.  So this runs
``fastsmtp serve --workers 0`` under ``strace -f`` and checks the order of
the system calls for one message.  ``--fsync off`` must fail the same
check: that shows the check can fail.

--workers 0 is one process, so its threads (the loop, the committer, the
flush pool) share one file-descriptor table: fds are mapped to paths from
the openat and close lines, in the order strace saw them.  A call that
another thread interrupts is split into "<unfinished ...>" and
"<... resumed>" lines; it counts as started at the first and finished at
the second.  Line order is causal order here: a thread that waits for
another's call to finish can only make its own call once strace has
reported that finish.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import smtplib
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from fastsmtp.policy import add_mailbox
from helpers import children, start_server

STRACE = shutil.which("strace")


def _strace_works() -> bool:
    """strace is there and may trace here (a container may forbid ptrace)."""
    if STRACE is None:
        return False
    probe = subprocess.run([STRACE, "-f", "-o", os.devnull, "true"], capture_output=True, timeout=30)
    return probe.returncode == 0


needs_strace = pytest.mark.skipif(not _strace_works(), reason="strace is missing or may not trace here (CI installs it)")
TRACED = ("openat,close,fdatasync,fsync,link,linkat,rename,renameat,renameat2,write,writev,pwritev,pwritev2,pwrite64,"
          "copy_file_range,sendto,sendmsg")

_LINE = re.compile(r"^(\d+)\s+\d\d:\d\d:\d\d\.\d+\s+(.*)$")
_CALL = re.compile(r"^(\w+)\((.*)\)\s+=\s+(-?\d+|\?)")
_STRING = re.compile(r'"((?:[^"\\]|\\.)*)"')
_WRITES = ("write", "writev", "sendto", "sendmsg")
_APPENDS = ("pwritev", "pwritev2", "pwrite64", "write", "writev", "copy_file_range")


@dataclass
class Call:
    tid: str
    name: str
    args: str
    ret: int
    start: int  # index of the line where it began
    end: int  # index of the line where it returned
    fd_path: str | None  # what its first argument, an fd, referred to when it began


def parse(trace: str) -> list[Call]:
    """The completed system calls of an ``strace -f -tt`` log, with fds resolved to paths."""
    fds: dict[int, str] = {}
    pending: dict[str, tuple[str, int, str | None]] = {}  # tid -> (text so far, start, fd path)
    calls: list[Call] = []
    for index, line in enumerate(trace.splitlines()):
        m = _LINE.match(line)
        if m is None:
            continue
        tid, body = m.groups()
        if body.startswith("<... "):
            resumed = re.match(r"<\.\.\. \w+ resumed>(.*)$", body)
            if resumed is None or tid not in pending:
                continue
            head, start, fd_path = pending.pop(tid)
            body = head + resumed.group(1)
        elif body.endswith("<unfinished ...>"):
            head = body[: -len("<unfinished ...>")].rstrip()
            pending[tid] = (head, index, _resolve_fd(head, fds))
            if head.startswith("close("):
                _forget(head, fds)
            continue
        else:
            start, fd_path = index, _resolve_fd(body, fds)
            if body.startswith("close("):
                _forget(body, fds)
        call = _CALL.match(body)
        if call is None:
            continue  # a signal, an exit, or a call that never returned
        name, args, ret_text = call.groups()
        ret = int(ret_text) if ret_text != "?" else -1
        calls.append(Call(tid, name, args, ret, start, index, fd_path))
        if name == "openat" and ret >= 0:
            path = _openat_path(args, fds)
            if path is not None:
                fds[ret] = path
    return calls


def _resolve_fd(text: str, fds: dict[int, str]) -> str | None:
    m = re.match(r"\w+\((\d+)(?:[,)]|\s|$)", text)
    return fds.get(int(m.group(1))) if m else None


def _forget(text: str, fds: dict[int, str]) -> None:
    m = re.match(r"close\((\d+)", text)
    if m:
        fds.pop(int(m.group(1)), None)


def _openat_path(args: str, fds: dict[int, str]) -> str | None:
    m = _STRING.search(args)
    if m is None:
        return None
    path = m.group(1)
    if path.startswith("/"):
        return path
    dirfd = args.split(",", 1)[0].strip()
    base = fds.get(int(dirfd)) if dirfd.isdigit() else None
    return f"{base}/{path}" if base is not None else None


def _strings(call: Call) -> list[str]:
    return _STRING.findall(call.args)


def order_problems(calls: list[Call], tmp: str, new: str, queue_id: str) -> list[str]:
    """What is out of order, or missing, in the commit of the message stored as ``new``.

    ``tmp`` is its path in tmp/ and ``queue_id`` the id its 250 names.
    Empty when the data flush, the link, the fsync of new/ and the 250
    happened in that order, each finished before the next began.
    """
    new_dir = os.path.dirname(new)
    links = [c for c in calls if c.name in ("link", "linkat") and c.ret == 0 and _strings(c)[:2] == [tmp, new]]
    # An unnamed tmp/ file (O_TMPFILE) gets its name from its fd, through
    # /proc/self/fd: linkat(PROC, "N", AT_FDCWD, new, AT_SYMLINK_FOLLOW).
    unnamed = [
        c for c in calls
        if c.name == "linkat" and c.ret == 0 and (c.fd_path or "").startswith("/proc/")
        and len(_strings(c)) == 2 and _strings(c)[0].isdigit() and _strings(c)[1] == new
    ]
    replies = [
        c for c in calls
        if c.name in _WRITES and f"250 2.0.0 Ok: queued as {queue_id}" in c.args
    ]
    if len(links) + len(unnamed) != 1 or len(replies) != 1:
        return [f"expected one link and one 250 for {queue_id}, found {len(links + unnamed)} and {len(replies)}"]
    (link,), (reply,) = links or unnamed, replies
    problems = []
    if links:
        flushes = [c for c in calls if c.name in ("fdatasync", "fsync") and c.fd_path == tmp and c.ret == 0]
    else:
        # The flush of that fd, since it was last opened (fd numbers come back).
        fd = int(_strings(link)[0])
        opened = max(
            (c.end for c in calls if c.name == "openat" and c.ret == fd and c.end < link.start), default=-1
        )
        flushes = [
            c for c in calls
            if c.name in ("fdatasync", "fsync") and c.ret == 0 and c.start > opened
            and c.args.split(",")[0].strip("( ") == str(fd) and c.fd_path == os.path.dirname(tmp)
        ]
    if not any(c.end < link.start for c in flushes):
        problems.append("no data flush of the tmp/ file finished before its link into new/")
    dir_syncs = [c for c in calls if c.name == "fsync" and c.fd_path == new_dir and c.ret == 0 and c.start > link.end]
    if not dir_syncs:
        problems.append("no fsync of new/ after the link")
    elif dir_syncs[0].end > reply.start:
        problems.append("the 250 was written before the fsync of new/ finished")
    if link.end > reply.start:
        problems.append("the 250 was written before the link finished")
    if dir_syncs:
        # The 250 may still come after the fsync by luck when the committer
        # hands the result back too early; its hand-off (the wake-up write
        # of call_soon_threadsafe) may not: nothing leaves the committing
        # thread between the link and the end of the fsync of new/.
        early = [
            c for c in calls
            if c.tid == link.tid and c.name in _WRITES and link.end < c.start < dir_syncs[0].end
            and c.fd_path is None
        ]
        if early:
            problems.append(f"the committing thread wrote ({early[0].name}) before the fsync of new/ finished")
    return problems


def journal_problems(calls: list[Call], new: str, queue_id: str) -> list[str]:
    """What is out of order in the journaled commit (``--fsync batch``) of the message stored as ``new``.

    Empty when its record was written into a journal segment, that segment
    was flushed (fdatasync, or the write's own RWF_DSYNC) and its folder
    fsync'ed (once, when the segment was made) before the 250 was written,
    and the file was linked into new/ only after the flush: delivery never
    shows what the journal does not hold.
    """
    appends = [c for c in calls if c.name in _APPENDS and (c.fd_path or "").endswith(".seg") and queue_id in c.args]
    replies = [c for c in calls if c.name in _WRITES and f"250 2.0.0 Ok: queued as {queue_id}" in c.args]
    links = [c for c in calls if c.name in ("link", "linkat") and c.ret == 0 and _strings(c)[-1:] == [new]]
    if len(appends) != 1 or len(replies) != 1 or len(links) != 1:
        return [f"expected one append, one 250 and one link for {queue_id}, "
                f"found {len(appends)}, {len(replies)} and {len(links)}"]
    (append,), (reply,), (link,) = appends, replies, links
    segment = append.fd_path
    assert segment is not None
    problems = []
    # The flush: the write itself when it carries RWF_DSYNC (pwritev2), else
    # an fdatasync of the segment after it.
    flushes = [append] if "RWF_DSYNC" in append.args else [
        c for c in calls if c.name == "fdatasync" and c.ret == 0 and c.fd_path == segment and c.start > append.end
    ]
    if not flushes:
        problems.append("no fdatasync of the segment after the record was written")
    elif flushes[0].end > reply.start:
        problems.append("the 250 was written before the fdatasync of the journal finished")
    folder = os.path.dirname(segment)
    made = [c for c in calls if c.name == "openat" and c.ret >= 0 and segment in _strings(c)]
    folder_syncs = [c for c in calls if c.name == "fsync" and c.ret == 0 and c.fd_path == folder
                    and made and c.start > made[0].end]
    if not folder_syncs or folder_syncs[0].end > reply.start:
        problems.append("the segment's name was not made durable (fsync of its folder) before the 250")
    if flushes and link.start < flushes[0].end:
        problems.append("the file was linked into new/ before the journal was flushed")
    return problems


# -- the checker on made-up traces (it must fail when it should) ----------------------


_GOOD_JOURNAL = """7 10:00:00.000001 openat(AT_FDCWD, "/m/.journal/w-1-0/0000000000000001.seg", O_WRONLY|O_CREAT|O_EXCL, 0600) = 9
7 10:00:00.000002 openat(AT_FDCWD, "/m/.journal/w-1-0", O_RDONLY|O_CLOEXEC|O_DIRECTORY) = 10
7 10:00:00.000003 fsync(10) = 0
7 10:00:00.000004 close(10) = 0
7 10:00:00.000005 pwritev(9, [{iov_base="FSJ1", iov_len=20}, {iov_base="Q1", iov_len=40}], 2, 0) = 60
7 10:00:00.000006 fdatasync(9) = 0
6 10:00:00.000007 sendto(14, "250 2.0.0 Ok: queued as Q1\\r\\n", 28, 0, NULL, 0) = 28
8 10:00:00.000008 linkat(5, "15", AT_FDCWD, "/m/a/new/X,S=200", AT_SYMLINK_FOLLOW) = 0
"""


def test_the_journal_checker_accepts_the_right_order_and_sees_each_wrong_one() -> None:
    def check(trace: str) -> list[str]:
        return journal_problems(parse(trace), "/m/a/new/X,S=200", "Q1")

    assert check(_GOOD_JOURNAL) == []
    assert "the 250 was written before the fdatasync of the journal finished" in check(_swap(_GOOD_JOURNAL, 5, 6))
    assert "the file was linked into new/ before the journal was flushed" in check(_swap(_GOOD_JOURNAL, 5, 7))
    assert any("folder" in p for p in check(_GOOD_JOURNAL.replace("fsync(10)", "fsync(11)")))
    # A write that is its own flush (pwritev2 with RWF_DSYNC) needs no fdatasync after it.
    dsync = _GOOD_JOURNAL.replace("pwritev(9, ", "pwritev2(9, ").replace("2, 0) = 60", "2, 0, RWF_DSYNC) = 60")
    dsync = dsync.replace("7 10:00:00.000006 fdatasync(9) = 0\n", "")
    assert check(dsync) == []
    assert "no fdatasync of the segment after the record was written" in check(
        _GOOD_JOURNAL.replace("7 10:00:00.000006 fdatasync(9) = 0\n", ""))



_GOOD = """\
7 10:00:00.000001 openat(AT_FDCWD, "/m/a/tmp/X", O_WRONLY|O_CREAT|O_EXCL|O_CLOEXEC, 0600) = 15
7 10:00:00.000002 write(15, "Return-Path: <>\\r\\n"..., 200) = 200
8 10:00:00.000003 fdatasync(15 <unfinished ...>
7 10:00:00.000004 write(2, "log line", 8) = 8
8 10:00:00.000005 <... fdatasync resumed>) = 0
7 10:00:00.000006 close(15) = 0
7 10:00:00.000007 link("/m/a/tmp/X", "/m/a/new/X,S=200") = 0
7 10:00:00.000008 openat(AT_FDCWD, "/m/a/new", O_RDONLY|O_CLOEXEC|O_DIRECTORY) = 15
7 10:00:00.000009 fsync(15) = 0
7 10:00:00.000010 close(15) = 0
6 10:00:00.000011 sendto(14, "250 2.0.0 Ok: queued as Q1\\r\\n", 28, 0, NULL, 0) = 28
"""


_GOOD_UNNAMED = """\
7 10:00:00.000001 openat(AT_FDCWD, "/proc/self/fd", O_RDONLY|O_CLOEXEC|O_DIRECTORY) = 5
7 10:00:00.000002 openat(AT_FDCWD, "/m/a/tmp", O_WRONLY|O_CLOEXEC|O_TMPFILE, 0600) = 15
7 10:00:00.000003 write(15, "Return-Path: <>\\r\\n"..., 200) = 200
8 10:00:00.000004 fdatasync(15) = 0
7 10:00:00.000005 linkat(5, "15", AT_FDCWD, "/m/a/new/X,S=200", AT_SYMLINK_FOLLOW) = 0
7 10:00:00.000006 close(15) = 0
7 10:00:00.000007 openat(AT_FDCWD, "/m/a/new", O_RDONLY|O_CLOEXEC|O_DIRECTORY) = 15
7 10:00:00.000008 fsync(15) = 0
7 10:00:00.000009 close(15) = 0
6 10:00:00.000010 sendto(14, "250 2.0.0 Ok: queued as Q1\\r\\n", 28, 0, NULL, 0) = 28
"""


def test_the_checker_follows_an_unnamed_file_by_its_fd() -> None:
    assert _check(_GOOD_UNNAMED) == []
    lines = _GOOD_UNNAMED.splitlines(keepends=True)
    flush_after_link = "".join(lines[:3] + [lines[4], lines[3]] + lines[5:])
    assert "no data flush of the tmp/ file finished before its link into new/" in _check(flush_after_link)
    other_fd = _GOOD_UNNAMED.replace("fdatasync(15)", "fdatasync(16)")
    assert "no data flush of the tmp/ file finished before its link into new/" in _check(other_fd)


def _check(trace: str) -> list[str]:
    return order_problems(parse(trace), "/m/a/tmp/X", "/m/a/new/X,S=200", "Q1")


def _swap(trace: str, a: int, b: int) -> str:
    lines = trace.splitlines()
    lines[a], lines[b] = lines[b], lines[a]
    return "\n".join(lines) + "\n"


def test_the_checker_accepts_the_right_order() -> None:
    assert _check(_GOOD) == []


def test_the_checker_sees_each_reordering() -> None:
    # The flush finishing after the link began.
    assert "no data flush" in " ".join(_check(_swap(_GOOD, 4, 6)))
    # The 250 before the fsync of new/.
    late = _GOOD.splitlines()
    late.insert(8, late.pop(10))
    assert "the 250 was written before the fsync of new/ finished" in _check("\n".join(late))
    # A flush of another file, or of the same fd number after it was reused, does not count.
    assert "no fsync of new/" in " ".join(_check(_GOOD.replace('"/m/a/new", O_RDONLY', '"/m/b/new", O_RDONLY')))
    assert "no data flush" in " ".join(_check(_GOOD.replace("fdatasync(15", "fdatasync(16")))
    # The committing thread wakes the loop before the fsync of new/ (the 250 comes later by luck).
    woken = _GOOD.splitlines()
    woken.insert(7, '7 10:00:00.000007 write(5, "\\1\\0\\0\\0\\0\\0\\0\\0", 8) = 8')
    assert "the committing thread wrote (write) before the fsync of new/ finished" in _check("\n".join(woken))


# -- the real server -------------------------------------------------------------------


def _trace_one_message(tmp_path: Path, fsync: str, loop: str = "uvloop") -> tuple[list[Call], str, str, str]:
    """Deliver one message to a server under strace; the calls, the tmp/ and new/ paths, the queue id."""
    root = tmp_path / "mail"
    root.mkdir()
    address = f"order-{fsync}@example.com"
    add_mailbox(str(root), address)
    log = tmp_path / "strace.log"
    srv = start_server(
        root, "--workers", "0", "--fsync", fsync, loop=loop,
        wrapper=[str(STRACE), "-f", "--seccomp-bpf", "-tt", "-s", "128", "-o", str(log), "-e", f"trace={TRACED}"],
        timeout=60,
    )
    try:
        with smtplib.SMTP(srv.host, srv.port, timeout=20) as smtp:
            smtp.ehlo("order.example")
            assert smtp.mail("s@example.net")[0] == 250
            assert smtp.rcpt(address)[0] == 250
            code, text = smtp.data(b"Subject: order\r\n\r\nflush, link, fsync, then 250\r\n")
            assert code == 250, text
        queue_id = text.decode().rsplit(" ", 1)[1]
        (stored,) = srv.messages(address)
    finally:
        # SIGTERM to the server itself, by its PID; strace ends with it.
        for pid in children(srv.proc.pid):
            os.kill(pid, signal.SIGTERM)
        try:
            srv.proc.wait(20)
        except subprocess.TimeoutExpired:
            pass
        srv.stop()
    name = stored.name.rsplit(",S=", 1)[0]
    tmp = str(srv.maildir(address) / "tmp" / name)
    return parse(log.read_text(errors="replace")), tmp, str(stored), queue_id


@needs_strace
# uvloop writes the reply with write(2), asyncio with send(2): both are traced.
@pytest.mark.parametrize("fsync,loop", [("batch", "uvloop"), ("always", "uvloop"), ("batch", "asyncio")])
def test_flush_link_fsync_then_250(tmp_path: Path, fsync: str, loop: str) -> None:
    calls, tmp, new, queue_id = _trace_one_message(tmp_path, fsync, loop)
    if fsync == "batch":
        assert journal_problems(calls, new, queue_id) == []
        return
    assert order_problems(calls, tmp, new, queue_id) == []
    flush = "fsync" if fsync == "always" else "fdatasync"
    # The file is flushed by the call the mode names: the named tmp/ file,
    # or the unnamed one opened in tmp/ (O_TMPFILE, the default).
    flushed = {tmp, os.path.dirname(tmp)}
    assert any(c.name == flush and c.fd_path in flushed for c in calls), f"no {flush} of {tmp}"


@needs_strace
def test_fsync_off_fails_the_same_check(tmp_path: Path) -> None:
    calls, tmp, new, queue_id = _trace_one_message(tmp_path, "off")
    problems = order_problems(calls, tmp, new, queue_id)
    assert "no data flush of the tmp/ file finished before its link into new/" in problems
    assert "no fsync of new/ after the link" in problems
