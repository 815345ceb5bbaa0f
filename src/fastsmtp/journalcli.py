"""``fastsmtp journal list|retry|redeliver``: the operator's view of mail waiting for the LMTP backends.

Rules of this module:
- ``list`` reads the journal as it is on disk, every worker's folder (live
  or dead), and prints each message still owed to the LMTP backends (a
  record with ``lmtp:`` targets and no ``.done`` mark), then each dead
  letter with the refusal that put it there.  It never writes.  A message
  delivered to some of its recipients is listed with all of them: which
  ones are left is known only to the worker delivering it.
- ``retry`` asks every live worker to try its deferred deliveries now,
  rather than at their backoff's time: SIGWINCH, to the PIDs the journal's
  folder names give (``w-<pid>-<n>``), each checked to be a fastsmtp
  process first.  Postfix's ``postqueue -f``.
- ``redeliver`` delivers dead letters again, over LMTP to the backends of
  ``--deliver``, and removes each one the backends took for every
  recipient in its ``X-Fastsmtp-Dead-Letter`` fields.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from pathlib import Path
from typing import Iterator

from .config import Config
from .journal import done_marks, read_segment, scan, segment_seq, segments
from .lmtp.queue import DEAD_FIELD

__all__ = ["pending", "dead_letters", "retry", "redeliver"]

_DEAD = re.compile(rb"X-Fastsmtp-Dead-Letter: <(.*)> (\d{3}) ([^\r\n]*)\r\n")
_FOLDER = re.compile(r"w-(\d+)-\d+")


def _folders(journal_dir: str) -> Iterator[tuple[str, int]]:
    try:
        names = sorted(os.listdir(journal_dir))
    except FileNotFoundError:
        return
    for name in names:
        m = _FOLDER.fullmatch(name)
        if m is not None:
            yield os.path.join(journal_dir, name), int(m.group(1))


def _text(address: bytes) -> str:
    return address.decode("utf-8", "replace")


def _is_fastsmtp(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"fastsmtp" in f.read()
    except OSError:
        return False


def pending(journal_dir: str) -> list[str]:
    """One line per message owed to the LMTP backends: id, age, size, envelope, whose folder."""
    lines = []
    now = time.time()
    for folder, pid in _folders(journal_dir):
        owner = f"worker {pid}" if _is_fastsmtp(pid) else f"dead worker {pid}"
        for name in segments(folder):
            path = os.path.join(folder, name)
            try:
                found = scan(read_segment(path), segment_seq(name))
            except OSError:
                continue  # retired meanwhile
            done = done_marks(path)
            for record in found.records:
                sender, rcpts = record.lmtp_envelope()
                if not rcpts or record.offset in done:
                    continue
                age = now - float(record.stored.split(".", 1)[0]) if record.stored[:1].isdigit() else 0.0
                lines.append(f"{record.queue_id}  {age:7.0f}s  {len(record.content):>9}  <{_text(sender)}> -> "
                             + ", ".join(f"<{_text(r)}>" for r in rcpts) + f"  ({owner})")
    return lines


def dead_letters(dead_letter: str) -> list[tuple[Path, list[tuple[bytes, int, str]]]]:
    """Each dead letter and its refusals: (file, [(recipient, code, the backend's words)])."""
    out: list[tuple[Path, list[tuple[bytes, int, str]]]] = []
    new = Path(dead_letter) / "new"
    if not new.is_dir():
        return out
    for path in sorted(new.iterdir()):
        refusals = []
        with open(path, "rb") as f:
            # Our fields come first, one line each, however many recipients.
            for line in f:
                if not line.startswith(DEAD_FIELD):
                    break
                m = _DEAD.match(line)
                if m is not None:
                    refusals.append((m.group(1), int(m.group(2)), m.group(3).decode("utf-8", "replace")))
        out.append((path, refusals))
    return out


def retry(journal_dir: str) -> list[int]:
    """SIGWINCH to every live worker of the journal: its deferred LMTP deliveries are tried now."""
    told = []
    for _, pid in _folders(journal_dir):
        if pid not in told and _is_fastsmtp(pid):
            try:
                os.kill(pid, signal.SIGWINCH)
            except ProcessLookupError:
                continue
            told.append(pid)
    return told


def redeliver(config: Config, names: list[str]) -> list[str]:
    """Deliver dead letters (all, or those ``names``) over LMTP again; what happened to each."""
    return asyncio.run(_redeliver(config, names))


async def _redeliver(config: Config, names: list[str]) -> list[str]:
    from .lmtp.client import LMTPClient, LMTPTemporaryError
    from .lmtp.queue import dead_letter_fields, store_dead_letter, without_return_path

    out = []
    async with LMTPClient(config.deliver, lhlo_name=config.hostname) as client:
        for path, refusals in dead_letters(config.dead_letter):
            if names and path.name not in names:
                continue
            if not refusals:
                out.append(f"{path.name}: no X-Fastsmtp-Dead-Letter field to take the recipients from; kept")
                continue
            data = path.read_bytes()
            message = data
            while message.startswith(DEAD_FIELD):
                message = message.split(b"\r\n", 1)[1]
            sender = re.match(rb"(?:[^\r\n]+\r\n)*?Return-Path: <([^>]*)>\r\n", message)
            from_ = sender.group(1) if sender else b""
            rcpts = [r for r, _, _ in refusals]
            try:
                results = await client.deliver(from_, rcpts, without_return_path(message, from_))
            except LMTPTemporaryError as exc:
                out.append(f"{path.name}: not delivered, kept: {exc}")
                continue
            left = [r for r in results if not r.delivered]
            if not left:
                path.unlink()
                out.append(f"{path.name}: delivered to " + ", ".join(map(_text, rcpts)))
                continue
            if len(left) < len(results):
                # Only the refusals left stay above the message: a later
                # redeliver does not deliver the others twice.
                store_dead_letter(config.dead_letter, dead_letter_fields(left) + message,
                                  path.name.partition(",S=")[0] + "-r")
                path.unlink()
            words = "; ".join(f"<{_text(r.recipient)}> {r.code} {r.text}" for r in left)
            out.append(f"{path.name}: kept: {words}")
    return out
