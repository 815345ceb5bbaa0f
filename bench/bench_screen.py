"""Screening's cost: one connection per message, on the defaults against --greeting-delay 0.

Run:  python bench/bench_screen.py [--messages 2000] [--sessions 20] [--rounds 3] [--write]

Postfix's smtp-source without ``-d`` opens one connection per message, as
senders that deliver one message at a time do; ``-s 20`` keeps 20 of them
open at once; 1 KiB messages.  Every configuration runs ``fastsmtp serve
--workers 1 --fsync batch`` on a fresh mail root, in the same run,
interleaved, in another order each round; medians of the rounds:

- ``defaults``: everything at its default.  The client, 127.0.0.1, is in
  the trusted networks (loopback by default): no greeting delay, no limit.
- ``delay 0``: ``--greeting-delay 0``, the reference.
- ``remembered``: nothing trusted (``--trusted-networks 192.0.2.0/24``; the
  authentication checks off, as they are for a trusted client), the
  default 0.5 s delay and its memory: the start-up probe's connection
  passes the greeting test once, and every connection after it is a
  returning client, looked up in the shared memory.
- ``untrusted, not remembered``: the same with ``--greeting-pass-ttl 0``:
  every connection waits out the 0.5 s delay, as every connection did
  before the memory existed.

Messages/s is smtp-source's count over its time; CPU µs/msg is the
server's process tree (utime+stime from /proc) over the same messages.

Loopback only; every process is stopped by its PID; the roots live under
one temporary folder removed at the end.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchlib

RCPT = "bench@bench.example"
# An untrusted client's mail would also be checked for SPF, DKIM, DMARC and
# ARC (bench_auth.py measures those): off here, and a resolver on a closed
# loopback port, so that only the screening is measured and no DNS question
# leaves the machine.
UNTRUSTED = ("--trusted-networks", "192.0.2.0/24", "--greeting-delay", "0.5", "--spf", "off", "--dkim", "off",
             "--dmarc", "off", "--arc", "off", "--dns-server", "127.0.0.1:9")
CONFIGS: dict[str, tuple[str, ...]] = {
    "defaults": ("--greeting-delay", "0.5"),  # the flag benchlib turns off, back at its default
    "delay 0": ("--greeting-delay", "0"),
    "remembered": UNTRUSTED,
    "untrusted, not remembered": (*UNTRUSTED, "--greeting-pass-ttl", "0"),
}


EXPLAINED = """\
- `defaults` and `delay 0` differ only in a setting that a trusted client
  never meets: their difference is the machine's noise between runs (2
  shared cores), and so is `remembered`'s. A remembered client's screening
  is one lookup in the worker's memory (~0.3 µs, tests/test_screenstore.py
  prints it): no measurable cost.
- `untrusted, not remembered` is what every connection-per-message sender
  got before, on the defaults: each connection waits 0.5 s, so 20 sessions
  give ~40 msgs/s. Its CPU per message is not comparable with the others:
  the server is idle most of that run.
"""


def run(base: Path, name: str, messages: int, sessions: int, rnd: int) -> dict[str, float]:
    root = base / f"{name.replace(' ', '_').replace(',', '')}-{rnd}"
    box = root / "bench.example" / "bench"
    for sub in ("tmp", "new", "cur"):
        (box / sub).mkdir(parents=True)
    log = root.with_suffix(".log")
    proc, port, _ = benchlib.start_fastsmtp(root, log, "--workers", "1", "--fsync", "batch",
                                            "--log-level", "warning", *CONFIGS[name])
    try:
        source = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
        cmd = [source, "-s", str(sessions), "-l", "1024", "-f", "s@bench.example", "-t", RCPT, "-m",
               str(messages), f"127.0.0.1:{port}"]
        before = benchlib.tree_cpu(proc.pid)
        t = time.perf_counter()
        subprocess.run(cmd, check=True, timeout=600, stdout=subprocess.DEVNULL)
        elapsed = time.perf_counter() - t
        user, system = benchlib.cpu_delta(before, benchlib.tree_cpu(proc.pid))
    finally:
        benchlib.stop_server(proc)
    stored = len(list((box / "new").iterdir()))
    if stored < messages:
        raise RuntimeError(f"{name}: {stored} of {messages} messages stored")
    return {"rate": messages / elapsed, "cpu_us": (user + system) / messages * 1e6}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--slow-messages", type=int, default=200,
                    help="messages for the configuration whose every connection waits 0.5 s")
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--write", action="store_true", help="write the table into bench/RESULTS.md")
    args = ap.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="bench-screen-"))
    names = list(CONFIGS)
    runs: dict[str, list[dict[str, float]]] = {}
    try:
        for rnd in range(args.rounds):
            for name in names[rnd % len(names):] + names[:rnd % len(names)]:
                count = args.slow_messages if name.endswith("not remembered") else args.messages
                r = run(base, name, count, args.sessions, rnd)
                runs.setdefault(name, []).append(r)
                print(f"round {rnd + 1} {name}: {r['rate']:,.0f} msgs/s, {r['cpu_us']:,.0f} µs/msg", flush=True)
    finally:
        shutil.rmtree(base, True)
    rate = {n: benchlib.median(r["rate"] for r in runs[n]) for n in names}
    cpu = {n: benchlib.median(r["cpu_us"] for r in runs[n]) for n in names}
    lines = [
        f"smtp-source -s {args.sessions} -l 1024 (one connection per message, no -d), one worker, --fsync batch, "
        f"medians of {args.rounds} rounds ({benchlib.git_commit()}, {time.strftime('%Y-%m-%d')}):",
        "",
        "| configuration | msgs/s | ÷ delay 0 | server CPU µs/msg |",
        "|---|---:|---:|---:|",
    ]
    for n in names:
        lines.append(f"| {n} | {rate[n]:,.0f} | {rate[n] / rate['delay 0']:.2f}× | {cpu[n]:,.0f} |")
    table = "\n".join(lines) + "\n"
    print("\n" + table)
    if args.write:
        heading = "## Screening: one connection per message, defaults against --greeting-delay 0 (issue 14)"
        body = (f"{heading}\n\n`python bench/bench_screen.py --messages {args.messages} --rounds {args.rounds}`\n\n"
                + table + "\n" + EXPLAINED)
        benchlib.write_section(benchlib.RESULTS, heading, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
