"""The parser the rest of fastsmtp uses: compiled if possible, else the twin.

``FASTSMTP_PUREPYTHON=1`` forces the pure-Python twin (as uvicorn's ``auto``
modules fall back when httptools is missing); so does a missing compiled
module.  Both give the same answers; ``IMPLEMENTATION`` says which one runs.
Both raise the one ``LineTooLong`` of ``_parser_common``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ._parser_common import LineTooLong

__all__ = ["LineReader", "DataReader", "LineTooLong", "relaxed_wsp", "tag_list", "relaxed_headers", "header_fields", "IMPLEMENTATION"]

IMPLEMENTATION: str

if TYPE_CHECKING:  # one interface for the type checker: _parser.pyi
    from ._parser import DataReader, LineReader, header_fields, relaxed_headers, relaxed_wsp, tag_list
elif os.environ.get("FASTSMTP_PUREPYTHON", "") not in ("", "0"):
    from ._parser_py import DataReader, LineReader, header_fields, relaxed_headers, relaxed_wsp, tag_list

    IMPLEMENTATION = "python"
else:
    try:
        from ._parser import DataReader, LineReader, header_fields, relaxed_headers, relaxed_wsp, tag_list
    except ImportError:
        from ._parser_py import DataReader, LineReader, header_fields, relaxed_headers, relaxed_wsp, tag_list

        IMPLEMENTATION = "python"
    else:
        IMPLEMENTATION = "cython"
