"""The glue's own CPU per message: one connection in-process, no sockets, no disk.

Run:  python bench/bench_glue.py [--messages N] [--rounds R] [--store null|maildir] [--auth off|dkim|all]

One ``SMTPProtocol`` on a fake transport takes messages the way Postfix's
smtp-source sends them without pipelining: MAIL, RCPT, DATA, the content
and its dot, each in its own read, each answered before the next.  With
``--store null`` a store that resolves every message at once stands in for
the Maildir writer, so what is measured is the Python path from bytes in to
replies out: session, handlers, transaction, trace headers, log line,
counters.  ``--store maildir`` uses the real writer with ``--fsync off``
(files in a temporary folder), adding the hand-off to its thread and the
file system calls.  ``--auth dkim`` and ``--auth all`` turn the checks
on (DKIM alone; SPF, DKIM, DMARC and ARC) for bench_auth.py's message,
signed by dkimpy (rsa-2048, relaxed/relaxed), with the DNS answers of
bench_auth_parts.py's dict (a warm cache): the whole authenticated path,
from MAIL to the 250, without a socket.  Reported: CPU µs per message
(process time, median of the rounds).  The event log is on (info),
written to /dev/null.

This is not a benchmark of the server against its peers (bench/compare.py
is); it is the figure to watch when changing the per-message path, and
it is much steadier than an end-to-end run on a shared machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from fakes import Connection, make_server  # noqa: E402

from fastsmtp.logs import setup_logging  # noqa: E402

CONTENT = b"Subject: bench\r\n\r\n" + b"x" * 1000 + b"\r\n.\r\n"
SCRIPT = (b"MAIL FROM:<loadgen@example.net>\r\n", b"RCPT TO:<alice@example.com>\r\n", b"DATA\r\n", CONTENT)


class NullSpool:
    def __init__(self, n: int) -> None:
        self.queue_id = f"Q{n:015d}"
        self.size = 0
        self.failed = None

    def write(self, data: Any) -> None:
        self.size += len(data)

    def prepend(self, headers: bytes) -> None:
        self.size += len(headers)

    def discard(self) -> None:
        pass


class NullStore:
    """Resolves every message at once: the glue's cost alone."""

    def __init__(self) -> None:
        self._n = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def open_spool(self, mailbox: str) -> NullSpool:
        self._n += 1
        return NullSpool(self._n)

    def submit(self, spool: Any, mailboxes: Sequence[str], sender: Any = None) -> "asyncio.Future[str]":
        assert self._loop is not None
        fut: asyncio.Future[str] = self._loop.create_future()
        fut.set_result(spool.queue_id)
        return fut

    def close(self) -> None:
        pass


def _store(server: Any) -> Any:
    """The server's store (called its writer before the store interface)."""
    return getattr(server, "store", None) or server.writer


async def make_root(root: Path) -> None:
    _store(make_server(root)).close()


#: --auth: the checks' settings; None: every check off (make_server's default).
AUTH = {"off": None, "dkim": dict(dkim="tag"), "all": dict(spf="tag", dkim="tag", dmarc="tag", arc="tag")}


def auth_script() -> tuple[bytes, ...]:
    """MAIL, RCPT, DATA and a signed 1 KiB message from bench.example, whose answers Answers holds."""
    import bench_auth

    pem, public = bench_auth.keys()
    content = bench_auth.signed_message(1024, pem) + b".\r\n"
    global ANSWERS
    from bench_auth_parts import Answers

    ANSWERS = Answers(f"v=DKIM1; k=rsa; p={public}".encode())
    return (f"MAIL FROM:<{bench_auth.SENDER}>\r\n".encode(), b"RCPT TO:<alice@example.com>\r\n", b"DATA\r\n",
            content)


ANSWERS: Any = None


async def one_round(messages: int, store: str, root: Path, auth: str = "off",
                    script: Sequence[bytes] = SCRIPT) -> float:
    checks = AUTH[auth]
    # The fake peer is 127.0.0.1: out of the trusted networks, so that it is checked.
    extra: dict[str, Any] = dict(checks, trusted_networks=("::1/128",)) if checks else {}
    server = make_server(root, fsync="off", **extra)
    if checks:
        server.auth._lookups = ANSWERS  # a warm cache: a dict
    if store == "null":
        _store(server).close()
        null = NullStore()
        null.start(asyncio.get_running_loop())
        server.store = server.writer = null  # type: ignore[attr-defined]
    conn = Connection(server)
    conn.send(b"EHLO client.bench.example\r\n")
    await asyncio.sleep(0)
    transport = conn.transport
    started = time.process_time()
    for _ in range(messages):
        for data in script:
            before = len(transport.writes)
            conn.send(data)
            while len(transport.writes) == before:  # the reply may wait for the store
                await asyncio.sleep(0)
        if len(transport.writes) > 1000:
            transport.writes.clear()
    spent = time.process_time() - started
    _store(server).close()
    return spent / messages


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--store", choices=("null", "maildir"), default="null")
    ap.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    ap.add_argument("--log-level", default="info")
    ap.add_argument("--auth", choices=tuple(AUTH), default="off")
    args = ap.parse_args(argv)
    script = auth_script() if args.auth != "off" else SCRIPT
    setup_logging(args.log_level, path=os.devnull)
    if args.loop == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        roots = [Path(tmp) / f"mail{r}" for r in range(args.rounds)]
        for root in roots:
            asyncio.run(make_root(root))
        # Mailboxes exist long before their mail: one changed within the
        # file system's time granularity is checked in full at every RCPT.
        time.sleep(2.2)
        for root in roots:
            results.append(asyncio.run(one_round(args.messages, args.store, root, args.auth, script)))
    per = statistics.median(results) * 1e6
    print(f"{args.store} store, {args.loop}, auth {args.auth}: {per:.1f} µs CPU per message "
          f"(median of {args.rounds} x {args.messages}; all: {', '.join(f'{x * 1e6:.1f}' for x in results)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
