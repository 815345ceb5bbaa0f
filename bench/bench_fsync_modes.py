"""End to end: the real server under --fsync off, batch and always, in ONE run.

For each mode a fresh mail root is made, ``fastsmtp serve`` is started with
that mode (and ``--greeting-delay 0``, see bench/benchlib.py), and the load
generator (bench/loadgen.py, in this process) sends 1 KiB messages over 50
pipelining sessions, many messages per connection.  Recorded per run:
messages/s, p50/p99 latency (end of content to 250), and the server's CPU
seconds per 1,000 messages from /proc/PID/task/TID/stat (utime + stime of all
its threads, read before and after the measured load).  Each run also checks
that the server stored exactly as many files as it acknowledged.

Rules of this benchmark (DESIGN.md, "Measuring on these machines"):
- The modes run interleaved (off, batch, always, off, ...) for ``--rounds``
  rounds, and medians are reported: the machine is shared and noisy.
- Nothing is deleted while measuring.  Every run writes into a new folder
  under one base folder; the base is removed only at the very end (or kept
  with ``--keep``), because creating files is up to ~20x slower on this
  ext4 for minutes after many deletions.
- Every run is bounded by a message count and a duration cap, and every
  server is stopped by its own PID.

The Markdown table is printed and written into bench/RESULTS.md as the
section "## Durable delivery: --fsync off / batch / always" (``--no-write``
skips that).

Run:  /tmp/venv/bin/python bench/bench_fsync_modes.py [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import benchlib  # bench/ is on sys.path: the script's own folder
from benchlib import create_probe, git_commit, median, thread_cpu

import loadgen  # bench/ is not a package

from fastsmtp.policy import add_mailbox

MODES = ("off", "batch", "always")
SECTION = "## Durable delivery: --fsync off / batch / always"
RESULTS = benchlib.RESULTS
DOMAIN = "bench.example"
USERS = 10  # recipients cycle over 10 maildirs, so a batch touches 10 new/ folders


@dataclass
class RunResult:
    mode: str
    round: int
    result: loadgen.Result
    server_cpu_s: float
    roles_cpu_s: dict[str, float]  # CPU seconds by thread role (ROLES)
    workers: int  # worker processes seen
    client_cpu_s: float
    stored: int  # files in new/ after the run (warm-up included)
    expected: int  # 250s received (warm-up included)
    stop_s: float  # SIGTERM to exit
    exit_code: int | None
    batch_sizes: dict[int, int] | None  # commit batch size -> batches (whole server life)
    notes: list[str] = field(default_factory=list)

    @property
    def cpu_per_1k(self) -> float:
        n = self.result.accepted
        return 1000 * self.server_cpu_s / n if n else float("nan")


ROLES = ("loop", "committer", "other", "supervisor")


def split_roles(root: int, before: dict[tuple[int, int], float],
                after: dict[tuple[int, int], float]) -> dict[str, float]:
    """CPU seconds of the server's threads between two snapshots, by role.

    Python 3.11 does not name its threads for the OS, so roles are told
    apart by shape: in every worker process the event loop runs on the main
    thread (tid == pid) and the busiest other thread is the Maildir
    committer; the rest are the fsync pool and helpers.  The supervisor is
    the root process when it has workers (with ``--workers 0`` the root is
    the worker).
    """
    delta = {key: cpu - before.get(key, 0.0) for key, cpu in after.items()}
    pids = {pid for pid, _ in delta}
    roles = dict.fromkeys(ROLES, 0.0)
    if len(pids) > 1:
        roles["supervisor"] = sum(v for (pid, _), v in delta.items() if pid == root)
        pids.discard(root)
    for pid in pids:
        threads = {tid: v for (p, tid), v in delta.items() if p == pid}
        roles["loop"] += threads.pop(pid, 0.0)
        others = sorted(threads.values(), reverse=True)
        roles["committer"] += others[0] if others else 0.0
        roles["other"] += sum(others[1:])
    return roles


# The server does not report its commit batch sizes.  This wrapper is
# ``python -m fastsmtp`` plus one thing: when a worker's store (the Maildir
# writer, or the journal of --fsync batch) closes at the end of the graceful
# stop, its in-process ``stats`` are written to $FASTSMTP_BENCH_STATS.<pid>.
# Without such a store (an older tree) it is plain ``python -m fastsmtp``.
_SERVER_SHIM = """
import importlib, json, os, sys
def wrap(module, name):
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return
    _close = cls.close
    def close(self):
        _close(self)
        stats = getattr(self, "stats", None)
        if isinstance(stats, dict):
            with open(os.environ["FASTSMTP_BENCH_STATS"] + "." + str(os.getpid()), "w") as f:
                json.dump({k: (dict(v) if isinstance(v, dict) else v) for k, v in stats.items()}, f)
    cls.close = close
