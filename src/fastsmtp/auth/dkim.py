"""DKIM verification (RFC 6376, RFC 8301, RFC 8463), and the Verifier that ARC shares.

Rules of this module:
- ``Verifier(headers)`` reads the header section once: it parses every
  DKIM-Signature (the first ``max_signatures`` of them) and the ARC sets,
  and asks ``BodyHashes`` for the body hashes they need, so the body then
  streams through ``body()`` once, however many signatures share a hash.
- ``dkim()`` answers one ``DKIMResult`` per DKIM-Signature field, top
  first.  The key lookups of all signatures run at once (one per distinct
  name); each signature's trouble is its own result, and nothing raises
  out of ``dkim()`` or ``arc()``.
- No task per message where none is needed: ``at_once`` awaits a lone
  check in place and gathers several (their key lookups then run at
  once).  A task and a gather cost more than all the parsing of a
  signature.
- Choices where RFC 6376 leaves room, each cited where it is made:
  rsa-sha1 and RSA keys under 1024 bits fail (RFC 8301 §3.1, §3.2); an
  unknown a= is permerror; x= in the past beyond ``CLOCK_SKEW`` fails
  ("signature expired", §3.5 x=); t= in the future beyond it is permerror
  (§3.5 t= lets verifiers ignore it); l= beyond the body fails; signatures
  past ``max_signatures`` are "policy" ("too many signatures", §6.1 lets
  verifiers limit the work, RFC 8601 §2.7.1 "policy").
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Coroutine, Final, Sequence, TypeVar

from ..dns import Lookups
from .arc import NO_ARC, ARCPlan, ARCResult  # arc.py imports this module only when validating
from .canon import BodyHashes
from .headers import Header  # (name, raw field): what the header tap hands over
from .dkimsig import (
    KEY_CACHE,
    Key,
    KeyCache,
    Problem,
    Signature,
    Tags,
    check_key,
    check_signature,
    fetch_key,
    hash_input,
    parse_signature,
    split_tags,
)

__all__ = ["Header", "DKIMResult", "Verifier", "CLOCK_SKEW", "at_once"]

_T = TypeVar("_T")

#: Seconds of clock difference forgiven on t= and x= (§3.5: verifiers may
#: allow for skew); five minutes, as for Kerberos-style checks.
CLOCK_SKEW: Final = 300.0


@dataclass(frozen=True, slots=True)
class DKIMResult:
    result: str  # RFC 8601 §2.7.1: "pass" | "fail" | "neutral" | "policy" | "temperror" | "permerror"
    domain: str  # d=  ("" when unparsable)
    selector: str  # s=
    identity: str  # i= ("" when absent)
    algorithm: str  # a=
    b: str  # the first 12 characters of b=, for A-R's header.b (RFC 6008)
    reason: str = ""
    testing: bool = False  # the key has t=y (§3.6.1): the domain is testing DKIM


@dataclass(slots=True)
class _Entry:
    """One DKIM-Signature field: parsed, or already decided."""

    tags: Tags
    sig: Signature | None = None
    problem: Problem | None = None


def _result(entry: _Entry, result: str, reason: str = "", testing: bool = False) -> DKIMResult:
    # Each value as the tag gave it, cut to 256 characters (an A-R is no
    # place for more); b= without its FWS, its first 12 characters (RFC 6008).
    tags = entry.tags
    b_text = tags.get("b", "")
    b = "".join(b_text[:24].split())[:12]
    if len(b) < 12:
        b = "".join(b_text[:256].split())[:12]  # much FWS near its start
    return DKIMResult(
        result,
        tags.get("d", "")[:256].lower(),
        tags.get("s", "")[:256].lower(),
        tags.get("i", "")[:256],
        tags.get("a", "")[:256].lower(),
        b,
        reason,
        testing,
    )


def _dkim_signature(field: bytes, position: int) -> _Entry:
    """Parse one DKIM-Signature; its problems become the entry's."""
    entry = _Entry({})
    try:
        entry.tags, offset = split_tags(field)
        tags = entry.tags
        if "v" not in tags or tags["v"] != "1":
            raise Problem("permerror", "missing or bad v=")  # §3.5: v=1 required
        sig = parse_signature(field, position, tags, offset)
        if "from" not in sig.signed:
            raise Problem("permerror", "From not signed")  # §5.4: From MUST be signed
        identity = tags.get("i", "")
        if identity:
            at = identity.rfind("@")
            idom = identity[at + 1 :].lower().rstrip(".")
            if at < 0 or not (idom == sig.domain or idom.endswith("." + sig.domain)):
                raise Problem("permerror", "i= not within d=")  # §3.5 i=
        sig.identity = identity
        entry.sig = sig
    except Problem as p:
        entry.problem = p
    except Exception:  # a surprise in one signature stays its own permerror
        entry.problem = Problem("permerror", "unparsable signature")
    return entry


