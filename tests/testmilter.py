"""A milter of our own for the tests: every verdict and change on request, and the faults.

It runs on its own event loop in a thread, on a free loopback port, and
records what it was told.  ``mode`` picks its behaviour (see ``_answer``).
"""

from __future__ import annotations

import asyncio
import struct
import threading
from dataclasses import dataclass, field

from dnsserver import free_port


def _packet(code: bytes, data: bytes = b"") -> bytes:
    return struct.pack("!I", 1 + len(data)) + code + data


def change(code: bytes, *strings: bytes, index: int | None = None) -> bytes:
    """A modification packet (SMFIR_*): i and m carry a 32-bit index before their strings."""
    head = struct.pack("!I", index) if index is not None else b""
    return _packet(code, head + b"".join(s + b"\0" for s in strings))


def body_change(chunk: bytes) -> bytes:
    """SMFIR_REPLBODY: a piece of the new body, raw (no NUL)."""
    return _packet(b"b", chunk)


@dataclass
class Seen:
    commands: list[bytes] = field(default_factory=list)
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    body_packets: list[int] = field(default_factory=list)
    macros: dict[str, str] = field(default_factory=dict)


class TestMilter:
    __test__ = False  # not a pytest class

    def __init__(self, mode: str = "accept") -> None:
        self.mode = mode
        self.port = free_port()
        self.seen = Seen()
        self.connections = 0
        #: Mode "edit": the modification packets sent at the end of the body, before accept.
        self.changes: list[bytes] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "TestMilter":
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _stop(self) -> None:
        for task in asyncio.all_tasks(self._loop):
            if task is not asyncio.current_task():
                task.cancel()

    @property
    def endpoint(self) -> str:
        return f"inet:127.0.0.1:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", self.port))
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()
            self._loop.run_until_complete(self._stop())
            self._loop.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                (size,) = struct.unpack("!I", await reader.readexactly(4))
                data = await reader.readexactly(size)
                code, rest = data[:1], data[1:]
                if code == b"O":
                    writer.write(_packet(b"O", struct.pack("!III", 6, 0x1FF, 0)))
                    continue
                self.seen.commands.append(code)
                if code == b"D":
                    parts = rest[1:].split(b"\0")
                    for name, value in zip(parts[::2], parts[1::2]):
                        self.seen.macros[name.decode()] = value.decode()
                    continue
                if code == b"L":
                    name, value, _ = rest.split(b"\0")
                    self.seen.headers.append((name, value))
                elif code == b"B":
                    self.seen.body += rest
                    self.seen.body_packets.append(len(rest))
                elif code in (b"Q",):
                    break
                elif code == b"A":
                    continue  # abort: no reply
                answer = await self._answer(code, rest, writer)
                if answer is None:
                    break
                writer.write(answer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _answer(self, code: bytes, rest: bytes, writer: asyncio.StreamWriter) -> bytes | None:
        mode = self.mode
        step = {b"C": "connect", b"H": "helo", b"M": "mail", b"R": "rcpt", b"E": "eom"}.get(code, "")
        if mode == f"die-at-{step}":
            return None
        if mode == f"sleep-at-{step}":
            await asyncio.sleep(30)
        if mode == f"garbage-at-{step}":
            return b"220 this is not a milter\r\n"
        if mode == "reject-rcpt" and code == b"R" and b"bob@" in rest:
            return _packet(b"r")
        if mode == "tempfail-mail" and code == b"M":
            return _packet(b"t")
        if code != b"E":
            return _packet(b"c")
        if mode == "replycode":
            return _packet(b"y", b"550-5.7.1 first line\r\n550 5.7.1 second line\0")
        if mode == "add-header":
            return (_packet(b"h", b"X-Test-Milter\0yes\0") + _packet(b"i", b"\0\0\0\0X-Top\0first\0")
                    + _packet(b"a"))
        if mode == "edit":
            return b"".join(self.changes) + _packet(b"a")
        if mode == "discard":
            return _packet(b"d")
        if mode == "quarantine":
            return _packet(b"q", b"looks suspicious\0") + _packet(b"c")
        if mode == "reject":
            return _packet(b"r")
        return _packet(b"a")


if __name__ == "__main__":
    # python tests/testmilter.py [MODE]: serve until killed (the benchmarks' accept-all milter).
    import signal
    import sys

    with TestMilter(sys.argv[1] if len(sys.argv) > 1 else "accept") as milter:
        print(f"milter listening on {milter.endpoint}", flush=True)
        signal.sigwait({signal.SIGTERM, signal.SIGINT})
