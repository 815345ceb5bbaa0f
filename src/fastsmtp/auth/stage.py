"""Authentication as a stage: SPF from MAIL on, DKIM and ARC as the content streams, DMARC at the end.

Rules of this module:
- ``Authenticator`` is built once per worker: the modes, the trusted
  networks, the one shared resolver (dns.py), the counters.  A
  ``MessageAuth`` is one transaction's checks, made at MAIL FROM.
- Each check (spf, dkim, dmarc, arc) is ``off`` (not run, not reported),
  ``tag`` (reported in Authentication-Results, the default) or ``enforce``
  (reported, and its failures refused, as the table below says).  DMARC
  uses the SPF and DKIM results; with either off, DMARC sees it as none.
- Work starts as early as it can, and never blocks the loop: the SPF
  checks (MAIL FROM and HELO) start at MAIL and run while RCPT and DATA go
  on; the DKIM and ARC body hashes are updated chunk by chunk as the
  content passes to the spool (``tap``), so the body is read once; at the
  end of data DKIM (the key lookups of several signatures at once), ARC,
  then DMARC.
- No task where nothing waits (eager.py): SPF starts inline at MAIL and is
  a task only from its first DNS question the cache cannot answer; the
  end of data runs inline, without the budget's timer, when ``ready()``
  finds every answer it needs in the resolver's cache (its peek, a dict
  probe each) for a message with at most one signature and no ARC set,
  so the usual message costs no task, no hold on reading and no loop
  turn.  Should an answer expire between that look and its use (a
  race of microseconds), the one question asked is bounded by
  ``--dns-timeout`` instead of the budget.
- The checks have a budget (``--auth-timeout``): SPF from MAIL on, and
  what runs at the end of data from then on, so the client waits at most
  that long after its data.  What has not answered by then is temperror,
  as a DNS timeout would be.
- Clients in the trusted networks are not checked (OpenDMARC's
  IgnoreHosts): their messages get no field and wait for no DNS.
- Authentication-Results fields already in the message that claim our
  authserv-id are removed (RFC 8601 §5); all others are kept.

Enforcement (each only when its check is ``enforce``):

============================  ==========================================
SPF fail                      ``550 5.7.23`` (RFC 7372), at the end of data,
                              or at MAIL with ``--spf-reject-at mail``
SPF temperror                 ``451 4.7.24``
DKIM: every signature fails   ``550 5.7.20`` (unsigned mail passes)
DKIM temperror                ``451 4.7.5``
DMARC fail, p=reject          ``550 5.7.1``
DMARC fail, p=quarantine      stored with X-Quarantine, into ``.Junk``
DMARC temperror               ``451 4.7.1``
ARC fail                      ``550 5.7.29`` (ARC validation failure, RFC 8617)
============================  ==========================================
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Callable

from ..eager import eager
from ..events import Address, Reply
from ..networks import Networks
from ..stages import CONTINUE, Verdict
from . import dmarc as dmarc_check
from .arc import ARCResult
from .dkim import DKIMResult, Verifier
from .dmarc import DMARCResult
from .headers import Header, HeaderTap, authserv_id, field_value
from .results import AuthResults, render, summary
from .spf import SPFResult, check_helo, check_mailfrom

if TYPE_CHECKING:
    from ..config import Config
    from ..dns import Lookups
    from ..metrics import Meter

__all__ = ["Authenticator", "MessageAuth", "MODES", "checks_on"]

log = logging.getLogger("fastsmtp")

MODES = ("off", "tag", "enforce")

_AR = b"authentication-results"


def checks_on(config: Config) -> bool:
    """Whether any of the checks runs (then the worker needs a resolver)."""
    return any(mode != "off" for mode in (config.spf, config.dkim, config.dmarc, config.arc))


class Authenticator:
    """One worker's authentication: modes, trusted networks, the resolver."""

    def __init__(
        self, config: Config, meter: Meter, lookups: Lookups | None = None, *, trusted: Networks | None = None
    ) -> None:
        self.spf = config.spf
        self.dkim = config.dkim
        self.dmarc = config.dmarc
        self.arc = config.arc
        self.active = checks_on(config)
        self.spf_at_mail = config.spf_reject_at == "mail" and self.spf == "enforce"
        self.budget = config.auth_timeout
        self.hostname = config.hostname
        self._id = config.hostname.lower()
        self.meter = meter
        self._trusted = trusted if trusted is not None else Networks(config.trusted_networks)
        self._lookups = lookups
        self._servers = config.dns_server
        self._dns_timeout = config.dns_timeout

    @property
    def lookups(self) -> Lookups:
        """The resolver, made on first use (after the fork: its sockets are this worker's)."""
        if self._lookups is None:
            from ..dns import Resolver

            self._lookups = Resolver.from_config(self._servers, timeout=self._dns_timeout)
        return self._lookups

    def begin(self, peer: str, helo: bytes, sender: Address | None) -> MessageAuth | None:
        """The checks of one transaction, started at MAIL; None: nothing to check."""
        if not self.active or peer in self._trusted:
            return None
        return MessageAuth(self, peer, _text(helo), sender)

    def drops(self, name: bytes, raw: bytes) -> bool:
        """RFC 8601 §5: an Authentication-Results field claiming to be ours goes."""
        return name.lower() == _AR and authserv_id(raw) == self._id


