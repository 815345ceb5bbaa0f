"""A DNS forwarder that answers late: the "server that answers in 5 ms" of the
tests and of bench/; internal, like _testing.py, and never used by the server.

Rules of this module:
- ``DelayingForwarder`` listens on a loopback address (UDP and TCP, one
  port), waits ``delay`` seconds after each query, forwards it to the
  upstream server (a real one: tests/dnsserver.py's KnotServer) and sends
  the answer back unchanged, truncation bit included.  ``queries`` counts
  what it received.
- It runs its own event loop in its own thread, so a synchronous test, an
  asyncio test and a benchmark can all use it alike; the queries wait
  concurrently, so a burst of lookups costs one ``delay``, not one each.
- Every wait on the upstream is bounded (``upstream_timeout``); a query it
  cannot forward gets no answer, as from a lossy network.
- As a program, for benchmarks that keep it out of the measured process:
  ``python -m fastsmtp._testing_dns 127.0.0.1:UPSTREAM_PORT --delay 0.005``
  prints ``listening on 127.0.0.1:PORT`` and runs until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import struct
import sys
import threading
from typing import Any

import dns.asyncquery
import dns.exception
import dns.message

__all__ = ["DelayingForwarder"]


class _Clients(asyncio.DatagramProtocol):
    """The listening UDP socket: each query goes upstream ``delay`` seconds later."""

    def __init__(self, fwd: "DelayingForwarder") -> None:
        self.fwd = fwd

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.fwd.queries += 1
        if len(data) >= 12:        # a DNS header at least (RFC 1035 §4.1.1)
            assert self.fwd._loop is not None
            self.fwd._loop.call_later(self.fwd.delay, self.fwd._send_up, data, addr)


class _Upstream(asyncio.DatagramProtocol):
    """The socket to the real server: answers go back to whoever asked, under their id."""

    def __init__(self, fwd: "DelayingForwarder") -> None:
        self.fwd = fwd

    def datagram_received(self, data: bytes, addr: Any) -> None:
        entry = self.fwd._pending.pop(data[:2], None)
        if entry is not None and self.fwd._clients is not None:
            client, original_id = entry
            self.fwd._clients.sendto(original_id + data[2:], client)


class DelayingForwarder:
    """``with DelayingForwarder(("127.0.0.1", knot.port), delay=0.005) as f: f.port``."""

    def __init__(self, upstream: tuple[str, int], delay: float = 0.005, *,
                 address: str = "127.0.0.1", port: int = 0, upstream_timeout: float = 2.0) -> None:
        self.upstream = upstream
        self.delay = delay
        self.address = address
        self.port = port
        self.upstream_timeout = upstream_timeout
        self.queries = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # UDP is relayed as bytes, not parsed: the forwarder's own cost stays
        # far below the delay it models.  Each query goes up under an id of
        # ours (two clients may use the same one) and is matched back by it.
        self._pending: dict[bytes, tuple[Any, bytes]] = {}
        self._next_id = 0
        self._clients: asyncio.DatagramTransport | None = None
        self._upstream: asyncio.DatagramTransport | None = None

    @property
    def server(self) -> tuple[str, int]:
        return (self.address, self.port)

    def _send_up(self, data: bytes, client: Any) -> None:
        if self._upstream is None:
            return
        for _ in range(65536):
            self._next_id = (self._next_id + 1) & 0xFFFF
            our_id = self._next_id.to_bytes(2, "big")
            if our_id not in self._pending:
                break
        else:
            return                 # 65536 queries unanswered: drop this one
        entry = (client, data[:2])
        self._pending[our_id] = entry
        assert self._loop is not None
        self._loop.call_later(self.upstream_timeout, self._expire, our_id, entry)
        # The upstream's answer goes back as it came, TC flag and all: the
        # client must see truncation to retry over TCP (RFC 7766 §5).
        self._upstream.sendto(our_id + data[2:])

    def _expire(self, our_id: bytes, entry: tuple[Any, bytes]) -> None:
        if self._pending.get(our_id) is entry:
            del self._pending[our_id]

    async def _forward_tcp(self, data: bytes) -> bytes | None:
        await asyncio.sleep(self.delay)
        try:
            query = dns.message.from_wire(data)
            host, port = self.upstream
            reply = await dns.asyncquery.tcp(query, host, port=port, timeout=self.upstream_timeout)
            return reply.to_wire(max_size=65535)
        except (OSError, EOFError, dns.exception.DNSException, ValueError):
            return None

    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)              # so that stop() can end it
        try:
            while True:
                # RFC 1035 §4.2.2 / RFC 7766 §8: two-octet length, then the message.
                size = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), 10))[0]
                data = await asyncio.wait_for(reader.readexactly(size), 10)
                self.queries += 1
                reply = await self._forward_tcp(data)
                if reply is None:
                    break
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
        except (OSError, EOFError, asyncio.IncompleteReadError, asyncio.TimeoutError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        # TCP first with port 0 picks the port; UDP then takes the same one.
        tcp = await asyncio.start_server(self._tcp_client, self.address, self.port)
        self.port = tcp.sockets[0].getsockname()[1]
        self._clients, _ = await loop.create_datagram_endpoint(
            lambda: _Clients(self), local_addr=(self.address, self.port))
        self._upstream, _ = await loop.create_datagram_endpoint(
            lambda: _Upstream(self), remote_addr=self.upstream)
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            self._clients.close()
            self._upstream.close()
            tcp.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(self._main())
        except BaseException as exc:  # reported to start()
            self._error = exc
            self._ready.set()
        finally:
            self._loop.close()

    def start(self) -> "DelayingForwarder":
        self._thread = threading.Thread(target=self._run, name="dns-forwarder", daemon=True)
        self._thread.start()
        if not self._ready.wait(10) or self._error is not None:
            raise RuntimeError(f"the DNS forwarder did not start: {self._error!r}")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(10)
            self._thread = None

    def __enter__(self) -> "DelayingForwarder":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    from .dns import parse_server

    ap = argparse.ArgumentParser(prog="python -m fastsmtp._testing_dns", description=__doc__.splitlines()[0])
    ap.add_argument("upstream", help="HOST:PORT of the real server")
    ap.add_argument("--delay", type=float, default=0.005, help="seconds before each answer (default 0.005)")
    ap.add_argument("--address", default="127.0.0.1", help="loopback address to listen on")
    ap.add_argument("--port", type=int, default=0, help="port to listen on (default: a free one)")
    args = ap.parse_args(argv)
    fwd = DelayingForwarder(parse_server(args.upstream), args.delay, address=args.address, port=args.port).start()
    print(f"listening on {fwd.address}:{fwd.port}", flush=True)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    fwd.stop()
    print(f"queries {fwd.queries}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
