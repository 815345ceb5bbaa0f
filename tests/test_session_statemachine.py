"""The Session against a model of it, with Hypothesis' RuleBasedStateMachine.

Each step sends a pipelined batch of commands, valid and not (HELO/EHLO,
MAIL, RCPT, DATA with content, BDAT chunks, RSET, NOOP, VRFY, HELP, QUIT,
STARTTLS, unknown verbs, bare CR/LF, overlong lines), cut into pieces in
random places, and answers every command as a server may: positively or
not, and now and then with a 421.  The test keeps its own model of the
session, driven only by the commands it sent and the replies it gave, and
predicts for each command the event or the protocol error it must produce.

After every step: ``session.state`` is one of the states and equals the
model's; the envelope holds exactly the accepted recipients, never more than
``max_recipients``; nothing but ``RemoteProtocolError`` was raised; after
QUIT, a 421 or too many errors the session is CLOSED and answers PAUSED.

The model follows RFC 5321 §4.1.4 (command order), RFC 3030 (BDAT), RFC 3207
(STARTTLS) and the reply contract in session.py's docstring: the reply
decides the transition, and any reply to the end of a message ends it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from hypothesis import HealthCheck, settings
from hypothesis import event as note
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from fastsmtp._testing import chunked, expected_data, stuff
from fastsmtp.errors import RemoteProtocolError
from fastsmtp.events import (
    Bdat,
    ConnectionClosed,
    Data,
    Ehlo,
    EndOfChunk,
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
    Limits,
    Session,
)

STATES = {GREETED, READY, MAIL, RCPT, DATA, BDAT, CLOSED}

# -- what the client sends ---------------------------------------------------


@dataclass(frozen=True)
class Cmd:
    """One command as sent.  ``kind`` names what the model expects of it."""

    kind: str
    line: bytes = b""
    payload: bytes = b""  # BDAT octets; DATA content (sent only after 354)
    last: bool = False
    raw: bytes = b""  # the address a valid MAIL/RCPT carries
    code: int = 0  # the error a malformed command gets where its order is right

    def wire(self, limits: Limits) -> bytes:
        if self.kind == "long":
            return b"NOOP " + b"x" * limits.max_command_line + b"\r\n"
        if self.kind == "mail_big":
            return b"MAIL FROM:<a@b.example> SIZE=%d\r\n" % (limits.max_message_size + 1)
        if self.kind == "bdat":
            return self.line + self.payload
        return self.line


def _case(verb: bytes) -> st.SearchStrategy[bytes]:
    return st.sampled_from([verb, verb.lower(), verb.capitalize()])


LOCALS = [b"alice", b"bob", b"carol", b"dave", b"postmaster"]
DOMAINS = [b"example.net", b"mx.example.org", b"[192.0.2.1]"]

helo = st.builds(
    lambda verb, name: Cmd("ehlo" if verb.upper() == b"EHLO" else "helo", verb + b" " + name + b"\r\n"),
    st.one_of(_case(b"HELO"), _case(b"EHLO")),
    st.sampled_from([b"client.example", b"[192.0.2.7]", b"x"]),
)
mail = st.builds(
    lambda verb, local, domain, params: Cmd(
        "mail", verb + b" FROM:<" + local + b"@" + domain + b">" + params + b"\r\n", raw=local + b"@" + domain
    ),
    _case(b"MAIL"),
    st.sampled_from(LOCALS),
    st.sampled_from(DOMAINS),
    st.sampled_from([b"", b" BODY=8BITMIME", b" SIZE=10", b" SMTPUTF8", b" SMTPUTF8 BODY=7BIT"]),
)
null_mail = st.just(Cmd("mail", b"MAIL FROM:<>\r\n", raw=b""))
bad_mail = st.sampled_from(
    [
        Cmd("mail_bad", b"MAIL FROM:a@b.example\r\n", code=501),
        Cmd("mail_bad", b"MAIL FROM:<a@b.example> FOO=bar\r\n", code=555),
        Cmd("mail_bad", b"MAIL FROM:<a..b@b.example>\r\n", code=553),
        Cmd("mail_bad", b"MAIL FROM:<a@b.example> SIZE=lots\r\n", code=501),
        Cmd("mail_big", code=552),
    ]
)
rcpt = st.builds(
    lambda verb, local, domain: Cmd("rcpt", verb + b" TO:<" + local + b"@" + domain + b">\r\n", raw=local + b"@" + domain),
    _case(b"RCPT"),
    st.sampled_from(LOCALS),
    st.sampled_from(DOMAINS),
)
postmaster = st.just(Cmd("rcpt", b"RCPT TO:<postmaster>\r\n", raw=b"postmaster"))
utf8_rcpt = st.just(Cmd("rcpt_utf8", b"RCPT TO:<\xc3\xa9l\xc3\xa8ve@example.net>\r\n", raw=b"\xc3\xa9l\xc3\xa8ve@example.net"))
bad_rcpt = st.sampled_from(
    [
        Cmd("rcpt_bad", b"RCPT TO:b@example.net\r\n", code=501),
        Cmd("rcpt_bad", b"RCPT TO:<b@example.net> NOTIFY=NEVER\r\n", code=555),
        Cmd("rcpt_bad", b"RCPT TO:<b@@example.net>\r\n", code=553),
    ]
)
# Message lines, dot-stuffed on the way out; some carry bare CR/LF and
# smuggling lookalikes, which must stay content.
LINES = [b"Subject: hi", b"", b".", b"..", b".hidden", b"text", b"a\nb", b"c\rd", b"\n.\n", b"\r.\r", b"y" * 30]
content = st.lists(st.sampled_from(LINES), max_size=8).map(lambda ls: b"".join(x + b"\r\n" for x in ls))
data = st.builds(lambda verb, body: Cmd("data", verb + b"\r\n", payload=stuff(body)), _case(b"DATA"), content)
OCTETS = [b"\r\n.\r\n", b"MAIL FROM:<evil@example.org>\r\n", b"QUIT\r\n", b".", b"\n", b"x" * 25]
bdat = st.builds(
    lambda payload, last: Cmd("bdat", b"BDAT %d%s\r\n" % (len(payload), b" LAST" if last else b""), payload, last),
    st.lists(st.sampled_from(OCTETS), max_size=4).map(b"".join),
    st.booleans(),
)
simple = st.sampled_from(
    [
        Cmd("rset", b"RSET\r\n"),
        Cmd("rset", b"rset\r\n"),
        Cmd("noop", b"NOOP\r\n"),
        Cmd("noop", b"NOOP whatever\r\n"),
        Cmd("vrfy", b"VRFY bob\r\n"),
        Cmd("help", b"HELP\r\n"),
        Cmd("help", b"HELP DATA\r\n"),
        Cmd("quit", b"QUIT\r\n"),
        Cmd("starttls", b"STARTTLS\r\n"),
    ]
)
invalid = st.sampled_from(
    [
        Cmd("syntax", b"HELO\r\n"),
        Cmd("syntax", b"EHLO   \r\n"),
        Cmd("syntax", b"RSET now\r\n"),
        Cmd("syntax", b"QUIT now\r\n"),
        Cmd("syntax", b"DATA now\r\n"),
        Cmd("bdat_bad", b"BDAT lots\r\n"),
        Cmd("not_smtp", b"GET / HTTP/1.1\r\n"),  # a browser, or a cross-protocol attack
        Cmd("not_smtp", b"USER root\r\n"),  # a POP3 client
        Cmd("unknown", b"XYZZY\r\n"),
        Cmd("unknown", b"\r\n"),
        Cmd("unknown", b"MAILX FROM:<a@b.example>\r\n"),
        Cmd("unknown", b"\x00\xff\r\n"),
        Cmd("unknown", b"NO\nOP\r\n"),  # a bare LF inside a line
        Cmd("unknown", b"NOOP\rRSET\r\n"),  # a bare CR inside a line
        Cmd("unknown", b"long"),  # overlong: built by Cmd.wire
    ]
).map(lambda c: Cmd("long") if c.line == b"long" else c)
# Valid traffic is listed more than once: a transaction must get far enough
# for DATA and BDAT to be in order now and then.
command = st.one_of(
    helo, mail, mail, null_mail, rcpt, rcpt, postmaster, data, bdat, bdat,
    bad_mail, utf8_rcpt, bad_rcpt, simple, invalid,
)


def _batch(cmds: list[Cmd]) -> list[Cmd]:
    # RFC 2920 §3.1: DATA ends a pipelined group (its content waits for 354).
    for i, cmd in enumerate(cmds):
        if cmd.kind == "data":
            return cmds[: i + 1]
    return cmds


# A client that knows the protocol, pipelining one whole transaction
# (RFC 2920), and one that sends anything in any order.
transaction = st.builds(
    lambda hello, sender, rcpts, body: [*hello, sender, *rcpts, *body],
    st.lists(helo, max_size=1),
    st.one_of(mail, null_mail),
    st.lists(st.one_of(rcpt, postmaster), min_size=1, max_size=3),
    st.one_of(st.tuples(data), st.lists(bdat, min_size=1, max_size=3)),
)
# STARTTLS, and sometimes commands injected after it in the same packet
# (CVE-2011-0411): after a 220 they must be gone.
starttls = st.builds(
    lambda hello, injected: [*hello, Cmd("starttls", b"STARTTLS\r\n"), *injected],
    st.lists(helo, max_size=1),
    st.lists(st.one_of(mail, rcpt, simple), max_size=2),
)
batches = st.one_of(transaction, starttls, st.lists(command, min_size=1, max_size=6)).map(_batch)
# Piece sizes, cycled; [0] sends the batch in one piece, [1] octet by octet.
cuts = st.one_of(st.just([0]), st.just([1]), st.lists(st.integers(1, 24), min_size=1, max_size=4))
limits = st.builds(
    Limits,
    max_command_line=st.sampled_from([100, 1024]),
    max_message_size=st.sampled_from([60, 1 << 20]),
    max_recipients=st.sampled_from([2, 100]),
    max_errors=st.sampled_from([8, 1000, 1000]),
    bare_lf=st.sampled_from(["reject", "normalize"]),
    starttls=st.booleans(),
)

# -- what the server answers -------------------------------------------------

OK = Reply(250, "2.0.0", "Ok")
SHUTDOWN = Reply(421, "4.3.2", "shutting down")
TEMP = Reply(451, "4.3.0", "try again later")
# The first answer is the positive one, and it is drawn most often: enough
# refusals to exercise them, not so many that no transaction gets through.
ANSWERS: dict[type, list[Reply]] = {
    Helo: [Reply(250, "", "mx.example"), Reply(550, "5.7.1", "go away"), TEMP],
    Ehlo: [Reply(250, "", "mx.example\nPIPELINING\nCHUNKING"), Reply(550, "5.7.1", "go away"), TEMP],
    MailFrom: [OK, Reply(550, "5.7.1", "sender refused"), TEMP],
    RcptTo: [OK, Reply(550, "5.1.1", "no such user"), Reply(450, "4.2.0", "greylisted")],
    Data: [Reply(354, "", "go ahead"), Reply(554, "5.5.1", "no thanks"), TEMP],
    EndOfMessage: [Reply(250, "2.0.0", "Ok: queued as 1"), Reply(550, "5.7.1", "spam"), TEMP],
    EndOfChunk: [Reply(250, "2.0.0", "octets received"), TEMP],
    Noop: [OK],
    Vrfy: [Reply(252, "2.5.0", "cannot verify"), Reply(502, "5.5.1", "VRFY disabled")],
    Help: [Reply(214, "2.0.0", "see RFC 5321")],
    Rset: [OK],
    Quit: [Reply(221, "2.0.0", "Bye")],
    StartTLS: [Reply(220, "2.0.0", "Ready to start TLS"), Reply(454, "4.7.0", "TLS not available")],
}
SIMPLE_EVENTS = {"rset": Rset, "noop": Noop, "vrfy": Vrfy, "help": Help, "quit": Quit, "helo": Helo, "ehlo": Ehlo}


@dataclass(frozen=True)
class Err:
    code: int
    enhanced: str
    fatal: bool = False


class SessionMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.setup(Limits())

    def setup(self, lim: Limits) -> None:
        self.limits = lim
        self.session = Session(lim)
        self.pending: deque[bytes] = deque()
        self.pulls = 0
        # The model.
        self.state: type = GREETED
        self.rcpts: list[bytes] = []
        self.smtputf8 = False
        self.tls = False
        self.handshake = False  # a 220 to STARTTLS was just sent
        self.errors = 0
        self.bdat_total = 0
        self.ended = False

    @initialize(lim=limits)
    def start(self, lim: Limits) -> None:
        self.setup(lim)

    # -- the model's predictions ---------------------------------------------

    def expect(self, cmd: Cmd) -> type | Err:
        """The event ``cmd`` must produce in the model's state, or its error."""
        s, k = self.state, cmd.kind
        if k in ("unknown", "long"):
            return Err(500, "5.5.2")
        if k == "syntax":  # argument checks come before the order check
            return Err(501, "5.5.4")
        if k == "bdat_bad":  # no known chunk boundary: close (RFC 3030 §2)
            return Err(501, "5.5.4", fatal=True)
        if k == "not_smtp":  # another protocol: close, as Postfix does
            return Err(221, "2.7.0", fatal=True)
        if k == "starttls":
            if self.tls:
                return Err(503, "5.5.1")
            if not self.limits.starttls:
                return Err(502, "5.5.1")
            return StartTLS if s is READY else Err(503, "5.5.1")
        if k in SIMPLE_EVENTS:
            return SIMPLE_EVENTS[k]
        if k.startswith("mail"):
            if s is not READY:
                return Err(503, "5.5.1")
            if k == "mail":
                return MailFrom
            return Err(cmd.code, {501: "5.5.4", 552: "5.3.4", 553: "5.1.7", 555: "5.5.4"}[cmd.code])
        if k.startswith("rcpt"):
            if s is not MAIL and s is not RCPT:
                return Err(503, "5.5.1")
            if len(self.rcpts) >= self.limits.max_recipients:
                return Err(452, "4.5.3")  # RFC 5321 §4.5.3.1.10
            if k == "rcpt_bad":
                return Err(cmd.code, {501: "5.5.4", 553: "5.1.3", 555: "5.5.4"}[cmd.code])
            if k == "rcpt_utf8" and not self.smtputf8:
                return Err(553, "5.6.7")  # RFC 6531 §3.5
            return RcptTo
        if k == "data":
            return Data if s is RCPT else Err(503, "5.5.1")
        if k == "bdat":
            return Bdat if s is RCPT or s is BDAT else Err(503, "5.5.1")
        raise AssertionError(f"no prediction for {cmd}")

    def answer_for(self, event: Event, data: st.DataObject) -> Reply:
        refusal = getattr(event, "refusal", None)
        if refusal is not None:
            return refusal  # the reply contract: the session's verdict stands
        if data.draw(st.integers(0, 49), label="421 now if 0") == 0:
            return SHUTDOWN
        choices = ANSWERS[type(event)]
        if data.draw(st.integers(0, 3), label="refuse if 0") != 0:
            return choices[0]
        return data.draw(st.sampled_from(choices), label=type(event).__name__)

    def reply(self, event: Event | None, reply: Reply, fatal: bool = False) -> None:
        """Send ``reply``; move the model as RFC 5321 and the reply contract say."""
        out = self.session.send(reply)
        assert out.startswith(reply.encoded)
        kind = type(event)
        if reply.code == 421:
            self.state = CLOSED  # RFC 5321 §3.8
            return
        if reply.code >= 400:
            self.errors += 1
        if kind is EndOfMessage or (kind is EndOfChunk and reply.code >= 400):
            self.state, self.rcpts = READY, []
        elif fatal:
            self.state = CLOSED
        elif event is not None and reply.code < 400:
            if kind in (Helo, Ehlo, Rset):
                self.state = GREETED if kind is Rset and self.state is GREETED else READY
                self.rcpts = []
            elif kind is MailFrom:
                self.state, self.rcpts = MAIL, []
                self.smtputf8 = any(key == b"SMTPUTF8" for key, _ in event.params)  # type: ignore[attr-defined]
            elif kind is RcptTo:
                self.state = RCPT
                self.rcpts.append(event.address.raw)  # type: ignore[attr-defined]
            elif kind is Data:
                self.state = DATA
            elif kind is StartTLS:
                self.state, self.rcpts, self.tls = GREETED, [], True
                self.handshake = True
            elif kind is Quit:
                self.state = CLOSED
        if self.errors >= self.limits.max_errors and self.state is not CLOSED:
            self.state = CLOSED
            assert out.endswith(b"421 4.7.0 Error: too many errors\r\n")
        self.check_model()

    # -- driving the session --------------------------------------------------

    def pull(self) -> Event | RemoteProtocolError:
        """The next event or protocol error, feeding pending pieces as needed."""
        while True:
            # No command here yields more events than it has octets.
            self.pulls += 1
            assert self.pulls < 2000, "the session makes no progress"
            try:
                event = self.session.next_event()
            except RemoteProtocolError as exc:
                # 4xx/5xx, or the 221 that closes on another protocol's words.
                assert 400 <= exc.reply.code <= 599 or exc.reply.code == 221, exc.reply
                return exc
            if event is NEED_DATA:
                assert self.pending, "the session waits for input, but the command is complete"
                self.session.receive_data(self.pending.popleft())
                continue
            assert event is not PAUSED, f"PAUSED in {self.session.state!r} with no reply owed"
            assert isinstance(event, Event) and not isinstance(event, ConnectionClosed)
            return event  # type: ignore[return-value]

    def run_command(self, cmd: Cmd, data: st.DataObject) -> None:
        self.pulls = 0
        want = self.expect(cmd)
        got = self.pull()
        where = f"{cmd.wire(self.limits)!r} in {self.state!r}"
        if isinstance(want, Err):
            assert isinstance(got, RemoteProtocolError), f"{where}: want {want}, got {got!r}"
            assert (got.reply.code, got.reply.enhanced) == (want.code, want.enhanced), f"{where}: got {got.reply}"
            self.reply(None, got.reply, want.fatal)
            return
        assert type(got) is want, f"{where}: want {want.__name__}, got {got!r}"
        if want is Bdat:
            self.run_chunk(cmd, got, data)  # type: ignore[arg-type]
            return
        if want is RcptTo or want is MailFrom:
            assert got.address is None if cmd.raw == b"" else got.address.raw == cmd.raw  # type: ignore[attr-defined]
        self.reply(got, self.answer_for(got, data))  # type: ignore[arg-type]
        if self.state is DATA:
            self.run_content(cmd, data)

    def run_chunk(self, cmd: Cmd, event: Bdat, data: st.DataObject) -> None:
        assert event == Bdat(len(cmd.payload), cmd.last, self.state is not BDAT)
        if event.first:
            self.bdat_total = 0
        self.state = BDAT  # BDAT moves when read: its reply follows its octets
        self.check_model()
        room = max(self.limits.max_message_size - self.bdat_total, 0)
        got = b""
        end = self.pull()
        while isinstance(end, MessageChunk):
            got += end.data
            end = self.pull()
        assert got == cmd.payload[:room]  # octets are counted, never parsed
        self.bdat_total += len(cmd.payload)
        refusal = Reply(552, "5.3.4", "") if self.bdat_total > self.limits.max_message_size else None
        if cmd.last:
            note("a message through BDAT")
            assert isinstance(end, EndOfMessage) and end.size == self.bdat_total, end
        else:
            assert isinstance(end, EndOfChunk), end
            assert (end.size, end.total) == (len(cmd.payload), self.bdat_total)
        assert (end.refusal and end.refusal.code) == (refusal and refusal.code)
        self.reply(end, self.answer_for(end, data))

    def run_content(self, cmd: Cmd, data: st.DataObject) -> None:
        """After 354: the content, cut anew, must come back unstuffed."""
        self.pulls = 0
        sizes = data.draw(cuts, label="content cuts")
        self.pending.extend(chunked(cmd.payload, sizes))
        want = expected_data(cmd.payload, self.limits.max_message_size, self.limits.bare_lf == "normalize")
        assert want is not None and want.consumed == len(cmd.payload)
        got = b""
        end = self.pull()
        while isinstance(end, MessageChunk):
            got += end.data
            end = self.pull()
        assert isinstance(end, EndOfMessage), end
        assert got == want.content
        assert (end.size, end.bare_lf) == (want.size, want.bare_lf or want.bare_cr)
        bare = want.bare_lf or want.bare_cr
        code = 552 if want.oversize else 550 if bare and self.limits.bare_lf == "reject" else None
        assert (end.refusal and end.refusal.code) == code, end
        assert not self.pending
        note("a message through DATA")
        self.reply(end, self.answer_for(end, data))

    # -- rules ----------------------------------------------------------------
    # One rule, so that Hypothesis spends its steps on traffic: a session that
    # is over only checks that it stays over.

    @rule(batch=batches, sizes=cuts, data=st.data())
    def step(self, batch: list[Cmd], sizes: list[int], data: st.DataObject) -> None:
        if self.state is CLOSED:
            self.session.receive_data(batch[0].wire(self.limits))
            assert self.session.next_event() is PAUSED
            return
        if self.ended:
            assert isinstance(self.session.next_event(), ConnectionClosed)
            return
        self.pipeline(batch, sizes, data)
        if self.state is not CLOSED:
            note(f"state after a step: {self.state!r}")
            if data.draw(st.integers(0, 31), label="end of input if 0") == 0:
                self.session.receive_data(b"")
                assert isinstance(self.session.next_event(), ConnectionClosed)
                self.ended = True

    def pipeline(self, batch: list[Cmd], sizes: list[int], data: st.DataObject) -> None:
        wire = b"".join(cmd.wire(self.limits) for cmd in batch)
        injected = any(c.kind == "starttls" for c in batch[:-1])
        # STARTTLS with commands pipelined after it arrives in one piece, so
        # that what a 220 must discard (CVE-2011-0411) is already buffered.
        self.pending.extend(chunked(wire, [0] if injected else sizes))
        for cmd in batch:
            self.run_command(cmd, data)
            if self.state is CLOSED:
                note(f"closed after {cmd.kind}")
                assert self.session.next_event() is PAUSED
                self.pending.clear()
                return
            if self.handshake:
                self.handshake = False
                note("STARTTLS accepted")
                assert self.session.tls
                self.pending.clear()
                leftover = self.peek()
                assert leftover is NEED_DATA, f"after a 220 to STARTTLS: {leftover!r}"  # the rest is gone
                return
        while self.pending:  # the tail of an overlong line: dropped unseen
            self.session.receive_data(self.pending.popleft())
        leftover = self.peek()
        assert leftover is NEED_DATA, f"after the whole batch: {leftover!r}"

    def peek(self) -> object:
        # An error here is a wrong answer like any other: one failure mode,
        # which keeps Hypothesis' shrinking short.
        try:
            return self.session.next_event()
        except RemoteProtocolError as exc:
            return exc

    # -- invariants -----------------------------------------------------------

    def check_model(self) -> None:
        assert self.session.state in STATES
        assert self.session.state is self.state, f"session {self.session.state!r}, model {self.state!r}"
        raws = [a.raw for a in self.session.envelope.rcpt_to]
        assert raws == self.rcpts, f"envelope {raws}, accepted {self.rcpts}"
        assert len(raws) <= self.limits.max_recipients

    @invariant()
    def agrees_with_the_model(self) -> None:
        self.check_model()


SessionMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestSessionMachine = SessionMachine.TestCase
