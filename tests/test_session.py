"""The sans-IO session: every (state, command) pair, pipelining, DATA, limits.

No sockets here: bytes go in, events and reply bytes come out.
"""

from __future__ import annotations

from typing import Callable

import pytest

from fastsmtp.errors import RemoteProtocolError
from fastsmtp.events import (
    Bdat,
    ConnectionClosed,
    Data,
    Ehlo,
    EndOfMessage,
    Event,
    Helo,
    Help,
    MailFrom,
    MessageChunk,
    Noop,
    Quit,
    RcptTo,
    Reply,
    Rset,
    StartTLS,
    Vrfy,
)
from fastsmtp.session import (
    BDAT,
    CLOSED,
    DATA,
    GREETED,
    MAIL,
    NEED_DATA,
    PAUSED,
    RCPT,
    READY,
    TRANSITIONS,
    Limits,
    Session,
)

OK = Reply(250, "2.0.0", "Ok")
GO_AHEAD = Reply(354, "", "go ahead")
NO = Reply(550, "5.1.1", "no such user")


def default_answer(event: Event) -> Reply:
    """What the server answers when nothing refuses: the session's own refusal, 354, or 250."""
    refusal = getattr(event, "refusal", None)
    if refusal is not None:
        return refusal
    return GO_AHEAD if isinstance(event, Data) else OK


def drive(
    session: Session, data: bytes, answer: Callable[[Event], Reply] = default_answer
) -> tuple[list[object], bytes]:
    """Feed ``data``, answer every command, return (events and error replies, bytes out)."""
    session.receive_data(data)
    seen: list[object] = []
    out = []
    while True:
        try:
            event = session.next_event()
        except RemoteProtocolError as exc:
            seen.append(exc.reply)
            out.append(session.send(exc.reply))
            continue
        if event is NEED_DATA or event is PAUSED:
            break
        seen.append(event)
        if isinstance(event, ConnectionClosed):
            break
        if isinstance(event, (MessageChunk, Bdat)):  # these owe no reply
            continue
        out.append(session.send(answer(event)))
    return seen, b"".join(out)


def session_in(state: type, limits: Limits = Limits()) -> Session:
    s = Session(limits)
    rcpt = b"EHLO client.example\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n"
    script = {
        GREETED: b"",
        READY: b"EHLO client.example\r\n",
        MAIL: b"EHLO client.example\r\nMAIL FROM:<a@example.org>\r\n",
        RCPT: rcpt,
        BDAT: rcpt + b"BDAT 1\r\nx",  # one chunk accepted, no LAST yet
    }[state]
    if script:
        drive(s, script)
    assert s.state is state
    return s


COMMANDS = {
    Helo: b"HELO client.example\r\n",
    Ehlo: b"EHLO client.example\r\n",
    MailFrom: b"MAIL FROM:<x@example.org>\r\n",
    RcptTo: b"RCPT TO:<y@example.net>\r\n",
    Data: b"DATA\r\n",
    Bdat: b"BDAT 2\r\nyz",
    Rset: b"RSET\r\n",
    Noop: b"NOOP\r\n",
    Vrfy: b"VRFY someone\r\n",
    Help: b"HELP\r\n",
    Quit: b"QUIT\r\n",
    StartTLS: b"STARTTLS\r\n",
}

