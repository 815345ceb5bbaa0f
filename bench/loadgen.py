"""An SMTP load generator with RFC 2920 pipelining, for benchmarking fastsmtp.

Run:  python bench/loadgen.py --port 2525 --connections 50 --messages 10000 --pipelining

Rules of this module:
- Every run ends.  ``--messages`` and ``--duration`` both have defaults and
  the run stops at whichever comes first; every wait for a reply has a
  timeout (``--timeout``); reconnects after errors back off.  Transactions
  already started when the duration runs out are finished, not abandoned.
- Only the host given is contacted (default 127.0.0.1).
- The client is cheap, because it shares the machine with the server: the
  message bytes and the command groups are built once before the run, a
  reply is parsed only as far as its code and whether it is the last line,
  and the reply time is read once per network read, not per coroutine wake.
- SMTP is spoken over an ``asyncio.Protocol`` directly, not smtplib.
  With ``--pipelining`` (and when the server advertises PIPELINING) one
  transaction is two writes: MAIL, every RCPT and DATA together, then after
  the 354 the content with its ``.`` line (RFC 2920 §3.1: DATA ends a group).
  Without it the client waits for each reply in turn, as smtp-source does.

Latency is measured per message from the moment the content write returns
to the network read that completes its final reply.

The API for other programs: ``run(Options(...)) -> Result`` (a coroutine),
and ``main(argv)`` for the command line.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import math
import os
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

__all__ = ["Options", "Result", "build_message", "run", "main", "format_result"]

DEFAULT_FROM = "loadgen@example.net"
DEFAULT_TO = "postmaster@localhost"
LINE_WIDTH = 76  # RFC 5322 §2.1.1: lines SHOULD be at most 78 characters
PROGRESS_INTERVAL = 0.5
HISTOGRAM_EDGES_MS = (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


@dataclass
class Options:
    host: str = "127.0.0.1"
    port: int = 2525
    connections: int = 10
    messages: int = 10_000  # total; 0 means no count bound (duration only)
    duration: float = 60.0  # seconds; 0 means no time bound (count only)
    size: int = 1024  # bytes of message content, headers included
    per_connection: int = 100  # transactions per connection before QUIT
    pipelining: bool = False
    rcpts: int = 1
    mail_from: str = DEFAULT_FROM
    to: list[str] = field(default_factory=lambda: [DEFAULT_TO])
    rate: float = 0.0  # messages/s over all connections; 0 = as fast as possible
    timeout: float = 30.0  # seconds to wait for any one reply or connect
    ehlo: str = "loadgen.example.net"
    progress: bool = False
    #: The content to send instead of a built one (a DKIM-signed message,
    #: say): CRLF lines, dot-stuffed by the caller, without the "." line.
    content: bytes = b""

    def validate(self) -> "Options":
        if self.messages <= 0 and self.duration <= 0:
            raise ValueError("need a bound: --messages or --duration must be positive")
        if self.connections < 1 or self.per_connection < 1 or self.rcpts < 1:
            raise ValueError("--connections, --per-connection and --rcpts must be at least 1")
        if self.size < 0 or self.rate < 0 or self.timeout <= 0:
            raise ValueError("--size and --rate must be >= 0, --timeout > 0")
        if not self.to:
            raise ValueError("need at least one --to address")
        return self


@dataclass
class Result:
    attempted: int = 0  # transactions started (MAIL sent)
    sent: int = 0  # message contents written in full
    accepted: int = 0  # final 250
    temp_failures: int = 0  # a 4xx ended the transaction
    perm_failures: int = 0  # a 5xx ended the transaction
    rcpt_rejected: int = 0  # single RCPTs refused in transactions that went on
    connection_errors: int = 0  # refused, reset, closed early or timed out
    connections: int = 0  # sessions that reached the greeting
    elapsed: float = 0.0
    messages_per_s: float = 0.0
    latency_ms: dict[str, float] = field(default_factory=dict)  # p50 p90 p99 max
    histogram: list[tuple[str, int]] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)  # error text -> count (first few kinds)
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def failures(self) -> int:
        return self.temp_failures + self.perm_failures + self.connection_errors


def build_message(size: int, mail_from: str, to: str, seq: int = 0) -> bytes:
    """A plain-text message of ``size`` bytes (headers included), CRLF lines.

    Body lines are 76 characters of text (plus CRLF) and never start with a
    dot, so no dot-stuffing is needed.  Short sizes get the headers only.
    """
    headers = (
        f"From: Load Generator <{mail_from}>\r\n"
        f"To: <{to}>\r\n"
        f"Subject: loadgen message {seq} of {size} bytes\r\n"
        f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}\r\n"
        f"Message-ID: <loadgen.{os.getpid()}.{seq}@example.net>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "\r\n"
    ).encode("ascii")
    left = size - len(headers)
    if left <= 0:
        return headers
    text = b"The quick brown fox jumps over the lazy dog, 0123456789; pack my box with five dozen liquor jugs. "
    lines = []
    pos = 0
    while left > 0:
        # A line is LINE_WIDTH characters plus CRLF; the last one is shorter.
        n = min(LINE_WIDTH, max(left - 2, 0))
        chunk = (text * 2)[pos % len(text) : pos % len(text) + n]
        pos += n
        lines.append(b"x" + chunk[1:] if chunk[:1] == b"." else chunk)
        left -= n + 2
    body = b"\r\n".join(lines) + b"\r\n"
    return headers + body


# -- the wire --------------------------------------------------------------------


class _Closed(Exception):
    """The server closed the connection (or it broke) before the reply came."""


class _SMTPClient(asyncio.Protocol):
    """Collects reply codes; a waiter asks for the next ``n`` replies."""

    def __init__(self) -> None:
        self._buf = b""
        self.codes: deque[int] = deque()
        self.reply_time = 0.0  # when the last complete reply arrived
        self.pipelining = False
        self._want = 0
        self._waiter: asyncio.Future[None] | None = None
        self._lost: BaseException | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        start = 0
        found = False
        while True:
            end = buf.find(b"\n", start)
            if end < 0:
                break
            # "250-..." continues a reply; "250 ..." or "250\r\n" ends it.
            if end - start < 4 or buf[start + 3] != 0x2D:
                try:
                    self.codes.append(int(buf[start : start + 3]))
                except ValueError:
                    self.codes.append(999)
                found = True
            elif not self.pipelining and b"PIPELINING" in buf[start:end].upper():
                self.pipelining = True
            start = end + 1
        self._buf = buf[start:]
        if found:
            self.reply_time = time.perf_counter()
            waiter = self._waiter
            if waiter is not None and len(self.codes) >= self._want and not waiter.done():
                waiter.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = exc or _Closed("connection closed by the server")
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(_Closed(str(self._lost)))

    async def replies(self, n: int, timeout: float) -> list[int]:
        """The next ``n`` reply codes, in order."""
        if len(self.codes) < n:
            if self._lost is not None:
                raise _Closed(str(self._lost))
            self._want = n
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(self._waiter, timeout)
            finally:
                self._waiter = None
        codes = self.codes
        return [codes.popleft() for _ in range(n)]

    def write(self, data: bytes) -> None:
        if self._lost is not None or self.transport is None:
            raise _Closed(str(self._lost))
        self.transport.write(data)


# -- the run ---------------------------------------------------------------------


class _Run:
    """Shared state of one run: the plan (precomputed bytes) and the counters."""

    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.result = Result(options=asdict(opts))
        self.latencies: list[float] = []
        self.claimed = 0
        self.start = 0.0
        self.deadline = math.inf
        # Message i goes to to[(i*R + j) % len(to)] for j < R: the RCPT lines
        # for every starting offset, all built now.
        to = opts.to
        self.rcpts = [
            [f"RCPT TO:<{to[(first + j) % len(to)]}>\r\n".encode() for j in range(opts.rcpts)]
            for first in range(len(to))
        ]
        self.mail = f"MAIL FROM:<{opts.mail_from}>\r\n".encode()
        #: A sender with "{n}" in it is a new one per message (message n):
        #: a cold DNS lookup each, for the authentication benchmark.
        self.varied = "{n}" in opts.mail_from
        content = opts.content or build_message(opts.size, opts.mail_from, to[0])
        self.payload = content + b".\r\n"
        self.pipelined = [self.mail + b"".join(rcpts) + b"DATA\r\n" for rcpts in self.rcpts]
        self.ehlo = f"EHLO {opts.ehlo}\r\n".encode()

    def claimable(self) -> bool:
        opts = self.opts
        if opts.messages > 0 and self.claimed >= opts.messages:
            return False
        return time.perf_counter() < self.deadline

    def claim(self) -> int | None:
        """The next message's index, or None when the run is over."""
        if not self.claimable():
            return None
        index = self.claimed
        self.claimed += 1
        return index

    def error(self, exc: BaseException) -> None:
        self.result.connection_errors += 1
        key = f"{type(exc).__name__}: {exc}"[:120]
        errors = self.result.errors
        if key in errors or len(errors) < 10:
            errors[key] = errors.get(key, 0) + 1

    def failed(self, code: int) -> None:
        if 400 <= code < 500:
            self.result.temp_failures += 1
        else:
            self.result.perm_failures += 1


