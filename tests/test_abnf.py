"""The MAIL/RCPT argument grammar (RFC 5321 §4.1.2, RFC 6531 §3.3)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastsmtp._abnf import is_dot_string, parse_mail_argument, parse_mailbox, parse_rcpt_argument
from fastsmtp.errors import LocalProtocolError
from fastsmtp.events import Address

ATEXT_SPECIALS = b"!#$%&'*+-/=?^_`{|}~"
LOCAL_64 = b"a" * 64
LABEL_63 = b"d" * 63


def _domain(octets: int) -> bytes:
    """A valid domain of exactly ``octets`` octets (labels of at most 63)."""
    labels = []
    left = octets
    while left > 0:
        size = min(63, left)
        if left - size == 1:  # never leave a remainder that would need an empty label
            size -= 1
        labels.append(b"x" * size)
        left -= size + 1
    domain = b".".join(labels)
    assert len(domain) == octets, len(domain)
    return domain


# ---------------------------------------------------------------- valid RCPT

RCPT_VALID: list[tuple[bytes, Address, tuple[tuple[bytes, bytes | None], ...]]] = [
    (b" TO:<u@d.example>", Address(b"u", b"d.example", b"u@d.example"), ()),
    (b" to:<U@D.Example>", Address(b"U", b"D.Example", b"U@D.Example"), ()),
    (b" tO:<a.b.c@d>", Address(b"a.b.c", b"d", b"a.b.c@d"), ()),
    # Postfix-style leniency: SP between the colon and "<".
    (b" TO: <u@d.example>", Address(b"u", b"d.example", b"u@d.example"), ()),
    (b" TO:   <u@d.example>", Address(b"u", b"d.example", b"u@d.example"), ()),
    # Every atext special is legal in a dot-string (RFC 5322 §3.2.3).
    (
        b" TO:<" + ATEXT_SPECIALS + b"@d.example>",
        Address(ATEXT_SPECIALS, b"d.example", ATEXT_SPECIALS + b"@d.example"),
        (),
    ),
    # Quoted strings: local is unquoted, raw is as sent.
    (
        b' TO:<"john doe"@example.com>',
        Address(b"john doe", b"example.com", b'"john doe"@example.com'),
        (),
    ),
    (
        b' TO:<"a\\"b\\\\c\\d"@example.com>',
        Address(b'a"b\\cd', b"example.com", b'"a\\"b\\\\c\\d"@example.com'),
        (),
    ),
    (b' TO:<"a>b"@example.com>', Address(b"a>b", b"example.com", b'"a>b"@example.com'), ()),
    (b' TO:<"@:<>,"@example.com>', Address(b"@:<>,", b"example.com", b'"@:<>,"@example.com'), ()),
    (b' TO:<""@example.com>', Address(b"", b"example.com", b'""@example.com'), ()),
    # Source routes: accepted, ignored (RFC 5321 Appendix C), kept in raw.
    (
        b" TO:<@a.example,@b.example:u@d.example>",
        Address(b"u", b"d.example", b"@a.example,@b.example:u@d.example"),
        (),
    ),
    (b" TO:<@a.example:u@d.example>", Address(b"u", b"d.example", b"@a.example:u@d.example"), ()),
    # RFC 5321 §4.5.1: <postmaster> without a domain, any case, kept as sent.
    (b" TO:<postmaster>", Address(b"postmaster", b"", b"postmaster"), ()),
    (b" TO:<PostMaster>", Address(b"PostMaster", b"", b"PostMaster"), ()),
    (
        b" TO:<Postmaster@example.com>",
        Address(b"Postmaster", b"example.com", b"Postmaster@example.com"),
        (),
    ),
    (
        b" TO:<postmaster> NOTIFY=NEVER",
        Address(b"postmaster", b"", b"postmaster"),
        ((b"NOTIFY", b"NEVER"),),
    ),
    # Address literals (RFC 5321 §4.1.3).
    (b" TO:<u@[192.0.2.1]>", Address(b"u", b"[192.0.2.1]", b"u@[192.0.2.1]"), ()),
    (b" TO:<u@[0.0.0.0]>", Address(b"u", b"[0.0.0.0]", b"u@[0.0.0.0]"), ()),
    (b" TO:<u@[255.255.255.255]>", Address(b"u", b"[255.255.255.255]", b"u@[255.255.255.255]"), ()),
    (
        b" TO:<u@[IPv6:2001:db8::1]>",
        Address(b"u", b"[IPv6:2001:db8::1]", b"u@[IPv6:2001:db8::1]"),
        (),
    ),
    (b" TO:<u@[ipv6:::1]>", Address(b"u", b"[ipv6:::1]", b"u@[ipv6:::1]"), ()),
    (
        b" TO:<u@[IPv6:::ffff:192.0.2.1]>",
        Address(b"u", b"[IPv6:::ffff:192.0.2.1]", b"u@[IPv6:::ffff:192.0.2.1]"),
        (),
    ),
    (b" TO:<u@[x-tag:any/thing]>", Address(b"u", b"[x-tag:any/thing]", b"u@[x-tag:any/thing]"), ()),
    # RFC 6531: UTF-8 in local parts (atext and qtext) and in labels.
    (
        " TO:<用户@例子.广告>".encode(),
        Address("用户".encode(), "例子.广告".encode(), "用户@例子.广告".encode(), True),
        (),
    ),
    (
        " TO:<u@bücher.example>".encode(),
        Address(b"u", "bücher.example".encode(), "u@bücher.example".encode(), True),
        (),
    ),
    (
        ' TO:<"jörg müller"@example.com>'.encode(),
        Address("jörg müller".encode(), b"example.com", '"jörg müller"@example.com'.encode(), True),
        (),
    ),
    # Limits, at the limit.
    (b" TO:<" + LOCAL_64 + b"@d>", Address(LOCAL_64, b"d", LOCAL_64 + b"@d"), ()),
    (b" TO:<u@" + LABEL_63 + b">", Address(b"u", LABEL_63, b"u@" + LABEL_63), ()),
    # Path of exactly 256 octets with its brackets (RFC 5321 §4.5.3.1.3).
    (
        b" TO:<u@" + _domain(252) + b">",
        Address(b"u", _domain(252), b"u@" + _domain(252)),
        (),
    ),
    # Parameters.
    (
        b" TO:<u@d> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;u@d",
        Address(b"u", b"d", b"u@d"),
        ((b"NOTIFY", b"SUCCESS,FAILURE"), (b"ORCPT", b"rfc822;u@d")),
    ),
    (b" TO:<u@d>   x-y   z ", Address(b"u", b"d", b"u@d"), ((b"X-Y", None), (b"Z", None))),
    (b" TO:<u@d> ", Address(b"u", b"d", b"u@d"), ()),
    (b" TO:<u@d> A=<>", Address(b"u", b"d", b"u@d"), ((b"A", b"<>"),)),
]


@pytest.mark.parametrize("arg, address, params", RCPT_VALID)
def test_rcpt_valid(arg: bytes, address: Address, params: object) -> None:
    got, got_params = parse_rcpt_argument(arg)
    assert got == address
    assert got.utf8 == address.utf8
    assert got_params == params
    for part in (got.local, got.domain, got.raw):
        assert type(part) is bytes


# ---------------------------------------------------------------- valid MAIL

MAIL_VALID: list[tuple[bytes, Address | None, tuple[tuple[bytes, bytes | None], ...]]] = [
    (b" FROM:<a@b.example>", Address(b"a", b"b.example", b"a@b.example"), ()),
    (b" from:<a@b.example>", Address(b"a", b"b.example", b"a@b.example"), ()),
    (b" FROM: <a@b.example>", Address(b"a", b"b.example", b"a@b.example"), ()),
    (b" FROM:<>", None, ()),
    (b" FROM: <>", None, ()),
    (b" FROM:<> SIZE=10", None, ((b"SIZE", b"10"),)),
    (
        b" FROM:<a@b.example> size=10 body=8BITMIME smtputf8",
        Address(b"a", b"b.example", b"a@b.example"),
        ((b"SIZE", b"10"), (b"BODY", b"8BITMIME"), (b"SMTPUTF8", None)),
    ),
    (
        b' FROM:<"x y"@b.example> RET=HDRS ENVID=QQ314159',
        Address(b"x y", b"b.example", b'"x y"@b.example'),
        ((b"RET", b"HDRS"), (b"ENVID", b"QQ314159")),
    ),
    (
        " FROM:<ü@b.example> SMTPUTF8 X=wert€".encode(),
        Address("ü".encode(), b"b.example", "ü@b.example".encode(), True),
        ((b"SMTPUTF8", None), (b"X", "wert€".encode())),
    ),
    (b" FROM:<@r.example:a@b.example>", Address(b"a", b"b.example", b"@r.example:a@b.example"), ()),
    (b" FROM:<a@[192.0.2.1]>", Address(b"a", b"[192.0.2.1]", b"a@[192.0.2.1]"), ()),
]


@pytest.mark.parametrize("arg, address, params", MAIL_VALID)
def test_mail_valid(arg: bytes, address: Address | None, params: object) -> None:
    got, got_params = parse_mail_argument(arg)
    assert got == address
    if address is not None:
        assert got is not None and got.utf8 == address.utf8
    assert got_params == params


# ------------------------------------------------------------------ invalid

SYNTAX = (501, "5.5.4", "Syntax: {verb}")
PARAMS = (501, "5.5.4", "Syntax error in parameters")
BAD = (553, None, None)  # enhanced code and text depend on the verb

# (argument after the verb, with "{K}" for FROM/TO, expected class)
INVALID: list[tuple[bytes, tuple[int, str | None, str | None]]] = [
    # Malformed command: 501 5.5.4.
    (b"", SYNTAX),
    (b" ", SYNTAX),
    (b"{K}<a@b>", SYNTAX),  # no SP after the verb
    (b"  {K}<a@b>", SYNTAX),  # two
    (b"\t{K}<a@b>", SYNTAX),
    (b" {K}a@b.example", SYNTAX),  # no brackets
    (b" {K}<a@b.example", SYNTAX),
    (b" {K}a@b.example>", SYNTAX),
    (b" {K}\t<a@b.example>", SYNTAX),  # only SP is tolerated after the colon
    (b" {K}\x00<a@b.example>", SYNTAX),
    (b" {Kx} :<a@b.example>", SYNTAX),  # SP before the colon
    (b" XX:<a@b.example>", SYNTAX),
    (b" {K}<a@b.example>junk", SYNTAX),
    (b" {K}<a@b.example>>", SYNTAX),
    (b" {K}<a@b.example>\tSIZE=1", SYNTAX),
    (b" {K}<a@b.example>\r\n", SYNTAX),
    (b" {K}<<a@b.example>>", BAD),
    # Bad parameters: 501 5.5.4 "Syntax error in parameters".
    (b" {K}<a@b.example> SIZE=", PARAMS),  # empty esmtp-value
    (b" {K}<a@b.example> SIZE=1 size=2", PARAMS),  # duplicate, case-insensitively
    (b" {K}<a@b.example> X Y X", PARAMS),
    (b" {K}<a@b.example> =1", PARAMS),
    (b" {K}<a@b.example> -X=1", PARAMS),  # keyword starts with ALPHA / DIGIT
    (b" {K}<a@b.example> X_Y=1", PARAMS),
    (b" {K}<a@b.example> X=a=b", PARAMS),  # "=" is not esmtp-value
    (b" {K}<a@b.example> X=\x01", PARAMS),
    (b" {K}<a@b.example> X=a\x7f", PARAMS),
    (b" {K}<a@b.example> X=\xff", PARAMS),  # not UTF-8
    (b" {K}<a@b.example> X=\xc3", PARAMS),
    (b" {K}<a@b.example> SIZE=1\r\n", PARAMS),
    (b" {K}<a@b.example> SIZE=1\x00", PARAMS),
    (b" {K}<a@b.example> SIZE=1\tBODY=7BIT", PARAMS),
    # A bad address in its brackets: 553.
    (b" {K}<a b@c.example>", BAD),
    (b" {K}<;sleep 66;>", BAD),  # OpenSMTPD CVE-2020-7247: ";" and SP are not atext
    (b" {K}<;sleep 66;@c.example>", BAD),
    (b" {K}<a>", BAD),
    (b" {K}<@c.example>", BAD),
    (b" {K}<a@>", BAD),
    (b" {K}<a@b@c.example>", BAD),
    (b" {K}<.a@c.example>", BAD),
    (b" {K}<a.@c.example>", BAD),
    (b" {K}<a..b@c.example>", BAD),
    (b" {K}<a@-c.example>", BAD),
    (b" {K}<a@c-.example>", BAD),
    (b" {K}<a@c..example>", BAD),
    (b" {K}<a@.c.example>", BAD),
    (b" {K}<a@c.example.>", BAD),
    (b" {K}<a@c_d.example>", BAD),
    (b" {K}<a@" + b"d" * 64 + b">", BAD),  # label of 64
    (b" {K}<" + b"a" * 65 + b"@c.example>", BAD),  # local part of 65
    (b' {K}<"' + b"a" * 63 + b'"@c.example>', BAD),  # 65 as sent
    (b" {K}<a@" + _domain(256) + b">", BAD),  # domain of 256
    (b" {K}<u@" + _domain(253) + b">", BAD),  # path of 257 with its brackets
    (b" {K}<@" + _domain(200) + b":u@" + _domain(60) + b">", BAD),  # route counts
    (b' {K}<"a@c.example>', BAD),
    (b' {K}<a"b@c.example>', BAD),
    (b' {K}<"a\\"@c.example>', BAD),
    (b" {K}<a\\b@c.example>", BAD),  # backslash outside quotes
    (b" {K}<@a.example,u@c.example>", BAD),
    (b" {K}<@a.example:@b.example:u@c.example>", BAD),
    (b" {K}<a@[256.1.1.1]>", BAD),
    (b" {K}<a@[1.2.3]>", BAD),
    (b" {K}<a@[IPv6:zz::1]>", BAD),
    (b" {K}<a@[IPv6:1::2::3]>", BAD),
    (b" {K}<a@[IPv6:fe80::1%eth0]>", BAD),
    (b" {K}<a@[x:a\\b]>", BAD),
    (b" {K}<a@[]>", BAD),
    (b" {K}<a@[192.0.2.1>", BAD),
    # Control characters in the path, bare or quoted, escaped or not.
    (b" {K}<a\r@c.example>", BAD),
    (b" {K}<a\n@c.example>", BAD),
    (b" {K}<a\r\n@c.example>", BAD),
    (b" {K}<a\x00@c.example>", BAD),
    (b" {K}<a\t@c.example>", BAD),
    (b" {K}<a\x1b@c.example>", BAD),
    (b" {K}<a\x7f@c.example>", BAD),
    (b" {K}<a@c\r.example>", BAD),
    (b" {K}<a@c.example\x00>", BAD),
    (b' {K}<"a\r"@c.example>', BAD),
    (b' {K}<"a\n"@c.example>', BAD),
    (b' {K}<"\x00"@c.example>', BAD),
    (b' {K}<"a\t"@c.example>', BAD),
    (b' {K}<"a\x7f"@c.example>', BAD),
    (b' {K}<"a\\\r"@c.example>', BAD),  # a quoted pair of a control character
    (b' {K}<"a\\\n"@c.example>', BAD),
    (b' {K}<"a\\\x00"@c.example>', BAD),
    (b' {K}<"a\\\x7f"@c.example>', BAD),
    # Non-ASCII that is not UTF-8 (RFC 6531 admits UTF8-non-ascii only).
    (b" {K}<\xff@c.example>", BAD),
    (b" {K}<a@c\xc3.example>", BAD),
    (b" {K}<\xc0\xaf@c.example>", BAD),  # overlong "/"
    (b" {K}<\xed\xa0\x80@c.example>", BAD),  # UTF-16 surrogate
    (b' {K}<"\xe2\x82"@c.example>', BAD),
    (b' {K}<"a\\\xc3\xbc"@c.example>', BAD),  # quoted-pairSMTP is ASCII only
    # Exim CVE-2019-10149, as the exploit writes it (backslash escapes) and
    # as Exim expands them (TAB, "/" and '"'): not atext either way.
    (b" {K}<${run{\\x2fbin\\x2fsh\\t-c\\t\\x22id\\x22}}@localhost>", BAD),
    (b' {K}<${run{/bin/sh\t-c\t"id"}}@localhost>', BAD),
]


def _expand(template: bytes, keyword: bytes) -> bytes:
    return template.replace(b"{Kx}", keyword[:-1]).replace(b"{K}", keyword)


@pytest.mark.parametrize("template, expected", INVALID)
def test_mail_invalid(template: bytes, expected: tuple[int, str | None, str | None]) -> None:
    arg = _expand(template, b"FROM:")
    with pytest.raises(LocalProtocolError) as info:
        parse_mail_argument(arg)
    reply = info.value.reply
    if expected is BAD:
        assert (reply.code, reply.enhanced, reply.text) == (
            553,
            "5.1.7",
            "Bad sender address syntax",
        )
    else:
        assert (reply.code, reply.enhanced, reply.text) == (
            expected[0],
            expected[1],
            expected[2].format(verb="MAIL FROM:<address>"),  # type: ignore[union-attr]
        )


@pytest.mark.parametrize("template, expected", INVALID)
def test_rcpt_invalid(template: bytes, expected: tuple[int, str | None, str | None]) -> None:
    arg = _expand(template, b"TO:")
    with pytest.raises(LocalProtocolError) as info:
        parse_rcpt_argument(arg)
    reply = info.value.reply
    if expected is BAD:
        assert (reply.code, reply.enhanced, reply.text) == (
            553,
            "5.1.3",
            "Bad recipient address syntax",
        )
    else:
        assert (reply.code, reply.enhanced, reply.text) == (
            expected[0],
            expected[1],
            expected[2].format(verb="RCPT TO:<address>"),  # type: ignore[union-attr]
        )


@pytest.mark.parametrize(
    "arg",
    [
        b" FROM:<postmaster>",  # the bare postmaster is a recipient only
        b" FROM:<@a.example:>",
        b" TO:<a@b>",  # wrong keyword for MAIL
    ],
)
def test_mail_only_invalid(arg: bytes) -> None:
    with pytest.raises(LocalProtocolError):
        parse_mail_argument(arg)


@pytest.mark.parametrize(
    "arg, code",
    [
        (b" TO:<>", 553),  # no null forward-path
        (b" TO:<postmaster.x>", 553),
        (b" TO:<@a.example:postmaster>", 553),
        (b' TO:<"postmaster">', 553),
        (b" FROM:<a@b>", 501),
    ],
)
def test_rcpt_only_invalid(arg: bytes, code: int) -> None:
    with pytest.raises(LocalProtocolError) as info:
        parse_rcpt_argument(arg)
    assert info.value.reply.code == code


@pytest.mark.parametrize(
    "arg, message",
    [
        (b" TO:<" + b"a" * 65 + b"@c.example>", "local part longer than 64 octets"),
        (b" TO:<a@" + _domain(256) + b">", "domain longer than 255 octets"),
        (b" TO:<u@" + _domain(253) + b">", "path longer than 256 octets"),
        (b" TO:<\xff@c.example>", "path is not valid UTF-8"),
        (b" TO:<a@[IPv6:1::2::3]>", "invalid IPv6 address literal"),
    ],
)
def test_limit_messages(arg: bytes, message: str) -> None:
    with pytest.raises(LocalProtocolError, match=message):
        parse_rcpt_argument(arg)


def test_utf8_flag_is_the_callers_to_check() -> None:
    # The grammar accepts UTF-8 whatever the transaction; the session refuses
    # it without SMTPUTF8 by looking at this flag (RFC 6531 §3.2).
    address, _ = parse_rcpt_argument(" TO:<u@bücher.example>".encode())
    assert address.utf8
    address, _ = parse_rcpt_argument(b" TO:<u@buecher.example>")
    assert not address.utf8
    address, _ = parse_rcpt_argument(" TO:<@bücher.example:u@b.example>".encode())
    assert address.utf8  # a UTF-8 route needs SMTPUTF8 as well


def test_parse_mailbox() -> None:
    assert parse_mailbox(b"u@d.example") == Address(b"u", b"d.example", b"u@d.example")
    assert parse_mailbox(b'"a b"@d') == Address(b"a b", b"d", b'"a b"@d')
    for bad in (b"<u@d>", b"u", b"@a:u@d", b"u@d ", b"a" * 65 + b"@d", b"\xff@d"):
        with pytest.raises(ValueError):
            parse_mailbox(bad)


def test_is_dot_string() -> None:
    assert is_dot_string(b"a.b+c")
    assert not is_dot_string(b"a b")
    assert not is_dot_string(b".a")
    assert not is_dot_string(b"")


# ---------------------------------------------------------------- properties

_interesting = st.sampled_from(
    [b"<", b">", b"@", b"\"", b"\\", b".", b":", b",", b" ", b"=", b"[", b"]", b"\r", b"\n",
     b"\x00", b"\t", b"\x7f", b"\xc3", b"\xbc", b"\xff", b"a", b"Z", b"0", b"-", b"IPv6:",
     b"postmaster", b"SIZE=1", b"FROM:", b"TO:"]
)  # fmt: skip
_fragments = st.lists(st.one_of(_interesting, st.binary(max_size=4)), max_size=40).map(b"".join)


def _check_only_protocol_errors(parse: object, arg: bytes) -> None:
    try:
        address, params = parse(arg)  # type: ignore[operator]
    except LocalProtocolError as exc:
        assert exc.reply.code in (501, 553)
        return
    if address is not None:
        assert address.raw in arg
        assert len(address.raw) <= 254
        assert not any(c < 0x20 or c == 0x7F for c in address.raw)
        if address.domain:
            assert len(address.local) <= 64
            address.raw.decode("utf-8")
    keywords = [k for k, _ in params]
    assert len(keywords) == len(set(keywords))
    assert all(k == k.upper() for k in keywords)


@settings(max_examples=500)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_only_raise_protocol_errors(arg: bytes) -> None:
    _check_only_protocol_errors(parse_mail_argument, arg)
    _check_only_protocol_errors(parse_rcpt_argument, arg)


@settings(max_examples=1000)
@given(_fragments)
def test_near_miss_arguments_only_raise_protocol_errors(tail: bytes) -> None:
    _check_only_protocol_errors(parse_mail_argument, b" FROM:<" + tail)
    _check_only_protocol_errors(parse_rcpt_argument, b" TO:<" + tail)
    _check_only_protocol_errors(parse_rcpt_argument, b" TO:<a@b.c>" + tail)


_atom = st.text(st.sampled_from("abcXYZ019!#$%&'*+-/=?^_`{|}~"), min_size=1, max_size=8)
_label = st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?\Z")


@given(st.lists(_atom, min_size=1, max_size=4), st.lists(_label, min_size=1, max_size=4))
def test_dot_atom_addresses_round_trip(atoms: list[str], labels: list[str]) -> None:
    local, domain = ".".join(atoms).encode(), ".".join(labels).encode()
    address, params = parse_rcpt_argument(b" TO:<" + local + b"@" + domain + b">")
    assert address == Address(local, domain, local + b"@" + domain)
    assert params == ()


@given(st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30))
def test_quoted_local_parts_round_trip(text: str) -> None:
    local = text.encode()
    quoted = b'"' + local.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    address, _ = parse_rcpt_argument(b" TO:<" + quoted + b"@d.example>")
    assert address.local == local
    assert address.raw == quoted + b"@d.example"
