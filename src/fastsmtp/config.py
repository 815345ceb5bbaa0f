"""Configuration: one frozen value, validated once, picklable to workers.

Rules of this module:
- No module globals hold configuration; everything travels in ``Config``.
- Each setting is one row of ``settings.SETTINGS``: its key, kind, default,
  texts and check, and the reason for its default (every limit of DESIGN.md
  principle 5 has one).  ``Config`` is those rows written out as fields, so
  that type checkers and readers see them; this module checks at import that
  the fields are exactly the table's, with the same types and defaults.
- ``Config.validate()`` raises ``ConfigError`` with one sentence naming the
  setting and the problem; the CLI prints that sentence and exits non-zero.
- A setting has one name everywhere: the flag without its dashes is the key
  of the TOML file (``--max-message-size`` is ``max-message-size``), and the
  messages of ``validate()`` use it too.  Only ``listen`` covers two fields
  (``host`` and ``port``).
- Settings are layered in one place, ``layer()``: built-in defaults, then the
  file, then the flags given on the command line; the result is validated
  once.
"""

from __future__ import annotations

import difflib
import math
import os
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from .settings import (
    BARE_LF_CHOICES,
    BY_KEY,
    FSYNC_CHOICES,
    LOG_FORMATS,
    LOG_LEVELS,
    LOOP_CHOICES,
    SETTINGS,
    Kind,
    Setting,
    toml_string,
    toml_value,
    usable_cpus,
)

__all__ = [
    "Config",
    "ConfigError",
    "parse_listen",
    "format_listen",
    "parse_size",
    "usable_cpus",
    "server_defaults",
    "setting_keys",
    "field_values",
    "read_file",
    "layer",
    "to_toml",
    "FSYNC_CHOICES",
    "BARE_LF_CHOICES",
    "LOOP_CHOICES",
    "LOG_LEVELS",
    "LOG_FORMATS",
]


class ConfigError(ValueError):
    """A setting has a value the server cannot run with."""


@dataclass(frozen=True, slots=True)
class Config:
    """Every setting of the server, as ``settings.SETTINGS`` declares it.

    What each field means and why it has its default is said once, in its
    row there (``listen`` is ``host`` and ``port``).
    """

    host: str = "127.0.0.1"
    port: int = 2525
    mail_root: str = "mail"
    hostname: str = ""  # "" means socket.getfqdn() at validation time
    max_message_size: int = 25 * 1024 * 1024
    max_recipients: int = 100
    max_errors: int = 20
    max_command_line: int = 1024
    idle_timeout: float = 300.0
    recipient_delimiter: str = "+"
    fsync: str = "batch"
    journal_dir: str = ""  # "" means MAIL_ROOT/.journal at validation time
    deliver: tuple[str, ...] = ("maildir",)
    dead_letter: str = ""  # "" means MAIL_ROOT/.dead-letter at validation time
    lmtp_rcpt_cache: float = 30.0
    lmtp_orphan_scan: float = 60.0
    min_free: int = 64 * 1024 * 1024
    bare_lf: str = "reject"
    spill_threshold: int = 256 * 1024
    shutdown_timeout: float = 30.0
    workers: int = 1
    worker_timeout: float = 30.0
    max_connections: int = 1000
    max_connections_per_ip: int = 50
    user: str = ""
    group: str = ""
    loop: str = "uvloop"
    log_level: str = "info"
    tls_cert: str = ""
    tls_key: str = ""
    tls_listen: str = ""
    proxy_trusted: tuple[str, ...] = ()
    proxy_timeout: float = 5.0
    greeting_delay: float = 0.5
    soft_error_limit: int = 10
    error_delay: float = 1.0
    policy: str = ""
    policy_timeout: float = 30.0
    log_format: str = "text"
    log_file: str = ""
    min_data_rate: int = 500
    metrics: str = ""
    trusted_networks: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    greeting_pass_ttl: float = 86400.0
    dnsbl_sites: tuple[str, ...] = ()
    dnsbl_threshold: int = 1
    greylist: str = "off"
    greylist_delay: float = 300.0
    greylist_window: float = 172800.0
    greylist_lifetime: float = 3024000.0
    greylist_auto_allow: int = 5
    screen_db: str = ""  # "" means MAIL_ROOT/.screen/screen.db at validation time
    milter: tuple[str, ...] = ()
    milter_default_action: str = "tempfail"
    milter_connect_timeout: float = 30.0
    milter_command_timeout: float = 30.0
    milter_content_timeout: float = 300.0
    spf: str = "tag"
    spf_reject_at: str = "data"
    dkim: str = "tag"
    dmarc: str = "tag"
    arc: str = "tag"
    auth_timeout: float = 10.0
    dns_server: tuple[str, ...] = ()
    dns_timeout: float = 3.0

    def validate(self) -> "Config":
        """Return a checked copy, with derived defaults filled in.

        Each setting's own check first, in the table's order, then the few
        that look at two settings at once.
        """
        for setting in SETTINGS:
            value = _value(self, setting)
            problem = setting.problem(value)
            if problem is not None:
                raise ConfigError(problem)
            if setting.kind is Kind.ENDPOINT and value:
                parse_listen(value)
        return _checked_together(self)


