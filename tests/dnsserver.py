"""A real DNS server for the tests: Knot DNS (knotd) on a loopback port.

Rules of this module:
- ``KnotServer`` serves the zones it is given, authoritatively, on
  127.0.0.1 (or another 127.x address) at a free port, over UDP and TCP,
  and on no other address.  Everything it writes (config, zone files, its
  rundir, storage and control socket) lives in its own temporary folder,
  removed on exit.
- It is stopped by the PID we started, never by name; every wait (the
  first answer, a reload, the exit) has a deadline.
- ``zone_text`` writes a zone from (name, type, value) records with a short
  SOA (so negative answers live ``SOA_MINIMUM`` seconds, RFC 2308 §5) and
  splits long TXT values into 255-octet character-strings (RFC 1035 §3.3.14).
- Tests that need knotd skip with a reason where it is missing (``needs_knot``);
  .ci/run installs Debian's knot so that they run in CI.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterable, Mapping, Sequence, Union

import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

__all__ = ["KnotServer", "zone_text", "txt_strings", "needs_knot", "KNOTD", "free_port"]

KNOTD = shutil.which("knotd") or ("/usr/sbin/knotd" if os.path.exists("/usr/sbin/knotd") else None)
KNOTC = shutil.which("knotc") or ("/usr/sbin/knotc" if os.path.exists("/usr/sbin/knotc") else None)

needs_knot = pytest.mark.skipif(KNOTD is None, reason="knotd (Debian package knot) is not installed")

SOA_MINIMUM = 60
DEFAULT_TTL = 300

#: A record: (owner, type, value) or (owner, type, value, ttl).  The owner is
#: relative to the zone ("@" for its apex) or absolute with a final dot.  A
#: TXT value is a str or bytes (split as needed) or a list of them (one
#: character-string each, as given).
Record = Union[tuple[str, str, object], tuple[str, str, object, int]]


def txt_strings(value: str | bytes) -> list[bytes]:
    """A TXT value as the 255-octet character-strings it needs (RFC 1035 §3.3.14)."""
    data = value.encode() if isinstance(value, str) else value
    return [data[i:i + 255] for i in range(0, len(data), 255)] or [b""]


def _quoted(s: bytes) -> str:
    """One zone-file character-string: quoted, with \\DDD for anything unsafe."""
    out = []
    for b in s:
        if 0x20 < b < 0x7F and b not in (0x22, 0x5C, 0x3B, 0x28, 0x29):
            out.append(chr(b))
        elif b == 0x20:
            out.append(" ")
        else:
            out.append(f"\\{b:03d}")
    return '"' + "".join(out) + '"'


def zone_text(origin: str, records: Iterable[Record], serial: int = 1) -> str:
    """A zone file for ``origin``: SOA and NS first, then ``records``."""
    origin = origin.rstrip(".") + "."
    lines = [
        f"$ORIGIN {origin}",
        f"$TTL {DEFAULT_TTL}",
        # The SOA's own TTL and MINIMUM are both short: a negative answer
        # lives min(SOA TTL, MINIMUM) = SOA_MINIMUM (RFC 2308 §5).
        f"@ {SOA_MINIMUM} SOA ns.{origin} hostmaster.{origin} {serial} 3600 600 86400 {SOA_MINIMUM}",
        f"@ {DEFAULT_TTL} NS ns.{origin}",
        f"ns {DEFAULT_TTL} A 127.0.0.1",
    ]
    for rec in records:
        owner, rtype, value = rec[0], rec[1].upper(), rec[2]
        ttl = rec[3] if len(rec) > 3 else DEFAULT_TTL  # type: ignore[misc]
        if rtype == "TXT":
            parts = value if isinstance(value, list) else txt_strings(value)  # type: ignore[arg-type]
            # Parentheses let one RR span lines (RFC 1035 §5.1): one string a line.
            rdata = "( " + "\n  ".join(_quoted(p.encode() if isinstance(p, str) else p) for p in parts) + " )"
        else:
            rdata = str(value)
        lines.append(f"{owner} {ttl} {rtype} {rdata}")
    return "\n".join(lines) + "\n"


def free_port(address: str = "127.0.0.1") -> int:
    """A port free for both UDP and TCP on ``address`` just now."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
            t.bind((address, 0))
            port = t.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                try:
                    u.bind((address, port))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port for both UDP and TCP")


