"""LMTP delivery's cost, and one host against two: msgs/s and CPU per message, in the same run.

Run:  python bench/bench_lmtp.py [--messages 2000] [--sessions 20] [--rounds 3] [--write]

Postfix's smtp-source ``-d -s 20`` (many 1 KiB messages per connection),
against:

- ``maildir``: ``fastsmtp serve --workers 1`` delivering into new/, the
  reference;
- ``lmtp``: the same with ``--deliver lmtp:127.0.0.1:PORT`` to a Dovecot
  of tests/dovecotlmtp.py (its LMTP, quota and Sieve on; it flushes each
  message it takes, as it does by default);
- ``cluster 1`` and ``cluster 2``: HAProxy (PROXY v2) in front of one, then
  two fastsmtp hosts (127.0.0.11 and .12, one worker each, each with its
  own journal), delivering to a Dovecot LMTP proxy and its two backends.

A run ends when the last message is in the backend's Maildir (or new/),
so msgs/s counts delivery, not only the 250s.  CPU µs/msg is fastsmtp's
process trees (utime+stime from /proc); Dovecot's (every process of its
masters' trees) is given apart.  Both share this machine's 2 cores with
the client, HAProxy and each other: two hosts here cannot be twice one.

Loopback only; every process is stopped by its PID; the roots live under
one temporary folder removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import benchlib

sys.path.insert(0, str(benchlib.REPO / "tests"))

RCPT = "alice@example.com"
ADDRESSES = ["127.0.0.11", "127.0.0.12"]


def _host(root: Path, log: Path, address: str | None, target: str) -> tuple[subprocess.Popen[bytes], int]:
    port = benchlib.free_port()
    listen = f"{address or benchlib.HOST}:{port}"
    args = ["--workers", "1", "--fsync", "batch", "--log-level", "warning", "--listen", listen]
    if target != "maildir":
        args += ["--deliver", target]
    if address is not None:
        args += ["--proxy-trusted", "127.0.0.1/32"]
    cmd = benchlib.fastsmtp_command(root, *args)
    proc = benchlib.launch(cmd, log)
    deadline = time.monotonic() + 30
    while "listening on" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("fastsmtp did not start:\n" + log.read_text())
        time.sleep(0.05)
    return proc, port


@contextlib.contextmanager
def _haproxy(base: Path, hosts: list[tuple[str, int]]) -> Iterator[int]:
    from test_cluster import _haproxy as start

    port = benchlib.free_port()
    proc = start(base, port, hosts)
    try:
        yield port
    finally:
        benchlib.stop_server(proc)


def _count(folders: list[Path]) -> int:
    return sum(len(list(f.iterdir())) for f in folders if f.is_dir())


def run(base: Path, mode: str, messages: int, sessions: int, rnd: int, dovecot: object, proxy: object
        ) -> dict[str, float]:
    root = base / f"{mode.replace(' ', '')}-{rnd}"
    procs: list[subprocess.Popen[bytes]] = []
    stack = contextlib.ExitStack()
    try:
        if mode == "maildir" or mode == "lmtp":
            for sub in ("tmp", "new", "cur"):
                (root / "example.com" / "alice" / sub).mkdir(parents=True)
            target = "maildir" if mode == "maildir" else dovecot.tcp_target  # type: ignore[attr-defined]
            proc, port = _host(root, root.with_suffix(".log"), None, target)
            procs.append(proc)
            address = benchlib.HOST
            if mode == "maildir":
                folders = [root / "example.com" / "alice" / "new"]
            else:
                box = dovecot.maildir(RCPT)  # type: ignore[attr-defined]
                folders = [box / "new", box / "cur"]
            watched = [dovecot.proc.pid] if mode == "lmtp" else []  # type: ignore[attr-defined]
        else:
            n = int(mode.split()[-1])
            hosts = []
            for i in range(n):
                host_root = root / f"host{i}"
                host_root.mkdir(parents=True)
                proc, port = _host(host_root, root.with_suffix(f".{i}.log"), ADDRESSES[i],
                                   proxy.proxy.tcp_target)  # type: ignore[attr-defined]
                procs.append(proc)
                hosts.append((ADDRESSES[i], port))
            port = stack.enter_context(_haproxy(root.parent, hosts))
            address = "127.0.0.10"
            backend = proxy.backend_of(RCPT)  # type: ignore[attr-defined]
            box = backend.maildir(RCPT)
            folders = [box / "new", box / "cur"]
            watched = [proxy.proxy.proc.pid, *(b.proc.pid for b in proxy.backends)]  # type: ignore[attr-defined]
        already = _count(folders)
        source = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
        cmd = [source, "-d", "-s", str(sessions), "-l", "1024", "-f", "s@example.net", "-t", RCPT, "-m",
               str(messages), f"{address}:{port}"]
        before = [benchlib.tree_cpu(p.pid) for p in procs]
        dbefore = [benchlib.tree_cpu(p) for p in watched]
        t = time.perf_counter()
        subprocess.run(cmd, check=True, timeout=600, stdout=subprocess.DEVNULL)
        accepted = time.perf_counter() - t
        deadline = time.monotonic() + 300
        while _count(folders) - already < messages and time.monotonic() < deadline:
            time.sleep(0.01)
        elapsed = time.perf_counter() - t
        got = _count(folders) - already
        cpu = sum(sum(benchlib.cpu_delta(b, benchlib.tree_cpu(p.pid))) for b, p in zip(before, procs))
        dcpu = sum(sum(benchlib.cpu_delta(b, benchlib.tree_cpu(p))) for b, p in zip(dbefore, watched))
    finally:
        stack.close()
        for proc in procs:
            benchlib.stop_server(proc)
    if got < messages:
        raise RuntimeError(f"{mode}: {got} of {messages} messages delivered")
    return {"rate": messages / elapsed, "accept_rate": messages / accepted, "cpu_us": cpu / messages * 1e6,
            "dovecot_us": dcpu / messages * 1e6}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args(argv)
    import pytest
    from dovecotlmtp import running_lmtp_dovecot, running_proxy

    base = Path(tempfile.mkdtemp(prefix="bench-lmtp-"))
    modes = ["maildir", "lmtp", "cluster 1", "cluster 2"]
    runs: dict[str, list[dict[str, float]]] = {}
    try:
        with contextlib.ExitStack() as stack:
            try:
                dovecot = stack.enter_context(running_lmtp_dovecot(imap=False))
                proxy = stack.enter_context(running_proxy())
            except pytest.skip.Exception as exc:
                print(f"skipped: {exc}")
                return 0
            for rnd in range(args.rounds):
                for mode in (modes if rnd % 2 == 0 else modes[::-1]):
                    r = run(base, mode, args.messages, args.sessions, rnd, dovecot, proxy)
                    runs.setdefault(mode, []).append(r)
                    print(f"round {rnd + 1} {mode}: {r['rate']:,.0f} msgs/s delivered ({r['accept_rate']:,.0f} "
                          f"acknowledged), fastsmtp {r['cpu_us']:,.0f} µs/msg, Dovecot {r['dovecot_us']:,.0f}",
                          flush=True)
    finally:
        shutil.rmtree(base, True)

    def med(mode: str, key: str) -> float:
        return benchlib.median(r[key] for r in runs[mode])

    lines = [
        f"smtp-source -d -s {args.sessions}, {args.messages} messages of 1 KiB, one worker per host, medians of "
        f"{args.rounds} rounds ({benchlib.git_commit()}, {time.strftime('%Y-%m-%d')}); a run ends when the last "
        "message is in the mailbox:",
        "",
        "| delivery | msgs/s delivered | msgs/s acknowledged | ratio to maildir | fastsmtp CPU µs/msg | "
        "Dovecot CPU µs/msg |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    names = {"maildir": "Maildir (new/)", "lmtp": "LMTP to one Dovecot",
             "cluster 1": "HAProxy → 1 host → Dovecot proxy → 2 backends",
             "cluster 2": "HAProxy → 2 hosts → Dovecot proxy → 2 backends"}
    for mode in modes:
        lines.append(f"| {names[mode]} | {med(mode, 'rate'):,.0f} | {med(mode, 'accept_rate'):,.0f} | "
                     f"{med(mode, 'rate') / med('maildir', 'rate'):.2f}× | {med(mode, 'cpu_us'):,.0f} | "
                     f"{med(mode, 'dovecot_us'):,.0f} |")
    table = "\n".join(lines) + "\n"
    print("\n" + table)
    if args.write:
        heading = "## LMTP delivery and a cluster of two hosts (issue 16)"
        benchlib.write_section(benchlib.RESULTS, heading,
                               f"{heading}\n\n`python bench/bench_lmtp.py --rounds {args.rounds}`\n\n{table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
