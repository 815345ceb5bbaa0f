"""The ``fastsmtp`` command: ``serve``, ``mailbox add|list``, ``--version``.

A bad flag or an unusable mail root gives one line on stderr and a
non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from dataclasses import fields

from ._version import __version__
from .config import BARE_LF_CHOICES, FSYNC_CHOICES, Config, ConfigError, parse_listen, usable_cpus

__all__ = ["main"]

DEFAULT_MAIL_ROOT = "mail"
_DEFAULTS = {f.name: f.default for f in fields(Config)}


class _Parser(argparse.ArgumentParser):
    def convert_arg_line_to_args(self, arg_line: str) -> list[str]:
        """One line of an @FILE: words as a shell splits them; # starts a comment."""
        return shlex.split(arg_line, comments=True)


def _size(value: str) -> int:
    """Bytes, with an optional K/M/G suffix (powers of 1024)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = value.strip().upper().removesuffix("B").removesuffix("I")
    scale = units.get(text[-1:], 1)
    number = text[:-1] if text[-1:] in units else text
    try:
        return int(float(number) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a size in bytes") from None


def build_parser() -> argparse.ArgumentParser:
    # "@FILE" reads more arguments from FILE (shell-style words, # comments);
    # SIGHUP reads it again, which is how a running server is reconfigured.
    parser = _Parser(prog="fastsmtp", description="A fast, durable inbound SMTP server.", fromfile_prefix_chars="@")
    parser.add_argument("--version", action="version", version=f"fastsmtp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="receive mail")
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
    serve.add_argument("--tls-cert", default="", metavar="FILE", help="PEM certificate chain: enables STARTTLS")
    serve.add_argument("--tls-key", default="", metavar="FILE", help="PEM private key for --tls-cert")
    serve.add_argument("--tls-listen", default="", metavar="HOST:PORT",
                       help="also listen with implicit TLS (port 465 style)")
    serve.add_argument("--proxy-trusted", nargs="+", default=[], metavar="CIDR",
                       help="expect a PROXY protocol v1/v2 header from these networks (e.g. HAProxy)")
    serve.add_argument("--proxy-timeout", type=float, default=_DEFAULTS["proxy_timeout"], metavar="SECONDS",
                       help="how long a trusted peer may take to send its PROXY header (default: %(default)s)")

    mailbox = sub.add_parser("mailbox", help="create and list Maildir mailboxes")
    mailbox_sub = mailbox.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = mailbox_sub.add_parser("add", help="create MAIL_ROOT/<domain>/<user>/{tmp,new,cur}")
    add.add_argument("address", help="user@domain")
    add.add_argument("--mail-root", default=DEFAULT_MAIL_ROOT, metavar="DIR")
    lst = mailbox_sub.add_parser("list", help="list the mailboxes under the mail root")
    lst.add_argument("--mail-root", default=DEFAULT_MAIL_ROOT, metavar="DIR")
    return parser


def _config_from(args: argparse.Namespace) -> Config:
    host, port = parse_listen(args.listen)
    return Config(
        host=host,
        port=port,
        mail_root=os.path.abspath(args.mail_root),
        hostname=args.hostname,
        max_message_size=args.max_message_size,
        max_recipients=args.max_recipients,
        max_errors=args.max_errors,
        idle_timeout=args.idle_timeout,
        recipient_delimiter=args.recipient_delimiter,
        fsync=args.fsync,
        bare_lf=args.bare_lf,
        workers=args.workers,
        worker_timeout=args.worker_timeout,
        shutdown_timeout=args.shutdown_timeout,
        max_connections=args.max_connections,
        max_connections_per_ip=args.max_connections_per_ip,
        user=args.user,
        group=args.group,
        loop=args.loop,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_listen=args.tls_listen,
        proxy_trusted=tuple(args.proxy_trusted),
        proxy_timeout=args.proxy_timeout,
    ).validate()


def _serve(args: argparse.Namespace, argv: list[str]) -> int:
    from .policy import ensure_mail_root

    config = _config_from(args)
    if args.mail_root == DEFAULT_MAIL_ROOT or os.path.isdir(config.mail_root):
        # The default root is created on first start so that a new user can
        # send a first message at once; an explicit root must already exist
        # (a typo should not silently become a new, empty mail store).
        if ensure_mail_root(config.mail_root):
            print(f"created {config.mail_root} with mailbox postmaster@localhost", flush=True)
    else:
        raise ConfigError(
            f"mail root {config.mail_root} does not exist; create a mailbox in it with "
            f"'fastsmtp mailbox add USER@DOMAIN --mail-root {args.mail_root}'"
        )
    if config.tls_cert:
        from .tls import server_context

        try:
            server_context(config.tls_cert, config.tls_key)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"tls-cert/tls-key: cannot load {config.tls_cert}: {exc}") from None
    if not os.access(config.mail_root, os.W_OK | os.X_OK):
        raise ConfigError(f"mail root {config.mail_root} is not writable")
    from .worker import log_format, run_worker

    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format=log_format("supervisor" if config.workers else ""),
    )
    if config.workers == 0:
        return run_worker(config)
    from .supervisor import Supervisor

    def reload() -> Config:
        # SIGHUP re-reads the same command line, @FILE argument files
        # included, so what those files say takes effect.
        try:
            again = build_parser().parse_args(argv)
        except SystemExit:
            raise ConfigError("the command line no longer parses (see the message above)") from None
        return _config_from(again)

    return Supervisor(config, reload).run()


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
            return _serve(args, argv)
        return _mailbox(args)
    except (ConfigError, ValueError, OSError) as exc:
        print(f"fastsmtp: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