# The contract, written out by hand from RFC 5321 §4.1.4 (command order),
# RFC 3030 §2 (only BDAT after BDAT) and RFC 3207 §4.2 (STARTTLS outside a
# transaction, back to the start): state x command -> the reply the client
# gets (the session's 503, or the server's answer from default_answer) and
# the state after it.  Not computed from TRANSITIONS: a wrong table must
# fail here.  STARTTLS is offered (Limits(starttls=True)); a BDAT in order
# is answered when its two octets are in.
OK_ = "250 2.0.0 Ok"
GO = "354 go ahead"
HELO_FIRST = "503 5.5.1 Error: send HELO/EHLO first"
NEED_MAIL = "503 5.5.1 Error: need MAIL command"
NESTED = "503 5.5.1 Error: nested MAIL command"
NO_RCPT = "503 5.5.1 Error: no valid recipients"
IN_MAIL = "503 5.5.1 Error: MAIL transaction in progress"
ONLY_BDAT = "503 5.5.1 Error: only BDAT may follow BDAT"
EXPECTED: dict[type, dict[type, tuple[str, type]]] = {
    GREETED: {
        Helo: (OK_, READY), Ehlo: (OK_, READY), MailFrom: (HELO_FIRST, GREETED),
        RcptTo: (NEED_MAIL, GREETED), Data: (NEED_MAIL, GREETED), Bdat: (NEED_MAIL, GREETED),
        Rset: (OK_, GREETED), Noop: (OK_, GREETED), Vrfy: (OK_, GREETED), Help: (OK_, GREETED),
        Quit: (OK_, CLOSED), StartTLS: (HELO_FIRST, GREETED),
    },
    READY: {
        Helo: (OK_, READY), Ehlo: (OK_, READY), MailFrom: (OK_, MAIL),
        RcptTo: (NEED_MAIL, READY), Data: (NEED_MAIL, READY), Bdat: (NEED_MAIL, READY),
        Rset: (OK_, READY), Noop: (OK_, READY), Vrfy: (OK_, READY), Help: (OK_, READY),
        Quit: (OK_, CLOSED), StartTLS: (OK_, GREETED),
    },
    MAIL: {
        Helo: (OK_, READY), Ehlo: (OK_, READY), MailFrom: (NESTED, MAIL),
        RcptTo: (OK_, RCPT), Data: (NO_RCPT, MAIL), Bdat: (NO_RCPT, MAIL),
        Rset: (OK_, READY), Noop: (OK_, MAIL), Vrfy: (OK_, MAIL), Help: (OK_, MAIL),
        Quit: (OK_, CLOSED), StartTLS: (IN_MAIL, MAIL),
    },
    RCPT: {
        Helo: (OK_, READY), Ehlo: (OK_, READY), MailFrom: (NESTED, RCPT),
        RcptTo: (OK_, RCPT), Data: (GO, DATA), Bdat: (OK_, BDAT),
        Rset: (OK_, READY), Noop: (OK_, RCPT), Vrfy: (OK_, RCPT), Help: (OK_, RCPT),
        Quit: (OK_, CLOSED), StartTLS: (IN_MAIL, RCPT),
    },
    BDAT: {
        Helo: (OK_, READY), Ehlo: (OK_, READY), MailFrom: (NESTED, BDAT),
        RcptTo: (ONLY_BDAT, BDAT), Data: (ONLY_BDAT, BDAT), Bdat: (OK_, BDAT),
        Rset: (OK_, READY), Noop: (OK_, BDAT), Vrfy: (OK_, BDAT), Help: (OK_, BDAT),
        Quit: (OK_, CLOSED), StartTLS: (IN_MAIL, BDAT),
    },
}  # fmt: skip


def test_expected_table_covers_every_state_that_reads_commands() -> None:
    # DATA reads content and CLOSED reads nothing; every other state is above.
    assert set(EXPECTED) == set(TRANSITIONS) - {DATA, CLOSED}
    assert all(set(row) == set(COMMANDS) for row in EXPECTED.values())


@pytest.mark.parametrize(
    "state,command",
    [(state, command) for state, row in EXPECTED.items() for command in row],
    ids=lambda x: getattr(x, "__name__", repr(x)),
)
def test_every_state_and_command(state: type, command: type) -> None:
    """Allowed commands advance as the written-out table says, others get its 503 5.5.1."""
    reply, after = EXPECTED[state][command]
    s = session_in(state, Limits(starttls=True))
    seen, out = drive(s, COMMANDS[command])
    assert out == reply.encode() + b"\r\n"
    assert s.state is after
    if reply.startswith("503"):
        assert seen == [Reply(503, "5.5.1", reply[10:])]
    else:
        assert type(seen[0]) is command