async def _pace(run: _Run, index: int) -> None:
    rate = run.opts.rate
    if rate > 0:
        delay = run.start + index / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)


async def _transaction(run: _Run, conn: _SMTPClient, index: int) -> bool:
    """One message; False when the session must end (the server said 421)."""
    opts, result = run.opts, run.result
    timeout = opts.timeout
    envelope = (index * opts.rcpts) % len(run.rcpts)
    rcpts = run.rcpts[envelope]
    result.attempted += 1
    mail = run.mail
    if run.varied:
        mail = f"MAIL FROM:<{opts.mail_from.format(n=index)}>\r\n".encode()
    if conn.pipelining:
        conn.write(mail + b"".join(rcpts) + b"DATA\r\n" if run.varied else run.pipelined[envelope])
        codes = await conn.replies(len(rcpts) + 2, timeout)
    else:
        conn.write(mail)
        codes = await conn.replies(1, timeout)
        if codes[0] == 250:
            for rcpt in rcpts:
                conn.write(rcpt)
                codes += await conn.replies(1, timeout)
                if codes[-1] == 421:
                    break
            if any(c == 250 for c in codes[1:]) and codes[-1] != 421:
                conn.write(b"DATA\r\n")
                codes += await conn.replies(1, timeout)
    if codes[-1] != 354:
        # Which reply ended it: MAIL's, else the RCPTs' (all refused), else DATA's.
        mail_code, rcpt_codes = codes[0], codes[1 : 1 + len(rcpts)]
        if mail_code != 250:
            code = mail_code
        elif not any(c == 250 for c in rcpt_codes):
            code = next((c for c in rcpt_codes if c != 250), codes[-1])
        else:
            code = codes[-1]
        run.failed(code)
        if 421 in codes:
            return False
        conn.write(b"RSET\r\n")
        return (await conn.replies(1, timeout))[0] == 250
    result.rcpt_rejected += sum(1 for c in codes[1 : 1 + len(rcpts)] if c != 250)
    conn.write(run.payload)
    sent_at = time.perf_counter()
    result.sent += 1
    code = (await conn.replies(1, timeout))[0]
    if code == 250:
        result.accepted += 1
        run.latencies.append(conn.reply_time - sent_at)
        return True
    run.failed(code)
    return code != 421


