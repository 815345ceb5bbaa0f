"""The store interface: where a finished message goes, and when it is safe.

Rules of this module:
- The transaction (transaction.py) knows a store only through ``Store``
  and a message being received only through ``MessageSpool``.  A store owns
  its spools: their buffers and files are its private business, and no
  code outside the store reads or writes them except through these methods.
- ``submit()`` returns a future that resolves with the stored name only
  once the message is on stable storage as the store defines it (DESIGN.md
  principle 1); it fails with ``StorageError`` when the store cannot keep
  the message, and the client then gets 451 and retries.  After
  ``submit()`` the store owns the spool: a client that leaves does not
  undo a submitted message (its 250 is lost; RFC 1047 duplicates, never
  losses).
- Everything here is called on the event loop thread and never blocks it.

Two stores implement these protocols today: ``JournalStore``
(journalstore.py), the write-ahead journal of ``--fsync batch``, and
``MaildirWriter`` (maildir.py), Maildir files flushed per message
(``--fsync always``) or not at all (``off``); worker.open_store() picks
one.  LMTP delivery would be a further implementation, not a change to
the glue.
"""

from __future__ import annotations

import asyncio
from typing import Protocol, Sequence

__all__ = ["Store", "MessageSpool", "Result", "settle"]

#: A submitted message's future and what it gets: the stored name, or the error.
Result = tuple["asyncio.Future[str]", "str | BaseException"]


def settle(results: list[Result]) -> None:
    """On the loop: settle a batch's futures (those still wanted), for either store."""
    for fut, res in results:
        if fut.done():  # cancelled: the session has gone
            continue
        if isinstance(res, BaseException):
            fut.set_exception(res)
        else:
            fut.set_result(res)


class MessageSpool(Protocol):
    """One message on its way in: content appended as it arrives."""

    #: The id the client is told in "250 2.0.0 Ok: queued as ID".
    queue_id: str
    #: Octets written so far, prepended headers included.
    size: int
    #: The error that made the spool drop its content, if any: the message
    #: will get 451 at its end.
    failed: OSError | None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append content; never raises (an error is kept in ``failed``)."""

    def prepend(self, headers: bytes) -> None:
        """Store ``headers`` above everything written so far."""

    def read(self, offset: int, size: int) -> bytes:
        """Up to ``size`` octets of what was written, from ``offset``; b"" past the end."""

    def discard(self) -> None:
        """Drop the message (idempotent; nothing once submitted)."""


class Store(Protocol):
    """Where accepted messages go."""

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Begin serving ``loop``; futures returned later belong to it."""

    def open_spool(self, mailbox: str) -> MessageSpool:
        """A spool for a new message whose first recipient is ``mailbox``."""

    def submit(self, spool: MessageSpool, mailboxes: Sequence[str], sender: bytes = b"") -> "asyncio.Future[str]":
        """Queue the finished message for ``mailboxes``; the future says when it is safe.

        A mailbox is a Maildir, or with ``--deliver lmtp:...`` a target
        ``lmtp:<recipient>``, delivered from ``sender`` (the journal's only).
        """

    def close(self) -> None:
        """Finish what was submitted, then stop (blocking: call off the loop)."""
