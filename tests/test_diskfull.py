"""A full disk: MAIL is refused before the content comes, and nothing acknowledged is lost.

The mail root is on a small ext4 of its own (a loop device), the server
keeps ``--min-free`` in reserve on it, and a filler file takes its room
(fallocate: the blocks are taken at once, statvfs sees them at once).
Below the reserve, or for a SIZE= over what is left above it, MAIL gets
``452 4.3.1`` (RFC 1870 §6.1): the client is told before it sends the
message, not after.  A message that does not fit anyway (the room went
between MAIL and the end of the data) gets ``451 4.3.0`` and leaves nothing
behind.  Whatever got 250 is in ``new/``, byte-exact, and once room is made
again mail is accepted again.  Without a reserve, a message the journal
took while its Maildir had no room left is delivered once there is room.

The server looks at statvfs at most every 0.25 s, so each change of room is
followed by polling, with a deadline, until the server's answer changes.

Root and working loop devices are needed (probed by attaching one); without
them the module is skipped.  Each test has a fresh file system, under the
default ``--fsync`` and under ``--fsync always``.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType
from typing import Callable, Iterator

import pytest

from helpers import Client, RunningServer, ehlo, greeted, start_server, stored, wait_for

BENCH = Path(__file__).resolve().parent.parent / "bench"
FS_SIZE = 48 << 20
RESERVE = 8 << 20
MiB = 1 << 20
ALICE = "alice@example.com"
# A fill lands this close: ext4 takes blocks for the filler's extent tree,
# and a store that writes after its 250 may still be writing.
FILL_TOLERANCE = 64 * 1024


def _load_loopfs() -> ModuleType:
    spec = importlib.util.spec_from_file_location("loopfs", BENCH / "loopfs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


loopfs = _load_loopfs()


def make_body(tag: str, size: int) -> bytes:
    """About ``size`` octets; unique by ``tag``; no line starts with '.'."""
    head = f"Message-ID: <{tag}@diskfull.test>\r\nSubject: {tag}\r\n\r\n".encode()
    line = (tag.encode() + b" ") * 80
    return head + (line[:76] + b"\r\n") * max(1, (size - len(head)) // 78)


class Disk:
    """The server on a small file system, a filler file, and what the server acknowledged."""

    def __init__(self, mount: Path, srv: RunningServer) -> None:
        self.mount = mount
        self.srv = srv
        self.filler = mount / "filler"
        self.acked: list[bytes] = []

    def free(self) -> int:
        st = os.statvfs(self.mount)
        return st.f_bavail * st.f_frsize

    def fill_to(self, free: int) -> None:
        """Grow the filler until about ``free`` octets are left."""
        with open(self.filler, "ab") as f:
            for _ in range(5):  # the extent tree takes a few blocks of its own
                grow = self.free() - free
                if grow <= 0:
                    break
                os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size + grow)
        assert abs(self.free() - free) < FILL_TOLERANCE, f"wanted {free} free, have {self.free()}"

    def session(self) -> Client:
        c = greeted(self.srv)
        assert ehlo(c).startswith(b"250-")
        return c

    def mail(self, size: int | None = None) -> bytes:
        """The reply to MAIL (with SIZE= when given) in a new session."""
        c = self.session()
        try:
            c.send(b"MAIL FROM:<s@diskfull.test>" + (b" SIZE=%d" % size if size is not None else b"") + b"\r\n")
            return c.reply()
        finally:
            c.close()

    def wait_mail(self, expect: bytes, size: int | None = None, timeout: float = 10.0) -> None:
        """Poll MAIL until its reply starts with ``expect`` (the server re-reads statvfs every 0.25 s)."""
        # A new session each time: refusals count as session errors, and
        # enough of them would slow the replies down (--soft-error-limit).
        seen: list[bytes] = []

        def answered() -> bool:
            seen.append(self.mail(size))
            return seen[-1].startswith(expect)

        try:
            wait_for(answered, timeout, f"MAIL{'' if size is None else f' SIZE={size}'} to get {expect!r}", 0.1)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last reply {seen[-1]!r}") from None

    def send(self, body: bytes, size: int | None = None) -> bytes:
        """One message to alice: the first reply refusing it, else the reply to its end (kept when 250)."""
        c = self.session()
        try:
            c.send(self.envelope(size))
            for reply, want in zip(c.replies(3), [b"250 ", b"250 ", b"354 "]):
                if not reply.startswith(want):
                    return reply
            c.send(body + b".\r\n")
            reply = c.reply()
        finally:
            c.close()
        if reply.startswith(b"250 "):
            self.acked.append(body)
        return reply

    @staticmethod
    def envelope(size: int | None = None) -> bytes:
        """MAIL (with SIZE= when given), RCPT and DATA, pipelined (RFC 2920)."""
        declared = b" SIZE=%d" % size if size is not None else b""
        return b"MAIL FROM:<s@diskfull.test>%s\r\nRCPT TO:<%s>\r\nDATA\r\n" % (declared, ALICE.encode())

    def check_acked(self, timeout: float = 5.0) -> None:
        """Every acknowledged message is in new/ once, byte-exact, and nothing else is."""
        # A moment for a store that delivers into new/ just after its 250.
        wait_for(lambda: len(self.srv.messages(ALICE)) >= len(self.acked), timeout, "the acknowledged messages")
        found = stored(self.srv, [ALICE])
        for body in self.acked:
            assert found.get(body) == [ALICE], f"acknowledged message lost or doubled: {body[:60]!r}"
        assert set(found) <= set(self.acked), "new/ holds a message that was never acknowledged"


@pytest.fixture(scope="module")
def loop_devices() -> None:
    reason = loopfs.unusable()
    if reason:
        pytest.skip(reason)


@pytest.fixture(params=["default", "always"])
def make_disk(request: pytest.FixtureRequest, tmp_path: Path, loop_devices: None) -> Iterator[Callable[..., Disk]]:
    """make_disk(min_free=RESERVE): the server on a fresh small file system (one per test)."""
    image, mount = tmp_path / "small.img", tmp_path / "mnt"
    # -m 0: no blocks reserved for root, so what the server (root here) can
    # write is exactly the f_bavail it measures the reserve by.
    loopfs.make_image(image, FS_SIZE, "ext4", ["-m", "0"])
    fsync = [] if request.param == "default" else ["--fsync", request.param]
    started: list[RunningServer] = []

    def make(min_free: int = RESERVE) -> Disk:
        assert not started, "one server per file system"
        started.append(start_server(mount / "mail", "--min-free", str(min_free), "--workers", "1", *fsync))
        return Disk(mount, started[0])

    with loopfs.mounted(image, mount):
        try:
            yield make
        finally:
            for srv in started:
                srv.stop()


@pytest.fixture
def disk(make_disk: Callable[..., Disk]) -> Disk:
    return make_disk()


def test_accepts_while_there_is_room(disk: Disk) -> None:
    for i, size in enumerate([1000, 50_000, 2 * MiB]):
        reply = disk.send(make_body(f"room-{i}", size))
        assert reply.startswith(b"250 "), reply
    disk.check_acked()


def one_delivered(disk: Disk) -> None:
    """One message accepted and in new/: the fill that follows measures a quiet disk."""
    reply = disk.send(make_body("before", 20_000))
    assert reply.startswith(b"250 "), reply
    disk.check_acked()


def test_mail_is_refused_below_the_reserve(disk: Disk) -> None:
    one_delivered(disk)
    disk.fill_to(RESERVE - MiB)
    disk.wait_mail(b"452 4.3.1")
    reply = disk.mail(size=1000)
    assert reply.startswith(b"452 4.3.1"), reply
    disk.check_acked()


def test_size_over_what_is_left_is_refused_a_smaller_one_accepted(disk: Disk) -> None:
    disk.fill_to(RESERVE + 2 * MiB)
    disk.wait_mail(b"452 4.3.1", size=4 * MiB)
    body = make_body("small", 20_000)
    reply = disk.send(body, size=len(body))
    assert reply.startswith(b"250 "), reply
    disk.check_acked()


def test_message_that_does_not_fit_gets_451_and_leaves_nothing(disk: Disk) -> None:
    one_delivered(disk)
    disk.fill_to(RESERVE + MiB)
    body = make_body("too-big", 3 * MiB)
    c = disk.session()
    try:
        c.send(disk.envelope())
        replies = c.replies(3)
        assert [r[:3] for r in replies] == [b"250", b"250", b"354"], replies
        # MAIL saw room; now the room goes before the content comes.
        disk.fill_to(256 * 1024)
        c.send(body + b".\r\n")
        reply = c.reply()
    finally:
        c.close()
    assert reply.startswith(b"451 4.3.0"), reply
    assert disk.srv.proc.poll() is None, "the server died of a full disk"
    c = disk.session()  # and still serves
    c.send(b"NOOP\r\n")
    assert c.reply().startswith(b"250 ")
    c.close()
    disk.check_acked()
    tmp = disk.srv.maildir(ALICE) / "tmp"
    wait_for(lambda: not os.listdir(tmp), 5.0, "tmp/ to be empty after the failed message")


def test_accepts_again_once_room_is_made(disk: Disk) -> None:
    disk.fill_to(RESERVE - MiB)
    disk.wait_mail(b"452 4.3.1")
    disk.filler.unlink()
    # ext4 may count freed blocks as free only once its journal commits them (5 s).
    disk.wait_mail(b"250 ", timeout=15.0)
    reply = disk.send(make_body("after", 20_000))
    assert reply.startswith(b"250 "), reply
    disk.check_acked()


def test_acknowledged_message_outlasts_a_full_disk(make_disk: Callable[..., Disk]) -> None:
    # No reserve: the one case where a message can be acknowledged with no
    # room left for its file in new/ (the journal took the room).  It must
    # be delivered once there is room again, from the journal.
    disk = make_disk(min_free=0)
    body = make_body("squeezed", 150_000)  # under --spill-threshold: no spool file in tmp/
    disk.fill_to(200 * 1024)
    reply = disk.send(body)
    assert reply.startswith(b"250 "), reply
    assert disk.free() < len(body), "there is room for the file after all; the test shows nothing"
    disk.filler.unlink()
    # Delivery is retried with a growing delay (1 s, 2 s, 4 s, ...).
    disk.check_acked(timeout=20.0)
