"""What the compiled parser and its pure-Python twin share.

Rules of this module:
- It holds the one ``LineTooLong``.  Both ``_parser`` and ``_parser_py``
  raise this very class, so that ``except LineTooLong`` catches the error of
  either implementation whichever ``parser`` picked, and a test or a fuzz
  harness that drives both needs no per-implementation lookup.
- Nothing here may import either implementation: both import it.
"""

from __future__ import annotations

__all__ = ["LineTooLong"]


class LineTooLong(ValueError):
    """A line, CRLF included, is longer than the reader's ``max_length``.

    RFC 5321 §4.5.3.1.4 gives 512 octets for a command line; the session
    adds an allowance for extensions (§4.5.3.1) and answers 500 5.5.2.
    """
