"""What all connections of one worker share: configuration, replies, parts.

Rules of this module:
- Everything here is built once per worker and read by every connection:
  the pre-encoded replies, the session limits, the store, the recipient
  check, the stages, the counters, the TLS context.  Nothing a connection
  changes lives here except the set of live connections.
- The connection itself is protocol.py; the life of one message is
  transaction.py; what happens before the greeting is opening.py.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING

from .anvil import AnvilRow, client_key
from .auth.stage import Authenticator, checks_on
from .config import Config
from .dns import Lookups, Resolver
from .events import Reply
from .hooks import load_policy
from .logs import EventLog, event_log
from .metrics import NO_METER, Meter
from .networks import Networks
from .policy import FolderRecipients
from .milter.stage import Milters
from .screen import Screen
from .session import Limits
from .space import FreeSpace
from .stages import NO_STAGES, Stages, resolve
from .store import Store
from .tls import server_context
from .trace import TraceHeaders
from .lmtp.client import LMTPClient
from .lmtp.recipients import LmtpRecipients

if TYPE_CHECKING:
    from .protocol import SMTPProtocol

__all__ = ["Server"]


class Server:
    """One worker's shared state; ``protocol_factory`` makes its connections."""

    def __init__(
        self, config: Config, store: Store, clients: AnvilRow | None = None, metrics: memoryview | None = None
    ) -> None:
        self.config = config
        self.store = store
        self.meter: Meter = Meter(metrics) if metrics is not None else NO_METER
        self.log: EventLog = event_log()
        # Connections per client address, summed over all workers (anvil.py).
        self.clients = clients if config.max_connections_per_ip else None
        self.recipients = FolderRecipients(config.mail_root, config.recipient_delimiter)
        # --deliver lmtp:...: the backend says who exists, at RCPT (lmtp/recipients.py).
        self.backend: LmtpRecipients | None = None
        if config.deliver != ("maildir",):
            # Short timeouts: a client waits on each RCPT.
            self.backend = LmtpRecipients(LMTPClient(config.deliver, lhlo_name=config.hostname,
                                                     connect_timeout=2.0, command_timeout=10.0),
                                          remember=config.lmtp_rcpt_cache)
        # MAIL is refused with 452 4.3.1 below the reserve (space.py): the
        # journal's file system and the mail root's.
        places = [config.mail_root] + ([config.journal_dir] if config.fsync == "batch" else [])
        self.free_space = FreeSpace(places, config.min_free)
        # The checks every session and message pass, in order (stages.py):
        # today the operator's policy, one object per worker, its methods
        # looked up once here, not per connection.
        self.stages: Stages = NO_STAGES
        if config.policy:
            self.stages = resolve([("policy", load_policy(config.policy), config.policy_timeout)])
        # Clients that are ours: screened by nothing, checked by nothing
        # (screen.py, auth/stage.py).
        self.trusted = Networks(config.trusted_networks)
        # The one resolver of the worker, for the checks and the DNSBLs; its
        # cache serves both.
        self.lookups: Lookups | None = None
        if checks_on(config) or config.dnsbl_sites:
            self.lookups = Resolver.from_config(config.dns_server, timeout=config.dns_timeout)
        # SPF, DKIM, DMARC and ARC (auth/stage.py): before the policy's
        # on_message, which sees their results.
        self.auth = Authenticator(config, self.meter, self.lookups, trusted=self.trusted)
        self.screen = Screen(config, self.trusted, self.lookups, self.meter)
        # The milters (milter/stage.py): each connection talks to them at
        # every step, after the policy's stage of that step.
        self.milters = Milters(config, self.meter)
        self.limits = Limits(
            max_command_line=config.max_command_line,
            max_message_size=config.max_message_size,
            max_recipients=config.max_recipients,
            max_errors=config.max_errors,
            bare_lf=config.bare_lf,
            starttls=bool(config.tls_cert),
        )
        self.tls_context: ssl.SSLContext | None = None
        if config.tls_cert:
            self.tls_context = server_context(config.tls_cert, config.tls_key)
        self.proxy_trusted = Networks(config.proxy_trusted)
        name = config.hostname
        self.hostname = name.encode("ascii", "replace")
        self.trace = TraceHeaders(self.hostname)
        self.greeting = Reply(220, "", f"{name} ESMTP fastsmtp")
        self.helo_reply = Reply(250, "", name)
        # RFC 1869 §4.3: keywords after the greeting line; RFC 1870 SIZE,
        # RFC 2920 PIPELINING, RFC 6152 8BITMIME, RFC 6531 SMTPUTF8,
        # RFC 2034 ENHANCEDSTATUSCODES, RFC 3030 CHUNKING, RFC 3207 STARTTLS
        # (offered only outside TLS, and only with a certificate).
        keywords = [
            name,
            "PIPELINING",
            f"SIZE {config.max_message_size}",
            "8BITMIME",
            "SMTPUTF8",
            "ENHANCEDSTATUSCODES",
            "CHUNKING",
        ]
        self.ehlo_reply_tls = Reply(250, "", "\n".join(keywords))
        if self.tls_context is not None:
            keywords.append("STARTTLS")
        self.ehlo_reply = Reply(250, "", "\n".join(keywords))
        self.connections: set[SMTPProtocol] = set()
        self.closing = False

    def protocol_factory(self) -> "SMTPProtocol":
        from .protocol import SMTPProtocol

        return SMTPProtocol(self)

    def implicit_tls_factory(self) -> "SMTPProtocol":
        from .protocol import SMTPProtocol

        return SMTPProtocol(self, implicit_tls=True)

    def trusts_proxy(self, peer: str) -> bool:
        return peer in self.proxy_trusted

    def admit(self, peer: str, trusted: bool = False) -> tuple[Reply | None, bytes | None]:
        """Count a connection from ``peer``: (refusal or None, key to release later).

        Postfix's anvil limit and reply: "421 4.7.0 Error: too many
        connections from ADDRESS".  The count goes up before the check so
        that workers admitting one client at the same instant see each other.
        A trusted client is not counted (Postfix's
        smtpd_client_event_limit_exceptions = $mynetworks).
        """
        clients = self.clients
        key = client_key(peer) if clients is not None and not trusted else None
        if clients is None or key is None:
            return None, None
        if clients.connect(key) > self.config.max_connections_per_ip:
            clients.disconnect(key)
            return Reply(421, "4.7.0", f"Error: too many connections from {peer}"), None
        return None, key

    def release(self, key: bytes) -> None:
        if self.clients is not None:
            self.clients.disconnect(key)

    def begin_shutdown(self) -> None:
        """Say 421 to idle sessions; transactions in progress finish first."""
        self.closing = True
        for conn in list(self.connections):
            conn.shutdown()
