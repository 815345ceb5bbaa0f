"""Which flush should the Maildir group commit use?  Measured side by side.

This chose the flushes of the Maildir writer's former "batch" mode (the
parallel fdatasyncs, (b) below).  ``--fsync batch`` is now the write-ahead
journal (journalstore.py; bench/bench_journal.py measures it), and the
writer keeps only "always" and "off"; the raw mechanisms are still measured
here as they were, for the comparison and the syncfs latency.

Every mechanism performs the whole Maildir delivery of DJB's convention
(https://cr.yp.to/proto/maildir.html): create ``tmp/NAME`` exclusively, write
the message, make it durable, hard-link it into ``new/NAME,S=<size>``, unlink
the tmp name, and make the link durable.  Only the way the two "make durable"
steps are done differs:

``always``          one message at a time: fsync(file), link, fsync(new/).
                    The honest baseline: what a server without group commit does.
``fsync-seq``       (a) per batch: write all, fsync each file in turn from the
                    committing thread, link all, fsync each distinct new/ once.
``fdatasync-poolN`` (b) per batch: as (a), but the file fdatasyncs and the
                    directory fsyncs are issued in parallel from N threads,
                    so the block layer can merge their cache flushes.
``syncfs``          (c) per batch: write all, syncfs(2) once, link all,
                    syncfs(2) once more (instead of the per-directory fsyncs).
                    The first syncfs orders "content durable" before "link
                    visible"; the second makes the links durable.
``writer-*``        the real ``fastsmtp.maildir.MaildirWriter`` fed by 100
                    concurrent submitters on an asyncio loop, end to end:
                    ``writer-always`` commits one message at a time (as
                    ``always``), ``writer-off`` flushes nothing (the ceiling).

Messages are 1 KiB, spread round-robin over ``--users`` maildirs, so a batch
of 100 touches 10 distinct new/ directories by default.

``--neighbour MB/S`` starts another process that keeps writing to a file on
the same file system at that rate without ever syncing it, like a log writer
or a copy by another tenant: the case where syncfs must flush data that is not
ours.  The file is overwritten in place (256 MiB), so disk use stays bounded.

``--burst MiB`` (default 256) measures the other side of that coupling:
the latency of committing ONE 1 KiB message right after another process has
left that much dirty data in the page cache (a cp, a log rotation): per-file
fdatasync + fsync(new/) waits for our 1 KiB, syncfs for everything.

Rules of this benchmark (DESIGN.md, "Measuring on these machines"):
- All configurations run in ONE process, interleaved round by round, and the
  median of ``--reps`` rounds is reported, because the machine is shared.
- Nothing is deleted while measuring.  On this ext4 (no journal, ``discard``)
  creating files is up to ~20x slower for minutes after many deletions, so
  every run writes into a fresh folder; the whole tree is moved aside and
  removed only at the very end (``--keep`` leaves it).

Run:  /tmp/venv/bin/python bench/bench_fsync.py
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import ctypes.util
import datetime
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

_OPEN_FLAGS = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


def syncfs(fd: int) -> None:
    """syncfs(2); Python has no os.syncfs.  ctypes releases the GIL."""
    if _libc.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class Box:
    """A set of fresh maildirs for one run, and a name counter."""

    def __init__(self, root: str, users: int) -> None:
        self.dirs = []
        for u in range(users):
            md = os.path.join(root, f"u{u}")
            for sub in ("tmp", "new", "cur"):
                os.makedirs(os.path.join(md, sub))
            self.dirs.append(md)
        self.root_fd = os.open(root, _DIR_FLAGS)
        self.seq = 0

    def names(self, n: int) -> list[tuple[str, str]]:
        out = []
        for _ in range(n):
            md = self.dirs[self.seq % len(self.dirs)]
            out.append((md, f"{self.seq}.P{os.getpid()}.bench"))
            self.seq += 1
        return out


MSG = (b"X" * 78 + b"\r\n") * 12 + b"Y" * 62 + b"\r\n"  # 1024 octets
assert len(MSG) == 1024


def _write(md: str, name: str) -> int:
    fd = os.open(os.path.join(md, "tmp", name), _OPEN_FLAGS, 0o600)
    os.write(fd, MSG)
    return fd


def _link(md: str, name: str) -> None:
    tmp = os.path.join(md, "tmp", name)
    os.link(tmp, os.path.join(md, "new", f"{name},S={len(MSG)}"))
    os.unlink(tmp)


def _fsync_dir(path: str, sync: Callable[[int], None] = os.fsync) -> None:
    fd = os.open(path, _DIR_FLAGS)
    try:
        sync(fd)
    finally:
        os.close(fd)


def batch_always(box: Box, n: int, pool: ThreadPoolExecutor) -> None:
    for md, name in box.names(n):
        fd = _write(md, name)
        os.fsync(fd)
        os.close(fd)
        _link(md, name)
        _fsync_dir(os.path.join(md, "new"))


def batch_fsync_seq(box: Box, n: int, pool: ThreadPoolExecutor) -> None:
    msgs = box.names(n)
    fds = [_write(md, name) for md, name in msgs]
    for fd in fds:
        os.fsync(fd)
        os.close(fd)
    for md, name in msgs:
        _link(md, name)
    for d in sorted({os.path.join(md, "new") for md, _ in msgs}):
        _fsync_dir(d)


def batch_fdatasync_pool(box: Box, n: int, pool: ThreadPoolExecutor) -> None:
    msgs = box.names(n)
    fds = [_write(md, name) for md, name in msgs]
    list(pool.map(os.fdatasync, fds))
    for fd in fds:
        os.close(fd)
    for md, name in msgs:
        _link(md, name)
    dirs = sorted({os.path.join(md, "new") for md, _ in msgs})
    list(pool.map(_fsync_dir, dirs))


def batch_syncfs(box: Box, n: int, pool: ThreadPoolExecutor) -> None:
    msgs = box.names(n)
    fds = [_write(md, name) for md, name in msgs]
    syncfs(box.root_fd)
    for fd in fds:
        os.close(fd)
    for md, name in msgs:
        _link(md, name)
    syncfs(box.root_fd)


MECHANISMS: dict[str, Callable[[Box, int, ThreadPoolExecutor], None]] = {
    "always": batch_always,
    "fsync-seq": batch_fsync_seq,
    "fdatasync-pool": batch_fdatasync_pool,
    "syncfs": batch_syncfs,
}


def run_raw(mech: str, n: int, box: Box, seconds: float, pool: ThreadPoolExecutor) -> tuple[float, float]:
    """Return (messages/s, median batch latency in ms)."""
    fn = MECHANISMS[mech]
    lat = []
    t0 = time.perf_counter()
    done = 0
    while True:
        t = time.perf_counter()
        fn(box, n, pool)
        lat.append(time.perf_counter() - t)
        done += n
        if t + lat[-1] - t0 >= seconds:
            break
    return done / (time.perf_counter() - t0), statistics.median(lat) * 1e3


def run_writer(mode: str, root: str, users: int, seconds: float, concurrency: int) -> tuple[float, float]:
    """The real MaildirWriter: `concurrency` tasks submit 1 KiB messages.

    Returns (messages/s, mean batch size).
    """
    from fastsmtp.maildir import MaildirWriter

    box = Box(root, users)
    os.close(box.root_fd)

    async def main() -> tuple[float, float]:
        writer = MaildirWriter(hostname="bench", fsync=mode)
        writer.start(asyncio.get_running_loop())
        deadline = time.perf_counter() + seconds
        count = 0

        async def client(i: int) -> None:
            nonlocal count
            md = box.dirs[i % len(box.dirs)]
            while time.perf_counter() < deadline:
                spool = writer.open_spool(md)
                spool.write(MSG)
                await writer.submit(spool, [md])
                count += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(concurrency)))
        elapsed = time.perf_counter() - t0
        writer.close()
        batches = max(1, writer.stats["batches"])
        return count / elapsed, writer.stats["messages"] / batches

    return asyncio.run(main())


NEIGHBOUR = """
import os, sys, time
path, rate = sys.argv[1], float(sys.argv[2]) * 1024 * 1024
chunk, size = b"n" * (1 << 20), 256 << 20
fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
t0, done = time.monotonic(), 0
while True:
    os.pwrite(fd, chunk, done % size)
    done += len(chunk)
    ahead = done / rate - (time.monotonic() - t0)
    if ahead > 0:
        time.sleep(ahead)
