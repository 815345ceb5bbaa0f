"""What the checks found, as a value for the hooks and as an Authentication-Results field.

Rules of this module:
- ``AuthResults`` is immutable and is what the policy hooks see
  (``MessageInfo.auth``), the log line's spf=/dkim=/dmarc=/arc= and the
  counters: one value, read by all, never re-derived.
- ``render()`` writes the field of RFC 8601: our hostname as the
  authserv-id (§2.2), one resinfo per result (§2.7), each on its own
  folded line.  Property values that are not a plain token are quoted
  (§2.2, RFC 2045 §5.1) and comments are escaped, so that nothing a sender
  chose (a reason echoing a DNS record, a domain) can break the field or
  add one.  The field is pure ASCII; no line comes near 998 octets.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from .arc import ARCResult
from .dkim import DKIMResult
from .dmarc import DMARCResult
from .spf import SPFResult

__all__ = ["AuthResults", "render", "summary"]


@dataclass(frozen=True, slots=True)
class AuthResults:
    """The results of one message's checks; a check that did not run is None (or empty)."""

    spf: SPFResult | None = None
    helo: SPFResult | None = None
    dkim: tuple[DKIMResult, ...] = ()
    #: Whether DKIM ran: then no signature reads dkim=none.
    dkim_checked: bool = False
    arc: ARCResult | None = None
    dmarc: DMARCResult | None = None
    #: The Authentication-Results field as stored, CRLF-terminated.
    header: bytes = b""

    @property
    def dkim_result(self) -> str:
        """One word for all signatures: pass if any passed, else the first's, none if unsigned."""
        if not self.dkim:
            return "none"
        for r in self.dkim:
            if r.result == "pass":
                return "pass"
        return self.dkim[0].result


# RFC 2045 §5.1: a token is printable ASCII but SPACE, CTLs and tspecials.
# "@" and "." are allowed unquoted in a pvalue's domain and local-part
# (RFC 8601 §2.2).
_TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+\-.^_`{|}~@]+\Z")
_UNSAFE = re.compile(r"[^\x20-\x7e]")
_MAX_COMMENT = 200


@lru_cache(maxsize=8192)
def _value(text: str) -> str:
    text = _UNSAFE.sub("?", text)[:255]
    if text and _TOKEN.match(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


@lru_cache(maxsize=8192)
def _comment(text: str) -> str:
    if not text:
        return ""
    text = _UNSAFE.sub("?", text)[:_MAX_COMMENT]
    text = text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
    return f" ({text})"


def _resinfo(method: str, result: str, comment: str, props: list[tuple[str, str]]) -> str:
    parts = [f"{method}={result}{_comment(comment)}"]
    parts.extend(f"{name}={_value(value)}" for name, value in props if value)
    return " ".join(parts)


def render(authserv_id: str, results: AuthResults, remote_ip: str) -> bytes:
    """The Authentication-Results field (RFC 8601 §2.2) for ``results``, CRLF-terminated."""
    infos: list[str] = []
    if results.spf is not None:
        r = results.spf
        infos.append(_resinfo("spf", r.result, r.reason, [("smtp.mailfrom", r.domain)]))
    if results.helo is not None:
        r = results.helo
        infos.append(_resinfo("spf", r.result, r.reason, [("smtp.helo", r.domain)]))
    for d in results.dkim:
        # header.b (RFC 6008) tells several signatures of one domain apart.
        props = [("header.d", d.domain), ("header.s", d.selector), ("header.a", d.algorithm), ("header.b", d.b)]
        if d.identity:
            props.insert(1, ("header.i", d.identity))
        infos.append(_resinfo("dkim", d.result, d.reason, props))
    if results.dkim_checked and not results.dkim:
        infos.append("dkim=none (no signature)")
    if results.dmarc is not None:
        m = results.dmarc
        comment = f"p={m.policy} dis={m.disposition}" if m.result in ("pass", "fail") else m.reason
        infos.append(_resinfo("dmarc", m.result, comment, [("header.from", m.domain)]))
    if results.arc is not None:
        a = results.arc
        comment = f"i={a.instances}" + (f" {a.reason}" if a.reason else "") if a.instances else a.reason
        infos.append(_resinfo("arc", a.result, comment, [("smtp.remote-ip", remote_ip)]))
    head = "Authentication-Results: " + _value(authserv_id)
    if not infos:
        return (head + "; none\r\n").encode("ascii")  # §2.2: no method ran
    return (head + ";\r\n\t" + ";\r\n\t".join(infos) + "\r\n").encode("ascii")


def summary(results: AuthResults) -> tuple[tuple[str, str], ...]:
    """(check, result) pairs for the message's log line, in a fixed order."""
    out: list[tuple[str, str]] = []
    if results.spf is not None:
        out.append(("spf", results.spf.result))
    if results.dkim_checked:
        out.append(("dkim", results.dkim_result))
    if results.dmarc is not None:
        out.append(("dmarc", results.dmarc.result))
    if results.arc is not None:
        out.append(("arc", results.arc.result))
    return tuple(out)
