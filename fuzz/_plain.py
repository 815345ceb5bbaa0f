"""A plain-Python stand-in for libFuzzer, for machines without atheris.

The harnesses run under atheris when it is installed (coverage-guided).
Without it, or with ``--plain``, they run here instead: every seed of the
corpus once, then random mutations of the seeds, with no coverage feedback.
That finds much less, but it runs anywhere, it is deterministic for a given
``-seed`` (which is what the CI smoke test needs), and it calls the very
same ``check()`` function, so whatever it finds reproduces under atheris.

The flags are a subset of libFuzzer's, spelled the same way:
``-runs=N``, ``-seed=N``, ``-max_total_time=SECONDS``, ``-max_len=N``; other
``-flags`` are ignored, and any other argument is a corpus file or folder.
A crashing input is written to ``crash-<sha1>`` (or ``-artifact_prefix``),
as libFuzzer does, before the exception propagates.
"""

from __future__ import annotations

import hashlib
import os
import random
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

__all__ = ["load_corpus", "mutate", "run", "main"]

# Octet strings that matter to SMTP parsing.  Random octets almost never
# form a command or a terminator, so mutations splice these in instead.
TOKENS = [
    b"\r\n", b"\r", b"\n", b".", b"\r\n.\r\n", b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n",
    b"\r\n..", b".\r\n", b"\x00", b"\xff", b"\xc3\xa9", b" ", b"<", b">", b"@", b":", b"=",
    b"HELO x\r\n", b"EHLO client.example\r\n", b"MAIL FROM:<a@b.example>\r\n",
    b"MAIL FROM:<>\r\n", b"RCPT TO:<c@d.example>\r\n", b"RCPT TO:<postmaster>\r\n",
    b"DATA\r\n", b"BDAT 0 LAST\r\n", b"BDAT 5\r\n", b"BDAT 3 LAST\r\n", b"BDAT 99999999999\r\n",
    b"RSET\r\n", b"NOOP\r\n", b"QUIT\r\n", b"STARTTLS\r\n", b"VRFY x\r\n", b"HELP\r\n",
    b" SIZE=100", b" SIZE=", b" BODY=8BITMIME", b" SMTPUTF8", b"[IPv6:::1]", b"[1.2.3.4]",
    b'"a b"', b"\\", b"x" * 64, b"y" * 700, b"GET / HTTP/1.1\r\n", b"USER root\r\n", b"PROXY TCP4 ",
]


def load_corpus(paths: Sequence[str]) -> list[bytes]:
    """Every file under the given files and folders (recursively, sorted)."""
    seeds: list[bytes] = []
    for name in paths:
        path = Path(name)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        seeds.extend(p.read_bytes() for p in files if p.exists())
    return seeds


def mutate(data: bytes, rng: random.Random, seeds: Sequence[bytes], max_len: int) -> bytes:
    """One to eight random edits: flip, insert a token, delete, duplicate, splice."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        op = rng.randrange(7)
        pos = rng.randint(0, len(buf))
        if op == 0 and buf:  # replace one octet
            buf[min(pos, len(buf) - 1)] = rng.randrange(256)
        elif op == 1:  # insert a token
            buf[pos:pos] = rng.choice(TOKENS)
        elif op == 2 and buf:  # delete a run
            del buf[pos : pos + rng.randint(1, 16)]
        elif op == 3 and buf:  # duplicate a run
            start = rng.randrange(len(buf))
            buf[pos:pos] = buf[start : start + rng.randint(1, 64)]
        elif op == 4 and seeds:  # splice in part of another seed
            other = rng.choice(seeds)
            start = rng.randint(0, len(other))
            buf[pos:pos] = other[start : start + rng.randint(1, 128)]
        elif op == 5:  # random octets
            buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 6 and len(buf) >= 2:  # the two header octets steer the harness
            buf[rng.randrange(2)] = rng.randrange(256)
    return bytes(buf[:max_len])


def inputs(seeds: Sequence[bytes], rng: random.Random, max_len: int) -> Iterator[bytes]:
    """The seeds, then an endless stream of mutations of them."""
    yield from seeds
    pool = list(seeds) or [b"\x00\x00"]
    while True:
        if rng.random() < 0.05:
            yield bytes(rng.randrange(256) for _ in range(rng.randint(0, 64)))
        else:
            yield mutate(rng.choice(pool), rng, pool, max_len)


def run(
    check: Callable[[bytes], None],
    seeds: Sequence[bytes],
    runs: int,
    seed: int = 0,
    max_total_time: float = 0.0,
    max_len: int = 4096,
    artifact_prefix: str = "./",
) -> tuple[int, float]:
    """Call ``check`` on the seeds and their mutations; return (runs, seconds).

    Stops after ``runs`` inputs (0: no limit) or ``max_total_time`` seconds
    (0: no limit), whichever comes first.
    """
    rng = random.Random(seed)
    start = time.monotonic()
    done = 0
    for data in inputs(seeds, rng, max_len):
        if runs and done >= runs:
            break
        if max_total_time and time.monotonic() - start > max_total_time:
            break
        try:
            check(data)
        except BaseException:
            name = artifact_prefix + "crash-" + hashlib.sha1(data).hexdigest()
            with open(name, "wb") as f:
                f.write(data)
            print(f"crash after {done} runs; input written to {name}", file=sys.stderr)
            raise
        done += 1
    return done, time.monotonic() - start


def main(check: Callable[[bytes], None], argv: Sequence[str]) -> None:
    """Parse libFuzzer-style flags and run; print a libFuzzer-like summary."""
    flags: dict[str, str] = {}
    paths: list[str] = []
    for arg in argv:
        if arg.startswith("-") and "=" in arg:
            key, _, value = arg.lstrip("-").partition("=")
            flags[key] = value
        elif not arg.startswith("-"):
            paths.append(arg)
    runs = int(flags.get("runs", "0"))
    total = float(flags.get("max_total_time", "0"))
    if not runs and not total:
        runs = 100_000
    files = [p for p in paths if os.path.isfile(p)]
    if files and len(files) == len(paths) and "runs" not in flags:
        runs = len(files)  # as libFuzzer: files only means "run these"
    seeds = load_corpus(paths)
    done, seconds = run(
        check,
        seeds,
        runs,
        seed=int(flags.get("seed", "0")),
        max_total_time=total,
        max_len=int(flags.get("max_len", "4096")),
        artifact_prefix=flags.get("artifact_prefix", "./"),
    )
    rate = done / seconds if seconds else float("inf")
    print(f"plain: {done} runs in {seconds:.1f} s ({rate:.0f} exec/s), {len(seeds)} seeds, no crash")
