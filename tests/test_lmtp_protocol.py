"""The sans-IO LMTP client conversation (fastsmtp.lmtp.protocol), without a network.

Every reply script is fed whole and one octet at a time, and must give the
same answers both ways; the server's side is written out as octets.
"""

from __future__ import annotations

from typing import Callable

import pytest

from fastsmtp._testing import stuff
from fastsmtp.events import Reply
from fastsmtp.lmtp.protocol import (
    SEND,
    Answer,
    CommandError,
    Conversation,
    DotStuffer,
    LMTPProtocolError,
    ReplyReader,
    State,
    Step,
    dot_stuff,
)
from fastsmtp.parser import DataReader

GREETING = b"220 lmtp.test.example Dovecot (Debian) ready.\r\n"
LHLO_REPLY = (
    b"250-lmtp.test.example\r\n250-8BITMIME\r\n250-CHUNKING\r\n250-ENHANCEDSTATUSCODES\r\n"
    b"250-SIZE 10240000\r\n250 PIPELINING\r\n"
)


def answers(conv: Conversation, data: bytes) -> list[Answer]:
    conv.receive_data(data)
    out = []
    while (answer := conv.next_event()) is not None:
        out.append(answer)
    return out


def every_way(make: Callable[[], Conversation], data: bytes) -> tuple[list[Answer], Conversation]:
    """Feed ``data`` whole and octet by octet to fresh conversations; both must agree."""
    whole = make()
    expected = answers(whole, data)
    slow = make()
    got = []
    for i in range(len(data)):
        got += answers(slow, data[i : i + 1])
    assert got == expected
    assert slow.state is whole.state
    return expected, whole


def ready() -> Conversation:
    conv = Conversation()
    assert answers(conv, GREETING)[0].step is Step.GREETING
    assert conv.send_lhlo("mx.test.example") == b"LHLO mx.test.example\r\n"
    assert answers(conv, LHLO_REPLY)[0].step is Step.LHLO
    assert conv.state is State.READY
    return conv


# -- replies -------------------------------------------------------------------------


def test_greeting_and_lhlo_extensions() -> None:
    conv = Conversation()
    assert conv.state is State.GREETING
    assert answers(conv, GREETING[:10]) == []
    [greeting] = answers(conv, GREETING[10:])
    assert greeting == Answer(Step.GREETING, Reply(220, "", "lmtp.test.example Dovecot (Debian) ready."))
    assert conv.state is State.HELLO
    conv.send_lhlo("mx.test.example")
    [lhlo] = answers(conv, LHLO_REPLY)
    assert lhlo.reply.code == 250 and lhlo.reply.text.split("\n")[0] == "lmtp.test.example"
    assert conv.extensions == {"8BITMIME": "", "CHUNKING": "", "ENHANCEDSTATUSCODES": "", "SIZE": "10240000",
                               "PIPELINING": ""}
    assert conv.offers("pipelining") and conv.size_limit == 10240000
    assert conv.state is State.READY


def test_multiline_reply_and_enhanced_codes_octet_by_octet() -> None:
    data = b"250-2.1.5 first\r\n250-2.1.5 second\r\n250 2.1.5 third\r\n452 4.2.2 <q@example.com> Quota\r\n"
    reader = ReplyReader()
    got = []
    for i in range(len(data)):
        reader.feed(data[i : i + 1])
        while (reply := reader.next()) is not None:
            got.append(reply)
    assert got == [Reply(250, "2.1.5", "first\nsecond\nthird"), Reply(452, "4.2.2", "<q@example.com> Quota")]
    assert reader.buffered == 0


