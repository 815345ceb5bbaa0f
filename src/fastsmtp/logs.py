"""Log lines: Postfix-style ``key=value`` text or JSON, to stderr or a file.

Rules of this module:
- A structured record is a short event word (``queued``, ``refused``,
  ``disconnect``) and a dict of fields passed as ``extra={"fields": ...}``.
  The formatter renders it; callers build the dict only after
  ``log.isEnabledFor(INFO)``, so a disabled level costs one check.
- Everything a client chose (HELO, addresses) is sanitised when rendered:
  control characters, spaces and backslashes are escaped, so nothing a
  client sends can start a forged log line or split a field.  JSON lines
  get the same guarantee from ``json.dumps``.  Message content is never
  logged.
- ``--log-file`` is reopened on SIGUSR2 (``reopen_logs``), after logrotate
  has moved it away; each process reopens its own descriptor.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any, Mapping

__all__ = ["TextFormatter", "JsonFormatter", "ReopeningFileHandler", "setup_logging", "reopen_logs", "sanitize"]

# Characters written as \xNN in a text value: controls (C0, DEL, C1), the
# space (it separates fields) and the backslash (it starts an escape).
_ESCAPED = {c: f"\\x{c:02x}" for c in [*range(0x21), 0x5C, *range(0x7F, 0xA0)]}
# Octets that are not UTF-8, decoded with surrogateescape, shown as \xNN too.
_ESCAPED.update({0xDC00 + c: f"\\x{c:02x}" for c in range(0x80, 0x100)})


def sanitize(value: object) -> str:
    """A value safe to put in one ``key=value`` field."""
    if isinstance(value, (list, tuple)):
        return ",".join(sanitize(v) for v in value)
    if isinstance(value, bytes):
        value = value.decode("utf-8", "surrogateescape")
    text = str(value).translate(_ESCAPED)
    if not text.isprintable():
        # Unicode line and paragraph separators, and other unprintables.
        text = "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in text)
    return text


def _plain(value: object) -> object:
    """A JSON value: bytes decoded (undecodable octets as \\xNN escapes)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return value


def _prefix(role: str) -> str:
    return f" {role}:" if role else ""


class TextFormatter(logging.Formatter):
    """``2026-01-01 12:00:00,000 fastsmtp[PID] worker 2: INFO queued id=... code=250``."""

    def __init__(self, role: str = "") -> None:
        super().__init__(f"%(asctime)s fastsmtp[%(process)d]{_prefix(role)} %(levelname)s %(message)s")
        self.role = role

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        fields: Mapping[str, object] | None = getattr(record, "fields", None)
        if fields:
            # After the message, which the format string ends with.
            line += "".join(f" {key}={sanitize(value)}" for key, value in fields.items())
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, pid, role, level, msg, then the fields."""

    def __init__(self, role: str = "") -> None:
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
            + f".{int(record.msecs):03d}",
            "pid": record.process,
            "role": self.role,
            "level": record.levelname.lower(),
            "msg": record.getMessage(),
        }
        fields: Mapping[str, object] | None = getattr(record, "fields", None)
        if fields:
            for key, value in fields.items():
                out[key] = [_plain(v) for v in value] if isinstance(value, (list, tuple)) else _plain(value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        # ensure_ascii: every control character and U+2028 is escaped, so a
        # record is always exactly one line.
        return json.dumps(out, ensure_ascii=True)


def make_formatter(kind: str, role: str = "") -> logging.Formatter:
    return JsonFormatter(role) if kind == "json" else TextFormatter(role)


class ReopeningFileHandler(logging.FileHandler):
    """A FileHandler that ``reopen()`` points at a new file of the same name."""

    def reopen(self) -> None:
        self.acquire()
        try:
            if self.stream is not None:
                self.stream.flush()
                self.stream.close()
            self.stream = self._open()
        finally:
            self.release()


def setup_logging(level: str, kind: str = "text", path: str = "", role: str = "") -> None:
    """The root logger's one handler: ``path`` (appended to) or stderr."""
    handler: logging.Handler
    if path:
        handler = ReopeningFileHandler(path, encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(make_formatter(kind, role))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))


def set_role(role: str) -> None:
    """Name the process in every line (``worker 2``) after a fork."""
    for handler in logging.getLogger().handlers:
        kind = "json" if isinstance(handler.formatter, JsonFormatter) else "text"
        handler.setFormatter(make_formatter(kind, role))


def reopen_logs() -> None:
    """Reopen every log file of this process (SIGUSR2, after rotation)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, ReopeningFileHandler):
            try:
                handler.reopen()
            except OSError as exc:
                # Keep running: losing log lines is better than losing mail.
                print(f"fastsmtp[{os.getpid()}]: cannot reopen {handler.baseFilename}: {exc}", file=sys.stderr)


class EventLog:
    """The per-message and per-connection lines (``queued``, ``refused``, ``disconnect``)."""

    def __init__(self) -> None:
        self._log = logging.getLogger("fastsmtp")

    @property
    def enabled(self) -> bool:
        return self._log.isEnabledFor(logging.INFO)

    def message(
        self, word: str, queue_id: str, client: str, helo: bytes, sender: bytes,
        recipients: "list[bytes] | tuple[bytes, ...]", size: int, code: int, ms: int,
    ) -> None:
        fields = {
            "id": queue_id,
            "client": client,
            "helo": helo,
            "from": b"<" + sender + b">",
            "to": [b"<" + r + b">" for r in recipients],
            "size": size,
            "code": code,
            "ms": ms,
        }
        self._log.info(word, extra={"fields": fields})

    def disconnect(self, client: str, helo: bytes, tls: bool, messages: int, ms: int) -> None:
        fields = {"client": client, "helo": helo, "tls": "yes" if tls else "no", "messages": messages, "ms": ms}
        self._log.info("disconnect", extra={"fields": fields})

    def flush(self) -> None:
        pass


_EVENT_LOG = EventLog()


def event_log() -> EventLog:
    """The process's one ``EventLog``."""
    return _EVENT_LOG
