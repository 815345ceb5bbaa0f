"""The journal's latencies under load: time to 250, delivery lag, batch sizes.

Run:  python bench/bench_journal.py [--seconds 5] [--sessions 20] [--sizes 1k,100k] [--modes batch,always,off]
                                    [--baseline TREE] [--rounds 3]

``--fresh-fs`` (root) puts every mail root on one new ext4 file system
(with its journal, default options) on a loop device, made for this run:
on the reference machine's root file system, creating files is up to ~20x
slower for minutes after many deletions (a test run does thousands), and
that state, not the server, then sets every number.  It has a bias of its
own: a loop device turns every cache flush of the file system on it into
an fsync of its whole image file, so each flushing mode (batch, always)
also pays for the unflushed files of the others (bench/RESULTS.md).  Use
it to compare flushing modes with each other, not with ``off``.

``--baseline TREE`` adds the mode ``base-batch``: ``--fsync batch`` of an
older tree (PYTHONPATH=TREE/src, its extension built in place), such as
the group-committed Maildir writer before the journal.  With ``--rounds``
the modes run interleaved and the table gives medians.

For each fsync mode and message size, one ``fastsmtp serve --workers 1
--metrics 127.0.0.1:0`` on a fresh mail root takes Postfix's smtp-source
(``-d -s SESSIONS``, no pipelining) for about ``--seconds``; then its own
histograms are read from /metrics:

- ``fastsmtp_time_to_250_seconds``: from the end of a message's data to
  its 250 (the journal flush, or the file flush with ``always``);
- ``fastsmtp_delivery_lag_seconds`` (batch only): from the journal flush,
  just before the 250 is written, to the file being linked into new/;
- ``fastsmtp_commit_batch_size`` and ``fastsmtp_commit_latency_seconds``.

Percentiles come from the histogram buckets, interpolated linearly inside
the bucket that holds them (as Prometheus's histogram_quantile does): good
to within a bucket, and measured inside the server, with no client-side
clock in the figure.  Messages/s is smtp-source's count over its time.

Loopback only; every process is stopped by its PID; nothing is deleted
while measuring (the roots live under one folder removed at the end).
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import benchlib

RCPT = "bench@bench.example"


def histogram(text: str, name: str) -> list[tuple[float, int]]:
    """(upper bound, cumulative count) of one histogram of the exposition."""
    out = []
    for bound, count in re.findall(rf'^{name}_bucket{{le="([^"]+)"}} (\d+)$', text, re.M):
        out.append((float("inf") if bound == "+Inf" else float(bound), int(count)))
    return out


def quantile(buckets: list[tuple[float, int]], q: float) -> float:
    """histogram_quantile: linear inside the bucket that holds the q-th observation."""
    if not buckets or buckets[-1][1] == 0:
        return float("nan")
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * (rank - below) / max(count - below, 1)
        lower, below = bound, count
    return lower


def mean(text: str, name: str) -> float:
    s = re.search(rf"^{name}_sum (\S+)$", text, re.M)
    c = re.search(rf"^{name}_count (\S+)$", text, re.M)
    return float(s.group(1)) / float(c.group(1)) if s and c and float(c.group(1)) else float("nan")


def run(base: Path, mode: str, size: int, sessions: int, seconds: float, rnd: int,
        baseline: str | None) -> dict[str, float]:
    root = base / f"{mode}-{size}-{rnd}"
    box = root / "bench.example" / "bench"
    for sub in ("tmp", "new", "cur"):
        (box / sub).mkdir(parents=True)
    log = root.with_suffix(".log")
    env = {"PYTHONPATH": str(Path(baseline) / "src")} if mode == "base-batch" and baseline else None
    proc, port, _ = benchlib.start_fastsmtp(root, log, "--workers", "1", "--fsync", mode.removeprefix("base-"),
                                            "--metrics", "127.0.0.1:0", "--max-connections-per-ip", "0",
                                            "--log-level", "warning", env=env)
    try:
        url = re.search(r"metrics on (http://\S+)", log.read_text()).group(1)  # type: ignore[union-attr]
        source = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
        # A short run to learn the rate, then one of about ``seconds``.
        count = 2 * sessions * 20
        cmd = [source, "-d", "-s", str(sessions), "-l", str(size), "-f", "s@bench.example", "-t", RCPT]
        t = time.perf_counter()
        subprocess.run(cmd + ["-m", str(count), f"127.0.0.1:{port}"], check=True, timeout=120,
                       stdout=subprocess.DEVNULL)
        rate = count / (time.perf_counter() - t)
        count = max(int(rate * seconds), 2 * sessions)
        t = time.perf_counter()
        subprocess.run(cmd + ["-m", str(count), f"127.0.0.1:{port}"], check=True, timeout=max(120, 10 * seconds),
                       stdout=subprocess.DEVNULL)
        elapsed = time.perf_counter() - t
        time.sleep(0.5)  # the last deliveries
        text = urllib.request.urlopen(url, timeout=10).read().decode()
    finally:
        benchlib.stop_server(proc)
    t250 = histogram(text, "fastsmtp_time_to_250_seconds")
    lag = histogram(text, "fastsmtp_delivery_lag_seconds")
    flush = histogram(text, "fastsmtp_commit_latency_seconds")
    return {
        "rate": count / elapsed,
        "t250_p50": quantile(t250, 0.5), "t250_p99": quantile(t250, 0.99),
        "lag_p50": quantile(lag, 0.5), "lag_p99": quantile(lag, 0.99),
        "flush_p50": quantile(flush, 0.5), "batch_mean": mean(text, "fastsmtp_commit_batch_size"),
    }


def ms(x: float) -> str:
    return "–" if x != x else f"{x * 1000:.2f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--sizes", default="1k,100k")
    ap.add_argument("--modes", default="batch,always,off")
    ap.add_argument("--baseline", help="an older tree, for the mode base-batch")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--fresh-fs", action="store_true", help="mail roots on a new ext4 on a loop device (root)")
    args = ap.parse_args(argv)
    sizes = [int(s[:-1]) * 1024 if s.endswith("k") else int(s) for s in args.sizes.split(",")]
    modes = args.modes.split(",") + (["base-batch"] if args.baseline else [])
    base = Path(tempfile.mkdtemp(prefix="bench-journal-"))
    runs: dict[tuple[str, int], list[dict[str, float]]] = {}
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, base, True)  # last: after the unmount
        if args.fresh_fs:
            import loopfs

            image = base / "fs.img"
            loopfs.make_image(image, 8 << 30, "ext4")
            stack.enter_context(loopfs.mounted(image, base / "fs"))
            roots = base / "fs"
        else:
            roots = base
        measure(args, sizes, modes, roots, runs)
    report(args, sizes, modes, runs)
    return 0


def measure(args: argparse.Namespace, sizes: list[int], modes: list[str], base: Path,
            runs: dict[tuple[str, int], list[dict[str, float]]]) -> None:
    for rnd in range(args.rounds):
        for size in sizes:
            # Interleaved, and in another order each round.
            for mode in modes[rnd % len(modes):] + modes[:rnd % len(modes)]:
                r = run(base, mode, size, args.sessions, args.seconds, rnd, args.baseline)
                runs.setdefault((mode, size), []).append(r)
                print(f"round {rnd + 1} {mode} {size // 1024} KiB: {r['rate']:,.0f} msg/s", flush=True)


def report(args: argparse.Namespace, sizes: list[int], modes: list[str],
           runs: dict[tuple[str, int], list[dict[str, float]]]) -> None:
    where = "a fresh ext4 on a loop device" if args.fresh_fs else "the temporary folder's file system"
    print(f"\nsmtp-source -d -s {args.sessions}, one worker, about {args.seconds:g} s each, medians of "
          f"{args.rounds}, mail on {where} ({benchlib.git_commit()}, {time.strftime('%Y-%m-%d')}); times in ms, "
          "from the server's histograms:\n")
    print("| mode | size | msgs/s | 250 p50 | 250 p99 | lag p50 | lag p99 | flush p50 | batch mean |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for size in sizes:
        for mode in modes:
            got = runs[(mode, size)]

            def med(key: str) -> float:
                return benchlib.median(r[key] for r in got)

            print(f"| {mode} | {size // 1024} KiB | {med('rate'):,.0f} | {ms(med('t250_p50'))} | "
                  f"{ms(med('t250_p99'))} | {ms(med('lag_p50'))} | {ms(med('lag_p99'))} | "
                  f"{ms(med('flush_p50'))} | {med('batch_mean'):.1f} |")


if __name__ == "__main__":
    sys.exit(main())
