"""The ``fastsmtp`` command: ``serve``, ``config check|show``, ``mailbox add|list``, ``--version``.

A bad flag, a bad configuration file or an unusable mail root gives one
line on stderr and a non-zero exit, never a traceback.

Settings come in three layers (``config.layer``): the built-in defaults,
then the TOML file of ``--config``, then the flags actually given on the
command line.  argparse's own defaults serve only ``--help``: the command
line is parsed a second time with every default suppressed, so that a flag
left out never overrides the file.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from dataclasses import fields

from ._version import __version__
from .config import (
    BARE_LF_CHOICES,
    FSYNC_CHOICES,
    LOG_FORMATS,
    PATH_FIELDS,
    Config,
    ConfigError,
    layer,
    parse_listen,
    parse_size,
    server_defaults,
    to_toml,
    usable_cpus,
)

__all__ = ["main"]

DEFAULT_MAIL_ROOT = "mail"
_DEFAULTS = {f.name: f.default for f in fields(Config)}


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


def build_parser(*, explicit_only: bool = False) -> argparse.ArgumentParser:
    """The command line; with ``explicit_only``, only flags given appear in serve's namespace."""
    # "@FILE" reads more arguments from FILE (shell-style words, # comments);
    # SIGHUP reads it again, and the --config file too, which is how a
    # running server is reconfigured.
    parser = _Parser(prog="fastsmtp", description="A fast, durable inbound SMTP server.", fromfile_prefix_chars="@")
    parser.add_argument("--version", action="version", version=f"fastsmtp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # serve's flags, held by a parent parser that "serve" and "config show"
    # both take them from (argparse parents share the same actions).
    serve = _Parser(add_help=False)
    serve.add_argument("--config", metavar="FILE",
                       help="read settings from this TOML file; flags given here override it")
    serve.add_argument("--listen", default=f"{_DEFAULTS['host']}:{_DEFAULTS['port']}", metavar="HOST:PORT",
                       help="address to listen on (default: %(default)s; port 0 picks a free port)")
    serve.add_argument("--mail-root", default=DEFAULT_MAIL_ROOT, metavar="DIR",
                       help="Maildir tree MAIL_ROOT/<domain>/<user>/ (default: ./%(default)s)")
    serve.add_argument("--hostname", default="", help="name in the greeting and Received headers (default: FQDN)")
    serve.add_argument("--max-message-size", type=_size, default=_DEFAULTS["max_message_size"], metavar="BYTES",
                       help="largest message accepted, advertised as SIZE (default: 25M)")
    serve.add_argument("--max-recipients", type=int, default=_DEFAULTS["max_recipients"], metavar="N",
                       help="recipients per message (default: %(default)s)")
    serve.add_argument("--max-errors", type=int, default=_DEFAULTS["max_errors"], metavar="N",
                       help="errors before a session is closed with 421 (default: %(default)s)")
    serve.add_argument("--idle-timeout", type=float, default=_DEFAULTS["idle_timeout"], metavar="SECONDS",
                       help="close a silent session with 421 (default: %(default)s)")
    serve.add_argument("--recipient-delimiter", default=_DEFAULTS["recipient_delimiter"], metavar="CHAR",
                       help="user+tag delivers to user (default: %(default)s; empty disables)")
    serve.add_argument("--fsync", choices=FSYNC_CHOICES, default=_DEFAULTS["fsync"],
                       help="batch: group commit (default); always: one flush per message; off: UNSAFE, benchmarks only")
    serve.add_argument("--bare-lf", choices=BARE_LF_CHOICES, default=_DEFAULTS["bare_lf"],
                       help="a message with a bare CR or LF: reject with 550 (default) or normalize to CRLF")
    serve.add_argument("--workers", type=int, default=usable_cpus(), metavar="N",
                       help="worker processes under a supervisor (default: the CPUs, here %(default)s; "
                            "0 serves in the foreground process)")
    serve.add_argument("--worker-timeout", type=float, default=_DEFAULTS["worker_timeout"], metavar="SECONDS",
                       help="kill and replace a worker whose event loop is stuck this long (default: %(default)s)")
    serve.add_argument("--shutdown-timeout", type=float, default=_DEFAULTS["shutdown_timeout"], metavar="SECONDS",
                       help="on SIGTERM, how long transactions in progress may take to finish (default: %(default)s)")
    serve.add_argument("--max-connections", type=int, default=_DEFAULTS["max_connections"], metavar="N",
                       help="connections per worker; more get 421 4.7.0 (default: %(default)s)")
    serve.add_argument("--max-connections-per-ip", type=int, default=_DEFAULTS["max_connections_per_ip"],
                       metavar="N", help="connections per client address over all workers; more get 421 4.7.0 "
                                         "(default: %(default)s; 0: no limit)")
    serve.add_argument("--user", default="", help="serve mail as this user after binding the port (needs root)")
    serve.add_argument("--group", default="", help="and this group (default: the user's own)")
    serve.add_argument("--loop", choices=("uvloop", "asyncio"), default=_DEFAULTS["loop"],
                       help="event loop (default: uvloop where installed)")
    serve.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    serve.add_argument("--log-format", default=_DEFAULTS["log_format"], choices=LOG_FORMATS,
                       help="text: Postfix-style key=value lines (default); json: one JSON object per line")
    serve.add_argument("--log-file", default="", metavar="FILE",
                       help="append log lines to FILE instead of stderr; SIGUSR2 reopens it (log rotation)")
    serve.add_argument("--policy", default="", metavar="MODULE:CLASS",
                       help="policy hooks: a class in an importable module, or FILE.py:CLASS "
                            "(instantiated once per worker; see README, Policy hooks)")
    serve.add_argument("--policy-timeout", type=float, default=_DEFAULTS["policy_timeout"], metavar="SECONDS",
                       help="an async policy hook taking longer gets 451 4.3.0 (default: %(default)s)")
    serve.add_argument("--tls-cert", default="", metavar="FILE", help="PEM certificate chain: enables STARTTLS")
    serve.add_argument("--tls-key", default="", metavar="FILE", help="PEM private key for --tls-cert")
    serve.add_argument("--tls-listen", default="", metavar="HOST:PORT",
                       help="also listen with implicit TLS (port 465 style)")
    serve.add_argument("--proxy-trusted", nargs="+", default=[], metavar="CIDR",
                       help="expect a PROXY protocol v1/v2 header from these networks (e.g. HAProxy)")
    serve.add_argument("--proxy-timeout", type=float, default=_DEFAULTS["proxy_timeout"], metavar="SECONDS",
                       help="how long a trusted peer may take to send its PROXY header (default: %(default)s)")
    serve.add_argument("--greeting-delay", type=float, default=_DEFAULTS["greeting_delay"], metavar="SECONDS",
                       help="wait before the greeting; clients talking first get 554 (default: %(default)s; 0: off)")
    serve.add_argument("--soft-error-limit", type=int, default=_DEFAULTS["soft_error_limit"], metavar="N",
                       help="errors after which replies are delayed (default: %(default)s)")
    serve.add_argument("--error-delay", type=float, default=_DEFAULTS["error_delay"], metavar="SECONDS",
                       help="delay per error over the soft limit (default: %(default)s)")
    serve.add_argument("--min-data-rate", type=int, default=_DEFAULTS["min_data_rate"], metavar="BYTES_PER_S",
                       help="cut off message data slower than this (default: %(default)s; 0: off)")
    serve.add_argument("--max-command-line", type=int, default=_DEFAULTS["max_command_line"], metavar="BYTES",
                       help="longest command line, CRLF included (default: %(default)s; at least 512)")
    serve.add_argument("--spill-threshold", type=_size, default=_DEFAULTS["spill_threshold"], metavar="BYTES",
                       help="message bytes held in memory before spilling to tmp/ (default: 256K)")
    serve.add_argument("--metrics", default=_DEFAULTS["metrics"], metavar="HOST:PORT",
                       help="serve Prometheus metrics at http://HOST:PORT/metrics (default: off; "
                            "no authentication, so keep it on 127.0.0.1; port 0 picks a free port)")
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
    names = {f.name for f in fields(Config)}
    flags: dict[str, object] = {}
    for name, value in vars(given).items():
        if name == "listen":
            flags["host"], flags["port"] = parse_listen(value)
        elif name in PATH_FIELDS:
            flags[name] = os.path.abspath(value) if value else value
        elif name in names:
            flags[name] = tuple(value) if isinstance(value, list) else value
    return layer(server_defaults(), getattr(given, "config", None), flags)


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
        from .hooks import load_policy, resolve_hooks

        resolve_hooks(load_policy(config.policy))


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
    # "config show" has the flags of serve, so its command line reads the same.
    sys.stdout.write(to_toml(_config_from(argv)))
    return 0


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
        return _mailbox(args)
    except (ConfigError, ValueError, OSError) as exc:
        print(f"fastsmtp: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
