"""The table of settings: each one declared once, every view derived from it.

Rules of this module:
- A setting is one row of ``SETTINGS``: its key, kind, default, the texts
  of ``--help``, of the README's flag table and of the example file, its
  choices, metavar and check.  Nothing else in the package writes a
  setting's name, default or allowed values a second time.
- The views are derived, never edited: the flags of ``fastsmtp serve``
  (cli.py), the keys and types of the TOML file, ``Config.validate()`` and
  ``config show`` (config.py), ``fastsmtp.example.toml`` and the README's
  "Configuration flags" table (``example_toml()`` and ``readme_table()``
  here; tests/test_settings_table.py holds the committed files to them).
- ``Config`` (config.py) stays a written-out dataclass, for type checkers
  and readers; config.py checks at import that its fields are exactly the
  table's, with the same types and defaults.
- This module imports nothing from the rest of the package: a check
  returns its problem as a sentence, and config.py raises ``ConfigError``
  with it.  Checks that need parsing (``HOST:PORT``) belong to a kind and
  are config.py's.
- The rows are grouped by section, in the order the example file, the
  README table and ``--help`` show them.  ``Config``'s field order (that
  of ``config show``) is older and stays as it is.
"""

from __future__ import annotations

import enum
import ipaddress
import itertools
import math
import os
import re
import textwrap
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

__all__ = [
    "Kind",
    "Setting",
    "SETTINGS",
    "Check",
    "BY_KEY",
    "usable_cpus",
    "format_size",
    "toml_value",
    "toml_string",
    "example_toml",
    "readme_table",
    "FSYNC_CHOICES",
    "BARE_LF_CHOICES",
    "LOOP_CHOICES",
    "LOG_LEVELS",
    "LOG_FORMATS",
    "AUTH_MODES",
    "SPF_REJECT_AT",
]

FSYNC_CHOICES = ("batch", "always", "off")
BARE_LF_CHOICES = ("reject", "normalize")
LOOP_CHOICES = ("uvloop", "asyncio")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
AUTH_MODES = ("off", "tag", "enforce")
SPF_REJECT_AT = ("data", "mail")

MiB = 1024 * 1024


class Kind(enum.Enum):
    """What a setting's value is, which fixes how it is read, written and typed."""

    TEXT = enum.auto()
    #: A file or folder, made absolute when read (a file's value against
    #: the file's directory, a flag's against the working directory).
    PATH = enum.auto()
    #: "HOST:PORT" or "" (none); checked by parsing it.
    ENDPOINT = enum.auto()
    INT = enum.auto()
    #: Bytes: an integer, or a string with a K/M/G suffix ("25M").
    SIZE = enum.auto()
    SECONDS = enum.auto()
    STRINGS = enum.auto()
    #: The one setting of two fields: ``listen`` is ``host`` and ``port``.
    LISTEN = enum.auto()

    @property
    def annotations(self) -> tuple[str, ...]:
        """The annotation of each Config field a setting of this kind fills."""
        return _ANNOTATIONS[self]


_ANNOTATIONS = {
    Kind.TEXT: ("str",), Kind.PATH: ("str",), Kind.ENDPOINT: ("str",), Kind.INT: ("int",), Kind.SIZE: ("int",),
    Kind.SECONDS: ("float",), Kind.STRINGS: ("tuple[str, ...]",), Kind.LISTEN: ("str", "int"),
}


#: Takes the value (a tuple of the field values for ``listen``) and returns
#: the problem as one sentence naming the setting, or None.
Check = Callable[[Any], str | None]


@dataclass(frozen=True, slots=True)
class Setting:
    """One setting, as every view shows it."""

    #: The flag without its dashes, the TOML key and the name in messages.
    key: str
    kind: Kind
    #: The Config value; for ``listen`` the "HOST:PORT" text of both fields.
    default: object
    #: The heading of the example file's part it is listed under.
    section: str
    #: ``--help``; ``%(default)s`` is the flag's default.
    help: str | None
    #: The README table's meaning column (markdown).
    doc: str
    #: The example file's comment above the key; "" shares the one above.
    comment: str
    metavar: str | None = None
    choices: tuple[str, ...] = ()
    check: Check | None = None
    #: The README's default column where the value itself says too little.
    shown_default: str | None = None
    #: A default that depends on the machine (``workers``): ``fastsmtp
    #: serve`` uses this, and the example file lists the key commented out.
    machine_default: Callable[[], object] | None = None
    #: The value written commented out in the example file for such a key.
    sample: str | None = None

    @property
    def fields(self) -> tuple[str, ...]:
        """The Config fields this setting fills."""
        return ("host", "port") if self.kind is Kind.LISTEN else (self.key.replace("-", "_"),)

    def problem(self, value: object) -> str | None:
        """The first thing wrong with ``value`` that this row can see, or None."""
        if self.choices and value not in self.choices:
            return f"{self.key} must be {_either(self.choices)}, not {value!r}"
        return self.check(value) if self.check is not None else None


def _either(choices: tuple[str, ...]) -> str:
    """'a or b' for two choices, 'one of a, b, c' for more."""
    return " or ".join(choices) if len(choices) == 2 else "one of " + ", ".join(choices)


# -- checks ------------------------------------------------------------------------
#
# Declarative bounds: each takes the whole sentence it reports, so that every
# message reads as it always has (tests and users match on them).


def at_least(low: float, message: str) -> Check:
    """``message`` for a value under ``low``."""
    return lambda value: message if value < low else None


def above(low: float, message: str) -> Check:
    """``message`` for a value that is not over ``low`` (nan included)."""
    return lambda value: message if not value > low else None


def finite_and(then: Check, message: str) -> Check:
    """``message`` for inf and nan (inf passes any lower bound), else ``then``."""
    return lambda value: message if not math.isfinite(value) else then(value)


def _seconds(key: str, *, positive: bool) -> Check:
    low = above(0, f"{key} must be positive") if positive else at_least(0, f"{key} must be 0 or more")
    return finite_and(low, f"{key} must be a finite number of seconds")


