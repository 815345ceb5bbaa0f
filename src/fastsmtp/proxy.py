"""The PROXY protocol header, v1 and v2 (HAProxy's proxy-protocol.txt), without I/O.

A TCP load balancer in front of fastsmtp opens each connection with one
header that names the client it is relaying.  Rules of this module:
- Only a header is parsed, and only a bounded one: v1 is at most 107 octets
  (spec §2.1), v2 at most 16 + ``MAX_V2_PAYLOAD``.  Anything malformed or
  oversized is an error; the caller closes the connection.
- Every v2 length is checked against what it claims to contain: the
  address block against the family, each TLV against what is left.
- Whether a peer may send a header at all (trusted networks) is the
  server's decision, not this module's.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

__all__ = ["ProxyInfo", "ProxyHeaderError", "parse_proxy_header", "looks_like_proxy_header", "V2_SIGNATURE"]

V1_PREFIX = b"PROXY "
V1_MAX = 107  # spec §2.1: "a receiver ... must not read more than 107 characters"
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
#: The v2 length field allows 65535; HAProxy's own TLVs (SSL, ALPN,
#: authority, unique id) fit comfortably in 4 KiB.
MAX_V2_PAYLOAD = 4096

_V2_ADDRESS_SIZES = {0x1: 12, 0x2: 36, 0x3: 216}  # AF_INET, AF_INET6, AF_UNIX


class ProxyHeaderError(ValueError):
    """The header is malformed, oversized, or not a PROXY header at all."""


@dataclass(frozen=True, slots=True)
class ProxyInfo:
    """The client the balancer relays; ``source`` is None for LOCAL/UNKNOWN
    connections (health checks), which keep the real peer address."""

    source: str | None
    source_port: int | None = None
    destination: str | None = None
    destination_port: int | None = None


def looks_like_proxy_header(data: bytes) -> bool:
    """Whether ``data`` starts with a PROXY header (v1 or v2)."""
    return data.startswith(V1_PREFIX) or data.startswith(V2_SIGNATURE)


def parse_proxy_header(data: bytes) -> tuple[ProxyInfo, int] | None:
    """Parse the header at the start of ``data``.

    Returns:
        ``(info, consumed)``, or None when more octets are needed.

    Raises:
        ProxyHeaderError: not a valid header (close the connection).
    """
    if data[:1] == b"\r":
        if len(data) < 16:
            if V2_SIGNATURE.startswith(data[:12]):
                return None
            raise ProxyHeaderError("bad PROXY v2 signature")
        return _parse_v2(data)
    if len(data) < len(V1_PREFIX):
        if V1_PREFIX.startswith(data):
            return None
        raise ProxyHeaderError("no PROXY header")
    if not data.startswith(V1_PREFIX):
        raise ProxyHeaderError("no PROXY header")
    return _parse_v1(data)


def _parse_v1(data: bytes) -> tuple[ProxyInfo, int] | None:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyHeaderError("PROXY v1 header longer than 107 octets")
        return None
    parts = data[:end].split(b" ")
    if len(parts) >= 2 and parts[1] == b"UNKNOWN":
        return ProxyInfo(None), end + 2  # spec §2.1: the rest is ignored
    if len(parts) != 6 or parts[1] not in (b"TCP4", b"TCP6"):
        raise ProxyHeaderError("malformed PROXY v1 header")
    version = 4 if parts[1] == b"TCP4" else 6
    try:
        src = ipaddress.ip_address(parts[2].decode("ascii"))
        dst = ipaddress.ip_address(parts[3].decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise ProxyHeaderError("bad address in PROXY v1 header") from None
    if src.version != version or dst.version != version:
        raise ProxyHeaderError("PROXY v1 address family mismatch")
    ports = []
    for raw in parts[4:6]:
        # No sign, no leading zeros, 0..65535 (spec §2.1).
        if not raw.isdigit() or (len(raw) > 1 and raw[0] == 0x30) or int(raw) > 65535:
            raise ProxyHeaderError("bad port in PROXY v1 header")
        ports.append(int(raw))
    return ProxyInfo(str(src), ports[0], str(dst), ports[1]), end + 2


def _parse_v2(data: bytes) -> tuple[ProxyInfo, int] | None:
    if data[:12] != V2_SIGNATURE:
        raise ProxyHeaderError("bad PROXY v2 signature")
    ver_cmd, family, length = struct.unpack("!BBH", data[12:16])
    if ver_cmd >> 4 != 2 or ver_cmd & 0xF > 1:
        raise ProxyHeaderError("unsupported PROXY v2 version or command")
    if length > MAX_V2_PAYLOAD:
        raise ProxyHeaderError(f"PROXY v2 header of {length} octets is over the limit")
    if len(data) < 16 + length:
        return None
    payload = data[16 : 16 + length]
    total = 16 + length
    if ver_cmd & 0xF == 0:  # LOCAL: the balancer's own connection
        return ProxyInfo(None), total
    af, transport = family >> 4, family & 0xF
    if af == 0 or transport not in (1, 2):  # UNSPEC, or neither STREAM nor DGRAM
        return ProxyInfo(None), total
    size = _V2_ADDRESS_SIZES.get(af)
    if size is None or len(payload) < size:
        raise ProxyHeaderError("PROXY v2 address block too short for its family")
    _check_tlvs(payload[size:])
    if af == 0x1:
        src4, dst4, sport, dport = struct.unpack("!4s4sHH", payload[:12])
        return ProxyInfo(str(ipaddress.IPv4Address(src4)), sport, str(ipaddress.IPv4Address(dst4)), dport), total
    if af == 0x2:
        src6, dst6, sport, dport = struct.unpack("!16s16sHH", payload[:36])
        return ProxyInfo(str(ipaddress.IPv6Address(src6)), sport, str(ipaddress.IPv6Address(dst6)), dport), total
    return ProxyInfo(None), total  # AF_UNIX: no address to report


def _check_tlvs(tlvs: bytes) -> None:
    """Each TLV (type, 16-bit length, value) must fit in what is left (spec §2.2.7)."""
    i = 0
    while i < len(tlvs):
        if len(tlvs) - i < 3:
            raise ProxyHeaderError("truncated PROXY v2 TLV")
        (length,) = struct.unpack("!H", tlvs[i + 1 : i + 3])
        i += 3 + length
        if i > len(tlvs):
            raise ProxyHeaderError("PROXY v2 TLV longer than the header")