class KnotServer:
    """``with KnotServer({"example.com": zone_text(...)}) as dns: dns.port``."""

    def __init__(self, zones: Mapping[str, str], address: str = "127.0.0.1") -> None:
        if not address.startswith("127."):
            raise ValueError("tests serve DNS on loopback (127.x) only")
        self.address = address
        self.zones = {k.rstrip(".").lower(): v for k, v in zones.items()}
        self.port = 0
        self.dir: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def server(self) -> tuple[str, int]:
        """(address, port), as ``Resolver(servers=[...])`` takes it."""
        return (self.address, self.port)

    def _write(self) -> None:
        assert self.dir is not None
        for name, text in self.zones.items():
            (self.dir / f"{name}.zone").write_text(text)
        d = self.dir
        conf = [
            "server:",
            f'    rundir: "{d}"',
            f"    listen: {self.address}@{self.port}",
            "    udp-workers: 1",
            "    tcp-workers: 1",
            "    background-workers: 1",
            "database:",
            f'    storage: "{d}"',
            "control:",
            f'    listen: "{d}/knot.sock"',
            "log:",
            "  - target: stderr",
            "    any: warning",
            "template:",
            "  - id: default",
            f'    storage: "{d}"',
            '    file: "%s.zone"',
            "    zonefile-sync: -1",        # never write our zone files back
            "    zonefile-load: whole",
            "    journal-content: none",
            "    semantic-checks: off",     # CNAME loops and the like are the point
            "zone:",
        ] + [f"  - domain: {name}" for name in self.zones]
        (d / "knot.conf").write_text("\n".join(conf) + "\n")

    def __enter__(self) -> "KnotServer":
        if KNOTD is None:
            pytest.skip("knotd (Debian package knot) is not installed")
        self.dir = Path(tempfile.mkdtemp(prefix="knot-"))
        try:
            self.port = free_port(self.address)
            self._write()
            self._log = open(self.dir / "knotd.log", "wb")
            self.proc = subprocess.Popen([KNOTD, "-c", str(self.dir / "knot.conf")],
                                         stdout=self._log, stderr=subprocess.STDOUT)
            for name in self.zones:
                self._wait_serial(name, None)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _soa_serial(self, zone: str) -> int | None:
        q = dns.message.make_query(zone + ".", dns.rdatatype.SOA)
        try:
            r = dns.query.udp(q, self.address, port=self.port, timeout=0.2)
        except (OSError, dns.exception.DNSException):
            return None
        if r.rcode() != dns.rcode.NOERROR or not r.answer:
            return None
        return int(r.answer[0][0].serial)

    def _wait_serial(self, zone: str, serial: int | None, timeout: float = 10.0) -> None:
        """Until ``zone`` answers its SOA (with ``serial``, when given), bounded."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"knotd exited {self.proc.returncode}: {self.log()[-2000:]}")
            got = self._soa_serial(zone)
            if got is not None and (serial is None or got == serial):
                return
            time.sleep(0.02)
        raise RuntimeError(f"knotd did not serve {zone} within {timeout} s: {self.log()[-2000:]}")

    def log(self) -> str:
        try:
            return (self.dir / "knotd.log").read_text(errors="replace") if self.dir else ""
        except OSError:
            return ""

    def reload(self, zones: Mapping[str, str], serial: int) -> None:
        """Serve ``zones`` instead (written with ``serial``, which must grow); waits until served."""
        if KNOTC is None:
            pytest.skip("knotc (Debian package knot) is not installed")
        self.zones = {k.rstrip(".").lower(): v for k, v in zones.items()}
        self._write()
        subprocess.run([KNOTC, "-c", str(self.dir / "knot.conf"), "-t", "5", "reload"],  # type: ignore[operator]
                       check=True, capture_output=True, timeout=10)
        for name in self.zones:
            self._wait_serial(name, serial)

    def __exit__(self, *exc: object) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)   # our own child, by its PID
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if getattr(self, "_log", None) is not None:
            self._log.close()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

