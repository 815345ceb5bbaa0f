"""A milter's cost: msgs/s and server CPU with one accept-all milter against none, in the same run.

Run:  python bench/bench_milter.py [--messages 3000] [--sessions 20] [--rounds 3] [--sizes 1k,100k] [--write]

Postfix's smtp-source ``-d -s 20`` (many messages per connection, no
pipelining) against ``fastsmtp serve --workers 1 --fsync batch``, with no
milter and with tests/testmilter.py in ``accept`` mode (our own milter, in
Python: it answers continue to every step and accept at the end) as a
process of its own.  Interleaved, medians of the rounds.  The server's CPU
per message is its process tree's utime+stime from /proc; the milter's is
given apart.  rspamd is not in this run yet.

Loopback only; every process is stopped by its PID; the roots live under
one temporary folder removed at the end.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchlib

RCPT = "bench@bench.example"


def start_milter(log: Path) -> tuple[subprocess.Popen[bytes], str]:
    proc = benchlib.launch([sys.executable, str(benchlib.REPO / "tests" / "testmilter.py"), "accept"], log,
                           env={"PYTHONPATH": f"{benchlib.REPO / 'tests'}:{benchlib.REPO / 'src'}"})
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        found = re.search(r"milter listening on (\S+)", log.read_text())
        if found:
            return proc, found.group(1)
        time.sleep(0.05)
    benchlib.stop_server(proc)
    raise RuntimeError("the test milter did not start:\n" + log.read_text())


def run(base: Path, with_milter: bool, size: int, messages: int, sessions: int, rnd: int) -> dict[str, float]:
    root = base / f"{'milter' if with_milter else 'none'}-{size}-{rnd}"
    box = root / "bench.example" / "bench"
    for sub in ("tmp", "new", "cur"):
        (box / sub).mkdir(parents=True)
    milter = None
    args: list[str] = []
    if with_milter:
        milter, endpoint = start_milter(root.with_suffix(".milter.log"))
        args = ["--milter", endpoint]
    try:
        proc, port, _ = benchlib.start_fastsmtp(root, root.with_suffix(".log"), "--workers", "1", "--fsync", "batch",
                                                "--log-level", "warning", *args)
        try:
            source = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
            cmd = [source, "-d", "-s", str(sessions), "-l", str(size), "-f", "s@bench.example", "-t", RCPT, "-m",
                   str(messages), f"127.0.0.1:{port}"]
            before = benchlib.tree_cpu(proc.pid)
            mbefore = benchlib.tree_cpu(milter.pid) if milter else {}
            t = time.perf_counter()
            subprocess.run(cmd, check=True, timeout=600, stdout=subprocess.DEVNULL)
            elapsed = time.perf_counter() - t
            user, system = benchlib.cpu_delta(before, benchlib.tree_cpu(proc.pid))
            muser, msystem = benchlib.cpu_delta(mbefore, benchlib.tree_cpu(milter.pid)) if milter else (0.0, 0.0)
        finally:
            benchlib.stop_server(proc)
    finally:
        if milter is not None:
            benchlib.stop_server(milter)
    return {"rate": messages / elapsed, "cpu_us": (user + system) / messages * 1e6,
            "milter_us": (muser + msystem) / messages * 1e6}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sizes", default="1k,100k")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args(argv)
    sizes = [int(s[:-1]) * 1024 if s.endswith("k") else int(s) for s in args.sizes.split(",")]
    base = Path(tempfile.mkdtemp(prefix="bench-milter-"))
    runs: dict[tuple[bool, int], list[dict[str, float]]] = {}
    try:
        for rnd in range(args.rounds):
            for size in sizes:
                for with_milter in ((False, True) if rnd % 2 == 0 else (True, False)):
                    count = args.messages if size <= 4096 else max(args.messages // 4, 200)
                    r = run(base, with_milter, size, count, args.sessions, rnd)
                    runs.setdefault((with_milter, size), []).append(r)
                    print(f"round {rnd + 1} {size // 1024} KiB {'milter' if with_milter else 'none'}: "
                          f"{r['rate']:,.0f} msgs/s, {r['cpu_us']:,.0f} µs/msg", flush=True)
    finally:
        shutil.rmtree(base, True)
    lines = [
        f"smtp-source -d -s {args.sessions}, one worker, --fsync batch, medians of {args.rounds} rounds "
        f"({benchlib.git_commit()}, {time.strftime('%Y-%m-%d')}):",
        "",
        "| size | no milter msgs/s | accept-all milter msgs/s | ratio | server CPU µs/msg none → milter | "
        "the milter's own CPU µs/msg |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for size in sizes:
        none, milt = runs[(False, size)], runs[(True, size)]

        def med(rs: list[dict[str, float]], key: str) -> float:
            return benchlib.median(r[key] for r in rs)

        lines.append(f"| {size // 1024} KiB | {med(none, 'rate'):,.0f} | {med(milt, 'rate'):,.0f} | "
                     f"{med(milt, 'rate') / med(none, 'rate'):.2f}× | {med(none, 'cpu_us'):,.0f} → "
                     f"{med(milt, 'cpu_us'):,.0f} | {med(milt, 'milter_us'):,.0f} |")
    table = "\n".join(lines) + "\n"
    print("\n" + table)
    if args.write:
        heading = "## Milters: one accept-all milter against none (issue 15)"
        benchlib.write_section(benchlib.RESULTS, heading,
                               f"{heading}\n\n`python bench/bench_milter.py --rounds {args.rounds}`\n\n{table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
