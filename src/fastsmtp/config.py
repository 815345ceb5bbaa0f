"""Configuration: one frozen value, validated once, picklable to workers.

Rules of this module:
- No module globals hold configuration; everything travels in ``Config``.
- Every limit of DESIGN.md principle 5 has a field here, with its default and
  the reason for that default.
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
import ipaddress
import math
import os
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

__all__ = [
    "Config",
    "ConfigError",
    "parse_listen",
    "format_listen",
    "parse_size",
    "usable_cpus",
    "server_defaults",
    "setting_keys",
    "read_file",
    "layer",
    "to_toml",
    "FSYNC_CHOICES",
    "BARE_LF_CHOICES",
    "LOOP_CHOICES",
    "LOG_LEVELS",
    "LOG_FORMATS",
]

FSYNC_CHOICES = ("batch", "always", "off")
BARE_LF_CHOICES = ("reject", "normalize")
LOOP_CHOICES = ("uvloop", "asyncio")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")

MiB = 1024 * 1024


class ConfigError(ValueError):
    """A setting has a value the server cannot run with."""


@dataclass(frozen=True, slots=True)
class Config:
    host: str = "127.0.0.1"
    port: int = 2525
    mail_root: str = "mail"
    hostname: str = ""  # "" means socket.getfqdn() at validation time
    #: 25 MiB is what the large providers accept today; SIZE advertises it
    #: (RFC 1870).
    max_message_size: int = 25 * MiB
    #: RFC 5321 §4.5.3.1.8 asks servers to accept at least 100 recipients.
    max_recipients: int = 100
    #: Postfix's smtpd_hard_error_limit default: a client making this many
    #: errors is a dictionary attack or broken, and is disconnected.
    max_errors: int = 20
    #: A command line may be 512 octets (RFC 5321 §4.5.3.1.4); MAIL and RCPT
    #: grow by their ESMTP parameters (SIZE alone adds 26, RFC 1870 §3), so
    #: we allow 512 more for parameters.
    max_command_line: int = 1024
    #: RFC 5321 §4.5.3.2.7: a server should wait at least 5 minutes for the
    #: next command.
    idle_timeout: float = 300.0
    recipient_delimiter: str = "+"
    fsync: str = "batch"
    bare_lf: str = "reject"
    #: Message bytes kept in memory before the spool spills to tmp/.
    spill_threshold: int = 256 * 1024
    #: Graceful-stop budget for transactions in progress.
    shutdown_timeout: float = 30.0
    #: Worker processes under the supervisor; 0 serves in the foreground
    #: process.  The CLI defaults to the number of usable CPUs.
    workers: int = 1
    #: A worker whose event loop has not beaten for this long is killed and
    #: replaced (gunicorn's --timeout, default 30 s).
    worker_timeout: float = 30.0
    #: Connections one worker serves at once; more get 421 4.7.0.
    max_connections: int = 1000
    #: Connections from one client address over all workers: Postfix's
    #: smtpd_client_connection_count_limit default.  0 disables the limit.
    max_connections_per_ip: int = 50
    #: Serve mail as this user and group after binding the port (port 25
    #: needs root to bind); empty keeps the current ones.
    user: str = ""
    group: str = ""
    #: "uvloop" (the default where installed) or "asyncio".
    loop: str = "uvloop"
    #: Least severe log records written (supervisor and workers).
    log_level: str = "info"
    #: PEM certificate chain and key: STARTTLS is offered only with both
    #: (RFC 3207).
    tls_cert: str = ""
    tls_key: str = ""
    #: A second listener with implicit TLS ("HOST:PORT", port 465 style,
    #: RFC 8314 §3.3); empty for none.
    tls_listen: str = ""
    #: Expect a PROXY protocol header (HAProxy's v1 or v2) from these
    #: networks, before the greeting; empty disables it.
    proxy_trusted: tuple[str, ...] = ()
    #: How long a trusted peer may take to send its PROXY header.
    proxy_timeout: float = 5.0
    #: Wait this long before the greeting; a client that talks first is an
    #: early talker (a spam engine that does not wait for replies), as
    #: Postfix's postscreen and Haraka's early_talker detect: 554 and close.
    #: 0 turns it off.
    greeting_delay: float = 0.5
    #: Postfix's smtpd_soft_error_limit: past this many errors each further
    #: error reply is delayed by error_delay seconds per error over it.
    soft_error_limit: int = 10
    error_delay: float = 1.0
    #: Policy hooks: "module:Class" or "path/to/file.py:Class" (hooks.py),
    #: instantiated once per worker; empty for none.
    policy: str = ""
    #: How long an async hook may take before the command gets 451 4.3.0:
    #: a DNS lookup that hangs must not hold the session for the idle timeout.
    policy_timeout: float = 30.0
    #: "text" (Postfix-style key=value) or "json" (one object per line).
    log_format: str = "text"
    #: Append log lines to this file instead of stderr; reopened on SIGUSR2.
    log_file: str = ""
    #: Postfix's smtpd_min_data_rate: message data slower than this
    #: (bytes/s, after a 16 KiB allowance) is cut off with 421; 0 disables.
    min_data_rate: int = 500
    #: Serve Prometheus metrics (GET /metrics) on this "HOST:PORT"; empty:
    #: off.  No authentication: keep it on loopback or a private network.
    metrics: str = ""

    def validate(self) -> "Config":
        """Return a checked copy, with derived defaults filled in."""
        if not self.host:
            raise ConfigError("listen: the host is empty")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"listen: port {self.port} is not between 0 and 65535")
        if self.max_message_size < 1:
            raise ConfigError("max-message-size must be at least 1 byte")
        if self.max_recipients < 1:
            raise ConfigError("max-recipients must be at least 1")
        if self.max_errors < 1:
            raise ConfigError("max-errors must be at least 1")
        if self.max_command_line < 512:
            raise ConfigError("max-command-line must be at least 512 (RFC 5321 §4.5.3.1.4)")
        for name in ("idle_timeout", "shutdown_timeout", "worker_timeout", "proxy_timeout"):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"{_key(name)} must be a finite number of seconds")
        if self.idle_timeout <= 0:
            raise ConfigError("idle-timeout must be positive")
        if self.fsync not in FSYNC_CHOICES:
            raise ConfigError(f"fsync must be one of {', '.join(FSYNC_CHOICES)}, not {self.fsync!r}")
        if self.bare_lf not in BARE_LF_CHOICES:
            raise ConfigError(f"bare-lf must be one of {', '.join(BARE_LF_CHOICES)}, not {self.bare_lf!r}")
        if self.workers < 0:
            raise ConfigError("workers must be 0 or more")
        if self.worker_timeout <= 0:
            raise ConfigError("worker-timeout must be positive")
        if self.shutdown_timeout < 0:
            raise ConfigError("shutdown-timeout must be 0 or more")
        if self.max_connections < 1:
            raise ConfigError("max-connections must be at least 1")
        if self.max_connections_per_ip < 0:
            raise ConfigError("max-connections-per-ip must be 0 (no limit) or more")
        _check_user_group(self.user, self.group)
        if self.loop not in LOOP_CHOICES:
            raise ConfigError(f"loop must be uvloop or asyncio, not {self.loop!r}")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"log-level must be one of {', '.join(LOG_LEVELS)}, not {self.log_level!r}")
        if self.log_format not in LOG_FORMATS:
            raise ConfigError(f"log-format must be text or json, not {self.log_format!r}")
        if self.policy and ":" not in self.policy:
            raise ConfigError(f"policy: {self.policy!r} is not MODULE:CLASS or FILE.py:CLASS")
        if not (math.isfinite(self.policy_timeout) and self.policy_timeout > 0):
            raise ConfigError("policy-timeout must be a positive number of seconds")
        if self.spill_threshold < 0:
            raise ConfigError("spill-threshold must be 0 or more")
        if self.proxy_timeout <= 0:
            raise ConfigError("proxy-timeout must be positive")
        if len(self.recipient_delimiter) > 1:
            raise ConfigError("recipient-delimiter must be one character or empty")
        if self.greeting_delay < 0 or self.error_delay < 0 or self.min_data_rate < 0:
            raise ConfigError("greeting-delay, error-delay and min-data-rate must not be negative")
        if self.soft_error_limit < 0:
            raise ConfigError("soft-error-limit must not be negative")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("tls-cert and tls-key must be given together")
        if self.tls_listen and not self.tls_cert:
            raise ConfigError("tls-listen needs tls-cert and tls-key")
        if self.tls_listen:
            parse_listen(self.tls_listen)
        if self.metrics:
            parse_listen(self.metrics)
        for net in self.proxy_trusted:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ConfigError(f"proxy-trusted: {net!r} is not an address or network") from None
        hostname = self.hostname or socket.getfqdn()
        if not hostname or any(c.isspace() or not c.isprintable() for c in hostname):
            raise ConfigError(f"hostname {hostname!r} is not a usable host name")
        return replace(self, hostname=hostname)


def parse_listen(value: str) -> tuple[str, int]:
    """Parse ``HOST:PORT`` (``[v6]:PORT`` for IPv6) into a pair."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"listen: {value!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def usable_cpus() -> int:
    """CPUs this process may run on (a cpuset or taskset may allow fewer than exist)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


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

#: Sizes may be written "25M" as well as 26214400.
_SIZE_FIELDS = ("max_message_size", "spill_threshold")
#: Paths made absolute when read (from a file: against the file's directory).
PATH_FIELDS = ("mail_root", "tls_cert", "tls_key", "log_file")
_CHOICES = {"fsync": FSYNC_CHOICES, "bare_lf": BARE_LF_CHOICES, "loop": LOOP_CHOICES, "log_level": LOG_LEVELS, "log_format": LOG_FORMATS}


def _key(name: str) -> str:
    """The key (and flag, without ``--``) of a Config field."""
    return name.replace("_", "-")


def setting_keys() -> tuple[str, ...]:
    """Every key, in the order of Config's fields (``listen`` for host and port)."""
    keys: list[str] = []
    for f in fields(Config):
        if f.name == "host":
            keys.append("listen")
        elif f.name != "port":
            keys.append(_key(f.name))
    return tuple(keys)


def server_defaults() -> dict[str, Any]:
    """The built-in settings of ``fastsmtp serve``, as Config field values.

    Config's own defaults, except one worker per usable CPU and the mail root
    ``./mail`` made absolute.
    """
    values: dict[str, Any] = {f.name: f.default for f in fields(Config)}
    values["workers"] = usable_cpus()
    values["mail_root"] = os.path.abspath(values["mail_root"])
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
    if key == "listen":
        if not isinstance(value, str):
            raise ConfigError(f"listen: must be a string like \"0.0.0.0:25\", not {_describe(value)}")
        host, port = parse_listen(value)
        return {"host": host, "port": port}
    types = {f.name: f.type for f in fields(Config)}
    name = key.replace("-", "_")
    if "_" in key or name not in types or name in ("host", "port"):
        raise ConfigError(_unknown(key, value))
    kind = types[name]
    if name in _SIZE_FIELDS:
        if isinstance(value, str):
            try:
                value = parse_size(value)
            except ConfigError as exc:
                raise ConfigError(f"{key}: {exc}") from None
        elif not _is_int(value):
            raise ConfigError(f"{key}: must be a number of bytes (like 26214400 or \"25M\"), not {_describe(value)}")
    elif kind == "int":
        if not _is_int(value):
            raise ConfigError(f"{key}: must be an integer, not {_describe(value)}")
    elif kind == "float":
        if not (_is_int(value) or isinstance(value, float)):
            raise ConfigError(f"{key}: must be a number of seconds, not {_describe(value)}")
        value = float(value)  # type: ignore[arg-type]
    elif kind == "str":
        if not isinstance(value, str):
            wanted = " or ".join(f'"{c}"' for c in _CHOICES[name]) if name in _CHOICES else "a string"
            raise ConfigError(f"{key}: must be {wanted}, not {_describe(value)}")
        if name in PATH_FIELDS and value:
            value = os.path.normpath(os.path.join(here, value))
    else:  # tuple[str, ...]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key}: must be an array of strings, not {_describe(value)}")
        value = tuple(value)
    return {name: value}


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
        return f"the string {_toml_string(value)}"
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
    for f in fields(Config):
        value = getattr(config, f.name)
        if f.name == "host":
            lines.append(f"listen = {_toml_string(format_listen(config.host, config.port))}")
        elif f.name != "port":
            lines.append(f"{_key(f.name)} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: object) -> str:
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)  # int, or a finite float: "300.0"


def _toml_string(text: str) -> str:
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