wrap("fastsmtp.maildir", "MaildirWriter")
wrap("fastsmtp.journalstore", "JournalStore")
from fastsmtp.cli import main
sys.exit(main(sys.argv[1:]))
"""


def start_server(root: Path, mode: str, loop: str, workers: int | None) -> tuple[subprocess.Popen[bytes], int, Path]:
    log_path = root.parent / "server.log"
    proc, port, _ = benchlib.start_fastsmtp(
        root, log_path, "--hostname", "mx.bench.example", "--fsync", mode, "--loop", loop,
        *(["--workers", str(workers)] if workers is not None else []),
        launcher=("-c", _SERVER_SHIM), env={"FASTSMTP_BENCH_STATS": str(root.parent / "stats.json")},
    )
    return proc, port, log_path


def count_stored(root: Path) -> int:
    return sum(len(os.listdir(root / DOMAIN / f"user{u}" / "new")) for u in range(USERS))


def run_one(base: Path, rnd: int, mode: str, args: argparse.Namespace) -> RunResult:
    root = base / f"r{rnd}-{mode}" / "mail"
    root.mkdir(parents=True)
    for u in range(USERS):
        add_mailbox(str(root), f"user{u}@{DOMAIN}")
    proc, port, log_path = start_server(root, mode, args.loop, args.workers)
    notes: list[str] = []
    try:
        common = dict(
            host="127.0.0.1", port=port, connections=args.connections, size=args.size,
            per_connection=args.per_connection, pipelining=not args.no_pipelining,
            to=[f"user{u}@{DOMAIN}" for u in range(USERS)], timeout=30.0,
        )
        warm = loadgen.run_sync(
            loadgen.Options(messages=args.warmup, duration=10.0, **common), args.loop  # type: ignore[arg-type]
        ) if args.warmup else loadgen.Result()
        threads0, client0 = thread_cpu(proc.pid), time.process_time()
        res = loadgen.run_sync(
            loadgen.Options(messages=args.messages, duration=args.duration, **common), args.loop  # type: ignore[arg-type]
        )
        threads1, client1 = thread_cpu(proc.pid), time.process_time()
        workers = max(len({pid for pid, _ in threads1}) - 1, 1)
    finally:
        stop_s, code = benchlib.stop_server(proc)
    stored, expected = count_stored(root), warm.accepted + res.accepted
    if stored != expected:
        notes.append(f"stored {stored} files but {expected} messages were acknowledged")
    if res.failures or warm.failures:
        notes.append(f"failures: 4xx {res.temp_failures}, 5xx {res.perm_failures}, "
                     f"connection errors {res.connection_errors} {res.errors}")
    if code != 0:
        notes.append(f"server exit code {code} after SIGTERM ({stop_s:.1f} s)")
    for line in log_path.read_text(errors="replace").splitlines():
        if re.search(r"ERROR|CRITICAL|Traceback|Exception", line):
            notes.append(f"server log: {line.strip()[:200]}")
    roles = split_roles(proc.pid, threads0, threads1)
    sizes = read_batch_sizes(root.parent)
    return RunResult(mode, rnd, res, sum(roles.values()), roles, workers, client1 - client0, stored, expected,
                     stop_s, code, sizes, notes)


def read_batch_sizes(folder: Path) -> dict[int, int] | None:
    """Batch sizes summed over the workers' stats files (one per worker process)."""
    total: dict[int, int] = {}
    found = False
    for path in folder.glob("stats.json.*"):
        try:
            stats = json.loads(path.read_text())
            for k, v in stats["batch_sizes"].items():
                total[int(k)] = total.get(int(k), 0) + int(v)
            found = True
        except (OSError, ValueError, KeyError, AttributeError, TypeError):
            continue
    return total if found else None


def batch_summary(sizes: dict[int, int] | None) -> str:
    """Batches, mean size, the size the median message was committed in, max."""
    if not sizes:
        return "n/a"
    batches = sum(sizes.values())
    messages = sum(k * v for k, v in sizes.items())
    half, seen, by_message = messages / 2, 0, 0
    for size in sorted(sizes):
        seen += size * sizes[size]
        if seen >= half:
            by_message = size
            break
    return f"{batches:,} batches, mean {messages / batches:.1f}, median message in a batch of {by_message}, max {max(sizes)}"