async def _session(run: _Run, loop: asyncio.AbstractEventLoop) -> bool:
    """One connection: greeting, EHLO, up to K transactions, QUIT.

    Returns False when the run is over (nothing left to claim).
    """
    opts = run.opts
    transport, conn = await asyncio.wait_for(
        loop.create_connection(_SMTPClient, opts.host, opts.port), opts.timeout
    )
    try:
        (greeting,) = await conn.replies(1, opts.timeout)
        if greeting != 220:
            raise _Closed(f"greeting {greeting}")
        conn.write(run.ehlo)
        (code,) = await conn.replies(1, opts.timeout)
        if code != 250:
            raise _Closed(f"EHLO answered {code}")
        conn.pipelining = conn.pipelining and opts.pipelining
        run.result.connections += 1
        more = True
        for _ in range(opts.per_connection):
            index = run.claim()
            if index is None:
                more = False
                break
            await _pace(run, index)
            if not await _transaction(run, conn, index):
                return more
        conn.write(b"QUIT\r\n")
        await conn.replies(1, opts.timeout)
        return more
    finally:
        transport.close()


async def _worker(run: _Run) -> None:
    loop = asyncio.get_running_loop()
    backoff = 0.01
    while run.claimable():
        try:
            if not await _session(run, loop):
                return
            backoff = 0.01
        except (OSError, _Closed, asyncio.TimeoutError) as exc:
            run.error(exc)
            # Bounded by the run's deadline: a dead server ends the run in time.
            await asyncio.sleep(min(backoff, max(run.deadline - time.perf_counter(), 0)))
            backoff = min(backoff * 2, 1.0)


