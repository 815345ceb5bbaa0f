"""Fuzz the sans-IO Session with h11's invariant.

    python fuzz/fuzz_session.py /tmp/corpus-session fuzz/corpus -max_total_time=3600

(atheris: coverage-guided; new inputs go into the first folder.  Without
atheris, or with ``--plain``, the same ``check`` runs under fuzz/_plain.py.)

The invariant (h11's fuzz harness, and session.py's contract): whatever the
peer sends, ``next_event()`` returns an event, ``NEED_DATA`` or ``PAUSED``,
or raises ``RemoteProtocolError`` whose ``reply`` is a 4xx/5xx ``Reply``.
One exception to the 4xx/5xx: a 221 that closes the session, which is how
session.py answers another protocol's words (``GET``, ``USER``, ...), as
Postfix does; once sent, the session must be CLOSED.  Any other exception
is a bug, and so is each of these:

- ``PAUSED`` while the session is not CLOSED (every owed reply was given, so
  the server would wait forever);
- ``NEED_DATA`` after end of input, or ``ConnectionClosed`` before it;
- more events than the input could possibly produce (a loop that makes no
  progress);
- more accepted recipients than ``max_recipients``;
- reply bytes that are not CRLF-terminated reply lines;
- different events or reply bytes when the same input arrives whole, one
  octet at a time, or cut into pieces, some of them fed back to back before
  the session is asked for events, as happens while the server waits on a
  policy hook (message content may be cut differently; the joined content
  must be the same).  This last check is
  skipped when STARTTLS was accepted: what a client pipelined after it is
  discarded only if it arrived with it (CVE-2011-0411), so there the cut
  rightly changes the outcome.

Input layout: octet 0 picks the limits and how the server answers, octet 1
seeds the cutting into pieces, and the rest is what the client sends.  The
seeds in fuzz/corpus/ follow that layout.
"""

from __future__ import annotations

import os
import random
import re
import sys
from typing import Callable, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _plain  # noqa: E402

try:
    import atheris
except ImportError:  # the plain loop needs nothing but the package
    atheris = None

if atheris is not None and __name__ == "__main__" and "--plain" not in sys.argv:
    with atheris.instrument_imports(include=["fastsmtp"]):
        from fastsmtp.errors import RemoteProtocolError
        from fastsmtp.events import Bdat, ConnectionClosed, Data, Event, MessageChunk, Reply, StartTLS
        from fastsmtp.session import CLOSED, NEED_DATA, PAUSED, State, Limits, Session
else:
    from fastsmtp.errors import RemoteProtocolError
    from fastsmtp.events import Bdat, ConnectionClosed, Data, Event, MessageChunk, Reply, StartTLS
    from fastsmtp.session import CLOSED, NEED_DATA, PAUSED, State, Limits, Session

__all__ = ["check", "limits_for", "pieces_for"]

OK = Reply(250, "2.0.0", "Ok")
GO_AHEAD = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
NO_USER = Reply(550, "5.1.1", "no such user")
TRY_LATER = Reply(451, "4.3.0", "try again later")
SHUTDOWN = Reply(421, "4.3.2", "shutting down")

_REPLY_LINE = re.compile(rb"\A(?:[2-5][0-9]{2}[ -][^\r\n]*\r\n)+\Z")


def limits_for(flags: int) -> Limits:
    """Octet 0, bits 0-4: which limits.  Small values make the limits reachable."""
    return Limits(
        starttls=bool(flags & 1),
        max_message_size=64 if flags & 2 else 25 * 1024 * 1024,
        bare_lf="normalize" if flags & 4 else "reject",
        max_command_line=80 if flags & 8 else 1024,
        max_recipients=2 if flags & 16 else 100,
        max_errors=5 if flags & 16 else 20,
    )


def answerer(flags: int) -> Callable[[Event], Reply]:
    """Octet 0, bits 5-7: how the server answers.

    0-3: as tests/test_session.py's ``default_answer`` (the event's own
    ``refusal``, 354 to DATA, else 250); 4-5: also refuse every second
    command (550; 451 to the end of a message); 6-7: as 0, but the fourth
    owed reply is a 421.  Answers depend only on the sequence of owed
    events, never on how the input was cut, so the three feeds must agree.
    """
    mode = flags >> 5
    count = 0

    def answer(event: Event) -> Reply:
        nonlocal count
        count += 1
        refusal = getattr(event, "refusal", None)
        if refusal is not None:
            return refusal  # the reply contract: the session's own verdict stands
        if mode >= 6 and count == 4:
            return SHUTDOWN
        if mode in (4, 5) and count % 2 == 0:
            return TRY_LATER if not hasattr(event, "address") else NO_USER
        return GO_AHEAD if isinstance(event, Data) else OK

    return answer


