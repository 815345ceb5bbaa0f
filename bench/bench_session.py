"""The sans-IO session's cost per command: one whole transaction, parsed and answered.

Run: python -m pytest bench/bench_session.py --benchmark-only

bench_parser.py times the compiled LineReader alone (a tenth of a
microsecond a line); this adds everything above it that a real command
costs: verb dispatch, the RFC 5321 grammar of MAIL/RCPT, event objects,
the transition table and the reply bytes.

``test_transaction`` is one whole session (created, six commands
answered); ``test_command_cycle`` is the session's own share of one
command, with no grammar and no event built: a NOOP received, read,
answered, and the next read finding nothing.  Both report
``us_per_command``.  Only the public API is used, so the same file times
an older tree: PYTHONPATH=OLD/src python -m pytest bench/bench_session.py.
"""

from __future__ import annotations

from typing import Any

from fastsmtp.events import Data, MessageChunk, Reply
from fastsmtp.parser import IMPLEMENTATION
from fastsmtp.session import NEED_DATA, PAUSED, Session

OK = Reply(250, "2.0.0", "Ok")
GO_AHEAD = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
TRANSACTION = (
    b"EHLO client.example.org\r\n"
    b"MAIL FROM:<sender@example.net> SIZE=1024 BODY=8BITMIME\r\n"
    b"RCPT TO:<alice@example.com>\r\n"
    b"DATA\r\n"
    b"Subject: hello\r\n\r\nHello.\r\n.\r\n"
    b"QUIT\r\n"
)
COMMANDS = 6  # EHLO, MAIL, RCPT, DATA, end of data, QUIT: each answered once


def one_transaction() -> int:
    session = Session()
    session.receive_data(TRANSACTION)
    answered = 0
    while True:
        event = session.next_event()
        if event is NEED_DATA or event is PAUSED:
            return answered
        if type(event) is MessageChunk:
            continue
        session.send(GO_AHEAD if type(event) is Data else OK)
        answered += 1


def command_cycles(session: Session, n: int = 100) -> None:
    for _ in range(n):
        session.receive_data(b"NOOP\r\n")
        session.next_event()
        session.send(OK)
        session.next_event()


def test_transaction(benchmark: Any) -> None:
    assert one_transaction() == COMMANDS
    benchmark.extra_info["parser"] = IMPLEMENTATION
    benchmark(one_transaction)
    benchmark.extra_info["us_per_command"] = round(benchmark.stats.stats.median * 1e6 / COMMANDS, 3)


def test_command_cycle(benchmark: Any) -> None:
    session = Session()
    session.receive_data(b"EHLO client.example.org\r\n")
    session.next_event()
    session.send(OK)
    command_cycles(session, 1)
    assert session.next_event() is NEED_DATA and session.errors == 0
    benchmark.extra_info["parser"] = IMPLEMENTATION
    benchmark(command_cycles, session)
    benchmark.extra_info["us_per_command"] = round(benchmark.stats.stats.median * 1e6 / 100, 3)
