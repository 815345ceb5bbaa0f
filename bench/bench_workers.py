"""End to end: the real server with 1 and with 2 workers, in ONE run.

For each run a fresh mail root is made, ``fastsmtp serve --workers N
--fsync batch --greeting-delay 0`` (or ``--fsync MODE``) is started, and the
load generator (bench/loadgen.py, in this process) sends 1 KiB messages over
50 sessions.  Recorded per run: messages/s, p50/p99 latency, the server's CPU
seconds per 1,000 messages (utime + stime of the supervisor and every worker
thread, from /proc/PID/task/TID/stat, before and after the measured load; see
bench/benchlib.py) and the load generator's own CPU, which runs on the same
two cores.

Rules (DESIGN.md, "Measuring on these machines"):
- The worker counts run interleaved (1, 2, 2, 1, 1, 2, ...) for
  ``--rounds`` rounds; medians are reported.
- Nothing is deleted while measuring: each run writes into a new folder
  under one base folder, removed only at the very end.
- Every run is bounded (message count and duration cap) and every server
  is stopped by its own PID.

Run:  /tmp/venv/bin/python bench/bench_workers.py [--rounds 5] [--messages 10000]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import benchlib  # bench/ is on sys.path: the script's own folder
import loadgen  # bench/ is not a package

from fastsmtp.policy import add_mailbox

DOMAIN = "bench.example"
USERS = 10


def tree_cpu(root: int) -> float:
    """CPU seconds (user + system) of ``root`` and its workers, all live threads."""
    return sum(benchlib.thread_cpu(root).values())


def one_run(base: Path, index: int, workers: int, messages: int, fsync: str) -> dict[str, float]:
    root = base / f"run-{index}-w{workers}"
    root.mkdir(parents=True)
    to = [f"u{i}@{DOMAIN}" for i in range(USERS)]
    for address in to:
        add_mailbox(str(root), address)
    proc, port, _ = benchlib.start_fastsmtp(
        root, base / f"run-{index}-w{workers}.log",
        "--hostname", "bench.test", "--workers", str(workers), "--fsync", fsync, "--log-level", "warning",
    )
    try:
        common = dict(host="127.0.0.1", port=port, connections=50, size=1024, pipelining=True, to=to)
        loadgen.run_sync(loadgen.Options(messages=500, duration=10, **common))  # type: ignore[arg-type]
        cpu0 = tree_cpu(proc.pid)
        mine0 = resource.getrusage(resource.RUSAGE_SELF)
        result = loadgen.run_sync(loadgen.Options(messages=messages, duration=30, **common))  # type: ignore[arg-type]
        mine1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu1 = tree_cpu(proc.pid)
    finally:
        benchlib.stop_server(proc, timeout=40)  # our own child, by its PID
    accepted = max(result.accepted, 1)
    return {
        "workers": workers,
        "rate": result.messages_per_s,
        "p50": result.latency_ms.get("p50", 0.0),
        "p99": result.latency_ms.get("p99", 0.0),
        "server_cpu": (cpu1 - cpu0) / accepted * 1000,
        "loadgen_cpu": ((mine1.ru_utime + mine1.ru_stime) - (mine0.ru_utime + mine0.ru_stime)) / accepted * 1000,
        "failures": result.failures,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--fsync", choices=("batch", "always", "off"), default="batch")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="fastsmtp-bench-workers-", dir=os.environ.get("BENCH_DIR", "/tmp")))
    runs: list[dict[str, float]] = []
    began = time.monotonic()
    load0 = os.getloadavg()  # other work on the machine shows here
    try:
        for r in range(args.rounds):
            order = (1, 2) if r % 2 == 0 else (2, 1)
            for workers in order:
                run = one_run(base, len(runs), workers, args.messages, args.fsync)
                runs.append(run)
                print(
                    f"round {r + 1} workers {workers}: {run['rate']:,.0f} msg/s, p50 {run['p50']:.1f} ms, "
                    f"p99 {run['p99']:.1f} ms, server CPU {run['server_cpu']:.3f} s/1k, "
                    f"loadgen CPU {run['loadgen_cpu']:.3f} s/1k, failures {run['failures']:.0f}",
                    flush=True,
                )
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"\ntotal {time.monotonic() - began:.0f} s; load average before {load0}, after {os.getloadavg()}\n")
    print("| workers | messages/s | p50 latency | p99 latency | server CPU s / 1k msgs | loadgen CPU s / 1k msgs |")
    print("|---:|---:|---:|---:|---:|---:|")
    for workers in (1, 2):
        mine = [run for run in runs if run["workers"] == workers]

        def med(key: str) -> float:
            return benchlib.median(run[key] for run in mine)

        print(
            f"| {workers} | {med('rate'):,.0f} | {med('p50'):.1f} ms | {med('p99'):.1f} ms | "
            f"{med('server_cpu'):.3f} | {med('loadgen_cpu'):.3f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
