"""The recipient check at RCPT when the mail store is an LMTP backend: ask the backend.

Rules of this module:
- With ``--deliver lmtp:...`` the backend (Dovecot, with its userdb and
  its quota) decides who exists, not a folder: each RCPT is one LMTP
  ``MAIL FROM:<> / RCPT TO / RSET`` on a kept connection (client.py's
  probe), and the backend's own refusal is the client's reply: ``550
  5.1.1`` for an unknown user, ``552 5.2.2`` or ``452 4.2.2`` for a full
  mailbox (Dovecot's ``lmtp_rcpt_check_quota``).
- A backend that cannot answer (down, slow, broken) does not stop the MX:
  the recipient is taken, as Postfix takes mail for its queue while the
  store is away, and the backend's answer comes at delivery (a refusal
  then goes to the dead-letter Maildir).  Said once a minute, counted.
- An address literal or an address without a domain is never a recipient
  here, as in the folder check: no relaying by another name.
"""

from __future__ import annotations

import logging
import os
import time

from ..events import Address, Reply
from ..journal import LMTP
from ..stages import CONTINUE, Verdict
from .client import LMTPClient, LMTPTemporaryError

__all__ = ["LmtpRecipients"]

log = logging.getLogger("fastsmtp.lmtp")


class LmtpRecipients:
    """RCPT checks against the LMTP backends of ``--deliver``."""

    def __init__(self, client: LMTPClient) -> None:
        self.client = client
        #: RCPTs taken without the backend's word (it could not answer).
        self.unverified = 0
        self._said_at = -60.0

    @staticmethod
    def target(address: Address) -> str:
        """The store's target for a recipient: ``lmtp:<address as sent>``."""
        return LMTP + os.fsdecode(address.raw)

    async def check(self, address: Address) -> Verdict:
        """The backend's word on one recipient: CONTINUE, or its refusal."""
        if not address.domain or address.domain[:1] == b"[":
            shown = address.raw.decode("utf-8", "replace")
            return Verdict(Reply(550, "5.7.1", f"<{shown}>: Relay access denied"))
        try:
            reply = await self.client.probe(address.raw)
        except LMTPTemporaryError as exc:
            self.unverified += 1
            now = time.monotonic()
            if now - self._said_at >= 60:
                self._said_at = now
                log.warning("lmtp: the backend cannot check recipients (%s); taking them unverified "
                            "(%d so far)", exc, self.unverified)
            return CONTINUE
        if reply.code < 400:
            return CONTINUE
        return Verdict(reply)

    async def close(self) -> None:
        await self.client.close()
