"""Free space on the file systems that take the mail, above a reserve.

Rules of this module:
- MAIL is refused with 452 4.3.1 while any of the file systems that a
  message will be written to (the journal's, the mail root's) has less
  free space than ``--min-free``, or when the client's SIZE= declares more
  than what is left above it (RFC 1870 §6.1: "insufficient system storage"
  is temporary).  Postfix does the same with ``queue_minfree``.  Refusing
  before the content is sent costs the client one round trip; failing at
  the end of the data costs it the whole message, again and again.
- One ``statvfs`` per file system at most every ``interval`` seconds: a
  MAIL costs a clock read, not a system call.  What arrives within one
  interval is what the reserve is for.
- Blocks free to unprivileged users (``f_bavail``) are what counts: a
  server that runs as root could otherwise eat ext4's root reserve too.
- Never raises: a file system that cannot be asked (gone, EIO) counts as
  full, and the error is the store's to report when it writes.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Sequence

from .events import Reply

__all__ = ["FreeSpace", "NO_ROOM"]

#: RFC 3463 §3.4: X.3.1 "mail system full".
NO_ROOM = Reply(452, "4.3.1", "Insufficient system storage")


class FreeSpace:
    """Octets free above the reserve, on the fullest of ``paths``' file systems."""

    __slots__ = ("_paths", "_reserve", "_interval", "_clock", "_checked", "_left")

    def __init__(
        self,
        paths: Sequence[str],
        reserve: int,
        interval: float = 0.25,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._paths = _one_per_file_system(paths)
        self._reserve = reserve
        self._interval = interval
        self._clock = clock
        self._checked = -interval - 1.0
        self._left = 0

    def left(self) -> int:
        """Octets that may still be written before the reserve is reached (<= 0: none)."""
        now = self._clock()
        if now - self._checked >= self._interval:
            self._checked = now
            self._left = min(_available(p) for p in self._paths) - self._reserve if self._paths else 1 << 62
        return self._left

    def refusal(self, declared_size: int) -> Reply | None:
        """NO_ROOM when there is no room for a message of ``declared_size`` (0: not declared)."""
        left = self.left()
        if left <= 0 or declared_size > left:
            return NO_ROOM
        return None


def _available(path: str) -> int:
    try:
        st = os.statvfs(path)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


def _existing(path: str) -> str:
    """``path``, or the nearest folder above it that exists (a journal folder not made yet)."""
    # No abspath: it asks for the working directory, which may be gone.
    while path and not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path or "."


def _one_per_file_system(paths: Sequence[str]) -> list[str]:
    """The paths, one per device (the mail root and the journal usually share one)."""
    seen: dict[int, str] = {}
    for path in map(_existing, paths):
        try:
            dev = os.stat(path).st_dev
        except OSError:
            dev = -len(seen) - 1  # cannot be asked: counts as full (left() says 0)
        seen.setdefault(dev, path)
    return list(seen.values())
