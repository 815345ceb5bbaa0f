"""Screening before and during the session: trust, the greeting test, DNSBL, greylisting.

Rules of this module:
- ``Screen`` is one worker's screening; opening.py asks it before the
  greeting and the RCPT handler asks it per recipient.  It decides; the
  connection carries the decision out (greets, delays, refuses).
- A client in ``--trusted-networks`` is screened by nothing: no
  per-address limit, no greeting delay, no DNSBL, no greylisting (as
  Postfix exempts $mynetworks).  Line, size, error and time limits still
  apply to it; those live in the session, not here.
- The greeting test (postscreen's pregreet test) is remembered per client
  address for ``--greeting-pass-ttl`` in the shared store
  (screenstore.py): a client that waited is greeted at once the next time,
  by any worker, also after a restart; an early talker is refused at once
  for the same time.
- DNSBL scores (dnsbl.py) are asked while the greeting waits.  A score at
  or over the threshold refuses the connection (554 5.7.1, RFC 5782 §5's
  "client blocked" use); a negative score marks the client allow-listed,
  which skips greylisting.
- Greylisting (RFC 6647) runs at RCPT, after the recipient is known to
  exist, so unknown users are told 550 at once and leave no triplet.
- Each decision is counted (``fastsmtp_screen_decisions_total``) and logged
  at info, except the common ones (trusted, remembered, a known triplet),
  which would write a line per connection or recipient: those are counted
  only.  A pass is logged once per client and TTL.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from .dnsbl import DNSBL, Score, parse_sites
from .events import Reply

if TYPE_CHECKING:
    from .config import Config
    from .dns import Lookups
    from .metrics import Meter
    from .networks import Networks
    from .screenstore import ScreenStore

__all__ = ["Screen", "GREYLISTED", "blocked"]

log = logging.getLogger("fastsmtp")

#: RFC 6647 §2.1 asks for a 4xx; postgrey's words.
GREYLISTED = Reply(451, "4.7.1", "Greylisted, try again later")


def blocked(address: str, site: str) -> Reply:
    """postscreen's reply to a client over the DNSBL threshold."""
    return Reply(554, "5.7.1", f"Service unavailable; client [{address}] blocked using {site}")


class Screen:
    """One worker's screening: the settings, the DNSBL sites, the shared store."""

    def __init__(self, config: Config, trusted: Networks, lookups: Lookups | None, meter: Meter) -> None:
        self.trusted = trusted
        self.meter = meter
        self.delay = config.greeting_delay
        self.pass_ttl = config.greeting_pass_ttl
        self.remembers = self.delay > 0 and self.pass_ttl > 0
        sites = parse_sites(config.dnsbl_sites)
        self.dnsbl = DNSBL(sites, lookups) if sites and lookups is not None else None
        self.threshold = config.dnsbl_threshold
        self.greylisting = config.greylist == "on"
        self._config = config
        self._store: ScreenStore | None = None
        self._store_failed = False

    @property
    def store(self) -> ScreenStore | None:
        """The shared store, opened on first use (after the fork: the connection is this worker's)."""
        if self._store is None and not self._store_failed and (self.remembers or self.greylisting):
            from .screenstore import GreylistRules, ScreenStore

            config = self._config
            rules = GreylistRules(
                delay=config.greylist_delay,
                window=config.greylist_window,
                lifetime=config.greylist_lifetime,
                auto_allow=config.greylist_auto_allow,
            )
            try:
                os.makedirs(os.path.dirname(config.screen_db), exist_ok=True)
                self._store = ScreenStore(config.screen_db, rules=rules)
            except OSError as exc:
                # Screening is a filter, not a gate: without its memory the
                # server still works, testing every client each time.
                log.error("screening store %s unusable (%s): nothing is remembered", config.screen_db, exc)
                self._store_failed = True
        return self._store

    # -- before the greeting -------------------------------------------------------

    def remembered(self, address: str) -> str | None:
        """The client's greeting test on record: "pass", "fail" or None."""
        if not self.remembers:
            return None
        store = self.store
        result = store.greeting(address) if store is not None else None
        self.meter.greeting_memory(result is not None)
        return result

    def greeting_passed(self, address: str) -> None:
        self.meter.screened("pass")
        log.info("screen: %s passed the greeting test", address)
        store = self.store if self.remembers else None
        if store is not None:
            store.record_greeting(address, "pass", self.pass_ttl)

    def talked_early(self, address: str) -> None:
        self.meter.screened("early_talker")
        log.info("screen: early talker %s refused", address)
        store = self.store if self.remembers else None
        if store is not None:
            store.record_greeting(address, "fail", self.pass_ttl)

    def judge(self, address: str, score: Score) -> Reply | None:
        """A DNSBL score's verdict: the refusal, or None (and allow-listing noted by the caller)."""
        if score.total >= self.threshold:
            site = score.top or "a DNSBL"
            self.meter.screened("dnsbl")
            log.info("screen: %s blocked using %s (score %d, threshold %d)", address, site, score.total,
                     self.threshold)
            return blocked(address, site)
        if score.total < 0:
            self.meter.screened("dnsbl_allowlisted")
            log.debug("screen: %s allow-listed (score %d)", address, score.total)  # a DNSWL client: every connection
        return None

    # -- at RCPT ---------------------------------------------------------------------

    def greylist(self, address: str, sender: str, recipient: str) -> Reply | None:
        """GREYLISTED for a triplet not yet retried in time, else None."""
        store = self.store
        if store is None:
            return None
        answer = store.greylist(address, sender, recipient)
        if answer.allowed:
            self.meter.screened("greylist_pass")
            if answer.why == "passed":
                log.info("screen: greylisting passed for %s from <%s> to <%s>", address, sender, recipient)
            return None
        self.meter.screened("greylisted")
        log.info("screen: greylisted %s from <%s> to <%s> (%s)", address, sender, recipient, answer.why)
        return GREYLISTED

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None
