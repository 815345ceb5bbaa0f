"""The ``fastsmtp`` command: ``serve``, ``config check|show|example``, ``mailbox add|list``, ``--version``.

A bad flag, a bad configuration file or an unusable mail root gives one
line on stderr and a non-zero exit, never a traceback.

Settings come in three layers (``config.layer``): the built-in defaults,
then the TOML file of ``--config``, then the flags actually given on the
command line.  argparse's own defaults serve only ``--help``: the command
line is parsed a second time with every default suppressed, so that a flag
left out never overrides the file.

The flags of ``serve`` and ``config show`` are the rows of the settings
table (settings.py): their names, types, choices, metavars, defaults and
help all come from there.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import Any

from ._version import __version__
from .config import Config, ConfigError, field_values, layer, parse_size, server_defaults, to_toml
from .settings import SETTINGS, Kind, Setting, example_toml, format_size

__all__ = ["main"]

DEFAULT_MAIL_ROOT = Config().mail_root


class _Parser(argparse.ArgumentParser):
    def convert_arg_line_to_args(self, arg_line: str) -> list[str]:
        """One line of an @FILE: words as a shell splits them; # starts a comment."""
        return shlex.split(arg_line, comments=True)


def _size(value: str) -> int:
    """Bytes, with an optional K/M/G suffix (powers of 1024)."""
    try:
        return parse_size(value)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_flag(parser: argparse.ArgumentParser, setting: Setting) -> None:
    """``--KEY``, typed by the setting's kind; its default serves only ``--help``."""
    options: dict[str, Any] = {"help": setting.help}
    if setting.metavar is not None:
        options["metavar"] = setting.metavar
    if setting.choices:
        options["choices"] = setting.choices
        if setting.choices == ("off", "on"):
            # A switch: "--greylist" alone turns it on.
            options["nargs"], options["const"] = "?", "on"
    default = setting.default
    if setting.machine_default is not None:
        default = setting.machine_default()
    if setting.kind is Kind.SIZE:
        assert isinstance(default, int)
        # argparse passes a string default through type=, so "25M" shows in
        # --help and still parses to bytes.
        options["type"], default = _size, format_size(default)
    elif setting.kind is Kind.INT:
        options["type"] = int
    elif setting.kind is Kind.SECONDS:
        options["type"] = float
    elif setting.kind is Kind.STRINGS:
        assert isinstance(default, tuple)
        options["nargs"], options["action"], default = "+", _Repeatable, list(default)
    parser.add_argument(f"--{setting.key}", default=default, **options)


class _Repeatable(argparse.Action):
    """A list flag given as ``--milter A B`` or ``--milter A --milter B``, in order.

    Its first use in a command line replaces the default (``--trusted-networks
    X`` means only X); later ones add to it.
    """

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        given: set[str] = namespace.__dict__.setdefault("_repeated", set())
        items = list(getattr(namespace, self.dest, None) or []) if self.dest in given else []
        given.add(self.dest)
        setattr(namespace, self.dest, items + list(values))


def _flag_values(given: argparse.Namespace) -> dict[str, Any]:
    """The flags in ``given`` as Config field values (paths made absolute)."""
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        dest = setting.key.replace("-", "_")
        if not hasattr(given, dest):  # not given (explicit_only)
            continue
        value: Any = getattr(given, dest)
        if setting.kind is Kind.PATH and value:
            value = os.path.abspath(value)
        elif setting.kind is Kind.STRINGS:
            value = tuple(value)
        values.update(field_values(setting, value))
    return values