@pytest.mark.parametrize(
    "state,command,text",
    [
        (GREETED, MailFrom, b"send HELO/EHLO first"),
        (MAIL, MailFrom, b"nested MAIL"),
        (RCPT, MailFrom, b"nested MAIL"),
        (READY, RcptTo, b"need MAIL"),
        (MAIL, Data, b"no valid recipients"),
        (READY, Data, b"need MAIL"),
    ],
)
def test_order_errors_say_why(state: type, command: type, text: bytes) -> None:
    _, out = drive(session_in(state), COMMANDS[command])
    assert out.startswith(b"503 5.5.1 ") and text in out


def test_refused_rcpt_does_not_advance() -> None:
    s = session_in(MAIL)
    seen, out = drive(s, b"RCPT TO:<nobody@example.net>\r\n", lambda e: NO)
    assert out == NO.encoded
    assert s.state is MAIL and s.envelope.rcpt_to == []
    _, out = drive(s, b"DATA\r\n")
    assert out.startswith(b"503 5.5.1")


def test_pipelined_batch_yields_one_command_at_a_time() -> None:
    s = Session()
    s.receive_data(b"EHLO c.example\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n")
    first = s.next_event()
    assert isinstance(first, Ehlo)
    # Until the EHLO is answered, the session holds the rest back.
    assert s.next_event() is PAUSED
    s.send(OK)
    assert isinstance(s.next_event(), MailFrom)
    s.send(OK)
    rcpt = s.next_event()
    assert isinstance(rcpt, RcptTo) and rcpt.address.raw == b"c@d.example"
    s.send(OK)
    assert isinstance(s.next_event(), Data)
    s.send(GO_AHEAD)
    assert s.state is DATA
    assert s.next_event() is NEED_DATA


def test_message_content_and_commands_after_it() -> None:
    s = session_in(RCPT)
    seen, out = drive(s, b"DATA\r\nSubject: hi\r\n\r\n..dot\r\nbody\r\n.\r\nQUIT\r\n")
    kinds = [type(e) for e in seen]
    assert kinds == [Data, MessageChunk, EndOfMessage, Quit]
    assert seen[1].data == b"Subject: hi\r\n\r\n.dot\r\nbody\r\n"  # type: ignore[attr-defined]
    eom = seen[2]
    assert isinstance(eom, EndOfMessage) and eom.size == len(seen[1].data) and eom.refusal is None  # type: ignore[attr-defined]
    assert s.state is CLOSED
    assert out.endswith(b"250 2.0.0 Ok\r\n")


def test_data_split_byte_by_byte() -> None:
    s = session_in(RCPT)
    drive(s, b"DATA\r\n")
    payload = b"line one\r\n..\r\n\r\n.\r\n"  # a stuffed lone dot, a blank line, the end
    got = b""
    seen_all: list[object] = []
    for i in range(len(payload)):
        seen, _ = drive(s, payload[i : i + 1])
        seen_all += seen
    got = b"".join(e.data for e in seen_all if isinstance(e, MessageChunk))
    assert got == b"line one\r\n.\r\n\r\n"
    assert isinstance(seen_all[-1], EndOfMessage)


def test_empty_message() -> None:
    s = session_in(RCPT)
    seen, _ = drive(s, b"DATA\r\n.\r\n")
    assert [type(e) for e in seen] == [Data, EndOfMessage]
    assert seen[1].size == 0  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "lookalike",
    [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\r.\r\n", b"\r\n.\r\r\n", b"\r\n\x00.\r\n"],
)
def test_smuggled_terminators_are_content(lookalike: bytes) -> None:
    s = session_in(RCPT)
    smuggled = b"MAIL FROM:<evil@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\nevil\r\n.\r\n"
    seen, _ = drive(s, b"DATA\r\nhello" + lookalike + smuggled)
    assert [type(e) for e in seen] == [Data, MessageChunk, EndOfMessage]
    eom = seen[-1]
    assert isinstance(eom, EndOfMessage)
    # Under the default policy a bare CR/LF makes the message refused.
    if b"\x00" not in lookalike:
        assert eom.refusal is not None and eom.refusal.code == 550


