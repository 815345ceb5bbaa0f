"""Locust load test for an SMTP server (fastsmtp or any other).

Headless, 50 users for one minute, CSV files smtp_stats.csv etc.:

    locust -f bench/locustfile.py --headless -u 50 -r 10 -t 1m \\
        --host smtp://127.0.0.1:2525 --csv smtp

With the web UI (http://127.0.0.1:8089; users and run time are set there):

    locust -f bench/locustfile.py --host smtp://127.0.0.1:2525 --web-host 127.0.0.1

Each simulated user keeps one SMTP connection (EHLO once), sends
``SMTP_PER_CONNECTION`` messages over it, then QUITs and reconnects.  Every
step is reported to Locust as a request of type "SMTP", so the statistics,
the charts and the CSV show SMTP latency and failures:

- ``connect + EHLO``: TCP connect, greeting and EHLO;
- ``message <size>``: MAIL, RCPT, DATA and the content, up to the final 250
  (the time a sender waits for its message to be accepted);
- ``QUIT``.

A reply other than the expected one (a 4xx or 5xx) or a broken connection is
a failure with the reply in its message; the user then reconnects.

Settings (environment variables):

- host: ``--host smtp://HOST:PORT`` (port 25 when left out), else
  ``SMTP_HOST`` in the same form, else ``smtp://127.0.0.1:2525``;
- ``SMTP_TO`` (default ``postmaster@localhost``; comma-separated addresses are
  used in turn), ``SMTP_FROM`` (default ``locust@example.net``);
- ``SMTP_SIZE`` message size in bytes, headers included (default 1024);
- ``SMTP_PER_CONNECTION`` messages per connection (default 10);
- ``SMTP_WAIT`` seconds each user waits between messages (default 0: as fast
  as it can); ``SMTP_TIMEOUT`` seconds for any one reply (default 30).

Locust runs on gevent and patches the standard library's sockets when it is
imported, so plain blocking ``smtplib`` calls here yield to the other users.
"""

from __future__ import annotations

import itertools
import os
import smtplib
import time
from typing import Any
from urllib.parse import urlsplit

from locust import User, constant, task

DEFAULT_HOST = "smtp://127.0.0.1:2525"
LINE = b"The quick brown fox jumps over the lazy dog, 0123456789; pack my box with five dozen jugs."


def parse_host(host: str | None) -> tuple[str, int]:
    """``smtp://HOST:PORT`` (or ``HOST:PORT``, or ``HOST``) -> (host, port); port 25 by default."""
    text = (host or "").strip() or DEFAULT_HOST
    if "://" not in text:
        text = "smtp://" + text
    parts = urlsplit(text)
    if parts.scheme not in ("smtp", ""):
        raise ValueError(f"host must be smtp://HOST:PORT, not {host!r}")
    return parts.hostname or "127.0.0.1", parts.port or 25


def build_message(size: int, mail_from: str, to: str) -> bytes:
    """A plain-text message of ``size`` bytes (headers included) with CRLF lines."""
    head = (
        f"From: <{mail_from}>\r\nTo: <{to}>\r\nSubject: locust {size} bytes\r\n"
        f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}\r\n"
        f"Message-ID: <locust.{os.getpid()}.{time.monotonic_ns()}@example.net>\r\n\r\n"
    ).encode("ascii")
    body = bytearray()
    while len(head) + len(body) < size:
        left = size - len(head) - len(body)
        body += LINE[: max(left - 2, 0)] + b"\r\n"
    return head + bytes(body)


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


SIZE = _env_int("SMTP_SIZE", 1024)
PER_CONNECTION = max(1, _env_int("SMTP_PER_CONNECTION", 10))
TIMEOUT = float(os.environ.get("SMTP_TIMEOUT", "30"))
MAIL_FROM = os.environ.get("SMTP_FROM", "locust@example.net")
RECIPIENTS = [a.strip() for a in os.environ.get("SMTP_TO", "postmaster@localhost").split(",") if a.strip()]
MESSAGE = build_message(SIZE, MAIL_FROM, RECIPIENTS[0])
MESSAGE_NAME = f"message {SIZE} B"
CONNECT_RETRY_DELAY = 0.1  # seconds after a failed connect