async def _progress(run: _Run) -> None:
    last_n, last_t = 0, run.start
    while True:
        await asyncio.sleep(PROGRESS_INTERVAL)
        now = time.perf_counter()
        r = run.result
        rate = (r.accepted - last_n) / max(now - last_t, 1e-9)
        last_n, last_t = r.accepted, now
        line = (
            f"\r{now - run.start:6.1f}s  accepted {r.accepted:>8}  {rate:>8.0f} msg/s  "
            f"4xx {r.temp_failures}  5xx {r.perm_failures}  conn-err {r.connection_errors}   "
        )
        sys.stderr.write(line)
        sys.stderr.flush()


def _percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not ordered:
        return 0.0
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def _summarise(run: _Run, elapsed: float) -> Result:
    r = run.result
    r.elapsed = elapsed
    r.messages_per_s = r.accepted / elapsed if elapsed > 0 else 0.0
    ms = sorted(x * 1000 for x in run.latencies)
    r.latency_ms = {
        "p50": _percentile(ms, 50),
        "p90": _percentile(ms, 90),
        "p99": _percentile(ms, 99),
        "max": ms[-1] if ms else 0.0,
    }
    counts = []
    prev = 0
    for edge in HISTOGRAM_EDGES_MS:
        i = bisect.bisect_right(ms, edge)
        counts.append((f"<= {edge:g} ms", i - prev))
        prev = i
    counts.append((f"> {HISTOGRAM_EDGES_MS[-1]:g} ms", len(ms) - prev))
    # Keep the rows from the first to the last non-empty bucket.
    nonzero = [i for i, (_, c) in enumerate(counts) if c]
    r.histogram = counts[nonzero[0] : nonzero[-1] + 1] if nonzero else []
    return r


async def run(options: Options) -> Result:
    """Run the load; returns when the count or the duration is reached."""
    opts = options.validate()
    state = _Run(opts)
    state.start = time.perf_counter()
    if opts.duration > 0:
        state.deadline = state.start + opts.duration
    progress = asyncio.ensure_future(_progress(state)) if opts.progress else None
    workers = [asyncio.ensure_future(_worker(state)) for _ in range(opts.connections)]
    try:
        await asyncio.gather(*workers)
    finally:
        for w in workers:
            w.cancel()
        if progress is not None:
            progress.cancel()
            sys.stderr.write("\n")
    return _summarise(state, time.perf_counter() - state.start)


# -- output and command line -----------------------------------------------------


