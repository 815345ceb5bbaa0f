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
- A recipient the backend took is remembered for ``--lmtp-rcpt-cache``
  seconds (30; 0: ask every time), as Postfix's address verification
  remembers its answers (for 31 days there): a sender's run of messages to
  one user costs one question.  Only a yes is remembered.  A user who goes
  over quota within that time is told so at delivery instead, which a
  backend with ``quota_full_tempfail = yes`` makes a retry.  At most
  ``CACHE_SIZE`` addresses, the oldest forgotten first.
- An address literal or an address without a domain is never a recipient
  here, as in the folder check: no relaying by another name.
"""

from __future__ import annotations

import logging
import os
import time

from ..events import Address, Reply
from ..journal import LMTP
from ..policy import no_domain_name, relay_denied
from ..stages import CONTINUE, Verdict
from .client import LMTPClient, LMTPTemporaryError
from .protocol import CommandError

__all__ = ["LmtpRecipients", "CACHE_SIZE"]

log = logging.getLogger("fastsmtp.lmtp")

CACHE_SIZE = 10_000


class LmtpRecipients:
    """RCPT checks against the LMTP backends of ``--deliver``."""

    def __init__(self, client: LMTPClient, remember: float = 30.0) -> None:
        self.client = client
        self.remember = remember
        #: RCPTs taken without the backend's word (it could not answer).
        self.unverified = 0
        self._said_at = -60.0
        # lower-cased address -> until when the backend's yes holds (monotonic).
        self._known: dict[bytes, float] = {}
        self._clock = time.monotonic

    @staticmethod
    def target(address: Address) -> str:
        """The store's target for a recipient: ``lmtp:<address as sent>``."""
        return LMTP + os.fsdecode(address.raw)

    async def check(self, address: Address) -> Verdict:
        """The backend's word on one recipient: CONTINUE, or its refusal."""
        if no_domain_name(address.domain):
            return Verdict(relay_denied(address))
        key = address.raw.lower()
        now = self._clock()
        until = self._known.get(key)
        if until is not None:
            if until > now:
                return CONTINUE
            del self._known[key]
        if self.client.all_down():
            # Every backend failed lately: no question, no wait on each RCPT.
            self.unverified += 1
            return CONTINUE
        try:
            reply = await self.client.probe(address.raw)
        except CommandError:
            # A quoted "<" or ">" (RFC 5321 §4.1.2 allows them): LMTP cannot carry it.
            shown = address.raw.decode("utf-8", "replace")
            return Verdict(Reply(553, "5.1.3", f"<{shown}>: the mail store cannot take this address"))
        except LMTPTemporaryError as exc:
            self.unverified += 1
            if now - self._said_at >= 60:
                self._said_at = now
                log.warning("lmtp: the backend cannot check recipients (%s); taking them unverified "
                            "(%d so far)", exc, self.unverified)
            return CONTINUE
        if reply.code < 400:
            if self.remember > 0:
                if len(self._known) >= CACHE_SIZE:
                    del self._known[next(iter(self._known))]
                self._known[key] = now + self.remember
            return CONTINUE
        return Verdict(reply)

    async def close(self) -> None:
        await self.client.close()