def _listen(value: tuple[str, int]) -> str | None:
    host, port = value
    if not host:
        return "listen: the host is empty"
    if not 0 <= port <= 65535:
        return f"listen: port {port} is not between 0 and 65535"
    return None


def _networks(key: str) -> Check:
    def check(value: tuple[str, ...]) -> str | None:
        for net in value:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                return f"{key}: {net!r} is not an address or network"
        return None

    return check


def _dns_servers(value: tuple[str, ...]) -> str | None:
    for server in value:
        host, port = server, "53"
        if server.startswith("["):
            host, _, rest = server[1:].partition("]")
            if rest:
                if not rest.startswith(":"):
                    return f"dns-server: {server!r} is not HOST, HOST:PORT or [IPv6]:PORT"
                port = rest[1:]
        elif server.count(":") == 1:
            host, port = server.split(":")
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return f"dns-server: {host!r} in {server!r} is not an IP address"
        if not port.isdigit() or not 0 < int(port) <= 65535:
            return f"dns-server: the port of {server!r} is not between 1 and 65535"
    return None


def _dnsbl_sites(value: tuple[str, ...]) -> str | None:
    from .dnsbl import SiteError, parse_sites

    try:
        parse_sites(value)
    except SiteError as exc:
        return f"dnsbl-sites: {exc}"
    return None


def _deliver_targets(value: tuple[str, ...]) -> str | None:
    from .lmtp.client import parse_target

    if value == ("maildir",):
        return None
    if not value:
        return "deliver: give maildir or at least one lmtp: target"
    for target in value:
        try:
            parse_target(target)
        except ValueError as exc:
            return f"deliver: {exc}" + ("; maildir cannot be mixed with LMTP" if target == "maildir" else "")
    return None


def _milters(value: tuple[str, ...]) -> str | None:
    from .milter.client import parse_endpoint

    for endpoint in value:
        try:
            parse_endpoint(endpoint)
        except ValueError as exc:
            return str(exc)
    return None


def _policy(value: str) -> str | None:
    return f"policy: {value!r} is not MODULE:CLASS or FILE.py:CLASS" if value and ":" not in value else None


def _one_char(value: str) -> str | None:
    return "recipient-delimiter must be one character or empty" if len(value) > 1 else None


def usable_cpus() -> int:
    """CPUs this process may run on (a cpuset or taskset may allow fewer than exist)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# -- TOML text ---------------------------------------------------------------------


def toml_value(value: object) -> str:
    """A Config value as TOML: a string, an array of strings, an integer or a float."""
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return repr(value)  # int, or a finite float: "300.0"


def toml_string(text: str) -> str:
    """A TOML basic string: backslash, quote and control characters escaped."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch < " " or ch == "\x7f":
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def format_size(size: int) -> str:
    """The shortest exact "25M" form of a size, as parse_size reads it."""
    for suffix, unit in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if size and size % unit == 0:
            return f"{size // unit}{suffix}"
    return str(size)


# -- the example file --------------------------------------------------------------

_EXAMPLE_HEAD = """\
# fastsmtp configuration: every setting, at its default.
#
#   fastsmtp serve --config fastsmtp.toml        # flags given as well override the file
#   fastsmtp config check fastsmtp.toml          # validate without starting
#   fastsmtp config show --config fastsmtp.toml  # the effective settings, as TOML
#
# Keys are the flags of `fastsmtp serve` without their leading dashes
# (--max-message-size is max-message-size), all at the top level.  Relative
# paths are taken from the directory of this file.  SIGHUP makes a running
# server read the file again (listen and tls-listen take a restart).
#
# `fastsmtp config example` prints this file.
"""

_WIDTH = 80


def example_toml() -> str:
    """``fastsmtp.example.toml``: every key at its default, with what it means."""
    parts = [_EXAMPLE_HEAD]
    for section, rows in itertools.groupby(SETTINGS, key=lambda s: s.section):
        parts.append("\n" + f"# -- {section} ".ljust(_WIDTH - 2, "-") + "\n")
        for setting in rows:
            parts.append(_example_entry(setting))
    return "".join(parts)


#: Spaces a comment is not broken at: "RFC 5321 §4.1.3", "552 5.3.4".
_UNBROKEN = re.compile(r"(?<=\bRFC) (?=\d)|(?<=\d) (?=§)|(?<=\b\d{3}) (?=\d\.\d)")


def _comment(text: str) -> str:
    """``# ``-prefixed lines of ``text``, wrapped to the file's width."""
    glued = _UNBROKEN.sub("\u00a0", text)  # textwrap breaks only at ASCII whitespace
    wrapped = textwrap.fill(glued, _WIDTH - 2, initial_indent="# ", subsequent_indent="# ", break_on_hyphens=False)
    return wrapped.replace("\u00a0", " ")


def _example_entry(setting: Setting) -> str:
    comment = f"\n{_comment(setting.comment)}\n" if setting.comment else ""
    if setting.sample is not None:
        return f"{comment}# {setting.key} = {setting.sample}\n"
    if setting.kind is Kind.SIZE:
        assert isinstance(setting.default, int)
        value = toml_string(format_size(setting.default))
    else:
        value = toml_value(setting.default)
    return f"{comment}{setting.key} = {value}\n"


# -- the README table --------------------------------------------------------------

README_HEADER = "| flag | default | meaning |\n|---|---|---|\n"


def readme_table() -> str:
    """The README's "Configuration flags" table, header included."""
    return README_HEADER + "".join(
        f"| `--{s.key} {_readme_metavar(s)}` | {_readme_default(s)} | {s.doc} |\n" for s in SETTINGS)


def _readme_metavar(setting: Setting) -> str:
    if setting.choices:
        return "\\|".join(setting.choices)
    if setting.kind is Kind.STRINGS:
        return f"{setting.metavar} ..."
    return setting.metavar or setting.key.replace("-", "_").upper()


