"""The two per-message costs outside the session: the log lines and the recipient lookup.

    python bench/bench_lookup_log.py [--lines N] [--lookups N] [--baseline REV]

Log lines: µs per line on the loop, the logging path the server used
(a fields dict, ``log.info(..., extra=...)``, TextFormatter/JsonFormatter,
a write and flush per line) against ``event_log()`` (a pre-built stamp, lines
of one loop iteration written together), both to the same --log-file
handler that ``setup_logging`` makes, inside a running loop that writes
``--per-iteration`` lines per iteration (default 20: 20 sessions).

Recipient lookup: system calls and µs per ``FolderRecipients.resolve()``,
today's module against the one at ``--baseline`` (read with ``git show``
from this checkout, and loaded beside it), for a hit, a hit with a tag, an
unknown user and a domain that is not local.  The Maildirs are left to
settle for MTIME_SLACK_NS first, as a running server's are.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import logging
import os
import subprocess
import sys
import tempfile
import time
import timeit
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from fastsmtp import policy  # noqa: E402
from fastsmtp._abnf import parse_rcpt_argument  # noqa: E402
from fastsmtp.events import Address  # noqa: E402
from fastsmtp.logs import event_log, setup_logging  # noqa: E402

#: The policy module before the one-lstat lookup.
BASELINE = "e1de444"

MESSAGE = ("queued", "4Xc9a1b2c3", "192.0.2.1", b"mail.client.example", b"sender@example.net",
           [b"alice@example.com", b"bob@example.com"], 1234, 250, 3)  # fmt: skip


# ---------------------------------------------------------------- log lines


def old_line(log: logging.Logger) -> None:
    """What server.py's _log_message did per message."""
    word, queue_id, client, helo, sender, rcpts, size, code, ms = MESSAGE
    if not log.isEnabledFor(logging.INFO):
        return
    fields = {
        "id": queue_id, "client": client, "helo": helo, "from": b"<" + sender + b">",
        "to": [b"<" + r + b">" for r in rcpts], "size": size, "code": code, "ms": ms,
    }  # fmt: skip
    log.info(word, extra={"fields": fields})


def new_line(log: logging.Logger) -> None:
    events = event_log()
    if events.enabled:
        events.message(*MESSAGE)


def per_line_us(write: Callable[[logging.Logger], None], lines: int, per_iteration: int) -> float:
    """µs per line, in a running loop, ``per_iteration`` lines per loop iteration."""
    log = logging.getLogger("fastsmtp")

    async def main() -> float:
        start = time.perf_counter()
        for _ in range(lines // per_iteration):
            for _ in range(per_iteration):
                write(log)
            await asyncio.sleep(0)  # the end of the iteration: the pending lines are written
        await asyncio.sleep(0)
        return time.perf_counter() - start

    return asyncio.run(main()) / lines * 1e6


def bench_logs(lines: int, per_iteration: int, repeat: int) -> None:
    print(f"log lines: µs per line, {per_iteration} lines per loop iteration, best of {repeat} x {lines}")
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("text", "json"):
            setup_logging("info", kind, os.path.join(tmp, f"{kind}.log"), "worker 1")
            old = min(per_line_us(old_line, lines, per_iteration) for _ in range(repeat))
            new = min(per_line_us(new_line, lines, per_iteration) for _ in range(repeat))
            print(f"  {kind:5}  logging path {old:7.2f}   event_log() {new:6.2f}   ({old / new:.1f}x)")
        setup_logging("warning", "text", os.path.join(tmp, "off.log"), "worker 1")
        off = min(per_line_us(new_line, lines, per_iteration) for _ in range(repeat))
        print(f"  --log-level warning: event_log() {off:.2f} µs per (skipped) line")


# ---------------------------------------------------------- recipient lookup


def load_baseline(rev: str) -> ModuleType | None:
    """fastsmtp.policy as it was at ``rev``, loaded beside today's (it imports fastsmtp's other modules)."""
    try:
        source = subprocess.run(
            ["git", "-C", str(HERE.parent), "show", f"{rev}:src/fastsmtp/policy.py"],
            capture_output=True, check=True, text=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"  (no baseline: {exc})")
        return None
    spec = importlib.util.spec_from_loader("fastsmtp._policy_baseline", loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "fastsmtp"
    exec(compile(source, f"{rev}:policy.py", "exec"), module.__dict__)
    return module


@contextmanager
def counting() -> Iterator[list[str]]:
    """Count the calls that are system calls (the policy makes no others): restored afterwards."""
    calls: list[str] = []
    names = ("stat", "lstat", "open", "scandir", "listdir", "access")
    saved = {name: getattr(os, name) for name in names}

    def wrap(name: str) -> Callable[..., Any]:
        real = saved[name]

        def counted(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            return real(*args, **kwargs)

        return counted

    try:
        for name in names:
            setattr(os, name, wrap(name))
        yield calls
    finally:
        for name, real in saved.items():
            setattr(os, name, real)


def addr(text: str) -> Address:
    address, _ = parse_rcpt_argument(b" TO:<" + text.encode() + b">")
    return address


CASES = [
    ("hit", "alice@example.com"),
    ("hit, tag", "alice+news@example.com"),
    ("hit, mixed-case domain", "u@example.org"),
    ("unknown user", "mallory@example.com"),
    ("not local", "u@elsewhere.example"),
]


def bench_lookup(lookups: int, rev: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "mail"
        users = [("example.com", "alice"), ("Example.ORG", "u")] + [("example.com", f"user{n}") for n in range(200)]
        for domain, user in users:
            (root / domain).mkdir(parents=True, exist_ok=True)
            policy.create_maildir(root / domain / user)
        # As on a running server: the folders are older than the times' granularity.
        time.sleep(policy.MTIME_SLACK_NS / 1e9 + 0.2)
        modules = [("today", policy)]
        baseline = load_baseline(rev)
        if baseline is not None:
            modules.insert(0, (f"at {rev}", baseline))
        print(f"recipient lookup: system calls and µs per resolve(), best of 5 x {lookups}")
        print(f"  {'':24}" + "".join(f"{name:>22}" for name, _ in modules))
        for label, text in CASES:
            address = addr(text)
            row = f"  {label:24}"
            for _, module in modules:
                resolver = module.FolderRecipients(root)
                resolver.resolve(address)  # warm: learns what it may remember
                with counting() as calls:
                    resolver.resolve(address)
                us = min(timeit.repeat(lambda: resolver.resolve(address), number=lookups, repeat=5)) / lookups * 1e6
                row += f"{len(calls):>8} calls {us:6.2f} µs"
            print(row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=20_000)
    parser.add_argument("--per-iteration", type=int, default=20)
    parser.add_argument("--lookups", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--baseline", default=BASELINE, help="git revision of the policy to compare with")
    args = parser.parse_args()
    bench_logs(args.lines, args.per_iteration, args.repeat)
    bench_lookup(args.lookups, args.baseline)


if __name__ == "__main__":
    main()
