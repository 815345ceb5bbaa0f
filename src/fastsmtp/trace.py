"""The trace header block: ``Return-Path:`` and ``Received:`` (RFC 5321 §4.4).

Rules of this module:
- Built once per message from pre-encoded parts; the only work per message
  is sanitising the HELO argument and joining.  The date is formatted at
  most once a second (``email.utils.formatdate`` costs several µs).
- Nothing a client chose can start a new header line: the HELO argument is
  cut to the characters of a domain or address literal, and addresses have
  already passed the RFC 5321 grammar (no CR, LF or controls).
"""

from __future__ import annotations

import re
import time
from email.utils import formatdate

__all__ = ["TraceHeaders", "return_path"]

# A HELO argument goes into the Received header: keep it to the characters
# of a domain or address literal, so that nothing a client says can start a
# new header line or break the comment syntax (RFC 5322 §3.6.7).
_UNSAFE_HELO = re.compile(rb"[^A-Za-z0-9.\-_:\[\]]")


class TraceHeaders:
    """Renders the trace block for one server host name."""

    __slots__ = ("_by", "_second", "_date", "_helo", "_safe_helo")

    def __init__(self, hostname: bytes) -> None:
        self._by = b"\tby " + hostname + b" (fastsmtp) with "
        self._second = -1
        self._date = b""
        # The last HELO argument and its sanitised form: a session sends
        # one and then many messages.
        self._helo: bytes | None = None
        self._safe_helo = b""

    def date(self) -> bytes:
        """RFC 5322 date-time of now, in local time; recomputed once a second."""
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._date = formatdate(now, localtime=True).encode("ascii")
        return self._date

    def render(
        self,
        *,
        sender: bytes,
        helo: bytes | None,
        peer: str,
        esmtp: bool,
        smtputf8: bool,
        tls: str | None,
        queue_id: str,
        recipients: list[bytes],
    ) -> bytes:
        """The block for one message.

        The protocol word follows the IANA "WITH protocol types" registry:
        ESMTP, ESMTPS over TLS (RFC 3848), UTF8SMTP/UTF8SMTPS (RFC 6531 §3.7.3).
        ``for <addr>`` is written only for a single recipient, so that one
        recipient's copy never names the others (RFC 5321 §7.2).
        """
        if helo is not self._helo:
            self._helo = helo
            self._safe_helo = _UNSAFE_HELO.sub(b"?", (helo or b"unknown")[:255])
        safe_helo = self._safe_helo
        if smtputf8:
            protocol = b"UTF8SMTP"
        else:
            protocol = b"ESMTP" if esmtp else b"SMTP"
        if tls is not None and esmtp:
            protocol += b"S"
        tls_clause = b"\r\n\t(" + tls.encode("ascii", "replace") + b")" if tls is not None else b""
        for_clause = b"\r\n\tfor <" + recipients[0] + b">" if len(recipients) == 1 else b""
        return b"".join(
            (
                return_path(sender),
                b"Received: from ", safe_helo, b" ([", peer.encode("ascii", "replace"), b"])", tls_clause, b"\r\n",
                self._by, protocol, b" id ", queue_id.encode("ascii"), for_clause, b";\r\n\t", self.date(), b"\r\n",
            )
        )


def return_path(sender: bytes) -> bytes:
    """The ``Return-Path:`` line for a reverse-path (RFC 5321 §4.4): the first line of every stored message."""
    return b"Return-Path: <" + sender + b">\r\n"