def test_bare_lf_normalize_accepts() -> None:
    s = session_in(RCPT, Limits(bare_lf="normalize"))
    seen, _ = drive(s, b"DATA\r\na\nb\r\n.\r\n")
    assert seen[1].data == b"a\r\nb\r\n"  # type: ignore[attr-defined]
    assert seen[2].refusal is None and seen[2].bare_lf  # type: ignore[attr-defined]


def test_oversize_message_is_read_to_the_end_then_refused() -> None:
    s = session_in(RCPT, Limits(max_message_size=100))
    seen, out = drive(s, b"DATA\r\n" + b"x" * 70 + b"\r\n" + b"y" * 70 + b"\r\n.\r\nNOOP\r\n")
    eom = [e for e in seen if isinstance(e, EndOfMessage)][0]
    assert eom.refusal is not None and eom.refusal.code == 552 and eom.size == 144
    assert sum(len(e.data) for e in seen if isinstance(e, MessageChunk)) <= 100
    assert isinstance(seen[-1], Noop) and s.state is READY


def test_size_parameter_over_limit() -> None:
    s = session_in(READY, Limits(max_message_size=1000))
    _, out = drive(s, b"MAIL FROM:<a@b.example> SIZE=1001\r\n")
    assert out.startswith(b"552 5.3.4")
    _, out = drive(s, b"MAIL FROM:<a@b.example> SIZE=1000\r\n")
    assert out.startswith(b"250")


@pytest.mark.parametrize(
    "line,code",
    [
        (b"MAIL FROM:<a@b.example> FOO=bar\r\n", b"555 5.5.4"),
        (b"MAIL FROM:<a@b.example> BODY=BINARYMIME\r\n", b"501 5.5.4"),
        (b"MAIL FROM:<a@b.example> SIZE=abc\r\n", b"501 5.5.4"),
        (b"MAIL FROM:a@b.example\r\n", b"501 5.5.4"),
        (b"MAIL FROM:<a..b@b.example>\r\n", b"553 5.1.7"),
        (b"MAIL FROM:<\xc3\xa9@b.example>\r\n", b"553 5.6.7"),
        (b"MAIL FROM:<a@b.example> BODY=8BITMIME SMTPUTF8\r\n", b"250"),
        (b"MAIL FROM:<\xc3\xa9@b.example> SMTPUTF8\r\n", b"250"),
        (b"MAIL FROM:<>\r\n", b"250"),
    ],
)
def test_mail_parameters_and_syntax(line: bytes, code: bytes) -> None:
    _, out = drive(session_in(READY), line)
    assert out.startswith(code), out


@pytest.mark.parametrize(
    "line,code",
    [
        (b"RCPT TO:<b@example.net> NOTIFY=NEVER\r\n", b"555 5.5.4"),
        (b"RCPT TO:b@example.net\r\n", b"501 5.5.4"),
        (b"RCPT TO:<b@@example.net>\r\n", b"553 5.1.3"),
        (b"RCPT TO:<\xc3\xa9@example.net>\r\n", b"553 5.6.7"),
        (b"RCPT TO:<postmaster>\r\n", b"250"),
    ],
)
def test_rcpt_syntax(line: bytes, code: bytes) -> None:
    _, out = drive(session_in(MAIL), line)
    assert out.startswith(code), out


@pytest.mark.parametrize(
    "line,code",
    [
        (b"HELO\r\n", b"501 5.5.4"),
        (b"EHLO   \r\n", b"501 5.5.4"),
        (b"FOO bar\r\n", b"500 5.5.2"),
        (b"\r\n", b"500 5.5.2"),
        (b"MAILX FROM:<a@b>\r\n", b"500 5.5.2"),
        (b"DATA now\r\n", b"501 5.5.4"),
        (b"QUIT now\r\n", b"501 5.5.4"),
        (b"NOOP anything\r\n", b"250"),
        (b"noop\r\n", b"250"),
        (b"HELP\r\n", b"250"),
        (b"NO\nOP\r\n", b"500 5.5.2"),
    ],
)
def test_command_syntax(line: bytes, code: bytes) -> None:
    _, out = drive(session_in(READY), line)
    assert out.startswith(code), out