@pytest.mark.parametrize("line, expected", [
    (b"250\r\n", Reply(250, "", "")),
    (b"250 \r\n", Reply(250, "", "")),
    (b"250 2.0.0\r\n", Reply(250, "2.0.0", "")),
    (b"550 5.1.1 <x@example.com> User doesn't exist\r\n", Reply(550, "5.1.1", "<x@example.com> User doesn't exist")),
    # The class of an enhanced code must be the reply's first digit (RFC 2034 §3): else it is text.
    (b"250 5.1.1 odd\r\n", Reply(250, "", "5.1.1 odd")),
    (b"250 2.1.5.3 not a code\r\n", Reply(250, "", "2.1.5.3 not a code")),
    (b"250 2.01.5 leading zero\r\n", Reply(250, "", "2.01.5 leading zero")),
    (b"250 Gr\xc3\xbc\xc3\x9fe\r\n", Reply(250, "", "Gr\u00fc\u00dfe")),
])
def test_reply_lines(line: bytes, expected: Reply) -> None:
    reader = ReplyReader()
    reader.feed(line)
    assert reader.next() == expected


@pytest.mark.parametrize("garbage", [
    b"HTTP/1.1 400 Bad Request\r\n",
    b"25 short\r\n",
    b"2500 four digits\r\n",
    b"650 no such class\r\n",
    b"150 no preliminary replies in LMTP\r\n",
    b"250x no separator\r\n",
    b"250-first\r\n550 second\r\n",  # a multi-line reply changes its code
    b"250 bare LF\n",
    b"250 a bare\rCR\r\n",
    b"250 a NUL\0\r\n",
    b"\r\n",
])
def test_garbage_is_a_protocol_error(garbage: bytes) -> None:
    conv = Conversation()
    with pytest.raises(LMTPProtocolError):
        answers(conv, garbage)
    assert conv.state is State.ERROR
    # Over for good: no further answers, even to good octets.
    with pytest.raises(LMTPProtocolError):
        answers(conv, GREETING)


def test_an_overlong_line_fails_before_its_end_arrives() -> None:
    """Memory stays bounded: the error comes as soon as a line is too long, not at its LF."""
    reader = ReplyReader(max_line=100, max_reply=1000)
    reader.feed(b"250 " + b"x" * 96)
    assert reader.next() is None
    reader.feed(b"x")
    with pytest.raises(LMTPProtocolError, match="longer than 100"):
        reader.next()


def test_an_endless_multiline_reply_is_cut_off() -> None:
    reader = ReplyReader(max_line=100, max_reply=1000)
    reader.feed(b"250-more\r\n" * 99)
    assert reader.next() is None
    reader.feed(b"250-more\r\n" * 2)
    with pytest.raises(LMTPProtocolError, match="reply longer than 1000"):
        reader.next()


def test_a_line_at_the_limit_is_fine() -> None:
    reader = ReplyReader(max_line=100)
    line = b"250 " + b"x" * 94 + b"\r\n"
    assert len(line) == 100
    reader.feed(line)
    assert reader.next() == Reply(250, "", "x" * 94)


def test_a_reply_nobody_asked_for() -> None:
    conv = ready()
    with pytest.raises(LMTPProtocolError, match="nobody asked"):
        answers(conv, b"250 2.0.0 OK\r\n")


def test_an_unasked_421_closes() -> None:
    conv = ready()
    assert answers(conv, b"421 4.4.2 Disconnected for inactivity\r\n") == []
    assert conv.state is State.CLOSED
    with pytest.raises(CommandError):
        conv.send_mail("a@example.net")


def test_eof_with_replies_owed_is_an_error() -> None:
    conv = ready()
    conv.send_mail("a@example.net")
    conv.send_rcpt("alice@example.com")
    assert answers(conv, b"250 2.1.0 OK\r\n250 2.1") != []
    with pytest.raises(LMTPProtocolError, match="closed the connection with 1 replies owed"):
        answers(conv, b"")
    assert conv.state is State.ERROR


def test_eof_when_nothing_is_owed_closes() -> None:
    conv = ready()
    assert answers(conv, b"") == []
    assert conv.state is State.CLOSED


