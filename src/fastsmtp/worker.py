"""One worker process: an event loop, a listening socket, a Maildir writer.

Rules of this module:
- The worker binds its own socket with SO_REUSEPORT, so that several
  workers (and a restarted one) can listen on one port and the kernel
  spreads connections between them.
- Stopping is graceful: stop accepting, answer idle sessions 421 4.3.2, let
  transactions in progress finish within ``shutdown_timeout``, then commit
  whatever the writer still holds.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
from typing import Callable

from .config import Config
from .maildir import MaildirWriter, clean_tmp
from .server import Server

__all__ = ["bind_socket", "serve", "run_worker"]

log = logging.getLogger("fastsmtp")


def bind_socket(host: str, port: int) -> socket.socket:
    """A non-blocking listening socket with SO_REUSEADDR and SO_REUSEPORT."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, socktype, proto, _, addr = infos[0]
    sock = socket.socket(family, socktype, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(addr)
        sock.listen(1024)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def serve(
    config: Config,
    sock: socket.socket | None = None,
    on_ready: Callable[[tuple[str, int]], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve until ``stop`` is set (or SIGTERM/SIGINT), then stop gracefully."""
    loop = asyncio.get_running_loop()
    if stop is None:
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    removed = clean_tmp(config.mail_root, hostname=config.hostname)
    if removed:
        log.info("removed %d stale file(s) from tmp/ folders", removed)
    writer = MaildirWriter(
        hostname=config.hostname, fsync=config.fsync, spill_threshold=config.spill_threshold
    )
    writer.start(loop)
    server = Server(config, writer)
    if sock is None:
        sock = bind_socket(config.host, config.port)
    listener = await loop.create_server(server.protocol_factory, sock=sock)
    address = sock.getsockname()[:2]
    if on_ready is not None:
        on_ready(address)
    try:
        await stop.wait()
    finally:
        listener.close()
        server.begin_shutdown()
        deadline = loop.time() + config.shutdown_timeout
        while server.connections and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(server.connections):
            conn.abort()
        # Commits still queued finish before the process ends: a message
        # whose 250 was lost to the abort is still stored (RFC 1047).
        await loop.run_in_executor(None, writer.close)


def install_loop(name: str) -> str:
    """Use uvloop unless asked not to or missing; return the loop's name."""
    if name == "uvloop":
        try:
            import uvloop
        except ImportError:
            return "asyncio"
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        return "uvloop"
    return "asyncio"


def run_worker(config: Config) -> int:
    loop_name = install_loop(config.loop)

    def ready(address: tuple[str, int]) -> None:
        host, port = address
        shown = f"[{host}]" if ":" in host else host
        print(
            f"fastsmtp listening on {shown}:{port} ({loop_name}), "
            f"delivering into {config.mail_root}/<domain>/<user>/new/",
            flush=True,
        )
        if config.fsync == "off":
            print("WARNING: --fsync off: acknowledged mail can be lost on a crash", file=sys.stderr, flush=True)

    asyncio.run(serve(config, on_ready=ready))
    return 0