def test_line_too_long_is_refused_and_session_continues() -> None:
    s = session_in(READY, Limits(max_command_line=512))
    _, out = drive(s, b"NOOP " + b"x" * 600 + b"\r\nNOOP\r\n")
    assert out == b"500 5.5.2 Error: line too long\r\n250 2.0.0 Ok\r\n"


@pytest.mark.parametrize("verb", [b"NOOP", b"VRFY", b"HELP", b"EHLO", b"HELO", b"RSET", b"QUIT", b"DATA"])
def test_a_command_without_parameters_is_held_to_512_octets(verb: bytes) -> None:
    # RFC 5321 §4.5.3.1.4: 512 octets with CRLF; the default allowance of
    # --max-command-line (1024) is for MAIL's and RCPT's parameters only.
    s = session_in(READY)
    at_limit = verb + b" " + b"x" * (512 - 2 - len(verb) - 1)
    _, out = drive(s, at_limit + b"x\r\nNOOP\r\n")
    assert out.startswith(b"500 5.5.2 Error: line too long\r\n"), out
    assert out.endswith(b"250 2.0.0 Ok\r\n"), out  # the session goes on


def test_a_512_octet_noop_is_accepted() -> None:
    _, out = drive(session_in(READY), b"NOOP " + b"x" * (512 - 2 - 5) + b"\r\n")
    assert out == b"250 2.0.0 Ok\r\n"


def test_mail_and_rcpt_keep_their_allowance_for_parameters() -> None:
    local = b"a" * 64
    domain = b".".join([b"d" * 60] * 3) + b".example"  # 254 octets with the local part
    address = local + b"@" + domain[: 254 - 65]
    assert len(address) == 254
    mail = b"MAIL FROM:<" + address + b"> SIZE=1000 BODY=8BITMIME SMTPUTF8"
    rcpt = b"RCPT TO:<postmaster@example.net>"
    s = session_in(READY)
    _, out = drive(s, mail + b"\r\n")
    assert out.startswith(b"250"), out
    # A RCPT over 512 octets is a parameter problem at most, never "too long"
    # below --max-command-line.
    _, out = drive(s, rcpt + b" NOTIFY=NEVER ORCPT=rfc822;" + b"x" * 600 + b"\r\n")
    assert b"line too long" not in out, out


def test_too_many_recipients() -> None:
    s = session_in(MAIL, Limits(max_recipients=3))
    _, out = drive(s, b"".join(b"RCPT TO:<u%d@example.net>\r\n" % i for i in range(5)))
    assert out.count(b"250") == 3 and out.count(b"452 4.5.3") == 2
    assert len(s.envelope.rcpt_to) == 3


def test_too_many_errors_closes_with_421() -> None:
    s = session_in(READY, Limits(max_errors=3))
    _, out = drive(s, b"BAD\r\nBAD\r\nBAD\r\nNOOP\r\n")
    assert out.endswith(b"421 4.7.0 Error: too many errors\r\n")
    assert out.count(b"500 5.5.2") == 3 and b"250" not in out
    assert s.state is CLOSED
    assert s.next_event() is PAUSED


def test_quit_closes() -> None:
    s = session_in(READY)
    _, out = drive(s, b"QUIT\r\nNOOP\r\n")
    assert s.state is CLOSED and out == OK.encoded


def test_ehlo_resets_transaction() -> None:
    s = session_in(RCPT)
    drive(s, b"EHLO again.example\r\n")
    assert s.state is READY and s.envelope.rcpt_to == [] and s.envelope.mail_from is None


