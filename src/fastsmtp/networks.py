"""Sets of networks a client address is looked up in: whose PROXY header we take, whom we trust.

Rules of this module:
- ``Networks`` is built once per worker from CIDR strings (already
  checked by settings.py) and answers ``peer in networks`` for the
  address text a transport gives.  Text that is no IP address (a UNIX
  socket's peer) is in no network.
- Answers are remembered per address text (at most ``MEMO`` of them):
  ``ipaddress`` parses in Python, ~10 µs an address here, and the same
  clients come back for every message.
"""

from __future__ import annotations

import ipaddress
from typing import Iterable

__all__ = ["Networks", "MEMO"]

MEMO = 4096


class Networks:
    """Networks, in the order given; ``address in self`` tests one address."""

    __slots__ = ("_nets", "_known")

    def __init__(self, cidrs: Iterable[str]) -> None:
        self._nets = tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)
        self._known: dict[str, bool] = {}

    def __bool__(self) -> bool:
        return bool(self._nets)

    def __contains__(self, peer: object) -> bool:
        if not self._nets or not isinstance(peer, str):
            return False
        known = self._known.get(peer)
        if known is None:
            known = _within(peer, self._nets)
            if len(self._known) >= MEMO:
                self._known.clear()
            self._known[peer] = known
        return known


def _within(peer: str, nets: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]) -> bool:
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return False
    return any(address in net for net in nets)