def test_quit() -> None:
    conv = ready()
    assert conv.send_quit() == b"QUIT\r\n"
    [bye] = answers(conv, b"221 2.0.0 Bye\r\n")
    assert bye.step is Step.QUIT and conv.state is State.CLOSED


def test_refused_greeting_allows_only_quit() -> None:
    conv = Conversation()
    [answer] = answers(conv, b"554 5.3.2 not now\r\n")
    assert answer.reply.code == 554 and conv.state is State.REFUSED
    with pytest.raises(CommandError):
        conv.send_lhlo("mx.test.example")
    conv.send_quit()


# -- a transaction -----------------------------------------------------------------


def test_pipelined_transaction_and_one_reply_per_recipient_after_the_dot() -> None:
    def make() -> Conversation:
        conv = ready()
        wire = conv.send_mail("s@example.net", size=5, eight_bit=True)
        assert wire == b"MAIL FROM:<s@example.net> SIZE=5 BODY=8BITMIME\r\n"
        assert conv.send_rcpt("alice@example.com") == b"RCPT TO:<alice@example.com>\r\n"
        conv.send_rcpt(b"nobody@example.com")
        conv.send_rcpt("carol@example.org")
        assert conv.send_data() == b"DATA\r\n"
        assert conv.state is State.DATA and conv.owed == 5
        return conv

    script = (
        b"250 2.1.0 OK\r\n250 2.1.5 OK\r\n"
        b"550 5.1.1 <nobody@example.com> User doesn't exist: nobody@example.com\r\n"
        b"250 2.1.5 OK\r\n354 OK\r\n"
    )
    got, conv = every_way(make, script)
    assert [(a.step, a.reply.code, a.recipient) for a in got] == [
        (Step.MAIL, 250, None),
        (Step.RCPT, 250, b"alice@example.com"),
        (Step.RCPT, 550, b"nobody@example.com"),
        (Step.RCPT, 250, b"carol@example.org"),
        (Step.DATA, 354, None),
    ]
    assert conv.state is State.BODY and conv.accepted == [b"alice@example.com", b"carol@example.org"]
    assert conv.send_body(b"Subject: x\r\n\r\n.hi\r\n") == b"Subject: x\r\n\r\n..hi\r\n.\r\n"
    assert conv.state is State.DELIVERY and conv.owed == 2
    results = answers(conv, b"250 2.0.0 <alice@example.com> id Saved\r\n452 4.2.2 <carol@example.org> Quota\r\n")
    assert [(a.step, a.recipient, a.reply) for a in results] == [
        (Step.DELIVERY, b"alice@example.com", Reply(250, "2.0.0", "<alice@example.com> id Saved")),
        (Step.DELIVERY, b"carol@example.org", Reply(452, "4.2.2", "<carol@example.org> Quota")),
    ]
    assert conv.state is State.READY and conv.accepted == [] and conv.owed == 0
    # The next transaction starts clean.
    conv.send_mail("")
    assert conv.state is State.MAIL


def test_delivery_replies_octet_by_octet() -> None:
    def make() -> Conversation:
        conv = ready()
        conv.send_mail("s@example.net")
        for r in ("a@example.com", "b@example.com", "c@example.com"):
            conv.send_rcpt(r)
        conv.send_data()
        answers(conv, b"250 OK\r\n250 OK\r\n250 OK\r\n250 OK\r\n354 go\r\n")
        conv.send_body(b"x\r\n")
        return conv

    got, conv = every_way(make, b"250 2.0.0 a\r\n451-4.3.0 b\r\n451 4.3.0 again\r\n250 2.0.0 c\r\n")
    assert [(a.recipient, a.reply.code, a.reply.text) for a in got] == [
        (b"a@example.com", 250, "a"), (b"b@example.com", 451, "b\nagain"), (b"c@example.com", 250, "c")]
    assert conv.state is State.READY