def format_result(r: Result) -> str:
    lat = r.latency_ms
    lines = [
        f"messages: attempted {r.attempted}, sent {r.sent}, accepted {r.accepted}, "
        f"4xx {r.temp_failures}, 5xx {r.perm_failures}, connection errors {r.connection_errors}"
        + (f", RCPTs refused {r.rcpt_rejected}" if r.rcpt_rejected else ""),
        f"elapsed {r.elapsed:.2f} s, {r.messages_per_s:,.0f} messages/s over {r.connections} connection(s)",
        f"latency (end of content -> 250): p50 {lat.get('p50', 0):.2f} ms, p90 {lat.get('p90', 0):.2f} ms, "
        f"p99 {lat.get('p99', 0):.2f} ms, max {lat.get('max', 0):.2f} ms",
    ]
    if r.histogram:
        peak = max(c for _, c in r.histogram) or 1
        total = sum(c for _, c in r.histogram) or 1
        lines.append("latency histogram:")
        for label, count in r.histogram:
            bar = "#" * max(1 if count else 0, round(40 * count / peak))
            lines.append(f"  {label:>11} {count:>8} {100 * count / total:5.1f}% {bar}")
    for text, count in r.errors.items():
        lines.append(f"error x{count}: {text}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    d = Options()
    p = argparse.ArgumentParser(prog="loadgen", description="SMTP load generator (pipelining, bounded runs).")
    p.add_argument("--host", default=d.host)
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument("--connections", type=int, default=d.connections, metavar="N", help="concurrent sessions")
    p.add_argument("--messages", type=int, default=d.messages, metavar="N",
                   help="total messages (default %(default)s; 0: duration only)")
    p.add_argument("--duration", type=float, default=d.duration, metavar="S",
                   help="seconds (default %(default)s; 0: count only); stops at whichever bound comes first")
    p.add_argument("--size", type=int, default=d.size, metavar="BYTES", help="message size, headers included")
    p.add_argument("--per-connection", type=int, default=d.per_connection, metavar="K",
                   help="messages per connection before QUIT and reconnect")
    p.add_argument("--pipelining", action="store_true", help="RFC 2920: MAIL, RCPTs and DATA in one write")
    p.add_argument("--rcpts", type=int, default=d.rcpts, metavar="R", help="recipients per message")
    p.add_argument("--from", dest="mail_from", default=d.mail_from)
    p.add_argument("--to", action="append", default=None, metavar="ADDR",
                   help=f"recipient (repeatable; cycled; default {DEFAULT_TO})")
    p.add_argument("--rate", type=float, default=d.rate, metavar="MSGS_PER_S", help="0: as fast as possible")
    p.add_argument("--timeout", type=float, default=d.timeout, metavar="S", help="wait for any one reply")
    p.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    p.add_argument("--progress", action="store_true", help="live progress line on stderr")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


def run_sync(options: Options, loop: str = "uvloop") -> Result:
    """Run on a new event loop (uvloop unless asked not to, or missing)."""
    factory = None
    if loop == "uvloop":
        try:
            import uvloop

            factory = uvloop.new_event_loop
        except ImportError:
            pass
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(run(options))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        options = Options(
            host=args.host, port=args.port, connections=args.connections, messages=args.messages,
            duration=args.duration, size=args.size, per_connection=args.per_connection,
            pipelining=args.pipelining, rcpts=args.rcpts, mail_from=args.mail_from,
            to=args.to or [DEFAULT_TO], rate=args.rate, timeout=args.timeout, progress=args.progress,
        ).validate()
    except ValueError as exc:
        print(f"loadgen: error: {exc}", file=sys.stderr)
        return 2
    try:
        result = run_sync(options, args.loop)
    except KeyboardInterrupt:
        return 130
    if args.json:
        out = asdict(result)
        out["failures"] = result.failures
        print(json.dumps(out, indent=2))
    else:
        print(format_result(result))
    return 0 if result.failures == 0 and result.accepted > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
