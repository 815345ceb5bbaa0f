"""Flow control: reading pauses while anything holds it, each hold named.

Rules of this module:
- Every pause of reading goes through ``hold(reason)`` and ends with
  ``release(reason)``: the transport's ``pause_reading()`` is called when
  the first reason appears and ``resume_reading()`` when the last one goes.
  Both are idempotent per reason, as uvicorn's FlowControl is per flag.
- The reasons are plain strings naming who waits: ``"commit"`` (a message
  waits for stable storage), ``"stage"`` (a policy hook or other stage
  thinks), ``"tarpit"`` (an error reply is being delayed), ``"write"``
  (the peer does not read its replies: the transport paused our writing),
  ``"tls"`` (the STARTTLS handshake owns the socket).
"""

from __future__ import annotations

import asyncio

__all__ = ["FlowControl"]


class FlowControl:
    """Reading is paused while ``held`` is not empty."""

    __slots__ = ("_transport", "held")

    def __init__(self, transport: asyncio.Transport | None = None) -> None:
        self._transport = transport
        #: The reasons holding reading now.
        self.held: set[str] = set()

    def hold(self, reason: str) -> None:
        if not self.held:
            self._pause()
        self.held.add(reason)

    def release(self, reason: str) -> None:
        if reason not in self.held:
            return
        self.held.discard(reason)
        if not self.held:
            self._resume()

    def retarget(self, transport: asyncio.Transport) -> None:
        """Follow a (new) transport: at connection_made, and after STARTTLS."""
        self._transport = transport
        if self.held:
            self._pause()

    def _pause(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.pause_reading()

    def _resume(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()
