"""Configuration: one frozen value, validated once, picklable to workers.

Rules of this module:
- No module globals hold configuration; everything travels in ``Config``.
- Every limit of DESIGN.md principle 5 has a field here, with its default and
  the reason for that default.
- ``Config.validate()`` raises ``ConfigError`` with one sentence naming the
  setting and the problem; the CLI prints that sentence and exits non-zero.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass, replace

__all__ = ["Config", "ConfigError", "parse_listen", "usable_cpus", "FSYNC_CHOICES", "BARE_LF_CHOICES"]

FSYNC_CHOICES = ("batch", "always", "off")
BARE_LF_CHOICES = ("reject", "normalize")

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
        if self.loop not in ("uvloop", "asyncio"):
            raise ConfigError(f"loop must be uvloop or asyncio, not {self.loop!r}")
        if len(self.recipient_delimiter) > 1:
            raise ConfigError("recipient-delimiter must be one character or empty")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("tls-cert and tls-key must be given together")
        if self.tls_listen and not self.tls_cert:
            raise ConfigError("tls-listen needs tls-cert and tls-key")
        if self.tls_listen:
            parse_listen(self.tls_listen)
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