def build_parser(*, explicit_only: bool = False) -> argparse.ArgumentParser:
    """The command line; with ``explicit_only``, only flags given appear in serve's namespace."""
    # "@FILE" reads more arguments from FILE (shell-style words, # comments);
    # SIGHUP reads it again, and the --config file too, which is how a
    # running server is reconfigured.
    parser = _Parser(prog="fastsmtp", description="A fast, durable inbound SMTP server.", fromfile_prefix_chars="@")
    parser.add_argument("--version", action="version", version=f"fastsmtp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # serve's flags, held by a parent parser that "serve" and "config show"
    # both take them from (argparse parents share the same actions).  Each
    # flag is a row of the settings table.
    serve = _Parser(add_help=False)
    serve.add_argument("--config", metavar="FILE",
                       help="read settings from this TOML file; flags given here override it")
    for setting in SETTINGS:
        _add_flag(serve, setting)
    if explicit_only:
        for action in serve._actions:  # the parents share these action objects
            action.default = argparse.SUPPRESS
    sub.add_parser("serve", parents=[serve], help="receive mail")

    config = sub.add_parser("config", help="check a configuration file, or show the effective configuration")
    config_sub = config.add_subparsers(dest="action", required=True, metavar="ACTION")
    check = config_sub.add_parser("check", help="validate a TOML file: prints 'FILE: ok', or the error (exit 2)")
    check.add_argument("file", metavar="FILE")
    config_sub.add_parser("show", parents=[serve],
                          help="print the effective configuration as TOML: defaults, then --config FILE, "
                               "then the flags given (those of serve)")
    config_sub.add_parser("example", help="print an example configuration file: every setting at its default, "
                                          "with what it means")

    journal = sub.add_parser("journal", help="mail waiting for the LMTP backends (--deliver lmtp:...), and the "
                                             "dead letters")
    journal_sub = journal.add_subparsers(dest="action", required=True, metavar="ACTION")
    journal_sub.add_parser("list", parents=[serve], help="the messages waiting for the LMTP backends, and the dead "
                                                         "letters (takes serve's flags and --config)")
    journal_sub.add_parser("retry", parents=[serve], help="have every running worker try its deferred LMTP "
                                                          "deliveries now")
    again = journal_sub.add_parser("redeliver", parents=[serve], help="deliver dead letters over LMTP again; "
                                                                      "each one taken is removed")
    again.add_argument("names", nargs="*", metavar="FILE", help="dead letters by file name (default: all)")

    mailbox = sub.add_parser("mailbox", help="create and list Maildir mailboxes")
    mailbox_sub = mailbox.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = mailbox_sub.add_parser("add", help="create MAIL_ROOT/<domain>/<user>/{tmp,new,cur}")
    add.add_argument("address", help="user@domain")
    add.add_argument("--mail-root", default=DEFAULT_MAIL_ROOT, metavar="DIR")
    lst = mailbox_sub.add_parser("list", help="list the mailboxes under the mail root")
    lst.add_argument("--mail-root", default=DEFAULT_MAIL_ROOT, metavar="DIR")
    return parser


def _config_from(argv: list[str]) -> Config:
    """The validated Config of a serve (or config show) command line, with its --config file.

    ``argv`` must already parse.  The file is read here, so calling this
    again (SIGHUP) reads the file again.
    """
    given = build_parser(explicit_only=True).parse_args(argv)
    return layer(server_defaults(), getattr(given, "config", None), _flag_values(given))


def _serve(argv: list[str]) -> int:
    from .policy import ensure_mail_root

    config = _config_from(argv)
    if config.mail_root == os.path.abspath(DEFAULT_MAIL_ROOT) or os.path.isdir(config.mail_root):
        # The default root is created on first start so that a new user can
        # send a first message at once; an explicit root must already exist
        # (a typo should not silently become a new, empty mail store).
        if ensure_mail_root(config.mail_root):
            print(f"created {config.mail_root} with mailbox postmaster@localhost", flush=True)
    else:
        raise ConfigError(
            f"mail root {config.mail_root} does not exist; create a mailbox in it with "
            f"'fastsmtp mailbox add USER@DOMAIN --mail-root {config.mail_root}'"
        )
    _check_tls(config)
    _check_policy(config)
    if not os.access(config.mail_root, os.W_OK | os.X_OK):
        raise ConfigError(f"mail root {config.mail_root} is not writable")
    from .logs import setup_logging
    from .worker import run_worker

    setup_logging(config.log_level, config.log_format, config.log_file, "supervisor" if config.workers else "")
    if config.workers == 0:
        return run_worker(config)
    from .supervisor import Supervisor

    def reload() -> Config:
        # SIGHUP re-reads the same command line, @FILE argument files and
        # the --config file included, so what those files say takes effect.
        try:
            build_parser().parse_args(argv)
        except SystemExit:
            raise ConfigError("the command line no longer parses (see the message above)") from None
        return _config_from(argv)

    return Supervisor(config, reload).run()


def _check_tls(config: Config) -> None:
    if config.tls_cert:
        from .tls import server_context

        try:
            server_context(config.tls_cert, config.tls_key)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"tls-cert/tls-key: cannot load {config.tls_cert}: {exc}") from None


