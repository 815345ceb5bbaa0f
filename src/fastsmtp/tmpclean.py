"""Start-up cleaning of the Maildir tmp/ folders.

Rule of this module: only files that nobody will ever finish are removed,
the two kinds the Maildir convention names (see ``clean_tmp``), and no
symbolic link under the mail root is followed.
"""

from __future__ import annotations

import os
import re
import socket
import stat
import time

from .spool import encode_host

__all__ = ["clean_tmp"]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC

_NAME_RE = re.compile(r"\d+\.M\d+P(\d+)(?:Q\d+)?\.(.+)")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _subdirs(dir_fd: int) -> list[str]:
    with os.scandir(dir_fd) as it:
        return [e.name for e in it if e.is_dir(follow_symlinks=False)]


def _open_dir(name: str, dir_fd: int | None = None) -> int:
    # O_NOFOLLOW: a symlink swapped in after scandir() still cannot lead out.
    return os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=dir_fd)


def clean_tmp(mail_root: str, max_age: float = 36 * 3600, *, hostname: str | None = None) -> int:
    """Remove stale files from every ``MAIL_ROOT/<domain>/<user>/tmp/``.

    Two kinds go, per the Maildir convention: files not touched for
    ``max_age`` seconds (36 hours, as DJB's spec advises: a delivery never
    takes that long), and files whose name says this host wrote them
    ("...P<pid>Q<n>.<host>") from a process that is not alive now, which
    nobody will ever finish.  ``hostname`` is the one the writer uses
    (default: the system's).  Symbolic links are never followed, so nothing
    outside ``mail_root`` is touched.  Returns the number of files removed.

    The PID test assumes every writer sharing ``mail_root`` under this host
    name runs in this PID namespace: give containers their own host names.
    """
    host = encode_host(hostname if hostname is not None else socket.gethostname())
    now = time.time()
    removed = 0
    root_fd = os.open(mail_root, _DIR_FLAGS)
    try:
        for domain in _subdirs(root_fd):
            try:
                dom_fd = _open_dir(domain, root_fd)
            except OSError:
                continue
            try:
                for user in _subdirs(dom_fd):
                    try:
                        user_fd = _open_dir(user, dom_fd)
                    except OSError:
                        continue
                    try:
                        tmp_fd = _open_dir("tmp", user_fd)
                    except OSError:
                        continue
                    finally:
                        os.close(user_fd)
                    try:
                        removed += _clean_one_tmp(tmp_fd, now - max_age, host)
                    finally:
                        os.close(tmp_fd)
            finally:
                os.close(dom_fd)
    finally:
        os.close(root_fd)
    return removed


def _clean_one_tmp(tmp_fd: int, cutoff: float, host: str) -> int:
    removed = 0
    with os.scandir(tmp_fd) as it:
        entries = list(it)
    for entry in entries:
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        # DJB: remove what "hasn't been accessed in the past 36 hours".  atime
        # is lazy under relatime, so the later of atime and mtime counts.
        stale = max(st.st_atime, st.st_mtime) < cutoff
        if not stale:
            m = _NAME_RE.fullmatch(entry.name)
            stale = m is not None and m.group(2) == host and not _pid_alive(int(m.group(1)))
        if stale:
            try:
                os.unlink(entry.name, dir_fd=tmp_fd)
                removed += 1
            except OSError:
                pass
    return removed
