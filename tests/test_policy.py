"""Folder-based recipients and mailbox administration (DESIGN.md "Mailbox layout")."""

from __future__ import annotations

import errno
import os
import stat
import time
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


@pytest.fixture
def no_fs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test on any file system call the policy could make."""

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"file system call with {args!r}")

    for name in ("stat", "lstat", "scandir", "listdir", "open", "access", "mkdir", "makedirs"):
        monkeypatch.setattr(os, name, forbidden)
    for name in ("exists", "lexists", "isdir", "isfile", "islink", "realpath"):
        monkeypatch.setattr(os.path, name, forbidden)


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


def test_old_unchanged_mtime_does_not_rescan(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Misses (mostly relay attempts) cost one stat of MAIL_ROOT, not a listing.
    old = time.time_ns() - 60 * 10**9
    os.utime(root, ns=(old, old))
    r = FolderRecipients(root)
    assert code(r.resolve(addr("u@elsewhere.example"))) == (550, "5.7.1")  # builds the map
    scans: list[Any] = []
    real_scandir = os.scandir

    def counting_scandir(path: Any) -> Any:
        scans.append(path)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", counting_scandir)
    for _ in range(3):
        assert code(r.resolve(addr("u@elsewhere.example"))) == (550, "5.7.1")
    assert scans == []
    (root / "Elsewhere.Example").mkdir()  # changes the mtime
    assert code(r.resolve(addr("u@elsewhere.example"))) == (550, "5.1.1")
    assert len(scans) == 1


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
def test_escapes_are_refused_without_touching_the_fs(root: Path, no_fs: None, local: bytes) -> None:
    r = FolderRecipients(root)
    result = r.resolve(Address(local, b"example.com", local + b"@example.com"))
    assert code(result) == (553, "5.1.3")
    assert isinstance(result, Reply)
    # Whatever the address held, the reply is one line.
    assert result.encoded.count(b"\r\n") == 1
    assert b"\n" not in result.encoded[:-2] and b"\r" not in result.encoded[:-2]


@pytest.mark.parametrize(
    "domain", [b"..", b".", b"../x", b"a/b", b"/etc", b"a\\b", b"a\x00", b".example.com", b"a\nb"]
)
def test_escaping_domains_are_refused_without_touching_the_fs(no_fs: None, domain: bytes) -> None:
    r = FolderRecipients("/nonexistent")
    assert code(r.resolve(Address(b"u", domain, b"u@" + domain))) == (553, "5.1.3")


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
def test_grammatical_escapes_are_refused_by_the_policy(root: Path, no_fs: None, raw: bytes) -> None:
    # These pass the grammar ("/" is atext, quoted strings hold nearly
    # anything); keeping them out of the file system is the policy's job.
    assert code(FolderRecipients(root).resolve(addr(raw))) == (553, "5.1.3")


def test_literals_and_empty_domains_are_not_local(no_fs: None) -> None:
    r = FolderRecipients("/nonexistent")
    for raw in (b"u@[192.0.2.1]", b"u@[IPv6:::1]", b"postmaster"):
        assert code(r.resolve(addr(raw))) == (550, "5.7.1")


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


def test_io_errors_are_temporary(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    r = FolderRecipients(root)

    def denied(path: Any, *args: Any, **kwargs: Any) -> Any:
        raise PermissionError(errno.EACCES, "Permission denied", path)

    monkeypatch.setattr(os, "lstat", denied)
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


def test_no_fs_fixture_catches_calls(root: Path, no_fs: None) -> None:
    # The escape tests above are only as good as this guard.
    with pytest.raises(AssertionError, match="file system call"):
        FolderRecipients(root).resolve(addr("alice@example.com"))
