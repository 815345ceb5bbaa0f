"""spool.py: what was written is read back, from memory or from the spill file, never copied twice."""

from __future__ import annotations

import os
from pathlib import Path

from fastsmtp.policy import add_mailbox
from fastsmtp.spool import Spool, new_name


def spool(root: Path, threshold: int) -> Spool:
    root.mkdir(parents=True)
    add_mailbox(str(root), "alice@example.com")
    maildir = str(root / "example.com" / "alice")
    name, queue_id = new_name("mx.example")
    return Spool(maildir, name, queue_id, threshold)


def read_all(s: Spool, step: int) -> bytes:
    out, offset = [], 0
    while True:
        piece = s.read(offset, step)
        if not piece:
            return b"".join(out)
        out.append(piece)
        offset += len(piece)


def test_read_back_from_memory_and_from_the_spill_file(tmp_path: Path) -> None:
    content = b"".join(b"line %d\r\n" % i for i in range(20000))
    for threshold in (1 << 30, 4096):  # stays in memory; spills after 4 KiB
        s = spool(tmp_path / str(threshold), threshold)
        for i in range(0, len(content), 1000):
            s.write(content[i : i + 1000])
        s.prepend(b"X-Above: 1\r\n")  # not part of what is read back
        assert read_all(s, 65535) == content
        assert s.read(len(content) - 3, 10) == b"9\r\n"
        assert s.read(len(content), 10) == b"" and s.read(-1, 10) == b""
        spilled = os.listdir(tmp_path / str(threshold) / "example.com" / "alice" / "tmp")
        assert bool(spilled) == (threshold == 4096)
        s.discard()
        assert s.read(0, 10) == b""