def pieces_for(payload: bytes, cut_seed: int) -> tuple[list[bytes], list[bool]]:
    """Octet 1: cut the payload into pieces of 1-64 octets.

    Also says, per piece, whether to ask for events after feeding it (else
    the next piece is fed on top).
    """
    rng = random.Random(cut_seed)
    out, drain, i = [], [], 0
    while i < len(payload):
        n = rng.choice((1, 1, 2, 3, 5, 8, 13, 64))
        out.append(payload[i : i + n])
        drain.append(rng.random() < 0.7)
        i += n
    return out, drain


class Crash(AssertionError):
    """An invariant does not hold."""


def drive(
    limits: Limits, flags: int, pieces: Sequence[bytes], drain: Sequence[bool] = ()
) -> tuple[list[object], bytes, bool]:
    """Feed ``pieces`` then end of input; answer everything; check each step.

    After piece ``i`` the events are read only if ``drain[i]`` (default: always).

    Returns the events and error replies (adjacent content joined), the
    reply bytes, and whether STARTTLS was accepted.
    """
    session = Session(limits)
    answer = answerer(flags)
    seen: list[object] = []
    out: list[bytes] = []
    starttls = False
    # Turns of the loop below: per octet at most one event and one NEED_DATA
    # (fed one at a time), plus a reply-owing event at the end of a BDAT
    # chunk; three per octet is a bound no working session comes near.
    budget = 3 * sum(len(p) for p in pieces) + 16
    content = bytearray()

    def record(item: object) -> None:
        if content:
            seen.append(MessageChunk(bytes(content)))
            content.clear()
        seen.append(item)

    def reply_with(reply: Reply) -> None:
        data = session.send(reply)
        if type(data) is not bytes or not _REPLY_LINE.match(data):
            raise Crash(f"send() returned {data!r}")
        out.append(data)

    for i, piece in enumerate([*pieces, b""]):
        eof = not piece
        session.receive_data(piece)
        if not eof and i < len(drain) and not drain[i]:
            continue
        while True:
            budget -= 1
            if budget < 0:
                raise Crash("more events than the input can produce: no progress")
            try:
                event = session.next_event()
            except RemoteProtocolError as exc:
                reply = exc.reply
                closing = isinstance(reply, Reply) and reply.code == 221
                if not closing and (not isinstance(reply, Reply) or not 400 <= reply.code <= 599):
                    raise Crash(f"RemoteProtocolError carries {reply!r}") from exc
                record(reply)
                reply_with(reply)
                if closing and session.state is not CLOSED:
                    raise Crash(f"a 221 protocol error left the session in {session.state!r}")
                continue
            if not isinstance(session.state, type) or not issubclass(session.state, State):
                raise Crash(f"state is {session.state!r}")
            if len(session.envelope.rcpt_to) > limits.max_recipients:
                raise Crash(f"{len(session.envelope.rcpt_to)} recipients, limit {limits.max_recipients}")
            if event is NEED_DATA:
                if eof:
                    raise Crash("NEED_DATA after end of input")
                break
            if event is PAUSED:
                if session.state is not CLOSED:
                    raise Crash(f"PAUSED with no reply owed in state {session.state!r}")
                return seen, b"".join(out), starttls
            if not isinstance(event, Event):
                raise Crash(f"next_event() returned {event!r}")
            if isinstance(event, MessageChunk):
                if type(event.data) is not bytes or not event.data:
                    raise Crash(f"bad chunk {event!r}")
                content += event.data
                continue
            record(event)
            if isinstance(event, ConnectionClosed):
                if not eof:
                    raise Crash("ConnectionClosed before end of input")
                return seen, b"".join(out), starttls
            if isinstance(event, Bdat):
                continue  # owes no reply: its octets come first
            reply = answer(event)
            if isinstance(event, StartTLS) and reply.code < 400:
                starttls = True
            reply_with(reply)
            if reply.code == 421 and session.state is not CLOSED:
                raise Crash("a 421 did not close the session")
    raise Crash("end of input answered neither ConnectionClosed nor PAUSED")


def check(data: bytes) -> None:
    """The fuzz target: raises on any broken invariant, returns otherwise."""
    if len(data) < 2:
        return
    flags, cut_seed, payload = data[0], data[1], data[2:]
    limits = limits_for(flags)
    whole = drive(limits, flags, [payload] if payload else [])
    octets = drive(limits, flags, [payload[i : i + 1] for i in range(len(payload))])
    pieces = drive(limits, flags, *pieces_for(payload, cut_seed))
    if whole[2] or octets[2] or pieces[2]:
        return  # STARTTLS accepted: see the module docstring
    for name, other in (("octet by octet", octets), ("in pieces", pieces)):
        if other[:2] != whole[:2]:
            raise Crash(f"fed {name}, the session answers differently than fed whole:\n{whole[:2]}\n{other[:2]}")


def TestOneInput(data: bytes) -> None:  # noqa: N802 (atheris' name)
    check(data)


if __name__ == "__main__":
    args = [a for a in sys.argv if a != "--plain"]
    if atheris is None or "--plain" in sys.argv:
        _plain.main(check, args[1:])
    else:
        atheris.Setup(args, TestOneInput)
        atheris.Fuzz()