def _readme_default(setting: Setting) -> str:
    if setting.shown_default is not None:
        return setting.shown_default
    value = setting.default
    if setting.kind is Kind.SIZE:
        assert isinstance(value, int)
        return f"`{format_size(value)}`"
    if isinstance(value, float):
        return f"`{value:g}`"
    return f"`{value}`"


# -- the table ---------------------------------------------------------------------
#
# The comment above a row gives the reason for its default (DESIGN.md,
# principle 5: every limit has one).

_RATES = "greeting-delay, error-delay and min-data-rate must not be negative"

_WHERE = "where to listen and deliver"
_LIMITS = "limits (RFC 5321 §4.5.3)"
_CONTENT = "durability and content"
_PROCESSES = "processes"
_LOGS = "logs"
_POLICY = "policy hooks"
_TLS = "TLS (RFC 3207, RFC 8314)"
_PROXY = "PROXY protocol"
_ABUSE = "abusive clients"
_TRUST = "trusted networks"
_SCREEN = "screening (the remembered greeting test, DNSBL, greylisting)"
_AUTH = "authentication (SPF, DKIM, DMARC, ARC)"
_DNS = "DNS"
_MILTER = "milters"
_MONITORING = "monitoring"

SETTINGS: tuple[Setting, ...] = (
    Setting(
        "listen", Kind.LISTEN, "127.0.0.1:2525", _WHERE, metavar="HOST:PORT", check=_listen,
        help="address to listen on (default: %(default)s; port 0 picks a free port)",
        doc="where to listen; port 0 picks a free port and prints it",
        comment="HOST:PORT ([v6]:PORT for IPv6).  A public MX listens on 0.0.0.0:25, which needs root to bind "
                "(see user and group below); port 0 picks a free port."),
    Setting(
        "mail-root", Kind.PATH, "mail", _WHERE, metavar="DIR", shown_default="`./mail`",
        help="Maildir tree MAIL_ROOT/<domain>/<user>/ (default: ./%(default)s)",
        doc="the Maildir tree `MAIL_ROOT/<domain>/<user>/{tmp,new,cur}`",
        comment="Maildir tree: MAIL_ROOT/<domain>/<user>/{tmp,new,cur}.  Use an absolute path in production "
                "(e.g. /var/spool/fastsmtp)."),
    Setting(
        # "" is filled in by validate() with socket.getfqdn().
        "hostname", Kind.TEXT, "", _WHERE, shown_default="the machine's FQDN",
        help="name in the greeting and Received headers (default: FQDN)",
        doc="name in the greeting and in `Received:`",
        comment="Name in the 220 greeting, the EHLO reply and Received: headers (RFC 5321 §4.1.3, §4.4); \"\" "
                "means this machine's fully qualified name."),
    # 25 MiB is what the large providers accept today; SIZE advertises it
    # (RFC 1870).
    Setting(
        "max-message-size", Kind.SIZE, 25 * MiB, _LIMITS, metavar="BYTES",
        check=at_least(1, "max-message-size must be at least 1 byte"),
        help="largest message accepted, advertised as SIZE (default: %(default)s)",
        doc="advertised as `SIZE`; larger messages get `552 5.3.4` (suffixes K, M, G)",
        comment="Largest message accepted, advertised as SIZE (RFC 1870); bigger ones get 552 5.3.4.  Bytes, "
                "or a string with a K/M/G suffix."),
    # RFC 5321 §4.5.3.1.8 asks servers to accept at least 100 recipients.
    Setting(
        "max-recipients", Kind.INT, 100, _LIMITS, metavar="N",
        check=at_least(1, "max-recipients must be at least 1"),
        help="recipients per message (default: %(default)s)",
        doc="further RCPTs get `452 4.5.3`",
        comment="RFC 5321 §4.5.3.1.8 asks for at least 100; further RCPTs get 452 4.5.3."),
    # Postfix's smtpd_hard_error_limit default: a client making this many
    # errors is a dictionary attack or broken, and is disconnected.
    Setting(
        "max-errors", Kind.INT, 20, _LIMITS, metavar="N",
        check=at_least(1, "max-errors must be at least 1"),
        help="errors before a session is closed with 421 (default: %(default)s)",
        doc="errors in one session before `421 4.7.0` and close",
        comment="Errors in one session before 421 and close (Postfix's smtpd_hard_error_limit)."),
    # A command line may be 512 octets (RFC 5321 §4.5.3.1.4); MAIL and RCPT
    # grow by their ESMTP parameters (SIZE alone adds 26, RFC 1870 §3), so
    # we allow 512 more for parameters.  Every other command stays at 512.
    Setting(
        "max-command-line", Kind.INT, 1024, _LIMITS, metavar="BYTES",
        check=at_least(512, "max-command-line must be at least 512 (RFC 5321 §4.5.3.1.4)"),
        help="longest MAIL or RCPT line, CRLF included (default: %(default)s; at least 512; other commands: 512)",
        doc="longest MAIL or RCPT line, CRLF included; longer ones get `500 5.5.2` (at least 512). Every other "
            "command is held to RFC 5321 §4.5.3.1.4's 512",
        comment="Longest MAIL or RCPT line, CRLF included: 512 (RFC 5321 §4.5.3.1.4) plus room for ESMTP "
                "parameters such as SIZE (RFC 1870 §3).  Every other command is held to 512."),
    # RFC 5321 §4.5.3.2.7: a server should wait at least 5 minutes for the
    # next command.
    Setting(
        "idle-timeout", Kind.SECONDS, 300.0, _LIMITS, metavar="SECONDS",
        check=_seconds("idle-timeout", positive=True),
        help="close a silent session with 421 (default: %(default)s)",
        doc="a silent session gets `421 4.4.2`",
        comment="Seconds a session may stay silent before 421 4.4.2; RFC 5321 §4.5.3.2.7 asks servers to wait "
                "at least 5 minutes."),
    Setting(
        "recipient-delimiter", Kind.TEXT, "+", _LIMITS, metavar="CHAR", check=_one_char,
        help="user+tag delivers to user (default: %(default)s; empty disables)",
        doc="`user+tag` delivers to `user`; empty disables",
        comment="user+tag@domain delivers to user; \"\" turns it off."),
    Setting(
        "fsync", Kind.TEXT, "batch", _CONTENT, choices=FSYNC_CHOICES,
        help="batch: write-ahead journal, one flush per batch (default); always: one flush of file and "
             "folder per message; off: UNSAFE, benchmarks only",
        doc="write-ahead journal with group commit; one flush of file and `new/` per message; no flush "
            "(unsafe, for benchmarks)",
        comment="\"batch\": a write-ahead journal, one write and one fdatasync for all messages that arrived "
                "together, delivered into new/ after the 250; \"always\": the file and its new/ flushed per "
                "message before the 250; \"off\": no flush (UNSAFE: benchmarks only)."),
    Setting(
        # "" is filled in by validate(): MAIL_ROOT/.journal.
        "journal-dir", Kind.PATH, "", _CONTENT, metavar="DIR", shown_default="`MAIL_ROOT/.journal`",
        help="the write-ahead journal of --fsync batch (default: MAIL_ROOT/.journal)",
        doc="the write-ahead journal of `--fsync batch`; another device is fine, it is flushed on its own",
        comment="Folder of the write-ahead journal (--fsync batch), one subfolder per worker; \"\" means "
                "MAIL_ROOT/.journal.  It may be on another device than the mail root."),
    Setting(
        "deliver", Kind.STRINGS, ("maildir",), _CONTENT, metavar="TARGET", check=_deliver_targets,
        shown_default="`maildir`",
        help="where accepted mail goes: maildir (default), or LMTP backends lmtp:unix:/path or lmtp:HOST:PORT, "
             "several in order for failover",
        doc="where accepted mail goes: `maildir` (MAIL_ROOT/<domain>/<user>/new/), or LMTP backends (RFC 2033: "
            "Dovecot, Cyrus, Stalwart), `lmtp:unix:/path` or `lmtp:HOST:PORT`, several in order for failover; "
            "recipients are then asked of the backend at RCPT, and mail is delivered from the journal after the "
            "250, retried while the backend is down (needs `--fsync batch`)",
        comment="Where accepted mail goes: [\"maildir\"], or LMTP backends in order (failover), e.g. "
                "[\"lmtp:unix:/run/dovecot/lmtp\"] or [\"lmtp:10.0.0.5:24\", \"lmtp:10.0.0.6:24\"]; LMTP needs "
                "fsync = \"batch\"."),
    Setting(
        "dead-letter", Kind.PATH, "", _CONTENT, metavar="DIR", shown_default="`MAIL_ROOT/.dead-letter`",
        help="the Maildir for accepted mail an LMTP backend then refused for good (default: "
             "MAIL_ROOT/.dead-letter)",
        doc="the Maildir where accepted mail goes that an LMTP backend refused for good after the 250 (a 5xx), "
            "with the backend's reply in a field above it, for the operator",
        comment="Maildir for accepted mail an LMTP backend refused for good (5xx) after the 250; \"\" means "
                "MAIL_ROOT/.dead-letter."),
    Setting(
        "lmtp-rcpt-cache", Kind.SECONDS, 30.0, _CONTENT, metavar="SECONDS",
        check=_seconds("lmtp-rcpt-cache", positive=False),
        help="how long a recipient the LMTP backend took at RCPT is taken without asking again (default: "
             "%(default)s; 0: ask every time)",
        doc="how long a recipient the LMTP backend took at RCPT is taken again without asking (a yes only; 0 asks "
            "every time), as Postfix's address verification remembers its answers",
        comment="Seconds a recipient the LMTP backend took at RCPT is taken again without asking (0: ask each "
                "time)."),
    Setting(
        "lmtp-orphan-scan", Kind.SECONDS, 60.0, _CONTENT, metavar="SECONDS",
        check=_seconds("lmtp-orphan-scan", positive=True),
        help="how often a worker looks for journals that stopped workers left with mail for the LMTP backends "
             "(default: %(default)s)",
        doc="how often a running worker looks for journal folders that workers which are gone left with mail for "
            "the LMTP backends (one retired at a reload while the backend was away), and takes that mail over",
        comment="Seconds between a worker's looks for journals left by stopped workers with LMTP mail waiting."),
    # Postfix's queue_minfree: refuse new mail while the disk is nearly full,
    # rather than accept it and fail at the end of its data.
    Setting(
        "min-free", Kind.SIZE, 64 * 1024 * 1024, _CONTENT, metavar="BYTES",
        check=at_least(0, "min-free must be 0 or more"),
        help="free space kept in reserve on the journal's and the mail root's file systems; below it MAIL "
             "gets 452 4.3.1 (default: %(default)s)",
        doc="free space kept on the journal's and the mail root's file systems; below it, or with `SIZE=` "
            "over what is left, MAIL gets `452 4.3.1`",
        comment="Bytes of free space kept in reserve on the journal's and the mail root's file systems; "
                "below it, or with a SIZE= over what is left above it, MAIL gets 452 4.3.1 (RFC 1870 §6.1; "
                "Postfix's queue_minfree)."),
    Setting(
        "bare-lf", Kind.TEXT, "reject", _CONTENT, choices=BARE_LF_CHOICES,
        help="a message with a bare CR or LF: reject with 550 (default) or normalize to CRLF",
        doc="a message containing a bare CR or LF: refuse with `550 5.5.2`, or store it with CRLF",
        comment="A message with a bare CR or LF (the SMTP smuggling vector): \"reject\" with 550 5.5.2, or "
                "\"normalize\" it to CRLF."),
    Setting(
        "spill-threshold", Kind.SIZE, 256 * 1024, _CONTENT, metavar="BYTES",
        check=at_least(0, "spill-threshold must be 0 or more"),
        help="message bytes held in memory before spilling to tmp/ (default: %(default)s)",
        doc="message bytes held in memory before the spool spills to `tmp/` (suffixes K, M, G)",
        comment="Message bytes held in memory before the spool spills to tmp/."),
    Setting(
        "shutdown-timeout", Kind.SECONDS, 30.0, _PROCESSES, metavar="SECONDS",
        check=_seconds("shutdown-timeout", positive=False),
        help="on SIGTERM, how long transactions in progress may take to finish (default: %(default)s)",
        doc="on SIGTERM, how long transactions in progress may take to finish",
        comment="On SIGTERM, seconds that transactions in progress may take to finish."),
    # Config's default is 1; fastsmtp serve's is one worker per usable CPU.
    Setting(
        "workers", Kind.INT, 1, _PROCESSES, metavar="N", check=at_least(0, "workers must be 0 or more"),
        machine_default=usable_cpus, sample="4", shown_default="the CPUs",
        help="worker processes under a supervisor (default: the CPUs, here %(default)s; "
             "0 serves in the foreground process)",
        doc="worker processes under a supervisor, one event loop each, sharing the port (SO_REUSEPORT); `0`: "
            "one worker in the foreground process, no supervisor",
        comment="Worker processes sharing the port (SO_REUSEPORT); 0 serves in the foreground process without a "
                "supervisor.  Left out, the default is the number of CPUs this process may use, so it is "
                "commented out here."),
    # gunicorn's --timeout, default 30 s.
    Setting(
        "worker-timeout", Kind.SECONDS, 30.0, _PROCESSES, metavar="SECONDS",
        check=_seconds("worker-timeout", positive=True),
        help="kill and replace a worker whose event loop is stuck this long (default: %(default)s)",
        doc="a worker whose event loop is stuck this long is killed and replaced",
        comment="A worker whose event loop is stuck this many seconds is killed and replaced."),
    Setting(
        "max-connections", Kind.INT, 1000, _PROCESSES, metavar="N",
        check=at_least(1, "max-connections must be at least 1"),
        help="connections per worker; more get 421 4.7.0 (default: %(default)s)",
        doc="sessions per worker; more get `421 4.7.0`",
        comment="Sessions per worker; more get 421 4.7.0."),
    # Postfix's smtpd_client_connection_count_limit default.
    Setting(
        "max-connections-per-ip", Kind.INT, 50, _PROCESSES, metavar="N",
        check=at_least(0, "max-connections-per-ip must be 0 (no limit) or more"),
        help="connections per client address over all workers; more get 421 4.7.0 "
             "(default: %(default)s; 0: no limit)",
        doc="sessions per client address, counted over all workers; more get `421 4.7.0` (`0`: no limit)",
        comment="Sessions per client address over all workers (Postfix's smtpd_client_connection_count_limit); "
                "0: no limit."),
    # Port 25 needs root to bind; the workers need not keep it.  Checked
    # together with group, by config.py.
    Setting(
        "user", Kind.TEXT, "", _PROCESSES, shown_default="unchanged",
        help="serve mail as this user after binding the port (needs root)",
        doc="serve mail as this user after binding the port (port 25 needs root to bind); the mail root must "
            "be writable by it",
        comment="Serve mail as this user and group once the port is bound; \"\" keeps the current ones.  "
                "Changing them needs root."),
    Setting(
        "group", Kind.TEXT, "", _PROCESSES, shown_default="the user's own",
        help="and this group (default: the user's own)",
        doc="serve mail as this group after binding the port (needs root)", comment=""),
    Setting(
        "loop", Kind.TEXT, "uvloop", _PROCESSES, choices=LOOP_CHOICES,
        help="event loop (default: uvloop where installed)",
        doc="event loop; `asyncio` where uvloop is not installed",
        comment="\"uvloop\" (where installed) or \"asyncio\"."),
    Setting(
        "log-level", Kind.TEXT, "info", _LOGS, choices=LOG_LEVELS, help=None,
        doc="least severe records written; `info` logs one line per session and per message",
        comment="\"debug\", \"info\", \"warning\" or \"error\"."),
    Setting(
        "log-format", Kind.TEXT, "text", _LOGS, choices=LOG_FORMATS,
        help="text: Postfix-style key=value lines (default); json: one JSON object per line",
        doc="`text`: Postfix-style `key=value` lines; `json`: one JSON object per line (see Logs)",
        comment="\"text\" (Postfix-style key=value lines) or \"json\" (one object per line)."),
    Setting(
        "log-file", Kind.PATH, "", _LOGS, metavar="FILE", shown_default="stderr",
        help="append log lines to FILE instead of stderr; SIGUSR2 reopens it (log rotation)",
        doc="append log lines to FILE; `SIGUSR2` reopens it after rotation",
        comment="Append log lines to this file (relative: to this file's directory) instead of stderr; SIGUSR2 "
                "reopens it after rotation.  \"\" is stderr."),
    Setting(
        "policy", Kind.TEXT, "", _POLICY, metavar="MODULE:CLASS", check=_policy, shown_default="none",
        help="policy hooks: a class in an importable module, or FILE.py:CLASS "
             "(instantiated once per worker; see README, Policy hooks)",
        doc="policy hooks (see Policy hooks); also `path/to/file.py:CLASS`; a load error is one line at start",
        comment="Policy hooks: \"module:Class\" (importable) or \"path/to/file.py:Class\" (relative: to the "
                "working directory); \"\" for none.  See README."),
    # A DNS lookup that hangs must not hold the session for the idle timeout.
    Setting(
        "policy-timeout", Kind.SECONDS, 30.0, _POLICY, metavar="SECONDS",
        check=finite_and(above(0, "policy-timeout must be a positive number of seconds"),
                         "policy-timeout must be a positive number of seconds"),
        help="an async policy hook taking longer gets 451 4.3.0 (default: %(default)s)",
        doc="an async policy hook taking longer answers `451 4.3.0`",
        comment="Seconds an async policy hook may take before the command gets 451 4.3.0."),
    # STARTTLS is offered only with both (RFC 3207); config.py checks the pair.
    Setting(
        "tls-cert", Kind.PATH, "", _TLS, metavar="FILE", shown_default="none",
        help="PEM certificate chain: enables STARTTLS",
        doc="PEM certificate chain: with `--tls-key`, STARTTLS is offered (RFC 3207)",
        comment="PEM certificate chain and private key: STARTTLS is offered only with both."),
    Setting(
        "tls-key", Kind.PATH, "", _TLS, metavar="FILE", shown_default="none",
        help="PEM private key for --tls-cert",
        doc="PEM private key for `--tls-cert`", comment=""),
    Setting(
        "tls-listen", Kind.ENDPOINT, "", _TLS, metavar="HOST:PORT", shown_default="none",
        help="also listen with implicit TLS (port 465 style)",
        doc="a second listener with implicit TLS, port 465 style (RFC 8314 §3.3); needs `--tls-cert`",
        comment="A second listener with implicit TLS, e.g. \"0.0.0.0:465\" (RFC 8314 §3.3); \"\" for none.  "
                "Needs tls-cert and tls-key."),
    Setting(
        "proxy-trusted", Kind.STRINGS, (), _PROXY, metavar="CIDR", check=_networks("proxy-trusted"), shown_default="none",
        help="expect a PROXY protocol v1/v2 header from these networks (e.g. HAProxy)",
        doc="expect a PROXY protocol v1/v2 header, before the greeting, from peers in these networks (see "
            "More than one host)",
        comment="Networks (HAProxy, a load balancer) that send a PROXY v1/v2 header before the greeting, e.g. "
                "[\"10.0.0.0/8\", \"fd00::/8\"]; [] turns it off."),
    Setting(
        "proxy-timeout", Kind.SECONDS, 5.0, _PROXY, metavar="SECONDS",
        check=_seconds("proxy-timeout", positive=True),
        help="how long a trusted peer may take to send its PROXY header (default: %(default)s)",
        doc="how long a trusted peer may take to send its PROXY header",
        comment="Seconds a trusted peer may take to send its PROXY header."),
    # A client that talks first is an early talker (a spam engine that does
    # not wait for replies), as Postfix's postscreen and Haraka's
    # early_talker detect.
    Setting(
        "greeting-delay", Kind.SECONDS, 0.5, _ABUSE, metavar="SECONDS", check=at_least(0, _RATES),
        help="wait before the greeting; clients talking first get 554 (default: %(default)s; 0: off)",
        doc="wait before the greeting; a client talking first gets `554 5.5.0` and is closed (`0`: off)",
        comment="Seconds to wait before the greeting; a client that talks first is an early talker (a spam "
                "engine not waiting for replies) and gets 554.  0: off."),
    # Postfix's smtpd_soft_error_limit.
    Setting(
        "soft-error-limit", Kind.INT, 10, _ABUSE, metavar="N",
        check=at_least(0, "soft-error-limit must not be negative"),
        help="errors after which replies are delayed (default: %(default)s)",
        doc="errors in one session after which each error reply is delayed",
        comment="Past this many errors, each error reply is delayed by error-delay seconds per error over it "
                "(Postfix's smtpd_soft_error_limit)."),
    Setting(
        "error-delay", Kind.SECONDS, 1.0, _ABUSE, metavar="SECONDS", check=at_least(0, _RATES),
        help="delay per error over the soft limit (default: %(default)s)",
        doc="seconds of delay per error over `--soft-error-limit`", comment=""),
    # Postfix's smtpd_min_data_rate.
    Setting(
        "min-data-rate", Kind.INT, 500, _ABUSE, metavar="BYTES_PER_S", check=at_least(0, _RATES),
        help="cut off message data slower than this (default: %(default)s; 0: off)",
        doc="message data slower than this many bytes per second, after a 16 KiB allowance, is cut off with "
            "`421` (`0`: off)",
        comment="Bytes per second: message data slower than this (after a 16 KiB allowance) is cut off with 421 "
                "(Postfix's smtpd_min_data_rate); 0: off."),
    Setting(
        "trusted-networks", Kind.STRINGS, ("127.0.0.0/8", "::1/128"), _TRUST, metavar="CIDR",
        check=_networks("trusted-networks"), shown_default="`127.0.0.0/8 ::1/128`",
        help="clients in these networks skip the per-address limit, the greeting delay, DNSBL, greylisting and "
             "the authentication checks (default: loopback)",
        doc="clients in these networks (local relays, test harnesses, monitoring) skip the per-address connection "
            "limit, the greeting delay, DNSBL scores and greylisting (as Postfix's $mynetworks) and the SPF, DKIM, "
            "DMARC and ARC checks (as OpenDMARC's IgnoreHosts); line, size, error and time limits still apply",
        comment="Networks whose clients are ours (local relays, test harnesses, probes): they skip the "
                "per-address connection limit, the greeting delay, DNSBL scores, greylisting and the SPF, DKIM, "
                "DMARC and ARC checks.  Limits on lines, sizes, errors and time still apply.  [] trusts no one."),
    # postscreen's postscreen_greet_ttl (1 day).
    Setting(
        "greeting-pass-ttl", Kind.SECONDS, 86400.0, _SCREEN, metavar="SECONDS",
        check=_seconds("greeting-pass-ttl", positive=False),
        help="how long a greeting test result is remembered, by all workers and across restarts (default: "
             "%(default)s; 0: not remembered)",
        doc="how long a client's greeting test is remembered, by all workers and across restarts: one that waited "
            "is greeted at once, an early talker gets `554 5.5.0` at once (`0`: every connection is tested)",
        comment="Seconds a client's greeting test is remembered (postscreen_greet_ttl), by all workers and across "
                "restarts: a client that waited is then greeted at once, an early talker refused with 554 5.5.0 "
                "at once.  0: every connection waits."),
    Setting(
        "dnsbl-sites", Kind.STRINGS, (), _SCREEN, metavar="SITE", check=_dnsbl_sites, shown_default="none",
        help="DNSBL/DNSWL sites as postscreen writes them: domain[=filter][*weight] (default: none)",
        doc="DNSBL and DNSWL sites (RFC 5782) in postscreen's syntax, `domain[=d.d.d.d][*weight]`, e.g. "
            "`zen.example=127.0.0.[2..11]*3 white.example=127.0.[0..255].[0..255]*-2`; asked at once while the "
            "greeting waits",
        comment="DNSBL and DNSWL sites (RFC 5782) as postscreen_dnsbl_sites writes them, "
                "domain[=d.d.d.d][*weight], e.g. [\"zen.example=127.0.0.[2..11]*3\", \"list.example*2\", "
                "\"white.example=127.0.[0..255].[0..255]*-2\"].  The weights of the sites that list a client "
                "add up; a negative weight is an allow-list."),
    Setting(
        "dnsbl-threshold", Kind.INT, 1, _SCREEN, metavar="SCORE",
        check=at_least(1, "dnsbl-threshold must be at least 1"),
        help="a DNSBL score at or over this is refused with 554 5.7.1 (default: %(default)s)",
        doc="a DNSBL score at or over this gets `554 5.7.1 Service unavailable; client [ADDR] blocked using "
            "LIST`; a negative score skips greylisting",
        comment="A score at or over this is refused with 554 5.7.1 (postscreen_dnsbl_threshold); a negative "
                "score (allow-listed) skips greylisting."),
    Setting(
        "greylist", Kind.TEXT, "off", _SCREEN, choices=("off", "on"),
        help="greylist (client network, sender, recipient) triplets: 451 4.7.1 on a first attempt "
             "(default: %(default)s; --greylist alone: on)",
        doc="greylisting (RFC 6647): a new (client /24 or /64, sender, recipient) gets `451 4.7.1` until it "
            "retries after `--greylist-delay`",
        comment="Greylisting (RFC 6647): a new (client /24 or /64, sender, recipient) triplet gets 451 4.7.1 "
                "until the client retries after greylist-delay.  \"off\" or \"on\"."),
    Setting(
        "greylist-delay", Kind.SECONDS, 300.0, _SCREEN, metavar="SECONDS",
        check=_seconds("greylist-delay", positive=False),
        help="how long a new triplet is refused (default: %(default)s)",
        doc="how long a new triplet is refused with `451`", comment="Seconds a new triplet is refused."),
    Setting(
        "greylist-window", Kind.SECONDS, 172800.0, _SCREEN, metavar="SECONDS",
        check=_seconds("greylist-window", positive=True),
        help="how long after its first attempt a triplet's retry still counts (default: %(default)s)",
        doc="how long after its first attempt a retry still passes; later, the triplet starts again",
        comment="Seconds after its first attempt within which a retry passes (2 days); later, it starts again."),
    Setting(
        "greylist-lifetime", Kind.SECONDS, 3024000.0, _SCREEN, metavar="SECONDS",
        check=_seconds("greylist-lifetime", positive=True),
        help="how long a passed triplet or client is remembered after its last use (default: %(default)s)",
        doc="how long a passed triplet, or an allowed client, is remembered after its last use (35 days)",
        comment="Seconds a passed triplet or allowed client is remembered after its last use (35 days)."),
    Setting(
        "greylist-auto-allow", Kind.INT, 5, _SCREEN, metavar="N",
        check=at_least(0, "greylist-auto-allow must not be negative"),
        help="a client network that passed N triplets skips greylisting (default: %(default)s; 0: never)",
        doc="a client network that has passed greylisting with this many triplets skips it (`0`: never)",
        comment="A client network that has passed greylisting with this many triplets is allowed without "
                "triplets (postgrey's auto-whitelist-clients).  0: never."),
    Setting(
        "screen-db", Kind.PATH, "", _SCREEN, metavar="FILE", shown_default="`MAIL_ROOT/.screen/screen.db`",
        help="the SQLite file of the greeting tests and greylisting, shared by the workers "
             "(default: MAIL_ROOT/.screen/screen.db)",
        doc="the SQLite file (WAL) of the remembered greeting tests and the greylisting triplets, shared by the "
            "workers and kept across restarts",
        comment="The SQLite file (WAL mode) that holds the greeting tests and the greylisting triplets, shared "
                "by the workers and kept across restarts.  \"\": MAIL_ROOT/.screen/screen.db."),
    Setting(
        "spf", Kind.TEXT, "tag", _AUTH, choices=AUTH_MODES,
        help="SPF (RFC 7208) for MAIL FROM and HELO: off, tag or enforce (default: %(default)s)",
        doc="SPF (RFC 7208) of the MAIL FROM and HELO identities: `off`, `tag` (reported in "
            "Authentication-Results) or `enforce` (fail gets `550 5.7.23`, temperror `451 4.7.24`)",
        comment="SPF (RFC 7208) of MAIL FROM and HELO: \"off\", \"tag\" (reported in Authentication-Results) "
                "or \"enforce\" (fail: 550 5.7.23; temperror: 451 4.7.24)."),
    Setting(
        "spf-reject-at", Kind.TEXT, "data", _AUTH, choices=SPF_REJECT_AT,
        help="when spf=enforce refuses an SPF fail: at the end of data, or at MAIL (default: %(default)s)",
        doc="with `--spf enforce`: refuse an SPF fail at the end of `data` (after the content) or already at "
            "`mail`",
        comment="With spf = \"enforce\": refuse an SPF fail at the end of \"data\", or already at \"mail\" "
                "FROM."),
    Setting(
        "dkim", Kind.TEXT, "tag", _AUTH, choices=AUTH_MODES,
        help="DKIM (RFC 6376) signatures: off, tag or enforce (default: %(default)s)",
        doc="DKIM (RFC 6376, 8301, 8463) verification of every signature: `off`, `tag` or `enforce` (a signed "
            "message none of whose signatures passes gets `550 5.7.20`; temperror `451 4.7.5`)",
        comment="DKIM (RFC 6376) verification of every signature: \"off\", \"tag\" or \"enforce\" (signed "
                "but no signature passes: 550 5.7.20; temperror: 451 4.7.5; unsigned mail passes)."),
    Setting(
        "dmarc", Kind.TEXT, "tag", _AUTH, choices=AUTH_MODES,
        help="DMARC (RFC 7489) of the From: domain: off, tag or enforce (default: %(default)s)",
        doc="DMARC (RFC 7489) of the From: domain: `off`, `tag` or `enforce` (p=reject gets `550 5.7.1`, "
            "p=quarantine goes into the mailbox's `.Junk` folder when it has one; temperror `451 4.7.1`)",
        comment="DMARC (RFC 7489) of the From: domain: \"off\", \"tag\" or \"enforce\" (p=reject: 550 "
                "5.7.1; p=quarantine: stored with X-Quarantine, into the mailbox's .Junk folder when there is "
                "one; temperror: 451 4.7.1)."),
    Setting(
        "arc", Kind.TEXT, "tag", _AUTH, choices=AUTH_MODES,
        help="ARC (RFC 8617) chain validation: off, tag or enforce (default: %(default)s)",
        doc="ARC (RFC 8617) chain validation, reported as `arc=` (cv): `off`, `tag` or `enforce` (a failed "
            "chain gets `550 5.7.29`)",
        comment="ARC (RFC 8617) chain validation: \"off\", \"tag\" or \"enforce\" (a failed chain: 550 "
                "5.7.29)."),
    Setting(
        "auth-timeout", Kind.SECONDS, 10.0, _AUTH, metavar="SECONDS",
        check=_seconds("auth-timeout", positive=True),
        help="the most the checks may keep a client waiting after its data (default: %(default)s)",
        doc="the budget of the checks: SPF's from MAIL, the rest's from the end of data; what has not answered "
            "by then is `temperror`",
        comment="Seconds the checks may take: SPF's from MAIL on, the rest from the end of data on; what has not "
                "answered by then is temperror."),
    Setting(
        "dns-server", Kind.STRINGS, (), _DNS, metavar="HOST:PORT", check=_dns_servers,
        shown_default="/etc/resolv.conf",
        help="DNS servers to ask, in order (default: those of /etc/resolv.conf)",
        doc="DNS servers (`HOST`, `HOST:PORT`, `[IPv6]:PORT`) the checks ask, in order; none: those of "
            "`/etc/resolv.conf`",
        comment="DNS servers to ask, in order, e.g. [\"127.0.0.1:53\"] (a local caching resolver is best); [] "
                "uses /etc/resolv.conf."),
    Setting(
        "dns-timeout", Kind.SECONDS, 3.0, _DNS, metavar="SECONDS", check=_seconds("dns-timeout", positive=True),
        help="the most one DNS question may take, retries included (default: %(default)s)",
        doc="the most one DNS question may take, retries and the TCP fallback included",
        comment="Seconds one DNS question may take, retries and TCP fallback included."),
    Setting(
        "milter", Kind.STRINGS, (), _MILTER, metavar="ENDPOINT", check=_milters, shown_default="none",
        help="milters to ask at each step, in order: inet:HOST:PORT or unix:/path (default: none)",
        doc="milters (the libmilter protocol, version 6) asked at connect, HELO, MAIL, RCPT and the end of data, "
            "in order, as Postfix's smtpd_milters: `inet:HOST:PORT`, `inet:PORT@HOST` or `unix:/path`",
        comment="Milters asked at each SMTP step, in order (Postfix's smtpd_milters), e.g. "
                "[\"inet:127.0.0.1:11332\"] for rspamd or [\"unix:/run/opendkim/opendkim.sock\"]."),
    Setting(
        "milter-default-action", Kind.TEXT, "tempfail", _MILTER, choices=("tempfail", "accept", "reject"),
        help="when a milter is down, times out or speaks garbage (default: %(default)s)",
        doc="what a step gets when a milter is down, times out or breaks the protocol: `tempfail` (`451 4.7.1`), "
            "`accept` (the milter is skipped) or `reject` (`550 5.7.1`), as Postfix's milter_default_action",
        comment="When a milter is down, too slow or speaks garbage (Postfix's milter_default_action): "
                "\"tempfail\" (451 4.7.1), \"accept\" (skip it) or \"reject\" (550 5.7.1)."),
    Setting(
        "milter-connect-timeout", Kind.SECONDS, 30.0, _MILTER, metavar="SECONDS",
        check=_seconds("milter-connect-timeout", positive=True),
        help="connecting to a milter and negotiating (default: %(default)s)",
        doc="the most connecting to a milter and negotiating may take",
        comment="Seconds to connect to a milter and negotiate (milter_connect_timeout)."),
    Setting(
        "milter-command-timeout", Kind.SECONDS, 30.0, _MILTER, metavar="SECONDS",
        check=_seconds("milter-command-timeout", positive=True),
        help="a milter's answer to one step (default: %(default)s)",
        doc="the most a milter may take to answer connect, HELO, MAIL, RCPT, a field",
        comment="Seconds a milter may take per step (milter_command_timeout)."),
    Setting(
        "milter-content-timeout", Kind.SECONDS, 300.0, _MILTER, metavar="SECONDS",
        check=_seconds("milter-content-timeout", positive=True),
        help="a milter's answer to the body and its end (default: %(default)s)",
        doc="the most a milter may take to answer a body packet or the end of the message",
        comment="Seconds a milter may take for the body and the end of the message (milter_content_timeout)."),
    Setting(
        "metrics", Kind.ENDPOINT, "", _MONITORING, metavar="HOST:PORT", shown_default="off",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (default: off; "
             "no authentication, so keep it on 127.0.0.1; port 0 picks a free port)",
        doc="serve Prometheus metrics at `http://HOST:PORT/metrics` (counters summed over all workers, kept "
            "across worker restarts); no authentication, so use `127.0.0.1` or a private address",
        comment="Serve Prometheus metrics at http://HOST:PORT/metrics, e.g. \"127.0.0.1:9125\"; \"\" turns it "
                "off.  No authentication: keep it on loopback or a private network."),
)

#: The rows by key (the TOML key, the flag without its dashes).
BY_KEY: Mapping[str, Setting] = MappingProxyType({s.key: s for s in SETTINGS})
