"""Parser micro-benchmarks (pytest-benchmark).

Run: python -m pytest bench/bench_parser.py --benchmark-only
(Not part of the test run: pyproject's testpaths is tests/.)

DATA bodies of 1 KiB, 100 KiB and 10 MiB made of 76-character lines (the
base64 line length of RFC 2045 §6.8, so what attachments look like), plus a
worst case where every line starts with '.' and so is stuffed.  Each is fed
whole, in 64 KiB reads and in 1 KiB reads to the compiled DataReader and to
the pure-Python twin; the stdlib baseline works on the whole message:
``find(b"\\r\\n.\\r\\n")``, slice, ``replace(b"\\r\\n..", b"\\r\\n.")`` (it checks
no bare CR/LF and no limit, so it is a floor, not a rival).  extra_info has
GB/s of wire octets.

The LineReader benchmark reads the command lines of one EHLO..QUIT
transaction, one read per command and all pipelined in one read; extra_info
has microseconds per command line.
"""

from __future__ import annotations

import base64
import functools
import importlib
import os
import random
from types import ModuleType
from typing import Any, Callable

import pytest

pytest.importorskip("pytest_benchmark")

from fastsmtp import _parser_py  # noqa: E402
from fastsmtp._testing import stuff  # noqa: E402

PURE = os.environ.get("FASTSMTP_PUREPYTHON", "") not in ("", "0")
BIG = 1 << 40
KiB, MiB = 1024, 1024 * 1024
SIZES = {"1KiB": KiB, "100KiB": 100 * KiB, "10MiB": 10 * MiB}
CHUNKS = {"whole": 0, "64KiB": 64 * KiB, "1KiB": KiB}


def implementation(name: str) -> ModuleType:
    if name == "python":
        return _parser_py
    if PURE:
        pytest.skip("FASTSMTP_PUREPYTHON=1")
    return importlib.import_module("fastsmtp._parser")


@functools.lru_cache(maxsize=None)
def wire(size: int, dots: bool) -> tuple[bytes, bytes]:
    """(what the client sends, the content it stands for)."""
    rng = random.Random(size)
    lines = [b"Subject: benchmark\r\n", b"\r\n"]
    total = sum(map(len, lines))
    while total < size:
        line = base64.b64encode(rng.randbytes(57)) + b"\r\n"  # 76 characters + CRLF
        if dots:
            line = b"." + line[1:]
        lines.append(line)
        total += len(line)
    content = b"".join(lines)
    return stuff(content), content


def gbps(benchmark: Any, octets: int) -> None:
    benchmark.extra_info["GB/s"] = round(octets / benchmark.stats.stats.median / 1e9, 3)


@pytest.mark.parametrize("chunk", list(CHUNKS))
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("kind", ["text", "dots"])
@pytest.mark.parametrize("impl", ["cython", "python"])
def test_data_reader(benchmark: Any, impl: str, kind: str, size: str, chunk: str) -> None:
    mod = implementation(impl)
    n = SIZES[size]
    step = CHUNKS[chunk]
    if step >= n:
        pytest.skip("the chunk holds the whole message")
    if impl == "python" and n > MiB and chunk == "1KiB":
        pytest.skip("too slow to be worth the wait")
    data, content = wire(n, kind == "dots")
    chunks = [data] if not step else [data[i : i + step] for i in range(0, len(data), step)]
    reader_class = mod.DataReader

    def run() -> list[bytes]:
        reader = reader_class(BIG)
        out = [reader.feed(c)[0] for c in chunks]
        assert reader.done
        return out

    assert b"".join(run()) == content
    benchmark.group = f"DataReader {kind} {size}"
    benchmark(run)
    gbps(benchmark, len(data))


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("kind", ["text", "dots"])
def test_stdlib_baseline(benchmark: Any, kind: str, size: str) -> None:
    data, content = wire(SIZES[size], kind == "dots")

    def run() -> bytes:
        return data[: data.find(b"\r\n.\r\n") + 2].replace(b"\r\n..", b"\r\n.")

    assert run() == content
    benchmark.group = f"DataReader {kind} {size}"
    benchmark(run)
    gbps(benchmark, len(data))


TRANSACTION = [
    b"EHLO client.example.org\r\n",
    b"MAIL FROM:<sender@example.org> SIZE=12345 BODY=8BITMIME\r\n",
    b"RCPT TO:<alice@example.com>\r\n",
    b"RCPT TO:<bob@example.com>\r\n",
    b"DATA\r\n",
    b"QUIT\r\n",
]


@pytest.mark.parametrize("pipelined", [False, True], ids=["one-read-per-line", "pipelined"])
@pytest.mark.parametrize("impl", ["cython", "python"])
def test_line_reader(benchmark: Any, impl: str, pipelined: bool) -> None:
    mod = implementation(impl)
    reader = mod.LineReader(1024)
    reads = [b"".join(TRANSACTION)] if pipelined else TRANSACTION
    feed: Callable[[bytes], None] = reader.feed
    readline: Callable[[], bytes | None] = reader.readline

    def run() -> int:
        count = 0
        for read in reads:
            feed(read)
            while readline() is not None:
                count += 1
        return count

    assert run() == len(TRANSACTION)
    benchmark.group = "LineReader " + ("pipelined" if pipelined else "one read per line")
    benchmark(run)
    benchmark.extra_info["us/command"] = round(
        benchmark.stats.stats.median / len(TRANSACTION) * 1e6, 3
    )