async def at_once(coros: Sequence[Coroutine[Any, Any, _T]]) -> list[_T]:
    """The coroutines' results in order, run concurrently, as ``asyncio.gather``.

    One coroutine (the common case: one signature) is awaited in place: a
    task and a gather cost more than all the parsing of a signature.
    """
    if len(coros) == 1:
        return [await coros[0]]
    return list(await asyncio.gather(*coros))


class Verifier:
    """One message's DKIM-Signature fields and ARC sets: the body hashes they need, then the checks."""

    __slots__ = ("headers", "needs_body", "_hashes", "_index", "_entries", "_arc", "_cache", "_ended", "_keys", "_shared")

    def __init__(
        self, headers: Sequence[Header], *, max_signatures: int = 10, key_cache: KeyCache | None = None
    ) -> None:
        self.headers = headers
        self._cache = key_cache if key_cache is not None else KEY_CACHE
        self._hashes = BodyHashes()
        self._ended = False
        self._keys: dict[str, asyncio.Future[Key | Problem]] = {}  # by name, fetched or being fetched
        # Field names in lower case, all in one lower(): names hold no LF
        # (RFC 5322 §3.6.8 ftext), so LF can join and split them.
        names = b"\n".join([name for name, _ in headers]).lower()
        if b" \n" in names or b"\t\n" in names or names.endswith((b" ", b"\t")):
            lnames = [n.rstrip(b" \t") for n in names.split(b"\n")]  # "From :" is From
        else:
            lnames = names.split(b"\n")
        index: dict[bytes, list[int]] = {}
        for pos, lname in enumerate(lnames):
            got = index.get(lname)
            if got is None:
                index[lname] = [pos]
            else:
                got.append(pos)
        self._index = index
        signatures = index.get(b"dkim-signature", ())
        self._entries: list[_Entry] = []
        for n, pos in enumerate(signatures):
            if n >= max_signatures:
                entry = _Entry({})
                try:
                    entry.tags = split_tags(headers[pos][1])[0]
                except Exception:
                    pass
                entry.problem = Problem("policy", "too many signatures")
            else:
                entry = _dkim_signature(headers[pos][1], pos)
            if entry.sig is not None:
                self._hashes.need(entry.sig.body_key)
            self._entries.append(entry)
        self._arc = ARCPlan(headers, index, self._hashes)
        self.needs_body = len(self._hashes) > 0
        # Whether two checks may want the same key: if not, key() needs no
        # shared future (one DKIM signature and no ARC, the common case).
        self._shared = len(self._entries) > 1 or self._arc.instances > 0

    @property
    def arc_free(self) -> bool:
        """Whether the message has no ARC header field (then arc() asks nothing)."""
        return self._arc.instances == 0

    @property
    def signatures(self) -> int:
        """The number of DKIM-Signature fields (dkim() answers one result each)."""
        return len(self._entries)

    def key_names(self) -> list[str]:
        """The DNS names of the keys dkim() will ask for (§3.6.2.1), one per parsed signature."""
        return [f"{e.sig.selector}._domainkey.{e.sig.domain}" for e in self._entries
                if e.sig is not None and e.problem is None]

    @property
    def body_hashes(self) -> BodyHashes:
        """The shared running hashes (tests count them)."""
        return self._hashes

    def body(self, data: bytes | bytearray | memoryview) -> None:
        """The next piece of the body (after the blank line), split anywhere."""
        self._hashes.write(data)

    def end(self) -> None:
        """The body is over."""
        if not self._ended:
            self._ended = True
            self._hashes.end()

    async def key(self, lookups: Lookups, name: str) -> Key | Problem:
        """The key at name, asked once per message however many signatures need it."""
        if not self._shared:
            return await fetch_key(lookups, name, self._cache)
        fut = self._keys.get(name)
        if fut is not None:
            return await fut
        # The first asker fetches in its own coroutine (no task); later
        # askers wait on the future it fills.
        fut = self._keys[name] = asyncio.get_running_loop().create_future()
        try:
            key = await fetch_key(lookups, name, self._cache)
        except BaseException:  # cancelled: the next asker fetches afresh
            del self._keys[name]
            fut.cancel()
            raise
        fut.set_result(key)
        return key

    async def dkim(self, lookups: Lookups, now: float) -> list[DKIMResult]:
        """One result per DKIM-Signature field, top first."""
        self.end()
        entries = self._entries

        if len(entries) == 1:
            # The common case: nothing to run alongside, so no wrapper
            # coroutine either (each layer costs a frame per message).
            entry = entries[0]
            try:
                return [await self._verify(entry, lookups, now)]
            except Exception:
                return [_result(entry, "permerror", "internal error")]

        async def one(entry: _Entry) -> DKIMResult:
            try:
                return await self._verify(entry, lookups, now)
            except Exception:
                return _result(entry, "permerror", "internal error")

        return await at_once([one(e) for e in entries])

    async def _verify(self, entry: _Entry, lookups: Lookups, now: float) -> DKIMResult:
        if entry.problem is not None:
            return _result(entry, entry.problem.result, entry.problem.reason)
        sig = entry.sig
        assert sig is not None
        if sig.expires is not None and sig.expires + CLOCK_SKEW < now:
            return _result(entry, "fail", "signature expired")
        if sig.timestamp is not None and sig.timestamp - CLOCK_SKEW > now:
            return _result(entry, "permerror", "timestamp in the future")
        # Not shared (one signature, no ARC): straight to the fetch, one
        # coroutine layer fewer.
        name = f"{sig.selector}._domainkey.{sig.domain}"  # §3.6.2.1
        key = await (self.key(lookups, name) if self._shared else fetch_key(lookups, name, self._cache))
        if isinstance(key, Problem):
            return _result(entry, key.result, key.reason)
        try:
            if key.strict and sig.identity:
                # §3.6.1 t=s: the i= domain must be d= itself.
                if sig.identity[sig.identity.rfind("@") + 1 :].lower().rstrip(".") != sig.domain:
                    raise Problem("permerror", "i= must equal d= (key t=s)")
            verify(sig, key, self.headers, self._index, self._hashes)
        except Problem as p:
            return _result(entry, p.result, p.reason, key.testing)
        return _result(entry, "pass", "", key.testing)

    async def arc(self, lookups: Lookups, now: float) -> ARCResult:
        """The ARC chain's validation status (RFC 8617 §5.2)."""
        if self._arc.instances == 0:
            return NO_ARC  # no ARC header field at all: nothing to wait for
        self.end()
        try:
            return await self._arc.validate(self, lookups, now)
        except Exception:
            return ARCResult("fail", self._arc.instances, "internal error")


def verify(
    sig: Signature, key: Key, headers: Sequence[Header], index: dict[bytes, list[int]], hashes: BodyHashes
) -> None:
    """Raise Problem unless sig verifies with key: the key, the body hash, then the header hash."""
    check_key(sig, key)
    if sig.limit is not None and sig.limit > hashes.length(sig.body_canon):
        # §3.5 l=: more than the body was signed; the body is not what was
        # signed, so the signature fails.
        raise Problem("fail", "l= beyond the body")
    if hashes.digest(sig.body_key) != sig.bh:
        raise Problem("fail", "body hash mismatch")  # §6.1.3
    check_signature(sig, key, hash_input(sig, headers, index))