class MessageAuth:
    """One transaction's checks, from MAIL to the end of data."""

    __slots__ = (
        "_auth", "_peer", "_helo", "_sender", "_spf", "_tap", "_verifier", "_from", "results", "summary",
        "quarantine", "_deadline", "_inline",
    )

    def __init__(self, auth: Authenticator, peer: str, helo: str, sender: Address | None) -> None:
        self._auth = auth
        self._peer = peer
        self._helo = helo
        self._sender = sender
        self._tap: HeaderTap | None = None
        self._verifier: Verifier | None = None
        self._from: list[bytes] = []
        self.results: AuthResults | None = None
        #: (check, result) pairs for the log line and the counters, once known.
        self.summary: tuple[tuple[str, str], ...] = ()
        #: Set by a DMARC quarantine that is enforced: deliver into .Junk.
        self.quarantine = False
        #: Set by ready(): finish() runs inline (eager.py) and sets no timer.
        self._inline = False
        loop = asyncio.get_running_loop()
        self._deadline = loop.time() + auth.budget
        self._spf: asyncio.Future[tuple[SPFResult | None, SPFResult | None]] | None = None
        if auth.spf != "off" or auth.dmarc != "off":
            # Inline up to its first DNS wait (eager.py): with the answers
            # cached, it ends here, with no task.
            self._spf = eager(self._check_spf(), loop)

    # -- SPF, from MAIL on -------------------------------------------------------

    async def _check_spf(self) -> tuple[SPFResult | None, SPFResult | None]:
        """MAIL FROM's check, then HELO's (RFC 7208 §2.3, §2.4).

        One after the other in one task: with the answers cached both end
        at their first step, and a second task would cost more than the
        check.  The HELO check runs only when SPF is reported.  The budget
        is kept by whoever waits for this task (at MAIL or at the end of
        data), so that a message pays for one timer, not two.
        """
        auth = self._auth
        lookups = auth.lookups
        sender = self._sender
        address = "" if sender is None else _text(sender.local) + "@" + _text(sender.domain)
        try:
            mailfrom = await check_mailfrom(lookups, self._peer, address, self._helo, auth.hostname)
            helo = None
            if auth.spf != "off":
                helo = await check_helo(lookups, self._peer, self._helo, auth.hostname)
        except ValueError:  # the peer is no IP address (a UNIX socket): nothing to check
            why = "the client has no IP address"
            domain = self._helo if sender is None else _text(sender.domain)
            mailfrom = SPFResult("none", "mailfrom", domain, why)
            helo = SPFResult("none", "helo", self._helo, why) if auth.spf != "off" else None
        return mailfrom, helo

    def _spf_late(self) -> tuple[SPFResult, SPFResult | None]:
        """What the SPF checks are when the budget ran out first."""
        sender = self._sender
        domain = self._helo if sender is None else _text(sender.domain)
        helo = SPFResult("temperror", "helo", self._helo, "timed out") if self._auth.spf != "off" else None
        return SPFResult("temperror", "mailfrom", domain, "timed out"), helo

    async def at_mail(self, info: object, address: object) -> Verdict:
        """``--spf-reject-at mail``: MAIL FROM waits for SPF and is refused on fail."""
        assert self._spf is not None
        try:
            async with asyncio.timeout_at(self._deadline):
                mailfrom, _helo = await self._spf
        except TimeoutError:
            mailfrom, _helo = self._spf_late()
        return _spf_verdict(mailfrom) or CONTINUE

    # -- the content -------------------------------------------------------------

    def tap(self, sink: Callable[[bytes | bytearray | memoryview], None]) -> HeaderTap:
        """What the transaction writes the content to: fields split, body hashed, then ``sink``."""
        self._tap = HeaderTap(sink, self._auth.drops, self._headers_done)
        return self._tap

    def _headers_done(self, headers: list[Header]) -> Callable[[bytes | bytearray | memoryview], None] | None:
        self._from = [field_value(raw) for name, raw in headers if name.lower() == b"from"]
        auth = self._auth
        if auth.dkim == "off" and auth.arc == "off" and auth.dmarc == "off":
            return None
        verifier = Verifier(headers)
        self._verifier = verifier
        return verifier.body if verifier.needs_body else None

    def ready(self) -> bool:
        """The content is over: whether ``finish()`` can answer from what is known now, with no DNS wait.

        The header tap is ended here (as finish() does: a section without
        its empty line ends with the content).  Then: SPF has ended; there
        is at most one DKIM-Signature (several are checked at once, which
        takes tasks), and its key, and the From: domain's DMARC policy (as
        dmarc.answerable decides), are in the resolver's cache; there is no
        ARC set to validate (its keys are not looked at here: such mail
        takes the task's way).  Then ``finish()`` runs inline (stages.py,
        ``eager``) and sets no timer.
        """
        if self._tap is not None:
            self._tap.end()
        if self._spf is not None and not self._spf.done():
            return False
        auth = self._auth
        peek = getattr(auth.lookups, "peek_txt", None)
        if peek is None:
            return False  # a Lookups without a cache of its own (a test's): never inline
        verifier = self._verifier
        overflow = self._tap is not None and self._tap.overflow
        if verifier is not None:
            if not verifier.arc_free or verifier.signatures > 1:
                return False  # ARC's keys, or several signatures checked at once (gather's tasks)
            if (auth.dkim != "off" or auth.dmarc != "off") and not all(
                    peek(name) is not None for name in verifier.key_names()):
                return False
        self._inline = auth.dmarc == "off" or overflow or dmarc_check.answerable(peek, self._from)
        return self._inline

    def abandon(self) -> None:
        """The transaction ended without a message (RSET, a refusal, a lost client)."""
        if self._spf is not None and not self._spf.done():
            self._spf.cancel()

    # -- the end of data ---------------------------------------------------------

    async def finish(self) -> Verdict:
        """Every check's result, the Authentication-Results field, and the verdict."""
        auth = self._auth
        if self._tap is not None:
            self._tap.end()
        mailfrom, helo = await self._spf_results()
        dkim, arc, dmarc_result = await self._content_results(mailfrom)
        spf_on = auth.spf != "off"
        results = AuthResults(
            spf=mailfrom if spf_on else None,
            helo=helo if spf_on else None,
            dkim=tuple(dkim) if auth.dkim != "off" else (),
            dkim_checked=auth.dkim != "off",
            arc=arc,
            dmarc=dmarc_result,
        )
        header = render(auth.hostname, results, self._peer)
        self.results = AuthResults(results.spf, results.helo, results.dkim, results.dkim_checked, results.arc,
                                   results.dmarc, header)
        self.summary = summary(results)
        auth.meter.auth_results(self.summary)
        refusal = self._enforce(results)
        if refusal is not None:
            return Verdict(refusal)
        if self.quarantine:
            assert dmarc_result is not None
            # The domain is the sender's text: printable ASCII only in our field.
            line = f"X-Quarantine: DMARC policy of {_printable(dmarc_result.domain)} is quarantine\r\n"
            return Verdict(None, line.encode("ascii") + header)
        return Verdict(None, header)

    async def _spf_results(self) -> tuple[SPFResult | None, SPFResult | None]:
        """The SPF task's answer, within its budget (from MAIL); None, None when SPF did not run."""
        spf = self._spf
        if spf is None:
            return None, None
        if not spf.done():
            try:
                async with asyncio.timeout_at(self._deadline):
                    await spf
            except TimeoutError:
                pass
        return spf.result() if spf.done() and not spf.cancelled() else self._spf_late()

    async def _content_results(
        self, mailfrom: SPFResult | None
    ) -> tuple[list[DKIMResult], ARCResult | None, DMARCResult | None]:
        """DKIM, ARC and DMARC, one after the other, within one budget from now.

        One after the other: the keys and policies are in the resolver's
        cache for nearly every message, and ARC without ARC fields costs
        nothing.  What has not answered by the deadline is temperror.
        """
        auth = self._auth
        now = time.time()
        verifier = self._verifier
        overflow = self._tap is not None and self._tap.overflow
        run_dkim = auth.dkim != "off" or auth.dmarc != "off"
        dkim: list[DKIMResult] | None = [] if verifier is None or not run_dkim else None
        arc: ARCResult | None = None
        dmarc_result: DMARCResult | None = None
        # Inline, as ready() allowed: nothing here waits, so no timer (and
        # asyncio.timeout would bind to whatever task called us, eager.py).
        budget: contextlib.AbstractAsyncContextManager[object] = (
            contextlib.nullcontext() if self._inline
            else asyncio.timeout_at(asyncio.get_running_loop().time() + auth.budget))
        try:
            async with budget:
                if verifier is not None:
                    verifier.end()
                    if run_dkim:
                        dkim = await verifier.dkim(auth.lookups, now)
                    if auth.arc != "off":
                        arc = await verifier.arc(auth.lookups, now)
                if auth.dmarc != "off" and not overflow:
                    spf_domain = mailfrom.domain if mailfrom is not None else ""
                    spf_word = mailfrom.result if (mailfrom is not None and auth.spf != "off") else "none"
                    passed = [d.domain for d in dkim if d.result == "pass"] if dkim and auth.dkim != "off" else []
                    dmarc_result = await dmarc_check.check(auth.lookups, self._from, spf_domain, spf_word, passed)
        except TimeoutError:
            pass
        if dkim is None:
            dkim = [_DKIM_TIMED_OUT] * self._signature_count()
        if auth.arc != "off" and arc is None:
            arc = ARCResult("none", 0, "header section too large") if overflow else ARCResult("fail", 0, "timed out")
        if auth.dmarc != "off" and dmarc_result is None:
            dmarc_result = (DMARCResult("permerror", reason="header section too large") if overflow
                            else DMARCResult("temperror", reason="timed out"))
        return dkim, arc, dmarc_result

    def _signature_count(self) -> int:
        tap = self._tap
        return 0 if tap is None else sum(1 for name, _ in tap.headers if name.lower() == b"dkim-signature")

    def _enforce(self, results: AuthResults) -> Reply | None:
        auth = self._auth
        if auth.spf == "enforce" and not auth.spf_at_mail:
            refusal = _spf_verdict(results.spf)
            if refusal is not None:
                return refusal.reply
        if auth.dkim == "enforce" and results.dkim:
            words = {d.result for d in results.dkim}
            if "pass" not in words:
                if "temperror" in words:
                    return Reply(451, "4.7.5", "DKIM: temporary error verifying a signature, try again later")
                return Reply(550, "5.7.20", "DKIM: no passing signature found")
        if auth.dmarc == "enforce" and results.dmarc is not None:
            m = results.dmarc
            if m.result == "temperror":
                return Reply(451, "4.7.1", f"DMARC: temporary error for {m.domain or 'the From: domain'}, try again later")
            if m.result == "fail" and m.disposition == "reject":
                return Reply(550, "5.7.1", f"DMARC: message rejected by the policy of {m.domain}")
            if m.result == "fail" and m.disposition == "quarantine":
                self.quarantine = True
        if auth.arc == "enforce" and results.arc is not None and results.arc.result == "fail":
            return Reply(550, "5.7.29", "ARC: validation of the chain failed")
        return None


def _spf_verdict(result: SPFResult | None) -> Verdict | None:
    if result is None:
        return None
    if result.result == "fail":
        why = result.explanation or f"SPF of {result.domain} does not allow this client"
        return Verdict(Reply(550, "5.7.23", _printable(why)))
    if result.result == "temperror":
        return Verdict(Reply(451, "4.7.24", f"SPF: temporary error for {result.domain}, try again later"))
    return None


#: Each signature's result when the budget ran out before its check ended.
_DKIM_TIMED_OUT = DKIMResult("temperror", "", "", "", "", "", "timed out")


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


def _printable(text: str) -> str:
    """A sender's explanation goes into our reply: printable ASCII, bounded."""
    return "".join(c if " " <= c <= "~" else "?" for c in text)[:400]
