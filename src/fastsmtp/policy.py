"""Folder-based recipients: a mailbox is a folder (DESIGN.md, "Mailbox layout").

    MAIL_ROOT/<domain>/<user>/{tmp,new,cur}/

Rules of this module:
- A domain is local iff ``MAIL_ROOT/<domain>/`` is a directory, matched
  case-insensitively (RFC 5321 §2.4: domain names are case-insensitive).  A
  user exists iff ``MAIL_ROOT/<domain>/<user>/`` is a Maildir.  The file
  system is the only database, and nothing is cached that could hide a domain
  or mailbox created or removed while the server runs.  A lookup costs one
  ``lstat`` of the mailbox folder (see ``FolderRecipients.resolve``): the
  answer "this folder is a Maildir" is remembered only together with the
  folder's identity and times, which creating, removing or replacing
  ``tmp``/``new``/``cur`` changes; misses and absent folders are never
  remembered; domain folders and spellings are checked against MAIL_ROOT's
  identity and times.
- Safety comes before the file system.  A local part or domain that could
  name anything but a child folder (``/``, ``\\``, NUL and other control
  characters, a leading ``.``, ``..``, the empty string) is refused with 553
  without a single system call.  The grammar (``_abnf``) lets ``/`` through
  because RFC 5322 atext contains it; refusing it is this module's job.
- Everything under MAIL_ROOT must be a real directory: a symbolic link at the
  domain, user or ``tmp``/``new``/``cur`` level is not followed (``lstat``), so
  it makes the domain not local or the user unknown.  The reason: the Maildir
  tree is writable by whatever serves it (a Dovecot ``vmail`` user, a
  mailbox owner); a link planted there must not turn the server's writes,
  which run with its own privileges, into writes anywhere else
  (``new -> /etc/cron.d``).  MAIL_ROOT itself may be a link: the operator
  chose it.  Aliases belong in a policy hook, not in links.  One case is
  noticed late, by design: a domain folder moved away and replaced by a
  link to itself still reaches the very Maildirs that were checked, and is
  seen for what it is within ``ROOT_RECHECK_NS``, when MAIL_ROOT's changed
  times drop the remembered domain folders.
- Lookups answer with a Reply, never an exception: a file system error other
  than "not there" (EACCES, EIO, an unmounted MAIL_ROOT) is a temporary
  ``451 4.3.0``, so that the client retries instead of bouncing the mail.
- Administration (``add_mailbox``, ``ensure_mail_root``) applies the same
  grammar and the same safety rules, and fsyncs the directories it creates:
  a mailbox whose folder entry is lost in a crash would lose the mail that
  was acknowledged into it (DESIGN.md principle 1).
"""

from __future__ import annotations

import errno
import os
import re
import stat
import time
from typing import TypeVar

from . import _abnf
from .events import Address, Reply
from .spool import fsync_dir as _fsync_dir  # a module name of its own: the tests replace it

__all__ = [
    "FolderRecipients",
    "safe_local_part",
    "create_maildir",
    "is_maildir",
    "add_mailbox",
    "list_mailboxes",
    "ensure_mail_root",
    "no_domain_name",
    "relay_denied",
]

StrPath = str | os.PathLike[str]
_V = TypeVar("_V")

_monotonic_ns = time.monotonic_ns  # the clock of ROOT_RECHECK_NS (tests move it)

#: The folders that make a directory a Maildir (maildir(5)).
MAILDIR_SUBDIRS = ("tmp", "new", "cur")

#: MAIL_ROOT's mtime has a coarse granularity (a kernel tick, or worse on
#: some file systems): two changes inside one tick leave one mtime.  While
#: the mtime is this recent, a miss rebuilds the domain map anyway.
MTIME_SLACK_NS = 2_000_000_000

#: How often a lookup looks at MAIL_ROOT itself (its identity and times),
#: when it has not changed for MTIME_SLACK_NS: the remembered domain folders
#: are dropped whenever it has.  A removed or renamed domain folder is seen
#: at once anyway (its mailboxes are gone from the path, and a miss looks
#: the domain up again); this bounds only how long a mailbox that is found
#: keeps being found through a domain folder that changed: one swapped for a
#: link to itself, or a spelling in use since joined by a lower-case one.
ROOT_RECHECK_NS = 1_000_000_000

