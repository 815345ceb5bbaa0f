"""Log lines: Postfix-style ``key=value`` text or JSON, to stderr or a file.

Rules of this module:
- A structured record is a short event word (``queued``, ``refused``,
  ``disconnect``) and a dict of fields passed as ``extra={"fields": ...}``.
  The formatter renders it; callers build the dict only after
  ``log.isEnabledFor(INFO)``, so a disabled level costs one check.
- The two lines written per message and per connection take a fast path,
  ``event_log()``: no LogRecord, a time stamp built once per second, and the
  lines of one loop iteration written and flushed together at its end (or
  at once when no loop runs).  They come out exactly as the formatters
  would write them, on the same handler's stream, and in order with every
  other record of the process (a record on that handler first writes what
  is pending).  Whenever the logging set-up is not the one ``setup_logging``
  made, they go through the logger instead.  Nothing pending is lost: it is
  written before a fork, a reopen, a new set-up, and at exit.
- Everything a client chose (HELO, addresses) is sanitised when rendered:
  control characters, spaces and backslashes are escaped, so nothing a
  client sends can start a forged log line or split a field.  JSON lines
  get the same guarantee from ``json.dumps``.  Message content is never
  logged.
- ``--log-file`` is reopened on SIGUSR2 (``reopen_logs``), after logrotate
  has moved it away; each process reopens its own descriptor.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import os
import sys
import threading
import time
from json.encoder import encode_basestring_ascii as _json_str  # what json.dumps(ensure_ascii=True) uses
from typing import Any, Callable, Mapping, Sequence

__all__ = [
    "TextFormatter",
    "JsonFormatter",
    "ReopeningFileHandler",
    "EventLog",
    "event_log",
    "setup_logging",
    "reopen_logs",
    "sanitize",
]

# Characters written as \xNN in a text value: controls (C0, DEL, C1), the
# space (it separates fields) and the backslash (it starts an escape).
_ESCAPED = {c: f"\\x{c:02x}" for c in [*range(0x21), 0x5C, *range(0x7F, 0xA0)]}
# Octets that are not UTF-8, decoded with surrogateescape, shown as \xNN too.
_ESCAPED.update({0xDC00 + c: f"\\x{c:02x}" for c in range(0x80, 0x100)})


def _field(value: str | bytes) -> str:
    """sanitize() of one str or bytes value, fast when nothing needs escaping."""
    if isinstance(value, bytes):
        if not value.isascii():
            return sanitize(value)
        value = value.decode("ascii")
    # Printable ASCII (no control, no DEL), but neither the space nor the
    # backslash: exactly the text that sanitize() leaves as it is.
    if value.isascii() and value.isprintable() and " " not in value and "\\" not in value:
        return value
    return sanitize(value)


def sanitize(value: object) -> str:
    """A value safe to put in one ``key=value`` field."""
    if isinstance(value, (list, tuple)):
        return ",".join(sanitize(v) for v in value)
    if isinstance(value, bytes):
        value = value.decode("utf-8", "surrogateescape")
    text = str(value)
    if text.isascii() and text.isprintable() and " " not in text and "\\" not in text:
        return text  # the usual case: nothing to escape
    text = text.translate(_ESCAPED)
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


#: ",000" to ",999" (text) and ".000" to ".999" (JSON): the milliseconds of a stamp.
_MILLIS_TEXT = [f",{ms:03d}" for ms in range(1000)]
_MILLIS_JSON = [f".{ms:03d}" for ms in range(1000)]

#: Lines held within one loop iteration before they are written anyway.
MAX_PENDING = 256

#: Rendered field values remembered (per kind: plain values, addresses).
MAX_SEEN = 4096


def _json_text(value: str | bytes) -> str:
    """A JSON string of _plain(value), as json.dumps(ensure_ascii=True) writes it."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "backslashreplace")
    return _json_str(value)


