"""ARC chain validation (RFC 8617 §5.2): the cv a receiver reports.

Rules of this module:
- ``ARCPlan`` is built by ``Verifier.__init__`` from the header section:
  it collects the ARC sets by instance, checks their structure (§5.2 steps
  1-4), parses the newest ARC-Message-Signature and every ARC-Seal, and
  asks the shared ``BodyHashes`` for the newest AMS's body hash, so the
  body streams once for DKIM and ARC together.
- ``validate()`` then checks the newest AMS like a DKIM signature
  (§5.2 step 5) and every AS from the newest down (step 7), each over
  relaxed-canonicalised ARC sets 1..i (§5.1.1).  The key lookups run at
  once, shared with DKIM's through the Verifier.
- The result is only "none", "pass" or "fail" (the cv values, §4.1.3); a
  key lookup that fails (DNS trouble included) fails the chain, with the
  reason saying so.  Older AMSs are not checked (step 6 is optional).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Sequence

from ..dns import Lookups
from .canon import BodyHashes, headers_relaxed
from .dkimsig import Key, Problem, Signature, check_key, check_signature, parse_signature, split_tags

if TYPE_CHECKING:
    from .dkim import Verifier

__all__ = ["ARCResult", "ARCPlan", "MAX_INSTANCES", "NO_ARC"]

#: §4.2.1: instance values run from 1 to 50.
MAX_INSTANCES: Final = 50

_AAR: Final = b"arc-authentication-results"
_AMS: Final = b"arc-message-signature"
_AS: Final = b"arc-seal"
# §4.1.1: the AAR's value is "i=N;" followed by an A-R payload.
_AAR_INSTANCE: Final = re.compile(rb"[ \t\r\n]*i[ \t\r\n]*=[ \t\r\n]*([0-9]{1,6})[ \t\r\n]*;")


@dataclass(frozen=True, slots=True)
class ARCResult:
    result: str  # "none" | "pass" | "fail"   (the chain validation status, cv)
    instances: int  # N, the number of ARC sets (0 for none)
    reason: str = ""
    domain: str = ""  # d= of the newest AMS


#: The result for a message without ARC header fields (frozen, so shared).
NO_ARC: Final = ARCResult("none", 0)


def _instance(field: bytes, name: bytes) -> int:
    if name == _AAR:
        colon = field.find(b":")
        m = _AAR_INSTANCE.match(field, colon + 1)
        if m is None:
            raise Problem("fail", "malformed ARC-Authentication-Results")
        return int(m.group(1))
    tags, _ = split_tags(field)
    value = tags.get("i", "")
    if not value.isdigit() or len(value) > 6:
        raise Problem("fail", "malformed i= in an ARC set")
    return int(value)


class ARCPlan:
    """The ARC sets of one message, checked for structure, with what validation needs."""

    __slots__ = ("instances", "problem", "domain", "sets", "ams", "seals")

    def __init__(self, headers: Sequence[tuple[bytes, bytes]], index: dict[bytes, list[int]], hashes: BodyHashes) -> None:
        self.instances = 0
        self.problem: Problem | None = None
        self.domain = ""
        self.sets: dict[int, tuple[int, int, int]] = {}  # i -> positions of (AAR, AMS, AS)
        self.ams: Signature | None = None
        self.seals: dict[int, Signature] = {}
        if not (index.get(_AAR) or index.get(_AMS) or index.get(_AS)):
            return
        try:
            self._collect(headers, index)
            self._parse(headers)
        except Problem as p:
            self.problem = Problem("fail", p.reason)
            return
        except Exception:
            self.problem = Problem("fail", "unparsable ARC set")
            return
        assert self.ams is not None
        hashes.need(self.ams.body_key)

    def _collect(self, headers: Sequence[tuple[bytes, bytes]], index: dict[bytes, list[int]]) -> None:
        found: dict[int, list[list[int]]] = {}
        for slot, name in enumerate((_AAR, _AMS, _AS)):
            for pos in index.get(name, ()):
                i = _instance(headers[pos][1], name)
                found.setdefault(i, [[], [], []])[slot].append(pos)
        self.instances = len(found)
        n = max(found)
        # §5.2 step 2 (form of each set) and step 4 (instances 1..N, no gaps).
        if n > MAX_INSTANCES or min(found) < 1:
            raise Problem("fail", "ARC instance out of range")
        if sorted(found) != list(range(1, n + 1)):
            raise Problem("fail", "ARC instances not contiguous")
        for i, (aar, ams, seal) in sorted(found.items()):
            if len(aar) != 1 or len(ams) != 1 or len(seal) != 1:
                raise Problem("fail", f"ARC set i={i} incomplete or duplicated")
            self.sets[i] = (aar[0], ams[0], seal[0])
        self.instances = n

    def _parse(self, headers: Sequence[tuple[bytes, bytes]]) -> None:
        n = self.instances
        cvs: dict[int, str] = {}
        for i, (_, _, pos) in self.sets.items():
            field = headers[pos][1]
            tags, offset = split_tags(field)
            cvs[i] = tags.get("cv", "").lower()
            if i == n and cvs[i] == "fail":
                raise Problem("fail", "newest ARC-Seal has cv=fail")  # §5.2 step 3
            self.seals[i] = parse_signature(field, pos, tags, offset, arc_seal=True)
        for i, cv in cvs.items():
            # §5.2 step 4: the first seal found no chain, every later one a passing chain.
            if cv != ("none" if i == 1 else "pass"):
                raise Problem("fail", f"ARC-Seal i={i} has cv={cv[:16] or 'missing'}")
        pos = self.sets[n][1]
        field = headers[pos][1]
        tags, offset = split_tags(field)
        self.domain = tags.get("d", "").lower()
        self.ams = parse_signature(field, pos, tags, offset)

    def seal_input(self, i: int, headers: Sequence[tuple[bytes, bytes]]) -> bytes:
        """§5.1.1: sets 1..i, each AAR, AMS, AS relaxed; the AS i with b= emptied, no final CRLF."""
        parts: list[bytes] = []
        for j in range(1, i + 1):
            aar, ams, seal = self.sets[j]
            parts.append(headers[aar][1])
            parts.append(headers[ams][1])
            if j < i:
                parts.append(headers[seal][1])
        parts.append(self.seals[i].field_no_b)
        return headers_relaxed(parts)[:-2]  # header_relaxed of each, the last without its CRLF

    async def validate(self, verifier: Verifier, lookups: Lookups, now: float) -> ARCResult:
        """§5.2 steps 5 and 7, after the structure checks made at construction."""
        from .dkim import at_once, verify

        if self.instances == 0:
            return NO_ARC
        if self.problem is not None:
            return ARCResult("fail", self.instances, self.problem.reason, self.domain)
        ams = self.ams
        assert ams is not None
        n = self.instances
        order = [ams] + [self.seals[i] for i in range(n, 0, -1)]
        keys = await at_once([verifier.key(lookups, s.key_name) for s in order])
        try:
            key = _usable(keys[0], f"AMS i={n}")
            try:
                verify(ams, key, verifier.headers, verifier._index, verifier._hashes)
            except Problem as p:
                raise Problem("fail", f"AMS i={n}: {p.reason}") from None
            for i, key_or in zip(range(n, 0, -1), keys[1:]):
                seal = self.seals[i]
                key = _usable(key_or, f"AS i={i}")
                try:
                    check_key(seal, key)
                    check_signature(seal, key, self.seal_input(i, verifier.headers))
                except Problem as p:
                    raise Problem("fail", f"AS i={i}: {p.reason}") from None
        except Problem as p:
            return ARCResult("fail", n, p.reason, self.domain)
        return ARCResult("pass", n, "", self.domain)


def _usable(key: Key | Problem, what: str) -> Key:
    if isinstance(key, Problem):
        raise Problem("fail", f"{what}: {key.reason}")
    return key
