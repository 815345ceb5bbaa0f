"""A fake transport and an in-process connection, for the protocol's own tests.

The connection under test is the real ``SMTPProtocol`` with the real
session, stages and store on a temporary mail root (the Maildir writer of
``--fsync off`` unless a test asks for another mode); only the socket is
replaced, so that the test can count writes and pauses exactly.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from fastsmtp.config import Config
from fastsmtp.maildir import MaildirWriter
from fastsmtp.policy import add_mailbox
from fastsmtp.server import Server

try:
    from fastsmtp.protocol import SMTPProtocol
except ImportError:  # before the glue was split (bench/bench_glue.py measures both)
    from fastsmtp.server import SMTPProtocol  # type: ignore[attr-defined,no-redef]

__all__ = ["FakeTransport", "Connection", "make_server", "open_store"]

HOSTNAME = "mx.test.example"


@dataclass
class FakeTransport:
    """Records what the protocol does to its socket."""

    peer: str = "192.0.2.7"
    writes: list[bytes] = field(default_factory=list)
    paused: bool = False
    pauses: int = 0
    closing: bool = False
    aborted: bool = False

    def write(self, data: bytes) -> None:
        # A real transport drops what is written after close(); the tests
        # count writes to see that nothing is.
        self.writes.append(bytes(data))

    def writelines(self, lines: list[bytes]) -> None:
        self.write(b"".join(lines))

    def pause_reading(self) -> None:
        if not self.paused:
            self.pauses += 1
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = self.aborted = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return (self.peer, 40000)
        return default

    def output(self) -> bytes:
        return b"".join(self.writes)


def make_server(mail_root: Path, **settings: Any) -> Server:
    """A started Server on ``mail_root`` (alice@example.com exists); close its store after."""
    if not mail_root.exists():
        mail_root.mkdir(parents=True)
        add_mailbox(str(mail_root), "alice@example.com")
        add_mailbox(str(mail_root), "bob@example.com")
    values: dict[str, Any] = dict(
        mail_root=str(mail_root), hostname=HOSTNAME, greeting_delay=0.0, max_connections_per_ip=0, fsync="off",
        # Never the machine's resolver: a closed loopback port refuses at once.
        dns_server=("127.0.0.1:9",),
        # The protocol's own tests; authentication has test_auth*.py.
        spf="off", dkim="off", dmarc="off", arc="off",
    )
    values.update(settings)
    config = Config(**values).validate()
    store = open_store(config)
    store.start(asyncio.get_running_loop())
    return Server(config, store)


def open_store(config: Config) -> Any:
    """The store worker.open_store() builds for ``config.fsync``.

    "always" and "off" build the Maildir writer here, as older trees do too
    (bench/bench_glue.py runs this module against them); "batch" is the
    journal under ``config.journal_dir``, recovered first as a worker does.
    """
    if config.fsync == "batch":
        from fastsmtp.worker import open_store as worker_store

        return worker_store(config)
    return MaildirWriter(hostname=config.hostname, fsync=config.fsync, spill_threshold=config.spill_threshold)


class Connection:
    """One SMTPProtocol on a FakeTransport, inside a running loop."""

    def __init__(self, server: Server, transport: FakeTransport | None = None) -> None:
        self.server = server
        self.transport = transport or FakeTransport()
        self.protocol = SMTPProtocol(server)
        self.protocol.connection_made(self.transport)  # type: ignore[arg-type]

    def send(self, data: bytes) -> None:
        self.protocol.data_received(data)

    async def until(self, done: Callable[[], bool], timeout: float = 5.0) -> None:
        """Let the loop run until ``done()`` (a deadline, never a bare sleep)."""
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out; output so far: {self.transport.output()!r}")
            await asyncio.sleep(0.002)

    async def replies(self, count: int, timeout: float = 5.0) -> list[bytes]:
        """Wait for ``count`` complete reply lines (last lines of multiline replies)."""

        def finals() -> list[bytes]:
            lines = self.transport.output().split(b"\r\n")[:-1]
            return [line for line in lines if line[3:4] != b"-"]

        await self.until(lambda: len(finals()) >= count, timeout)
        return finals()