def _check_policy(config: Config) -> None:
    """Load the policy once here, so that a typo is one line at start, not a worker boot loop."""
    if config.policy:
        from .hooks import load_policy
        from .stages import resolve

        try:
            resolve([("policy", load_policy(config.policy), config.policy_timeout)])
        except TypeError as exc:  # a hook name that is not a method
            raise ConfigError(f"policy: {exc}") from None


def _config(args: argparse.Namespace, argv: list[str]) -> int:
    if args.action == "check":
        # The file alone, over the built-in defaults, as serve would take it.
        config = layer(server_defaults(), args.file, {})
        try:
            _check_tls(config)
            _check_policy(config)
        except ConfigError as exc:
            raise ConfigError(f"{args.file}: {exc}") from None
        print(f"{args.file}: ok")
        return 0
    if args.action == "example":
        sys.stdout.write(example_toml())
        return 0
    # "config show" has the flags of serve, so its command line reads the same.
    sys.stdout.write(to_toml(_config_from(argv)))
    return 0


def _journal(args: argparse.Namespace, argv: list[str]) -> int:
    from . import journalcli

    config = _config_from(argv)
    if args.action == "list":
        waiting = journalcli.pending(config.journal_dir)
        for line in waiting:
            print(line)
        dead = journalcli.dead_letters(config.dead_letter)
        for path, refusals in dead:
            words = "; ".join(f"<{r.decode('utf-8', 'replace')}> {code} {text}" for r, code, text in refusals)
            print(f"dead  {path.name}  {words}")
        print(f"{len(waiting)} waiting for the LMTP backends, {len(dead)} dead letter(s) in {config.dead_letter}")
        return 0
    if args.action == "retry":
        told = journalcli.retry(config.journal_dir)
        print(f"told {len(told)} worker(s): " + " ".join(map(str, told)) if told else "no running worker found")
        return 0 if told else 1
    if config.deliver == ("maildir",):
        raise ConfigError("journal redeliver needs --deliver lmtp:... (or the --config that has it)")
    results = journalcli.redeliver(config, args.names)
    for line in results:
        print(line)
    return 0 if all(": delivered" in line for line in results) else 1


def _mailbox(args: argparse.Namespace) -> int:
    from .policy import add_mailbox, list_mailboxes

    root = os.path.abspath(args.mail_root)
    if args.action == "add":
        os.makedirs(root, exist_ok=True)
        path = add_mailbox(root, args.address)
        print(f"created {path}")
    else:
        if not os.path.isdir(root):
            raise ConfigError(f"mail root {root} does not exist")
        for name in list_mailboxes(root):
            print(name)
    return 0


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(argv)
        if args.command == "config":
            return _config(args, argv)
        if args.command == "journal":
            return _journal(args, argv)
        return _mailbox(args)
    except (ConfigError, ValueError, OSError) as exc:
        print(f"fastsmtp: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
