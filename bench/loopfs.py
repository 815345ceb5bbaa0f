"""File systems on loop devices, for the power-loss and disk-full checks (root only).

bench/powerloss.py builds its power cuts from these, and tests/test_diskfull.py
its small full disk; both load this module by path, as bench/ is not a
package.

- ``unusable()`` says why loop devices cannot be used here (not root, a tool
  missing, no free loop device, a container that refuses them), or None.  It
  probes by attaching a real file: the tools being installed says nothing
  about whether the kernel lets us.
- ``mounted()`` attaches an image file to a loop device and mounts it, and
  always unmounts and detaches again, also on an exception or Ctrl-C.
- Every command runs with a timeout, and a failure raises with its output.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

TOOLS = ("losetup", "mount", "umount", "mkfs.xfs", "mkfs.ext4", "e2fsck")


def sh(*cmd: str, timeout: float = 120.0, ok: Sequence[int] = (0,)) -> subprocess.CompletedProcess[str]:
    """Run ``cmd``; raise with its output unless its exit status is in ``ok``."""
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if done.returncode not in ok:
        raise RuntimeError(f"{' '.join(cmd)}: exit {done.returncode}: {(done.stdout + done.stderr).strip()}")
    return done


def unusable(scratch: str | None = None) -> str | None:
    """Why loop devices cannot be used here, or None when they can."""
    if os.geteuid() != 0:
        return "loop devices need root"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return "missing: " + ", ".join(missing)
    with tempfile.TemporaryDirectory(dir=scratch, prefix="loopprobe-") as folder:
        image = Path(folder) / "probe.img"
        with open(image, "wb") as f:
            f.truncate(8 << 20)
        try:
            detach(attach(image))
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            return f"cannot attach a loop device: {exc}"
    return None


def attach(image: Path) -> str:
    """The loop device ``image`` is now attached to."""
    return sh("losetup", "-f", "--show", str(image)).stdout.strip()


def detach(device: str) -> None:
    sh("losetup", "-d", device)


def make_image(path: Path, size: int, fs: str, options: Sequence[str] = ()) -> None:
    """A sparse image file of ``size`` bytes with a fresh ``fs`` ("xfs" or "ext4") on it."""
    with open(path, "wb") as f:
        f.truncate(size)
    if fs == "xfs":
        # reflink: so that ``cp --reflink=always`` can clone a file on it.
        sh("mkfs.xfs", "-q", "-m", "reflink=1", *options, str(path))
    elif fs == "ext4":
        # Default options unless told: ext4 with its journal, as a mail server runs on.
        sh("mkfs.ext4", "-q", "-F", *options, str(path))
    else:
        raise ValueError(f"no mkfs for {fs!r}")


def umount(point: Path, timeout: float = 20.0) -> None:
    """Unmount ``point``, waiting while it is busy (a killed process may hold it a moment)."""
    deadline = time.monotonic() + timeout
    while True:
        done = subprocess.run(["umount", str(point)], capture_output=True, text=True, timeout=timeout)
        if done.returncode == 0:
            return
        if time.monotonic() > deadline:
            # Detach it from the tree at least; the kernel lets go once the
            # last user does, and the loop device then detaches itself.
            sh("umount", "-l", str(point))
            return
        time.sleep(0.1)


@contextmanager
def mounted(image: Path, point: Path, options: Sequence[str] = ()) -> Iterator[str]:
    """``image`` on a loop device, mounted on ``point``; yields the device."""
    try:
        device = attach(image)
        point.mkdir(parents=True, exist_ok=True)
        try:
            sh("mount", *options, device, str(point))
            yield device
        finally:
            if os.path.ismount(point):
                umount(point)
    finally:
        # Every device on this image, not just the one we were told of: an
        # interrupt may come between losetup attaching and telling us.
        for line in sh("losetup", "-j", str(image)).stdout.splitlines():
            detach(line.split(":", 1)[0])
