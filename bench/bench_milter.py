"""A milter's cost: msgs/s and server CPU with no milter, one accept-all milter, and rspamd, in the same run.

Run:  python bench/bench_milter.py [--messages 3000] [--sessions 20] [--rounds 3] [--sizes 1k,100k] [--write]

Postfix's smtp-source ``-d -s 20`` (many messages per connection, no
pipelining) against ``fastsmtp serve --workers 1 --fsync batch``, with no
milter; with tests/testmilter.py in ``accept`` mode (our own milter, in
Python: it answers continue to every step and accept at the end) as a
process of its own; and with rspamd's proxy worker in milter mode
(tests/rspamdd.py: Debian's rspamd, offline, one scanning process, the
fields of milter_headers added to every message).  Interleaved, medians of
the rounds.  The server's CPU per message is its process tree's
utime+stime from /proc; the milter's is given apart.  Without rspamd
installed its column is left out.

Loopback only; every process is stopped by its PID; the roots live under
one temporary folder removed at the end.
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


def run(base: Path, mode: str, size: int, messages: int, sessions: int, rnd: int,
        rspamd: tuple[int, int] | None) -> dict[str, float]:
    """One run: ``mode`` is none, accept (our milter) or rspamd (its (port, pid))."""
    root = base / f"{mode}-{size}-{rnd}"
    box = root / "bench.example" / "bench"
    for sub in ("tmp", "new", "cur"):
        (box / sub).mkdir(parents=True)
    milter = None
    args: list[str] = []
    watched: int | None = None
    if mode == "accept":
        milter, endpoint = start_milter(root.with_suffix(".milter.log"))
        args, watched = ["--milter", endpoint], milter.pid
    elif mode == "rspamd":
        assert rspamd is not None
        args, watched = ["--milter", f"inet:127.0.0.1:{rspamd[0]}"], rspamd[1]
    try:
        proc, port, _ = benchlib.start_fastsmtp(root, root.with_suffix(".log"), "--workers", "1", "--fsync", "batch",
                                                "--log-level", "warning", *args)
        try:
            source = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
            cmd = [source, "-d", "-s", str(sessions), "-l", str(size), "-f", "s@bench.example", "-t", RCPT, "-m",
                   str(messages), f"127.0.0.1:{port}"]
            before = benchlib.tree_cpu(proc.pid)
            mbefore = benchlib.tree_cpu(watched) if watched else {}
            t = time.perf_counter()
            subprocess.run(cmd, check=True, timeout=600, stdout=subprocess.DEVNULL)
            elapsed = time.perf_counter() - t
            user, system = benchlib.cpu_delta(before, benchlib.tree_cpu(proc.pid))
            muser, msystem = benchlib.cpu_delta(mbefore, benchlib.tree_cpu(watched)) if watched else (0.0, 0.0)
            stored = len(list((box / "new").iterdir()))
        finally:
            benchlib.stop_server(proc)
    finally:
        if milter is not None:
            benchlib.stop_server(milter)
    if stored < messages:
        raise RuntimeError(f"{mode}: {stored} of {messages} messages stored")
    return {"rate": messages / elapsed, "cpu_us": (user + system) / messages * 1e6,
            "milter_us": (muser + msystem) / messages * 1e6}


def start_rspamd(home: Path) -> tuple[contextlib.ExitStack, tuple[int, int] | None]:
    """rspamd as tests/rspamdd.py starts it: (what stops it, (port, pid)), or None without rspamd."""
    sys.path.insert(0, str(benchlib.REPO / "tests"))
    import pytest
    from rspamdd import running_rspamd

    stack = contextlib.ExitStack()
    try:
        return stack, stack.enter_context(running_rspamd(home))
    except pytest.skip.Exception as exc:
        print(f"rspamd left out: {exc}", flush=True)
        return stack, None


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
    runs: dict[tuple[str, int], list[dict[str, float]]] = {}
    stack, rspamd = start_rspamd(base / "rspamd")
    modes = ["none", "accept"] + (["rspamd"] if rspamd else [])
    try:
        with stack:
            for rnd in range(args.rounds):
                for size in sizes:
                    for mode in (modes if rnd % 2 == 0 else modes[::-1]):
                        count = args.messages if size <= 4096 else max(args.messages // 4, 200)
                        r = run(base, mode, size, count, args.sessions, rnd, rspamd)
                        runs.setdefault((mode, size), []).append(r)
                        print(f"round {rnd + 1} {size // 1024} KiB {mode}: "
                              f"{r['rate']:,.0f} msgs/s, {r['cpu_us']:,.0f} µs/msg, milter {r['milter_us']:,.0f}",
                              flush=True)
    finally:
        shutil.rmtree(base, True)

    def med(rs: list[dict[str, float]], key: str) -> float:
        return benchlib.median(r[key] for r in rs)

    lines = [
        f"smtp-source -d -s {args.sessions}, one worker, --fsync batch, medians of {args.rounds} rounds "
        f"({benchlib.git_commit()}, {time.strftime('%Y-%m-%d')}):",
        "",
        "| size | milter | msgs/s | ratio to none | server CPU µs/msg | the milter's own CPU µs/msg |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for size in sizes:
        none = runs[("none", size)]
        for mode in modes:
            got = runs[(mode, size)]
            name = {"none": "none", "accept": "accept-all (tests/testmilter.py)", "rspamd": "rspamd 3.4"}[mode]
            lines.append(f"| {size // 1024} KiB | {name} | {med(got, 'rate'):,.0f} | "
                         f"{med(got, 'rate') / med(none, 'rate'):.2f}× | {med(got, 'cpu_us'):,.0f} | "
                         f"{med(got, 'milter_us'):,.0f} |")
    table = "\n".join(lines) + "\n"
    print("\n" + table)
    if args.write:
        heading = "## Milters: one accept-all milter and rspamd against none (issue 15)"
        benchlib.write_section(benchlib.RESULTS, heading,
                               f"{heading}\n\n`python bench/bench_milter.py --rounds {args.rounds}`\n\n{table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
