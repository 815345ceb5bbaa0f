"""The ``fastsmtp`` command: ``serve``, ``mailbox add|list``, ``--version``.

A bad flag or an unusable mail root gives one line on stderr and a
non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import fields

from ._version import __version__
from .config import BARE_LF_CHOICES, FSYNC_CHOICES, Config, ConfigError, parse_listen

__all__ = ["main"]

DEFAULT_MAIL_ROOT = "mail"
_DEFAULTS = {f.name: f.default for f in fields(Config)}


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
    parser = argparse.ArgumentParser(prog="fastsmtp", description="A fast, durable inbound SMTP server.")
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
    serve.add_argument("--workers", type=int, default=_DEFAULTS["workers"], metavar="N",
                       help="worker processes (default: %(default)s; 0 runs in the foreground process)")
    serve.add_argument("--loop", choices=("uvloop", "asyncio"), default=_DEFAULTS["loop"],
                       help="event loop (default: uvloop where installed)")
    serve.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))

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
        loop=args.loop,
    ).validate()


def _serve(args: argparse.Namespace) -> int:
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
    if not os.access(config.mail_root, os.W_OK | os.X_OK):
        raise ConfigError(f"mail root {config.mail_root} is not writable")
    if config.workers > 1:
        raise ConfigError("--workers above 1 needs the multi-process supervisor, which this version lacks")
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s fastsmtp[%(process)d] %(levelname)s %(message)s",
    )
    from .worker import run_worker

    return run_worker(config)


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
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        return _mailbox(args)
    except (ConfigError, ValueError, OSError) as exc:
        print(f"fastsmtp: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