def test_rset_before_helo_stays_greeted() -> None:
    s = Session()
    drive(s, b"RSET\r\n")
    assert s.state is GREETED


def test_eof_yields_connection_closed() -> None:
    s = session_in(READY)
    s.receive_data(b"NOOP")
    s.receive_data(b"")
    assert isinstance(s.next_event(), ConnectionClosed)


def test_eof_during_data() -> None:
    s = session_in(RCPT)
    drive(s, b"DATA\r\npartial")
    s.receive_data(b"")
    event = s.next_event()
    assert isinstance(event, (MessageChunk, ConnectionClosed))
    while not isinstance(event, ConnectionClosed):
        event = s.next_event()


def test_unsolicited_421_closes() -> None:
    s = session_in(READY)
    out = s.send(Reply(421, "4.4.2", "timeout"))
    assert out == b"421 4.4.2 timeout\r\n" and s.state is CLOSED


def test_send_without_owed_command_is_a_bug() -> None:
    with pytest.raises(RuntimeError):
        Session().send(OK)


def test_multiline_reply_encoding() -> None:
    assert Reply(250, "", "host\nPIPELINING\nSIZE 10").encoded == b"250-host\r\n250-PIPELINING\r\n250 SIZE 10\r\n"
    assert Reply(550, "5.1.1", "no").encoded == b"550 5.1.1 no\r\n"


# -- BDAT (RFC 3030) -----------------------------------------------------------------


def test_bdat_chunks_are_opaque_and_exact() -> None:
    from fastsmtp.events import Bdat, EndOfChunk

    s = session_in(RCPT)
    payload = b"a\r\n.\r\nMAIL FROM:<evil@x>\r\n"  # a terminator and a command, as content
    seen, out = drive(s, b"BDAT %d\r\n" % len(payload) + payload + b"BDAT 3 LAST\r\nxyzNOOP\r\n")
    kinds = [type(e) for e in seen]
    assert kinds == [Bdat, MessageChunk, EndOfChunk, Bdat, MessageChunk, EndOfMessage, Noop]
    assert seen[0] == Bdat(len(payload), False, True) and seen[3] == Bdat(3, True, False)
    assert seen[1].data == payload and seen[4].data == b"xyz"  # type: ignore[attr-defined]
    assert seen[5].size == len(payload) + 3  # type: ignore[attr-defined]
    assert s.state is READY and out.count(b"250") == 3


def test_bdat_byte_by_byte() -> None:
    s = session_in(RCPT)
    stream = b"BDAT 4\r\nab\r\nBDAT 2 LAST\r\n.."
    seen_all: list[object] = []
    for i in range(len(stream)):
        seen, _ = drive(s, stream[i : i + 1])
        seen_all += seen
    content = b"".join(e.data for e in seen_all if isinstance(e, MessageChunk))
    assert content == b"ab\r\n.."
    assert isinstance(seen_all[-1], EndOfMessage) and s.state is READY


def test_bdat_zero_last_ends_the_message() -> None:
    s = session_in(RCPT)
    seen, _ = drive(s, b"BDAT 0 LAST\r\n")
    assert isinstance(seen[-1], EndOfMessage) and seen[-1].size == 0


def test_bdat_unreadable_size_closes() -> None:
    s = session_in(RCPT)
    _, out = drive(s, b"BDAT lots\r\nNOOP\r\n")
    assert out == b"501 5.5.4 Syntax: BDAT size [LAST]\r\n" and s.state is CLOSED


def test_bdat_out_of_order_octets_are_skipped_then_503() -> None:
    s = session_in(READY)
    _, out = drive(s, b"BDAT 6\r\nNOOP\r\nNOOP\r\n")
    # The six octets "NOOP\r\n" are the chunk; the second NOOP is a command.
    assert out == b"503 5.5.1 Error: need MAIL command\r\n250 2.0.0 Ok\r\n"