"""


def start_neighbour(top: str, rate: float) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", NEIGHBOUR, os.path.join(top, "neighbour.dat"), str(rate)])


def burst_latency(top: str, mib: int, reps: int) -> dict[str, float]:
    """Median ms to commit one message after a neighbour dirtied ``mib`` MiB."""
    dirty = os.path.join(top, "burst.dat")
    nfd = os.open(dirty, os.O_CREAT | os.O_WRONLY, 0o600)
    chunk = b"b" * (1 << 20)
    lat: dict[str, list[float]] = {"fdatasync+dir": [], "syncfs": []}
    try:
        for rep in range(reps):
            for mech in lat:
                for i in range(mib):  # the neighbour: buffered writes, no sync
                    os.pwrite(nfd, chunk, i << 20)
                box = Box(os.path.join(top, f"burst-{rep}-{mech}"), 1)
                ((md, name),) = box.names(1)
                t = time.perf_counter()
                fd = _write(md, name)
                if mech == "syncfs":
                    syncfs(box.root_fd)
                else:
                    os.fdatasync(fd)
                os.close(fd)
                _link(md, name)
                if mech == "syncfs":
                    syncfs(box.root_fd)
                else:
                    _fsync_dir(os.path.join(md, "new"))
                lat[mech].append((time.perf_counter() - t) * 1e3)
                os.close(box.root_fd)
                os.fsync(nfd)  # settle before the next measurement, untimed
    finally:
        os.close(nfd)
    return {m: statistics.median(v) for m, v in lat.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=None, help="parent folder for the test tree (default: system tmp)")
    ap.add_argument("--seconds", type=float, default=1.0, help="time per measurement")
    ap.add_argument("--reps", type=int, default=3, help="interleaved rounds; the median is reported")
    ap.add_argument("--users", type=int, default=10, help="maildirs the messages are spread over")
    ap.add_argument("--pools", default="4,8", help="thread counts to try for fdatasync-pool, e.g. 4,8")
    ap.add_argument("--sizes", default="1,10,100", help="batch sizes")
    ap.add_argument("--no-writer", action="store_true", help="skip the end-to-end MaildirWriter runs")
    ap.add_argument("--neighbour", type=float, default=0, help="MB/s another process writes meanwhile (0: none)")
    ap.add_argument("--burst", type=int, default=256, help="MiB of a neighbour's dirty data (0: skip)")
    ap.add_argument("--keep", action="store_true", help="do not delete the test tree at the end")
    args = ap.parse_args()

    sizes = [int(s) for s in args.sizes.split(",")]
    configs: list[tuple[str, int]] = [("always", 1)]
    pool_sizes = [int(p) for p in args.pools.split(",")]
    mechs = ["fsync-seq"] + [f"fdatasync-pool{p}" for p in pool_sizes] + ["syncfs"]
    configs += [(m, n) for m in mechs for n in sizes]
    if not args.no_writer:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
        configs += [("writer-always", 100), ("writer-off", 100)]

    top = tempfile.mkdtemp(prefix="bench_fsync.", dir=args.dir)
    results: dict[tuple[str, int], list[tuple[float, float]]] = {c: [] for c in configs}
    pools = {p: ThreadPoolExecutor(max_workers=p) for p in pool_sizes}
    started = time.perf_counter()
    neighbour = start_neighbour(top, args.neighbour) if args.neighbour else None
    try:
        for rep in range(args.reps):
            for mech, n in configs:
                run_dir = os.path.join(top, f"r{rep}-{mech}-{n}")
                os.mkdir(run_dir)
                if mech.startswith("writer-"):
                    r = run_writer(mech[7:], run_dir, args.users, args.seconds, n)
                else:
                    box = Box(run_dir, args.users)
                    try:
                        threads = int(mech[14:]) if mech.startswith("fdatasync-pool") else pool_sizes[0]
                        r = run_raw(mech.rstrip("0123456789"), n, box, args.seconds, pools[threads])
                    finally:
                        os.close(box.root_fd)
                results[(mech, n)].append(r)
                print(f"  round {rep + 1} {mech:17s} batch {n:3d}: {r[0]:9.0f} msg/s", file=sys.stderr)
        burst = burst_latency(top, args.burst, args.reps) if args.burst else {}
    finally:
        if neighbour is not None:
            neighbour.kill()
            neighbour.wait()
        for pool in pools.values():
            pool.shutdown()
        total = time.perf_counter() - started
        if not args.keep:
            # Deleting is what slows file creation afterwards, so it comes last.
            aside = top + ".done"
            os.rename(top, aside)
            shutil.rmtree(aside, ignore_errors=True)

    base = statistics.median(r[0] for r in results[("always", 1)])
    print(f"# {datetime.date.today().isoformat()}  {platform.node()}  Linux {platform.release()}  "
          f"{os.cpu_count()} CPUs  python {platform.python_version()}")
    print(f"# 1 KiB messages, {args.users} maildirs, {args.seconds:g} s per run, median of {args.reps} "
          f"interleaved rounds, {total:.0f} s in all"
          + (f", a neighbour writing {args.neighbour:g} MB/s" if args.neighbour else ""))
    print()
    print("| mechanism | batch | messages/s | x always | median batch ms / mean batch |")
    print("|---|---:|---:|---:|---:|")
    for mech, n in configs:
        rs = results[(mech, n)]
        rate = statistics.median(r[0] for r in rs)
        extra = statistics.median(r[1] for r in rs)
        label = f"{n} submitters" if mech.startswith("writer-") else str(n)
        col = f"mean batch {extra:.1f}" if mech.startswith("writer-") else f"{extra:.2f} ms"
        print(f"| {mech} | {label} | {rate:,.0f} | {rate / base:.1f} | {col} |")
    if burst:
        print()
        print(f"Commit of one 1 KiB message right after another process left {args.burst} MiB dirty "
              f"(median of {args.reps}):")
        print()
        print("| flush | latency ms |")
        print("|---|---:|")
        for mech, ms in burst.items():
            print(f"| {mech} | {ms:,.1f} |")


if __name__ == "__main__":
    main()
