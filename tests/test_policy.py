"""Folder-based recipients and mailbox administration (DESIGN.md "Mailbox layout")."""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from fastsmtp import policy
from fastsmtp._abnf import parse_rcpt_argument
from fastsmtp.events import Address, Reply
from fastsmtp.policy import (
    FolderRecipients,
    add_mailbox,
    create_maildir,
    ensure_mail_root,
    list_mailboxes,
    safe_local_part,
)


def make_maildir(root: Path, domain: str, user: str) -> str:
    """A Maildir built by hand, independently of create_maildir."""
    path = root / domain / user
    for sub in ("tmp", "new", "cur"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    return str(path)


def addr(text: str | bytes) -> Address:
    """The Address the session would hand over for ``<text>``."""
    raw = text.encode() if isinstance(text, str) else text
    address, _ = parse_rcpt_argument(b" TO:<" + raw + b">")
    return address


def code(result: str | Reply) -> tuple[int, str]:
    assert isinstance(result, Reply), result
    return result.code, result.enhanced


@pytest.fixture
def root(tmp_path: Path) -> Path:
    mail_root = tmp_path / "mail"
    mail_root.mkdir()
    make_maildir(mail_root, "example.com", "alice")
    return mail_root


#: Every file system call the policy could make: os functions, then os.path ones.
FS_CALLS = (
    (os, ("stat", "lstat", "scandir", "listdir", "open", "access", "mkdir", "makedirs")),
    (os.path, ("exists", "lexists", "isdir", "isfile", "islink", "realpath")),
)


@contextmanager
def patched_fs(wrap: Callable[[str, Callable[..., Any]], Callable[..., Any]]) -> Iterator[None]:
    """Replace every FS_CALLS function by ``wrap(name, real)`` for the ``with`` block only.

    Not a fixture that patches for the whole test: pytest itself stats
    files to report a failure, and would then crash instead of reporting.
    """
    saved = [(module, name, getattr(module, name)) for module, names in FS_CALLS for name in names]
    try:
        for module, name, real in saved:
            setattr(module, name, wrap(name, real))
        yield
    finally:
        for module, name, real in saved:
            setattr(module, name, real)


@contextmanager
def no_fs() -> Iterator[None]:
    """Fail on any file system call the policy could make inside the block."""

    def wrap(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def forbidden(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError(f"file system call {name}{args!r}")

        return forbidden

    with patched_fs(wrap):
        yield


@contextmanager
def counting_fs() -> Iterator[list[tuple[str, str]]]:
    """Record (function, first argument) of every file system call inside the block."""
    calls: list[tuple[str, str]] = []

    def wrap(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            calls.append((name, os.fspath(args[0]) if args else ""))
            return real(*args, **kwargs)

        return counted

    with patched_fs(wrap):
        yield calls


@contextmanager
def failing_lstat(err: int) -> Iterator[None]:
    """os.lstat raises ``err`` inside the block."""

    def failing(path: Any, *args: Any, **kwargs: Any) -> Any:
        raise OSError(err, os.strerror(err), path)

    real = os.lstat
    os.lstat = failing
    try:
        yield
    finally:
        os.lstat = real


# ------------------------------------------------------------------ resolve


def test_exact_lower_and_tag(root: Path) -> None:
    alice = str(root / "example.com" / "alice")
    bob_upper = make_maildir(root, "example.com", "Bob")
    bob_lower = make_maildir(root, "example.com", "bob")
    tagged = make_maildir(root, "example.com", "carol+list")
    make_maildir(root, "example.com", "carol")
    r = FolderRecipients(str(root))
    assert r.resolve(addr("alice@example.com")) == alice
    assert r.resolve(addr("ALICE@example.com")) == alice
    assert r.resolve(addr("alice+news@example.com")) == alice
    assert r.resolve(addr("Alice+News@example.com")) == alice
    assert r.resolve(addr("alice+a+b@example.com")) == alice  # the first delimiter
    assert r.resolve(addr("alice+@example.com")) == alice
    assert r.resolve(addr('"alice"@example.com')) == alice
    # Exact match first, then lower case.
    assert r.resolve(addr("Bob@example.com")) == bob_upper
    assert r.resolve(addr("bob@example.com")) == bob_lower
    assert r.resolve(addr("BOB@example.com")) == bob_lower
    # The full local part wins over the part before the delimiter.
    assert r.resolve(addr("carol+list@example.com")) == tagged
    assert r.resolve(addr("CAROL+LIST@example.com")) == tagged
    assert code(r.resolve(addr("+alice@example.com"))) == (550, "5.1.1")
    assert code(r.resolve(addr("mallory@example.com"))) == (550, "5.1.1")


def test_delimiter_is_configurable(root: Path) -> None:
    alice = str(root / "example.com" / "alice")
    assert FolderRecipients(root, delimiter="-").resolve(addr("alice-x@example.com")) == alice
    no_tags = FolderRecipients(root, delimiter="")
    assert code(no_tags.resolve(addr("alice+x@example.com"))) == (550, "5.1.1")
    assert no_tags.resolve(addr("alice@example.com")) == alice


def test_reply_texts(root: Path) -> None:
    r = FolderRecipients(root)
    unknown = r.resolve(addr("bob@example.com"))
    assert unknown == Reply(
        550, "5.1.1", "<bob@example.com>: Recipient address rejected: User unknown"
    )
    relay = r.resolve(addr("bob@example.net"))
    assert relay == Reply(550, "5.7.1", "<bob@example.net>: Relay access denied")


def test_case_insensitive_domains(root: Path) -> None:
    mixed = make_maildir(root, "Example.ORG", "u")
    lower = make_maildir(root, "example.net", "u")
    r = FolderRecipients(root)
    assert r.resolve(addr("u@example.org")) == mixed
    assert r.resolve(addr("u@EXAMPLE.org")) == mixed
    assert r.resolve(addr("u@Example.ORG")) == mixed
    assert r.resolve(addr("u@EXAMPLE.NET")) == lower
    assert r.resolve(addr("u@Example.Net")) == lower


def test_two_spellings_of_one_domain_pick_the_same_folder(root: Path) -> None:
    make_maildir(root, "Example.ORG", "u")
    upper = make_maildir(root, "EXAMPLE.org", "u")
    # Without the lower-case folder, the smallest spelling, whatever readdir's order.
    assert FolderRecipients(root).resolve(addr("u@example.org")) == upper


def test_utf8_mailboxes(root: Path) -> None:
    path = make_maildir(root, "bücher.example", "jörg")
    r = FolderRecipients(root)
    assert r.resolve(addr("jörg@bücher.example")) == path
    assert r.resolve(addr("JÖRG@BÜCHER.EXAMPLE")) == path
    mixed = make_maildir(root, "Straße.Example", "ü")
    assert r.resolve(addr("Ü@straße.example")) == mixed


def test_domain_created_after_a_miss_is_seen_at_once(root: Path) -> None:
    r = FolderRecipients(root)
    for domain in ("New.Example", "new2.example", "NEW3.example"):
        name = domain.lower()
        assert code(r.resolve(addr(f"u@{name}"))) == (550, "5.7.1")
        path = make_maildir(root, domain, "u")
        assert r.resolve(addr(f"u@{name}")) == path


def test_domain_created_within_one_mtime_tick_is_seen(root: Path) -> None:
    # Coarse mtime: a second change inside the same tick leaves the mtime as
    # it was; while it is recent, a miss rebuilds the map anyway.
    r = FolderRecipients(root)
    make_maildir(root, "First.Example", "u")
    assert isinstance(r.resolve(addr("u@first.example")), str)
    same = os.stat(root).st_mtime_ns
    path = make_maildir(root, "Second.Example", "u")
    os.utime(root, ns=(same, same))
    assert r.resolve(addr("u@second.example")) == path


def test_old_unchanged_mtime_does_not_rescan(root: Path) -> None:
    # Misses (mostly relay attempts) cost one stat of MAIL_ROOT, not a listing.
    old = time.time_ns() - 60 * 10**9
    os.utime(root, ns=(old, old))
    r = FolderRecipients(root)
    assert code(r.resolve(addr("u@elsewhere.example"))) == (550, "5.7.1")  # builds the map
    with counting_fs() as calls:
        for _ in range(3):
            assert code(r.resolve(addr("u@elsewhere.example"))) == (550, "5.7.1")
    assert [name for name, _ in calls if name == "scandir"] == []
    (root / "Elsewhere.Example").mkdir()  # changes the mtime
    with counting_fs() as calls:
        assert code(r.resolve(addr("u@elsewhere.example"))) == (550, "5.1.1")
    assert [name for name, _ in calls if name == "scandir"] == ["scandir"]


def test_renamed_domain_spelling_is_followed(root: Path) -> None:
    make_maildir(root, "Old.Example", "u")
    r = FolderRecipients(root)
    assert isinstance(r.resolve(addr("u@old.example")), str)
    os.rename(root / "Old.Example", root / "OLD.Example")
    assert r.resolve(addr("u@old.example")) == str(root / "OLD.Example" / "u")


def test_mailbox_created_after_start_resolves_at_once(root: Path) -> None:
    r = FolderRecipients(root)
    assert code(r.resolve(addr("bob@example.com"))) == (550, "5.1.1")
    create_maildir(root / "example.com" / "bob")
    assert r.resolve(addr("bob@example.com")) == str(root / "example.com" / "bob")
    # And removed: gone at once too (no positive cache either).
    for sub in ("tmp", "new", "cur"):
        (root / "example.com" / "bob" / sub).rmdir()
    assert code(r.resolve(addr("bob@example.com"))) == (550, "5.1.1")


# ------------------------------------------ the cost of a lookup, and its cache
#
# A lookup costs one lstat once the mailbox and MAIL_ROOT are settled (their
# times older than MTIME_SLACK_NS).  These tests make every folder settled at
# once (slack 0), so that the cache is used; a change the tests make after a
# lookup is then followed by a utime() to a distinct time, as the next clock
# tick would give it on a real file system.


@pytest.fixture
def settled(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every folder counts as settled: its times are trusted at once."""
    monkeypatch.setattr(policy, "MTIME_SLACK_NS", 0)


_tick = [10**18]


def touch(path: Path) -> None:
    """Give ``path`` a new, distinct mtime: the next tick of a coarse clock."""
    _tick[0] += 10**9
    os.utime(path, ns=(_tick[0], _tick[0]))


def test_one_lstat_per_rcpt_once_settled(root: Path, settled: None) -> None:
    alice = str(root / "example.com" / "alice")
    mixed = make_maildir(root, "Example.ORG", "u")
    r = FolderRecipients(root)
    assert r.resolve(addr("alice@example.com")) == alice  # learns
    assert r.resolve(addr("u@example.org")) == mixed
    with counting_fs() as calls:
        for _ in range(3):
            assert r.resolve(addr("alice@example.com")) == alice
            assert r.resolve(addr("alice@Example.Com")) == alice
            assert r.resolve(addr("u@EXAMPLE.org")) == mixed
    assert calls == [("lstat", alice), ("lstat", alice), ("lstat", mixed)] * 3
    # Upper case or a tag costs one more each: the local part as sent is
    # looked for first (exact match, then lower case, then before the tag).
    with counting_fs() as calls:
        assert r.resolve(addr("ALICE@example.com")) == alice
        assert r.resolve(addr("alice+news@example.com")) == alice
    upper = alice[: -len("alice")] + "ALICE"
    assert calls == [("lstat", upper), ("lstat", alice), ("lstat", alice + "+news"), ("lstat", alice)]


def test_unsettled_mailbox_is_checked_in_full_every_time(root: Path) -> None:
    # A fresh folder's times could still hide a change made in the same tick.
    alice = str(root / "example.com" / "alice")
    r = FolderRecipients(root)
    assert r.resolve(addr("alice@example.com")) == alice
    with counting_fs() as calls:
        assert r.resolve(addr("alice@example.com")) == alice
    looked = [path for name, path in calls if name == "lstat"]
    assert looked[-4:] == [alice] + [os.path.join(alice, sub) for sub in ("tmp", "new", "cur")]
    assert ("stat", str(root)) in calls  # MAIL_ROOT is fresh too: looked at every time


def test_root_is_looked_at_once_per_recheck_interval(
    root: Path, settled: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = FolderRecipients(root)
    assert isinstance(r.resolve(addr("alice@example.com")), str)
    clock = [time.monotonic_ns()]
    monkeypatch.setattr(policy, "_monotonic_ns", lambda: clock[0])
    with counting_fs() as calls:
        r.resolve(addr("alice@example.com"))
        clock[0] += policy.ROOT_RECHECK_NS + 1
        r.resolve(addr("alice@example.com"))
    assert [c for c in calls if c[0] == "stat"] == [("stat", str(root))]


@pytest.mark.parametrize("missing", ["tmp", "new", "cur"])
def test_remembered_maildir_losing_a_subfolder_is_seen(root: Path, settled: None, missing: str) -> None:
    alice = root / "example.com" / "alice"
    r = FolderRecipients(root)
    assert r.resolve(addr("alice@example.com")) == str(alice)
    (alice / missing).rmdir()
    touch(alice)
    assert code(r.resolve(addr("alice@example.com"))) == (550, "5.1.1")
    (alice / missing).mkdir()
    touch(alice)
    assert r.resolve(addr("alice@example.com")) == str(alice)


def test_remembered_maildir_subfolder_replaced_by_a_link(root: Path, settled: None, tmp_path: Path) -> None:
    alice = root / "example.com" / "alice"
    r = FolderRecipients(root)
    assert r.resolve(addr("alice@example.com")) == str(alice)
    (alice / "new").rmdir()
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", alice / "new")
    touch(alice)
    assert code(r.resolve(addr("alice@example.com"))) == (550, "5.1.1")


def test_remembered_user_removed_or_replaced(root: Path, settled: None, tmp_path: Path) -> None:
    alice = root / "example.com" / "alice"
    r = FolderRecipients(root)
    assert r.resolve(addr("alice@example.com")) == str(alice)
    # Replaced by a link to a real Maildir: not followed.
    os.rename(alice, tmp_path / "moved")
    os.symlink(tmp_path / "moved", alice)
    assert code(r.resolve(addr("alice@example.com"))) == (550, "5.1.1")
    # Removed: gone at once.
    alice.unlink()
    assert code(r.resolve(addr("alice@example.com"))) == (550, "5.1.1")
    # Recreated, not (yet) a Maildir, with the old times: the ctime differs.
    old = os.lstat(tmp_path / "moved")
    alice.mkdir()
    os.utime(alice, ns=(old.st_atime_ns, old.st_mtime_ns))
    assert code(r.resolve(addr("alice@example.com"))) == (550, "5.1.1")
    for sub in ("tmp", "new", "cur"):
        (alice / sub).mkdir()
    assert r.resolve(addr("alice@example.com")) == str(alice)


@pytest.mark.parametrize("field", range(4))
def test_any_other_identity_is_checked_again(root: Path, settled: None, field: int) -> None:
    # Inode numbers are reused at once (ext4, tmpfs), and utime() sets the
    # mtime back: each of device, inode, mtime and ctime alone must tell a
    # recreated or changed folder from the remembered one.
    alice = str(root / "example.com" / "alice")
    r = FolderRecipients(root)
    assert r.resolve(addr("alice@example.com")) == alice
    identity = list(r._maildirs[alice])
    identity[field] -= 1
    r._maildirs[alice] = (identity[0], identity[1], identity[2], identity[3])
    with counting_fs() as calls:
        assert r.resolve(addr("alice@example.com")) == alice
    assert len(calls) == 4  # the folder and its three subfolders


def test_remembered_domain_removed_renamed_or_recreated(root: Path, settled: None, tmp_path: Path) -> None:
    bob = make_maildir(root, "example.com", "bob")
    r = FolderRecipients(root)
    assert r.resolve(addr("bob@example.com")) == bob
    assert isinstance(r.resolve(addr("alice@example.com")), str)
    # Renamed away and recreated, with only alice: bob is gone at once.
    os.rename(root / "example.com", tmp_path / "old.example.com")
    alice = make_maildir(root, "example.com", "alice")
    assert r.resolve(addr("alice@example.com")) == alice
    assert code(r.resolve(addr("bob@example.com"))) == (550, "5.1.1")
    # Removed: not local at once.
    for sub in ("tmp", "new", "cur"):
        (root / "example.com" / "alice" / sub).rmdir()
    (root / "example.com" / "alice").rmdir()
    (root / "example.com").rmdir()
    assert code(r.resolve(addr("alice@example.com"))) == (550, "5.7.1")


def test_remembered_domain_respelled_is_followed_on_a_miss(root: Path, settled: None) -> None:
    make_maildir(root, "Old.Example", "u")
    r = FolderRecipients(root)
    assert isinstance(r.resolve(addr("u@old.example")), str)
    (root / "old.example").mkdir()  # a lower-case spelling appears, with a new user
    v = make_maildir(root, "old.example", "v")
    assert r.resolve(addr("v@old.example")) == v


def test_domain_swapped_for_a_link_is_seen_once_root_is_rechecked(
    root: Path, settled: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The one late case of the module's rules: until MAIL_ROOT is looked at
    # again, the very Maildir that was checked is still reached.
    alice = str(root / "example.com" / "alice")
    r = FolderRecipients(root)
    clock = [time.monotonic_ns()]
    monkeypatch.setattr(policy, "_monotonic_ns", lambda: clock[0])
    assert r.resolve(addr("alice@example.com")) == alice
    os.rename(root / "example.com", tmp_path / "real")
    os.symlink(tmp_path / "real", root / "example.com")
    touch(root)
    assert r.resolve(addr("alice@example.com")) == alice
    clock[0] += policy.ROOT_RECHECK_NS
    assert code(r.resolve(addr("alice@example.com"))) == (550, "5.7.1")


def test_caches_are_bounded(root: Path, settled: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(policy, "MAX_DOMAINS", 3)
    monkeypatch.setattr(policy, "MAX_MAILDIRS", 5)
    r = FolderRecipients(root)
    for d in range(6):
        for u in range(4):
            path = make_maildir(root, f"d{d}.example", f"u{u}")
            assert r.resolve(addr(f"u{u}@d{d}.example")) == path
    assert len(r._local) <= 3 and len(r._maildirs) <= 5
    assert r.resolve(addr("u0@d0.example")) == str(root / "d0.example" / "u0")


def test_a_lookup_opens_no_descriptor(root: Path, settled: None) -> None:
    # Nothing to leak into a forked worker or a hook's child process.
    r = FolderRecipients(root)
    with counting_fs() as calls:
        for _ in range(3):
            r.resolve(addr("alice@example.com"))
            r.resolve(addr("nobody@example.com"))
            r.resolve(addr("u@elsewhere.example"))
    assert [c for c in calls if c[0] in ("open", "scandir")] == [("scandir", str(root))]


@pytest.mark.parametrize("missing", ["tmp", "new", "cur"])
def test_folder_that_is_not_a_maildir_is_unknown(root: Path, missing: str) -> None:
    user = root / "example.com" / "bob"
    for sub in ("tmp", "new", "cur"):
        if sub != missing:
            (user / sub).mkdir(parents=True)
    r = FolderRecipients(root)
    assert code(r.resolve(addr("bob@example.com"))) == (550, "5.1.1")
    (user / missing).write_text("not a folder")
    assert code(r.resolve(addr("bob@example.com"))) == (550, "5.1.1")


def test_plain_file_is_neither_domain_nor_user(root: Path) -> None:
    (root / "file.example").write_text("")
    (root / "File.Example2").write_text("")
    (root / "example.com" / "bob").write_text("")
    r = FolderRecipients(root)
    assert code(r.resolve(addr("u@file.example"))) == (550, "5.7.1")
    assert code(r.resolve(addr("u@file.example2"))) == (550, "5.7.1")
    assert code(r.resolve(addr("bob@example.com"))) == (550, "5.1.1")


ESCAPES = [
    b"..",
    b".",
    b".hidden",
    b"../x",
    b"../../etc/passwd",
    b"a/b",
    b"/etc",
    b"a/../../b",
    b"a\\b",
    b"..\\x",
    b"a..b",
    b"a.",  # safe: only a trailing dot
    b"a\x00b",
    b"a\rb",
    b"a\nb",
    b"a\tb",
    b"a\x1fb",
    b"a\x7fb",
    b"",
]


@pytest.mark.parametrize("local", [e for e in ESCAPES if e != b"a."])
def test_escapes_are_refused_without_touching_the_fs(root: Path, local: bytes) -> None:
    r = FolderRecipients(root)
    with no_fs():
        result = r.resolve(Address(local, b"example.com", local + b"@example.com"))
    assert code(result) == (553, "5.1.3")
    assert isinstance(result, Reply)
    # Whatever the address held, the reply is one line.
    assert result.encoded.count(b"\r\n") == 1
    assert b"\n" not in result.encoded[:-2] and b"\r" not in result.encoded[:-2]


@pytest.mark.parametrize(
    "domain", [b"..", b".", b"../x", b"a/b", b"/etc", b"a\\b", b"a\x00", b".example.com", b"a\nb"]
)
def test_escaping_domains_are_refused_without_touching_the_fs(domain: bytes) -> None:
    r = FolderRecipients("/nonexistent")
    with no_fs():
        result = r.resolve(Address(b"u", domain, b"u@" + domain))
    assert code(result) == (553, "5.1.3")


GRAMMATICAL_ESCAPES = [
    b'"../x"@example.com',
    b'"a/b"@example.com',
    b"a/b@example.com",
    b'"a\\\\b"@example.com',
    b'".."@example.com',
    b'"."@example.com',
    b'""@example.com',
    b'"a..b"@example.com',
    b'".a"@example.com',
    b"${run{/bin/true}}@example.com",
]


@pytest.mark.parametrize("raw", GRAMMATICAL_ESCAPES)
def test_grammatical_escapes_are_refused_by_the_policy(root: Path, raw: bytes) -> None:
    # These pass the grammar ("/" is atext, quoted strings hold nearly
    # anything); keeping them out of the file system is the policy's job.
    address = addr(raw)
    r = FolderRecipients(root)
    with no_fs():
        result = r.resolve(address)
    assert code(result) == (553, "5.1.3")


def test_literals_and_empty_domains_are_not_local() -> None:
    r = FolderRecipients("/nonexistent")
    for raw in (b"u@[192.0.2.1]", b"u@[IPv6:::1]", b"postmaster"):
        address = addr(raw)
        with no_fs():
            result = r.resolve(address)
        assert code(result) == (550, "5.7.1")


def test_exim_style_expansion_is_just_a_name(root: Path) -> None:
    # CVE-2019-10149 relied on Exim expanding ${...} in the local part; here a
    # grammatical local part is only ever a folder name.
    r = FolderRecipients(root)
    assert code(r.resolve(addr("${run{x}}@example.com"))) == (550, "5.1.1")
    path = make_maildir(root, "example.com", "${run{x}}")
    assert r.resolve(addr("${run{x}}@example.com")) == path


def test_safe_local_part() -> None:
    assert safe_local_part(b"alice")
    assert safe_local_part(b"a.b")
    assert safe_local_part(b"a.")
    assert safe_local_part(b"john doe")
    assert safe_local_part("jörg".encode())
    assert safe_local_part(b"${x}")
    for local in ESCAPES:
        if local != b"a.":
            assert not safe_local_part(local), local


def test_postmaster_without_domain(root: Path) -> None:
    make_maildir(root, "localhost", "postmaster")
    assert code(FolderRecipients(root).resolve(addr("PostMaster"))) == (550, "5.7.1")
    r = FolderRecipients(root, postmaster_domain="localhost")
    assert r.resolve(addr("PostMaster")) == str(root / "localhost" / "postmaster")
    assert code(r.resolve(Address(b"post", b"", b"post"))) == (550, "5.7.1")


# ----------------------------------------------------------------- symlinks
#
# Decision: every level under MAIL_ROOT must be a real directory; links are
# not followed.  The Maildir tree is writable by whoever serves it (IMAP
# server, mailbox owner): a planted link must not redirect the server's
# writes outside the tree.


def test_user_symlink_outside_the_root_is_refused(root: Path, tmp_path: Path) -> None:
    outside = make_maildir(tmp_path, "outside", "victim")
    os.symlink(outside, root / "example.com" / "eve")
    r = FolderRecipients(root)
    assert code(r.resolve(addr("eve@example.com"))) == (550, "5.1.1")


def test_user_symlink_inside_the_root_is_refused_too(root: Path) -> None:
    os.symlink("alice", root / "example.com" / "alias")
    assert code(FolderRecipients(root).resolve(addr("alias@example.com"))) == (550, "5.1.1")


@pytest.mark.parametrize("sub", ["tmp", "new", "cur"])
def test_maildir_subfolder_symlink_is_refused(root: Path, tmp_path: Path, sub: str) -> None:
    user = root / "example.com" / "alice"
    (user / sub).rmdir()
    target = tmp_path / "elsewhere"
    target.mkdir()
    os.symlink(target, user / sub)
    assert code(FolderRecipients(root).resolve(addr("alice@example.com"))) == (550, "5.1.1")


def test_domain_symlink_is_not_local(root: Path, tmp_path: Path) -> None:
    make_maildir(tmp_path, "other", "u")
    os.symlink(tmp_path / "other", root / "linked.example")
    os.symlink(tmp_path / "other", root / "Linked.Example2")
    r = FolderRecipients(root)
    assert code(r.resolve(addr("u@linked.example"))) == (550, "5.7.1")
    assert code(r.resolve(addr("u@linked.example2"))) == (550, "5.7.1")


def test_mail_root_itself_may_be_a_symlink(root: Path, tmp_path: Path) -> None:
    os.symlink(root, tmp_path / "link")
    r = FolderRecipients(tmp_path / "link")
    assert r.resolve(addr("alice@example.com")) == str(tmp_path / "link" / "example.com" / "alice")


# ------------------------------------------------------- temporary failures


@pytest.mark.parametrize("err", [errno.EACCES, errno.EIO])
def test_io_errors_are_temporary(root: Path, err: int) -> None:
    r = FolderRecipients(root)
    with failing_lstat(err):
        result = r.resolve(addr("alice@example.com"))
    assert code(result) == (451, "4.3.0")
    assert result == Reply(451, "4.3.0", "<alice@example.com>: Temporary lookup failure")


def test_missing_mail_root_is_temporary(tmp_path: Path) -> None:
    # An unmounted MAIL_ROOT must not bounce mail.
    r = FolderRecipients(tmp_path / "absent")
    assert code(r.resolve(addr("u@example.com"))) == (451, "4.3.0")


def test_relative_root_is_made_absolute(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(root.parent)
    r = FolderRecipients("mail")
    assert r.mail_root == str(root)
    monkeypatch.chdir("/")
    assert r.resolve(addr("alice@example.com")) == str(root / "example.com" / "alice")


# ---------------------------------------------------------- administration


def test_create_maildir(tmp_path: Path) -> None:
    path = tmp_path / "box"
    create_maildir(path)
    create_maildir(str(path))  # idempotent
    for p in (path, path / "tmp", path / "new", path / "cur"):
        st = os.lstat(p)
        assert stat.S_ISDIR(st.st_mode)
        assert stat.S_IMODE(st.st_mode) & 0o077 == 0
    # A half-made Maildir is completed.
    (path / "cur").rmdir()
    create_maildir(path)
    assert (path / "cur").is_dir()


def test_create_maildir_refuses_links_and_files(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.mkdir()
    os.symlink(target, tmp_path / "link")
    with pytest.raises(FileExistsError):
        create_maildir(tmp_path / "link")
    box = tmp_path / "box"
    box.mkdir()
    (box / "new").write_text("")
    with pytest.raises(FileExistsError):
        create_maildir(box)
    with pytest.raises(FileNotFoundError):
        create_maildir(tmp_path / "no" / "parent")


def test_create_maildir_fsyncs_what_it_creates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    monkeypatch.setattr(policy, "_fsync_dir", synced.append)
    create_maildir(tmp_path / "box")
    assert sorted(synced) == sorted([str(tmp_path / "box"), str(tmp_path)])
    synced.clear()
    create_maildir(tmp_path / "box")
    assert synced == []


def test_add_mailbox(root: Path) -> None:
    path = add_mailbox(root, "User@Example.NET")
    assert path == str(root / "example.net" / "User")
    assert add_mailbox(str(root), "User@Example.NET") == path  # idempotent
    r = FolderRecipients(root)
    assert r.resolve(addr("User@example.net")) == path
    # The address is lower-cased to match, never the folder.
    assert code(r.resolve(addr("user@example.net"))) == (550, "5.1.1")
    assert add_mailbox(root, '"john doe"@example.com') == str(root / "example.com" / "john doe")
    assert r.resolve(addr('"John Doe"@example.com')) == str(root / "example.com" / "john doe")
    assert add_mailbox(root, "jörg@Bücher.Example") == str(root / "bücher.example" / "jörg")


def test_add_mailbox_reuses_an_existing_spelling_of_the_domain(root: Path) -> None:
    (root / "Example.ORG").mkdir()
    assert add_mailbox(root, "u@example.org") == str(root / "Example.ORG" / "u")
    assert not (root / "example.org").exists()


@pytest.mark.parametrize(
    "address",
    [
        "",
        "nobody",
        "@example.com",
        "u@",
        "a b@example.com",
        "../x@example.com",
        '"../x"@example.com',
        '"a/b"@example.com',
        "a/b@example.com",
        '".hidden"@example.com',
        '""@example.com',
        "u@[192.0.2.1]",
        "u@../etc",
        "<u@example.com>",
        "u@example.com\n",
        "u\x00@example.com",
        "a" * 65 + "@example.com",
        "\udcff@example.com",
    ],
)
def test_add_mailbox_refuses_bad_addresses(root: Path, address: str) -> None:
    before = sorted(p for p in root.rglob("*"))
    with pytest.raises(ValueError, match="invalid address"):
        add_mailbox(root, address)
    assert sorted(p for p in root.rglob("*")) == before


def test_add_mailbox_needs_the_root(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        add_mailbox(tmp_path / "absent", "u@example.com")


def test_list_mailboxes(root: Path, tmp_path: Path) -> None:
    add_mailbox(root, "bob@example.com")
    add_mailbox(root, '"john doe"@example.com')
    add_mailbox(root, '"quote\\"d"@example.com')
    add_mailbox(root, "u@Example.ORG")
    (root / "example.com" / "notmaildir").mkdir()
    (root / "example.com" / "file").write_text("")
    os.symlink(root / "example.com" / "alice", root / "example.com" / "alias")
    make_maildir(root, "example.com", ".hidden")
    make_maildir(root, "lost+found", "x")
    make_maildir(tmp_path, "other", "u")
    os.symlink(tmp_path / "other", root / "linked.example")
    (root / "stray-file").write_text("")
    assert list_mailboxes(root) == [
        '"john doe"@example.com',
        '"quote\\"d"@example.com',
        "alice@example.com",
        "bob@example.com",
        "u@example.org",
    ]


def test_list_mailboxes_round_trips_through_add_mailbox(root: Path, tmp_path: Path) -> None:
    for address in ("alice@example.com", '"x \\" y"@example.com', "jörg@bücher.example"):
        add_mailbox(root, address)
    other = tmp_path / "other"
    other.mkdir()
    for address in list_mailboxes(root):
        add_mailbox(other, address)
    assert list_mailboxes(other) == list_mailboxes(root)


def test_list_mailboxes_needs_the_root(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        list_mailboxes(tmp_path / "absent")


def test_ensure_mail_root_creates_postmaster(tmp_path: Path) -> None:
    mail_root = tmp_path / "deep" / "mail"
    assert ensure_mail_root(mail_root) is True
    assert list_mailboxes(mail_root) == ["postmaster@localhost"]
    assert stat.S_IMODE(os.stat(mail_root).st_mode) & 0o077 == 0
    assert ensure_mail_root(str(mail_root)) is False
    r = FolderRecipients(mail_root, postmaster_domain="localhost")
    assert r.resolve(addr("Postmaster")) == str(mail_root / "localhost" / "postmaster")


def test_ensure_mail_root_leaves_an_existing_root_alone(root: Path) -> None:
    assert ensure_mail_root(root) is False
    assert list_mailboxes(root) == ["alice@example.com"]


def test_ensure_mail_root_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(ValueError, match="exists but is not a directory"):
        ensure_mail_root(a_file)
    os.symlink(tmp_path / "gone", tmp_path / "dangling")
    with pytest.raises(ValueError, match="symbolic link to a missing directory"):
        ensure_mail_root(tmp_path / "dangling")
    with pytest.raises(ValueError, match="Cannot create mail root"):
        ensure_mail_root(a_file / "mail")
    # Not writable (simulated: the tests may run as root, for whom access() is always true).
    writable = tmp_path / "ro"
    writable.mkdir()
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(ValueError, match="is not writable"):
        ensure_mail_root(writable)


def test_no_fs_catches_calls_and_restores(root: Path) -> None:
    # The escape tests above are only as good as this guard.
    real = os.stat
    with pytest.raises(AssertionError, match="file system call"):
        with no_fs():
            FolderRecipients(root).resolve(addr("alice@example.com"))
    assert os.stat is real and os.path.isdir(root)