def test_a_refused_mail_ends_the_pipelined_transaction() -> None:
    conv = ready()
    conv.send_mail("s@example.net")
    conv.send_rcpt("alice@example.com")
    conv.send_data()
    got = answers(conv, b"550 5.7.1 no\r\n503 5.5.1 MAIL needed first\r\n503 5.5.1 No valid recipients\r\n")
    assert [a.step for a in got] == [Step.MAIL, Step.RCPT, Step.DATA]
    assert conv.state is State.READY and conv.accepted == []


def test_a_refused_mail_without_pipelining() -> None:
    conv = ready()
    conv.send_mail("s@example.net")
    answers(conv, b"451 4.3.0 try later\r\n")
    assert conv.state is State.READY
    with pytest.raises(CommandError):
        conv.send_rcpt("alice@example.com")


def test_354_without_an_accepted_recipient_is_a_protocol_error() -> None:
    """RFC 2033 §4.2: DATA MUST fail with 503 when no RCPT succeeded."""
    conv = ready()
    conv.send_mail("s@example.net")
    conv.send_rcpt("nobody@example.com")
    conv.send_data()
    with pytest.raises(LMTPProtocolError, match="354"):
        answers(conv, b"250 OK\r\n550 5.1.1 no\r\n354 OK\r\n")


def test_a_421_mid_transaction_closes_and_owes_nothing() -> None:
    conv = ready()
    conv.send_mail("s@example.net")
    conv.send_rcpt("alice@example.com")
    conv.send_data()
    got = answers(conv, b"250 OK\r\n421 4.3.2 shutting down\r\n")
    assert [a.step for a in got] == [Step.MAIL, Step.RCPT]
    assert conv.state is State.CLOSED and conv.owed == 0


def test_probe_shape_mail_rcpt_rset() -> None:
    conv = ready()
    wire = conv.send_mail("") + conv.send_rcpt("full@example.com") + conv.send_rset()
    assert wire == b"MAIL FROM:<>\r\nRCPT TO:<full@example.com>\r\nRSET\r\n"
    assert conv.state is State.READY
    # One transaction at a time: no MAIL while that one's replies are owed.
    with pytest.raises(CommandError):
        conv.send_mail("")
    got = answers(conv, b"250 2.1.0 OK\r\n552 5.2.2 <full@example.com> Quota exceeded\r\n250 2.0.0 OK\r\n")
    assert [(a.step, a.reply.code) for a in got] == [(Step.MAIL, 250), (Step.RCPT, 552), (Step.RSET, 250)]
    assert conv.state is State.READY and conv.owed == 0
    conv.send_mail("")


# -- commands ------------------------------------------------------------------------


def test_commands_out_of_order() -> None:
    conv = Conversation()
    with pytest.raises(CommandError):
        conv.send_lhlo("x")  # before the greeting
    conv = ready()
    for wrong in (conv.send_data, lambda: conv.send_rcpt("a@example.com"), lambda: conv.body(b"x"),
                  conv.end_body, lambda: conv.send_lhlo("x")):
        with pytest.raises(CommandError):
            wrong()
    assert conv.state is State.READY and conv.owed == 0


def test_the_send_table_covers_every_command_once() -> None:
    assert set(SEND) == {State.HELLO, State.REFUSED, State.READY, State.MAIL, State.BODY}
    assert all(SEND[s][Step.QUIT] is State.QUIT for s in (State.HELLO, State.REFUSED, State.READY, State.MAIL))


@pytest.mark.parametrize("address", ["a@b\r\nRSET", "a@b\n", "a>@b", "<a@b", "a\0@b"])
def test_addresses_that_would_inject_commands_are_refused(address: str) -> None:
    conv = ready()
    with pytest.raises(CommandError):
        conv.send_mail(address)
    conv.send_mail("s@example.net")
    with pytest.raises(CommandError):
        conv.send_rcpt(address)
    with pytest.raises(CommandError):
        conv.send_rcpt("")


