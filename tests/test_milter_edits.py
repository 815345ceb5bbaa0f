"""milter/edits.py: a milter's changes applied to header fields, envelope and body (sans-IO)."""

from __future__ import annotations

from fastsmtp.milter.edits import address_of, apply, field_of
from fastsmtp.milter.protocol import Modification as M

FIELDS = [
    (b"Received", b"Received: from a\r\n\tby b\r\n"),
    (b"From", b"From: a@example.net\r\n"),
    (b"X-Tag", b"X-Tag: one\r\n"),
    (b"Subject", b"Subject: hi\r\n"),
    (b"x-tag", b"x-tag: two\r\n"),
]


def section(*changes: M) -> bytes:
    return apply(FIELDS, changes).header_section()


def test_add_appends_and_insert_goes_where_asked() -> None:
    assert section(M("h", "X-Spam", b"yes")).endswith(b"x-tag: two\r\nX-Spam: yes\r\n")
    assert section(M("i", "X-Top", b"1", 0)).startswith(b"X-Top: 1\r\nReceived:")
    assert section(M("i", "X-Third", b"3", 2)).split(b"\r\n")[3] == b"X-Third: 3"
    assert section(M("i", "X-Last", b"9", 99)).endswith(b"X-Last: 9\r\n")


def test_change_counts_fields_of_that_name_from_one_and_empty_deletes() -> None:
    assert b"\r\nX-TAG: changed\r\n" in section(M("m", "X-TAG", b"changed", 2))  # named as the milter names it
    assert b"X-Tag: one\r\n" in section(M("m", "X-TAG", b"changed", 2))
    deleted = section(M("m", "x-tag", b"", 1))
    assert b"X-Tag: one" not in deleted and b"x-tag: two" in deleted
    assert section(M("m", "X-New", b"v", 3)).endswith(b"X-New: v\r\n")  # past the last: added
    assert section(M("m", "X-New", b"", 3)) == b"".join(raw for _, raw in FIELDS)  # nothing to delete


def test_a_milter_cannot_end_the_header_section_or_smuggle_a_field() -> None:
    name, raw = field_of("X-Evil", b"a\n\nBcc: victim@example.com\r\nX: y\n\tfolded")
    assert raw == b"X-Evil: a\r\n\tBcc: victim@example.com\r\n\tX: y\r\n\tfolded\r\n"
    assert name == b"X-Evil"
    # OpenDKIM folds with LF and TAB: kept as a folded field.
    assert field_of("DKIM-Signature", b"v=1; a=rsa-sha256;\n\tb=abc")[1] == (
        b"DKIM-Signature: v=1; a=rsa-sha256;\r\n\tb=abc\r\n")


def test_envelope_and_body_changes() -> None:
    edited = apply(FIELDS, [
        M("e", "<new@example.net>", args="SIZE=10"), M("+", "<bob@example.com>"),
        M("2", "<carol@example.org>", args="NOTIFY=NEVER"), M("-", "<Alice@Example.com>"),
        M("b", value=b"new "), M("b", value=b"body\r\n"), M("q", "looks bad"),
    ])
    assert edited.sender == ("new@example.net", "SIZE=10")
    assert edited.added == [("bob@example.com", ""), ("carol@example.org", "NOTIFY=NEVER")]
    assert edited.removed == ["alice@example.com"]
    assert edited.body == [b"new ", b"body\r\n"]
    assert edited.quarantine == "looks bad"
    assert not edited.header_changed
    assert address_of(" <a@b> ") == "a@b" and address_of("a@b") == "a@b"


class _Spool:
    """What the stage reads the message from (MessageSpool.read), over bytes."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def read(self, offset: int, size: int) -> bytes:
        return self.data[offset:offset + size]


def test_the_fields_read_back_lose_nothing_of_the_header_section() -> None:
    from fastsmtp.milter.stage import _fields

    head = (b"Return-Path: <s@example.net>\r\nReceived: from x\r\n\tby y\r\nFrom: a@example.net\r\n"
            b"this line is no field\r\nReturn-Path: <the client's own>\r\nSubject: s\r\n")
    fields, body_at = _fields(_Spool(head + b"\r\nbody\r\n"))  # type: ignore[arg-type]
    # Only our Return-Path (the first line) is left out; the stray line is kept, nameless.
    assert b"".join(raw for _, raw in fields) == head[len(b"Return-Path: <s@example.net>\r\n"):]
    assert [name for name, _ in fields] == [b"Received", b"From", b"", b"Return-Path", b"Subject"]
    assert body_at == len(head) + 2
    # A change never touches the nameless line, and the section is rebuilt around it.
    edited = apply(fields, [M("m", "Subject", b"t", 1)])
    assert edited.header_section().endswith(b"this line is no field\r\nReturn-Path: <the client's own>\r\nSubject: t\r\n")
    assert _fields(_Spool(b"Return-Path: <>\r\nno end of header"))[1] == -1  # type: ignore[arg-type]