class SMTPUser(User):
    """One SMTP client: a connection reused for ``SMTP_PER_CONNECTION`` messages."""

    host = os.environ.get("SMTP_HOST", DEFAULT_HOST)
    wait_time = constant(float(os.environ.get("SMTP_WAIT", "0")))

    def __init__(self, environment: Any) -> None:
        super().__init__(environment)
        self.address = parse_host(self.host)
        self.smtp: smtplib.SMTP | None = None
        self.sent_on_connection = 0
        self.busy = False  # inside a transaction: if the user is stopped now, the session state is unknown
        self.recipients = itertools.cycle(RECIPIENTS)

    # -- reporting -----------------------------------------------------------------

    def _report(self, name: str, start: float, length: int, exc: BaseException | None) -> None:
        self.environment.events.request.fire(
            request_type="SMTP",
            name=name,
            response_time=(time.perf_counter() - start) * 1000,
            response_length=length,
            response=None,
            context={},
            exception=exc,
        )

    # -- the connection ------------------------------------------------------------

    def _connect(self) -> smtplib.SMTP | None:
        start = time.perf_counter()
        smtp = smtplib.SMTP(timeout=TIMEOUT)
        try:
            code, msg = smtp.connect(*self.address)
            if code != 220:
                raise smtplib.SMTPConnectError(code, msg)
            code, msg = smtp.ehlo("locust.example.net")
            if code != 250:
                raise smtplib.SMTPHeloError(code, msg)
        except (smtplib.SMTPException, OSError) as exc:
            smtp.close()
            self._report("connect + EHLO", start, 0, exc)
            time.sleep(CONNECT_RETRY_DELAY)  # gevent's sleep: a dead server is not hammered in a tight loop
            return None
        self._report("connect + EHLO", start, 0, None)
        self.sent_on_connection = 0
        return smtp

    def _drop(self) -> None:
        if self.smtp is not None:
            self.smtp.close()
        self.smtp = None

    def _quit(self) -> None:
        smtp, self.smtp = self.smtp, None
        if smtp is None:
            return
        start = time.perf_counter()
        try:
            code, msg = smtp.docmd("QUIT")
            if code != 221:
                raise smtplib.SMTPResponseException(code, msg)
        except (smtplib.SMTPException, OSError) as exc:
            self._report("QUIT", start, 0, exc)
        else:
            self._report("QUIT", start, 0, None)
        finally:
            smtp.close()

    # -- the task ------------------------------------------------------------------

    @task
    def send_message(self) -> None:
        if self.smtp is None:
            self.smtp = self._connect()
            if self.smtp is None:
                return
        start = time.perf_counter()
        self.busy = True
        try:
            # MAIL, RCPT, DATA and the content; raises on any refusal.
            self.smtp.sendmail(MAIL_FROM, [next(self.recipients)], MESSAGE)
        except (smtplib.SMTPException, OSError) as exc:
            self.busy = False
            self._report(MESSAGE_NAME, start, len(MESSAGE), exc)
            self._drop()  # start clean: a new connection for the next message
            return
        # (Not in a finally: when Locust kills the greenlet in sendmail(), busy stays True.)
        self.busy = False
        self._report(MESSAGE_NAME, start, len(MESSAGE), None)
        self.sent_on_connection += 1
        if self.sent_on_connection >= PER_CONNECTION:
            self._quit()

    def on_stop(self) -> None:
        # Locust stops a user by killing its greenlet, possibly in the middle of
        # sendmail(); replies to that transaction may still be on the way, so
        # such a connection is just closed, not QUIT (which would read them).
        if self.busy:
            self._drop()
        else:
            self._quit()