# -- report ------------------------------------------------------------------------


def report(runs: list[RunResult], args: argparse.Namespace, command: str, wall: float,
           probes: tuple[float, float]) -> str:
    by_mode = {m: [r for r in runs if r.mode == m] for m in MODES}
    med = {
        m: {
            "rate": median([r.result.messages_per_s for r in rs]),
            "p50": median([r.result.latency_ms["p50"] for r in rs]),
            "p99": median([r.result.latency_ms["p99"] for r in rs]),
            "cpu": median([r.cpu_per_1k for r in rs]),
            "client": median([1000 * r.client_cpu_s / max(r.result.accepted, 1) for r in rs]),
            "roles": {k: median([1000 * r.roles_cpu_s[k] / max(r.result.accepted, 1) for r in rs]) for k in ROLES},
        }
        for m, rs in by_mode.items()
    }
    batch_always = med["batch"]["rate"] / med["always"]["rate"]
    batch_off = med["batch"]["rate"] / med["off"]["rate"]
    now = datetime.datetime.now(datetime.timezone.utc)
    workers = sorted({r.workers for r in runs})
    workers_text = "/".join(map(str, workers))
    flags = (f"--fsync MODE --loop {args.loop} {' '.join(benchlib.FASTSMTP_BENCH_FLAGS)}"
             + (f" --workers {args.workers}" if args.workers is not None else ""))
    lines = [
        SECTION,
        "",
        f"Date: {now:%Y-%m-%d %H:%M} UTC. Commit: `{git_commit()}`. "
        f"Machine: nproc {os.cpu_count()}, Linux {platform.release()}, Python {platform.python_version()}.",
        "",
        "Command:",
        "",
        f"    {command}",
        "",
        f"Each run: a fresh mail root with {USERS} mailboxes, `fastsmtp serve {flags}` "
        f"({workers_text} worker process(es)"
        f"{'' if args.workers is not None else ', the default'}), "
        "and bench/loadgen.py in the benchmark's process: "
        f"{args.connections} concurrent sessions, "
        f"{'pipelining (RFC 2920)' if not args.no_pipelining else 'no pipelining'}, "
        f"{args.size}-byte messages, 1 recipient each (cycling over the mailboxes), "
        f"{args.per_connection} messages per connection, {args.messages} messages "
        f"(capped at {args.duration:g} s) after a {args.warmup}-message warm-up. "
        f"{args.rounds} rounds, modes interleaved; the table gives medians. "
        "Latency is from the end of the content write to the 250. Server CPU is "
        "utime+stime of every thread of the server's processes (supervisor and workers) "
        f"from /proc/PID/task/TID/stat over the measured load. Total run time {wall:.0f} s.",
        "",
        "| --fsync | messages/s | p50 latency | p99 latency | server CPU s / 1k msgs | loadgen CPU s / 1k msgs |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for m in MODES:
        x = med[m]
        lines.append(f"| {m} | {x['rate']:,.0f} | {x['p50']:.1f} ms | {x['p99']:.1f} ms | "
                     f"{x['cpu']:.3f} | {x['client']:.3f} |")
    lines += [
        "",
        "Server CPU by thread role (median s / 1k messages, summed over the workers): each "
        "worker's event-loop thread, its busiest other thread (the Maildir committer), its "
        "remaining threads (the fsync pool), and the supervisor process:",
        "",
        "| --fsync | event loops | committers | other threads | supervisor |",
        "|---|---:|---:|---:|---:|",
    ]
    for m in MODES:
        t = med[m]["roles"]
        lines.append(f"| {m} | {t['loop']:.3f} | {t['committer']:.3f} | {t['other']:.3f} | {t['supervisor']:.3f} |")
    lines += [
        "",
        f"- batch / always: **{batch_always:.2f}×** (goal ≥ 5×: "
        f"{'met' if batch_always >= 5 else 'not met'}).",
        f"- batch / off: **{batch_off:.2f}** (goal ≥ 0.5: {'met' if batch_off >= 0.5 else 'not met'}).",
        "- Commit batch sizes: the server does not expose them. They were read from the "
        "in-process `MaildirWriter.stats` by a wrapper that starts the server as "
        "`python -m fastsmtp` does and dumps those stats when the writer closes; they cover "
        "the server's whole life, warm-up included (round by round below).",
        f"- File-system state: creating a 1 KiB file in a new folder took {probes[0]:.3f} ms "
        f"before the runs and {probes[1]:.3f} ms after them.",
        "",
        "Every run:",
        "",
        "| round | --fsync | messages/s | p50 | p99 | max | server CPU s / 1k | stored = acknowledged | commit batches |",
        "|---:|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in runs:
        lat = r.result.latency_ms
        ok = "yes" if r.stored == r.expected else f"**no: {r.stored} vs {r.expected}**"
        lines.append(f"| {r.round} | {r.mode} | {r.result.messages_per_s:,.0f} | {lat['p50']:.1f} ms | "
                     f"{lat['p99']:.1f} ms | {lat['max']:.1f} ms | {r.cpu_per_1k:.3f} | {ok} | "
                     f"{batch_summary(r.batch_sizes)} |")
    notes = [f"round {r.round}, {r.mode}: {n}" for r in runs for n in r.notes]
    lines += ["", "Anomalies: " + ("none (no failures, no server errors, every server stopped with exit 0)."
                                   if not notes else "")]
    lines += [f"- {n}" for n in notes]
    if any("greeting 421" in n for n in notes):
        lines += [
            "",
            f"A greeting 421 is the server's per-client-address connection limit refusing a "
            f"reconnect; the load generator never holds more than {args.connections} connections "
            "at once (it reconnects only after QUIT and close), and the refused connection is "
            "retried, so no message is lost or counted twice.",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer messages per run (well under 2 minutes)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--messages", type=int, default=None, help="per run (default 10000; --quick 2000)")
    ap.add_argument("--duration", type=float, default=None, help="cap per run in s (default 20; --quick 5)")
    ap.add_argument("--warmup", type=int, default=None, help="messages before measuring (default 500; --quick 200)")
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--per-connection", type=int, default=100)
    ap.add_argument("--no-pipelining", action="store_true")
    ap.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    ap.add_argument("--workers", type=int, default=None, help="passed to the server (default: its own default)")
    ap.add_argument("--dir", default=None, help="parent folder for the mail roots (default: system tmp)")
    ap.add_argument("--keep", action="store_true", help="leave the mail roots in place")
    ap.add_argument("--no-write", action="store_true", help=f"do not update {RESULTS.name}")
    args = ap.parse_args(argv)
    if args.messages is None:
        args.messages = 2000 if args.quick else 10_000
    if args.duration is None:
        args.duration = 5.0 if args.quick else 20.0
    if args.warmup is None:
        args.warmup = 200 if args.quick else 500
    given = sys.argv[1:] if argv is None else argv
    command = shlex.join([sys.executable, "bench/bench_fsync_modes.py", *given])

    started = time.monotonic()
    base = Path(tempfile.mkdtemp(prefix="fastsmtp-fsync-modes-", dir=args.dir))
    runs: list[RunResult] = []
    try:
        probe_before = create_probe(base / "probe-before")
        for rnd in range(1, args.rounds + 1):
            for mode in MODES:
                r = run_one(base, rnd, mode, args)
                runs.append(r)
                lat = r.result.latency_ms
                print(f"round {rnd} {mode:>6}: {r.result.messages_per_s:8,.0f} msg/s  p50 {lat['p50']:6.1f} ms  "
                      f"p99 {lat['p99']:6.1f} ms  server CPU {r.cpu_per_1k:.3f} s/1k "
                      f"(loop {1000 * r.roles_cpu_s['loop'] / max(r.result.accepted, 1):.3f}, "
                      f"committer {1000 * r.roles_cpu_s['committer'] / max(r.result.accepted, 1):.3f}, "
                      f"{r.workers} worker(s))  "
                      f"stored {r.stored}/{r.expected}  batches: {batch_summary(r.batch_sizes)}"
                      + ("  " + "; ".join(r.notes) if r.notes else ""),
                      flush=True)
        probe_after = create_probe(base / "probe-after")
        section = report(runs, args, command, time.monotonic() - started, (probe_before, probe_after))
        print()
        print(section)
        if not args.no_write:
            benchlib.write_section(RESULTS, SECTION, section)  # re-reads the file right before writing
            print(f"written to {RESULTS}")
    finally:
        # Deleting only now, after every measurement (see the module docstring).
        if args.keep:
            print(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