def test_lhlo_name_is_checked() -> None:
    conv = Conversation()
    answers(conv, GREETING)
    for name in ("", "two words", "a\r\nb", "m\u00fcnchen.example"):
        with pytest.raises(CommandError):
            conv.send_lhlo(name)


def test_mail_parameters_only_when_offered() -> None:
    conv = Conversation()
    answers(conv, GREETING)
    conv.send_lhlo("mx.test.example")
    answers(conv, b"250-lmtp.test.example\r\n250 PIPELINING\r\n")
    assert conv.send_mail("s@example.net", size=100, eight_bit=True) == b"MAIL FROM:<s@example.net>\r\n"


def test_smtputf8() -> None:
    conv = ready()
    # Not offered (Dovecot 2.3 does not): an envelope that needs it cannot be sent at all.
    with pytest.raises(CommandError, match="SMTPUTF8"):
        conv.send_mail("j\u00f6rg@example.net")
    with pytest.raises(CommandError, match="does not offer"):
        conv.send_mail("s@example.net", smtputf8=True)
    conv.send_mail("s@example.net")
    with pytest.raises(CommandError, match="SMTPUTF8"):
        conv.send_rcpt("j\u00f6rg@example.com")

    conv = Conversation()
    answers(conv, GREETING)
    conv.send_lhlo("mx.test.example")
    answers(conv, b"250-lmtp.test.example\r\n250 SMTPUTF8\r\n")
    assert conv.send_mail("j\u00f6rg@example.net", smtputf8=True) == b"MAIL FROM:<j\xc3\xb6rg@example.net> SMTPUTF8\r\n"
    assert conv.send_rcpt("j\u00f6rg@example.com") == b"RCPT TO:<j\xc3\xb6rg@example.com>\r\n"


# -- dot-stuffing --------------------------------------------------------------------

MESSAGES = [
    b"",
    b"\r\n",
    b".",
    b".\r\n",
    b"..\r\n",
    b"Subject: x\r\n\r\n.\r\n..\r\n.hidden\r\nend\r\n",
    b"no final CRLF",
    b"ends in a dot\r\n.",
    b"\r\n.\r\n",  # the terminator itself, as content
    b"a" * 5000 + b"\r\n." + b"b" * 5000 + b"\r\n",
]


@pytest.mark.parametrize("message", MESSAGES)
def test_dot_stuff_matches_the_reference_and_the_servers_own_reader(message: bytes) -> None:
    wire = dot_stuff(message)
    # fastsmtp._testing.stuff is the tests' reference for CRLF content.
    assert wire == stuff(message)
    # fastsmtp's own DATA reader (parser.py) undoes it: the content comes back.
    reader = DataReader(max_size=1 << 20)
    content, consumed = reader.feed(wire)
    assert consumed == len(wire)
    assert content == (message if not message or message.endswith(b"\r\n") else message + b"\r\n")


@pytest.mark.parametrize("message", MESSAGES)
def test_dot_stuff_in_chunks_is_the_same(message: bytes) -> None:
    for size in (1, 2, 3, 7):
        stuffer = DotStuffer()
        wire = b"".join(stuffer.feed(message[i : i + size]) for i in range(0, len(message), size)) + stuffer.end()
        assert wire == dot_stuff(message), size


def test_a_dot_after_a_bare_lf_is_stuffed() -> None:
    """Dovecot's reader ends a line at a bare LF: <LF>.<CRLF> must not end the message there."""
    assert dot_stuff(b"a\n.\r\nb\r\n") == b"a\n..\r\nb\r\n.\r\n"
    assert dot_stuff(b"a\r.b\r\n") == b"a\r.b\r\n.\r\n"
    stuffer = DotStuffer()
    assert stuffer.feed(b"a\r") + stuffer.feed(b"\n.") + stuffer.feed(b"b\r") + stuffer.feed(b"\n") + stuffer.end() \
        == b"a\r\n..b\r\n.\r\n"