def _value(config: Config, setting: Setting) -> Any:
    """A setting's value in ``config``: one field's, or (host, port) for ``listen``."""
    values = tuple(getattr(config, name) for name in setting.fields)
    return values if len(values) > 1 else values[0]


def _checked_together(config: Config) -> Config:
    """The checks of two settings at once, and the hostname's fallback."""
    _check_user_group(config.user, config.group)
    if bool(config.tls_cert) != bool(config.tls_key):
        raise ConfigError("tls-cert and tls-key must be given together")
    if config.tls_listen and not config.tls_cert:
        raise ConfigError("tls-listen needs tls-cert and tls-key")
    hostname = config.hostname or socket.getfqdn()
    if not hostname or any(c.isspace() or not c.isprintable() for c in hostname):
        raise ConfigError(f"hostname {hostname!r} is not a usable host name")
    if config.deliver != ("maildir",) and config.fsync != "batch":
        # LMTP delivery happens after the 250, from the journal: there must be one.
        raise ConfigError("deliver lmtp:... needs fsync batch (the journal it delivers from)")
    journal_dir = config.journal_dir or os.path.join(config.mail_root, ".journal")
    screen_db = config.screen_db or os.path.join(config.mail_root, ".screen", "screen.db")
    dead_letter = config.dead_letter or os.path.join(config.mail_root, ".dead-letter")
    return replace(config, hostname=hostname, journal_dir=journal_dir, screen_db=screen_db, dead_letter=dead_letter)


def field_values(setting: Setting, value: Any) -> dict[str, Any]:
    """A setting's value as Config field values ("HOST:PORT" becomes host and port)."""
    if setting.kind is Kind.LISTEN:
        return dict(zip(setting.fields, parse_listen(value)))
    return {setting.fields[0]: value}


def _check_table() -> None:
    """Config's fields are the table's: each in exactly one row, with its type and default.

    Run at import, so that a field added to one and not the other, or a
    default changed in one only, stops the package from loading at all.
    """
    declared = {f.name: (f.type, f.default) for f in fields(Config)}
    table: dict[str, tuple[object, object]] = {}
    for setting in SETTINGS:
        for (name, default), annotation in zip(field_values(setting, setting.default).items(),
                                               setting.kind.annotations):
            if name in table:
                raise TypeError(f"settings: field {name} has two rows")
            table[name] = (annotation, default)
    if table != declared:
        diff = sorted(n for n in declared.keys() | table.keys() if declared.get(n) != table.get(n))
        raise TypeError(f"settings: Config and the table differ in {', '.join(diff)}")


def parse_listen(value: str) -> tuple[str, int]:
    """Parse ``HOST:PORT`` (``[v6]:PORT`` for IPv6) into a pair."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"listen: {value!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def _check_user_group(user: str, group: str) -> None:
    """The user and group must exist; changing to them needs root."""
    if not user and not group:
        return
    import grp
    import pwd

    try:
        uid = pwd.getpwnam(user).pw_uid if user else os.geteuid()
    except KeyError:
        raise ConfigError(f"user: no user named {user!r}") from None
    try:
        gid = grp.getgrnam(group).gr_gid if group else None
    except KeyError:
        raise ConfigError(f"group: no group named {group!r}") from None
    changes = uid != os.geteuid() or (gid is not None and gid != os.getegid())
    if changes and os.geteuid() != 0:
        raise ConfigError("user/group: changing to another user or group needs root")


# -- the configuration file --------------------------------------------------------
#
# ``fastsmtp serve --config FILE`` reads a TOML file (RFC-less, but see
# https://toml.io/en/v1.0.0) whose top-level keys are the flags' names:
#
#     listen = "0.0.0.0:25"
#     max-message-size = "50M"
#     proxy-trusted = ["10.0.0.0/8"]
#
# Relative paths in a file are taken from the file's directory, so a file
# means the same whatever directory the server is started in (a service
# manager starts it in /) and whenever SIGHUP reads it again.


def setting_keys() -> tuple[str, ...]:
    """Every key, in the order of Config's fields (``listen`` for host and port)."""
    of_field = {name: setting.key for setting in SETTINGS for name in setting.fields}
    return tuple(dict.fromkeys(of_field[f.name] for f in fields(Config)))


def server_defaults() -> dict[str, Any]:
    """The built-in settings of ``fastsmtp serve``, as Config field values.

    Config's own defaults, except those that depend on the machine (one
    worker per usable CPU) and paths, made absolute (the mail root ``./mail``).
    """
    values: dict[str, Any] = {f.name: f.default for f in fields(Config)}
    for setting in SETTINGS:
        name = setting.fields[0]
        if setting.machine_default is not None:
            values[name] = setting.machine_default()
        elif setting.kind is Kind.PATH and values[name]:
            values[name] = os.path.abspath(values[name])
    return values


