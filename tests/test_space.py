"""The free-space reserve of MAIL (space.py), on the real file system of the test's folder.

The whole-server behaviour on a file system that fills up is in
test_diskfull.py (loop devices, root only); here the arithmetic and the
caching, against real statvfs numbers, with the clock under the test's
control.
"""

from __future__ import annotations

import os
from pathlib import Path

from fastsmtp.space import NO_ROOM, FreeSpace


def free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def test_room_is_what_is_free_above_the_reserve(tmp_path: Path) -> None:
    space = FreeSpace([str(tmp_path)], reserve=0)
    left = space.left()
    assert abs(left - free(tmp_path)) < 64 * 1024 * 1024  # the same file system, give or take other writers
    assert space.refusal(0) is None
    assert space.refusal(left * 2) is NO_ROOM  # SIZE= over what is left: 452 4.3.1 before any content


def test_below_the_reserve_every_mail_is_refused(tmp_path: Path) -> None:
    space = FreeSpace([str(tmp_path)], reserve=free(tmp_path) + (1 << 40))
    assert space.left() <= 0
    assert space.refusal(0) is NO_ROOM
    assert NO_ROOM.code == 452 and NO_ROOM.enhanced == "4.3.1"


def test_statvfs_is_asked_at_most_once_per_interval(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    now = [100.0]
    calls = []
    real = os.statvfs
    monkeypatch.setattr(os, "statvfs", lambda p: calls.append(p) or real(p))
    space = FreeSpace([str(tmp_path), str(tmp_path / "journal-not-made-yet")], reserve=0, interval=0.25,
                      clock=lambda: now[0])
    for _ in range(100):
        space.left()
    assert len(calls) == 1  # one file system (the missing folder is asked through its parent), one call
    now[0] += 0.3
    space.left()
    assert len(calls) == 2


def test_a_folder_not_made_yet_counts_by_its_parent(tmp_path: Path) -> None:
    # The journal folder is made when the store starts; the check is built
    # before that in some paths and must not read "full" meanwhile.
    space = FreeSpace([str(tmp_path / "not" / "yet")], reserve=0)
    assert space.left() > 0
