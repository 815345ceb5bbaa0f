"""What a milter's changes do to a message: its header fields, its envelope, its body (sans-IO).

Rules of this module:
- ``apply(fields, changes)`` takes the message's header fields as the
  milter saw them (name, raw field with its CRLF) and the modifications of
  one end of body, in the order they came, and gives the edited message.
  Nothing here writes: the stage stores (and journals) the result before
  the 250.
- Field positions follow libmilter (smfi_insheader, smfi_chgheader):
  ``i`` inserts at a 0-based position among all fields (past the end
  appends); ``m`` changes the n-th field of that name, counted from 1, and
  an empty value deletes it; past the last one, a non-empty value is added
  at the end, as Sendmail does.  ``h`` appends.
- A value is made safe to store: line breaks become CRLF, every
  continuation line starts with WSP (a TAB is put in front where the milter
  left none) and empty lines are dropped, so no milter can end the header
  section early or smuggle a field into it (RFC 5322 §2.2.3).
- The envelope: ``e`` replaces the sender, ``+``/``2`` add a recipient,
  ``-`` removes one (compared without angle brackets, case-insensitively).
  ``b`` packets, in order, are the new body.  ``q`` asks for quarantine,
  with its reason.
- A change is a milter's only when it was agreed at negotiation
  (``ACTION_OF``); libmilter never sends another, so one that comes is
  not applied (the stage counts it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

from .protocol import Action, Modification

__all__ = ["ACTION_OF", "Edited", "apply", "field_of", "address_of"]

#: The action (SMFIF_*) a milter must have been granted for each change.
ACTION_OF = {
    "h": Action.ADD_HEADERS, "i": Action.ADD_HEADERS, "m": Action.CHANGE_HEADERS, "b": Action.CHANGE_BODY,
    "+": Action.ADD_RCPT, "2": Action.ADD_RCPT_PAR, "-": Action.DELETE_RCPT, "e": Action.CHANGE_FROM,
    "q": Action.QUARANTINE,
}

Field = tuple[bytes, bytes]

_BREAK = re.compile(rb"\r?\n|\r")


def field_of(name: str, value: bytes) -> Field:
    """A stored field from a milter's name and value (libmilter's values carry no leading space)."""
    lines = _BREAK.split(value)
    out = [lines[0].strip(b" \t")]
    for line in lines[1:]:
        if not line.strip(b" \t"):
            continue  # an empty line would end the header section
        out.append(line if line[:1] in (b" ", b"\t") else b"\t" + line)
    raw_name = name.encode("ascii")
    return raw_name, raw_name + b": " + b"\r\n".join(out) + b"\r\n"


def address_of(text: str) -> str:
    """An address as the envelope holds it: without angle brackets."""
    text = text.strip()
    return text[1:-1] if text.startswith("<") and text.endswith(">") else text


@dataclass(slots=True)
class Edited:
    """The message after one milter's changes."""

    fields: list[Field]
    #: (address, ESMTP parameters) of a new sender, or None: unchanged.
    sender: tuple[str, str] | None = None
    added: list[tuple[str, str]] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    #: The new body's chunks, or None: unchanged.
    body: list[bytes] | None = None
    quarantine: str | None = None
    #: Whether any field was added, inserted, changed or deleted.
    header_changed: bool = False
    #: Where the original body starts in the spool (set by the stage).
    body_at: int = 0

    def header_section(self) -> bytes:
        return b"".join(raw for _, raw in self.fields)

    @property
    def changes_recipients(self) -> bool:
        return bool(self.added or self.removed)


def apply(fields: Sequence[Field], changes: Sequence[Modification]) -> Edited:
    edited = Edited(list(fields))
    out = edited.fields
    for change in changes:
        code = change.code
        if code == "h":
            out.append(field_of(change.name, change.value))
            edited.header_changed = True
        elif code == "i":
            out.insert(min(change.index, len(out)), field_of(change.name, change.value))
            edited.header_changed = True
        elif code == "m":
            _change(out, change)
            edited.header_changed = True
        elif code == "e":
            edited.sender = (address_of(change.name), change.args)
        elif code in ("+", "2"):
            edited.added.append((address_of(change.name), change.args))
        elif code == "-":
            edited.removed.append(address_of(change.name).lower())
        elif code == "b":
            if edited.body is None:
                edited.body = []
            edited.body.append(change.value)
        elif code == "q":
            edited.quarantine = change.name or "quarantined by a milter"
    return edited


def _change(out: list[Field], change: Modification) -> None:
    wanted = change.name.lower().encode("ascii")
    seen = 0
    for pos, (name, _) in enumerate(out):
        if name.rstrip(b" \t").lower() == wanted:
            seen += 1
            if seen == max(change.index, 1):
                if change.value:
                    out[pos] = field_of(change.name, change.value)
                else:
                    del out[pos]
                return
    if change.value:
        out.append(field_of(change.name, change.value))