def test_bdat_out_of_order_answered_positively_changes_nothing() -> None:
    # A server may only pass the session's own 503 on, but if it answers
    # otherwise, the skipped chunk must still hand the next command over.
    s = session_in(READY)
    s.receive_data(b"BDAT 2\r\nxyNOOP\r\n")
    with pytest.raises(RemoteProtocolError):
        s.next_event()
    assert s.send(OK) == OK.encoded and s.state is READY
    assert isinstance(s.next_event(), Noop)


def test_data_after_bdat_is_refused() -> None:
    s = session_in(RCPT)
    _, out = drive(s, b"BDAT 1\r\nxDATA\r\n")
    assert out.endswith(b"503 5.5.1 Error: only BDAT may follow BDAT\r\n")


def test_bdat_over_the_size_limit() -> None:
    from fastsmtp.events import EndOfChunk

    s = session_in(RCPT, Limits(max_message_size=10))
    seen, out = drive(s, b"BDAT 6\r\nabcdefBDAT 6\r\nghijklBDAT 1 LAST\r\nm")
    chunk_ends = [e for e in seen if isinstance(e, EndOfChunk)]
    assert chunk_ends[0].refusal is None and chunk_ends[1].refusal is not None
    assert sum(len(e.data) for e in seen if isinstance(e, MessageChunk)) == 10
    assert b"552 5.3.4" in out and out.endswith(b"503 5.5.1 Error: need MAIL command\r\n")


def test_rset_ends_a_bdat_transaction() -> None:
    s = session_in(RCPT)
    drive(s, b"BDAT 1\r\nxRSET\r\n")
    assert s.state is READY and s.envelope.rcpt_to == []


# -- STARTTLS (RFC 3207) -------------------------------------------------------------


def test_starttls_not_configured() -> None:
    _, out = drive(session_in(READY), b"STARTTLS\r\n")
    assert out.startswith(b"502 5.5.1")


def test_starttls_discards_pipelined_input_and_resets() -> None:
    from fastsmtp.events import StartTLS

    s = session_in(READY, Limits(starttls=True))
    s.receive_data(b"STARTTLS\r\nNOOP\r\nMAIL FROM:<a@b.example>\r\n")
    assert isinstance(s.next_event(), StartTLS)
    assert s.send(Reply(220, "2.0.0", "Ready")) == b"220 2.0.0 Ready\r\n"
    assert s.state is GREETED and s.tls and s.helo is None
    assert s.next_event() is NEED_DATA  # the NOOP and the MAIL are gone
    _, out = drive(s, b"EHLO again.example\r\nSTARTTLS\r\n")
    assert out.endswith(b"503 5.5.1 Error: TLS already active\r\n")


@pytest.mark.parametrize(
    "state,line,code",
    [
        (READY, b"STARTTLS now\r\n", b"501 5.5.4"),
        (GREETED, b"STARTTLS\r\n", b"503 5.5.1"),
        (MAIL, b"STARTTLS\r\n", b"503 5.5.1"),
        (RCPT, b"STARTTLS\r\n", b"503 5.5.1"),
    ],
)
def test_starttls_errors(state: type, line: bytes, code: bytes) -> None:
    _, out = drive(session_in(state, Limits(starttls=True)), line)
    assert out.startswith(code)


@pytest.mark.parametrize("line", [b"GET / HTTP/1.1\r\n", b"POST /x HTTP/1.0\r\n", b"CONNECT a:25 HTTP/1.1\r\n", b"USER bob\r\n"])
def test_other_protocols_are_closed_at_once(line: bytes) -> None:
    s = Session()
    _, out = drive(s, line + b"Host: x\r\n\r\n")
    assert out == b"221 2.7.0 Error: not an SMTP command; closing\r\n"
    assert s.state is CLOSED


def test_huge_ehlo_argument_is_refused() -> None:
    s = Session()
    _, out = drive(s, b"EHLO " + b"a" * 256 + b"\r\nEHLO " + b"a" * 255 + b"\r\n")
    assert out.startswith(b"501 5.5.4") and out.endswith(b"250 2.0.0 Ok\r\n")
