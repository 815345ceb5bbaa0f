"""fastsmtp: a fast, durable inbound SMTP receiver that delivers into Maildir folders."""

from ._version import __version__
from .config import Config, ConfigError
from .errors import LocalProtocolError, ProtocolError, RemoteProtocolError, StorageError
from .events import (
    Address,
    ConnectionClosed,
    Data,
    Ehlo,
    EndOfMessage,
    Event,
    Helo,
    Help,
    MailFrom,
    MessageChunk,
    Noop,
    Quit,
    RcptTo,
    Reply,
    Rset,
    Vrfy,
)
from .hooks import AcceptAll, MessageInfo, Policy, SessionInfo
from .session import NEED_DATA, PAUSED, Limits, Session
from .stages import CONTINUE, Verdict

__all__ = [
    "__version__",
    "Config",
    "ConfigError",
    "ProtocolError",
    "LocalProtocolError",
    "RemoteProtocolError",
    "StorageError",
    "Address",
    "Event",
    "Helo",
    "Ehlo",
    "MailFrom",
    "RcptTo",
    "Data",
    "Rset",
    "Noop",
    "Vrfy",
    "Help",
    "Quit",
    "MessageChunk",
    "EndOfMessage",
    "ConnectionClosed",
    "Reply",
    "Session",
    "Limits",
    "Policy",
    "AcceptAll",
    "SessionInfo",
    "MessageInfo",
    "Verdict",
    "CONTINUE",
    "NEED_DATA",
    "PAUSED",
]