#: Bounds on what one process remembers: domain folders, and mailboxes known
#: to be Maildirs.  Past them the oldest entry goes; a forgotten one costs
#: its full lookup (four ``lstat``) once more, never a wrong answer.
MAX_DOMAINS = 1024
MAX_MAILDIRS = 8192

# A folder name that is not exactly one child folder: a separator, a control
# character (NUL included), "..", or a leading "." ("." itself, and the
# hidden folders Maildir++ uses for subfolders).
_unsafe_re = re.compile(rb"[\x00-\x1f\x7f/\\]|\.\.|\A\.")
_control_re = re.compile(rb"[\x00-\x1f\x7f]")
_domain_re = re.compile(_abnf.Domain.encode())

# "Not there" errors.  Anything else (EACCES, EIO, ...) is not an answer
# about the mailbox and becomes a temporary failure.
_MISSING = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG, errno.ELOOP})


class _LookupFailed(Exception):
    """The file system could not answer; the recipient gets 451 4.3.0."""


def safe_local_part(local: bytes) -> bool:
    """Whether ``local`` can be used as one folder name under its domain.

    False for the empty string, anything containing ``/``, ``\\``, NUL or
    another control character (< 0x20, 0x7f) or ``..``, and anything starting
    with ``.`` (which covers ``.`` and ``..``).
    """
    return bool(local) and _unsafe_re.search(local) is None