class EventLog:
    """The per-message and per-connection lines, without a LogRecord.

    One instance per process (``event_log()``), bound by ``setup_logging``
    and ``set_role`` to the root handler they made.  A line costs a few
    string operations; the lines of one loop iteration are written to the
    handler's stream and flushed once, by a callback at the end of it
    (``loop.call_soon``).  What is written is exactly what the handler's
    TextFormatter or JsonFormatter would write for the same record.
    """

    def __init__(self) -> None:
        self._logger = logging.getLogger("fastsmtp")
        self._root = logging.getLogger()
        self._lock = threading.Lock()  # guards _pending and _loop: a record on another thread flushes too
        self._pending: list[str] = []
        self._loop: asyncio.AbstractEventLoop | None = None  # where a flush is due, if one is
        self._handler: logging.StreamHandler[Any] | None = None
        self._formatter: logging.Formatter | None = None
        self._json = False
        self._role = ""
        self._converter: Callable[[float | None], time.struct_time] = time.localtime
        self._second = -1
        self._date = ""
        self._head = ""
        self._end = "\n"
        self._seen: dict[str | bytes, str] = {}
        self._seen_addresses: dict[bytes, str] = {}

    @property
    def enabled(self) -> bool:
        """Whether the lines are written at all (the level is INFO or lower)."""
        return self._logger.isEnabledFor(logging.INFO)

    # -- the two lines ----------------------------------------------------------

    def message(
        self,
        word: str,
        queue_id: str,
        client: str,
        helo: bytes,
        sender: bytes,
        recipients: Sequence[bytes],
        size: int,
        code: int,
        ms: int,
        auth: tuple[tuple[str, str], ...] = (),
    ) -> None:
        """``queued`` or ``refused``: sender and recipients are raw addresses, without ``<>``.

        ``auth`` holds the (check, result) pairs of the authentication
        checks, logged after the recipients as spf=, dkim=, dmarc=, arc=.
        """
        if not self._logger.isEnabledFor(logging.INFO):
            return
        if not self._bound():
            fields: dict[str, object] = {
                "id": queue_id, "client": client, "helo": helo, "from": b"<" + sender + b">",
                "to": [b"<" + r + b">" for r in recipients],
            }  # fmt: skip
            fields.update(auth)
            fields.update(size=size, code=code, ms=ms)
            self._logger.info(word, extra={"fields": fields})
            return
        value, address = self._value, self._address
        if self._json:
            checks = "".join([f", \"{check}\": \"{result}\"" for check, result in auth])
            line = (
                f"{self._stamp()}{_json_str(word)}, \"id\": {_json_str(queue_id)}, \"client\": {value(client)}"
                f", \"helo\": {value(helo)}, \"from\": {address(sender)}"
                f", \"to\": [{', '.join([address(r) for r in recipients])}]{checks}"
                f", \"size\": {size:d}, \"code\": {code:d}, \"ms\": {ms:d}}}{self._end}"
            )
        else:
            checks = "".join([f" {check}={result}" for check, result in auth])
            line = (
                f"{self._stamp()}{word} id={_field(queue_id)} client={value(client)} helo={value(helo)}"
                f" from={address(sender)} to={','.join([address(r) for r in recipients])}{checks}"
                f" size={size:d} code={code:d} ms={ms:d}{self._end}"
            )
        self._add(line)

    def disconnect(self, client: str, helo: bytes, tls: bool, messages: int, ms: int) -> None:
        """``disconnect``: one line per connection."""
        if not self._logger.isEnabledFor(logging.INFO):
            return
        yes = "yes" if tls else "no"
        if not self._bound():
            fields = {"client": client, "helo": helo, "tls": yes, "messages": messages, "ms": ms}
            self._logger.info("disconnect", extra={"fields": fields})
            return
        value = self._value
        if self._json:
            line = (
                f"{self._stamp()}\"disconnect\", \"client\": {value(client)}, \"helo\": {value(helo)}"
                f", \"tls\": \"{yes}\", \"messages\": {messages:d}, \"ms\": {ms:d}}}{self._end}"
            )
        else:
            line = (
                f"{self._stamp()}disconnect client={value(client)} helo={value(helo)} tls={yes}"
                f" messages={messages:d} ms={ms:d}{self._end}"
            )
        self._add(line)

    def _value(self, value: str | bytes) -> str:
        """One field's value, as the formatter renders it; remembered, as a
        connection's client and HELO, and senders and recipients, come back."""
        text = self._seen.get(value)
        if text is None:
            text = _json_text(value) if self._json else _field(value)
            if len(self._seen) >= MAX_SEEN:
                self._seen.clear()
            self._seen[value] = text
        return text

    def _address(self, address: bytes) -> str:
        """``<address>`` as the formatter renders it (remembered too)."""
        text = self._seen_addresses.get(address)
        if text is None:
            bracketed = b"<" + address + b">"
            text = _json_text(bracketed) if self._json else _field(bracketed)
            if len(self._seen_addresses) >= MAX_SEEN:
                self._seen_addresses.clear()
            self._seen_addresses[address] = text
        return text

    # -- writing ----------------------------------------------------------------

    def flush(self) -> None:
        """Write and flush every pending line (the end of a loop iteration, exit, fork, reopen)."""
        handler = self._handler
        if handler is None:
            return  # nothing is held while unbound
        # The handler's lock first (as logging's emit holds it), then ours:
        # lines taken by one flush are written before another flush's.
        handler.acquire()
        try:
            with self._lock:
                lines, self._pending, self._loop = self._pending, [], None
            if lines:
                stream = handler.stream
                stream.write("".join(lines))
                stream.flush()
        except (OSError, ValueError, AttributeError) as exc:
            # As logging's handleError would: say so, and keep serving.
            try:
                print(f"fastsmtp[{os.getpid()}]: cannot write log lines: {exc}", file=sys.stderr)
            except (OSError, ValueError):
                pass
        finally:
            handler.release()

    def _add(self, line: str) -> None:
        """Hold a line until the end of this loop iteration, or write it now without a loop."""
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        with self._lock:
            self._pending.append(line)
            due = self._loop
            schedule = loop is not None and due is None
            if schedule:
                self._loop = loop
            full = len(self._pending) >= MAX_PENDING
        if schedule:
            assert loop is not None
            loop.call_soon(self.flush)
        elif loop is None or due is not loop:
            # No loop runs here, or the one a flush was due on has stopped
            # without running it: write now, not at some later iteration.
            full = True
        if full:
            self.flush()

    def _stamp(self) -> str:
        """``2026-01-01 12:00:00,000 fastsmtp[PID] worker 2: INFO `` (or the JSON line's start)."""
        now = time.time_ns()
        second = now // 1_000_000_000
        if second != self._second:
            if self._json:
                date = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(second))
            else:
                date = time.strftime(logging.Formatter.default_time_format, self._converter(second))
            self._date, self._second = date, second
        millis = (now // 1_000_000) % 1000
        if self._json:
            return f"{{\"time\": \"{self._date}{_MILLIS_JSON[millis]}\"{self._head}"
        return f"{self._date}{_MILLIS_TEXT[millis]}{self._head}"

    def _bound(self) -> bool:
        """Whether the set-up is still the one bound: else the line goes through logging."""
        handler = self._handler
        handlers = self._root.handlers
        return (
            handler is not None
            and len(handlers) == 1
            and handlers[0] is handler
            and handler.formatter is self._formatter
            and handler.level <= logging.INFO
            and handler.stream is not None
            and not self._logger.handlers
            and not self._logger.filters
            and self._logger.propagate
        )

    # -- keeping in step with the set-up ---------------------------------------

    def bind(self) -> None:
        """Follow the root logger's one handler (setup_logging and set_role call this)."""
        self.flush()
        old = self._handler
        if old is not None:
            old.removeFilter(self._before_record)
        self._handler = None
        handlers = self._root.handlers
        if len(handlers) != 1 or not isinstance(handlers[0], logging.StreamHandler):
            return
        handler = handlers[0]
        formatter = handler.formatter
        if not isinstance(formatter, (TextFormatter, JsonFormatter)):
            return
        self._handler, self._formatter = handler, formatter
        self._json = isinstance(formatter, JsonFormatter)
        self._role = formatter.role
        self._converter = formatter.converter
        self._end = handler.terminator
        self._rebuild()
        # Another record on this handler writes the pending lines first.
        handler.addFilter(self._before_record)

    def _rebuild(self) -> None:
        """The fixed part after the time stamp: the PID changes in a forked child."""
        pid = os.getpid()
        self._second = -1
        self._seen.clear()  # rendered for the other kind, maybe
        self._seen_addresses.clear()
        if self._json:
            self._head = f", \"pid\": {pid}, \"role\": {_json_str(self._role)}, \"level\": \"info\", \"msg\": "
        else:
            level = logging.getLevelName(logging.INFO)
            self._head = f" fastsmtp[{pid}]{_prefix(self._role)} {level} "

    def _before_record(self, record: logging.LogRecord) -> bool:
        if self._pending:
            self.flush()
        return True

    def _forked(self) -> None:
        """In a forked child: nothing pending (flushed before the fork), a fresh lock, its own PID."""
        self._lock = threading.Lock()
        self._pending, self._loop = [], None
        if self._handler is not None:
            self._rebuild()


_events = EventLog()
# Last registered, first run: before logging's own atexit hook closes the handlers.
atexit.register(_events.flush)
os.register_at_fork(before=_events.flush, after_in_child=_events._forked)


def event_log() -> EventLog:
    """The process's one EventLog, kept in step by setup_logging and set_role."""
    return _events


def setup_logging(level: str, kind: str = "text", path: str = "", role: str = "") -> None:
    """The root logger's one handler: ``path`` (appended to) or stderr."""
    handler: logging.Handler
    if path:
        handler = ReopeningFileHandler(path, encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(make_formatter(kind, role))
    root = logging.getLogger()
    _events.flush()  # pending lines belong to the old handler
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
    _events.bind()


def set_role(role: str) -> None:
    """Name the process in every line (``worker 2``) after a fork."""
    _events.flush()  # written under the old name
    for handler in logging.getLogger().handlers:
        kind = "json" if isinstance(handler.formatter, JsonFormatter) else "text"
        handler.setFormatter(make_formatter(kind, role))
    _events.bind()


def reopen_logs() -> None:
    """Reopen every log file of this process (SIGUSR2, after rotation)."""
    _events.flush()  # into the file logrotate moved away, as any earlier line
    for handler in logging.getLogger().handlers:
        if isinstance(handler, ReopeningFileHandler):
            try:
                handler.reopen()
            except OSError as exc:
                # Keep running: losing log lines is better than losing mail.
                print(f"fastsmtp[{os.getpid()}]: cannot reopen {handler.baseFilename}: {exc}", file=sys.stderr)