def parse_size(value: str) -> int:
    """Bytes, with an optional K/M/G suffix (powers of 1024): "25M", "512k", "1.5G"."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = value.strip().upper().removesuffix("B").removesuffix("I")
    scale = units.get(text[-1:], 1)
    number = text[:-1] if text[-1:] in units else text
    try:
        size = float(number) * scale
    except ValueError:
        raise ConfigError(f"{value!r} is not a size in bytes (like 25M)") from None
    if not math.isfinite(size):
        raise ConfigError(f"{value!r} is not a size in bytes (like 25M)")
    return int(size)


def format_listen(host: str, port: int) -> str:
    """``HOST:PORT``, with an IPv6 host in brackets (what parse_listen reads)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def read_file(path: str) -> dict[str, Any]:
    """The settings in a TOML file, as Config field values.

    Keys and types are checked here, values by ``Config.validate()``.  Only
    the keys the file has are returned.

    Raises:
        ConfigError: "PATH: KEY: problem", or "PATH: not valid TOML: ...
            (at line L, column C)".
    """
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid TOML: the file is not UTF-8") from None
    here = os.path.dirname(os.path.abspath(path))
    values: dict[str, Any] = {}
    for key, value in data.items():
        try:
            values.update(_from_toml(key, value, here))
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    return values


def _from_toml(key: str, value: object, here: str) -> dict[str, Any]:
    """One key of a file as Config field values; ConfigError names the key."""
    setting = BY_KEY.get(key)
    if setting is None:
        raise ConfigError(_unknown(key, value))
    kind = setting.kind
    if kind is Kind.LISTEN:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: must be a string like \"0.0.0.0:25\", not {_describe(value)}")
    elif kind is Kind.SIZE:
        if isinstance(value, str):
            try:
                value = parse_size(value)
            except ConfigError as exc:
                raise ConfigError(f"{key}: {exc}") from None
        elif not _is_int(value):
            raise ConfigError(f"{key}: must be a number of bytes (like 26214400 or \"25M\"), not {_describe(value)}")
    elif kind is Kind.INT:
        if not _is_int(value):
            raise ConfigError(f"{key}: must be an integer, not {_describe(value)}")
    elif kind is Kind.SECONDS:
        if not (_is_int(value) or isinstance(value, float)):
            raise ConfigError(f"{key}: must be a number of seconds, not {_describe(value)}")
        value = float(value)  # type: ignore[arg-type]
    elif kind is Kind.STRINGS:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key}: must be an array of strings, not {_describe(value)}")
        value = tuple(value)
    else:  # TEXT, PATH, ENDPOINT
        if not isinstance(value, str):
            wanted = " or ".join(f'"{c}"' for c in setting.choices) if setting.choices else "a string"
            raise ConfigError(f"{key}: must be {wanted}, not {_describe(value)}")
        if kind is Kind.PATH and value:
            value = os.path.normpath(os.path.join(here, value))
    return field_values(setting, value)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _describe(value: object) -> str:
    """A TOML value as the user wrote it, roughly: 'the string "25"'."""
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"the integer {value}"
    if isinstance(value, float):
        return f"the float {value}"
    if isinstance(value, str):
        return f"the string {toml_string(value)}"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return "a date or time"


def _unknown(key: str, value: object) -> str:
    """'KEY: unknown key (did you mean ...?)'."""
    if key in ("host", "port"):
        return f"{key}: unknown key (did you mean 'listen', as in listen = \"0.0.0.0:25\"?)"
    if isinstance(value, dict):
        return f"{key}: unknown key (settings are top-level keys, not tables)"
    close = difflib.get_close_matches(key.replace("_", "-").lower(), setting_keys(), n=1, cutoff=0.6)
    if close:
        return f"{key}: unknown key (did you mean {close[0]!r}?)"
    return f"{key}: unknown key"


def layer(base: Mapping[str, Any], path: str | None, flags: Mapping[str, Any]) -> Config:
    """Built-in defaults < the file at ``path`` < flags given on the command line.

    The three are merged as Config field values and validated once.  An error
    the file causes is prefixed with the file's path; one the flags cause
    alone (it happens without the file too) is not.
    """
    from_file = read_file(path) if path is not None else {}
    try:
        return Config(**{**base, **from_file, **flags}).validate()
    except ConfigError as exc:
        if from_file and not _fails_the_same(Config(**{**base, **flags}), str(exc)):
            raise ConfigError(f"{path}: {exc}") from None
        raise


def _fails_the_same(config: Config, message: str) -> bool:
    try:
        config.validate()
    except ConfigError as exc:
        return str(exc) == message
    return False


def to_toml(config: Config) -> str:
    """Every setting of ``config`` as a TOML file that ``read_file`` reads back equal."""
    lines = []
    for key in setting_keys():
        setting = BY_KEY[key]
        value = _value(config, setting)
        text = toml_string(format_listen(*value)) if setting.kind is Kind.LISTEN else toml_value(value)
        lines.append(f"{key} = {text}")
    return "\n".join(lines) + "\n"


_check_table()