def _is_dir(path: str) -> bool:
    """A real directory (a symlink is not followed); raises _LookupFailed on I/O errors."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError as exc:
        if exc.errno in _MISSING:
            return False
        raise _LookupFailed(str(exc)) from exc


def is_maildir(path: str) -> bool:
    """Whether ``path`` is a folder holding tmp/, new/ and cur/ (maildir(5))."""
    if not _is_dir(path):
        return False
    return all(_is_dir(os.path.join(path, sub)) for sub in MAILDIR_SUBDIRS)


#: What identifies one state of a folder: (st_dev, st_ino, st_mtime_ns, st_ctime_ns).
_Identity = tuple[int, int, int, int]


def _identity(st: os.stat_result) -> _Identity:
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)


def _settled(st: os.stat_result) -> bool:
    """Whether the folder's last change is older than the times' granularity.

    Any later change of its entries then gives it another mtime (and any
    change at all another ctime, which utime() cannot set back), so its
    identity tells whether it changed.  A change inside the tick of a recent
    one might not, hence not trusted while recent.  A time in the future
    (clock skew) is never settled: slower, not wrong.
    """
    return time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) >= MTIME_SLACK_NS


def _put(cache: dict[str, _V], key: str, value: _V, limit: int) -> None:
    """Insert into a bounded cache, dropping the oldest entry when full."""
    if key not in cache and len(cache) >= limit:
        del cache[next(iter(cache))]
    cache[key] = value


def no_domain_name(domain: bytes) -> bool:
    """An address literal, or no domain at all: never a local domain, whatever the store.

    Delivering to [ip] would make us an open relay by another name.
    """
    return not domain or domain[0] == 91  # '['


def relay_denied(address: Address) -> Reply:
    return Reply(550, "5.7.1", f"<{_shown(address.raw)}>: Relay access denied")


def _shown(raw: bytes) -> str:
    """The address for a reply text: control characters must never reach the wire."""
    return _control_re.sub(b"?", raw).decode("utf-8", "replace")


class FolderRecipients:
    """The recipient check of the DESIGN: a domain is local iff MAIL_ROOT/<domain>/ exists
    (case-insensitive), a user exists iff MAIL_ROOT/<domain>/<user>/ is a Maildir
    (tmp/ and new/ and cur/ are directories).

    Args:
        mail_root: the folder holding one folder per local domain.
        delimiter: the recipient delimiter (``user+tag`` delivers to
            ``user``); ``""`` disables it.
        postmaster_domain: where the bare ``<postmaster>`` of RFC 5321 §4.5.1
            goes (as ``postmaster@postmaster_domain``).  None refuses it like
            any address without a local domain.
    """

    def __init__(
        self, mail_root: StrPath, delimiter: str = "+", *, postmaster_domain: str | None = None
    ) -> None:
        # Absolute, so that a later chdir (a daemon does one) cannot move it.
        self._root = os.path.abspath(os.fspath(mail_root))
        self._delimiter = os.fsencode(delimiter)
        self._postmaster_domain = os.fsencode(postmaster_domain) if postmaster_domain else b""
        # lower-cased domain -> folder name as spelled on disk, for folders
        # whose name is not already lower case (those take the fast path).
        self._domains: dict[str, str] = {}
        self._domains_mtime_ns: int | None = None
        # lower-cased domain -> its folder, found to be a real directory while
        # MAIL_ROOT had the identity _root_identity.  Paths only, no
        # descriptors: a descriptor would pin a folder renamed away, and the
        # answer would then describe another folder than the path returned.
        self._local: dict[str, str] = {}
        self._root_identity: _Identity | None = None
        self._root_due_ns = 0  # _monotonic_ns() of the next look at MAIL_ROOT
        # mailbox path -> identity of the folder when its tmp/, new/ and cur/
        # were last found to be real directories (only once settled).
        self._maildirs: dict[str, _Identity] = {}

    @property
    def mail_root(self) -> str:
        return self._root

    def resolve(self, address: Address) -> str | Reply:
        """The Maildir to deliver ``address`` to, or the Reply refusing it.

        The usual cost is one ``lstat``, of the mailbox folder by its full
        path: if the folder is the one remembered as a Maildir (same device,
        inode, mtime and ctime), its tmp/, new/ and cur/ are what they were.
        Its domain folder was found to be a real directory while MAIL_ROOT
        was as it is (looked at once per ROOT_RECHECK_NS); a folder removed
        or renamed away leaves the path empty, and a miss looks the domain up
        again before answering.  A mailbox that vanishes after this answer is
        the writer's 451.
        """
        local, domain = address.local, address.domain
        if not domain and self._postmaster_domain and local.lower() == b"postmaster":
            domain = self._postmaster_domain
        if not safe_local_part(local) or _unsafe_re.search(domain) is not None:
            return Reply(
                553,
                "5.1.3",
                f"<{_shown(address.raw)}>: Recipient address rejected: invalid mailbox name",
            )
        if no_domain_name(domain):
            return relay_denied(address)
        try:
            self._check_root()
            lower = os.fsdecode(domain).lower()
            remembered = self._local.get(lower)
            if remembered is not None:
                found = self._mailbox(remembered, local)
                if found is not None:
                    return found
                # A miss: the domain folder may be gone, renamed or
                # re-spelled since; answer from what is there now.
                del self._local[lower]
            domain_dir = self._domain_dir(lower)
            if domain_dir is None:
                return relay_denied(address)
            _put(self._local, lower, domain_dir, MAX_DOMAINS)
            if domain_dir != remembered:
                found = self._mailbox(domain_dir, local)
                if found is not None:
                    return found
        except (_LookupFailed, OSError):
            return Reply(451, "4.3.0", f"<{_shown(address.raw)}>: Temporary lookup failure")
        return Reply(
            550, "5.1.1", f"<{_shown(address.raw)}>: Recipient address rejected: User unknown"
        )

    def _check_root(self) -> None:
        """Forget the domain folders if MAIL_ROOT may have changed (at most once per ROOT_RECHECK_NS)."""
        now = _monotonic_ns()
        if now < self._root_due_ns:
            return
        st = os.stat(self._root)  # followed: MAIL_ROOT itself may be a link
        identity = _identity(st)
        settled = _settled(st)
        if identity != self._root_identity or not settled:
            self._local.clear()
        self._root_identity = identity
        # While recent, a change inside the same tick could leave it as it
        # is: look again at every lookup, and trust no domain folder.
        self._root_due_ns = now + ROOT_RECHECK_NS if settled else 0

    def _mailbox(self, domain_dir: str, local: bytes) -> str | None:
        """The first candidate folder under ``domain_dir`` that is a Maildir."""
        for name in self._candidates(local):
            # os.path.join, spelled out: domain_dir never ends with a
            # separator and name holds none (safe_local_part).
            path = domain_dir + os.sep + name
            try:
                st = os.lstat(path)
            except OSError as exc:
                if exc.errno in _MISSING:
                    continue
                raise _LookupFailed(str(exc)) from exc
            if not stat.S_ISDIR(st.st_mode):
                continue
            identity = _identity(st)
            if self._maildirs.get(path) == identity:
                return path
            if all(_is_dir(os.path.join(path, sub)) for sub in MAILDIR_SUBDIRS):
                if _settled(st):
                    _put(self._maildirs, path, identity, MAX_MAILDIRS)
                return path
            self._maildirs.pop(path, None)
        return None

    def _candidates(self, local: bytes) -> list[str]:
        """Folder names to try: as sent, lower-cased, then both for the part before the delimiter."""
        full = os.fsdecode(local)
        lower = full.lower()
        if not (self._delimiter and self._delimiter in local):
            return [full] if full == lower else [full, lower]  # the usual case
        names = [full, lower]
        base, _, _ = local.partition(self._delimiter)
        if base:
            name = os.fsdecode(base)
            names += (name, name.lower())
        return list(dict.fromkeys(names))

    def _domain_dir(self, lower: str) -> str | None:
        # Fast path: folders are normally created lower-case (add_mailbox does).
        path = os.path.join(self._root, lower)
        if _is_dir(path):
            return path
        found = self._spelled(lower)
        if found is None and self._refresh_domains():
            found = self._spelled(lower)
        return found

    def _spelled(self, lower: str) -> str | None:
        actual = self._domains.get(lower)
        if actual is None or actual == lower:
            return None
        path = os.path.join(self._root, actual)
        return path if _is_dir(path) else None

    def _refresh_domains(self) -> bool:
        """Rebuild the spelling map if MAIL_ROOT may have changed since it was built."""
        mtime_ns = os.stat(self._root).st_mtime_ns
        if mtime_ns == self._domains_mtime_ns and time.time_ns() - mtime_ns >= MTIME_SLACK_NS:
            return False
        domains: dict[str, str] = {}
        with os.scandir(self._root) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    key = entry.name.lower()
                    # Two spellings of one domain: take the smallest, so that
                    # every worker picks the same one whatever readdir's order.
                    if key not in domains or entry.name < domains[key]:
                        domains[key] = entry.name
        # The mtime read *before* the listing: a change made during it leaves
        # a newer mtime, and the next miss lists again.
        self._domains, self._domains_mtime_ns = domains, mtime_ns
        return True


def _mkdir(path: str) -> bool:
    """Create one folder (mode 0o700); False if a real directory is already there."""
    try:
        os.mkdir(path, 0o700)
        return True
    except FileExistsError:
        if stat.S_ISDIR(os.lstat(path).st_mode):
            return False
        raise FileExistsError(
            errno.EEXIST, "exists and is not a directory (symbolic links are refused)", path
        ) from None


def create_maildir(path: StrPath) -> None:
    """Create the Maildir ``path`` and its tmp/, new/ and cur/ (mode 0o700); idempotent.

    The parent must exist.  What was created is fsynced (the new entries and
    the parent's entry for ``path``), so the mailbox survives a crash.

    Raises:
        FileExistsError: ``path`` or one of its subfolders exists and is not
            a real directory (a file, or a symbolic link).
        OSError: any other failure to create.
    """
    path = os.fspath(path)
    created = _mkdir(path)
    for sub in MAILDIR_SUBDIRS:
        created = _mkdir(os.path.join(path, sub)) or created
    if created:
        _fsync_dir(path)
        _fsync_dir(os.path.dirname(os.path.abspath(path)))


def _domain_folder(root: str, domain: str) -> str:
    """The folder of ``domain`` (lower case), reusing an existing spelling of it."""
    spellings = sorted(
        entry.name
        for entry in os.scandir(root)
        if entry.is_dir(follow_symlinks=False) and entry.name.lower() == domain
    )
    if domain in spellings or not spellings:
        # A second spelling of an existing domain would split its mailboxes
        # between two folders, only one of which the resolver reads.
        path = os.path.join(root, domain)
        if _mkdir(path):
            _fsync_dir(root)
        return path
    return os.path.join(root, spellings[0])


def add_mailbox(mail_root: StrPath, address: str) -> str:
    """Create the Maildir of ``address`` ("user@domain") and return its path.

    The domain folder is created lower-cased, unless the domain already
    exists under another spelling, which is then reused.  Creating an
    existing mailbox is not an error.

    Raises:
        ValueError: the address is not a valid RFC 5321 mailbox, is an
            address literal, cannot be a folder name, or the mail root does
            not exist.
    """
    root = os.path.abspath(os.fspath(mail_root))
    try:
        parsed = _abnf.parse_mailbox(address.encode("utf-8"))
    except (UnicodeError, ValueError) as exc:
        raise ValueError(f"invalid address {address!r}: {exc}") from None
    if parsed.domain[:1] == b"[":
        raise ValueError(
            f"invalid address {address!r}: an address literal cannot be a local domain"
        )
    if not safe_local_part(parsed.local):
        raise ValueError(
            f"invalid address {address!r}: the local part cannot be a folder name "
            "(it must not contain '/', '\\' or control characters, start with '.' or contain '..')"
        )
    if not os.path.isdir(root):
        raise ValueError(f"mail root {root} does not exist or is not a directory")
    domain_dir = _domain_folder(root, os.fsdecode(parsed.domain).lower())
    path = os.path.join(domain_dir, os.fsdecode(parsed.local))
    create_maildir(path)
    return path


def _as_local_part(name: str) -> str:
    """``name`` written so that add_mailbox would read it back (RFC 5321 §4.1.2)."""
    if _abnf.is_dot_string(os.fsencode(name)):
        return name
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def list_mailboxes(mail_root: StrPath) -> list[str]:
    """Every mailbox the resolver would deliver to, as sorted "user@domain".

    Raises:
        ValueError: the mail root does not exist or is not a directory.
    """
    root = os.fspath(mail_root)
    if not os.path.isdir(root):
        raise ValueError(f"mail root {root} does not exist or is not a directory")
    found: list[str] = []
    with os.scandir(root) as domains:
        for domain in domains:
            if not domain.is_dir(follow_symlinks=False):
                continue
            if _domain_re.fullmatch(os.fsencode(domain.name)) is None:
                continue  # lost+found, .snapshot, ...: not a domain
            with os.scandir(domain.path) as users:
                for user in users:
                    if safe_local_part(os.fsencode(user.name)) and is_maildir(user.path):
                        found.append(f"{_as_local_part(user.name)}@{domain.name}")
    return sorted(found)


def ensure_mail_root(mail_root: StrPath) -> bool:
    """Create the mail root, with the mailbox postmaster@localhost, if it does not exist.

    Returns:
        True if it was created, False if it was already there.

    Raises:
        ValueError: it exists but is not a writable directory, or cannot be
            created.
    """
    root = os.fspath(mail_root)
    if os.path.isdir(root):
        if not os.access(root, os.W_OK | os.X_OK):
            raise ValueError(f"Mail root {root} is not writable by this user (uid {os.geteuid()}).")
        return False
    if os.path.islink(root):
        raise ValueError(f"Mail root {root} is a symbolic link to a missing directory.")
    if os.path.lexists(root):
        raise ValueError(f"Mail root {root} exists but is not a directory.")
    try:
        os.makedirs(root, 0o700)
        add_mailbox(root, "postmaster@localhost")
    except OSError as exc:
        raise ValueError(f"Cannot create mail root {root}: {exc.strerror or exc}.") from exc
    return True
