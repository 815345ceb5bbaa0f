"""DMARC (RFC 7489): does the From: domain stand behind this message?

Rules of this module:
- DMARC adds no authentication of its own: it takes the SPF result for
  the MAIL FROM identity and the DKIM results, and asks whether one of
  them passed for a domain *aligned* with the author's (the From: field's)
  domain (§3.1).  Then the author domain's published policy says what a
  failure should mean (§6.3).
- The organizational domain (§3.2) comes from the Public Suffix List, read
  through the ``publicsuffixlist`` package, never from a copy in our tree.
  RFC 9989's DNS tree walk would replace the list with up to eight more
  queries per message; the list costs none and is what RFC 7489's senders
  and report generators use, so we keep it (``organizational_domain`` is
  the one place to change).
- A message with zero From: domains gets permerror: there is no author to
  align with (§6.6.1).  Several From: domains (several addresses, or
  several fields, which RFC 5322 §3.6 forbids) are each evaluated and the
  strictest failing policy wins (§6.6.1); identical domains count once.
- DNS trouble for a policy record is temperror; nothing here raises.
- Reports (rua/ruf) are not sent: their tags are parsed and ignored.
"""

from __future__ import annotations

import asyncio
import random
import re
from dataclasses import dataclass
from email.utils import getaddresses
from functools import lru_cache
from typing import Any, Callable, Sequence

from ..dns import BadName, DNSError, Lookups

__all__ = ["DMARCResult", "Policy", "check", "organizational_domain", "author_domains", "parse_record"]

_POLICIES = ("none", "quarantine", "reject")


@dataclass(frozen=True, slots=True)
class Policy:
    """A parsed DMARC record (§6.3): the tags that decide; reporting tags ignored."""

    p: str
    sp: str
    pct: int = 100
    adkim: str = "r"
    aspf: str = "r"


@dataclass(frozen=True, slots=True)
class DMARCResult:
    """``result`` is pass, fail, none, temperror or permerror (RFC 8601 §2.7.1 names).

    ``policy`` is what the domain asks for a failure (p, or sp for a
    subdomain); ``disposition`` what applies to this message after pct
    sampling (§6.6.4): "none" unless the result is fail.
    """

    result: str
    domain: str = ""
    policy: str = "none"
    disposition: str = "none"
    reason: str = ""


_list: Any = None


def _psl() -> Any:  # publicsuffixlist has no type hints
    global _list
    if _list is None:
        from publicsuffixlist import PublicSuffixList

        _list = PublicSuffixList()
    return _list


@lru_cache(maxsize=4096)
def organizational_domain(domain: str) -> str:
    """The registered domain under its public suffix (§3.2); itself when it is one."""
    domain = domain.lower().rstrip(".")
    org = _psl().privatesuffix(domain)
    return org if org else domain


def aligned(a: str, b: str, mode: str) -> bool:
    """Identifier alignment (§3.1.1, §3.1.2): strict is equality, relaxed is one organization."""
    a = a.lower().rstrip(".")
    b = b.lower().rstrip(".")
    if a == b:
        return True
    return mode != "s" and organizational_domain(a) == organizational_domain(b)


def author_domains(from_values: Sequence[bytes]) -> list[str]:
    """The distinct domains of the From: fields' addresses, in order."""
    domains: list[str] = []
    for value in from_values:
        for domain in _field_domains(value):
            if domain not in domains:
                domains.append(domain)
    return domains


# The forms nearly every From: field takes: "addr@domain", or a display
# name (plain or quoted, no specials) and "<addr@domain>".  Anything else
# (comments, groups, several addresses) is parsed by the email package.
_SIMPLE_FROM = re.compile(
    r'\s*(?:(?:"[^"\\]*"|[^<>@",;:()\\\[\]]*)\s*<([^<>@\s"(),;:]+)@([^<>@\s"(),;:\[\]]+)>'
    r'|([^<>@\s"(),;:]+)@([^<>@\s"(),;:\[\]]+))\s*\Z'
)


@lru_cache(maxsize=4096)
def _field_domains(value: bytes) -> tuple[str, ...]:
    """The domains of one From: field's value (remembered: a sender sends many)."""
    text = value.decode("utf-8", "replace").replace("\r\n", "")
    m = _SIMPLE_FROM.match(text)
    if m is not None:
        pairs = [(m.group(1) or m.group(3), m.group(2) or m.group(4))]
    else:
        pairs = [address.rpartition("@")[::2] for _name, address in getaddresses([text])]
    out: list[str] = []
    for local, domain in pairs:
        domain = domain.strip().rstrip(".").lower()
        if local and domain and "." in domain and domain not in out:
            out.append(domain)
    return tuple(out)


