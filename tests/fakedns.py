"""DNS servers that misbehave on purpose: fault injection for test_dns.py.

Rules of this module:
- Fakes are for faults only; every right answer in the tests comes from a
  real server (dnsserver.py's KnotServer), or from the fake in ``truncate``
  mode, whose point is how the answer is framed, not what it says.
- ``FaultServer(mode)`` listens on 127.0.0.1 (UDP and TCP, one free port),
  in a thread with blocking sockets and short select() waits, and stops
  when the ``with`` block ends.  Modes:
    silent      never answers (the timeout)
    garbage     answers random-looking bytes that are no DNS message
    wrong_id    answers with the query id flipped, then nothing
    wrong_id_then_right   a wrong-id answer, then the right one
    servfail    rcode SERVFAIL (RFC 1035 §4.1.1)
    truncate    over UDP the answer with TC=1 and no records; over TCP the
                whole answer (``txt``), as RFC 7766 §5 expects a client to ask
- ``udp_queries`` and ``tcp_queries`` count what came in.
- The delaying forwarder (a real answer, late) lives in
  src/fastsmtp/_testing_dns.py, so that bench/ can use it; it is re-exported here.
"""

from __future__ import annotations

import select
import socket
import struct
import threading
from typing import Sequence

import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from fastsmtp._testing_dns import DelayingForwarder

__all__ = ["FaultServer", "DelayingForwarder", "MODES"]

MODES = ("silent", "garbage", "wrong_id", "wrong_id_then_right", "servfail", "truncate")

GARBAGE = bytes(range(7, 250, 3)) * 3


class FaultServer:
    """``with FaultServer("servfail") as f: Resolver([f.server])``."""

    def __init__(self, mode: str, *, txt: Sequence[bytes] = (b"v=spf1 -all",), address: str = "127.0.0.1") -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}")
        self.mode = mode
        self.txt = list(txt)
        self.address = address
        self.udp_queries = 0
        self.tcp_queries = 0
        self._stop = threading.Event()
        self._tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._tcp.bind((address, 0))
        self.port = self._tcp.getsockname()[1]
        self._udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._udp.bind((address, self.port))
        self._tcp.listen(16)
        self._thread = threading.Thread(target=self._run, name=f"fakedns-{mode}", daemon=True)

    @property
    def server(self) -> tuple[str, int]:
        return (self.address, self.port)

    def answer(self, data: bytes, *, tcp: bool) -> list[bytes]:
        """The datagrams (or TCP messages) this mode sends for one query."""
        if self.mode == "silent":
            return []
        if self.mode == "garbage":
            return [GARBAGE]
        try:
            query = dns.message.from_wire(data)
        except Exception:
            return []
        reply = dns.message.make_response(query)
        if self.mode == "servfail":
            reply.set_rcode(dns.rcode.SERVFAIL)
            return [reply.to_wire()]
        q = query.question[0]
        reply.answer.append(dns.rrset.from_text_list(
            q.name, 300, dns.rdataclass.IN, dns.rdatatype.TXT,
            [" ".join('"' + s.decode() + '"' for s in _split(t)) for t in self.txt]))
        if self.mode == "truncate" and not tcp:
            reply.answer.clear()
            reply.flags |= dns.flags.TC
        right = reply.to_wire(max_size=65535)
        if self.mode.startswith("wrong_id"):
            wrong = struct.pack("!H", query.id ^ 0xFFFF) + right[2:]
            return [wrong, right] if self.mode == "wrong_id_then_right" else [wrong]
        return [right]

    def _run(self) -> None:
        clients: list[socket.socket] = []
        while not self._stop.is_set():
            ready, _, _ = select.select([self._udp, self._tcp, *clients], [], [], 0.05)
            for s in ready:
                if s is self._udp:
                    data, addr = self._udp.recvfrom(65535)
                    self.udp_queries += 1
                    for out in self.answer(data, tcp=False):
                        self._udp.sendto(out, addr)
                elif s is self._tcp:
                    conn, _ = self._tcp.accept()
                    conn.settimeout(2.0)
                    clients.append(conn)
                else:
                    if not self._serve_tcp(s):
                        clients.remove(s)
                        s.close()
        for c in clients:
            c.close()

    def _serve_tcp(self, conn: socket.socket) -> bool:
        """One length-prefixed query (RFC 1035 §4.2.2); False when the peer is gone."""
        try:
            head = _recv_exactly(conn, 2)
            data = _recv_exactly(conn, struct.unpack("!H", head)[0])
        except OSError:
            return False
        if not data:
            return False
        self.tcp_queries += 1
        for out in self.answer(data, tcp=True):
            conn.sendall(struct.pack("!H", len(out)) + out)
        return True

    def __enter__(self) -> "FaultServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._udp.close()
        self._tcp.close()


def _split(data: bytes) -> list[bytes]:
    return [data[i:i + 255] for i in range(0, len(data), 255)] or [b""]


def _recv_exactly(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return buf