@lru_cache(maxsize=4096)
def parse_record(text: bytes) -> Policy | None:
    """A DMARC record (§6.3, §6.4), or None when it is not one that can be used."""
    try:
        record = text.decode("ascii")
    except UnicodeDecodeError:
        return None
    tags: dict[str, str] = {}
    for i, part in enumerate(record.split(";")):
        name, eq, value = part.partition("=")
        name = name.strip().lower()
        if not name and not eq:
            continue  # a trailing ";" (§6.4 allows it)
        if not eq:
            return None
        if i == 0 and (name != "v" or value.strip() != "DMARC1"):
            return None  # v=DMARC1 must come first, exactly (§6.4)
        tags.setdefault(name, value.strip())
    if "v" not in tags:
        return None
    p = tags.get("p", "").lower()
    if p not in _POLICIES:
        # §6.6.3 step 6: without a valid p, a record with a reporting
        # address is read as p=none; otherwise it is no record at all.
        if "rua" not in tags:
            return None
        p = "none"
    sp = tags.get("sp", p).lower()
    if sp not in _POLICIES:
        sp = p
    try:
        pct = int(tags.get("pct", "100"))
    except ValueError:
        pct = 100
    pct = min(100, max(0, pct))
    adkim = "s" if tags.get("adkim", "r").lower() == "s" else "r"
    aspf = "s" if tags.get("aspf", "r").lower() == "s" else "r"
    return Policy(p, sp, pct, adkim, aspf)


async def _record(lookups: Lookups, domain: str) -> Policy | None:
    """The one usable record at _dmarc.DOMAIN; several, or none, is None (§6.6.3)."""
    try:
        answers = await lookups.txt("_dmarc." + domain)
    except BadName:
        return None
    return _usable(answers)


def _usable(answers: Sequence[bytes]) -> Policy | None:
    """The one record of a _dmarc answer that parses; none, or several, is None (§6.6.3)."""
    records = [r for r in (parse_record(a) for a in answers if a[:8].lower() == b"v=dmarc1") if r is not None]
    return records[0] if len(records) == 1 else None


async def discover(lookups: Lookups, domain: str) -> tuple[Policy | None, bool]:
    """The policy for ``domain`` (§6.6.3), and whether it is the organization's."""
    policy = await _record(lookups, domain)
    if policy is not None:
        return policy, False
    org = organizational_domain(domain)
    if org == domain:
        return None, False
    return await _record(lookups, org), True


def answerable(peek: Callable[[str], tuple[bytes, ...] | None], from_values: Sequence[bytes]) -> bool:
    """Whether ``check`` can answer from the cache alone (``peek``: a cached TXT answer, or None).

    True for one From: domain whose _dmarc answer is cached, and, when
    that answer holds no one usable record (as ``_record`` decides), its
    organization's too; True for no From: domain at all (permerror,
    nothing asked).  Several From: domains are checked at once, with
    tasks: False.
    """
    domains = author_domains(from_values)
    if len(domains) != 1:
        return not domains
    domain = domains[0]
    answers = peek("_dmarc." + domain)
    if answers is None:
        return False
    if _usable(answers) is not None:
        return True  # discover() ends at the domain's own record
    org = organizational_domain(domain)
    return org == domain or peek("_dmarc." + org) is not None


def _sampled(policy: str, pct: int, roll: float) -> str:
    """§6.6.4: outside the pct sample a policy steps down by one."""
    if pct >= 100 or roll * 100 < pct:
        return policy
    return {"reject": "quarantine", "quarantine": "none"}.get(policy, "none")


async def _one(
    lookups: Lookups, domain: str, spf_domain: str, spf_pass: bool, dkim_pass: Sequence[str], roll: float
) -> DMARCResult:
    try:
        policy, inherited = await discover(lookups, domain)
    except DNSError as exc:
        return DMARCResult("temperror", domain, reason=f"DNS: {exc}")
    if policy is None:
        return DMARCResult("none", domain, reason="no policy")
    asked = policy.sp if inherited else policy.p
    if spf_pass and aligned(spf_domain, domain, policy.aspf):
        return DMARCResult("pass", domain, asked, reason="spf aligned")
    for d in dkim_pass:
        if aligned(d, domain, policy.adkim):
            return DMARCResult("pass", domain, asked, reason=f"dkim aligned ({d})")
    return DMARCResult("fail", domain, asked, _sampled(asked, policy.pct, roll), reason="no aligned pass")


_STRICTNESS = {"none": 0, "quarantine": 1, "reject": 2}


async def check(
    lookups: Lookups,
    from_values: Sequence[bytes],
    spf_domain: str,
    spf_result: str,
    dkim_passed: Sequence[str],
    *,
    roll: float | None = None,
) -> DMARCResult:
    """DMARC for one message.

    ``from_values`` are the values of its From: fields; ``spf_domain`` the
    domain SPF checked for MAIL FROM (the HELO domain for a null sender,
    RFC 7208 §2.4) and ``spf_result`` its result; ``dkim_passed`` the d=
    of each DKIM signature that passed.  ``roll`` in [0, 1) decides pct
    sampling (random when None).
    """
    domains = author_domains(from_values)
    if not domains:
        return DMARCResult("permerror", reason="no From: domain")
    if roll is None:
        roll = random.random()
    spf_pass = spf_result == "pass"
    if len(domains) == 1:  # the common case, without gather's tasks
        return await _one(lookups, domains[0], spf_domain, spf_pass, dkim_passed, roll)
    results = await asyncio.gather(*[_one(lookups, d, spf_domain, spf_pass, dkim_passed, roll) for d in domains])
    # §6.6.1: each author domain is checked; the strictest failing policy wins.
    failed = [r for r in results if r.result == "fail"]
    if failed:
        return max(failed, key=lambda r: _STRICTNESS[r.disposition])
    for word in ("temperror", "pass", "none"):
        for r in results:
            if r.result == word:
                return r
    return results[0]
